"""CFG rescale (Lin et al. 2023, Eq. 14-16) on every backend vs the float64 reference.

``cfg_rescale_factors``: k[b] = phi std(cond_b)/std(cfg_b) + (1 - phi) from one reduction pass;
``cfg_rescale``: k cfg in cond's dtype. The inputs include the hard cases for a one-pass
variance: |mean| >> std (mean 1e3, std 1e-2), cond and uncond nearly equal, one element per
sample, constant samples (std(cfg) = 0), and a sample large enough to be split across blocks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, poisoned, rel_err
from test_heun_step import lowp_bound, make_tensor

from edmfast import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# [B, ...] shapes of cond (f has 2B rows); M = 1 and 2 are the edges of the unbiased std.
SHAPES = [(1, 1), (3, 1), (1, 2), (3, 7), (1, 1023), (3, 1023), (1, 3, 37, 41), (3, 3, 37, 41)]
GUIDANCE = [(7.5, 0.7), (1.0, 0.0), (3.0, 1.0), (-0.5, 0.25)]
ids_dtype = lambda d: str(d).removeprefix("torch.")
ids_shape = lambda s: "x".join(map(str, s))


def _gen() -> tuple[int, torch.Generator]:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return seed, torch.Generator().manual_seed(seed)


def check_factors(backend, device, f: torch.Tensor, w: float, phi: float, where: str) -> None:
    batch = f.shape[0] // 2
    ref = reference.cfg_rescale_factors(f, w, phi)
    k = poisoned((batch,), torch.float32, device)
    assert ops.cfg_rescale_factors(f, w, phi, out=k, backend=backend) is k
    # k is a float32 scalar per sample computed from the exact (already rounded) inputs, so
    # the float32 budget applies whatever the input dtype.
    err = rel_err(k, ref)
    assert err <= TOL[torch.float32], f"k rel err {err:.3g} {where}"


def check_cfg_rescale(backend, device, cond, uncond, w: float, phi: float, where: str) -> None:
    ref = reference.cfg_rescale(cond, uncond, w, phi)
    out = poisoned(cond.shape, cond.dtype, device)
    assert ops.cfg_rescale(cond, uncond, w, phi, out=out, backend=backend) is out
    assert out.dtype == cond.dtype and out.shape == cond.shape
    dtype = cond.dtype
    k = reference.cfg_rescale_factors(torch.cat([cond, uncond]), w, phi).to(dtype).cpu()
    c, u = cond.cpu(), uncond.cpu()
    eager = k.reshape(-1, *([1] * (cond.dim() - 1))) * (u + w * (c - u))  # PyTorch eager in dtype
    bound = lowp_bound(dtype, ref, eager)
    err = rel_err(out, ref)
    assert err <= bound, f"out rel err {err:.3g} > {bound:.3g} {where}"


@pytest.mark.parametrize("w,phi", GUIDANCE)
@pytest.mark.parametrize("shape", SHAPES, ids=ids_shape)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype)
def test_factors(backend_device, dtype, shape, w, phi):
    backend, device = backend_device
    seed, gen = _gen()
    f = make_tensor((2 * shape[0], *shape[1:]), dtype, device, gen, "contiguous")
    check_factors(backend, device, f, w, phi, f"(seed {seed}, {backend}, {dtype}, {shape}, w={w}, phi={phi})")


@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids_shape)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype)
def test_cfg_rescale(backend_device, dtype, shape, layout):
    backend, device = backend_device
    seed, gen = _gen()
    cond = make_tensor(shape, dtype, device, gen, layout)
    uncond = make_tensor(shape, dtype, device, gen, layout)
    check_cfg_rescale(
        backend, device, cond, uncond, 7.5, 0.7, f"(seed {seed}, {backend}, {dtype}, {shape}, {layout})"
    )


@pytest.mark.parametrize("mean", [1e3, -3e2])
def test_mean_much_larger_than_std(backend_device, mean):
    """sum(x^2) - sum(x)^2/n in float32 would lose every digit here; pivot shifting must not."""
    backend, device = backend_device
    seed, gen = _gen()
    shape = (2, 3, 37, 41)
    cond = (mean + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)).float().to(device)
    uncond = (mean + 2e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)).float().to(device)
    where = f"(seed {seed}, {backend}, mean {mean})"
    check_factors(backend, device, torch.cat([cond, uncond]), 7.5, 0.7, where)
    check_cfg_rescale(backend, device, cond, uncond, 7.5, 0.7, where)


def test_cond_close_to_uncond(backend_device):
    """The usual late-sampling regime: cond = uncond + a small difference, and a large mean."""
    backend, device = backend_device
    seed, gen = _gen()
    shape = (3, 3, 37, 41)
    base = 20.0 + torch.randn(shape, generator=gen, dtype=torch.float64)
    cond = (base + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64)).float().to(device)
    uncond = base.float().to(device)
    check_factors(backend, device, torch.cat([cond, uncond]), 7.5, 0.7, f"(seed {seed}, {backend})")


def test_sample_split_across_blocks(backend_device):
    """Batch 1 with 3 x 8192 + 5 elements: the GPU reduction splits it over several blocks."""
    backend, device = backend_device
    seed, gen = _gen()
    f = make_tensor((2, 3 * 8192 + 5), torch.float32, device, gen, "contiguous")
    f[0] += 4.0  # a mean offset between cond and uncond
    check_factors(backend, device, f, 5.0, 0.5, f"(seed {seed}, {backend})")


def test_degenerate_samples_give_k_one(backend_device):
    """One element (unbiased std undefined) or a constant cfg (std 0): ratio 1, so k = 1."""
    backend, device = backend_device
    k = poisoned((2,), torch.float32, device)
    ops.cfg_rescale_factors(torch.randn(4, 1, device=device), 7.5, 0.7, out=k, backend=backend)
    assert torch.equal(k, torch.ones_like(k))
    const = torch.full((4, 33), 2.5, device=device)
    const[1] = -1.0  # another constant in sample 1
    ops.cfg_rescale_factors(const, 7.5, 0.7, out=k, backend=backend)
    assert torch.equal(k, torch.ones_like(k))
    out = poisoned((2, 33), torch.float32, device)
    ops.cfg_rescale(const[:2], const[2:], 7.5, 0.7, out=out, backend=backend)
    torch.testing.assert_close(out, const[2:] + 7.5 * (const[:2] - const[2:]), rtol=1e-6, atol=0)


def test_phi_zero_is_plain_cfg(backend_device):
    backend, device = backend_device
    cond, uncond = torch.randn(2, 3, 9, device=device), torch.randn(2, 3, 9, device=device)
    out = poisoned(cond.shape, torch.float32, device)
    ops.cfg_rescale(cond, uncond, 4.0, 0.0, out=out, backend=backend)
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond), rtol=1e-6, atol=1e-6)


def test_phi_zero_with_vanishing_cfg_spread_gives_k_one(backend_device):
    """std(cfg) tiny but not 0 (w = 6.7e-44 over a constant uncond): std(cond) / std(cfg)
    overflows float32, and phi = 0 must still give k = 1, not 0 * inf = NaN (found by hypothesis)."""
    backend, device = backend_device
    cond = torch.tensor([[-53.8125, -55.25]], dtype=torch.float16, device=device)
    uncond = torch.tensor([[-54.4375, -54.4375]], dtype=torch.float16, device=device)
    w = 6.658489620338865e-44
    k = poisoned((1,), torch.float32, device)
    ops.cfg_rescale_factors(torch.cat([cond, uncond]), w, 0.0, out=k, backend=backend)
    assert torch.equal(k, torch.ones_like(k)), k
    out = poisoned(cond.shape, torch.float16, device)
    ops.cfg_rescale(cond, uncond, w, 0.0, out=out, backend=backend)
    assert torch.equal(out, uncond), out


@pytest.mark.parametrize("numel", [None, 5])
def test_prepared_factors_equal_the_public_op(backend_device, numel):
    """One prepared launch, validated once, over new model outputs (and new guidance values in the
    tensors) on every use: the public op's k bit for bit, on one static workspace."""
    backend, device = backend_device
    batch, row = 3, 1029
    w, phi = torch.tensor([7.5], device=device), torch.tensor([0.7], device=device)
    f_like = torch.empty(2 * batch, row, device=device, dtype=torch.bfloat16)
    k = poisoned((batch,), torch.float32, device)
    ws = ops.cfg_workspace(f_like, backend)
    launch = ops.prepare_cfg_rescale_factors(backend, f_like, w, phi, out=k, workspace=ws, numel=numel)
    ctx = ops.launch_context(backend, device)
    for wv, pv in [(7.5, 0.7), (2.0, 1.0), (4.0, 0.3)]:
        f = (torch.randn(2 * batch, row, device=device) * 2 + 3).to(torch.bfloat16)
        w.fill_(wv)
        phi.fill_(pv)
        launch(f, ctx)
        want = poisoned((batch,), torch.float32, device)
        ops.cfg_rescale_factors(f, wv, pv, out=want, numel=numel, backend=backend)
        assert torch.equal(k, want), (wv, pv)
    with pytest.raises(ValueError, match="f_like"):
        ops.prepare_cfg_rescale_factors(backend, f_like[:3], w, phi, out=k)


# --------------------------------------------------------------------- poisoned workspaces (issue 22 item 13)


def _triton_on_cpu():
    reason = ops.backend_status("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    import importlib

    return importlib.import_module("edmfast.triton.cfg_rescale")  # the module, not the package's entry


def test_a_launch_that_died_mid_grid_does_not_poison_the_workspace():
    """Run the real factors kernel over only the first programs of each sample (the state of a
    launch that died mid-grid: partial sums written, arrivals counted, nobody finalized), then a
    full launch on other data through the same workspace: its k must be the reference's. With bare
    counters the second launch's second program would finalize early, on stale partial sums."""
    C = _triton_on_cpu()
    batch, row = 2, 7000
    f_old = torch.randn(2 * batch, row) * 5
    f = torch.randn(2 * batch, row) * 0.5 + 1
    ws = ops.cfg_workspace(f, "triton")
    block, tiles, programs, warps = C.reduction_config(row, batch)
    assert programs >= 3, "the case needs several programs per sample"
    k = poisoned((batch,), torch.float32, "cpu")
    counts = C.counters(ws, f)
    C._cfg_factors_kernel[(programs - 1, batch)](
        f_old[:batch], f_old[batch:], ws, counts, k, k, k, row, row, programs, 7.5, 0.7, tiles,
        C._next_tag(), W_FROM_PTR=False, PHI_FROM_PTR=False, BLOCK=block, P_BLOCK=programs, num_warps=warps,
    )  # fmt: skip
    assert [v & 0xFFFFFFFF for v in counts.tolist()] == [programs - 1] * batch  # the dead launch's trace
    assert torch.isnan(k).all()
    for trial in range(2):  # and the workspace stays good for the launches after
        ops.cfg_rescale_factors(f, 7.5, 0.7, out=k, workspace=ws, backend="triton")
        assert rel_err(k, reference.cfg_rescale_factors(f, 7.5, 0.7)) <= TOL[torch.float32], trial
        assert [v & 0xFFFFFFFF for v in counts.tolist()] == [0] * batch


@pytest.mark.parametrize("garbage", ["stale tag", "all ones"])
def test_garbage_arrival_words_are_replaced(backend_device, garbage):
    """Arrival words with any other launch's tag (or none of ours) and any count are replaced by
    the next launch, whatever its backend (cuda on a GPU, triton everywhere)."""
    backend, device = backend_device
    batch, row = 3, 20000
    f = torch.randn(2 * batch, row, device=device)
    ws = ops.cfg_workspace(f, backend)
    if ws.numel() == 0:
        pytest.skip(f"the {backend} backend keeps no arrival counters")
    if backend == "triton":
        from edmfast.triton.cfg_rescale import counters
    else:
        from edmfast.native import counters
    words = counters(ws, f)
    ws.normal_()  # stale partial sums everywhere
    words.fill_(-1 if garbage == "all ones" else (12345 << 32) | 3)
    k = poisoned((batch,), torch.float32, device)
    ops.cfg_rescale_factors(f, 3.0, 1.0, out=k, workspace=ws, backend=backend)
    assert rel_err(k, reference.cfg_rescale_factors(f, 3.0, 1.0)) <= TOL[torch.float32]
