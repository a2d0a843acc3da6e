// pybind11 module edmfast._C: thin glue from Python integers (tensor.data_ptr(), sizes, the
// stream handle) to the launchers of ops.h. No torch headers, so the extension does not depend
// on any torch version's C++ ABI. Python (edmfast/native.py) validates tensors before calling;
// the launchers re-check sizes and flags, and a non-zero status becomes a RuntimeError here.
// CPU loops run with the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "edmfast/ops.h"
#include "edmfast/philox.h"

#ifndef EDMFAST_VERSION
#define EDMFAST_VERSION "unknown"
#endif

namespace py = pybind11;
using namespace pybind11::literals;

// Keyword names of the fused-pass bindings (the leading arguments shared by both devices); the
// trailing guidance / bad / bad_step have defaults so callers from before they existed still work.
#define STEP_ARGS                                                                                               \
  "x_hat"_a, "x_prime"_a, "f"_a, "k"_a, "noise"_a, "seeds"_a, "coef"_a, "out"_a, "out_net"_a, "batch"_a, "numel"_a, \
      "f_rows"_a, "net_rows"_a, "dtype"_a, "guidance_scale"_a, "step"_a, "churn"_a
// The ancestral pass's leading arguments (shared by both devices).
#define ANCESTRAL_ARGS                                                                                             \
  "x"_a, "f"_a, "k"_a, "noise"_a, "seeds"_a, "coef"_a, "out"_a, "out_net"_a, "batch"_a, "numel"_a, "f_rows"_a, \
      "net_rows"_a, "dtype"_a, "variance"_a, "clip"_a, "guidance_scale"_a, "guidance"_a, "step"_a, "bad"_a,        \
      "bad_step"_a
using edmfast::AncestralArgs;
using edmfast::CfgArgs;
using edmfast::DType;
using edmfast::StepArgs;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

const char* status_string(int status) {
#ifdef EDMFAST_WITH_CUDA
  return edmfast::cuda_error_string(status);
#else
  return status == edmfast::kBadArgument ? "invalid argument (rejected by the edmfast launcher before any launch)"
                                         : "edmfast._C was built without CUDA";
#endif
}

void raise_on_error(int status, const char* op) {
  if (status != edmfast::kOk) throw std::runtime_error(std::string("edmfast.") + op + ": " + status_string(status));
}

StepArgs step_args(uintptr_t x_hat, uintptr_t x_prime, uintptr_t f, uintptr_t k, uintptr_t noise, uintptr_t seeds,
                   uintptr_t coef, uintptr_t out, uintptr_t out_net, int64_t batch, int64_t numel, int64_t f_rows,
                   int64_t net_rows, int dtype, double guidance_scale, int64_t step, bool churn, uintptr_t guidance,
                   uintptr_t bad, int64_t bad_step) {
  StepArgs a;
  a.x_hat = ptr<const float>(x_hat);
  a.x_prime = ptr<const float>(x_prime);
  a.f = ptr<const void>(f);
  a.k = ptr<const float>(k);
  a.noise = ptr<const float>(noise);
  a.seeds = ptr<const int64_t>(seeds);
  a.coef = ptr<const float>(coef);
  a.out = ptr<float>(out);
  a.out_net = ptr<void>(out_net);
  a.batch = batch;
  a.numel = numel;
  a.f_rows = f_rows;
  a.net_rows = net_rows;
  a.dtype = static_cast<DType>(dtype);
  a.guidance_scale = static_cast<float>(guidance_scale);
  a.step = static_cast<uint32_t>(static_cast<uint64_t>(step) & 0xFFFFFFFFu);  // philox.py: step & 0xFFFFFFFF
  a.churn = churn;
  a.guidance = ptr<const float>(guidance);
  a.bad = ptr<int32_t>(bad);
  a.bad_step = static_cast<int32_t>(bad_step);  // the Python layer checks the int32 range
  return a;
}

AncestralArgs ancestral_args(uintptr_t x, uintptr_t f, uintptr_t k, uintptr_t noise, uintptr_t seeds, uintptr_t coef,
                             uintptr_t out, uintptr_t out_net, int64_t batch, int64_t numel, int64_t f_rows,
                             int64_t net_rows, int dtype, int variance, bool clip, double guidance_scale,
                             uintptr_t guidance, int64_t step, uintptr_t bad, int64_t bad_step) {
  AncestralArgs a;
  a.x = ptr<const float>(x);
  a.f = ptr<const void>(f);
  a.k = ptr<const float>(k);
  a.noise = ptr<const float>(noise);
  a.seeds = ptr<const int64_t>(seeds);
  a.coef = ptr<const float>(coef);
  a.out = ptr<float>(out);
  a.out_net = ptr<void>(out_net);
  a.batch = batch;
  a.numel = numel;
  a.f_rows = f_rows;
  a.net_rows = net_rows;
  a.dtype = static_cast<DType>(dtype);
  a.variance = variance;
  a.clip = clip;
  a.guidance_scale = static_cast<float>(guidance_scale);
  a.guidance = ptr<const float>(guidance);
  a.step = static_cast<uint32_t>(static_cast<uint64_t>(step) & 0xFFFFFFFFu);  // philox.py: step & 0xFFFFFFFF
  a.bad = ptr<int32_t>(bad);
  a.bad_step = static_cast<int32_t>(bad_step);
  return a;
}

CfgArgs cfg_args(uintptr_t cond, uintptr_t uncond, int64_t batch, int64_t numel, int dtype, double guidance_scale,
                 double guidance_rescale, uintptr_t guidance_scale_ptr = 0, uintptr_t guidance_rescale_ptr = 0,
                 int64_t row_stride = 0) {
  CfgArgs a;
  a.row_stride = row_stride;
  a.cond = ptr<const void>(cond);
  a.uncond = ptr<const void>(uncond);
  a.batch = batch;
  a.numel = numel;
  a.dtype = static_cast<DType>(dtype);
  a.guidance_scale = static_cast<float>(guidance_scale);
  a.guidance_rescale = static_cast<float>(guidance_rescale);
  a.guidance_scale_ptr = ptr<const float>(guidance_scale_ptr);
  a.guidance_rescale_ptr = ptr<const float>(guidance_rescale_ptr);
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "edmfast native kernels (CPU C++ and CUDA C++); see edmfast/native.py";

  m.def("version", [] { return std::string(EDMFAST_VERSION); }, "Package version the extension was built from.");
  m.def(
      "has_cuda",
      [] {
#ifdef EDMFAST_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled in.");
  m.def(
      "has_openmp",
      [] {
#ifdef _OPENMP
        return true;
#else
        return false;
#endif
      },
      "Whether the CPU loops were built with OpenMP.");
  m.def(
      "cuda_runtime_version",
      [] {
#ifdef EDMFAST_WITH_CUDA
        return edmfast::cuda_runtime_version();
#else
        return 0;
#endif
      },
      "CUDART_VERSION the extension was built against (0 without CUDA).");
  m.def(
      "cuda_device_count",
      [] {
        int count = 0;
        int status = edmfast::kNoCuda;
#ifdef EDMFAST_WITH_CUDA
        status = edmfast::cuda_device_count(&count);
#endif
        return py::make_tuple(count, status == edmfast::kOk ? std::string() : std::string(status_string(status)));
      },
      "(devices visible to the linked CUDA runtime, error message or '').");

  // ---- fused sampler pass; the same signature for both devices (stream and device unused on CPU).
  const char* step_doc = "out = p x_hat + q x_prime + r F + std eps; out_net = c out (see edmfast/reference.py)";
  m.def(
      "heun_step_cpu",
      [](uintptr_t x_hat, uintptr_t x_prime, uintptr_t f, uintptr_t k, uintptr_t noise, uintptr_t seeds, uintptr_t coef,
         uintptr_t out, uintptr_t out_net, int64_t batch, int64_t numel, int64_t f_rows, int64_t net_rows, int dtype,
         double guidance_scale, int64_t step, bool churn, int num_threads, uintptr_t guidance, uintptr_t bad,
         int64_t bad_step) {
        const StepArgs a = step_args(x_hat, x_prime, f, k, noise, seeds, coef, out, out_net, batch, numel, f_rows,
                                     net_rows, dtype, guidance_scale, step, churn, guidance, bad, bad_step);
        int status;
        {
          py::gil_scoped_release release;
          status = edmfast::heun_step_cpu(a, num_threads);
        }
        raise_on_error(status, "heun_step");
      },
      step_doc, STEP_ARGS, "num_threads"_a, "guidance"_a = 0, "bad"_a = 0, "bad_step"_a = 0);
#ifdef EDMFAST_WITH_CUDA
  m.def(
      "heun_step_cuda",
      [](uintptr_t x_hat, uintptr_t x_prime, uintptr_t f, uintptr_t k, uintptr_t noise, uintptr_t seeds, uintptr_t coef,
         uintptr_t out, uintptr_t out_net, int64_t batch, int64_t numel, int64_t f_rows, int64_t net_rows, int dtype,
         double guidance_scale, int64_t step, bool churn, int device, uintptr_t stream, uintptr_t guidance,
         uintptr_t bad, int64_t bad_step) {
        const StepArgs a = step_args(x_hat, x_prime, f, k, noise, seeds, coef, out, out_net, batch, numel, f_rows,
                                     net_rows, dtype, guidance_scale, step, churn, guidance, bad, bad_step);
        raise_on_error(edmfast::heun_step_cuda(a, device, ptr<void>(stream)), "heun_step");
      },
      step_doc, STEP_ARGS, "device"_a, "stream"_a, "guidance"_a = 0, "bad"_a = 0, "bad_step"_a = 0);
#endif

  // ---- fused ancestral pass (DDPM / iDDPM learned variance / DDIM eta).
  const char* anc_doc = "out = coef1 x0 + coef2 x + std z; out_net = c out (see edmfast/reference.py ancestral_step)";
  m.def(
      "ancestral_step_cpu",
      [](uintptr_t x, uintptr_t f, uintptr_t k, uintptr_t noise, uintptr_t seeds, uintptr_t coef, uintptr_t out,
         uintptr_t out_net, int64_t batch, int64_t numel, int64_t f_rows, int64_t net_rows, int dtype, int variance,
         bool clip, double guidance_scale, uintptr_t guidance, int64_t step, uintptr_t bad, int64_t bad_step,
         int num_threads) {
        const AncestralArgs a = ancestral_args(x, f, k, noise, seeds, coef, out, out_net, batch, numel, f_rows,
                                               net_rows, dtype, variance, clip, guidance_scale, guidance, step, bad,
                                               bad_step);
        int status;
        {
          py::gil_scoped_release release;
          status = edmfast::ancestral_step_cpu(a, num_threads);
        }
        raise_on_error(status, "ancestral_step");
      },
      anc_doc, ANCESTRAL_ARGS, "num_threads"_a);
#ifdef EDMFAST_WITH_CUDA
  m.def(
      "ancestral_step_cuda",
      [](uintptr_t x, uintptr_t f, uintptr_t k, uintptr_t noise, uintptr_t seeds, uintptr_t coef, uintptr_t out,
         uintptr_t out_net, int64_t batch, int64_t numel, int64_t f_rows, int64_t net_rows, int dtype, int variance,
         bool clip, double guidance_scale, uintptr_t guidance, int64_t step, uintptr_t bad, int64_t bad_step,
         int device, uintptr_t stream) {
        const AncestralArgs a = ancestral_args(x, f, k, noise, seeds, coef, out, out_net, batch, numel, f_rows,
                                               net_rows, dtype, variance, clip, guidance_scale, guidance, step, bad,
                                               bad_step);
        raise_on_error(edmfast::ancestral_step_cuda(a, device, ptr<void>(stream)), "ancestral_step");
      },
      anc_doc, ANCESTRAL_ARGS, "device"_a, "stream"_a);
#endif

  // ---- CFG rescale: factors k [batch] (float32), and the fused cfg * k.
  m.def("cfg_workspace_floats", &edmfast::cfg_workspace_floats,
        "float32 elements of device workspace the CUDA cfg_rescale ops need for (batch, numel).");
  m.def(
      "cfg_rescale_factors_cpu",
      [](uintptr_t cond, uintptr_t uncond, uintptr_t k_out, int64_t batch, int64_t numel, int dtype,
         double guidance_scale, double guidance_rescale, int num_threads, uintptr_t guidance_scale_ptr,
         uintptr_t guidance_rescale_ptr, int64_t row_stride) {
        const CfgArgs a = cfg_args(cond, uncond, batch, numel, dtype, guidance_scale, guidance_rescale,
                                   guidance_scale_ptr, guidance_rescale_ptr, row_stride);
        int status;
        {
          py::gil_scoped_release release;
          status = edmfast::cfg_rescale_factors_cpu(a, ptr<float>(k_out), num_threads);
        }
        raise_on_error(status, "cfg_rescale_factors");
      },
      "cond"_a, "uncond"_a, "k_out"_a, "batch"_a, "numel"_a, "dtype"_a, "guidance_scale"_a, "guidance_rescale"_a,
      "num_threads"_a, "guidance_scale_ptr"_a = 0, "guidance_rescale_ptr"_a = 0, "row_stride"_a = 0);
  m.def(
      "cfg_rescale_cpu",
      [](uintptr_t cond, uintptr_t uncond, uintptr_t out, int64_t batch, int64_t numel, int dtype,
         double guidance_scale, double guidance_rescale, int num_threads) {
        const CfgArgs a = cfg_args(cond, uncond, batch, numel, dtype, guidance_scale, guidance_rescale);
        int status;
        {
          py::gil_scoped_release release;
          status = edmfast::cfg_rescale_cpu(a, ptr<void>(out), num_threads);
        }
        raise_on_error(status, "cfg_rescale");
      });
#ifdef EDMFAST_WITH_CUDA
  m.def("cfg_rescale_factors_cuda", [](uintptr_t cond, uintptr_t uncond, uintptr_t k_out, int64_t batch,
                                       int64_t numel, int dtype, double guidance_scale, double guidance_rescale,
                                       uintptr_t workspace, int64_t workspace_floats, int device, uintptr_t stream,
                                       uintptr_t guidance_scale_ptr, uintptr_t guidance_rescale_ptr,
                                       int64_t row_stride) {
    const CfgArgs a = cfg_args(cond, uncond, batch, numel, dtype, guidance_scale, guidance_rescale,
                               guidance_scale_ptr, guidance_rescale_ptr, row_stride);
    raise_on_error(edmfast::cfg_rescale_factors_cuda(a, ptr<float>(k_out), ptr<float>(workspace), workspace_floats,
                                                     device, ptr<void>(stream)),
                   "cfg_rescale_factors");
  },
  "cond"_a, "uncond"_a, "k_out"_a, "batch"_a, "numel"_a, "dtype"_a, "guidance_scale"_a, "guidance_rescale"_a,
  "workspace"_a, "workspace_floats"_a, "device"_a, "stream"_a, "guidance_scale_ptr"_a = 0,
  "guidance_rescale_ptr"_a = 0, "row_stride"_a = 0);
  m.def("cfg_rescale_cuda", [](uintptr_t cond, uintptr_t uncond, uintptr_t out, int64_t batch, int64_t numel,
                               int dtype, double guidance_scale, double guidance_rescale, uintptr_t workspace,
                               int64_t workspace_floats, int device, uintptr_t stream) {
    const CfgArgs a = cfg_args(cond, uncond, batch, numel, dtype, guidance_scale, guidance_rescale);
    raise_on_error(edmfast::cfg_rescale_cuda(a, ptr<void>(out), ptr<float>(workspace), workspace_floats, device,
                                             ptr<void>(stream)),
                   "cfg_rescale");
  });
#endif

  // ---- Philox probes: the header's words and normals, for the known-answer and stream tests.
  m.def(
      "philox4x32",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const edmfast::uint4x32 x = edmfast::philox4x32(edmfast::uint4x32{c0, c1, c2, c3}, k0, k1);
        return py::make_tuple(x.x0, x.x1, x.x2, x.x3);
      },
      "Philox4x32-10 of counter (c0..c3) and key (k0, k1), as computed by csrc/include/edmfast/philox.h.");
  m.def(
      "philox_normal4",
      [](int64_t seed, int64_t step, uint64_t group) {
        const edmfast::float4x32 z = edmfast::philox_normal4(
            static_cast<uint64_t>(seed), static_cast<uint32_t>(static_cast<uint64_t>(step) & 0xFFFFFFFFu), group);
        return py::make_tuple(z.n0, z.n1, z.n2, z.n3);
      },
      "The 4 float32 normals of group `group` of the fused stream of (seed, step).");
}
