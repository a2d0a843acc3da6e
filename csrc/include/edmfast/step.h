// Per-element math of the fused sampler passes, shared by the CUDA kernels and the CPU loops.
//
// EDM Algorithm 2 in VE scaling, with D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) and
// h = sigma_next - sigma_hat, d = (x - D) / sigma, is affine in its operands, so every pass of the
// loop is one instance of
//     x   = p x_hat + q x_prime + r F + std eps          (state, float32)
//     net = c x                                          (next network input, c = c_in)
// with the coefficients computed on the host (in float64) per step:
//   churn:           x_hat   = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps     p=1, std=...
//   Euler point:     x_euler = x_hat + h d   -> p = 1 + h (1 - c_skip)/sigma_hat,
//                                               r = -h c_out/sigma_hat, q = 0
//   Heun correction: x_next  = x_hat + h (d + d')/2 with d = (x_euler - x_hat)/h (never stored)
//                            -> p, q (on x_euler) and r (on F') from the same expansion,
//   plus the next step's churn (std) and network input (c) fused into the same pass.
// The coefficients live in device memory ([p, q, r, std, c], see edmfast/reference.py) so a
// captured CUDA graph replays with a new schedule without re-capture.
#pragma once

#include <cmath>

#include "edmfast/common.h"

namespace edmfast {

constexpr int kCoefP = 0, kCoefQ = 1, kCoefR = 2, kCoefStd = 3, kCoefC = 4;

struct StepCoef {
  float p, q, r, std, c;
};

// Read [p, q, r, std, c] and zero the coefficient of every absent operand, so the kernels can
// feed 0 for it: 0 * 0 adds nothing even when the unused coefficient is inf or NaN, which is
// exactly "missing operands contribute zero". A churn pass is p = 1 with only noise.
EDMFAST_HD StepCoef load_coef(const float* coef, bool has_x_prime, bool has_f, bool has_eps, bool churn) {
  StepCoef s;
  s.p = churn ? 1.0f : coef[kCoefP];
  s.q = (has_x_prime && !churn) ? coef[kCoefQ] : 0.0f;
  s.r = (has_f && !churn) ? coef[kCoefR] : 0.0f;
  s.std = has_eps ? coef[kCoefStd] : 0.0f;
  s.c = coef[kCoefC];
  return s;
}

// Classifier-free guidance on the raw prediction (Ho & Salimans), scaled by the CFG-rescale
// factor k of Lin et al. Eq. 16 (k = 1 without rescale): F = k (uncond + w (cond - uncond)).
EDMFAST_HD float guided_prediction(float cond, float uncond, float w, float k) {
  return k * (uncond + w * (cond - uncond));
}

// The affine combination of a pass, before the noise: p x_hat + q x_prime + r F.
EDMFAST_HD float affine_combine(const StepCoef& s, float x_hat, float x_prime, float f) {
  return s.p * x_hat + s.q * x_prime + s.r * f;
}

// Churn (EDM Alg. 2 line 6): x_hat = x + std eps, std = sqrt(sigma_hat^2 - sigma^2) S_noise.
EDMFAST_HD float churn_noise(float x, float std, float eps) { return x + std * eps; }

// The next network input, c_in(sigma) x (preconditioning, EDM Table 1).
EDMFAST_HD float precondition_input(float c_in, float x) { return c_in * x; }

// One element of a fused pass.
EDMFAST_HD float fused_update(const StepCoef& s, float x_hat, float x_prime, float f, float eps) {
  return churn_noise(affine_combine(s, x_hat, x_prime, f), s.std, eps);
}

// Non-finite test on a value the pass already holds: the exponent field is all ones exactly for
// inf and NaN, and adding one exponent ulp to the masked field carries into bit 31 only then.
// OR-ed over a row this is a branch-free, vectorizable reduction that cannot overflow (a float32
// sum of the row could: 2e38 + 2e38 = inf from finite values, blaming an innocent state).
EDMFAST_HD uint32_t nonfinite_bit(float x) { return ((float_as_bits(x) & 0x7F800000u) + 0x00800000u) & 0x80000000u; }

// CFG-rescale factor from per-sample sums of pivot-shifted cond (c) and cfg (g) values:
// k = phi std(cond)/std(cfg) + (1 - phi), unbiased stds; ratio 1 when std(cfg) = 0 or n < 2.
// Acc is double on both sides (the reduction's final stage), so only the sums carry error.
template <typename Acc>
EDMFAST_HD float rescale_factor(Acc sum_c, Acc sum_c2, Acc sum_g, Acc sum_g2, int64_t n, float phi) {
  Acc ratio = 1;
  if (n >= 2) {
    const Acc inv_n = Acc(1) / Acc(n);
    const Acc var_c = (sum_c2 - sum_c * sum_c * inv_n) / Acc(n - 1);
    const Acc var_g = (sum_g2 - sum_g * sum_g * inv_n) / Acc(n - 1);
    if (var_g > 0) ratio = sqrt((var_c > 0 ? var_c : Acc(0)) / var_g);
  }
  return static_cast<float>(Acc(phi) * ratio + (Acc(1) - Acc(phi)));
}

}  // namespace edmfast
