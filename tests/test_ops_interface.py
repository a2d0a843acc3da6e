"""The engine-facing additions of edmfast.ops (coord INTERFACE items 1-3), on every backend.

* one keyword signature per op on every backend (STYLE rule 1), and registered custom-op schemas
  without default arguments (issue 21: torch 2.11 fails on a mutated argument among defaulted ones).

* ``bad`` / ``bad_step``: per-sample non-finite recording inside heun_step and churn (min of the
  steps, only rows that hold inf or NaN; finite rows whose float32 sum would overflow never count).
* guidance values as float32 one-element tensors read at run time (heun_step, cfg_rescale_factors).
* cfg_rescale_factors with a static workspace from ops.cfg_workspace: repeated launches on one
  workspace stay correct (the CUDA / Triton arrival counters reset themselves) and bitwise stable.
* raw_heun_step / raw_churn / raw_cfg_rescale_factors: the unchecked entries give the public ops'
  results, and trace under torch.compile (raw_ancestral_step: tests/test_ancestral_step.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, gpu, poisoned, rel_err

from edmfast import ops, reference

COEF = [0.9, 0.4, -0.6, 0.3, 1.7, 0.0, 0.0, 0.0]


def _arrival_words(ws: torch.Tensor, f: torch.Tensor, backend: str) -> torch.Tensor:
    """The per-sample arrival words (int64: launch tag << 32 | count) of a CFG-factors workspace."""
    if backend == "triton":
        from edmfast.triton.cfg_rescale import counters
    else:
        from edmfast.native import counters
    return counters(ws, f)


def _expected_bad(before: torch.Tensor, x: torch.Tensor, step: int) -> torch.Tensor:
    """The contract: bad[b] = min(bad[b], step) where row b of out holds inf or NaN."""
    nonfinite = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    return torch.where(nonfinite.to(before.device), before.clamp(max=step), before)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in the interpreter
@pytest.mark.parametrize("numel", [1, 7, 1029], ids=lambda m: f"M{m}")
def test_heun_step_records_nonfinite_rows(backend_device, numel):
    backend, device = backend_device
    batch = 5
    x = torch.randn(batch, numel, device=device)
    f = torch.randn(2 * batch, numel, device=device)
    x[1, numel // 2] = float("nan")
    x[3, numel - 1] = float("inf")
    f[batch + 4, 0] = float("-inf")  # sample 4 turns non-finite through the uncond half of f
    coef = torch.tensor(COEF, device=device)
    bad = torch.tensor([ops.BAD_NONE, ops.BAD_NONE, 3, 9, ops.BAD_NONE], dtype=torch.int32, device=device)
    out = poisoned((batch, numel), torch.float32, device)
    before = bad.clone()
    ops.heun_step(x, coef, out=out, f=f, guidance_scale=2.0, bad=bad, bad_step=6, backend=backend)
    ref, _ = reference.heun_step(x, coef, f=f, guidance_scale=2.0)
    expected = _expected_bad(before, ref, 6)
    assert expected.tolist() == [ops.BAD_NONE, 6, 3, 6, 6]
    assert bad.tolist() == expected.tolist()
    # a later step never raises an entry (min), an earlier one lowers it
    ops.heun_step(x, coef, out=out, f=f, guidance_scale=2.0, bad=bad, bad_step=8, backend=backend)
    assert bad.tolist() == expected.tolist()
    ops.heun_step(x, coef, out=out, f=f, guidance_scale=2.0, bad=bad, bad_step=1, backend=backend)
    assert bad.tolist() == [ops.BAD_NONE, 1, 3, 1, 1]  # sample 2 is finite: its entry stays


def test_finite_rows_with_an_overflowing_sum_are_not_bad(backend_device):
    """Every element is finite but their float32 sum is inf: no sample may be blamed."""
    backend, device = backend_device
    x = torch.full((2, 1000), 3.0e38, device=device)
    x[1] *= -1
    coef = torch.tensor([1.0, 0.0, 0.0, 0.0, 1e-30], device=device)
    bad = torch.full((2,), ops.BAD_NONE, dtype=torch.int32, device=device)
    out = torch.empty_like(x)
    ops.heun_step(x, coef, out=out, bad=bad, bad_step=0, backend=backend)
    assert torch.isinf(out.sum(dim=1)).all()  # the old torch.sum check would have blamed both
    assert bad.tolist() == [ops.BAD_NONE, ops.BAD_NONE]


def test_churn_records_nonfinite_rows(backend_device):
    backend, device = backend_device
    x = torch.randn(3, 33, device=device)
    noise = torch.randn(3, 33, device=device)
    noise[2, 5] = float("nan")
    coef = torch.tensor([float("nan")] * 3 + [0.5, 2.0], device=device)
    bad = torch.full((3,), ops.BAD_NONE, dtype=torch.int32, device=device)
    out = poisoned((3, 33), torch.float32, device)
    ops.churn(x, coef, out=out, noise=noise, bad=bad, bad_step=4, backend=backend)
    assert bad.tolist() == [ops.BAD_NONE, ops.BAD_NONE, 4]
    ref, _ = reference.churn(x, coef, noise=noise)
    assert torch.equal(torch.isnan(out), torch.isnan(ref.float()))


def test_guidance_scale_tensor_is_read_at_run_time(backend_device):
    """One tensor, rewritten in place between calls, gives the result of each float value."""
    backend, device = backend_device
    x = torch.randn(2, 3, 5, 7, device=device)
    f = torch.randn(4, 3, 5, 7, device=device, dtype=torch.bfloat16)
    k = torch.tensor([0.8, 1.3], device=device)
    coef = torch.tensor(COEF, device=device)
    w = torch.empty(1, device=device)
    for value in (1.0, 7.5, -2.25):
        w.fill_(value)
        out = poisoned(x.shape, torch.float32, device)
        net = poisoned(f.shape, torch.bfloat16, device)
        ops.heun_step(x, coef, out=out, f=f, k=k, guidance_scale=w, out_net=net, backend=backend)
        want = torch.empty_like(out)
        want_net = torch.empty_like(net)
        ops.heun_step(x, coef, out=want, f=f, k=k, guidance_scale=value, out_net=want_net, backend=backend)
        assert torch.equal(out, want) and torch.equal(net, want_net), value


@pytest.mark.parametrize("numel", [1, 2, 37, 5000], ids=lambda m: f"M{m}")
def test_cfg_factors_with_tensors_and_a_static_workspace(backend_device, numel):
    backend, device = backend_device
    batch = 3
    f = (torch.randn(2 * batch, numel, device=device) * 2 + 5).to(torch.float16)
    ws = ops.cfg_workspace(f, backend)
    w = torch.empty(1, device=device)
    phi = torch.empty(1, device=device)
    for wv, pv in [(7.5, 0.7), (3.0, 1.0), (7.5, 0.7), (1.5, 0.0)]:
        w.fill_(wv)
        phi.fill_(pv)
        k = poisoned((batch,), torch.float32, device)
        ops.cfg_rescale_factors(f, w, phi, out=k, workspace=ws, backend=backend)
        again = poisoned((batch,), torch.float32, device)
        ops.cfg_rescale_factors(f, wv, pv, out=again, workspace=ws, backend=backend)
        assert torch.equal(k, again), "tensor and float guidance differ, or the result is not deterministic"
        assert rel_err(k, reference.cfg_rescale_factors(f, wv, pv)) <= 1e-5
    if ws.numel():
        # the arrival words (tag << 32 | count) hold a count of 0 after every launch
        assert [v & 0xFFFFFFFF for v in _arrival_words(ws, f, backend).tolist()] == [0] * batch


def test_cfg_workspace_must_match(backend_device):
    backend, device = backend_device
    f = torch.randn(4, 100, device=device)
    k = torch.empty(2, device=device)
    wrong = torch.zeros(ops.cfg_workspace(f, backend).numel() + 1, device=device)
    with pytest.raises(ValueError, match="workspace"):
        ops.cfg_rescale_factors(f, 7.5, 0.7, out=k, workspace=wrong, backend=backend)


def test_raw_entries_match_the_public_ops(backend_device):
    backend, device = backend_device
    batch, numel = 3, 301
    x = torch.randn(batch, numel, device=device)
    xp = torch.randn(batch, numel, device=device)
    f = torch.randn(2 * batch, numel, device=device)
    seeds = torch.tensor([4, -1, 2**40], device=device)
    coef = torch.tensor(COEF, device=device)
    w = torch.tensor([3.5], device=device)
    ws = ops.cfg_workspace(f, backend)
    outs = []
    for raw in (False, True):
        k = torch.empty(batch, device=device)
        out = torch.empty(batch, numel, device=device)
        net = torch.empty(2 * batch, numel, device=device)
        churned = torch.empty(batch, numel, device=device)
        bad = torch.full((batch,), ops.BAD_NONE, dtype=torch.int32, device=device)
        step_args = dict(
            out=out,
            x_prime=xp,
            f=f,
            k=k,
            guidance_scale=w,
            seeds=seeds,
            step=3,
            out_net=net,
            bad=bad,
            bad_step=2,
        )
        if raw:
            ops.raw_cfg_rescale_factors(backend)(f, w, 0.7, out=k, workspace=ws)
            ops.raw_heun_step(backend)(x, coef, **step_args)
            ops.raw_churn(backend)(x, coef, out=churned, seeds=seeds, step=5)
        else:
            ops.cfg_rescale_factors(f, w, 0.7, out=k, workspace=ws, backend=backend)
            ops.heun_step(x, coef, backend=backend, **step_args)
            ops.churn(x, coef, out=churned, seeds=seeds, step=5, backend=backend)
        outs.append((k, out, net, churned, bad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    ref_k = reference.cfg_rescale_factors(f, 3.5, 0.7)
    ref_x, _ = reference.heun_step(x, coef, x_prime=xp, f=f, k=ref_k, guidance_scale=3.5, seeds=seeds, step=3)
    assert rel_err(outs[0][1], ref_x) <= 1e-5


def test_raw_entry_of_an_unavailable_backend_says_why():
    with pytest.raises(ValueError, match="backend"):
        ops.raw_heun_step("gpu")
    with pytest.raises(ValueError, match="backend"):
        ops.raw_cfg_rescale_factors("auto")
    with pytest.raises(ValueError, match="backend"):
        ops.raw_ancestral_step("gpu")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_raw_entries_trace_under_torch_compile(backend):
    """The engine's loop body compiles without graph breaks (custom ops when tracing)."""
    if ops.backend_status(backend, torch.device("cpu")) is not None:
        pytest.skip(ops.backend_status(backend, torch.device("cpu")))
    step, factors = ops.raw_heun_step(backend), ops.raw_cfg_rescale_factors(backend)
    x = torch.randn(2, 40)
    x[1, 3] = float("nan")
    f = torch.randn(4, 40)
    coef = torch.tensor(COEF)

    def body(x, f, w, out, k, bad):
        factors(f, w, 0.5, out=k)
        step(x, coef, out=out, f=f, k=k, guidance_scale=w, bad=bad, bad_step=3)
        return out + 1

    compiled = torch.compile(body, fullgraph=True, backend="aot_eager")
    w = torch.tensor([2.0])
    results = []
    for fn in (body, compiled):
        out, k = torch.empty(2, 40), torch.empty(2)
        bad = torch.full((2,), ops.BAD_NONE, dtype=torch.int32)
        plus = fn(x, f, w, out, k, bad)
        results.append((plus, out, k, bad))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, equal_nan=True, rtol=TOL[torch.float32], atol=0)
    assert results[1][3].tolist() == [ops.BAD_NONE, 3]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_one_graph_serves_any_guidance(backend):
    """Capture CFG factors (static workspace, one launch) + heun_step with device guidance values
    and bad recording once; replays with new values in place match the reference each time."""
    dev = torch.device("cuda")
    if ops.backend_status(backend, dev) is not None:
        pytest.skip(ops.backend_status(backend, dev))
    step, factors = ops.raw_heun_step(backend), ops.raw_cfg_rescale_factors(backend)
    batch, numel = 3, 3 * 37 * 41 * 8  # several CFG chunks / programs per sample
    x = torch.randn(batch, numel, device=dev)
    f = torch.randn(2 * batch, numel, device=dev, dtype=torch.bfloat16)
    coef = torch.tensor(COEF, device=dev)
    w, phi = torch.empty(1, device=dev), torch.empty(1, device=dev)
    k, out = torch.empty(batch, device=dev), torch.empty(batch, numel, device=dev)
    bad = torch.full((batch,), ops.BAD_NONE, dtype=torch.int32, device=dev)
    ws = ops.cfg_workspace(f, backend)

    def body():
        factors(f, w, phi, out=k, workspace=ws)
        step(x, coef, out=out, f=f, k=k, guidance_scale=w, bad=bad, bad_step=5)

    w.fill_(2.0)
    phi.fill_(0.5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up (Triton compiles here, not during capture)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for wv, pv in [(7.5, 0.7), (1.5, 0.0), (3.0, 1.0)]:
        w.fill_(wv)
        phi.fill_(pv)
        graph.replay()
        torch.cuda.synchronize()
        ref_k = reference.cfg_rescale_factors(f, wv, pv)
        ref_x, _ = reference.heun_step(x, coef, f=f, k=ref_k, guidance_scale=wv)
        assert rel_err(k, ref_k) <= 1e-5
        assert rel_err(out, ref_x) <= 1e-5
        assert bad.tolist() == [ops.BAD_NONE] * batch
    # counts reset by every replay
    assert [v & 0xFFFFFFFF for v in _arrival_words(ws, f, backend).tolist()] == [0] * batch
    x[1, 7] = float("nan")
    graph.replay()
    assert bad.tolist() == [ops.BAD_NONE, 5, ops.BAD_NONE]


# ----------------------------------------------------------------------------- signatures and schemas

ENTRY_OPS = ("affine_step", "heun_step", "churn", "ancestral_step", "cfg_rescale_factors")


@pytest.mark.parametrize("op", ENTRY_OPS)
def test_every_backend_entry_has_the_public_signature(op):
    """STYLE rule 1: the unchecked entry of every backend takes the public op's keywords (minus
    backend), in the same order, with the same defaults."""
    import inspect

    from edmfast import native
    from edmfast import triton as T

    public = inspect.signature(getattr(ops, op)).parameters
    want = [(n, p.kind, p.default) for n, p in public.items() if n != "backend"]
    for entry in (ops._TORCH_ENTRIES[op], getattr(native, op), getattr(T, op)):
        got = [(n, p.kind, p.default) for n, p in inspect.signature(entry).parameters.items()]
        assert got == want, f"{entry.__module__}.{entry.__name__}"


def _registered_schemas() -> dict[str, list]:
    """Every overload schema of the ops registered under torch.ops.edmfast and torch.ops.edmfast_triton."""
    from edmfast import native  # noqa: F401  (registers torch.ops.edmfast.*)
    from edmfast import triton as T

    T._ops()  # registers torch.ops.edmfast_triton.*
    schemas: dict[str, list] = {}
    for name in torch._C._dispatch_get_all_op_names():
        namespace, _, op = name.partition("::")
        if namespace not in ("edmfast", "edmfast_triton"):
            continue
        packet = getattr(getattr(torch.ops, namespace), op)
        schemas[name] = [getattr(packet, overload)._schema for overload in packet.overloads()]
    return schemas


def test_registered_ops_have_no_default_arguments():
    """torch 2.11's custom_ops raise IndexError when a mutated argument sits among trailing
    defaulted arguments (issue 21 item 1): no edmfast op schema may declare a default."""
    schemas = _registered_schemas()
    for namespace in ("edmfast", "edmfast_triton"):
        for op in ("affine_step", "ancestral_step", "cfg_rescale_factors", "cfg_rescale"):
            assert f"{namespace}::{op}" in schemas, f"{namespace}::{op} is not registered"
    defaulted = [
        f"{schema.name}({arg.name})"
        for overloads in schemas.values()
        for schema in overloads
        for arg in schema.arguments
        if arg.has_default_value()
    ]
    assert defaulted == [], f"arguments with defaults: {defaulted}"
