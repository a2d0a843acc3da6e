// CUDA-only helpers for the kernels: the launch geometry, a device guard, and 4-element
// vector loads/stores (one thread owns 4 consecutive elements of one sample, the 4 normals of
// one Philox call). Included by .cu files only.
#pragma once

#if !defined(__CUDACC__)
#error "edmfast/cuda_utils.h is for nvcc-compiled sources only"
#endif

#include <cuda_runtime.h>

#include <atomic>

#include "edmfast/common.h"

namespace edmfast {

constexpr int kThreads = 256;
// Grid-stride loops run with this many blocks per SM: 8 resident blocks of 256 threads fill an
// SM (2048 threads on sm_80/sm_90), twice that leaves room for tail imbalance.
constexpr int kBlocksPerSm = 16;

// Multiprocessor count of `device`, queried once per device (cudaDeviceGetAttribute is legal
// during graph capture, but there is no reason to repeat it per launch).
inline int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // zero-initialized: static storage
  if (device < 0 || device >= kMaxDevices) return 1;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      cudaGetLastError();  // clear the error so the launch check after this reports its own
      n = 1;
    }
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Makes `device` current for the launch and restores the caller's device afterwards: torch may
// have another device current than the one that holds the tensors.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) == cudaSuccess && prev_ != device) {
      status_ = cudaSetDevice(device);
    } else {
      prev_ = -1;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  cudaError_t status() const { return status_; }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
  cudaError_t status_ = cudaSuccess;
};

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 1D grid-stride grid over `work` threads' worth of items per sample, `batch` samples on y.
inline dim3 grid_for(int64_t work_per_sample, int64_t batch, int device) {
  const int64_t y = batch < 65535 ? batch : 65535;
  const int64_t target = static_cast<int64_t>(sm_count(device)) * kBlocksPerSm;
  int64_t x = ceil_div(work_per_sample, kThreads);
  const int64_t x_cap = ceil_div(target, y);
  if (x > x_cap) x = x_cap;
  if (x < 1) x = 1;
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), 1);
}

// ---- 4 consecutive elements: one 16-byte (fp32) or 8-byte (16-bit) access when kVec, else
// scalar accesses bounded by n (the tail group of a sample whose size is not a multiple of 4).

template <typename T>
struct Pack4;  // the storage of 4 elements of T
template <>
struct Pack4<float> {
  using type = float4;
};
template <>
struct Pack4<half_t> {
  using type = uint2;
};
template <>
struct Pack4<bfloat16_t> {
  using type = uint2;
};

__device__ __forceinline__ void unpack4(const float4& v, float out[4]) {
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}

template <typename T>
__device__ __forceinline__ void unpack4(const uint2& v, float out[4]) {
  out[0] = to_float(T{static_cast<uint16_t>(v.x & 0xFFFFu)});
  out[1] = to_float(T{static_cast<uint16_t>(v.x >> 16)});
  out[2] = to_float(T{static_cast<uint16_t>(v.y & 0xFFFFu)});
  out[3] = to_float(T{static_cast<uint16_t>(v.y >> 16)});
}

template <typename T, bool kVec>
__device__ __forceinline__ void load4(const T* p, int64_t n, float out[4]) {
  if constexpr (kVec) {
    const typename Pack4<T>::type v = *reinterpret_cast<const typename Pack4<T>::type*>(p);
    if constexpr (sizeof(T) == 4) {
      unpack4(v, out);
    } else {
      unpack4<T>(v, out);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = j < n ? to_float(p[j]) : 0.0f;
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void store4(T* p, int64_t n, const float v[4]) {
  if constexpr (kVec) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      const uint32_t b0 = from_float<T>(v[0]).bits, b1 = from_float<T>(v[1]).bits;
      const uint32_t b2 = from_float<T>(v[2]).bits, b3 = from_float<T>(v[3]).bits;
      *reinterpret_cast<uint2*>(p) = make_uint2(b0 | (b1 << 16), b2 | (b3 << 16));
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < n) p[j] = from_float<T>(v[j]);
  }
}

}  // namespace edmfast
