#!/usr/bin/env bash
# Download the pure-Python wheels the GPU machine's image lacks into .whl/ (git-ignored), for
# `run(..., carry=[".whl"])`; benchmarks/gpu_suite.sh installs them there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#
# The GPU image ('cuda', /work/.library/device/KINDS.md, read 2026-11-17) already has, of what
# these need: torch 2.11, numpy, scipy, tqdm, filelock, huggingface-hub (1.33 >= diffusers'
# 1.32), regex, requests, safetensors (0.8.0), pillow, zipp, torchdiffeq, torchvision,
# matplotlib, pytest, pytest-timeout. Missing there, so carried here:
#   diffusers          the peer loops and the UNet2DModel / UNet2DConditionModel networks
#   importlib-metadata diffusers' one dependency the image lacks
#   k-diffusion        sample_heun (only sampling.py is loaded; its __init__ deps are not needed)
#   torchsde, trampoline   imported by k_diffusion/sampling.py
# Versions match the CPU venv the CPU results were measured with. Needs network (run it here,
# not on the GPU machine). Usage: bash benchmarks/fetch_wheels.sh [python]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${1:-${PYTHON:-/work/venv/bin/python}}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  diffusers==0.42.1 importlib-metadata==8.7.0 k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2
ls -la .whl
du -sh .whl
