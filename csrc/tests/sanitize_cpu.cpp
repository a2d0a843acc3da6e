// Standalone driver of the CPU kernels for AddressSanitizer / UBSan / valgrind (no Python, no
// torch): calls affine_step_cpu, ancestral_step_cpu, cfg_rescale_factors_cpu and cfg_rescale_cpu of edmfast/ops.h over
// odd sizes, every dtype, every feature combination and 1 and 2 threads. Every buffer is malloc'd
// at exactly its size, so a one-past-the-end access is caught; outputs are NaN-poisoned before
// each call and then compared element by element with the double formula (sanitize_common.h).
//
//   build + run: csrc/tests/sanitize.sh   (see there)
//   usage:       sanitize_cpu [--quick]   (--quick: the reduced size set used under valgrind)
// Exit status 0 when every case passed, 1 otherwise (sanitizer findings abort on their own).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../cpu/parallel.h"
#include "edmfast/ops.h"
#include "sanitize_common.h"

using namespace sanitize;
using edmfast::AncestralArgs;
using edmfast::CfgArgs;
using edmfast::kBadArgument;
using edmfast::kOk;
using edmfast::StepArgs;

namespace {

// One malloc of exactly `bytes` (malloc(0) included: any access to it is out of bounds).
class Buf {
 public:
  explicit Buf(size_t bytes) : bytes_(bytes), p_(std::malloc(bytes)) {
    if (!p_ && bytes) {
      std::fprintf(stderr, "out of memory (%zu bytes)\n", bytes);
      std::exit(2);
    }
    if (!p_) p_ = std::malloc(1);  // a libc whose malloc(0) is NULL: the kernels need non-null
  }
  ~Buf() { std::free(p_); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  template <typename T = void>
  T* as() const {
    return static_cast<T*>(p_);
  }
  void fill(const void* src) const {
    if (bytes_) std::memcpy(p_, src, bytes_);
  }

 private:
  size_t bytes_;
  void* p_;
};

Report report;

template <typename V>
size_t bytes_of(const V& v) {
  return v.size() * sizeof(v[0]);
}

// The affine pass over every feature combination of one (B, M, dtype), `stride` > 1 runs every
// stride-th combination only. The coefficient row of each case is its own allocation of exactly
// the floats the case may read (StepCase::coef_floats).
void run_step_size(int64_t B, int64_t M, DType dtype, int threads, int stride) {
  const StepInputs in = make_step_inputs(B, M, dtype, static_cast<uint64_t>(B * 1000003 + M * 31 + int(dtype)));
  const size_t n = static_cast<size_t>(B * M), es = dtype_size(dtype);
  Buf x(n * 4), noise(n * 4), f1(n * es), f2(2 * n * es), k(static_cast<size_t>(B) * 4),
      seeds(static_cast<size_t>(B) * 8), out(n * 4), hist_out(n * 4), aliased(n * 4), net1(n * es), net2(2 * n * es),
      w(4), bad(static_cast<size_t>(B) * 4);
  Buf h0(n * 4), h1(n * 4), h2(n * 4), h3(n * 4);
  const Buf* h[edmfast::kHistory] = {&h0, &h1, &h2, &h3};
  const float nan_w = NAN;  // the host value a case reading w from memory must ignore
  w.fill(&in.w);
  const std::vector<int32_t> bad_none(static_cast<size_t>(B), kBadNone);
  x.fill(in.x.data());
  for (int j = 0; j < edmfast::kHistory; ++j) h[j]->fill(in.h[j].data());
  noise.fill(in.noise.data());
  f1.fill(in.f1.data());
  f2.fill(in.f2.data());
  k.fill(in.k.data());
  seeds.fill(in.seeds.data());

  const std::vector<StepCase> cases = step_feature_cases(B, M, dtype);
  for (size_t ci = 0; ci < cases.size(); ci += static_cast<size_t>(stride)) {
    const StepCase& c = cases[ci];
    ++report.cases;
    const std::vector<float> coef_host = step_coef(c);
    Buf coef(coef_host.size() * 4);
    coef.fill(coef_host.data());
    StepArgs a = step_args(c, in);
    a.x = x.as<float>();
    for (int j = 0; j < edmfast::kHistory; ++j) a.hist[j] = c.has(j) ? h[j]->as<float>() : nullptr;
    float* out_p = out.as<float>();
    float* hist_out_p = c.hist_out ? hist_out.as<float>() : nullptr;
    poison(DType::kFloat32, out_p, static_cast<int64_t>(n));
    if (hist_out_p) poison(DType::kFloat32, hist_out_p, static_cast<int64_t>(n));
    if (const std::vector<float>* src = alias_source(c, in)) {
      aliased.fill(src->data());  // the shared buffer starts as the input it replaces
      float* shared = aliased.as<float>();
      if (c.alias == Alias::kOutX) a.x = out_p = shared;
      if (c.alias == Alias::kOutH) a.hist[c.last_hist()] = out_p = shared;
      if (c.alias == Alias::kHistOutH) a.hist[c.first_hist()] = hist_out_p = shared;
    }
    void* net_p = c.net_rows == 1 ? net1.as() : (c.net_rows == 2 ? net2.as() : nullptr);
    if (net_p) poison(dtype, net_p, static_cast<int64_t>(n) * c.net_rows);
    a.f = c.f == FMode::kNone ? nullptr : (c.f == FMode::kB ? f1.as() : f2.as());
    a.k = c.f == FMode::kCfgK ? k.as<float>() : nullptr;
    a.noise = c.eps == EpsMode::kNoise ? noise.as<float>() : nullptr;
    a.seeds = c.eps == EpsMode::kSeeds ? seeds.as<int64_t>() : nullptr;
    a.coef = coef.as<float>();
    a.out = out_p;
    a.hist_out = hist_out_p;
    a.out_net = net_p;
    if (c.w_ptr) {
      a.guidance = w.as<float>();
      a.guidance_scale = nan_w;
    }
    if (c.bad) {
      bad.fill(bad_none.data());
      a.bad = bad.as<int32_t>();
      a.bad_step = kBadFirst;
    }
    const int rc = edmfast::affine_step_cpu(a, threads);
    if (rc != kOk) {
      report.fail(c.name() + " threads=" + std::to_string(threads) + ": status " + std::to_string(rc));
      continue;
    }
    std::string err = check_step(c, in, out_p, hist_out_p, net_p);
    if (err.empty() && c.bad) err = check_bad(bad.as<int32_t>(), B, M, true);
    if (!err.empty()) report.fail(c.name() + " threads=" + std::to_string(threads) + ": " + err);
  }
}

// The ancestral pass over its feature combinations of one (B, M, dtype) (every stride-th).
void run_anc_size(int64_t B, int64_t M, DType dtype, int threads, int stride) {
  const AncInputs in = make_anc_inputs(B, M, dtype, static_cast<uint64_t>(B * 7741 + M * 13 + int(dtype)));
  const size_t n = static_cast<size_t>(B * M), es = dtype_size(dtype);
  Buf x(n * 4), noise(n * 4), k(static_cast<size_t>(B) * 4), seeds(static_cast<size_t>(B) * 8), out(n * 4),
      aliased(n * 4), net1(n * es), net2(2 * n * es), w(4), bad(static_cast<size_t>(B) * 4);
  Buf f_fixed1(in.f_fixed1.size()), f_fixed2(in.f_fixed2.size()), f_learn1(in.f_learn1.size()),
      f_learn2(in.f_learn2.size());
  f_fixed1.fill(in.f_fixed1.data());
  f_fixed2.fill(in.f_fixed2.data());
  f_learn1.fill(in.f_learn1.data());
  f_learn2.fill(in.f_learn2.data());
  w.fill(&in.w);
  x.fill(in.x.data());
  noise.fill(in.noise.data());
  k.fill(in.k.data());
  seeds.fill(in.seeds.data());
  const std::vector<int32_t> bad_none(static_cast<size_t>(B), kBadNone);

  const std::vector<AncCase> cases = anc_feature_cases(B, M, dtype);
  for (size_t ci = 0; ci < cases.size(); ci += static_cast<size_t>(stride)) {
    const AncCase& c = cases[ci];
    ++report.cases;
    const std::vector<float> coef_host = anc_coef(c);
    Buf coef(coef_host.size() * 4);  // exactly the row: a read past an 8-float row is out of bounds
    coef.fill(coef_host.data());
    float* out_p = c.alias ? aliased.as<float>() : out.as<float>();
    if (c.alias) {
      aliased.fill(in.x.data());
    } else {
      poison(DType::kFloat32, out_p, static_cast<int64_t>(n));
    }
    void* net_p = c.net_rows == 1 ? net1.as() : (c.net_rows == 2 ? net2.as() : nullptr);
    if (net_p) poison(dtype, net_p, static_cast<int64_t>(n) * c.net_rows);

    AncestralArgs a;
    a.x = c.alias ? aliased.as<float>() : x.as<float>();
    a.f = c.variance == 0 ? (c.f == FMode::kB ? f_fixed1.as() : f_fixed2.as())
                          : (c.f == FMode::kB ? f_learn1.as() : f_learn2.as());
    a.k = c.f == FMode::kCfgK ? k.as<float>() : nullptr;
    a.noise = c.eps == EpsMode::kNoise ? noise.as<float>() : nullptr;
    a.seeds = c.eps == EpsMode::kSeeds ? seeds.as<int64_t>() : nullptr;
    a.coef = coef.as<float>();
    a.coef_cols = c.coef_floats();
    a.out = out_p;
    a.out_net = net_p;
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
      a.guidance_scale = NAN;
    }
    if (c.bad) {
      bad.fill(bad_none.data());
      a.bad = bad.as<int32_t>();
      a.bad_step = kBadFirst;
    }
    const int rc = edmfast::ancestral_step_cpu(a, threads);
    if (rc != kOk) {
      report.fail(c.name() + " threads=" + std::to_string(threads) + ": status " + std::to_string(rc));
      continue;
    }
    std::string err = check_anc(c, in, out_p, net_p);
    if (err.empty() && c.bad) err = check_bad(bad.as<int32_t>(), B, M, true);
    if (!err.empty()) report.fail(c.name() + " threads=" + std::to_string(threads) + ": " + err);
  }
}

// Non-finite rows are recorded in bad (the min step), finite rows never, on every thread split.
void run_nonfinite(int64_t B, int64_t M, int threads) {
  const size_t n = static_cast<size_t>(B * M);
  std::vector<float> host(n, 0.5f);
  plant_nonfinite(host, B, M);
  Buf x(n * 4), coef(5 * 4), out(n * 4), net(n * 4), bad(static_cast<size_t>(B) * 4);
  x.fill(host.data());
  const float coef_host[5] = {0.9f, NAN, NAN, NAN, 0.25f};
  coef.fill(coef_host);
  const std::vector<int32_t> bad_none(static_cast<size_t>(B), kBadNone);
  bad.fill(bad_none.data());
  StepArgs a;
  a.x = x.as<float>();
  a.coef = coef.as<float>();
  a.out = out.as<float>();
  a.out_net = net.as();
  a.net_rows = 1;
  a.batch = B;
  a.numel = M;
  a.bad = bad.as<int32_t>();
  report.cases += 1;
  int rc = kOk;
  for (const int32_t step : {kBadFirst, kBadLater}) {
    a.bad_step = step;
    if (rc == kOk) rc = edmfast::affine_step_cpu(a, threads);
  }
  const std::string err = rc == kOk ? check_bad(bad.as<int32_t>(), B, M, false) : "status " + std::to_string(rc);
  if (!err.empty())
    report.fail("nonfinite B=" + std::to_string(B) + " M=" + std::to_string(M) + " threads=" +
                std::to_string(threads) + ": " + err);
}

void run_cfg_size(int64_t B, int64_t M, DType dtype, int threads) {
  const size_t n = static_cast<size_t>(B * M), es = dtype_size(dtype);
  for (int constant = 0; constant < 2; ++constant) {
    const CfgInputs in = make_cfg_inputs(B, M, dtype, constant != 0, static_cast<uint64_t>(B * 7919 + M));
    Buf cond(n * es), uncond(n * es), k(static_cast<size_t>(B) * 4), out(n * es), w(4), phi_buf(4);
    cond.fill(in.cond.data());
    uncond.fill(in.uncond.data());
    for (const float phi : kCfgPhis)
      for (int from_ptr = 0; from_ptr < 2; ++from_ptr) {
      CfgCase c;
      c.B = B;
      c.M = M;
      c.dtype = dtype;
      c.constant = constant != 0;
      c.phi = phi;
      const std::string where = c.name() + " threads=" + std::to_string(threads) + (from_ptr ? " from_ptr" : "");
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
        w.fill(&c.w);
        phi_buf.fill(&c.phi);
        a.guidance_scale_ptr = w.as<float>();
        a.guidance_rescale_ptr = phi_buf.as<float>();
        a.guidance_scale = NAN;
        a.guidance_rescale = NAN;  // validate() range-checks the host value only without a pointer
      }

      report.cases += 2;
      poison(DType::kFloat32, k.as(), B);
      int rc = edmfast::cfg_rescale_factors_cpu(a, k.as<float>(), threads);
      std::string err = rc == kOk ? check_cfg_factors(c, k_ref, k.as<float>()) : "status " + std::to_string(rc);
      if (!err.empty()) report.fail(where + " factors: " + err);

      poison(dtype, out.as(), static_cast<int64_t>(n));
      rc = edmfast::cfg_rescale_cpu(a, out.as(), threads);
      err = rc == kOk ? check_cfg(c, in, k_ref, out.as()) : "status " + std::to_string(rc);
      if (!err.empty()) report.fail(where + " cfg_rescale: " + err);
    }
  }
}

// Invalid arguments: kBadArgument, and nothing written.
void run_bad_arguments() {
  const int64_t B = 2, M = 5, n = B * M;
  Buf x(n * 4), f(2 * n * 4), k(B * 4), noise(n * 4), seeds(B * 8), coef(5 * 4), out(n * 4), net(2 * n * 4);
  std::vector<float> ones(static_cast<size_t>(2 * n), 1.0f);
  x.fill(ones.data());
  f.fill(ones.data());
  k.fill(ones.data());
  noise.fill(ones.data());
  coef.fill(ones.data());
  std::memset(seeds.as(), 0, B * 8);
  auto base = [&] {
    StepArgs a;
    a.x = x.as<float>();
    a.coef = coef.as<float>();
    a.out = out.as<float>();
    a.batch = B;
    a.numel = M;
    return a;
  };
  struct Bad {
    const char* what;
    StepArgs a;
  };
  std::vector<Bad> bad;
  StepArgs a;
  a = base(), a.batch = 0, bad.push_back({"batch 0", a});
  a = base(), a.numel = -1, bad.push_back({"numel -1", a});
  a = base(), a.dtype = static_cast<DType>(7), bad.push_back({"dtype 7", a});
  a = base(), a.x = nullptr, bad.push_back({"no x", a});
  a = base(), a.coef = nullptr, bad.push_back({"no coef", a});
  a = base(), a.out = nullptr, bad.push_back({"no out", a});
  a = base(), a.f = f.as(), a.f_rows = 0, bad.push_back({"f without f_rows", a});
  a = base(), a.f_rows = B, bad.push_back({"f_rows without f", a});
  a = base(), a.f = f.as(), a.f_rows = 3 * B, bad.push_back({"f_rows 3B", a});
  a = base(), a.f = f.as(), a.f_rows = B, a.k = k.as<float>(), bad.push_back({"k with f_rows B", a});
  a = base(), a.noise = noise.as<float>(), a.seeds = seeds.as<int64_t>(), bad.push_back({"noise and seeds", a});
  a = base(), a.out_net = net.as(), a.net_rows = 3, bad.push_back({"net_rows 3", a});
  a = base(), a.out_net = net.as(), a.net_rows = 0, bad.push_back({"out_net without net_rows", a});
  a = base(), a.net_rows = 1, bad.push_back({"net_rows without out_net", a});
  a = base(), a.churn = true, a.hist[0] = x.as<float>(), bad.push_back({"churn with h0", a});
  a = base(), a.churn = true, a.f = f.as(), a.f_rows = B, bad.push_back({"churn with f", a});
  a = base(), a.churn = true, a.hist[3] = x.as<float>(), bad.push_back({"churn with h3", a});
  a = base(), a.churn = true, a.hist_out = net.as<float>(), bad.push_back({"churn with hist_out", a});
  for (const Bad& b : bad) {
    ++report.cases;
    poison(DType::kFloat32, out.as(), n);
    poison(DType::kFloat32, net.as(), 2 * n);
    const int rc = edmfast::affine_step_cpu(b.a, 1);
    if (rc != kBadArgument) report.fail(std::string("bad affine_step (") + b.what + "): status " + std::to_string(rc));
    for (int64_t i = 0; i < n; ++i)
      if (!std::isnan(out.as<float>()[i])) {
        report.fail(std::string("bad affine_step (") + b.what + ") wrote out");
        break;
      }
  }

  auto cbase = [&] {
    CfgArgs c;
    c.cond = f.as();
    c.uncond = f.as<float>() + n;
    c.batch = B;
    c.numel = M;
    c.guidance_scale = 7.5f;
    c.guidance_rescale = 0.7f;
    return c;
  };
  struct BadCfg {
    const char* what;
    CfgArgs a;
  };
  std::vector<BadCfg> bad_cfg;
  CfgArgs c;
  c = cbase(), c.batch = 0, bad_cfg.push_back({"batch 0", c});
  c = cbase(), c.numel = -3, bad_cfg.push_back({"numel -3", c});
  c = cbase(), c.cond = nullptr, bad_cfg.push_back({"no cond", c});
  c = cbase(), c.uncond = nullptr, bad_cfg.push_back({"no uncond", c});
  c = cbase(), c.dtype = static_cast<DType>(-1), bad_cfg.push_back({"dtype -1", c});
  c = cbase(), c.guidance_rescale = 1.5f, bad_cfg.push_back({"phi 1.5", c});
  c = cbase(), c.guidance_rescale = -0.1f, bad_cfg.push_back({"phi -0.1", c});
  c = cbase(), c.guidance_rescale = NAN, bad_cfg.push_back({"phi NaN", c});
  for (const BadCfg& b : bad_cfg) {
    report.cases += 2;
    poison(DType::kFloat32, out.as(), n);
    poison(DType::kFloat32, k.as(), B);
    int rc = edmfast::cfg_rescale_factors_cpu(b.a, k.as<float>(), 1);
    if (rc != kBadArgument) report.fail(std::string("bad cfg factors (") + b.what + "): status " + std::to_string(rc));
    rc = edmfast::cfg_rescale_cpu(b.a, out.as(), 1);
    if (rc != kBadArgument) report.fail(std::string("bad cfg_rescale (") + b.what + "): status " + std::to_string(rc));
    if (!std::isnan(out.as<float>()[0]) || !std::isnan(k.as<float>()[0]))
      report.fail(std::string("bad cfg (") + b.what + ") wrote its output");
  }
  auto abase = [&] {
    AncestralArgs g;
    g.x = x.as<float>();
    g.f = f.as();
    g.coef = coef.as<float>();
    g.out = out.as<float>();
    g.batch = B;
    g.numel = M;
    g.f_rows = B;
    return g;
  };
  struct BadAnc {
    const char* what;
    AncestralArgs a;
  };
  std::vector<BadAnc> bad_anc;
  AncestralArgs g;
  g = abase(), g.batch = 0, bad_anc.push_back({"batch 0", g});
  g = abase(), g.numel = -1, bad_anc.push_back({"numel -1", g});
  g = abase(), g.variance = 3, bad_anc.push_back({"variance 3", g});
  g = abase(), g.variance = -1, bad_anc.push_back({"variance -1", g});
  g = abase(), g.dtype = static_cast<DType>(5), bad_anc.push_back({"dtype 5", g});
  g = abase(), g.f = nullptr, bad_anc.push_back({"no f", g});
  g = abase(), g.x = nullptr, bad_anc.push_back({"no x", g});
  g = abase(), g.coef = nullptr, bad_anc.push_back({"no coef", g});
  g = abase(), g.f_rows = 0, bad_anc.push_back({"f_rows 0", g});
  g = abase(), g.f_rows = 3 * B, bad_anc.push_back({"f_rows 3B", g});
  g = abase(), g.k = k.as<float>(), bad_anc.push_back({"k with f_rows B", g});
  g = abase(), g.noise = noise.as<float>(), g.seeds = seeds.as<int64_t>(), bad_anc.push_back({"noise and seeds", g});
  g = abase(), g.out_net = net.as(), g.net_rows = 3, bad_anc.push_back({"net_rows 3", g});
  g = abase(), g.net_rows = 1, bad_anc.push_back({"net_rows without out_net", g});
  g = abase(), g.coef_cols = 10, bad_anc.push_back({"coef_cols 10", g});
  g = abase(), g.coef_cols = 0, bad_anc.push_back({"coef_cols 0", g});
  for (const BadAnc& b : bad_anc) {
    ++report.cases;
    poison(DType::kFloat32, out.as(), n);
    const int rc = edmfast::ancestral_step_cpu(b.a, 1);
    if (rc != kBadArgument)
      report.fail(std::string("bad ancestral_step (") + b.what + "): status " + std::to_string(rc));
    if (!std::isnan(out.as<float>()[0])) report.fail(std::string("bad ancestral_step (") + b.what + ") wrote out");
  }
  c = cbase(), c.row_stride = M - 1, bad_cfg.clear(), bad_cfg.push_back({"row_stride < numel", c});
  for (const BadCfg& b : bad_cfg) {
    ++report.cases;
    if (edmfast::cfg_rescale_factors_cpu(b.a, k.as<float>(), 1) != kBadArgument)
      report.fail(std::string("bad cfg factors (") + b.what + ")");
  }

  ++report.cases;
  if (edmfast::cfg_rescale_factors_cpu(cbase(), nullptr, 1) != kBadArgument) report.fail("cfg factors without k_out");
  ++report.cases;
  if (edmfast::cfg_rescale_cpu(cbase(), nullptr, 1) != kBadArgument) report.fail("cfg_rescale without out");
}

// The helper pool under adversarial timing: helpers that stall mid-item (sleeping like a descheduled
// thread, longer than the pool's stall threshold, so its backoff engages), helpers that wake late
// into the next call, and several callers at once. Every item must run exactly once per call.
void run_pool_stress(bool quick) {
  auto one_caller = [](uint64_t seed, int calls, std::atomic<int64_t>* errors) {
    Rng rng(seed);
    for (int call = 0; call < calls; ++call) {
      const int64_t items = 1 + static_cast<int64_t>(rng.next() % 97);
      const int threads = 2 + static_cast<int>(rng.next() % 3);
      const uint64_t sleepy = rng.next();
      std::vector<std::atomic<int>> hits(static_cast<size_t>(items));
      const std::thread::id caller = std::this_thread::get_id();
      edmfast::parallel_for(items, threads, [&](int64_t i) {
        if (std::this_thread::get_id() != caller && ((sleepy >> (i % 64)) & 1u) && i % 5 == 0)
          std::this_thread::sleep_for(std::chrono::microseconds(300));
        hits[static_cast<size_t>(i)].fetch_add(1, std::memory_order_relaxed);
      });
      for (const auto& h : hits)
        if (h.load() != 1) errors->fetch_add(1);
    }
  };
  std::atomic<int64_t> errors{0};
  const int calls = quick ? 60 : 300;
  one_caller(1, calls, &errors);
  std::thread other(one_caller, 2, calls, &errors);  // concurrent callers: one runs alone, busy pool
  one_caller(3, calls, &errors);
  other.join();
  report.cases += 3 * calls;
  if (errors.load() != 0) report.fail("pool stress: " + std::to_string(errors.load()) + " items not run exactly once");
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
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int64_t> batches(std::begin(kBatches), std::end(kBatches));
  std::vector<int64_t> numels(std::begin(kNumels), std::end(kNumels));
  if (quick) {
    batches = {1, 3};
    numels.assign(std::begin(kNumelsQuick), std::end(kNumelsQuick));
  }
  // Sizes past the OpenMP threshold (B * M >= 2^15: the 2-thread runs really split the work,
  // over chunks that end mid-sample), and more samples than one grid dimension holds on a GPU.
  struct Extra {
    int64_t B, M;
    int stride;  // every stride-th feature combination
  };
  std::vector<Extra> extras = {{1, 32771, 3}, {2, 16411, 1}, {3, 16411, 5}, {65537, 3, 7}};
  if (quick) extras = {{2, 16411, 9}};

  run_bad_arguments();
  run_pool_stress(quick);
  for (const int threads : {1, 2}) {
    for (const DType dtype : kDTypes) {
      for (const int64_t B : batches)
        for (const int64_t M : numels) {
          run_step_size(B, M, dtype, threads, 1);
          run_anc_size(B, M, dtype, threads, 1);
          run_cfg_size(B, M, dtype, threads);
          if (dtype == DType::kFloat32) run_nonfinite(B, M, threads);
        }
      for (const Extra& e : extras) {
        run_step_size(e.B, e.M, dtype, threads, e.stride);
        run_anc_size(e.B, e.M, dtype, threads, e.stride);
        run_cfg_size(e.B, e.M, dtype, threads);
        if (dtype == DType::kFloat32) run_nonfinite(e.B, e.M, threads);
      }
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("sanitize_cpu%s: %lld cases, %lld failed, %.1f s\n", quick ? " --quick" : "",
              static_cast<long long>(report.cases), static_cast<long long>(report.failures), secs);
  return report.failures == 0 ? 0 : 1;
}
