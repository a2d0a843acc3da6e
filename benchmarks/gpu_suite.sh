#!/usr/bin/env bash
# One device call: build, test and benchmark edmfast on the GPU machine, inside ~9 minutes.
#
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600)
#   then, here:  python benchmarks/collect_results.py <files_at>
#
# Options (environment): SUITE_BUDGET_S (default 540: the whole script, under the 600 s call
# limit), SUITE_SKIP="tests ops sampler accuracy" (any subset), SAMPLER_ARGS (extra arguments
# for bench_sampler.py, e.g. "--sections sd_compiled cifar_diffusers --sd-heun" for a second call).
#
# Every step is guarded: a failing step records its exit code in $OUT/suite.json and the next one
# runs. Files returned from $OUT (the device README allows 8, two folders deep at most):
#   log  suite.json  junit.xml  ops.json  ops.md  sampler.json  accuracy.json  accuracy.png
set +e
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/edmfast-suite-out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/edmfast-suite.XXXXXX)
BUDGET=${SUITE_BUDGET_S:-540}
SKIP=" ${SUITE_SKIP:-} "
PY=python3
exec > >(tee -a "$OUT/log") 2>&1

declare -a STEP_NAMES STEP_RCS STEP_SECS
record() { STEP_NAMES+=("$1"); STEP_RCS+=("$2"); STEP_SECS+=("$3"); echo "=== step $1: exit $2 after $3 s (elapsed ${SECONDS} s)"; }
left() { echo $((BUDGET - SECONDS)); }
# cap seconds for a step: min(cap, budget left - reserve), at least 10
cap() { local c=$1 reserve=${2:-0} l; l=$(($(left) - reserve)); ((l < c)) && c=$l; ((c < 10)) && c=10; echo "$c"; }
run_step() {  # run_step NAME CAP_S RESERVE_S command...
  local name=$1 limit t0 rc
  limit=$(cap "$2" "$3")
  shift 3
  if [[ $SKIP == *" $name "* ]]; then record "$name" skipped 0; return; fi
  if (($(left) < 15)); then record "$name" no-time 0; return; fi
  echo "=== step $name (limit ${limit} s): $*"
  t0=$SECONDS
  timeout -s INT -k 20 "$limit" "$@"
  rc=$?
  record "$name" "$rc" $((SECONDS - t0))
}

echo "=== edmfast GPU suite $(date -u +%FT%TZ) in $ROOT, budget ${BUDGET} s"

# --- environment ------------------------------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.limit --format=csv
nvidia-smi -L
if compgen -G ".whl/*.whl" >/dev/null; then
  t0=$SECONDS
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  record wheels $? $((SECONDS - t0))
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  record wheels "none-carried" 0
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
$PY - <<'PYEOF'
import importlib.metadata as md, torch
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for n in ("triton", "numpy", "diffusers", "k-diffusion", "torchsde", "scipy", "pytest", "pytest-timeout"):
    try:
        print(f"  {n} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"  {n} MISSING")
PYEOF

# --- build the extension (CPU + CUDA kernels) in place ----------------------------------
run_step build 240 200 env EDMFAST_CUDA=1 EDMFAST_CUDA_ARCH="${EDMFAST_CUDA_ARCH:-90}" $PY setup.py build_ext --inplace
$PY -c "import torch, edmfast.ops as o; d=torch.device('cuda'); print('backends:', {b: o.backend_status(b, d) or 'ok' for b in ('cuda','triton','torch')}, 'cpu:', o.backend_status('cpu', torch.device('cpu')) or 'ok')"

# --- the whole test suite, GPU-marked tests included -------------------------------------
# Parallel when pytest-xdist is there (the image lists it): on a fresh machine most of the GPU
# tests' time is Triton/inductor compilation, which is per process and CPU-bound. One inductor
# compile thread per worker keeps 8 workers from each starting a 16-process compile pool.
xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
run_step tests 180 250 env TORCHINDUCTOR_COMPILE_THREADS=1 $PY -m pytest -q -p no:cacheprovider "${xdist[@]}" \
  -m "gpu or not gpu" --durations=15 --junitxml="$OUT/junit.xml" -o junit_family=xunit2 tests

# --- the CUDA kernels under compute-sanitizer (memcheck on the full size/dtype/feature matrix,
#     racecheck/initcheck/synccheck on a reduced one); reports go to the log --------------------
run_step sanitize 120 230 bash csrc/tests/sanitize.sh cuda

# --- kernel roofline (benchmarks/bench_ops.py, a teammate's) ------------------------------
if [[ -f benchmarks/bench_ops.py ]]; then
  run_step ops 90 200 $PY benchmarks/bench_ops.py --json "$WORK/ops.json"
  [[ -f $WORK/ops.json ]] && cp "$WORK/ops.json" "$OUT/ops.json"
  [[ -f $WORK/ops.md ]] && cp "$WORK/ops.md" "$OUT/ops.md"
else
  record ops "absent" 0
fi

# --- end-to-end sampler benchmark: the time left, less ~70 s for accuracy and wrap-up --------
SAMPLER_BUDGET=$(($(left) - 90))
ops_arg=()
[[ -f $OUT/ops.json ]] && ops_arg=(--ops-json "$OUT/ops.json")
# shellcheck disable=SC2086  # SAMPLER_ARGS is a list of words
run_step sampler $((SAMPLER_BUDGET + 20)) 60 $PY benchmarks/bench_sampler.py --mode gpu --budget-s "$SAMPLER_BUDGET" \
  --out "$WORK" --stem sampler "${ops_arg[@]}" ${SAMPLER_ARGS:-}
[[ -f $WORK/sampler.json ]] && cp "$WORK/sampler.json" "$OUT/sampler.json"

# --- accuracy vs NFE on the GPU engine -------------------------------------------------------
run_step accuracy 60 5 $PY benchmarks/bench_accuracy.py --device cuda --out "$WORK" --stem accuracy
[[ -f $WORK/accuracy.json ]] && cp "$WORK/accuracy.json" "$OUT/accuracy.json"
[[ -f $WORK/accuracy.png ]] && cp "$WORK/accuracy.png" "$OUT/accuracy.png"

# --- suite record ------------------------------------------------------------------------------
{
  echo "{"
  echo "  \"date\": \"$(date -u +%F)\", \"elapsed_s\": $SECONDS, \"budget_s\": $BUDGET,"
  echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)\","
  echo "  \"steps\": {"
  for i in "${!STEP_NAMES[@]}"; do
    sep=","; ((i == ${#STEP_NAMES[@]} - 1)) && sep=""
    echo "    \"${STEP_NAMES[$i]}\": {\"exit\": \"${STEP_RCS[$i]}\", \"seconds\": ${STEP_SECS[$i]}}$sep"
  done
  echo "  }"
  echo "}"
} >"$OUT/suite.json"
cat "$OUT/suite.json"
ls -la "$OUT"
exit 0
