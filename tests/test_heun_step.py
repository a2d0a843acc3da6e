"""heun_step (the fused sampler pass) on every backend against the float64 reference.

``out = p x_hat + q x_prime + r F + std eps`` and ``out_net[j B + b] = c out[b]``
(`edmfast.reference.heun_step`). Every feature is switched on and off: x_prime, f with B rows or
with 2B CFG rows (with and without rescale factors k), eps from a noise tensor, from the Philox
seeds or absent, out aliasing x_hat, out_net with B or 2B rows or absent, non-contiguous and
misaligned (storage offset 1) inputs. Inputs and coefficients are fresh random draws on every
run; out buffers are NaN-poisoned so an unwritten element fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import TOL, heun_term_scale, net_scale, poisoned, rel_err

from edmfast import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# [B, ...] shapes: one element, odd sizes, a non-multiple of any block, an image-like odd shape.
SHAPES = [(1, 1), (3, 1), (1, 7), (3, 7), (1, 1023), (3, 1023), (1, 3, 37, 41), (3, 3, 37, 41)]


@dataclass(frozen=True)
class Case:
    x_prime: bool = True
    f: str = "cfg_k"  # "none", "b" (B rows), "cfg" (2B rows), "cfg_k" (2B rows and factors k)
    eps: str = "seeds"  # "none", "noise", "seeds"
    net_rows: int = 2  # 0: no out_net
    layout: str = "contiguous"  # "contiguous", "alias" (out is x_hat), "strided", "offset"

    def __str__(self) -> str:
        return f"xp{int(self.x_prime)}-f_{self.f}-eps_{self.eps}-net{self.net_rows}-{self.layout}"


CASES = [
    Case(),
    Case(x_prime=False, f="b", eps="none", net_rows=1),
    Case(x_prime=True, f="b", eps="noise", net_rows=1, layout="alias"),
    Case(x_prime=False, f="cfg", eps="seeds", net_rows=2, layout="alias"),
    Case(x_prime=True, f="cfg", eps="noise", net_rows=1),
    Case(x_prime=True, f="none", eps="seeds", net_rows=0),
    Case(x_prime=False, f="none", eps="none", net_rows=0),
    Case(x_prime=True, f="cfg_k", eps="noise", net_rows=2, layout="strided"),
    Case(x_prime=True, f="b", eps="seeds", net_rows=1, layout="strided"),
    Case(x_prime=True, f="cfg_k", eps="noise", net_rows=2, layout="offset"),
]


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def make_tensor(shape, dtype, device, gen, layout: str, scale: float = 1.0) -> torch.Tensor:
    """Random values (exactly representable in ``dtype``) laid out as asked: a contiguous tensor,
    a stride-2 view, or a contiguous view at storage offset 1 (misaligned for vector loads)."""
    values = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if layout == "strided":
        base = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype, device=device)
        view = base[..., ::2]
    elif layout == "offset":
        n = values.numel()
        view = torch.zeros(n + 1, dtype=dtype, device=device)[1:].view(shape)
    else:
        view = torch.empty(shape, dtype=dtype, device=device)
    view.copy_(values)
    return view


def random_coef(gen, device) -> torch.Tensor:
    # Non-trivial values of every sign; padded to the 8-float table row the engine uses.
    lo = torch.tensor([0.5, -1.0, -2.0, 0.1, 0.2, 0, 0, 0], dtype=torch.float64)
    hi = torch.tensor([1.5, 1.0, 2.0, 1.0, 2.0, 0, 0, 0], dtype=torch.float64)
    return (lo + (hi - lo) * torch.rand(8, generator=gen, dtype=torch.float64)).float().to(device)


def lowp_bound(
    net_dtype: torch.dtype, ref: torch.Tensor, eager: torch.Tensor, scale: torch.Tensor | None = None
) -> float:
    """Error budget of a network-side output: TOL, or 2x PyTorch eager's own error in that dtype
    (both relative to `scale` when given, as in `rel_err`)."""
    if net_dtype == torch.float32:
        return TOL[torch.float32]
    return max(TOL[net_dtype], 2.0 * rel_err(eager, ref, scale))


def eager_lowp_net(ref_x: torch.Tensor, coef: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """out_net as eager PyTorch computes it in ``dtype``: the state rounded, then scaled in dtype."""
    return (coef[4].to(dtype) * ref_x.to(dtype)).repeat(rows, *([1] * (ref_x.dim() - 1)))


def run_case(
    backend: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], case: Case
) -> None:
    seed = _fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    batch = shape[0]
    tensor_layout = case.layout if case.layout in ("strided", "offset") else "contiguous"
    coef = random_coef(gen, device)
    x_hat = make_tensor(shape, torch.float32, device, gen, tensor_layout, scale=3.0)
    x_prime = make_tensor(shape, torch.float32, device, gen, tensor_layout) if case.x_prime else None
    f = None
    if case.f != "none":
        rows = batch if case.f == "b" else 2 * batch
        f = make_tensor((rows, *shape[1:]), dtype, device, gen, tensor_layout)
    k = (0.5 + torch.rand(batch, generator=gen)).to(device) if case.f == "cfg_k" else None
    noise = make_tensor(shape, torch.float32, device, gen, tensor_layout) if case.eps == "noise" else None
    seeds = (
        torch.randint(-(2**62), 2**62, (batch,), generator=gen).to(device) if case.eps == "seeds" else None
    )
    step = int(torch.randint(0, 1000, (), generator=gen))
    w = float(1.0 + 7.0 * torch.rand((), generator=gen))

    args = dict(x_prime=x_prime, f=f, k=k, guidance_scale=w, noise=noise, seeds=seeds, step=step)
    ref_x, ref_net = reference.heun_step(x_hat, coef, net_rows=max(case.net_rows, 1), **args)
    scale = heun_term_scale(x_hat, coef, **args)
    out = x_hat if case.layout == "alias" else poisoned(shape, torch.float32, device)
    out_net = poisoned((case.net_rows * batch, *shape[1:]), dtype, device) if case.net_rows else None
    result = ops.heun_step(x_hat, coef, out=out, out_net=out_net, backend=backend, **args)

    where = f"(seed {seed}, {backend}, {dtype}, {shape}, {case})"
    assert result is out
    err = rel_err(out, ref_x, scale)
    assert err <= TOL[torch.float32], f"out rel err {err:.3g} {where}"
    if out_net is not None:
        eager = eager_lowp_net(ref_x, coef.double().cpu(), dtype, case.net_rows)
        n_scale = net_scale(scale, coef, case.net_rows)
        bound = lowp_bound(dtype, ref_net, eager, n_scale)
        err = rel_err(out_net, ref_net, n_scale)
        assert err <= bound, f"out_net rel err {err:.3g} > {bound:.3g} {where}"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (1, 3, 37, 41)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_features(backend_device, dtype, shape, case):
    backend, device = backend_device
    run_case(backend, device, dtype, shape, case)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_shapes(backend_device, dtype, shape):
    backend, device = backend_device
    run_case(backend, device, dtype, shape, Case())


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch.")
)
def test_real_shape(backend_device, dtype):
    """A CIFAR-sized batch, 64x3x32x32 (skipped for the Triton interpreter: too slow on a CPU)."""
    backend, device = backend_device
    if backend == "triton" and device.type == "cpu":
        pytest.skip("64x3x32x32 under TRITON_INTERPRET=1 is too slow for the CPU test budget")
    run_case(backend, device, dtype, (64, 3, 32, 32), Case(eps="noise", layout="alias"))


def test_absent_operands_ignore_their_coefficients(backend_device):
    """A missing operand contributes nothing, even when its coefficient is inf or NaN."""
    backend, device = backend_device
    x = torch.randn(2, 9, device=device)
    coef = torch.tensor([0.5, float("nan"), float("inf"), float("nan"), 2.0], device=device)
    out = poisoned((2, 9), torch.float32, device)
    net = poisoned((2, 9), torch.float32, device)
    ops.heun_step(x, coef, out=out, out_net=net, backend=backend)
    torch.testing.assert_close(out, 0.5 * x, rtol=1e-7, atol=0)
    torch.testing.assert_close(net, x, rtol=1e-7, atol=0)


def test_step_changes_only_the_noise(backend_device):
    """The same seeds at another step give other noise; the deterministic part is unchanged."""
    backend, device = backend_device
    x = torch.randn(2, 64, device=device)
    seeds = torch.tensor([7, 8], device=device)
    coef = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0], device=device)  # std = 0: noise is multiplied away
    outs = []
    for step in (0, 1):
        out = poisoned((2, 64), torch.float32, device)
        ops.heun_step(x, coef, out=out, seeds=seeds, step=step, backend=backend)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    coef[3] = 1.0
    for step in (0, 1):
        ops.heun_step(x, coef, out=outs[step], seeds=seeds, step=step, backend=backend)
    assert not torch.equal(outs[0], outs[1])
