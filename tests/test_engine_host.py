"""The engine's host path: what runs per step, concurrency, inference mode, per-call guidance,
sample()'s Sampler cache, and clear errors for what a denoiser or a caller can get wrong."""

import gc
import threading
import time

import numpy as np
import pytest
import torch

import edmfast
from edmfast import engine, ops, reference
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser
from tests.conftest import rel_err

RUN_TOL = 2e-5


def _precond():
    return edmfast.EDMPrecond(EDMNetworkOf(GaussianDenoiser(0.0, 0.5)))


# ----------------------------------------------------------------------------- launches per step


class _Counting:
    def __init__(self, fn, shared=None):
        self.fn, self.calls, self.shared = fn, 0, shared

    def __call__(self, *args, **kwargs):
        if self.shared is not None:
            self.shared.calls += 1
        else:
            self.calls += 1
        return self.fn(*args, **kwargs)


def _profile_call(monkeypatch, num_steps, **options):
    """(kernel launches, other torch ops) of one warm Sampler call whose network runs no torch op."""
    backend = "cpu"
    step, cfg = _Counting(None), _Counting(None)

    def counting(prepare, counter):
        def make(*args, **kwargs):
            launch = prepare(*args, **kwargs)

            def counted(*a):
                counter.calls += 1
                return launch(*a)

            return counted

        return make

    monkeypatch.setattr(ops, "prepare_affine_step", counting(ops.prepare_affine_step, step))
    monkeypatch.setattr(ops, "prepare_cfg_rescale_factors", counting(ops.prepare_cfg_rescale_factors, cfg))
    # the start pass reads the caller's noise through the unchecked entry
    affine, ancestral, cfg_entry = engine._kernels(backend)
    monkeypatch.setattr(engine, "_kernels", lambda b: (_Counting(affine, step), ancestral, cfg_entry))
    batch = 2
    use_cfg = options.get("guidance_scale", 1.0) != 1.0
    out = torch.randn(2 * batch if use_cfg else batch, 3, 4, 4)

    def den(x, sigma, **cond):
        return out  # no torch op: everything the profiler sees is the engine's

    s = edmfast.Sampler(den, num_steps=num_steps, backend=backend, **options)
    kw = dict(cond={"y": 1}, uncond={"y": 1}) if use_cfg else {}
    noise = torch.randn(batch, 3, 4, 4)
    s(noise, **kw)  # warm: plan and buffers cached
    step.calls = cfg.calls = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        s(noise, **kw)
    ops_ = [e.name for e in prof.events() if e.name.startswith("aten::")]
    return step.calls, cfg.calls, ops_


@pytest.mark.parametrize(
    "options, cfg_per_step",
    [({}, 0), (dict(guidance_scale=3.0, guidance_rescale=0.7), 2)],
    ids=["plain", "cfg-rescale"],
)
def test_exactly_two_launches_per_heun_step_and_no_other_torch_op_in_the_loop(
    monkeypatch, options, cfg_per_step
):
    few = _profile_call(monkeypatch, 4, **options)
    many = _profile_call(monkeypatch, 12, **options)
    for n, (steps, cfgs, _) in ((4, few), (12, many)):
        # 1 start pass + 2 per Heun step, the last step (to sigma = 0) an Euler step: 2N launches
        assert steps == 2 * n
        assert cfgs == cfg_per_step * n - (cfg_per_step // 2)
    # the torch ops outside the kernels (the fill of the flags, the result copy, the one read of
    # the flags, CFG's cat of the conditioning) do not grow with the number of steps
    assert sorted(few[2]) == sorted(many[2]), (few[2], many[2])
    assert len(few[2]) <= 12, few[2]


# ----------------------------------------------------------------------------- concurrency


def test_one_sampler_from_two_threads_gives_each_call_its_own_result(backend_device):
    backend, device = backend_device
    if backend == "triton":
        pytest.skip("interpreter time")
    g = GaussianDenoiser(0.0, 0.5)

    def slow(x, sigma, **cond):
        time.sleep(2e-4)  # let the other thread run between the passes
        return g(x, sigma)

    s = edmfast.Sampler(slow, num_steps=8, backend=backend)
    noises = [torch.randn(2, 3, 8, 8, device=device) for _ in range(6)]
    expected = [edmfast.Sampler(slow, num_steps=8, backend=backend)(n) for n in noises]
    got: dict[int, torch.Tensor] = {}

    def work(idx):
        for i in idx:
            got[i] = s(noises[i])

    threads = [threading.Thread(target=work, args=(range(k, 6, 2),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate(expected):
        assert torch.equal(got[i], e), f"call {i} got another call's state"


def test_reentrant_call_from_inside_the_denoiser_is_correct():
    g = GaussianDenoiser(0.0, 0.5)
    inner_noise = torch.randn(2, 3, 4, 4)
    inner = {}

    def den(x, sigma):
        if not inner:
            inner["busy"] = True
            inner["out"] = s(inner_noise)  # same Sampler, same shape, mid-call
        return g(x, sigma)

    s = edmfast.Sampler(den, num_steps=5, backend="cpu")
    noise = torch.randn(2, 3, 4, 4)
    out = s(noise)
    plain = edmfast.Sampler(g, num_steps=5, backend="cpu")
    assert torch.equal(out, plain(noise)) and torch.equal(inner["out"], plain(inner_noise))


@pytest.mark.parametrize("first_inside", [True, False], ids=["inference-first", "normal-first"])
def test_inference_mode_either_order(backend_device, first_inside):
    backend, device = backend_device
    if backend == "triton":
        pytest.skip("interpreter time")
    s = edmfast.Sampler(_precond().to(device), num_steps=4, backend=backend)
    noise = torch.randn(2, 3, 4, 4, device=device)
    with torch.inference_mode():
        inside = s(noise) if first_inside else None
    outside = s(noise)
    if not first_inside:
        with torch.inference_mode():
            inside = s(noise)
    assert torch.equal(inside, outside)


# ----------------------------------------------------------------------------- guidance per call


def test_guidance_values_per_call():
    den = _precond()
    noise = torch.randn(2, 3, 4, 4)
    # a varying mu (a constant one makes std(cfg) ~ 0 late in the run: an ill-conditioned ratio)
    mu = torch.linspace(-1, 1, noise[0].numel()).reshape(noise.shape[1:]).expand_as(noise).contiguous()
    kw = dict(cond={"mu": mu}, uncond={"mu": torch.zeros_like(mu)})
    s = edmfast.Sampler(den, num_steps=6, guidance_scale=2.0, guidance_rescale=0.5, backend="cpu")
    for w, phi in ((2.0, 0.5), (4.0, 0.7), (1.5, 0.0), (2.0, 0.5)):
        got = s(noise, guidance_scale=w, guidance_rescale=phi, **kw)
        ref = reference.sample(den, noise.double(), num_steps=6, guidance_scale=w, guidance_rescale=phi, **kw)
        assert rel_err(got, ref) < RUN_TOL, (w, phi)
    with pytest.raises(TypeError, match="guidance_rescale"):
        s(noise, guidance_rescale=True, **kw)
    with pytest.raises(ValueError, match="guidance_scale"):
        s(noise, guidance_scale=1e39, **kw)


# ----------------------------------------------------------------------------- sample() cache


def test_sample_reuses_one_sampler_per_denoiser_and_options_and_forgets_dead_denoisers():
    engine._cache.clear()
    den = _precond()
    noise = torch.randn(2, 3, 4, 4)
    a = edmfast.sample(den, noise, num_steps=5, backend="cpu")
    assert len(engine._cache) == 1
    (s,) = engine._cache.values()
    b = edmfast.sample(den, noise, num_steps=5, backend="cpu")
    assert torch.equal(a, b) and list(engine._cache.values()) == [s]
    edmfast.sample(den, noise, num_steps=6, backend="cpu")
    assert len(engine._cache) == 2
    del den, s
    gc.collect()
    assert len(engine._cache) == 0  # held weakly: a model is never kept alive by the cache
    den = _precond()
    edmfast.sample(den, noise, num_steps=5, backend="cpu")
    engine.clear_sample_cache()
    assert len(engine._cache) == 0


# ----------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    "value", [(torch.zeros(2, 3, 4, 4),), None, 0.5, np.zeros((2, 3, 4, 4), np.float32)], ids=str
)
def test_denoiser_returning_a_non_tensor_is_a_type_error(value):
    with pytest.raises(TypeError, match="the denoiser returned"):
        edmfast.sample(lambda x, s: value, torch.randn(2, 3, 4, 4), num_steps=3, backend="cpu")


@pytest.mark.parametrize(
    "inner",
    [{"a": torch.ones(2, 3)}, [torch.ones(2)], np.ones(2)],
    ids=["dict-of-tensor", "list-of-tensor", "array"],
)
def test_nested_tensors_in_cond_with_guidance_name_the_key(inner):
    def den(x, sigma, extra):
        return x

    with pytest.raises(TypeError, match=r"cond\['extra'\]"):
        edmfast.sample(
            den,
            torch.randn(2, 3, 4, 4),
            num_steps=3,
            guidance_scale=2.0,
            cond={"extra": inner},
            uncond={"extra": inner},
            backend="cpu",
        )


@pytest.mark.parametrize("seeds", [[1.0, 2.0], [True, False], [1, 2.5]], ids=str)
def test_float_or_bool_seeds_are_rejected(seeds):
    with pytest.raises(TypeError, match="seeds"):
        edmfast.sample(
            lambda x, s: x, torch.randn(2, 3, 4, 4), num_steps=3, s_churn=10, noise_mode="fused", seeds=seeds
        )


def test_finite_state_whose_float32_sum_overflows_is_not_blamed_on_the_denoiser(backend_device):
    """D(x) = x keeps the state at 2.4e38 per element: finite, but its per-sample float32 sum is not."""
    backend, device = backend_device
    noise = torch.full((2, 3, 4, 4), 3e36, device=device)
    out = edmfast.sample(lambda x, s: x, noise, [80.0, 40.0, 0.0], backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, noise * 80, rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", [0.09, 0.01, 1e-8])
def test_small_alpha_is_refused_by_the_fused_engine_not_silently_wrong(alpha):
    with pytest.raises(ValueError, match="alpha"):
        edmfast.sample(lambda x, s: x, torch.randn(1, 3, 4, 4), solver="2nd", alpha=alpha)
    edmfast.reference.sample(lambda x, s: x, torch.randn(1, 3, 4, 4), num_steps=3, solver="2nd", alpha=alpha)


def test_smallest_accepted_alpha_meets_the_run_budget():
    den = _precond()
    noise = torch.randn(3, 3, 5, 7)
    for n in (12, 32):
        out = edmfast.sample(
            den, noise, num_steps=n, solver="2nd", alpha=edmfast.sampler.ALPHA_MIN, backend="cpu"
        )
        ref = reference.sample(
            den, noise.double(), num_steps=n, solver="2nd", alpha=edmfast.sampler.ALPHA_MIN
        )
        assert rel_err(out, ref) < RUN_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_a_whole_call_makes_no_host_sync_but_the_final_check(graph):
    """Under sync debug mode "error" every implicit device->host sync raises; the one read of the
    flags after the loop is allowed by leaving the mode for it."""
    dev = torch.device("cuda")
    den = _precond().to(dev)
    noise = torch.randn(2, 3, 8, 8, device=dev)
    mu = torch.ones_like(noise)
    kw = dict(cond={"mu": mu}, uncond={"mu": 0 * mu}, seeds=torch.tensor([1, 2], device=dev))
    s = edmfast.Sampler(den, num_steps=6, guidance_scale=2.0, guidance_rescale=0.5, s_churn=10,
                        noise_mode="fused", cuda_graph=graph)  # fmt: skip
    s(noise, **kw)  # warm: capture, plan, buffers
    finish = s._finish

    def checked_finish(*args):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return finish(*args)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    s._finish = checked_finish
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = s(noise, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()
