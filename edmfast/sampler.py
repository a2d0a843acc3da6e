"""The front doors of the sigma-family samplers: `Sampler`, `sample`, `ablation_sample`.

Each reads top-down: validate the options (`edmfast.options`) -> the plan (`edmfast.solvers`,
cached) -> `edmfast.engine.Engine` (buffers, the loop or a graph replay, the flags) -> the
kernels (`edmfast.ops`). Solvers: EDM's euler / heun / 2nd (Algorithm 2 with churn) and
k-diffusion's fixed-step samplers (euler_ancestral, dpm_2, dpm_2_ancestral, lms,
dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .engine import ReusableSampler, StepView, cached, clear_sample_cache
from .options import (
    SamplerOptions,
    _real,
    check_guidance,
    check_sigmas,
    resolve_sigmas,
    with_option_signature,
)
from .plan import Plan, is_preconditioner, settings_key, tensor_key
from .solvers import AblationOptions, make_plan

# solver="2nd" stores x' in float32 and pass B rebuilds d from x' - x_hat, so float32 rounding is
# amplified by ~1/(2 alpha^2): measured rel. error vs the float64 reference 2e-7 at alpha 0.5,
# 1.2e-5 at 0.1, 3e-4 at 0.02, 2e-3 at 0.01, 0.2 at 0.001 (12-32 steps). Below 0.1 the fused
# engine would exceed its 2e-5 budget, so it refuses; reference.sample accepts (0, 1].
ALPHA_MIN = 0.1
_SCHEDULE_OPTIONS = ("num_steps", "sigma_min", "sigma_max", "rho")


def _check_schedule_conflict(sigmas: Any, options: dict) -> None:
    """An explicit schedule next to the options that would make the default one is a contradiction
    (``sample(den, noise, karras_sigmas(4), num_steps=50)`` would run 4 steps): refuse it by name."""
    if sigmas is None:
        return
    n = check_sigmas(sigmas).numel() - 1
    for name in _SCHEDULE_OPTIONS:
        if name in options and not (name == "num_steps" and options[name] == n):
            raise ValueError(
                f"{name}={options[name]!r} conflicts with the explicit sigmas ({n} steps): "
                "give one or the other"
            )


class Sampler(ReusableSampler):
    """A reusable sampler: ``Sampler(denoiser, **options)(noise, cond=..., seeds=...)``.

    Options are those of `sample`. Per call: the noise, ``sigmas`` (default: EDM's), ``cond`` /
    ``uncond``, ``generator``, ``seeds``, ``noise_sampler``, ``callback``, and ``guidance_scale`` /
    ``guidance_rescale`` (override the options; kept in device memory, so a captured graph serves
    any value). On CUDA with ``cuda_graph`` on, the whole loop (all steps, every evaluation, CFG,
    noise) is captured once per configuration and replayed for new noise, seeds, sigma values,
    guidance values and tensor conditioning. A configuration is re-captured when any of these
    change: noise shape/dtype/device, the network dtype, conditioning keys/shapes/dtypes, guidance
    on/off or rescale on/off, the plan's structure (solver, number of steps, which steps churn or
    correct, zero-SNR start), or the noise mode. At most ``max_graphs`` configurations are kept
    (least recently used dropped, its memory pool released); `release` frees them all. With
    ``cuda_graph="auto"`` a configuration's first call runs eagerly and the capture happens when it
    repeats; ``True`` captures on the first call; ``False`` never captures.

    Threads: a Sampler may be called from several threads at once, and re-entrantly (from inside
    its own denoiser). One call at a time uses the cached buffers / graphs; a call that finds them
    busy runs eagerly on buffers of its own (correct, allocated per call).

    Plans (the float64 schedule folded into coefficient rows) are cached per schedule values,
    options and the denoiser's scalar settings: the denoiser's coefficient tensors must not change
    while a Sampler uses it.

    A call with a ``callback``, an ``on_step_end`` hook or a ``noise_sampler`` runs the eager loop.

    ``ablation`` (an `edmfast.AblationOptions`): EDM's design space, sigma(t), s(t) and the
    discretization's time steps (see `ablation_sample`); ``sigmas`` must then be None.

    ``stats`` records ``compile_s`` (first call through the compiled network), ``capture_s``,
    ``captures`` and ``replays``.
    """

    what = "denoiser"

    @with_option_signature
    def __init__(
        self,
        denoiser: Any,
        sigmas: Any = None,
        *,
        max_graphs: int = 4,
        ablation: AblationOptions | None = None,
        **options: Any,
    ):
        self.opts = opts = SamplerOptions.create(**options)
        if opts.solver == "2nd" and opts.alpha < ALPHA_MIN:
            raise ValueError(
                f"alpha={opts.alpha} is below {ALPHA_MIN}: the fused float32 engine loses accuracy "
                "like 1/alpha^2 there (use edmfast.reference.sample or reference.ablation_sample for "
                "such ablations)"
            )
        if ablation is not None and not isinstance(ablation, AblationOptions):
            raise TypeError(
                f"ablation must be an edmfast.AblationOptions or None, got {type(ablation).__name__}"
            )
        if ablation is not None and sigmas is not None:
            raise ValueError(
                "sigmas must be None with ablation (the time steps come from the ablation options)"
            )
        _check_schedule_conflict(sigmas, options)
        check_guidance(opts.guidance_scale, opts.guidance_rescale)
        self.ablation = ablation
        self.sigmas = sigmas
        super().__init__(
            denoiser, lambda den: den.raw if is_preconditioner(den) else den, backend=opts.backend,
            cuda_graph=opts.cuda_graph, progress=opts.progress, compile=opts.compile, max_graphs=max_graphs,
        )  # fmt: skip
        self.precond = is_preconditioner(self.model)

    @property
    def denoiser(self) -> Any:
        return self.model

    def plan(self, sigmas: Any = None) -> Plan:
        """The cached plan for ``sigmas`` (None: the Sampler's own, or EDM's default schedule)."""
        den, opts = self.denoiser, self.opts
        sigmas = self.sigmas if sigmas is None else sigmas
        if self.ablation is not None:
            if sigmas is not None:
                raise ValueError(
                    "sigmas must be None with ablation (the time steps come from the ablation options)"
                )
            key: Any = ("ablation", self.ablation)
        else:
            skey = ("default",) if sigmas is None else tensor_key(sigmas)
            key = None if skey is None else ("sigmas", skey)
        full = None if key is None else (key, opts, settings_key(den))
        return self._plans.get(full, lambda: self._make_plan(den, sigmas))

    def _make_plan(self, den: Any, sigmas: Any) -> Plan:
        if self.ablation is not None:
            return make_plan(den, None, self.opts, self.ablation)
        return make_plan(den, resolve_sigmas(den, sigmas, self.opts), self.opts)

    def __call__(
        self,
        noise: torch.Tensor,
        sigmas: Any = None,
        *,
        cond: dict | None = None,
        uncond: dict | None = None,
        generator: Any = None,
        seeds: Any = None,
        guidance_scale: Any = None,
        guidance_rescale: Any = None,
        callback: Callable[[dict], Any] | None = None,
        noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        on_step_end: Callable[[StepView], Any] | None = None,
    ) -> torch.Tensor:
        net_dtype = getattr(self.denoiser, "dtype", torch.float32) if self.precond else torch.float32
        return self._run(
            self.plan(sigmas), noise, net_dtype, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, generator=generator, seeds=seeds, noise_sampler=noise_sampler,
            callback=callback, on_step_end=on_step_end,
        )  # fmt: skip


def _cached_sampler(denoiser: Any, options: dict, ablation: AblationOptions | None = None) -> Sampler:
    """sample()'s reusable Sampler for (denoiser, options), from the engine's one cache."""
    opts = SamplerOptions.create(**options)
    if opts.compile:  # a compiled network is made per call (its cache is torch's)
        return Sampler(denoiser, ablation=ablation, **options)
    key = ("sampler", opts, ablation, tuple(sorted(options)))
    return cached(key, denoiser, lambda ref: Sampler(ref, ablation=ablation, **options))


@with_option_signature
def sample(
    denoiser: Any,
    noise: torch.Tensor,
    sigmas: Any = None,
    *,
    cond: dict | None = None,
    uncond: dict | None = None,
    generator: Any = None,
    seeds: Any = None,
    callback: Callable[[dict], Any] | None = None,
    noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    **options: Any,
) -> torch.Tensor:
    """Sample a diffusion model with any of the engine's solvers.

    ``noise`` [B, ...] is unit-variance latents; the loop starts at ``noise * sigmas[0]`` (at the
    noise itself when sigmas[0] is inf). ``sigmas`` defaults to `karras_sigmas` with
    num_steps / sigma_min / sigma_max / rho, clamped to the denoiser's range (giving both is
    refused). Options (defaults): solver "heun" (EDM's; also "euler", "2nd" with alpha, and
    k-diffusion's euler_ancestral, dpm_2, dpm_2_ancestral, lms, dpmpp_2s_ancestral, dpmpp_sde,
    dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde with eta / s_noise / order / r / solver_type),
    s_churn 0, s_tmin 0, s_tmax inf, s_noise 1, guidance_scale 1, guidance_rescale 0, noise_mode
    "exact" | "fused", backend "auto", cuda_graph "auto", compile False, progress False.
    Returns a tensor like ``noise``.

    Noise, exact mode: EDM's solvers draw float64 churn noise on every step once s_churn > 0 (the
    official generate script's stream); k-diffusion's draw in ``noise.dtype`` exactly where
    k-diffusion calls its noise sampler, from ``generator`` (None: torch's global RNG) or from
    ``noise_sampler(sigma, sigma_next)`` when given. Fused mode: Philox keyed by (seed, step,
    element, stage), no noise tensor.

    Repeated calls with the same denoiser and options reuse one cached `Sampler` (its plans,
    buffers and, on CUDA, captured graphs): see `edmfast.engine.clear_sample_cache`; with
    compile=True each call builds a fresh one.

    ``callback(info)``, k-diffusion's convention, runs after step i's first evaluation with
    ``info`` = {"x": the state (after churn), "i", "sigma": sigma_i, "sigma_hat", "denoised":
    D(x; sigma_hat) (guided)}, fresh tensors (sigma / sigma_hat float64 0-d, on the CPU). A
    callback forces the eager loop (one copy and one extra pass per step) and never changes the
    result.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma, **cond), got {type(denoiser).__name__}")
    _check_schedule_conflict(sigmas, options)
    w = options.pop("guidance_scale", 1.0)
    phi = options.pop("guidance_rescale", 0.0)
    s = _cached_sampler(denoiser, options)
    return s(
        noise, sigmas, cond=cond, uncond=uncond, generator=generator, seeds=seeds, guidance_scale=w,
        guidance_rescale=phi, callback=callback, noise_sampler=noise_sampler,
    )  # fmt: skip


def ablation_sample(
    denoiser: Any,
    noise: torch.Tensor,
    *,
    num_steps: int = 18,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    solver: str = "heun",
    discretization: str = "edm",
    schedule: str = "linear",
    scaling: str = "none",
    epsilon_s: float = 1e-3,
    C1: float = 0.001,
    C2: float = 0.008,
    M: int = 1000,
    alpha: float = 1.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Any = None,
    cond: dict | None = None,
    uncond: dict | None = None,
    seeds: Any = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    callback: Callable[[dict], Any] | None = None,
    **options: Any,
) -> torch.Tensor:
    """EDM's general sampler over the whole design space, on the fused engine.

    The signature and math of `edmfast.reference.ablation_sample` (discretization edm | vp | ve |
    iddpm, schedule sigma(t) linear | vp | ve, scaling s(t) none | vp, solver euler | heun | 2nd
    with alpha, where heun with alpha != 1 is the 2nd-order alpha solver as there), plus the
    engine's ``cond`` / ``uncond`` / guidance, ``seeds`` and options (noise_mode, backend,
    cuda_graph, compile, progress). ``d = (sigma'/sigma + s'/s) x - (sigma' s/sigma) D(x/s; sigma)``
    is affine in (x, F), so every step runs as the same fused passes as `sample`. Returns x(t=0)
    typed like ``noise``. The paper's baselines: VP ``discretization="vp", schedule="vp",
    scaling="vp"``; VE ``discretization="ve", schedule="ve"``. ``callback`` as in `sample`
    (``x`` is the scaled state, ``denoised`` D(x_hat / s; sigma_hat)).
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma, **cond), got {type(denoiser).__name__}")
    ablation = AblationOptions.create(
        discretization=discretization, schedule=schedule, scaling=scaling, sigma_min=sigma_min,
        sigma_max=sigma_max, epsilon_s=epsilon_s, C1=C1, C2=C2, M=M,
    )  # fmt: skip
    if not isinstance(solver, str) or solver not in ("euler", "heun", "2nd"):
        raise ValueError(f"solver must be euler, heun or 2nd, got {solver!r}")
    alpha = _real("alpha", alpha)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if solver == "euler":
        alpha = 1.0  # unused by Euler, as in the reference
    elif alpha != 1.0:
        solver = "2nd"
    elif solver == "2nd":
        solver = "heun"  # alpha = 1 is Heun
    engine = dict(
        num_steps=num_steps, rho=rho, solver=solver, alpha=alpha, s_churn=s_churn, s_tmin=s_tmin,
        s_tmax=s_tmax, s_noise=s_noise, **options,
    )  # fmt: skip
    s = _cached_sampler(denoiser, engine, ablation)
    return s(
        noise, cond=cond, uncond=uncond, generator=generator, seeds=seeds, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, callback=callback,
    )  # fmt: skip


__all__ = ["ALPHA_MIN", "Sampler", "ablation_sample", "clear_sample_cache", "sample"]
