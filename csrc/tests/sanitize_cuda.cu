// Standalone driver of the CUDA kernels for compute-sanitizer (memcheck, racecheck, initcheck,
// synccheck): calls affine_step_cuda, ancestral_step_cuda, cfg_rescale_factors_cuda and cfg_rescale_cuda of
// edmfast/ops.h on a created non-blocking stream over the size / dtype / feature matrix of
// sanitize_cpu.cpp. Every device buffer is its own cudaMalloc of exactly its size (a 0-element
// buffer gets 1 byte, so any access to it is still out of bounds); "offset" runs place every
// buffer one element into its allocation (still ending at the allocation's end), which turns off
// the 16-byte vector path of sizes that are a multiple of 4. Outputs are NaN-poisoned before each
// call, copied back and compared element by element with the double formula (sanitize_common.h).
//
//   build + run: csrc/tests/sanitize.sh cuda   (see there)
//   usage:       sanitize_cuda [--quick]       (--quick: the reduced set for racecheck / initcheck)
// Exit status 0 when every case passed, 1 on a failed case or CUDA error, 3 without a device.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "edmfast/ops.h"
#include "sanitize_common.h"

using namespace sanitize;
using edmfast::AncestralArgs;
using edmfast::CfgArgs;
using edmfast::kBadArgument;
using edmfast::kOk;
using edmfast::StepArgs;

namespace {

#define CUDA_CHECK(expr)                                                                                      \
  do {                                                                                                        \
    const cudaError_t err_ = (expr);                                                                          \
    if (err_ != cudaSuccess) {                                                                                \
      std::fprintf(stderr, "CUDA error %s (%d) at %s:%d: %s\n", cudaGetErrorString(err_), static_cast<int>(err_), \
                   __FILE__, __LINE__, #expr);                                                                \
      std::exit(1);                                                                                           \
    }                                                                                                         \
  } while (0)

cudaStream_t g_stream = nullptr;
int g_device = 0;
Report report;

// One cudaMalloc of exactly `offset + bytes` bytes (at least 1); ptr() is `offset` bytes in, so
// the buffer always ends at the end of its allocation.
class DevBuf {
 public:
  DevBuf(size_t bytes, size_t offset = 0) : bytes_(bytes), offset_(offset) {
    CUDA_CHECK(cudaMalloc(&base_, offset + bytes > 0 ? offset + bytes : 1));
  }
  ~DevBuf() { cudaFree(base_); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  template <typename T = void>
  T* as() const {
    return reinterpret_cast<T*>(static_cast<char*>(base_) + offset_);
  }
  void upload(const void* src) const {
    if (bytes_) CUDA_CHECK(cudaMemcpyAsync(as(), src, bytes_, cudaMemcpyHostToDevice, g_stream));
  }
  void upload(const void* src, size_t bytes) const {
    if (bytes) CUDA_CHECK(cudaMemcpyAsync(as(), src, bytes, cudaMemcpyHostToDevice, g_stream));
  }
  void download(void* dst, size_t bytes) const {
    if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, as(), bytes, cudaMemcpyDeviceToHost, g_stream));
  }

 private:
  void* base_ = nullptr;
  size_t bytes_, offset_;
};

void sync_or_die(const std::string& where) {
  const cudaError_t err = cudaStreamSynchronize(g_stream);
  const cudaError_t last = cudaGetLastError();
  if (err != cudaSuccess || last != cudaSuccess) {
    std::fprintf(stderr, "FAIL %s: CUDA error %s / %s (sticky: stopping)\n", where.c_str(), cudaGetErrorString(err),
                 cudaGetErrorString(last));
    std::exit(1);
  }
}

std::vector<unsigned char> nan_bytes(DType d, size_t n) {
  std::vector<unsigned char> v(n * dtype_size(d));
  poison(d, v.data(), static_cast<int64_t>(n));
  return v;
}

// The affine pass over the feature combinations of one (B, M, dtype, offset): every stride-th one.
// Each case's coefficient row is its own allocation of exactly the floats it may read.
void run_step_size(int64_t B, int64_t M, DType dtype, bool offset, int stride) {
  const StepInputs in = make_step_inputs(B, M, dtype, static_cast<uint64_t>(B * 1000003 + M * 31 + int(dtype)));
  const size_t n = static_cast<size_t>(B * M), es = dtype_size(dtype);
  const size_t o4 = offset ? 4 : 0, oe = offset ? es : 0;
  DevBuf x(n * 4, o4), noise(n * 4, o4), f1(n * es, oe), f2(2 * n * es, oe), k(static_cast<size_t>(B) * 4, o4),
      seeds(static_cast<size_t>(B) * 8, offset ? 8 : 0), out(n * 4, o4), hist_out(n * 4, o4), aliased(n * 4, o4),
      net1(n * es, oe), net2(2 * n * es, oe), w(4, o4), bad(static_cast<size_t>(B) * 4, o4);
  DevBuf h0(n * 4, o4), h1(n * 4, o4), h2(n * 4, o4), h3(n * 4, o4);
  const DevBuf* h[edmfast::kHistory] = {&h0, &h1, &h2, &h3};
  w.upload(&in.w);
  const std::vector<int32_t> bad_none(static_cast<size_t>(B), kBadNone);
  std::vector<int32_t> host_bad(static_cast<size_t>(B));
  x.upload(in.x.data());
  for (int j = 0; j < edmfast::kHistory; ++j) h[j]->upload(in.h[j].data());
  noise.upload(in.noise.data());
  f1.upload(in.f1.data());
  f2.upload(in.f2.data());
  k.upload(in.k.data());
  seeds.upload(in.seeds.data());
  const std::vector<unsigned char> nan_out = nan_bytes(DType::kFloat32, n), nan_net = nan_bytes(dtype, 2 * n);
  std::vector<float> host_out(n), host_hist_out(n);
  std::vector<unsigned char> host_net(2 * n * es);

  const std::vector<StepCase> cases = step_feature_cases(B, M, dtype);
  for (size_t ci = 0; ci < cases.size(); ci += static_cast<size_t>(stride)) {
    const StepCase& c = cases[ci];
    const std::string where = c.name() + (offset ? " offset" : "");
    ++report.cases;
    const std::vector<float> coef_host = step_coef(c);
    DevBuf coef(coef_host.size() * 4, o4);
    coef.upload(coef_host.data());
    StepArgs a = step_args(c, in);
    a.x = x.as<float>();
    for (int j = 0; j < edmfast::kHistory; ++j) a.hist[j] = c.has(j) ? h[j]->as<float>() : nullptr;
    const DevBuf* out_buf = &out;
    const DevBuf* hist_out_buf = c.hist_out ? &hist_out : nullptr;
    out.upload(nan_out.data());
    if (hist_out_buf) hist_out.upload(nan_out.data());
    if (const std::vector<float>* src = alias_source(c, in)) {
      aliased.upload(src->data());  // the shared buffer starts as the input it replaces
      if (c.alias == Alias::kOutX) a.x = aliased.as<float>(), out_buf = &aliased;
      if (c.alias == Alias::kOutH) a.hist[c.last_hist()] = aliased.as<float>(), out_buf = &aliased;
      if (c.alias == Alias::kHistOutH) a.hist[c.first_hist()] = aliased.as<float>(), hist_out_buf = &aliased;
    }
    const DevBuf* net_buf = c.net_rows == 1 ? &net1 : (c.net_rows == 2 ? &net2 : nullptr);
    if (net_buf) net_buf->upload(nan_net.data(), n * es * static_cast<size_t>(c.net_rows));
    a.f = c.f == FMode::kNone ? nullptr : (c.f == FMode::kB ? f1.as() : f2.as());
    a.k = c.f == FMode::kCfgK ? k.as<float>() : nullptr;
    a.noise = c.eps == EpsMode::kNoise ? noise.as<float>() : nullptr;
    a.seeds = c.eps == EpsMode::kSeeds ? seeds.as<int64_t>() : nullptr;
    a.coef = coef.as<float>();
    a.out = out_buf->as<float>();
    a.hist_out = hist_out_buf ? hist_out_buf->as<float>() : nullptr;
    a.out_net = net_buf ? net_buf->as() : nullptr;
    if (c.w_ptr) {
      a.guidance = w.as<float>();
      a.guidance_scale = NAN;  // the host value a case reading w from memory must ignore
    }
    if (c.bad) {
      bad.upload(bad_none.data());
      a.bad = bad.as<int32_t>();
      a.bad_step = kBadFirst;
    }
    const int rc = edmfast::affine_step_cuda(a, g_device, g_stream);
    if (rc != kOk) {
      report.fail(where + ": status " + std::to_string(rc) + " (" + edmfast::cuda_error_string(rc) + ")");
      sync_or_die(where);
      continue;
    }
    out_buf->download(host_out.data(), n * 4);
    if (hist_out_buf) hist_out_buf->download(host_hist_out.data(), n * 4);
    if (net_buf) net_buf->download(host_net.data(), n * es * static_cast<size_t>(c.net_rows));
    if (c.bad) bad.download(host_bad.data(), static_cast<size_t>(B) * 4);
    sync_or_die(where);
    std::string err = check_step(c, in, host_out.data(), host_hist_out.data(), host_net.data());
    if (err.empty() && c.bad) err = check_bad(host_bad.data(), B, M, true);
    if (!err.empty()) report.fail(where + ": " + err);
  }
}

// The ancestral pass over the feature combinations of one (B, M, dtype, offset): every stride-th one.
void run_anc_size(int64_t B, int64_t M, DType dtype, bool offset, int stride) {
  const AncInputs in = make_anc_inputs(B, M, dtype, static_cast<uint64_t>(B * 7741 + M * 13 + int(dtype)));
  const size_t n = static_cast<size_t>(B * M), es = dtype_size(dtype);
  const size_t o4 = offset ? 4 : 0, oe = offset ? es : 0;
  DevBuf x(n * 4, o4), noise(n * 4, o4), k(static_cast<size_t>(B) * 4, o4),
      seeds(static_cast<size_t>(B) * 8, offset ? 8 : 0), out(n * 4, o4), aliased(n * 4, o4), net1(n * es, oe),
      net2(2 * n * es, oe), w(4, o4), bad(static_cast<size_t>(B) * 4, o4);
  DevBuf f_fixed1(in.f_fixed1.size(), oe), f_fixed2(in.f_fixed2.size(), oe), f_learn1(in.f_learn1.size(), oe),
      f_learn2(in.f_learn2.size(), oe);
  f_fixed1.upload(in.f_fixed1.data());
  f_fixed2.upload(in.f_fixed2.data());
  f_learn1.upload(in.f_learn1.data());
  f_learn2.upload(in.f_learn2.data());
  w.upload(&in.w);
  x.upload(in.x.data());
  noise.upload(in.noise.data());
  k.upload(in.k.data());
  seeds.upload(in.seeds.data());
  const std::vector<int32_t> bad_none(static_cast<size_t>(B), kBadNone);
  std::vector<int32_t> host_bad(static_cast<size_t>(B));
  const std::vector<unsigned char> nan_out = nan_bytes(DType::kFloat32, n), nan_net = nan_bytes(dtype, 2 * n);
  std::vector<float> host_out(n);
  std::vector<unsigned char> host_net(2 * n * es);

  const std::vector<AncCase> cases = anc_feature_cases(B, M, dtype);
  for (size_t ci = 0; ci < cases.size(); ci += static_cast<size_t>(stride)) {
    const AncCase& c = cases[ci];
    const std::string where = c.name() + (offset ? " offset" : "");
    ++report.cases;
    const std::vector<float> coef_host = anc_coef(c);
    DevBuf coef(coef_host.size() * 4, o4);  // exactly the row: a read past an 8-float row is out of bounds
    coef.upload(coef_host.data());
    const DevBuf& out_buf = c.alias ? aliased : out;
    out_buf.upload(c.alias ? static_cast<const void*>(in.x.data()) : nan_out.data());
    const DevBuf* net_buf = c.net_rows == 1 ? &net1 : (c.net_rows == 2 ? &net2 : nullptr);
    if (net_buf) net_buf->upload(nan_net.data(), n * es * static_cast<size_t>(c.net_rows));

    AncestralArgs a;
    a.x = c.alias ? aliased.as<float>() : x.as<float>();
    a.f = c.variance == 0 ? (c.f == FMode::kB ? f_fixed1.as() : f_fixed2.as())
                          : (c.f == FMode::kB ? f_learn1.as() : f_learn2.as());
    a.k = c.f == FMode::kCfgK ? k.as<float>() : nullptr;
    a.noise = c.eps == EpsMode::kNoise ? noise.as<float>() : nullptr;
    a.seeds = c.eps == EpsMode::kSeeds ? seeds.as<int64_t>() : nullptr;
    a.coef = coef.as<float>();
    a.coef_cols = c.coef_floats();
    a.out = out_buf.as<float>();
    a.out_net = net_buf ? net_buf->as() : nullptr;
    a.batch = B;
    a.numel = M;
    a.f_rows = c.f_rows();
    a.net_rows = c.net_rows;
    a.dtype = dtype;
    a.variance = c.variance;
    a.clip = c.clip;
    a.guidance_scale = in.w;
    a.step = in.step;
    if (c.w_ptr) {
      a.guidance = w.as<float>();
      a.guidance_scale = NAN;  // the host value a case reading w from memory must ignore
    }
    if (c.bad) {
      bad.upload(bad_none.data());
      a.bad = bad.as<int32_t>();
      a.bad_step = kBadFirst;
    }
    const int rc = edmfast::ancestral_step_cuda(a, g_device, g_stream);
    if (rc != kOk) {
      report.fail(where + ": status " + std::to_string(rc) + " (" + edmfast::cuda_error_string(rc) + ")");
      sync_or_die(where);
      continue;
    }
    out_buf.download(host_out.data(), n * 4);
    if (net_buf) net_buf->download(host_net.data(), n * es * static_cast<size_t>(c.net_rows));
    if (c.bad) bad.download(host_bad.data(), static_cast<size_t>(B) * 4);
    sync_or_die(where);
    std::string err = check_anc(c, in, host_out.data(), host_net.data());
    if (err.empty() && c.bad) err = check_bad(host_bad.data(), B, M, true);
    if (!err.empty()) report.fail(where + ": " + err);
  }
}

// Non-finite rows are recorded in bad (atomicMin of the step), finite rows never.
void run_nonfinite(int64_t B, int64_t M) {
  const size_t n = static_cast<size_t>(B * M);
  std::vector<float> host(n, 0.5f);
  plant_nonfinite(host, B, M);
  DevBuf x(n * 4), coef(5 * 4), out(n * 4), net(n * 4), bad(static_cast<size_t>(B) * 4);
  x.upload(host.data());
  const float coef_host[5] = {0.9f, NAN, NAN, NAN, 0.25f};
  coef.upload(coef_host);
  const std::vector<int32_t> bad_none(static_cast<size_t>(B), kBadNone);
  std::vector<int32_t> host_bad(static_cast<size_t>(B));
  bad.upload(bad_none.data());
  StepArgs a;
  a.x = x.as<float>();
  a.coef = coef.as<float>();
  a.out = out.as<float>();
  a.out_net = net.as();
  a.net_rows = 1;
  a.batch = B;
  a.numel = M;
  a.bad = bad.as<int32_t>();
  const std::string where = "nonfinite B=" + std::to_string(B) + " M=" + std::to_string(M);
  ++report.cases;
  int rc = kOk;
  for (const int32_t step : {kBadFirst, kBadLater}) {
    a.bad_step = step;
    if (rc == kOk) rc = edmfast::affine_step_cuda(a, g_device, g_stream);
  }
  bad.download(host_bad.data(), static_cast<size_t>(B) * 4);
  sync_or_die(where);
  const std::string err = rc == kOk ? check_bad(host_bad.data(), B, M, false) : "status " + std::to_string(rc);
  if (!err.empty()) report.fail(where + ": " + err);
}

void run_cfg_size(int64_t B, int64_t M, DType dtype, bool offset, bool constant_too) {
  const size_t n = static_cast<size_t>(B * M), es = dtype_size(dtype);
  const size_t o4 = offset ? 4 : 0, oe = offset ? es : 0;
  const std::vector<unsigned char> nan_out = nan_bytes(dtype, n), nan_k = nan_bytes(DType::kFloat32, B);
  std::vector<float> host_k(static_cast<size_t>(B));
  std::vector<unsigned char> host_out(n * es);
  const int64_t ws_floats = edmfast::cfg_workspace_floats(B, M);
  for (int constant = 0; constant < (constant_too ? 2 : 1); ++constant) {
    const CfgInputs in = make_cfg_inputs(B, M, dtype, constant != 0, static_cast<uint64_t>(B * 7919 + M));
    DevBuf cond(n * es, oe), uncond(n * es, oe), k(static_cast<size_t>(B) * 4, o4), out(n * es, oe), w(4, o4),
        phi_buf(4, o4);
    cond.upload(in.cond.data());
    uncond.upload(in.uncond.data());
    for (const float phi : kCfgPhis)
      for (int from_ptr = 0; from_ptr < 2; ++from_ptr) {
      CfgCase c;
      c.B = B;
      c.M = M;
      c.dtype = dtype;
      c.constant = constant != 0;
      c.phi = phi;
      const std::string where = c.name() + (offset ? " offset" : "") + (from_ptr ? " from_ptr" : "");
      const std::vector<double> k_ref = cfg_reference_k(c, in);
      CfgArgs a;
      a.cond = cond.as();
      a.uncond = uncond.as();
      a.batch = B;
      a.numel = M;
      a.dtype = dtype;
      a.guidance_scale = c.w;
      a.guidance_rescale = c.phi;
      if (from_ptr) {  // the values from memory; the host floats are garbage that must be ignored
        w.upload(&c.w);
        phi_buf.upload(&c.phi);
        a.guidance_scale_ptr = w.as<float>();
        a.guidance_rescale_ptr = phi_buf.as<float>();
        a.guidance_scale = NAN;
        a.guidance_rescale = NAN;  // validate() range-checks the host value only without a pointer
      }

      // A fresh workspace of exactly the documented size per (case, phi), with only its arrival
      // counters zeroed (the caller's one-time duty), so initcheck sees any read of a partial sum
      // or k that no block wrote. factors then cfg_rescale run on it back to back: the second
      // launch finalizes only if the first reset its sample's count.
      report.cases += 2;
      DevBuf ws(static_cast<size_t>(ws_floats) * 4);
      const int64_t counters = edmfast::cfg_counters_offset(B, M);
      CUDA_CHECK(cudaMemsetAsync(ws.as<float>() + counters, 0, static_cast<size_t>(2 * B) * 4, g_stream));
      {
        k.upload(nan_k.data());
        const int rc = edmfast::cfg_rescale_factors_cuda(a, k.as<float>(), ws.as<float>(), ws_floats, g_device,
                                                         g_stream);
        k.download(host_k.data(), static_cast<size_t>(B) * 4);
        sync_or_die(where + " factors");
        const std::string err = rc == kOk ? check_cfg_factors(c, k_ref, host_k.data()) : "status " + std::to_string(rc);
        if (!err.empty()) report.fail(where + " factors: " + err);
      }
      {
        out.upload(nan_out.data());
        const int rc = edmfast::cfg_rescale_cuda(a, out.as(), ws.as<float>(), ws_floats, g_device, g_stream);
        out.download(host_out.data(), n * es);
        sync_or_die(where + " cfg_rescale");
        const std::string err = rc == kOk ? check_cfg(c, in, k_ref, host_out.data()) : "status " + std::to_string(rc);
        if (!err.empty()) report.fail(where + " cfg_rescale: " + err);
      }
      {
        // The arrival words as a launch that died mid-grid (or anything else) leaves them: an
        // other tag, any count. The next launch must replace them, not count on.
        report.cases += 1;
        CUDA_CHECK(cudaMemsetAsync(ws.as<float>() + counters, 0xAB, static_cast<size_t>(2 * B) * 4, g_stream));
        k.upload(nan_k.data());
        const int rc = edmfast::cfg_rescale_factors_cuda(a, k.as<float>(), ws.as<float>(), ws_floats, g_device,
                                                         g_stream);
        k.download(host_k.data(), static_cast<size_t>(B) * 4);
        sync_or_die(where + " factors after poisoned arrival words");
        const std::string err = rc == kOk ? check_cfg_factors(c, k_ref, host_k.data()) : "status " + std::to_string(rc);
        if (!err.empty()) report.fail(where + " factors after poisoned arrival words: " + err);
      }
    }
  }
}

// Invalid arguments the CUDA entry points must refuse before launching (kBadArgument).
void run_bad_arguments() {
  const int64_t B = 2, M = 5, n = B * M;
  DevBuf x(n * 4), f(2 * n * 4), coef(5 * 4), out(n * 4), k(B * 4), ws(64 * 4);
  StepArgs a;
  a.x = x.as<float>();
  a.coef = coef.as<float>();
  a.out = out.as<float>();
  a.batch = B;
  a.numel = M;
  a.f = f.as();
  a.f_rows = 3 * B;
  ++report.cases;
  if (edmfast::affine_step_cuda(a, g_device, g_stream) != kBadArgument) report.fail("bad affine_step_cuda (f_rows 3B)");
  AncestralArgs g;
  g.x = x.as<float>();
  g.f = f.as();
  g.coef = coef.as<float>();
  g.out = out.as<float>();
  g.batch = B;
  g.numel = M;
  g.f_rows = 3 * B;
  report.cases += 2;
  if (edmfast::ancestral_step_cuda(g, g_device, g_stream) != kBadArgument)
    report.fail("bad ancestral_step_cuda (f_rows 3B)");
  g.f_rows = B;
  g.variance = 3;
  if (edmfast::ancestral_step_cuda(g, g_device, g_stream) != kBadArgument)
    report.fail("bad ancestral_step_cuda (variance 3)");
  g.variance = 0;
  g.coef_cols = 10;
  ++report.cases;
  if (edmfast::ancestral_step_cuda(g, g_device, g_stream) != kBadArgument)
    report.fail("bad ancestral_step_cuda (coef_cols 10)");
  a.f = nullptr;
  a.f_rows = 0;
  a.churn = true;
  a.hist[1] = x.as<float>();
  ++report.cases;
  if (edmfast::affine_step_cuda(a, g_device, g_stream) != kBadArgument) report.fail("bad affine_step_cuda (churn, h1)");
  CfgArgs c;
  c.cond = f.as();
  c.uncond = f.as<float>() + n;
  c.batch = B;
  c.numel = M;
  c.guidance_scale = 7.5f;
  c.guidance_rescale = 0.7f;
  const int64_t need = edmfast::cfg_workspace_floats(B, M);
  report.cases += 3;
  if (edmfast::cfg_rescale_factors_cuda(c, k.as<float>(), ws.as<float>(), need - 1, g_device, g_stream) !=
      kBadArgument)
    report.fail("cfg_rescale_factors_cuda accepted a short workspace");
  if (edmfast::cfg_rescale_cuda(c, out.as(), ws.as<float>(), need - 1, g_device, g_stream) != kBadArgument)
    report.fail("cfg_rescale_cuda accepted a short workspace");
  c.guidance_rescale = 2.0f;
  if (edmfast::cfg_rescale_cuda(c, out.as(), ws.as<float>(), need, g_device, g_stream) != kBadArgument)
    report.fail("cfg_rescale_cuda accepted guidance_rescale 2");
  sync_or_die("bad arguments");
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
      return 2;
    }
  }
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::fprintf(stderr, "sanitize_cuda: no CUDA device (%s)\n", cudaGetErrorString(err));
    return 3;
  }
  CUDA_CHECK(cudaSetDevice(g_device));
  CUDA_CHECK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  const auto t0 = std::chrono::steady_clock::now();

  std::vector<int64_t> batches(std::begin(kBatches), std::end(kBatches));
  std::vector<int64_t> numels(std::begin(kNumels), std::end(kNumels));
  int stride = 1;  // feature combinations: every stride-th
  if (quick) {
    batches = {1, 3};
    numels.assign(std::begin(kNumelsQuick), std::end(kNumelsQuick));
    stride = 5;
  }
  struct Extra {
    int64_t B, M;
    int stride;
  };
  // Grid-stride loops: more groups of 4 than the capped grid.x (132 SMs x 16 blocks x 256 threads
  // x 4 elements = 2.2M on an H200) and more samples than grid.y (65535); several CFG chunks.
  std::vector<Extra> step_extras = {{1, 4194307, 17}, {1, 4194304, 17}, {2, 16411, 3}, {65537, 3, 13}, {65537, 4, 13}};
  std::vector<Extra> cfg_extras = {{2, 16411, 0}, {1, 4194307, 0}, {65537, 5, 0}};
  if (quick) {
    step_extras = {{65537, 3, 41}, {2, 16411, 41}};
    cfg_extras = {{2, 16411, 0}, {65537, 5, 0}};
  }

  run_bad_arguments();
  for (const DType dtype : kDTypes) {
    for (const int64_t B : batches)
      for (const int64_t M : numels) {
        // the offset run only changes the code path where the vector path was possible
        for (const bool offset : {false, true}) {
          if (offset && !(M > 0 && M % 4 == 0)) continue;
          run_step_size(B, M, dtype, offset, stride);
          run_anc_size(B, M, dtype, offset, stride);
          run_cfg_size(B, M, dtype, offset, true);
          if (dtype == DType::kFloat32 && !offset) run_nonfinite(B, M);
        }
      }
    for (const Extra& e : step_extras) {
      run_step_size(e.B, e.M, dtype, false, e.stride);
      run_anc_size(e.B, e.M, dtype, false, e.stride);
      if (dtype == DType::kFloat32) run_nonfinite(e.B, e.M);
    }
    for (const Extra& e : cfg_extras) run_cfg_size(e.B, e.M, dtype, false, false);
  }
  CUDA_CHECK(cudaStreamDestroy(g_stream));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("sanitize_cuda%s: %lld cases, %lld failed, %.1f s\n", quick ? " --quick" : "",
              static_cast<long long>(report.cases), static_cast<long long>(report.failures), secs);
  return report.failures == 0 ? 0 : 1;
}
