#!/usr/bin/env bash
# Native kernels under sanitizers (no Python, no torch): the standalone drivers sanitize_cpu.cpp and
# sanitize_cuda.cu call the kernel entry points of csrc/include/edmfast/ops.h directly over odd
# sizes, every dtype and every feature combination, with exact-size buffers.
#
#   csrc/tests/sanitize.sh [cpu]           CPU kernels: ASan + UBSan (leak checking on), then, when
#                                          valgrind is installed, a plain -O1 build under valgrind
#                                          memcheck on a reduced size set  (~35 s on 2 cores)
#   csrc/tests/sanitize.sh cuda            CUDA kernels: nvcc build, then compute-sanitizer memcheck
#                                          (full matrix), racecheck, initcheck and synccheck (reduced)
#   csrc/tests/sanitize.sh cuda --build-only   compile the CUDA driver only (no GPU needed)
#   csrc/tests/sanitize.sh all             both
#   SANITIZE_CUDA_TOOLS="memcheck racecheck" csrc/tests/sanitize.sh cuda --quick
#                                          the quick matrix (the GPU suite's; well under 60 s): the
#                                          reduced size/dtype/feature set under memcheck and racecheck
#
# Options: --quick (the reduced set everywhere), --build-only, --no-build (run the driver an earlier
#   --build-only left in SANITIZE_BUILD_DIR).
# Environment: CXX (g++), NVCC (auto: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, PATH),
#   CUDA_ARCH (90), COMPUTE_SANITIZER (auto: next to nvcc, then PATH), SANITIZE_CUDA_TOOLS (default
#   "memcheck racecheck initcheck synccheck"), SANITIZE_BUILD_DIR (/tmp/edmfast-sanitize),
#   SANITIZE_REQUIRE_VALGRIND=1 (fail instead of skipping when valgrind is missing),
#   SANITIZE_REPORT=FILE (CUDA: one JSON line per tool as soon as it finishes: tool, exit, seconds;
#   or one line with the reason when a required tool is missing or cannot run here). Every tool
#   runs even after one reports, so one run shows them all.
# Before the CUDA driver is compiled, compute-sanitizer, a GPU and the tool's ability to run on
# this host are checked: a 5-line probe kernel runs plainly and under memcheck. Some sandboxed
# hosts (gVisor) run CUDA but refuse the tool ("Device not supported", then error 999): that is
# the tool being unavailable, not a kernel bug, and is reported as such.
# Exit status: 0 clean; non-zero on any sanitizer report, failed case or build error; 2 when a
# required tool (compute-sanitizer, a GPU, valgrind if required) is missing or cannot run here.
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=cpu
build_only=0
no_build=0
quick=0
for arg in "$@"; do
  case $arg in
    cpu | cuda | all) mode=$arg ;;
    --build-only) build_only=1 ;;
    --no-build) no_build=1 ;;
    --quick) quick=1 ;;
    *)
      echo "usage: $0 [cpu|cuda|all] [--build-only] [--no-build] [--quick]" >&2
      exit 2
      ;;
  esac
done

BUILD=${SANITIZE_BUILD_DIR:-/tmp/edmfast-sanitize}
mkdir -p "$BUILD"
CXX=${CXX:-g++}
start=$SECONDS
say() { echo "=== sanitize: $* ($((SECONDS - start)) s)"; }
quick_arg=()
((quick)) && quick_arg=(--quick)

run_cpu() {
  local common=(-std=c++17 -O1 -g -fno-omit-frame-pointer -fopenmp -Icsrc/include
    csrc/tests/sanitize_cpu.cpp csrc/cpu/*.cpp)
  say "build CPU driver: ASan + UBSan, and a plain -O1 build for valgrind (in parallel)"
  # float-cast-overflow is not part of -fsanitize=undefined in GCC; the kernels convert no
  # out-of-range floats, so it is on as well.
  "$CXX" "${common[@]}" -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all \
    -o "$BUILD/sanitize_cpu_asan" &
  local asan_pid=$!
  "$CXX" "${common[@]}" -o "$BUILD/sanitize_cpu_plain" &
  local plain_pid=$!
  wait "$asan_pid"
  wait "$plain_pid"
  ((build_only)) && return 0

  say "run CPU driver under AddressSanitizer + UndefinedBehaviorSanitizer"
  # Leak detection works in this container (LeakSanitizer needs ptrace-like access, which some
  # sandboxes deny; there, add detect_leaks=0 here, with a note). abort_on_error gives a non-zero
  # exit status on the first report; halt_on_error is the default for ASan.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$BUILD/sanitize_cpu_asan" "${quick_arg[@]}"

  if command -v valgrind >/dev/null 2>&1; then
    say "run CPU driver (reduced sizes) under valgrind memcheck"
    # valgrind.supp: libgomp's idle worker threads are "possibly lost" at exit, nothing else.
    valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible \
      --suppressions=csrc/tests/valgrind.supp "$BUILD/sanitize_cpu_plain" --quick
  elif [[ ${SANITIZE_REQUIRE_VALGRIND:-0} == 1 ]]; then
    echo "valgrind is not installed (apt-get install -y valgrind) and SANITIZE_REQUIRE_VALGRIND=1" >&2
    exit 2
  else
    say "valgrind not installed: valgrind run SKIPPED (apt-get install -y valgrind)"
  fi
}

REPORT=${SANITIZE_REPORT:-}
report() { # report JSON-OBJECT: one line in SANITIZE_REPORT, when set
  [[ -n $REPORT ]] && echo "$1" >>"$REPORT"
  return 0
}
json_str() { # a JSON string literal of $1 (quotes, backslashes and control characters escaped)
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/ }
  s=${s//$'\t'/ }
  s=${s//$'\r'/}
  printf '"%s"' "$s"
}
missing() { # missing REASON: a required tool is absent or refuses this host; exit 2 (skipped by the GPU suite)
  echo "$1" >&2
  report "{\"tool\": null, \"exit\": 2, \"unavailable\": true, \"reason\": $(json_str "$1")}"
  exit 2
}
# compute-sanitizer's words for "I cannot instrument this device / host" (not a finding)
REFUSED='device not supported|not supported on this (device|platform|system)|CUDA_ERROR_UNKNOWN|error 999|unknown error'

probe_sanitizer() { # probe_sanitizer NVCC CS: a trivial kernel plainly, then under memcheck
  local nvcc=$1 cs=$2 out rc
  cat >"$BUILD/probe.cu" <<'CUEOF'
#include <cstdio>
__global__ void touch(int* p) { p[threadIdx.x] = threadIdx.x; }
int main() {
  int* p = nullptr;
  cudaError_t e = cudaMalloc(&p, 32 * sizeof(int));
  if (e == cudaSuccess) { touch<<<1, 32>>>(p); e = cudaDeviceSynchronize(); }
  if (e == cudaSuccess) e = cudaFree(p);
  if (e != cudaSuccess) { std::printf("probe: CUDA error %d: %s\n", int(e), cudaGetErrorString(e)); return 1; }
  return 0;
}
CUEOF
  "$nvcc" -arch="sm_${CUDA_ARCH:-90}" "$BUILD/probe.cu" -o "$BUILD/probe" ||
    missing "nvcc could not build the sanitizer probe (see above)"
  out=$("$BUILD/probe" 2>&1) && rc=0 || rc=$?
  ((rc == 0)) || missing "a trivial CUDA kernel does not run here (exit $rc): $(echo "$out" | head -3)"
  out=$("$cs" --tool memcheck --error-exitcode 1 "$BUILD/probe" 2>&1) && rc=0 || rc=$?
  if ((rc != 0)) || grep -qiE "$REFUSED" <<<"$out"; then
    missing "compute-sanitizer cannot run on this host (exit $rc on a trivial kernel that runs without it): $(grep -iE "$REFUSED|error" <<<"$out" | head -3 | tr '\n' ' ')"
  fi
}

find_nvcc() {
  local c
  for c in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
    if [[ -n $c && -x $c ]]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

build_cuda_driver() { # build_cuda_driver NVCC: the driver and every CUDA kernel source
  say "build CUDA driver with $1 (sm_${CUDA_ARCH:-90}, -lineinfo)"
  # -O2 is for the host-side checks only; device code is optimized as in the real build.
  "$1" -std=c++17 -arch="sm_${CUDA_ARCH:-90}" -lineinfo -O2 -Icsrc/include \
    csrc/tests/sanitize_cuda.cu csrc/cuda/*.cu -o "$BUILD/sanitize_cuda"
}

run_cuda() {
  local nvcc
  if ! nvcc=$(find_nvcc); then
    missing "nvcc not found (set NVCC or CUDA_HOME)"
  fi
  local cuda_home
  cuda_home=$(cd "$(dirname "$nvcc")/.." && pwd)
  if ((build_only)); then # no tool or GPU needed (CI checks that the driver compiles)
    build_cuda_driver "$nvcc"
    return 0
  fi

  # the tool, a GPU and the tool's ability to run here, before spending a build on the driver
  local cs=""
  for c in "${COMPUTE_SANITIZER:-}" "$cuda_home/bin/compute-sanitizer" "$cuda_home/compute-sanitizer/compute-sanitizer" \
    "$(command -v compute-sanitizer || true)"; do
    if [[ -n $c && -x $c ]]; then
      cs=$c
      break
    fi
  done
  if [[ -z $cs ]]; then
    missing "compute-sanitizer not found (looked in $cuda_home and on PATH; set COMPUTE_SANITIZER)"
  fi
  if ! nvidia-smi -L >/dev/null 2>&1; then
    missing "no GPU visible (nvidia-smi -L failed): CUDA kernels not run"
  fi
  say "probe: a trivial kernel plainly and under compute-sanitizer memcheck"
  probe_sanitizer "$nvcc" "$cs"
  ((no_build)) || build_cuda_driver "$nvcc"
  [[ -x $BUILD/sanitize_cuda ]] || missing "no CUDA driver at $BUILD/sanitize_cuda (--no-build: run --build-only first)"
  local bin="$BUILD/sanitize_cuda"
  local opts=(--error-exitcode 1 --print-limit 20)
  local tool rc failed=0 t0 log="$BUILD/sanitize-tool.log"
  for tool in ${SANITIZE_CUDA_TOOLS:-memcheck racecheck initcheck synccheck}; do
    t0=$SECONDS
    case $tool in
      memcheck)  # the full matrix (--quick: reduced); leak-check: every cudaMalloc is freed
        say "compute-sanitizer memcheck ($([[ $quick == 1 ]] && echo reduced || echo full) matrix)"
        "$cs" --tool memcheck "${opts[@]}" --leak-check full "$bin" "${quick_arg[@]}" 2>&1 | tee "$log" && rc=0 || rc=${PIPESTATUS[0]}
        ;;
      racecheck | initcheck | synccheck)  # shared-memory races, reads of unwritten memory, barriers
        say "compute-sanitizer $tool (reduced matrix)"
        "$cs" --tool "$tool" "${opts[@]}" "$bin" --quick 2>&1 | tee "$log" && rc=0 || rc=${PIPESTATUS[0]}
        ;;
      *)
        echo "unknown tool in SANITIZE_CUDA_TOOLS: $tool" >&2
        exit 2
        ;;
    esac
    say "compute-sanitizer $tool: exit $rc after $((SECONDS - t0)) s"
    if ((rc != 0)) && grep -qiE "$REFUSED" "$log"; then # refused past the probe: unavailable, not unclean
      report "{\"tool\": \"$tool\", \"exit\": null, \"unavailable\": true, \"reason\": $(json_str "$(grep -iE "$REFUSED" "$log" | head -2 | tr '\n' ' ')")}"
      continue
    fi
    report "{\"tool\": \"$tool\", \"exit\": $rc, \"seconds\": $((SECONDS - t0)), \"quick\": $quick}"
    ((rc == 0)) || failed=1
  done
  ((failed == 0)) || exit 1
}

case $mode in
  cpu) run_cpu ;;
  cuda) run_cuda ;;
  all)
    run_cpu
    run_cuda
    ;;
esac
say "OK ($mode$([[ $build_only == 1 ]] && echo ', build only'))"
