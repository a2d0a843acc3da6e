// pybind11 module edmfast._C: thin glue from Python integers (tensor.data_ptr(), sizes, the
// stream handle) to the launchers of ops.h. No torch headers, so the extension does not depend
// on any torch version's C++ ABI. Python (edmfast/native.py) validates tensors before calling;
// the launchers re-check sizes and flags, and a non-zero status becomes a RuntimeError here.
// CPU loops run with the GIL released.
//
// Two ways in per op: a function taking every operand (one call marshals them all), and a
// prepared launch (PreparedAffineStep, ...): the static operands are marshalled once into the
// launcher's argument struct, and each launch passes only what changes between launches (the
// network output, the step, and the launch context: the CPU thread count or the CUDA stream).
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

// Keyword names of the affine pass's operands (shared by the device entries and the preparers).
#define AFFINE_OPERANDS                                                                                          \
  "x"_a, "h0"_a, "h1"_a, "h2"_a, "h3"_a, "k"_a, "noise"_a, "seeds"_a, "coef"_a, "out"_a, "hist_out"_a, "out_net"_a, \
      "batch"_a, "numel"_a, "f_rows"_a, "net_rows"_a, "dtype"_a, "guidance_scale"_a, "guidance"_a, "stage"_a,      \
      "churn"_a, "bad"_a, "bad_step"_a
// The ancestral pass's operands (shared likewise).
#define ANCESTRAL_OPERANDS                                                                                         \
  "x"_a, "k"_a, "noise"_a, "seeds"_a, "coef"_a, "coef_cols"_a, "out"_a, "out_net"_a, "batch"_a, "numel"_a,         \
      "f_rows"_a, "net_rows"_a, "dtype"_a, "variance"_a, "clip"_a, "guidance_scale"_a, "guidance"_a, "bad"_a,       \
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

uint32_t low32(int64_t v) { return static_cast<uint32_t>(static_cast<uint64_t>(v) & 0xFFFFFFFFu); }

// The CPU kernels release the GIL only for work worth a helper thread: below that, the release
// and re-acquire cost more than they let other Python threads gain (the prepared launches' budget
// is ~1 us per call).
bool release_gil(int64_t batch, int64_t numel) { return batch * numel >= edmfast::kCpuGilRelease; }

StepArgs affine_args(uintptr_t x, uintptr_t h0, uintptr_t h1, uintptr_t h2, uintptr_t h3, uintptr_t k, uintptr_t noise,
                     uintptr_t seeds, uintptr_t coef, uintptr_t out, uintptr_t hist_out, uintptr_t out_net,
                     int64_t batch, int64_t numel, int64_t f_rows, int64_t net_rows, int dtype, double guidance_scale,
                     uintptr_t guidance, int64_t stage, bool churn, uintptr_t bad, int64_t bad_step) {
  StepArgs a;
  a.x = ptr<const float>(x);
  a.hist[0] = ptr<const float>(h0);
  a.hist[1] = ptr<const float>(h1);
  a.hist[2] = ptr<const float>(h2);
  a.hist[3] = ptr<const float>(h3);
  a.k = ptr<const float>(k);
  a.noise = ptr<const float>(noise);
  a.seeds = ptr<const int64_t>(seeds);
  a.coef = ptr<const float>(coef);
  a.out = ptr<float>(out);
  a.hist_out = ptr<float>(hist_out);
  a.out_net = ptr<void>(out_net);
  a.batch = batch;
  a.numel = numel;
  a.f_rows = f_rows;
  a.net_rows = net_rows;
  a.dtype = static_cast<DType>(dtype);
  a.guidance_scale = static_cast<float>(guidance_scale);
  a.guidance = ptr<const float>(guidance);
  a.stage = low32(stage);  // philox.py: stage & 0xFFFFFFFF
  a.churn = churn;
  a.bad = ptr<int32_t>(bad);
  a.bad_step = static_cast<int32_t>(bad_step);  // the Python layer checks the int32 range
  return a;
}

AncestralArgs ancestral_args(uintptr_t x, uintptr_t k, uintptr_t noise, uintptr_t seeds, uintptr_t coef,
                             int64_t coef_cols, uintptr_t out, uintptr_t out_net, int64_t batch, int64_t numel,
                             int64_t f_rows, int64_t net_rows, int dtype, int variance, bool clip,
                             double guidance_scale, uintptr_t guidance, uintptr_t bad, int64_t bad_step) {
  AncestralArgs a;
  a.x = ptr<const float>(x);
  a.k = ptr<const float>(k);
  a.noise = ptr<const float>(noise);
  a.seeds = ptr<const int64_t>(seeds);
  a.coef = ptr<const float>(coef);
  a.coef_cols = coef_cols;
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

// ---- one launch of each pass on a device kind; ctx is the CPU thread count or the CUDA stream.

int run_affine(const StepArgs& a, bool cuda, int device, int64_t ctx) {
  if (cuda) {
#ifdef EDMFAST_WITH_CUDA
    return edmfast::affine_step_cuda(a, device, ptr<void>(static_cast<uintptr_t>(ctx)));
#else
    (void)device;
    return edmfast::kNoCuda;
#endif
  }
  if (!release_gil(a.batch, a.numel)) return edmfast::affine_step_cpu(a, static_cast<int>(ctx));
  py::gil_scoped_release release;
  return edmfast::affine_step_cpu(a, static_cast<int>(ctx));
}

int run_ancestral(const AncestralArgs& a, bool cuda, int device, int64_t ctx) {
  if (cuda) {
#ifdef EDMFAST_WITH_CUDA
    return edmfast::ancestral_step_cuda(a, device, ptr<void>(static_cast<uintptr_t>(ctx)));
#else
    (void)device;
    return edmfast::kNoCuda;
#endif
  }
  if (!release_gil(a.batch, a.numel)) return edmfast::ancestral_step_cpu(a, static_cast<int>(ctx));
  py::gil_scoped_release release;
  return edmfast::ancestral_step_cpu(a, static_cast<int>(ctx));
}

int run_cfg_factors(const CfgArgs& a, float* k_out, float* workspace, int64_t workspace_floats, bool cuda, int device,
                    int64_t ctx) {
  if (cuda) {
#ifdef EDMFAST_WITH_CUDA
    return edmfast::cfg_rescale_factors_cuda(a, k_out, workspace, workspace_floats, device,
                                             ptr<void>(static_cast<uintptr_t>(ctx)));
#else
    (void)workspace;
    (void)workspace_floats;
    (void)device;
    return edmfast::kNoCuda;
#endif
  }
  if (!release_gil(a.batch, a.numel)) return edmfast::cfg_rescale_factors_cpu(a, k_out, static_cast<int>(ctx));
  py::gil_scoped_release release;
  return edmfast::cfg_rescale_factors_cpu(a, k_out, static_cast<int>(ctx));
}

// ---- prepared launches: the launcher's arguments built once (ops.prepare_*), then one call per use.

// device: -1 for the CPU kernels, else the index of the CUDA device that holds the tensors.
struct Target {
  bool cuda = false;
  int device = -1;
};

Target target(int device) { return Target{device >= 0, device}; }

class PreparedAffineStep {
 public:
  PreparedAffineStep(const StepArgs& a, Target t) : a_(a), t_(t) {}
  // f: the network output's address (0 without f), step: the Philox step (low 32 bits).
  void launch(uintptr_t f, int64_t step, int64_t ctx) const {
    StepArgs a = a_;
    a.f = ptr<const void>(f);
    a.step = low32(step);
    raise_on_error(run_affine(a, t_.cuda, t_.device, ctx), "affine_step");
  }

 private:
  StepArgs a_;
  Target t_;
};

class PreparedAncestralStep {
 public:
  PreparedAncestralStep(const AncestralArgs& a, Target t) : a_(a), t_(t) {}
  void launch(uintptr_t f, int64_t step, int64_t ctx) const {
    AncestralArgs a = a_;
    a.f = ptr<const void>(f);
    a.step = low32(step);
    raise_on_error(run_ancestral(a, t_.cuda, t_.device, ctx), "ancestral_step");
  }

 private:
  AncestralArgs a_;
  Target t_;
};

class PreparedCfgFactors {
 public:
  PreparedCfgFactors(const CfgArgs& a, float* k_out, float* workspace, int64_t workspace_floats, Target t)
      : a_(a), k_out_(k_out), workspace_(workspace), workspace_floats_(workspace_floats), t_(t) {}
  // f: the address of the [2B, row] model output (cond rows, then uncond rows).
  void launch(uintptr_t f, int64_t ctx) const {
    CfgArgs a = a_;
    const size_t elem = a.dtype == DType::kFloat32 ? 4 : 2;
    a.cond = ptr<const void>(f);
    a.uncond = f == 0 ? nullptr : ptr<const void>(f + static_cast<uintptr_t>(a.batch * a.row()) * elem);
    raise_on_error(run_cfg_factors(a, k_out_, workspace_, workspace_floats_, t_.cuda, t_.device, ctx),
                   "cfg_rescale_factors");
  }

 private:
  CfgArgs a_;
  float* k_out_;
  float* workspace_;
  int64_t workspace_floats_;
  Target t_;
};

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

  // ---- the fused affine pass; one entry per device kind, the same operands.
  const char* affine_doc =
      "out = a x + b F + sum_k c_k h_k + std eps; out_net = c_net out; hist_out = p x + q F "
      "(see edmfast/reference.py affine_step)";
  m.def(
      "affine_step",
      [](int device, int64_t ctx, uintptr_t x, uintptr_t h0, uintptr_t h1, uintptr_t h2,
         uintptr_t h3, uintptr_t f, uintptr_t k, uintptr_t noise, uintptr_t seeds, uintptr_t coef, uintptr_t out,
         uintptr_t hist_out, uintptr_t out_net, int64_t batch, int64_t numel, int64_t f_rows, int64_t net_rows,
         int dtype, double guidance_scale, uintptr_t guidance, int64_t step, int64_t stage, bool churn, uintptr_t bad,
         int64_t bad_step) {
        const Target t = target(device);
        StepArgs a = affine_args(x, h0, h1, h2, h3, k, noise, seeds, coef, out, hist_out, out_net, batch, numel, f_rows,
                                 net_rows, dtype, guidance_scale, guidance, stage, churn, bad, bad_step);
        a.f = ptr<const void>(f);
        a.step = low32(step);
        raise_on_error(run_affine(a, t.cuda, t.device, ctx), "affine_step");
      },
      affine_doc, "device"_a, "ctx"_a, "x"_a, "h0"_a, "h1"_a, "h2"_a, "h3"_a, "f"_a, "k"_a, "noise"_a,
      "seeds"_a, "coef"_a, "out"_a, "hist_out"_a, "out_net"_a, "batch"_a, "numel"_a, "f_rows"_a, "net_rows"_a,
      "dtype"_a, "guidance_scale"_a, "guidance"_a, "step"_a, "stage"_a, "churn"_a, "bad"_a, "bad_step"_a);
  py::class_<PreparedAffineStep>(m, "PreparedAffineStep", "An affine_step launch with its static operands marshalled")
      .def("launch", &PreparedAffineStep::launch, "f"_a, "step"_a, "ctx"_a,
           "Launch with the network output's address f (0: none), the Philox step and the launch context.");
  m.def(
      "prepare_affine_step",
      [](int device, uintptr_t x, uintptr_t h0, uintptr_t h1, uintptr_t h2, uintptr_t h3,
         uintptr_t k, uintptr_t noise, uintptr_t seeds, uintptr_t coef, uintptr_t out, uintptr_t hist_out,
         uintptr_t out_net, int64_t batch, int64_t numel, int64_t f_rows, int64_t net_rows, int dtype,
         double guidance_scale, uintptr_t guidance, int64_t stage, bool churn, uintptr_t bad, int64_t bad_step) {
        return PreparedAffineStep(affine_args(x, h0, h1, h2, h3, k, noise, seeds, coef, out, hist_out, out_net, batch,
                                              numel, f_rows, net_rows, dtype, guidance_scale, guidance, stage, churn,
                                              bad, bad_step),
                                  target(device));
      },
      "device"_a, AFFINE_OPERANDS);

  // ---- the fused ancestral pass (DDPM / iDDPM learned variance / DDIM eta).
  const char* anc_doc =
      "out = coef1 x0 + coef2 x + cf F + std z; out_net = c out (see edmfast/reference.py ancestral_step)";
  m.def(
      "ancestral_step",
      [](int device, int64_t ctx, uintptr_t x, uintptr_t f, uintptr_t k, uintptr_t noise,
         uintptr_t seeds, uintptr_t coef, int64_t coef_cols, uintptr_t out, uintptr_t out_net, int64_t batch,
         int64_t numel, int64_t f_rows, int64_t net_rows, int dtype, int variance, bool clip, double guidance_scale,
         uintptr_t guidance, int64_t step, uintptr_t bad, int64_t bad_step) {
        const Target t = target(device);
        AncestralArgs a = ancestral_args(x, k, noise, seeds, coef, coef_cols, out, out_net, batch, numel, f_rows,
                                         net_rows, dtype, variance, clip, guidance_scale, guidance, bad, bad_step);
        a.f = ptr<const void>(f);
        a.step = low32(step);
        raise_on_error(run_ancestral(a, t.cuda, t.device, ctx), "ancestral_step");
      },
      anc_doc, "device"_a, "ctx"_a, "x"_a, "f"_a, "k"_a, "noise"_a, "seeds"_a, "coef"_a, "coef_cols"_a,
      "out"_a, "out_net"_a, "batch"_a, "numel"_a, "f_rows"_a, "net_rows"_a, "dtype"_a, "variance"_a, "clip"_a,
      "guidance_scale"_a, "guidance"_a, "step"_a, "bad"_a, "bad_step"_a);
  py::class_<PreparedAncestralStep>(m, "PreparedAncestralStep",
                                    "An ancestral_step launch with its static operands marshalled")
      .def("launch", &PreparedAncestralStep::launch, "f"_a, "step"_a, "ctx"_a,
           "Launch with the model output's address f, the Philox step and the launch context.");
  m.def(
      "prepare_ancestral_step",
      [](int device, uintptr_t x, uintptr_t k, uintptr_t noise, uintptr_t seeds,
         uintptr_t coef, int64_t coef_cols, uintptr_t out, uintptr_t out_net, int64_t batch, int64_t numel,
         int64_t f_rows, int64_t net_rows, int dtype, int variance, bool clip, double guidance_scale,
         uintptr_t guidance, uintptr_t bad, int64_t bad_step) {
        return PreparedAncestralStep(ancestral_args(x, k, noise, seeds, coef, coef_cols, out, out_net, batch, numel,
                                                    f_rows, net_rows, dtype, variance, clip, guidance_scale, guidance,
                                                    bad, bad_step),
                                     target(device));
      },
      "device"_a, ANCESTRAL_OPERANDS);

  // ---- CFG rescale: factors k [batch] (float32), and the fused cfg * k.
  m.def("cfg_workspace_floats", &edmfast::cfg_workspace_floats,
        "float32 elements of device workspace the CUDA cfg_rescale ops need for (batch, numel).");
  m.def("cfg_counters_offset", &edmfast::cfg_counters_offset,
        "float32 offset of the 64-bit arrival words in a CUDA cfg workspace of (batch, row).");
  m.def(
      "cfg_rescale_factors",
      [](int device, int64_t ctx, uintptr_t cond, uintptr_t uncond, uintptr_t k_out,
         int64_t batch, int64_t numel, int dtype, double guidance_scale, double guidance_rescale,
         uintptr_t guidance_scale_ptr, uintptr_t guidance_rescale_ptr, int64_t row_stride, uintptr_t workspace,
         int64_t workspace_floats) {
        const Target t = target(device);
        const CfgArgs a = cfg_args(cond, uncond, batch, numel, dtype, guidance_scale, guidance_rescale,
                                   guidance_scale_ptr, guidance_rescale_ptr, row_stride);
        raise_on_error(
            run_cfg_factors(a, ptr<float>(k_out), ptr<float>(workspace), workspace_floats, t.cuda, t.device, ctx),
            "cfg_rescale_factors");
      },
      "device"_a, "ctx"_a, "cond"_a, "uncond"_a, "k_out"_a, "batch"_a, "numel"_a, "dtype"_a,
      "guidance_scale"_a, "guidance_rescale"_a, "guidance_scale_ptr"_a, "guidance_rescale_ptr"_a, "row_stride"_a,
      "workspace"_a, "workspace_floats"_a);
  py::class_<PreparedCfgFactors>(m, "PreparedCfgFactors",
                                 "A cfg_rescale_factors launch with its static operands marshalled")
      .def("launch", &PreparedCfgFactors::launch, "f"_a, "ctx"_a,
           "Launch on the model output at address f [2B, row] with the launch context.");
  m.def(
      "prepare_cfg_rescale_factors",
      [](int device, uintptr_t k_out, int64_t batch, int64_t numel, int dtype,
         double guidance_scale, double guidance_rescale, uintptr_t guidance_scale_ptr, uintptr_t guidance_rescale_ptr,
         int64_t row_stride, uintptr_t workspace, int64_t workspace_floats) {
        // cond / uncond come with each launch; 0 here would fail the launcher's check, so use a
        // placeholder that launch() always replaces.
        const CfgArgs a = cfg_args(0, 0, batch, numel, dtype, guidance_scale, guidance_rescale, guidance_scale_ptr,
                                   guidance_rescale_ptr, row_stride);
        return PreparedCfgFactors(a, ptr<float>(k_out), ptr<float>(workspace), workspace_floats,
                                  target(device));
      },
      "device"_a, "k_out"_a, "batch"_a, "numel"_a, "dtype"_a, "guidance_scale"_a, "guidance_rescale"_a,
      "guidance_scale_ptr"_a, "guidance_rescale_ptr"_a, "row_stride"_a, "workspace"_a, "workspace_floats"_a);
  m.def(
      "cfg_rescale",
      [](int device, int64_t ctx, uintptr_t cond, uintptr_t uncond, uintptr_t out,
         int64_t batch, int64_t numel, int dtype, double guidance_scale, double guidance_rescale, uintptr_t workspace,
         int64_t workspace_floats) {
        const Target t = target(device);
        const CfgArgs a = cfg_args(cond, uncond, batch, numel, dtype, guidance_scale, guidance_rescale);
        int status = edmfast::kNoCuda;
        if (t.cuda) {
#ifdef EDMFAST_WITH_CUDA
          status = edmfast::cfg_rescale_cuda(a, ptr<void>(out), ptr<float>(workspace), workspace_floats, t.device,
                                             ptr<void>(static_cast<uintptr_t>(ctx)));
#else
          (void)workspace;
          (void)workspace_floats;
#endif
        } else {
          py::gil_scoped_release release;
          status = edmfast::cfg_rescale_cpu(a, ptr<void>(out), static_cast<int>(ctx));
        }
        raise_on_error(status, "cfg_rescale");
      },
      "device"_a, "ctx"_a, "cond"_a, "uncond"_a, "out"_a, "batch"_a, "numel"_a, "dtype"_a,
      "guidance_scale"_a, "guidance_rescale"_a, "workspace"_a, "workspace_floats"_a);

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
      [](int64_t seed, int64_t step, uint64_t group, int64_t stage) {
        const edmfast::float4x32 z = edmfast::philox_normal4(static_cast<uint64_t>(seed), low32(step), group,
                                                             low32(stage));
        return py::make_tuple(z.n0, z.n1, z.n2, z.n3);
      },
      "The 4 float32 normals of group `group` of the fused stream of (seed, step, stage).", "seed"_a, "step"_a,
      "group"_a, "stage"_a = 0);
}
