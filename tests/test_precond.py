"""Preconditioners (EDM Table 1) and the discrete VP adapter, against closed forms."""

import math

import pytest
import torch

import edmfast
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser
from edmfast.schedules import iddpm_u, vp_sigma

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.3, 80.0], dtype=torch.float64)


def _ident(x, c_noise, **_):
    return x


def test_edm_coefficients():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edmfast.EDMPrecond(_ident).coefficients(SIGMAS)
    for i, s in enumerate(SIGMAS.tolist()):
        assert float(c_skip[i]) == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-14)
        assert float(c_out[i]) == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-14)
        assert float(c_in[i]) == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-14)
        assert float(c_noise[i]) == pytest.approx(math.log(s) / 4, rel=1e-14)


def test_vp_coefficients_and_range():
    p = edmfast.VPPrecond(_ident)
    c_skip, c_out, c_in, c_noise = p.coefficients(SIGMAS)
    assert (c_skip == 1).all() and torch.equal(c_out, -SIGMAS)
    torch.testing.assert_close(c_in, 1 / (SIGMAS**2 + 1).sqrt())
    # c_noise = (M - 1) t with sigma(t) = sigma: invert through the forward schedule
    torch.testing.assert_close(vp_sigma(c_noise / 999), SIGMAS, rtol=1e-10, atol=0)
    assert p.sigma_min == pytest.approx(float(vp_sigma(1e-5))) and p.sigma_max == pytest.approx(
        float(vp_sigma(1.0))
    )


def test_ve_coefficients():
    c_skip, c_out, c_in, c_noise = edmfast.VEPrecond(_ident).coefficients(SIGMAS)
    assert (c_skip == 1).all() and torch.equal(c_out, SIGMAS) and (c_in == 1).all()
    torch.testing.assert_close(c_noise, (SIGMAS / 2).log())


def test_iddpm_coefficients_round_sigma_and_learned_variance():
    p = edmfast.iDDPMPrecond(_ident)
    u = iddpm_u()
    r = p.round_sigma(SIGMAS)
    for s, rs in zip(SIGMAS.tolist(), r.tolist(), strict=True):
        j = int((u - s).abs().argmin())
        assert rs == float(u[j])
    c_skip, c_out, c_in, c_noise = p.coefficients(r)
    assert (c_skip == 1).all() and torch.equal(c_out, -r)
    idx = torch.tensor([int((u - s).abs().argmin()) for s in r.tolist()])
    assert torch.equal(c_noise, (999 - idx).double())
    assert p.sigma_max == float(u[0]) and p.sigma_min == float(u[999])

    class TwoHeads(torch.nn.Module):
        def forward(self, x, c_noise):
            return torch.cat([x, torch.full_like(x, 1e9)], dim=1)

    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(edmfast.iDDPMPrecond(TwoHeads()).raw(x, torch.zeros(2)), x)


def test_edm_precond_wraps_an_exact_network_back_into_the_denoiser():
    g = GaussianDenoiser(0.2, 0.5)
    p = edmfast.EDMPrecond(EDMNetworkOf(g))
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 3
    torch.testing.assert_close(p(x, SIGMAS), g(x, SIGMAS), rtol=1e-5, atol=1e-6)  # F runs in float32


# --------------------------------------------------------------------------- DiscreteVPDenoiser


def _abar():
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


class ExactVPModel(torch.nn.Module):
    """The exact eps / v / x0 model of N(0, s^2 I) data in discrete VP form."""

    def __init__(self, abar, kind, s=0.5):
        super().__init__()
        self.abar, self.kind, self.s = abar, kind, s

    def forward(self, x_t, t):
        a = self.abar[t.round().long()].reshape(-1, 1, 1, 1)
        x_t = x_t.double()
        # x_t = sqrt(a) x0 + sqrt(1-a) eps: E[x0 | x_t] = sqrt(a) s^2 / (a s^2 + 1 - a) x_t
        x0 = a.sqrt() * self.s**2 / (a * self.s**2 + 1 - a) * x_t
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[self.kind]
        return out.float()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_discrete_vp_denoiser_reproduces_the_ideal_denoiser(kind):
    abar = _abar()
    den = edmfast.DiscreteVPDenoiser(ExactVPModel(abar, kind), abar, prediction_type=kind)
    ts = torch.tensor([999, 500, 120, 3])
    sig = den.sigmas_for(ts)
    torch.testing.assert_close(sig[:-1], ((1 - abar[ts]) / abar[ts]).sqrt())
    assert sig[-1] == 0
    sigma = sig[:-1].reshape(-1, 1, 1, 1)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64) * sigma
    got, want = den(x, sig[:-1]), GaussianDenoiser(0.0, 0.5)(x, sig[:-1])
    # The model answers in float32, as real ones do. From eps, D = x - sigma eps carries eps's
    # rounding (2^-24 |eps|, |eps| < 5) times sigma (157 at t = 999): 2.7e-5 was seen there.
    bound = 2e-5 * want.abs() + 1e-6 * (1 + sigma)
    assert ((got - want).abs() <= bound).all(), float(((got - want).abs() / bound).max())


def test_sigma_to_t_interpolates_in_log_sigma():
    abar = _abar()
    den = edmfast.DiscreteVPDenoiser(_ident, abar)
    s = den.sigmas[[10, 11]]
    mid = (s.log().mean()).exp()  # halfway in log sigma
    assert float(den.sigma_to_t(mid.reshape(1))) == pytest.approx(10.5, abs=1e-9)
    assert den.sigma_to_t(den.sigmas).tolist() == pytest.approx(list(range(1000)), abs=1e-9)


def test_model_output_forms():
    class Out:
        def __init__(self, t):
            self.sample = t

    abar = _abar()
    x = torch.randn(2, 1, 2, 2)
    outs = [lambda x, t: x, lambda x, t: (x,), lambda x, t: Out(x)]
    results = [edmfast.DiscreteVPDenoiser(m, abar, "sample")(x, torch.ones(2)) for m in outs]
    assert all(torch.equal(r, results[0]) for r in results)
    with pytest.raises(TypeError, match="must return"):
        edmfast.DiscreteVPDenoiser(lambda x, t: "nope", abar, "sample")(x, torch.ones(2))


def test_epsilon_prediction_rejects_zero_terminal_snr_start():
    abar = torch.cumprod(1 - edmfast.rescale_zero_terminal_snr(1 - _abar()[1:] / _abar()[:-1]), 0)
    den = edmfast.DiscreteVPDenoiser(_ident, abar, prediction_type="epsilon")
    with pytest.raises(ValueError, match="epsilon"):
        den.limit_coefficients()


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        edmfast.DiscreteVPDenoiser(_ident, _abar(), prediction_type="x0")


def test_schedule_planning_reads_no_device_buffer():
    """The engine plans on CPU sigmas: the tables must come from host copies, not from the module's
    (possibly CUDA) buffers, which would cost a device sync per coefficient. Meta buffers stand in
    for device ones here (reading them raises)."""
    vp = edmfast.DiscreteVPDenoiser(_ident, _abar(), "v_prediction")
    sig = torch.tensor([0.5, 3.0], dtype=torch.float64)
    want = vp.coefficients(sig)
    vp.to("meta")
    assert all(torch.equal(a, b) for a, b in zip(vp.coefficients(sig), want, strict=True))
    assert torch.equal(vp.sigmas_for([999, 0])[:-1], ((1 - _abar()[[999, 0]]) / _abar()[[999, 0]]).sqrt())
    p = edmfast.iDDPMPrecond(_ident)
    want = p.round_sigma(sig), p.coefficients(sig)[3]
    p.to("meta")
    assert torch.equal(p.round_sigma(sig), want[0]) and torch.equal(p.coefficients(sig)[3], want[1])


def test_sigma_to_t_linear_interpolates_in_sigma():
    abar = _abar()
    den = edmfast.DiscreteVPDenoiser(_ident, abar, interpolation="linear")
    s = den.sigmas[[10, 11]]
    assert float(den.sigma_to_t(s.mean().reshape(1))) == pytest.approx(10.5, abs=1e-9)
    assert den.sigma_to_t(den.sigmas).tolist() == pytest.approx(list(range(1000)), abs=1e-9)
    with pytest.raises(ValueError, match="interpolation"):
        edmfast.DiscreteVPDenoiser(_ident, abar, interpolation="cubic")


def test_original_sample_is_sample():
    abar = _abar()
    den = edmfast.DiscreteVPDenoiser(_ident, abar, prediction_type="original_sample")
    assert den.prediction_type == "sample"
    c_skip, c_out, _, _ = den.coefficients(SIGMAS)
    assert (c_skip == 0).all() and (c_out == 1).all()


class _FakeScheduler:
    """What from_diffusers reads: a config mapping and alphas_cumprod (no diffusers needed)."""

    def __init__(self, **config):
        self.config = {"prediction_type": "epsilon", **config}
        self.alphas_cumprod = _abar().float()


def test_from_diffusers_reads_the_config():
    den = edmfast.DiscreteVPDenoiser.from_diffusers(_ident, _FakeScheduler(prediction_type="original_sample"))
    assert den.prediction_type == "sample" and den.interpolation == "linear"
    torch.testing.assert_close(den.sigmas, ((1 - _abar().float().double()) / _abar().float().double()).sqrt())
    karras = edmfast.DiscreteVPDenoiser.from_diffusers(_ident, _FakeScheduler(use_karras_sigmas=True))
    assert karras.interpolation == "log"
    for config, what in (
        ({"timestep_type": "continuous"}, "timestep_type"),
        ({"interpolation_type": "log_linear"}, "interpolation_type"),
        ({"prediction_type": "flow"}, "prediction_type"),
    ):
        with pytest.raises(ValueError, match=what):
            edmfast.DiscreteVPDenoiser.from_diffusers(_ident, _FakeScheduler(**config))
    with pytest.raises(TypeError, match="scheduler"):
        edmfast.DiscreteVPDenoiser.from_diffusers(_ident, object())
