// Per-element math of the fused sampler pass, shared by the CUDA kernels and the CPU loops.
//
// Every sampler of the engine is a plan of one affine pass kind: per element of
// sample b, with the float32 coefficient row of the pass (edmfast/layout.py names the columns)
//     out   = a x + b F + c0 h0 + c1 h1 + c2 h2 + c3 h3 + std eps     (next state, float32)
//     net   = c_net out                                                (next network input)
//     h_out = p x + q F                                                (optional history slot)
// F is the (guided) network output, h_k are history buffers (x' of a Heun correction, earlier
// denoised estimates of a multistep method), eps the noise. The coefficients are computed on the
// host in float64 per step and live in device memory, so a captured CUDA graph replays with a new
// schedule without re-capture. EDM's passes, for example (h = sigma_next - sigma_hat,
// d = (x - D) / sigma, D = c_skip x + c_out F):
//   churn:           x_hat   = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps       a = 1, std
//   Euler point:     x_euler = x_hat + h d -> a = 1 + h (1 - c_skip)/sigma_hat, b = -h c_out/sigma_hat
//   Heun correction: x_next  = x_hat + h (d + d')/2, d from h0 = x_euler (never stored): a, c0, b
//   plus the next step's churn (std) and network input (c_net = c_in) in the same pass. The first
// five columns [a, c0, b, std, c_net] are those of the original Heun pass [p, q, r, std, c].
#pragma once

#include <cmath>

#include "edmfast/common.h"

namespace edmfast {

// Columns of a coefficient row (edmfast/layout.py COEF_*).
constexpr int kCoefA = 0, kCoefC0 = 1, kCoefB = 2, kCoefStd = 3, kCoefNet = 4, kCoefC1 = 5, kCoefC2 = 6,
              kCoefC3 = 7, kCoefHp = 8, kCoefHq = 9, kCoefSize = 16;
constexpr int kHistory = 4;  // history buffers one pass may read

EDMFAST_HD int history_column(int j) { return j == 0 ? kCoefC0 : kCoefC1 + (j - 1); }

// The operands a pass has, as bits (StepArgs::operands()): which columns of the row it may read.
constexpr unsigned kOpF = 1u << 0;        // the network output F
constexpr unsigned kOpHist0 = 1u << 1;    // h_j: kOpHist0 << j
constexpr unsigned kOpEps = 1u << 5;      // noise (a tensor or the Philox stream)
constexpr unsigned kOpNet = 1u << 6;      // out_net
constexpr unsigned kOpHistOut = 1u << 7;  // hist_out
constexpr unsigned kOpChurn = 1u << 8;    // a = 1 and noise only (edmfast/reference.py churn)

struct StepCoef {
  float a, b, c[kHistory], std, net, hp, hq;
};

// Read the columns of the present operands and zero the others, so the kernels can feed 0 for an
// absent operand: 0 * 0 adds nothing even when the unused coefficient is inf or NaN, which is
// exactly "absent operands contribute zero". A column is never read unless its operand is there,
// so a Heun row of 5 floats (no h1..h3, no hist_out) is a valid row. A churn is a = 1 with only
// noise: columns 0..2 are not read.
EDMFAST_HD StepCoef load_coef(const float* coef, unsigned ops) {
  const bool churn = (ops & kOpChurn) != 0;
  StepCoef s;
  s.a = churn ? 1.0f : coef[kCoefA];
  s.b = ((ops & kOpF) && !churn) ? coef[kCoefB] : 0.0f;
  for (int j = 0; j < kHistory; ++j) s.c[j] = ((ops & (kOpHist0 << j)) && !churn) ? coef[history_column(j)] : 0.0f;
  s.std = (ops & kOpEps) ? coef[kCoefStd] : 0.0f;
  s.net = (ops & kOpNet) ? coef[kCoefNet] : 0.0f;
  s.hp = (ops & kOpHistOut) ? coef[kCoefHp] : 0.0f;
  s.hq = ((ops & kOpHistOut) && (ops & kOpF)) ? coef[kCoefHq] : 0.0f;
  return s;
}

// Classifier-free guidance on the raw prediction (Ho & Salimans), scaled by the CFG-rescale
// factor k of Lin et al. Eq. 16 (k = 1 without rescale): F = k (uncond + w (cond - uncond)).
EDMFAST_HD float guided_prediction(float cond, float uncond, float w, float k) {
  return k * (uncond + w * (cond - uncond));
}

// The affine combination, in the contract's order: a x + b F, then + c_k h_k for each present
// history buffer in k order, then + std eps. Evaluated in this order by every backend; absent
// terms add an exact zero, so skipping them (the CPU loops do) changes no result.
EDMFAST_HD float affine_start(const StepCoef& s, float x, float f) { return s.a * x + s.b * f; }
EDMFAST_HD float affine_history(float acc, float c, float h) { return acc + c * h; }
EDMFAST_HD float affine_noise(float acc, float std, float eps) { return acc + std * eps; }

// One element of the pass with every history buffer (absent ones as h = 0 with c = 0).
EDMFAST_HD float affine_update(const StepCoef& s, float x, float f, const float h[kHistory], float eps) {
  float acc = affine_start(s, x, f);
  for (int j = 0; j < kHistory; ++j) acc = affine_history(acc, s.c[j], h[j]);
  return affine_noise(acc, s.std, eps);
}

// The history slot a multistep method keeps, e.g. the denoised D = c_skip x + c_out F.
EDMFAST_HD float history_update(const StepCoef& s, float x, float f) { return s.hp * x + s.hq * f; }

// The next network input, c_in(sigma) x (preconditioning, EDM Table 1).
EDMFAST_HD float precondition_input(float c_in, float x) { return c_in * x; }

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
