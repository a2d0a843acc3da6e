#!/usr/bin/env bash
# The GPU suite: on a machine with one NVIDIA H100 or H200, builds the CUDA extension, runs the
# GPU tests and every benchmark, and writes summary.json. It ends by itself inside its budget
# (SUITE_BUDGET_S, default 420 s) and brings back every headline number in that one invocation; a
# second invocation given the first's summary runs only what the first did not reach, and merges.
# benchmarks/README.md describes the sections, the files and the summary keys.
#
#   bash benchmarks/fetch_wheels.sh            once, where pip reaches the index: .whl/ (the
#                                              peers' wheels, for a GPU machine without network)
#   bash benchmarks/gpu_suite.sh               the suite; its files go to $OUT (default: a new
#                                              folder under /tmp, printed at the end)
#   bash benchmarks/gpu_suite.sh --prepare DIR a second invocation will continue the one whose files
#                                              are in DIR (copies its summary.json and junit.xml to
#                                              .suite/previous/, where the next invocation reads them)
#   python benchmarks/collect_results.py DIR [DIR2]   files them as benchmarks/results/<date>-<gpu>.*
#   bash benchmarks/gpu_suite.sh --rehearse    the whole script on the CPU, tiny sizes (CI runs it)
#
# Sections, in priority order, each under its own time limit inside the budget:
#   probe build ops sampler sd compile tests sanitize accuracy overhead
# The sections before tests bring back the headline numbers; tests a first invocation cannot
# finish are continued by a second. After every section $OUT/summary.json is rewritten atomically
# (benchmarks/collect_results.py), so a kill at any second returns every finished section. Files
# in $OUT (at most 7, temporary files are written outside it):
#   summary.json  log  junit.xml  ops.json  sampler.json  accuracy.json  accuracy.png
#
# Environment: SUITE_BUDGET_S (420), SUITE_SECTIONS (default: all, in the order above),
#   SUITE_SKIP (sections to leave out), SUITE_PREVIOUS (folder with a previous invocation's
#   summary.json [+ junit.xml]; default .suite/previous), EDMFAST_GIT_COMMIT (else .suite/commit,
#   else git), PYTHON (python3), OUT (default: a fresh folder under /tmp), SUITE_WORK (scratch:
#   Markdown, logs; a temporary folder, removed at the end, otherwise).
set +e
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
MODE=gpu
case ${1:-} in
  --rehearse) MODE=rehearsal ;;
  --prepare) MODE=prepare ;;
  "") ;;
  *)
    echo "usage: $0 [--rehearse | --prepare [FOLDER_OF_A_PREVIOUS_RUN]]" >&2
    exit 2
    ;;
esac

# --- --prepare: in the clone, before running the suite where the clone's .git is not ----------
# .suite/commit names the commit (and whether the tree differed from it) for a copy of the tree
# without .git; .suite/previous/ holds a previous invocation's summary.json and junit.xml.
if [[ $MODE == prepare ]]; then
  exclude=$(git rev-parse --git-path info/exclude) || exit 1
  mkdir -p "$(dirname "$exclude")" .suite
  grep -qxF '/.suite/' "$exclude" 2>/dev/null || echo '/.suite/' >>"$exclude"
  commit=$(git rev-parse HEAD)
  if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
    commit="$commit+dirty.$(git diff HEAD | sha256sum | cut -c1-12)"
  fi
  echo "$commit" >.suite/commit
  rm -rf .suite/previous
  if [[ -n ${2:-} ]]; then
    [[ -f $2/summary.json ]] || { echo "$2 holds no summary.json" >&2; exit 2; }
    mkdir -p .suite/previous
    cp "$2/summary.json" .suite/previous/
    [[ -f $2/junit.xml ]] && cp "$2/junit.xml" .suite/previous/
  fi
  compgen -G ".whl/*.whl" >/dev/null || echo "note: no .whl/ (bash benchmarks/fetch_wheels.sh): an offline machine without diffusers / k-diffusion skips their peers" >&2
  echo "commit $commit; continuing: ${2:-nothing}. Next: bash benchmarks/gpu_suite.sh (copy .suite/ and .whl/ with the tree)"
  exit 0
fi

BUDGET=${SUITE_BUDGET_S:-420}
RESERVE=3 # seconds kept for the last summary update
if [[ -z ${OUT:-} ]]; then OUT=$(mktemp -d /tmp/edmfast-suite-out.XXXXXX); fi
mkdir -p "$OUT"
# this run's files only: anything an earlier run left in $OUT is removed, never reported
rm -f "$OUT"/{summary.json,log,junit.xml,ops.json,sampler.json,accuracy.json,accuracy.png,overhead.json} "$OUT"/.*.tmp
# Files are written to a temporary name and renamed over the old one. The temporary names live
# beside $OUT on the same filesystem (a rename across filesystems is not atomic): a kill between
# write and rename then leaves nothing extra in $OUT. Inside $OUT only where no such folder can be
# made; the suite then removes leftovers when it ends or is stopped (7 named files + 1 <= 8).
EDMFAST_TMPDIR=$(mktemp -d "$(dirname "$OUT")/.edmfast-suite-tmp.XXXXXX" 2>/dev/null) || EDMFAST_TMPDIR=""
if [[ -n $EDMFAST_TMPDIR && $(stat -c %d "$EDMFAST_TMPDIR") != $(stat -c %d "$OUT") ]]; then
  rmdir "$EDMFAST_TMPDIR"
  EDMFAST_TMPDIR=""
fi
export EDMFAST_TMPDIR
if [[ -n ${SUITE_WORK:-} ]]; then # scratch (Markdown, junit of the extra module, build logs)
  WORK=$SUITE_WORK
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d /tmp/edmfast-suite.XXXXXX)
fi
cleanup() {
  [[ -z ${SUITE_WORK:-} ]] && rm -rf "$WORK"
  [[ -n $EDMFAST_TMPDIR ]] && rm -rf "$EDMFAST_TMPDIR"
  rm -f "$OUT"/.*.tmp
}
trap cleanup EXIT
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)-$$-$RANDOM"
export EDMFAST_SUITE_RUN=$RUN_ID OUT WORK MODE ROOT PY
exec > >(tee -a "$OUT/log") 2>&1
TEE_PID=$!

ALL="probe build ops sampler sd compile tests sanitize accuracy"
[[ -f benchmarks/bench_overhead.py ]] && ALL="$ALL overhead"
SECTIONS=${SUITE_SECTIONS:-$ALL}
PREV=${SUITE_PREVIOUS:-.suite/previous}
prev_arg=()
[[ -f $PREV/summary.json ]] && prev_arg=(--previous "$PREV") # taken only for the same kind, commit and GPU
update() { "$PY" benchmarks/collect_results.py suite-update --out "$OUT" --elapsed "$SECONDS" "$@"; }
DONE=" $("$PY" benchmarks/collect_results.py suite-init --out "$OUT" --kind "$MODE" --budget "$BUDGET" \
  --sections "$SECTIONS" --run "$RUN_ID" "${prev_arg[@]}") "
# whether suite-init continued the previous invocation (same kind, commit and GPU model)
PREVIOUS_TAKEN=$("$PY" -c 'import json, sys; print(int(bool(json.load(open(sys.argv[1])).get("previous"))))' "$OUT/summary.json")
export PREV PREVIOUS_TAKEN
echo "=== edmfast GPU suite ($MODE) $(date -u +%FT%TZ) run $RUN_ID, budget ${BUDGET} s, out $OUT"
[[ $DONE != "  " ]] && echo "=== finished by the invocation this one continues (skipped):$DONE"

# Section limits in seconds, "cap minimum": a section starts only with its minimum left and runs
# at most min(cap, what is left). The headline sections' estimates on an H200 (benchmarks/README.md)
# add up to 310-450 s: at 420 s the first invocation reaches compile; tests take what is left
# and a second invocation continues them, then sanitize, accuracy and overhead.
declare -A LIMITS
if [[ $MODE == gpu ]]; then
  # sampler / sd / compile: the minimum is bench_sampler.py's own (SECTION_TIME: copy 10 + cifar 40,
  # sd_compiled 90, compile_cold 60) plus the 10 s it is given for start-up and wrap-up; sd's cap
  # keeps >= 90 s for compile at the estimates' high end
  LIMITS=([probe]="30 5" [build]="120 30" [ops]="60 20" [sampler]="90 60" [sd]="150 100"
    [compile]="120 70" [tests]="150 30" [sanitize]="150 40" [accuracy]="60 15" [overhead]="60 20")
else
  LIMITS=([probe]="30 3" [build]="60 5" [tests]="60 10" [ops]="30 5" [sampler]="60 10"
    [compile]="10 1" [sd]="60 10" [sanitize]="20 2" [accuracy]="40 5" [overhead]="30 5")
fi

# carried wheels go to /tmp/site (probe installs them); the tree's edmfast (built in place) first
if [[ $MODE == gpu ]] && compgen -G ".whl/*.whl" >/dev/null; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# --- the sections (each runs in its own bash under `timeout`; exit 0 with $WORK/<name>.skip
#     holding a reason records "skipped") ------------------------------------------------------

sec_probe() {
  if [[ $MODE == gpu ]] && compgen -G ".whl/*.whl" >/dev/null; then
    # everything but setuptools now; setuptools only where the image's is too old for the
    # build's SPDX license string (setuptools >= 77)
    local wheels=() w
    for w in .whl/*.whl; do [[ $(basename "$w") == setuptools-* ]] || wheels+=("$w"); done
    if ((${#wheels[@]})); then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}" || return 1
    fi
  fi
  if ! "$PY" -c \
    'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
    if [[ $MODE == gpu ]] && compgen -G ".whl/setuptools-*.whl" >/dev/null; then
      echo "setuptools < 77 in the image: installing the carried wheel"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/setuptools-*.whl || return 1
    else
      echo "WARNING: setuptools < 77 and no .whl/setuptools-*.whl: the build will fail (license = SPDX string)"
    fi
  fi
  local smi=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    smi=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.limit --format=csv
  fi
  SMI=$smi "$PY" - >"$WORK/env.json" <<'PYEOF'
import importlib.metadata as md, json, os, platform, shutil, subprocess, sys, datetime
sys.path.insert(0, "benchmarks")
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
       "host_cores": os.cpu_count(), "mode": os.environ["MODE"]}
smi = os.environ.get("SMI", "")
env["gpu"], env["driver"] = ([s.strip() for s in smi.split(",")] + [None, None])[:2] if smi else (None, None)
try:
    import torch
    env["torch"], env["torch_cuda"] = torch.__version__, torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        env["gpu_torch"] = torch.cuda.get_device_name(0)
except Exception as e:  # recorded: the rest of the suite will say what failed
    env["torch"] = f"import failed: {e}"
for n in ("triton", "numpy", "setuptools", "pybind11", "diffusers", "k-diffusion", "pytest", "pytest-xdist"):
    env[n.replace("-", "_")] = version(n)
nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
if nvcc:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    env["nvcc"] = out.strip().splitlines()[-1] if out.strip() else None
import common
env["commit"], env["commit_source"] = common.git_commit()
print(json.dumps(env))
PYEOF
  cat "$WORK/env.json"
}

sec_build() {
  if [[ $MODE == gpu ]]; then
    EDMFAST_CUDA=1 EDMFAST_CUDA_ARCH=${EDMFAST_CUDA_ARCH:-90} "$PY" setup.py build_ext --inplace || return 1
    # fail loudly: a build that left edmfast._C or its CUDA part out must not pass as a build
    "$PY" - >"$WORK/build.json" <<'PYEOF' || return 1
import json, sys, torch
from edmfast import ops
try:
    import edmfast._C as C
except ImportError as e:
    print(json.dumps({"extension": False, "extension_cuda": False, "error": str(e)}))
    sys.exit("BUILD BROKEN: edmfast._C does not import: " + str(e))
status = {b: ops.backend_status(b, torch.device("cuda")) for b in ("cuda", "triton")}
print(json.dumps({"extension": True, "extension_cuda": status["cuda"] is None, "backends": status}))
if status["cuda"] is not None:
    sys.exit("BUILD BROKEN: the CUDA part of edmfast._C is missing: " + status["cuda"])
PYEOF
    return 0
  fi
  # rehearsal: a CPU-only build out of the tree (the checkout's own extension stays as it is)
  if ! "$PY" -c "import pybind11" 2>/dev/null; then
    echo "pybind11 is not importable here (pip install pybind11): the build needs it" >"$WORK/build.skip"
    return 0
  fi
  EDMFAST_CUDA=0 "$PY" setup.py build_ext -b "$WORK/build" -t "$WORK/build-temp" || return 1
  "$PY" - "$WORK/build" >"$WORK/build.json" <<'PYEOF' || return 1
import glob, importlib.util, json, sys
paths = glob.glob(sys.argv[1] + "/edmfast/_C*.so")
if not paths:
    sys.exit("BUILD BROKEN: no edmfast/_C*.so was built")
spec = importlib.util.spec_from_file_location("edmfast._C", paths[0])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(json.dumps({"extension": True, "extension_cuda": bool(mod.has_cuda()), "path": paths[0]}))
PYEOF
}

sec_tests() {
  # Only what touches the GPU, in one pytest run (one junit): every test marked gpu, plus the modules
  # whose code paths differ when CUDA is present (the CLI and generate pick the CUDA device and
  # backend). benchmarks/suite_tests.py selects them and, continuing a previous invocation, leaves out
  # every test that invocation's junit holds. Threads are split between the xdist workers:
  # W workers x (cores / W) threads.
  local cores workers threads xd=()
  cores=$(nproc)
  workers=1
  if [[ $MODE == gpu ]] && "$PY" -c "import xdist" 2>/dev/null; then workers=$((cores >= 8 ? 8 : cores)); fi
  threads=$((cores / workers))
  ((threads < 1)) && threads=1
  ((workers > 1)) && xd=(-n "$workers")
  # one hung test must not take the whole section (pytest-timeout is in the image)
  "$PY" -c "import pytest_timeout" 2>/dev/null && xd+=(--timeout 90)
  export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads TORCHINDUCTOR_COMPILE_THREADS=1
  export EDMFAST_SUITE_TEST_MODULES="tests/test_cli.py tests/test_generate.py"
  # the rehearsal exercises the selection with the quick module only (generate's take a minute on
  # 2 cores, and CI's own test run covers both)
  [[ $MODE == rehearsal ]] && EDMFAST_SUITE_TEST_MODULES="tests/test_cli.py"
  export EDMFAST_SUITE_TESTS_INFO=$WORK/tests-select.json
  export PYTHONPATH=$ROOT/benchmarks:$PYTHONPATH
  if [[ -f $PREV/junit.xml && $PREVIOUS_TAKEN == 1 ]]; then
    export EDMFAST_SUITE_PREVIOUS_JUNIT=$PREV/junit.xml
    echo "tests: continuing $PREV/junit.xml (its tests are not run again)"
  fi
  echo "tests: $workers worker(s) x $threads thread(s)"
  "$PY" -m pytest -q -p no:cacheprovider -p suite_tests "${xd[@]}" --durations=10 \
    --junitxml="$OUT/junit.xml" -o junit_family=xunit2 tests
  local rc=$?
  "$PY" - "$rc" "$EDMFAST_SUITE_TESTS_INFO" >"$WORK/tests.json" <<'PYEOF'
import json, sys
try:
    info = json.load(open(sys.argv[2]))
except (OSError, ValueError):
    info = {}
print(json.dumps({"pytest_exit": int(sys.argv[1]), **info}))
PYEOF
  ((rc == 5)) && rc=0 # nothing selected: every test was in the previous junit
  return "$rc"
}

sec_ops() {
  # the eager peers only: torch.compile's four compiles cost more than the kernels' timing
  # (python benchmarks/bench_ops.py --device cuda runs all three peers)
  if [[ $MODE == gpu ]]; then
    # three sizes >= 64M elements (the kernel goal is stated there)
    "$PY" benchmarks/bench_ops.py --device cuda --sizes 67108864,134217728,268435456 --reps 20 \
      --peers eager,eager_tuned --json "$OUT/ops.json" --md "$WORK/ops.md"
  else
    "$PY" benchmarks/bench_ops.py --device cpu --quick --threads 1 --peers eager,eager_tuned \
      --json "$OUT/ops.json" --md "$WORK/ops.md"
  fi
}

sampler() { # sampler SECONDS args...: bench_sampler GPU mode, results added to $OUT/sampler.json
  local budget=$1
  shift
  local dev=(--device cuda)
  [[ $MODE == rehearsal ]] && dev=(--device cpu --tiny --repeats 1 --tiny-batches 1)
  "$PY" benchmarks/bench_sampler.py --mode gpu "${dev[@]}" --budget-s "$budget" --append \
    --out "$OUT" --stem sampler --md-dir "$WORK" "$@"
}

# bench_sampler.py ends its sections by this budget; the rest of the limit is its start-up and wrap-up
inner() { echo $((LIMIT - 10 > LIMIT / 2 ? LIMIT - 10 : LIMIT / 2)); }

sec_sampler() { sampler "$(inner)" --sections copy cifar --cifar-batches 1 64; }

sec_compile() {
  if [[ $MODE == rehearsal ]]; then
    echo "rehearsal: torch.compile of even the tiny UNet takes minutes on a 2-core CPU (the GPU run does it)" >"$WORK/compile.skip"
    return 0
  fi
  sampler "$(inner)" --sections compile_cold compile_warm
}

sec_sd() {
  if [[ $MODE == rehearsal ]]; then
    sampler "$(inner)" --sections sd --no-compile # the same loops, eager, tiny UNet
  else
    sampler "$(inner)" --sections sd_compiled --sd-batches 1
  fi
}

sec_sanitize() {
  # memcheck + racecheck on the driver's reduced matrix (--quick), one report line per tool.
  # sanitize.sh checks that compute-sanitizer exists and can run here (a tiny probe under it)
  # before it compiles its driver; exit 2 says why it cannot (no tool, no GPU, a host where the
  # tool answers "Device not supported"): recorded as skipped with that reason, never as unclean.
  local build=()
  [[ $MODE == rehearsal ]] && build=(--no-build) # nvcc works on a CPU box, but nothing can run what it builds
  SANITIZE_CUDA_TOOLS="memcheck racecheck" SANITIZE_REPORT="$WORK/sanitize.jsonl" \
    bash csrc/tests/sanitize.sh cuda --quick "${build[@]}"
  local rc=$?
  if ((rc == 2)); then
    tail -1 "$WORK/sanitize.jsonl" 2>/dev/null | "$PY" -c "import json,sys; print(json.loads(sys.stdin.read() or '{}').get('reason', 'sanitize.sh exit 2: a required tool is missing'))" >"$WORK/sanitize.skip"
    return 0
  fi
  return "$rc"
}

sec_accuracy() {
  local dev=(--device cuda)
  [[ $MODE == rehearsal ]] && dev=(--device cpu --quick)
  "$PY" benchmarks/bench_accuracy.py "${dev[@]}" --out "$OUT" --stem accuracy --md-dir "$WORK"
}

sec_overhead() {
  # benchmarks/bench_overhead.py (host overhead vs k-diffusion; runs on the CPU): its JSON is kept
  # in summary.json as results.overhead (no file of its own: $OUT holds at most 8)
  local args=(--out "$WORK/overhead") f
  [[ $MODE == rehearsal ]] && args+=(--quick)
  "$PY" benchmarks/bench_overhead.py "${args[@]}" || return 1
  for f in "$WORK"/overhead/*.json; do
    [[ -f $f ]] && cp "$f" "$WORK/overhead.json" && return 0
  done
  echo "bench_overhead.py wrote no JSON" >&2
  return 1
}

export -f sec_probe sec_build sec_tests sec_ops sampler inner sec_sampler sec_compile sec_sd sec_sanitize sec_accuracy sec_overhead

run_section() {
  local name=$1 cap min left limit t0 rc status reason="" extra=()
  read -r cap min <<<"${LIMITS[$name]:-60 5}"
  if [[ $DONE == *" $name "* ]]; then return; fi
  if [[ " ${SUITE_SKIP:-} " == *" $name "* ]]; then
    update --section "$name" --status skipped --reason "SUITE_SKIP"
    return
  fi
  left=$((BUDGET - SECONDS - RESERVE))
  if ((left < min)); then
    echo "=== section $name: not started ($left s left, needs $min s)"
    update --section "$name" --status no-time --reason "$left s of the budget left, the section needs $min s"
    return
  fi
  limit=$((cap < left ? cap : left))
  echo "=== section $name (limit $limit s, elapsed $SECONDS s)"
  update --section "$name" --status running --limit-s "$limit"
  t0=$SECONDS
  # `timeout` runs the section in its own process group and signals all of it at the limit; it
  # runs in the background so that a signal to the suite reaches it too (on_signal)
  CURRENT=$name
  LIMIT=$limit timeout -s INT -k 5 "$limit" bash -c "sec_$name" &
  SECTION_PID=$!
  wait "$SECTION_PID"
  rc=$?
  SECTION_PID=""
  if ((rc == 0)) && [[ -f $WORK/$name.skip ]]; then
    status=skipped
    reason=$(cat "$WORK/$name.skip")
  elif ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status=timeout
    reason="stopped at its limit of $limit s"
  else
    status=failed
    reason="exit $rc (see log)"
  fi
  case $name in
    probe) extra=(--env-json "$WORK/env.json") ;;
    build) [[ -f $WORK/build.json ]] && extra=(--result-json "$WORK/build.json") ;;
    tests) extra=(--junit "$OUT/junit.xml" --tests-info "$WORK/tests.json") ;;
    overhead) [[ -f $WORK/overhead.json ]] && extra=(--result-json "$WORK/overhead.json") ;;
    sanitize) [[ -f $WORK/sanitize.jsonl ]] && extra=(--sanitize-report "$WORK/sanitize.jsonl") ;;
  esac
  update --section "$name" --status "$status" --seconds $((SECONDS - t0)) --exit "$rc" --reason "$reason" "${extra[@]}"
  echo "=== section $name: $status (exit $rc) after $((SECONDS - t0)) s (elapsed $SECONDS s)"
}

# Stopped from outside (SIGTERM / SIGINT; a SIGKILL cannot be caught and leaves "running"): the
# running section is stopped with its whole process group and recorded as killed.
on_signal() {
  trap - INT TERM
  [[ -n ${SECTION_PID:-} ]] && kill -TERM "$SECTION_PID" 2>/dev/null
  [[ -n ${CURRENT:-} ]] && update --section "$CURRENT" --status killed --reason "the suite was stopped by a signal"
  rm -f "$OUT"/.*.tmp # a write the stopped section left half done (when temporaries live in $OUT)
  exit 143
}
trap on_signal INT TERM

for name in $SECTIONS; do
  [[ -n ${LIMITS[$name]:-} ]] || { echo "unknown section $name (known: $ALL)" >&2; continue; }
  export LIMIT
  run_section "$name"
done
update --complete
echo "=== edmfast GPU suite done in $SECONDS s of $BUDGET s; files in $OUT:"
ls -la "$OUT"
# a log past 16 MiB (a runaway test) is cut to its head and tail, so it still travels with the results
if [[ $(stat -c %s "$OUT/log" 2>/dev/null || echo 0) -gt 15000000 ]]; then
  { head -c 5000000 "$OUT/log"; echo; echo "[... log cut to 16 MiB ...]"; tail -c 9000000 "$OUT/log"; } >"$WORK/log"
  cp "$WORK/log" "$OUT/log"
fi
# A GPU run exits 0 (its files are there either way). A rehearsal fails when a section failed,
# which on the CPU means a broken script or benchmark (a budget cut is "timeout"/"no-time", not that).
if [[ $MODE == rehearsal ]]; then
  failed=$("$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); print(" ".join(k for k, v in s["sections"].items() if v["status"] == "failed"))' "$OUT/summary.json")
  if [[ -n $failed ]]; then
    echo "=== rehearsal FAILED: $failed" >&2
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit 1
  fi
fi
exec >&- 2>&- # the log is complete once tee has read everything
wait "$TEE_PID" 2>/dev/null
exit 0
