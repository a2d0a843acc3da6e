"""`edmfast.reference.sample` for k-diffusion's samplers: equal to the real k-diffusion in float64,
convergent at the solvers' orders on the exact Gaussian oracle, the right distribution with noise,
and independent of the engine's planning; `reference.sample_ancestral` against diffusers' DDIM.

k-diffusion's ``sampling.py`` is loaded by path (its package ``__init__`` needs torchvision), as in
tests/test_k_diffusion.py, so the code compared against is k-diffusion's own.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edmfast
from edmfast import reference
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser, GaussianMixtureDenoiser
from edmfast.philox import philox_normal
from edmfast.schedules import ddpm_betas, discrete_timesteps, karras_sigmas, space_timesteps
from tests.test_k_diffusion import _load_k_diffusion_sampling

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 2, 3, 3)
NOISE_SOLVERS = (
    "euler_ancestral",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
)
# float64 on both sides: the two implementations differ only in the order of rounding (~1e-15
# seen); 1e-12 leaves room and still fails on any formula difference (those are >= 1e-4 here)
TOL = 1e-12


@pytest.fixture(scope="module")
def kd():
    return _load_k_diffusion_sampling()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: with a second OpenMP thread each op waits on a barrier, which on a
    loaded 2-core machine cost ~10 ms per softmax (measured), 5000x the op itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mixture(seed: int = 0) -> GaussianMixtureDenoiser:
    """Curved paths: a 4-component mixture with s = 0.3 (softmax-weighted posterior means)."""
    g = torch.Generator().manual_seed(seed)
    return GaussianMixtureDenoiser(torch.randn(4, *SHAPE[1:], generator=g, dtype=torch.float64), s=0.3)


def _noise(seed: int = 1, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Stream:
    """A deterministic noise_sampler: call k returns draw k of a seeded float64 stream and records
    its arguments (the same instance kind is given to both sides)."""

    def __init__(self, shape=SHAPE, seed: int = 7):
        self.gen = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.args: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, sigma, sigma_next):
        self.args.append((sigma, sigma_next))
        return torch.randn(self.shape, generator=self.gen, dtype=torch.float64)


SCHEDULES = {
    "karras5": karras_sigmas(5, 0.002, 80.0),
    "karras12": karras_sigmas(12, 0.002, 80.0),
    "karras12-no-zero": karras_sigmas(12, 0.03, 20.0)[:-1],  # ends above 0: no final Euler step
}

CASES = [
    *[("euler_ancestral", dict(eta=eta, s_noise=1.3)) for eta in (0.0, 0.5, 1.0)],
    # eta = 3: sigma_up = sigma_next, sigma_down = 0 (k-diffusion's Euler fallback, no noise there)
    *[("dpm_2_ancestral", dict(eta=eta, s_noise=0.8)) for eta in (0.0, 0.5, 1.0, 3.0)],
    *[("dpmpp_2s_ancestral", dict(eta=eta, s_noise=1.1)) for eta in (0.0, 0.5, 1.0, 3.0)],
    *[("dpmpp_sde", dict(eta=eta, r=r, s_noise=0.9)) for eta in (0.0, 0.5, 1.0) for r in (0.5, 0.3)],
    ("dpmpp_2m", {}),
    *[
        ("dpmpp_2m_sde", dict(eta=eta, solver_type=st, s_noise=1.2))
        for eta in (0.0, 0.5, 1.0)
        for st in ("midpoint", "heun")
    ],
    *[("dpmpp_3m_sde", dict(eta=eta, s_noise=0.95)) for eta in (0.0, 0.5, 1.0)],
    *[("lms", dict(order=order)) for order in (1, 2, 3, 4)],
    ("dpm_2", {}),
]


def _case_id(case) -> str:
    solver, kw = case
    return ",".join([solver, *(f"{k}={v}" for k, v in kw.items())])


# ----------------------------------------------------------------------------- equal to k-diffusion


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_equals_k_diffusion_with_the_same_noise_sampler(kd, case, schedule):
    solver, kw = case
    sig, den, noise = SCHEDULES[schedule], _mixture(), _noise()
    theirs_ns, ours_ns = Stream(), Stream()
    extra = {"noise_sampler": theirs_ns} if solver in NOISE_SOLVERS else {}
    want = getattr(kd, f"sample_{solver}")(den, noise * sig[0], sig, disable=True, **kw, **extra)
    if solver in NOISE_SOLVERS:
        extra = {"noise_sampler": ours_ns}
    got = reference.sample(den, noise, sig, solver=solver, **kw, **extra)
    assert got.dtype == torch.float64 and _rel(got, want) < TOL
    # called where k-diffusion calls it, with its arguments (0-d float64 tensors)
    assert len(ours_ns.args) == len(theirs_ns.args)
    for (a, b), (c, d) in zip(ours_ns.args, theirs_ns.args, strict=True):
        assert a.dtype == b.dtype == torch.float64 and a.dim() == b.dim() == 0
        assert float(a) == pytest.approx(float(c), rel=1e-13) and float(b) == pytest.approx(
            float(d), rel=1e-13
        )


def test_the_comparison_can_fail(kd):
    """A sampler compared with another's k-diffusion twin is far off: the tolerance has teeth."""
    sig, den, noise = SCHEDULES["karras12"], _mixture(), _noise()
    want = kd.sample_dpmpp_2m(den, noise * sig[0], sig, disable=True)
    assert _rel(reference.sample(den, noise, sig, solver="lms", order=2), want) > 1e-4
    got = reference.sample(den, noise, sig, solver="dpmpp_2m_sde", eta=0.0, solver_type="heun")
    assert _rel(got, want) > 1e-4


@pytest.mark.parametrize(
    "case",
    [
        ("euler_ancestral", dict(eta=1.0)),
        ("euler_ancestral", dict(eta=0.0)),  # drawn and multiplied by 0, as k-diffusion does
        ("dpm_2_ancestral", dict(eta=0.7, s_noise=1.05)),
        ("dpm_2_ancestral", dict(eta=3.0)),  # no draw on the Euler fallback steps
        ("dpmpp_2s_ancestral", dict(eta=1.0)),
        ("dpm_2", dict(s_churn=8.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.007)),
        ("dpm_2", dict(s_churn=80.0)),  # gamma capped at sqrt(2) - 1
    ],
    ids=_case_id,
)
@pytest.mark.parametrize("schedule", ["karras5", "karras12"])
def test_equals_k_diffusion_with_the_default_noise_on_the_global_rng(kd, case, schedule):
    """k-diffusion's default noise is ``torch.randn_like(x)`` on the global RNG: seeded alike, the
    reference draws the same values at the same points (and as many: the RNG ends in one state)."""
    solver, kw = case
    sig, den, noise = SCHEDULES[schedule], _mixture(), _noise()
    torch.manual_seed(1234)
    want = getattr(kd, f"sample_{solver}")(den, noise * sig[0], sig, disable=True, **kw)
    state = torch.get_rng_state()
    torch.manual_seed(1234)
    got = reference.sample(den, noise, sig, solver=solver, **kw)
    assert _rel(got, want) < TOL
    assert torch.equal(torch.get_rng_state(), state)


def _cfg_rescale(cond: torch.Tensor, uncond: torch.Tensor, w: float, phi: float) -> torch.Tensor:
    """Lin et al. Eq. 14-16, per sample over the non-batch dims (unbiased stds)."""
    cfg = uncond + w * (cond - uncond)
    dims = tuple(range(1, cond.dim()))
    ratio = cond.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True)
    return phi * cfg * ratio + (1 - phi) * cfg


class _CondNet(torch.nn.Module):
    """F for EDMPrecond: the mixture's exact F plus a label-dependent nonlinear term (so cond and
    uncond differ and the guided, rescaled D is nonlinear in x)."""

    def __init__(self):
        super().__init__()
        self.inner = EDMNetworkOf(_mixture())

    def forward(self, x_in, c_noise, label):
        return self.inner(x_in, c_noise) + 0.3 * label.reshape(-1, 1, 1, 1) * torch.tanh(2 * x_in)


class _KModel:
    """The k-diffusion model a user would write around the same preconditioner: D = c_skip x +
    c_out CFG-rescale(F(c_in x; c_noise)) with cond and uncond in one batch of 2B."""

    def __init__(self, pre, w: float, phi: float):
        self.pre, self.w, self.phi = pre, w, phi

    def __call__(self, x, sigma, cond, uncond):
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.pre.coefficients(sigma))
        x_in = torch.cat([c_in * x] * 2).to(self.pre.dtype)
        f = self.pre.raw(x_in, torch.cat([c_noise.reshape(-1)] * 2).float(), label=torch.cat([cond, uncond]))
        fc, fu = f.double().chunk(2)
        return c_skip * x + c_out * _cfg_rescale(fc, fu, self.w, self.phi)


@pytest.mark.parametrize(
    "case",
    [
        ("dpmpp_2m", {}),
        ("dpmpp_2m_sde", dict(eta=0.6, solver_type="heun")),
        ("dpmpp_3m_sde", dict(eta=1.0)),
        ("dpmpp_sde", dict(r=0.3)),
        ("euler_ancestral", dict(eta=0.5)),
        ("lms", dict(order=3)),
        ("dpm_2", dict(s_churn=10.0, s_tmin=0.1, s_tmax=20.0)),
    ],
    ids=_case_id,
)
def test_preconditioner_with_cfg_rescale_equals_k_diffusion(kd, case):
    solver, kw = case
    pre = edmfast.EDMPrecond(_CondNet(), dtype=torch.float64)
    w, phi = 3.5, 0.7
    sig, noise = SCHEDULES["karras12"], _noise()
    lc, lu = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    extra = {"noise_sampler": Stream()} if solver in NOISE_SOLVERS else {}
    torch.manual_seed(5)
    want = getattr(kd, f"sample_{solver}")(
        _KModel(pre, w, phi), noise * sig[0], sig, extra_args={"cond": lc, "uncond": lu}, disable=True,
        **kw, **extra,
    )  # fmt: skip
    extra = {"noise_sampler": Stream()} if solver in NOISE_SOLVERS else {}
    torch.manual_seed(5)
    got = reference.sample(
        pre, noise, sig, solver=solver, cond={"label": lc}, uncond={"label": lu}, guidance_scale=w,
        guidance_rescale=phi, **kw, **extra,
    )  # fmt: skip
    assert _rel(got, want) < TOL
    # guidance and its rescale both matter here
    plain = reference.sample(pre, noise, sig, solver=solver, cond={"label": lc}, **kw, **extra)
    assert _rel(plain, want) > 1e-3


# ----------------------------------------------------------------------------- the noise contract


@pytest.mark.parametrize(
    "case",
    [
        ("euler_ancestral", dict(eta=0.8)),
        ("dpm_2_ancestral", {}),
        ("dpmpp_2s_ancestral", dict(s_noise=1.2)),
        ("dpmpp_sde", dict(r=0.4)),
        ("dpmpp_2m_sde", {}),
        ("dpmpp_3m_sde", dict(eta=0.5)),
        ("dpm_2", dict(s_churn=20.0)),
    ],
    ids=_case_id,
)
def test_fused_noise_is_the_philox_stream_of_seed_step_and_stage(case):
    """Fused mode = exact mode fed Philox (seeds[b], step i, stage j): stage 0 for a step's first
    draw, 1 for its second (dpmpp_sde's two per step); dpm_2's churn draws stage 0 on every
    churned step."""
    solver, kw = case
    sig, den, noise = SCHEDULES["karras12"], _mixture(), _noise()
    seeds = torch.tensor([3, 2**40 + 5, 11])
    fused = reference.sample(den, noise, sig, solver=solver, noise_mode="fused", seeds=seeds, **kw)
    numel = math.prod(SHAPE[1:])
    if solver == "dpm_2":
        # churn: every step of the schedule lies in [s_tmin, s_tmax] = [0, inf)
        calls = iter(range(len(sig) - 1))

        class Gen:  # a generator whose k-th draw is Philox (seeds, k, stage 0)
            def randn(self, shape, dtype, device):
                return philox_normal(seeds, next(calls), numel, dtype).reshape(shape)

        exact = reference.sample(den, noise, sig, solver=solver, generator=Gen(), **kw)
    else:
        per_step = 2 if solver == "dpmpp_sde" else 1
        count = iter(range(10**6))

        def philox(sigma, sigma_next):
            k = next(count)
            return philox_normal(seeds, k // per_step, numel, stage=k % per_step).reshape(SHAPE)

        exact = reference.sample(den, noise, sig, solver=solver, noise_sampler=philox, **kw)
    assert torch.equal(fused, exact)
    other = reference.sample(den, noise, sig, solver=solver, noise_mode="fused", seeds=seeds + 1, **kw)
    assert _rel(other, fused) > 1e-3  # the seeds matter


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_a_sample_depends_on_its_own_seed_only(solver, mode):
    # an elementwise denoiser: the mixture's matrix product rounds differently per batch size
    den, sig = GaussianDenoiser(0.2, 0.5), SCHEDULES["karras12"]
    seeds = [11, 2**40 + 3, 7]
    rng = edmfast.PerSampleGenerator(seeds)
    noise = rng.randn(SHAPE, dtype=torch.float64)
    full = reference.sample(den, noise, sig, solver=solver, generator=rng, noise_mode=mode)
    for b, seed in enumerate(seeds):
        one_rng = edmfast.PerSampleGenerator([seed])
        one_noise = one_rng.randn((1, *SHAPE[1:]), dtype=torch.float64)
        one = reference.sample(den, one_noise, sig, solver=solver, generator=one_rng, noise_mode=mode)
        assert torch.equal(one[0], full[b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_draws_are_in_the_noise_dtype(dtype):
    """k-diffusion draws ``randn_like(x)``: a generator gives the same draws as a noise_sampler
    that draws in noise's dtype from an identical generator (a float64 draw would differ)."""
    den, sig = _mixture(), SCHEDULES["karras12"]
    noise = _noise().to(dtype)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = reference.sample(den, noise, sig, solver="euler_ancestral", generator=g1)
    b = reference.sample(
        den, noise, sig, solver="euler_ancestral",
        noise_sampler=lambda s, sn: torch.randn(SHAPE, generator=g2, dtype=dtype),
    )  # fmt: skip
    assert a.dtype == dtype and torch.equal(a, b)
    g3 = torch.Generator().manual_seed(4)
    c = reference.sample(
        den, noise, sig, solver="euler_ancestral",
        noise_sampler=lambda s, sn: torch.randn(SHAPE, generator=g3, dtype=torch.float64),
    )  # fmt: skip
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "solver, kw, draws",
    [
        ("euler_ancestral", dict(eta=0.0), 11),  # every step into sigma > 0, also at eta = 0
        ("dpmpp_sde", dict(eta=0.0), 22),  # two per step, none into sigma = 0
        ("dpmpp_2m_sde", dict(eta=0.0), 0),  # k-diffusion skips the draw when eta = 0
        ("dpmpp_3m_sde", dict(eta=0.5), 11),
        ("dpm_2", dict(s_churn=5.0, s_tmin=10.0, s_tmax=20.0), 12),  # every step once s_churn > 0
        ("dpm_2", {}, 0),
        ("dpmpp_2m", {}, 0),
        ("lms", {}, 0),
    ],
)
def test_exact_mode_draws_where_k_diffusion_draws(solver, kw, draws):
    den, sig = _mixture(), SCHEDULES["karras12"]
    g = torch.Generator().manual_seed(9)
    reference.sample(den, _noise(), sig, solver=solver, generator=g, **kw)
    expect = torch.Generator().manual_seed(9)
    for _ in range(draws):
        torch.randn(SHAPE, generator=expect, dtype=torch.float64)
    assert torch.equal(g.get_state(), expect.get_state())


def test_sde_solvers_at_eta_0_are_their_ode_solvers():
    """DPM-Solver++ SDE variants at eta = 0 are the ODE solvers they extend; the ancestral ones are
    Euler / DPM-2 (the noise they still draw is multiplied by 0)."""
    den, noise = _mixture(), _noise()
    for sched in SCHEDULES.values():

        def run(solver, sched=sched, **kw):
            return reference.sample(den, noise, sched, solver=solver, **kw)

        assert _rel(run("euler_ancestral", eta=0.0), run("euler")) < TOL
        assert _rel(run("dpm_2_ancestral", eta=0.0), run("dpm_2")) < TOL
        assert _rel(run("dpmpp_2m_sde", eta=0.0), run("dpmpp_2m")) < TOL
        assert _rel(run("dpmpp_sde", eta=0.0), run("dpmpp_2s_ancestral", eta=0.0)) < TOL
        assert _rel(run("lms", order=1), run("euler")) < TOL


def test_noise_sampler_and_noise_option_errors():
    den, noise, sig = _mixture(), _noise(), SCHEDULES["karras5"]
    ns = Stream()
    with pytest.raises(ValueError, match="noise_sampler"):
        reference.sample(
            den, noise, sig, solver="dpmpp_2m_sde", noise_sampler=ns, noise_mode="fused", seeds=[1, 2, 3]
        )
    with pytest.raises(ValueError, match="noise_sampler"):
        reference.sample(den, noise, sig, solver="dpmpp_2m", noise_sampler=ns)
    with pytest.raises(ValueError, match="noise_sampler"):
        reference.sample(
            den, noise, sig, solver="euler_ancestral", noise_sampler=ns, generator=torch.Generator()
        )
    with pytest.raises(TypeError, match="noise_sampler"):
        reference.sample(den, noise, sig, solver="euler_ancestral", noise_sampler=3)
    with pytest.raises(ValueError, match="noise_sampler returned"):
        reference.sample(den, noise, sig, solver="euler_ancestral", noise_sampler=lambda a, b: torch.ones(2))
    with pytest.raises(ValueError, match="seeds"):
        reference.sample(den, noise, sig, solver="euler_ancestral", noise_mode="fused")
    # no noise to add: no seeds needed
    reference.sample(den, noise, sig, solver="euler_ancestral", eta=0.0, noise_mode="fused")
    reference.sample(den, noise, sig, solver="dpmpp_2m", noise_mode="fused")
    with pytest.raises(TypeError, match="callback"):
        reference.sample(den, noise, sig, solver="dpmpp_2m", callback=1)
    assert ns.args == []


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_sde", "lms", "dpm_2"])
def test_callback_reports_each_step_and_changes_nothing(kd, solver):
    den, noise, sig = _mixture(), _noise(), SCHEDULES["karras12"]
    kw = dict(s_churn=5.0) if solver == "dpm_2" else {}
    extra = {"noise_sampler": Stream()} if solver in NOISE_SOLVERS else {}
    ours: list[dict] = []
    torch.manual_seed(2)
    got = reference.sample(den, noise, sig, solver=solver, callback=ours.append, **kw, **extra)
    extra = {"noise_sampler": Stream()} if solver in NOISE_SOLVERS else {}
    theirs: list[dict] = []
    torch.manual_seed(2)
    getattr(kd, f"sample_{solver}")(
        den, noise * sig[0], sig, callback=theirs.append, disable=True, **kw, **extra
    )
    assert [c["i"] for c in ours] == list(range(len(sig) - 1))
    for a, b in zip(ours, theirs, strict=True):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(a["sigma"]) == float(b["sigma"])
        assert float(a["sigma_hat"]) == pytest.approx(float(b["sigma_hat"]), rel=1e-15)
        assert _rel(a["x"], b["x"]) < TOL and _rel(a["denoised"], b["denoised"]) < TOL
    extra = {"noise_sampler": Stream()} if solver in NOISE_SOLVERS else {}
    torch.manual_seed(2)
    assert torch.equal(reference.sample(den, noise, sig, solver=solver, **kw, **extra), got)


# ----------------------------------------------------------------------------- convergence


def _order(solver: str, ns: tuple[int, ...], **kw) -> float:
    """Least-squares slope of log RMS error vs log N against the exact ODE solution of Gaussian data,
    on Karras schedules ending at sigma_min (no final Euler step into 0)."""
    g = GaussianDenoiser(0.3, 0.5)
    noise = _noise(0, (16, 3, 4, 4))
    errs = []
    for n in ns:
        sig = karras_sigmas(n, 0.002, 80.0)[:-1]
        exact = g.ode_solution(noise * 80.0, 80.0, float(sig[-1]))
        out = reference.sample(g, noise, sig, solver=solver, **kw)
        errs.append(float((out - exact).pow(2).mean().sqrt()))
    return -float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


@pytest.mark.parametrize(
    "solver, kw, low, high",
    [
        # measured 2026-12-07 over N = 32, 64, 128: 0.99, 2.07, 2.12, 2.16, 2.00, 2.03, 2.07, 3.62, 2.78
        ("euler", {}, 0.9, 1.1),
        ("dpm_2", {}, 1.8, 2.4),
        ("dpmpp_2m", {}, 1.8, 2.4),
        ("dpmpp_2m_sde", dict(eta=0.0, solver_type="heun"), 1.8, 2.4),
        ("dpmpp_2s_ancestral", dict(eta=0.0), 1.8, 2.4),
        ("dpmpp_sde", dict(eta=0.0, r=0.3), 1.8, 2.4),
        ("heun", {}, 1.8, 2.4),
        ("lms", dict(order=4), 3.0, 4.5),
        ("lms", dict(order=3), 2.4, 3.5),
    ],
)
def test_deterministic_solvers_converge_at_their_order(solver, kw, low, high):
    order = _order(solver, (32, 64, 128), **kw)
    assert low < order < high, order


def test_dpmpp_3m_at_eta_0_converges():
    """k-diffusion's 3M starts with a first- and a second-order step; their local errors (O(h^2),
    O(h^3)) bound the global order by 2 unless their constants vanish. Measured slopes: 1.3 over
    N = 32-128 (pre-asymptotic: the error is not monotone there), 1.8 over 64-256, 1.9 over
    128-512; the error at N = 128 is 4x below dpmpp_2m's."""
    assert 1.6 < _order("dpmpp_3m_sde", (64, 128, 256), eta=0.0) < 2.5


@pytest.mark.parametrize(
    "solver, kw",
    [
        ("euler_ancestral", {}),
        ("dpm_2_ancestral", {}),
        ("dpmpp_2s_ancestral", {}),
        ("dpmpp_sde", {}),
        ("dpmpp_sde", dict(eta=0.5, r=0.3)),
        ("dpmpp_2m_sde", {}),
        ("dpmpp_2m_sde", dict(solver_type="heun")),
        ("dpmpp_3m_sde", {}),
        ("dpmpp_3m_sde", dict(eta=0.5)),
        ("dpm_2", dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0)),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_stochastic_solvers_give_the_data_distribution(solver, kw):
    """With the ideal denoiser of N(mu, s^2) the samples are N(mu, s^2). n = 16384 values: standard
    errors 0.0039 (mean) and 0.0028 (std); the bounds are ~5 of them plus the discretization bias
    at 256 steps (measured over 3 seeds: up to 0.013 on the std for the first-order
    euler_ancestral and dpmpp_sde at eta = 1, <= 0.003 for the others)."""
    mu, s = 0.7, 0.5
    g = GaussianDenoiser(mu, s)
    gen = torch.Generator().manual_seed(123)
    noise = torch.randn(2, 8, 32, 32, generator=gen, dtype=torch.float64)
    sig = karras_sigmas(256, 0.002, 80.0)
    out = reference.sample(g, noise, sig, solver=solver, generator=gen, **kw)
    assert abs(float(out.mean()) - mu) < 0.02
    assert abs(float(out.std()) - s) < 0.03
    # the noise changed the path: the deterministic solution is elsewhere
    det = g.ode_solution(noise * 80.0, 80.0, 0.0)
    assert float((out - det).abs().mean()) > 0.05


def test_mixture_paths_converge_to_a_fine_step_solution():
    """On the curved mixture paths every deterministic solver approaches one fine-step answer."""
    den = _mixture()
    noise = _noise(3, (8, *SHAPE[1:]))
    fine = reference.sample(den, noise, karras_sigmas(512, 0.002, 80.0), solver="lms", order=4)
    for solver, kw in [("dpmpp_2m", {}), ("dpm_2", {}), ("lms", dict(order=4)), ("heun", {})]:
        errs = [
            float(
                (reference.sample(den, noise, karras_sigmas(n, 0.002, 80.0), solver=solver, **kw) - fine)
                .abs()
                .max()
            )
            for n in (32, 128)
        ]
        assert errs[1] < errs[0] / 4 and errs[1] < 0.02, (solver, errs)


def test_lms_weights_are_adams_bashforth_on_a_uniform_grid():
    """Equally spaced nodes give the Adams-Bashforth weights h (55, -59, 37, -9) / 24 exactly."""
    h = -0.75
    nodes = [5.0 - 3 * h, 5.0 - 2 * h, 5.0 - h, 5.0]  # oldest first, sigma_i = 5
    w = reference._lms_weights(nodes, 5.0 + h)
    want = [h * c / 24 for c in (55, -59, 37, -9)]
    assert w == pytest.approx(want, rel=1e-13, abs=1e-15)
    assert reference._lms_weights([5.0], 4.0) == [-1.0]  # order 1: Euler


# ----------------------------------------------------------------------------- sigma_0 = inf


def _zero_snr_denoiser():
    from tests.test_precond import ExactVPModel

    betas = edmfast.rescale_zero_terminal_snr(
        torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    )
    abar = torch.cumprod(1 - betas, 0)
    return edmfast.DiscreteVPDenoiser(ExactVPModel(abar, "v_prediction"), abar, "v_prediction")


@pytest.mark.parametrize(
    "solver, kw",
    [
        ("dpm_2", {}),
        ("lms", {}),
        ("dpmpp_2m", {}),
        ("euler_ancestral", dict(eta=0.6)),
        ("dpm_2_ancestral", {}),
        ("dpmpp_2s_ancestral", dict(eta=0.3)),
        ("dpmpp_sde", {}),
        ("dpmpp_2m_sde", dict(eta=0.5)),
        ("dpmpp_2m_sde", dict(eta=0.0)),
        ("dpmpp_3m_sde", {}),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_zero_snr_start_takes_the_first_order_limit_step_and_leaves_no_history(solver, kw):
    """From sigma = inf: x_1 = D(eps; inf) + c eps + S_noise c' z (documented in `sample`), and the
    rest of the run is the same solver started afresh at sigma_1 from x_1."""
    den = _zero_snr_denoiser()
    sig = den.sigmas_for(edmfast.discrete_timesteps(8, 1000, "trailing"))
    assert math.isinf(float(sig[0]))
    noise = _noise(2, (2, 4, 3, 3))
    s1 = float(sig[1])
    eta = kw.get("eta", 1.0)
    z = _noise(8, noise.shape)
    extra = {"noise_sampler": lambda a, b: z} if solver in NOISE_SOLVERS else {}
    one = reference.sample(den, noise, sig[:2], solver=solver, **kw, **extra)
    d_inf = den.limit_coefficients()[1] * den.raw(noise.float(), torch.full((2,), 999.0)).double()
    if solver in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        keep, up = (s1, 0.0) if eta == 0 else (0.0, s1)
    elif solver in NOISE_SOLVERS:
        up = min(1.0, eta) * s1
        keep = math.sqrt(s1**2 - up**2)
    else:
        keep, up = s1, 0.0
    torch.testing.assert_close(one, d_inf + keep * noise + up * z, rtol=1e-12, atol=1e-12)
    # the remaining steps: the same solver from x_1 at sigma_1, no history carried over
    full = reference.sample(den, noise, sig, solver=solver, **kw, **extra)
    rest = reference.sample(den, one / s1, sig[1:], solver=solver, **kw, **extra)
    torch.testing.assert_close(full, rest, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(full).all()


@pytest.mark.parametrize("solver", ["dpmpp_2m", "lms", "dpm_2", "dpmpp_3m_sde"])
def test_zero_snr_start_converges_to_the_exact_ode_solution(solver):
    """The exact ODE solution from sigma = inf for N(0, 0.5^2) data is x(0) = 0.5 eps."""
    den = _zero_snr_denoiser()
    noise = _noise(4, (2, 4, 4, 4))
    kw = dict(eta=0.0) if solver == "dpmpp_3m_sde" else {}
    errs = []
    for n in (25, 100):
        sig = den.sigmas_for(edmfast.discrete_timesteps(n, 1000, "trailing"))
        errs.append(float((reference.sample(den, noise, sig, solver=solver, **kw) - 0.5 * noise).abs().max()))
    assert errs[1] < errs[0] / 3, errs


def test_zero_snr_start_needs_limit_coefficients():
    with pytest.raises(ValueError, match="limit_coefficients"):
        reference.sample(_mixture(), _noise(), [math.inf, 1.0, 0.0], solver="dpmpp_2m")


# ----------------------------------------------------------------------------- independence


def test_the_oracle_imports_no_planning_or_engine_module():
    code = (
        "import sys, edmfast.reference\n"
        "bad = [m for m in ('edmfast.plan', 'edmfast.ancestral', 'edmfast.sampler', 'edmfast.engine',\n"
        "       'edmfast.ops', 'edmfast.compile', 'edmfast.graphs', 'edmfast.native', 'edmfast.diffusers')\n"
        "       if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"edmfast.reference imported {out.stdout.strip()}"


def test_default_schedule_is_karras_over_the_denoisers_range_rounded():
    """sigmas=None: Karras over [max(sigma_min, den.sigma_min), min(sigma_max, den.sigma_max)],
    snapped by round_sigma; checked against an explicit schedule built the same way by hand."""
    pre = edmfast.iDDPMPrecond(lambda x, c: 0.5 * torch.sin(x) + 1e-3 * c.reshape(-1, 1, 1, 1), M=1000)
    lo, hi = max(0.002, pre.sigma_min), min(80.0, pre.sigma_max)
    want = karras_sigmas(9, lo, hi)
    want = torch.cat([pre.round_sigma(want[:-1]).double(), want[-1:]])
    noise = _noise()
    for solver in ("heun", "dpmpp_2m"):
        a = reference.sample(pre, noise, num_steps=9, solver=solver)
        b = reference.sample(pre, noise, want, solver=solver)
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- ancestral respacing, DDIM


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 61, 333, 1000])
def test_respacing_equals_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    s.set_timesteps(steps)
    # diffusers' trailing arange overshoots by one entry (t = -1) at S = 61: its first S agree
    assert reference._respaced(steps, 1000, spacing, 0) == s.timesteps.tolist()[:steps]


@pytest.mark.parametrize(
    "spacing", ["ddim10", "ddim50", "ddim250", "ddim1000", "10,15,20", "5", "4,0,3", "1,1,1", "250,250"]
)
def test_iddpm_respacing(spacing):
    """iDDPM's space_timesteps: the reference's own derivation agrees with edmfast.schedules'."""
    assert reference._respaced(0, 1000, spacing, 0) == space_timesteps(1000, spacing).tolist()


def test_iddpm_respacing_by_hand():
    assert reference._respaced(0, 10, "ddim5", 0) == [8, 6, 4, 2, 0]
    # sections of 4 and 3 (T = 7): 3 of [0..3] -> 0, 1.5 -> 2, 3; 2 of [4..6] -> 4, 6
    assert reference._respaced(0, 7, "3,2", 0) == [6, 4, 3, 2, 0]
    for bad in ("ddim٣", "ddim0", "ddim70", "5,a", "2,,1", "0,0", "60,60"):
        with pytest.raises(ValueError, match="spacing"):
            reference._respaced(0, 100, bad, 0)


def _ddim_model(x, t):
    """A parameter-free epsilon model evaluated in float64 (from the network's float32 input)."""
    x = x.double()
    return 0.7 * x + 0.4 * torch.sin(3 * x) + 0.02 * (t.double() / 1000).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_range", [1.0, 2.0])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_equals_diffusers_ddim_scheduler(prediction, clip_range, use_clipped, eta):
    """DDIMScheduler.step in float64 (its abar replaced by the float64 table) with clipping on,
    against the reference with clip_range and use_clipped_model_output."""
    diffusers = pytest.importorskip("diffusers")
    betas = ddpm_betas(1000, "linear")
    s = diffusers.DDIMScheduler(
        num_train_timesteps=1000, clip_sample=True, clip_sample_range=clip_range, prediction_type=prediction
    )
    s.alphas_cumprod = torch.cumprod(1 - betas, 0)
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(10)
    noise = _noise(5, (2, 3, 4, 4))
    g = torch.Generator().manual_seed(9)
    x = noise.clone()
    for t in s.timesteps:
        out = _ddim_model(x.float(), t.expand(2))
        x = s.step(out, t, x, eta=eta, use_clipped_model_output=use_clipped, generator=g).prev_sample
    got = reference.sample_ancestral(
        _ddim_model, noise, betas, num_steps=10, variance="fixed_small", eta=eta, prediction_type=prediction,
        clip_denoised=True, clip_range=clip_range, use_clipped_model_output=use_clipped,
        generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    assert _rel(got, x) < TOL
    # clipping is active here, so the two DDIM variants differ
    other = reference.sample_ancestral(
        _ddim_model, noise, betas, num_steps=10, variance="fixed_small", eta=eta, prediction_type=prediction,
        clip_denoised=True, clip_range=clip_range, use_clipped_model_output=not use_clipped,
        generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    assert _rel(other, x) > 1e-6


def test_ancestral_spacing_equals_explicit_timesteps():
    betas = ddpm_betas(1000, "cosine")
    noise = _noise(6, (2, 3, 4, 4))

    def run(timesteps=None, **kw):
        gen = torch.Generator().manual_seed(1)
        return reference.sample_ancestral(
            _ddim_model, noise, betas, timesteps, variance="fixed_large", generator=gen, **kw
        )

    for spacing in ("linspace", "leading", "trailing"):
        want = run(discrete_timesteps(17, 1000, spacing), num_steps=17)
        assert torch.equal(run(num_steps=17, spacing=spacing), want)
    assert torch.equal(run(spacing="ddim25"), run(space_timesteps(1000, "ddim25")))


def test_ancestral_zero_terminal_snr_start_is_refused_by_name():
    betas = edmfast.rescale_zero_terminal_snr(ddpm_betas(1000, "linear"))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        reference.sample_ancestral(_ddim_model, _noise(), betas, num_steps=10, spacing="trailing", eta=0.0)
