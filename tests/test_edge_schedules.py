"""Schedules at the edges of their arguments: stable where float64 can hold the result, a clear
ValueError/TypeError naming the argument where it cannot (issue 13, item 7)."""

import math
from decimal import Decimal, localcontext

import pytest
import torch

pytest.importorskip("hypothesis", reason="a property test here needs hypothesis (pip install hypothesis)")
from hypothesis import assume, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import edmfast  # noqa: E402
from edmfast.options import check_sigmas  # noqa: E402
from edmfast.schedules import iddpm_u, vp_betas_for_range, vp_sigma, vp_sigma_inv  # noqa: E402
from tests.conftest import BASE_SEED  # noqa: E402


def _assert_schedule(s: torch.Tensor, n: int) -> None:
    """What `check_sigmas` demands of a user schedule, plus the layout: float64 [N + 1], last 0."""
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert s[-1] == 0 and bool(torch.isfinite(s).all()) and bool((s[:-1] > 0).all())
    assert bool((s[1:] < s[:-1]).all())


def _karras_exact(n: int, lo: float, hi: float, rho: float) -> list[float]:
    """The Karras levels in 50-digit decimal arithmetic, from the weighted form
    ``((1 - t) hi^(1/rho) + t lo^(1/rho))^rho`` (no cancellation, so 50 digits are plenty even
    where hi^(1/rho) has 600000 decimal digits before the point)."""
    with localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 50, 10**9, -(10**9)
        d_lo, d_hi, d_rho = Decimal(lo), Decimal(hi), Decimal(rho)
        a, b = (d_hi.ln() / d_rho).exp(), (d_lo.ln() / d_rho).exp()
        out = []
        for i in range(n):
            t = Decimal(i) / Decimal(max(n - 1, 1))
            out.append(float(((a * (1 - t) + t * b).ln() * d_rho).exp()))
    return out


@pytest.mark.parametrize("rho", [0.001, 0.01, 0.29, 1.0, 7.0, 100.0])
@pytest.mark.parametrize("lo, hi", [(0.002, 80.0), (0.5, 1.0), (1e-300, 1e300)])
@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_karras_is_valid_and_accurate_for_any_rho_and_range(rho, lo, hi, n):
    s = edmfast.karras_sigmas(n, lo, hi, rho)
    _assert_schedule(s, n)
    exact = torch.tensor(_karras_exact(n, lo, hi, rho), dtype=torch.float64)
    # a few eps times |log(sigma / sigma_max)| (the exponent's rounding, amplified by exp), or the
    # official formula's eps * rho * (hi / lo)^(1/rho) where that is used (< 256 eps by design)
    bound = 64 * 2.0**-52 * max(1.0, math.log(hi / lo))
    rel = ((s[:-1] - exact) / exact).abs().max()
    assert rel <= bound, (float(rel), bound)
    assert s[0] == pytest.approx(hi, rel=1e-15)
    if n > 1:
        assert s[-2] == pytest.approx(lo, rel=1e-15)


def test_karras_small_rho_no_longer_collapses_to_zero():
    """rho < 0.29 lost every digit of sigma_min to ``hi + t (lo - hi)`` (gave [..., 39.4, 0, 0])."""
    for rho in (0.2, 0.1, 0.05):
        s = edmfast.karras_sigmas(18, 0.002, 80.0, rho)
        _assert_schedule(s, 18)
        assert s[-2] == pytest.approx(0.002, rel=1e-15)


def test_karras_default_is_the_official_formula_bitwise():
    """Where the official float64 expression is accurate (rho = 7), it is what we return."""
    for n, lo, hi in [(18, 0.002, 80.0), (256, 0.002, 80.0), (40, 0.03, 14.6)]:
        i = torch.arange(n, dtype=torch.float64)
        official = (hi ** (1 / 7) + i / (n - 1) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
        assert torch.equal(edmfast.karras_sigmas(n, lo, hi, 7.0)[:-1], official)


def test_karras_huge_sigma_max_and_tiny_rho_do_not_overflow():
    _assert_schedule(edmfast.karras_sigmas(18, sigma_max=1e300), 18)
    _assert_schedule(edmfast.karras_sigmas(18, rho=0.001, sigma_max=1e300), 18)
    _assert_schedule(edmfast.karras_sigmas(5, 5e-324, 1.7e308, 0.001), 5)


def test_karras_rejects_what_float64_cannot_hold_decreasing():
    # (1 - t)^1e-17 rounds to 1 for every t < 1: all but the last level equal sigma_max
    with pytest.raises(ValueError, match="rho"):
        edmfast.karras_sigmas(18, rho=1e-17)


@pytest.mark.parametrize("rho", [0.0, -1.0, math.nan, math.inf])
def test_karras_bad_rho_values(rho):
    with pytest.raises(ValueError, match="rho"):
        edmfast.karras_sigmas(10, rho=rho)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rho": "7"}, "rho"),
        ({"rho": True}, "rho"),
        ({"sigma_min": None}, "sigma_min"),
        ({"sigma_max": [1]}, "sigma_max"),
    ],
)
def test_karras_non_numeric_arguments(kwargs, name):
    with pytest.raises(TypeError, match=name):
        edmfast.karras_sigmas(10, **kwargs)


@pytest.mark.parametrize("fn", [edmfast.karras_sigmas, edmfast.ve_sigmas, edmfast.iddpm_sigmas])
def test_equal_range_ends_only_for_one_step(fn):
    with pytest.raises(ValueError, match="sigma_min == sigma_max"):
        fn(5, 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma_max"):
        fn(5, math.nan, 1.0)


def test_ve_squares_that_overflow_or_underflow():
    for lo, hi in [(0.02, 1e200), (1e-200, 1.0), (1e-300, 1e300)]:
        s = edmfast.ve_sigmas(9, lo, hi)
        _assert_schedule(s, 9)
        assert s[0] == hi and s[-2] == lo
        # geometric: log sigma is linear in i
        logs = s[:-1].log()
        torch.testing.assert_close(logs, torch.linspace(math.log(hi), math.log(lo), 9, dtype=torch.float64))


def test_vp_sigma_past_expm1_overflow_and_its_inverse():
    t = torch.tensor([0.5, 8.0, 10.0, 11.0], dtype=torch.float64)  # exponents 2.5 .. 1205
    s = vp_sigma(t)
    assert bool(torch.isfinite(s).all()) and bool((s[1:] > s[:-1]).all())
    e = 0.5 * 19.9 * t**2 + 0.1 * t
    torch.testing.assert_close(s.log(), 0.5 * e + 0.5 * torch.log(-torch.expm1(-e)), rtol=1e-14, atol=0)
    torch.testing.assert_close(vp_sigma_inv(s), t, rtol=1e-13, atol=0)


def test_vp_refit_over_a_huge_range():
    s = edmfast.vp_sigmas(12, sigma_min=0.002, sigma_max=1e200)
    _assert_schedule(s, 12)
    assert s[0] == pytest.approx(1e200, rel=1e-12) and s[-2] == pytest.approx(0.002, rel=1e-8)
    beta_d, beta_min = vp_betas_for_range(0.002, 1e200)
    assert math.isfinite(beta_d) and math.isfinite(beta_min)


def test_vp_refit_that_cannot_decrease_is_a_clear_error():
    # [0.5, 0.51] with eps_s = 0.5: the refit exponent is concave and peaks inside [eps_s, 1]
    with pytest.raises(ValueError, match="refitted"):
        edmfast.vp_sigmas(50, sigma_min=0.5, sigma_max=0.51, eps_s=0.5)


@pytest.mark.parametrize(
    "kwargs, err, name",
    [
        ({"eps_s": 0.0}, ValueError, "eps_s"),
        ({"eps_s": 1.5}, ValueError, "eps_s"),
        ({"beta_min": math.nan}, ValueError, "beta_min"),
        ({"beta_d": math.inf}, ValueError, "beta_d"),
        ({"beta_d": "19.9"}, TypeError, "beta_d"),
        ({"beta_min": -5.0}, ValueError, "beta_min"),  # sigma(t) imaginary near eps_s
    ],
)
def test_vp_bad_arguments(kwargs, err, name):
    with pytest.raises(err, match=name):
        edmfast.vp_sigmas(10, **kwargs)


def test_iddpm_levels_match_the_official_tensor_loop():
    """The Python-float recursion does the official loop's operations; torch's CPU float64 sqrt is
    not always correctly rounded, so the two agree to an ulp or two, not bitwise."""
    M, C1, C2 = 1000, 0.001, 0.008
    j = torch.arange(M + 1, dtype=torch.float64)
    abar = torch.sin(0.5 * math.pi * j / M / (C2 + 1)) ** 2
    u = torch.zeros(M + 1, dtype=torch.float64)
    for i in range(M, 0, -1):
        u[i - 1] = ((u[i] ** 2 + 1) / (abar[i - 1] / abar[i]).clamp(min=C1) - 1).sqrt()
    torch.testing.assert_close(iddpm_u(M, C1, C2), u, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "kwargs, err, name",
    [
        ({"C1": 0.0}, ValueError, "C1"),
        ({"C1": 1.0}, ValueError, "C1"),
        ({"C2": -0.5}, ValueError, "C2"),
        ({"C2": math.nan}, ValueError, "C2"),
        ({"C2": 1e300}, ValueError, "C2"),
        ({"M": 0}, ValueError, "M"),
        ({"M": 10.0}, TypeError, "M"),
    ],
)
def test_iddpm_bad_arguments(kwargs, err, name):
    with pytest.raises(err, match=name):
        edmfast.iddpm_sigmas(5, **kwargs)


def test_iddpm_more_steps_than_levels_is_an_error():
    u = iddpm_u()
    levels = int(((u >= 0.002) & (u <= 81.0)).sum())
    _assert_schedule(edmfast.iddpm_sigmas(levels), levels)
    with pytest.raises(ValueError, match="num_steps"):
        edmfast.iddpm_sigmas(levels + 1)  # would repeat a level


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 7, 333, 999, 1000])
def test_discrete_timesteps_always_in_range_and_decreasing(spacing, n):
    t = edmfast.discrete_timesteps(n, 1000, spacing)
    assert t.shape == (n,) and int(t.min()) >= 0 and int(t.max()) <= 999
    assert bool((t[1:] < t[:-1]).all())


def test_discrete_timesteps_bad_arguments():
    with pytest.raises(ValueError, match="steps_offset"):
        edmfast.discrete_timesteps(1000, 1000, "leading", steps_offset=1)  # 1000 is past the table
    with pytest.raises(ValueError, match="steps_offset"):
        edmfast.discrete_timesteps(10, 1000, "leading", steps_offset=-1)
    with pytest.raises(TypeError, match="steps_offset"):
        edmfast.discrete_timesteps(10, 1000, "leading", steps_offset=1.0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        edmfast.discrete_timesteps(1, 0)
    with pytest.raises(TypeError, match="num_train_timesteps"):
        edmfast.discrete_timesteps(10, 1000.0)
    assert edmfast.discrete_timesteps(10, 1000, "leading", steps_offset=99).tolist()[0] == 999


@pytest.mark.parametrize(
    "betas, match",
    [
        (torch.zeros(10, dtype=torch.float64), "last beta"),  # r_0 == r_T: 0/0
        (torch.full((10,), 0.02, dtype=torch.float64).index_fill(0, torch.tensor([9]), 0.0), "last beta"),
        (torch.full((10,), math.nan, dtype=torch.float64), "finite"),
        (torch.tensor([0.1, 1.0, 0.2], dtype=torch.float64), r"\[0, 1\)"),
        (torch.tensor([0.1, -0.1, 0.2], dtype=torch.float64), r"\[0, 1\)"),
        (torch.full((1000,), 0.9999, dtype=torch.float64), "underflows"),  # cumprod reaches 0 early
    ],
)
def test_rescale_zero_terminal_snr_rejects_degenerate_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        edmfast.rescale_zero_terminal_snr(betas)


def test_rescale_zero_terminal_snr_types_and_valid_edge_input():
    with pytest.raises(TypeError, match="floating"):
        edmfast.rescale_zero_terminal_snr(torch.ones(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="betas"):
        edmfast.rescale_zero_terminal_snr(["a", "b"])
    # zeros before the last step are fine (a flat stretch of abar), as is a beta_0 of 0
    betas = torch.tensor([0.0, 0.01, 0.0, 0.02, 0.05], dtype=torch.float64)
    out = edmfast.rescale_zero_terminal_snr(betas)
    assert bool(torch.isfinite(out).all()) and out[-1] == 1.0 and bool(((out >= 0) & (out <= 1)).all())


@seed(BASE_SEED)
@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 300),
    log_rho=st.floats(-3, 3),
    log_lo=st.floats(-300, 300),
    log_span=st.floats(1e-6, 300),
)
def test_karras_either_holds_the_user_schedule_checks_or_says_why(n, log_rho, log_lo, log_span):
    """Any rho in [1e-3, 1e3] and any range inside float64: a schedule `check_sigmas` accepts, with
    the exact ends, or a ValueError naming rho and the range (levels that round together)."""
    lo = 10.0**log_lo
    hi = min(lo * 10.0**log_span, 1e308)
    assume(hi > lo)
    try:
        s = edmfast.karras_sigmas(n, lo, hi, 10.0**log_rho)
    except ValueError as e:
        assert "rho" in str(e) and "range" in str(e) and "not strictly decreasing" in str(e)
        return
    _assert_schedule(s, n)
    assert torch.equal(check_sigmas(s), s)
    # exact ends from the log form, 256 eps from the official formula where it is used
    assert s[0] == pytest.approx(hi, rel=6e-14) and s[-2] == pytest.approx(lo if n > 1 else hi, rel=6e-14)
