"""ancestral_step (the fused DDPM / DDIM-eta pass) on every backend against `reference.ancestral_step`.

Per element: F (guided on 2B rows, times k), x0 = ax x + af F (clipped to [-1, 1] when asked),
mean = coef1 x0 + coef2 x, std = s (fixed) or s exp(logvar / 2) from the variance half of the cond
rows, out = mean + std z, out_net = c out on every R*B row, bad = min(bad, bad_step) on non-finite
rows. Variances x clip x CFG x noise x dtypes x odd shapes; outputs are NaN-poisoned.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import poisoned

from edmfast import ops, reference
from edmfast.philox import philox_normal

VARIANCES = ["fixed", "learned", "learned_range"]
NOISES = ["none", "tensor", "seeds"]
CFGS = ["none", "cfg", "cfg_k"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (2, 7), (1, 3, 37, 41), (3, 5), (2, 1, 9, 11), (1, 1030)]
NET_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_coef(device, *, s: float | None = None) -> torch.Tensor:
    """A plausible row: ax in [1, 3], af in [-3, 0], coef1 / coef2 in [0, 1], log betas in [-8, -2]."""
    r = torch.rand(8, dtype=torch.float64)
    row = [1 + 2 * r[0], -3 * r[1], r[2], r[3], -8 + 6 * r[4], -8 + 6 * r[5], 0.5 + r[6], 0.5 + r[7]]
    if s is not None:
        row[6] = s
    return torch.tensor([float(v) for v in row], dtype=torch.float32, device=device)


def make_inputs(shape, variance, cfg, dtype, device):
    batch = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    x = torch.randn(shape, device=device)
    rows = 2 * batch if cfg != "none" else batch
    pred = 2 * torch.randn(rows, n, device=device)
    if variance == "learned_range":
        var = 2 * torch.rand(rows, n, device=device) - 1
    elif variance == "learned":
        var = torch.empty(rows, n, device=device).uniform_(-8, -2)
    else:
        var = None
    f = pred if var is None else torch.cat([pred, var], dim=1)
    f = f.to(dtype)
    k = torch.rand(batch, device=device) + 0.5 if cfg == "cfg_k" else None
    return x, f, k


CASES = [
    (variance, noise, clip, CFGS[i % 3], DTYPES[(i // 3) % 3], SHAPES[i % len(SHAPES)])
    for i, (variance, noise, clip) in enumerate(itertools.product(VARIANCES, NOISES, [False, True]))
]


@pytest.mark.parametrize("variance, noise_mode, clip, cfg, dtype, shape", CASES)
def test_matches_reference(backend_device, variance, noise_mode, clip, cfg, dtype, shape) -> None:
    backend, device = backend_device
    x, f, k = make_inputs(shape, variance, cfg, dtype, device)
    coef = make_coef(device)
    batch = shape[0]
    noise = torch.randn(shape, device=device) if noise_mode == "tensor" else None
    seeds = torch.randint(0, 2**62, (batch,), device=device) if noise_mode == "seeds" else None
    w = 3.5 if cfg != "none" else 1.0
    net_rows = 2 if cfg != "none" else 1
    out = poisoned(shape, torch.float32, device)
    out_net = poisoned((net_rows * batch, *shape[1:]), dtype, device)
    bad = torch.full((batch,), ops.BAD_NONE, dtype=torch.int32, device=device)
    returned = ops.ancestral_step(
        x, f, coef, out=out, variance=variance, clip=clip, k=k, guidance_scale=w, noise=noise, seeds=seeds,
        step=7, out_net=out_net, bad=bad, bad_step=3, backend=backend,
    )  # fmt: skip
    assert returned is out
    ref = reference.ancestral_step(
        x, f, coef, variance=variance, clip=clip, k=k, guidance_scale=w, noise=noise, seeds=seeds, step=7
    )
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-5, atol=5e-5)
    net_ref = (float(coef[7]) * ref).repeat(net_rows, *([1] * (len(shape) - 1)))
    tol = NET_TOL[dtype]
    torch.testing.assert_close(out_net.double().cpu(), net_ref, rtol=tol, atol=tol)
    assert (bad == ops.BAD_NONE).all()


@pytest.mark.parametrize("variance", VARIANCES)
def test_alias_and_tensor_guidance(backend_device, variance) -> None:
    backend, device = backend_device
    shape = (2, 3, 5, 7)
    x, f, k = make_inputs(shape, variance, "cfg_k", torch.float32, device)
    coef = make_coef(device)
    noise = torch.randn(shape, device=device)
    w = torch.tensor([2.25], device=device)
    ref = reference.ancestral_step(
        x, f, coef, variance=variance, clip=True, k=k, guidance_scale=2.25, noise=noise
    )  # fmt: skip
    ops.ancestral_step(
        x, f, coef, out=x, variance=variance, clip=True, k=k, guidance_scale=w, noise=noise, backend=backend
    )
    torch.testing.assert_close(x.double().cpu(), ref, rtol=2e-5, atol=5e-5)


# The interpreter evaluates std * z (0 * inf) before the select drops it, and numpy warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("variance", VARIANCES)
def test_last_step_has_no_noise(backend_device, variance) -> None:
    """s = 0 adds nothing, even where exp(logvar / 2) overflows float32 (0 * inf must not be NaN)."""
    backend, device = backend_device
    shape = (2, 13)
    x, f, _ = make_inputs(shape, variance, "none", torch.float32, device)
    if variance != "fixed":
        f[:, 13:] = 300.0  # learned: exp(150) = inf; learned_range: frac = 150.5
    coef = make_coef(device, s=0.0)
    seeds = torch.tensor([1, 2], device=device)
    out = poisoned(shape, torch.float32, device)
    ops.ancestral_step(x, f, coef, out=out, variance=variance, seeds=seeds, step=4, backend=backend)
    ref = reference.ancestral_step(x, f, coef, variance=variance, clip=False)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-5, atol=5e-5)


def test_philox_matches_noise_tensor(backend_device) -> None:
    """In-kernel Philox noise is the fused stream: the same as passing philox_normal as noise."""
    backend, device = backend_device
    shape = (3, 2, 11)
    x, f, _ = make_inputs(shape, "learned_range", "none", torch.float32, device)
    coef = make_coef(device)
    seeds = torch.tensor([5, 2**40 + 3, 0], device=device)
    out_seeds = poisoned(shape, torch.float32, device)
    out_noise = poisoned(shape, torch.float32, device)
    noise = philox_normal(seeds.cpu(), 9, 22, torch.float32).reshape(shape).to(device)
    ops.ancestral_step(
        x, f, coef, out=out_seeds, variance="learned_range", seeds=seeds, step=9, backend=backend
    )  # fmt: skip
    ops.ancestral_step(x, f, coef, out=out_noise, variance="learned_range", noise=noise, backend=backend)
    torch.testing.assert_close(out_seeds, out_noise, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bad_rows_recorded(backend_device) -> None:
    backend, device = backend_device
    shape = (3, 37)
    x, f, _ = make_inputs(shape, "learned", "cfg", torch.float16, device)
    x[1, 17] = float("nan")
    coef = make_coef(device)
    out = poisoned(shape, torch.float32, device)
    bad = torch.tensor([ops.BAD_NONE, ops.BAD_NONE, 2], dtype=torch.int32, device=device)
    ops.ancestral_step(
        x, f, coef, out=out, variance="learned", guidance_scale=4.0, noise=torch.randn(shape, device=device),
        bad=bad, bad_step=5, backend=backend,
    )  # fmt: skip
    assert bad.tolist() == [ops.BAD_NONE, 5, 2]
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_raw_entry_matches_public(backend_device) -> None:
    backend, device = backend_device
    shape = (2, 3, 7)
    x, f, k = make_inputs(shape, "learned_range", "cfg_k", torch.bfloat16, device)
    coef = make_coef(device)
    seeds = torch.tensor([11, 12], device=device)
    out_a = poisoned(shape, torch.float32, device)
    out_b = poisoned(shape, torch.float32, device)
    net_a = poisoned((4, 3, 7), torch.bfloat16, device)
    net_b = poisoned((4, 3, 7), torch.bfloat16, device)
    kw = dict(variance="learned_range", clip=True, k=k, guidance_scale=1.5, seeds=seeds, step=2)
    ops.ancestral_step(x, f, coef, out=out_a, out_net=net_a, backend=backend, **kw)
    raw = ops.raw_ancestral_step(backend)
    raw(x, f, coef, out=out_b, noise=None, out_net=net_b, bad=None, bad_step=0, **kw)
    assert torch.equal(out_a, out_b) and torch.equal(net_a, net_b)


# ----------------------------------------------------------------------------- validation


def _args(**over):
    x = torch.randn(2, 3, 4)
    kw = dict(
        x=x, f=torch.randn(2, 6, 4), coef=make_coef("cpu"), out=torch.empty(2, 3, 4), variance="learned_range"
    )
    kw.update(over)
    return kw


def _call(**over):
    kw = _args(**over)
    x, f, coef = kw.pop("x"), kw.pop("f"), kw.pop("coef")
    return ops.ancestral_step(x, f, coef, **kw)


@pytest.mark.parametrize(
    "over, error, match",
    [
        (dict(variance="small"), ValueError, "variance must be one of"),
        (dict(clip=1), TypeError, "clip must be a bool"),
        (dict(f=torch.randn(2, 3, 4)), ValueError, "f must have B=2 or 2B rows of 24 elements"),
        (dict(f=torch.randn(2, 6, 4), variance="fixed"), ValueError, "f must have B=2 or 2B rows of 12"),
        (dict(f=torch.randn(3, 6, 4)), ValueError, "f must have B=2 or 2B rows"),
        (dict(f=torch.randn(2, 6, 4, dtype=torch.float64)), TypeError, "f must have dtype"),
        (dict(x=torch.randn(2, 3, 4, dtype=torch.float16)), TypeError, "x must have dtype"),
        (dict(coef=torch.zeros(1, 8)), ValueError, "coef must be one contiguous float32 row"),
        (dict(coef=torch.zeros(5)), ValueError, "coef must be one contiguous float32 row"),
        (dict(coef=torch.zeros(10)), ValueError, r"or that row with \[cf, clip\] and padding"),
        (dict(coef=torch.zeros(32)[::2]), ValueError, "coef must be one contiguous float32 row"),
        (dict(x=torch.empty(2, 3, 4, device="meta")), ValueError, "x is a meta tensor"),
        (dict(coef=torch.zeros(8, dtype=torch.float64)), TypeError, "coef must have dtype"),
        (dict(k=torch.ones(2)), ValueError, "k .CFG rescale factors. needs f with 2B rows"),
        (dict(f=torch.randn(4, 6, 4), k=torch.ones(3)), ValueError, "k must be float32"),
        (dict(noise=torch.randn(2, 13)), ValueError, "noise must match x's shape"),
        (
            dict(noise=torch.randn(2, 3, 4), seeds=torch.zeros(2, dtype=torch.int64)),
            ValueError,
            "give noise or seeds",
        ),
        (dict(seeds=torch.zeros(3, dtype=torch.int64)), ValueError, "seeds must be int64"),
        (dict(seeds=torch.zeros(2, dtype=torch.int32)), TypeError, "seeds must have dtype"),
        (dict(out=torch.empty(2, 3, 5)), ValueError, "out must have 2 rows of 12"),
        (dict(out=torch.empty(2, 4, 3).transpose(1, 2)), ValueError, "out must be contiguous"),
        (dict(out_net=torch.empty(3, 3, 4)), ValueError, "out_net must have B=2 or 2B rows"),
        (dict(out_net=torch.empty(2, 3, 4, dtype=torch.float16)), TypeError, "f and out_net must share"),
        (dict(bad=torch.zeros(2, dtype=torch.int64)), TypeError, "bad must have dtype"),
        (dict(bad=torch.zeros(3, dtype=torch.int32)), ValueError, "bad must be a contiguous int32"),
        (dict(bad_step=-1), ValueError, "bad_step must be in"),
        (dict(step=-2), ValueError, "step must be in"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be finite"),
        (dict(guidance_scale=torch.ones(2)), TypeError, "guidance_scale as a tensor"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(f=None), TypeError, "f must be a torch.Tensor"),
    ],
)
def test_validation(over, error, match) -> None:
    with pytest.raises(error, match=match):
        _call(**over)


def test_overlap_rejected() -> None:
    base = torch.randn(2 * 12 + 1)
    x = base[:24].view(2, 3, 4)
    with pytest.raises(ValueError, match="out partially overlaps x"):
        _call(x=x, out=base[1:].view(2, 3, 4))
    f = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="out_net partially overlaps f"):
        _call(f=f, out_net=f.view(4, 3, 4)[:2])
    with pytest.raises(ValueError, match=r"out is the same memory as noise \(only out may alias x\)"):
        noise = torch.randn(2, 3, 4)
        _call(noise=noise, out=noise)
    out = torch.empty(2, 3, 4)
    _call(x=out, out=out)  # out may be x exactly


# ----------------------------------------------------------------------------- CFG factors, prediction half


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, n", [(1, 7), (2, 1030), (3, 1)])
def test_cfg_factors_prediction_half(backend_device, dtype, batch, n) -> None:
    """``numel=n`` over [2B, 2n] rows equals the factors of the prediction half alone, and the same
    workspace then serves a whole-row call (its counters sit where the whole-row layout has them)."""
    backend, device = backend_device
    f = torch.randn(2 * batch, 2 * n, device=device).to(dtype)
    f[:, n:] *= 40  # a variance half that would change k if it were counted
    ws = ops.cfg_workspace(f, backend)
    for _ in range(2):  # twice: the finalizing program reset the counters it used
        k = poisoned((batch,), torch.float32, device)
        ops.cfg_rescale_factors(f, 4.0, 0.7, out=k, workspace=ws, numel=n, backend=backend)
        ref = reference.cfg_rescale_factors(f[:, :n].double().cpu(), 4.0, 0.7)
        torch.testing.assert_close(k.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    k_full = poisoned((batch,), torch.float32, device)
    ops.cfg_rescale_factors(f, 4.0, 0.7, out=k_full, workspace=ws, backend=backend)
    ref_full = reference.cfg_rescale_factors(f.double().cpu(), 4.0, 0.7)
    torch.testing.assert_close(k_full.double().cpu(), ref_full, rtol=1e-5, atol=1e-6)


def test_cfg_factors_numel_validation() -> None:
    f = torch.randn(4, 6)
    k = torch.empty(2)
    with pytest.raises(ValueError, match="numel must be in"):
        ops.cfg_rescale_factors(f, 2.0, 0.5, out=k, numel=7)
    with pytest.raises(TypeError, match="numel must be an int"):
        ops.cfg_rescale_factors(f, 2.0, 0.5, out=k, numel=3.0)
    ops.cfg_rescale_factors(f, 2.0, 0.5, out=k, numel=0)
    assert k.tolist() == [1.0, 1.0]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_learned_variance_range_ends(backend_device) -> None:
    """std = exp(V / 2) across float32's range: tiny, huge but finite, and overflowing to inf (a bad row)."""
    backend, device = backend_device
    v = torch.tensor([-300.0, -180.0, -20.0, 0.0, 1.5, 60.0, 170.0, 177.0, 177.4], dtype=torch.float64)
    n = v.numel()
    x = torch.zeros(2, n, device=device)
    f = torch.zeros(2, 2 * n, device=device)
    f[0, n:] = v.float()
    f[1, n:] = 178.0  # exp(89) overflows float32
    coef = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0], device=device)
    out = poisoned((2, n), torch.float32, device)
    bad = torch.full((2,), ops.BAD_NONE, dtype=torch.int32, device=device)
    noise = torch.ones(2, n, device=device)
    ops.ancestral_step(
        x, f, coef, out=out, variance="learned", noise=noise, bad=bad, bad_step=1, backend=backend
    )  # fmt: skip
    expected = torch.exp(v.float().double() / 2)  # of the float32 V the kernels read
    # atol: results in float32's subnormal range (exp(-90) = 8e-40) may flush to 0
    torch.testing.assert_close(out[0].double().cpu(), expected, rtol=3e-6, atol=1.2e-38)
    assert torch.isinf(out[1]).all()
    assert bad.tolist() == [ops.BAD_NONE, 1]


def _gpu_exp(a):
    """tl.exp as NVIDIA GPUs evaluate it: ex2.approx of the float32 product x * log2(e). Only the
    product's rounding is emulated (ex2.approx's own error is below it): the least a GPU gets wrong."""
    import numpy as np

    t = (a.astype(np.float32) * np.float32(1.4426950408889634)).astype(np.float32)
    return np.exp2(t.astype(np.float64)).astype(a.dtype)


def test_learned_variance_exp_accurate_where_tl_exp_is_approximate(monkeypatch) -> None:
    """The triton kernel's exp must not be tl.exp: the interpreter evaluates tl.exp with numpy's exact
    exp, so CI never saw that on the GPU the argument's float32 rounding alone exceeds
    test_learned_variance_range_ends' rtol of 3e-6 near the top of the range. Here the interpreter's
    exp is replaced by that GPU emulation; the kernel must stay within the rtol anyway."""
    if ops.backend_status("triton", torch.device("cpu")) is not None:
        pytest.skip("the triton backend on CPU tensors needs TRITON_INTERPRET=1 (set without a GPU)")
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if not (hasattr(builder, "create_exp") and hasattr(builder, "unary_op")):
        pytest.skip("this triton's interpreter has no create_exp / unary_op to replace")
    monkeypatch.setattr(builder, "create_exp", lambda self, a: self.unary_op(a, _gpu_exp))
    v = torch.linspace(-170.0, 177.44, 2001, dtype=torch.float64)
    v = torch.cat([v, torch.tensor([177.4, 174.3124, 170.0], dtype=torch.float64)])
    expected = torch.exp(v.float().double() / 2)

    @triton.jit
    def _tl_exp_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.exp(tl.load(x_ptr + i, mask=i < n)), mask=i < n)

    # the emulation is in force and is what the old kernel's tl.exp(0.5 * logvar) would give
    half_v, approx = (v.float() / 2).contiguous(), torch.empty(v.numel())
    _tl_exp_kernel[(triton.cdiv(v.numel(), 1024),)](half_v, approx, v.numel(), BLOCK=1024)
    assert ((approx.double() - expected).abs() / expected).max() > 3e-6
    n = v.numel()
    f = torch.zeros(1, 2 * n)
    f[0, n:] = v.float()
    out = poisoned((1, n), torch.float32, "cpu")
    coef = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    ops.ancestral_step(
        torch.zeros(1, n), f, coef, out=out, variance="learned", noise=torch.ones(1, n), backend="triton"
    )
    rel = (out[0].double() - expected).abs() / expected
    assert rel.max() < 1e-6, (rel.max(), v[rel.argmax()])  # a few float32 ulp, as exp_poly


def test_cpu_parallel_chunks() -> None:
    """The cpu backend's multi-chunk, multi-thread path (past the 2048-element chunk and the
    parallel threshold) against the torch backend."""
    if ops.backend_status("cpu", torch.device("cpu")) is not None:
        pytest.skip("the native extension is not built")
    shape = (3, 3, 61, 67)
    x, f, k = make_inputs(shape, "learned_range", "cfg_k", torch.bfloat16, "cpu")
    coef = make_coef("cpu")
    seeds = torch.tensor([3, 1, 4])
    outs = []
    for backend in ("cpu", "torch"):
        out = poisoned(shape, torch.float32, "cpu")
        net = poisoned((6, *shape[1:]), torch.bfloat16, "cpu")
        ops.ancestral_step(
            x, f, coef, out=out, variance="learned_range", clip=True, k=k, guidance_scale=2.0, seeds=seeds,
            step=11, out_net=net, backend=backend,
        )  # fmt: skip
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- compile and graphs


def test_compiles_in_one_graph_on_cpu() -> None:
    """CFG factors over the prediction half + the ancestral pass trace through torch.compile
    (fullgraph: the registered custom ops, no break) and give the eager results."""
    if ops.backend_status("cpu", torch.device("cpu")) is not None:
        pytest.skip("the native extension is not built")
    factors, step = ops.raw_cfg_rescale_factors("cpu"), ops.raw_ancestral_step("cpu")
    x, f, _ = make_inputs((2, 5, 7), "learned_range", "cfg", torch.float32, "cpu")
    coef = make_coef("cpu")
    seeds = torch.tensor([8, 9])

    def body(x, f, w, out, net, k, bad):
        factors(f, w, 0.6, out=k, numel=35)
        step(
            x, f, coef, out=out, variance="learned_range", clip=True, k=k, guidance_scale=w, noise=None,
            seeds=seeds, step=6, out_net=net, bad=bad, bad_step=4,
        )  # fmt: skip
        return out * 2

    compiled = torch.compile(body, fullgraph=True, backend="aot_eager")
    w = torch.tensor([3.0])
    results = []
    for fn in (body, compiled):
        out, net, k = torch.empty(2, 5, 7), torch.empty(4, 5, 7), torch.empty(2)
        bad = torch.full((2,), ops.BAD_NONE, dtype=torch.int32)
        results.append((fn(x, f, w, out, net, k, bad), out, net, k, bad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_one_graph_serves_every_step(backend) -> None:
    """One captured graph (CFG factors over the prediction half on a static workspace, then the
    ancestral pass) replays any row of a coefficient table (copied into the static coef, incl. a
    last step with s = 0) and any guidance value; the results match the reference each time."""
    dev = torch.device("cuda")
    if ops.backend_status(backend, dev) is not None:
        pytest.skip(ops.backend_status(backend, dev))
    factors, step = ops.raw_cfg_rescale_factors(backend), ops.raw_ancestral_step(backend)
    batch, n = 3, 3 * 37 * 41 * 8
    x0 = torch.randn(batch, n, device=dev)
    x = x0.clone()
    f = torch.cat([torch.randn(2 * batch, n, device=dev), torch.rand(2 * batch, n, device=dev) * 2 - 1], 1)
    f = f.to(torch.bfloat16)
    table = torch.stack([make_coef(dev) for _ in range(3)])
    table[2, 6] = 0.0  # the last step: no noise
    coef = torch.empty(8, device=dev)
    w, k = torch.empty(1, device=dev), torch.empty(batch, device=dev)
    seeds = torch.tensor([1, 2, 3], device=dev)
    out, net = torch.empty(batch, n, device=dev), torch.empty(2 * batch, n, device=dev, dtype=torch.bfloat16)
    bad = torch.full((batch,), ops.BAD_NONE, dtype=torch.int32, device=dev)
    ws = ops.cfg_workspace(f, backend)

    def body():
        factors(f, w, 0.7, out=k, workspace=ws, numel=n)
        step(
            x, f, coef, out=out, variance="learned_range", clip=True, k=k, guidance_scale=w, noise=None,
            seeds=seeds, step=9, out_net=net, bad=bad, bad_step=1,
        )  # fmt: skip

    coef.copy_(table[0])
    w.fill_(2.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up (Triton compiles here, not during capture)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for i, wv in enumerate([7.5, 1.5, 3.0]):
        coef.copy_(table[i])
        w.fill_(wv)
        graph.replay()
        torch.cuda.synchronize()
        ref_k = reference.cfg_rescale_factors(f[:, :n], wv, 0.7)
        ref = reference.ancestral_step(
            x, f, table[i], variance="learned_range", clip=True, k=ref_k, guidance_scale=wv, seeds=seeds,
            step=9,
        )  # fmt: skip
        torch.testing.assert_close(k.double(), ref_k.to(dev), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.double(), ref.to(dev), rtol=2e-5, atol=5e-5)
        assert bad.tolist() == [ops.BAD_NONE] * batch


@pytest.mark.parametrize(
    "variance, cfg, noise_mode", [("fixed", "none", "seeds"), ("learned_range", "cfg_k", "tensor")]
)
def test_prepared_launch_equals_the_public_op(backend_device, variance, cfg, noise_mode) -> None:
    """Three steps with the state updated in place and a new model output each: the prepared
    launch (validated once) gives the public op's results bit for bit."""
    backend, device = backend_device
    shape = (2, 3, 5, 7)
    x, f, k = make_inputs(shape, variance, cfg, torch.float32, device)
    coef = make_coef(device)
    batch = shape[0]
    noise = torch.randn(shape, device=device) if noise_mode == "tensor" else None
    seeds = torch.randint(0, 2**62, (batch,), device=device) if noise_mode == "seeds" else None
    rows = 2 * batch if cfg != "none" else batch
    xs = [x.clone(), x.clone()]
    nets = [poisoned((rows, *shape[1:]), torch.float32, device) for _ in range(2)]
    bads = [torch.full((batch,), ops.BAD_NONE, dtype=torch.int32, device=device) for _ in range(2)]
    common = dict(variance=variance, clip=True, k=k, guidance_scale=2.5, noise=noise, seeds=seeds, bad_step=2)
    launch = ops.prepare_ancestral_step(
        backend, xs[1], coef, out=xs[1], f_like=torch.empty_like(f), out_net=nets[1], bad=bads[1], **common
    )
    ctx = ops.launch_context(backend, device)
    for step in range(3):
        f_step = (
            torch.randn_like(f)
            if variance == "fixed"
            else torch.cat([2 * f[:, : f.shape[1] // 2], f[:, f.shape[1] // 2 :]], 1)
        )
        ops.ancestral_step(
            xs[0], f_step, coef, out=xs[0], step=step, out_net=nets[0], bad=bads[0], backend=backend, **common
        )
        launch(f_step.clone(), step, ctx)
        for a, b in ((xs[0], xs[1]), (nets[0], nets[1]), (bads[0], bads[1])):
            assert torch.equal(a, b), step


# ----------------------------------------------------------------------------- the cf and clip columns


def wide_coef(device, *, cf: float, bound: float) -> torch.Tensor:
    """A 16-float row: a plausible 8-float row, then cf, the clip bound, and NaN padding (never read)."""
    row = torch.full((16,), float("nan"), device=device)
    row[:8] = make_coef(device)
    row[8], row[9] = cf, bound
    return row


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("cfg", ["none", "cfg_k"])
@pytest.mark.parametrize("bound", [2.0, 0.3])
def test_wide_rows_match_reference(backend_device, variance, cfg, bound) -> None:
    """mean = coef1 x0 + coef2 x + cf F with x0 clamped to [-bound, bound] (diffusers' DDIM with
    use_clipped_model_output=False and clip_sample_range), on every variance, with and without CFG."""
    backend, device = backend_device
    shape = (2, 3, 7, 5)
    x, f, k = make_inputs(shape, variance, cfg, torch.float32, device)
    coef = wide_coef(device, cf=-0.8, bound=bound)
    seeds = torch.tensor([3, 2**40], device=device)
    rows = 2 if cfg != "none" else 1
    for clip in (False, True):
        out = poisoned(shape, torch.float32, device)
        net = poisoned((rows * 2, *shape[1:]), torch.float32, device)
        ops.ancestral_step(
            x, f, coef, out=out, variance=variance, clip=clip, k=k, guidance_scale=3.0, seeds=seeds, step=4,
            out_net=net, backend=backend,
        )  # fmt: skip
        ref = reference.ancestral_step(
            x, f, coef, variance=variance, clip=clip, k=k, guidance_scale=3.0, seeds=seeds, step=4
        )
        err = (out.double().cpu() - ref.cpu()).abs().max() / ref.abs().max().cpu()
        assert err <= 1e-5, (clip, float(err))
        assert torch.allclose(
            net.double().cpu(), (float(coef[7]) * ref).repeat(rows, 1, 1, 1).cpu(), rtol=1e-5, atol=1e-5
        )
    # the bound matters: with the clip, x0 is inside [-bound, bound]; a tight bound changes out
    if bound < 1:
        loose_row = coef.clone()
        loose_row[9] = 10.0
        loose = reference.ancestral_step(
            x, f, loose_row, variance=variance, clip=True, k=k, guidance_scale=3.0, seeds=seeds, step=4
        )
        assert not torch.allclose(loose, ref)


def test_eight_float_rows_are_the_wide_row_with_cf_0_and_bound_1(backend_device) -> None:
    backend, device = backend_device
    shape = (3, 1030)
    x, f, k = make_inputs(shape, "learned_range", "cfg_k", torch.float16, device)
    narrow = make_coef(device)
    wide = torch.zeros(16, device=device)
    wide[:8] = narrow
    wide[9] = 1.0
    outs = []
    for coef in (narrow, wide):
        out = poisoned(shape, torch.float32, device)
        ops.ancestral_step(
            x, f, coef, out=out, variance="learned_range", clip=True, k=k, guidance_scale=2.0,
            seeds=torch.tensor([1, 2, 3], device=device), step=9, backend=backend,
        )  # fmt: skip
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_eight_float_rows_add_no_cf_term(backend_device) -> None:
    """An inf prediction that clipping turns into a finite x0 keeps the mean finite with an 8-float
    row (its cf term does not exist; 0 * inf would be NaN)."""
    backend, device = backend_device
    x = torch.randn(2, 9, device=device)
    f = torch.randn(2, 9, device=device)
    f[1, 4] = float("inf")
    coef = make_coef(device)
    out = poisoned((2, 9), torch.float32, device)
    bad = torch.full((2,), ops.BAD_NONE, dtype=torch.int32, device=device)
    ops.ancestral_step(x, f, coef, out=out, clip=True, bad=bad, bad_step=1, backend=backend)
    assert torch.isfinite(out).all() and bad.tolist() == [ops.BAD_NONE, ops.BAD_NONE]
    ref = reference.ancestral_step(x, f, coef, variance="fixed", clip=True)
    assert torch.allclose(out.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-6)
