"""Preconditioners at the edges: constructor arguments validated (issue 13, item 12), and the
planning calls vectorized (issue 12): one ``coefficients()`` / ``round_sigma()`` / ``sigma_to_t``
call over a whole float64 sigma vector equals per-sigma calls bitwise."""

import math

import pytest
import torch

import edmfast
from edmfast.schedules import iddpm_u


def _ident(x, c_noise, **_):
    return x


def _abar():
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def _zero_snr_abar():
    betas = edmfast.rescale_zero_terminal_snr(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    return torch.cumprod(1 - betas, 0)


def _plateau_abar():
    """A table diffusers can produce: abar_0 = 1 (beta_0 = 0) and a flat stretch (a zero beta)."""
    betas = torch.linspace(1e-4, 0.02, 200, dtype=torch.float64)
    betas[0], betas[50] = 0.0, 0.0
    return torch.cumprod(1 - betas, 0)


# --------------------------------------------------------------------------- constructor arguments


@pytest.mark.parametrize(
    "kwargs, err, name",
    [
        ({"sigma_data": 0.0}, ValueError, "sigma_data"),
        ({"sigma_data": -0.5}, ValueError, "sigma_data"),
        ({"sigma_data": math.nan}, ValueError, "sigma_data"),
        ({"sigma_data": math.inf}, ValueError, "sigma_data"),
        ({"sigma_data": "0.5"}, TypeError, "sigma_data"),
        ({"sigma_min": -1.0}, ValueError, "sigma_min"),
        ({"sigma_min": math.nan}, ValueError, "sigma_min"),
        ({"sigma_min": 2.0, "sigma_max": 1.0}, ValueError, "sigma_max"),
        ({"sigma_max": math.nan}, ValueError, "sigma_max"),
        ({"dtype": torch.int32}, TypeError, "dtype"),
        ({"dtype": "float16"}, TypeError, "dtype"),
    ],
)
def test_edm_precond_arguments(kwargs, err, name):
    with pytest.raises(err, match=name):
        edmfast.EDMPrecond(_ident, **kwargs)


@pytest.mark.parametrize(
    "kwargs, err, name",
    [
        ({"beta_d": 0.0}, ValueError, "beta_d"),
        ({"beta_d": -19.9}, ValueError, "beta_d"),
        ({"beta_d": math.nan}, ValueError, "beta_d"),
        ({"beta_min": math.inf}, ValueError, "beta_min"),
        ({"beta_min": -1.0}, ValueError, "beta_min"),  # sigma(epsilon_t) imaginary
        ({"epsilon_t": 0.0}, ValueError, "epsilon_t"),
        ({"epsilon_t": 1.0}, ValueError, "epsilon_t"),
        ({"M": 0}, ValueError, "M"),
        ({"M": 1000.0}, TypeError, "M"),
        ({"beta_d": 3000.0, "beta_min": 0.0}, ValueError, "sigma range"),  # sigma(1) = e^750: overflows
    ],
)
def test_vp_precond_arguments(kwargs, err, name):
    with pytest.raises(err, match=name):
        edmfast.VPPrecond(_ident, **kwargs)


def test_ve_and_iddpm_precond_arguments():
    with pytest.raises(ValueError, match="sigma_max"):
        edmfast.VEPrecond(_ident, sigma_min=100.0, sigma_max=0.02)
    with pytest.raises(ValueError, match="sigma_min"):
        edmfast.VEPrecond(_ident, sigma_min=-0.02)
    for kwargs, err, name in [
        ({"C1": 0.0}, ValueError, "C1"),
        ({"C1": 2.0}, ValueError, "C1"),
        ({"C2": -1.0}, ValueError, "C2"),
        ({"M": 1}, ValueError, "M"),
        ({"M": True}, TypeError, "M"),
    ]:
        with pytest.raises(err, match=name):
            edmfast.iDDPMPrecond(_ident, **kwargs)


@pytest.mark.parametrize(
    "table, err, match",
    [
        (_abar().flip(0), ValueError, "non-increasing"),  # the flipped table of issue 13
        (torch.cat([_abar()[:500], _abar()[600:], _abar()[500:600]]), ValueError, "non-increasing"),
        (_abar().index_fill(0, torch.tensor([500]), 0.0), ValueError, "only the last"),
        (_abar().index_fill(0, torch.tensor([3]), math.nan), ValueError, "finite"),
        (_abar() * 1.01, ValueError, r"\[0, 1\]"),
        (-_abar(), ValueError, r"\[0, 1\]"),
        (_abar().reshape(10, 100), ValueError, "1-D"),
        (_abar()[:1], ValueError, "1-D"),
        (torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), ValueError, "strictly between"),
        ("abc", TypeError, "alphas_cumprod"),
    ],
)
def test_discrete_vp_rejects_bad_alphas_cumprod(table, err, match):
    with pytest.raises(err, match=match):
        edmfast.DiscreteVPDenoiser(_ident, table)


def test_discrete_vp_accepts_what_diffusers_produces():
    """float32 tables, zero terminal SNR, abar_0 = 1 and flat stretches all give finite, monotone
    timesteps; sigma = 0 levels (abar = 1) are skipped by the interpolation."""
    for table in (_abar().float(), _zero_snr_abar(), _plateau_abar()):
        den = edmfast.DiscreteVPDenoiser(_ident, table, "v_prediction")
        sig = torch.logspace(-3, 3, 301, dtype=torch.float64)
        t = den.sigma_to_t(sig)
        assert bool(torch.isfinite(t).all()) and bool((t[1:] >= t[:-1]).all())
        assert 0 <= float(t.min()) and float(t.max()) <= den.num_train_timesteps - 1
    den = edmfast.DiscreteVPDenoiser(_ident, _plateau_abar())
    assert den.sigma_min == float(den.sigmas[1]) > 0  # the first positive level
    assert float(den.sigma_to_t(torch.tensor([den.sigma_min], dtype=torch.float64))) == 1.0
    # a flat stretch maps to its first timestep, and every integer level back to its own index
    inner = torch.arange(1, 200)
    t = den.sigma_to_t(den.sigmas[inner])
    assert t[49] == 49  # timestep 50 has timestep 49's sigma (beta_50 = 0): the first of the two
    same = den.sigmas[inner[:-1]] != den.sigmas[inner[1:]]
    assert torch.equal(t[1:][same], inner[1:][same].double())


def test_sigmas_for_rejects_float_timesteps():
    den = edmfast.DiscreteVPDenoiser(_ident, _abar())
    with pytest.raises(TypeError, match="timesteps"):
        den.sigmas_for(torch.tensor([999.5, 0.0]))
    with pytest.raises(ValueError, match="timesteps"):
        den.sigmas_for([1000])
    assert torch.equal(den.sigmas_for(torch.tensor([999, 0], dtype=torch.int32)), den.sigmas_for([999, 0]))


# --------------------------------------------------------------------------- vectorized planning


def _denoisers():
    return {
        "edm": edmfast.EDMPrecond(_ident),
        "vp": edmfast.VPPrecond(_ident),
        "ve": edmfast.VEPrecond(_ident),
        "iddpm": edmfast.iDDPMPrecond(_ident),
        "dvp_eps": edmfast.DiscreteVPDenoiser(_ident, _abar()),
        "dvp_v": edmfast.DiscreteVPDenoiser(_ident, _abar(), "v_prediction"),
        "dvp_x0_zero_snr": edmfast.DiscreteVPDenoiser(_ident, _zero_snr_abar(), "sample"),
        "dvp_plateau": edmfast.DiscreteVPDenoiser(_ident, _plateau_abar(), "v_prediction"),
    }


def _plan_sigmas(den) -> torch.Tensor:
    """2 * 256 + 1 planning sigmas: a schedule, its churned and its midpoint levels, the table's
    own levels and the points halfway between them, and values past both ends."""
    g = torch.Generator().manual_seed(0)
    s = edmfast.karras_sigmas(256, 0.002, 80.0)[:-1]
    parts = [s, s * 1.0123, (s[1:] + s[:-1]) / 2]
    table = getattr(den, "_u_host", None)
    if table is None:
        table = getattr(den, "_sigmas_host", None)
    if table is not None:
        levels = table[torch.isfinite(table) & (table > 0)]
        parts += [levels, (levels[1:] + levels[:-1]) / 2]
    parts.append(torch.tensor([1e-6, 1e4], dtype=torch.float64))
    v = torch.cat(parts)
    return v[torch.randperm(v.numel(), generator=g)[: 2 * 256 + 1]]


@pytest.mark.parametrize("name", list(_denoisers()))
def test_vectorized_coefficients_equal_per_sigma_calls_bitwise(name):
    den = _denoisers()[name]
    sig = _plan_sigmas(den)
    assert sig.numel() == 513
    vec = den.coefficients(sig)
    assert len(vec) == 4
    for c in vec:
        assert c.dtype == torch.float64 and c.shape == sig.shape and c.device.type == "cpu"
    one = [den.coefficients(sig[i : i + 1]) for i in range(sig.numel())]
    for k in range(4):
        elementwise = torch.cat([o[k] for o in one])
        assert torch.equal(vec[k], elementwise), (name, k)
    rounded = den.round_sigma(sig)
    assert torch.equal(rounded, torch.cat([den.round_sigma(sig[i : i + 1]) for i in range(sig.numel())]))
    if hasattr(den, "sigma_to_t"):
        t = den.sigma_to_t(sig)
        assert torch.equal(t, torch.cat([den.sigma_to_t(sig[i : i + 1]) for i in range(sig.numel())]))


def test_iddpm_nearest_level_equals_the_dense_argmin():
    """The bisection + two-neighbour search picks what argmin over all M + 1 distances picks,
    ties (exact midpoints) included: the first, larger level."""
    p = edmfast.iDDPMPrecond(_ident)
    u = iddpm_u()
    mids = (u[1:] + u[:-1]) / 2
    g = torch.Generator().manual_seed(1)
    sig = torch.cat(
        [
            u,
            mids,
            torch.nextafter(mids, torch.zeros_like(mids)),
            torch.nextafter(mids, torch.full_like(mids, math.inf)),
            torch.rand(2000, generator=g, dtype=torch.float64) * 200,
            torch.tensor([-1.0, 0.0, 1e-300, 1e300, math.inf], dtype=torch.float64),
        ]
    )
    dense = (sig.reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(dim=1)
    assert torch.equal(p._index(sig), dense)
    assert torch.equal(p.round_sigma(sig), u[dense])
    assert torch.equal(p.coefficients(sig)[3], (999 - dense).double())
    # the shape of the input is kept
    assert p.round_sigma(sig[:12].reshape(3, 4)).shape == (3, 4)


def test_sigma_to_t_keeps_shape_and_maps_inf_to_the_last_timestep():
    den = edmfast.DiscreteVPDenoiser(_ident, _zero_snr_abar(), "v_prediction")
    sig = torch.tensor([[math.inf, 1.0], [0.5, 1e-9]], dtype=torch.float64)
    t = den.sigma_to_t(sig)
    assert t.shape == (2, 2) and t[0, 0] == 999 and t[1, 1] == 0
