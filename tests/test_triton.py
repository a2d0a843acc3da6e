"""Triton-specific checks: the in-kernel Philox stream, block and batch boundaries, the split CFG
reduction, op registration, and (GPU only) compiled kernels, CUDA graphs and torch.compile.

The shared per-op contracts for every backend live in tests/test_<op>.py; this file covers what
only the Triton implementation can get wrong. On CPU it runs under TRITON_INTERPRET=1 (set by
conftest before triton is imported), so sizes stay small.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
from conftest import HAS_CUDA, TOL, heun_term_scale, net_scale, poisoned, rel_err
from test_philox import assert_normals_close, normal_tolerance

from edmfast import ops, philox, reference

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import edmfast.triton as T  # noqa: E402
from edmfast.triton.affine_step import block_config  # noqa: E402
from edmfast.triton.cfg_rescale import reduction_config  # noqa: E402
from edmfast.triton.philox import philox_normal_block, philox_words  # noqa: E402

CPU = torch.device("cpu")
# conftest defaults TRITON_INTERPRET to 1, which would also interpret kernels on CUDA tensors;
# the GPU tests are about compiled kernels (run them with TRITON_INTERPRET=0).
gpu = pytest.mark.skipif(
    not HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and compiled Triton (TRITON_INTERPRET=0)",
)
SEEDS = [0, 1, 2**32 - 1, 2**32, 2**40 + 12345, 2**63 - 1, -1, -(2**63)]


def _devices() -> list:
    params = [pytest.param(CPU, id="cpu")]
    params.append(pytest.param(torch.device("cuda"), id="cuda", marks=[pytest.mark.gpu, gpu]))
    return params


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    reason = ops.backend_status("triton", request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


def _coef(p=0.9, q=0.3, r=-0.2, std=0.5, c=0.7, device=CPU) -> torch.Tensor:
    coef = torch.zeros(reference.COEF_SIZE, dtype=torch.float32)
    coef[:5] = torch.tensor([p, q, r, std, c])
    return coef.to(device)


# ----------------------------------------------------------------------------- availability


def test_why_unavailable_here():
    if os.environ.get("TRITON_INTERPRET") == "1":  # conftest sets it on machines without a GPU
        assert T.why_unavailable(CPU) is None
    else:
        assert "TRITON_INTERPRET" in T.why_unavailable(CPU)
    assert "CUDA" in T.why_unavailable(torch.device("meta"))


def test_import_without_triton_reports_why():
    # A fresh interpreter where `import triton` fails: importing the backend must still work.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, edmfast.triton as T\n"
        "print(T.why_unavailable(torch.device('cuda')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "triton is not importable" in res.stdout


# ----------------------------------------------------------------------------- Philox stream


@triton.jit
def _philox_probe_kernel(seeds_ptr, words_ptr, normals_ptr, g0, step, stage, N, BLOCK: tl.constexpr):
    """Words and normals of the N elements from group g0 on, for sample program_id(0); program_id(1)
    is a tile of BLOCK elements."""
    b = tl.program_id(0)
    first = tl.program_id(1).to(tl.int64) * BLOCK  # element offset of this tile
    seed = tl.load(seeds_ptr + b)
    lane = tl.arange(0, BLOCK // 4)
    x0, x1, x2, x3 = philox_words(seed, step, g0 + first // 4 + lane, stage)
    words = words_ptr + b * N + first + 4 * lane
    tl.store(words, x0.to(tl.int64))
    tl.store(words + 1, x1.to(tl.int64))
    tl.store(words + 2, x2.to(tl.int64))
    tl.store(words + 3, x3.to(tl.int64))
    normals = philox_normal_block(seed, step, g0 * 4 + first, stage, BLOCK)
    tl.store(normals_ptr + b * N + first + tl.arange(0, BLOCK), normals)


# Tile of the probe: one program over 2**20 elements would take ptxas ~10 minutes to compile.
PROBE_TILE = 4096


def _probe(
    seeds: list[int], step: int, g0: int, n: int, device, stage: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Words and normals [len(seeds), n] (n a power of two) of groups g0 .. g0 + n // 4 at ``stage``."""
    seeds_t = torch.tensor(seeds, dtype=torch.int64, device=device)
    words = torch.zeros(len(seeds), n, dtype=torch.int64, device=device)
    normals = poisoned((len(seeds), n), torch.float32, device)
    tile = min(n, PROBE_TILE)
    _philox_probe_kernel[(len(seeds), n // tile)](seeds_t, words, normals, g0, step, stage, n, BLOCK=tile)
    return words.cpu(), normals.cpu()


def _reference_words(seeds: list[int], step: int, g0: int, groups: int, stage: int = 0) -> torch.Tensor:
    s = torch.tensor(seeds, dtype=torch.int64).reshape(-1, 1)
    g = torch.arange(g0, g0 + groups, dtype=torch.int64).reshape(1, -1)
    mask = 0xFFFFFFFF
    c2 = torch.full_like(g, step & mask)
    c3 = torch.full_like(g, stage & mask)
    x = philox.philox4x32(g & mask, g >> 32, c2, c3, s & mask, (s >> 32) & mask)
    return torch.stack(x, dim=-1).reshape(len(seeds), groups * 4)


@pytest.mark.parametrize("step", [0, 1, 17, 2**31 + 5, 2**32 - 1])
def test_philox_words_bit_exact(device, step):
    words, _ = _probe(SEEDS, step, 0, 64, device)
    assert torch.equal(words, _reference_words(SEEDS, step, 0, 16))


@pytest.mark.parametrize("stage", [1, 2, 2**32 - 1])
def test_philox_words_stage_is_the_fourth_counter_word(device, stage):
    words, _ = _probe(SEEDS, 9, 0, 64, device, stage=stage)
    assert torch.equal(words, _reference_words(SEEDS, 9, 0, 16, stage=stage))
    assert not torch.equal(words, _reference_words(SEEDS, 9, 0, 16))


def test_philox_words_high_counter_word(device):
    # Groups past 2**32 put the counter's high word (c1) to work.
    g0 = 2**32 - 8
    words, _ = _probe([7, 2**33 + 1], 3, g0, 64, device)
    assert torch.equal(words, _reference_words([7, 2**33 + 1], 3, g0, 16))


@pytest.mark.parametrize("step", [0, 5, 2**32 - 1])
def test_philox_normals_match_definition(device, step):
    # 2 x 2**14 normals: ~10 pairs land in the u0 -> 1 tail where a float32 u = ((x >> 8) + 0.5)
    # 2**-24 would be off by 2**-25 and r by up to 2.4e-4, so this fails without the exact form.
    n = 2**14 if device.type == "cpu" else 2**20
    seeds = [3, 2**40 + 12345]
    _, normals = _probe(seeds, step, 0, n, device)
    assert_normals_close(normals, seeds, step)  # a few float32 ulp of each radius (test_philox.py)
    assert abs(float(normals.double().mean())) < 0.05 and abs(float(normals.double().std()) - 1) < 0.05


# ----------------------------------------------------------------------------- fused noise


def _churn(x, coef, *, seeds=None, noise=None, step=0, net_rows=1, net_dtype=torch.float32, out=None):
    batch = x.shape[0]
    out = poisoned(x.shape, torch.float32, x.device) if out is None else out
    net = poisoned((net_rows * batch, *x.shape[1:]), net_dtype, x.device)
    ops.churn(x, coef, out=out, noise=noise, seeds=seeds, step=step, out_net=net, backend="triton")
    return out, net


@pytest.mark.parametrize("shape", [(2, 1), (2, 7), (2, 1023), (2, 1025), (2, 3, 37, 41)])
def test_fused_noise_equals_reference_stream(device, shape):
    x = torch.zeros(shape, device=device)
    seeds = torch.tensor([11, 2**35 + 3], device=device)
    step = 2**31 + 7
    eps, _ = _churn(x, _coef(std=1.0, c=0.0, device=device), seeds=seeds, step=step)
    assert_normals_close(eps, seeds, step)


def test_step_uses_low_32_bits(device):
    x = torch.zeros(1, 64, device=device)
    coef = _coef(std=1.0, device=device)
    seeds = torch.tensor([5], device=device)
    a, _ = _churn(x, coef, seeds=seeds, step=2**32 + 9)
    b, _ = _churn(x, coef, seeds=seeds, step=9)
    assert torch.equal(a, b)


def test_fused_noise_matches_native_cpu_stream():
    # CPU tensors on both sides: needs the interpreter (GPU machines run without TRITON_INTERPRET).
    for backend in ("cpu", "triton"):
        if ops.backend_status(backend, CPU) is not None:
            pytest.skip(f"{backend} backend on CPU: {ops.backend_status(backend, CPU)}")
    shape = (3, 2, 31, 33)
    x = torch.zeros(shape)
    seeds = torch.tensor([0, 2**32 + 1, 99])
    coef = _coef(std=1.0, c=0.0)
    ours, _ = _churn(x, coef, seeds=seeds, step=12)
    native = torch.empty(shape)
    ops.churn(x, coef, out=native, seeds=seeds, step=12, backend="cpu")
    # Both are float32 evaluations of the same float64 definition, each within its budget.
    ref, tol = normal_tolerance(seeds, 12, ours[0].numel())
    assert bool(((ours - native).double().reshape(3, -1).abs() <= 2 * tol).all())


def test_fused_noise_batch_invariant(device):
    seeds = [4, 2**33 + 8, 123456789]
    x = torch.randn(3, 5, 67, device=device)
    coef = _coef(std=0.8, c=1.3, device=device)
    full, full_net = _churn(x, coef, seeds=torch.tensor(seeds, device=device), step=3)
    for b, seed in enumerate(seeds):
        one, one_net = _churn(x[b : b + 1], coef, seeds=torch.tensor([seed], device=device), step=3)
        assert torch.equal(one[0], full[b]) and torch.equal(one_net[0], full_net[b])


# ----------------------------------------------------------------------------- heun_step


# (x_prime, f rows: 0 / 1 = B / 2 = 2B, k, noise: None / "tensor" / "seeds", net_rows)
CONFIGS = {
    "euler": (False, 1, False, None, 1),
    "heun-cfg-k-philox": (True, 2, True, "seeds", 2),
    "cfg-noise-tensor": (False, 2, False, "tensor", 2),
    "xprime-only-no-net": (True, 0, False, None, 0),
}


def _step_operands(shape, config, net_dtype, device, gen):
    has_xp, f_rows, has_k, noise, net_rows = CONFIGS[config]
    batch = shape[0]
    rand = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    return dict(
        x_hat=rand(*shape),
        x_prime=rand(*shape) if has_xp else None,
        f=rand(f_rows * batch, *shape[1:]).to(net_dtype) if f_rows else None,
        k=(torch.rand(batch, generator=gen) + 0.5).to(device) if has_k else None,
        noise=rand(*shape) if noise == "tensor" else None,
        seeds=torch.randint(-(2**62), 2**62, (batch,), generator=gen).to(device)
        if noise == "seeds"
        else None,
        net_rows=net_rows,
    )


def _check_step(shape, config, net_dtype, device, *, alias=False):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, config, net_dtype)).encode()))
    a = _step_operands(shape, config, net_dtype, device, gen)
    net_rows = a.pop("net_rows")
    coef = _coef(device=device)
    ref_out, ref_net = reference.heun_step(
        coef=coef, guidance_scale=4.5, step=6, net_rows=max(net_rows, 1), **a
    )
    scale = heun_term_scale(coef=coef, guidance_scale=4.5, step=6, **a)
    x_hat = a.pop("x_hat")
    out = x_hat if alias else poisoned(shape, torch.float32, device)
    net = poisoned((net_rows * shape[0], *shape[1:]), net_dtype, device) if net_rows else None
    ops.heun_step(x_hat, coef, out=out, out_net=net, guidance_scale=4.5, step=6, backend="triton", **a)
    assert rel_err(out, ref_out, scale) <= TOL[torch.float32]
    if net is not None:
        assert rel_err(net, ref_net, net_scale(scale, coef, net_rows)) <= TOL[net_dtype]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 1023), (1, 1024), (2, 1025), (2, 3, 37, 41)])
def test_heun_step_matches_reference(device, shape, config):
    _check_step(shape, config, torch.float32, device)


@pytest.mark.parametrize("net_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", ["euler", "heun-cfg-k-philox"])
def test_heun_step_low_precision(device, config, net_dtype):
    _check_step((2, 3, 5, 7), config, net_dtype, device)


def test_heun_step_out_aliases_x_hat(device):
    _check_step((2, 1100), "heun-cfg-k-philox", torch.float32, device, alias=True)


def test_block_config(monkeypatch):
    # Under the interpreter the odd shapes above straddle the fixed 1024-element block.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert block_config(3 * 37 * 41, 2) == (1024, 4)
    # The GPU heuristic (block_config reads the variable per call).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert block_config(1, 1) == (16, 1)
    assert block_config(2**24, 64) == (2048, 8)
    assert block_config(4 * 64 * 64, 1) == (256, 1)  # batch-1 latent: 64 programs, not 8
    for numel, batch in [(7, 3), (1023, 2), (3 * 37 * 41, 64)]:
        block, _ = block_config(numel, batch)
        assert block % 16 == 0 and block <= max(16, triton.next_power_of_2(numel))


def test_churn_ignores_pqr_and_writes_both_cfg_halves(device):
    x = torch.randn(2, 3, 9, device=device)
    coef = _coef(p=5.0, q=7.0, r=9.0, std=0.25, c=0.5, device=device)
    noise = torch.randn(2, 3, 9, device=device)
    out, net = _churn(x, coef, noise=noise, net_rows=2, net_dtype=torch.bfloat16)
    ref_out, ref_net = reference.churn(x, coef, noise=noise, net_rows=2)
    assert rel_err(out, ref_out) <= TOL[torch.float32]
    assert rel_err(net, ref_net) <= TOL[torch.bfloat16]


# ----------------------------------------------------------------------------- CFG rescale


def _factors(f: torch.Tensor, w: float, phi: float) -> torch.Tensor:
    out = poisoned((f.shape[0] // 2,), torch.float32, f.device)
    ops.cfg_rescale_factors(f, w, phi, out=out, backend="triton")
    return out


def test_cfg_factors_batch1_many_programs_mean_much_larger_than_std(device):
    numel = 65537  # 4 x 128 x 128 + 1: a ragged last tile
    _, tiles, programs, _ = reduction_config(numel, 1)
    assert programs > 1 and (tiles > 1 or device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    cond = 1000.0 + 0.01 * torch.randn(1, numel, generator=gen)
    uncond = -500.0 + 0.02 * torch.randn(1, numel, generator=gen)
    f = torch.cat([cond, uncond]).to(device)
    k = _factors(f, 7.5, 0.7)
    ref = reference.cfg_rescale_factors(f, 7.5, 0.7)
    # Without the pivot shift float32 sums of squares of ~1e3-sized values lose every digit
    # of a 1e-4 variance; with it the error is float32 rounding of the data.
    assert rel_err(k, ref) <= 1e-5


def test_cfg_factors_cond_close_to_uncond(device):
    # w (cond - uncond) small next to uncond: the five-moment expansion of var(cfg) cancels
    # ~100x here; accumulating cfg' directly keeps float32-level accuracy.
    gen = torch.Generator().manual_seed(1)
    uncond = torch.randn(3, 4, 33, 35, generator=gen)
    cond = uncond + 0.05 * torch.randn(3, 4, 33, 35, generator=gen)
    f = torch.cat([cond, uncond]).to(device)
    assert rel_err(_factors(f, 7.5, 1.0), reference.cfg_rescale_factors(f, 7.5, 1.0)) <= TOL[torch.float32]


def test_cfg_factors_degenerate_samples(device):
    # A constant sample (std(cfg) = 0) and single-element samples give ratio 1: k = 1.
    f = torch.cat(
        [torch.full((1, 50), 3.0), torch.randn(1, 50), torch.full((1, 50), -1.0), torch.randn(1, 50)]
    )
    k = _factors(f.to(device), 5.0, 0.6)
    assert k[0].item() == 1.0
    assert torch.equal(_factors(torch.randn(6, 1, device=device), 5.0, 0.6).cpu(), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 37, 41)])
def test_cfg_rescale_matches_reference(device, shape, dtype):
    gen = torch.Generator().manual_seed(2)
    cond = torch.randn(shape, generator=gen).to(device, dtype)
    uncond = (0.8 * torch.randn(shape, generator=gen)).to(device, dtype)
    out = poisoned(shape, dtype, device)
    ops.cfg_rescale(cond, uncond, 7.5, 0.7, out=out, backend="triton")
    assert out.dtype == dtype
    assert rel_err(out, reference.cfg_rescale(cond, uncond, 7.5, 0.7)) <= TOL[dtype]


# ----------------------------------------------------------------------------- registration


def test_ops_registered_in_torch_namespace(device):
    T._ops()  # loads the kernel modules, which register the ops
    namespace = torch.ops.edmfast_triton
    for name in ("affine_step", "ancestral_step", "cfg_rescale_factors", "cfg_rescale"):
        assert hasattr(namespace, name), name
    x = torch.randn(2, 40, device=device)
    coef = _coef(device=device)
    out = poisoned((2, 40), torch.float32, device)
    net = poisoned((2, 40), torch.float32, device)
    seeds = torch.tensor([1, 2], device=device)
    # a churn through the registered op, every argument explicit (the schema has no defaults)
    namespace.affine_step(
        x,
        coef,
        out,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        1.0,
        None,
        None,
        seeds,
        4,
        0,
        net,
        None,
        0,
        True,
    )
    ref_out, ref_net = reference.churn(x, coef, seeds=torch.tensor([1, 2]), step=4)
    assert rel_err(out, ref_out) <= TOL[torch.float32] and rel_err(net, ref_net) <= TOL[torch.float32]


def test_op_schema_and_fake_tensor(device):
    T._ops()
    x = torch.randn(2, 33, device=device)
    # x, coef, out, f, h0..h3, hist_out, k, guidance_scale, guidance, noise, seeds, step, stage, out_net,
    # bad, bad_step, churn
    args = (
        x, torch.rand(16, device=device), torch.empty_like(x), torch.randn_like(x), torch.randn_like(x), None,
        None, None, torch.empty_like(x), None, 1.0, None, None, None, 0, 0, torch.empty_like(x), None, 0,
        False,
    )  # fmt: skip
    checks = ["test_schema"]  # the declared mutations (out, hist_out, out_net) are the only ones
    if device.type == "cuda":
        # Under TRITON_INTERPRET=1 torch.library.wrap_triton hands back the raw interpreted
        # kernel, which cannot run on FakeTensors; compiled kernels trace as a no-op instead.
        checks += ["test_faketensor", "test_aot_dispatch_static"]
    torch.library.opcheck(torch.ops.edmfast_triton.affine_step, args, test_utils=tuple(checks))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("net_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (8, 4, 128, 128), (3, 7), (1, 2**20 + 3)])
def test_gpu_compiled_heun_step(shape, net_dtype):
    for config in CONFIGS:
        _check_step(shape, config, net_dtype, torch.device("cuda"))


@pytest.mark.gpu
@gpu
def test_gpu_cfg_factors_batch1_large():
    numel = 4 * 1024 * 1024 + 5
    _, _, programs, _ = reduction_config(numel, 1)
    assert programs >= 512  # split over many programs at batch 1
    cond = 100.0 + torch.randn(1, numel, device="cuda", dtype=torch.float64).float()
    uncond = 100.0 + 0.9 * torch.randn(1, numel, device="cuda", dtype=torch.float64).float()
    f = torch.cat([cond, uncond]).bfloat16()
    assert rel_err(_factors(f, 7.5, 0.7), reference.cfg_rescale_factors(f, 7.5, 0.7)) <= 1e-5


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_replay_reads_new_coef_and_seeds():
    dev = torch.device("cuda")
    shape = (4, 3, 16, 16)
    x_hat = torch.randn(shape, device=dev)
    f = torch.randn(8, *shape[1:], device=dev, dtype=torch.bfloat16)
    k = torch.rand(4, device=dev) + 0.5
    coef = _coef(device=dev)
    seeds = torch.tensor([1, 2, 3, 4], device=dev)
    out = torch.empty(shape, device=dev)
    net = torch.empty((8, *shape[1:]), device=dev, dtype=torch.bfloat16)

    def step():
        ops.heun_step(
            x_hat,
            coef,
            out=out,
            f=f,
            k=k,
            guidance_scale=3.0,
            seeds=seeds,
            step=2,
            out_net=net,
            backend="triton",
        )
        T.cfg_rescale_factors(f, 3.0, 0.5, out=k)

    step()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(2):
        coef.copy_(_coef(p=1.0 - 0.1 * trial, q=0.0, r=0.3 + trial, std=0.2 * trial + 0.1, c=0.9, device=dev))
        seeds.copy_(torch.tensor([10, 20, 30, 2**40], device=dev) + trial)
        k.copy_(torch.rand(4, device=dev) + 0.5)
        k_before = k.clone()
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_net = reference.heun_step(
            x_hat, coef, f=f, k=k_before, guidance_scale=3.0, seeds=seeds, step=2, net_rows=2
        )
        assert rel_err(out, ref_out) <= TOL[torch.float32]
        assert rel_err(net, ref_net) <= TOL[torch.bfloat16]
        assert rel_err(k, reference.cfg_rescale_factors(f, 3.0, 0.5)) <= 1e-5


@pytest.mark.gpu
@gpu
def test_gpu_torch_compile_fullgraph():
    dev = torch.device("cuda")
    x_hat = torch.randn(2, 4, 32, 32, device=dev)
    f = torch.randn(4, 4, 32, 32, device=dev, dtype=torch.float16)
    coef = _coef(device=dev)
    seeds = torch.tensor([5, 6], device=dev)

    def fn(x_hat, f, coef, seeds):
        k = torch.empty(2, device=x_hat.device)
        torch.ops.edmfast_triton.cfg_rescale_factors(f, 7.5, 0.7, k, None, None, None, None)
        out = torch.empty_like(x_hat)
        net = torch.empty_like(f)
        torch.ops.edmfast_triton.affine_step(
            x_hat,
            coef,
            out,
            f,
            None,
            None,
            None,
            None,
            None,
            k,
            7.5,
            None,
            None,
            seeds,
            1,
            0,
            net,
            None,
            0,
            False,
        )
        return out, net

    T._ops()
    out, net = torch.compile(fn, fullgraph=True)(x_hat, f, coef, seeds)
    k = reference.cfg_rescale_factors(f, 7.5, 0.7)
    ref_out, ref_net = reference.heun_step(
        x_hat, coef, f=f, k=k, guidance_scale=7.5, seeds=seeds, step=1, net_rows=2
    )
    assert rel_err(out, ref_out) <= 1e-5  # k goes through float32 here, the reference keeps float64
    assert rel_err(net, ref_net) <= TOL[torch.float16]
