"""churn (noise injection fused with the network-input scaling) on every backend vs float64.

``out = x + std eps``, ``out_net[j B + b] = c out[b]`` with std = coef[3], c = coef[4]; coef[0:3]
are ignored (`edmfast.reference.churn`), which the tests check by filling them with NaN.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, heun_term_scale, net_scale, poisoned, rel_err
from test_heun_step import SHAPES, eager_lowp_net, lowp_bound, make_tensor

from edmfast import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_churn(backend, device, dtype, shape, eps: str, net_rows: int, layout: str) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    batch = shape[0]
    tensor_layout = layout if layout in ("strided", "offset") else "contiguous"
    std, c = (0.05 + torch.rand(2, generator=gen)).tolist()
    # coef[0:3] are not churn's business: NaN there must not leak into the result.
    coef = torch.tensor([float("nan")] * 3 + [std, c], device=device)
    x = make_tensor(shape, torch.float32, device, gen, tensor_layout, scale=5.0)
    noise = make_tensor(shape, torch.float32, device, gen, tensor_layout) if eps == "noise" else None
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen).to(device) if eps == "seeds" else None
    step = int(torch.randint(0, 2**31, (), generator=gen))

    ref_x, ref_net = reference.churn(x, coef, noise=noise, seeds=seeds, step=step, net_rows=max(net_rows, 1))
    scale = heun_term_scale(x, torch.tensor([1.0, 0, 0, std]), noise=noise, seeds=seeds, step=step)
    out = x if layout == "alias" else poisoned(shape, torch.float32, device)
    out_net = poisoned((net_rows * batch, *shape[1:]), dtype, device) if net_rows else None
    assert (
        ops.churn(x, coef, out=out, noise=noise, seeds=seeds, step=step, out_net=out_net, backend=backend)
        is out
    )

    where = f"(seed {seed}, {backend}, {dtype}, {shape}, eps={eps}, net_rows={net_rows}, {layout})"
    err = rel_err(out, ref_x, scale)
    assert err <= TOL[torch.float32], f"out rel err {err:.3g} {where}"
    if out_net is not None:
        eager = eager_lowp_net(ref_x, coef.double().cpu(), dtype, net_rows)
        n_scale = net_scale(scale, coef, net_rows)
        bound = lowp_bound(dtype, ref_net, eager, n_scale)
        err = rel_err(out_net, ref_net, n_scale)
        assert err <= bound, f"out_net rel err {err:.3g} > {bound:.3g} {where}"


@pytest.mark.parametrize(
    "eps,net_rows,layout",
    [
        ("seeds", 1, "contiguous"),
        ("seeds", 2, "alias"),
        ("noise", 1, "alias"),
        ("noise", 2, "strided"),
        ("noise", 0, "offset"),
        ("none", 1, "contiguous"),
        ("seeds", 0, "offset"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_features(backend_device, dtype, eps, net_rows, layout):
    backend, device = backend_device
    run_churn(backend, device, dtype, (3, 3, 37, 41), eps, net_rows, layout)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_shapes(backend_device, dtype, shape):
    backend, device = backend_device
    run_churn(backend, device, dtype, shape, "seeds", 2, "contiguous")


def test_real_shape(backend_device):
    backend, device = backend_device
    if backend == "triton" and device.type == "cpu":
        pytest.skip("64x3x32x32 under TRITON_INTERPRET=1 is too slow for the CPU test budget")
    run_churn(backend, device, torch.bfloat16, (64, 3, 32, 32), "noise", 1, "alias")


def test_zero_std_is_identity(backend_device):
    """std = 0 (gamma = 0: no churn at this step) leaves x bit-identical, whatever the noise."""
    backend, device = backend_device
    x = torch.randn(3, 50, device=device)
    coef = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], device=device)
    out = poisoned((3, 50), torch.float32, device)
    ops.churn(x, coef, out=out, seeds=torch.tensor([1, 2, 3], device=device), step=4, backend=backend)
    assert torch.equal(out, x)
