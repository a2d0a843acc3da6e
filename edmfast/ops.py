"""One entry per fused op; validates arguments once, then dispatches by backend.

Backends: ``"torch"`` (eager PyTorch ops, float32 state, works everywhere), ``"cpu"`` (C++
kernels of ``edmfast._C``), ``"cuda"`` (CUDA C++ kernels of ``edmfast._C``) and ``"triton"``
(Triton kernels; on CPU tensors under ``TRITON_INTERPRET=1``). The math of every op is defined
in `edmfast.reference`; every backend writes into caller-provided ``out=`` buffers so the loop
allocates nothing and can be captured in a CUDA graph.

The public entries (`affine_step`, the engine's generalized pass, with `heun_step` and `churn` as
its instances; `ancestral_step`, `cfg_rescale_factors`, `cfg_rescale`) are the one validation
layer: every operand, value and the backend are checked here, before any kernel runs. Two cheaper
ways to launch the same kernels, for a loop whose buffers are validated once:

* `raw_affine_step` / `raw_heun_step` / `raw_ancestral_step` / `raw_cfg_rescale_factors`: the
  kernels unchecked, same keywords (~8 us of host time per call on the cpu backend instead of ~25);
* `prepare_affine_step` / `prepare_ancestral_step` / `prepare_cfg_rescale_factors`: validated once,
  static pointers marshalled once, then ``launch(f, step, ctx)`` per use (~1 us on the cpu backend),
  with ``ctx`` from `launch_context`.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
from collections.abc import Callable
from types import ModuleType

import torch

from .layout import (
    ANC_AF,
    ANC_AX,
    ANC_C,
    ANC_CF,
    ANC_CLIP,
    ANC_COEF1,
    ANC_COEF2,
    ANC_LOG_BETA,
    ANC_LOG_BETA_TILDE,
    ANC_S,
    ANC_SIZE,
    ANC_VARIANCES,
    BAD_NONE,
    COEF_A,
    COEF_B,
    COEF_HIST,
    COEF_HP,
    COEF_HQ,
    COEF_NET,
    COEF_SIZE,
    COEF_STD,
    HEUN_COEF_MIN,
    HISTORY,
)

BACKENDS = ("torch", "cpu", "cuda", "triton")
IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

FLOAT32_MAX = 3.4028234663852886e38


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


# ----------------------------------------------------------------------------- backend registry


# Plain relative imports (not importlib) so torch.compile can trace through the dispatch.
def _native() -> ModuleType:
    from . import native

    return native


def _triton() -> ModuleType:
    from . import triton

    return triton


def backend_status(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else the reason it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        try:
            return _native().why_unavailable("cpu")
        except ImportError as e:  # pragma: no cover - only when the package is half-installed
            return f"edmfast.native failed to import: {e}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        try:
            return _native().why_unavailable("cuda")
        except ImportError as e:  # pragma: no cover
            return f"edmfast.native failed to import: {e}"
    # triton
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
    try:
        return _triton().why_unavailable(device)
    except ImportError as e:
        return f"triton is not importable: {e}"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to the fastest backend available on ``device``; check an explicit one."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string in {BACKENDS + ('auto',)}, got {type(backend).__name__}")
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for name in order:
            if backend_status(name, device) is None:
                return name
        return "torch"
    reason = backend_status(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} is not available: {reason}")
    return backend


# ----------------------------------------------------------------------------- validation


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _check_tensor(
    name: str,
    t: torch.Tensor | None,
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
    like: str = "x_hat",
) -> None:
    """``t`` (optional) is a tensor on ``device`` (that of operand ``like``) with a dtype in ``dtypes``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {like} is on {device}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def _check_out(name: str, t: torch.Tensor, rows: int, numel: int) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is written in place)")
    if t.dim() == 0 or t.shape[0] != rows or t.numel() != rows * numel:
        raise ValueError(f"{name} must have {rows} rows of {numel} elements, got shape {tuple(t.shape)}")


def _check_value(
    name: str,
    value: object,
    device: torch.device,
    like: str,
    lo: float | None = None,
    hi: float | None = None,
) -> None:
    """A guidance value: a finite host number (in [lo, hi]) or a float32 one-element tensor on ``device``.

    A tensor is read by the kernel at run time (one captured graph serves any value), so its
    value is not checked here: that would be a device-to-host sync.
    """
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.float32 or value.numel() != 1:
            raise TypeError(
                f"{name} as a tensor must be float32 with one element, got {value.dtype} {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but {like} is on {device}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a float32 one-element tensor, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
        raise ValueError(f"{name} must be finite and representable in float32, got {value!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def _extent(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _check_overlap(
    outputs: list[tuple[str, torch.Tensor | None]],
    inputs: list[tuple[str, torch.Tensor | None]],
    may_alias: tuple[tuple[str, str], ...] = (),
) -> None:
    """No output shares memory with an input or another output, except the exact aliases listed.

    The kernels read an element and write its result at the same index in the same thread, so an
    output that IS an input (same address, same size) is safe where allowed; a partial overlap
    (shifted by an element or a row) reads values another thread already overwrote. Outputs are
    contiguous, and so is every input that reaches a kernel (`.contiguous()` copies the others
    before launch), so a byte range per tensor is exact; distinct allocations never overlap.
    """
    if torch.compiler.is_compiling():
        return  # fake tensors have no addresses; the eager call checked the real ones
    spans = [(name, t, _extent(t)) for name, t in inputs if t is not None and t.numel() and t.is_contiguous()]
    for i, (name, t) in enumerate(outputs):
        if t is None or not t.numel():
            continue
        lo, hi = _extent(t)
        others = spans + [(n, o, _extent(o)) for n, o in outputs[:i] if o is not None and o.numel()]
        for other_name, _, (o_lo, o_hi) in others:
            if lo < o_hi and o_lo < hi:
                exact = lo == o_lo and hi == o_hi
                if exact and ((name, other_name) in may_alias or (other_name, name) in may_alias):
                    continue
                what = "is the same memory as" if exact else "partially overlaps"
                pairs = ", ".join(f"{a} may alias {b}" for a, b in may_alias)
                allowed = f" (only {pairs})" if exact and pairs else ""
                raise ValueError(f"{name} {what} {other_name}{allowed}; pass a separate buffer")


def _check_row(coef: torch.Tensor, least: int, what: str) -> None:
    """``coef`` is one contiguous 1-D row of >= ``least`` floats (a 2-D [1, C] slice or the whole
    [N, C] table is refused rather than read as its first row)."""
    if coef.dim() != 1 or coef.numel() < least or not coef.is_contiguous():
        raise ValueError(
            f"coef must be one contiguous float32 row {what} (1-D, >= {least} entries), "
            f"got shape {tuple(coef.shape)}"
        )


def _check_real(name: str, t: object) -> None:
    """Operands are tensors with data: a meta (shape-only) tensor has no memory a kernel could use."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(
            f"{name} is a meta tensor (shape only, no data): the fused ops run on CPU or CUDA tensors"
        )


def _check_pass(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    x_name: str,
    hist: tuple[tuple[str, torch.Tensor | None], ...],
    hist_out: torch.Tensor | None,
    f: torch.Tensor | None,
    k: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    out: torch.Tensor,
    out_net: torch.Tensor | None,
    guidance_scale: float | torch.Tensor,
    step: int,
    stage: int,
    bad: torch.Tensor | None,
    bad_step: int,
    may_alias: tuple[tuple[str, str], ...],
    f_name: str = "f",
) -> None:
    """The checks every affine pass shares (`affine_step`, `heun_step`, `churn`); errors name the
    argument as the caller's signature spells it (``x_name``, the names in ``hist``, ``f_name``)."""
    _check_real(x_name, x)
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{x_name} must be [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    device = x.device
    batch = x.shape[0]
    numel = x.numel() // batch
    f32 = (torch.float32,)
    _check_tensor(x_name, x, device, f32, like=x_name)
    for name, h in hist:
        _check_tensor(name, h, device, f32, like=x_name)
    for name, t, dtypes in (
        ("hist_out", hist_out, f32), ("noise", noise, f32), ("out", out, f32), ("k", k, f32),
        ("coef", coef, f32), (f_name, f, IO_DTYPES), ("out_net", out_net, IO_DTYPES),
        ("seeds", seeds, (torch.int64,)), ("bad", bad, (torch.int32,)),
    ):  # fmt: skip
        _check_tensor(name, t, device, dtypes, like=x_name)
    _check_value("guidance_scale", guidance_scale, device, x_name)
    _check_int("step", step, 0, 2**63 - 1)
    _check_int("stage", stage, 0, 2**32 - 1)
    _check_int("bad_step", bad_step, 0, BAD_NONE)
    for name, t in (*hist, ("noise", noise)):
        if t is not None and (t.dim() < 1 or t.shape[0] != batch or t.numel() != batch * numel):
            raise ValueError(f"{name} must match {x_name}'s shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if noise is not None and seeds is not None:
        raise ValueError("give noise or seeds, not both")
    if seeds is not None and tuple(seeds.shape) != (batch,):
        raise ValueError(f"seeds must be int64 [B]=[{batch}], got shape {tuple(seeds.shape)}")
    if f is not None:
        if f.dim() < 1 or f.shape[0] not in (batch, 2 * batch) or f.numel() != f.shape[0] * numel:
            raise ValueError(
                f"{f_name} must have B={batch} or 2B rows of {numel} elements, got {tuple(f.shape)}"
            )
        if k is not None and f.shape[0] != 2 * batch:
            raise ValueError(f"k (CFG rescale factors) needs {f_name} with 2B rows (cond then uncond)")
    if k is not None and tuple(k.shape) != (batch,):
        raise ValueError(f"k must be float32 [B]=[{batch}], got shape {tuple(k.shape)}")
    if bad is not None and (tuple(bad.shape) != (batch,) or not bad.is_contiguous()):
        raise ValueError(f"bad must be a contiguous int32 [B]=[{batch}] tensor, got shape {tuple(bad.shape)}")
    _check_out("out", out, batch, numel)
    if hist_out is not None:
        _check_out("hist_out", hist_out, batch, numel)
    if out_net is not None:
        if out_net.dim() < 1 or out_net.shape[0] not in (batch, 2 * batch):
            raise ValueError(f"out_net must have B={batch} or 2B rows, got shape {tuple(out_net.shape)}")
        _check_out("out_net", out_net, out_net.shape[0], numel)
        if f is not None and f.dtype != out_net.dtype:
            raise TypeError(f"{f_name} and out_net must share a dtype, got {f.dtype} and {out_net.dtype}")
    w = guidance_scale if isinstance(guidance_scale, torch.Tensor) else None
    _check_overlap(
        [("out", out), ("hist_out", hist_out), ("out_net", out_net), ("bad", bad)],
        [
            (x_name, x),
            *hist,
            (f_name, f if f_name == "f" else None),  # f_like is a template, never read
            ("noise", noise),
            ("k", k),
            ("seeds", seeds),
            ("coef", coef),
            ("guidance_scale", w),
        ],  # fmt: skip
        may_alias=may_alias,
    )


# The element-wise operands of `affine_step` (an output may be exactly one of them) and its outputs
# that may be (bad is per sample: it aliases nothing).
_AFFINE_INPUTS = ("x", "hist[0]", "hist[1]", "hist[2]", "hist[3]", "f", "noise")
_AFFINE_ALIASES = tuple((o, i) for o in ("out", "hist_out", "out_net") for i in _AFFINE_INPUTS)


def check_affine_args(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    f: torch.Tensor | None,
    hist: tuple[torch.Tensor | None, ...] | list[torch.Tensor | None],
    hist_out: torch.Tensor | None,
    k: torch.Tensor | None,
    guidance_scale: float | torch.Tensor,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    stage: int,
    out_net: torch.Tensor | None,
    bad: torch.Tensor | None,
    bad_step: int,
    f_name: str = "f",
) -> tuple[torch.Tensor | None, ...]:
    """Validate the operands of `affine_step` (ValueError/TypeError naming the argument); returns
    ``hist`` as a tuple."""
    if not isinstance(hist, (tuple, list)) or len(hist) > HISTORY:
        raise TypeError(
            f"hist must be a tuple of at most {HISTORY} history tensors (None for an absent one), got "
            + (f"{len(hist)} entries" if isinstance(hist, (tuple, list)) else type(hist).__name__)
        )
    hist = tuple(hist)
    for j, h in enumerate(hist):
        if h is not None:
            _check_real(f"hist[{j}]", h)
    _check_real("x", x)
    _check_real("coef", coef)
    _check_tensor("coef", coef, x.device, (torch.float32,), like="x")
    _check_row(coef, COEF_SIZE, "(edmfast.layout COEF_*)")
    _check_pass(
        x, coef, x_name="x", hist=tuple((f"hist[{j}]", h) for j, h in enumerate(hist)), hist_out=hist_out,
        f=f, k=k, noise=noise, seeds=seeds, out=out, out_net=out_net, guidance_scale=guidance_scale,
        step=step, stage=stage, bad=bad, bad_step=bad_step, may_alias=_AFFINE_ALIASES, f_name=f_name,
    )  # fmt: skip
    return hist


def check_step_args(
    x_hat: torch.Tensor,
    coef: torch.Tensor,
    *,
    x_prime: torch.Tensor | None,
    f: torch.Tensor | None,
    k: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    out: torch.Tensor,
    out_net: torch.Tensor | None,
    guidance_scale: float | torch.Tensor = 1.0,
    step: int = 0,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
) -> None:
    """Validate the operands of `heun_step` / `churn`; raise ValueError/TypeError naming the argument.

    The Heun pass keeps its original aliasing rule: out may be x_hat, nothing else."""
    _check_real("x_hat", x_hat)
    _check_real("coef", coef)
    _check_tensor("coef", coef, x_hat.device, (torch.float32,))
    # One row of the coefficient table: [p, q, r, std, c, padding...].
    _check_row(coef, HEUN_COEF_MIN, "[p, q, r, std, c, ...]")
    _check_pass(
        x_hat, coef, x_name="x_hat", hist=(("x_prime", x_prime),), hist_out=None, f=f, k=k, noise=noise,
        seeds=seeds, out=out, out_net=out_net, guidance_scale=guidance_scale, step=step, stage=0, bad=bad,
        bad_step=bad_step, may_alias=(("out", "x_hat"),),
    )  # fmt: skip


def check_ancestral_args(
    x: torch.Tensor,
    f: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    variance: str,
    clip: bool,
    k: torch.Tensor | None,
    guidance_scale: float | torch.Tensor,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    out_net: torch.Tensor | None,
    bad: torch.Tensor | None,
    bad_step: int,
    f_name: str = "f",
) -> None:
    """Validate the operands of `ancestral_step`; raise ValueError/TypeError naming the argument."""
    _check_real("x", x)
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{f_name} must be a torch.Tensor, got {type(f).__name__}")
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"coef must be a torch.Tensor, got {type(coef).__name__}")
    if not isinstance(variance, str) or variance not in ANC_VARIANCES:
        raise ValueError(f"variance must be one of {ANC_VARIANCES}, got {variance!r}")
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {clip!r}")
    device = x.device
    batch = x.shape[0]
    numel = x.numel() // batch
    f32 = (torch.float32,)
    for name, t, dtypes in (
        ("x", x, f32), (f_name, f, IO_DTYPES), ("coef", coef, f32), ("out", out, f32), ("k", k, f32),
        ("noise", noise, f32), ("seeds", seeds, (torch.int64,)), ("out_net", out_net, IO_DTYPES),
        ("bad", bad, (torch.int32,)),
    ):  # fmt: skip
        _check_tensor(name, t, device, dtypes, like="x")
    # One row of the per-step table: [ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c], and
    # in a row of >= 16 the columns cf and clip (edmfast.layout ANC_*).
    cols = coef.numel()
    if coef.dim() != 1 or not (cols == ANC_CF or cols >= ANC_SIZE) or not coef.is_contiguous():
        raise ValueError(
            "coef must be one contiguous float32 row [ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c] "
            f"(shape (8,)) or that row with [cf, clip] and padding (shape ({ANC_SIZE},)), "
            f"got shape {tuple(coef.shape)}"
        )
    _check_value("guidance_scale", guidance_scale, device, "x")
    _check_int("step", step, 0, 2**63 - 1)
    _check_int("bad_step", bad_step, 0, BAD_NONE)
    m = numel if variance == "fixed" else 2 * numel
    if f.dim() < 1 or f.shape[0] not in (batch, 2 * batch) or f.numel() != f.shape[0] * m:
        half = "" if variance == "fixed" else f" (prediction then variance half, variance={variance!r})"
        raise ValueError(
            f"{f_name} must have B={batch} or 2B rows of {m} elements{half}, got shape {tuple(f.shape)}"
        )
    if k is not None:
        if f.shape[0] != 2 * batch:
            raise ValueError(f"k (CFG rescale factors) needs {f_name} with 2B rows (cond then uncond)")
        if tuple(k.shape) != (batch,):
            raise ValueError(f"k must be float32 [B]=[{batch}], got shape {tuple(k.shape)}")
    if noise is not None and (noise.shape[0] != batch or noise.numel() != batch * numel):
        raise ValueError(f"noise must match x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    if noise is not None and seeds is not None:
        raise ValueError("give noise or seeds, not both")
    if seeds is not None and tuple(seeds.shape) != (batch,):
        raise ValueError(f"seeds must be int64 [B]=[{batch}], got shape {tuple(seeds.shape)}")
    if bad is not None and (tuple(bad.shape) != (batch,) or not bad.is_contiguous()):
        raise ValueError(f"bad must be a contiguous int32 [B]=[{batch}] tensor, got shape {tuple(bad.shape)}")
    _check_out("out", out, batch, numel)
    if out_net is not None:
        if out_net.dim() < 1 or out_net.shape[0] not in (batch, 2 * batch):
            raise ValueError(f"out_net must have B={batch} or 2B rows, got shape {tuple(out_net.shape)}")
        _check_out("out_net", out_net, out_net.shape[0], numel)
        if f.dtype != out_net.dtype:
            raise TypeError(f"{f_name} and out_net must share a dtype, got {f.dtype} and {out_net.dtype}")
    w = guidance_scale if isinstance(guidance_scale, torch.Tensor) else None
    _check_overlap(
        [("out", out), ("out_net", out_net), ("bad", bad)],
        [
            ("x", x),
            (f_name, f if f_name == "f" else None),  # f_like is a template, never read
            ("k", k),
            ("noise", noise),
            ("seeds", seeds),
            ("coef", coef),
            ("guidance_scale", w),
        ],  # fmt: skip
        may_alias=(("out", "x"),),
    )


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# ----------------------------------------------------------------------------- torch backend


def _torch_affine(
    x: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    f: torch.Tensor | None,
    hist: tuple[torch.Tensor | None, ...],
    hist_out: torch.Tensor | None,
    k: torch.Tensor | None,
    guidance_scale: float | torch.Tensor,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    stage: int,
    out_net: torch.Tensor | None,
    bad: torch.Tensor | None,
    bad_step: int,
    churn: bool,
) -> None:
    """The torch backend of the affine pass (eager float32 ops, no host sync). Reads a column only
    for a present operand; every result is computed before the first write (outputs may alias)."""
    batch = x.shape[0]
    xf = _flat(x)
    acc = xf.clone() if churn else coef[COEF_A] * xf  # a churn is a = 1, noise only
    F = None
    if f is not None:
        F = _flat(f).float()
        if F.shape[0] == 2 * batch:
            cond, uncond = F[:batch], F[batch:]
            w = guidance_scale.reshape(()) if isinstance(guidance_scale, torch.Tensor) else guidance_scale
            F = uncond + w * (cond - uncond)
            if k is not None:
                F = k.reshape(-1, 1) * F
        acc = acc + coef[COEF_B] * F
    for j, h in enumerate(hist):
        if h is not None:
            acc = acc + coef[COEF_HIST[j]] * _flat(h)
    if noise is not None:
        acc = acc + coef[COEF_STD] * _flat(noise)
    elif seeds is not None:
        from .philox import philox_normal

        eps = philox_normal(seeds, step, acc.shape[1], torch.float32, stage=stage).to(acc.device)
        acc = acc + coef[COEF_STD] * eps
    # Every result before the first write: an output may be exactly one of the inputs read above.
    writes: list[tuple[torch.Tensor, torch.Tensor]] = [(_flat(out), acc)]
    if hist_out is not None:
        h_new = coef[COEF_HP] * xf
        if F is not None:
            h_new = h_new + coef[COEF_HQ] * F
        writes.append((_flat(hist_out), h_new))
    if out_net is not None:
        net = (coef[COEF_NET] * acc).to(out_net.dtype)
        rows = _flat(out_net)
        writes += [(rows[j * batch : (j + 1) * batch], net) for j in range(out_net.shape[0] // batch)]
    if bad is not None:
        # Device-side and sync-free: a per-row all() over what was just computed.
        nonfinite = ~torch.isfinite(acc).all(dim=1)
        writes.append((bad, torch.where(nonfinite, bad.clamp(max=bad_step), bad)))
    for dst, value in writes:
        dst.copy_(value)


def _torch_affine_step(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    f: torch.Tensor | None = None,
    hist: tuple[torch.Tensor | None, ...] = (),
    hist_out: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    stage: int = 0,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
) -> None:
    """The torch backend of `affine_step`, with the same keyword signature."""
    _torch_affine(
        x, coef, out, f, hist, hist_out, k, guidance_scale, noise, seeds, step, stage, out_net, bad, bad_step,
        False,
    )  # fmt: skip


def _torch_heun_step(
    x_hat: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    x_prime: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
) -> None:
    """The torch backend of `heun_step` (the affine pass with h0 = x_prime), same keyword signature."""
    hist = () if x_prime is None else (x_prime,)
    _torch_affine(
        x_hat,
        coef,
        out,
        f,
        hist,
        None,
        k,
        guidance_scale,
        noise,
        seeds,
        step,
        0,
        out_net,
        bad,
        bad_step,
        False,
    )


def _torch_churn(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
) -> None:
    _torch_affine(
        x, coef, out, None, (), None, None, 1.0, noise, seeds, step, 0, out_net, bad, bad_step, True
    )


def _torch_ancestral_step(
    x: torch.Tensor,
    f: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    variance: str = "fixed",
    clip: bool = False,
    k: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
) -> None:
    """The torch backend of `ancestral_step` (eager float32 ops, no host sync)."""
    batch = x.shape[0]
    n = x.numel() // batch
    c = coef.to(torch.float32)
    xf = _flat(x)
    ff = _flat(f)
    pred = ff[:batch, :n].float()
    if ff.shape[0] == 2 * batch:
        uncond = ff[batch:, :n].float()
        w = guidance_scale.reshape(()) if isinstance(guidance_scale, torch.Tensor) else guidance_scale
        pred = uncond + w * (pred - uncond)
        if k is not None:
            pred = k.reshape(-1, 1) * pred
    x0 = c[ANC_AX] * xf + c[ANC_AF] * pred
    wide = coef.numel() > ANC_CF  # an 8-float row: no cf term, clip bound 1
    if clip:
        bound = c[ANC_CLIP] if wide else 1.0
        # compare-and-select: NaN passes through to the bad-row check, as in the kernels
        x0 = torch.where(x0 < -bound, -bound, torch.where(x0 > bound, bound, x0))
    x_new = c[ANC_COEF1] * x0 + c[ANC_COEF2] * xf
    if wide:
        x_new = x_new + c[ANC_CF] * pred
    z = None
    if noise is not None:
        z = _flat(noise)
    elif seeds is not None:
        from .philox import philox_normal

        z = philox_normal(seeds, step, n, torch.float32).to(x.device)
    if z is not None:
        s = c[ANC_S]
        if variance == "fixed":
            std = s
        else:
            v = ff[:batch, n:].float()
            if variance == "learned_range":
                frac = (v + 1.0) * 0.5
                logvar = frac * c[ANC_LOG_BETA] + (1.0 - frac) * c[ANC_LOG_BETA_TILDE]
            else:
                logvar = v
            std = s * torch.exp(0.5 * logvar)
        # s = 0 (the last step) adds nothing, even where exp overflows (0 * inf would be NaN).
        x_new = x_new + torch.where(s != 0, std * z, 0.0)
    _flat(out).copy_(x_new)
    if out_net is not None:
        net = (c[ANC_C] * x_new).to(out_net.dtype)
        rows = _flat(out_net)
        for j in range(out_net.shape[0] // batch):
            rows[j * batch : (j + 1) * batch].copy_(net)
    if bad is not None:
        nonfinite = ~torch.isfinite(x_new).all(dim=1)
        torch.where(nonfinite, bad.clamp(max=bad_step), bad, out=bad)


def _torch_cfg_rescale_factors(
    f: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    guidance_rescale: float | torch.Tensor,
    *,
    out: torch.Tensor,
    workspace: torch.Tensor | None = None,
    numel: int | None = None,
) -> None:
    """The torch backend of `cfg_rescale_factors` (no workspace needed)."""
    rows = _flat(f) if numel is None else _flat(f)[:, :numel]  # a view: the prediction half
    out.copy_(_torch_cfg_factors(rows.float(), guidance_scale, guidance_rescale))


def _float32(value: float) -> float:
    """``value`` rounded to float32 (the precision every kernel takes a host scalar in)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _torch_cfg_factors(
    f: torch.Tensor, w: float | torch.Tensor, phi: float | torch.Tensor
) -> torch.Tensor:  # fmt: skip
    batch = f.shape[0] // 2
    ff = _flat(f)
    if ff.shape[1] < 2:
        return torch.ones(batch, dtype=torch.float32, device=f.device)
    if isinstance(w, torch.Tensor):
        w = w.reshape(())
    # phi as the float32 value the kernels take (a float or a tensor give the same k), then float64
    phi = phi.reshape(()).double() if isinstance(phi, torch.Tensor) else _float32(phi)
    # Subtracting a per-sample pivot keeps the variance exact when |mean| >> std (variance is
    # shift-invariant; the cfg pivot is the cfg of the two pivots).
    cond = ff[:batch] - ff[:batch, :1]
    uncond = ff[batch:] - ff[batch:, :1]
    cfg = uncond + w * (cond - uncond)
    # The per-sample combination in float64, as the kernels' final stage does: a float32 ratio
    # overflows when std(cfg) is tiny but not 0 (w ~ 1e-43 gave inf, then phi = 0 gave 0 * inf).
    std_pos = cond.std(dim=1).double()
    std_cfg = cfg.std(dim=1).double()
    ratio = torch.where(std_cfg > 0, std_pos / torch.where(std_cfg > 0, std_cfg, 1.0), 1.0)
    return (phi * ratio + (1.0 - phi)).float()


# ----------------------------------------------------------------------------- unchecked entries


def _require(backend: str) -> None:
    """Raise BackendUnavailable when ``backend``'s kernels cannot run in this process at all."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("cpu", "cuda"):
        reason = _native().why_unavailable(backend)
    elif backend == "triton":
        try:
            import triton  # noqa: F401

            reason = None
        except ImportError as e:
            reason = f"triton is not importable: {e}"
    else:
        reason = None
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} is not available: {reason}")


def raw_affine_step(backend: str) -> Callable[..., None]:
    """`affine_step`'s kernel for ``backend``, unchecked: the same keyword signature minus ``backend``.

    For a loop whose buffers were validated once: no argument checks, no ``.contiguous()``, one
    native launch per call. Every operand must already be what `affine_step` accepts, contiguous;
    a wrong one is undefined behaviour. Under torch.compile the call goes through the registered
    custom op. `prepare_affine_step` is cheaper still per launch.
    """
    _require(backend)
    return _entry(backend, "affine_step")


def raw_heun_step(backend: str) -> Callable[..., None]:
    """`heun_step`'s kernel for ``backend``, unchecked: the same keyword signature minus ``backend``.

    For a loop whose buffers were validated once: no argument checks, no ``.contiguous()``, one
    native launch per call (~1-3 us of Python on the cpu backend, against ~25 us for `heun_step`).
    Every operand must already be what `heun_step` accepts, contiguous; a wrong one is undefined
    behaviour. Under torch.compile the call goes through the registered custom op.
    """
    _require(backend)
    return _entry(backend, "heun_step")


def raw_churn(backend: str) -> Callable[..., None]:
    """`churn`'s kernel for ``backend``, unchecked (see `raw_heun_step`)."""
    _require(backend)
    return _entry(backend, "churn")


def raw_cfg_rescale_factors(backend: str) -> Callable[..., None]:
    """`cfg_rescale_factors`'s kernel for ``backend``, unchecked (see `raw_heun_step`).

    Signature ``(f, guidance_scale, guidance_rescale, *, out, workspace=None, numel=None)``; with the
    workspace from `cfg_workspace` every backend is one launch and allocates nothing.
    """
    _require(backend)
    return _entry(backend, "cfg_rescale_factors")


def raw_ancestral_step(backend: str) -> Callable[..., None]:
    """`ancestral_step`'s kernel for ``backend``, unchecked (see `raw_heun_step`).

    Signature ``(x, f, coef, *, out, variance, clip, k, guidance_scale, noise, seeds, step,
    out_net, bad, bad_step)``: the public keywords minus ``backend``.
    """
    _require(backend)
    return _entry(backend, "ancestral_step")


def _impl(backend: str) -> ModuleType:
    return _native() if backend in ("cpu", "cuda") else _triton()


_TORCH_ENTRIES: dict[str, Callable[..., None]] = {
    "affine_step": _torch_affine_step,
    "heun_step": _torch_heun_step,
    "churn": _torch_churn,
    "cfg_rescale_factors": _torch_cfg_rescale_factors,
    "ancestral_step": _torch_ancestral_step,
}


def _entry(backend: str, op: str) -> Callable[..., None]:
    """The unchecked kernel entry of ``op`` on a resolved ``backend`` (same keyword signature)."""
    return _TORCH_ENTRIES[op] if backend == "torch" else getattr(_impl(backend), op)


# ----------------------------------------------------------------------------- public ops


def affine_step(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    f: torch.Tensor | None = None,
    hist: tuple[torch.Tensor | None, ...] = (),
    hist_out: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    stage: int = 0,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
    backend: str = "torch",
) -> torch.Tensor:
    """The generalized fused pass of the sampler engine, per element of sample b::

        out     = a x + b F + c0 h0 + c1 h1 + c2 h2 + c3 h3 + std eps
        out_net = c_net out            (B or 2B rows: the next network input, in the network dtype)
        h_out   = p x + q F            (into ``hist_out``, when given)

    with the columns of ``coef`` named in `edmfast.layout` (a contiguous float32 row of >= 16
    floats on x's device, read by the kernel at run time). x, ``hist`` (up to four history
    tensors, None for an absent one), noise, out, hist_out: float32 [B, ...]; f: the network output,
    [B or 2B, ...] in float32 / float16 / bfloat16 (2B rows: CFG, F = k (uncond + w (cond - uncond)),
    k float32 [B], w = ``guidance_scale``, a float or a float32 one-element tensor read at run
    time). eps: ``noise``, or the Philox stream of (``seeds`` [B], ``step``, element, ``stage``), or
    none. Absent operands contribute zero whatever their coefficient. ``bad``: optional int32 [B],
    ``bad[b] = min(bad[b], bad_step)`` when row b of out holds inf or NaN.

    Aliasing: an output (out, hist_out, out_net) may be exactly an element-wise input (x, an h_k,
    f, noise): every kernel reads all inputs of an element before writing its outputs, so
    ``out=x`` updates the state in place and ``hist_out=hist[j]`` replaces a history slot. Outputs
    never share memory with each other, bad aliases nothing, and partial overlaps are refused.
    See `edmfast.reference.affine_step`. Returns ``out``.
    """
    hist = check_affine_args(
        x, coef, out=out, f=f, hist=hist, hist_out=hist_out, k=k, guidance_scale=guidance_scale, noise=noise,
        seeds=seeds, step=step, stage=stage, out_net=out_net, bad=bad, bad_step=bad_step,
    )  # fmt: skip
    backend = resolve_backend(backend, x.device)
    if x.numel() == 0:
        return out  # samples of zero elements: nothing to compute, no kernel to launch
    _entry(backend, "affine_step")(
        x.contiguous(), coef, out=out, f=_c(f), hist=tuple(_c(h) for h in hist), hist_out=hist_out, k=_c(k),
        guidance_scale=guidance_scale, noise=_c(noise), seeds=_c(seeds), step=int(step), stage=int(stage),
        out_net=out_net, bad=bad, bad_step=int(bad_step),
    )  # fmt: skip
    return out


def heun_step(
    x_hat: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    x_prime: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
    backend: str = "torch",
) -> torch.Tensor:
    """Fused sampler pass ``out = p x_hat + q x_prime + r F + std eps; out_net = c out``.

    See `edmfast.reference.heun_step` for the full contract. ``out`` may alias ``x_hat``.
    ``guidance_scale``: a float, or a float32 one-element tensor on x_hat's device read at run
    time. ``bad``: optional int32 [B]; ``bad[b] = min(bad[b], bad_step)`` when row b of ``out``
    holds inf or NaN (detected in the pass itself; start it at `BAD_NONE`). Returns ``out``.
    """
    check_step_args(
        x_hat, coef, x_prime=x_prime, f=f, k=k, noise=noise, seeds=seeds, out=out, out_net=out_net,
        guidance_scale=guidance_scale, step=step, bad=bad, bad_step=bad_step,
    )  # fmt: skip
    backend = resolve_backend(backend, x_hat.device)
    if x_hat.numel() == 0:
        return out  # samples of zero elements: nothing to compute, no kernel to launch
    _entry(backend, "heun_step")(
        x_hat.contiguous(), coef, out=out, x_prime=_c(x_prime), f=_c(f), k=_c(k),
        guidance_scale=guidance_scale, noise=_c(noise), seeds=_c(seeds), step=int(step), out_net=out_net,
        bad=bad, bad_step=int(bad_step),
    )  # fmt: skip
    return out


def churn(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
    backend: str = "torch",
) -> torch.Tensor:
    """Fused churn ``out = x + std eps; out_net = c out`` (`edmfast.reference.churn`); ``bad`` as in
    `heun_step`."""
    check_step_args(
        x, coef, x_prime=None, f=None, k=None, noise=noise, seeds=seeds, out=out, out_net=out_net,
        step=step, bad=bad, bad_step=bad_step,
    )  # fmt: skip
    backend = resolve_backend(backend, x.device)
    if x.numel() == 0:
        return out
    _entry(backend, "churn")(
        x.contiguous(), coef, out=out, noise=_c(noise), seeds=_c(seeds), step=int(step), out_net=out_net,
        bad=bad, bad_step=int(bad_step),
    )  # fmt: skip
    return out


def ancestral_step(
    x: torch.Tensor,
    f: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    variance: str = "fixed",
    clip: bool = False,
    k: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
    backend: str = "torch",
) -> torch.Tensor:
    """One fused ancestral (DDPM / DDIM-eta) step: ``out = coef1 x0 + coef2 x + cf F + std z``,
    ``out_net = c out``, ``x0 = ax x + af F`` (clamped to [-clip, clip] when ``clip``).

    x: float32 [B, ...] (n elements per sample); f: [B or 2B, m] model output in float32 / float16 /
    bfloat16, m = n for ``variance="fixed"``, 2n (prediction half, then variance half) for
    ``"learned"`` / ``"learned_range"``; 2B rows is classifier-free guidance (cond rows first; the
    variance half is read from the cond rows), k: float32 [B] CFG-rescale factors. coef: the
    float32 row [ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c] on x's device (read at run
    time), or a row of 16 that adds cf and the clip bound (edmfast.layout ANC_CF / ANC_CLIP; an
    8-float row has no cf term and the bound 1). Noise z from ``noise`` (float32 like x), the
    Philox stream of (``seeds`` [B], ``step``), or none. ``bad`` as in `heun_step`; ``out`` may
    alias ``x``. See `edmfast.reference.ancestral_step`.
    """
    check_ancestral_args(
        x, f, coef, out=out, variance=variance, clip=clip, k=k, guidance_scale=guidance_scale, noise=noise,
        seeds=seeds, step=step, out_net=out_net, bad=bad, bad_step=bad_step,
    )  # fmt: skip
    backend = resolve_backend(backend, x.device)
    if x.numel() == 0:
        return out
    _entry(backend, "ancestral_step")(
        x.contiguous(), f.contiguous(), coef, out=out, variance=variance, clip=clip, k=_c(k),
        guidance_scale=guidance_scale, noise=_c(noise), seeds=_c(seeds), step=int(step), out_net=out_net,
        bad=bad, bad_step=int(bad_step),
    )  # fmt: skip
    return out


def _check_guidance(
    guidance_scale: float | torch.Tensor,
    guidance_rescale: float | torch.Tensor,
    device: torch.device,
    like: str,
) -> None:
    _check_value("guidance_scale", guidance_scale, device, like)
    _check_value("guidance_rescale", guidance_rescale, device, like, 0.0, 1.0)


def _check_f(f: torch.Tensor, name: str = "f") -> None:
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
    if f.dim() < 1 or f.shape[0] < 2 or f.shape[0] % 2:
        raise ValueError(f"{name} must have 2B rows (cond then uncond), got shape {tuple(f.shape)}")
    _check_tensor(name, f, f.device, IO_DTYPES)


def cfg_workspace(f: torch.Tensor, backend: str) -> torch.Tensor:
    """The static workspace `cfg_rescale_factors` needs to be one launch over f [2B, ...] (f's shape,
    dtype-independent) on ``backend``: zero-filled float32, possibly empty (cpu, torch). Allocate it
    once next to the other loop buffers; it belongs to this shape and backend."""
    _check_f(f)
    backend = resolve_backend(backend, f.device)
    if backend in ("torch", "cpu"):
        return torch.zeros(0, dtype=torch.float32, device=f.device)
    return _impl(backend).workspace(f)


def check_cfg_factors_args(
    f: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    guidance_rescale: float | torch.Tensor,
    out: torch.Tensor,
    workspace: torch.Tensor | None,
    numel: int | None,
    backend: str,
    f_name: str = "f",
) -> str:
    """Validate the operands of `cfg_rescale_factors`; returns the resolved backend."""
    _check_f(f, f_name)
    if numel is not None:
        _check_int("numel", numel, 0, f.numel() // f.shape[0])
    _check_guidance(guidance_scale, guidance_rescale, f.device, f_name)
    _check_tensor("out", out, f.device, (torch.float32,), like=f_name)
    _check_out("out", out, f.shape[0] // 2, 1)
    backend = resolve_backend(backend, f.device)
    if workspace is not None:
        _check_tensor("workspace", workspace, f.device, (torch.float32,), like=f_name)
        expected = cfg_workspace(f, backend).numel()  # sizes only (tiny): never on the raw path
        if not workspace.is_contiguous() or workspace.numel() != expected:
            raise ValueError(
                f"workspace must be cfg_workspace(f, {backend!r}) ({expected} contiguous float32), "
                f"got shape {tuple(workspace.shape)}"
            )
    tensors = [
        (n, v) for n, v in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale))
    ]
    _check_overlap(
        [("out", out), ("workspace", workspace)],
        [(f_name, f)] + [(n, v if isinstance(v, torch.Tensor) else None) for n, v in tensors],
    )
    return backend


def cfg_rescale_factors(
    f: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    guidance_rescale: float | torch.Tensor,
    *,
    out: torch.Tensor,
    workspace: torch.Tensor | None = None,
    numel: int | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Per-sample CFG-rescale factors k [B] (float32) from the batched prediction f [2B, ...].

    One reduction pass (four sums per sample). See `edmfast.reference.cfg_rescale_factors`. The
    guidance values are floats or float32 one-element tensors on f's device (read at run time);
    with ``workspace`` from `cfg_workspace` the op is one launch that allocates nothing.
    ``numel``: only the first ``numel`` elements of each row of f count (the prediction half of a
    model output with a variance half), read in place; None: the whole row.
    """
    backend = check_cfg_factors_args(f, guidance_scale, guidance_rescale, out, workspace, numel, backend)
    if f.numel() == 0 or numel == 0:
        return out.fill_(1.0)  # no elements: the unbiased std is undefined, the ratio is 1
    _entry(backend, "cfg_rescale_factors")(
        f.contiguous(), guidance_scale, guidance_rescale, out=out, workspace=workspace,
        numel=None if numel is None else int(numel),
    )  # fmt: skip
    return out


def cfg_rescale(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    *,
    out: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Classifier-free guidance with rescale (Lin et al. Eq. 14-16), shaped and typed like ``cond``."""
    for name, t in (("cond", cond), ("uncond", uncond)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(guidance_scale, torch.Tensor) or isinstance(guidance_rescale, torch.Tensor):
        raise TypeError("cfg_rescale takes float guidance values (tensors: cfg_rescale_factors + heun_step)")
    _check_guidance(guidance_scale, guidance_rescale, cond.device, "cond")
    if cond.shape != uncond.shape:
        raise ValueError(f"uncond shape {tuple(uncond.shape)} does not match cond shape {tuple(cond.shape)}")
    if cond.dim() < 1 or cond.shape[0] < 1:
        raise ValueError(f"cond must be [B, ...] with B >= 1, got shape {tuple(cond.shape)}")
    _check_tensor("cond", cond, cond.device, IO_DTYPES)
    _check_tensor("uncond", uncond, cond.device, (cond.dtype,), like="cond")
    if out is None:
        out = torch.empty_like(cond, memory_format=torch.contiguous_format)
    _check_tensor("out", out, cond.device, (cond.dtype,), like="cond")
    _check_out("out", out, cond.shape[0], cond.numel() // cond.shape[0])
    # Elementwise after the reduction: out may be cond or uncond exactly, never a shifted view.
    _check_overlap([("out", out)], [("cond", cond), ("uncond", uncond)], (("out", "cond"), ("out", "uncond")))
    backend = resolve_backend(backend, cond.device)
    if backend == "torch":
        f = torch.cat([cond, uncond]).float()
        k = _torch_cfg_factors(f, guidance_scale, guidance_rescale)
        cfg = _flat(f[cond.shape[0] :]) + guidance_scale * (
            _flat(f[: cond.shape[0]]) - _flat(f[cond.shape[0] :])
        )
        _flat(out).copy_(k.reshape(-1, 1) * cfg)
    elif cond.numel():
        _impl(backend).cfg_rescale(
            cond.contiguous(), uncond.contiguous(), float(guidance_scale), float(guidance_rescale), out=out
        )
    return out


# ----------------------------------------------------------------------------- prepared launches
#
# A sampler's loop launches the same pass on the same static buffers hundreds of times; only the
# network output, the step index and the launch context change. A prepared launch validates its
# operands once (the checks of the public op) and marshals every static pointer once; each use is
# then one native call with three integers (cpu / cuda; ~1 us of host time instead of the ~4-5 us
# of a raw entry, whose keyword call, argument tuple and data_ptr() calls dominate). The engine
# fetches the context once per loop with `launch_context`. Launches are plain kernel launches on
# the given stream, so they record into a CUDA graph under capture.


def launch_context(backend: str, device: torch.device) -> int | None:
    """The per-loop launch context of ``backend`` on ``device``: the handle of torch's current CUDA
    stream (cuda), the CPU thread count torch.get_num_threads() (cpu), None (torch, triton: they
    launch on torch's current stream themselves). Fetch it once per loop, not per launch."""
    if backend in ("cpu", "cuda"):
        return _native().launch_context(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return None


def _check_static(names_and_tensors: list[tuple[str, torch.Tensor | None]]) -> None:
    """A prepared launch reads its static operands in place every time: no copies."""
    for name, t in names_and_tensors:
        if t is not None and not t.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous for a prepared launch (it is read in place on every use)"
            )


def _no_launch(*args: object) -> None:
    """The prepared launch of a pass over samples of zero elements: nothing to compute."""


def prepare_affine_step(
    backend: str,
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    f_like: torch.Tensor | None = None,
    hist: tuple[torch.Tensor | None, ...] = (),
    hist_out: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    stage: int = 0,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
    checked: bool = False,
) -> Callable[[torch.Tensor | None, int, int | None], None]:
    """`affine_step` on static operands, validated once: returns ``launch(f, step, ctx)``.

    Every operand is that of `affine_step` (same checks, same errors), fixed for the life of the
    prepared launch and read in place on every use (so all must be contiguous; the buffers'
    contents may change between uses, a guidance tensor included). ``f_like`` gives the shape,
    dtype and device of the network output (None: the pass has no F). Per use: ``f`` (a contiguous
    tensor like ``f_like``, or None without one; not checked), ``step`` (the Philox step, an int in
    [0, 2**63)) and ``ctx`` from `launch_context` (backend, device). The returned callable keeps its
    operands alive.

    ``checked=True``: the caller vouches that these operands pass the checks (an engine preparing
    the many passes of one plan over buffers it allocated and validated once, ``backend`` already
    resolved); nothing is checked here then (a wrong operand is undefined behaviour).
    """
    if checked:
        hist = tuple(hist)
    else:
        _require(backend)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        hist = check_affine_args(
            x, coef, out=out, f=f_like, hist=hist, hist_out=hist_out, k=k, guidance_scale=guidance_scale,
            noise=noise, seeds=seeds, step=0, stage=stage, out_net=out_net, bad=bad, bad_step=bad_step,
            f_name="f_like",
        )  # fmt: skip
        backend = resolve_backend(backend, x.device)
        static = [("x", x), ("f_like", f_like), ("k", k), ("noise", noise), ("seeds", seeds)]
        _check_static(static + [(f"hist[{j}]", h) for j, h in enumerate(hist)])
    if x.numel() == 0:
        return _no_launch
    stage, bad_step = int(stage), int(bad_step)
    if backend == "torch":

        def run(f: torch.Tensor | None, step: int, ctx: int | None) -> None:
            _torch_affine(
                x, coef, out, f, hist, hist_out, k, guidance_scale, noise, seeds, step, stage, out_net, bad,
                bad_step, False,
            )  # fmt: skip

        return run
    return _impl(backend).prepare_affine_step(
        x, coef, out=out, f_like=f_like, hist=hist, hist_out=hist_out, k=k, guidance_scale=guidance_scale,
        noise=noise, seeds=seeds, stage=stage, out_net=out_net, bad=bad, bad_step=bad_step,
    )  # fmt: skip


def prepare_ancestral_step(
    backend: str,
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    f_like: torch.Tensor,
    variance: str = "fixed",
    clip: bool = False,
    k: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    out_net: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
) -> Callable[[torch.Tensor, int, int | None], None]:
    """`ancestral_step` on static operands, validated once: returns ``launch(f, step, ctx)``
    (f: a contiguous tensor like ``f_like``, unchecked; step: the Philox step; ctx from
    `launch_context`). See `prepare_affine_step` for the rules."""
    _require(backend)
    check_ancestral_args(
        x, f_like, coef, out=out, variance=variance, clip=clip, k=k, guidance_scale=guidance_scale,
        noise=noise, seeds=seeds, step=0, out_net=out_net, bad=bad, bad_step=bad_step, f_name="f_like",
    )  # fmt: skip
    backend = resolve_backend(backend, x.device)
    _check_static([("x", x), ("f_like", f_like), ("k", k), ("noise", noise), ("seeds", seeds)])
    if x.numel() == 0:
        return _no_launch
    bad_step = int(bad_step)
    if backend == "torch":

        def run(f: torch.Tensor, step: int, ctx: int | None) -> None:
            _torch_ancestral_step(
                x, f, coef, out=out, variance=variance, clip=clip, k=k, guidance_scale=guidance_scale,
                noise=noise, seeds=seeds, step=step, out_net=out_net, bad=bad, bad_step=bad_step,
            )  # fmt: skip

        return run
    return _impl(backend).prepare_ancestral_step(
        x, coef, out=out, f_like=f_like, variance=variance, clip=clip, k=k, guidance_scale=guidance_scale,
        noise=noise, seeds=seeds, out_net=out_net, bad=bad, bad_step=bad_step,
    )  # fmt: skip


def prepare_cfg_rescale_factors(
    backend: str,
    f_like: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    guidance_rescale: float | torch.Tensor,
    *,
    out: torch.Tensor,
    workspace: torch.Tensor | None = None,
    numel: int | None = None,
) -> Callable[[torch.Tensor, int | None], None]:
    """`cfg_rescale_factors` on static operands, validated once: returns ``launch(f, ctx)`` (f: a
    contiguous tensor like ``f_like``, unchecked; ctx from `launch_context`). With no
    ``workspace`` the cuda backend allocates one here, once."""
    _require(backend)
    backend = check_cfg_factors_args(
        f_like, guidance_scale, guidance_rescale, out, workspace, numel, backend, f_name="f_like"
    )
    _check_static([("f_like", f_like)])
    if f_like.numel() == 0 or numel == 0:

        def ones(f: torch.Tensor, ctx: int | None) -> None:
            out.fill_(1.0)  # no elements: the unbiased std is undefined, the ratio is 1

        return ones
    n = None if numel is None else int(numel)
    if backend == "torch":

        def run(f: torch.Tensor, ctx: int | None) -> None:
            _torch_cfg_rescale_factors(f, guidance_scale, guidance_rescale, out=out, numel=n)

        return run
    return _impl(backend).prepare_cfg_rescale_factors(
        f_like, guidance_scale, guidance_rescale, out=out, workspace=workspace, numel=n
    )
