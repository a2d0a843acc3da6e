"""edmfast.plan: the vectorized plan equals a step-by-step float64 derivation, is cached, and refuses
what the float32 kernels cannot represent."""

import math

import pytest
import torch

import edmfast
from edmfast import plan as P
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser
from edmfast.layout import COEF_SIZE
from edmfast.options import SamplerOptions, resolve_sigmas


def _slow_rows(den, sigmas, opts):
    """The old per-step derivation (one coefficients() call and one row per step, Python floats)."""
    steps = P.plan_steps(den, sigmas, opts)
    n, a = len(steps), opts.effective_alpha

    def coefs(s):
        if P.is_preconditioner(den):
            return [float(c) for c in den.coefficients(torch.tensor([s], dtype=torch.float64))]
        return [0.0, 1.0, 1.0, s]

    first = [list(den.limit_coefficients()) if math.isinf(st.sigma) else coefs(st.sigma_hat) for st in steps]
    noise = [opts.s_churn > 0 and st.noise_std > 0 for st in steps]

    def nxt(i):
        return (0.0, 0.0) if i >= n else ((steps[i].noise_std if noise[i] else 0.0), first[i][2])

    rows = torch.zeros(1 + 2 * n, COEF_SIZE, dtype=torch.float64)
    sig_in = torch.zeros(2 * n, dtype=torch.float64)
    rows[0, :5] = torch.tensor([1.0 if math.isinf(steps[0].sigma) else steps[0].sigma, 0, 0, *nxt(0)])
    for i, st in enumerate(steps):
        sk, co, _, cn = first[i]
        sig_in[2 * i] = cn
        std, c = nxt(i + 1)
        if math.isinf(st.sigma):
            rows[1 + 2 * i, :5] = torch.tensor([sk + st.sigma_next, 0, co, std, c])
            continue
        h = st.sigma_next - st.sigma_hat
        d_x, d_f = (1 - sk) / st.sigma_hat, -co / st.sigma_hat
        if not st.correct:
            rows[1 + 2 * i, :5] = torch.tensor([1 + h * d_x, 0, h * d_f, std, c])
            continue
        sk2, co2, ci2, cn2 = coefs(st.sigma_prime)
        sig_in[2 * i + 1] = cn2
        rows[1 + 2 * i, :5] = torch.tensor([1 + a * h * d_x, 0, a * h * d_f, 0, ci2])
        w1, w2 = (1 - 1 / (2 * a)) / a, h / (2 * a * st.sigma_prime)
        rows[2 + 2 * i, :5] = torch.tensor([1 - w1, w1 + w2 * (1 - sk2), -w2 * co2, std, c])
    return rows, sig_in, noise


def _zero_snr():
    betas = edmfast.rescale_zero_terminal_snr(
        torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    )
    abar = torch.cumprod(1 - betas, 0)
    den = edmfast.DiscreteVPDenoiser(lambda x, t: x, abar, "v_prediction")
    return den, den.sigmas_for(edmfast.discrete_timesteps(10, 1000, "trailing"))


def _net(x, c):
    return x


DENOISERS = {
    "plain": lambda: (GaussianDenoiser(0.0, 0.5), None),
    "edm": lambda: (edmfast.EDMPrecond(EDMNetworkOf(GaussianDenoiser(0.0, 0.5))), None),
    "vp": lambda: (edmfast.VPPrecond(_net), None),
    "ve": lambda: (edmfast.VEPrecond(_net), None),
    "iddpm": lambda: (edmfast.iDDPMPrecond(_net), None),
    "discrete-vp": lambda: (
        edmfast.DiscreteVPDenoiser(_net, torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)),
        None,
    ),
    "zero-snr": _zero_snr,
}
OPTIONS = [
    dict(num_steps=12),
    dict(num_steps=7, solver="euler"),
    dict(num_steps=9, solver="2nd", alpha=0.3),
    dict(num_steps=10, s_churn=40, s_tmin=0.05, s_tmax=50, s_noise=1.003),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("kind", list(DENOISERS))
def test_vectorized_plan_equals_the_step_by_step_derivation(kind, opts):
    den, sigmas = DENOISERS[kind]()
    o = SamplerOptions.create(**opts)
    sig = resolve_sigmas(den, sigmas, o)
    plan = P.make_plan(den, sig, o)
    rows, sig_in, noise = _slow_rows(den, sig, o)
    torch.testing.assert_close(plan.coef, rows.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(plan.sigma_in, sig_in.float(), rtol=1e-6, atol=0)
    assert plan.noise_steps == tuple(noise) and plan.n == sig.numel() - 1


def test_one_coefficients_call_per_plan():
    class Counting(edmfast.EDMPrecond):
        calls = 0

        def coefficients(self, sigma):
            Counting.calls += 1
            return super().coefficients(sigma)

    den = Counting(EDMNetworkOf(GaussianDenoiser(0.0, 0.5)))
    P.make_plan(den, edmfast.karras_sigmas(256), SamplerOptions.create(s_churn=30))
    assert Counting.calls == 1


def test_plans_are_cached_by_schedule_values_and_options():
    den = GaussianDenoiser(0.0, 0.5)
    cache = P.PlanCache(size=2)
    o = SamplerOptions.create(num_steps=6)
    a = cache.get(den, None, o)
    assert cache.get(den, None, o) is a
    s = edmfast.karras_sigmas(5)
    b = cache.get(den, s, o)
    assert cache.get(den, s.clone(), o) is b and cache.get(den, s.tolist(), o) is not a
    s[1] *= 0.5  # same tensor, new values: a new plan
    c = cache.get(den, s, o)
    assert c is not b and float(c.steps[1].sigma) == float(s[1])
    assert cache.get(den, None, SamplerOptions.create(num_steps=7)).n == 7


def test_predicate_and_protocols():
    den = edmfast.EDMPrecond(_net)
    assert P.is_preconditioner(den) and isinstance(den, P.Preconditioner)
    assert not P.is_preconditioner(GaussianDenoiser(0.0, 0.5))
    assert isinstance(GaussianDenoiser(0.0, 0.5), P.Denoiser)


@pytest.mark.parametrize(
    "kw, text",
    [
        (dict(sigmas=[1e39, 1.0, 0.0]), "sigmas"),
        (dict(sigmas=[1.0, 1e-310, 0.0]), "sigmas"),
        (dict(sigmas=[80.0, 10.0, 1.0, 0.0], s_churn=5.0, s_noise=1e308, noise_mode="fused"), "s_noise"),
    ],
    ids=["sigma-1e39", "sigma-1e-310", "s_noise-1e308"],
)
def test_unrepresentable_plans_are_named_before_the_network_runs(kw, text):
    calls = []

    def den(x, sigma):
        calls.append(1)
        return x

    with pytest.raises(ValueError, match=text):
        edmfast.sample(den, torch.randn(2, 3, 4, 4), seeds=[1, 2], backend="torch", **kw)
    assert not calls


def test_a_changed_denoiser_setting_is_not_served_a_stale_plan():
    den = edmfast.EDMPrecond(EDMNetworkOf(GaussianDenoiser(0.0, 0.5)))
    noise = torch.randn(2, 3, 4, 4)
    edmfast.sample(den, noise, num_steps=4, backend="cpu")
    den.sigma_data = 0.7
    got = edmfast.sample(den, noise, num_steps=4, backend="cpu")
    fresh = edmfast.EDMPrecond(EDMNetworkOf(GaussianDenoiser(0.0, 0.5)), sigma_data=0.7)
    assert torch.equal(got, edmfast.Sampler(fresh, num_steps=4, backend="cpu")(noise))
