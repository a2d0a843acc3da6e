"""Classifier-free guidance with rescale (Lin et al. 2023, Eq. 14-16) as two passes over the data.

``cfg = uncond + w (cond - uncond)``, ``k[b] = phi std(cond_b) / std(cfg_b) + (1 - phi)``,
``out = k[b] cfg``; unbiased stds over each sample's M elements, ratio 1 when std(cfg) = 0 or
M < 2 (`edmfast.reference.cfg_rescale_factors`).

Pass 1 (reduction) splits every sample over up to 1024 programs, so batch 1 still fills the GPU;
each program writes its partial sums to a small workspace and a one-program-per-sample finalize
kernel adds them in a fixed order (deterministic, no atomics). Pass 2 is elementwise.

Per sample the kernel accumulates four sums, of c' and cfg' and of their squares, where
c' = cond - cond[0] and u' = uncond - uncond[0] are pivot-shifted (variance is shift-invariant;
cfg' = u' + w (c' - u') is cfg shifted by a constant). The pivot makes ``sum x^2 - (sum x)^2 / M``
exact in practice when |mean| >> std. Accumulating cfg' directly instead of the five moments
(sum c, u, c^2, u^2, c u) avoids expanding var(cfg) = (1-w)^2 var(u) + 2 w (1-w) cov + w^2 var(c):
with w = 7.5 and cond ~ uncond (the common case) those terms are ~100x var(cfg) and cancel,
amplifying float32 rounding of the sums ~100x. Same single read of cond and uncond either way.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _triton_op
from . import _wrap_triton as wrap_triton
from .heun_step import MAX_BATCH, block_config

N_SUMS = 4  # sum c', sum c'^2, sum cfg', sum cfg'^2


def reduction_config(numel: int, batch: int) -> tuple[int, int, int, int]:
    """(BLOCK, tiles per program, programs per sample, num_warps) for the partial-sum pass.

    GPU: about 2048 programs over the whole batch (an H200 has 132 SMs; ~16 resident 4-warp
    programs each keep enough loads in flight), at most 1024 per sample so the finalize kernel
    reduces them in one block. Interpreter: one fixed small config (at most 16 programs).
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block = max(16, min(1024 if interpret else 2048, triton.next_power_of_2(numel)))
    tiles = triton.cdiv(numel, block)
    wanted = 16 if interpret else min(1024, triton.cdiv(2048, batch))
    per_program = triton.cdiv(tiles, min(wanted, tiles))
    return block, per_program, triton.cdiv(tiles, per_program), 4 if block <= 1024 else 8


@triton.jit
def _cfg_partial_sums_kernel(
    cond_ptr, uncond_ptr, ws_ptr, M, P, guidance_scale, TILES, BLOCK: tl.constexpr
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = b * M
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
        g = u + guidance_scale * (c - u)
        # Masked lanes hold -pivot after the shift: zero them before they reach the sums.
        c = tl.where(mask, c, 0.0)
        g = tl.where(mask, g, 0.0)
        s_c += c
        s_cc += c * c
        s_g += g
        s_gg += g * g
    out = ws_ptr + b * 4 * P + pid
    tl.store(out, tl.sum(s_c, axis=0))
    tl.store(out + P, tl.sum(s_cc, axis=0))
    tl.store(out + 2 * P, tl.sum(s_g, axis=0))
    tl.store(out + 3 * P, tl.sum(s_gg, axis=0))


@triton.jit
def _cfg_finalize_kernel(ws_ptr, k_ptr, M, P, guidance_rescale, P_BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, P_BLOCK)
    mask = i < P
    sums = ws_ptr + b * 4 * P + i
    # float64 for the combination only (P values per sample): sum x^2 - (sum x)^2 / M cancels
    # the squared mean, and the pivot only bounds it, so spend the spare precision here.
    s_c = tl.sum(tl.load(sums, mask=mask, other=0.0).to(tl.float64), axis=0)
    s_cc = tl.sum(tl.load(sums + P, mask=mask, other=0.0).to(tl.float64), axis=0)
    s_g = tl.sum(tl.load(sums + 2 * P, mask=mask, other=0.0).to(tl.float64), axis=0)
    s_gg = tl.sum(tl.load(sums + 3 * P, mask=mask, other=0.0).to(tl.float64), axis=0)
    n = tl.cast(M, tl.float64)  # tl.cast also accepts M specialized to a constant
    var_c = tl.maximum(s_cc - s_c * (s_c / n), 0.0)  # (N - 1) var; the 1/(N - 1) cancels in the ratio
    var_g = tl.maximum(s_gg - s_g * (s_g / n), 0.0)
    ok = (var_g > 0.0) & (n >= 2.0)  # the unbiased std needs two elements
    ratio = tl.where(ok, tl.sqrt(var_c / tl.where(ok, var_g, 1.0)), 1.0)
    k = guidance_rescale * ratio + (1.0 - guidance_rescale)
    tl.store(k_ptr + b, k.to(tl.float32))


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


def _launch_factors(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, guidance_rescale: float, k: torch.Tensor,
    ws: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """k (float32 [B]) from contiguous cond / uncond rows; ``ws`` (or a fresh one) holds the partials."""
    batch = cond.shape[0]
    numel = cond.numel() // batch
    if batch > MAX_BATCH:
        raise ValueError(f"the triton backend handles at most {MAX_BATCH} samples per call, got {batch}")
    block, tiles, programs, num_warps = reduction_config(numel, batch)
    if ws is None:
        ws = torch.empty(batch * N_SUMS * programs, dtype=torch.float32, device=cond.device)
    wrap_triton(_cfg_partial_sums_kernel)[(programs, batch)](
        cond, uncond, ws, numel, programs, float(guidance_scale), tiles, BLOCK=block, num_warps=num_warps
    )
    wrap_triton(_cfg_finalize_kernel)[(batch,)](
        ws, k, numel, programs, float(guidance_rescale), P_BLOCK=triton.next_power_of_2(programs)
    )


@_triton_op("edmfast_triton::cfg_rescale_factors", mutates_args=("out",))
def cfg_rescale_factors(
    f: torch.Tensor, guidance_scale: float, guidance_rescale: float, out: torch.Tensor
) -> None:
    batch = f.shape[0] // 2
    _launch_factors(f[:batch], f[batch:], guidance_scale, guidance_rescale, out)


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
    _, _, programs, _ = reduction_config(numel, batch)
    # One small allocation (torch's caching allocator, capture-safe): partials, then k.
    ws = torch.empty(batch * (N_SUMS * programs + 1), dtype=torch.float32, device=cond.device)
    k = ws[batch * N_SUMS * programs :]
    _launch_factors(cond, uncond, guidance_scale, guidance_rescale, k, ws)
    block, num_warps = block_config(numel, batch)
    wrap_triton(_cfg_apply_kernel)[(triton.cdiv(numel, block), batch)](
        cond, uncond, k, out, numel, float(guidance_scale), BLOCK=block, num_warps=num_warps
    )
