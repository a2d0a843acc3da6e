"""diffusers schedulers in edmfast's terms: the exact schedule a scheduler runs, and its denoiser.

`schedule(scheduler, N)` returns a `Schedule`: the float64 noise levels the scheduler visits, what
the model is told at each, how the pipeline's latents map onto edmfast's state and back, and
which engine solver runs it. `CONFIG_OPTIONS` lists every constructor option of each supported
scheduler (diffusers 0.42.1) with the values edmfast reproduces; anything else is refused by name
(`check_config`), never run with different math. `denoiser(unet, scheduler)` is the
preconditioner the scheduler assumes for the model.

One deliberate difference: `DDIMScheduler` steps from t to ``t - T // N`` whatever the spacing,
so with "linspace" spacing, or "trailing" when N does not divide T (e.g. 30 of 1000 steps), it
leaves the timesteps it announced. edmfast steps between the announced timesteps, i.e. it
integrates DDIM's ODE on the schedule that ``scheduler.timesteps`` shows (tested against a
float64 reference); where diffusers is consistent (leading spacing, trailing with N | T) the two
agree.

Importing this module does not import diffusers.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..precond import DiscreteVPDenoiser, EDMPrecond, _model_output
from . import flow as _flow

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
    latents (DDIM returns VP-scaled latents, sqrt(abar_final) x). ``solver``: "euler" or "heun"
    (flow matching: also `edmfast.diffusers.flow`'s "flow_heun", "flow_stochastic").
    ``scaling``: how the pipeline's latents relate to edmfast's state at each level (`latent_scale`).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_sigma: float
    noise_scale: float
    output_scale: float
    solver: str
    scaling: str = "ve"

    def latent_scale(self, sigma: float) -> float:
        """The pipeline's latents at level ``sigma`` are edmfast's state times this: 1 ("ve": the
        Euler / Heun family, EDMEuler), ``1 / sqrt(1 + sigma^2)`` ("vp": DDIM), ``1 / (1 + sigma)``
        = 1 - t ("flow"), for a finite sigma (the state at sigma = inf is the unit noise itself)."""
        if self.scaling == "vp":
            return 1 / math.sqrt(1 + sigma**2)
        if self.scaling == "flow":
            return 1 / (1 + sigma)
        return 1.0


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


def schedule(scheduler: Any, num_inference_steps: int | None, **flow_options: Any) -> Schedule:
    """The exact schedule ``scheduler`` runs for ``num_inference_steps`` (see `Schedule`), in float64.

    Flow-matching schedulers take the pipeline's ``mu`` and custom ``sigmas`` (`flow.schedule`)."""
    name = check_config(scheduler)
    if name in _flow.SCHEDULERS:
        return _flow.schedule(scheduler, num_inference_steps, **flow_options)
    if flow_options:
        raise TypeError(f"{name} takes no {', '.join(sorted(flow_options))} (flow-matching options)")
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
            scaling="vp",
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
    if name in _flow.SCHEDULERS:
        return _flow.denoiser(_flow.TransformerCall(unet), scheduler)
    model = _UNetCall(unet)
    if name == "EDMEulerScheduler":
        cls = EDMPrecond if scheduler.config.prediction_type == "epsilon" else _EDMVPrecond
        return cls(model, sigma_data=float(scheduler.config.sigma_data))
    return DiscreteVPDenoiser.from_diffusers(model, scheduler)


# Flow matching (SD3, FLUX): its schedulers, options and conversions live in `.flow`; they join the
# option table (and SCHEDULERS) here.
CONFIG_OPTIONS.update(_flow.CONFIG_OPTIONS)
SCHEDULERS = tuple(CONFIG_OPTIONS)
