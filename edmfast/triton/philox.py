"""Triton twin of the fused-noise stream defined in `edmfast.philox` (Philox4x32-10 + Box-Muller).

The uint32 words are bit-exact. The normals are float32; the float64 definition is matched to
< 1e-6 absolute (measured max 6e-7 over 4M pairs with the same float32 formulas in numpy), which
needs two details a direct transcription misses:

* ``u = ((x >> 8) + 0.5) * 2**-24`` is NOT exact in float32: for x >> 8 >= 2**23 the odd numerator
  ``2 m + 1`` has 25 significant bits. Rounding it moves u by 2**-25, and where u0 is close to 1
  ``r = sqrt(-2 ln u0)`` then changes by up to 2.4e-4. We never form u in the upper half: there
  ``1 - u = (2 (2**24 - 1 - m) + 1) 2**-25`` is exact, ``ln u = log1p(-(1 - u))`` is evaluated with
  Goldberg's ``log(w) * x / (w - 1)`` trick (Triton has no log1p), and the angle uses ``u - 1``.
* ``cos(2 pi u)`` with u near 1 has an argument near 2 pi whose float32 rounding error is multiplied
  by r (up to ~5.7). The angle is reduced exactly to ``t`` in [-1/4, 1/4] (period 1, and a
  half-period shift flips the sign), so ``2 pi t`` stays within [-pi/2, pi/2].
"""

from __future__ import annotations

import triton
import triton.language as tl

# Philox4x32 constants (Salmon et al. 2011), identical to edmfast.philox.
PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS: tl.constexpr = tl.constexpr(10)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox4x32 rounds on uint32 tensors; returns the four output words (uint32)."""
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        hi1 = tl.umulhi(c2, PHILOX_M1)
        # uint32 products and sums wrap mod 2**32 by design; sanitize_overflow=False keeps
        # Triton's debug-mode overflow checker from flagging them.
        lo0 = tl.mul(c0, PHILOX_M0, sanitize_overflow=False)
        lo1 = tl.mul(c2, PHILOX_M1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        # Bumping the key after the last round too is harmless (it is not used again) and
        # keeps the loop body uniform.
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _log_and_angle(x):
    """For a word x: (ln u, t) with u = ((x >> 8) + 0.5) 2**-24 and t = u mod 1 in [-1/2, 1/2).

    Both come from values that are exact in float32 (see the module docstring).
    """
    m = x >> 8  # 24 random bits
    upper = m >= 0x800000
    # u itself, exact when m < 2**23 (numerator < 2**24).
    u_low = (2 * m + 1).to(tl.float32) * 2.98023223876953125e-08  # 2**-25
    # 1 - u, exact when m >= 2**23 (numerator < 2**24). Unused (and harmless) otherwise.
    v = (2 * (0xFFFFFF - m) + 1).to(tl.float32) * 2.98023223876953125e-08
    # ln(1 - v) = log1p(-v) to a few ulp: w = fl(1 - v); log(w) * (-v) / (w - 1) cancels the
    # rounding of w (Goldberg 1991, Theorem 4); w == 1 only for v = 2**-25, where ln = -v.
    w = 1.0 - v
    w_is_one = w == 1.0
    log1p_neg_v = tl.where(w_is_one, -v, tl.log(w) * tl.div_rn(-v, tl.where(w_is_one, -1.0, w - 1.0)))
    ln_u = tl.where(upper, log1p_neg_v, tl.log(u_low))
    t = tl.where(upper, -v, u_low)
    return ln_u, t


@triton.jit
def _box_muller(x_r, x_a):
    """(r cos(2 pi u_a), r sin(2 pi u_a)) with r = sqrt(-2 ln u_r), in float32."""
    ln_u, _ = _log_and_angle(x_r)
    _, t = _log_and_angle(x_a)
    r = tl.sqrt_rn(-2.0 * ln_u)
    # cos/sin(2 pi t) = -cos/sin(2 pi (t -+ 1/2)); the shift is exact (Sterbenz) for |t| > 1/4.
    far = tl.abs(t) > 0.25
    t = tl.where(far, t - tl.where(t > 0.0, 0.5, -0.5), t)
    r = tl.where(far, -r, r)
    theta = t * 6.283185307179586
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def philox_words(seed, step, g, stage):
    """Philox4x32-10 words for int64 ``seed`` (scalar), int ``step``, int64 group indices ``g`` and
    int ``stage``.

    key = (seed lo32, seed hi32), counter = (g lo32, g hi32, step lo32, stage lo32), as in
    edmfast.philox. Integer -> uint32 casts truncate, which is exactly the ``& 0xFFFFFFFF`` of the
    definition (also for negative seeds: the arithmetic shift keeps the two's-complement high word).
    """
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = g.to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c2 = zero + tl.cast(step, tl.uint32)
    c3 = zero + tl.cast(stage, tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def philox_normal_block(seed, step, start, stage, BLOCK: tl.constexpr):
    """The fused stream's normals for elements ``start .. start + BLOCK`` of one sample at ``stage``
    (the draw's index inside the step; 0 for one draw per step), float32.

    ``start`` (int64) must be a multiple of 4. One Philox call serves four consecutive elements:
    the counters are the BLOCK // 4 groups ``g = e // 4``, and the four normals of each group are
    interleaved back into element order, so the block costs BLOCK / 4 Philox evaluations instead
    of BLOCK (a per-element evaluation with a select would do 4x the integer work, which at HBM
    bandwidth makes the noise pass compute-bound).
    """
    g = start // 4 + tl.arange(0, BLOCK // 4)
    x0, x1, x2, x3 = philox_words(seed, step, g, stage)
    n0, n1 = _box_muller(x0, x1)
    n2, n3 = _box_muller(x2, x3)
    # interleave(interleave(n0, n2), interleave(n1, n3)) = n0[0], n1[0], n2[0], n3[0], n0[1], ...
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))
