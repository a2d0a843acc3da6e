// CPU loops of the fused ancestral pass (ancestral.h; edmfast/reference.py ancestral_step).
//
// As affine_step.cpp: (sample, chunk) work items, each staging its operands in L1-sized float32
// buffers so the final loop is branch-free and vectorizes. Two staging passes: the (guided)
// prediction F, and the noise term std z (Philox normals or the noise tensor, times s or
// s exp(logvar / 2)); the final loop is mean + term, the bad-row bit and the stores. The
// learned-variance exp runs in the staging pass only when the step has noise (s != 0).
// The exp's polynomial reaches the 16-bit half of a 2C row through to_float, in registers.
#include <algorithm>

#include "cpu_common.h"
#include "edmfast/ancestral.h"
#include "edmfast/ops.h"
#include "edmfast/step.h"
#include "parallel.h"

namespace edmfast {
namespace {

constexpr int64_t kChunk = kPhiloxFillMax;  // a multiple of 4: chunks start on a Philox group
const float kZeros[kChunk] = {};

// term[i] = s exp(logvar(v[i]) / 2) z[i] for the learned variances: the one transcendental of
// the pass (exp_poly, branch-free so it vectorizes). On x86-64 it is compiled once more for
// AVX2 and AVX-512F and picked from the CPU's features at run time, as affine_step.cpp does for
// Philox: the baseline build has 4 SSE2 lanes, where the polynomial barely beats a libm call.
// setup.py builds with -ffp-contract=off, so every variant computes bit-identical terms.
template <typename T, Variance V>
inline __attribute__((always_inline)) void learned_terms(const AncCoef& c, const T* v, const float* z, float* term,
                                                         int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) term[i] = ancestral_std(c, to_float(v[i]), V) * z[i];
}

template <typename T, Variance V>
void learned_terms_generic(const AncCoef& c, const T* v, const float* z, float* term, int64_t n) {
  learned_terms<T, V>(c, v, z, term, n);
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
template <typename T, Variance V>
__attribute__((target("avx2"))) void learned_terms_avx2(const AncCoef& c, const T* v, const float* z, float* term,
                                                        int64_t n) {
  learned_terms<T, V>(c, v, z, term, n);
}

template <typename T, Variance V>
__attribute__((target("avx512f"))) void learned_terms_avx512(const AncCoef& c, const T* v, const float* z,
                                                             float* term, int64_t n) {
  learned_terms<T, V>(c, v, z, term, n);
}
#endif

template <typename T, Variance V>
using LearnedTerms = void (*)(const AncCoef&, const T*, const float*, float*, int64_t);

template <typename T, Variance V>
LearnedTerms<T, V> select_learned_terms() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return learned_terms_avx512<T, V>;
  if (__builtin_cpu_supports("avx2")) return learned_terms_avx2<T, V>;
#endif
  return learned_terms_generic<T, V>;
}

template <typename T, Variance V>
void fill_learned_terms(const AncCoef& c, const T* v, const float* z, float* term, int64_t n) {
  static const LearnedTerms<T, V> impl = select_learned_terms<T, V>();
  impl(c, v, z, term, n);
}

template <typename T, bool kClip>
void ancestral_chunk(const AncestralArgs& a, const AncCoef& c, bool noisy, int64_t b, int64_t begin, int64_t n) {
  alignas(64) float f_buf[kChunk];
  alignas(64) float term_buf[kChunk];
  const int64_t row = b * a.numel + begin;
  const int64_t m = a.f_row_elems();
  const T* src = static_cast<const T*>(a.f);
  const T* cond = src + b * m + begin;  // prediction half of row b (the cond row under CFG)

  if (a.f_rows == a.batch) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) f_buf[i] = to_float(cond[i]);
  } else {  // CFG: cond rows first, then uncond rows
    const T* uncond = src + (a.batch + b) * m + begin;
    const float k = a.k ? a.k[b] : 1.0f;
    const float w = a.guidance_scale;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) f_buf[i] = guided_prediction(to_float(cond[i]), to_float(uncond[i]), w, k);
  }

  const float* term = kZeros;
  if (noisy) {
    const float* z = term_buf;
    if (a.noise) {
      z = a.noise + row;
    } else {
      fill_philox_normals(term_buf, static_cast<uint64_t>(a.seeds[b]), a.step, 0, begin, n);
    }
    const T* v = cond + a.numel;  // variance half of the cond row (learned variants)
    switch (static_cast<Variance>(a.variance)) {
      case Variance::kFixed:
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) term_buf[i] = c.s * z[i];
        break;
      case Variance::kLearned:
        fill_learned_terms<T, Variance::kLearned>(c, v, z, term_buf, n);
        break;
      case Variance::kLearnedRange:
        fill_learned_terms<T, Variance::kLearnedRange>(c, v, z, term_buf, n);
        break;
    }
    term = term_buf;
  }

  // out may alias x: each element is read before it is written, at the same index.
  const float* x = a.x + row;
  float* out = a.out + row;
  uint32_t nonfinite = 0;
#pragma omp simd reduction(| : nonfinite)
  for (int64_t i = 0; i < n; ++i) {
    const float v = ancestral_mean<kClip>(c, x[i], f_buf[i]) + term[i];
    out[i] = v;
    nonfinite |= nonfinite_bit(v);
  }
  if (nonfinite && a.bad) record_bad_row(a.bad + b, a.bad_step);

  if (a.out_net) {
    T* net = static_cast<T*>(a.out_net);
    for (int64_t j = 0; j < a.net_rows; ++j) {
      T* dst = net + (j * a.batch + b) * a.numel + begin;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(precondition_input(c.c, out[i]));
    }
  }
}

template <typename T, bool kClip>
void ancestral_all(const AncestralArgs& args, int num_threads) {
  AncestralArgs a = args;
  if (a.guidance) a.guidance_scale = *a.guidance;  // host memory on this backend: read it once
  const AncCoef c = load_anc_coef(a.coef, a.coef_cols, a.clip);
  const bool noisy = (a.noise || a.seeds) && c.s != 0.0f;  // s = 0: the last step adds no noise
  for_each_chunk(a.batch, a.numel, kChunk, num_threads, [&](int64_t, int64_t b, int64_t begin, int64_t n) {
    ancestral_chunk<T, kClip>(a, c, noisy, b, begin, n);
  });
}

template <typename T>
void dispatch_clip(const AncestralArgs& a, int num_threads) {
  if (a.clip) {
    ancestral_all<T, true>(a, num_threads);
  } else {
    ancestral_all<T, false>(a, num_threads);
  }
}

}  // namespace

int ancestral_step_cpu(const AncestralArgs& a, int num_threads) {
  if (validate(a) != kOk) return kBadArgument;
  if (a.numel == 0) return kOk;
  switch (a.dtype) {
    case DType::kFloat32:
      dispatch_clip<float>(a, num_threads);
      break;
    case DType::kFloat16:
      dispatch_clip<half_t>(a, num_threads);
      break;
    case DType::kBFloat16:
      dispatch_clip<bfloat16_t>(a, num_threads);
      break;
  }
  return kOk;
}

}  // namespace edmfast
