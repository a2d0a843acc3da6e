"""Whole-loop CUDA graphs: capture once, replay for new inputs, re-capture rules, pool release.

Every test here needs a CUDA device and is skipped (with the reason) without one.
"""

import pytest
import torch

import edmfast
from edmfast import reference
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser
from tests.conftest import HAS_CUDA, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

DEV = torch.device("cuda")


def _den():
    return edmfast.EDMPrecond(EDMNetworkOf(GaussianDenoiser(0.0, 0.5))).to(DEV)


def _graph_backends():
    return [b for b in ("cuda", "triton", "torch") if edmfast.ops.backend_status(b, DEV) is None]


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_replay_with_new_noise_seeds_and_sigmas_equals_a_fresh_eager_run(backend):
    if backend not in _graph_backends():
        pytest.skip(f"{backend} unavailable")
    den = _den()
    kw = dict(num_steps=8, s_churn=30, noise_mode="fused", backend=backend)
    s = edmfast.Sampler(den, cuda_graph=True, **kw)
    for trial in range(3):
        noise = torch.randn(4, 3, 16, 16, device=DEV)
        seeds = torch.randint(0, 2**40, (4,), device=DEV)
        sig = edmfast.karras_sigmas(8, sigma_max=80.0 - 10 * trial)
        got = s(noise, sig, seeds=seeds)
        eager = edmfast.sample(den, noise, sig, cuda_graph=False, seeds=seeds, **kw)
        ref = reference.sample(
            den, noise.double(), sig, seeds=seeds, num_steps=8, s_churn=30, noise_mode="fused"
        )
        assert torch.allclose(got, eager, rtol=1e-5, atol=1e-5)
        assert rel_err(got, ref) < 2e-5
    assert s.stats["captures"] == 1 and s.stats["replays"] == 3


def test_exact_noise_mode_in_a_graph_matches_the_reference():
    den = _den()
    s = edmfast.Sampler(den, num_steps=6, s_churn=20, cuda_graph=True)
    seeds = [5, 6]
    for _ in range(2):
        rng = edmfast.PerSampleGenerator(seeds, device=DEV)
        noise = rng.randn([2, 3, 8, 8])
        got = s(noise, generator=rng)
        rng2 = edmfast.PerSampleGenerator(seeds, device=DEV)
        ref = reference.sample(
            den, rng2.randn([2, 3, 8, 8]).double(), generator=rng2, num_steps=6, s_churn=20
        )
        assert rel_err(got, ref) < 2e-5
    assert s.stats["captures"] == 1


def test_cfg_conditioning_is_refreshed_on_replay():
    g = GaussianDenoiser(0.0, 0.5)
    den = edmfast.EDMPrecond(EDMNetworkOf(g)).to(DEV)
    s = edmfast.Sampler(den, num_steps=6, guidance_scale=4.0, guidance_rescale=0.7, cuda_graph=True)
    noise = torch.randn(2, 3, 8, 8, device=DEV)
    for scale in (0.5, 2.0):
        mu = torch.full_like(noise, scale)
        kw = dict(cond={"mu": mu}, uncond={"mu": torch.zeros_like(mu)})
        got = s(noise, **kw)
        ref = reference.sample(
            den, noise.double(), num_steps=6, guidance_scale=4.0, guidance_rescale=0.7, **kw
        )
        assert rel_err(got, ref) < 2e-5
    assert s.stats["captures"] == 1


def test_recapture_rules_and_bounded_cache():
    s = edmfast.Sampler(_den(), num_steps=4, cuda_graph=True, max_graphs=2)
    s(torch.randn(2, 3, 8, 8, device=DEV))
    s(torch.randn(2, 3, 8, 8, device=DEV))  # same configuration: replay
    assert s.stats["captures"] == 1
    s(torch.randn(3, 3, 8, 8, device=DEV))  # new batch size: capture
    s(torch.randn(2, 3, 8, 8, device=DEV, dtype=torch.float64))  # new dtype: capture, evicts the oldest
    assert s.stats["captures"] == 3 and len(s._graphs) == 2
    s(torch.randn(2, 3, 8, 8, device=DEV), edmfast.karras_sigmas(7))  # more steps: capture
    assert s.stats["captures"] == 4


def test_release_returns_the_graph_memory():
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    s = edmfast.Sampler(_den(), num_steps=4, cuda_graph=True)
    s(torch.randn(8, 3, 64, 64, device=DEV))
    assert torch.cuda.memory_allocated() > base
    s.release()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base + 1024


def test_repeated_replays_do_not_grow_device_memory():
    s = edmfast.Sampler(_den(), num_steps=4, cuda_graph=True)
    noise = torch.randn(4, 3, 32, 32, device=DEV)
    s(noise)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(20):
        s(noise)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before


def test_nan_inside_a_graph_is_reported_after_the_replay():
    class Bad(torch.nn.Module):
        def forward(self, x, c_noise):
            return x * torch.where(c_noise < 0, float("nan"), 1.0).reshape(-1, 1, 1, 1)

    s = edmfast.Sampler(edmfast.EDMPrecond(Bad()), num_steps=8, cuda_graph=True)
    with pytest.raises(FloatingPointError, match="step"):
        s(torch.randn(2, 3, 8, 8, device=DEV))


def test_auto_captures_when_a_configuration_repeats():
    s = edmfast.Sampler(_den(), num_steps=4)  # cuda_graph="auto"
    noise = torch.randn(2, 3, 8, 8, device=DEV)
    first = s(noise)
    assert s.stats["captures"] == 0  # a one-off call runs eagerly
    second = s(noise)
    assert s.stats["captures"] == 1 and s.stats["replays"] == 1
    third = s(noise)
    assert s.stats["captures"] == 1 and s.stats["replays"] == 2
    assert torch.allclose(first, second, rtol=1e-5, atol=1e-6) and torch.equal(second, third)


def test_one_graph_serves_any_guidance_value():
    den = _den()
    s = edmfast.Sampler(den, num_steps=6, guidance_scale=2.0, guidance_rescale=0.5, cuda_graph=True)
    noise = torch.randn(2, 3, 8, 8, device=DEV)
    mu = torch.linspace(-1, 1, noise[0].numel(), device=DEV).reshape(noise.shape[1:]).expand_as(noise)
    kw = dict(cond={"mu": mu.contiguous()}, uncond={"mu": torch.zeros_like(noise)})
    for w, phi in ((2.0, 0.5), (5.0, 0.9), (1.5, 0.1)):
        got = s(noise, guidance_scale=w, guidance_rescale=phi, **kw)
        ref = reference.sample(den, noise.double(), num_steps=6, guidance_scale=w, guidance_rescale=phi, **kw)
        assert rel_err(got, ref) < 2e-5
    assert s.stats["captures"] == 1 and s.stats["replays"] == 3


def test_repeated_sample_calls_take_the_graph_path():
    from edmfast import sampler

    den = _den()
    noise = torch.randn(2, 3, 8, 8, device=DEV)
    outs = [edmfast.sample(den, noise, num_steps=5) for _ in range(3)]
    (s,) = [v for v in sampler._samplers.values() if v.denoiser is den]
    assert s.stats["captures"] == 1 and s.stats["replays"] == 2
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6) and torch.equal(outs[1], outs[2])


def test_non_finite_noise_is_named_without_a_sync_before_the_loop():
    noise = torch.randn(2, 3, 8, 8, device=DEV)
    noise[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"noise must be finite.*\[1\]"):
        edmfast.Sampler(_den(), num_steps=4, cuda_graph=False)(noise)


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_ablation_plans_replay_in_one_graph(backend):
    """VP and VE baselines (sigma(t), s(t) folded into the rows) in a captured graph: equal to the
    eager loop and to reference.ablation_sample."""
    if backend not in _graph_backends():
        pytest.skip(f"{backend} unavailable")
    from edmfast.sampler import Sampler, ablation_sample
    from edmfast.solvers import AblationOptions

    den = _den()
    noise = torch.randn(4, 3, 16, 16, device=DEV)
    for kw in (
        dict(discretization="vp", schedule="vp", scaling="vp"),
        dict(discretization="ve", schedule="ve"),
    ):
        s = Sampler(den, ablation=AblationOptions.create(**kw), num_steps=8, backend=backend, cuda_graph=True)
        got = s(noise)
        assert s.stats["captures"] == 1
        eager = ablation_sample(den, noise, num_steps=8, backend=backend, cuda_graph=False, **kw)
        ref = reference.ablation_sample(den, noise.double(), num_steps=8, **kw)
        assert rel_err(got, eager) < 1e-6 and rel_err(got, ref) < 1.5e-4
