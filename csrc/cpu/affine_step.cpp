// CPU loops of the fused affine pass (affine_step; heun_step and churn are instances of it).
//
// Work is split into (sample, chunk) items so batch 1 still uses every core. Each item stages
// its operands through small float32 buffers (the guided prediction, the Philox normals) and
// then runs one branch-free loop over the chunk calling the shared per-element math of step.h.
// An absent F or eps points at a block of zeros with a zero coefficient; the present history
// buffers are packed in k order and the loop is instantiated per count (0..4) and with or
// without hist_out, so the hot loop has no per-element conditionals, reads nothing it does not
// need, and vectorizes.
#include <algorithm>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
// GCC 12's AVX-512 intrinsics seed their unused pass-through operand with a self-initialized
// "undefined" vector, which -Wall reports as maybe-uninitialized inside the header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define EDMFAST_X86_SIMD 1
#else
#define EDMFAST_X86_SIMD 0
#endif

#include "edmfast/ops.h"
#include "edmfast/philox.h"
#include "cpu_common.h"
#include "edmfast/step.h"
#include "parallel.h"

#if defined(__GNUC__)
#define EDMFAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define EDMFAST_ALWAYS_INLINE inline
#endif

namespace edmfast {
namespace {

// Elements per work item: a multiple of 4 (a Philox call feeds 4 elements, so chunks start on a
// group boundary) and small enough that the two 8 KB staging buffers stay in L1.
constexpr int64_t kChunk = kPhiloxFillMax;
const float kZeros[kChunk] = {};

// ----------------------------------------------------------------------------- Philox noise
//
// eps[i] = element begin + i of the fused stream of (seed, step, stage), begin a multiple of 4, in two
// passes over the chunk's kGroups Philox calls through a stack buffer of words (8 KB):
//   1. the Philox words w[j][g] = x_j of call group0 + g (bit-exact integer math);
//   2. Box-Muller of the words (philox.h's branch-free float32 helpers, auto-vectorized, one
//      SIMD lane per call), then one cheap loop interleaving the four lanes into eps.
// On x86-64 pass 1 is written with AVX2 / AVX-512F intrinsics (the compiler's own vectorization
// of the 32x32->64 multiplies costs a shuffle per multiply) and both passes are compiled once
// per ISA and picked at run time from the CPU's features; the portable scalar loops are the
// fallback on any other CPU and finish the tails. The float code is the same source in every
// variant and setup.py builds with -ffp-contract=off (AVX-512F brings FMA), so the normals are
// bit-identical whichever variant runs.
constexpr int64_t kGroups = kChunk / 4;
using Words = uint32_t[4][kGroups];

// Pass 1, portable: calls [g_begin, groups) of the chunk.
EDMFAST_ALWAYS_INLINE void philox_words(Words& w, uint64_t group0, uint64_t seed, uint32_t step, uint32_t stage,
                                        int64_t g_begin, int64_t groups) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t g = g_begin; g < groups; ++g) {
    const uint64_t c = group0 + static_cast<uint64_t>(g);
    const uint4x32 x =
        philox4x32(uint4x32{static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), step, stage}, k0, k1);
    w[0][g] = x.x0;
    w[1][g] = x.x1;
    w[2][g] = x.x2;
    w[3][g] = x.x3;
  }
}

// Pass 2: the normals of the first n elements of the chunk from its words.
EDMFAST_ALWAYS_INLINE void philox_normals(const Words& w, float* eps, int64_t n) {
  alignas(64) float lane[4][kGroups];
  const int64_t groups = (n + 3) / 4;
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    const float r0 = sqrtf(-2.0f * log_uniform(w[0][g]));
    const float r1 = sqrtf(-2.0f * log_uniform(w[2][g]));
    float c0, s0, c1, s1;
    sincos_2pi_uniform(w[1][g], &c0, &s0);
    sincos_2pi_uniform(w[3][g], &c1, &s1);
    lane[0][g] = r0 * c0;
    lane[1][g] = r0 * s0;
    lane[2][g] = r1 * c1;
    lane[3][g] = r1 * s1;
  }
  const int64_t full = n / 4;
  for (int64_t g = 0; g < full; ++g) {
    eps[4 * g] = lane[0][g];
    eps[4 * g + 1] = lane[1][g];
    eps[4 * g + 2] = lane[2][g];
    eps[4 * g + 3] = lane[3][g];
  }
  for (int64_t i = 4 * full; i < n; ++i) eps[i] = lane[i & 3][i >> 2];
}

void fill_philox_generic(float* eps, uint64_t seed, uint32_t step, uint32_t stage, int64_t begin, int64_t n) {
  alignas(64) Words w;
  philox_words(w, static_cast<uint64_t>(begin / 4), seed, step, stage, 0, (n + 3) / 4);
  philox_normals(w, eps, n);
}

#if EDMFAST_X86_SIMD
// Philox rounds on 64-bit lanes: each lane holds one call's word in its low half (vpmuludq reads
// only that half, so the high halves may hold junk: the products' high words, never read).
// mul_epu32(x, M) = lo | hi << 32, so a round is two multiplies, two shifts and the XORs:
//   x0' = hi(M1 x2) ^ x1 ^ k0,  x1' = lo(M1 x2),  x2' = hi(M0 x0) ^ x3 ^ k1,  x3' = lo(M0 x0).
// Two states per iteration, a on the even calls and b on the odd ones, so that a blend of a's
// low words with b's (shifted up) stores calls g, g + 1, ... in order; the two independent
// chains also hide the multiply latency.
__attribute__((target("avx2"))) void philox_words_avx2(Words& w, uint64_t group0, uint64_t seed, uint32_t step,
                                                        uint32_t stage, int64_t groups) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i step_v = _mm256_set1_epi64x(step), stage_v = _mm256_set1_epi64x(stage);
  const __m256i one = _mm256_set1_epi64x(1);
  const __m256i even = _mm256_setr_epi64x(0, 2, 4, 6);
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256i ca = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(group0 + g)), even);
    const __m256i cb = _mm256_add_epi64(ca, one);
    __m256i a0 = ca, a1 = _mm256_srli_epi64(ca, 32), a2 = step_v, a3 = stage_v;
    __m256i b0 = cb, b1 = _mm256_srli_epi64(cb, 32), b2 = step_v, b3 = stage_v;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m256i key0 = _mm256_set1_epi64x(k0), key1 = _mm256_set1_epi64x(k1);
      const __m256i pa0 = _mm256_mul_epu32(a0, m0), pa1 = _mm256_mul_epu32(a2, m1);
      const __m256i pb0 = _mm256_mul_epu32(b0, m0), pb1 = _mm256_mul_epu32(b2, m1);
      a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa1, 32), a1), key0);
      a2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa0, 32), a3), key1);
      a1 = pa1;
      a3 = pa0;
      b0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb1, 32), b1), key0);
      b2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb0, 32), b3), key1);
      b1 = pb1;
      b3 = pb0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
#define EDMFAST_STORE_WORDS(j) \
  _mm256_store_si256(reinterpret_cast<__m256i*>(&w[j][g]), \
                     _mm256_blend_epi32(a##j, _mm256_slli_epi64(b##j, 32), 0xAA))
    EDMFAST_STORE_WORDS(0);
    EDMFAST_STORE_WORDS(1);
    EDMFAST_STORE_WORDS(2);
    EDMFAST_STORE_WORDS(3);
#undef EDMFAST_STORE_WORDS
  }
  philox_words(w, group0, seed, step, stage, g, groups);
}

// The same with 8 lanes per state, the three-way XORs as one ternary-logic op (0x96 = a ^ b ^ c).
__attribute__((target("avx512f"))) void philox_words_avx512(Words& w, uint64_t group0, uint64_t seed,
                                                             uint32_t step, uint32_t stage, int64_t groups) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i step_v = _mm512_set1_epi64(step), stage_v = _mm512_set1_epi64(stage);
  const __m512i one = _mm512_set1_epi64(1);
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16) {
    const __m512i ca = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(group0 + g)), even);
    const __m512i cb = _mm512_add_epi64(ca, one);
    __m512i a0 = ca, a1 = _mm512_srli_epi64(ca, 32), a2 = step_v, a3 = stage_v;
    __m512i b0 = cb, b1 = _mm512_srli_epi64(cb, 32), b2 = step_v, b3 = stage_v;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
      const __m512i pa0 = _mm512_mul_epu32(a0, m0), pa1 = _mm512_mul_epu32(a2, m1);
      const __m512i pb0 = _mm512_mul_epu32(b0, m0), pb1 = _mm512_mul_epu32(b2, m1);
      a0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa1, 32), a1, key0, 0x96);
      a2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa0, 32), a3, key1, 0x96);
      a1 = pa1;
      a3 = pa0;
      b0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb1, 32), b1, key0, 0x96);
      b2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb0, 32), b3, key1, 0x96);
      b1 = pb1;
      b3 = pb0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
#define EDMFAST_STORE_WORDS(j) \
  _mm512_store_si512(&w[j][g], _mm512_mask_blend_epi32(0xAAAA, a##j, _mm512_slli_epi64(b##j, 32)))
    EDMFAST_STORE_WORDS(0);
    EDMFAST_STORE_WORDS(1);
    EDMFAST_STORE_WORDS(2);
    EDMFAST_STORE_WORDS(3);
#undef EDMFAST_STORE_WORDS
  }
  philox_words(w, group0, seed, step, stage, g, groups);
}

__attribute__((target("avx2"))) void fill_philox_avx2(float* eps, uint64_t seed, uint32_t step, uint32_t stage,
                                                       int64_t begin, int64_t n) {
  alignas(64) Words w;
  philox_words_avx2(w, static_cast<uint64_t>(begin / 4), seed, step, stage, (n + 3) / 4);
  philox_normals(w, eps, n);
}

__attribute__((target("avx512f"))) void fill_philox_avx512(float* eps, uint64_t seed, uint32_t step, uint32_t stage,
                                                            int64_t begin, int64_t n) {
  alignas(64) Words w;
  philox_words_avx512(w, static_cast<uint64_t>(begin / 4), seed, step, stage, (n + 3) / 4);
  philox_normals(w, eps, n);
}
#endif

using FillPhilox = void (*)(float*, uint64_t, uint32_t, uint32_t, int64_t, int64_t);

// The widest variant the CPU (and the OS, for the AVX-512 register state) supports.
FillPhilox select_fill_philox() {
#if EDMFAST_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return fill_philox_avx512;
  if (__builtin_cpu_supports("avx2")) return fill_philox_avx2;
#endif
  return fill_philox_generic;
}

void fill_philox(float* eps, uint64_t seed, uint32_t step, uint32_t stage, int64_t begin, int64_t n) {
  static const FillPhilox impl = select_fill_philox();
  impl(eps, seed, step, stage, begin, n);
}

// bad[b] = min(bad[b], step), atomically: chunks of one sample may run on different threads.
// Reached only when a row holds inf or NaN, so the compare-exchange loop costs nothing normally.
void record_bad(int32_t* slot, int32_t step) {
  int32_t current = __atomic_load_n(slot, __ATOMIC_RELAXED);
  while (step < current &&
         !__atomic_compare_exchange_n(slot, &current, step, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}


// The present history buffers of a pass, packed in k order with their coefficients.
struct History {
  int count = 0;
  const float* h[kHistory] = {};
  float c[kHistory] = {};
};

// The element loop over one chunk with NH present history buffers (hist.h[j] + offset), with or
// without hist_out; returns the OR of nonfinite_bit over the new state. Every input of element i
// is read before its outputs are written, so out / hist_out may be exactly an input (the
// vectorized loop keeps that order lane by lane: loads, then stores, per vector of elements).
template <int NH, bool kHistOut>
uint32_t affine_loop(const StepCoef& s, const History& hist, int64_t offset, const float* x, const float* f,
                     const float* eps, float* out, float* hist_out, int64_t n) {
  const float* h0 = NH > 0 ? hist.h[0] + offset : nullptr;
  const float* h1 = NH > 1 ? hist.h[1] + offset : nullptr;
  const float* h2 = NH > 2 ? hist.h[2] + offset : nullptr;
  const float* h3 = NH > 3 ? hist.h[3] + offset : nullptr;
  const float c0 = hist.c[0], c1 = hist.c[1], c2 = hist.c[2], c3 = hist.c[3];
  uint32_t nonfinite = 0;
#pragma omp simd reduction(| : nonfinite)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i], fi = f[i];
    float v = affine_start(s, xi, fi);
    if constexpr (NH > 0) v = affine_history(v, c0, h0[i]);
    if constexpr (NH > 1) v = affine_history(v, c1, h1[i]);
    if constexpr (NH > 2) v = affine_history(v, c2, h2[i]);
    if constexpr (NH > 3) v = affine_history(v, c3, h3[i]);
    v = affine_noise(v, s.std, eps[i]);
    if constexpr (kHistOut) {
      const float hv = history_update(s, xi, fi);
      out[i] = v;
      hist_out[i] = hv;
    } else {
      out[i] = v;
    }
    nonfinite |= nonfinite_bit(v);
  }
  return nonfinite;
}

using AffineLoop = uint32_t (*)(const StepCoef&, const History&, int64_t, const float*, const float*, const float*,
                                float*, float*, int64_t);

constexpr AffineLoop kAffineLoops[kHistory + 1][2] = {
    {affine_loop<0, false>, affine_loop<0, true>}, {affine_loop<1, false>, affine_loop<1, true>},
    {affine_loop<2, false>, affine_loop<2, true>}, {affine_loop<3, false>, affine_loop<3, true>},
    {affine_loop<4, false>, affine_loop<4, true>},
};

template <typename T>
void step_chunk(const StepArgs& a, const StepCoef& s, const History& hist, AffineLoop loop, int64_t b, int64_t begin,
                int64_t n) {
  alignas(64) float f_buf[kChunk];
  alignas(64) float eps_buf[kChunk];
  const int64_t row = b * a.numel + begin;

  // Staged before any output of the chunk is written: out_net may be f itself (same rows).
  const float* f = kZeros;
  if (a.f_rows != 0) {
    const T* src = static_cast<const T*>(a.f);
    if (a.f_rows == a.batch) {
      const T* p = src + row;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) f_buf[i] = to_float(p[i]);
    } else {  // CFG: cond rows first, then uncond rows
      const T* cond = src + row;
      const T* uncond = src + a.batch * a.numel + row;
      const float k = a.k ? a.k[b] : 1.0f;
      const float w = a.guidance_scale;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) f_buf[i] = guided_prediction(to_float(cond[i]), to_float(uncond[i]), w, k);
    }
    f = f_buf;
  }

  const float* eps = kZeros;
  if (a.noise) {
    eps = a.noise + row;
  } else if (a.seeds) {
    fill_philox(eps_buf, static_cast<uint64_t>(a.seeds[b]), a.step, a.stage, begin, n);
    eps = eps_buf;
  }

  float* out = a.out + row;
  const uint32_t nonfinite =
      loop(s, hist, row, a.x + row, f, eps, out, a.hist_out ? a.hist_out + row : nullptr, n);
  if (nonfinite && a.bad) record_bad(a.bad + b, a.bad_step);

  if (a.out_net) {
    T* net = static_cast<T*>(a.out_net);
    for (int64_t j = 0; j < a.net_rows; ++j) {
      T* dst = net + (j * a.batch + b) * a.numel + begin;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(precondition_input(s.net, out[i]));
    }
  }
}

template <typename T>
void step_all(const StepArgs& args, int num_threads) {
  StepArgs a = args;
  if (a.guidance) a.guidance_scale = *a.guidance;  // host memory on this backend: read it once
  const StepCoef s = load_coef(a.coef, a.operands());
  History hist;
  for (int j = 0; j < kHistory; ++j) {
    if (!a.hist[j]) continue;
    hist.h[hist.count] = a.hist[j];
    hist.c[hist.count] = s.c[j];
    ++hist.count;
  }
  const AffineLoop loop = kAffineLoops[hist.count][a.hist_out != nullptr];
  for_each_chunk(a.batch, a.numel, kChunk, num_threads, [&](int64_t, int64_t b, int64_t begin, int64_t n) {
    step_chunk<T>(a, s, hist, loop, b, begin, n);
  });
}

}  // namespace

void fill_philox_normals(float* eps, uint64_t seed, uint32_t step, uint32_t stage, int64_t begin, int64_t n) {
  fill_philox(eps, seed, step, stage, begin, n);
}

void record_bad_row(int32_t* slot, int32_t step) { record_bad(slot, step); }

int affine_step_cpu(const StepArgs& a, int num_threads) {
  if (validate(a) != kOk) return kBadArgument;
  if (a.numel == 0) return kOk;
  switch (a.dtype) {
    case DType::kFloat32:
      step_all<float>(a, num_threads);
      break;
    case DType::kFloat16:
      step_all<half_t>(a, num_threads);
      break;
    case DType::kBFloat16:
      step_all<bfloat16_t>(a, num_threads);
      break;
  }
  return kOk;
}

}  // namespace edmfast
