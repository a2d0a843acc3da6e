"""Shared test fixtures: the backend matrix, tolerance tables, devices.

Without a GPU, TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton
kernels run on CPU tensors (that is how CI tests them); with one, the compiled kernels are tested.

Random inputs are fresh per test but reproducible: each test seeds torch's global generator from
EDMFAST_TEST_SEED (default 0) and its own node id, and the hypothesis searches are seeded with it.
Set EDMFAST_TEST_SEED=random (or another integer) to draw new inputs; the header prints the seed.

Threads: every test starts with one intra-op thread (EDMFAST_TEST_THREADS=N for another count) and
torch's OpenMP threads wait passively. The tests' tensors are tiny; on a shared 2-core CI machine
a second spinning thread per test made the suite several times slower (20 min instead of 2.5 min
beside two busy processes). Tests of multi-threaded kernels set their thread counts themselves.
"""

from __future__ import annotations

import os
import random
import zlib

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # read once, when torch loads its OpenMP runtime

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():  # GPU machines test the compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from edmfast import ops, reference  # noqa: E402
from tests.peer_guard import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402, F401

_THREADS = int(os.environ.get("EDMFAST_TEST_THREADS", "1"))
_SEED = os.environ.get("EDMFAST_TEST_SEED", "0")
BASE_SEED = random.randrange(2**31) if _SEED == "random" else int(_SEED)


def pytest_configure(config) -> None:
    """hypothesis searches are seeded with BASE_SEED (`@seed(BASE_SEED)`); no example database, so a
    run depends on the seed alone. Imported here, not at module level: on a machine without
    hypothesis (a GPU image may lack it) the property modules skip themselves and the rest runs."""
    try:
        from hypothesis import settings
    except ImportError:
        return
    settings.register_profile("edmfast", database=None)
    settings.load_profile("edmfast")


def pytest_report_header(config) -> str:
    return f"edmfast: EDMFAST_TEST_SEED={BASE_SEED} (reproduce a run with this value)"


@pytest.fixture(autouse=True)
def _seed_per_test(request) -> None:
    """Fresh inputs per test, the same on every run with the same EDMFAST_TEST_SEED."""
    torch.manual_seed(BASE_SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _threads_per_test():
    """Each test starts with EDMFAST_TEST_THREADS intra-op threads (1) and gets back what it changed."""
    before = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(before)


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


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||out - ref|| / ||scale||, scale = ref unless given.

    Where ref is a sum whose terms can cancel, pass the sum of the terms' magnitudes as scale
    (`heun_term_scale`): float32 arithmetic is accurate relative to the terms, not to a result
    that cancelled (one random 1-element case summed terms of 0.3-1.0 to 0.0022)."""
    out64, ref64 = out.double().cpu().flatten(), ref.double().cpu().flatten()
    assert torch.isfinite(out64).all(), "non-finite values in output"
    denom = (ref64 if scale is None else scale.double().cpu().flatten()).norm().clamp_min(1e-30)
    return float((out64 - ref64).norm() / denom)


def heun_term_scale(
    x_hat: torch.Tensor,
    coef: torch.Tensor,
    *,
    x_prime: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
) -> torch.Tensor:
    """|p x_hat| + |q x_prime| + |r| |F| + |std eps| per element (float64, [B, M]), with |F| taken as
    |k| (|u| + |w| |c - u|) for CFG rows: the magnitude a float32 evaluation of
    `reference.heun_step` is accurate relative to."""
    batch = x_hat.shape[0]
    p, q, r, std = coef.double().cpu()[:4].abs().tolist()
    scale = p * x_hat.reshape(batch, -1).double().cpu().abs()
    if x_prime is not None:
        scale += q * x_prime.reshape(batch, -1).double().cpu().abs()
    if f is not None:
        f64 = f.reshape(f.shape[0], -1).double().cpu()
        if f.shape[0] == batch:
            mag = f64.abs()
        else:
            cond, uncond = f64[:batch], f64[batch:]
            mag = uncond.abs() + abs(guidance_scale) * (cond - uncond).abs()
            if k is not None:
                mag = k.double().cpu().abs().reshape(-1, 1) * mag
        scale += r * mag
    eps = reference.fused_noise(tuple(x_hat.shape), noise, seeds, step)
    if eps is not None:
        scale += std * eps.cpu().abs()
    return scale


def net_scale(scale: torch.Tensor, coef: torch.Tensor, rows: int) -> torch.Tensor:
    """The term magnitudes of out_net = c out, [rows * B, M]: |c| times those of out."""
    return abs(float(coef[4])) * scale.repeat(rows, 1)


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An out= buffer full of NaN, so an unwritten element fails any comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
