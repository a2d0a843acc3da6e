"""Glue between torch tensors and the native kernels of ``edmfast._C`` (pybind11; CPU C++ and CUDA C++).

The extension takes integer addresses and sizes, never torch objects, so one build serves every
torch version. This module passes ``data_ptr()`` s, the current CUDA stream and the device index,
and registers every op with `torch.library.custom_op` (``torch.ops.edmfast.<op>``) plus a fake
implementation, so the ops trace under torch.compile and record into CUDA graphs: no host syncs.
The only allocation is the CFG reduction's workspace when the caller passes none
(`edmfast.ops.cfg_workspace` makes a static one), from torch's caching allocator.

Nothing here validates: these functions are the unchecked inner-loop entries
(`edmfast.ops.raw_affine_step`, `edmfast.ops.prepare_affine_step`). `edmfast.ops` checks every
operand once at the public boundary, and the C++ launchers re-check sizes, flags and pointers (an
error code, a few comparisons).
Argument meaning and math: `edmfast.reference` (the contracts).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

try:
    from . import _C  # type: ignore[attr-defined]  # compiled extension, no stubs

    _IMPORT_ERROR: str | None = None
except ImportError as e:  # the package is used from a source tree without a build
    _C = None
    _IMPORT_ERROR = str(e)

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def why_unavailable(kind: str) -> str | None:
    """None when the native ``kind`` ("cpu" or "cuda") backend can run here, else the reason."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    if _C is None:
        # say where edmfast came from: a source checkout in the current folder (never built)
        # shadows an installed package, and the fix differs (build it, or run from elsewhere)
        where = os.path.dirname(os.path.abspath(__file__))
        return (
            f"the native extension edmfast._C is not built ({_IMPORT_ERROR}); edmfast was imported "
            f'from {where}: build it there with `pip install -e .` (or `pip install "setuptools>=77" '
            "wheel pybind11 && pip install -e . --no-build-isolation`), or run from another folder "
            "if an installed edmfast is meant"
        )
    return None if kind == "cpu" else _why_no_cuda()


@functools.cache
def _why_no_cuda() -> str | None:
    if not _C.has_cuda():
        return (
            "edmfast._C was built without CUDA kernels (nvcc was not found at build time, or EDMFAST_CUDA=0)"
        )
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    count, error = _C.cuda_device_count()
    if count == 0:
        version = _C.cuda_runtime_version()
        return f"the CUDA runtime linked into edmfast._C (version {version}) sees no device: {error}"
    return None


# ----------------------------------------------------------------------------- helpers


def _addr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _device(t: Tensor) -> int:
    """The extension's device argument: -1 for the CPU kernels, else the CUDA device index."""
    return t.device.index if t.is_cuda else -1


def launch_context(device: torch.device) -> int:
    """What a launch on ``device`` needs besides its operands: the handle of torch's current CUDA
    stream there (the launch joins torch's ordering), or the CPU thread count (torch.get_num_threads()).

    Fetch it once per loop, not per launch: it changes only with ``torch.cuda.stream(...)`` or
    ``torch.set_num_threads``.
    """
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return torch.get_num_threads()


def _ctx(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else torch.get_num_threads()


def _scalar(value: float | Tensor) -> tuple[float, Tensor | None]:
    """A guidance value as (host float, device tensor or None): the kernels read the tensor at run time."""
    if isinstance(value, Tensor):
        return 1.0, value
    return float(value), None


def _hist4(hist: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """``hist`` (up to four history tensors, None for an absent one) as exactly four entries."""
    return (*hist, *(None,) * (4 - len(hist)))


# ----------------------------------------------------------------------------- fused affine pass

# _EAGER_NOTE: the public functions launch directly unless torch.compile is tracing. The registered
# custom ops are what torch.compile sees; in eager mode (and while a CUDA graph is captured, which
# records plain kernel launches) the dispatcher adds ~0.1-0.2 ms per call, measured as ~5 ms of a
# 62 ms CPU sampling run (benchmarks/bench_sampler.py, 2026-11-23). The prepared launches
# (`prepare_affine_step`, ...) go one step further: one native call with three integers per use.


def _launch_affine(
    x, coef, out, f, h0, h1, h2, h3, hist_out, k, w, w_tensor, noise, seeds, step, stage, out_net, bad,
    bad_step, churn,
) -> None:  # fmt: skip
    batch = x.shape[0]
    io = out_net if out_net is not None else f
    _C.affine_step(
        _device(x), _ctx(x), x.data_ptr(), _addr(h0), _addr(h1), _addr(h2), _addr(h3), _addr(f), _addr(k),
        _addr(noise), _addr(seeds), coef.data_ptr(), out.data_ptr(), _addr(hist_out), _addr(out_net), batch,
        x.numel() // batch, 0 if f is None else f.shape[0],
        0 if out_net is None else out_net.shape[0] // batch, 0 if io is None else _DTYPE_CODE[io.dtype], w,
        _addr(w_tensor), step, stage, churn, _addr(bad), bad_step,
    )  # fmt: skip


# Every argument is explicit (no defaults): torch 2.11's custom-op machinery fails on a mutated
# argument among trailing defaulted ones (issue 21); the Python entries pass them all.
@torch.library.custom_op("edmfast::affine_step", mutates_args=("out", "hist_out", "out_net", "bad"))
def _affine_step_op(
    x: Tensor,
    coef: Tensor,
    out: Tensor,
    f: Tensor | None,
    h0: Tensor | None,
    h1: Tensor | None,
    h2: Tensor | None,
    h3: Tensor | None,
    hist_out: Tensor | None,
    k: Tensor | None,
    guidance_scale: float,
    guidance: Tensor | None,
    noise: Tensor | None,
    seeds: Tensor | None,
    step: int,
    stage: int,
    out_net: Tensor | None,
    bad: Tensor | None,
    bad_step: int,
    churn: bool,
) -> None:
    _launch_affine(
        x, coef, out, f, h0, h1, h2, h3, hist_out, k, guidance_scale, guidance, noise, seeds, step, stage,
        out_net, bad, bad_step, churn,
    )  # fmt: skip


@_affine_step_op.register_fake
def _(*args, **kwargs) -> None:
    pass  # writes its out= buffers only; operands were checked by edmfast.ops


def _affine(
    x, coef, out, f, hist, hist_out, k, guidance_scale, noise, seeds, step, stage, out_net, bad, bad_step,
    churn
) -> None:  # fmt: skip
    h0, h1, h2, h3 = _hist4(hist)
    if isinstance(guidance_scale, Tensor):
        w, w_tensor = 1.0, guidance_scale
    else:
        w, w_tensor = float(guidance_scale), None
    if torch.compiler.is_compiling():
        torch.ops.edmfast.affine_step(
            x, coef, out, f, h0, h1, h2, h3, hist_out, k, w, w_tensor, noise, seeds, step, stage, out_net,
            bad, bad_step, churn,
        )  # fmt: skip
        return
    # The eager launch, written out inline: this is the inner loop's per-call cost (see _EAGER_NOTE).
    batch = x.shape[0]
    io = out_net if out_net is not None else f
    _C.affine_step(
        x.device.index if x.is_cuda else -1,
        torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else torch.get_num_threads(),
        x.data_ptr(), 0 if h0 is None else h0.data_ptr(), 0 if h1 is None else h1.data_ptr(),
        0 if h2 is None else h2.data_ptr(), 0 if h3 is None else h3.data_ptr(),
        0 if f is None else f.data_ptr(), 0 if k is None else k.data_ptr(),
        0 if noise is None else noise.data_ptr(), 0 if seeds is None else seeds.data_ptr(), coef.data_ptr(),
        out.data_ptr(), 0 if hist_out is None else hist_out.data_ptr(),
        0 if out_net is None else out_net.data_ptr(), batch, x.numel() // batch,
        0 if f is None else f.shape[0], 0 if out_net is None else out_net.shape[0] // batch,
        0 if io is None else _DTYPE_CODE[io.dtype], w, 0 if w_tensor is None else w_tensor.data_ptr(), step,
        stage, churn, 0 if bad is None else bad.data_ptr(), bad_step,
    )  # fmt: skip


def affine_step(
    x: Tensor,
    coef: Tensor,
    *,
    out: Tensor,
    f: Tensor | None = None,
    hist: tuple[Tensor | None, ...] = (),
    hist_out: Tensor | None = None,
    k: Tensor | None = None,
    guidance_scale: float | Tensor = 1.0,
    noise: Tensor | None = None,
    seeds: Tensor | None = None,
    step: int = 0,
    stage: int = 0,
    out_net: Tensor | None = None,
    bad: Tensor | None = None,
    bad_step: int = 0,
) -> None:
    """``out = a x + b F + sum_k c_k h_k + std eps``, ``out_net[j B + b] = c_net out[b]``,
    ``hist_out = p x + q F`` (`reference.affine_step`).

    x, hist[k], hist_out, noise, out: float32 [B, ...]; f: [B or 2B, ...] and out_net: [B or 2B,
    ...] of one dtype in (float32, float16, bfloat16); k: float32 [B]; seeds: int64 [B] (Philox
    stream of (seed, step, stage)); coef: one float32 row (>= 16) on the device, read by the
    kernel; guidance_scale: a float or a float32 [1] device tensor; bad: int32 [B], ``bad[b] =
    min(bad[b], bad_step)`` where row b of out is not finite. All contiguous, on one device; an
    output may be exactly an element-wise input (`edmfast.ops.affine_step`). Unchecked.
    """
    _affine(
        x,
        coef,
        out,
        f,
        hist,
        hist_out,
        k,
        guidance_scale,
        noise,
        seeds,
        step,
        stage,
        out_net,
        bad,
        bad_step,
        False,
    )


def heun_step(
    x_hat: Tensor,
    coef: Tensor,
    *,
    out: Tensor,
    x_prime: Tensor | None = None,
    f: Tensor | None = None,
    k: Tensor | None = None,
    guidance_scale: float | Tensor = 1.0,
    noise: Tensor | None = None,
    seeds: Tensor | None = None,
    step: int = 0,
    out_net: Tensor | None = None,
    bad: Tensor | None = None,
    bad_step: int = 0,
) -> None:
    """``out = p x_hat + q x_prime + r F + std eps``, ``out_net[j B + b] = c out[b]`` (`reference.heun_step`):
    `affine_step` with h0 = x_prime, on a row of >= 5 floats. Unchecked."""
    hist = () if x_prime is None else (x_prime,)
    _affine(
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


def churn(
    x: Tensor,
    coef: Tensor,
    *,
    out: Tensor,
    noise: Tensor | None = None,
    seeds: Tensor | None = None,
    step: int = 0,
    out_net: Tensor | None = None,
    bad: Tensor | None = None,
    bad_step: int = 0,
) -> None:
    """``out = x + std eps``, ``out_net[j B + b] = c out[b]``; std, c = coef[3:5] (`reference.churn`)."""
    _affine(x, coef, out, None, (), None, None, 1.0, noise, seeds, step, 0, out_net, bad, bad_step, True)


def prepare_affine_step(
    x: Tensor,
    coef: Tensor,
    *,
    out: Tensor,
    f_like: Tensor | None,
    hist: tuple[Tensor | None, ...],
    hist_out: Tensor | None,
    k: Tensor | None,
    guidance_scale: float | Tensor,
    noise: Tensor | None,
    seeds: Tensor | None,
    stage: int,
    out_net: Tensor | None,
    bad: Tensor | None,
    bad_step: int,
    churn: bool = False,
) -> Callable[[Tensor | None, int, int], None]:
    """`affine_step` with its static operands marshalled once: returns ``launch(f, step, ctx)``
    (one native call; f shaped and typed like ``f_like``, or None without; ctx from
    `launch_context`). The returned callable keeps every operand alive. Unchecked."""
    h0, h1, h2, h3 = _hist4(hist)
    w, w_tensor = _scalar(guidance_scale)
    batch = x.shape[0]
    io = out_net if out_net is not None else f_like
    keep = (x, coef, out, h0, h1, h2, h3, hist_out, k, w_tensor, noise, seeds, out_net, bad)
    handle = _C.prepare_affine_step(
        _device(x), x.data_ptr(), _addr(h0), _addr(h1), _addr(h2), _addr(h3), _addr(k), _addr(noise),
        _addr(seeds), coef.data_ptr(), out.data_ptr(), _addr(hist_out), _addr(out_net), batch,
        x.numel() // batch, 0 if f_like is None else f_like.shape[0],
        0 if out_net is None else out_net.shape[0] // batch, 0 if io is None else _DTYPE_CODE[io.dtype], w,
        _addr(w_tensor), stage, churn, _addr(bad), bad_step,
    )  # fmt: skip
    return _prepared(handle.launch, keep, f_like is not None)


def _prepared(launch: Callable[..., None], keep: tuple, with_f: bool) -> Callable[..., None]:
    """The per-use callable of a prepared native launch: f's address, then the native call. The
    default argument holds the operands (the native object has only their addresses)."""

    def run(f: Tensor, step: int, ctx: int, _keep: tuple = keep) -> None:
        launch(f.data_ptr(), step, ctx)

    def run_without_f(f: None, step: int, ctx: int, _keep: tuple = keep) -> None:
        launch(0, step, ctx)

    return run if with_f else run_without_f


# ----------------------------------------------------------------------------- ancestral pass

_VARIANCE_CODE = {"fixed": 0, "learned": 1, "learned_range": 2}


def _launch_ancestral(
    x, f, coef, out, variance, clip, k, w, w_tensor, noise, seeds, step, out_net, bad, bad_step
) -> None:  # fmt: skip
    batch = x.shape[0]
    _C.ancestral_step(
        _device(x), _ctx(x), x.data_ptr(), f.data_ptr(), _addr(k), _addr(noise), _addr(seeds),
        coef.data_ptr(), coef.numel(), out.data_ptr(), _addr(out_net), batch, x.numel() // batch, f.shape[0],
        0 if out_net is None else out_net.shape[0] // batch, _DTYPE_CODE[f.dtype], _VARIANCE_CODE[variance],
        clip, w, _addr(w_tensor), step, _addr(bad), bad_step,
    )  # fmt: skip


@torch.library.custom_op("edmfast::ancestral_step", mutates_args=("out", "out_net", "bad"))
def _ancestral_step_op(
    x: Tensor,
    f: Tensor,
    coef: Tensor,
    out: Tensor,
    variance: str,
    clip: bool,
    k: Tensor | None,
    guidance_scale: float,
    guidance: Tensor | None,
    noise: Tensor | None,
    seeds: Tensor | None,
    step: int,
    out_net: Tensor | None,
    bad: Tensor | None,
    bad_step: int,
) -> None:
    _launch_ancestral(
        x,
        f,
        coef,
        out,
        variance,
        clip,
        k,
        guidance_scale,
        guidance,
        noise,
        seeds,
        step,
        out_net,
        bad,
        bad_step,
    )


@_ancestral_step_op.register_fake
def _(*args, **kwargs) -> None:
    pass


def ancestral_step(
    x: Tensor,
    f: Tensor,
    coef: Tensor,
    *,
    out: Tensor,
    variance: str = "fixed",
    clip: bool = False,
    k: Tensor | None = None,
    guidance_scale: float | Tensor = 1.0,
    noise: Tensor | None = None,
    seeds: Tensor | None = None,
    step: int = 0,
    out_net: Tensor | None = None,
    bad: Tensor | None = None,
    bad_step: int = 0,
) -> None:
    """``out = coef1 x0 + coef2 x + cf F + std z``, ``out_net[j B + b] = c out[b]``
    (`reference.ancestral_step`).

    x, noise, out: float32 [B, ...]; f: [B or 2B, n or 2n] and out_net: [B or 2B, ...] of one
    dtype in (float32, float16, bfloat16); variance: "fixed", "learned" or "learned_range"; coef:
    float32 [8] or [16] on the device (read by the kernel). All contiguous, on one device; out may
    alias x. Unchecked (see the module docstring).
    """
    w, w_tensor = _scalar(guidance_scale)
    if torch.compiler.is_compiling():
        torch.ops.edmfast.ancestral_step(
            x, f, coef, out, variance, clip, k, w, w_tensor, noise, seeds, step, out_net, bad, bad_step
        )
        return
    # The eager launch written out inline, as in affine_step: the inner loop's per-call cost.
    batch = x.shape[0]
    _C.ancestral_step(
        x.device.index if x.is_cuda else -1,
        torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else torch.get_num_threads(),
        x.data_ptr(), f.data_ptr(), 0 if k is None else k.data_ptr(),
        0 if noise is None else noise.data_ptr(), 0 if seeds is None else seeds.data_ptr(), coef.data_ptr(),
        coef.numel(), out.data_ptr(), 0 if out_net is None else out_net.data_ptr(), batch, x.numel() // batch,
        f.shape[0], 0 if out_net is None else out_net.shape[0] // batch, _DTYPE_CODE[f.dtype],
        _VARIANCE_CODE[variance], clip, w, 0 if w_tensor is None else w_tensor.data_ptr(), step,
        0 if bad is None else bad.data_ptr(), bad_step,
    )  # fmt: skip


def prepare_ancestral_step(
    x: Tensor,
    coef: Tensor,
    *,
    out: Tensor,
    f_like: Tensor,
    variance: str,
    clip: bool,
    k: Tensor | None,
    guidance_scale: float | Tensor,
    noise: Tensor | None,
    seeds: Tensor | None,
    out_net: Tensor | None,
    bad: Tensor | None,
    bad_step: int,
) -> Callable[[Tensor, int, int], None]:
    """`ancestral_step` with its static operands marshalled once: ``launch(f, step, ctx)``. Unchecked."""
    w, w_tensor = _scalar(guidance_scale)
    batch = x.shape[0]
    keep = (x, coef, out, k, w_tensor, noise, seeds, out_net, bad)
    handle = _C.prepare_ancestral_step(
        _device(x), x.data_ptr(), _addr(k), _addr(noise), _addr(seeds), coef.data_ptr(), coef.numel(),
        out.data_ptr(), _addr(out_net), batch, x.numel() // batch, f_like.shape[0],
        0 if out_net is None else out_net.shape[0] // batch, _DTYPE_CODE[f_like.dtype],
        _VARIANCE_CODE[variance], clip, w, _addr(w_tensor), _addr(bad), bad_step,
    )  # fmt: skip
    return _prepared(handle.launch, keep, True)


# ----------------------------------------------------------------------------- CFG rescale


def workspace(f: Tensor) -> Tensor:
    """Zeroed float32 workspace of the CUDA reduction over f [2B, ...]: partial sums, one tagged
    arrival word per sample (ops.h: a launch that died mid-grid cannot poison a later one), and
    k. Allocate it once and keep it for a static CUDA graph; the CPU kernels need none (an empty
    tensor)."""
    batch = f.shape[0] // 2
    numel = f.numel() // max(f.shape[0], 1)
    size = _C.cfg_workspace_floats(batch, numel) if f.is_cuda else 0
    return torch.zeros(size, dtype=torch.float32, device=f.device)


_new_workspace = workspace  # for the functions whose `workspace` argument shadows the name


def counters(ws: Tensor, f: Tensor) -> Tensor:
    """The arrival words (int64 [B]: launch tag << 32 | count) of a CUDA workspace over f [2B, ...]."""
    batch = f.shape[0] // 2
    row = f.numel() // max(f.shape[0], 1)
    start = _C.cfg_counters_offset(batch, row)
    return ws[start : start + 2 * batch].view(torch.int64)


def _launch_cfg_factors(f, w, w_tensor, phi, phi_tensor, out, ws, numel=None) -> None:
    batch = f.shape[0] // 2
    row = f.numel() // f.shape[0]
    cond = f.data_ptr()
    uncond = cond + batch * row * f.element_size()
    # numel < row: the first numel elements of each row count, read in place (stride = row)
    count = row if numel is None else numel
    if f.is_cuda and ws is None:
        ws = _new_workspace(f)
    _C.cfg_rescale_factors(
        _device(f), _ctx(f), cond, uncond, out.data_ptr(), batch, count, _DTYPE_CODE[f.dtype], w, phi,
        _addr(w_tensor), _addr(phi_tensor), row, _addr(ws), 0 if ws is None else ws.numel(),
    )  # fmt: skip


@torch.library.custom_op("edmfast::cfg_rescale_factors", mutates_args=("out", "workspace"))
def _cfg_rescale_factors_op(
    f: Tensor,
    guidance_scale: float,
    guidance_rescale: float,
    out: Tensor,
    guidance_scale_tensor: Tensor | None,
    guidance_rescale_tensor: Tensor | None,
    workspace: Tensor | None,
    numel: int | None,
) -> None:
    _launch_cfg_factors(
        f,
        guidance_scale,
        guidance_scale_tensor,
        guidance_rescale,
        guidance_rescale_tensor,
        out,
        workspace,
        numel,
    )


@_cfg_rescale_factors_op.register_fake
def _(*args, **kwargs) -> None:
    pass


def _launch_cfg(
    cond: Tensor, uncond: Tensor, guidance_scale: float, guidance_rescale: float, out: Tensor
) -> None:
    batch = cond.shape[0]
    numel = cond.numel() // batch
    ws = None
    if cond.is_cuda:
        ws = torch.zeros(_C.cfg_workspace_floats(batch, numel), dtype=torch.float32, device=cond.device)
    _C.cfg_rescale(
        _device(cond), _ctx(cond), cond.data_ptr(), uncond.data_ptr(), out.data_ptr(), batch, numel,
        _DTYPE_CODE[cond.dtype], float(guidance_scale), float(guidance_rescale), _addr(ws),
        0 if ws is None else ws.numel(),
    )  # fmt: skip


@torch.library.custom_op("edmfast::cfg_rescale", mutates_args=("out",))
def _cfg_rescale_op(
    cond: Tensor, uncond: Tensor, guidance_scale: float, guidance_rescale: float, out: Tensor
) -> None:
    _launch_cfg(cond, uncond, guidance_scale, guidance_rescale, out)


@_cfg_rescale_op.register_fake
def _(*args, **kwargs) -> None:
    pass


def cfg_rescale_factors(
    f: Tensor,
    guidance_scale: float | Tensor,
    guidance_rescale: float | Tensor,
    *,
    out: Tensor,
    workspace: Tensor | None = None,
    numel: int | None = None,
) -> None:
    """k[b] = phi std(cond_b)/std(cfg_b) + (1 - phi) into float32 ``out`` [B]; f: [2B, ...], cond rows first.

    One reduction pass over f, one launch on every device (CUDA: the last block of each sample
    finalizes it); unbiased stds; ratio 1 where std(cfg) = 0 or M < 2
    (`edmfast.reference.cfg_rescale_factors`). The guidance values are floats or float32 [1]
    tensors on f's device; ``workspace`` from `workspace` (allocated here when None); ``numel``:
    count only the first numel (>= 1) elements of each row (None: all). Unchecked.
    """
    w, w_tensor = _scalar(guidance_scale)
    phi, phi_tensor = _scalar(guidance_rescale)
    if torch.compiler.is_compiling():
        torch.ops.edmfast.cfg_rescale_factors(f, w, phi, out, w_tensor, phi_tensor, workspace, numel)
    else:  # see _EAGER_NOTE
        _launch_cfg_factors(f, w, w_tensor, phi, phi_tensor, out, workspace, numel)


def prepare_cfg_rescale_factors(
    f_like: Tensor,
    guidance_scale: float | Tensor,
    guidance_rescale: float | Tensor,
    *,
    out: Tensor,
    workspace: Tensor | None,
    numel: int | None,
) -> Callable[[Tensor, int], None]:
    """`cfg_rescale_factors` with its static operands marshalled once: ``launch(f, ctx)``. Unchecked."""
    w, w_tensor = _scalar(guidance_scale)
    phi, phi_tensor = _scalar(guidance_rescale)
    batch = f_like.shape[0] // 2
    row = f_like.numel() // f_like.shape[0]
    if f_like.is_cuda and workspace is None:
        workspace = _new_workspace(f_like)
    keep = (out, w_tensor, phi_tensor, workspace)
    handle = _C.prepare_cfg_rescale_factors(
        _device(f_like), out.data_ptr(), batch, row if numel is None else numel, _DTYPE_CODE[f_like.dtype], w,
        phi, _addr(w_tensor), _addr(phi_tensor), row, _addr(workspace),
        0 if workspace is None else workspace.numel(),
    )  # fmt: skip
    launch = handle.launch

    def run(f: Tensor, ctx: int, _keep: tuple = keep) -> None:
        launch(f.data_ptr(), ctx)

    return run


def cfg_rescale(
    cond: Tensor, uncond: Tensor, guidance_scale: float, guidance_rescale: float, *, out: Tensor
) -> None:
    """``out = k[b] (uncond + w (cond - uncond))`` in cond's dtype: the factors, then one elementwise pass."""
    if torch.compiler.is_compiling():
        torch.ops.edmfast.cfg_rescale(cond, uncond, guidance_scale, guidance_rescale, out)
    else:  # see _EAGER_NOTE
        _launch_cfg(cond, uncond, guidance_scale, guidance_rescale, out)
