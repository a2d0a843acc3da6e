#!/usr/bin/env bash
# The GPU suite's rehearsal under the GPU image's versions (Python 3.12, torch 2.11.0, triton 3.6.0,
# numpy 2.5, setuptools as the image may have it), so version skew shows up here, before a device
# window, rather than there. Not part of CI: the torch 2.11.0 wheel and its CUDA libraries are
# several GB.
#
#   bash benchmarks/gpu_env_rehearsal.sh                      # python3.12 from PATH
#   PYTHON=/path/to/python3.12 bash benchmarks/gpu_env_rehearsal.sh
#   SUITE_BUDGET_S=120 bash benchmarks/gpu_env_rehearsal.sh   # passed on to the rehearsal
#
# The venv lives in GPU_ENV_DIR (default: a folder under the system temp dir, reused by later
# runs). The tree is copied there (tracked and untracked-not-ignored files, as the device tool
# copies it) and the extension built in place in that copy, so the checkout's own build is
# untouched. The rehearsal's files land in $OUT (default: GPU_ENV_DIR/out).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python3.12}
DIR=${GPU_ENV_DIR:-${TMPDIR:-/tmp}/edmfast-gpu-env}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  echo "needs Python 3.12 (the GPU image's): set PYTHON to one" >&2
  exit 2
fi
mkdir -p "$DIR"
if [[ ! -x $DIR/venv/bin/python ]]; then
  "$PY" -m venv "$DIR/venv"
fi
VPY=$DIR/venv/bin/python
# the image's versions (benchmarks/README.md); test tools and the peers' dependencies beside them
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q torch==2.11.0 triton==3.6.0 "numpy>=2.5,<2.6" pybind11 "setuptools>=77" wheel \
  pytest hypothesis scipy matplotlib tqdm Pillow huggingface-hub regex requests safetensors filelock
"$VPY" -m pip install -q --no-deps diffusers==0.42.1 importlib-metadata==8.7.0 k-diffusion==0.1.1.post1 \
  torchsde==0.2.6 torchdiffeq==0.2.5 trampoline==0.1.2

# a copy of the tree, as the device gets it (no .git: the commit travels as on the device)
rm -rf "$DIR/tree"
mkdir -p "$DIR/tree/.suite"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$DIR/tree"
commit=$(git rev-parse HEAD)
[[ -n $(git status --porcelain --untracked-files=no) ]] && commit="$commit+dirty"
echo "$commit" >"$DIR/tree/.suite/commit"
cd "$DIR/tree"
EDMFAST_CUDA=0 "$VPY" setup.py -q build_ext --inplace
export PATH=$DIR/venv/bin:$PATH # python3 is the venv's, as python3 is the image's there
OUT=${OUT:-$DIR/out} PYTHON=$VPY bash benchmarks/gpu_suite.sh --rehearse
