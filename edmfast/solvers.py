"""Every sampler as a plan of fused passes: the only place where a schedule,
a preconditioner and a solver are folded into numbers.

All of it is float64 host work, done once per (schedule, options) and cached by the caller:

* EDM's samplers (Algorithm 2: euler, heun, and the generalized 2nd order with alpha) and EDM's
  design space (`AblationOptions`: sigma(t), s(t), the discretization's time steps), vectorized
  over the whole schedule. Per Heun step two passes (the minimum traffic): pass A reads x_hat and F and
  writes the correction point x' (slot 1) and the next network input; pass B reads x_hat, x' and
  F' and writes x_{i+1} already churned for step i + 1. ``d = (x - D)/sigma`` is never stored.
* k-diffusion's fixed-step samplers (`options.K_SOLVERS`), written step by step with
  `PlanBuilder`: the ancestral ones (sigma_down, sigma_up), DPM-2, LMS, DPM-Solver++ (2S, SDE, 2M,
  2M SDE, 3M SDE). Each multistep method keeps its earlier denoised estimates (or derivatives) in
  history slots: the pass after step i's evaluation writes D_i there (``h_out = c_skip x + c_out
  F``) while it reads D_{i-1}, ... in the same pass.

The denoiser D = c_skip x + c_out F(c_in x; c_noise) (a plain denoiser: c_skip = 0, c_out = 1,
c_in = 1, told sigma) makes every update of these methods affine in (x, F, history), so each is
one `edmfast.ops.affine_step` per network evaluation. The formulas follow the papers and
k-diffusion 0.1.1 (names, defaults, branch conditions, the order of the noise draws);
`edmfast.reference` implements the same samplers independently, step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from .layout import COEF_A, COEF_NET, COEF_SIZE, COEF_STD
from .options import EDM_SOLVERS, SamplerOptions
from .plan import START, Plan, PlanBuilder, X, build, is_preconditioner

__all__ = [
    "AblationOptions",
    "Step",
    "ablation_time_steps",
    "make_plan",
    "plan_steps",
]


@dataclass(frozen=True)
class _Shape:
    """How a plan meets its caller: ``prescaled`` (the first state is the given x itself, already
    times sigma_0: k-diffusion's convention) and ``draw_always`` (k-diffusion's euler / heun / dpm_2
    draw churn noise on every step, also with s_churn = 0, so its global RNG ends in the same state)."""

    prescaled: bool = False
    draw_always: bool = False


def make_plan(
    denoiser: Any,
    sigmas: torch.Tensor | None,
    opts: SamplerOptions,
    ablation: AblationOptions | None = None,
    *,
    prescaled: bool = False,
    draw_always: bool = False,
) -> Plan:
    """The plan of ``opts.solver`` over ``sigmas`` (float64 [N + 1], validated) for ``denoiser``.

    With ``ablation`` the time steps, sigma(t) and s(t) come from it and ``sigmas`` is unused.
    ``prescaled`` / ``draw_always``: k-diffusion's calling conventions (see `_Shape`)."""
    shape = _Shape(prescaled, draw_always)
    if ablation is not None:
        return _ablation_plan(denoiser, opts, ablation, shape)
    assert sigmas is not None
    if opts.solver in EDM_SOLVERS:
        return _edm_plan(denoiser, sigmas, opts, shape)
    s = sigmas.to(torch.float64).reshape(-1)
    if bool(torch.isinf(s[1:]).any()):
        raise ValueError("only sigmas[0] may be inf")
    if math.isinf(float(s[0])) and not callable(getattr(denoiser, "limit_coefficients", None)):
        raise ValueError(
            "sigmas[0] is inf (zero terminal SNR): the denoiser needs limit_coefficients() "
            "(use edmfast.DiscreteVPDenoiser with v_prediction or sample prediction)"
        )
    # from sigma = inf the state is the unit noise itself (the limit step takes it from there)
    start = 1.0 if prescaled or math.isinf(float(s[0])) else float(s[0])
    solver = _K_SOLVERS[opts.solver]

    def run(b: PlanBuilder) -> Plan:
        st = _Step(b, s.tolist(), opts, shape)
        solver(st)
        return st.finish()

    return build(run, denoiser, start)


@dataclass(frozen=True)
class Step:
    """The float64 plan of one sampler step (EDM Algorithm 2)."""

    sigma: float  # sigma_i (may be inf for the first step of a zero-terminal-SNR schedule)
    sigma_hat: float  # sigma_i (1 + gamma_i), rounded
    sigma_next: float  # sigma_{i+1}
    noise_std: float  # sqrt(sigma_hat^2 - sigma_i^2) * S_noise
    churn: bool  # gamma_i > 0
    correct: bool  # take the 2nd-order correction (sigma_{i+1} != 0 and solver != euler)
    sigma_prime: float  # sigma_hat + alpha h, where the correction evaluates D


@dataclass
class _Schedule:
    """Per-step float64 vectors [N] (the vectorized form of a list of `Step`)."""

    sigma: torch.Tensor
    sigma_hat: torch.Tensor
    sigma_next: torch.Tensor
    noise_std: torch.Tensor
    churn: torch.Tensor  # bool
    correct: torch.Tensor  # bool
    sigma_prime: torch.Tensor
    inf_start: bool

    def steps(self) -> list[Step]:
        cols = (
            self.sigma.tolist(),
            self.sigma_hat.tolist(),
            self.sigma_next.tolist(),
            self.noise_std.tolist(),
            self.churn.tolist(),
            self.correct.tolist(),
            self.sigma_prime.tolist(),
        )
        return [Step(*v) for v in zip(*cols, strict=True)]


def _schedule(denoiser: Any, sigmas: torch.Tensor, opts: SamplerOptions) -> _Schedule:
    """Churn (gamma), rounding and the correction point for every step at once."""
    s = sigmas.to(torch.float64).reshape(-1)
    n = s.numel() - 1
    sig, nxt = s[:-1], s[1:]
    if bool(torch.isinf(s[1:]).any()):
        raise ValueError("only sigmas[0] may be inf")
    inf_start = math.isinf(float(s[0]))
    gamma_max = min(opts.s_churn / n, math.sqrt(2) - 1)
    churn = (sig >= opts.s_tmin) & (sig <= opts.s_tmax) & (gamma_max > 0)
    if inf_start:
        churn[0] = False  # the limit step takes no churn
    sigma_hat = torch.where(churn, sig * (1 + gamma_max), sig)
    round_sigma = getattr(denoiser, "round_sigma", None)
    if round_sigma is not None and bool(churn.any()):
        rounded = torch.as_tensor(round_sigma(sigma_hat[churn])).to(torch.float64).reshape(-1)
        sigma_hat = sigma_hat.clone()
        sigma_hat[churn] = rounded
    std = torch.where(churn, (sigma_hat**2 - sig**2).clamp(min=0).sqrt() * opts.s_noise, 0.0)
    correct = (nxt != 0) & opts.second_order
    alpha = opts.effective_alpha
    # Heun (alpha = 1) evaluates exactly at sigma_{i+1}, not at sigma_hat + h rounded in float64
    sigma_prime = nxt if alpha == 1 else sigma_hat + alpha * (nxt - sigma_hat)
    if inf_start:
        correct[0] = False
        sigma_prime = sigma_prime.clone()
        sigma_prime[0] = nxt[0]
    return _Schedule(sig, sigma_hat, nxt, std, churn, correct, sigma_prime, inf_start)


def plan_steps(denoiser: Any, sigmas: torch.Tensor, opts: SamplerOptions) -> list[Step]:
    """Per-step noise levels for the schedule: churn (gamma), rounding and the correction point."""
    return _schedule(denoiser, sigmas, opts).steps()


def _coefficients(denoiser: Any, sigma: torch.Tensor) -> list[torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) float64 [K] for a float64 sigma vector [K], in one call."""
    if not is_preconditioner(denoiser):
        one, zero = torch.ones_like(sigma), torch.zeros_like(sigma)
        return [zero, one, one, sigma]  # a plain denoiser: D = F(x; sigma), network input = x
    return [
        torch.broadcast_to(torch.as_tensor(c, dtype=torch.float64), sigma.shape)
        for c in denoiser.coefficients(sigma)
    ]


DISCRETIZATIONS = ("edm", "vp", "ve", "iddpm")
SCHEDULES = ("linear", "vp", "ve")
SCALINGS = ("none", "vp")


@dataclass(frozen=True)
class AblationOptions:
    """EDM's design space beyond sigma(t) = t, s(t) = 1 (the official ``ablation_sampler``).

    ``discretization`` edm | vp | ve | iddpm picks the time steps (Table 1), ``schedule`` the noise
    level sigma(t) (linear t | vp | ve sqrt t), ``scaling`` s(t) (none 1 | vp 1/sqrt(1+sigma^2)).
    ``sigma_min`` / ``sigma_max`` None: the discretization's default range; either way clamped to
    the denoiser's, with the VP betas refitted to the result. ``epsilon_s`` is the VP end time,
    ``C1``, ``C2``, ``M`` the iDDPM levels. With it a plan ignores the sampler's schedule options
    except num_steps and rho.
    """

    discretization: str = "edm"
    schedule: str = "linear"
    scaling: str = "none"
    sigma_min: float | None = None
    sigma_max: float | None = None
    epsilon_s: float = 1e-3
    C1: float = 0.001
    C2: float = 0.008
    M: int = 1000

    @classmethod
    def create(cls, **kw: Any) -> AblationOptions:
        """Validate every field; raise ValueError/TypeError naming the bad one."""
        from .options import _real
        from .schedules import _check_eps_s, _check_iddpm

        unknown = set(kw) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown ablation option(s): {', '.join(sorted(unknown))}")
        o = {**cls().__dict__, **kw}
        for name, choices in (
            ("discretization", DISCRETIZATIONS),
            ("schedule", SCHEDULES),
            ("scaling", SCALINGS),
        ):
            if not isinstance(o[name], str) or o[name] not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {o[name]!r}")
        for name in ("sigma_min", "sigma_max"):
            if o[name] is not None:
                o[name] = _real(name, o[name])
                if not (0 < o[name] < math.inf):
                    raise ValueError(f"{name} must be finite and > 0 (or None: the default), got {o[name]}")
        o["epsilon_s"] = _check_eps_s(o["epsilon_s"], "epsilon_s")
        o["M"], o["C1"], o["C2"] = _check_iddpm(o["M"], o["C1"], o["C2"])
        return cls(**o)


class _TimeFunctions:
    """sigma(t), sigma'(t), sigma^-1(sigma), s(t), s'(t) of one ablation setting (float64)."""

    def __init__(self, ab: AblationOptions, beta_d: float, beta_min: float):
        self.ab, self.beta_d, self.beta_min = ab, beta_d, beta_min

    def sig(self, t: torch.Tensor) -> torch.Tensor:
        if self.ab.schedule == "vp":
            return torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t).sqrt()
        return t.sqrt() if self.ab.schedule == "ve" else t

    def sig_d(self, t: torch.Tensor) -> torch.Tensor:
        if self.ab.schedule == "vp":
            sg = self.sig(t)
            return 0.5 * (self.beta_min + self.beta_d * t) * (sg + 1 / sg)
        return 0.5 / t.sqrt() if self.ab.schedule == "ve" else torch.ones_like(t)

    def sig_inv(self, s: torch.Tensor) -> torch.Tensor:
        if self.ab.schedule == "vp":
            bd, bm = self.beta_d, self.beta_min
            return ((bm**2 + 2 * bd * torch.log1p(s**2)).sqrt() - bm) / bd
        return s**2 if self.ab.schedule == "ve" else s

    def s(self, t: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + self.sig(t) ** 2).sqrt() if self.ab.scaling == "vp" else torch.ones_like(t)

    def s_d(self, t: torch.Tensor) -> torch.Tensor:
        if self.ab.scaling == "vp":
            return -self.sig(t) * self.sig_d(t) * self.s(t) ** 3
        return torch.zeros_like(t)


def _rounded(denoiser: Any, sigma: torch.Tensor) -> torch.Tensor:
    round_sigma = getattr(denoiser, "round_sigma", None)
    if round_sigma is None:
        return sigma
    return torch.as_tensor(round_sigma(sigma)).to("cpu", torch.float64).reshape(sigma.shape)


def ablation_time_steps(
    denoiser: Any, ab: AblationOptions, num_steps: int, rho: float
) -> tuple[torch.Tensor, _TimeFunctions]:
    """The time steps t_0 > ... > t_(N-1) > t_N = 0 of an ablation setting and its functions of t.

    As the official ablation sampler: the discretization's sigma levels over the range clamped
    to the denoiser's, rounded by the denoiser, mapped to t by the schedule's inverse."""
    from .schedules import iddpm_sigmas, karras_sigmas, ve_sigmas, vp_betas_for_range, vp_sigma

    eps_s = ab.epsilon_s
    defaults = {
        "vp": (float(vp_sigma(eps_s)), float(vp_sigma(1.0))),
        "ve": (0.02, 100.0),
        "iddpm": (0.002, 81.0),
        "edm": (0.002, 80.0),
    }[ab.discretization]
    lo = defaults[0] if ab.sigma_min is None else ab.sigma_min
    hi = defaults[1] if ab.sigma_max is None else ab.sigma_max
    lo = max(lo, float(getattr(denoiser, "sigma_min", 0.0)))
    hi = min(hi, float(getattr(denoiser, "sigma_max", math.inf)))
    if not 0 < lo < hi < math.inf:
        raise ValueError(
            f"the ablation's sigma range [{lo:g}, {hi:g}] (clamped to the denoiser's) is empty: "
            "check sigma_min / sigma_max"
        )
    beta_d, beta_min = vp_betas_for_range(lo, hi, eps_s)
    fns = _TimeFunctions(ab, beta_d, beta_min)
    if ab.discretization == "edm":
        levels = karras_sigmas(num_steps, lo, hi, rho)[:-1]
    elif ab.discretization == "vp":
        t = 1 + torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1) * (eps_s - 1)
        levels = vp_sigma(t, beta_d, beta_min)
    elif ab.discretization == "ve":
        levels = ve_sigmas(num_steps, lo, hi)[:-1]
    else:
        levels = iddpm_sigmas(num_steps, lo, hi, M=ab.M, C1=ab.C1, C2=ab.C2)[:-1]
    t_steps = fns.sig_inv(_rounded(denoiser, levels.to(torch.float64)))
    t_steps = torch.cat([t_steps, t_steps.new_zeros(1)])
    if not (bool(torch.isfinite(t_steps).all()) and bool((t_steps[1:] < t_steps[:-1]).all())):
        raise ValueError(
            f"the ablation's time steps are not finite and decreasing ({ab.discretization} steps on "
            f"the {ab.schedule} schedule over [{lo:g}, {hi:g}]): check the options"
        )
    return t_steps, fns


def _ablation_plan(denoiser: Any, opts: SamplerOptions, ab: AblationOptions, shape: _Shape) -> Plan:
    """Rows for ``d = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x/s; sigma)`` (EDM eq. 4).

    With D = c_skip x/s + c_out F the derivative is ``d = g_x x + g_f F``, affine in (x, F), so each
    pass keeps the form ``p x_hat + q x' + r F + std eps`` and the network input is (c_in / s) out.
    Churn in t as the official sampler: ``t_hat = sigma^-1(round(sigma(t) (1 + gamma)))``,
    ``x_hat = s(t_hat)/s(t) x + sqrt(sigma(t_hat)^2 - sigma(t)^2) s(t_hat) S_noise eps``; the
    ratio s(t_hat)/s(t) is folded into the pass that ends the previous step.
    """
    n = opts.num_steps
    t_steps, fns = ablation_time_steps(denoiser, ab, n, opts.rho)
    t_cur, t_next = t_steps[:-1], t_steps[1:]
    sig_cur = fns.sig(t_cur)
    gamma_max = min(opts.s_churn / n, math.sqrt(2) - 1)
    churn = (sig_cur >= opts.s_tmin) & (sig_cur <= opts.s_tmax)
    gamma = torch.where(churn, gamma_max, 0.0)
    t_hat = fns.sig_inv(_rounded(denoiser, sig_cur + gamma * sig_cur))
    sig_hat, s_hat = fns.sig(t_hat), fns.s(t_hat)
    ratio = s_hat / fns.s(t_cur)
    std = (sig_hat**2 - sig_cur**2).clamp(min=0).sqrt() * s_hat * opts.s_noise
    a = opts.effective_alpha
    h = t_next - t_hat
    t_prime = t_hat + a * h
    cor = (torch.arange(n) < n - 1) & opts.second_order
    t_prime_safe = torch.where(cor, t_prime, t_hat)  # a valid time where no correction is taken
    sig_prime = fns.sig(t_prime_safe)
    c = _coefficients(denoiser, torch.cat([sig_hat, sig_prime]))
    skip1, out1, in1, noise1 = (t[:n] for t in c)
    skip2, out2, in2, noise2 = (t[n:] for t in c)

    def factors(t, sg, skip, out):  # d = g_x x + g_f F at time t
        sc, sd = fns.s(t), fns.sig_d(t)
        a_t, b_t = sd / sg + fns.s_d(t) / sc, sd * sc / sg
        return a_t - b_t * skip / sc, -b_t * out, sc

    gx1, gf1, _ = factors(t_hat, sig_hat, skip1, out1)
    gx2, gf2, s_prime = factors(t_prime_safe, sig_prime, skip2, out2)
    noise_on = (std > 0) if opts.s_churn > 0 else torch.zeros(n, dtype=torch.bool)
    std_on = torch.where(noise_on, std, 0.0)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    std_next = torch.cat([std_on[1:], zero])
    net1, net2 = in1 / s_hat, in2 / s_prime  # network input scale: c_in / s
    c_next = torch.cat([net1[1:], zero])
    r_next = torch.cat([ratio[1:], one])
    w1 = (1 - 1 / (2 * a)) / a
    hb = h / (2 * a)
    rows = torch.zeros(1 + 2 * n, COEF_SIZE, dtype=torch.float64)
    pass_a, pass_b = rows[1::2], rows[2::2]
    pass_a[:, 0] = torch.where(cor, 1 + a * h * gx1, (1 + h * gx1) * r_next)
    pass_a[:, 2] = torch.where(cor, a * h * gf1, h * gf1 * r_next)
    pass_a[:, 3] = torch.where(cor, 0.0, std_next)
    pass_a[:, 4] = torch.where(cor, net2, c_next)
    pass_b[:, 0] = torch.where(cor, (1 - w1) * r_next, 0.0)
    pass_b[:, 1] = torch.where(cor, (w1 + hb * gx2) * r_next, 0.0)
    pass_b[:, 2] = torch.where(cor, hb * gf2 * r_next, 0.0)
    pass_b[:, 3] = torch.where(cor, std_next, 0.0)
    pass_b[:, 4] = torch.where(cor, c_next, 0.0)
    rows[0, 0] = fns.sig(t_steps[0]) * fns.s(t_steps[0]) * ratio[0]
    rows[0, 3], rows[0, 4] = std_on[0], net1[0]
    sigma_in = torch.zeros(2 * n, dtype=torch.float64)
    sigma_in[0::2] = noise1
    sigma_in[1::2] = torch.where(cor, noise2, 0.0)
    # the callback's denoised D(x_hat / s; sigma_hat) = (c_skip / s) x_hat + c_out F
    den = torch.zeros(n, COEF_SIZE, dtype=torch.float64)
    den[:, 0], den[:, 2] = skip1 / s_hat, out1
    sch = _Schedule(
        sig_cur,
        sig_hat,
        fns.sig(t_next),
        std,
        gamma > 0,
        cor,
        torch.where(cor, sig_prime, fns.sig(t_next)),
        False,
    )
    return _assemble(rows, sigma_in, den, sch, noise_on, cor, opts, ("ablation",), shape)


def _edm_plan(denoiser: Any, sigmas: torch.Tensor, opts: SamplerOptions, shape: _Shape) -> Plan:
    """EDM Algorithm 2 (euler / heun / 2nd with alpha): vectorized rows over the whole schedule."""
    sch = _schedule(denoiser, sigmas, opts)
    n = sch.sigma.numel()
    a = opts.effective_alpha
    sh, nxt, sp = sch.sigma_hat, sch.sigma_next, sch.sigma_prime
    finite = ~torch.isinf(sch.sigma)
    # one coefficients() call: first evaluations at sigma_hat, corrections at sigma' (a valid
    # sigma stands in where a step has no correction or is the limit step; those are not used)
    sh_safe = torch.where(finite, sh, nxt[0] if n else 1.0)
    sp_safe = torch.where(sch.correct, sp, sh_safe)
    c = _coefficients(denoiser, torch.cat([sh_safe, sp_safe]))
    skip1, out1, in1, noise1 = (t[:n].clone() for t in c)
    skip2, out2, in2, noise2 = (t[n:] for t in c)
    if sch.inf_start:
        limit = getattr(denoiser, "limit_coefficients", None)
        if limit is None or not is_preconditioner(denoiser):
            raise ValueError(
                "sigmas[0] is inf (zero terminal SNR): the denoiser needs limit_coefficients() "
                "(use edmfast.DiscreteVPDenoiser with v_prediction or sample prediction)"
            )
        skip1[0], out1[0], in1[0], noise1[0] = limit()
    noise_on = sch.churn & (sch.noise_std > 0) if opts.s_churn > 0 else torch.zeros(n, dtype=torch.bool)
    std_on = torch.where(noise_on, sch.noise_std, 0.0)
    # what a pass ending step i applies for step i + 1: its churn std and its network input scale
    zero = torch.zeros(1, dtype=torch.float64)
    std_next = torch.cat([std_on[1:], zero])
    c_next = torch.cat([in1[1:], zero])

    h = nxt - sh
    d_x, d_f = (1 - skip1) / sh, -out1 / sh  # d = (x_hat - D) / sigma_hat, D = c_skip x_hat + c_out F
    # pass B: x_{i+1} = x_hat + h ((1 - 1/(2a)) d + 1/(2a) d') with d = (x' - x_hat)/(a h),
    # d' = ((1 - c_skip') x' - c_out' F') / sigma'  ->  P x_hat + Q x' + R F'
    w1 = (1 - 1 / (2 * a)) / a
    w2 = h / (2 * a * sp)
    cor = sch.correct
    rows = torch.zeros(1 + 2 * n, COEF_SIZE, dtype=torch.float64)
    pass_a, pass_b = rows[1::2], rows[2::2]
    pass_a[:, 0] = torch.where(cor, 1 + a * h * d_x, 1 + h * d_x)
    pass_a[:, 2] = torch.where(cor, a * h * d_f, h * d_f)
    pass_a[:, 3] = torch.where(cor, 0.0, std_next)
    pass_a[:, 4] = torch.where(cor, in2, c_next)
    pass_b[:, 0] = torch.where(cor, 1 - w1, 0.0)
    pass_b[:, 1] = torch.where(cor, w1 + w2 * (1 - skip2), 0.0)
    pass_b[:, 2] = torch.where(cor, -w2 * out2, 0.0)
    pass_b[:, 3] = torch.where(cor, std_next, 0.0)
    pass_b[:, 4] = torch.where(cor, c_next, 0.0)
    if sch.inf_start:
        # limit step x_1 = D(eps; inf) + sigma_1 eps = (c_skip + sigma_1) eps + c_out F
        pass_a[0, :5] = torch.stack([skip1[0] + nxt[0], zero[0], out1[0], std_next[0], c_next[0]])
    rows[0, 0] = 1.0 if sch.inf_start else sch.sigma[0]
    rows[0, 3], rows[0, 4] = std_on[0], in1[0]

    sigma_in = torch.zeros(2 * n, dtype=torch.float64)
    sigma_in[0::2] = noise1
    sigma_in[1::2] = torch.where(cor, noise2, 0.0)
    # the callback's denoised D(x_hat; sigma_hat) = c_skip x_hat + c_out F (the limit step's too)
    den = torch.zeros(n, COEF_SIZE, dtype=torch.float64)
    den[:, 0], den[:, 2] = skip1, out1
    return _assemble(rows, sigma_in, den, sch, noise_on, cor, opts, ("edm",), shape)


def _assemble(rows, sigma_in, den, sch: _Schedule, noise_on, cor, opts: SamplerOptions, kind: tuple,
              shape: _Shape) -> Plan:  # fmt: skip
    """EDM's vectorized rows as a program: per step EVAL, CALLBACK, pass A, [EVAL, pass B], STEP_END.

    Exact noise (S_churn > 0, or k-diffusion's draw_always): one float64 draw per step on every step,
    as the official generate script does, made right before the pass that adds it (the start pass
    for step 0, the pass ending step i - 1 for step i)."""
    n = len(cor)
    b = PlanBuilder(None)
    if shape.prescaled:
        rows[0, COEF_A] = 1.0  # x arrives already times sigma_0
    b.rows = rows.tolist()
    den_base = len(b.rows)
    b.rows += den.tolist()
    cor_l, noise_l = cor.tolist(), noise_on.tolist()
    draws = opts.s_churn > 0 or shape.draw_always
    sig, hat = sch.sigma.tolist(), sch.sigma_hat.tolist()
    eval_in = sigma_in.tolist()

    def draw(i: int) -> int | None:
        """Step i's churn draw (made here when drawing at all); the pass adds it when it is used."""
        if i >= n or not draws:
            return None
        d = b.draw(i, used=bool(noise_l[i]), sigma=sig[i], sigma_next=hat[i])
        return d if noise_l[i] else None

    b.run(0, x=START, out=X, net=True, noise=draw(0), flag=0)
    for i in range(n):
        last = i + 1 == n
        b.evaluate(eval_in[2 * i])
        b.callback(i, den_base + i, sigma=sig[i], sigma_hat=hat[i])
        if cor_l[i]:
            b.run(1 + 2 * i, x=X, out=1, f=True, net=True, flag=i + 1)
            b.evaluate(eval_in[2 * i + 1])
            b.run(2 + 2 * i, x=X, hist=(1,), f=True, out=X, net=not last, noise=draw(i + 1), flag=i + 1)
            end = 2 + 2 * i
        else:
            b.run(1 + 2 * i, x=X, out=X, f=True, net=not last, noise=draw(i + 1), flag=i + 1)
            end = 1 + 2 * i
        b.step_end(i, None if last else b.rows[end][COEF_NET])

    def what(r: int) -> str:
        step = 0 if r == 0 else (r - 1) // 2 if r < den_base else r - den_base
        col = next((k for k, v in enumerate(b.rows[r]) if not math.isfinite(v) or abs(v) > 3.4e38), -1)
        sigma = sig[min(step, n - 1)]
        if col == COEF_STD and opts.s_noise > 1:
            return f"step {step} (sigma={sigma:g}): the churn noise std overflows float32: lower s_noise"
        return (
            f"step {step} (sigma={sigma:g}): the noise levels are outside what the float32 kernels represent"
        )

    draw_dtype = "float64" if opts.solver in EDM_SOLVERS else "noise"
    return b.finish(torch.float32, draw_dtype, kind + (opts.solver,), what=what)


# ============================================================================= k-diffusion's samplers
#
# Each builder walks the schedule as k-diffusion's loop does, in float64 Python numbers, and emits
# per step: EVAL, CALLBACK, the pass(es) (a two-evaluation step writes its intermediate point to
# slot 1), draws where k-diffusion calls its noise sampler, STEP_END. `_Step` keeps the
# bookkeeping every builder shares: the state's next network input and the D / d rows.


def _ancestral_sigmas(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): step down to sigma_down, add sigma_up of fresh noise (k-diffusion)."""
    if not eta:
        return sigma_to, 0.0
    if math.isinf(sigma_from):  # the limit: sigma_up = min(1, eta) sigma_to
        up = min(1.0, eta) * sigma_to
        return math.sqrt(sigma_to**2 - up**2), up
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def _ratio_and_weight(sigma_to: float, sigma_from: float) -> tuple[float, float]:
    """DPM-Solver++'s first-order step from sigma_from to sigma_to: ``x' = ratio x + weight D`` with
    ratio = sigma_to / sigma_from and weight = -expm1(-h) = 1 - ratio, h = log(sigma_from / sigma_to)
    (expm1 keeps the weight exact for small h; sigma_to = 0 gives x' = D)."""
    if sigma_to == 0:
        return 0.0, 1.0
    h = math.log(sigma_from) - math.log(sigma_to)
    return sigma_to / sigma_from, -math.expm1(-h)


class _Step:
    """The shared vocabulary of the builders below, over one `PlanBuilder`.

    The state's derivative d = (x - D)/sigma and D = c_skip x + c_out F are affine in (x, F); a
    builder states an update as coefficients on x, D (this evaluation's), and history buffers, and
    `update` turns them into a row: ``a = cx + cd c_skip``, ``b = cd c_out``."""

    def __init__(self, b: PlanBuilder, sig: list[float], opts: SamplerOptions, shape: _Shape):
        self.b, self.sig, self.opts, self.shape = b, sig, opts, shape
        self.n = len(sig) - 1
        self.s_noise = opts.s_noise
        # sigma_0 = inf (zero terminal SNR): step 0 is the limit of the first-order update from the
        # unit noise u, x_1 = D(u; inf) + k u (+ noise), and leaves no history, so the method
        # starts afresh at step 1 (`first`) -- edmfast.reference.sample's convention
        self.inf = math.isinf(sig[0])
        self.first = 1 if self.inf else 0

    def limit(self, k_u: float, std: float = 0.0, noise: int | None = None, next_sigma: float | None = None):
        """Step 0 from sigma = inf: ``x_1 = (c_skip + k_u) u + c_out F + std eps``."""
        coefs = self.evaluate(0, math.inf)
        self.update(0, coefs, cx=k_u, cd=1.0, std=std, noise=noise, next_sigma=next_sigma)
        self.end(0, next_sigma)

    def start(self, first_eval_sigma: float, std: float = 0.0, noise: int | None = None) -> None:
        """The start pass: the state from the caller's noise, and the first network input."""
        c_in = self.b.c(first_eval_sigma)[2]
        row = self.b.row(a=self.b.start_scale, std=std, net=c_in)
        self.b.run(row, x=START, out=X, net=True, noise=noise, flag=0)

    def evaluate(self, i: int, sigma: float, sigma_hat: float | None = None, callback: bool = True):
        """Evaluate D at ``sigma`` (the state's current buffer feeds it); returns its coefficients."""
        cs, co, ci, cn = self.b.c(sigma)
        self.b.evaluate(cn)
        if callback:
            self.b.callback(i, self.b.row(a=cs, b=co), sigma=self.sig[i], sigma_hat=sigma_hat or sigma)
        return cs, co

    def update(
        self,
        i: int,
        coefs: tuple[float, float],
        *,
        cx: float,
        cd: float,
        hist: tuple[tuple[int, float], ...] = (),
        out: int = X,
        x: int = X,
        hist_out: int | None = None,
        d_out: tuple[float, float] | None = None,
        std: float = 0.0,
        noise: int | None = None,
        next_sigma: float | None = None,
    ) -> None:
        """``out = cx x + cd D + sum w h + std eps``, the next input at ``next_sigma`` (None: none),
        and optionally ``hist_out = d_out[0] x + d_out[1] F`` (e.g. D itself: (c_skip, c_out))."""
        cs, co = coefs
        net = self.b.c(next_sigma)[2] if next_sigma is not None else 0.0
        p, q = d_out if d_out is not None else (0.0, 0.0)
        row = self.b.row(
            a=cx + cd * cs, b=cd * co, hist=tuple(w for _, w in hist), std=std, net=net, p=p, q=q
        )
        self.b.run(
            row, x=x, out=out, hist=tuple(h for h, _ in hist), hist_out=hist_out, f=True,
            net=next_sigma is not None, noise=noise if std != 0 else None, flag=i + 1,
        )  # fmt: skip

    def end(self, i: int, next_sigma: float | None) -> None:
        self.b.step_end(i, None if next_sigma is None else self.b.c(next_sigma)[2])

    def draw(self, i: int, stage: int = 0, used: bool = True, sigma: float = math.nan,
             sigma_next: float = math.nan) -> int:  # fmt: skip
        return self.b.draw(i, stage, used, sigma, sigma_next)

    def steps(self, limit: Callable[[_Step, float, float | None], None], *, evals: list[float] | None = None,
              start: bool = True) -> Iterator[tuple[int, float, float, float | None]]:  # fmt: skip
        """Walk the schedule: (i, sigma_i, sigma_{i+1}, the next step's evaluation sigma or None on the
        last step). The start pass comes first (unless ``start`` is False: the builder made its own);
        a sigma = inf step 0 is ``limit``'s; each step ends with STEP_END."""
        evals = self.sig if evals is None else evals
        if start:
            self.start(evals[0])
        for i in range(self.n):
            nxt = evals[i + 1] if i + 1 < self.n else None
            if self.inf and i == 0:
                limit(self, self.sig[1], nxt)
                continue
            yield i, self.sig[i], self.sig[i + 1], nxt
            self.end(i, nxt)

    def midpoint_step(
        self, i: int, coefs2: tuple[float, float], w: float, std: float, noise: int | None, nxt: float | None
    ) -> None:
        """DPM-2's full step with the derivative at the midpoint x_2 (slot 1):
        ``x + w (x_2 - D_2) = x + w (1 - c_skip2) x_2 - w c_out2 F2``."""
        cs2, co2 = coefs2
        self.update(
            i, (0.0, co2), cx=1.0, cd=-w, hist=((1, w * (1 - cs2)),), std=std, noise=noise, next_sigma=nxt
        )

    def sde_noise(self, i: int, s: float, sn: float, eta_h: float) -> tuple[float, int | None]:
        """The 2M / 3M SDE noise: ``sigma_{i+1} sqrt(1 - e^(-2 eta h)) S_noise`` drawn when eta != 0."""
        if not self.opts.eta_value:
            return 0.0, None
        std = self.opts.s_noise * sn * math.sqrt(-math.expm1(-2 * eta_h))
        return std, self.draw(i, used=std != 0, sigma=s, sigma_next=sn)

    def finish(self) -> Plan:
        return self.b.finish(torch.float32, "noise", ("k", self.opts.solver))


def _ode_limit(st: _Step, sn: float, nxt: float | None) -> None:
    """Step 0 of an ODE method from sigma = inf: x_1 = D(u; inf) + sigma_1 u, no history."""
    st.limit(sn, next_sigma=nxt)


def _ancestral_limit(st: _Step, sn: float, nxt: float | None) -> None:
    """Step 0 of an ancestral method (and dpmpp_sde) from sigma = inf: D + sigma_down u, then
    ``+ S_noise sigma_up z`` with sigma_up = min(1, eta) sigma_1."""
    down, up = _ancestral_sigmas(math.inf, sn, st.opts.eta_value)
    std = st.opts.s_noise * up
    noise = st.draw(0, used=std != 0, sigma=math.inf, sigma_next=sn) if sn > 0 else None
    st.limit(down, std, noise, nxt)


def _sde_limit(st: _Step, sn: float, nxt: float | None) -> None:
    """Step 0 of the 2M / 3M SDE methods from sigma = inf (h = inf): e^(-eta h) = 0 unless eta = 0,
    so ``x_1 = D + sigma_1 u`` (eta = 0) or ``D + S_noise sigma_1 z``; no history."""
    eta = st.opts.eta_value
    std, noise = 0.0, None
    if eta:
        std = st.opts.s_noise * sn
        noise = st.draw(0, used=std != 0, sigma=math.inf, sigma_next=sn) if sn > 0 else None
    st.limit(sn if eta == 0 else 0.0, std, noise, nxt)


def _euler_ancestral(st: _Step) -> None:
    """x += (sigma_down - sigma) d, then + s_noise sigma_up eps (drawn whenever sigma_{i+1} > 0)."""
    opts = st.opts
    for i, s, sn, nxt in st.steps(_ancestral_limit):
        cs, co = st.evaluate(i, s)
        down, up = _ancestral_sigmas(s, sn, opts.eta_value)
        dt, std = down - s, opts.s_noise * up
        noise = st.draw(i, used=std != 0, sigma=s, sigma_next=sn) if sn > 0 else None
        # x + dt (x - D)/s = (1 + dt/s) x - (dt/s) D
        st.update(i, (cs, co), cx=1 + dt / s, cd=-dt / s, std=std, noise=noise, next_sigma=nxt)


def _dpm_2(st: _Step) -> None:
    """DPM-Solver-2 steps with EDM's churn: the midpoint sigma_mid = sqrt(sigma_hat sigma_{i+1})."""
    opts, sig, n = st.opts, st.sig, st.n
    gamma_max = min(opts.s_churn / n, math.sqrt(2) - 1)
    hats, stds = [], []
    for s in sig[:-1]:
        gamma = gamma_max if opts.s_tmin <= s <= opts.s_tmax and not math.isinf(s) else 0.0
        hats.append(s * (gamma + 1))
        stds.append(opts.s_noise * math.sqrt(max(hats[-1] ** 2 - s**2, 0.0)) if gamma > 0 else 0.0)
    draws = opts.s_churn > 0 or st.shape.draw_always

    def churn(i: int) -> tuple[float, int | None]:
        """Step i's churn (std, draw): drawn on every step when drawing at all, as k-diffusion."""
        if i >= n or not draws:
            return 0.0, None
        return stds[i], st.draw(i, used=stds[i] != 0, sigma=sig[i], sigma_next=hats[i])

    def limit(st: _Step, sn: float, nxt: float | None) -> None:
        std, d = churn(1)
        st.limit(sn, std, d, nxt)

    std0, d0 = churn(0)
    st.start(hats[0], std0, d0 if std0 else None)
    for i, _, sn, nxt in st.steps(limit, evals=hats, start=False):
        sh = hats[i]
        cs, co = st.evaluate(i, sh, sigma_hat=sh)
        if sn == 0:  # Euler to 0
            std, d = churn(i + 1)
            st.update(i, (cs, co), cx=sn / sh, cd=1 - sn / sh, std=std, noise=d, next_sigma=nxt)
            continue
        mid = math.exp(0.5 * (math.log(sh) + math.log(sn)))
        st.update(i, (cs, co), cx=1 + (mid - sh) / sh, cd=-(mid - sh) / sh, out=1, next_sigma=mid)
        cs2, co2 = st.evaluate(i, mid, callback=False)
        std, d = churn(i + 1)
        st.midpoint_step(i, (cs2, co2), (sn - sh) / mid, std, d, nxt)


def _dpm_2_ancestral(st: _Step) -> None:
    """DPM-Solver-2 down to sigma_down, then + s_noise sigma_up eps (Euler when sigma_down = 0)."""
    opts = st.opts
    for i, s, sn, nxt in st.steps(_ancestral_limit):
        cs, co = st.evaluate(i, s)
        down, up = _ancestral_sigmas(s, sn, opts.eta_value)
        if down == 0:  # Euler, no noise
            st.update(i, (cs, co), cx=down / s, cd=1 - down / s, next_sigma=nxt)
            continue
        mid = math.exp(0.5 * (math.log(s) + math.log(down)))
        st.update(i, (cs, co), cx=1 + (mid - s) / s, cd=-(mid - s) / s, out=1, next_sigma=mid)
        cs2, co2 = st.evaluate(i, mid, callback=False)
        std = opts.s_noise * up
        d = st.draw(i, used=std != 0, sigma=s, sigma_next=sn)
        st.midpoint_step(i, (cs2, co2), (down - s) / mid, std, d, nxt)


# Gauss-Legendre with 3 nodes integrates polynomials up to degree 5 exactly; LMS's basis
# polynomials have degree order - 1 <= 3.
_GL_NODES, _GL_WEIGHTS = (v.tolist() for v in np.polynomial.legendre.leggauss(3))


def lms_coefficients(sig: list[float], i: int, order: int) -> list[float]:
    """w_j = integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node
    sigma_{i-j} on the nodes sigma_i, ..., sigma_{i-order+1} (exact: Gauss-Legendre quadrature)."""
    nodes = [sig[i - k] for k in range(order)]
    lo, hi = sig[i], sig[i + 1]
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    taus = [mid + half * x for x in _GL_NODES]
    out = []
    for j in range(order):
        total = 0.0
        for tau, wq in zip(taus, _GL_WEIGHTS, strict=True):
            basis = 1.0
            for k in range(order):
                if k != j:
                    basis *= (tau - nodes[k]) / (nodes[j] - nodes[k])
            total += wq * basis
        out.append(half * total)
    return out


def _lms(st: _Step) -> None:
    """Linear multistep on d: x += sum_j w_j d_{i-j}; d_i goes to a ring of order - 1 slots (written
    over d_{i-order+1}, which the same pass reads first). A node at infinity drops out of every
    later basis: after a sigma = inf start the method starts afresh."""
    order = st.opts.order_value
    ring = max(order - 1, 1)
    slot = lambda i: 1 + i % ring  # noqa: E731
    for i, s, _, nxt in st.steps(_ode_limit):
        cs, co = st.evaluate(i, s)
        cur = min(i - st.first + 1, order)
        w = lms_coefficients(st.sig, i, cur)
        keep = order > 1 and nxt is not None
        hist = tuple((slot(i - j), w[j]) for j in range(1, cur))
        st.update(
            i, (cs, co), cx=1 + w[0] / s, cd=-w[0] / s, hist=hist, hist_out=slot(i) if keep else None,
            d_out=((1 - cs) / s, -co / s) if keep else None, next_sigma=nxt,
        )  # fmt: skip


def _dpmpp_2s_ancestral(st: _Step) -> None:
    """DPM-Solver++(2S) down to sigma_down (midpoint in log sigma), then + s_noise sigma_up eps."""
    opts = st.opts
    for i, s, sn, nxt in st.steps(_ancestral_limit):
        cs, co = st.evaluate(i, s)
        down, up = _ancestral_sigmas(s, sn, opts.eta_value)
        std = opts.s_noise * up
        if down == 0:  # Euler
            d = st.draw(i, used=std != 0, sigma=s, sigma_next=sn) if sn > 0 else None
            st.update(i, (cs, co), cx=down / s, cd=1 - down / s, std=std, noise=d, next_sigma=nxt)
            continue
        h = math.log(s) - math.log(down)
        mid = s * math.exp(-h / 2)
        st.update(i, (cs, co), cx=math.exp(-h / 2), cd=-math.expm1(-h / 2), out=1, next_sigma=mid)
        cs2, co2 = st.evaluate(i, mid, callback=False)
        d = st.draw(i, used=std != 0, sigma=s, sigma_next=sn) if sn > 0 else None
        m = -math.expm1(-h)
        # (down / s) x + m (c_skip2 x_2 + c_out2 F2), x_2 in slot 1
        st.update(i, (0.0, co2), cx=down / s, cd=m, hist=((1, m * cs2),), std=std, noise=d, next_sigma=nxt)


def _dpmpp_sde(st: _Step) -> None:
    """DPM-Solver++ (stochastic, 2 evaluations): an ancestral step to the intermediate point
    s = t + r h (noise stage 0), then the full step with D_d = (1 - 1/(2r)) D + 1/(2r) D_2 (stage 1)."""
    opts = st.opts
    eta, fac, r = opts.eta_value, 1 / (2 * opts.r_value), opts.r_value
    for i, s, sn, nxt in st.steps(_ancestral_limit):
        cs, co = st.evaluate(i, s)
        if sn == 0:  # Euler to 0: x = D
            st.update(i, (cs, co), cx=0.0, cd=1.0, next_sigma=nxt)
            continue
        mid = s * math.exp(-(math.log(s) - math.log(sn)) * r)  # sigma at t + r h
        down1, up1 = _ancestral_sigmas(s, mid, eta)
        ratio1, w1 = _ratio_and_weight(down1, s)
        std1 = opts.s_noise * up1
        d1 = st.draw(i, 0, used=std1 != 0, sigma=s, sigma_next=mid)
        # x_2 = ratio1 x + w1 D (+ noise) -> slot 1; D itself -> slot 2 for the full step
        st.update(
            i, (cs, co), cx=ratio1, cd=w1, out=1, hist_out=2, d_out=(cs, co), std=std1, noise=d1,
            next_sigma=mid,
        )  # fmt: skip
        cs2, co2 = st.evaluate(i, mid, callback=False)
        down2, up2 = _ancestral_sigmas(s, sn, eta)
        ratio2, w2 = _ratio_and_weight(down2, s)
        std2 = opts.s_noise * up2
        d2 = st.draw(i, 1, used=std2 != 0, sigma=s, sigma_next=sn)
        # ratio2 x + w2 ((1 - fac) D + fac (c_skip2 x_2 + c_out2 F2))
        st.update(
            i, (0.0, co2), cx=ratio2, cd=w2 * fac, hist=((1, w2 * fac * cs2), (2, w2 * (1 - fac))),
            std=std2, noise=d2, next_sigma=nxt,
        )  # fmt: skip


def _dpmpp_2m(st: _Step) -> None:
    """DPM-Solver++(2M): D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h_i (first order on the
    first step and into sigma = 0); D_i is kept in slot 1 for the next step (h_{-1} = inf after a
    sigma = inf start: the correction vanishes, as with no history)."""
    sig = st.sig
    for i, s, sn, nxt in st.steps(_ode_limit):
        cs, co = st.evaluate(i, s)
        ratio, m = _ratio_and_weight(sn, s)
        keep: dict[str, Any] = dict(hist_out=1, d_out=(cs, co)) if nxt is not None else {}
        if i == st.first or sn == 0:
            st.update(i, (cs, co), cx=ratio, cd=m, next_sigma=nxt, **keep)
            continue
        r = (math.log(sig[i - 1]) - math.log(s)) / (math.log(s) - math.log(sn))
        st.update(
            i, (cs, co), cx=ratio, cd=m * (1 + 1 / (2 * r)), hist=((1, -m / (2 * r)),), next_sigma=nxt, **keep
        )


def _dpmpp_2m_sde(st: _Step) -> None:
    """DPM-Solver++(2M) SDE (midpoint or heun correction), noise sigma_{i+1} sqrt(1 - e^{-2 eta h})."""
    opts = st.opts
    eta, heun = opts.eta_value, opts.solver_type_value == "heun"
    h_last = None
    for i, s, sn, nxt in st.steps(_sde_limit):
        cs, co = st.evaluate(i, s)
        if sn == 0:  # denoising step: x = D
            st.update(i, (cs, co), cx=0.0, cd=1.0, next_sigma=nxt)
            continue
        h = math.log(s) - math.log(sn)
        eta_h = eta * h
        m = -math.expm1(-h - eta_h)
        cd, hist = m, cast(tuple[tuple[int, float], ...], ())
        if h_last is not None:
            c = (m / (-h - eta_h) + 1) / (h_last / h) if heun else 0.5 * m / (h_last / h)
            cd, hist = m + c, ((1, -c),)
        std, d = st.sde_noise(i, s, sn, eta * h)
        keep: dict[str, Any] = dict(hist_out=1, d_out=(cs, co)) if nxt is not None else {}
        st.update(
            i,
            (cs, co),
            cx=sn / s * math.exp(-eta_h),
            cd=cd,
            hist=hist,
            std=std,
            noise=d,
            next_sigma=nxt,
            **keep,
        )
        h_last = h


def _dpmpp_3m_sde(st: _Step) -> None:
    """DPM-Solver++(3M) SDE: second and third differences of D over the last three steps; D_i goes to
    a ring of two slots (written over D_{i-2}, which the same pass reads first)."""
    eta = st.opts.eta_value
    slot = lambda i: 1 + i % 2  # noqa: E731
    h_1 = h_2 = h = None
    for i, s, sn, nxt in st.steps(_sde_limit):
        cs, co = st.evaluate(i, s)
        if sn == 0:  # denoising step: x = D
            st.update(i, (cs, co), cx=0.0, cd=1.0, next_sigma=nxt)
        else:
            h = math.log(s) - math.log(sn)
            h_eta = h * (eta + 1)
            cd = -math.expm1(-h_eta)
            hist: tuple[tuple[int, float], ...] = ()
            phi2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and h_1 is not None:
                r0, r1 = h_1 / h, h_2 / h
                # phi2 d1 - phi3 d2 with d1_0 = (D - D1)/r0, d1_1 = (D1 - D2)/r1,
                # d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1), d2 = (d1_0 - d1_1)/(r0 + r1)
                phi3 = phi2 / h_eta - 0.5
                u = phi2 * r0 / (r0 + r1) - phi3 / (r0 + r1)
                cd += (phi2 + u) / r0
                hist = ((slot(i - 1), -(phi2 + u) / r0 - u / r1), (slot(i - 2), u / r1))
            elif h_1 is not None:
                r = h_1 / h
                cd += phi2 / r
                hist = ((slot(i - 1), -phi2 / r),)
            std, d = st.sde_noise(i, s, sn, h * eta)
            keep: dict[str, Any] = dict(hist_out=slot(i), d_out=(cs, co)) if nxt is not None else {}
            st.update(
                i, (cs, co), cx=math.exp(-h_eta), cd=cd, hist=hist, std=std, noise=d, next_sigma=nxt, **keep
            )
        h_1, h_2 = h, h_1


_K_SOLVERS = {
    "euler_ancestral": _euler_ancestral,
    "dpm_2": _dpm_2,
    "dpm_2_ancestral": _dpm_2_ancestral,
    "lms": _lms,
    "dpmpp_2s_ancestral": _dpmpp_2s_ancestral,
    "dpmpp_sde": _dpmpp_sde,
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_2m_sde": _dpmpp_2m_sde,
    "dpmpp_3m_sde": _dpmpp_3m_sde,
}
