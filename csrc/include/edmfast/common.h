// Portable basics shared by the CPU loops (g++) and the CUDA kernels (nvcc): the host/device
// function macro, the 16-bit storage types with their float conversions, and status codes.
// No torch headers: kernels see raw pointers and sizes only, so one build serves every torch.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define EDMFAST_HD __host__ __device__ __forceinline__
#else
#define EDMFAST_HD inline
#endif

namespace edmfast {

// Status codes returned by every launcher. 0 is success, negative values are argument errors
// caught by the C++ layer, positive values are cudaError_t codes from the CUDA runtime.
constexpr int kOk = 0;
constexpr int kBadArgument = -1;
constexpr int kNoCuda = -2;  // a CUDA entry point was called in a build without CUDA

// Network-side dtype of f / out_net (state tensors are always float32). The values are the
// codes the Python glue passes through the bindings.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// IEEE binary16 and bfloat16 as plain 16-bit storage: the same layout on host and device.
struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

EDMFAST_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

EDMFAST_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

EDMFAST_HD float to_float(float x) { return x; }

EDMFAST_HD float to_float(half_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  // Branch-free binary16 -> binary32 (M. Maratyszcza's FP16 library, MIT): normal numbers by
  // an exponent re-bias and a power-of-two scale, subnormals through a magic-number subtract;
  // exact for every input (inf and NaN included), and the select keeps the loop vectorizable.
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_as_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_as_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = two_w < (1u << 27) ? float_as_bits(denormalized) : float_as_bits(normalized);
  return bits_as_float(sign | result);
#endif
}

EDMFAST_HD float to_float(bfloat16_t b) { return bits_as_float(static_cast<uint32_t>(b.bits) << 16); }

template <typename T>
EDMFAST_HD T from_float(float x);

template <>
EDMFAST_HD float from_float<float>(float x) {
  return x;
}

template <>
EDMFAST_HD half_t from_float<half_t>(float x) {
#if defined(__CUDA_ARCH__)
  return half_t{__half_as_ushort(__float2half_rn(x))};
#else
  // binary32 -> binary16 with round-to-nearest-even done by the FPU itself: scaling by 2^112
  // then 2^-110 (both exact for finite results, overflow becomes inf) and adding a bias that
  // aligns the 11 kept mantissa bits with float32's rounding position; NaN stays NaN.
  const float base_scaled = (__builtin_fabsf(x) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_as_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  const uint32_t bits = float_as_bits(bits_as_float((bias >> 1) + 0x07800000u) + base_scaled);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return half_t{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
#endif
}

template <>
EDMFAST_HD bfloat16_t from_float<bfloat16_t>(float x) {
#if defined(__CUDA_ARCH__)
  return bfloat16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  // Keep the top 16 bits, rounding to nearest even on the 16 dropped ones; NaN stays a quiet NaN
  // (the rounding add could otherwise carry a NaN payload into infinity).
  const uint32_t u = float_as_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bfloat16_t{static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x0040u) : rounded)};
#endif
}

}  // namespace edmfast
