"""Sampler options and call arguments: one validation for every entry point.

`edmfast.sample`, `edmfast.Sampler` and `edmfast.reference.sample` all go through
`SamplerOptions.create`, these checks and `edmfast.plan` (the float64 step schedule), so a bad
argument gets the same clear error everywhere, before any kernel runs.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from .schedules import betas_float64, karras_sigmas

# EDM's own solvers (Algorithm 2 with churn; "2nd" is the generalized 2nd order with alpha) and
# k-diffusion's (0.1.1: names, defaults and math of ``k_diffusion.sampling.sample_<name>``).
EDM_SOLVERS = ("euler", "heun", "2nd")
K_SOLVERS = (
    "euler_ancestral",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
)
SOLVERS = EDM_SOLVERS + K_SOLVERS
# k-diffusion samplers that adapt their steps at run time: no fixed plan, so no fused engine
REFUSED_SOLVERS = {
    "dpm_fast": "it picks its steps from (sigma_min, sigma_max, n) with its own rule",
    "dpm_adaptive": "its step sizes depend on error estimates made at run time (host syncs)",
}
# which solvers take which solver-specific options (anything else refuses a non-default value)
CHURN_SOLVERS = ("euler", "heun", "2nd", "dpm_2")  # s_churn / s_tmin / s_tmax (EDM Algorithm 2)
ETA_SOLVERS = (
    "euler_ancestral",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
)
NOISE_SOLVERS = CHURN_SOLVERS + ETA_SOLVERS  # s_noise
SOLVER_TYPES = ("midpoint", "heun")  # dpmpp_2m_sde
NOISE_MODES = ("exact", "fused")
BACKEND_CHOICES = ("auto", "torch", "cpu", "cuda", "triton")
GRAPH_CHOICES = ("auto", True, False)
VARIANCES = ("learned_range", "learned", "fixed_small", "fixed_large")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
F32_MAX = float(torch.finfo(torch.float32).max)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


@dataclass(frozen=True)
class SamplerOptions:
    num_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    solver: str = "heun"
    alpha: float = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    eta: float | None = None  # ancestral / SDE solvers; None: k-diffusion's default, 1
    order: int | None = None  # lms; None: 4
    r: float | None = None  # dpmpp_sde's intermediate point; None: 1/2
    solver_type: str | None = None  # dpmpp_2m_sde: "midpoint" (default) or "heun"
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    noise_mode: str = "exact"
    backend: str = "auto"
    cuda_graph: Any = "auto"
    compile: bool = False
    progress: bool = False

    @classmethod
    def create(cls, **kw: Any) -> SamplerOptions:
        """Validate every option; raise ValueError/TypeError naming the bad one."""
        unknown = set(kw) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown sampler option(s): {', '.join(sorted(unknown))}")
        o = {**asdict(cls()), **kw}
        n = o["num_steps"]
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"num_steps must be an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"num_steps must be >= 1, got {n}")
        check_steps_fit(n)
        for name in (
            "sigma_min",
            "sigma_max",
            "rho",
            "alpha",
            "s_churn",
            "s_tmin",
            "s_tmax",
            "s_noise",
            "guidance_scale",
            "guidance_rescale",
        ):
            o[name] = _real(name, o[name])
        if not (0 < o["sigma_min"] <= o["sigma_max"] < math.inf):
            raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {o['sigma_min']}, {o['sigma_max']}")
        if o["rho"] <= 0:
            raise ValueError(f"rho must be > 0, got {o['rho']}")
        solver = o["solver"]
        if isinstance(solver, str) and solver in REFUSED_SOLVERS:
            raise ValueError(
                f"solver={solver!r} is not supported by the fused engine: {REFUSED_SOLVERS[solver]} "
                "(use k_diffusion.sampling for it, or a fixed-step solver such as 'dpmpp_2m')"
            )
        if not isinstance(solver, str) or solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        _check_solver_options(o)
        if not 0 < o["alpha"] <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {o['alpha']}")
        if o["solver"] != "2nd" and o["alpha"] != 1.0:
            raise ValueError(f"alpha applies to solver='2nd' only, got alpha={o['alpha']}, {o['solver']!r}")
        if o["s_churn"] < 0 or math.isinf(o["s_churn"]):
            raise ValueError(f"s_churn must be finite and >= 0, got {o['s_churn']}")
        if o["s_tmin"] < 0 or o["s_tmax"] < o["s_tmin"]:
            raise ValueError(f"need 0 <= s_tmin <= s_tmax, got s_tmin={o['s_tmin']}, s_tmax={o['s_tmax']}")
        if not (0 <= o["s_noise"] < math.inf):
            raise ValueError(f"s_noise must be finite and >= 0, got {o['s_noise']}")
        if math.isinf(o["guidance_scale"]):
            raise ValueError("guidance_scale must be finite")
        if not 0 <= o["guidance_rescale"] <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {o['guidance_rescale']}")
        if o["noise_mode"] not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {o['noise_mode']!r}")
        if o["backend"] not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {o['backend']!r}")
        graph = o["cuda_graph"]
        if not (graph is True or graph is False or (isinstance(graph, str) and graph == "auto")):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {o['cuda_graph']!r}")
        if not isinstance(o["compile"], bool):
            raise TypeError(f"compile must be a bool, got {type(o['compile']).__name__}")
        return cls(**o)

    @property
    def second_order(self) -> bool:
        """EDM's solvers: a correction evaluation (heun, 2nd); dpm_2 plans its own midpoint."""
        return self.solver in ("heun", "2nd")

    @property
    def effective_alpha(self) -> float:
        return self.alpha if self.solver == "2nd" else 1.0

    @property
    def eta_value(self) -> float:
        """eta of an ancestral / SDE solver (k-diffusion's default 1), 0 for the others."""
        if self.solver not in ETA_SOLVERS:
            return 0.0
        return 1.0 if self.eta is None else self.eta

    @property
    def order_value(self) -> int:
        return 4 if self.order is None else self.order

    @property
    def r_value(self) -> float:
        return 0.5 if self.r is None else self.r

    @property
    def solver_type_value(self) -> str:
        return "midpoint" if self.solver_type is None else self.solver_type


def _check_solver_options(o: dict) -> None:
    """Solver-specific options: valid values, and only for the solvers that use them (a value the
    solver would ignore is a mistake, refused by name rather than silently dropped)."""
    solver = o["solver"]

    def only(name: str, solvers: tuple[str, ...], given: bool) -> None:
        if given and solver not in solvers:
            raise ValueError(
                f"{name} applies to solver {' / '.join(solvers)} only, got {name}={o[name]!r} with "
                f"solver={solver!r}"
            )

    for name in ("s_churn", "s_tmin", "s_tmax"):
        default = SamplerOptions.__dataclass_fields__[name].default
        only(name, CHURN_SOLVERS, o[name] != default)
    only("s_noise", NOISE_SOLVERS, o["s_noise"] != 1.0)
    only("eta", ETA_SOLVERS, o["eta"] is not None)
    only("order", ("lms",), o["order"] is not None)
    only("r", ("dpmpp_sde",), o["r"] is not None)
    only("solver_type", ("dpmpp_2m_sde",), o["solver_type"] is not None)
    if o["eta"] is not None:
        o["eta"] = _real("eta", o["eta"])
        if not (0 <= o["eta"] < math.inf):
            raise ValueError(f"eta must be finite and >= 0, got {o['eta']}")
    if o["order"] is not None:
        order = o["order"]
        if isinstance(order, bool) or not isinstance(order, int):
            raise TypeError(f"order must be an int, got {type(order).__name__}")
        if not 1 <= order <= 4:
            raise ValueError(
                f"order must be in [1, 4] (the fused pass reads 3 earlier derivatives), got {order}"
            )
    if o["r"] is not None:
        o["r"] = _real("r", o["r"])
        if not 0 < o["r"] <= 1:
            raise ValueError(f"r must be in (0, 1], got {o['r']}")
    if o["solver_type"] is not None and o["solver_type"] not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {o['solver_type']!r}")


# ----------------------------------------------------------------------------- ancestral options


@dataclass(frozen=True)
class AncestralOptions:
    """The validated options of `sample_ancestral` / `AncestralSampler` (everything but tensors)."""

    num_steps: int = 50
    spacing: str = "leading"
    steps_offset: int = 0
    variance: str = "learned_range"
    prediction_type: str = "epsilon"
    clip_denoised: bool = True
    clip_range: float = 1.0  # x0 is clamped to [-clip_range, clip_range] (diffusers' clip_sample_range)
    eta: float | None = None
    # DDIM only: True recomputes eps from the clipped x0 (iDDPM / ADM's ddim_sample), False keeps
    # the model's own eps in the direction term (diffusers' DDIMScheduler.step default)
    use_clipped_model_output: bool = True
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    noise_mode: str = "exact"
    backend: str = "auto"
    cuda_graph: Any = "auto"
    compile: bool = False
    progress: bool = False

    @classmethod
    def create(cls, **options: Any) -> AncestralOptions:
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}")
        o = cls(**options)
        if isinstance(o.num_steps, bool) or not isinstance(o.num_steps, int):
            raise TypeError(f"num_steps must be an int, got {type(o.num_steps).__name__}")
        if o.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {o.num_steps}")
        check_steps_fit(o.num_steps)
        if not isinstance(o.spacing, str):
            raise TypeError(f"spacing must be a string, got {type(o.spacing).__name__}")
        if isinstance(o.steps_offset, bool) or not isinstance(o.steps_offset, int) or o.steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {o.steps_offset!r}")
        if o.variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {o.variance!r}")
        if o.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {o.prediction_type!r}")
        _flag("clip_denoised", o.clip_denoised)
        clip_range = _real("clip_range", o.clip_range)
        if not (0 < clip_range < math.inf):
            raise ValueError(f"clip_range must be finite and > 0, got {clip_range}")
        object.__setattr__(o, "clip_range", clip_range)
        _flag("use_clipped_model_output", o.use_clipped_model_output)
        if o.eta is not None:
            eta = _real("eta", o.eta)
            if not (math.isfinite(eta) and eta >= 0):
                raise ValueError(f"eta must be finite and >= 0 (or None for DDPM), got {eta}")
            object.__setattr__(o, "eta", eta)
        w, phi = check_guidance(o.guidance_scale, o.guidance_rescale)
        object.__setattr__(o, "guidance_scale", w)
        object.__setattr__(o, "guidance_rescale", phi)
        if o.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {o.noise_mode!r}")
        if not isinstance(o.backend, str) or o.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {o.backend!r}")
        if not any(o.cuda_graph is g for g in GRAPH_CHOICES) and o.cuda_graph != "auto":
            raise ValueError(f"cuda_graph must be one of {GRAPH_CHOICES}, got {o.cuda_graph!r}")
        _flag("compile", o.compile)
        _flag("progress", o.progress)
        return o

    @property
    def learned(self) -> bool:
        """The model returns 2C channels (prediction, then variance)."""
        return self.variance in ("learned", "learned_range")


def check_guidance(w: Any, phi: Any) -> tuple[float, float]:
    w, phi = _real("guidance_scale", w), _real("guidance_rescale", phi)
    if not abs(w) <= F32_MAX:
        raise ValueError(f"guidance_scale must be finite in float32 (|w| <= 3.4e38), got {w}")
    if not 0 <= phi <= 1:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {phi}")
    return w, phi


def check_betas(betas: Any) -> torch.Tensor:
    """The training betas as a float64 [T] CPU copy (never a view of the caller's tensor, which may
    change later): finite, in (0, 1]."""
    b = betas_float64(betas).clone()
    if not bool(torch.isfinite(b).all()) or not bool(((b > 0) & (b <= 1)).all()):
        raise ValueError("betas must be finite and in (0, 1]")
    return b


def check_timesteps(timesteps: Any, num_train: int) -> torch.Tensor:
    """User timesteps as descending int64 training indices in [0, num_train) (a CPU copy)."""
    if isinstance(timesteps, torch.Tensor):
        if timesteps.is_floating_point() or timesteps.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers, got {timesteps.dtype}")
        t = timesteps.detach().to("cpu", torch.int64).reshape(-1).clone()
        if timesteps.dim() != 1:
            raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    else:
        try:
            values = list(timesteps)
        except TypeError:
            raise TypeError(f"timesteps must be a sequence of ints, got {type(timesteps).__name__}") from None
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise TypeError("timesteps must be a sequence of ints")
        t = torch.tensor(values, dtype=torch.int64)
    if t.numel() < 1:
        raise ValueError("timesteps must hold at least one timestep")
    if int(t.min()) < 0 or int(t.max()) > num_train - 1:
        raise ValueError(f"timesteps must be in [0, {num_train - 1}] (len(betas) - 1)")
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError("timesteps must be strictly decreasing")
    return t


# Host memory a plan costs per step while it is made, all included (float64 rows and their float32
# table, the Python pass and program objects, the per-device views): the peak measured with
# tracemalloc at 20k steps, 2026-12-07, was 4.0 KB (dpmpp_2m) to 7.0 KB (dpmpp_sde, two
# evaluations and two draws per step); tests/test_plan.py keeps it under this bound.
PLAN_BYTES_PER_STEP = 8192


def check_steps_fit(num_steps: int, name: str = "num_steps") -> None:
    """Refuse, before allocating anything, a step count whose plan would not fit in host memory."""
    need = num_steps * PLAN_BYTES_PER_STEP
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this OS: assume 8 GiB
        avail = 8 << 30
    if need > avail // 2:
        raise ValueError(
            f"{name}={num_steps} needs about {need / 2**30:.1f} GiB of host memory for its plan "
            f"(~{PLAN_BYTES_PER_STEP} bytes per step, {avail / 2**30:.1f} GiB available): use fewer steps"
        )


def with_option_signature(fn: Callable) -> Callable:
    """Show every sampler option (name and default) where ``fn`` takes ``**options``.

    The options are validated in one place (`SamplerOptions.create`); this only makes them visible
    to ``help()``, ``inspect.signature`` and interactive completion.
    """
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        for f in fields(SamplerOptions)
        if f.name not in taken
    ]
    fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return fn


def check_sigmas(sigmas: Any) -> torch.Tensor:
    """A user schedule as float64 CPU [N+1]: finite (inf allowed first), >= 0, strictly decreasing."""
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"sigmas must be a 1-D tensor or sequence of floats: {e}") from None
    if not sigmas.is_floating_point():
        raise TypeError(f"sigmas must be floating point, got {sigmas.dtype}")
    s = sigmas.detach().to("cpu", torch.float64).reshape(-1) if sigmas.dim() <= 1 else None
    if s is None:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if s.numel() < 2:
        raise ValueError(f"sigmas must hold at least 2 levels (N + 1 for N steps), got {s.numel()}")
    if torch.isnan(s).any() or torch.isinf(s[1:]).any() or s[0] == -math.inf:
        raise ValueError("sigmas must be finite (only sigmas[0] may be +inf, for zero terminal SNR)")
    if (s < 0).any():
        raise ValueError("sigmas must be >= 0 (a negative sigma is not a noise level)")
    if not (s[1:] < s[:-1]).all():
        raise ValueError("sigmas must be strictly decreasing")
    return s


def resolve_sigmas(denoiser: Any, sigmas: Any, opts: SamplerOptions) -> torch.Tensor:
    """The schedule to run: the given one, or EDM's clamped to the denoiser's range and rounded."""
    if sigmas is not None:
        return check_sigmas(sigmas)
    lo = max(opts.sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    hi = min(opts.sigma_max, float(getattr(denoiser, "sigma_max", math.inf)))
    s = karras_sigmas(opts.num_steps, lo, hi, opts.rho)
    round_sigma = getattr(denoiser, "round_sigma", None)
    if round_sigma is not None:
        s = torch.cat([torch.as_tensor(round_sigma(s[:-1])).to(torch.float64).cpu(), s[-1:]])
    return s


def merge_cond(cond: dict | None, uncond: dict | None, batch: int) -> dict:
    """Batch cond and uncond keyword arguments into one call of 2B (tensors concatenated on dim 0)."""
    cond, uncond = cond or {}, uncond or {}
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    merged = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            if c.shape[0] != batch or u.shape != c.shape:
                raise ValueError(
                    f"cond[{key!r}] and uncond[{key!r}] must both be [B={batch}, ...] of one shape, "
                    f"got {tuple(c.shape)} and {tuple(u.shape)}"
                )
            merged[key] = torch.cat([c, u])
        elif _holds_array(c) or _holds_array(u):
            raise TypeError(
                f"cond[{key!r}] / uncond[{key!r}] hold tensors or arrays inside a container or of another "
                "type: with guidance only top-level tensors are batched (pass each tensor as its own key)"
            )
        elif c is u or _same(c, u):
            merged[key] = c
        else:
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] differ but are not tensors to batch")
    return merged


def _holds_array(v: Any, depth: int = 0) -> bool:
    """True for a tensor / array, or a container holding one (the engine cannot batch those)."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return True
    if depth > 8:
        return False
    if isinstance(v, dict):
        return any(_holds_array(x, depth + 1) for x in v.values())
    if isinstance(v, (list, tuple, set, frozenset)):
        return any(_holds_array(x, depth + 1) for x in v)
    return False


def _same(a: Any, b: Any) -> bool:
    """``a == b`` as a plain bool; an equality that is not a bool counts as different."""
    try:
        eq = a == b
    except Exception:
        return False
    return eq if isinstance(eq, bool) else False


def check_cond(cond: dict | None, batch: int, device: torch.device, name: str = "cond") -> dict:
    if cond is None:
        return {}
    if not isinstance(cond, dict):
        raise TypeError(
            f"{name} must be a dict of keyword arguments for the denoiser, got {type(cond).__name__}"
        )
    for key, v in cond.items():
        if isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[0] != batch:
                raise ValueError(f"{name}[{key!r}] must have batch size {batch}, got shape {tuple(v.shape)}")
            if v.device != device:
                raise ValueError(f"{name}[{key!r}] is on {v.device} but noise is on {device}")
    return cond


def check_noise(noise: Any, finite: bool = True) -> torch.Tensor:
    """noise as given, after metadata checks; ``finite`` also checks the values (a host sync: the
    engine passes False and detects non-finite noise in its first fused pass instead)."""
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if noise.dim() < 2 or noise.shape[0] < 1 or noise.numel() == 0:
        raise ValueError(
            f"noise must be [B, ...] with B >= 1 and at least one element, got {tuple(noise.shape)}"
        )
    if noise.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"noise must be a floating tensor (fp16/bf16/fp32/fp64), got {noise.dtype}")
    if finite and not torch.isfinite(noise).all():
        raise ValueError("noise must be finite (found NaN or inf)")
    return noise


def check_seeds(seeds: Any, batch: int, device: torch.device) -> torch.Tensor:
    """seeds as int64 [B] on ``device``; a sequence is converted, a tensor must already be there."""
    if isinstance(seeds, torch.Tensor):
        if seeds.is_floating_point() or seeds.dtype == torch.bool:
            raise TypeError(f"seeds must be integers, got {seeds.dtype}")
        if seeds.device != device:
            raise ValueError(f"seeds is on {seeds.device} but noise is on {device}")
        t = seeds.to(torch.int64)
    else:
        try:
            values = list(seeds)
        except TypeError:
            raise TypeError(
                f"seeds must be a sequence of ints or an int64 tensor, got {type(seeds).__name__}"
            ) from None
        for v in values:
            # a float or bool seed is a mistake, not a seed (2.7 would silently become 2)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"seeds must be integers, got {type(v).__name__} {v!r}")
        try:
            t = torch.as_tensor(values, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"seeds must be a sequence of ints or an int64 tensor: {e}") from None
    if tuple(t.shape) != (batch,):
        raise ValueError(f"seeds must have one seed per sample ([B]=[{batch}]), got shape {tuple(t.shape)}")
    return t.to(device)


def check_generator(generator: Any, batch: int) -> None:
    """A torch.Generator, a PerSampleGenerator with one stream per sample, or None (global RNG)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not hasattr(generator, "randn"):
        raise TypeError(
            "generator must be a torch.Generator or an edmfast.PerSampleGenerator, "
            f"got {type(generator).__name__}"
        )
    if hasattr(generator, "__len__") and len(generator) != batch:
        raise ValueError(f"generator holds {len(generator)} per-sample streams but noise has batch {batch}")
