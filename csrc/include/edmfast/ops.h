// Launcher interface of the fused ops: raw pointers, sizes and a stream in, a status code out
// (kOk, a negative edmfast code, or a positive cudaError_t). Plain C++ so the pybind11 layer
// compiles with g++ and no CUDA headers; the stream travels as void* (a cudaStream_t).
#pragma once

#include <cstdint>

#include "edmfast/common.h"
#include "edmfast/step.h"

namespace edmfast {

// One fused affine pass of the sampler engine (see step.h and edmfast/reference.py affine_step):
//   out[b, e]  = a x + b F + c0 h0 + c1 h1 + c2 h2 + c3 h3 + std eps
//   out_net[j B + b, e] = c_net out[b, e],   hist_out[b, e] = p x + q F
// Tensors are [rows, numel] row-major and contiguous. Optional operands are nullptr; the kernel
// reads a coefficient column only when its operand is present (step.h load_coef).
//
// Aliasing: every kernel reads all element-wise inputs of an element (x, h_k, f, noise) before it
// writes any output of that element, in the same thread, so an output may be exactly an input
// (out == x, hist_out == the h_k it replaces, out == h_k, out_net == f with as many rows). The
// outputs never share memory with each other, and nothing aliases coef, k, seeds or guidance
// (read once per launch or per sample). edmfast.ops enforces this before any launch.
struct StepArgs {
  const float* x = nullptr;                     // [batch, numel]
  const float* hist[kHistory] = {};             // h0..h3, each [batch, numel] or nullptr
  const void* f = nullptr;                      // [f_rows, numel] of dtype, f_rows = batch or 2 batch (CFG)
  const float* k = nullptr;                     // [batch] CFG-rescale factors (f_rows = 2 batch only) or nullptr
  const float* noise = nullptr;                 // [batch, numel] eps, or nullptr
  const int64_t* seeds = nullptr;               // [batch] Philox seeds (eps from the fused stream), or nullptr
  const float* coef = nullptr;                  // one row (>= the columns of the present operands), run time
  float* out = nullptr;                         // [batch, numel]
  float* hist_out = nullptr;                    // [batch, numel] or nullptr
  void* out_net = nullptr;                      // [net_rows * batch, numel] of dtype, or nullptr
  int64_t batch = 0;
  int64_t numel = 0;
  int64_t f_rows = 0;    // 0 (no f), batch, or 2 batch
  int64_t net_rows = 0;  // 0 (no out_net), 1, or 2 (CFG: the input is written for both halves)
  DType dtype = DType::kFloat32;
  float guidance_scale = 1.0f;
  const float* guidance = nullptr;  // [1] w read at run time (one graph serves any w), or nullptr
  uint32_t step = 0;      // Philox counter word c2 (edmfast/philox.py: step & 0xFFFFFFFF)
  uint32_t stage = 0;     // Philox counter word c3: the draw's index inside a step
  bool churn = false;     // a = 1, noise only: edmfast/reference.py churn
  int32_t* bad = nullptr;  // [batch] or nullptr: bad[b] = min(bad[b], bad_step) if row b of out is non-finite
  int32_t bad_step = 0;

  // The operand bits of step.h (which coefficient columns the pass reads).
  EDMFAST_HD unsigned operands() const {
    unsigned ops = (f_rows != 0 ? kOpF : 0u) | ((noise || seeds) ? kOpEps : 0u) | (out_net ? kOpNet : 0u) |
                   (hist_out ? kOpHistOut : 0u) | (churn ? kOpChurn : 0u);
    for (int j = 0; j < kHistory; ++j)
      if (hist[j]) ops |= kOpHist0 << j;
    return ops;
  }
};

// One fused ancestral pass (see ancestral.h and edmfast/reference.py ancestral_step):
//   out[b, e] = coef1 x0 + coef2 x + std z,  out_net[j B + b, e] = c out[b, e]
// f rows hold m = numel (fixed variance) or 2 numel (prediction half, then variance half) elements.
struct AncestralArgs {
  const float* x = nullptr;        // [batch, numel]
  const void* f = nullptr;         // [f_rows, m] of dtype, f_rows = batch or 2 batch (CFG)
  const float* k = nullptr;        // [batch] CFG-rescale factors (f_rows = 2 batch only) or nullptr
  const float* noise = nullptr;    // [batch, numel] z, or nullptr
  const int64_t* seeds = nullptr;  // [batch] Philox seeds (z from the fused stream), or nullptr
  const float* coef = nullptr;     // [coef_cols] ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c, cf, clip
  int64_t coef_cols = 8;           // 8 (the original row: cf = 0, clip bound 1) or >= 16 (ancestral.h)
  float* out = nullptr;            // [batch, numel], may alias x
  void* out_net = nullptr;         // [net_rows * batch, numel] of dtype, or nullptr
  int64_t batch = 0;
  int64_t numel = 0;
  int64_t f_rows = 0;    // batch or 2 batch
  int64_t net_rows = 0;  // 0 (no out_net), 1 or 2
  DType dtype = DType::kFloat32;
  int variance = 0;  // Variance of ancestral.h: 0 fixed, 1 learned, 2 learned_range
  bool clip = false;
  float guidance_scale = 1.0f;
  const float* guidance = nullptr;  // [1] w read at run time, or nullptr
  uint32_t step = 0;
  int32_t* bad = nullptr;  // [batch] or nullptr: bad[b] = min(bad[b], bad_step) if row b of out is non-finite
  int32_t bad_step = 0;

  EDMFAST_HD int64_t f_row_elems() const { return variance == 0 ? numel : 2 * numel; }
};

// CFG rescale over cond [batch, numel] and uncond [batch, numel] (both of dtype).
struct CfgArgs {
  const void* cond = nullptr;
  const void* uncond = nullptr;
  int64_t batch = 0;
  int64_t numel = 0;
  DType dtype = DType::kFloat32;
  float guidance_scale = 1.0f;
  float guidance_rescale = 0.0f;
  // [1] device values read at run time instead of the two floats above (nullptr: use the floats).
  // A value read at run time cannot be range-checked here; the Python layer checks host floats.
  const float* guidance_scale_ptr = nullptr;
  const float* guidance_rescale_ptr = nullptr;
  // Elements between consecutive rows of cond / uncond, >= numel (0: numel). The factors then
  // count the first numel elements of each row only: the prediction half of a [2B, 2C, ...]
  // model output, read in place. The CUDA workspace layout follows the row (cfg_workspace_floats
  // of row()), so one workspace serves any numel <= row().
  int64_t row_stride = 0;

  EDMFAST_HD int64_t row() const { return row_stride > 0 ? row_stride : numel; }
};

// Checks shared by both backends (sizes, flags and required pointers), so a bad call from the
// bindings fails with kBadArgument instead of reading out of bounds.
inline int validate(const StepArgs& a) {
  const bool dtype_ok = a.dtype == DType::kFloat32 || a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16;
  if (!dtype_ok || a.batch < 1 || a.numel < 0 || !a.x || !a.coef || !a.out) return kBadArgument;
  if ((a.f_rows != 0) != (a.f != nullptr) || (a.f_rows != 0 && a.f_rows != a.batch && a.f_rows != 2 * a.batch))
    return kBadArgument;
  if ((a.net_rows != 0) != (a.out_net != nullptr) || a.net_rows < 0 || a.net_rows > 2) return kBadArgument;
  if (a.k && a.f_rows != 2 * a.batch) return kBadArgument;
  if (a.noise && a.seeds) return kBadArgument;
  if (a.churn && (a.f || a.hist_out || a.hist[0] || a.hist[1] || a.hist[2] || a.hist[3])) return kBadArgument;
  return kOk;
}

inline int validate(const AncestralArgs& a) {
  const bool dtype_ok = a.dtype == DType::kFloat32 || a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16;
  if (!dtype_ok || a.batch < 1 || a.numel < 0 || !a.x || !a.f || !a.coef || !a.out) return kBadArgument;
  if (a.variance < 0 || a.variance > 2) return kBadArgument;
  if (a.coef_cols != 8 && a.coef_cols < 16) return kBadArgument;
  if (a.f_rows != a.batch && a.f_rows != 2 * a.batch) return kBadArgument;
  if ((a.net_rows != 0) != (a.out_net != nullptr) || a.net_rows < 0 || a.net_rows > 2) return kBadArgument;
  if (a.k && a.f_rows != 2 * a.batch) return kBadArgument;
  if (a.noise && a.seeds) return kBadArgument;
  return kOk;
}

inline int validate(const CfgArgs& a) {
  const bool dtype_ok = a.dtype == DType::kFloat32 || a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16;
  if (!dtype_ok || a.batch < 1 || a.numel < 0 || !a.cond || !a.uncond) return kBadArgument;
  if (!a.guidance_rescale_ptr && !(a.guidance_rescale >= 0.0f && a.guidance_rescale <= 1.0f)) return kBadArgument;
  if (a.row_stride < 0 || (a.row_stride > 0 && a.row_stride < a.numel)) return kBadArgument;
  return kOk;
}

// The CUDA reduction splits every sample into chunks of kCfgChunk elements, one block each, so
// batch 1 still fills the GPU. Workspace layout (4-byte words): 4 fp32 partial sums per chunk
// [batch][chunks][4], then one 64-bit arrival word per sample (8-byte aligned: the partials are
// a multiple of 4 words), then k [batch] (fp32, cfg_rescale only).
//
// Arrival words: (launch tag << 32) | blocks of that launch counted so far. Every launch carries
// a fresh host-side tag (a process-wide counter; under CUDA-graph capture the tag of the capture
// is replayed). A block that finds another tag in its sample's word is the first of its launch
// there: it replaces the word instead of counting on top of it. So a launch that died mid-grid
// (blocks counted, the finalizing one never ran) cannot shift the count of any later launch;
// the block that completes the count finalizes the sample and resets the count to 0 under the
// same tag, which is what a graph replay (same tag) starts from. A zero-filled workspace is a
// valid start (tags begin at 1).
constexpr int64_t kCfgChunk = 8192;
inline int64_t cfg_chunks(int64_t numel) { return numel > kCfgChunk ? (numel + kCfgChunk - 1) / kCfgChunk : 1; }
inline int64_t cfg_counters_offset(int64_t batch, int64_t row) { return batch * 4 * cfg_chunks(row); }
inline int64_t cfg_k_offset(int64_t batch, int64_t row) { return cfg_counters_offset(batch, row) + 2 * batch; }
inline int64_t cfg_workspace_floats(int64_t batch, int64_t numel) { return batch * (4 * cfg_chunks(numel) + 3); }

// Elements of one CPU call from which the Python bindings release the GIL around it (below, the
// release and re-acquire cost more than other Python threads gain; the pool's threshold too).
constexpr int64_t kCpuGilRelease = 1 << 15;

// CPU, on the calling thread plus up to num_threads - 1 sleeping helper threads (csrc/cpu/parallel.h;
// num_threads <= 0: one per hardware thread). The Python layer passes torch.get_num_threads().
int affine_step_cpu(const StepArgs& a, int num_threads);
int ancestral_step_cpu(const AncestralArgs& a, int num_threads);
int cfg_rescale_factors_cpu(const CfgArgs& a, float* k_out, int num_threads);
int cfg_rescale_cpu(const CfgArgs& a, void* out, int num_threads);

// CUDA, enqueued on `stream` of `device`; never synchronizes, never allocates. The reduction
// needs `workspace` of cfg_workspace_floats(batch, numel) floats (device memory).
int affine_step_cuda(const StepArgs& a, int device, void* stream);
int ancestral_step_cuda(const AncestralArgs& a, int device, void* stream);
int cfg_rescale_factors_cuda(const CfgArgs& a, float* k_out, float* workspace, int64_t workspace_floats,
                             int device, void* stream);
int cfg_rescale_cuda(const CfgArgs& a, void* out, float* workspace, int64_t workspace_floats, int device,
                     void* stream);

// Runtime probes of the CUDA build (defined in csrc/cuda/runtime.cu).
int cuda_device_count(int* count);  // status of cudaGetDeviceCount
const char* cuda_error_string(int status);
int cuda_runtime_version();  // CUDART_VERSION the extension was built against

}  // namespace edmfast
