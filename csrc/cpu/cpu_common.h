// Helpers of affine_step.cpp that the other CPU passes (ancestral_step.cpp) reuse, so every pass
// draws the same Philox stream with the same ISA-dispatched code.
#pragma once

#include <cstdint>

namespace edmfast {

// Most elements one fill_philox_normals call writes (its stack buffers are sized for this).
constexpr int64_t kPhiloxFillMax = 2048;

// eps[i] = normal number begin + i of the fused stream of (seed, step, stage), i < n <= kPhiloxFillMax;
// begin must be a multiple of 4 (one Philox call feeds 4 consecutive elements).
void fill_philox_normals(float* eps, uint64_t seed, uint32_t step, uint32_t stage, int64_t begin, int64_t n);

// *slot = min(*slot, step), atomically (chunks of one sample may run on different threads).
void record_bad_row(int32_t* slot, int32_t step);

}  // namespace edmfast
