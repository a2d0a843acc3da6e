// CPU loops of the fused sampler pass (heun_step, and churn as its p = 1 special case).
//
// Work is split into (sample, chunk) items so batch 1 still uses every core. Each item stages
// its operands through small float32 buffers (the guided prediction, the Philox normals) and
// then runs one branch-free loop over the chunk calling the shared per-element math of step.h:
// absent operands point at a block of zeros with a zero coefficient, so the hot loop has no
// per-element conditionals and vectorizes.
#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "edmfast/ops.h"
#include "edmfast/philox.h"
#include "edmfast/step.h"

namespace edmfast {
namespace {

// Elements per work item: a multiple of 4 (a Philox call feeds 4 elements, so chunks start on a
// group boundary) and small enough that the two 8 KB staging buffers stay in L1.
constexpr int64_t kChunk = 2048;
// Below this many elements the OpenMP fork/join (~several us) costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;

const float kZeros[kChunk] = {};

// eps[i] = element begin + i of the fused stream of (seed, step); begin is a multiple of 4.
// The Philox + Box-Muller loop is branch-free and vectorizes (one SIMD lane per Philox call);
// its four outputs land in lane arrays first and are interleaved by a second, cheap loop.
// On x86-64 an AVX2 clone (8 lanes) is picked at load time where the CPU has it; without FMA
// in the target the clones compute bit-identical results.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void fill_philox(float* eps, uint64_t seed, uint32_t step, int64_t begin, int64_t n) {
  constexpr int64_t kGroups = kChunk / 4;
  alignas(64) float lane[4][kGroups];
  const uint64_t group0 = static_cast<uint64_t>(begin / 4);
  const int64_t groups = (n + 3) / 4;
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    const float4x32 z = philox_normal4(seed, step, group0 + static_cast<uint64_t>(g));
    lane[0][g] = z.n0;
    lane[1][g] = z.n1;
    lane[2][g] = z.n2;
    lane[3][g] = z.n3;
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

template <typename T>
void step_chunk(const StepArgs& a, const StepCoef& s, int64_t b, int64_t begin, int64_t n) {
  alignas(64) float f_buf[kChunk];
  alignas(64) float eps_buf[kChunk];
  const int64_t row = b * a.numel + begin;

  const float* x_prime = a.x_prime ? a.x_prime + row : kZeros;

  const float* f = kZeros;
  if (a.f_rows != 0) {
    const T* src = static_cast<const T*>(a.f);
    if (a.f_rows == a.batch) {
      const T* x = src + row;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) f_buf[i] = to_float(x[i]);
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
    fill_philox(eps_buf, static_cast<uint64_t>(a.seeds[b]), a.step, begin, n);
    eps = eps_buf;
  }

  // out may alias x_hat: each element is read before it is written, at the same index.
  const float* x_hat = a.x_hat + row;
  float* out = a.out + row;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = fused_update(s, x_hat[i], x_prime[i], f[i], eps[i]);

  if (a.out_net) {
    T* net = static_cast<T*>(a.out_net);
    for (int64_t j = 0; j < a.net_rows; ++j) {
      T* dst = net + (j * a.batch + b) * a.numel + begin;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(precondition_input(s.c, out[i]));
    }
  }
}

template <typename T>
void step_all(const StepArgs& a, int num_threads) {
  const StepCoef s = load_coef(a.coef, a.x_prime != nullptr, a.f_rows != 0, a.noise || a.seeds, a.churn);
  const int64_t chunks = (a.numel + kChunk - 1) / kChunk;
  const int64_t items = a.batch * chunks;
  const bool parallel = a.batch * a.numel >= kParallelMin;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
#else
  (void)num_threads;
  (void)parallel;
#endif
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / chunks;
    const int64_t begin = (item - b * chunks) * kChunk;
    step_chunk<T>(a, s, b, begin, std::min(kChunk, a.numel - begin));
  }
}

}  // namespace

int heun_step_cpu(const StepArgs& a, int num_threads) {
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
