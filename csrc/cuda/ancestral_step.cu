// CUDA kernel of the fused ancestral pass (ancestral.h; edmfast/reference.py ancestral_step).
//
// The layout of affine_step.cu: one thread owns 4 consecutive elements of one sample (one 16-byte
// access per fp32 operand, 8 bytes per 16-bit one, when the sample size is a multiple of 4 and
// every pointer is aligned; one Philox call for the 4 normals), samples on grid.y, groups of 4
// grid-stride on x. f rows hold numel or 2 numel elements (the variance half after the
// prediction); with numel % 4 == 0 both halves keep the vector alignment. The coefficient row is
// read from device memory and s = 0 skips the noise (and its Philox work) for the whole launch.
#include <cuda_runtime.h>

#include "edmfast/ancestral.h"
#include "edmfast/cuda_utils.h"
#include "edmfast/ops.h"
#include "edmfast/philox.h"
#include "edmfast/step.h"

namespace edmfast {
namespace {

template <typename T, bool kVec, bool kClip>
__global__ void __launch_bounds__(kThreads) ancestral_step_kernel(const AncestralArgs a) {
  const AncCoef c = load_anc_coef(a.coef, a.coef_cols, a.clip);
  const Variance variance = static_cast<Variance>(a.variance);
  const bool noisy = (a.noise != nullptr || a.seeds != nullptr) && c.s != 0.0f;  // uniform per launch
  const bool cfg = a.f_rows == 2 * a.batch;
  const T* f = static_cast<const T*>(a.f);
  T* out_net = static_cast<T*>(a.out_net);
  const int64_t m = a.f_row_elems();
  const int64_t groups = (a.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float w = a.guidance ? *a.guidance : a.guidance_scale;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t row = b * a.numel;
    const T* cond_row = f + b * m;
    const T* uncond_row = f + (a.batch + b) * m;
    const float k = a.k ? a.k[b] : 1.0f;
    const uint64_t seed = a.seeds ? static_cast<uint64_t>(a.seeds[b]) : 0;
    uint32_t nonfinite = 0;  // any inf / NaN among this thread's results of sample b
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
      const int64_t e = 4 * g;
      const int64_t n = a.numel - e;  // >= 4 except in the last group of a sample

      float x[4], pred[4], term[4] = {0, 0, 0, 0};
      load4<float, kVec>(a.x + row + e, n, x);
      load4<T, kVec>(cond_row + e, n, pred);
      if (cfg) {
        float uncond[4];
        load4<T, kVec>(uncond_row + e, n, uncond);
#pragma unroll
        for (int j = 0; j < 4; ++j) pred[j] = guided_prediction(pred[j], uncond[j], w, k);
      }
      if (noisy) {
        float z[4];
        if (a.noise) {
          load4<float, kVec>(a.noise + row + e, n, z);
        } else {
          const float4x32 r = philox_normal4(seed, a.step, static_cast<uint64_t>(g), 0u);
          z[0] = r.n0;
          z[1] = r.n1;
          z[2] = r.n2;
          z[3] = r.n3;
        }
        if (variance == Variance::kFixed) {
#pragma unroll
          for (int j = 0; j < 4; ++j) term[j] = c.s * z[j];
        } else {
          float v[4];
          load4<T, kVec>(cond_row + a.numel + e, n, v);
#pragma unroll
          for (int j = 0; j < 4; ++j) term[j] = ancestral_std(c, v[j], variance) * z[j];
        }
      }

      float out[4], net[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        out[j] = ancestral_mean<kClip>(c, x[j], pred[j]) + term[j];
        net[j] = precondition_input(c.c, out[j]);
        if (j < n) nonfinite |= nonfinite_bit(out[j]);  // lanes past the row's end hold no result
      }
      store4<float, kVec>(a.out + row + e, n, out);  // may alias x: same thread, same elements
      for (int64_t r = 0; r < a.net_rows; ++r) store4<T, kVec>(out_net + r * a.batch * a.numel + row + e, n, net);
    }
    if (a.bad) {
      // The b loop is block-uniform, so every thread of the block reaches this vote for each b;
      // one atomicMin per warp that saw a non-finite value, none otherwise.
      const unsigned any = __ballot_sync(0xFFFFFFFFu, nonfinite != 0);
      if (any && threadIdx.x % 32 == 0) atomicMin(a.bad + b, a.bad_step);
    }
  }
}

template <typename T, bool kClip>
int launch(const AncestralArgs& a, int device, cudaStream_t stream) {
  constexpr size_t kPack = 4 * sizeof(T);
  const bool vec = a.numel % 4 == 0 && aligned(a.x, 16) && aligned(a.noise, 16) && aligned(a.out, 16) &&
                   aligned(a.f, kPack) && aligned(a.out_net, kPack);
  const dim3 grid = grid_for((a.numel + 3) / 4, a.batch, device);
  if (vec) {
    ancestral_step_kernel<T, true, kClip><<<grid, kThreads, 0, stream>>>(a);
  } else {
    ancestral_step_kernel<T, false, kClip><<<grid, kThreads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_clip(const AncestralArgs& a, int device, cudaStream_t stream) {
  return a.clip ? launch<T, true>(a, device, stream) : launch<T, false>(a, device, stream);
}

}  // namespace

int ancestral_step_cuda(const AncestralArgs& a, int device, void* stream) {
  if (validate(a) != kOk) return kBadArgument;
  if (a.numel == 0) return kOk;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return static_cast<int>(guard.status());
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kFloat32:
      return launch_clip<float>(a, device, s);
    case DType::kFloat16:
      return launch_clip<half_t>(a, device, s);
    case DType::kBFloat16:
      return launch_clip<bfloat16_t>(a, device, s);
  }
  return kBadArgument;
}

}  // namespace edmfast
