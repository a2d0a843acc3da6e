"""affine_step (the generalized fused pass of the sampler engine) on every backend vs the float64 oracle.

Per element: ``out = a x + b F + c0 h0 + c1 h1 + c2 h2 + c3 h3 + std eps``, ``out_net = c_net out``
on B or 2B rows, ``hist_out = p x + q F`` (`edmfast.reference.affine_step`). Every history subset,
f with B / 2B (CFG) rows with and without rescale factors and with a float or a tensor guidance
scale, noise from a tensor / the Philox stream at stage 0 and 1 / none, hist_out, the exact
aliases the op allows (out = x, hist_out = the h_k it replaces, out = h_k, out_net = f), strided
and misaligned inputs. The coefficients of absent operands are NaN or inf (they must not leak), the
padding columns are NaN (never read), outputs are NaN-poisoned. Fresh random inputs per run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import TOL, gpu, poisoned, rel_err

from edmfast import layout, ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 1), (1, 7), (3, 7), (1, 1023), (2, 1023), (1, 3, 37, 41), (2, 3, 37, 41)]
HIST_SUBSETS = list(itertools.product((False, True), repeat=layout.HISTORY))


def _dtype_id(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _shape_id(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s))


@dataclass(frozen=True)
class Case:
    hist: tuple[bool, ...] = (True, True, True, True)
    f: str = "cfg_k"  # "none", "b" (B rows), "cfg" (2B rows), "cfg_k" (2B rows and factors k)
    w_tensor: bool = False  # guidance scale as a float32 [1] tensor (read at run time)
    eps: str = "seeds"  # "none", "noise", "seeds"
    stage: int = 1
    net_rows: int = 2  # 0: no out_net
    hist_out: bool = True
    layout: str = "contiguous"  # "contiguous", "strided", "offset", or one of ALIASES

    def __str__(self) -> str:
        h = "".join(str(int(v)) for v in self.hist)
        w = "-wT" if self.w_tensor else ""
        outs = f"net{self.net_rows}-ho{int(self.hist_out)}"
        return f"h{h}-f_{self.f}{w}-eps_{self.eps}{self.stage}-{outs}-{self.layout}"


# out = x; hist_out = the first present h_k (the slot it replaces); out = the last present h_k;
# out_net = f (B rows, same dtype)
ALIASES = ("out=x", "hist_out=h", "out=h", "out_net=f")

FEATURE_CASES = [
    Case(
        hist=h,
        f=("none", "b", "cfg", "cfg_k")[i % 4],
        w_tensor=i % 5 == 2,
        eps=("none", "noise", "seeds")[i % 3],
        stage=(i // 3) % 2,
        net_rows=(i + 1) % 3,
        hist_out=i % 2 == 1,
    )
    for i, h in enumerate(HIST_SUBSETS)
]
LAYOUT_CASES = [
    Case(layout="out=x"),
    Case(layout="hist_out=h", hist=(False, True, True, False)),
    Case(layout="out=h", hist=(True, False, False, True), eps="noise"),
    Case(layout="out_net=f", f="b", net_rows=1, eps="none"),
    Case(layout="strided", eps="noise"),
    Case(layout="offset", f="b", net_rows=1, stage=0),
]


def make_tensor(shape, dtype, device, gen, layout_: str, scale: float = 1.0) -> torch.Tensor:
    """Random values (exact in ``dtype``) as a contiguous tensor, a stride-2 view, or a contiguous
    view at storage offset 1 (misaligned for vector loads)."""
    values = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if layout_ == "strided":
        view = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype, device=device)[..., ::2]
    elif layout_ == "offset":
        view = torch.zeros(values.numel() + 1, dtype=dtype, device=device)[1:].view(shape)
    else:
        view = torch.empty(shape, dtype=dtype, device=device)
    view.copy_(values)
    return view


def make_coef(case: Case, gen: torch.Generator, device) -> torch.Tensor:
    """A 16-float row: random signed values for the present operands; NaN / inf for the absent
    ones and the padding (a kernel that reads them, or lets them leak, fails)."""
    c = (torch.rand(layout.COEF_SIZE, generator=gen, dtype=torch.float64) * 3 - 1.5).tolist()
    c[layout.COEF_A] = 0.5 + abs(c[layout.COEF_A])
    absent = [layout.COEF_B] if case.f == "none" else []
    absent += [layout.COEF_HIST[j] for j, on in enumerate(case.hist) if not on]
    absent += [] if case.eps != "none" else [layout.COEF_STD]
    absent += [] if case.net_rows else [layout.COEF_NET]
    absent += [] if case.hist_out else [layout.COEF_HP, layout.COEF_HQ]
    absent += [layout.COEF_HQ] if case.f == "none" else []
    for j, col in enumerate(absent):
        c[col] = math.inf if j % 2 else math.nan
    for col in range(layout.COEF_HQ + 1, layout.COEF_SIZE):
        c[col] = math.nan
    return torch.tensor(c, dtype=torch.float32, device=device)


def term_scale(x, coef, F, hist, eps, hist_out: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """|a x| + |b| |F| + sum |c_k h_k| + |std eps| per element (float64 [B, M]), and the same for
    hist_out: what a float32 evaluation is accurate relative to (the terms may cancel)."""
    c = coef.double().cpu()
    batch = x.shape[0]
    x64 = x.reshape(batch, -1).double().cpu()
    scale = c[layout.COEF_A].abs() * x64.abs()
    if F is not None:
        scale = scale + c[layout.COEF_B].abs() * F
    for j, h in enumerate(hist):
        if h is not None:
            scale = scale + c[layout.COEF_HIST[j]].abs() * h.reshape(batch, -1).double().cpu().abs()
    if eps is not None:
        scale = scale + c[layout.COEF_STD].abs() * eps.cpu().abs()
    h_scale = None
    if hist_out:
        h_scale = c[layout.COEF_HP].abs() * x64.abs()
        if F is not None:
            h_scale = h_scale + c[layout.COEF_HQ].abs() * F
    return scale, h_scale


def f_magnitude(f, batch: int, w: float, k) -> torch.Tensor:
    """|F| as a float32 evaluation sees it: |k| (|u| + |w| |c - u|) over CFG rows."""
    f64 = f.reshape(f.shape[0], -1).double().cpu()
    if f.shape[0] == batch:
        return f64.abs()
    cond, uncond = f64[:batch], f64[batch:]
    mag = uncond.abs() + abs(w) * (cond - uncond).abs()
    return mag if k is None else k.double().cpu().abs().reshape(-1, 1) * mag


@dataclass
class Operands:
    x: torch.Tensor
    coef: torch.Tensor
    f: torch.Tensor | None
    hist: tuple[torch.Tensor | None, ...]
    k: torch.Tensor | None
    w: float
    w_arg: float | torch.Tensor
    noise: torch.Tensor | None
    seeds: torch.Tensor | None
    step: int


def make_operands(case: Case, dtype, shape, device, gen) -> Operands:
    batch = shape[0]
    lay = case.layout if case.layout in ("strided", "offset") else "contiguous"
    coef = make_coef(case, gen, device)
    x = make_tensor(shape, torch.float32, device, gen, lay, scale=3.0)
    hist = tuple(make_tensor(shape, torch.float32, device, gen, lay) if on else None for on in case.hist)
    f = None
    if case.f != "none":
        rows = batch if case.f == "b" else 2 * batch
        f = make_tensor((rows, *shape[1:]), dtype, device, gen, lay)
    k = (0.5 + torch.rand(batch, generator=gen)).to(device) if case.f == "cfg_k" else None
    noise = make_tensor(shape, torch.float32, device, gen, lay) if case.eps == "noise" else None
    seeds = (
        torch.randint(-(2**62), 2**62, (batch,), generator=gen).to(device) if case.eps == "seeds" else None
    )
    step = int(torch.randint(0, 2**40, (), generator=gen))
    w = float(1.0 + 7.0 * torch.rand((), generator=gen))
    w_arg: float | torch.Tensor = torch.tensor([w], device=device) if case.w_tensor else w
    return Operands(x, coef, f, hist, k, w, w_arg, noise, seeds, step)


def lowp_bound(dtype, ref, eager, scale) -> float:
    """TOL, or 2x PyTorch eager's own error in the network dtype (STYLE rule 6)."""
    if dtype == torch.float32:
        return TOL[torch.float32]
    return max(TOL[dtype], 2.0 * rel_err(eager, ref, scale))


def run_case(backend: str, device: torch.device, dtype, shape, case: Case) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    batch = shape[0]
    o = make_operands(case, dtype, shape, device, gen)
    ref_out, ref_net, ref_hist = reference.affine_step(
        o.x, o.coef, f=o.f, hist=o.hist, k=o.k, guidance_scale=o.w, noise=o.noise, seeds=o.seeds, step=o.step,
        stage=case.stage, net_rows=max(case.net_rows, 1), hist_out=case.hist_out,
    )  # fmt: skip
    F = None if o.f is None else f_magnitude(o.f, batch, o.w, o.k)
    eps = reference.fused_noise(tuple(shape), o.noise, o.seeds, o.step, case.stage)
    scale, h_scale = term_scale(o.x, o.coef, F, o.hist, eps, case.hist_out)

    out = poisoned(shape, torch.float32, device)
    hist_out = poisoned(shape, torch.float32, device) if case.hist_out else None
    out_net = poisoned((case.net_rows * batch, *shape[1:]), dtype, device) if case.net_rows else None
    x, hist, f = o.x, list(o.hist), o.f
    if case.layout == "out=x":
        out = x
    elif case.layout == "hist_out=h":
        j = case.hist.index(True)
        hist_out = hist[j]
    elif case.layout == "out=h":
        j = len(case.hist) - 1 - case.hist[::-1].index(True)
        out = hist[j]
    elif case.layout == "out_net=f":
        out_net = f
    result = ops.affine_step(
        x, o.coef, out=out, f=f, hist=tuple(hist), hist_out=hist_out, k=o.k, guidance_scale=o.w_arg,
        noise=o.noise, seeds=o.seeds, step=o.step, stage=case.stage, out_net=out_net, backend=backend,
    )  # fmt: skip

    where = f"(seed {seed}, {backend}, {_dtype_id(dtype)}, {shape}, {case})"
    assert result is out
    err = rel_err(out, ref_out, scale)
    assert err <= TOL[torch.float32], f"out rel err {err:.3g} {where}"
    if hist_out is not None:
        err = rel_err(hist_out, ref_hist, h_scale)
        assert err <= TOL[torch.float32], f"hist_out rel err {err:.3g} {where}"
    if out_net is not None:
        c_net = float(o.coef[layout.COEF_NET])
        n_scale = abs(c_net) * scale.repeat(case.net_rows, 1)
        eager = (torch.tensor(c_net, dtype=dtype) * ref_out.to(dtype)).repeat(
            case.net_rows, *([1] * (len(shape) - 1))
        )
        bound = lowp_bound(dtype, ref_net, eager, n_scale)
        err = rel_err(out_net, ref_net, n_scale)
        assert err <= bound, f"out_net rel err {err:.3g} > {bound:.3g} {where}"


@pytest.mark.parametrize("case", FEATURE_CASES + LAYOUT_CASES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 37, 41)], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_features(backend_device, dtype, shape, case):
    run_case(*backend_device, dtype, shape, case)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_shapes(backend_device, dtype, shape):
    run_case(*backend_device, dtype, shape, Case())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_real_shape(backend_device, dtype):
    """A CIFAR-sized batch, 64x3x32x32, every operand, state updated in place (several CPU
    chunks and helper threads; skipped for the Triton interpreter: too slow on a CPU)."""
    backend, device = backend_device
    if backend == "triton" and device.type == "cpu":
        pytest.skip("64x3x32x32 under TRITON_INTERPRET=1 is too slow for the CPU test budget")
    run_case(backend, device, dtype, (64, 3, 32, 32), Case(layout="out=x"))
    run_case(
        backend, device, dtype, (64, 3, 32, 32), Case(layout="hist_out=h", eps="noise", f="b", net_rows=1)
    )


def test_philox_stages_are_the_reference_streams(backend_device):
    """a = 0, std = 1: out is eps itself. Stage 0 is the original (seed, step) stream (heun_step's),
    stage 1 another one; both match `reference.fused_noise` to float32 Box-Muller accuracy."""
    backend, device = backend_device
    shape = (3, 1029)
    x = torch.randn(shape, device=device)
    seeds = torch.tensor([5, -(2**40), 2**62 + 3], device=device)
    coef = torch.zeros(layout.COEF_SIZE, device=device)
    coef[layout.COEF_STD] = 1.0
    outs = []
    for stage in (0, 1, 2**32 - 1):
        out = poisoned(shape, torch.float32, device)
        ops.affine_step(x, coef, out=out, seeds=seeds, step=11, stage=stage, backend=backend)
        ref = reference.fused_noise(shape, None, seeds, 11, stage)
        assert (out.double().cpu() - ref.cpu()).abs().max() <= 2e-6, stage
        outs.append(out)
    heun = poisoned(shape, torch.float32, device)
    ops.heun_step(x, coef[:5].contiguous(), out=heun, seeds=seeds, step=11, backend=backend)
    assert torch.equal(heun, outs[0])
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_absent_operands_ignore_their_coefficients(backend_device):
    """Every column but a and c_net is inf or NaN and no other operand is given: out = a x."""
    backend, device = backend_device
    x = torch.randn(2, 9, device=device)
    coef = torch.full((layout.COEF_SIZE,), float("nan"), device=device)
    coef[1::2] = float("inf")
    coef[layout.COEF_A], coef[layout.COEF_NET] = 0.5, 2.0
    out = poisoned((2, 9), torch.float32, device)
    net = poisoned((2, 9), torch.float32, device)
    ops.affine_step(x, coef, out=out, out_net=net, backend=backend)
    torch.testing.assert_close(out, 0.5 * x, rtol=1e-7, atol=0)
    torch.testing.assert_close(net, x, rtol=1e-7, atol=0)
    # hist_out without f: h_out = p x, q (inf here) is not read
    coef[layout.COEF_HP] = -1.5
    h = poisoned((2, 9), torch.float32, device)
    ops.affine_step(x, coef, out=out, hist_out=h, backend=backend)
    torch.testing.assert_close(h, -1.5 * x, rtol=1e-7, atol=0)


def test_heun_rows_of_five_floats_are_read_in_bounds(backend_device):
    """heun_step / churn rows may have 5 floats: the kernel reads only the columns of present operands."""
    backend, device = backend_device
    base = torch.randn(64, device=device)
    coef = base[-5:]  # the last 5 floats of a buffer: a read past them would be out of bounds
    coef.copy_(torch.tensor([0.9, 0.4, -0.6, 0.3, 1.7]))
    x, xp, f = (torch.randn(2, 33, device=device) for _ in range(3))
    out, net = poisoned((2, 33), torch.float32, device), poisoned((2, 33), torch.float32, device)
    ops.heun_step(x, coef, out=out, x_prime=xp, f=f, out_net=net, backend=backend)
    ref, ref_net = reference.heun_step(x, coef, x_prime=xp, f=f)
    assert rel_err(out, ref) <= 1e-6 and rel_err(net, ref_net) <= 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in the interpreter
def test_bad_flags(backend_device):
    """bad[b] = min(bad[b], bad_step) for rows that turn non-finite through any operand."""
    backend, device = backend_device
    batch, numel = 6, 37
    x = torch.randn(batch, numel, device=device)
    f = torch.randn(batch, numel, device=device)
    h = [torch.randn(batch, numel, device=device) for _ in range(4)]
    noise = torch.randn(batch, numel, device=device)
    x[1, 3] = float("nan")
    h[2][2, numel - 1] = float("inf")
    f[3, 0] = float("-inf")
    noise[4, 17] = float("nan")
    coef = torch.rand(layout.COEF_SIZE, device=device) + 0.1
    bad = torch.tensor([ops.BAD_NONE, ops.BAD_NONE, 2, ops.BAD_NONE, 9, 1], dtype=torch.int32, device=device)
    out = poisoned((batch, numel), torch.float32, device)
    hist_out = poisoned((batch, numel), torch.float32, device)
    ops.affine_step(
        x,
        coef,
        out=out,
        f=f,
        hist=tuple(h),
        hist_out=hist_out,
        noise=noise,
        bad=bad,
        bad_step=5,
        backend=backend,
    )
    assert bad.tolist() == [ops.BAD_NONE, 5, 2, 5, 5, 1]


# ----------------------------------------------------------------------------- aliasing and validation


def _cpu_backends():
    out = []
    for b in ("torch", "cpu", "triton"):
        out.append(
            pytest.param(
                b, marks=pytest.mark.skipif(ops.backend_status(b, torch.device("cpu")) is not None, reason=b)
            )
        )
    return out


def _operands(batch=2, numel=12, **extra):
    a = dict(
        x=torch.randn(batch, numel),
        coef=torch.rand(layout.COEF_SIZE),
        out=poisoned((batch, numel), torch.float32, "cpu"),
        f=torch.randn(2 * batch, numel),
        hist=(torch.randn(batch, numel), None, torch.randn(batch, numel)),
        hist_out=poisoned((batch, numel), torch.float32, "cpu"),
        out_net=poisoned((2 * batch, numel), torch.float32, "cpu"),
        seeds=torch.arange(batch),
        step=3,
    )
    a.update(extra)
    return a


@pytest.mark.parametrize("backend", _cpu_backends())
def test_every_allowed_alias_gives_the_reference(backend):
    """Each output exactly aliasing each element-wise input: the result of separate buffers."""
    outputs = ("out", "hist_out", "out_net")
    for out_name, in_name in itertools.product(outputs, ("x", "h0", "h2", "f", "noise")):
        a = _operands(f=torch.randn(2, 12), out_net=poisoned((2, 12), torch.float32, "cpu"), seeds=None)
        a["noise"] = torch.randn(2, 12)
        hist = list(a["hist"])
        inputs = {"x": a["x"], "h0": hist[0], "h2": hist[2], "f": a["f"], "noise": a["noise"]}
        ref_out, ref_net, ref_hist = reference.affine_step(
            a["x"], a["coef"], f=a["f"], hist=tuple(hist), noise=a["noise"], hist_out=True
        )
        a[out_name] = inputs[in_name]
        ops.affine_step(backend=backend, **a)
        for name, ref in (("out", ref_out), ("hist_out", ref_hist), ("out_net", ref_net)):
            assert rel_err(a[name], ref) <= 1e-5, (out_name, in_name, name)


def test_aliasing_that_is_refused():
    def call(**kw):
        return ops.affine_step(backend="cpu", **_operands(**kw))

    shared = torch.empty(2, 12)
    with pytest.raises(ValueError, match="hist_out is the same memory as out"):
        call(out=shared, hist_out=shared)
    with pytest.raises(ValueError, match="out_net is the same memory as out"):
        call(out=shared, out_net=shared, f=torch.randn(2, 12))
    base = torch.randn(3, 12)
    with pytest.raises(ValueError, match=r"out partially overlaps hist\[0\]"):
        call(out=base[:2], hist=(base[1:],))
    with pytest.raises(ValueError, match="hist_out partially overlaps x"):
        call(x=base[:2], hist_out=base[1:])
    with pytest.raises(ValueError, match="bad is the same memory as"):
        x = torch.randn(2, 1)
        ops.affine_step(
            x, torch.rand(16), out=torch.empty(2, 1), bad=x.view(torch.int32).view(2), backend="cpu"
        )
    coef = torch.rand(16)
    with pytest.raises(ValueError, match="out is the same memory as coef"):
        ops.affine_step(torch.randn(1, 16), coef, out=coef.view(1, 16), backend="cpu")


BAD_INPUTS = [
    ("x", dict(x=torch.randn(2, 12).double()), TypeError),
    ("x", dict(x=torch.randn(0, 12)), ValueError),
    ("coef", dict(coef=torch.rand(8)), ValueError),  # a Heun row is too short for affine_step
    ("coef", dict(coef=torch.rand(2, 16)), ValueError),
    ("coef", dict(coef=torch.rand(32)[::2]), ValueError),
    ("coef", dict(coef=torch.rand(16).double()), TypeError),
    ("hist", dict(hist=tuple(torch.randn(2, 12) for _ in range(5))), TypeError),
    ("hist", dict(hist=torch.randn(2, 12)), TypeError),
    (r"hist\[2\]", dict(hist=(None, None, torch.randn(2, 11))), ValueError),
    (r"hist\[1\]", dict(hist=(None, torch.randn(2, 12).half())), TypeError),
    ("hist_out", dict(hist_out=torch.full((12, 2), math.nan).t()), ValueError),
    ("hist_out", dict(hist_out=torch.empty(2, 12, dtype=torch.float16)), TypeError),
    ("f", dict(f=torch.randn(3, 12)), ValueError),
    ("k", dict(k=torch.ones(3)), ValueError),
    ("k", dict(k=torch.ones(2), f=torch.randn(2, 12), out_net=None), ValueError),
    ("guidance_scale", dict(guidance_scale=float("nan")), ValueError),
    ("guidance_scale", dict(guidance_scale=torch.ones(2)), TypeError),
    ("noise", dict(noise=torch.randn(2, 12)), ValueError),  # and seeds
    ("noise", dict(noise=torch.randn(2, 13), seeds=None), ValueError),
    ("seeds", dict(seeds=torch.arange(3)), ValueError),
    ("step", dict(step=-1), ValueError),
    ("stage", dict(stage=2**32), ValueError),
    ("stage", dict(stage=1.0), TypeError),
    ("out_net", dict(out_net=torch.empty(3, 12)), ValueError),
    ("out_net", dict(out_net=torch.empty(4, 12, dtype=torch.float16)), TypeError),
    ("bad", dict(bad=torch.zeros(2, dtype=torch.int64)), TypeError),
    ("bad_step", dict(bad_step=2**31), ValueError),
    ("out", dict(out=torch.empty(2, 13)), ValueError),
]


@pytest.mark.parametrize("name,change,exc", BAD_INPUTS, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused_naming_the_argument(name, change, exc):
    a = _operands(**change)
    with pytest.raises(exc, match=name):
        ops.affine_step(backend="cpu", **a)
    for key in ("out", "hist_out"):
        if isinstance(a[key], torch.Tensor) and a[key].dtype == torch.float32 and a[key].shape == (2, 12):
            assert torch.isnan(a[key]).all(), f"a kernel ran despite the bad {name}"


def test_meta_tensors_say_what_is_wrong():
    """Issue 22 item 10: meta (shape-only) tensors get a message about meta tensors."""
    meta = dict(device="meta")
    x = torch.empty(2, 12, **meta)
    with pytest.raises(ValueError, match="meta tensor"):
        ops.affine_step(x, torch.empty(16, **meta), out=torch.empty(2, 12, **meta))
    with pytest.raises(ValueError, match="meta tensor"):
        ops.heun_step(x, torch.empty(5, **meta), out=torch.empty(2, 12, **meta))
    with pytest.raises(ValueError, match=r"hist\[0\] is a meta tensor"):
        ops.affine_step(torch.randn(2, 12), torch.rand(16), out=torch.empty(2, 12), hist=(x,))


def test_zero_elements_launch_nothing(backend_device):
    backend, device = backend_device
    x = torch.empty(3, 0, device=device)
    out = torch.empty(3, 0, device=device)
    assert ops.affine_step(x, torch.rand(16, device=device), out=out, backend=backend) is out


def test_case_matrix_covers_every_history_subset():
    assert {c.hist for c in FEATURE_CASES} == set(HIST_SUBSETS)
    assert {c.f for c in FEATURE_CASES} == {"none", "b", "cfg", "cfg_k"}
    assert {(c.eps, c.stage) for c in FEATURE_CASES} >= {("seeds", 0), ("seeds", 1), ("noise", 0)}
    assert any(c.w_tensor and c.f.startswith("cfg") for c in FEATURE_CASES)
    assert {c.net_rows for c in FEATURE_CASES} == {0, 1, 2}


# ----------------------------------------------------------------------------- prepared launches

PREPARED_CASES = [FEATURE_CASES[i] for i in (0, 5, 10, 15)] + [
    Case(layout="out=x"),
    Case(layout="hist_out=h", hist=(True, True, False, False), w_tensor=True),
    Case(layout="out_net=f", f="b", net_rows=1, eps="noise", hist_out=False),
]


def _operand_pair(case: Case, shape, device, gen):
    """Two identical operand sets (contiguous) for the public op and the prepared launch."""
    o = make_operands(case, torch.float32, shape, device, gen)

    def clone(t):
        return None if t is None else t.clone()

    w2 = o.w_arg.clone() if isinstance(o.w_arg, torch.Tensor) else o.w_arg
    hist = tuple(clone(h) for h in o.hist)
    p = Operands(
        o.x.clone(),
        o.coef.clone(),
        clone(o.f),
        hist,
        clone(o.k),
        o.w,
        w2,
        clone(o.noise),
        clone(o.seeds),
        o.step,
    )
    return o, p


def _outputs(case: Case, o: Operands, shape, device):
    """(out, hist_out, out_net, bad) for one operand set, aliased as the case says."""
    batch = shape[0]
    out = poisoned(shape, torch.float32, device)
    hist_out = poisoned(shape, torch.float32, device) if case.hist_out else None
    out_net = poisoned((case.net_rows * batch, *shape[1:]), torch.float32, device) if case.net_rows else None
    if case.layout == "out=x":
        out = o.x
    elif case.layout == "hist_out=h":
        hist_out = o.hist[case.hist.index(True)]
    elif case.layout == "out_net=f":
        out_net = o.f
    bad = torch.full((batch,), ops.BAD_NONE, dtype=torch.int32, device=device)
    return out, hist_out, out_net, bad


@pytest.mark.parametrize("case", PREPARED_CASES, ids=str)
def test_prepared_launch_equals_the_public_op(backend_device, case):
    """Three steps of a loop, the state and history updated in place, a new network output per
    step and the buffers' contents (noise, guidance tensor) changed between launches: the prepared
    launch gives the public op's results bit for bit."""
    backend, device = backend_device
    shape = (2, 3, 7, 11)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    o, p = _operand_pair(case, shape, device, gen)
    o_outs, p_outs = _outputs(case, o, shape, device), _outputs(case, p, shape, device)
    p_out, p_hist_out, p_net, p_bad = p_outs
    f_like = None if p.f is None else torch.empty_like(p.f)
    launch = ops.prepare_affine_step(
        backend, p.x, p.coef, out=p_out, f_like=f_like, hist=p.hist, hist_out=p_hist_out, k=p.k,
        guidance_scale=p.w_arg, noise=p.noise, seeds=p.seeds, stage=case.stage, out_net=p_net, bad=p_bad,
        bad_step=4,
    )  # fmt: skip
    ctx = ops.launch_context(backend, device)
    for i in range(3):
        f_step = None if o.f is None else torch.randn(o.f.shape, generator=gen).to(device)
        if case.layout == "out_net=f":  # f is the aliased static buffer: refill it in place
            o.f.copy_(f_step)
            p.f.copy_(f_step)
            f_step = None
        if o.noise is not None:
            fresh = torch.randn(o.noise.shape, generator=gen).to(device)
            o.noise.copy_(fresh)
            p.noise.copy_(fresh)
        if isinstance(o.w_arg, torch.Tensor):
            o.w_arg.fill_(2.0 + i)
            p.w_arg.fill_(2.0 + i)
        out, hist_out, out_net, bad = o_outs
        f_o = o.f if f_step is None else f_step
        ops.affine_step(
            o.x, o.coef, out=out, f=f_o, hist=o.hist, hist_out=hist_out, k=o.k, guidance_scale=o.w_arg,
            noise=o.noise, seeds=o.seeds, step=o.step + i, stage=case.stage, out_net=out_net, bad=bad,
            bad_step=4, backend=backend,
        )  # fmt: skip
        launch(p.f if f_step is None else f_step.clone(), o.step + i, ctx)
        for a, b in zip(o_outs, p_outs, strict=True):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"step {i}, {case}")


def test_prepared_launch_validates_once_naming_the_argument():
    x, coef, out = torch.randn(2, 12), torch.rand(16), torch.empty(2, 12)
    with pytest.raises(ValueError, match="backend"):
        ops.prepare_affine_step("gpu", x, coef, out=out)
    with pytest.raises(ValueError, match="f_like"):
        ops.prepare_affine_step("cpu", x, coef, out=out, f_like=torch.randn(3, 12))
    with pytest.raises(ValueError, match=r"hist\[1\] must be contiguous"):
        ops.prepare_affine_step("cpu", x, coef, out=out, hist=(None, torch.randn(12, 2).t()))
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.prepare_affine_step("cpu", torch.randn(12, 2).t(), coef, out=out)
    with pytest.raises(ValueError, match="stage"):
        ops.prepare_affine_step("cpu", x, coef, out=out, stage=-1)
    with pytest.raises(ValueError, match="out is the same memory as coef"):
        ops.prepare_affine_step("cpu", torch.randn(1, 16), coef, out=coef.view(1, 16))
    with pytest.raises(ValueError, match="meta tensor"):
        ops.prepare_affine_step("cpu", x.to("meta"), coef, out=out)
    nothing = ops.prepare_affine_step("cpu", torch.empty(2, 0), coef, out=torch.empty(2, 0))
    nothing(None, 0, 1)  # samples of zero elements: a launch that does nothing


def test_launch_context():
    cpu = torch.device("cpu")
    assert ops.launch_context("cpu", cpu) == torch.get_num_threads()
    assert ops.launch_context("torch", cpu) is None and ops.launch_context("triton", cpu) is None
    with pytest.raises(ValueError, match="backend"):
        ops.launch_context("auto", cpu)


def test_prepared_launch_keeps_its_operands_alive():
    """The caller may drop its references: the prepared launch still reads valid memory."""
    import gc

    x = torch.full((2, 5000), 2.0)
    coef = torch.zeros(16)
    coef[layout.COEF_A] = 3.0
    out = torch.empty(2, 5000)
    launch = ops.prepare_affine_step("cpu", x, coef, out=out)
    del x, coef
    gc.collect()
    torch.full((2, 5000), -7.0)  # would reuse the freed memory of x
    launch(None, 0, 1)
    assert bool((out == 6.0).all())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_prepared_launches_record_into_a_cuda_graph(backend):
    """CFG factors + the affine pass, prepared once, captured once with the context fetched inside
    the capture; replays with new coefficients, guidance and model output written in place equal the
    public ops run eagerly."""
    dev = torch.device("cuda")
    if ops.backend_status(backend, dev) is not None:
        pytest.skip(ops.backend_status(backend, dev))
    batch, shape = 3, (3, 4, 37, 41)
    x = torch.randn(shape, device=dev)
    h0 = torch.randn(shape, device=dev)
    f = torch.randn((2 * batch, *shape[1:]), device=dev, dtype=torch.bfloat16)
    coef = torch.rand(layout.COEF_SIZE, device=dev)
    w, phi = torch.tensor([3.0], device=dev), torch.tensor([0.5], device=dev)
    k, out = torch.empty(batch, device=dev), torch.empty(shape, device=dev)
    net = torch.empty_like(f)
    seeds = torch.tensor([1, 2, 3], device=dev)
    ws = ops.cfg_workspace(f, backend)
    factors = ops.prepare_cfg_rescale_factors(backend, f, w, phi, out=k, workspace=ws)
    step_fn = ops.prepare_affine_step(
        backend, x, coef, out=out, f_like=f, hist=(h0,), hist_out=h0, k=k, guidance_scale=w, seeds=seeds,
        stage=1, out_net=net,
    )  # fmt: skip

    def body():
        ctx = ops.launch_context(backend, dev)
        factors(f, ctx)
        step_fn(f, 7, ctx)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up (Triton compiles here, not during capture)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    h_start = h0.clone()
    with torch.cuda.graph(graph):
        body()
    for trial in range(3):
        coef.copy_(torch.rand(layout.COEF_SIZE, device=dev))
        f.copy_(torch.randn_like(f, dtype=torch.float32).to(torch.bfloat16))
        w.fill_(1.5 + trial)
        h0.copy_(h_start)
        graph.replay()
        torch.cuda.synchronize()
        want_k = torch.empty_like(k)
        ops.cfg_rescale_factors(f, float(w), float(phi), out=want_k, backend=backend)
        want_out, want_net, want_h = torch.empty_like(out), torch.empty_like(net), h_start.clone()
        ops.affine_step(
            x, coef, out=want_out, f=f, hist=(want_h,), hist_out=want_h, k=want_k, guidance_scale=float(w),
            seeds=seeds, step=7, stage=1, out_net=want_net, backend=backend,
        )  # fmt: skip
        assert torch.equal(k, want_k)
        assert torch.equal(out, want_out) and torch.equal(net, want_net) and torch.equal(h0, want_h)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_raw_entry_traces_under_torch_compile(backend):
    """The unchecked entry compiles without graph breaks (the registered custom op when tracing)
    and gives the eager results, in-place history slot included."""
    if ops.backend_status(backend, torch.device("cpu")) is not None:
        pytest.skip(ops.backend_status(backend, torch.device("cpu")))
    step = ops.raw_affine_step(backend)
    x, f, h0, h1 = (torch.randn(2, 40) for _ in range(4))
    coef = torch.rand(layout.COEF_SIZE)
    seeds = torch.tensor([3, 4])

    def body(x, f, h0, h1, out, net):
        step(
            x, coef, out=out, f=f, hist=(h0, None, h1), hist_out=h0, seeds=seeds, step=5, stage=1, out_net=net
        )
        return out * 2

    compiled = torch.compile(body, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (body, compiled):
        hist0 = h0.clone()
        out, net = torch.empty(2, 40), torch.empty(2, 40)
        doubled = fn(x, f, hist0, h1, out, net)
        results.append((doubled, out, net, hist0))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=TOL[torch.float32], atol=0)
    ref_out, _, ref_h = reference.affine_step(
        x, coef, f=f, hist=(h0, None, h1), seeds=seeds, step=5, stage=1, hist_out=True
    )
    assert rel_err(results[1][1], ref_out) <= 1e-5 and rel_err(results[1][3], ref_h) <= 1e-5
