"""Fused ancestral pass (DDPM / iDDPM learned variance / DDIM eta) as one Triton kernel.

``x0 = ax x + af F`` (clipped), ``out = coef1 x0 + coef2 x + cf F + std z``, ``out_net = c out``, with F
guided over 2B CFG rows and std from the variance half of the cond rows for the learned
variances. One read of every operand, one write of every result; float32 math, 16-bit f /
out_net cast on load / store. See `edmfast.reference.ancestral_step` for the contract.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton_op
from . import _wrap_triton as wrap_triton
from .affine_step import MAX_BATCH, NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, block_config
from .philox import philox_normal_block

# Variance codes (constexpr VARIANCE), as in csrc/include/edmfast/ancestral.h.
VARIANCE_CODE = {"fixed": 0, "learned": 1, "learned_range": 2}


@triton.jit
def _exp_f32(x):
    """exp(x) in float32 to a few ulp over the whole range, as ``exp_poly`` in
    csrc/include/edmfast/ancestral.h. Not tl.exp: on NVIDIA GPUs it is ex2.approx(x * log2 e), and
    the float32 rounding of that product alone costs up to 2^-24 |x log2 e| ln 2 relative error
    (5.3e-6 near the top of the range; 3.3e-6 at V = 177.4 where the tests' rtol is 3e-6).
    Cody-Waite: x = n ln2 + r with n * 0.693359375 exact, |r| <= ln2 / 2, then a degree-7
    polynomial and 2^n from exponent bits: 1.7e-7 at most over the range (interpreted)."""
    # clamped (NaN as 0) so the integer exponent below stays in range; the last select restores both
    xc = tl.where(x != x, 0.0, x)
    xc = tl.where(xc > 88.7228317, 88.7228317, tl.where(xc < -87.3365479, -87.3365479, xc))
    n = tl.floor(xc * 1.44269504088896341 + 0.5)
    r = (xc - n * 0.693359375) + n * 2.12194440e-4
    p = 1.9875691500e-4 * r + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    p = p * (r * r) + r + 1.0
    # 2^n as two factors: n reaches 128 at the top of the range, one past a single factor's exponent
    ni = n.to(tl.int32)
    half = ni >> 1
    s1 = ((half + 127) << 23).to(tl.float32, bitcast=True)
    s2 = ((ni - half + 127) << 23).to(tl.float32, bitcast=True)
    y = p * s1 * s2
    return tl.where(x != x, x, tl.where(x > 88.7228317, float("inf"), tl.where(x < -87.3365479, 0.0, y)))


@triton.jit(do_not_specialize=["step", "bad_step"])
def _ancestral_step_kernel(
    x_ptr,
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
    VARIANCE: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_CF: tl.constexpr,
    CFG: tl.constexpr,
    HAS_K: tl.constexpr,
    NOISE: tl.constexpr,
    NET_ROWS: tl.constexpr,
    W_FROM_PTR: tl.constexpr,
    HAS_BAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid (element blocks, samples), as _heun_step_kernel: no division, a batch-invariant stream.
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    start = blk.to(tl.int64) * BLOCK
    e = start + tl.arange(0, BLOCK)
    mask = e < M
    row = b * M + e
    # f rows hold M (fixed) or 2M (prediction, then variance) elements; int64 offsets throughout.
    f_row = M if VARIANCE == 0 else 2 * M
    f_off = b * f_row + e

    x = tl.load(x_ptr + row, mask=mask, other=0.0)
    pred = tl.load(f_ptr + f_off, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        # f = [cond rows; uncond rows]: F = k[b] (uncond + w (cond - uncond)).
        uncond = tl.load(f_ptr + tl.cast(B, tl.int64) * f_row + f_off, mask=mask, other=0.0).to(tl.float32)
        if W_FROM_PTR:
            w = tl.load(guidance_ptr)  # read at run time: one captured graph serves any scale
        else:
            w = guidance_scale
        pred = uncond + w * (pred - uncond)
        if HAS_K:
            pred = tl.load(k_ptr + b) * pred
    x0 = tl.load(coef_ptr + 0) * x + tl.load(coef_ptr + 1) * pred
    if CLIP:
        # the bound of a 16-float row (column 9), 1 for an 8-float row (columns 8, 9 never read)
        if HAS_CF:
            bound = tl.load(coef_ptr + 9)
        else:
            bound = 1.0
        # compare-and-select, not minimum / maximum: NaN passes through to the bad-row check
        x0 = tl.where(x0 < -bound, -bound, tl.where(x0 > bound, bound, x0))
    acc = tl.load(coef_ptr + 2) * x0 + tl.load(coef_ptr + 3) * x
    if HAS_CF:
        acc += tl.load(coef_ptr + 8) * pred  # cf F: the model's own prediction in the mean
    if NOISE != 0:
        s = tl.load(coef_ptr + 6)
        if NOISE == 1:  # NOISE_TENSOR
            z = tl.load(noise_ptr + row, mask=mask, other=0.0)
        else:  # NOISE_PHILOX
            z = philox_normal_block(tl.load(seeds_ptr + b), step, start, 0, BLOCK)
        if VARIANCE == 0:
            std = s
        else:
            v = tl.load(f_ptr + f_off + M, mask=mask, other=0.0).to(tl.float32)
            if VARIANCE == 1:
                logvar = v
            else:
                frac = (v + 1.0) * 0.5
                logvar = frac * tl.load(coef_ptr + 4) + (1.0 - frac) * tl.load(coef_ptr + 5)
            std = s * _exp_f32(0.5 * logvar)
        # s = 0 (the last step) adds nothing, even where exp overflows (0 * inf would be NaN).
        acc += tl.where(s != 0.0, std * z, 0.0)
    tl.store(out_ptr + row, acc, mask=mask)
    if HAS_BAD:
        nonfinite = tl.max((mask & ~(tl.abs(acc) < float("inf"))).to(tl.int32), axis=0)
        tl.atomic_min(bad_ptr + b, bad_step, mask=nonfinite > 0)
    if NET_ROWS > 0:
        net = (tl.load(coef_ptr + 7) * acc).to(out_net_ptr.dtype.element_ty)
        rows_stride = tl.cast(B, tl.int64) * M
        for j in tl.static_range(NET_ROWS):
            tl.store(out_net_ptr + j * rows_stride + row, net, mask=mask)


@_triton_op("edmfast_triton::ancestral_step", mutates_args=("out", "out_net", "bad"))
def ancestral_step(
    x: torch.Tensor,
    f: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    variance: str,
    clip: bool,
    k: torch.Tensor | None,
    guidance_scale: float,
    guidance: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    out_net: torch.Tensor | None,
    bad: torch.Tensor | None,
    bad_step: int,
) -> None:
    """Launch `_ancestral_step_kernel` on contiguous, validated operands (see `edmfast.ops`)."""
    batch = x.shape[0]
    numel = x.numel() // batch
    if batch > MAX_BATCH:
        raise ValueError(f"the triton backend handles at most {MAX_BATCH} samples per call, got {batch}")
    noise_mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX if seeds is not None else NOISE_NONE
    block, num_warps = block_config(numel, batch)
    wrap_triton(_ancestral_step_kernel)[(triton.cdiv(numel, block), batch)](
        x,
        f,
        x if k is None else k,
        x if noise is None else noise,
        x if seeds is None else seeds,
        coef,
        out,
        out if out_net is None else out_net,
        x if guidance is None else guidance,
        x if bad is None else bad,
        batch,
        numel,
        float(guidance_scale),
        int(step) & 0xFFFFFFFF,  # the counter word is the step's low 32 bits (edmfast.philox)
        int(bad_step),
        VARIANCE=VARIANCE_CODE[variance],
        CLIP=bool(clip),
        HAS_CF=coef.numel() > 8,
        CFG=f.shape[0] == 2 * batch,
        HAS_K=k is not None,
        NOISE=noise_mode,
        NET_ROWS=0 if out_net is None else out_net.shape[0] // batch,
        W_FROM_PTR=guidance is not None,
        HAS_BAD=bad is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
