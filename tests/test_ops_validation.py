"""Bad input to the public ops (issue 13): a clear error naming the argument, before any kernel runs.

Unknown or unavailable backends, guidance values that are NaN, non-numeric, bool or beyond float32,
steps outside [0, 2**63), a 2-D coefficient table passed as one row, and outputs that partially
overlap an input (out= shifted by an element or a row over x_hat, out_net over f): the cpu and
triton kernels would have returned silently wrong values for the last one. Exact aliasing of
out with x_hat stays allowed (the engine updates its state in place).
"""

from __future__ import annotations

import pytest
import torch
from conftest import poisoned

from edmfast import ops, reference

COEF = [0.9, 0.4, -0.6, 0.3, 1.7, 0.0, 0.0, 0.0]


def _args(device="cpu", batch=2, numel=12):
    return dict(
        x_hat=torch.randn(batch, numel, device=device),
        coef=torch.tensor(COEF, device=device),
        out=poisoned((batch, numel), torch.float32, device),
        f=torch.randn(2 * batch, numel, device=device),
        out_net=poisoned((2 * batch, numel), torch.float32, device),
    )


def _untouched(args) -> bool:
    return bool(torch.isnan(args["out"]).all() and torch.isnan(args["out_net"]).all())


@pytest.mark.parametrize("backend", ["gpu", "Triton", "", "cuda:0"])
def test_unknown_backend_string_is_refused(backend):
    a = _args()
    with pytest.raises(ValueError, match="backend"):
        ops.heun_step(a.pop("x_hat"), a.pop("coef"), backend=backend, **a)
    f = torch.randn(4, 10)
    with pytest.raises(ValueError, match="backend"):
        ops.cfg_rescale_factors(f, 7.5, 0.7, out=torch.empty(2), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ops.churn(torch.randn(2, 3), torch.ones(5), out=torch.empty(2, 3), backend=backend)


def test_non_string_backend_is_a_type_error():
    a = _args()
    with pytest.raises(TypeError, match="backend"):
        ops.heun_step(a.pop("x_hat"), a.pop("coef"), backend=None, **a)


def test_cuda_backend_on_cpu_tensors_is_refused():
    a = _args()
    with pytest.raises(ops.BackendUnavailable, match="CUDA tensors"):
        ops.heun_step(a.pop("x_hat"), a.pop("coef"), backend="cuda", **a)
    assert _untouched(a)
    with pytest.raises(ops.BackendUnavailable, match="CUDA tensors"):
        ops.cfg_rescale_factors(torch.randn(4, 10), 7.5, 0.7, out=torch.empty(2), backend="cuda")


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = _args()
    with pytest.raises(ops.BackendUnavailable, match="TRITON_INTERPRET"):
        ops.heun_step(a.pop("x_hat"), a.pop("coef"), backend="triton", **a)
    assert _untouched(a)


BAD_GUIDANCE = [
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (1e39, ValueError),  # finite in float64, inf in the float32 the kernels compute in
    ("7.5", TypeError),
    (True, TypeError),
    (None, TypeError),
    (torch.tensor([7.5], dtype=torch.float64), TypeError),
    (torch.tensor([7.5, 1.0]), TypeError),
]


@pytest.mark.parametrize("value,exc", BAD_GUIDANCE, ids=[repr(v) for v, _ in BAD_GUIDANCE])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_guidance_scale(backend, value, exc):
    a = _args()
    with pytest.raises(exc, match="guidance_scale"):
        ops.heun_step(a.pop("x_hat"), a.pop("coef"), guidance_scale=value, backend=backend, **a)
    assert _untouched(a)
    with pytest.raises(exc, match="guidance_scale"):
        ops.cfg_rescale_factors(torch.randn(4, 10), value, 0.7, out=torch.empty(2), backend=backend)


@pytest.mark.parametrize(
    "value,exc", [(True, TypeError), (1.5, ValueError), (-0.1, ValueError), (float("nan"), ValueError)]
)
def test_bad_guidance_rescale(value, exc):
    k = poisoned((2,), torch.float32, "cpu")
    with pytest.raises(exc, match="guidance_rescale"):
        ops.cfg_rescale_factors(torch.randn(4, 10), 7.5, value, out=k, backend="cpu")
    with pytest.raises(exc, match="guidance_rescale"):
        ops.cfg_rescale(torch.randn(2, 10), torch.randn(2, 10), 7.5, value, backend="cpu")
    assert torch.isnan(k).all()


@pytest.mark.parametrize(
    "step,exc", [(2**63, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError), ("3", TypeError)]
)
def test_bad_step(step, exc):
    a = _args()
    seeds = torch.tensor([1, 2])
    with pytest.raises(exc, match="step"):
        ops.heun_step(a.pop("x_hat"), a.pop("coef"), seeds=seeds, step=step, backend="cpu", **a)
    assert _untouched(a)


def test_largest_step_is_accepted():
    x = torch.randn(2, 12)
    coef = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    seeds = torch.tensor([1, 2])
    out = torch.empty_like(x)
    ops.heun_step(x, coef, out=out, seeds=seeds, step=2**63 - 1, backend="cpu")
    ref, _ = reference.heun_step(x, coef, seeds=seeds, step=2**63 - 1)
    assert torch.allclose(out, ref.float(), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8), (4, 8), (8, 1)], ids=["one-row-2d", "table", "column"])
def test_coefficient_table_is_not_a_row(shape):
    a = _args()
    coef = torch.tensor(COEF).repeat(max(shape[0], 1), 1)[: shape[0], : shape[1]].reshape(shape)
    a.pop("coef")
    with pytest.raises(ValueError, match="coef"):
        ops.heun_step(a.pop("x_hat"), coef.contiguous(), backend="cpu", **a)
    assert _untouched(a)


@pytest.mark.parametrize(
    "name,value,exc",
    [
        ("bad", torch.zeros(2, dtype=torch.int64), TypeError),
        ("bad", torch.zeros(3, dtype=torch.int32), ValueError),
        ("bad", torch.zeros(4, dtype=torch.int32)[::2], ValueError),
        ("bad_step", -1, ValueError),
        ("bad_step", 2**31, ValueError),
        ("bad_step", 2.0, TypeError),
    ],
)
def test_bad_recording_arguments(name, value, exc):
    a = _args()
    with pytest.raises(exc, match=name):
        ops.heun_step(a.pop("x_hat"), a.pop("coef"), backend="cpu", **{name: value}, **a)
    assert _untouched(a)


# ----------------------------------------------------------------------------- overlapping outputs


def _overlap_cases():
    """(label, build) where build() -> (x_hat, f, out, out_net) with one partial overlap."""

    def out_shifted_element():
        base = torch.randn(2 * 12 + 1)
        return base[1:].view(2, 12), None, base[:-1].view(2, 12), None

    def out_shifted_row():
        base = torch.randn(3, 12)
        return base[1:], None, base[:2], None

    def out_net_over_f_row():
        base = torch.randn(5, 12)
        return torch.randn(2, 12), base[:4], torch.empty(2, 12), base[1:5]

    def out_net_over_x_hat():
        base = torch.randn(4 * 12)
        return base[:24].view(2, 12), None, torch.empty(2, 12), base[12:36].view(2, 12)

    def out_net_over_out():
        base = torch.empty(4 * 12)
        return torch.randn(2, 12), None, base[:24].view(2, 12), base[:24].view(2, 12)

    return [
        ("out-x_hat-element", out_shifted_element),
        ("out-x_hat-row", out_shifted_row),
        ("out_net-f-row", out_net_over_f_row),
        ("out_net-x_hat", out_net_over_x_hat),
        ("out_net-out", out_net_over_out),
    ]


@pytest.mark.parametrize("label,build", _overlap_cases(), ids=[c[0] for c in _overlap_cases()])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_partial_overlap_is_refused(backend, label, build):
    if ops.backend_status(backend, torch.device("cpu")) is not None:
        pytest.skip(ops.backend_status(backend, torch.device("cpu")))
    x_hat, f, out, out_net = build()
    before = x_hat.clone()
    coef = torch.tensor(COEF)
    with pytest.raises(ValueError, match="overlaps|same memory"):
        ops.heun_step(x_hat, coef, out=out, f=f, out_net=out_net, backend=backend)
    assert torch.equal(x_hat, before), "a kernel ran despite the overlap"


def test_cfg_out_overlapping_f_is_refused():
    f = torch.randn(4, 10)
    with pytest.raises(ValueError, match="out"):
        ops.cfg_rescale_factors(f, 7.5, 0.7, out=f.view(-1)[3:5], backend="cpu")
    cond = torch.randn(3, 10)
    with pytest.raises(ValueError, match="overlaps"):
        ops.cfg_rescale(cond[:2], cond[1:], 7.5, 0.7, out=cond[1:], backend="cpu")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_exact_alias_of_out_and_x_hat_is_allowed(backend):
    if ops.backend_status(backend, torch.device("cpu")) is not None:
        pytest.skip(ops.backend_status(backend, torch.device("cpu")))
    x = torch.randn(3, 17)
    f = torch.randn(3, 17)
    coef = torch.tensor(COEF)
    ref, _ = reference.heun_step(x, coef, f=f)
    ops.heun_step(x, coef, out=x, f=f, backend=backend)
    assert torch.allclose(x, ref.float(), atol=1e-5)


def test_the_same_buffer_as_another_input_is_refused():
    x = torch.randn(2, 12)
    xp = torch.randn(2, 12)
    with pytest.raises(ValueError, match="same memory"):
        ops.heun_step(x, torch.tensor(COEF), out=xp, x_prime=xp, backend="cpu")
