// Per-element math of the fused ancestral pass (DDPM / iDDPM with learned variance, DDIM with
// eta), shared by the CUDA kernel and the CPU loops. The float64 contract is
// edmfast/reference.py ancestral_step; per sample b and element j of the state:
//   F    = f[b, j]   (or k_b (F_u + w (F_c - F_u)) over 2B CFG rows: guided_prediction of step.h)
//   x0   = ax x + af F,  clamped to [-clip, clip] when clipping
//   mean = coef1 x0 + coef2 x + cf F
//   std  = s                                   (fixed variances; DDIM's sigma_t)
//        | s exp(V / 2)                        (learned: V is the raw log variance)
//        | s exp((frac lb + (1 - frac) lbt) / 2), frac = (V + 1) / 2   (learned_range)
//   out  = mean + std z,   net = c out
// V = f[b, n + j] is the variance half of the cond rows. s = 0 (the last step) means no noise at
// all: the launchers drop the noise term then, so an overflowing exp(V / 2) never makes 0 * inf.
// The coefficient row [ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c, cf, clip, 0...] lives
// in device memory (edmfast/layout.py ANC_*), so one captured graph replays every step of a
// schedule. A row of 8 floats (the original layout) has no cf term and the clip bound 1; its
// columns 8 and 9 are never read. cf carries the model's own prediction into DDIM's direction
// term when diffusers does not recompute it from the clipped x0 (use_clipped_model_output=False).
#pragma once

#include <cmath>

#include "edmfast/common.h"

namespace edmfast {

constexpr int kAncAx = 0, kAncAf = 1, kAncCoef1 = 2, kAncCoef2 = 3, kAncLogBeta = 4, kAncLogBetaTilde = 5,
              kAncS = 6, kAncC = 7, kAncCoefs = 8, kAncCf = 8, kAncClip = 9;

// Codes of the variance parameterization (the Python glue passes them through the bindings).
enum class Variance : int { kFixed = 0, kLearned = 1, kLearnedRange = 2 };

struct AncCoef {
  float ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c;
  float cf;     // on F in the mean (0 without the column)
  float clip;   // the clip bound (1 without the column, unread without clipping)
  bool has_cf;  // the row has the cf column: an 8-float row adds no cf F term at all
};

// A row of `cols` floats (8, or >= 16 with cf and the clip bound); columns past an 8-float row
// are never read, and the clip bound only when clipping.
EDMFAST_HD AncCoef load_anc_coef(const float* coef, int64_t cols, bool clip) {
  const bool wide = cols > kAncCf;
  return AncCoef{coef[kAncAx],
                 coef[kAncAf],
                 coef[kAncCoef1],
                 coef[kAncCoef2],
                 coef[kAncLogBeta],
                 coef[kAncLogBetaTilde],
                 coef[kAncS],
                 coef[kAncC],
                 wide ? coef[kAncCf] : 0.0f,
                 (wide && clip) ? coef[kAncClip] : 1.0f,
                 wide};
}

// clamp(v, -b, b) as compare-and-select, so NaN passes through (fminf / fmaxf would hide it and
// the bad-row check could not see a model that produced NaN).
EDMFAST_HD float clamp_bound(float v, float b) { return v < -b ? -b : (v > b ? b : v); }

// The posterior mean from the state x and the (guided) prediction F: coef1 x0 + coef2 x + cf F.
// Without the cf column the term is selected away (not multiplied by 0: an inf F that clipping
// turned into a finite x0 must give the finite mean of the original 8-float row).
template <bool kClip>
EDMFAST_HD float ancestral_mean(const AncCoef& a, float x, float f) {
  float x0 = a.ax * x + a.af * f;
  if (kClip) x0 = clamp_bound(x0, a.clip);
  const float cf_term = a.cf * f;
  return a.coef1 * x0 + a.coef2 * x + (a.has_cf ? cf_term : 0.0f);
}

// exp(x) in float32, branch-free (compare-and-select only) so the CPU loops vectorize it: a libm
// expf call per element cost ~8 ns, five times the rest of a learned-variance pass. Cephes'
// expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2 is exact), a degree-7
// polynomial for exp(r), then 2^n through the exponent bits. Within 2 ulp of exp over the normal
// range; inf above 88.72, 0 below -87.33 (exp's subnormal range flushes), NaN stays NaN.
// c ? a : b as bit masks: GCC if-converts this into vector blends where it turns a chain of
// float ternaries into branches (and then does not vectorize the AVX2 / AVX-512 loops).
EDMFAST_HD float select_bits(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_as_float((float_as_bits(a) & m) | (float_as_bits(b) & ~m));
}

EDMFAST_HD float exp_poly(float x) {
  const float hi = 88.7228317f, lo = -87.3365479f;
  // Clamped, NaN as 0 so the integer conversion below is defined; the final select restores both.
  const float xc = select_bits(x < lo, lo, select_bits(x > hi, hi, select_bits(x != x, 0.0f, x)));
  const float t = xc * 1.44269504088896341f + 0.5f;
  const int32_t ti = static_cast<int32_t>(t);  // truncation; floor below for negative t
  const float tf = static_cast<float>(ti);
  const float n = tf > t ? tf - 1.0f : tf;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n as two factors 2^(n - n/2) 2^(n/2): n reaches 128 at the top of the range, one past the
  // largest exponent a single factor can hold.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni / 2;
  const float s1 = bits_as_float(static_cast<uint32_t>(half + 127) << 23);
  const float s2 = bits_as_float(static_cast<uint32_t>(ni - half + 127) << 23);
  const float y = p * s1 * s2;
  return select_bits(x != x, x, select_bits(x > hi, INFINITY, select_bits(x < lo, 0.0f, y)));
}

// The log variance from the model's variance output V (learned variants only).
EDMFAST_HD float ancestral_logvar(const AncCoef& a, float v, Variance variance) {
  if (variance == Variance::kLearned) return v;
  const float frac = (v + 1.0f) * 0.5f;
  return frac * a.log_beta + (1.0f - frac) * a.log_beta_tilde;
}

// std of the noise term: s for the fixed variances, s exp(logvar / 2) for the learned ones.
EDMFAST_HD float ancestral_std(const AncCoef& a, float v, Variance variance) {
  return variance == Variance::kFixed ? a.s : a.s * exp_poly(0.5f * ancestral_logvar(a, v, variance));
}

}  // namespace edmfast
