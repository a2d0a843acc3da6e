// Shared part of the sanitizer drivers (sanitize_cpu.cpp, sanitize_cuda.cu): the case matrix,
// deterministic inputs, and the reference checks in double. Host code only, no torch, no Python.
//
// The drivers own the buffers (exact-size malloc / cudaMalloc, so one-past-the-end accesses
// trip AddressSanitizer, valgrind or compute-sanitizer), run the kernel entry points of
// edmfast/ops.h and hand the results, copied to host vectors or read in place, to the checks
// below. Outputs are poisoned with NaN before every call, and every element is compared with
// the formula of edmfast/reference.py evaluated in double, so an element left unwritten, written
// twice from the wrong row, or produced from an out-of-range read fails the run.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "edmfast/common.h"
#include "edmfast/ops.h"
#include "edmfast/philox.h"

namespace sanitize {

using edmfast::DType;

// ------------------------------------------------------------------ dtype storage helpers

inline size_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32:
      return "fp32";
    case DType::kFloat16:
      return "fp16";
    case DType::kBFloat16:
      return "bf16";
  }
  return "?";
}

constexpr DType kDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

inline float load_elem(DType d, const void* p, int64_t i) {
  switch (d) {
    case DType::kFloat32:
      return static_cast<const float*>(p)[i];
    case DType::kFloat16:
      return edmfast::to_float(static_cast<const edmfast::half_t*>(p)[i]);
    case DType::kBFloat16:
      return edmfast::to_float(static_cast<const edmfast::bfloat16_t*>(p)[i]);
  }
  return NAN;
}

inline void store_elem(DType d, void* p, int64_t i, float v) {
  switch (d) {
    case DType::kFloat32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::kFloat16:
      static_cast<edmfast::half_t*>(p)[i] = edmfast::from_float<edmfast::half_t>(v);
      break;
    case DType::kBFloat16:
      static_cast<edmfast::bfloat16_t*>(p)[i] = edmfast::from_float<edmfast::bfloat16_t>(v);
      break;
  }
}

// Fill n elements of dtype d with a quiet NaN (the "never written" marker).
inline void poison(DType d, void* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store_elem(d, p, i, NAN);
}

// Relative rounding of one store to dtype d (half an ulp, doubled for slack).
inline double dtype_eps(DType d) {
  switch (d) {
    case DType::kFloat32:
      return 1.2e-7;
    case DType::kFloat16:
      return 1.0e-3;
    case DType::kBFloat16:
      return 7.9e-3;
  }
  return 1.0;
}

// ------------------------------------------------------------------ deterministic inputs

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull) {}
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>((next() >> 40) * 0x1.0p-24); }
};

// ------------------------------------------------------------------ the fused affine pass (affine_step)

enum class FMode { kNone, kB, kCfg, kCfgK };  // no f, f [B], f [2B] (CFG), f [2B] + k [B]
enum class EpsMode { kNone, kNoise, kSeeds };
// Exact aliases the op allows: out == x; out == the last present h_k; hist_out == the first
// present h_k (the slot a multistep method replaces).
enum class Alias { kNone, kOutX, kOutH, kHistOutH };

struct StepCase {
  int64_t B = 1, M = 1;
  DType dtype = DType::kFloat32;
  bool churn = false;
  unsigned hist = 0;  // bit j: history buffer h_j present
  FMode f = FMode::kNone;
  EpsMode eps = EpsMode::kNone;
  uint32_t stage = 0;  // Philox counter word c3
  bool hist_out = false;
  Alias alias = Alias::kNone;
  int net_rows = 0;    // 0: no out_net, 1: [B], 2: [2B]
  bool w_ptr = false;  // guidance scale read from device memory (StepArgs::guidance)
  bool bad = false;    // a bad [B] buffer (StepArgs::bad): finite inputs must leave it untouched

  int64_t f_rows() const { return f == FMode::kNone ? 0 : (f == FMode::kB ? B : 2 * B); }
  bool has(int j) const { return (hist >> j) & 1u; }
  int first_hist() const {
    for (int j = 0; j < edmfast::kHistory; ++j)
      if (has(j)) return j;
    return -1;
  }
  int last_hist() const {
    for (int j = edmfast::kHistory - 1; j >= 0; --j)
      if (has(j)) return j;
    return -1;
  }
  // The floats of the coefficient row this case may read: up to its last used column (0 when it
  // reads none). The drivers allocate exactly this many, so a read of any other column (an absent
  // operand's, or past a 5-float Heun row) is out of bounds.
  int64_t coef_floats() const {
    int last = -1;
    auto use = [&](int col) { last = col > last ? col : last; };
    if (!churn) use(edmfast::kCoefA);
    if (f != FMode::kNone) use(edmfast::kCoefB);
    for (int j = 0; j < edmfast::kHistory; ++j)
      if (has(j)) use(edmfast::history_column(j));
    if (eps != EpsMode::kNone) use(edmfast::kCoefStd);
    if (net_rows) use(edmfast::kCoefNet);
    if (hist_out) use(f != FMode::kNone ? edmfast::kCoefHq : edmfast::kCoefHp);
    return last + 1;
  }
  std::string name() const {
    static const char* fn[] = {"none", "B", "2B", "2B+k"};
    static const char* en[] = {"none", "noise", "seeds"};
    static const char* an[] = {"none", "out=x", "out=h", "hist_out=h"};
    char buf[300];
    std::snprintf(buf, sizeof(buf),
                  "affine B=%lld M=%lld %s%s hist=%x f=%s eps=%s stage=%u hist_out=%d alias=%s net_rows=%d "
                  "w_ptr=%d bad=%d coef=%lld",
                  static_cast<long long>(B), static_cast<long long>(M), dtype_name(dtype), churn ? " churn" : "", hist,
                  fn[static_cast<int>(f)], en[static_cast<int>(eps)], stage, hist_out ? 1 : 0,
                  an[static_cast<int>(alias)], net_rows, w_ptr ? 1 : 0, bad ? 1 : 0,
                  static_cast<long long>(coef_floats()));
    return buf;
  }
};

// Every history subset x f x eps for one (B, M, dtype) (192 passes) and 3 churns; the other
// switches (stage, hist_out, the aliases, net_rows, w_ptr, bad) spread over them.
inline std::vector<StepCase> step_feature_cases(int64_t B, int64_t M, DType dtype) {
  std::vector<StepCase> cases;
  int i = 0;
  for (int churn = 0; churn < 2; ++churn)
    for (unsigned hist = 0; hist < 16; ++hist)
      for (int f = 0; f < 4; ++f) {
        if (churn && (hist || f)) continue;  // a churn has no history and no f (validate rejects it)
        for (int e = 0; e < 3; ++e, ++i) {
          StepCase c;
          c.B = B;
          c.M = M;
          c.dtype = dtype;
          c.churn = churn != 0;
          c.hist = hist;
          c.f = static_cast<FMode>(f);
          c.eps = static_cast<EpsMode>(e);
          c.stage = (i / 3) % 2;
          c.hist_out = !churn && i % 3 != 1;
          const int alias = i % 4;
          if (alias == 1) c.alias = Alias::kOutX;
          if (alias == 2 && hist) c.alias = Alias::kOutH;
          if (alias == 3 && hist && c.hist_out) c.alias = Alias::kHistOutH;
          c.net_rows = (i / 2) % 3;
          c.w_ptr = i % 5 == 1;
          c.bad = (e + i) % 2 == 0;
          cases.push_back(c);
        }
      }
  return cases;
}

// Host copies of the inputs of one (B, M, dtype); the drivers copy them into exact-size buffers.
struct StepInputs {
  int64_t B = 0, M = 0;
  DType dtype = DType::kFloat32;
  std::vector<float> x, h[edmfast::kHistory], noise, k;
  std::vector<unsigned char> f1, f2;  // f [B, M] and f [2B, M] in dtype storage
  std::vector<int64_t> seeds;
  float w = 7.5f;
  uint32_t step = 3;
};

inline StepInputs make_step_inputs(int64_t B, int64_t M, DType dtype, uint64_t seed) {
  StepInputs in;
  in.B = B;
  in.M = M;
  in.dtype = dtype;
  Rng rng(seed);
  const size_t n = static_cast<size_t>(B * M);
  in.x.resize(n);
  for (auto& h : in.h) h.resize(n);
  in.noise.resize(n);
  for (size_t i = 0; i < n; ++i) {
    in.x[i] = rng.uniform(-2.0f, 2.0f);
    for (auto& h : in.h) h[i] = rng.uniform(-2.0f, 2.0f);
    in.noise[i] = rng.uniform(-3.0f, 3.0f);
  }
  const size_t es = dtype_size(dtype);
  in.f1.resize(n * es);
  in.f2.resize(2 * n * es);
  for (size_t i = 0; i < n; ++i) store_elem(dtype, in.f1.data(), static_cast<int64_t>(i), rng.uniform(-2.0f, 2.0f));
  for (size_t i = 0; i < 2 * n; ++i)
    store_elem(dtype, in.f2.data(), static_cast<int64_t>(i), rng.uniform(-2.0f, 2.0f));
  in.k.resize(static_cast<size_t>(B));
  in.seeds.resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    in.k[static_cast<size_t>(b)] = 0.8f + 0.1f * static_cast<float>(b % 5);
    // large, negative and small seeds: both key words of Philox matter
    const int64_t seeds[] = {0x123456789ALL, -1, 7, INT64_MIN + 5, 0x7FFFFFFFFFFFFFFFLL};
    in.seeds[static_cast<size_t>(b)] = static_cast<int64_t>(static_cast<uint64_t>(seeds[b % 5]) + b / 5);
  }
  return in;
}

// The columns of a row (edmfast/layout.py). An absent operand's column inside the case's row is
// NaN (the kernels must ignore it, see load_coef in step.h), and so is a churn's a.
constexpr float kA = 0.9f, kB = -0.7f, kStd = 0.5f, kNet = 0.25f, kHp = 1.1f, kHq = -0.35f;
constexpr float kC[edmfast::kHistory] = {0.3f, -0.45f, 0.2f, 0.6f};

inline std::vector<float> step_coef(const StepCase& c) {
  std::vector<float> coef(static_cast<size_t>(c.coef_floats()), NAN);
  auto set = [&](int col, float v) {
    if (col < static_cast<int>(coef.size())) coef[static_cast<size_t>(col)] = v;
  };
  if (!c.churn) set(edmfast::kCoefA, kA);
  if (c.f != FMode::kNone) set(edmfast::kCoefB, kB);
  for (int j = 0; j < edmfast::kHistory; ++j)
    if (c.has(j)) set(edmfast::history_column(j), kC[j]);
  if (c.eps != EpsMode::kNone) set(edmfast::kCoefStd, kStd);
  if (c.net_rows) set(edmfast::kCoefNet, kNet);
  if (c.hist_out) set(edmfast::kCoefHp, kHp);
  if (c.hist_out && c.f != FMode::kNone) set(edmfast::kCoefHq, kHq);
  return coef;
}

inline edmfast::StepArgs step_args(const StepCase& c, const StepInputs& in) {
  edmfast::StepArgs a;
  a.batch = c.B;
  a.numel = c.M;
  a.f_rows = c.f_rows();
  a.net_rows = c.net_rows;
  a.dtype = c.dtype;
  a.guidance_scale = in.w;
  a.step = in.step;
  a.stage = c.stage;
  a.churn = c.churn;
  return a;  // the driver fills in the pointers
}

// The input a case's aliased output starts from (the drivers copy it into the shared buffer).
inline const std::vector<float>* alias_source(const StepCase& c, const StepInputs& in) {
  switch (c.alias) {
    case Alias::kOutX:
      return &in.x;
    case Alias::kOutH:
      return &in.h[c.last_hist()];
    case Alias::kHistOutH:
      return &in.h[c.first_hist()];
    case Alias::kNone:
      break;
  }
  return nullptr;
}

struct Report {
  int64_t cases = 0;
  int64_t failures = 0;  // failed cases
  int printed = 0;
  void fail(const std::string& what) {
    ++failures;
    if (printed < 30) {
      std::fprintf(stderr, "FAIL %s\n", what.c_str());
      ++printed;
    } else if (printed == 30) {
      std::fprintf(stderr, "(further failures not printed)\n");
      ++printed;
    }
  }
};

inline bool close(double got, double want, double tol) { return std::fabs(got - want) <= tol; }  // NaN: false

// Checks out [B, M] (float32), hist_out [B, M] (float32, when the case has it) and out_net
// [net_rows B, M] (dtype) of one case against the double-precision formula; returns "" or the
// first mismatch.
inline std::string check_step(const StepCase& c, const StepInputs& in, const float* out, const float* hist_out,
                              const void* out_net) {
  const int64_t B = c.B, M = c.M;
  const bool has_f = c.f != FMode::kNone, has_eps = c.eps != EpsMode::kNone;
  const double a = c.churn ? 1.0 : kA, bf = has_f ? kB : 0.0, sd = has_eps ? kStd : 0.0;
  const double w = in.w;
  const double out_eps = dtype_eps(c.dtype);
  char msg[300];
  for (int64_t b = 0; b < B; ++b) {
    const double kb = c.f == FMode::kCfgK ? in.k[static_cast<size_t>(b)] : 1.0;
    edmfast::float4x32 z{0, 0, 0, 0};
    for (int64_t e = 0; e < M; ++e) {
      const int64_t i = b * M + e;
      const double x = in.x[static_cast<size_t>(i)];
      double F = 0, F_scale = 0;
      if (c.f == FMode::kB) {
        F = load_elem(c.dtype, in.f1.data(), i);
        F_scale = std::fabs(F);
      } else if (has_f) {
        const double cond = load_elem(c.dtype, in.f2.data(), i);
        const double uncond = load_elem(c.dtype, in.f2.data(), B * M + i);
        F = kb * (uncond + w * (cond - uncond));
        F_scale = std::fabs(kb) * (std::fabs(uncond) + w * (std::fabs(cond) + std::fabs(uncond)));
      }
      double eps = 0;
      if (c.eps == EpsMode::kNoise) {
        eps = in.noise[static_cast<size_t>(i)];
      } else if (c.eps == EpsMode::kSeeds) {
        if (e % 4 == 0)
          z = edmfast::philox_normal4(static_cast<uint64_t>(in.seeds[static_cast<size_t>(b)]), in.step,
                                      static_cast<uint64_t>(e / 4), c.stage);
        const float n4[4] = {z.n0, z.n1, z.n2, z.n3};
        eps = n4[e % 4];
      }
      double want = a * x + bf * F + sd * eps;
      double scale = std::fabs(a * x) + std::fabs(bf) * F_scale + std::fabs(sd * eps);
      for (int j = 0; j < edmfast::kHistory; ++j) {
        if (!c.has(j)) continue;
        const double h = in.h[j][static_cast<size_t>(i)];
        want += kC[j] * h;
        scale += std::fabs(kC[j] * h);
      }
      const double tol = 1e-5 * scale + 1e-6;
      const double got = out[i];
      if (!close(got, want, tol)) {
        std::snprintf(msg, sizeof(msg), "out[%lld, %lld] = %.9g, want %.9g (tol %.3g)", static_cast<long long>(b),
                      static_cast<long long>(e), got, want, tol);
        return msg;
      }
      if (c.hist_out) {
        const double hq = has_f ? kHq : 0.0;
        const double want_h = kHp * x + hq * F;
        const double tol_h = 1e-5 * (std::fabs(kHp * x) + std::fabs(hq) * F_scale) + 1e-6;
        if (!close(hist_out[i], want_h, tol_h)) {
          std::snprintf(msg, sizeof(msg), "hist_out[%lld, %lld] = %.9g, want %.9g (tol %.3g)",
                        static_cast<long long>(b), static_cast<long long>(e), static_cast<double>(hist_out[i]), want_h,
                        tol_h);
          return msg;
        }
      }
      for (int64_t j = 0; j < c.net_rows; ++j) {
        const double got_net = load_elem(c.dtype, out_net, (j * B + b) * M + e);
        const double want_net = kNet * want;
        const double tol_net = out_eps * std::fabs(want_net) + kNet * tol + 1e-6;
        if (!close(got_net, want_net, tol_net)) {
          std::snprintf(msg, sizeof(msg), "out_net[%lld, %lld] = %.9g, want %.9g (tol %.3g)",
                        static_cast<long long>(j * B + b), static_cast<long long>(e), got_net, want_net, tol_net);
          return msg;
        }
      }
    }
  }
  return "";
}

// ------------------------------------------------------------------ non-finite recording (StepArgs::bad)

constexpr int32_t kBadNone = 0x7FFFFFFF;  // what the engine fills bad with before its loop
constexpr int32_t kBadFirst = 7, kBadLater = 9;

// Plants a non-finite value in every even sample of x [B, M] (NaN in every fourth, inf in the
// others, at a different element each); odd samples stay finite.
inline void plant_nonfinite(std::vector<float>& x, int64_t B, int64_t M) {
  if (M == 0) return;
  for (int64_t b = 0; b < B; b += 2) x[static_cast<size_t>(b * M + (b * 7 + 3) % M)] = b % 4 ? -INFINITY : NAN;
}

// After passes at kBadFirst then kBadLater over plant_nonfinite's x: even samples hold the
// first (the min), odd ones were never touched. With `finite`, nothing may have been touched.
inline std::string check_bad(const int32_t* bad, int64_t B, int64_t M, bool finite) {
  char msg[120];
  for (int64_t b = 0; b < B; ++b) {
    const int32_t want = (!finite && M > 0 && b % 2 == 0) ? kBadFirst : kBadNone;
    if (bad[b] != want) {
      std::snprintf(msg, sizeof(msg), "bad[%lld] = %d, want %d", static_cast<long long>(b), bad[b], want);
      return msg;
    }
  }
  return "";
}

// ------------------------------------------------------------------ CFG rescale

struct CfgCase {
  int64_t B = 1, M = 1;
  DType dtype = DType::kFloat32;
  bool constant = false;  // every element of cond and uncond equal: std(cfg) = 0, ratio 1
  float w = 7.5f;
  float phi = 0.7f;
  std::string name() const {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "cfg B=%lld M=%lld %s%s w=%g phi=%g", static_cast<long long>(B),
                  static_cast<long long>(M), dtype_name(dtype), constant ? " constant" : "", w, phi);
    return buf;
  }
};

constexpr float kCfgPhis[] = {0.0f, 0.7f, 1.0f};

struct CfgInputs {
  std::vector<unsigned char> cond, uncond;  // [B, M] each, dtype storage
};

inline CfgInputs make_cfg_inputs(int64_t B, int64_t M, DType dtype, bool constant, uint64_t seed) {
  CfgInputs in;
  Rng rng(seed);
  const size_t n = static_cast<size_t>(B * M), es = dtype_size(dtype);
  in.cond.resize(n * es);
  in.uncond.resize(n * es);
  for (size_t i = 0; i < n; ++i) {
    const auto ii = static_cast<int64_t>(i);
    // per-sample offsets and spreads differ, so a row mix-up changes k
    const float mean = 0.5f * static_cast<float>(i / (M > 0 ? M : 1) % 3);
    const float spread = 1.0f + 0.5f * static_cast<float>(i / (M > 0 ? M : 1) % 2);
    store_elem(dtype, in.cond.data(), ii, constant ? 1.25f : mean + spread * rng.uniform(-1.0f, 1.0f));
    store_elem(dtype, in.uncond.data(), ii, constant ? 1.25f : 0.8f * mean + rng.uniform(-1.0f, 1.0f));
  }
  return in;
}

// k[b] in double from the stored values (edmfast/reference.py cfg_rescale_factors).
inline std::vector<double> cfg_reference_k(const CfgCase& c, const CfgInputs& in) {
  std::vector<double> k(static_cast<size_t>(c.B), 1.0);
  if (c.M < 2) return k;
  for (int64_t b = 0; b < c.B; ++b) {
    double sc = 0, sg = 0;
    for (int64_t e = 0; e < c.M; ++e) {
      const double x = load_elem(c.dtype, in.cond.data(), b * c.M + e);
      const double u = load_elem(c.dtype, in.uncond.data(), b * c.M + e);
      sc += x;
      sg += u + c.w * (x - u);
    }
    const double mc = sc / static_cast<double>(c.M), mg = sg / static_cast<double>(c.M);
    double vc = 0, vg = 0;
    for (int64_t e = 0; e < c.M; ++e) {
      const double x = load_elem(c.dtype, in.cond.data(), b * c.M + e);
      const double u = load_elem(c.dtype, in.uncond.data(), b * c.M + e);
      const double g = u + c.w * (x - u);
      vc += (x - mc) * (x - mc);
      vg += (g - mg) * (g - mg);
    }
    const double ratio = vg > 0 ? std::sqrt(vc / vg) : 1.0;
    k[static_cast<size_t>(b)] = c.phi * ratio + (1.0 - c.phi);
  }
  return k;
}

inline std::string check_cfg_factors(const CfgCase& c, const std::vector<double>& k_ref, const float* k) {
  char msg[200];
  for (int64_t b = 0; b < c.B; ++b) {
    const double want = k_ref[static_cast<size_t>(b)];
    if (!close(k[b], want, 2e-4 * std::fabs(want) + 1e-6)) {
      std::snprintf(msg, sizeof(msg), "k[%lld] = %.9g, want %.9g", static_cast<long long>(b),
                    static_cast<double>(k[b]), want);
      return msg;
    }
  }
  return "";
}

inline std::string check_cfg(const CfgCase& c, const CfgInputs& in, const std::vector<double>& k_ref,
                             const void* out) {
  char msg[200];
  const double out_eps = dtype_eps(c.dtype);
  for (int64_t b = 0; b < c.B; ++b) {
    const double kb = k_ref[static_cast<size_t>(b)];
    for (int64_t e = 0; e < c.M; ++e) {
      const int64_t i = b * c.M + e;
      const double x = load_elem(c.dtype, in.cond.data(), i);
      const double u = load_elem(c.dtype, in.uncond.data(), i);
      const double want = kb * (u + c.w * (x - u));
      const double scale = std::fabs(kb) * (std::fabs(u) + c.w * (std::fabs(x) + std::fabs(u)));
      const double tol = out_eps * std::fabs(want) + 2e-4 * scale + 1e-6;
      const double got = load_elem(c.dtype, out, i);
      if (!close(got, want, tol)) {
        std::snprintf(msg, sizeof(msg), "out[%lld, %lld] = %.9g, want %.9g (tol %.3g)", static_cast<long long>(b),
                      static_cast<long long>(e), got, want, tol);
        return msg;
      }
    }
  }
  return "";
}

// ------------------------------------------------------------------ the size matrix

// ------------------------------------------------------------------ the ancestral pass (ancestral_step)

struct AncCase {
  int64_t B = 1, M = 1;
  DType dtype = DType::kFloat32;
  int variance = 0;        // edmfast::Variance: 0 fixed, 1 learned, 2 learned_range
  bool clip = false;
  FMode f = FMode::kB;     // kB, kCfg or kCfgK (f is required)
  EpsMode eps = EpsMode::kNone;
  bool last = false;       // s = 0: no noise even with eps, whatever exp(V / 2) is
  bool alias = false;      // out == x
  int net_rows = 0;
  bool w_ptr = false;
  bool bad = false;
  bool wide = false;       // a 16-float row with cf and the clip bound (else the 8-float row)

  int64_t f_rows() const { return f == FMode::kB ? B : 2 * B; }
  int64_t m() const { return variance == 0 ? M : 2 * M; }
  int64_t coef_floats() const { return wide ? 16 : 8; }
  std::string name() const {
    static const char* vn[] = {"fixed", "learned", "learned_range"};
    static const char* fn[] = {"none", "B", "2B", "2B+k"};
    static const char* en[] = {"none", "noise", "seeds"};
    char buf[240];
    std::snprintf(buf, sizeof(buf),
                  "ancestral B=%lld M=%lld %s %s clip=%d f=%s eps=%s last=%d alias=%d net_rows=%d w_ptr=%d bad=%d "
                  "wide=%d",
                  static_cast<long long>(B), static_cast<long long>(M), dtype_name(dtype), vn[variance], clip ? 1 : 0,
                  fn[static_cast<int>(f)], en[static_cast<int>(eps)], last ? 1 : 0, alias ? 1 : 0, net_rows,
                  w_ptr ? 1 : 0, bad ? 1 : 0, wide ? 1 : 0);
    return buf;
  }
};

// variance x clip x f x eps (54 cases), the other switches spread over them.
inline std::vector<AncCase> anc_feature_cases(int64_t B, int64_t M, DType dtype) {
  std::vector<AncCase> cases;
  int i = 0;
  for (int v = 0; v < 3; ++v)
    for (int clip = 0; clip < 2; ++clip)
      for (int f = 1; f < 4; ++f)
        for (int e = 0; e < 3; ++e, ++i) {
          AncCase c;
          c.B = B;
          c.M = M;
          c.dtype = dtype;
          c.variance = v;
          c.clip = clip != 0;
          c.f = static_cast<FMode>(f);
          c.eps = static_cast<EpsMode>(e);
          c.last = i % 5 == 4;
          c.alias = i % 2 == 1;
          c.net_rows = i % 3;
          c.w_ptr = i % 4 == 1;
          c.bad = i % 2 == 0;
          c.wide = i % 3 != 1;
          cases.push_back(c);
        }
  return cases;
}

// f buffers for the fixed (m = M) and learned (m = 2M) layouts, B and 2B rows, in dtype storage.
// Predictions in [-2, 2]; the variance halves in [-1, 1] (a valid learned_range frac and a
// plausible raw log variance both).
struct AncInputs {
  std::vector<float> x, noise, k;
  std::vector<unsigned char> f_fixed1, f_fixed2, f_learn1, f_learn2;
  std::vector<int64_t> seeds;
  float w = 4.5f;
  uint32_t step = 5;
  const std::vector<unsigned char>& f(const AncCase& c) const {
    if (c.variance == 0) return c.f == FMode::kB ? f_fixed1 : f_fixed2;
    return c.f == FMode::kB ? f_learn1 : f_learn2;
  }
};

inline AncInputs make_anc_inputs(int64_t B, int64_t M, DType dtype, uint64_t seed) {
  AncInputs in;
  Rng rng(seed);
  const size_t n = static_cast<size_t>(B * M), es = dtype_size(dtype);
  in.x.resize(n);
  in.noise.resize(n);
  for (size_t i = 0; i < n; ++i) {
    in.x[i] = rng.uniform(-2.0f, 2.0f);
    in.noise[i] = rng.uniform(-3.0f, 3.0f);
  }
  auto fill = [&](std::vector<unsigned char>& buf, int64_t rows, bool learned) {
    buf.resize(static_cast<size_t>(rows * (learned ? 2 : 1) * M) * es);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t e = 0; e < (learned ? 2 : 1) * M; ++e) {
        const float v = e < M ? rng.uniform(-2.0f, 2.0f) : rng.uniform(-1.0f, 1.0f);
        store_elem(dtype, buf.data(), r * (learned ? 2 : 1) * M + e, v);
      }
  };
  fill(in.f_fixed1, B, false);
  fill(in.f_fixed2, 2 * B, false);
  fill(in.f_learn1, B, true);
  fill(in.f_learn2, 2 * B, true);
  in.k.resize(static_cast<size_t>(B));
  in.seeds.resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    in.k[static_cast<size_t>(b)] = 0.7f + 0.15f * static_cast<float>(b % 4);
    in.seeds[static_cast<size_t>(b)] = static_cast<int64_t>(0x9E3779B97F4A7C15ull * static_cast<uint64_t>(b + 1));
  }
  return in;
}

constexpr float kAx = 1.3f, kAf = -0.6f, kCoef1 = 0.7f, kCoef2 = 0.4f, kLogBeta = -4.0f, kLogBetaTilde = -5.0f,
                kS = 0.8f, kAncC = 0.25f, kCf = -0.3f, kClipBound = 0.8f;

// The 8-float row, or the 16-float one with cf and the clip bound (NaN padding, never read).
inline std::vector<float> anc_coef(const AncCase& c) {
  std::vector<float> row = {kAx, kAf, kCoef1, kCoef2, kLogBeta, kLogBetaTilde, c.last ? 0.0f : kS, kAncC};
  if (c.wide) {
    row.push_back(kCf);
    row.push_back(kClipBound);
    row.resize(16, NAN);
  }
  return row;
}

// Checks out [B, M] and out_net [net_rows B, M] of one ancestral case against the double formula.
inline std::string check_anc(const AncCase& c, const AncInputs& in, const float* out, const void* out_net) {
  const int64_t B = c.B, M = c.M, m = c.m();
  const std::vector<unsigned char>& f = in.f(c);
  const double w = in.w, s = c.last ? 0.0 : kS;
  const double out_eps = dtype_eps(c.dtype);
  char msg[300];
  for (int64_t b = 0; b < B; ++b) {
    const double kb = c.f == FMode::kCfgK ? in.k[static_cast<size_t>(b)] : 1.0;
    edmfast::float4x32 z4{0, 0, 0, 0};
    for (int64_t e = 0; e < M; ++e) {
      const int64_t i = b * M + e;
      const double x = in.x[static_cast<size_t>(i)];
      double F, F_scale;
      const double cond = load_elem(c.dtype, f.data(), b * m + e);
      if (c.f == FMode::kB) {
        F = cond;
        F_scale = std::fabs(F);
      } else {
        const double uncond = load_elem(c.dtype, f.data(), (B + b) * m + e);
        F = kb * (uncond + w * (cond - uncond));
        F_scale = std::fabs(kb) * (std::fabs(uncond) + w * (std::fabs(cond) + std::fabs(uncond)));
      }
      const double bound = c.wide ? kClipBound : 1.0, cf = c.wide ? kCf : 0.0;
      double x0 = kAx * x + kAf * F;
      if (c.clip) x0 = x0 < -bound ? -bound : (x0 > bound ? bound : x0);
      double want = kCoef1 * x0 + kCoef2 * x + cf * F;
      double scale = std::fabs(kCoef1) * (std::fabs(kAx * x) + std::fabs(kAf) * F_scale) + std::fabs(kCoef2 * x) +
                     std::fabs(cf) * F_scale;
      if (c.eps != EpsMode::kNone && s != 0.0) {
        double z = 0;
        if (c.eps == EpsMode::kNoise) {
          z = in.noise[static_cast<size_t>(i)];
        } else {
          if (e % 4 == 0)
            z4 = edmfast::philox_normal4(static_cast<uint64_t>(in.seeds[static_cast<size_t>(b)]), in.step,
                                         static_cast<uint64_t>(e / 4), 0u);
          const float n4[4] = {z4.n0, z4.n1, z4.n2, z4.n3};
          z = n4[e % 4];
        }
        double sd = s;
        if (c.variance != 0) {
          const double v = load_elem(c.dtype, f.data(), b * m + M + e);
          const double frac = (v + 1.0) / 2.0;
          const double logvar = c.variance == 1 ? v : frac * kLogBeta + (1.0 - frac) * kLogBetaTilde;
          sd = s * std::exp(logvar / 2.0);
        }
        want += sd * z;
        scale += std::fabs(sd * z);
      }
      const double tol = 1e-5 * scale + 1e-6;
      const double got = out[i];
      if (!close(got, want, tol)) {
        std::snprintf(msg, sizeof(msg), "out[%lld, %lld] = %.9g, want %.9g (tol %.3g)", static_cast<long long>(b),
                      static_cast<long long>(e), got, want, tol);
        return msg;
      }
      for (int64_t j = 0; j < c.net_rows; ++j) {
        const double got_net = load_elem(c.dtype, out_net, (j * B + b) * M + e);
        const double want_net = kAncC * want;
        const double tol_net = out_eps * std::fabs(want_net) + kAncC * tol + 1e-6;
        if (!close(got_net, want_net, tol_net)) {
          std::snprintf(msg, sizeof(msg), "out_net[%lld, %lld] = %.9g, want %.9g (tol %.3g)",
                        static_cast<long long>(j * B + b), static_cast<long long>(e), got_net, want_net, tol_net);
          return msg;
        }
      }
    }
  }
  return "";
}

constexpr int64_t kBatches[] = {1, 2, 3};
constexpr int64_t kNumels[] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 1023, 1025, 3 * 37 * 41};
constexpr int64_t kNumelsQuick[] = {0, 1, 3, 4, 5, 9, 1025};

}  // namespace sanitize
