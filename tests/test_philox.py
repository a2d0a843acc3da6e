"""The fused-noise stream: Philox4x32-10 known answers, agreement with the float64 definition in
`edmfast.philox`, statistics, batch invariance and determinism, on every backend.

Each backend's stream is read through the fused kernels themselves: heun_step with
coef = [0, 0, 0, 1, 0] and a zero state writes eps itself to ``out``, churn with std = 1 writes
x + eps.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from conftest import HAS_CUDA, gpu

from edmfast import ops
from edmfast.philox import philox4x32, philox_normal

try:
    from edmfast import _C
except ImportError:  # the tests of the C++ header skip without a build
    _C = None

needs_C = pytest.mark.skipif(_C is None, reason="edmfast._C is not built")

# Random123 known-answer vectors for philox4x32 with 10 rounds: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_python(counter, key, expected):
    words = philox4x32(*(torch.tensor(c) for c in counter), *(torch.tensor(k) for k in key))
    assert tuple(int(w) for w in words) == expected


@needs_C
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_cpp_header(counter, key, expected):
    assert _C.philox4x32(*counter, *key) == expected


@needs_C
def test_cpp_header_words_match_python_definition():
    gen = torch.Generator().manual_seed(1)
    vals = torch.randint(0, 2**32, (6, 200), generator=gen, dtype=torch.int64)
    ref = philox4x32(*vals)
    for i in range(vals.shape[1]):
        got = _C.philox4x32(*(int(v) for v in vals[:, i]))
        assert got == tuple(int(r[i]) for r in ref)


def fused_stream(
    backend, device, seeds: list[int], step: int, numel: int, via: str = "heun_step"
) -> torch.Tensor:
    """eps [len(seeds), numel] as the backend's fused kernels produce it (float32, on the CPU)."""
    batch = len(seeds)
    s = torch.tensor(seeds, dtype=torch.int64, device=device)
    zero = torch.zeros(batch, numel, device=device)
    out = torch.full((batch, numel), float("nan"), device=device)
    if via == "heun_step":
        coef = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0], device=device)
        ops.heun_step(zero, coef, out=out, seeds=s, step=step, backend=backend)
    else:
        coef = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0], device=device)
        ops.churn(zero, coef, out=out, seeds=s, step=step, backend=backend)
    return out.cpu()


SEEDS = [0, 1, 2**32 + 7, -5, 2**63 - 1]


@pytest.mark.parametrize("via", ["heun_step", "churn"])
def test_stream_matches_definition(backend_device, via):
    """Every backend's float32 normals are within 1e-6 of the float64 definition (edmfast.philox)."""
    backend, device = backend_device
    numel = 4 * 2048 + 3  # a partial last group
    got = fused_stream(backend, device, SEEDS, 123456789, numel, via)
    ref = philox_normal(torch.tensor(SEEDS), 123456789, numel)
    err = (got.double() - ref).abs().max().item()
    assert err <= 1e-6, f"max |eps - reference| = {err:.3g}"


def test_stream_statistics(backend_device):
    """N(0, 1) marginals, and no correlation across steps, seeds or neighbouring elements."""
    backend, device = backend_device
    numel = 1 << 14  # 5 sigma bounds of 0.04 on the correlations; keeps the Triton interpreter quick
    eps = fused_stream(backend, device, [11, 12], 3, numel).double()
    other_step = fused_stream(backend, device, [11], 4, numel).double()[0]
    n = eps.numel()
    x = eps.flatten()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    assert scipy.stats.kstest(x.numpy(), "norm").pvalue > 1e-4

    bound = 5 / math.sqrt(numel)

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert abs(corr(eps[0], other_step)) < bound  # steps
    assert abs(corr(eps[0], eps[1])) < bound  # seeds
    assert abs(corr(eps[0, :-1], eps[0, 1:])) < bound  # neighbours (n0/n1 share a Box-Muller radius)
    assert abs(corr(eps[0, :-4], eps[0, 4:])) < bound  # the same lane of consecutive Philox calls
    assert abs(corr(eps[0] ** 2, other_step**2)) < bound  # no dependence through the radius either


def test_batch_invariance_and_determinism(backend_device):
    """A sample's noise depends on its seed only, not on the batch around it, and never changes."""
    backend, device = backend_device
    numel = 4 * 500 + 1
    alone = fused_stream(backend, device, [42], 9, numel)
    batch = fused_stream(backend, device, [7, 42, 8], 9, numel)
    assert torch.equal(batch[1], alone[0])
    assert torch.equal(fused_stream(backend, device, [7, 42, 8], 9, numel), batch)
    assert not torch.equal(batch[0], batch[2])


@gpu
@pytest.mark.gpu
def test_cpu_and_cuda_streams_agree():
    """The C++ CPU loops and the CUDA kernels share philox.h: the same stream on both devices."""
    assert HAS_CUDA
    reasons = [
        ops.backend_status("cpu", torch.device("cpu")),
        ops.backend_status("cuda", torch.device("cuda")),
    ]
    if any(reasons):
        pytest.skip("; ".join(r for r in reasons if r))
    numel = 4 * 4096 + 2
    cpu = fused_stream("cpu", torch.device("cpu"), SEEDS, 77, numel)
    cuda = fused_stream("cuda", torch.device("cuda"), SEEDS, 77, numel)
    # Same words, float32 libm on both sides: equal up to an ulp of the last operation.
    torch.testing.assert_close(cuda, cpu, rtol=0, atol=1e-6)
