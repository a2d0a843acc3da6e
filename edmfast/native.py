"""Glue between torch tensors and the native kernels of ``edmfast._C`` (pybind11; CPU C++ and CUDA C++).

The extension takes integer addresses and sizes, never torch objects, so one build serves every
torch version. This module checks the tensors (dtype, device, contiguity, sizes) right before
each launch, passes ``data_ptr()`` s, the current CUDA stream and the device index, and registers
every op with `torch.library.custom_op` (``torch.ops.edmfast.<op>``) plus a fake implementation,
so the ops trace under torch.compile and record into CUDA graphs: no host syncs, and the only
allocation is the small reduction workspace of the CUDA CFG ops, taken from torch's caching
allocator (graph-private memory during capture).

Argument meaning and math: `edmfast.reference` (the contracts) and `edmfast.ops` (which
validates shapes once, makes inputs contiguous and dispatches here for backends "cpu"/"cuda").
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    from . import _C  # type: ignore[attr-defined]  # compiled extension, no stubs

    _IMPORT_ERROR: str | None = None
except ImportError as e:  # the package is used from a source tree without a build
    _C = None
    _IMPORT_ERROR = str(e)

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_IO_DTYPES = tuple(_DTYPE_CODE)
_F32 = (torch.float32,)


def why_unavailable(kind: str) -> str | None:
    """None when the native ``kind`` ("cpu" or "cuda") backend can run here, else the reason."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    if _C is None:
        return (
            f"the native extension edmfast._C is not built ({_IMPORT_ERROR}); "
            "build it with `pip install -e . --no-build-isolation`"
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


# ----------------------------------------------------------------------------- checks


def _check(
    name: str, t: Tensor | None, dtypes: tuple[torch.dtype, ...], device: torch.device, numel: int
) -> None:
    """Cheap metadata checks (no sync) so a bad call raises here instead of reading out of bounds."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {tuple(str(d) for d in dtypes)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got shape {tuple(t.shape)}")


def _check_device(t: Tensor) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"the native backend runs on cpu or cuda tensors, got {t.device}")


def _check_step(x_hat, coef, out, x_prime, f, k, noise, seeds, out_net) -> tuple[int, int, int, int, int]:
    """Validate a fused-pass call; returns (batch, numel, f_rows, net_rows, dtype code)."""
    if not isinstance(x_hat, Tensor) or x_hat.dim() < 1 or x_hat.shape[0] < 1:
        raise ValueError("x_hat must be a [B, ...] tensor with B >= 1")
    _check_device(x_hat)
    device = x_hat.device
    batch = x_hat.shape[0]
    numel = x_hat.numel() // batch
    _check("x_hat", x_hat, _F32, device, batch * numel)
    _check("out", out, _F32, device, batch * numel)
    _check("x_prime", x_prime, _F32, device, batch * numel)
    _check("noise", noise, _F32, device, batch * numel)
    _check("seeds", seeds, (torch.int64,), device, batch)
    if not isinstance(coef, Tensor) or coef.numel() < 5:
        raise ValueError("coef must be a float32 tensor with >= 5 entries [p, q, r, std, c]")
    _check("coef", coef, _F32, device, coef.numel())
    if noise is not None and seeds is not None:
        raise ValueError("give noise or seeds, not both")
    f_rows = 0 if f is None else f.shape[0]
    if f is not None:
        if f_rows not in (batch, 2 * batch):
            raise ValueError(f"f must have B={batch} or 2B rows, got shape {tuple(f.shape)}")
        _check("f", f, _IO_DTYPES, device, f_rows * numel)
    if k is not None and f_rows != 2 * batch:
        raise ValueError("k (CFG rescale factors) needs f with 2B rows (cond then uncond)")
    _check("k", k, _F32, device, batch)
    net_rows = 0 if out_net is None else out_net.shape[0] // batch
    if out_net is not None:
        if out_net.shape[0] not in (batch, 2 * batch):
            raise ValueError(f"out_net must have B={batch} or 2B rows, got shape {tuple(out_net.shape)}")
        _check("out_net", out_net, _IO_DTYPES, device, out_net.shape[0] * numel)
        if f is not None and f.dtype != out_net.dtype:
            raise TypeError(f"f and out_net must share a dtype, got {f.dtype} and {out_net.dtype}")
    io = out_net if out_net is not None else f
    return batch, numel, f_rows, net_rows, _DTYPE_CODE[io.dtype] if io is not None else 0


def _check_cfg(cond: Tensor, uncond: Tensor, guidance_rescale: float) -> tuple[int, int]:
    if not isinstance(cond, Tensor) or cond.dim() < 1 or cond.shape[0] < 1:
        raise ValueError("cond must be a [B, ...] tensor with B >= 1")
    _check_device(cond)
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    batch = cond.shape[0]
    numel = cond.numel() // batch
    _check("cond", cond, _IO_DTYPES, cond.device, batch * numel)
    _check("uncond", uncond, (cond.dtype,), cond.device, batch * numel)
    return batch, numel


def _require(t: Tensor) -> None:
    """Raise with the reason when the kernels for ``t``'s device cannot run (cached after the first call)."""
    reason = why_unavailable(t.device.type)
    if reason is not None:
        raise RuntimeError(f"edmfast native backend unavailable: {reason}")


def _addr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(t: Tensor) -> tuple[int, int]:
    """(device index, handle of torch's current stream on it): the launch joins torch's ordering."""
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


# ----------------------------------------------------------------------------- fused sampler pass

# _EAGER_NOTE: the public functions launch directly unless torch.compile is tracing. The registered
# custom ops are what torch.compile sees; in eager mode (and while a CUDA graph is captured, which
# records plain kernel launches) the dispatcher adds ~0.1-0.2 ms per call, measured as ~5 ms of a
# 62 ms CPU sampling run (benchmarks/bench_sampler.py, 2026-11-23).


def _launch_step(x_hat, coef, out, x_prime, f, k, guidance_scale, noise, seeds, step, out_net, churn):
    batch, numel, f_rows, net_rows, dtype = _check_step(
        x_hat, coef, out, x_prime, f, k, noise, seeds, out_net
    )
    _require(x_hat)
    args = (
        _addr(x_hat), _addr(x_prime), _addr(f), _addr(k), _addr(noise), _addr(seeds), _addr(coef), _addr(out),
        _addr(out_net), batch, numel, f_rows, net_rows, dtype, float(guidance_scale), int(step), churn,
    )  # fmt: skip
    if x_hat.device.type == "cuda":
        _C.heun_step_cuda(*args, *_stream(x_hat))
    else:
        _C.heun_step_cpu(*args, torch.get_num_threads())


@torch.library.custom_op("edmfast::heun_step", mutates_args=("out", "out_net"))
def _heun_step_op(
    x_hat: Tensor,
    coef: Tensor,
    out: Tensor,
    x_prime: Tensor | None,
    f: Tensor | None,
    k: Tensor | None,
    guidance_scale: float,
    noise: Tensor | None,
    seeds: Tensor | None,
    step: int,
    out_net: Tensor | None,
) -> None:
    _launch_step(x_hat, coef, out, x_prime, f, k, guidance_scale, noise, seeds, step, out_net, False)


@_heun_step_op.register_fake
def _(x_hat, coef, out, x_prime, f, k, guidance_scale, noise, seeds, step, out_net) -> None:
    _check_step(x_hat, coef, out, x_prime, f, k, noise, seeds, out_net)


@torch.library.custom_op("edmfast::churn", mutates_args=("out", "out_net"))
def _churn_op(
    x: Tensor,
    coef: Tensor,
    out: Tensor,
    noise: Tensor | None,
    seeds: Tensor | None,
    step: int,
    out_net: Tensor | None,
) -> None:
    _launch_step(x, coef, out, None, None, None, 1.0, noise, seeds, step, out_net, True)


@_churn_op.register_fake
def _(x, coef, out, noise, seeds, step, out_net) -> None:
    _check_step(x, coef, out, None, None, None, noise, seeds, out_net)


def heun_step(
    x_hat: Tensor,
    coef: Tensor,
    *,
    out: Tensor,
    x_prime: Tensor | None,
    f: Tensor | None,
    k: Tensor | None,
    guidance_scale: float,
    noise: Tensor | None,
    seeds: Tensor | None,
    step: int,
    out_net: Tensor | None,
) -> None:
    """``out = p x_hat + q x_prime + r F + std eps``, ``out_net[j B + b] = c out[b]`` (`reference.heun_step`).

    x_hat, x_prime, noise, out: float32 [B, ...]; f: [B or 2B, ...] and out_net: [B or 2B, ...]
    of one dtype in (float32, float16, bfloat16); k: float32 [B]; seeds: int64 [B]; coef: float32
    [>= 5] on the device (read by the kernel). All contiguous, on one device; out may alias x_hat.
    """
    if torch.compiler.is_compiling():
        torch.ops.edmfast.heun_step(
            x_hat, coef, out, x_prime, f, k, guidance_scale, noise, seeds, step, out_net
        )
    else:  # see _EAGER_NOTE
        _launch_step(x_hat, coef, out, x_prime, f, k, guidance_scale, noise, seeds, step, out_net, False)


def churn(
    x: Tensor,
    coef: Tensor,
    *,
    out: Tensor,
    noise: Tensor | None,
    seeds: Tensor | None,
    step: int,
    out_net: Tensor | None,
) -> None:
    """``out = x + std eps``, ``out_net[j B + b] = c out[b]``; std, c = coef[3:5] (`reference.churn`)."""
    if torch.compiler.is_compiling():
        torch.ops.edmfast.churn(x, coef, out, noise, seeds, step, out_net)
    else:  # see _EAGER_NOTE
        _launch_step(x, coef, out, None, None, None, 1.0, noise, seeds, step, out_net, True)


# ----------------------------------------------------------------------------- CFG rescale


def _workspace(batch: int, numel: int, device: torch.device) -> Tensor:
    # A few floats per 8192 elements; from the caching allocator, so it is capture-safe.
    return torch.empty(_C.cfg_workspace_floats(batch, numel), dtype=torch.float32, device=device)


def _launch_cfg_factors(f: Tensor, guidance_scale: float, guidance_rescale: float, out: Tensor) -> None:
    if not isinstance(f, Tensor) or f.dim() < 1 or f.shape[0] < 2 or f.shape[0] % 2:
        raise ValueError("f must be a [2B, ...] tensor (cond rows, then uncond rows)")
    batch = f.shape[0] // 2
    cond, uncond = f[:batch], f[batch:]
    _, numel = _check_cfg(cond, uncond, guidance_rescale)
    _check("out", out, _F32, f.device, batch)
    _require(f)
    args = (_addr(cond), _addr(uncond), _addr(out), batch, numel, _DTYPE_CODE[f.dtype])
    if f.device.type == "cuda":
        ws = _workspace(batch, numel, f.device)
        _C.cfg_rescale_factors_cuda(
            *args, float(guidance_scale), float(guidance_rescale), _addr(ws), ws.numel(), *_stream(f)
        )
    else:
        _C.cfg_rescale_factors_cpu(
            *args, float(guidance_scale), float(guidance_rescale), torch.get_num_threads()
        )


@torch.library.custom_op("edmfast::cfg_rescale_factors", mutates_args=("out",))
def _cfg_rescale_factors_op(f: Tensor, guidance_scale: float, guidance_rescale: float, out: Tensor) -> None:
    _launch_cfg_factors(f, guidance_scale, guidance_rescale, out)


@_cfg_rescale_factors_op.register_fake
def _(f, guidance_scale, guidance_rescale, out) -> None:
    batch = f.shape[0] // 2
    _check_cfg(f[:batch], f[batch:], guidance_rescale)
    _check("out", out, _F32, f.device, batch)


def _launch_cfg(
    cond: Tensor, uncond: Tensor, guidance_scale: float, guidance_rescale: float, out: Tensor
) -> None:
    batch, numel = _check_cfg(cond, uncond, guidance_rescale)
    _check("out", out, (cond.dtype,), cond.device, batch * numel)
    _require(cond)
    args = (_addr(cond), _addr(uncond), _addr(out), batch, numel, _DTYPE_CODE[cond.dtype])
    if cond.device.type == "cuda":
        ws = _workspace(batch, numel, cond.device)
        _C.cfg_rescale_cuda(
            *args, float(guidance_scale), float(guidance_rescale), _addr(ws), ws.numel(), *_stream(cond)
        )
    else:
        _C.cfg_rescale_cpu(*args, float(guidance_scale), float(guidance_rescale), torch.get_num_threads())


@torch.library.custom_op("edmfast::cfg_rescale", mutates_args=("out",))
def _cfg_rescale_op(
    cond: Tensor, uncond: Tensor, guidance_scale: float, guidance_rescale: float, out: Tensor
) -> None:
    _launch_cfg(cond, uncond, guidance_scale, guidance_rescale, out)


@_cfg_rescale_op.register_fake
def _(cond, uncond, guidance_scale, guidance_rescale, out) -> None:
    batch, numel = _check_cfg(cond, uncond, guidance_rescale)
    _check("out", out, (cond.dtype,), cond.device, batch * numel)


def cfg_rescale_factors(f: Tensor, guidance_scale: float, guidance_rescale: float, *, out: Tensor) -> None:
    """k[b] = phi std(cond_b)/std(cfg_b) + (1 - phi) into float32 ``out`` [B]; f: [2B, ...], cond rows first.

    One reduction pass over f; unbiased stds; ratio 1 where std(cfg) = 0 or M < 2
    (`edmfast.reference.cfg_rescale_factors`).
    """
    if torch.compiler.is_compiling():
        torch.ops.edmfast.cfg_rescale_factors(f, guidance_scale, guidance_rescale, out)
    else:  # see _EAGER_NOTE
        _launch_cfg_factors(f, guidance_scale, guidance_rescale, out)


def cfg_rescale(
    cond: Tensor, uncond: Tensor, guidance_scale: float, guidance_rescale: float, *, out: Tensor
) -> None:
    """``out = k[b] (uncond + w (cond - uncond))`` in cond's dtype: the factors, then one elementwise pass."""
    if torch.compiler.is_compiling():
        torch.ops.edmfast.cfg_rescale(cond, uncond, guidance_scale, guidance_rescale, out)
    else:  # see _EAGER_NOTE
        _launch_cfg(cond, uncond, guidance_scale, guidance_rescale, out)
