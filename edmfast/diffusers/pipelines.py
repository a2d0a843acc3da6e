"""``edmfast.diffusers.accelerate(pipe)``: a diffusers pipeline's denoising loop on edmfast.

During a call the pipeline (in the calling thread only) sees a scheduler shim with a single
timestep and a UNet proxy. The pipeline encodes the prompt, prepares the latents (``noise *
init_noise_sigma``), batches cond / uncond for classifier-free guidance and calls the proxy once;
the proxy runs the whole edmfast loop on that input (guidance scale / rescale read from the pipe
per call) and the shim's ``step`` returns the result, which the pipeline decodes as usual.
One cached sampler per (scheduler configuration, UNet dtype and device), on the pipe.

Importing this module does not import diffusers; the functions do.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ops import IO_DTYPES
from ..sampler import Sampler
from .schedules import Schedule, _name, _UNetCall, denoiser, schedule

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


# ----------------------------------------------------------------------------- pipelines


_SET_TIMESTEPS = threading.Lock()


class _SchedulerShim:
    """What the pipeline sees as its scheduler during an accelerated call: one timestep; the
    latents the pipeline prepares are the real scheduler's; ``step`` hands back edmfast's result."""

    order = 1

    def __init__(self, real: Any):
        self.real = real
        self.result: torch.Tensor | None = None
        self.schedule: Schedule | None = None
        self.announced: torch.Tensor | None = None  # the scheduler's timesteps for this call
        self.callback: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @property
    def config(self) -> Any:
        return self.real.config

    @property
    def init_noise_sigma(self) -> Any:
        return self.real.init_noise_sigma

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **kw: Any) -> None:
        if kw or num_inference_steps is None:
            raise ValueError(f"accelerated pipelines take num_inference_steps only, not {sorted(kw)}")
        sched = schedule(self.real, num_inference_steps)
        # the pipes of several threads may share one scheduler: set, check and keep its timesteps
        # at once (a callback later reports this call's own)
        with _SET_TIMESTEPS:
            self.real.set_timesteps(num_inference_steps, device=device)
            _check_against(self.real, sched)
            self.announced = self.real.timesteps.clone()
        self.schedule = sched
        self.timesteps = self.announced[:1]

    def set_begin_index(self, begin_index: int = 0) -> None:
        pass

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(self, model_output: Any, timestep: Any, sample: torch.Tensor, *args: Any, **kw: Any) -> Any:
        if self.result is None:
            raise RuntimeError("edmfast.diffusers: the pipeline stepped before the accelerated UNet ran")
        out = self.result.to(sample.dtype)
        if kw.get("return_dict", True):
            from diffusers.schedulers.scheduling_utils import SchedulerOutput

            return SchedulerOutput(prev_sample=out)
        return (out,)


def _check_against(real: Any, sched: Schedule) -> None:
    """Refuse (never run different math) if edmfast's schedule is not the scheduler's."""
    name = type(real).__name__
    if name == "DDIMScheduler":
        ok = torch.equal(real.timesteps.cpu().double(), sched.timesteps)
    else:
        theirs = real.sigmas.cpu().double()
        if name == "HeunDiscreteScheduler":
            theirs = torch.cat([theirs[:1], theirs[1:-1:2], theirs[-1:]])
        if len(theirs) > 2 and theirs[-1] == theirs[-2]:
            theirs = theirs[:-1]  # final_sigmas_type="sigma_min" after t = 0: a dt = 0 step
        ok = theirs.shape == sched.sigmas.shape and torch.allclose(theirs, sched.sigmas, rtol=1e-5, atol=1e-7)
    if not ok:
        raise ValueError(
            f"edmfast.diffusers does not reproduce this {name} configuration's schedule: {dict(real.config)}"
        )


class _UNetProxy:
    """The pipeline's UNet during an accelerated call: its one call runs the whole edmfast loop."""

    def __init__(self, pipe: Any, unet: nn.Module, shim: _SchedulerShim):
        self._pipe = weakref.ref(pipe)
        self._unet = unet
        self._shim = shim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unet, name)

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep_cond: Any = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict | None = None,
        return_dict: bool = True,
        **extra: Any,
    ) -> Any:
        pipe = self._pipe()
        if timestep_cond is not None or extra:
            what = "timestep_cond" if timestep_cond is not None else sorted(extra)
            raise ValueError(f"accelerated pipelines do not support {what}")
        sched = self._shim.schedule
        assert pipe is not None and sched is not None
        flat: dict[str, Any] = {}
        if encoder_hidden_states is not None:
            flat["encoder_hidden_states"] = encoder_hidden_states
        for key, value in (added_cond_kwargs or {}).items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"added_cond_kwargs[{key!r}] must be a tensor in an accelerated pipeline")
            flat[_UNetCall.PREFIX + key] = value
        if cross_attention_kwargs:
            if any(isinstance(v, torch.Tensor) for v in cross_attention_kwargs.values()):
                raise ValueError(
                    "cross_attention_kwargs holding tensors are not supported by accelerated pipelines"
                )
            flat["cross_attention_kwargs"] = cross_attention_kwargs
        cfg = bool(pipe.do_classifier_free_guidance)
        rows = sample.shape[0]
        batch = rows // 2 if cfg else rows
        for key, value in flat.items():
            if isinstance(value, torch.Tensor) and value.shape[0] != rows:
                raise ValueError(f"{key} has batch {value.shape[0]}, the UNet input {rows}")
        noise = sample[:batch].float() * sched.noise_scale
        sampler = _sampler(pipe, self._shim.real, self._unet, sched.solver)
        steps = _StepCallback(pipe, self._shim, sample.dtype) if self._shim.callback is not None else None
        if cfg:
            # the pipeline batches [uncond, cond]; a row keeps its own conditioning, as in diffusers
            cut = {
                k: (v[batch:], v[:batch]) if isinstance(v, torch.Tensor) else (v, v) for k, v in flat.items()
            }
            x = sampler(
                noise,
                sched.sigmas,
                cond={k: c for k, (c, _) in cut.items()},
                uncond={k: u for k, (_, u) in cut.items()},
                guidance_scale=float(pipe.guidance_scale),
                guidance_rescale=float(getattr(pipe, "guidance_rescale", 0.0)),
                callback=steps,
            )
        else:
            x = sampler(noise, sched.sigmas, cond=flat, callback=steps)
        self._shim.result = x * sched.output_scale if sched.output_scale != 1.0 else x
        if steps is not None:
            steps.deliver(len(sched.timesteps) - 1, self._shim.result)
        # The pipeline forms its guidance from this and hands it to the shim's step, which ignores
        # it: the input itself keeps that arithmetic finite (guidance rescale of zeros is 0/0).
        out = sample.clone()
        return (out,) if not return_dict else _Output(out)


class _StepCallback:
    """diffusers' ``callback_on_step_end(pipe, i, t, {"latents": ...})`` from edmfast's callback.

    edmfast reports the state a step starts from; the pipeline reports the latents after step i
    (in the scheduler's scaling: VP for DDIM), i.e. edmfast's step i + 1 (the last one from the
    result). The callback may read the latents, not replace them (refused: the loop cannot change
    course without leaving edmfast's fused schedule)."""

    def __init__(self, pipe: Any, shim: _SchedulerShim, dtype: torch.dtype):
        self.pipe, self.shim, self.dtype = pipe, shim, dtype
        self.vp = type(shim.real).__name__ == "DDIMScheduler"

    def __call__(self, info: dict) -> None:
        i = info["i"]
        if i > 0:
            x = info["x"]
            if self.vp:
                x = x / math.sqrt(1 + float(info["sigma"]) ** 2)
            self.deliver(i - 1, x)

    def deliver(self, i: int, x: torch.Tensor) -> None:
        latents = x.to(self.dtype)
        t = self.shim.announced[i] if self.shim.announced is not None else i
        out = self.shim.callback(self.pipe, i, t, {"latents": latents})
        if isinstance(out, dict) and out.get("latents", latents) is not latents:
            raise ValueError(
                "callback_on_step_end returned new latents: not supported by an accelerated pipeline"
            )


@dataclass
class _Output:
    sample: torch.Tensor


class _PipeState:
    """edmfast's state on an accelerated pipe: its cached Samplers and the guard that runs its calls
    one at a time. A copy of the pipe (``copy.deepcopy``, pickling) starts with a fresh one: the
    Samplers hold the original's UNet (and locks, which do not copy)."""

    def __init__(self) -> None:
        self.samplers: dict[tuple, Sampler] = {}
        self.lock = threading.Lock()
        self.owner: int | None = None  # the thread running a call

    def __deepcopy__(self, memo: dict) -> _PipeState:
        return _PipeState()

    def __reduce__(self) -> tuple:
        return (_PipeState, ())


def _state(pipe: Any) -> _PipeState:
    state = pipe.__dict__.get("_edmfast")
    if state is None:  # dict.setdefault is atomic: two first calls get one state
        state = pipe.__dict__.setdefault("_edmfast", _PipeState())
    return state


def _sampler(pipe: Any, real: Any, unet: nn.Module, solver: str) -> Sampler:
    """One Sampler per (scheduler configuration, UNet, its dtype and device, solver), cached on the
    pipe: ``pipe.to(dtype / device)`` changes the UNet in place, and the Sampler's denoiser casts
    the network input to the dtype it was built for."""
    dtype, device = getattr(unet, "dtype", None), getattr(unet, "device", None)
    if dtype not in IO_DTYPES:
        names = ", ".join(map(str, IO_DTYPES))
        raise TypeError(f"accelerated pipelines run the UNet in {names}; this pipe's UNet is {dtype}")
    key = (type(real).__name__, repr(sorted(dict(real.config).items())), id(unet), dtype, device, solver)
    cache = _state(pipe).samplers
    if key not in cache:
        if len(cache) >= 8:
            cache.pop(next(iter(cache)))
        cache[key] = Sampler(denoiser(unet, real), solver=solver, s_churn=0.0)
    return cache[key]


_CALL_OPTIONS = {
    # option: the value edmfast reproduces (anything else is refused, by name)
    "timesteps": None,
    "sigmas": None,
    "denoising_end": None,
    "callback": None,
    "callback_steps": None,
}


_CALLS = threading.local()  # .active: id(pipe) -> (scheduler shim, UNet proxy) of this thread's call


def _component(name: str, index: int) -> property:
    """``pipe.scheduler`` / ``pipe.unet`` of an accelerated pipe: the running call's shim / proxy in
    the thread running it, the pipe's own component everywhere else."""

    def get(self: Any) -> Any:
        call = getattr(_CALLS, "active", {}).get(id(self))
        if call is not None:
            return call[index]
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None

    def set_(self: Any, value: Any) -> None:
        self.__dict__[name] = value

    return property(get, set_)


def _accelerated_call(self: Any, base: type, *args: Any, **kwargs: Any) -> Any:
    state = _state(self)
    me = threading.get_ident()
    if state.owner == me:
        raise RuntimeError(
            "an accelerated pipeline cannot be called from inside its own call (from its "
            "callback_on_step_end, say); use another pipe (copy.deepcopy(pipe)) for a nested call"
        )
    # One call at a time (a call from another thread waits): the stock __call__ keeps per-call
    # values on the pipe (guidance scale, ...) and sets the real scheduler's timesteps.
    with state.lock:
        state.owner = me
        try:
            return _run_call(self, base, args, kwargs)
        finally:
            state.owner = None


def _run_call(self: Any, base: type, args: tuple, kwargs: dict) -> Any:
    real, unet = self.__dict__["scheduler"], self.__dict__["unet"]
    _name(real)
    # positional arguments by name, so that every option is checked whichever way it came
    params = inspect.signature(base.__call__).parameters
    bound = inspect.signature(base.__call__).bind(self, *args, **kwargs).arguments
    kwargs = {}
    for key, value in bound.items():
        if params[key].kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif params[key].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{base.__name__}.__call__ takes no extra positional arguments")
        elif key != "self":
            kwargs[key] = value
    for key, ok in _CALL_OPTIONS.items():
        if kwargs.get(key, ok) is not ok:
            raise ValueError(f"{key}= is not supported by an accelerated pipeline (edmfast.diffusers)")
    eta = kwargs.get("eta", 0.0)
    if type(real).__name__ == "DDIMScheduler" and eta != 0:
        raise ValueError(f"eta={eta!r} is not supported by an accelerated pipeline (DDIM with eta = 0 only)")
    callback = kwargs.pop("callback_on_step_end", None)
    inputs = kwargs.pop("callback_on_step_end_tensor_inputs", None)
    if callback is not None:
        inputs = list(getattr(callback, "tensor_inputs", None) or inputs or ["latents"])
        if inputs != ["latents"]:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs={inputs} is not supported by an accelerated pipeline "
                "(only ['latents'])"
            )
        if type(real).__name__ == "HeunDiscreteScheduler":
            raise ValueError(
                "callback_on_step_end with HeunDiscreteScheduler is not supported by an accelerated pipeline"
            )
    shim = _SchedulerShim(real)
    shim.callback = callback
    active = _CALLS.__dict__.setdefault("active", {})
    active[id(self)] = (shim, _UNetProxy(self, unet, shim))
    try:
        return base.__call__(self, **kwargs)
    finally:
        del active[id(self)]


def accelerate(pipe: Any) -> Any:
    """Run ``pipe``'s denoising loop on edmfast from now on; returns ``pipe`` (changed in place).

    ``pipe(prompt, num_inference_steps=..., guidance_scale=..., guidance_rescale=...,
    generator=..., latents=..., output_type=...)`` then equals the stock pipeline within float32
    rounding. The scheduler is read at each call (swap ``pipe.scheduler`` freely); guidance
    values may change per call (one cached Sampler serves them all). ``callback_on_step_end``
    sees the latents after each step, as in the stock loop (it runs the eager loop; it may not
    replace the latents; not with Heun). Unsupported schedulers, scheduler options and call
    options (custom timesteps / sigmas, DDIM eta != 0, denoising_end, the deprecated ``callback``,
    a UNet with ``time_cond_proj_dim``) raise ValueError naming them.

    The cached Samplers follow ``pipe.to(dtype / device)`` (one per UNet dtype and device; the
    UNet must be float32, float16 or bfloat16). ``copy.deepcopy(pipe)`` is accelerated too, with
    its own components and cache. Calls from several threads run one at a time (a second waits:
    the stock ``__call__`` keeps per-call values such as the guidance scale on the pipe, and sets
    the scheduler's timesteps); during a call, only the calling thread sees the shim scheduler /
    UNet proxy. Calling the pipe from inside its own call (from ``callback_on_step_end``) raises
    RuntimeError.
    """
    import diffusers

    if getattr(type(pipe), "_edmfast_accelerated", False):
        return pipe
    # exactly these classes: a subclass may run another loop around the same scheduler calls
    if type(pipe) not in tuple(getattr(diffusers, n) for n in PIPELINES):
        raise TypeError(f"pipe must be one of {', '.join(PIPELINES)}, got {type(pipe).__name__}")
    base = type(pipe)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _accelerated_call(self, base, *args, **kwargs)

    functools.update_wrapper(__call__, base.__call__)  # the stock signature and docstring
    attrs = {
        "__call__": __call__,
        "_edmfast_accelerated": True,
        "__module__": base.__module__,
        "scheduler": _component("scheduler", 0),
        "unet": _component("unet", 1),
    }
    pipe.__class__ = type(base.__name__, (base,), attrs)
    return pipe
