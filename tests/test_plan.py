"""edmfast.plan / edmfast.solvers: EDM's vectorized plan equals a step-by-step float64 derivation,
plans are cached, and what the float32 kernels cannot represent is refused."""

import math

import pytest
import torch

import edmfast
from edmfast import plan as P
from edmfast import solvers as S
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser
from edmfast.layout import COEF_SIZE
from edmfast.options import SamplerOptions, resolve_sigmas


def _slow_rows(den, sigmas, opts):
    """The old per-step derivation (one coefficients() call and one row per step, Python floats)."""
    steps = S.plan_steps(den, sigmas, opts)
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
    plan = S.make_plan(den, sig, o)
    rows, sig_in, noise = _slow_rows(den, sig, o)
    n = sig.numel() - 1
    # the program's passes use rows 0 .. 2N (callback and hook rows follow)
    torch.testing.assert_close(plan.coef[: 1 + 2 * n], rows.float(), rtol=1e-6, atol=0)
    steps = S.plan_steps(den, sig, o)
    evals = [v for i, st in enumerate(steps) for v in (sig_in[2 * i], sig_in[2 * i + 1])[: 1 + st.correct]]
    torch.testing.assert_close(plan.eval_in, torch.stack(evals), rtol=1e-6, atol=0)
    drawn = tuple(d.used for d in plan.draws) if plan.draws else (False,) * n
    assert drawn == tuple(noise) and plan.n == n


def test_one_coefficients_call_per_plan():
    class Counting(edmfast.EDMPrecond):
        calls = 0

        def coefficients(self, sigma):
            Counting.calls += 1
            return super().coefficients(sigma)

    den = Counting(EDMNetworkOf(GaussianDenoiser(0.0, 0.5)))
    S.make_plan(den, edmfast.karras_sigmas(256), SamplerOptions.create(s_churn=30))
    assert Counting.calls == 1


def test_plans_are_cached_by_schedule_values_and_options():
    den = GaussianDenoiser(0.0, 0.5)
    s = edmfast.Sampler(den, num_steps=6)
    a = s.plan()
    assert s.plan() is a
    sig = edmfast.karras_sigmas(5)
    b = s.plan(sig)
    assert s.plan(sig.clone()) is b and s.plan(sig.tolist()) is not a
    sig[1] *= 0.5  # same tensor, new values: a new plan
    c = s.plan(sig)
    assert c is not b and dict(c.steps[1].info)["sigma"] == float(sig[1])
    assert edmfast.Sampler(den, num_steps=7).plan().n == 7


def test_plan_cache_is_a_bounded_lru():
    cache = P.PlanCache(size=2)
    made = []

    def make(k):
        made.append(k)
        return k

    assert cache.get("a", lambda: make("a")) == "a" and cache.get("a", lambda: make("x")) == "a"
    cache.get("b", lambda: make("b"))
    cache.get("a", lambda: make("x"))  # refreshes a
    cache.get("c", lambda: make("c"))  # evicts b, the least recently used
    assert len(cache) == 2 and cache.get("b", lambda: make("b2")) == "b2"
    assert cache.get(None, lambda: make("n")) == "n" and len(cache) == 2  # None: never cached
    assert made == ["a", "b", "c", "b2", "n"]


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


@pytest.mark.parametrize("solver", ["heun", "dpmpp_sde", "dpmpp_2m", "lms", "dpm_2"])
def test_plan_memory_per_step_is_bounded(solver):
    """The per-step bound `check_steps_fit` refuses with holds for every kind of step (peak host
    memory of making the plan and its per-device views, tables included)."""
    import gc
    import tracemalloc

    from edmfast.options import PLAN_BYTES_PER_STEP

    den = edmfast.EDMPrecond(EDMNetworkOf(GaussianDenoiser(0.0, 0.5)))
    n = 1500
    churn = {"s_churn": 10.0} if solver in ("heun", "dpm_2") else {}
    opts = SamplerOptions.create(num_steps=n, solver=solver, **churn)
    sig = edmfast.karras_sigmas(n)
    gc.collect()
    tracemalloc.start()
    try:
        plan = S.make_plan(den, sig, opts)
        plan.rows_on(torch.device("cpu"))
        plan.eval_rows_on(torch.device("cpu"), 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tables = plan.coef.numel() * 4 * 3 + plan.eval_in.numel() * 8 * 4  # tensor storage is not traced
    assert (peak + tables) / n < PLAN_BYTES_PER_STEP


@pytest.mark.parametrize(
    "call",
    [
        lambda: edmfast.sample(GaussianDenoiser(0.0, 0.5), torch.randn(1, 2), num_steps=10**8),
        lambda: edmfast.ablation_sample(GaussianDenoiser(0.0, 0.5), torch.randn(1, 2), num_steps=10**8),
        lambda: edmfast.sample_ancestral(
            lambda x, t: x, torch.randn(1, 2), edmfast.ddpm_betas(1000), num_steps=10**8
        ),
    ],
    ids=["sample", "ablation_sample", "sample_ancestral"],
)
def test_unbounded_num_steps_is_refused_before_allocating(call):
    """10**8 steps would allocate until the OOM killer ends the process: refused at once, by name."""
    with pytest.raises(ValueError, match=r"num_steps=100000000 needs about \d+\.\d GiB"):
        call()
