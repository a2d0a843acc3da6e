"""The generalized fused pass: ``out = a x + b F + sum_k c_k h_k + std eps``, ``out_net = c_net out``,
``hist_out = p x + q F``.

One read of every operand and one write of every result per element: the
Euler point, the Heun / 2nd-order correction, the next step's churn, a multistep method's update
with its history slots and the next network input are all instances of this kernel with different
constexpr switches (one per present operand; a churn is a = 1 with noise only). See
`edmfast.reference.affine_step`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _triton_op
from . import _wrap_triton as wrap_triton
from .philox import philox_normal_block

# Noise modes (constexpr NOISE).
NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2

# CUDA caps grid dims 1 and 2 at 65535; the batch rides on dim 1.
MAX_BATCH = 65535


def block_config(numel: int, batch: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for ``batch`` samples of ``numel`` elements.

    Under TRITON_INTERPRET=1 one fixed block: each program costs a round of numpy calls, and 1024
    keeps block boundaries inside the small test shapes. On GPU 2048 elements per program for
    large tensors, halved (down to 256) while the grid has fewer than 512 programs so a batch-1
    latent still spreads over an H200's 132 SMs; 8 fp32 elements per thread (two 16-byte vectors
    per operand). Never more than the next power of two of numel, never below 16 (BLOCK // 4 >= 4
    Philox lanes). A heuristic, not autotuning: autotune would re-run a kernel whose out= may
    alias its input, and must not benchmark inside a CUDA-graph capture.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 1024, 4
    block = 2048
    while block > 256 and batch * triton.cdiv(numel, block) < 512:
        block //= 2
    block = max(16, min(block, triton.next_power_of_2(numel)))
    return block, max(1, min(8, block // 256))


@triton.jit(do_not_specialize=["step", "stage", "bad_step"])
def _affine_step_kernel(
    x_ptr,
    h0_ptr,
    h1_ptr,
    h2_ptr,
    h3_ptr,
    f_ptr,
    k_ptr,
    noise_ptr,
    seeds_ptr,
    coef_ptr,
    out_ptr,
    hist_out_ptr,
    out_net_ptr,
    guidance_ptr,
    bad_ptr,
    B,
    M,
    guidance_scale,
    step,
    stage,
    bad_step,
    CHURN: tl.constexpr,
    HAS_F: tl.constexpr,
    CFG: tl.constexpr,
    HAS_K: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_H1: tl.constexpr,
    HAS_H2: tl.constexpr,
    HAS_H3: tl.constexpr,
    NOISE: tl.constexpr,
    NET_ROWS: tl.constexpr,
    HIST_OUT: tl.constexpr,
    W_FROM_PTR: tl.constexpr,
    HAS_BAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid (element blocks, samples): per-sample offsets need no division, and the Philox
    # counter is the element index inside the sample, so the stream is batch-size invariant.
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    start = blk.to(tl.int64) * BLOCK
    e = start + tl.arange(0, BLOCK)
    mask = e < M
    row = b * M + e
    rows_stride = tl.cast(B, tl.int64) * M  # elements in B rows, int64 (B * M may pass 2**31)

    # Coefficients come from device memory at run time: a captured graph replays new schedules.
    # A column is loaded only under its operand's switch (columns 0..2 never for a churn), so a
    # 5-float Heun row is read in bounds and an absent operand's inf / NaN never reaches a sum.
    # Every load comes before the first store: an output may be exactly an element-wise input.
    x = tl.load(x_ptr + row, mask=mask, other=0.0)
    if CHURN:
        acc = x
    else:
        acc = tl.load(coef_ptr + 0) * x
    if HAS_F:
        if CFG:
            # f = [cond rows; uncond rows]: F = k[b] (uncond + w (cond - uncond)).
            cond = tl.load(f_ptr + row, mask=mask, other=0.0).to(tl.float32)
            uncond = tl.load(f_ptr + rows_stride + row, mask=mask, other=0.0).to(tl.float32)
            if W_FROM_PTR:
                w = tl.load(guidance_ptr)  # read at run time: one captured graph serves any scale
            else:
                w = guidance_scale
            pred = uncond + w * (cond - uncond)
            if HAS_K:
                pred = tl.load(k_ptr + b) * pred
        else:
            pred = tl.load(f_ptr + row, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(coef_ptr + 2) * pred
    if HAS_H0:
        acc += tl.load(coef_ptr + 1) * tl.load(h0_ptr + row, mask=mask, other=0.0)
    if HAS_H1:
        acc += tl.load(coef_ptr + 5) * tl.load(h1_ptr + row, mask=mask, other=0.0)
    if HAS_H2:
        acc += tl.load(coef_ptr + 6) * tl.load(h2_ptr + row, mask=mask, other=0.0)
    if HAS_H3:
        acc += tl.load(coef_ptr + 7) * tl.load(h3_ptr + row, mask=mask, other=0.0)
    if NOISE == 1:  # NOISE_TENSOR
        acc += tl.load(coef_ptr + 3) * tl.load(noise_ptr + row, mask=mask, other=0.0)
    elif NOISE == 2:  # NOISE_PHILOX
        eps = philox_normal_block(tl.load(seeds_ptr + b), step, start, stage, BLOCK)
        acc += tl.load(coef_ptr + 3) * eps
    if HIST_OUT:
        h_new = tl.load(coef_ptr + 8) * x
        if HAS_F:
            h_new += tl.load(coef_ptr + 9) * pred
    tl.store(out_ptr + row, acc, mask=mask)
    if HIST_OUT:
        tl.store(hist_out_ptr + row, h_new, mask=mask)
    if HAS_BAD:
        # |x| < inf is false exactly for inf and NaN; masked lanes (which may hold coef * 0 = NaN
        # when a coefficient is inf) do not count. No sum, so finite values can never overflow.
        nonfinite = tl.max((mask & ~(tl.abs(acc) < float("inf"))).to(tl.int32), axis=0)
        tl.atomic_min(bad_ptr + b, bad_step, mask=nonfinite > 0)
    if NET_ROWS > 0:
        net = (tl.load(coef_ptr + 4) * acc).to(out_net_ptr.dtype.element_ty)
        for j in tl.static_range(NET_ROWS):
            tl.store(out_net_ptr + j * rows_stride + row, net, mask=mask)


def launch(
    x: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    f: torch.Tensor | None,
    h0: torch.Tensor | None,
    h1: torch.Tensor | None,
    h2: torch.Tensor | None,
    h3: torch.Tensor | None,
    hist_out: torch.Tensor | None,
    k: torch.Tensor | None,
    guidance_scale: float,
    guidance: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    stage: int,
    out_net: torch.Tensor | None,
    bad: torch.Tensor | None,
    bad_step: int,
    churn: bool,
) -> None:
    """Launch `_affine_step_kernel` on contiguous, validated operands (see `edmfast.ops`)."""
    batch = x.shape[0]
    numel = x.numel() // batch
    if batch > MAX_BATCH:
        raise ValueError(f"the triton backend handles at most {MAX_BATCH} samples per call, got {batch}")
    noise_mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX if seeds is not None else NOISE_NONE
    block, num_warps = block_config(numel, batch)
    # Absent operands are never read (their constexpr switch is off); x stands in so every
    # pointer argument is a real tensor, which torch.compile's kernel wrapper handles best.
    wrap_triton(_affine_step_kernel)[(triton.cdiv(numel, block), batch)](
        x,
        x if h0 is None else h0,
        x if h1 is None else h1,
        x if h2 is None else h2,
        x if h3 is None else h3,
        x if f is None else f,
        x if k is None else k,
        x if noise is None else noise,
        x if seeds is None else seeds,
        coef,
        out,
        out if hist_out is None else hist_out,
        out if out_net is None else out_net,
        x if guidance is None else guidance,
        x if bad is None else bad,
        batch,
        numel,
        float(guidance_scale),
        int(step) & 0xFFFFFFFF,  # the counter words are the low 32 bits (edmfast.philox)
        int(stage) & 0xFFFFFFFF,
        int(bad_step),
        CHURN=bool(churn),
        HAS_F=f is not None,
        CFG=f is not None and f.shape[0] == 2 * batch,
        HAS_K=k is not None,
        HAS_H0=h0 is not None,
        HAS_H1=h1 is not None,
        HAS_H2=h2 is not None,
        HAS_H3=h3 is not None,
        NOISE=noise_mode,
        NET_ROWS=0 if out_net is None else out_net.shape[0] // batch,
        HIST_OUT=hist_out is not None,
        W_FROM_PTR=guidance is not None,
        HAS_BAD=bad is not None,
        BLOCK=block,
        num_warps=num_warps,
    )


# Every argument explicit (no defaults): torch 2.11's custom-op machinery fails on a mutated
# argument among trailing defaulted ones (issue 21); the entries in edmfast.triton pass them all.
@_triton_op("edmfast_triton::affine_step", mutates_args=("out", "hist_out", "out_net", "bad"))
def affine_step(
    x: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    f: torch.Tensor | None,
    h0: torch.Tensor | None,
    h1: torch.Tensor | None,
    h2: torch.Tensor | None,
    h3: torch.Tensor | None,
    hist_out: torch.Tensor | None,
    k: torch.Tensor | None,
    guidance_scale: float,
    guidance: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    stage: int,
    out_net: torch.Tensor | None,
    bad: torch.Tensor | None,
    bad_step: int,
    churn: bool,
) -> None:
    launch(
        x, coef, out, f, h0, h1, h2, h3, hist_out, k, guidance_scale, guidance, noise, seeds, step, stage,
        out_net, bad, bad_step, churn,
    )  # fmt: skip
