"""The bad-input policy (docs/design.md §8): every bad input gets a ValueError/TypeError naming the
argument, before any kernel runs.

The same table runs against `edmfast.sample` and `edmfast.reference.sample`; the denoiser counts
its calls, so "before any kernel runs" is checked as "before the network was called".
"""

import math

import pytest
import torch

import edmfast
from edmfast.analytic import GaussianDenoiser


class Counting:
    def __init__(self):
        self.calls = 0
        self.g = GaussianDenoiser(0.0, 0.5)

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.g(x, sigma)


N = torch.randn(2, 3, 4, 4)
CASES = [
    # (id, kwargs, exception, text the message must contain)
    ("noise-type", dict(noise=[1.0, 2.0]), TypeError, "noise"),
    ("noise-int", dict(noise=torch.ones(2, 3, dtype=torch.int64)), TypeError, "noise"),
    ("noise-1d", dict(noise=torch.randn(5)), ValueError, "noise"),
    ("noise-nan", dict(noise=torch.full((2, 3), float("nan"))), ValueError, "noise"),
    ("sigmas-nan", dict(sigmas=[80.0, float("nan"), 0.0]), ValueError, "sigmas"),
    ("sigmas-inf-middle", dict(sigmas=[80.0, math.inf, 0.0]), ValueError, "sigmas"),
    ("sigmas-increasing", dict(sigmas=[1.0, 2.0, 0.0]), ValueError, "decreasing"),
    ("sigmas-repeated", dict(sigmas=[2.0, 2.0, 0.0]), ValueError, "decreasing"),
    ("sigmas-negative", dict(sigmas=[1.0, 0.5, -0.1]), ValueError, "sigmas"),
    ("sigmas-short", dict(sigmas=[1.0]), ValueError, "sigmas"),
    ("sigmas-2d", dict(sigmas=torch.ones(2, 2)), ValueError, "sigmas"),
    ("num_steps-0", dict(num_steps=0), ValueError, "num_steps"),
    ("num_steps-float", dict(num_steps=3.5), TypeError, "num_steps"),
    ("s_churn-negative", dict(s_churn=-1.0), ValueError, "s_churn"),
    ("s_noise-negative", dict(s_noise=-1.0), ValueError, "s_noise"),
    ("s_tmin>s_tmax", dict(s_tmin=2.0, s_tmax=1.0), ValueError, "s_tmin"),
    ("rescale>1", dict(guidance_rescale=1.5), ValueError, "guidance_rescale"),
    ("rescale<0", dict(guidance_rescale=-0.1), ValueError, "guidance_rescale"),
    ("alpha-0", dict(solver="2nd", alpha=0.0), ValueError, "alpha"),
    ("alpha-with-heun", dict(alpha=0.5), ValueError, "alpha"),
    ("solver", dict(solver="rk4"), ValueError, "solver"),
    ("backend", dict(backend="metal"), ValueError, "backend"),
    ("noise_mode", dict(noise_mode="quasi"), ValueError, "noise_mode"),
    ("cuda_graph", dict(cuda_graph="sometimes"), ValueError, "cuda_graph"),
    ("unknown-option", dict(s_chrun=1.0), TypeError, "s_chrun"),
    ("sigma_min>sigma_max", dict(sigma_min=10.0, sigma_max=1.0), ValueError, "sigma_min"),
    ("cfg-without-uncond", dict(guidance_scale=3.0), ValueError, "uncond"),
    ("cond-batch", dict(cond={"mu": torch.ones(3, 3, 4, 4)}), ValueError, "cond['mu']"),
    ("cond-type", dict(cond=[1]), TypeError, "cond"),
    (
        "uncond-keys",
        dict(guidance_scale=2.0, cond={"mu": torch.ones(2, 3, 4, 4)}, uncond={}),
        ValueError,
        "keys",
    ),
    (
        "uncond-shape",
        dict(guidance_scale=2.0, cond={"mu": torch.ones(2, 3, 4, 4)}, uncond={"mu": torch.ones(2, 1, 4, 4)}),
        ValueError,
        "uncond['mu']",
    ),
    ("fused-without-seeds", dict(s_churn=10.0, noise_mode="fused"), ValueError, "seeds"),
    ("seeds-count", dict(s_churn=10.0, noise_mode="fused", seeds=[1, 2, 3]), ValueError, "seeds"),
    (
        "seeds-float",
        dict(s_churn=10.0, noise_mode="fused", seeds=torch.tensor([1.0, 2.0])),
        TypeError,
        "seeds",
    ),
    # issue 13: silently-lenient input is refused
    ("seeds-float-list", dict(s_churn=10.0, noise_mode="fused", seeds=[1.0, 2.0]), TypeError, "seeds"),
    ("seeds-bool-list", dict(s_churn=10.0, noise_mode="fused", seeds=[True, False]), TypeError, "seeds"),
    ("rescale-bool", dict(guidance_rescale=True), TypeError, "guidance_rescale"),
    (
        "cond-nested-tensor",
        dict(guidance_scale=2.0, cond={"e": {"a": torch.ones(2)}}, uncond={"e": {"a": torch.zeros(2)}}),
        TypeError,
        "cond['e']",
    ),
    ("inf-start-plain-denoiser", dict(sigmas=[math.inf, 1.0, 0.0]), ValueError, "limit_coefficients"),
    ("alpha-with-euler", dict(solver="euler", alpha=0.5), ValueError, "alpha"),
    ("cond-device", dict(cond={"mu": torch.ones(2, 3, 4, 4, device="meta")}), ValueError, "cond['mu']"),
    (
        "seeds-device",
        dict(s_churn=10.0, noise_mode="fused", seeds=torch.tensor([1, 2], device="meta")),
        ValueError,
        "seeds",
    ),
    ("generator-type", dict(s_churn=10.0, generator=42), TypeError, "generator"),
    (
        "generator-batch",
        dict(s_churn=10.0, generator=edmfast.PerSampleGenerator([1, 2, 3])),
        ValueError,
        "generator",
    ),
]


@pytest.mark.parametrize("fn", [edmfast.sample, edmfast.reference.sample], ids=["engine", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_before_the_network_runs(fn, case):
    _, kwargs, exc, text = case
    kwargs = dict(kwargs)
    noise = kwargs.pop("noise", N)
    den = Counting()
    if fn is edmfast.sample:
        kwargs.setdefault("backend", "torch")
    with pytest.raises(exc) as info:
        fn(den, noise, **kwargs)
    assert text in str(info.value)
    assert den.calls == 0


def test_explicit_unavailable_backend_says_why():
    from edmfast.ops import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="'cuda'"):
        edmfast.sample(Counting(), N, backend="cuda")


def test_auto_backend_always_runs():
    out = edmfast.sample(GaussianDenoiser(0.0, 0.5), N, num_steps=3)
    assert out.shape == N.shape and torch.isfinite(out).all()


def test_not_callable_denoiser():
    with pytest.raises(TypeError, match="denoiser"):
        edmfast.Sampler("not a model")


def test_cfg_rescale_bad_inputs():
    c = torch.randn(2, 3)
    with pytest.raises(ValueError, match="guidance_rescale"):
        edmfast.cfg_rescale(c, c, 7.5, 2.0)
    with pytest.raises(ValueError, match="uncond"):
        edmfast.cfg_rescale(c, torch.randn(2, 4), 7.5, 0.5)
    with pytest.raises(TypeError, match="cond"):
        edmfast.cfg_rescale(c.long(), c.long(), 7.5, 0.5)


@pytest.mark.parametrize("fn", [edmfast.sample, edmfast.reference.sample], ids=["engine", "reference"])
@pytest.mark.parametrize(
    "bad, exc, text",
    [
        (lambda x: x.to("meta"), ValueError, "meta"),
        (lambda x: x.to(torch.int32), TypeError, "dtype"),
        (lambda x: x[:, :1], ValueError, "shape"),
    ],
    ids=["device", "dtype", "shape"],
)
def test_bad_denoiser_output_is_named(fn, bad, exc, text):
    kw = dict(backend="torch") if fn is edmfast.sample else {}
    with pytest.raises(exc, match=text):
        fn(lambda x, sigma: bad(x), N, num_steps=3, **kw)


def test_cuda_graph_takes_only_auto_true_false():
    with pytest.raises(ValueError, match="cuda_graph"):
        edmfast.sample(Counting(), N, cuda_graph=1, backend="torch")


def test_infinite_guidance_scale_in_cfg_rescale():
    c = torch.randn(2, 3)
    with pytest.raises(ValueError, match="guidance_scale"):
        edmfast.cfg_rescale(c, c, float("inf"), 0.5)


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_churn_window_that_excludes_every_step(mode):
    """s_churn > 0 but no sigma inside [s_tmin, s_tmax]: no noise is needed (fused mode asks for no
    seeds) and exact mode still advances the generator once per step, like the reference."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    kw = dict(num_steps=4, s_churn=10.0, s_tmin=1000.0, s_tmax=2000.0, noise_mode=mode)
    a = edmfast.sample(GaussianDenoiser(0.0, 0.5), N, generator=g1, backend="torch", **kw)
    b = edmfast.reference.sample(GaussianDenoiser(0.0, 0.5), N.double(), generator=g2, **kw)
    assert float((a.double() - b).norm() / b.norm()) < 2e-5  # float32 state vs float64
    assert torch.equal(g1.get_state(), g2.get_state())
