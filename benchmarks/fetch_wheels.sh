#!/usr/bin/env bash
# Download the wheels the GPU machine's image lacks into .whl/ (git-ignored), for
# `run(..., carry=[".whl", ".suite"])`; benchmarks/gpu_suite.sh installs them there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# (setuptools only when the image's is older than 77, which the build's SPDX license string needs).
#
# The GPU image (Python 3.12, x86_64, no network) already has, of what these need: torch 2.11,
# numpy, scipy, tqdm, filelock, huggingface-hub, regex, requests, safetensors, pillow, zipp,
# torchdiffeq, torchvision, matplotlib, pybind11, pytest, pytest-xdist, pytest-timeout.
# Missing there, so carried:
#   diffusers          the peer loops and the UNet2DModel / UNet2DConditionModel networks
#   importlib-metadata diffusers' one dependency the image lacks
#   k-diffusion        sample_heun (only sampling.py is loaded; its __init__ deps are not needed)
#   torchsde, trampoline   imported by k_diffusion/sampling.py
#   setuptools         >= 77, in case the image's is older (its version is probed there)
# Versions match the CPU venv the CPU results were measured with. Needs network (run it where pip
# can reach the index, not on the GPU machine).
#
#   bash benchmarks/fetch_wheels.sh              # with python3 from PATH
#   PYTHON=python3.12 bash benchmarks/fetch_wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl
# the GPU image's tags, whatever this machine is: CPython 3.12, manylinux x86_64
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  diffusers==0.42.1 importlib-metadata==8.7.0 k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 \
  setuptools==80.9.0
ls -la .whl
du -sh .whl
