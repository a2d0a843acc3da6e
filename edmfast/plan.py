"""Planning: (denoiser, sigmas, options) -> steps, evaluations and the fused passes' coefficient rows.

The only place where the schedule, the preconditioner and the solver are folded into numbers.
Everything is float64 on the host, vectorized over the whole schedule (one ``coefficients()``
call over every sigma the run evaluates, rows built with tensor ops), done once per distinct
(schedule, options) and cached: a repeated call costs a dictionary lookup.

Per Heun step the engine runs two passes (SPEC §3), each ``out = p x_hat + q x' + r F + std eps;
net = c out`` with a float32 row ``[p, q, r, std, c, 0, 0, 0]``:

* row 0: the start, ``x_hat_0 = sigma_0 noise + std_0 eps`` (the noise itself when sigma_0 = inf);
* row 1 + 2i (pass A): the Euler point x' (or the step's result when step i takes no correction);
* row 2 + 2i (pass B): ``x_{i+1}`` from x_hat, x' and F', already churned for step i + 1.

An `AblationOptions` plan (EDM's design space: time steps, sigma(t), scaling s(t)) fills the same
rows: its derivative ``d = (sigma'/sigma + s'/s) x - (sigma' s/sigma) D(x/s; sigma)`` is affine in
(x, F) too, and the churn's rescale s(t_hat)/s(t) folds into the pass ending the step before.
Each plan also carries per-step rows for ``D(x_hat)`` (``denoise``), run only for callbacks.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .layout import COEF_SIZE
from .options import SamplerOptions, resolve_sigmas

__all__ = [
    "AblationOptions",
    "Denoiser",
    "Plan",
    "PlanCache",
    "Preconditioner",
    "Step",
    "ablation_time_steps",
    "is_preconditioner",
    "make_plan",
]


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, **cond) -> x0 estimate`` shaped like x: the plain denoiser the engine accepts."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor: ...


@runtime_checkable
class Preconditioner(Protocol):
    """A denoiser ``D = c_skip x + c_out F(c_in x; c_noise)`` whose coefficients the engine fuses.

    ``coefficients`` maps a float64 sigma tensor [K] to four float64 tensors [K] (elementwise, so
    the whole schedule is one call); ``raw`` is F alone; ``dtype`` the network's input dtype.
    """

    dtype: torch.dtype

    def coefficients(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, **cond: Any) -> torch.Tensor: ...


def is_preconditioner(denoiser: Any) -> bool:
    """True when the engine folds ``denoiser``'s coefficients into its passes and calls ``raw``."""
    return callable(getattr(denoiser, "coefficients", None)) and callable(getattr(denoiser, "raw", None))


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


F32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class Plan:
    """Everything the loop needs for one (schedule, options): float64-derived, float32 rows."""

    steps: list[Step]
    coef: torch.Tensor  # float32 CPU [1 + 2N, COEF_SIZE]
    sigma_in: torch.Tensor  # float32 CPU [2N]: per evaluation, c_noise (preconditioner) or sigma
    noise_steps: tuple[bool, ...]  # which steps inject churn noise (std > 0)
    correct: tuple[bool, ...]  # which steps take the correction (two evaluations)
    structure: tuple  # what a captured graph depends on besides tensor values
    denoise: torch.Tensor | None = None  # float32 CPU [N, COEF_SIZE]: rows giving D(x_hat) from F
    kind: tuple = ()  # ("ablation",) for a design-space plan
    _dev: dict = field(default_factory=dict, repr=False)  # per-device copies (see `rows`)

    @property
    def n(self) -> int:
        return len(self.steps)

    def rows(self, device: torch.device) -> list[torch.Tensor]:
        """``coef`` on ``device``, as a list of row views [1 + 2N] (copied once per device)."""
        key = ("coef", device)
        got = self._dev.get(key)
        if got is None:
            t = _to_device(self.coef, device)
            got = self._dev[key] = (t, list(t.unbind(0)))
        return got[1]

    def denoise_rows(self, device: torch.device) -> list[torch.Tensor]:
        """Per step, the row of ``D(x_hat) = p x_hat + r F`` (for callbacks), on ``device``."""
        key = ("denoise", device)
        got = self._dev.get(key)
        if got is None:
            assert self.denoise is not None
            t = _to_device(self.denoise, device)
            got = self._dev[key] = (t, list(t.unbind(0)))
        return got[1]

    def coef_on(self, device: torch.device) -> torch.Tensor:
        self.rows(device)
        return self._dev[("coef", device)][0]

    def sigma_rows(self, device: torch.device, rows: int) -> list[torch.Tensor]:
        """Per evaluation, the [rows] float32 sigma / c_noise tensor handed to the network."""
        key = ("sigma", device, rows)
        got = self._dev.get(key)
        if got is None:
            with torch.inference_mode(False):
                table = self.sigma_in.reshape(-1, 1).expand(-1, rows).contiguous()
            t = _to_device(table, device)
            got = self._dev[key] = (t, list(t.unbind(0)))
        return got[1]

    def sigma_on(self, device: torch.device, rows: int) -> torch.Tensor:
        self.sigma_rows(device, rows)
        return self._dev[("sigma", device, rows)][0]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of host table ``t`` on ``device`` that is never an inference tensor (usable inside and
    outside inference mode). To CUDA through pinned memory, asynchronously: no host sync (the
    pinned source lives until the stream has read it: the caching host allocator records it)."""
    with torch.inference_mode(False):
        if device.type == "cpu":
            return t if not t.is_inference() else t.clone()
        return t.pin_memory().to(device, non_blocking=True)


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


def _ablation_plan(denoiser: Any, opts: SamplerOptions, ab: AblationOptions) -> Plan:
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
    return _finish(rows, sigma_in, den, sch, noise_on, cor, opts, ("ablation",))


def make_plan(
    denoiser: Any, sigmas: torch.Tensor | None, opts: SamplerOptions, ablation: AblationOptions | None = None
) -> Plan:
    """Fold the schedule, the preconditioner and the solver into per-pass coefficient rows.

    With ``ablation`` the time steps, sigma(t) and s(t) come from it and ``sigmas`` is unused."""
    if ablation is not None:
        return _ablation_plan(denoiser, opts, ablation)
    assert sigmas is not None
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
    return _finish(rows, sigma_in, den, sch, noise_on, cor, opts, ())


def _finish(rows, sigma_in, den, sch: _Schedule, noise_on, cor, opts: SamplerOptions, kind: tuple) -> Plan:
    coef32, sigma32 = rows.to(torch.float32), sigma_in.to(torch.float32)
    _check_representable(rows, coef32, sigma_in, sigma32, sch, opts)
    steps = sch.steps()
    noise_steps = tuple(noise_on.tolist())
    correct = tuple(cor.tolist())
    structure = (len(steps), noise_steps, correct, sch.inf_start, opts.solver, opts.noise_mode)
    return Plan(steps, coef32, sigma32, noise_steps, correct, structure, den.to(torch.float32), kind)


def _check_representable(rows, coef32, sigma_in, sigma32, sch: _Schedule, opts: SamplerOptions) -> None:
    """The float32 kernels must be able to represent the plan; otherwise name what overflows.

    A coefficient that is inf in float32 (sigma 1e39, sigma 1e-310 for a plain denoiser, s_noise
    1e308) would make the run non-finite and the denoiser would be blamed for it.
    """
    bad_rows = ~(torch.isfinite(rows).all(dim=1) & torch.isfinite(coef32).all(dim=1))
    bad_evals = ~(torch.isfinite(sigma_in) & torch.isfinite(sigma32))
    if not (bool(bad_rows.any()) or bool(bad_evals.any())):
        return
    if bool(bad_rows.any()):
        r = int(bad_rows.nonzero()[0, 0])
        step = max(r - 1, 0) // 2
        col = int((~(torch.isfinite(rows[r]) & torch.isfinite(coef32[r]))).nonzero()[0, 0])
    else:
        step, col = int(bad_evals.nonzero()[0, 0]) // 2, -1
    sigma = float(sch.sigma[step]) if step < sch.sigma.numel() else float("nan")
    what = (
        "the churn noise std overflows float32: lower s_noise / s_churn"
        if col == 3 and opts.s_noise > 1
        else "the noise levels are outside what the float32 kernels represent: check sigmas "
        "(or sigma_min / sigma_max)"
    )
    raise ValueError(
        f"the sampling plan is not representable in float32 at step {step} (sigma={sigma:g}): {what}"
    )


def _sigmas_key(sigmas: Any) -> Any:
    """A hashable key for a user schedule's values, or None when it cannot be keyed cheaply."""
    if sigmas is None:
        return ("default",)
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1 or sigmas.numel() > 100_000 or not sigmas.is_floating_point():
            return None
        return ("t", tuple(sigmas.detach().to("cpu", torch.float64).tolist()))
    if isinstance(sigmas, (list, tuple)) and all(
        isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)) for v in sigmas
    ):
        return ("s", tuple(float(v) for v in sigmas))
    return None


_SCALARS = frozenset((int, float, str, bool))


def _settings(denoiser: Any) -> tuple:
    """The denoiser's scalar attributes (sigma_data, sigma_min, M, prediction_type, ...): a plan
    made before one of them was reassigned is not reused. Tensors changed in place are not seen."""
    attrs = getattr(denoiser, "__dict__", None)
    if not attrs:
        return ()
    return tuple([(k, v) for k, v in attrs.items() if v.__class__ in _SCALARS])


class PlanCache:
    """A small LRU of plans for one denoiser (the caller's, not held here), keyed by the schedule's
    values and the options.

    A denoiser's scalar settings are part of the key; its coefficient tables (tensors) are assumed
    fixed while it is used for sampling. Thread-safe.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def get(
        self, denoiser: Any, sigmas: Any, opts: SamplerOptions, ablation: AblationOptions | None = None
    ) -> Plan:
        skey = ("ablation",) if ablation is not None else _sigmas_key(sigmas)
        key = None if skey is None else (skey, opts, _settings(denoiser), ablation)
        if key is not None:
            with self._lock:
                plan = self._plans.get(key)
                if plan is not None:
                    self._plans.move_to_end(key)
                    return plan
        if ablation is not None:
            plan = make_plan(denoiser, None, opts, ablation)
        else:
            plan = make_plan(denoiser, resolve_sigmas(denoiser, sigmas, opts), opts)
        if key is not None:
            with self._lock:
                self._plans[key] = plan
                while len(self._plans) > self.size:
                    self._plans.popitem(last=False)
        return plan
