"""Shared test fixtures: the backend matrix, tolerance tables, devices.

Without a GPU, TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton
kernels run on CPU tensors (that is how CI tests them); with one, the compiled kernels are tested.
"""

from __future__ import annotations

import os

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():  # GPU machines test the compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from edmfast import ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Relative-error budget vs the float64 reference (||out - ref|| / ||ref||) per network dtype.
# State is float32 everywhere; the low-precision budgets cover rounding the network-side
# tensors (out_net, f) to 8 (bf16) or 11 (fp16) mantissa bits.
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def backend_device_pairs() -> list[tuple[str, str]]:
    pairs = [("torch", "cpu"), ("cpu", "cpu"), ("triton", "cpu")]
    if HAS_CUDA:
        pairs += [("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
    return pairs


def _param(b: str, d: str):
    marks = [pytest.mark.gpu] if d == "cuda" else []
    return pytest.param((b, d), id=f"{b}-{d}", marks=marks)


@pytest.fixture(params=[_param(b, d) for b, d in backend_device_pairs()])
def backend_device(request) -> tuple[str, torch.device]:
    """(backend, device) pairs; skipped with the reason when a backend is unavailable here."""
    backend, device = request.param
    dev = torch.device(device)
    reason = ops.backend_status(backend, dev)
    if reason is not None:
        pytest.skip(reason)
    return backend, dev


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu().flatten(), ref.double().cpu().flatten()
    assert torch.isfinite(out64).all(), "non-finite values in output"
    denom = ref64.norm().clamp_min(1e-30)
    return float((out64 - ref64).norm() / denom)


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An out= buffer full of NaN, so an unwritten element fails any comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
