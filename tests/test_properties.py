"""Property-based tests (hypothesis): every fused op on every backend equals the float64 reference
over random shapes (0 and 1 elements included), strides, dtypes, features and magnitudes.

Each example draws its tensors' generator seed too, and every search is seeded by
EDMFAST_TEST_SEED (conftest), so a failure reproduces with the seed pytest's header printed."""

import math
import zlib

import pytest
import torch

pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, assume, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edmfast import ops, reference  # noqa: E402
from tests.conftest import BASE_SEED, TOL, backend_device_pairs, heun_term_scale, net_scale, rel_err

IO = [torch.float32, torch.float16, torch.bfloat16]


def _available():
    out = []
    for b, d in backend_device_pairs():
        if ops.backend_status(b, torch.device(d)) is None:
            out.append((b, d))
    return out


BACKENDS = _available()
# the Triton interpreter runs each example in ~0.1-1 s: fewer examples there
EXAMPLES = {"triton": 30, "torch": 40, "cpu": 100, "cuda": 100}


def _random(data_seed: int, device: torch.device):
    """randn / rand / randint from a generator seeded by the example's own draw, so an example
    (and its shrinking and its replay) fixes the tensors as well as the shapes and flags."""
    gen = torch.Generator().manual_seed(data_seed)

    def randn(shape):
        return torch.randn(shape, generator=gen).to(device)

    def rand(n):
        return torch.rand(n, generator=gen).to(device)

    def randint(lo, hi, shape):
        return torch.randint(lo, hi, shape, generator=gen).to(device)

    return randn, rand, randint


def _log_uniform(draw, lo, hi):
    return math.exp(draw(st.floats(math.log(lo), math.log(hi))))


@st.composite
def step_case(draw):
    batch = draw(st.integers(1, 4))
    inner = draw(st.sampled_from([(0,), (1,), (3,), (7,), (1023,), (3, 5, 7), (2, 33)]))
    dtype = draw(st.sampled_from(IO))
    sigma = _log_uniform(draw, 1e-3, 1e3)  # coefficients shaped like a real step at this sigma
    coef = torch.zeros(8)
    coef[0] = draw(st.floats(-2, 2))
    coef[1] = draw(st.floats(-2, 2))
    coef[2] = -sigma * draw(st.floats(0.01, 1))
    coef[3] = sigma * draw(st.floats(0, 0.5))
    coef[4] = 1 / math.sqrt(sigma**2 + 0.25)
    return dict(
        batch=batch,
        inner=inner,
        dtype=dtype,
        coef=coef,
        x_prime=draw(st.booleans()),
        f_rows=draw(st.sampled_from([0, 1, 2])),
        k=draw(st.booleans()),
        noise=draw(st.sampled_from(["none", "tensor", "seeds"])),
        net_rows=draw(st.sampled_from([0, 1, 2])),
        w=draw(st.floats(0.0, 12.0)),
        strided=draw(st.booleans()),
        seed0=draw(st.integers(0, 2**62)),
        step=draw(st.integers(0, 2**31 - 1)),
        in_place=draw(st.booleans()),
        data_seed=draw(st.integers(0, 2**63 - 1)),
    )


def _maybe_strided(t, strided):
    """The same values through a non-contiguous view (every other column of a wider tensor)."""
    if t is None or not strided or t.dim() < 2 or t.numel() == 0:
        return t
    wide = torch.empty(t.shape[0], 2 * t[0].numel(), dtype=t.dtype, device=t.device)
    wide[:, ::2] = t.reshape(t.shape[0], -1)
    return wide[:, ::2].reshape(t.shape) if t.dim() == 2 else wide[:, ::2]


@pytest.mark.parametrize("backend_device", BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS])
def test_heun_step_matches_reference(backend_device):
    backend, device = backend_device

    @seed(BASE_SEED + zlib.crc32(backend.encode()))  # each backend its own search
    @settings(max_examples=EXAMPLES[backend], deadline=None, suppress_health_check=list(HealthCheck))
    @given(step_case())
    def check(c):
        b, shape = c["batch"], (c["batch"], *c["inner"])
        dev = torch.device(device)
        randn, rand, randint = _random(c["data_seed"], dev)
        x_hat = randn(shape) * 3
        x_prime = randn(shape) if c["x_prime"] else None
        f = randn((c["f_rows"] * b, *c["inner"])).to(c["dtype"]) if c["f_rows"] else None
        k = rand(b) + 0.5 if c["k"] and c["f_rows"] == 2 else None
        noise = randn(shape) if c["noise"] == "tensor" else None
        seeds = randint(0, 2**62, (b,)) if c["noise"] == "seeds" else None
        net_dtype = c["dtype"] if f is not None else torch.float32
        out_net = torch.full((c["net_rows"] * b, *c["inner"]), float("nan"), dtype=net_dtype, device=dev)
        out_net = out_net if c["net_rows"] else None
        coef = c["coef"].to(dev)
        args = dict(
            x_prime=x_prime, f=f, k=k, guidance_scale=c["w"], noise=noise, seeds=seeds, step=c["step"]
        )
        ref_x, ref_net = reference.heun_step(x_hat, coef, net_rows=max(c["net_rows"], 1), **args)
        scale = heun_term_scale(x_hat, coef, **args)
        out = x_hat if c["in_place"] else torch.full(shape, float("nan"), device=dev)
        if c["strided"]:
            args.update(x_prime=_maybe_strided(x_prime, True), f=_maybe_strided(f, True))
        x_in = x_hat if c["in_place"] else _maybe_strided(x_hat, c["strided"])
        ops.heun_step(x_in, coef, out=out, out_net=out_net, backend=backend, **args)
        _close(out, ref_x, torch.float32 if f is None else c["dtype"], f is not None, scale)
        if out_net is not None:
            _close(out_net, ref_net, net_dtype, True, net_scale(scale, coef, c["net_rows"]))

    check()


def _close(out, ref, dtype, low_precision_inputs, scale=None, min_tol=0.0):
    """Relative error within the dtype's budget (at least min_tol); relative to `scale` (the
    magnitude of the terms that sum to ref, see conftest.heun_term_scale) where given."""
    # inputs rounded to the network dtype before the reference saw them, so the budget is the
    # dtype's rounding of the output (fp16/bf16 net outputs) or float32 arithmetic otherwise
    tol = TOL[dtype] if low_precision_inputs else 1e-5
    err = rel_err(out, ref, scale)  # asserts every element was written and is finite
    assert err < max(tol, 1e-5, min_tol), f"relative error {err:.3g}"


@st.composite
def cfg_case(draw):
    batch = draw(st.integers(1, 3))
    inner = draw(st.sampled_from([(1,), (2,), (7,), (1023,), (3, 5, 7)]))
    return dict(
        batch=batch,
        inner=inner,
        dtype=draw(st.sampled_from(IO)),
        w=draw(st.floats(-2.0, 15.0)),
        phi=draw(st.floats(0.0, 1.0)),
        mean=_log_uniform(draw, 1e-3, 1e3) * draw(st.sampled_from([-1, 1])),
        std=_log_uniform(draw, 1e-2, 1e2),
        data_seed=draw(st.integers(0, 2**63 - 1)),
    )


def _cfg_condition(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> float:
    """How much float32 rounding of the cfg values is amplified in k = ... / std(cfg): the largest
    rms(|u'| + |w| |c' - u'|) / std(cfg) over samples, with c', u' shifted by their first element
    (the pivot every backend subtracts, exactly). About 1 for spread samples; 440 for a 2-element
    sample with w = 11 whose cfg values nearly coincide (k = 201, float32 error 8e-5)."""
    b = cond.shape[0]
    c, u = cond.double().cpu().reshape(b, -1), uncond.double().cpu().reshape(b, -1)
    if c.shape[1] < 2:
        return 1.0
    c, u = c - c[:, :1], u - u[:, :1]
    terms = u.abs() + abs(w) * (c - u).abs()
    std_cfg = (u + w * (c - u)).std(dim=1)
    kappa = terms.pow(2).mean(dim=1).sqrt() / std_cfg
    return float(torch.where(std_cfg > 0, kappa, 1.0).max()) + 1.0


@pytest.mark.parametrize("backend_device", BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS])
def test_cfg_rescale_matches_reference(backend_device):
    backend, device = backend_device

    @seed(BASE_SEED + zlib.crc32(backend.encode()))  # each backend its own search
    @settings(max_examples=EXAMPLES[backend], deadline=None, suppress_health_check=list(HealthCheck))
    @given(cfg_case())
    def check(c):
        shape = (c["batch"], *c["inner"])
        dev = torch.device(device)
        randn, _, _ = _random(c["data_seed"], dev)
        cond = (randn(shape) * c["std"] + c["mean"]).to(c["dtype"])
        uncond = (randn(shape) * c["std"] + c["mean"]).to(c["dtype"])
        ref = reference.cfg_rescale(cond, uncond, c["w"], c["phi"])
        # a k so large that the output overflows its dtype (std(cfg) ~ 0 with phi > 0) is no test
        assume(float(ref.abs().max()) < torch.finfo(c["dtype"]).max / 2)
        # float32 rounding of the cfg values, amplified when a sample's cfg values nearly coincide
        cond_tol = 8 * 2**-23 * _cfg_condition(cond, uncond, c["w"])
        out = torch.full(shape, float("nan"), dtype=c["dtype"], device=dev)
        ops.cfg_rescale(cond, uncond, c["w"], c["phi"], out=out, backend=backend)
        _close(out, ref, c["dtype"], c["dtype"] != torch.float32, min_tol=cond_tol)
        k = torch.full((c["batch"],), float("nan"), device=dev)
        ops.cfg_rescale_factors(torch.cat([cond, uncond]), c["w"], c["phi"], out=k, backend=backend)
        ref_k = reference.cfg_rescale_factors(torch.cat([cond, uncond]), c["w"], c["phi"])
        # k depends on a ratio of stds of values with |mean| up to 1e5 std: fp32 pivoted sums keep ~1e-5
        torch.testing.assert_close(k.double().cpu(), ref_k.cpu(), rtol=max(1e-4, cond_tol), atol=1e-5)

    check()
