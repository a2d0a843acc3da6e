// CUDA CFG rescale (Lin et al. 2023, Eq. 14-16): k[b] = phi std(cond_b)/std(cfg_b) + (1 - phi).
//
// The factors are one launch (one read of cond and uncond): grid (chunk, sample); every block
// reduces one chunk of kCfgChunk elements of one sample to 4 fp32 partial sums, so batch 1 is
// spread over numel/8192 blocks. The block then counts itself in on its sample's arrival word
// (threadfence, then an atomic: the partials are visible device-wide before the count); the block
// that arrives last adds the sample's partials in double, in a fixed order, writes k and resets
// the count to 0, so the next launch and every CUDA graph replay start clean. The words carry the
// launch's tag (ops.h): a launch that died mid-grid leaves a count under its own tag, which the
// next launch replaces instead of counting on. Deterministic: no float atomics, and the final
// order does not depend on which block finishes last.
// cfg_rescale then runs one elementwise pass out = k cfg.
//
// The sums are over pivot-shifted values (cond - cond[b,0], cfg - cfg[b,0]): variance is shift
// invariant and the shift removes the cancellation of sum(x^2) - sum(x)^2/n when |mean| >> std.
// cfg is summed directly (g = u + w (c - u) per element) instead of expanding its variance
// through sum(u^2), sum(c u), sum(c^2), whose coefficients (up to w^2 = 56 at w = 7.5) cancel
// whenever cond and uncond are close.
#include <cuda_runtime.h>

#include <atomic>

#include "edmfast/cuda_utils.h"
#include "edmfast/ops.h"
#include "edmfast/step.h"

namespace edmfast {
namespace {

constexpr int kWarps = kThreads / 32;

// Sum of v over the block, fixed reduction tree; the result is valid in thread 0.
template <typename Acc, int kN>
__device__ __forceinline__ void block_sum(Acc v[kN]) {
  __shared__ Acc shared[kWarps][kN];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kN; ++j)
    for (int o = 16; o > 0; o /= 2) v[j] += __shfl_down_sync(0xFFFFFFFFu, v[j], o);
  if (lane == 0)
    for (int j = 0; j < kN; ++j) shared[warp][j] = v[j];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      v[j] = lane < kWarps ? shared[lane][j] : Acc(0);
      for (int o = 16; o > 0; o /= 2) v[j] += __shfl_down_sync(0xFFFFFFFFu, v[j], o);
    }
  }
  __syncthreads();  // `shared` is reused by the next sample of a grid-stride loop
}

// Counts the calling block in on a sample's arrival word (tag << 32 | count) and returns how many
// blocks of its launch arrived before it. The fast path is one atomicAdd. A word under another
// tag is stale (an earlier launch, finished or dead): the add on it is discarded with it, and
// the block either installs (tag, 1) or, when a block of its own launch already did, counts in
// on that.
// The slow path stays out of line: it runs once per launch and sample at most, and inlined its
// loop costs the reduction loop registers (a spill in the fp16 variant).
__device__ __noinline__ unsigned long long arrive_stale(unsigned long long* word, uint32_t tag) {
  const unsigned long long mine = static_cast<unsigned long long>(tag) << 32;
  for (;;) {
    const unsigned long long cur = atomicAdd(word, 0ull);  // an atomic read, never a stale cached line
    if ((cur >> 32) == tag) return atomicAdd(word, 1ull) & 0xFFFFFFFFull;
    if (atomicCAS(word, cur, mine | 1ull) == cur) return 0;
  }
}

__device__ __forceinline__ unsigned long long arrive(unsigned long long* word, uint32_t tag) {
  const unsigned long long old = atomicAdd(word, 1ull);
  return (old >> 32) == tag ? (old & 0xFFFFFFFFull) : arrive_stale(word, tag);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cfg_factors_kernel(const CfgArgs a, float* partials,
                                                               unsigned long long* arrivals, int64_t chunks,
                                                               float* k_out, uint32_t tag) {
  const T* cond_all = static_cast<const T*>(a.cond);
  const T* uncond_all = static_cast<const T*>(a.uncond);
  // Values from device memory when given: one captured graph serves any guidance.
  const float w = a.guidance_scale_ptr ? *a.guidance_scale_ptr : a.guidance_scale;
  __shared__ bool last;
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const T* cond = cond_all + b * a.row();
    const T* uncond = uncond_all + b * a.row();
    // numel == 0 leaves all sums 0 and k = 1 (the n < 2 rule); never read element 0 then.
    const float pivot_c = a.numel > 0 ? to_float(cond[0]) : 0.0f;
    const float pivot_u = a.numel > 0 ? to_float(uncond[0]) : 0.0f;
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * kCfgChunk;
    const int64_t end = begin + kCfgChunk < a.numel ? begin + kCfgChunk : a.numel;
    float sums[4] = {0, 0, 0, 0};  // cond, cond^2, cfg, cfg^2 (32 terms per thread, then a tree)
#pragma unroll 4
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const float c = to_float(cond[i]) - pivot_c;
      const float u = to_float(uncond[i]) - pivot_u;
      const float g = u + w * (c - u);
      sums[0] += c;
      sums[1] += c * c;
      sums[2] += g;
      sums[3] += g * g;
    }
    block_sum<float, 4>(sums);
    if (threadIdx.x == 0) {
      float* p = partials + (b * chunks + blockIdx.x) * 4;
      for (int j = 0; j < 4; ++j) p[j] = sums[j];
      __threadfence();  // release: the partials reach L2 before this block is counted
      last = arrive(arrivals + b, tag) == static_cast<unsigned long long>(chunks - 1);
    }
    __syncthreads();
    if (last) {  // block-uniform (shared), so block_sum's barriers are legal here
      __threadfence();  // acquire: order the reads below after the other blocks' counts
      double total[4] = {0, 0, 0, 0};
      for (int64_t j = threadIdx.x; j < chunks; j += kThreads) {
        const float* p = partials + (b * chunks + j) * 4;
        for (int q = 0; q < 4; ++q) total[q] += __ldcg(p + q);  // L2, never a stale L1 line
      }
      block_sum<double, 4>(total);
      if (threadIdx.x == 0) {
        const float phi = a.guidance_rescale_ptr ? *a.guidance_rescale_ptr : a.guidance_rescale;
        k_out[b] = rescale_factor<double>(total[0], total[1], total[2], total[3], a.numel, phi);
        atomicExch(arrivals + b, static_cast<unsigned long long>(tag) << 32);  // count 0: a replay starts here
      }
    }
    __syncthreads();  // `last` is rewritten for the next sample of the grid-stride loop
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) cfg_apply_kernel(const CfgArgs a, const float* k, T* out) {
  const T* cond = static_cast<const T*>(a.cond);
  const T* uncond = static_cast<const T*>(a.uncond);
  const int64_t groups = (a.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float w = a.guidance_scale_ptr ? *a.guidance_scale_ptr : a.guidance_scale;
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const float kb = k[b];
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
      const int64_t e = 4 * g;
      const int64_t n = a.numel - e;
      const int64_t off = b * a.numel + e;
      float c[4], u[4], v[4];
      load4<T, kVec>(cond + off, n, c);
      load4<T, kVec>(uncond + off, n, u);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = guided_prediction(c[j], u[j], w, kb);
      store4<T, kVec>(out + off, n, v);
    }
  }
}

// Workspace layout (ops.h), sized by the row: partials [batch][cfg_chunks(row)][4], arrival
// words [batch] (uint64), k [batch]. A launch over numel < row uses the first chunks of each
// sample's partials (indexed with its own chunk count, which is never larger).
inline unsigned long long* arrivals_of(float* workspace, const CfgArgs& a) {
  return reinterpret_cast<unsigned long long*>(workspace + cfg_counters_offset(a.batch, a.row()));
}

// A fresh tag per launch, never 0 (a zero-filled workspace holds tag 0 with count 0, valid for any tag).
uint32_t next_tag() {
  static std::atomic<uint32_t> counter{0};
  uint32_t tag = counter.fetch_add(1, std::memory_order_relaxed) + 1;
  while (tag == 0) tag = counter.fetch_add(1, std::memory_order_relaxed) + 1;
  return tag;
}

template <typename T>
int launch_factors(const CfgArgs& a, float* k_out, float* workspace, cudaStream_t stream) {
  const int64_t chunks = cfg_chunks(a.numel);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(a.batch < 65535 ? a.batch : 65535), 1);
  cfg_factors_kernel<T><<<grid, kThreads, 0, stream>>>(a, workspace, arrivals_of(workspace, a), chunks, k_out,
                                                       next_tag());
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_apply(const CfgArgs& a, const float* k, T* out, int device, cudaStream_t stream) {
  constexpr size_t kPack = 4 * sizeof(T);
  const bool vec = a.numel % 4 == 0 && aligned(a.cond, kPack) && aligned(a.uncond, kPack) && aligned(out, kPack);
  const dim3 grid = grid_for((a.numel + 3) / 4, a.batch, device);
  if (vec) {
    cfg_apply_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, k, out);
  } else {
    cfg_apply_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, k, out);
  }
  return static_cast<int>(cudaGetLastError());
}

// Entry checks shared by both launchers: the workspace must hold the partials, the arrival words
// (8-byte aligned) and k.
int check(const CfgArgs& a, const float* workspace, int64_t workspace_floats) {
  if (validate(a) != kOk || !workspace || !aligned(workspace, 8)) return kBadArgument;
  if (workspace_floats < cfg_workspace_floats(a.batch, a.row())) return kBadArgument;
  if (a.numel > static_cast<int64_t>(0x7FFFFFFF) * kCfgChunk) return kBadArgument;  // grid.x limit
  return kOk;
}

}  // namespace

int cfg_rescale_factors_cuda(const CfgArgs& a, float* k_out, float* workspace, int64_t workspace_floats,
                             int device, void* stream) {
  if (check(a, workspace, workspace_floats) != kOk || !k_out) return kBadArgument;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return static_cast<int>(guard.status());
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kFloat32:
      return launch_factors<float>(a, k_out, workspace, s);
    case DType::kFloat16:
      return launch_factors<half_t>(a, k_out, workspace, s);
    case DType::kBFloat16:
      return launch_factors<bfloat16_t>(a, k_out, workspace, s);
  }
  return kBadArgument;
}

int cfg_rescale_cuda(const CfgArgs& a, void* out, float* workspace, int64_t workspace_floats, int device,
                     void* stream) {
  if (check(a, workspace, workspace_floats) != kOk || !out) return kBadArgument;
  if (a.numel == 0) return kOk;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return static_cast<int>(guard.status());
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.row_stride != 0 && a.row_stride != a.numel) return kBadArgument;  // the apply pass has no stride
  float* k = workspace + cfg_k_offset(a.batch, a.row());  // the k slot of the workspace
  int err = kBadArgument;
  switch (a.dtype) {
    case DType::kFloat32:
      err = launch_factors<float>(a, k, workspace, s);
      if (err == kOk) err = launch_apply(a, k, static_cast<float*>(out), device, s);
      break;
    case DType::kFloat16:
      err = launch_factors<half_t>(a, k, workspace, s);
      if (err == kOk) err = launch_apply(a, k, static_cast<half_t*>(out), device, s);
      break;
    case DType::kBFloat16:
      err = launch_factors<bfloat16_t>(a, k, workspace, s);
      if (err == kOk) err = launch_apply(a, k, static_cast<bfloat16_t*>(out), device, s);
      break;
  }
  return err;
}

}  // namespace edmfast
