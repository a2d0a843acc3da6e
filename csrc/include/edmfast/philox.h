// The fused-noise stream: Philox4x32-10 keyed by (seed, step, element, stage), then Box-Muller.
// C++ twin of edmfast/philox.py, which is the normative definition:
//   key     = (seed & 0xFFFFFFFF, seed >> 32)
//   counter = (g & 0xFFFFFFFF, g >> 32, step, stage), g = element / 4
//   (stage: the draw's index inside one step, 0 for every one-draw sampler, so stage 0 is the
//   stream of the original (seed, step, element) definition)
//   u_j     = ((x_j >> 8) + 0.5) * 2^-24          (24-bit uniforms, strictly inside (0, 1))
//   (n0, n1) = sqrt(-2 ln u0) (cos 2 pi u1, sin 2 pi u1), (n2, n3) likewise from (u2, u3)
//   element e takes n_(e % 4): one Philox call feeds four consecutive elements.
// The words are bit-exact; the normals are float32 and agree with the float64 definition to
// within 1e-6 absolute. Never compile with fast-math: the range reductions below rely on exact
// float32 products and sums.
#pragma once

#include <cmath>

#include "edmfast/common.h"

namespace edmfast {

struct uint4x32 {
  uint32_t x0, x1, x2, x3;
};

struct float4x32 {
  float n0, n1, n2, n3;
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

EDMFAST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 (Salmon et al., SC'11): ten rounds of two 32x32->64 multiplies, with the Weyl
// key schedule applied between rounds (the bump after the last round is unused). Fully unrolled
// and branch-free so that the CPU loop over Philox calls vectorizes.
EDMFAST_HD uint4x32 philox4x32(uint4x32 ctr, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, ctr.x0);
    const uint32_t lo0 = kPhiloxM0 * ctr.x0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, ctr.x2);
    const uint32_t lo1 = kPhiloxM1 * ctr.x2;
    ctr = uint4x32{hi1 ^ ctr.x1 ^ k0, lo1, hi0 ^ ctr.x3 ^ k1, lo0};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ctr;
}

// Box-Muller in float32, branch-free so the CPU loops vectorize it (the same code runs on the GPU).
// The uniforms u = (m + 0.5) 2^-24, m = x >> 8, are never formed in float32 where that rounds:
// for m >= 2^23, m + 0.5 needs 25 bits, and near u = 1 that rounding is a large relative error
// in 1 - u, hence in sqrt(-2 ln u) (4e-6 absolute, measured). Both helpers work from the integer
// m, where the quantities they need are exact. The polynomials are fdlibm's logf kernel and
// Cephes' sinf/cosf (|rel err| ~1 ulp on the reduced ranges); tests/test_philox.py checks the
// normals against the float64 definition to 1e-6 absolute.

// ln u = k ln 2 + ln(1 + f), u = 2^k (1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1] and exact. With
// u = v 2^-25, v = 2m + 1 an odd integer below 2^25: k = E - 25 where 2^E is the power of two
// nearest v in ratio (v 2^-E in [sqrt(1/2), sqrt(2))), and f = (v - 2^E) 2^-E, where the integer
// v - 2^E is below 2^24 in magnitude: exact in float32, and so is the power-of-two scaling. E is
// read off float32(v), which rounds when v >= 2^24 (m >= 2^23); that only moves the sqrt(2)
// cut by a rounding of v, never f's exactness, and the cut matches the one on the exact m
// (checked over all 2^24 values of m: the same k and f as splitting u's own exponent).
EDMFAST_HD float log_uniform(uint32_t x) {
  // Conversions go through int32 (all values fit): unsigned -> float does not vectorize on x86.
  const int32_t v = static_cast<int32_t>(((x >> 8) << 1) | 1u);
  const uint32_t bits = float_as_bits(static_cast<float>(v));
  const bool up = bits_as_float((bits & 0x007FFFFFu) | 0x3F800000u) > 1.41421356f;  // mantissa > sqrt(2)
  const uint32_t ebits = (bits & 0x7F800000u) + (up ? (1u << 23) : 0u);           // 2^E as a float
  const int32_t pow2 = 1 << ((ebits >> 23) - 127u);                                // 2^E, E <= 25
  const float f = static_cast<float>(v - pow2) * bits_as_float((254u << 23) - ebits);  // (v - 2^E) 2^-E
  const float k = static_cast<float>(static_cast<int32_t>(ebits >> 23) - 152);     // E - 25

  // ln(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)), s = f / (2 + f), |s| <= 0.1716 (fdlibm e_logf.c).
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float r = z * (0.66666662693f + w * 0.28498786688f) + w * (0.40000972152f + w * 0.24279078841f);
  const float hfsq = 0.5f * f * f;
  return s * (hfsq + r) + k * 9.0580006145e-06f - hfsq + f + k * 6.9313812256e-01f;
}

// (cos 2 pi u, sin 2 pi u) with the quadrant taken exactly in integers: 4u = (m + 0.5) 2^-22, the
// nearest quadrant is q = (m + 2^21) >> 22 and the remainder t = 4u - q = (m - q 2^22 + 0.5) 2^-22
// lies in [-1/2, 1/2] with at most 23 significant bits, so the angle a = (pi/2) t in [-pi/4, pi/4]
// carries one rounding (float32 2 pi u would carry up to 2.4e-7 rad: 1.4e-6 on a normal of 5.9,
// the largest sqrt(-2 ln u) can be).
EDMFAST_HD void sincos_2pi_uniform(uint32_t x, float* c, float* s) {
  const uint32_t m = x >> 8;
  const uint32_t q = (m + (1u << 21)) >> 22;  // 0..4; 4 is a full turn
  const int32_t rem = static_cast<int32_t>(m) - static_cast<int32_t>(q << 22);
  const float a = (static_cast<float>(rem) + 0.5f) * 0x1.0p-22f * 1.57079632679489662f;
  const float z = a * a;
  const float sa = a + a * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  const float ca = 1.0f - 0.5f * z + z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                                              4.166664568298827e-2f);
  // Rotate (cos a, sin a) by q quarter turns: odd q swaps, q = 1, 2 negate cos, q = 2, 3 negate sin.
  const float c_rot = (q & 1u) ? sa : ca;
  const float s_rot = (q & 1u) ? ca : sa;
  *c = ((q + 1u) & 2u) ? -c_rot : c_rot;
  *s = (q & 2u) ? -s_rot : s_rot;
}

// Four standard normals from one Philox call: group g of sample seed at (step, stage).
EDMFAST_HD float4x32 philox_normal4(uint64_t seed, uint32_t step, uint64_t group, uint32_t stage) {
  const uint4x32 ctr{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), step, stage};
  const uint4x32 x = philox4x32(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float r0 = sqrtf(-2.0f * log_uniform(x.x0));
  const float r1 = sqrtf(-2.0f * log_uniform(x.x2));
  float c0, s0, c1, s1;
  sincos_2pi_uniform(x.x1, &c0, &s0);
  sincos_2pi_uniform(x.x3, &c1, &s1);
  return float4x32{r0 * c0, r0 * s0, r1 * c1, r1 * s1};
}

}  // namespace edmfast
