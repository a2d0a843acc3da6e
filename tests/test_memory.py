"""Repeated sampling must not grow host memory (the engine allocates per call, never keeps it)."""

import gc

import pytest
import torch

import edmfast
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_repeated_sampler_calls_do_not_grow_host_memory(backend_device):
    backend, device = backend_device
    if backend == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter's own caches are not ours to measure")
    den = edmfast.EDMPrecond(EDMNetworkOf(GaussianDenoiser(0.0, 0.5))).to(device)
    s = edmfast.Sampler(den, num_steps=6, s_churn=20, backend=backend)
    noise = torch.randn(8, 3, 32, 32, device=device)
    for _ in range(5):  # warm up allocator and caches
        s(noise)
    gc.collect()
    before = _rss_bytes()
    for _ in range(30):
        s(noise)
    gc.collect()
    growth = _rss_bytes() - before
    # one call allocates ~0.6 MB of buffers; 30 leaked calls would add ~18 MB
    assert growth < 4 * 2**20, f"host memory grew by {growth / 2**20:.1f} MiB over 30 calls"
