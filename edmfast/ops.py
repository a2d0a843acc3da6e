"""One entry per fused op; validates arguments once, then dispatches by backend.

Backends: ``"torch"`` (eager PyTorch ops, float32 state, works everywhere), ``"cpu"`` (C++
kernels of ``edmfast._C``), ``"cuda"`` (CUDA C++ kernels of ``edmfast._C``) and ``"triton"``
(Triton kernels; on CPU tensors under ``TRITON_INTERPRET=1``). The math of every op is defined
in `edmfast.reference`; every backend writes into caller-provided ``out=`` buffers so the loop
allocates nothing and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch

from .reference import COEF_C, COEF_P, COEF_Q, COEF_R, COEF_STD

BACKENDS = ("torch", "cpu", "cuda", "triton")
IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _impl(backend: str) -> ModuleType:
    return _native() if backend in ("cpu", "cuda") else _triton()


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
) -> None:
    """Validate the operands of `heun_step` / `churn`; raise ValueError/TypeError naming the argument."""
    if not isinstance(x_hat, torch.Tensor):
        raise TypeError(f"x_hat must be a torch.Tensor, got {type(x_hat).__name__}")
    if x_hat.dim() < 1 or x_hat.shape[0] < 1:
        raise ValueError(f"x_hat must be [B, ...] with B >= 1, got shape {tuple(x_hat.shape)}")
    device = x_hat.device
    batch = x_hat.shape[0]
    numel = x_hat.numel() // batch
    f32 = (torch.float32,)
    _check_tensor("x_hat", x_hat, device, f32)
    _check_tensor("x_prime", x_prime, device, f32)
    _check_tensor("noise", noise, device, f32)
    _check_tensor("out", out, device, f32)
    _check_tensor("k", k, device, f32)
    _check_tensor("coef", coef, device, (torch.float32,))
    _check_tensor("f", f, device, IO_DTYPES)
    _check_tensor("out_net", out_net, device, IO_DTYPES)
    _check_tensor("seeds", seeds, device, (torch.int64,))
    if coef.numel() < 5 or not coef.is_contiguous():
        raise ValueError(
            f"coef must be a contiguous float32 tensor with >= 5 entries, got {tuple(coef.shape)}"
        )
    for name, t in (("x_prime", x_prime), ("noise", noise)):
        if t is not None and (t.shape[0] != batch or t.numel() != batch * numel):
            raise ValueError(f"{name} must match x_hat's shape {tuple(x_hat.shape)}, got {tuple(t.shape)}")
    if noise is not None and seeds is not None:
        raise ValueError("give noise or seeds, not both")
    if seeds is not None and tuple(seeds.shape) != (batch,):
        raise ValueError(f"seeds must be int64 [B]=[{batch}], got shape {tuple(seeds.shape)}")
    if f is not None:
        if f.shape[0] not in (batch, 2 * batch) or f.numel() != f.shape[0] * numel:
            raise ValueError(f"f must have B={batch} or 2B rows of {numel} elements, got {tuple(f.shape)}")
        if k is not None and f.shape[0] != 2 * batch:
            raise ValueError("k (CFG rescale factors) needs f with 2B rows (cond then uncond)")
    if k is not None and tuple(k.shape) != (batch,):
        raise ValueError(f"k must be float32 [B]=[{batch}], got shape {tuple(k.shape)}")
    _check_out("out", out, batch, numel)
    if out_net is not None:
        if out_net.shape[0] not in (batch, 2 * batch):
            raise ValueError(f"out_net must have B={batch} or 2B rows, got shape {tuple(out_net.shape)}")
        _check_out("out_net", out_net, out_net.shape[0], numel)
        if f is not None and f.dtype != out_net.dtype:
            raise TypeError(f"f and out_net must share a dtype, got {f.dtype} and {out_net.dtype}")


# ----------------------------------------------------------------------------- torch backend


def _torch_heun_step(x_hat, coef, x_prime, f, k, guidance_scale, noise, seeds, step, out, out_net):
    batch = x_hat.shape[0]
    c = coef.to(torch.float32)
    x = c[COEF_P] * _flat(x_hat)
    if x_prime is not None:
        x = x + c[COEF_Q] * _flat(x_prime)
    if f is not None:
        ff = _flat(f).float()
        if ff.shape[0] == 2 * batch:
            cond, uncond = ff[:batch], ff[batch:]
            ff = uncond + guidance_scale * (cond - uncond)
            if k is not None:
                ff = k.reshape(-1, 1) * ff
        x = x + c[COEF_R] * ff
    if noise is not None:
        x = x + c[COEF_STD] * _flat(noise)
    elif seeds is not None:
        from .philox import philox_normal

        eps = philox_normal(seeds, step, x.shape[1], torch.float32).to(x.device)
        x = x + c[COEF_STD] * eps
    _flat(out).copy_(x)
    if out_net is not None:
        net = (c[COEF_C] * x).to(out_net.dtype)
        rows = _flat(out_net)
        for j in range(out_net.shape[0] // batch):
            rows[j * batch : (j + 1) * batch].copy_(net)


# ----------------------------------------------------------------------------- public ops


def heun_step(
    x_hat: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    x_prime: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    out_net: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Fused sampler pass ``out = p x_hat + q x_prime + r F + std eps; out_net = c out``.

    See `edmfast.reference.heun_step` for the full contract. ``out`` may alias ``x_hat``.
    Returns ``out``.
    """
    check_step_args(
        x_hat, coef, x_prime=x_prime, f=f, k=k, noise=noise, seeds=seeds, out=out, out_net=out_net
    )
    if x_hat.numel() == 0:
        return out  # samples of zero elements: nothing to compute, no kernel to launch
    x_prime = None if x_prime is None else x_prime.contiguous()
    f = None if f is None else f.contiguous()
    noise = None if noise is None else noise.contiguous()
    k = None if k is None else k.contiguous()
    if backend == "torch":
        _torch_heun_step(x_hat, coef, x_prime, f, k, guidance_scale, noise, seeds, step, out, out_net)
    else:
        _impl(backend).heun_step(
            x_hat.contiguous(),
            coef,
            out=out,
            x_prime=x_prime,
            f=f,
            k=k,
            guidance_scale=guidance_scale,
            noise=noise,
            seeds=seeds,
            step=step,
            out_net=out_net,
        )
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
    backend: str = "torch",
) -> torch.Tensor:
    """Fused churn ``out = x + std eps; out_net = c out`` (`edmfast.reference.churn`)."""
    check_step_args(x, coef, x_prime=None, f=None, k=None, noise=noise, seeds=seeds, out=out, out_net=out_net)
    if x.numel() == 0:
        return out
    noise = None if noise is None else noise.contiguous()
    if backend == "torch":
        one = torch.stack(
            [
                torch.ones_like(coef[0]),
                torch.zeros_like(coef[0]),
                torch.zeros_like(coef[0]),
                coef[COEF_STD],
                coef[COEF_C],
            ]
        )
        _torch_heun_step(x, one, None, None, None, 1.0, noise, seeds, step, out, out_net)
    else:
        _impl(backend).churn(
            x.contiguous(), coef, out=out, noise=noise, seeds=seeds, step=step, out_net=out_net
        )
    return out


def _check_guidance(guidance_scale: float, guidance_rescale: float) -> None:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a finite float, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    if not isinstance(guidance_rescale, (int, float)) or not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")


def cfg_rescale_factors(
    f: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float,
    *,
    out: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """Per-sample CFG-rescale factors k [B] (float32) from the batched prediction f [2B, ...].

    One reduction pass (five sums per sample). See `edmfast.reference.cfg_rescale_factors`.
    """
    _check_guidance(guidance_scale, guidance_rescale)
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"f must be a torch.Tensor, got {type(f).__name__}")
    if f.dim() < 1 or f.shape[0] < 2 or f.shape[0] % 2:
        raise ValueError(f"f must have 2B rows (cond then uncond), got shape {tuple(f.shape)}")
    _check_tensor("f", f, f.device, IO_DTYPES)
    _check_tensor("out", out, f.device, (torch.float32,), like="f")
    _check_out("out", out, f.shape[0] // 2, 1)
    if f.numel() == 0:
        return out.fill_(1.0)  # no elements: the unbiased std is undefined, the ratio is 1
    if backend == "torch":
        out.copy_(_torch_cfg_factors(f.float(), guidance_scale, guidance_rescale))
    else:
        _impl(backend).cfg_rescale_factors(f.contiguous(), guidance_scale, guidance_rescale, out=out)
    return out


def _torch_cfg_factors(f: torch.Tensor, w: float, phi: float) -> torch.Tensor:
    batch = f.shape[0] // 2
    ff = _flat(f)
    if ff.shape[1] < 2:
        return torch.ones(batch, dtype=torch.float32, device=f.device)
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
    _check_guidance(guidance_scale, guidance_rescale)
    for name, t in (("cond", cond), ("uncond", uncond)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
    if backend == "torch":
        f = torch.cat([cond, uncond]).float()
        k = _torch_cfg_factors(f, guidance_scale, guidance_rescale)
        cfg = _flat(f[cond.shape[0] :]) + guidance_scale * (
            _flat(f[: cond.shape[0]]) - _flat(f[cond.shape[0] :])
        )
        _flat(out).copy_(k.reshape(-1, 1) * cfg)
    else:
        _impl(backend).cfg_rescale(
            cond.contiguous(), uncond.contiguous(), guidance_scale, guidance_rescale, out=out
        )
    return out
