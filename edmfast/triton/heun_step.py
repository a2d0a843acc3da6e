"""Fused sampler pass: ``out = p x_hat + q x_prime + r F + std eps``, ``out_net = c out``.

One read of every operand and one write of every result per element (SPEC section 3): the Euler
point, the Heun / 2nd-order correction, the next step's churn and the next network input are all
instances of this kernel with different constexpr switches. See `edmfast.reference.heun_step`.
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


@triton.jit(do_not_specialize=["step", "bad_step"])
def _heun_step_kernel(
    x_hat_ptr,
    x_prime_ptr,
    f_ptr,
    k_ptr,
    noise_ptr,
    seeds_ptr,
    coef_ptr,
    out_ptr,
    out_net_ptr,
    guidance_ptr,
    bad_ptr,
    B,
    M,
    guidance_scale,
    step,
    bad_step,
    P_IS_ONE: tl.constexpr,
    HAS_XPRIME: tl.constexpr,
    HAS_F: tl.constexpr,
    CFG: tl.constexpr,
    HAS_K: tl.constexpr,
    NOISE: tl.constexpr,
    NET_ROWS: tl.constexpr,
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
    if P_IS_ONE:
        acc = tl.load(x_hat_ptr + row, mask=mask, other=0.0)
    else:
        acc = tl.load(coef_ptr + 0) * tl.load(x_hat_ptr + row, mask=mask, other=0.0)
    if HAS_XPRIME:
        acc += tl.load(coef_ptr + 1) * tl.load(x_prime_ptr + row, mask=mask, other=0.0)
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
    if NOISE == 1:  # NOISE_TENSOR
        acc += tl.load(coef_ptr + 3) * tl.load(noise_ptr + row, mask=mask, other=0.0)
    elif NOISE == 2:  # NOISE_PHILOX
        eps = philox_normal_block(tl.load(seeds_ptr + b), step, start, BLOCK)
        acc += tl.load(coef_ptr + 3) * eps
    tl.store(out_ptr + row, acc, mask=mask)
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
    x_hat: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    x_prime: torch.Tensor | None,
    f: torch.Tensor | None,
    k: torch.Tensor | None,
    guidance_scale: float,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    out_net: torch.Tensor | None,
    p_is_one: bool,
    guidance: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
) -> None:
    """Launch `_heun_step_kernel` on contiguous, validated operands (see `edmfast.ops`)."""
    batch = x_hat.shape[0]
    numel = x_hat.numel() // batch
    if batch > MAX_BATCH:
        raise ValueError(f"the triton backend handles at most {MAX_BATCH} samples per call, got {batch}")
    noise_mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX if seeds is not None else NOISE_NONE
    block, num_warps = block_config(numel, batch)
    # Absent operands are never read (their constexpr switch is off); x_hat stands in so every
    # pointer argument is a real tensor, which torch.compile's kernel wrapper handles best.
    wrap_triton(_heun_step_kernel)[(triton.cdiv(numel, block), batch)](
        x_hat,
        x_hat if x_prime is None else x_prime,
        x_hat if f is None else f,
        x_hat if k is None else k,
        x_hat if noise is None else noise,
        x_hat if seeds is None else seeds,
        coef,
        out,
        out if out_net is None else out_net,
        x_hat if guidance is None else guidance,
        x_hat if bad is None else bad,
        batch,
        numel,
        float(guidance_scale),
        int(step) & 0xFFFFFFFF,  # the counter word is the step's low 32 bits (edmfast.philox)
        int(bad_step),
        P_IS_ONE=p_is_one,
        HAS_XPRIME=x_prime is not None,
        HAS_F=f is not None,
        CFG=f is not None and f.shape[0] == 2 * batch,
        HAS_K=k is not None,
        NOISE=noise_mode,
        NET_ROWS=0 if out_net is None else out_net.shape[0] // batch,
        W_FROM_PTR=guidance is not None,
        HAS_BAD=bad is not None,
        BLOCK=block,
        num_warps=num_warps,
    )


@_triton_op("edmfast_triton::heun_step", mutates_args=("out", "out_net", "bad"))
def heun_step(
    x_hat: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    x_prime: torch.Tensor | None,
    f: torch.Tensor | None,
    k: torch.Tensor | None,
    guidance_scale: float,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    out_net: torch.Tensor | None,
    guidance: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
) -> None:
    launch(
        x_hat, coef, out, x_prime, f, k, guidance_scale, noise, seeds, step, out_net, p_is_one=False,
        guidance=guidance, bad=bad, bad_step=bad_step,
    )  # fmt: skip
