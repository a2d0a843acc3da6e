"""Classifier-free guidance with rescale (Lin et al. 2023, Eq. 14-16): the factors in one launch.

``cfg = uncond + w (cond - uncond)``, ``k[b] = phi std(cond_b) / std(cfg_b) + (1 - phi)``,
``out = k[b] cfg``; unbiased stds over each sample's M elements, ratio 1 when std(cfg) = 0 or
M < 2 (`edmfast.reference.cfg_rescale_factors`).

The reduction splits every sample over up to 1024 programs, so batch 1 still fills the GPU. Each
program writes its partial sums to a workspace and counts itself in on its sample's arrival word
(an atomic with acquire-release semantics); the program that arrives last adds the sample's
partials in a fixed order, in float64, writes k and resets the count to 0, so the next launch (or
CUDA graph replay) starts clean. One launch, deterministic (no float atomics). `cfg_rescale` then
runs one elementwise pass.

The arrival words are ``tag << 32 | count`` with a fresh tag per launch (csrc/include/edmfast/ops.h
describes the same protocol for the CUDA kernel): a program that finds another tag there is the
first of its launch and replaces the word rather than counting on it, so a launch that died
mid-grid (an exception in the interpreter, a killed kernel) cannot make a later launch on the same
workspace finalize early with stale partials.

Per sample the kernel accumulates four sums, of c' and cfg' and of their squares, where
c' = cond - cond[0] and u' = uncond - uncond[0] are pivot-shifted (variance is shift-invariant;
cfg' = u' + w (c' - u') is cfg shifted by a constant). The pivot makes ``sum x^2 - (sum x)^2 / M``
exact in practice when |mean| >> std. Accumulating cfg' directly instead of the five moments
(sum c, u, c^2, u^2, c u) avoids expanding var(cfg) = (1-w)^2 var(u) + 2 w (1-w) cov + w^2 var(c):
with w = 7.5 and cond ~ uncond (the common case) those terms are ~100x var(cfg) and cancel,
amplifying float32 rounding of the sums ~100x. Same single read of cond and uncond either way.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

from . import _triton_op
from . import _wrap_triton as wrap_triton
from .affine_step import MAX_BATCH, block_config

N_SUMS = 4  # sum c', sum c'^2, sum cfg', sum cfg'^2

# Launch tags in [1, 2**31): always an int32 kernel argument (one compiled variant), never 0 (the
# tag of a zero-filled workspace, where a count of 0 is right for any launch anyway).
_TAGS = itertools.count()


def _next_tag() -> int:
    return next(_TAGS) % (2**31 - 1) + 1


def reduction_config(numel: int, batch: int, max_programs: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK, tiles per program, programs per sample, num_warps) for the partial-sum pass.

    GPU: about 2048 programs over the whole batch (an H200 has 132 SMs; ~16 resident 4-warp
    programs each keep enough loads in flight), at most 1024 per sample so the finalize kernel
    reduces them in one block. Interpreter: one fixed small config (at most 16 programs).
    ``max_programs`` caps the programs per sample (a workspace laid out for a longer row).
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block = max(16, min(1024 if interpret else 2048, triton.next_power_of_2(numel)))
    tiles = triton.cdiv(numel, block)
    wanted = 16 if interpret else min(1024, triton.cdiv(2048, batch))
    per_program = triton.cdiv(tiles, min(wanted, tiles))
    if max_programs is not None:
        per_program = max(per_program, triton.cdiv(tiles, max_programs))
    return block, per_program, triton.cdiv(tiles, per_program), 4 if block <= 1024 else 8


@triton.jit
def _arrive_stale(word_ptr, tag):
    """Count in on an arrival word that held another launch's tag: install (tag, 1), or count in
    on the word a program of this launch installed first. Returns the programs before this one."""
    mine = tag.to(tl.int64) << 32
    got = tl.full([], -1, tl.int64)
    while got < 0:
        cur = tl.atomic_add(word_ptr, 0, sem="acq_rel")  # an atomic read
        if (cur >> 32) == tag:
            got = tl.atomic_add(word_ptr, 1, sem="acq_rel") & 0xFFFFFFFF
        else:
            if tl.atomic_cas(word_ptr, cur, mine + 1, sem="acq_rel") == cur:
                got = tl.full([], 0, tl.int64)
    return got


@triton.jit(do_not_specialize=["tag"])
def _cfg_factors_kernel(
    cond_ptr, uncond_ptr, ws_ptr, count_ptr, k_ptr, w_ptr, phi_ptr, M, ROW, P, guidance_scale,
    guidance_rescale, TILES, tag, W_FROM_PTR: tl.constexpr, PHI_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
    P_BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = b * ROW  # rows are ROW >= M elements apart; the first M of each count
    if W_FROM_PTR:
        w = tl.load(w_ptr)
    else:
        w = guidance_scale
    pivot_c = tl.load(cond_ptr + base).to(tl.float32)
    pivot_u = tl.load(uncond_ptr + base).to(tl.float32)
    s_c = tl.zeros([BLOCK], dtype=tl.float32)
    s_cc = tl.zeros([BLOCK], dtype=tl.float32)
    s_g = tl.zeros([BLOCK], dtype=tl.float32)
    s_gg = tl.zeros([BLOCK], dtype=tl.float32)
    # Program pid owns the contiguous tiles [pid * TILES, (pid + 1) * TILES) of its sample.
    first = pid.to(tl.int64) * TILES * BLOCK
    for t in range(TILES):
        e = first + t * BLOCK + tl.arange(0, BLOCK)
        mask = e < M
        c = tl.load(cond_ptr + base + e, mask=mask, other=0.0).to(tl.float32) - pivot_c
        u = tl.load(uncond_ptr + base + e, mask=mask, other=0.0).to(tl.float32) - pivot_u
        g = u + w * (c - u)
        # Masked lanes hold -pivot after the shift: zero them before they reach the sums.
        c = tl.where(mask, c, 0.0)
        g = tl.where(mask, g, 0.0)
        s_c += c
        s_cc += c * c
        s_g += g
        s_gg += g * g
    sums = ws_ptr + b * 4 * P
    tl.store(sums + pid, tl.sum(s_c, axis=0))
    tl.store(sums + P + pid, tl.sum(s_cc, axis=0))
    tl.store(sums + 2 * P + pid, tl.sum(s_g, axis=0))
    tl.store(sums + 3 * P + pid, tl.sum(s_gg, axis=0))
    # Release the partials, count this program in; the last of the sample's P finalizes it. The
    # barrier orders every thread's stores before the (single-thread) release of the atomic. The
    # fast path is one atomic add; a word of another launch's tag takes the slow path once.
    tl.debug_barrier()
    old = tl.atomic_add(count_ptr + b, 1, sem="acq_rel")
    arrived = old & 0xFFFFFFFF
    if (old >> 32) != tag:
        arrived = _arrive_stale(count_ptr + b, tag)
    if arrived == P - 1:
        i = tl.arange(0, P_BLOCK)
        m = i < P
        # volatile: straight from L2, never a stale L1 line of another program's partials. float64
        # for the combination only: sum x^2 - (sum x)^2 / M cancels the squared mean, and the
        # pivot only bounds it, so spend the spare precision here.
        t_c = tl.sum(tl.load(sums + i, mask=m, other=0.0, volatile=True).to(tl.float64), axis=0)
        t_cc = tl.sum(tl.load(sums + P + i, mask=m, other=0.0, volatile=True).to(tl.float64), axis=0)
        t_g = tl.sum(tl.load(sums + 2 * P + i, mask=m, other=0.0, volatile=True).to(tl.float64), axis=0)
        t_gg = tl.sum(tl.load(sums + 3 * P + i, mask=m, other=0.0, volatile=True).to(tl.float64), axis=0)
        n = tl.cast(M, tl.float64)  # tl.cast also accepts M specialized to a constant
        var_c = tl.maximum(t_cc - t_c * (t_c / n), 0.0)  # (N - 1) var; the 1/(N - 1) cancels in the ratio
        var_g = tl.maximum(t_gg - t_g * (t_g / n), 0.0)
        ok = (var_g > 0.0) & (n >= 2.0)  # the unbiased std needs two elements
        ratio = tl.where(ok, tl.sqrt(var_c / tl.where(ok, var_g, 1.0)), 1.0)
        if PHI_FROM_PTR:
            phi = tl.load(phi_ptr).to(tl.float64)
        else:
            phi = tl.cast(guidance_rescale, tl.float64)
        tl.store(k_ptr + b, (phi * ratio + (1.0 - phi)).to(tl.float32))
        tl.atomic_xchg(count_ptr + b, tag.to(tl.int64) << 32)  # count 0: the next replay starts here


@triton.jit
def _cfg_apply_kernel(cond_ptr, uncond_ptr, k_ptr, out_ptr, M, guidance_scale, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    e = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < M
    row = b * M + e
    c = tl.load(cond_ptr + row, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(uncond_ptr + row, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(k_ptr + b) * (u + guidance_scale * (c - u))
    tl.store(out_ptr + row, out.to(out_ptr.dtype.element_ty), mask=mask)


def workspace_floats(batch: int, numel: int) -> int:
    """float32 words of the factors' workspace: 4 partial sums per program, then one 64-bit arrival
    word per sample (2 float32 words, 8-byte aligned: the partials are a multiple of 4 words)."""
    _, _, programs, _ = reduction_config(numel, batch)
    return batch * (N_SUMS * programs + 2)


def counters(ws: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The arrival words (int64 [B]: launch tag << 32 | count) of a workspace over f [2B, ...]."""
    batch = f.shape[0] // 2
    row = f.numel() // max(f.shape[0], 1)
    start = batch * N_SUMS * reduction_config(row, batch)[2]
    return ws[start : start + 2 * batch].view(torch.int64)


def new_workspace(f: torch.Tensor) -> torch.Tensor:
    """The zeroed workspace of `cfg_rescale_factors` over f [2B, ...] (its counters must start at 0)."""
    batch = f.shape[0] // 2
    numel = f.numel() // max(f.shape[0], 1)
    return torch.zeros(workspace_floats(batch, numel), dtype=torch.float32, device=f.device)


def _launch_factors(
    cond: torch.Tensor, uncond: torch.Tensor, w: float, w_t: torch.Tensor | None, phi: float,
    phi_t: torch.Tensor | None, k: torch.Tensor, ws: torch.Tensor, numel: int | None = None,
) -> None:  # fmt: skip
    """k (float32 [B]) from contiguous cond / uncond rows, one launch; ``ws`` from `new_workspace`.

    ``numel``: count the first numel elements of each row only (None: the whole row). The
    workspace layout (where the counters sit) is always that of the whole row.
    """
    batch = cond.shape[0]
    row = cond.numel() // batch
    count = row if numel is None else numel
    if batch > MAX_BATCH:
        raise ValueError(f"the triton backend handles at most {MAX_BATCH} samples per call, got {batch}")
    layout_programs = reduction_config(row, batch)[2]
    block, tiles, programs, num_warps = reduction_config(count, batch, layout_programs)
    start = batch * N_SUMS * layout_programs
    counts = ws[start : start + 2 * batch].view(torch.int64)
    wrap_triton(_cfg_factors_kernel)[(programs, batch)](
        cond, uncond, ws, counts, k, k if w_t is None else w_t, k if phi_t is None else phi_t, count, row,
        programs, float(w), float(phi), tiles, _next_tag(), W_FROM_PTR=w_t is not None,
        PHI_FROM_PTR=phi_t is not None, BLOCK=block, P_BLOCK=triton.next_power_of_2(programs),
        num_warps=num_warps,
    )  # fmt: skip


@_triton_op("edmfast_triton::cfg_rescale_factors", mutates_args=("out", "workspace"))
def cfg_rescale_factors(
    f: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float,
    out: torch.Tensor,
    guidance_scale_tensor: torch.Tensor | None,
    guidance_rescale_tensor: torch.Tensor | None,
    workspace: torch.Tensor | None,
    numel: int | None,
) -> None:
    batch = f.shape[0] // 2
    ws = new_workspace(f) if workspace is None else workspace
    w_t, phi_t = guidance_scale_tensor, guidance_rescale_tensor
    _launch_factors(f[:batch], f[batch:], guidance_scale, w_t, guidance_rescale, phi_t, out, ws, numel)


@_triton_op("edmfast_triton::cfg_rescale", mutates_args=("out",))
def cfg_rescale(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float,
    out: torch.Tensor,
) -> None:
    batch = cond.shape[0]
    numel = cond.numel() // batch
    # Small allocations (torch's caching allocator, capture-safe): the zeroed workspace, then k.
    ws = torch.zeros(workspace_floats(batch, numel) + batch, dtype=torch.float32, device=cond.device)
    k = ws[-batch:]
    _launch_factors(cond, uncond, guidance_scale, None, guidance_rescale, None, k, ws[:-batch])
    block, num_warps = block_config(numel, batch)
    wrap_triton(_cfg_apply_kernel)[(triton.cdiv(numel, block), batch)](
        cond, uncond, k, out, numel, float(guidance_scale), BLOCK=block, num_warps=num_warps
    )
