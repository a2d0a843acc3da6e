"""Ancestral sampling (issue 14): reference vs diffusers' schedulers, engine vs reference, closed form."""

from __future__ import annotations

import math

import pytest
import torch

from edmfast import layout as L
from edmfast import ops
from edmfast import reference as R
from edmfast.ancestral import AncestralOptions as Opts
from edmfast.ancestral import AncestralSampler, sample_ancestral, step_rows
from edmfast.rng import PerSampleGenerator
from edmfast.schedules import ddpm_betas, space_timesteps

diffusers = pytest.importorskip("diffusers")
C, HW = 3, 5


class Net(torch.nn.Module):
    """A random-weight conv network that behaves like an epsilon model (output near the input, so
    unclipped chains stay O(1)), with a t-dependent term and an optional variance half in [-1, 1]."""

    def __init__(self, learned: bool, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.learned = learned
        self.conv = torch.nn.Conv2d(C, 2 * C, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x, t, label=None):
        h = self.conv(x)
        if label is not None:
            h = h + label.to(h.dtype).reshape(-1, 1, 1, 1)
        eps = (
            x + 0.1 * torch.tanh(h[:, :C]) + 0.05 * torch.sin(t.float() / 97).reshape(-1, 1, 1, 1).to(x.dtype)
        )
        if not self.learned:
            return eps
        return torch.cat([eps, torch.tanh(h[:, C:])], 1)


def _diffusers_ddpm(
    net, noise, sched, variance, clip, steps, generator, prediction="epsilon", timesteps=None
):
    s = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=sched, variance_type=variance, clip_sample=clip,
        prediction_type=prediction,
    )  # fmt: skip
    if timesteps is None:
        s.set_timesteps(steps)
    else:
        s.set_timesteps(timesteps=timesteps)
    x = noise.clone()
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(net(x, t.expand(x.shape[0])), t, x, generator=generator).prev_sample
    return x


# ----------------------------------------------------------------------------- schedules


def test_betas_match_diffusers():
    for name, ours in (("linear", "linear"), ("squaredcos_cap_v2", "cosine")):
        theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name).betas.double()
        torch.testing.assert_close(ddpm_betas(1000, ours), theirs, atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- reference vs diffusers


@pytest.mark.parametrize(
    "variance,sched,clip",
    [
        ("learned_range", "squaredcos_cap_v2", True),
        ("learned_range", "linear", False),
        ("fixed_small", "linear", True),
        ("fixed_small", "squaredcos_cap_v2", False),
        ("fixed_large", "squaredcos_cap_v2", True),
        ("fixed_large", "linear", False),
    ],
)
def test_reference_equals_diffusers_ddpm(variance, sched, clip):
    net = Net(variance.startswith("learned"))
    noise = torch.randn(2, C, HW, HW, generator=torch.Generator().manual_seed(1))
    expect = _diffusers_ddpm(net, noise, sched, variance, clip, 12, torch.Generator().manual_seed(3))
    betas = ddpm_betas(1000, "linear" if sched == "linear" else "cosine")
    got = R.sample_ancestral(
        net, noise, betas, num_steps=12, variance=variance, clip_denoised=clip,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=2e-4)


def test_reference_equals_diffusers_custom_timesteps_v_prediction_per_sample_generator():
    """iDDPM section-count respacing passed as explicit timesteps; v-prediction; one stream per sample."""
    net = Net(True)
    noise = torch.randn(3, C, HW, HW, generator=torch.Generator().manual_seed(2))
    ts = space_timesteps(1000, "4,3,2")
    expect = _diffusers_ddpm(
        net, noise, "squaredcos_cap_v2", "learned_range", True, None,
        [torch.Generator().manual_seed(s) for s in (5, 6, 7)], "v_prediction", ts.tolist(),
    )  # fmt: skip
    got = R.sample_ancestral(
        net, noise, ddpm_betas(1000, "cosine"), ts, variance="learned_range",
        prediction_type="v_prediction", generator=PerSampleGenerator([5, 6, 7]),
    )  # fmt: skip
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.7, True), (1.0, False)])
def test_reference_equals_diffusers_ddim(eta, clip):
    net = Net(False)
    noise = torch.randn(2, C, HW, HW, generator=torch.Generator().manual_seed(4))
    s = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(9)
    x = noise.clone()
    with torch.no_grad():
        for t in s.timesteps:
            out = net(x, t.expand(2))
            x = s.step(out, t, x, eta=eta, use_clipped_model_output=True, generator=g).prev_sample
    got = R.sample_ancestral(
        net, noise, ddpm_betas(1000, "linear"), num_steps=10, variance="fixed_small", eta=eta,
        clip_denoised=clip, generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    torch.testing.assert_close(got, x, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_reference_gaussian_data_ideal_epsilon_has_the_closed_form_moments(variance):
    """Data N(mu, s^2) per element: the ideal epsilon is linear in x_t, so each step is
    x' = g x + h + std z and the output is Gaussian with mean / variance from that recursion (float64,
    computed here from the paper's formulas). The sampled moments must match within 4 standard errors
    (16384 samples x 8 elements, fixed seed); the two fixed variances bracket s^2 (Ho et al. Sec. 3.2)."""
    mu, s = 0.3, 0.5
    betas = ddpm_betas(1000, "cosine")
    abar = torch.cumprod(1 - betas, 0)

    def eps(x, t):
        a = abar[t].reshape(-1, 1, 1, 1).to(x.dtype)
        # x_t = sqrt(a) x0 + sqrt(1-a) e: E[e | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    ts = space_timesteps(1000, "ddim50").tolist()
    mean, var = 0.0, 1.0
    for i, t in enumerate(ts):
        a, ap = float(abar[t]), (float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0)
        beta = 1 - a / ap
        k1 = math.sqrt(1 - a) / (a * s * s + 1 - a)  # eps = k1 x + k0
        k0 = -k1 * math.sqrt(a) * mu
        c1, c2 = beta * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - beta) / (1 - a)
        g = c1 * (1 - math.sqrt(1 - a) * k1) / math.sqrt(a) + c2
        h = -c1 * math.sqrt(1 - a) * k0 / math.sqrt(a)
        std2 = 0.0 if i + 1 == len(ts) else (beta * (1 - ap) / (1 - a) if variance == "fixed_small" else beta)
        mean, var = g * mean + h, g * g * var + std2
    assert (var < s * s) if variance == "fixed_small" else (var > s * s)

    n = 16384
    noise = torch.randn(n, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = R.sample_ancestral(
        eps, noise, betas, torch.tensor(ts), variance=variance, clip_denoised=False,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    m, v = out.mean(0), out.var(0)
    assert (m - mean).abs().max() < 4 * math.sqrt(var / n)
    assert (v - var).abs().max() < 4 * var * math.sqrt(2 / n)


# ----------------------------------------------------------------------------- engine vs reference


def _backends():
    names = ["torch"]
    if ops.backend_status("cpu", torch.device("cpu")) is None:
        names.append("cpu")
    if ops.backend_status("triton", torch.device("cpu")) is None:
        names.append("triton")
    return names


def _supported(backend: str) -> bool:
    """The ops engineer lands the native / triton kernels separately: skip until they exist."""
    try:
        fn = ops.raw_ancestral_step(backend)
        x = torch.zeros(1, 2)
        fn(x, torch.zeros(1, 2), torch.zeros(8), out=x, variance="fixed", clip=False, k=None,
           guidance_scale=1.0, noise=None, seeds=None, step=0, out_net=None, bad=None,
           bad_step=0)  # fmt: skip
    except (AttributeError, NotImplementedError, RuntimeError, TypeError):
        return False
    return True


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    "variance,prediction,clip,w,phi,mode,eta",
    [
        ("learned_range", "epsilon", True, 1.0, 0.0, "exact", None),
        ("learned", "v_prediction", False, 3.0, 0.0, "exact", None),
        ("fixed_small", "epsilon", False, 2.0, 0.7, "fused", None),
        ("fixed_large", "sample", True, 1.0, 0.0, "fused", None),
        ("learned_range", "epsilon", True, 2.5, 0.5, "exact", None),
        ("learned_range", "epsilon", True, 1.0, 0.0, "exact", 0.5),
        ("fixed_small", "epsilon", False, 1.0, 0.0, "fused", 1.0),
    ],
)
def test_engine_equals_reference(backend, variance, prediction, clip, w, phi, mode, eta):
    if not _supported(backend):
        pytest.skip(f"ops.ancestral_step has no {backend} kernel yet")
    learned = variance.startswith("learned")
    net = Net(learned, seed=3)
    noise = torch.randn(2, C, HW, HW, generator=torch.Generator().manual_seed(5))
    kw = dict(
        num_steps=8, variance=variance, prediction_type=prediction, clip_denoised=clip, eta=eta,
        guidance_scale=w, guidance_rescale=phi, noise_mode=mode,
    )  # fmt: skip
    cond = {"label": torch.tensor([1.0, -1.0])} if w != 1 else None
    uncond = {"label": torch.zeros(2)} if w != 1 else None
    betas = ddpm_betas(1000, "cosine")
    seeds = [11, 12] if mode == "fused" else None
    expect = R.sample_ancestral(
        net,
        noise,
        betas,
        cond=cond,
        uncond=uncond,
        seeds=seeds,
        generator=torch.Generator().manual_seed(8),
        **kw,
    )
    got = sample_ancestral(
        net, noise, betas, cond=cond, uncond=uncond, seeds=seeds, generator=torch.Generator().manual_seed(8),
        backend=backend, **kw,
    )  # fmt: skip
    torch.testing.assert_close(got, expect, atol=5e-5, rtol=5e-5)


def test_engine_equals_diffusers_and_reuses_its_plan():
    net = Net(True)
    noise = torch.randn(2, C, HW, HW, generator=torch.Generator().manual_seed(1))
    expect = _diffusers_ddpm(
        net, noise, "squaredcos_cap_v2", "learned_range", True, 20, torch.Generator().manual_seed(3)
    )
    s = AncestralSampler(net, ddpm_betas(1000, "cosine"), num_steps=20, backend="torch")
    for _ in range(2):
        got = s(noise, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(got, expect, atol=2e-4, rtol=2e-4)
    assert len(s._plans) == 1


def test_ddim_eta0_is_deterministic_and_ignores_the_generator():
    net = Net(False)
    noise = torch.randn(2, C, HW, HW, generator=torch.Generator().manual_seed(1))
    betas = ddpm_betas(1000, "linear")
    a = sample_ancestral(net, noise, betas, num_steps=6, variance="fixed_small", eta=0.0, backend="torch")
    g = torch.Generator().manual_seed(0)
    b = sample_ancestral(
        net, noise, betas, num_steps=6, variance="fixed_small", eta=0.0, generator=g, backend="torch"
    )
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert g.initial_seed() == 0 and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


def test_plan_rows_match_the_posterior_formulas():
    betas = ddpm_betas(1000, "linear")
    ts = space_timesteps(1000, "ddim5")
    rows, noise_on, _, _ = step_rows(betas, ts, Opts.create(variance="learned_range"))
    abar = torch.cumprod(1 - betas, 0)
    a, a_prev = float(abar[ts[1]]), float(abar[ts[2]])
    beta = 1 - a / a_prev
    row = rows[1]
    assert math.isclose(float(row[L.ANC_COEF1]), beta * math.sqrt(a_prev) / (1 - a), rel_tol=1e-12)
    assert math.isclose(float(row[L.ANC_COEF2]), (1 - a_prev) * math.sqrt(1 - beta) / (1 - a), rel_tol=1e-12)
    assert math.isclose(
        float(row[L.ANC_LOG_BETA_TILDE]), math.log(beta * (1 - a_prev) / (1 - a)), rel_tol=1e-12
    )
    # the last step: no noise, and iDDPM's clipped log variance (the step above's beta_tilde)
    assert float(rows[-1, L.ANC_S]) == 0 and tuple(noise_on) == (True,) * 4 + (False,)
    assert float(rows[-1, L.ANC_LOG_BETA_TILDE]) == float(rows[-2, L.ANC_LOG_BETA_TILDE])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"variance": "fixed"}, ValueError, "variance"),
        ({"prediction_type": "x0"}, ValueError, "prediction_type"),
        ({"clip_denoised": 1}, TypeError, "clip_denoised"),
        ({"eta": -1.0}, ValueError, "eta"),
        ({"guidance_rescale": 2.0}, ValueError, "guidance_rescale"),
        ({"noise_mode": "philox"}, ValueError, "noise_mode"),
        ({"spacing": "ddim7x"}, ValueError, "ddimN"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"timesteps": [5, 7]}, ValueError, "decreasing"),
        ({"timesteps": [1000, 3]}, ValueError, "999"),
        ({"betas": torch.zeros(10)}, ValueError, "betas"),
        ({"guidance_scale": 2.0}, ValueError, "uncond"),
        ({"noise_mode": "fused"}, ValueError, "seeds"),
        ({"variance": "fixed_small"}, ValueError, "channels"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, match):
    kwargs = dict(kwargs)
    betas = kwargs.pop("betas", ddpm_betas(1000))
    timesteps = kwargs.pop("timesteps", None)
    with pytest.raises(exc, match=match):
        sample_ancestral(
            Net(True), torch.randn(2, C, HW, HW), betas, timesteps,
            num_steps=kwargs.pop("num_steps", 4), backend="torch", **kwargs,
        )  # fmt: skip


def test_non_finite_model_output_is_reported_with_its_step():
    def bad(x, t):
        out = torch.zeros(x.shape[0], 2 * C, HW, HW)
        return out.fill_(math.nan) if int(t[0]) < 500 else out

    with pytest.raises(FloatingPointError, match="step"):
        sample_ancestral(bad, torch.randn(1, C, HW, HW), ddpm_betas(1000), num_steps=4, backend="torch")


class _FakeGraph:
    def __init__(self, run):
        self.run = run

    def replay(self):
        self.run(False)


def test_graph_path_refills_static_buffers_and_predraws_exact_noise(monkeypatch):
    """The graph path (static buffers, staged exact noise, refill, replay) on the CPU: a "graph" that
    re-runs the captured loop stands in for torch.cuda.CUDAGraph."""
    import edmfast.engine as engine

    def fake_capture(run, device, generators=()):
        run(True)  # the warm-up run, as graphs.capture does
        return _FakeGraph(run), 0.0

    monkeypatch.setattr(engine, "capture", fake_capture)
    net = Net(True, seed=4)
    betas = ddpm_betas(1000, "cosine")
    kw = dict(num_steps=6, guidance_scale=2.0, guidance_rescale=0.5, backend="torch")
    s = AncestralSampler(net, betas, **kw)
    s.engine._graph_key = lambda call: ("cpu-graph", tuple(call.noise.shape), call.plan.structure)
    cond, uncond = {"label": torch.tensor([1.0, 2.0])}, {"label": torch.zeros(2)}
    # "auto": the first call runs eagerly, the second captures and replays, the third replays
    for seed in (1, 2, 3):
        noise = torch.randn(2, C, HW, HW, generator=torch.Generator().manual_seed(seed))
        got = s(noise, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(seed))
        expect = R.sample_ancestral(
            net, noise, betas, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(seed), **kw
        )
        torch.testing.assert_close(got, expect, atol=5e-5, rtol=5e-5)
    assert s.stats["captures"] == 1 and s.stats["replays"] == 2


def test_engine_equals_diffusers_with_a_random_unet2d():
    """A 2C-output diffusers UNet2DModel (random weights, tiny), learned_range, cosine, respaced."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=C, out_channels=2 * C, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()  # fmt: skip

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t):
            return self.unet(x, t).sample

    net = Wrapped()
    noise = torch.randn(1, C, 8, 8, generator=torch.Generator().manual_seed(1))
    expect = _diffusers_ddpm(
        net, noise, "squaredcos_cap_v2", "learned_range", True, 4, torch.Generator().manual_seed(2)
    )
    got = sample_ancestral(
        net, noise, ddpm_betas(1000, "cosine"), num_steps=4, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_engine_half_precision_model_equals_reference(backend, dtype):
    """A half-precision model gets its input in its dtype and its exact noise is drawn in that dtype
    (as diffusers' randn_tensor does); odd sample size (3 x 7 x 3)."""
    if not _supported(backend):
        pytest.skip(f"ops.ancestral_step has no {backend} kernel yet")
    net = Net(True, seed=6).to(dtype)
    noise = torch.randn(3, C, 7, 3, generator=torch.Generator().manual_seed(2))
    betas = ddpm_betas(1000, "linear")
    kw = dict(num_steps=5, guidance_scale=1.5, noise_mode="exact")
    cond, uncond = {"label": torch.ones(3, dtype=dtype)}, {"label": torch.zeros(3, dtype=dtype)}
    expect = R.sample_ancestral(
        net, noise, betas, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(4), **kw
    )
    got = sample_ancestral(
        net,
        noise,
        betas,
        cond=cond,
        uncond=uncond,
        generator=torch.Generator().manual_seed(4),
        backend=backend,
        **kw,
    )
    # the network input is rounded to the model dtype in both; what differs is float32 vs float64 state
    torch.testing.assert_close(got, expect, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_exact_noise_consumes_the_generator_like_diffusers(spacing):
    """diffusers draws on every step with t > 0 (with trailing spacing also on the last step, where
    edmfast adds no noise): the generator must end in the same state, and the images agree."""
    net = Net(False)
    noise = torch.randn(2, C, HW, HW, generator=torch.Generator().manual_seed(1))
    s = diffusers.DDPMScheduler(beta_schedule="linear", variance_type="fixed_small", timestep_spacing=spacing)
    s.set_timesteps(7)
    ts = torch.as_tensor(s.timesteps)
    full = sample_ancestral(
        net, noise, ddpm_betas(), num_steps=7, spacing=spacing, variance="fixed_small",
        generator=torch.Generator().manual_seed(3), backend="torch",
    )  # fmt: skip
    g3 = torch.Generator().manual_seed(3)
    sample_ancestral(net, noise, ddpm_betas(), ts, variance="fixed_small", generator=g3, backend="torch")
    g4 = torch.Generator().manual_seed(3)
    x = noise.clone()
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(net(x, t.expand(2)), t, x, generator=g4).prev_sample
    assert torch.equal(g3.get_state(), g4.get_state())
    if int(ts[-1]) == 0:  # no noise on the last step in either: the same images
        torch.testing.assert_close(full, x, atol=2e-4, rtol=2e-4)


def test_spacing_strings_run_end_to_end():
    net = Net(True)
    noise = torch.randn(1, C, HW, HW, generator=torch.Generator().manual_seed(1))
    betas = ddpm_betas(1000, "cosine")
    for spacing in ("ddim10", "4,3,3"):
        a = sample_ancestral(net, noise, betas, spacing=spacing, generator=torch.Generator().manual_seed(0))
        b = R.sample_ancestral(
            net, noise, betas, space_timesteps(1000, spacing), generator=torch.Generator().manual_seed(0)
        )
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_reference_ancestral_step_against_the_formula():
    """The op contract in float64 against the formula written out here (learned_range, CFG, clip)."""
    g = torch.Generator().manual_seed(0)
    x, f, z = torch.randn(2, 3, generator=g), torch.randn(4, 6, generator=g), torch.randn(2, 3, generator=g)
    coef = torch.tensor([1.3, -0.8, 0.6, 0.35, -2.0, -3.0, 0.9, 1.0])
    out = R.ancestral_step(x, f, coef, variance="learned_range", clip=True, guidance_scale=2.0, noise=z)
    F = f[2:, :3] + 2.0 * (f[:2, :3] - f[2:, :3])
    x0 = (1.3 * x - 0.8 * F).clamp(-1, 1)
    frac = (f[:2, 3:] + 1) / 2
    std = 0.9 * torch.exp((frac * -2.0 + (1 - frac) * -3.0) / 2)
    torch.testing.assert_close(out, (0.6 * x0 + 0.35 * x + std * z).double(), atol=1e-6, rtol=1e-6)
    coef[L.ANC_S] = 0  # the last step: the mean only
    out = R.ancestral_step(x, f[:2, :3], coef, variance="fixed", clip=False, noise=z)
    torch.testing.assert_close(
        out, (0.6 * (1.3 * x - 0.8 * f[:2, :3]) + 0.35 * x).double(), atol=1e-6, rtol=1e-6
    )


def test_the_function_cache_does_not_keep_the_model_alive():
    import gc
    import weakref

    net = Net(False)
    ref = weakref.ref(net)
    sample_ancestral(
        net, torch.randn(1, C, HW, HW), ddpm_betas(), num_steps=2, variance="fixed_small", backend="torch"
    )
    del net
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clipped_eps", [True, False], ids=["clipped-eps", "model-eps"])
def test_ddim_clip_range_and_model_eps_equal_the_reference(backend, prediction, clipped_eps):
    """DDIM with eta, clipping to [-2, 2] (diffusers' clip_sample_range) and the model's own eps in
    the direction term (DDIMScheduler.step's default, use_clipped_model_output=False) or the one
    recomputed from the clipped x0 (iDDPM / ADM): the engine (the ancestral cf / clip columns)
    equals the float64 oracle."""
    net = Net(False, seed=3)
    noise = 2.5 * torch.randn(2, C, HW, HW, generator=torch.Generator().manual_seed(8))
    betas = ddpm_betas(1000, "linear")
    kw = dict(
        num_steps=6, eta=0.6, variance="fixed_small", prediction_type=prediction, clip_range=2.0,
        use_clipped_model_output=clipped_eps,
    )  # fmt: skip
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    got = sample_ancestral(net, noise, betas, generator=g1, backend=backend, **kw)
    expect = R.sample_ancestral(net, noise, betas, generator=g2, **kw)
    torch.testing.assert_close(got, expect, atol=2e-5, rtol=2e-5)
