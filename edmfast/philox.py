"""The fused-noise stream: counter-based Philox4x32-10, keyed by (seed, step, element, stage).

Every backend (torch, cpu, cuda, triton) must produce exactly this stream; this module is its
definition and its float64 reference. The C++/CUDA twin lives in ``csrc/include/edmfast/philox.h``.

Definition, for sample seed ``s`` (int64), step ``i``, flat element index ``e`` inside the sample
(0 <= e < M, so a sample's noise does not depend on the batch it is in) and stage ``j`` (the
draw's index inside a step: 0 for every one-draw sampler, 1 for the second draw of DPM++ SDE):

* key     = (k0, k1) = (s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF)
* counter = (c0, c1, c2, c3) = (g & 0xFFFFFFFF, g >> 32, i & 0xFFFFFFFF, j & 0xFFFFFFFF), g = e // 4
* ten Philox4x32 rounds (Salmon et al. 2011), multipliers 0xD2511F53 / 0xCD9E8D57, Weyl
  increments 0x9E3779B9 / 0xBB67AE85 added to the key between rounds, giving words x0..x3.
* uniforms u_j = ((x_j >> 8) + 0.5) * 2**-24, strictly inside (0, 1); exact in float64 but not in
  float32 when u >= 1/2 (25 significant bits): float32 kernels form ln u and the angle from the
  exact 1 - u there (csrc/include/edmfast/philox.h, edmfast/triton/philox.py).
* Box-Muller on the pairs (u0, u1) and (u2, u3):
  n0 = r0 cos(2 pi u1), n1 = r0 sin(2 pi u1), r0 = sqrt(-2 ln u0); n2, n3 likewise from (u2, u3).
* element e takes n_(e % 4).

Kernels evaluate the Box-Muller step in float32 (agreement with this float64 version: ~1e-6).
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo(m: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of m * b for a 32-bit constant m and int64 tensor b < 2**32."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = m * b_lo  # < 2**48
    p_hi = m * b_hi  # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49, no int64 overflow
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcastable)."""
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_normal(
    seeds: torch.Tensor, step: int, numel: int, dtype: torch.dtype = torch.float64, stage: int = 0
) -> torch.Tensor:
    """Standard normals [B, numel] of the fused stream for ``seeds`` (int64 [B]) at ``step``, ``stage``."""
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    k0 = seeds & _MASK32
    k1 = (seeds >> 32) & _MASK32
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=seeds.device).reshape(1, -1)
    c2 = torch.full_like(g, int(step) & _MASK32)
    c3 = torch.full_like(g, int(stage) & _MASK32)
    x = philox4x32(g & _MASK32, g >> 32, c2, c3, k0, k1)
    # float64 where the device has it (the reference); the words are exact either way
    u = [((w >> 8).to(torch.float64) + 0.5) * 2.0**-24 for w in x]
    r0 = torch.sqrt(-2.0 * torch.log(u[0]))
    r1 = torch.sqrt(-2.0 * torch.log(u[2]))
    two_pi = 2.0 * math.pi
    n = torch.stack(
        [
            r0 * torch.cos(two_pi * u[1]),
            r0 * torch.sin(two_pi * u[1]),
            r1 * torch.cos(two_pi * u[3]),
            r1 * torch.sin(two_pi * u[3]),
        ],
        dim=-1,
    )  # [B, groups, 4]
    return n.reshape(seeds.shape[0], groups * 4)[:, :numel].to(dtype)
