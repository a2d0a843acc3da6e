"""Drop-in replacements for k-diffusion's fixed-step samplers, on edmfast's engine.

``from edmfast import k_diffusion as K`` and ``K.sample_dpmpp_2m(model, x, sigmas, ...)``: the
signatures, defaults, random streams and callbacks of ``k_diffusion.sampling`` (crowsonkb, 0.1.1):
``x`` is already scaled by ``sigmas[0]``; the model is called as ``model(x, sigma * ones(B),
**extra_args)`` and returns the denoised estimate; noise comes from torch's global RNG
(``torch.randn_like``) in exactly k-diffusion's order, from the given ``noise_sampler(sigma,
sigma_next)``, or, for the SDE samplers without one, from k-diffusion's default Brownian-tree
sampler (seeded from the global RNG; needs ``torchsde``). So a seed gives k-diffusion's image.

What changes is how each step is computed: one fused pass per model evaluation (the solvers'
plans, `edmfast.solvers`), instead of k-diffusion's ten or so elementwise kernels per step. The
state is float32 whatever x's dtype (the fused kernels' state precision); the model sees and the
result has x's dtype. ``sample_dpm_fast`` / ``sample_dpm_adaptive`` pick their steps at run time
and are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .engine import Engine, cached
from .options import K_SOLVERS, REFUSED_SOLVERS, SamplerOptions, check_sigmas
from .plan import Plan, PlanCache, tensor_key
from .solvers import make_plan

__all__ = ["sample_" + name for name in ("euler", "heun", *K_SOLVERS)] + [
    "sample_dpm_fast",
    "sample_dpm_adaptive",
]

_SDE = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")  # default: the Brownian-tree noise sampler
_CHURN = ("euler", "heun", "dpm_2")  # randn_like(x) of the current x on every step


class _KSampler:
    """The cached engine and plans of one (model, solver, options) drop-in."""

    def __init__(self, model_ref: Callable[[], Any], opts: SamplerOptions, disable: Any):
        self.model_ref, self.opts = model_ref, opts
        self.out_dtype: torch.dtype | None = None  # the model's output dtype, seen by the noise draws

        def network() -> Callable[..., Any]:
            model = model_ref()
            if model is None:
                raise RuntimeError("the model of this cached drop-in sampler was garbage-collected")

            def call(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> Any:
                out = model(x, sigma, **extra)
                self.out_dtype = getattr(out, "dtype", None)
                return out

            return call

        progress = None if disable is None else not disable
        self.engine = Engine(
            network, backend="auto", cuda_graph=False, progress=progress, describe="the model"
        )
        self.plans = PlanCache()

    def plan(self, sigmas: torch.Tensor) -> Plan:
        key = tensor_key(sigmas)

        def make() -> Plan:
            return make_plan(_plain, check_sigmas(sigmas), self.opts, prescaled=True, draw_always=True)

        return self.plans.get(None if key is None else ("s", key), make)

    def release(self) -> None:
        self.engine.release()
        self.plans.clear()


def _plain(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Stands for the model while planning: a plain denoiser (k-diffusion treats every model so)."""
    return x


def _noise_args(name: str, sigmas: torch.Tensor, step: int, stage: int, r: float) -> tuple[torch.Tensor, ...]:
    """The (sigma, sigma_next) k-diffusion hands its noise sampler at (step, stage), computed as it
    does, in the schedule's dtype (a Brownian tree is queried at exactly these points)."""
    s, sn = sigmas[step], sigmas[step + 1]
    if name != "dpmpp_sde":
        return s, sn
    t, t_next = s.log().neg(), sn.log().neg()
    if stage == 0:
        return t.neg().exp(), (t + (t_next - t) * r).neg().exp()
    return t.neg().exp(), t_next.neg().exp()


class _BrownianNoise:
    """k-diffusion's default noise for its SDE samplers: increments of a Brownian tree over
    [sigma_min, sigma_max] (torchsde), normalized to unit variance, seeded from the global RNG."""

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor):
        try:
            import torchsde
        except ImportError:
            raise RuntimeError(
                "the SDE samplers' default noise is k-diffusion's Brownian tree, which needs torchsde "
                "(pip install torchsde); or pass noise_sampler=..."
            ) from None
        lo, hi = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.sign = 1 if lo < hi else -1
        lo, hi = (lo, hi) if lo < hi else (hi, lo)
        seed = torch.randint(0, 2**63 - 1, []).item()
        self.tree = torchsde.BrownianTree(lo, torch.zeros_like(x), hi, entropy=seed)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1 if a < b else -1
        lo, hi = (a, b) if a < b else (b, a)
        return self.tree(lo, hi) * (self.sign * sign) / (b - a).abs().sqrt()


def _run(name: str, model: Any, x: torch.Tensor, sigmas: Any, extra_args: dict | None, callback: Any,
         disable: Any, noise_sampler: Any = None, **options: Any) -> torch.Tensor:  # fmt: skip
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a [B, ...] tensor with B >= 1")
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor with at least 2 entries (the last usually 0)")
    if not callable(model):
        raise TypeError(f"model must be callable model(x, sigma, **extra_args), got {type(model).__name__}")
    opts = SamplerOptions.create(solver=name, **options)
    extra = {} if extra_args is None else extra_args
    key = ("k_diffusion", opts, disable)
    ks: _KSampler = cached(key, model, lambda ref: _KSampler(ref, opts, disable))
    plan = ks.plan(sigmas)
    source = _draw_source(name, x, sigmas, noise_sampler, plan, ks, opts.r_value)
    kcb = None if callback is None else _callback(callback, x.dtype, sigmas)
    call = ks.engine.prepare(
        plan, x, net_dtype=x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32,
        cond=extra, uncond=None, guidance_scale=1.0, guidance_rescale=0.0, noise_mode="exact",
        noise_sampler=source, callback=kcb,
    )  # fmt: skip
    return ks.engine.run(call)


def _draw_source(name: str, x: torch.Tensor, sigmas: torch.Tensor, noise_sampler: Any, plan: Plan,
                 ks: _KSampler, r: float) -> Callable | None:  # fmt: skip
    """The engine's noise_sampler for this call: it answers the plan's draws in order, each the way
    k-diffusion makes it (same generator, dtype, shape and, for a noise sampler, arguments)."""
    if noise_sampler is None and name in _SDE:
        # made up front, as k-diffusion does (its seed comes from the global RNG), even when the
        # plan then draws nothing (eta = 0): the global RNG must end in the same state
        positive = sigmas[sigmas > 0]
        noise_sampler = _BrownianNoise(x, positive.min(), sigmas.max())
    if not plan.draws:
        return None
    draws = iter(plan.draws)
    state = {"dtype": x.dtype}

    def draw(_sigma: torch.Tensor, _sigma_next: torch.Tensor) -> torch.Tensor:
        d = next(draws)
        if noise_sampler is not None:
            return noise_sampler(*_noise_args(name, sigmas, d.step, d.stage, r))
        if name in _CHURN:
            # k-diffusion's x turns promote(x, denoised, sigmas) after the first step (to_d divides
            # by a [1, ...]-shaped sigma): its randn_like(x) draws follow, to give the same images
            if d.step > 0 and ks.out_dtype is not None:
                state["dtype"] = torch.promote_types(
                    torch.promote_types(state["dtype"], ks.out_dtype), sigmas.dtype
                )
            return torch.randn(x.shape, dtype=state["dtype"], device=x.device)
        return torch.randn_like(x)  # default_noise_sampler: randn_like of the first x

    return draw


def _callback(callback: Callable[[dict], Any], dtype: torch.dtype, sigmas: torch.Tensor) -> Callable:
    """k-diffusion's callback info from the engine's: x in x's dtype, sigma from the schedule."""

    def cb(info: dict) -> None:
        i = info["i"]
        hat = info["sigma_hat"].to(sigmas.dtype).to(sigmas.device)
        callback({
            "x": info["x"].to(dtype), "i": i, "sigma": sigmas[i],
            "sigma_hat": sigmas[i] if bool(hat == sigmas[i]) else hat, "denoised": info["denoised"].to(dtype),
        })  # fmt: skip

    return cb


# ----------------------------------------------------------------------------- the samplers


@torch.no_grad()
def sample_euler(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """EDM Algorithm 2 with Euler steps (k-diffusion's ``sample_euler``)."""
    return _run(
        "euler", model, x, sigmas, extra_args, callback, disable, **_churn(s_churn, s_tmin, s_tmax, s_noise)
    )


@torch.no_grad()
def sample_heun(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """EDM Algorithm 2 with Heun steps, Euler on the step to sigma 0 (k-diffusion's ``sample_heun``)."""
    return _run(
        "heun", model, x, sigmas, extra_args, callback, disable, **_churn(s_churn, s_tmin, s_tmax, s_noise)
    )


@torch.no_grad()
def sample_dpm_2(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """DPM-Solver-2 steps with EDM's churn (k-diffusion's ``sample_dpm_2``)."""
    return _run(
        "dpm_2", model, x, sigmas, extra_args, callback, disable, **_churn(s_churn, s_tmin, s_tmax, s_noise)
    )


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral Euler steps (k-diffusion's ``sample_euler_ancestral``)."""
    return _run("euler_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler,
                eta=eta, s_noise=s_noise)  # fmt: skip


@torch.no_grad()
def sample_dpm_2_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral DPM-Solver-2 steps (k-diffusion's ``sample_dpm_2_ancestral``)."""
    return _run("dpm_2_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler,
                eta=eta, s_noise=s_noise)  # fmt: skip


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (k-diffusion's ``sample_lms``), coefficients integrated exactly."""
    return _run("lms", model, x, sigmas, extra_args, callback, disable, order=order)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral DPM-Solver++(2S) (k-diffusion's ``sample_dpmpp_2s_ancestral``)."""
    return _run("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler,
                eta=eta, s_noise=s_noise)  # fmt: skip


@torch.no_grad()
def sample_dpmpp_sde(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    r=1 / 2,
):
    """DPM-Solver++ (stochastic) (k-diffusion's ``sample_dpmpp_sde``)."""
    return _run("dpmpp_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler,
                eta=eta, s_noise=s_noise, r=r)  # fmt: skip


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (k-diffusion's ``sample_dpmpp_2m``)."""
    return _run("dpmpp_2m", model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    solver_type="midpoint",
):
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``)."""
    return _run("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler,
                eta=eta, s_noise=s_noise, solver_type=solver_type)  # fmt: skip


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``)."""
    return _run("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler,
                eta=eta, s_noise=s_noise)  # fmt: skip


def sample_dpm_fast(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Refused: DPM-Solver-fast picks its steps itself (no fixed plan)."""
    raise ValueError(f"sample_dpm_fast is not supported by edmfast: {REFUSED_SOLVERS['dpm_fast']}")


def sample_dpm_adaptive(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Refused: adaptive step sizes need host syncs on error estimates (no fixed plan)."""
    raise ValueError(f"sample_dpm_adaptive is not supported by edmfast: {REFUSED_SOLVERS['dpm_adaptive']}")


def _churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> dict:
    """The churn options k-diffusion's euler / heun / dpm_2 take, checked as k-diffusion allows."""
    if not s_churn >= 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}")
    return dict(s_churn=float(s_churn), s_tmin=float(s_tmin), s_tmax=float(s_tmax), s_noise=float(s_noise))
