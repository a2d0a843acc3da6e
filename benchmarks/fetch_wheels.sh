#!/usr/bin/env bash
# For a GPU machine without network: downloads the wheels the suite needs beyond torch into .whl/
# (git-ignored, ~9 MB). Run it where pip reaches the package index, then copy the clone (with .whl/)
# to the GPU machine; benchmarks/gpu_suite.sh installs them there into /tmp/site with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# (setuptools only when the machine's is older than 77, which the build's SPDX license string needs).
# A machine with network does not need this: pip install diffusers k-diffusion hypothesis there.
#
# The wheels are for CPython 3.12 on x86_64 Linux (the images we run: torch 2.11, numpy, scipy, tqdm,
# filelock, huggingface-hub, regex, requests, safetensors, pillow, zipp, torchdiffeq, torchvision,
# matplotlib, pybind11, pytest, pytest-xdist, pytest-timeout already there). Carried:
#   diffusers          the peer loops and the UNet2DModel / UNet2DConditionModel networks
#   importlib-metadata diffusers' one dependency such an image lacks
#   k-diffusion        sample_heun (only sampling.py is loaded; its __init__ deps are not needed)
#   torchsde, trampoline   imported by k_diffusion/sampling.py
#   hypothesis, sortedcontainers   the property tests (they skip without hypothesis)
#   setuptools         >= 77, in case the machine's is older (the suite probes its version)
# Versions match the CPU venv our CPU results were measured with.
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
# hypothesis as in the CPU venv when one is active (else the newest)
hypothesis=$("$PY" -c 'import importlib.metadata as m; print("hypothesis==" + m.version("hypothesis"))' 2>/dev/null || echo hypothesis)
# the GPU image's tags, whatever this machine is: CPython 3.12, manylinux x86_64
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  diffusers==0.42.1 importlib-metadata==8.7.0 k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 \
  "$hypothesis" sortedcontainers setuptools==80.9.0
ls -la .whl
du -sh .whl
