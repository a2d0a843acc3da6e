"""``edmfast.diffusers.accelerate(pipe)``: a diffusers pipeline's denoising loop on edmfast.

During a call the pipeline (in the calling thread only) sees a scheduler shim with a single
timestep and a proxy for its network (the UNet of Stable Diffusion / SDXL, the transformer of SD3 /
FLUX). The pipeline encodes the prompt, prepares the latents (``noise * init_noise_sigma``),
batches cond / uncond for classifier-free guidance and calls the proxy once; the proxy runs the
whole edmfast loop on that input (guidance scale / rescale read from the pipe per call) and the
shim's ``step`` returns the result, which the pipeline decodes as usual. One cached sampler per
(scheduler configuration, network dtype and device), on the pipe.

``callback_on_step_end`` runs on the engine's ``on_step_end`` hook, after each step, with the
pipeline's latents (edmfast's state times the schedule's `Schedule.latent_scale`): edits in place
or returned latents become the state the loop continues from, ``pipe._interrupt`` stops it as the
stock loop does, and guidance changes take effect from the next step (`_StepHook`).

Importing this module does not import diffusers; the functions do.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine import StepView
from ..ops import IO_DTYPES
from ..sampler import Sampler
from . import flow
from .schedules import Schedule, _name, _UNetCall, denoiser, schedule

# pipeline class -> the attribute holding its network
PIPELINES = {
    "StableDiffusionPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "StableDiffusion3Pipeline": "transformer",
    "FluxPipeline": "transformer",
}


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
        self.inputs: list[str] = []  # the callback's tensor inputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @property
    def config(self) -> Any:
        return self.real.config

    @property
    def init_noise_sigma(self) -> Any:
        return self.real.init_noise_sigma

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        sigmas: Any = None,
        mu: float | None = None,
        timesteps: Any = None,
    ) -> None:
        # named parameters: the pipelines look for "sigmas" in this signature (flow matching)
        if timesteps is not None:
            raise ValueError("custom timesteps are not supported by an accelerated pipeline")
        extra = {k: v for k, v in (("sigmas", sigmas), ("mu", mu)) if v is not None}
        if num_inference_steps is None and sigmas is None:
            raise ValueError("accelerated pipelines need num_inference_steps")
        sched = schedule(self.real, num_inference_steps, **extra)
        # the pipes of several threads may share one scheduler: set, check and keep its timesteps
        # at once (a callback later reports this call's own)
        with _SET_TIMESTEPS:
            if sigmas is not None:
                self.real.set_timesteps(device=device, **extra)
            else:
                self.real.set_timesteps(num_inference_steps, device=device, **extra)
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
    if name in flow.SCHEDULERS:
        ok = flow.check_against(real, sched)
    elif name == "DDIMScheduler":
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
        assert pipe is not None and self._shim.schedule is not None
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
        if cfg:
            # the pipeline batches [uncond, cond]; a row keeps its own conditioning, as in diffusers
            cond, uncond = _halves(flat, batch)
            guidance = (float(pipe.guidance_scale), float(getattr(pipe, "guidance_rescale", 0.0)))
            _run(pipe, self._shim, self._unet, sample[:batch], flat, cond, uncond, guidance)
        else:
            _run(pipe, self._shim, self._unet, sample, flat, flat, None, None)
        # The pipeline forms its guidance from this and hands it to the shim's step, which ignores
        # it: the input itself keeps that arithmetic finite (guidance rescale of zeros is 0/0).
        out = sample.clone()
        return (out,) if not return_dict else _Output(out)


def _halves(flat: dict, batch: int) -> tuple[dict, dict]:
    """(cond, uncond) keyword arguments from the pipeline's [uncond, cond] rows."""
    cut = {k: (v[batch:], v[:batch]) if isinstance(v, torch.Tensor) else (v, v) for k, v in flat.items()}
    return {k: c for k, (c, _) in cut.items()}, {k: u for k, (_, u) in cut.items()}


class _TransformerProxy:
    """The pipeline's transformer (SD3, FLUX) during an accelerated call: its first call runs the
    whole edmfast loop (with FLUX's true CFG, the second: the unconditional one completes the pair)."""

    def __init__(self, pipe: Any, transformer: nn.Module, shim: _SchedulerShim, true_cfg: float | None):
        self._pipe = weakref.ref(pipe)
        self._model = transformer
        self._shim = shim
        self._true_cfg = true_cfg
        self._pending: dict | None = None  # FLUX true CFG: the conditional call's arguments

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(
        self,
        hidden_states: torch.Tensor,
        timestep: Any = None,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
        **extra: Any,
    ) -> Any:
        pipe = self._pipe()
        assert pipe is not None and self._shim.schedule is not None
        given = sorted(k for k, v in extra.items() if v is not None)
        if given:
            raise ValueError(f"accelerated pipelines do not support the transformer arguments {given}")
        rows = hidden_states.shape[0]
        flat: dict[str, Any] = {}
        for key, value in (
            ("encoder_hidden_states", encoder_hidden_states),
            ("pooled_projections", pooled_projections),
            ("guidance", guidance),
        ):
            if value is not None:
                if value.shape[0] != rows:
                    raise ValueError(f"{key} has batch {value.shape[0]}, the transformer input {rows}")
                flat[key] = value
        for key, ids in (("txt_ids", txt_ids), ("img_ids", img_ids)):
            if ids is not None:
                # FLUX's position ids are per token, alike for every sample: expanded over the batch
                # they batch like any conditioning (`flow.TransformerCall` passes one row on)
                flat[key] = ids.expand(rows, *ids.shape) if ids.dim() == 2 else ids
        if joint_attention_kwargs:
            if any(isinstance(v, torch.Tensor) for v in joint_attention_kwargs.values()):
                raise ValueError(
                    "joint_attention_kwargs holding tensors are not supported by accelerated pipelines"
                )
            flat["joint_attention_kwargs"] = dict(joint_attention_kwargs)
        out = hidden_states.clone()  # what the pipeline's guidance arithmetic gets (see _UNetProxy)
        if self._true_cfg is not None:
            if self._pending is None:  # FLUX calls the conditional pass first, then the negative one
                self._pending = flat
                return (out,) if not return_dict else _Output(out)
            cond, self._pending = self._pending, None
            _run(pipe, self._shim, self._model, hidden_states, cond, cond, flat, (self._true_cfg, 0.0))
        elif getattr(pipe, "do_classifier_free_guidance", False):  # SD3: [uncond, cond] rows
            batch = rows // 2
            cond, uncond = _halves(flat, batch)
            guidance_scale = (float(pipe.guidance_scale), 0.0)
            _run(pipe, self._shim, self._model, hidden_states[:batch], flat, cond, uncond, guidance_scale)
        else:
            _run(pipe, self._shim, self._model, hidden_states, flat, flat, None, None)
        return (out,) if not return_dict else _Output(out)


def _run(
    pipe: Any,
    shim: _SchedulerShim,
    model: nn.Module,
    latents: torch.Tensor,
    flat: dict,
    cond: dict,
    uncond: dict | None,
    guidance: tuple[float, float] | None,
) -> None:
    """The whole loop from the pipeline's latents; the result (the scheduler's last latents, or
    those of the step an interrupt stopped at) goes to the shim's ``step``. ``flat``: the network's
    keyword arguments as the pipeline batched them (what a callback's tensor inputs show)."""
    sched = shim.schedule
    assert sched is not None and shim.announced is not None
    pipe._num_timesteps = len(shim.announced)  # the stock value (the pipeline counted one timestep)
    noise = latents.float() * sched.noise_scale
    sampler = _sampler(pipe, shim.real, model, sched.solver)
    hook = None
    if shim.callback is not None:
        hook = _StepHook(pipe, shim, sched, latents.dtype, flat, guidance)
    if guidance is not None:
        x = sampler(
            noise, sched.sigmas, cond=cond, uncond=uncond, guidance_scale=guidance[0],
            guidance_rescale=guidance[1], on_step_end=hook,
        )  # fmt: skip
    else:
        x = sampler(noise, sched.sigmas, cond=cond, on_step_end=hook)
    scale = sched.output_scale
    if hook is not None and hook.stopped is not None:
        scale = sched.latent_scale(float(sched.sigmas[hook.stopped + 1]))
    shim.result = x * scale if scale != 1.0 else x


# The pipelines' callback tensor inputs besides "latents": the network argument each one is (as
# the pipeline batched it: [uncond, cond] rows with CFG); None: SD's negative_prompt_embeds, the
# uncond rows, which the stock loop no longer reads (a returned value changes nothing there).
_CALLBACK_TENSORS: dict[str, dict[str, str | None]] = {
    "StableDiffusionPipeline": {"prompt_embeds": "encoder_hidden_states", "negative_prompt_embeds": None},
    "StableDiffusionXLPipeline": {
        "prompt_embeds": "encoder_hidden_states",
        "add_text_embeds": _UNetCall.PREFIX + "text_embeds",
        "add_time_ids": _UNetCall.PREFIX + "time_ids",
    },
    "StableDiffusion3Pipeline": {
        "prompt_embeds": "encoder_hidden_states",
        "pooled_prompt_embeds": "pooled_projections",
    },
    "FluxPipeline": {"prompt_embeds": "encoder_hidden_states"},
}


class _StepHook:
    """diffusers' ``callback_on_step_end(pipe, i, t, kwargs)`` on the engine's ``on_step_end`` hook.

    After step i the engine's state is x_{i+1}; the pipeline's latents are that times the schedule's
    scaling at sigma_{i+1} (VP for DDIM, 1 - t for flow matching), handed over as a tensor of its
    own whose in-place edits are written back (rescaled); returned latents replace the state. Either
    way the engine goes on from the edited state. Then, as the stock loop reads them at the next step:
    ``pipe._interrupt`` stops the loop (the result is the latents of that step), and a changed
    ``pipe._guidance_scale`` / ``_guidance_rescale`` is the guidance from the next step on (a scale
    <= 1 turns CFG off: the conditional prediction, as stock once the callback also hands back the
    conditional halves of the embeddings, diffusers' documented pattern; turning it on mid-call is
    refused). FLUX's guidance is an embedding made before the loop: changes do not act, as in stock.
    Conditioning tensor inputs are read-only, except that pattern's conditional halves."""

    def __init__(
        self,
        pipe: Any,
        shim: _SchedulerShim,
        sched: Schedule,
        dtype: torch.dtype,
        flat: dict,
        guidance: tuple[float, float] | None,
    ):
        self.pipe, self.shim, self.sched, self.dtype = pipe, shim, sched, dtype
        self.stopped: int | None = None
        kind = type(pipe).__name__
        self.reads_guidance = kind != "FluxPipeline"
        self.guidance = guidance  # (scale, rescale) now; None: the call runs without CFG
        self.cfg_off = False
        cfg = guidance is not None and kind != "FluxPipeline"
        self.inputs: dict[str, Any] = {}  # name -> the tensor the callback sees
        self.halves: dict[str, torch.Tensor] = {}  # name -> its conditional rows (the CFG-off pattern)
        for name, key in _CALLBACK_TENSORS[kind].items():
            if name not in shim.inputs:
                continue
            value = flat.get(key) if key is not None else None
            if key is None and cfg:  # SD's negative_prompt_embeds: the uncond rows
                value = flat["encoder_hidden_states"].chunk(2)[0]
            self.inputs[name] = value
            if cfg and key is not None and value is not None:
                self.halves[name] = value.chunk(2)[1]

    def __call__(self, view: StepView) -> None:
        i, state = view.i, view.state
        scale = self.sched.latent_scale(float(self.sched.sigmas[i + 1]))
        # a tensor of its own, as the stock loop's (a callback may keep it, e.g. for previews; the
        # engine's state is overwritten by the next step and the next call)
        latents = (state * scale).to(self.dtype) if scale != 1.0 else state.to(self.dtype, copy=True)
        # the tensor inputs asked for, as the stock loop passes them (latents among them or not)
        kwargs = {name: latents if name == "latents" else self.inputs[name] for name in self.shim.inputs}
        versions = {k: v._version for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        versions["latents"] = latents._version
        t = self.shim.announced[i] if self.shim.announced is not None else i
        out = self.shim.callback(self.pipe, i, t, kwargs)
        out = out if isinstance(out, dict) else {}
        new = out.get("latents", latents)
        if new is not latents:
            if not isinstance(new, torch.Tensor) or new.shape != latents.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                want = tuple(latents.shape)
                raise ValueError(f"callback_on_step_end returned latents {got}, expected {want}")
            state.copy_(new.to(state.device, state.dtype) / scale if scale != 1.0 else new)
        elif latents._version != versions["latents"]:  # edited in place
            state.copy_(latents.to(state.dtype) / scale if scale != 1.0 else latents)
        if self.reads_guidance:
            self._guidance(view)
        self._conditioning(out, kwargs, versions)
        if self.pipe.interrupt:
            self.stopped = i
            view.stop()

    def _guidance(self, view: StepView) -> None:
        pipe = self.pipe
        w = float(pipe._guidance_scale)
        phi = float(getattr(pipe, "_guidance_rescale", 0.0))
        if self.guidance is None or self.cfg_off:
            if w > 1:
                raise ValueError(
                    f"callback_on_step_end set pipe._guidance_scale={w} in a call running without "
                    "classifier-free guidance: turning it on mid-call is not supported by an accelerated "
                    "pipeline"
                )
            return
        if (w, phi) == self.guidance:
            return
        if w <= 1:  # the stock loop stops batching uncond rows: the conditional prediction
            self.cfg_off = True
        view.set_guidance(w if w > 1 else 1.0, phi)
        self.guidance = (w, phi)

    def _conditioning(self, out: dict, kwargs: dict, versions: dict) -> None:
        for name, given in self.inputs.items():
            new = out.get(name, given)
            if _CALLBACK_TENSORS[type(self.pipe).__name__][name] is None:
                continue  # read by the stock loop before the loop only
            if new is given and (not isinstance(given, torch.Tensor) or given._version == versions[name]):
                continue
            half = self.halves.get(name)
            if self.cfg_off and half is not None and new is not given and torch.equal(new, half):
                self.inputs[name] = new  # the CFG-off pattern: the conditional rows, which the engine uses
                continue
            raise ValueError(
                f"callback_on_step_end changed {name}: an accelerated pipeline keeps its call's "
                "conditioning (except the pattern that turns guidance off: pipe._guidance_scale <= 1 "
                f"with {name}.chunk(2)[-1] returned)"
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
        if type(pipe).__name__ == "FluxPipeline":  # told timestep.to(latents dtype) / 1000
            den: Any = flow.denoiser(flow.TransformerCall(unet, timestep_divisor=1000.0), real)
        else:
            den = denoiser(unet, real)
        if solver in flow.SOLVERS:
            cache[key] = flow.FlowSampler(den, solver)
        else:
            cache[key] = Sampler(den, solver=solver, s_churn=0.0)
    return cache[key]


_CALL_OPTIONS = {
    # option: the value edmfast reproduces (anything else is refused, by name)
    "timesteps": None,
    "sigmas": None,
    "denoising_end": None,
    "callback": None,
    "callback_steps": None,
}
_FLOW_CALL_OPTIONS = {  # SD3 / FLUX (custom sigmas and mu are part of the flow schedule)
    "ip_adapter_image": None,
    "ip_adapter_image_embeds": None,
    "negative_ip_adapter_image": None,
    "negative_ip_adapter_image_embeds": None,
    "skip_guidance_layers": None,
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


@functools.cache
def _signature(base: type) -> inspect.Signature:
    return inspect.signature(base.__call__)


def _run_call(self: Any, base: type, args: tuple, kwargs: dict) -> Any:
    attr = PIPELINES[base.__name__]
    real, model = self.__dict__["scheduler"], self.__dict__[attr]
    name = _name(real)
    flow_pipe = attr == "transformer"
    if (name in flow.SCHEDULERS) != flow_pipe:
        kind = "flow-matching" if flow_pipe else "discrete / EDM"
        raise ValueError(
            f"{base.__name__} with {name} is not supported by edmfast.diffusers (it takes {kind} schedulers)"
        )
    # positional arguments by name, so that every option is checked whichever way it came
    sig = _signature(base)
    params = sig.parameters
    bound = sig.bind(self, *args, **kwargs).arguments
    kwargs = {}
    for key, value in bound.items():
        if params[key].kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif params[key].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{base.__name__}.__call__ takes no extra positional arguments")
        elif key != "self":
            kwargs[key] = value
    for key, ok in (_FLOW_CALL_OPTIONS if flow_pipe else _CALL_OPTIONS).items():
        if kwargs.get(key, ok) is not ok:
            raise ValueError(f"{key}= is not supported by an accelerated pipeline (edmfast.diffusers)")
    eta = kwargs.get("eta", 0.0)
    if name == "DDIMScheduler" and eta != 0:
        raise ValueError(f"eta={eta!r} is not supported by an accelerated pipeline (DDIM with eta = 0 only)")
    callback = kwargs.pop("callback_on_step_end", None)
    inputs = kwargs.pop("callback_on_step_end_tensor_inputs", None)
    if callback is not None:
        inputs = list(getattr(callback, "tensor_inputs", None) or inputs or ["latents"])
        known = ["latents", *_CALLBACK_TENSORS[base.__name__]]
        if not set(inputs) <= set(known):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs={inputs} is not supported by an accelerated pipeline "
                f"(it passes {known})"
            )
        if name in ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
            # the stock loop also calls back after each first-order half step
            raise ValueError(f"callback_on_step_end with {name} is not supported by an accelerated pipeline")
    shim = _SchedulerShim(real)
    shim.callback, shim.inputs = callback, inputs or []
    proxy: Any
    if flow_pipe:
        true_cfg = None
        if base.__name__ == "FluxPipeline":  # FLUX's true CFG: a second, negative, transformer call
            w = float(kwargs.get("true_cfg_scale", 1.0))
            negative = kwargs.get("negative_prompt") is not None or (
                kwargs.get("negative_prompt_embeds") is not None
                and kwargs.get("negative_pooled_prompt_embeds") is not None
            )
            true_cfg = w if w > 1 and negative else None
        proxy = _TransformerProxy(self, model, shim, true_cfg)
    else:
        proxy = _UNetProxy(self, model, shim)
    active = _CALLS.__dict__.setdefault("active", {})
    active[id(self)] = (shim, proxy)
    try:
        return base.__call__(self, **kwargs)
    finally:
        del active[id(self)]


def accelerate(pipe: Any) -> Any:
    """Run ``pipe``'s denoising loop on edmfast from now on; returns ``pipe`` (changed in place).

    Pipelines: `PIPELINES` (Stable Diffusion and SDXL with the schedulers of `CONFIG_OPTIONS`;
    SD3 and FLUX with the flow-matching ones: SD3's CFG batched, FLUX's guidance embedding, its
    true CFG batched, its packed latents). ``pipe(prompt, num_inference_steps=...,
    guidance_scale=..., guidance_rescale=..., generator=..., latents=..., output_type=...)`` then
    equals the stock pipeline within float32 rounding. The scheduler is read at each call (swap
    ``pipe.scheduler`` freely); guidance values may change per call (one cached Sampler serves
    them all). ``callback_on_step_end`` runs after each step as in the stock loop (the eager loop;
    not with the Heun schedulers): in-place edits of ``latents`` and returned latents are applied,
    ``pipe._interrupt`` stops, guidance changes act from the next step (`_StepHook`);
    ``pipe.num_timesteps`` is the stock value. Unsupported schedulers, scheduler options and call
    options (custom timesteps, SD / SDXL custom sigmas, DDIM eta != 0, denoising_end, the
    deprecated ``callback``, a UNet with ``time_cond_proj_dim``, IP adapters, SD3's skip-layer
    guidance) raise ValueError naming them.

    The cached Samplers follow ``pipe.to(dtype / device)`` (one per network dtype and device; the
    network must be float32, float16 or bfloat16). ``copy.deepcopy(pipe)`` is accelerated too, with
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
        PIPELINES[base.__name__]: _component(PIPELINES[base.__name__], 1),
    }
    pipe.__class__ = type(base.__name__, (base,), attrs)
    return pipe
