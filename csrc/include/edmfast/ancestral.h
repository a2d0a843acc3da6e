// Per-element math of the fused ancestral pass (DDPM / iDDPM with learned variance, DDIM with
// eta), shared by the CUDA kernel and the CPU loops. The float64 contract is
// edmfast/reference.py ancestral_step; per sample b and element j of the state:
//   F    = f[b, j]   (or k_b (F_u + w (F_c - F_u)) over 2B CFG rows: guided_prediction of step.h)
//   x0   = ax x + af F,  clamped to [-1, 1] when clipping
//   mean = coef1 x0 + coef2 x
//   std  = s                                   (fixed variances; DDIM's sigma_t)
//        | s exp(V / 2)                        (learned: V is the raw log variance)
//        | s exp((frac lb + (1 - frac) lbt) / 2), frac = (V + 1) / 2   (learned_range)
//   out  = mean + std z,   net = c out
// V = f[b, n + j] is the variance half of the cond rows. s = 0 (the last step) means no noise at
// all: the launchers drop the noise term then, so an overflowing exp(V / 2) never makes 0 * inf.
// The coefficient row [ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c] lives in device
// memory (edmfast.reference ANC_*), so one captured graph replays every step of a schedule.
#pragma once

#include <cmath>

#include "edmfast/common.h"

namespace edmfast {

constexpr int kAncAx = 0, kAncAf = 1, kAncCoef1 = 2, kAncCoef2 = 3, kAncLogBeta = 4, kAncLogBetaTilde = 5,
              kAncS = 6, kAncC = 7, kAncCoefs = 8;

// Codes of the variance parameterization (the Python glue passes them through the bindings).
enum class Variance : int { kFixed = 0, kLearned = 1, kLearnedRange = 2 };

struct AncCoef {
  float ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c;
};

EDMFAST_HD AncCoef load_anc_coef(const float* coef) {
  return AncCoef{coef[kAncAx],      coef[kAncAf],           coef[kAncCoef1], coef[kAncCoef2],
                 coef[kAncLogBeta], coef[kAncLogBetaTilde], coef[kAncS],     coef[kAncC]};
}

// clamp(v, -1, 1) as compare-and-select, so NaN passes through (fminf / fmaxf would hide it and
// the bad-row check could not see a model that produced NaN).
EDMFAST_HD float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// The posterior mean from the state x and the (guided) prediction F.
template <bool kClip>
EDMFAST_HD float ancestral_mean(const AncCoef& a, float x, float f) {
  float x0 = a.ax * x + a.af * f;
  if (kClip) x0 = clamp_unit(x0);
  return a.coef1 * x0 + a.coef2 * x;
}

// The log variance from the model's variance output V (learned variants only).
EDMFAST_HD float ancestral_logvar(const AncCoef& a, float v, Variance variance) {
  if (variance == Variance::kLearned) return v;
  const float frac = (v + 1.0f) * 0.5f;
  return frac * a.log_beta + (1.0f - frac) * a.log_beta_tilde;
}

// std of the noise term: s for the fixed variances, s exp(logvar / 2) for the learned ones.
EDMFAST_HD float ancestral_std(const AncCoef& a, float v, Variance variance) {
  return variance == Variance::kFixed ? a.s : a.s * expf(0.5f * ancestral_logvar(a, v, variance));
}

}  // namespace edmfast
