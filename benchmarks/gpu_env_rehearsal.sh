#!/usr/bin/env bash
# The GPU machine's versions on this machine: Python 3.12, torch 2.11.0 (its CUDA 13.0 build, as
# the image has it), triton 3.6.0, numpy 2.5, pytest-xdist / pytest-timeout, setuptools >= 77.
# Version skew shows up here, before a GPU run, rather than there. Two checks, in a venv of those
# versions and a copy of the tree:
#   1. benchmarks/skew_check.py: the test suite (every public op on every backend reachable without a
#      GPU, every engine path) under these versions, and every Triton kernel variant it launches
#      compiled for sm_90 (compile only);
#   2. benchmarks/gpu_suite.sh --rehearse: the GPU suite's script end to end on the CPU.
# Mandatory before a change to edmfast/ops.py, edmfast/triton/ or the custom-op registration
# (benchmarks/README.md). Not in CI: the torch 2.11 wheel and its CUDA libraries are ~5 GB.
#
#   bash benchmarks/gpu_env_rehearsal.sh                      # python3.12 from PATH (or pyenv's)
#   PYTHON=/path/to/python3.12 bash benchmarks/gpu_env_rehearsal.sh
#   SKEW_ONLY=1 bash benchmarks/gpu_env_rehearsal.sh           # the skew check alone
#   SUITE_BUDGET_S=120 bash benchmarks/gpu_env_rehearsal.sh   # passed on to the rehearsal
#
# The venv lives in GPU_ENV_DIR (default: a folder under the system temp dir, reused by later runs;
# ~5 GB). The tree is copied there (tracked and untracked-not-ignored files, as a copy without .git
# would be) and the extension built in place in that copy, so the checkout's own build is
# untouched. Results land in $OUT (default: GPU_ENV_DIR/out): skew/skew_check.json and the
# rehearsal's summary.json. Exit status: 0 when both pass, 1 otherwise, 2 without Python 3.12.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  for c in python3.12 "$(command -v pyenv >/dev/null && pyenv root)/versions/3.12"*/bin/python3.12; do
    if [[ -n $c ]] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      PY=$c
      break
    fi
  done
fi
if [[ -z $PY ]] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  echo "needs Python 3.12 (the GPU image's): set PYTHON to one" >&2
  exit 2
fi
DIR=${GPU_ENV_DIR:-${TMPDIR:-/tmp}/edmfast-gpu-env}
OUT=${OUT:-$DIR/out}
mkdir -p "$DIR" "$OUT"
start=$SECONDS
if [[ ! -x $DIR/venv/bin/python ]]; then
  "$PY" -m venv "$DIR/venv"
fi
VPY=$DIR/venv/bin/python
# the image's versions; test tools and the peers' dependencies beside them
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q torch==2.11.0 triton==3.6.0 "numpy>=2.5,<2.6" pybind11 "setuptools>=77" wheel \
  pytest pytest-xdist pytest-timeout hypothesis scipy matplotlib tqdm Pillow huggingface-hub regex \
  requests safetensors filelock
"$VPY" -m pip install -q --no-deps diffusers==0.42.1 importlib-metadata==8.7.0 k-diffusion==0.1.1.post1 \
  torchsde==0.2.6 torchdiffeq==0.2.5 trampoline==0.1.2
echo "=== venv ready after $((SECONDS - start)) s: $("$VPY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"

# a copy of the tree without .git (the commit travels in .suite/commit, as gpu_suite.sh --prepare does)
rm -rf "$DIR/tree"
mkdir -p "$DIR/tree/.suite"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$DIR/tree"
commit=$(git rev-parse HEAD)
[[ -n $(git status --porcelain --untracked-files=no) ]] && commit="$commit+dirty"
echo "$commit" >"$DIR/tree/.suite/commit"
cd "$DIR/tree"
EDMFAST_CUDA=0 "$VPY" setup.py -q build_ext --inplace
export PATH=$DIR/venv/bin:$PATH # python3 is the venv's, as python3 is the image's there

rc=0
t0=$SECONDS
"$VPY" benchmarks/skew_check.py --out "$OUT/skew" || rc=1
echo "=== skew check: $([[ $rc == 0 ]] && echo passed || echo FAILED) in $((SECONDS - t0)) s"
if [[ ${SKEW_ONLY:-0} != 1 ]]; then
  t0=$SECONDS
  OUT=$OUT/suite PYTHON=$VPY bash benchmarks/gpu_suite.sh --rehearse || rc=1
  echo "=== rehearsal in $((SECONDS - t0)) s"
fi
echo "=== gpu_env_rehearsal: $([[ $rc == 0 ]] && echo passed || echo FAILED) in $((SECONDS - start)) s; files in $OUT"
exit "$rc"
