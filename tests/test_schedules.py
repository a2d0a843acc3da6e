"""Discretizations (EDM Table 1) and discrete schedules (Lin et al. 2023) against independent facts."""

import math

import numpy as np
import pytest
import torch

import edmfast
from edmfast.schedules import (
    ddpm_betas,
    iddpm_u,
    respace_betas,
    respaced_timesteps,
    space_timesteps,
    vp_betas_for_range,
    vp_sigma,
    vp_sigma_inv,
)


def test_karras_defaults_endpoints_and_layout():
    s = edmfast.karras_sigmas(18)
    assert s.dtype == torch.float64 and s.shape == (19,)
    assert s[0] == pytest.approx(80.0, rel=1e-14) and s[17] == pytest.approx(0.002, rel=1e-12) and s[18] == 0
    assert (s[1:] < s[:-1]).all()


def test_karras_rho_one_is_linear_and_large_rho_tends_to_geometric():
    s = edmfast.karras_sigmas(5, 1.0, 9.0, rho=1.0)[:-1]
    torch.testing.assert_close(s, torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0], dtype=torch.float64))
    # (a^(1/rho) + t (b^(1/rho) - a^(1/rho)))^rho -> a^(1-t) b^t as rho -> inf
    g = edmfast.karras_sigmas(5, 0.01, 100.0, rho=1e6)[:-1]
    torch.testing.assert_close(g, torch.logspace(2, -2, 5, dtype=torch.float64), rtol=1e-4, atol=0)


def test_ve_is_geometric_between_its_endpoints():
    s = edmfast.ve_sigmas(10)[:-1]
    assert s[0] == pytest.approx(100.0) and s[-1] == pytest.approx(0.02)
    ratios = s[1:] / s[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12)


def test_vp_default_and_refitted_ranges():
    s = edmfast.vp_sigmas(10)[:-1]
    # sigma(1) = sqrt(e^(19.9/2 + 0.1) - 1), sigma(1e-3) = sqrt(e^(19.9e-6/2 + 1e-4) - 1)
    assert s[0] == pytest.approx(math.sqrt(math.exp(10.05) - 1), rel=1e-12)
    assert s[-1] == pytest.approx(math.sqrt(math.exp(0.5 * 19.9e-6 + 1e-4) - 1), rel=1e-9)
    r = edmfast.vp_sigmas(10, sigma_min=0.002, sigma_max=80.0)[:-1]
    assert r[0] == pytest.approx(80.0, rel=1e-10) and r[-1] == pytest.approx(0.002, rel=1e-8)
    bd, bm = vp_betas_for_range(0.002, 80.0)
    # the refit makes beta_min negative (-0.0048), so sigma(t) is real only for t >= 5.4e-4: the
    # round trip is over the range the sampler uses, t in [eps_s, 1] = [1e-3, 1]
    assert bm < 0 and torch.isnan(vp_sigma(torch.tensor(1e-4), bd, bm))
    t = 1e-3 + (1 - 1e-3) * torch.rand(100, dtype=torch.float64)
    torch.testing.assert_close(vp_sigma_inv(vp_sigma(t, bd, bm), bd, bm), t, rtol=1e-9, atol=1e-12)


def test_iddpm_levels_follow_the_unclipped_closed_form():
    M, C2 = 1000, 0.008
    u = iddpm_u(M)
    assert u[M] == 0 and (u[1:] < u[:-1]).all()
    # without the clip the recursion telescopes: u_j^2 + 1 = abar(M) / abar(j)
    j = torch.arange(1, M + 1, dtype=torch.float64)
    abar = torch.sin(0.5 * math.pi * j / M / (C2 + 1)) ** 2
    closed = (abar[-1] / abar - 1).clamp(min=0).sqrt()
    torch.testing.assert_close(u[1:][50:], closed[50:], rtol=1e-9, atol=1e-12)
    s = edmfast.iddpm_sigmas(18)
    assert s[-1] == 0 and ((s[:-1] >= 0.002) & (s[:-1] <= 81)).all()
    assert all(bool((u == v).any()) for v in s[:-1])  # every step is one of the u_j


def test_iddpm_steps_pick_the_official_indices():
    """EDM's ablation code: ``u_filtered[((L - 1) / (N - 1) * i).round()]``, operations in that order."""
    u = iddpm_u()
    inside = u[(u >= 0.002) & (u <= 81.0)]
    for n in (2, 18, 59, 99, 256):  # 59 and 99 hit exact .5 ties that another order rounds differently
        index = ((len(inside) - 1) / (n - 1) * torch.arange(n, dtype=torch.float64)).round().long()
        assert torch.equal(edmfast.iddpm_sigmas(n)[:-1], inside[index]), n


@pytest.mark.parametrize("num_steps", [1, 7, 48, 61, 103, 1000])
def test_trailing_spacing_gives_num_steps_timesteps_from_the_last(num_steps):
    # np.arange(1000, 0, -1000/61) has 62 entries, the last rounding to t = -1
    t = edmfast.discrete_timesteps(num_steps, 1000, "trailing")
    assert t.shape == (num_steps,) and t[0] == 999 and t.min() >= 0 and (t[1:] < t[:-1]).all()
    # each entry is round(T - i T/S) - 1 (ties may go either way)
    ideal = 1000 - torch.arange(num_steps, dtype=torch.float64) * (1000 / num_steps) - 1
    assert (t - ideal).abs().max() <= 0.5


@pytest.mark.parametrize(
    "spacing, expected",
    [
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ],
)
def test_lin_et_al_table_2_spacings(spacing, expected):
    t = edmfast.discrete_timesteps(10, 1000, spacing)
    assert t.dtype == torch.int64 and t.tolist() == expected


def test_leading_offset_and_bad_spacing():
    assert edmfast.discrete_timesteps(10, 1000, "leading", steps_offset=1).tolist()[0] == 901
    with pytest.raises(ValueError, match="spacing"):
        edmfast.discrete_timesteps(10, 1000, "even")


def _sd_betas():
    return torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2


def test_zero_terminal_snr():
    betas = _sd_betas()
    new = edmfast.rescale_zero_terminal_snr(betas)
    abar_old, abar = torch.cumprod(1 - betas, 0), torch.cumprod(1 - new, 0)
    assert abar[-1] == 0.0  # exactly zero SNR at T
    assert abar[0] == pytest.approx(float(abar_old[0]), rel=1e-14)
    assert (abar[1:] < abar[:-1]).all()
    # sqrt(abar) is an affine map of the old sqrt(abar)
    r_old, r = abar_old.sqrt(), abar.sqrt()
    expected = (r_old - r_old[-1]) * r_old[0] / (r_old[0] - r_old[-1])
    torch.testing.assert_close(r, expected, rtol=1e-10, atol=1e-12)
    den = edmfast.DiscreteVPDenoiser(lambda x, t: x, abar, prediction_type="v_prediction")
    assert math.isinf(float(den.sigmas_for([999])[0]))


def test_float32_betas_keep_their_dtype():
    out = edmfast.rescale_zero_terminal_snr(_sd_betas().float())
    assert out.dtype == torch.float32 and np.isfinite(out.numpy()).all()


@pytest.mark.parametrize(
    "fn", [edmfast.karras_sigmas, edmfast.ve_sigmas, edmfast.vp_sigmas, edmfast.iddpm_sigmas]
)
def test_bad_num_steps(fn):
    with pytest.raises(ValueError, match="num_steps"):
        fn(0)
    with pytest.raises(TypeError, match="num_steps"):
        fn(2.5)


def test_bad_sigma_range():
    with pytest.raises(ValueError, match="sigma_min"):
        edmfast.karras_sigmas(10, sigma_min=-1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        edmfast.karras_sigmas(10, sigma_min=1.0, sigma_max=0.5)


def test_single_step_schedules_start_at_sigma_max():
    assert edmfast.karras_sigmas(1).tolist() == [80.0, 0.0]
    assert edmfast.ve_sigmas(1)[0] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- DDPM betas, respacing


def test_ddpm_betas_known_values():
    lin = ddpm_betas(1000, "linear")
    assert lin.dtype == torch.float64 and lin.shape == (1000,)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    # iDDPM's scaling keeps the schedule's total noise for other T: 1000 / T times the range
    assert ddpm_betas(500, "linear")[-1].item() == pytest.approx(0.04)
    cos = ddpm_betas(1000, "cosine")
    abar = torch.cumprod(1 - cos, 0)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abar[499].item() == pytest.approx(f(0.5) / f(0), rel=1e-9)
    assert cos.max().item() == 0.999  # the clip at the end of the cosine schedule
    with pytest.raises(ValueError, match="schedule"):
        ddpm_betas(1000, "sigmoid")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ddpm_betas(0)


def test_space_timesteps_like_iddpm():
    assert space_timesteps(1000, "ddim50").tolist() == list(range(980, -1, -20))
    assert space_timesteps(100, "ddim3").tolist() == [68, 34, 0]  # stride 34: range(0, 100, 34)
    # section counts: 300 in three sections of 100; 10 of the first at stride 99/9 = 11, rounded
    ts = space_timesteps(300, "10,1,2")
    assert ts.tolist()[::-1] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100, 200, 299]
    assert space_timesteps(1000, "10,10,20").numel() == 40
    assert space_timesteps(1000, [25, 25]).tolist() == space_timesteps(1000, "25,25").tolist()
    with pytest.raises(ValueError, match="stride"):
        space_timesteps(1000, "ddim37")
    with pytest.raises(ValueError, match="section"):
        space_timesteps(30, "20,1")
    with pytest.raises(ValueError, match="section counts"):
        space_timesteps(30, "a,b")


def test_respaced_timesteps_and_betas():
    assert respaced_timesteps(10, 1000, "leading").tolist() == list(range(900, -1, -100))
    assert respaced_timesteps(3, 1000, "ddim5").numel() == 5  # the spacing says how many
    betas = ddpm_betas(1000, "linear")
    ts = respaced_timesteps(10, 1000, "trailing")
    rb = respace_betas(betas, ts)
    # the respaced chain has the same abar at the kept timesteps
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(torch.cumprod(1 - rb.flip(0), 0).flip(0), abar[ts], rtol=1e-12, atol=0)
