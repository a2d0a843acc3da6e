// CUDA kernel of the fused affine pass (affine_step; heun_step and churn are instances of it).
//
// One thread owns 4 consecutive elements of one sample: one 16-byte access per fp32 operand
// (8 bytes per 16-bit one) when the sample size is a multiple of 4 and every pointer is aligned,
// and one Philox call for the 4 normals. Samples sit on grid.y so no thread divides a 64-bit
// index; groups of 4 run grid-stride on x. The coefficients are read from device memory at run
// time and the step index is a launch argument, so a captured graph replays with new values.
// Which operands are present is uniform over the launch (pointers in the argument struct), so
// the branches on them never diverge; an absent history buffer costs neither a load nor a register.
#include <cuda_runtime.h>

#include "edmfast/cuda_utils.h"
#include "edmfast/ops.h"
#include "edmfast/philox.h"
#include "edmfast/step.h"

namespace edmfast {
namespace {

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) affine_step_kernel(const StepArgs a) {
  const StepCoef s = load_coef(a.coef, a.operands());
  const bool cfg = a.f_rows == 2 * a.batch;
  const T* f = static_cast<const T*>(a.f);
  T* out_net = static_cast<T*>(a.out_net);
  const int64_t groups = (a.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // w from device memory when given: one captured graph serves any guidance scale.
  const float w = a.guidance ? *a.guidance : a.guidance_scale;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t row = b * a.numel;
    const float k = a.k ? a.k[b] : 1.0f;
    const uint64_t seed = a.seeds ? static_cast<uint64_t>(a.seeds[b]) : 0;
    uint32_t nonfinite = 0;  // any inf / NaN among this thread's results of sample b
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
      const int64_t e = 4 * g;
      const int64_t n = a.numel - e;  // >= 4 except in the last group of a sample
      const int64_t off = row + e;

      // Every input of the 4 elements is loaded before any output is stored (same thread, same
      // elements): an output may be exactly an input (ops.h, StepArgs).
      float x[4], pred[4] = {0, 0, 0, 0}, acc[4];
      load4<float, kVec>(a.x + off, n, x);
      if (cfg) {
        float cond[4], uncond[4];
        load4<T, kVec>(f + off, n, cond);
        load4<T, kVec>(f + a.batch * a.numel + off, n, uncond);
#pragma unroll
        for (int j = 0; j < 4; ++j) pred[j] = guided_prediction(cond[j], uncond[j], w, k);
      } else if (f) {
        load4<T, kVec>(f + off, n, pred);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] = affine_start(s, x[j], pred[j]);
#pragma unroll
      for (int h = 0; h < kHistory; ++h) {
        if (!a.hist[h]) continue;
        float v[4];
        load4<float, kVec>(a.hist[h] + off, n, v);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] = affine_history(acc[j], s.c[h], v[j]);
      }
      if (a.noise) {
        float eps[4];
        load4<float, kVec>(a.noise + off, n, eps);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] = affine_noise(acc[j], s.std, eps[j]);
      } else if (a.seeds) {
        const float4x32 z = philox_normal4(seed, a.step, static_cast<uint64_t>(g), a.stage);
        const float eps[4] = {z.n0, z.n1, z.n2, z.n3};
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] = affine_noise(acc[j], s.std, eps[j]);
      }

      float net[4], hout[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        net[j] = precondition_input(s.net, acc[j]);
        hout[j] = history_update(s, x[j], pred[j]);
        if (j < n) nonfinite |= nonfinite_bit(acc[j]);  // lanes past the row's end hold no result
      }
      store4<float, kVec>(a.out + off, n, acc);
      if (a.hist_out) store4<float, kVec>(a.hist_out + off, n, hout);
      for (int64_t r = 0; r < a.net_rows; ++r) store4<T, kVec>(out_net + r * a.batch * a.numel + off, n, net);
    }
    if (a.bad) {
      // Every thread of the block reaches this point for each b (the b loop is block-uniform), so
      // the warp vote is legal; one atomicMin per warp that saw a non-finite value, none otherwise.
      const unsigned any = __ballot_sync(0xFFFFFFFFu, nonfinite != 0);
      if (any && threadIdx.x % 32 == 0) atomicMin(a.bad + b, a.bad_step);
    }
  }
}

template <typename T>
int launch(const StepArgs& a, int device, cudaStream_t stream) {
  constexpr size_t kPack = 4 * sizeof(T);
  bool vec = a.numel % 4 == 0 && aligned(a.x, 16) && aligned(a.noise, 16) && aligned(a.out, 16) &&
             aligned(a.hist_out, 16) && aligned(a.f, kPack) && aligned(a.out_net, kPack);
  for (int h = 0; h < kHistory; ++h) vec = vec && aligned(a.hist[h], 16);
  const dim3 grid = grid_for((a.numel + 3) / 4, a.batch, device);
  if (vec) {
    affine_step_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    affine_step_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int affine_step_cuda(const StepArgs& a, int device, void* stream) {
  if (validate(a) != kOk) return kBadArgument;
  if (a.numel == 0) return kOk;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return static_cast<int>(guard.status());
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kFloat32:
      return launch<float>(a, device, s);
    case DType::kFloat16:
      return launch<half_t>(a, device, s);
    case DType::kBFloat16:
      return launch<bfloat16_t>(a, device, s);
  }
  return kBadArgument;
}

}  // namespace edmfast
