"""diffusers pipelines on edmfast: exact schedules, and a one-line switch for a pipeline's loop.

``pipe = edmfast.diffusers.accelerate(pipe)`` makes a `StableDiffusionPipeline` or
`StableDiffusionXLPipeline` run its denoising loop on edmfast's fused passes (one `Sampler` per
configuration, cached on the pipe) and return what the stock pipeline returns, within float32
rounding. Supported schedulers: `EulerDiscreteScheduler` (any spacing, Karras sigmas),
`HeunDiscreteScheduler`, `DDIMScheduler` (eta = 0, no clipping / thresholding) and
`EDMEulerScheduler`; anything else, or an option whose math edmfast does not reproduce, raises a
ValueError naming it (never a silent switch to different math). `CONFIG_OPTIONS` lists every
constructor option of each supported scheduler with the values edmfast reproduces.

How the switch works: during a call the pipeline (in the calling thread only) sees a scheduler
shim with a single timestep and a UNet proxy. The pipeline encodes the prompt, prepares the
latents (``noise * init_noise_sigma``), batches cond / uncond for classifier-free guidance and
calls the proxy once; the proxy runs the whole edmfast loop on that input (guidance scale /
rescale read from the pipe per call) and the shim's ``step`` returns the result, which the
pipeline decodes as usual.

One deliberate difference: `DDIMScheduler` steps from t to ``t - T // N`` whatever the spacing,
so with "linspace" spacing, or "trailing" when N does not divide T (e.g. 30 of 1000 steps), it
leaves the timesteps it announced. edmfast steps between the announced timesteps, i.e. it
integrates DDIM's ODE on the schedule that ``scheduler.timesteps`` shows (tested against a
float64 reference); where diffusers is consistent (leading spacing, trailing with N | T) the two
agree.

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

import numpy as np
import torch
from torch import nn

from .ops import IO_DTYPES
from .precond import DiscreteVPDenoiser, EDMPrecond, _model_output
from .sampler import Sampler

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

# Every constructor option of each supported scheduler (diffusers 0.42.1), with the values edmfast
# reproduces: None means every value (the option reaches edmfast through the scheduler's own
# alphas_cumprod, sigmas or config, or it is inert because the option it refines is refused).
# Any other value raises a ValueError naming the option (`check_config`). An option missing here
# (a newer diffusers) is accepted at its default only. To support a scheduler: add its row.
_BETAS: dict[str, tuple[Any, ...] | None] = {
    # alphas_cumprod is read from the scheduler, whatever made it
    "num_train_timesteps": None,
    "beta_start": None,
    "beta_end": None,
    "beta_schedule": None,
    "trained_betas": None,
}
_SPACINGS = ("linspace", "leading", "trailing")
CONFIG_OPTIONS: dict[str, dict[str, tuple[Any, ...] | None]] = {
    "EulerDiscreteScheduler": {
        **_BETAS,
        "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
        "interpolation_type": ("linear",),
        "use_karras_sigmas": None,
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "sigma_min": None,  # the Karras range (the other conversions are refused)
        "sigma_max": None,
        "timestep_spacing": _SPACINGS,
        "timestep_type": ("discrete",),
        "steps_offset": None,
        "rescale_betas_zero_snr": None,
        "final_sigmas_type": ("zero", "sigma_min"),
    },
    "HeunDiscreteScheduler": {
        **_BETAS,
        "prediction_type": ("epsilon", "v_prediction", "sample"),  # its step refuses "original_sample"
        "use_karras_sigmas": None,
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "clip_sample": (False,),  # clamps x0 at each evaluation: not an affine pass
        "clip_sample_range": None,  # inert without clip_sample
        "timestep_spacing": _SPACINGS,
        "steps_offset": None,
    },
    "DDIMScheduler": {
        **_BETAS,
        "clip_sample": (False,),
        "set_alpha_to_one": None,
        "steps_offset": None,
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "thresholding": (False,),  # dynamic thresholding of x0: a per-sample quantile, not affine
        "dynamic_thresholding_ratio": None,  # inert without thresholding
        "clip_sample_range": None,  # inert without clip_sample
        "sample_max_value": None,  # inert without thresholding
        "timestep_spacing": _SPACINGS,
        "rescale_betas_zero_snr": None,
    },
    "EDMEulerScheduler": {
        "sigma_min": None,
        "sigma_max": None,
        "sigma_data": None,
        "sigma_schedule": ("karras", "exponential"),
        "num_train_timesteps": None,  # not used by its math
        "prediction_type": ("epsilon", "v_prediction"),
        "rho": None,
        "final_sigmas_type": ("zero", "sigma_min"),
    },
}
SCHEDULERS = tuple(CONFIG_OPTIONS)


@dataclass(frozen=True)
class Schedule:
    """What a diffusers scheduler does for ``num_inference_steps``, in edmfast's terms.

    ``sigmas``: float64 [N + 1] VE noise levels the loop visits (Heun's repeats removed, the final
    level included: 0, or sigma(t=0) for DDIM with ``set_alpha_to_one=False`` / ``final_sigmas_type
    ="sigma_min"``). ``timesteps``: float64 [N], what the model is told at each level.
    ``init_noise_sigma``: the factor the pipeline multiplies unit noise by (``scheduler.
    init_noise_sigma``; "leading" spacing uses sqrt(sigma_0^2 + 1), EDMEuler sqrt(sigma_max^2 + 1),
    DDIM 1). ``noise_scale``: pipeline latents times this is edmfast's ``noise`` (the start state is
    sigmas[0] * noise). ``output_scale``: edmfast's result times this is the scheduler's final
    latents (DDIM returns VP-scaled latents, sqrt(abar_final) x). ``solver``: "euler" or "heun".
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_sigma: float
    noise_scale: float
    output_scale: float
    solver: str


def _name(scheduler: Any) -> str:
    name = type(scheduler).__name__
    if name not in SCHEDULERS or getattr(scheduler, "config", None) is None:
        raise ValueError(
            f"scheduler {name} is not supported by edmfast.diffusers (supported: {', '.join(SCHEDULERS)})"
        )
    return name


def _defaults(cls: type) -> dict[str, Any]:
    """The constructor options of a scheduler class and their defaults."""
    params = inspect.signature(cls).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}


def check_config(scheduler: Any) -> str:
    """Refuse, by name, any option of ``scheduler``'s config whose value edmfast does not reproduce
    (`CONFIG_OPTIONS`); returns the scheduler's class name."""
    name = _name(scheduler)
    table, cfg = CONFIG_OPTIONS[name], scheduler.config
    for key, default in _defaults(type(scheduler)).items():
        value = cfg.get(key, default)
        ok = table[key] if key in table else (default,)  # an option this table does not know
        if ok is not None and not any(_same(value, v) for v in ok):
            raise ValueError(
                f"{name} with {key}={value!r} is not supported by edmfast.diffusers "
                f"(it reproduces {key} in {ok!r}; never a silent change of math)"
            )
    return name


def _same(value: Any, ok: Any) -> bool:
    """Whether ``value`` acts as ``ok`` does in diffusers, which tests flags by truthiness."""
    try:
        return bool(value) is ok if isinstance(ok, bool) else bool(value == ok)
    except (TypeError, ValueError, RuntimeError):  # an array compared elementwise, say
        return False


def _train_sigmas(scheduler: Any) -> np.ndarray:
    abar = scheduler.alphas_cumprod.detach().to("cpu", torch.float64).numpy()
    with np.errstate(divide="ignore"):
        return np.sqrt((1 - abar) / abar)


def _spaced(cfg: Any, n: int, integer: bool) -> np.ndarray:
    """The spaced train timesteps, descending, as diffusers computes them (float32 / int64)."""
    T, spacing = int(cfg.num_train_timesteps), cfg.get("timestep_spacing", "leading")
    t: np.ndarray
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n) if integer else np.linspace(0, T - 1, n, dtype=np.float32)
        t = t.round()[::-1].astype(np.int64) if integer else t[::-1]
    elif spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1] + int(cfg.get("steps_offset", 0))
    else:  # "trailing" (`check_config` admits no other spacing)
        t = np.round(np.arange(T, 0, -T / n)) - 1
    t = np.ascontiguousarray(t).astype(np.int64 if integer else np.float32).astype(np.float64)
    if len(t) != n or t.min() < 0 or t.max() > T - 1:
        raise ValueError(f"timestep_spacing={spacing!r} gives invalid timesteps for {n} of {T} steps")
    return t


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t`` (index interpolated linearly in log sigma), in float64."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras(lo: float, hi: float, n: int, rho: float, ramp: np.ndarray | None = None) -> np.ndarray:
    ramp = np.linspace(0, 1, n) if ramp is None else ramp
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def schedule(scheduler: Any, num_inference_steps: int) -> Schedule:
    """The exact schedule ``scheduler`` runs for ``num_inference_steps`` (see `Schedule`), in float64."""
    name = check_config(scheduler)
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    n, cfg = num_inference_steps, scheduler.config
    if name == "EDMEulerScheduler":
        lo, hi, rho = float(cfg.sigma_min), float(cfg.sigma_max), float(cfg.rho)
        ramp = np.linspace(0, 1, n)
        if cfg.sigma_schedule == "karras":
            s = _karras(lo, hi, n, rho, ramp)
        else:  # "exponential"
            s = torch.linspace(math.log(lo), math.log(hi), n, dtype=torch.float64).exp().flip(0).numpy()
        # "sigma_min" ends with a step from sigma_min to itself (dt = 0, the state unchanged)
        sig = s.copy() if cfg.final_sigmas_type == "sigma_min" else np.append(s, 0.0)
        return Schedule(
            torch.from_numpy(sig),
            torch.from_numpy(0.25 * np.log(s)),
            math.sqrt(hi**2 + 1),
            1 / float(s[0]),
            1.0,
            "euler",
        )
    train = _train_sigmas(scheduler)
    if name == "DDIMScheduler":
        t = _spaced(cfg, n, integer=True)
        s = train[t.astype(np.int64)]
        last = 0.0 if cfg.set_alpha_to_one else float(train[0])
        # DDIM ending on t = 0 with set_alpha_to_one=False takes an identity step (abar_prev =
        # abar_0 = abar_t): the level is not repeated
        sig = np.append(s, last) if last < s[-1] else s.copy()
        s0 = float(sig[0])
        return Schedule(
            torch.from_numpy(sig),
            torch.from_numpy(t),
            1.0,
            1.0 if math.isinf(s0) else math.sqrt(1 + 1 / s0**2),
            1 / math.sqrt(1 + float(sig[-1]) ** 2),
            "euler",
        )
    # EulerDiscrete / HeunDiscrete
    if not np.isfinite(train).all():
        raise ValueError(f"{name} with alphas_cumprod ending in 0 (sigma = inf) is not supported")
    if (np.diff(train) < 0).any():
        # EulerDiscrete's zero-SNR stand-in abar_T = 2^-24 lies above abar_(T-2) for betas that
        # near zero SNR early (its default linear ones): sigma falls at t = T - 1
        why = " with rescale_betas_zero_snr=True" if cfg.get("rescale_betas_zero_snr", False) else ""
        raise ValueError(
            f"{name}{why}: sigma(t) falls somewhere in t for these betas (alphas_cumprod grows), "
            "which edmfast.diffusers does not support"
        )
    t = _spaced(cfg, n, integer=False)
    s = np.interp(t, np.arange(len(train)), train)
    if cfg.get("use_karras_sigmas", False):
        lo = cfg.get("sigma_min", None)
        hi = cfg.get("sigma_max", None)
        lo = float(s[-1]) if lo is None else float(lo)  # the range of the spaced levels
        hi = float(s[0]) if hi is None else float(hi)
        s = _karras(lo, hi, n, 7.0)
        t = _sigma_to_t(s, np.log(train))
    last = float(train[0]) if cfg.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    # a final step from sigma(t=0) to itself (linspace ends on t = 0) has dt = 0: not repeated
    sig = np.append(s, last) if last < s[-1] else s.copy()
    spacing = cfg.get("timestep_spacing", "leading")
    s_max = float(s.max())
    init = s_max if spacing in ("linspace", "trailing") else math.sqrt(s_max**2 + 1)
    solver = "heun" if name == "HeunDiscreteScheduler" else "euler"
    return Schedule(
        torch.from_numpy(sig),
        torch.from_numpy(np.asarray(t, np.float64)),
        init,
        1 / float(s[0]),
        1.0,
        solver,
    )


def sigmas(scheduler: Any, num_inference_steps: int) -> torch.Tensor:
    """The float64 [N + 1] VE sigmas ``scheduler`` visits for ``num_inference_steps`` (`Schedule`).

    All spacings (diffusers' default "linspace" with its fractional timesteps, "leading" with
    ``steps_offset``, "trailing"), Karras sigmas over the range of the spaced levels, the final
    level (0 or sigma(t=0)); Heun's repeated levels appear once; EDMEuler's own Karras /
    exponential schedule. The pipeline's initial latents are ``noise * init_noise_sigma``, which
    is not ``sigmas[0] * noise`` for "leading" spacing, EDMEuler and DDIM: see
    ``schedule(...).init_noise_sigma`` / ``noise_scale``.
    """
    return schedule(scheduler, num_inference_steps).sigmas


class _EDMVPrecond(EDMPrecond):
    """EDMEuler's v_prediction: EDM's coefficients with c_out negated."""

    def coefficients(self, sigma):
        c_skip, c_out, c_in, c_noise = super().coefficients(sigma)
        return c_skip, -c_out, c_in, c_noise


class _UNetCall(nn.Module):
    """Calls a diffusers UNet with flat keyword tensors, rebuilding ``added_cond_kwargs`` (whose
    entries the engine batches for guidance like any other tensor)."""

    PREFIX = "added_cond_kwargs."

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        added = {k[len(self.PREFIX) :]: cond.pop(k) for k in list(cond) if k.startswith(self.PREFIX)}
        if added:
            cond["added_cond_kwargs"] = added
        return _model_output(self.unet(x, t, return_dict=False, **cond))


def denoiser(unet: nn.Module, scheduler: Any) -> nn.Module:
    """The edmfast denoiser (preconditioner) that ``scheduler`` assumes for ``unet``."""
    name = check_config(scheduler)
    model = _UNetCall(unet)
    if name == "EDMEulerScheduler":
        cls = EDMPrecond if scheduler.config.prediction_type == "epsilon" else _EDMVPrecond
        return cls(model, sigma_data=float(scheduler.config.sigma_data))
    return DiscreteVPDenoiser.from_diffusers(model, scheduler)


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
