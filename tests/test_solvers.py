"""Every sampler as a plan of the one engine (edmfast.solvers): the plans' math against the real
k-diffusion (interpreted in float64, no kernels), the engine against the independent float64
oracle on every backend, the drop-ins against k-diffusion (same seeds, same noise, same
callbacks), one fused launch per network evaluation, and the refusals of conflicting options."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import edmfast
from edmfast import engine, ops, reference
from edmfast import k_diffusion as EK
from edmfast.analytic import EDMNetworkOf, GaussianMixtureDenoiser
from edmfast.options import K_SOLVERS, SamplerOptions
from edmfast.plan import START, Op, X
from edmfast.solvers import make_plan
from tests.conftest import HAS_CUDA, gpu, rel_err
from tests.test_k_diffusion import _load_k_diffusion_sampling

RUN_TOL = 2e-5  # float32 state vs the float64 oracle: within float32 rounding

# (solver, options) covering every solver and each option's non-default values
CASES = [
    ("euler", {}),
    ("heun", {}),
    ("euler_ancestral", {}),
    ("euler_ancestral", dict(eta=0.5, s_noise=1.1)),
    ("dpm_2", {}),
    ("dpm_2", dict(s_churn=2.0, s_noise=1.01)),
    ("dpm_2_ancestral", dict(eta=0.8)),
    ("lms", {}),
    ("lms", dict(order=2)),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_sde", {}),
    ("dpmpp_sde", dict(r=0.3, eta=0.7)),
    ("dpmpp_2m", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", dict(solver_type="heun", eta=0.5)),
    ("dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", dict(eta=0.0)),
]
IDS = [f"{s}-{','.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for s, kw in CASES]


@pytest.fixture(scope="module")
def kd():
    return _load_k_diffusion_sampling()


def _mixture(numel: int, dtype=torch.float64) -> GaussianMixtureDenoiser:
    g = torch.Generator().manual_seed(11)
    return GaussianMixtureDenoiser(torch.randn(3, numel, generator=g, dtype=dtype), s=0.3)


def _noise_sampler(shape, dtype=torch.float64, seed=42):
    """A deterministic stand-in for a noise sampler: the k-th call returns the k-th draw."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- plans (no kernels)


def _interpret(plan, den, x0, noise_fn):
    """The plan's program in float64 with `reference.affine_step` (the plan's own float32 rows)."""
    buf = {START: x0.double(), X: torch.zeros_like(x0, dtype=torch.float64)}
    for k in range(1, plan.slots + 1):
        buf[k] = torch.zeros_like(buf[X])
    net = f = eps = None
    for op, idx in plan.program:
        if op == Op.PASS:
            p = plan.passes[idx]
            out, netv, hist = reference.affine_step(
                buf[p.x], plan.coef[p.row].double(), f=f if p.f else None, hist=tuple(buf[h] for h in p.hist),
                noise=eps if p.noise is not None else None, hist_out=p.hist_out is not None,
            )  # fmt: skip
            if p.hist_out is not None:
                buf[p.hist_out] = hist
            buf[p.out] = out
            net = netv if p.net else net
        elif op == Op.EVAL:
            f = den(net, torch.full((x0.shape[0],), float(plan.eval_in[idx]), dtype=torch.float64))
        elif op == Op.DRAW:
            d = plan.draws[idx]
            eps = noise_fn(d.sigma, d.sigma_next)
    return buf[X]


@pytest.mark.parametrize("solver, kw", CASES, ids=IDS)
def test_plan_interpreted_in_float64_equals_k_diffusion(kd, solver, kw):
    """The plan's rows and program are k-diffusion's math: run in float64 (rows rounded to float32,
    hence ~1e-7), with k-diffusion's draws made in the same order, they give its result."""
    sig = edmfast.karras_sigmas(9, 0.02, 10.0)
    x0 = torch.randn(2, 3, 5, dtype=torch.float64) * sig[0]
    den = _mixture(15)
    plan = make_plan(den, sig, SamplerOptions.create(solver=solver, **kw), prescaled=True, draw_always=True)
    ours = _interpret(plan, den, x0, _noise_sampler(x0.shape))
    fn = getattr(kd, f"sample_{solver}")
    if "noise_sampler" in inspect.signature(fn).parameters:
        theirs = fn(den, x0.clone(), sig, disable=True, noise_sampler=_noise_sampler(x0.shape), **kw)
    else:  # euler / heun / dpm_2 draw with randn_like: the same stream from the global RNG
        g = torch.Generator().manual_seed(42)
        real = torch.randn_like
        torch.randn_like = lambda x, **k: torch.randn(x.shape, generator=g, dtype=torch.float64)
        try:
            theirs = fn(den, x0.clone(), sig, disable=True, **kw)
        finally:
            torch.randn_like = real
    assert rel_err(ours, theirs) < 1e-6


@pytest.mark.parametrize("solver, kw", CASES, ids=IDS)
def test_one_fused_pass_per_network_evaluation(solver, kw):
    """The program: one start pass, then exactly one fused pass per network evaluation."""
    plan = make_plan(_mixture(4), edmfast.karras_sigmas(12), SamplerOptions.create(solver=solver, **kw))
    ops_ = [op for op, _ in plan.program]
    assert ops_.count(Op.PASS) == ops_.count(Op.EVAL) + 1
    assert all(len(p.hist) <= 4 for p in plan.passes)


# ----------------------------------------------------------------------------- engine vs oracle


def _backends():
    out = ["torch", "cpu", "triton"]
    return out + (["cuda"] if HAS_CUDA else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("solver, kw", CASES, ids=IDS)
def test_engine_equals_the_float64_oracle(backend, solver, kw):
    """edmfast.sample(solver=NAME) == edmfast.reference.sample, exact and fused noise, a plain
    denoiser and an EDM preconditioner with CFG + rescale; odd sample size (3 x 5 x 7)."""
    device = "cuda" if backend in ("cuda",) or (backend == "triton" and HAS_CUDA) else "cpu"
    den = _mixture(105, torch.float32)
    pre = edmfast.EDMPrecond(EDMNetworkOf(den))
    noise = torch.randn(2, 3, 5, 7)
    cases = [
        (den, "exact", {}),
        (pre, "fused", dict(cond={}, uncond={}, guidance_scale=1.7, guidance_rescale=0.6)),
    ]
    if backend == "triton":  # the interpreter is slow: one case each
        cases = cases[1:]
    for d, mode, cfg in cases:
        opts = dict(solver=solver, num_steps=7, noise_mode=mode, **kw, **cfg)
        got = edmfast.sample(
            d.to(device), noise.to(device), generator=torch.Generator(device).manual_seed(5), seeds=[3, 9],
            backend=backend, **opts,
        )  # fmt: skip
        # the oracle draws exact noise in noise.dtype too (k-diffusion's randn_like): the same input
        ref = reference.sample(d, noise, generator=torch.Generator().manual_seed(5), seeds=[3, 9], **opts)
        assert rel_err(got.cpu(), ref) < RUN_TOL, (mode, bool(cfg))


@pytest.mark.parametrize("solver", ["dpmpp_2m", "lms", "dpmpp_3m_sde", "dpmpp_sde"])
def test_history_slots_survive_a_callback_and_equal_a_run_without(solver):
    """A callback runs the eager loop with one extra pass per step; history slots are untouched."""
    den = _mixture(12, torch.float32)
    noise = torch.randn(2, 3, 4)
    seen = []
    kw = dict(solver=solver, num_steps=6, backend="cpu", noise_mode="fused", seeds=[1, 2])
    a = edmfast.sample(den, noise, **kw)
    b = edmfast.sample(den, noise, callback=lambda info: seen.append(info), **kw)
    assert torch.equal(a, b) and [i["i"] for i in seen] == list(range(6))
    for info in seen:  # denoised is D(x; sigma) of the state the step started from
        sigma = torch.full((2,), float(info["sigma"]))
        torch.testing.assert_close(info["denoised"], den(info["x"], sigma), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- drop-ins vs k-diffusion


@pytest.mark.parametrize("solver, kw", CASES, ids=IDS)
def test_drop_in_equals_k_diffusion(kd, solver, kw):
    """edmfast.k_diffusion.sample_NAME == k_diffusion.sampling.sample_NAME: same global seed (the
    default noise: randn_like, or the Brownian tree of the SDE samplers), same callbacks, and the
    global RNG ends in the same state."""
    sig = edmfast.karras_sigmas(8, 0.03, 12.0).float()
    den = _mixture(40, torch.float32)
    x = torch.randn(2, 4, 10) * sig[0]
    calls = {"ours": [], "theirs": []}
    torch.manual_seed(123)
    theirs = getattr(kd, f"sample_{solver}")(
        den, x.clone(), sig, callback=calls["theirs"].append, disable=True, **kw
    )
    after = torch.random.get_rng_state()
    torch.manual_seed(123)
    ours = getattr(EK, f"sample_{solver}")(
        den, x.clone(), sig, callback=calls["ours"].append, disable=True, **kw
    )
    assert rel_err(ours, theirs) < RUN_TOL
    assert torch.equal(torch.random.get_rng_state(), after)
    assert len(calls["ours"]) == len(calls["theirs"]) == 8
    for a, b in zip(calls["ours"], calls["theirs"], strict=True):
        assert a["i"] == b["i"] and set(a) == set(b)
        assert float(a["sigma"]) == float(b["sigma"]) and math.isclose(
            float(a["sigma_hat"]), float(b["sigma_hat"]), rel_tol=1e-6
        )
        assert rel_err(a["x"], b["x"]) < RUN_TOL and rel_err(a["denoised"], b["denoised"]) < RUN_TOL


@pytest.mark.parametrize(
    "solver",
    [s for s in K_SOLVERS if "noise_sampler" in inspect.signature(getattr(EK, f"sample_{s}")).parameters],
)
def test_drop_in_with_a_noise_sampler_equals_k_diffusion(kd, solver):
    sig = edmfast.karras_sigmas(6, 0.03, 12.0).float()
    den = _mixture(12, torch.float32)
    x = torch.randn(2, 12) * sig[0]
    theirs = getattr(kd, f"sample_{solver}")(
        den, x.clone(), sig, noise_sampler=_noise_sampler(x.shape, torch.float32), disable=True
    )
    ours = getattr(EK, f"sample_{solver}")(
        den, x.clone(), sig, noise_sampler=_noise_sampler(x.shape, torch.float32), disable=True
    )
    assert rel_err(ours, theirs) < RUN_TOL


def test_adaptive_samplers_are_refused_by_name():
    for name in ("dpm_fast", "dpm_adaptive"):
        with pytest.raises(ValueError, match=name):
            getattr(EK, f"sample_{name}")(lambda x, s: x, torch.zeros(1, 2), torch.ones(3))
        with pytest.raises(ValueError, match=name):
            edmfast.sample(lambda x, s: x, torch.zeros(1, 2), solver=name)


# ----------------------------------------------------------------------------- options and hooks


def test_explicit_sigmas_with_schedule_options_are_refused():
    den = _mixture(4, torch.float32)
    noise = torch.randn(1, 4)
    with pytest.raises(ValueError, match="num_steps=50 conflicts with the explicit sigmas"):
        edmfast.sample(den, noise, edmfast.karras_sigmas(4), num_steps=50)
    with pytest.raises(ValueError, match="sigma_max"):
        edmfast.Sampler(den, edmfast.karras_sigmas(4), sigma_max=20.0)
    edmfast.sample(den, noise, edmfast.karras_sigmas(4), num_steps=4)  # consistent: fine


@pytest.mark.parametrize(
    "kw, text",
    [
        (dict(solver="dpmpp_2m", eta=0.5), "eta applies to"),
        (dict(solver="heun", order=3), "order applies to solver lms"),
        (dict(solver="dpmpp_2m", s_churn=1.0), "s_churn applies to"),
        (dict(solver="lms", order=5), "order must be in"),
        (dict(solver="dpmpp_2m_sde", solver_type="rk4"), "solver_type"),
        (dict(solver="dpmpp_sde", r=0.0), "r must be in"),
        (dict(solver="dpmpp_2m", noise_sampler=lambda a, b: a), "noise_sampler has no effect"),
        (
            dict(solver="euler_ancestral", noise_sampler=lambda a, b: a, noise_mode="fused"),
            "noise_mode='exact'",
        ),
        (
            dict(solver="euler_ancestral", noise_sampler=lambda a, b: a, generator=torch.Generator()),
            "not both",
        ),
    ],
)
def test_solver_options_are_checked_by_name(kw, text):
    with pytest.raises(ValueError, match=text):
        edmfast.sample(_mixture(4, torch.float32), torch.randn(1, 4), num_steps=3, seeds=[1], **kw)


def test_on_step_end_sees_the_state_and_an_edit_is_applied():
    """An in-place edit of the state in the hook continues the loop from the edited state: the
    same as stopping there, editing, and sampling the rest of the schedule from it."""
    den = _mixture(12, torch.float32)
    noise = torch.randn(2, 12)
    sig = edmfast.karras_sigmas(8)
    s = edmfast.Sampler(den, solver="heun", backend="cpu")

    def edit(view):
        if view.i == 3:
            view.state.mul_(0.5)

    got = s(noise, sig, on_step_end=edit)
    head = s(noise, sig[:5], on_step_end=lambda v: v.stop() if v.i == 3 else None)
    expect = EK.sample_heun(den, head * 0.5, sig[4:], disable=True)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    stopped = s(noise, sig, on_step_end=lambda v: v.stop() if v.i == 3 else None)
    torch.testing.assert_close(stopped, head, rtol=0, atol=0)


class _Shifted(torch.nn.Module):
    """An EDM network whose output depends on a conditioning tensor (so guidance matters)."""

    def __init__(self, den):
        super().__init__()
        self.inner = EDMNetworkOf(den)

    def forward(self, x, c_noise, shift):
        return self.inner(x, c_noise) + shift.reshape(-1, *([1] * (x.dim() - 1)))


def test_on_step_end_can_change_guidance_for_the_remaining_steps():
    pre = edmfast.EDMPrecond(_Shifted(_mixture(12, torch.float32)))
    noise = torch.randn(2, 12)
    sig = edmfast.karras_sigmas(6)
    cfg = dict(cond={"shift": torch.full((2,), 0.3)}, uncond={"shift": torch.zeros(2)}, guidance_scale=2.0)
    s = edmfast.Sampler(pre, solver="dpmpp_2m", backend="cpu")
    plain = s(noise, sig, **cfg)
    same = s(noise, sig, **cfg, on_step_end=lambda v: v.set_guidance(2.0))
    changed = s(noise, sig, **cfg, on_step_end=lambda v: v.set_guidance(4.0) if v.i == 2 else None)
    assert torch.equal(same, plain) and rel_err(changed, plain) > 1e-3
    assert torch.equal(s(noise, sig, **cfg), plain)  # the next call starts from its own guidance
    with pytest.raises(ValueError, match="guidance_rescale"):
        s(noise, sig, **cfg, on_step_end=lambda v: v.set_guidance(2.0, 0.5))


def test_engine_cache_is_shared_by_every_front_door():
    engine.clear_sample_cache()
    den = _mixture(4, torch.float32)
    edmfast.sample(den, torch.randn(1, 4), num_steps=3, backend="cpu")
    edmfast.ablation_sample(den, torch.randn(1, 4), num_steps=3, backend="cpu")
    edmfast.sample_ancestral(
        lambda x, t: x, torch.randn(1, 4), edmfast.ddpm_betas(100), num_steps=3, variance="fixed_small"
    )
    assert len(engine._cache) >= 2  # the lambda is not weakly referenceable by identity: maybe not cached
    engine.clear_sample_cache()
    assert len(engine._cache) == 0


# ----------------------------------------------------------------------------- GPU: graphs


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "lms", "dpmpp_3m_sde", "dpmpp_sde", "euler_ancestral"])
def test_one_graph_replays_a_multistep_plan_equal_to_eager(backend, solver):
    """History slots, draws and every pass in one captured graph: replays equal the eager loop."""
    den = _mixture(3 * 16 * 16, torch.float32).cuda()
    noise = torch.randn(4, 3, 16, 16, device="cuda")
    kw = dict(solver=solver, num_steps=10, backend=backend, noise_mode="fused")
    s = edmfast.Sampler(den, cuda_graph=True, **kw)
    eager = edmfast.Sampler(den, cuda_graph=False, **kw)
    for seeds in ([1, 2, 3, 4], [5, 6, 7, 8]):
        torch.testing.assert_close(s(noise, seeds=seeds), eager(noise, seeds=seeds), rtol=1e-6, atol=1e-6)
    assert s.stats["captures"] == 1 and s.stats["replays"] == 2


@gpu
@pytest.mark.parametrize("where", ["cuda-generator", "cpu-generator", "global"])
def test_exact_noise_in_a_graph_equals_eager_and_advances_the_generator(where):
    """Exact noise drawn by the graph itself (CUDA generators registered with it) or staged from
    host memory (a CPU generator): the replay equals the eager loop, and the generator ends where
    the eager loop leaves it."""
    den = _mixture(3 * 8 * 8, torch.float32).cuda()
    noise = torch.randn(2, 3, 8, 8, device="cuda")
    kw = dict(solver="euler_ancestral", num_steps=8, backend="cuda")

    def gen():
        if where == "global":
            torch.cuda.manual_seed(7)
            return None
        return torch.Generator("cuda" if where == "cuda-generator" else "cpu").manual_seed(7)

    s = edmfast.Sampler(den, cuda_graph=True, **kw)
    eager = edmfast.Sampler(den, cuda_graph=False, **kw)
    for _ in range(2):
        g1, g2 = gen(), gen()
        a = s(noise, generator=g1)
        state = torch.cuda.get_rng_state() if g1 is None else g1.get_state()
        gen2 = gen() if g2 is None else g2
        b = eager(noise, generator=gen2)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        if g1 is not None:
            assert torch.equal(state, gen2.get_state())


@gpu
def test_exact_noise_under_a_graph_needs_one_noise_buffer_not_one_per_step():
    """Device memory of a captured call with exact noise does not grow with the number of steps
    (the former engine kept an [N, B, ...] slab: 768 MiB for ImageNet-64 churn at B = 64, N = 256)."""
    den = _mixture(3 * 64 * 64, torch.float32).cuda()
    noise = torch.randn(8, 3, 64, 64, device="cuda")
    g = torch.Generator("cuda")
    peaks = {}
    for n in (16, 128):
        engine.clear_sample_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        s = edmfast.Sampler(den, num_steps=n, solver="heun", s_churn=40, cuda_graph=True, backend="cuda")
        s(noise, generator=g.manual_seed(0))
        torch.cuda.synchronize()
        peaks[n] = torch.cuda.max_memory_allocated() - base
        s.release()
    slab = (128 - 16) * noise.numel() * 4
    assert peaks[128] - peaks[16] < slab / 4, peaks


def _zero_snr_model():
    """A v-prediction DiscreteVPDenoiser on a zero-terminal-SNR schedule, exact for a mixture."""
    betas = edmfast.rescale_zero_terminal_snr(
        torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    )
    abar = torch.cumprod(1 - betas, 0)
    mix = _mixture(48, torch.float32)

    def net(x, t):
        a = abar[t.long().clamp(0, 999)].float().reshape(-1, *([1] * (x.dim() - 1)))
        x0 = mix(x / a.sqrt().clamp(min=1e-8), ((1 - a) / a).clamp(min=0).sqrt().reshape(-1))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0  # v = alpha eps - sigma x0

    return edmfast.DiscreteVPDenoiser(net, abar, "v_prediction")


@pytest.mark.parametrize("solver, kw", CASES, ids=IDS)
def test_every_solver_starts_at_zero_terminal_snr_like_the_oracle(solver, kw):
    """sigma_0 = inf: step 0 is the limit of the method's first-order update from the unit noise,
    the rest a fresh start at sigma_1 (the oracle's convention), exact and fused noise."""
    den = _zero_snr_model()
    sig = den.sigmas_for(edmfast.discrete_timesteps(7, 1000, "trailing"))
    assert math.isinf(float(sig[0]))
    noise = torch.randn(2, 3, 4, 4)
    for mode in ("exact", "fused"):
        o = dict(solver=solver, noise_mode=mode, **kw)
        got = edmfast.sample(
            den, noise, sig, generator=torch.Generator().manual_seed(1), seeds=[1, 2], backend="cpu", **o
        )
        ref = reference.sample(den, noise, sig, generator=torch.Generator().manual_seed(1), seeds=[1, 2], **o)
        assert rel_err(got, ref) < RUN_TOL, mode


@pytest.mark.parametrize("solver, kw", CASES, ids=IDS)
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg-rescale"])
def test_one_native_launch_per_network_evaluation_at_run_time(monkeypatch, solver, kw, cfg):
    """Counted on a warm call: the prepared passes (one per evaluation, plus the start pass), the
    CFG-rescale factors (one per evaluation), the network calls; no other launch."""
    launches = {"pass": 0, "cfg": 0}

    def counting(prepare, what):
        def make(*args, **kwargs):
            launch = prepare(*args, **kwargs)

            def counted(*a):
                launches[what] += 1
                return launch(*a)

            return counted

        return make

    for name in ("prepare_affine_step", "prepare_ancestral_step"):
        monkeypatch.setattr(ops, name, counting(getattr(ops, name), "pass"))
    monkeypatch.setattr(ops, "prepare_cfg_rescale_factors", counting(ops.prepare_cfg_rescale_factors, "cfg"))
    affine, ancestral, cfg_entry = engine._kernels("cpu")  # the start pass: the unchecked entry

    def start(*a, **k):
        launches["pass"] += 1
        return affine(*a, **k)

    monkeypatch.setattr(engine, "_kernels", lambda b: (start, ancestral, cfg_entry))
    evals = []
    pre = edmfast.EDMPrecond(_Shifted(_mixture(12, torch.float32)))
    real = pre.raw
    pre.raw = lambda *a, **k: (evals.append(1), real(*a, **k))[1]
    noise = torch.randn(2, 12)
    c = dict(
        cond={"shift": torch.ones(2)},
        uncond={"shift": torch.zeros(2)},
        guidance_scale=2.0,
        guidance_rescale=0.5,
    )
    s = edmfast.Sampler(pre, num_steps=6, solver=solver, backend="cpu", noise_mode="fused", **kw)
    call = c if cfg else dict(cond={"shift": torch.ones(2)})
    s(noise, seeds=[1, 2], **call)  # warm: launches prepared
    launches["pass"] = launches["cfg"] = 0
    evals.clear()
    s(noise, seeds=[1, 2], **call)
    assert launches["pass"] == len(evals) + 1
    assert launches["cfg"] == (len(evals) if cfg else 0)
