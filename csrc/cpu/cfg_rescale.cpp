// CPU CFG rescale (Lin et al. 2023, Eq. 14-16): one reduction pass for the per-sample factors
// k[b] = phi std(cond_b)/std(cfg_b) + (1 - phi), then one elementwise pass out = k cfg.
//
// Accuracy: the stds come from sums of pivot-shifted values (cond - cond[b, 0], cfg - cfg[b, 0];
// variance is shift invariant), accumulated in double. Without the shift, sum(x^2) - sum(x)^2/n
// cancels catastrophically when |mean| >> std (mean 1e3, std 1e-2 loses all 7 float32 digits).
// We sum cfg itself (g = u + w (c - u) per element) rather than expanding its variance through
// sum(u^2), sum(c u) and sum(c^2): with w = 7.5 that expansion has coefficients up to 56 of
// mixed sign and cancels whenever cond and uncond are close, which they usually are.
//
// Determinism: samples are cut into fixed chunks whose partial sums are added in chunk order,
// so the result does not depend on the number of threads.
#include <algorithm>
#include <vector>

#include "edmfast/ops.h"
#include "edmfast/step.h"
#include "parallel.h"

namespace edmfast {
namespace {

constexpr int64_t kChunk = 8192;

struct Sums {
  double c, c2, g, g2;
};

template <typename T>
Sums chunk_sums(const T* cond, const T* uncond, int64_t n, double pivot_c, double pivot_u, double w) {
  double c_sum = 0, c2_sum = 0, g_sum = 0, g2_sum = 0;
#pragma omp simd reduction(+ : c_sum, c2_sum, g_sum, g2_sum)
  for (int64_t i = 0; i < n; ++i) {
    const double c = static_cast<double>(to_float(cond[i])) - pivot_c;
    const double u = static_cast<double>(to_float(uncond[i])) - pivot_u;
    const double g = u + w * (c - u);
    c_sum += c;
    c2_sum += c * c;
    g_sum += g;
    g2_sum += g * g;
  }
  return Sums{c_sum, c2_sum, g_sum, g2_sum};
}

template <typename T>
void factors(const CfgArgs& a, float* k_out, int num_threads) {
  const T* cond = static_cast<const T*>(a.cond);
  const T* uncond = static_cast<const T*>(a.uncond);
  const int64_t chunks = (a.numel + kChunk - 1) / kChunk;
  std::vector<Sums> partial(static_cast<size_t>(a.batch * chunks));
  for_each_chunk(a.batch, a.numel, kChunk, num_threads, [&](int64_t item, int64_t b, int64_t begin, int64_t n) {
    const int64_t row = b * a.row();
    partial[item] = chunk_sums(cond + row + begin, uncond + row + begin, n, to_float(cond[row]),
                               to_float(uncond[row]), a.guidance_scale);
  });
  for (int64_t b = 0; b < a.batch; ++b) {
    Sums s{0, 0, 0, 0};
    for (int64_t j = 0; j < chunks; ++j) {
      const Sums& p = partial[b * chunks + j];
      s.c += p.c;
      s.c2 += p.c2;
      s.g += p.g;
      s.g2 += p.g2;
    }
    k_out[b] = rescale_factor<double>(s.c, s.c2, s.g, s.g2, a.numel, a.guidance_rescale);
  }
}

template <typename T>
void apply(const CfgArgs& a, const float* k, T* out, int num_threads) {
  const T* cond = static_cast<const T*>(a.cond);
  const T* uncond = static_cast<const T*>(a.uncond);
  const float w = a.guidance_scale;
  for_each_chunk(a.batch, a.numel, kChunk, num_threads, [&](int64_t, int64_t b, int64_t begin, int64_t n) {
    const int64_t off = b * a.numel + begin;
    const float kb = k[b];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      out[off + i] = from_float<T>(guided_prediction(to_float(cond[off + i]), to_float(uncond[off + i]), w, kb));
  });
}

template <typename T>
void cfg_rescale_typed(const CfgArgs& a, T* out, int num_threads) {
  std::vector<float> k(static_cast<size_t>(a.batch));
  factors<T>(a, k.data(), num_threads);
  apply<T>(a, k.data(), out, num_threads);
}

// The run-time values of a call, read once (host memory on this backend).
CfgArgs resolved(const CfgArgs& args) {
  CfgArgs a = args;
  if (a.guidance_scale_ptr) a.guidance_scale = *a.guidance_scale_ptr;
  if (a.guidance_rescale_ptr) a.guidance_rescale = *a.guidance_rescale_ptr;
  return a;
}

}  // namespace

int cfg_rescale_factors_cpu(const CfgArgs& args, float* k_out, int num_threads) {
  if (validate(args) != kOk || !k_out) return kBadArgument;
  const CfgArgs a = resolved(args);
  if (a.numel == 0) {
    std::fill(k_out, k_out + a.batch, 1.0f);
    return kOk;
  }
  switch (a.dtype) {
    case DType::kFloat32:
      factors<float>(a, k_out, num_threads);
      break;
    case DType::kFloat16:
      factors<half_t>(a, k_out, num_threads);
      break;
    case DType::kBFloat16:
      factors<bfloat16_t>(a, k_out, num_threads);
      break;
  }
  return kOk;
}

int cfg_rescale_cpu(const CfgArgs& args, void* out, int num_threads) {
  if (validate(args) != kOk || !out) return kBadArgument;
  if (args.row_stride != 0 && args.row_stride != args.numel) return kBadArgument;  // the apply pass has no stride
  const CfgArgs a = resolved(args);
  if (a.numel == 0) return kOk;
  switch (a.dtype) {
    case DType::kFloat32:
      cfg_rescale_typed(a, static_cast<float*>(out), num_threads);
      break;
    case DType::kFloat16:
      cfg_rescale_typed(a, static_cast<half_t*>(out), num_threads);
      break;
    case DType::kBFloat16:
      cfg_rescale_typed(a, static_cast<bfloat16_t*>(out), num_threads);
      break;
  }
  return kOk;
}

}  // namespace edmfast
