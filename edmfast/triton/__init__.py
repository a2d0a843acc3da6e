"""Triton backend: the fused ops of `edmfast.ops` as Triton kernels.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton and this
package's kernel modules are imported: ``triton.jit`` picks the interpreter at decoration time).
Importing this package never imports triton; the kernel modules load on the first call.

Each op is registered as ``torch.ops.edmfast_triton.<op>`` with `torch.library.triton_op`, so
torch.compile traces into the kernels and CUDA-graph capture sees plain kernel launches. Operands
arrive validated and contiguous from `edmfast.ops`; results go to caller-provided buffers.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "why_unavailable",
    "affine_step",
    "prepare_affine_step",
    "prepare_ancestral_step",
    "prepare_cfg_rescale_factors",
    "heun_step",
    "churn",
    "ancestral_step",
    "cfg_rescale_factors",
    "cfg_rescale",
    "workspace",
]

_KERNEL_MODULES = ("affine_step", "cfg_rescale", "ancestral_step")


def why_unavailable(device: torch.device) -> str | None:
    """None if the Triton kernels can run on ``device``, else the reason they cannot."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable: {e}"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch reports no CUDA device"
    if device.type != "cpu":
        return f"the triton backend runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
    # The variable may have been set after the kernels were decorated as GPU kernels.
    loaded = sys.modules.get(f"{__name__}.affine_step")
    if loaded is not None and type(loaded._affine_step_kernel).__name__ != "InterpretedFunction":
        return "TRITON_INTERPRET=1 was set after edmfast's Triton kernels were compiled for the GPU"
    return None


# ----------------------------------------------------------------------------- torch.library glue


def _wrap_triton(kernel: Any) -> Any:
    """`torch.library.wrap_triton` (torch >= 2.6) so torch.compile can trace the launch.

    An interpreted kernel (TRITON_INTERPRET=1, CPU tensors) is passed through as it is: torch
    < 2.13's wrap_triton refuses one (found by the torch 2.11 skew check), and torch.compile never
    traces the interpreter anyway."""
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None or type(kernel).__name__ == "InterpretedFunction":
        return kernel
    return wrap(kernel)


def _triton_op(name: str, mutates_args: Iterable[str]) -> Callable[[Callable[..., None]], Any]:
    """Register ``fn`` as ``torch.ops.<name>``: `torch.library.triton_op` when torch has it (>= 2.6),
    else an opaque `torch.library.custom_op` (still capturable, compiled as a graph break-free call).
    """

    def register(fn: Callable[..., None]) -> Any:
        if hasattr(torch.library, "triton_op"):
            return torch.library.triton_op(name, fn, mutates_args=tuple(mutates_args))
        op = torch.library.custom_op(name, fn, mutates_args=tuple(mutates_args))
        op.register_fake(lambda *args, **kwargs: None)  # every op writes its out= buffers only
        return op

    return register


_loaded = False


def _ops() -> Any:
    """Import the kernel modules (which registers their ops) and return the op namespace.

    A plain global flag rather than functools.cache: torch.compile traces this without a break.
    """
    global _loaded
    if not _loaded:
        for name in _KERNEL_MODULES:
            importlib.import_module(f"{__name__}.{name}")
        _loaded = True
    return torch.ops.edmfast_triton


class _Package(types.ModuleType):
    """This package, except that loading submodule ``affine_step`` (etc.) keeps the entry point.

    The kernel modules share their op's name (STYLE rule 1) and the import system binds a loaded
    submodule as an attribute of its package, which would replace the function `edmfast.ops`
    calls. Use ``from edmfast.triton.affine_step import ...`` to reach a kernel module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _KERNEL_MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


# ----------------------------------------------------------------------------- backend entry points


def _affine(
    x, coef, out, f, hist, hist_out, k, guidance_scale, noise, seeds, step, stage, out_net, bad, bad_step,
    churn
) -> None:  # fmt: skip
    h0, h1, h2, h3 = tuple(hist) + (None,) * (4 - len(hist))
    guidance = guidance_scale if isinstance(guidance_scale, torch.Tensor) else None
    _ops().affine_step(
        x, coef, out, f, h0, h1, h2, h3, hist_out, k, 1.0 if guidance is not None else float(guidance_scale),
        guidance, noise, seeds, int(step), int(stage), out_net, bad, int(bad_step), churn,
    )  # fmt: skip


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
) -> None:
    """``out = a x + b F + sum_k c_k h_k + std eps``; ``out_net[j B + b] = c_net out[b]``;
    ``hist_out = p x + q F``.

    See `edmfast.reference.affine_step` for the operands and `edmfast.ops.affine_step` for the
    aliasing rule. A tensor ``guidance_scale`` (float32 [1]) is read at run time; ``bad[b] =
    min(bad[b], bad_step)`` where row b of ``out`` is not finite. Unchecked: `edmfast.ops` validates.
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
    """``out = p x_hat + q x_prime + r F + std eps``; ``out_net[j B + b] = c out[b]``: `affine_step`
    with h0 = x_prime (`edmfast.reference.heun_step`). Unchecked: `edmfast.ops` validates."""
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
    """``out = x + std eps``; ``out_net = c out`` (`edmfast.reference.churn`); ``bad`` as in `affine_step`."""
    _affine(x, coef, out, None, (), None, None, 1.0, noise, seeds, step, 0, out_net, bad, bad_step, True)


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
) -> None:
    """``out = coef1 x0 + coef2 x + std z``; ``out_net[j B + b] = c out[b]``.

    See `edmfast.reference.ancestral_step` for the operands; ``out`` may alias ``x``. A tensor
    ``guidance_scale`` (float32 [1]) is read at run time; ``bad`` as in `heun_step`.
    Unchecked: `edmfast.ops` validates.
    """
    guidance = guidance_scale if isinstance(guidance_scale, torch.Tensor) else None
    _ops().ancestral_step(
        x, f, coef, out, variance, bool(clip), k, 1.0 if guidance is not None else float(guidance_scale),
        guidance, noise, seeds, int(step), out_net, bad, int(bad_step),
    )  # fmt: skip


def workspace(f: torch.Tensor) -> torch.Tensor:
    """Zeroed workspace of the one-launch `cfg_rescale_factors` over f [2B, ...] (partials, counters)."""
    _ops()
    from .cfg_rescale import new_workspace

    return new_workspace(f)


def cfg_rescale_factors(
    f: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    guidance_rescale: float | torch.Tensor,
    *,
    out: torch.Tensor,
    workspace: torch.Tensor | None = None,
    numel: int | None = None,
) -> None:
    """k[b] = phi std(cond_b) / std(cfg_b) + (1 - phi) into ``out`` (float32 [B]); f is [2B, ...].

    One launch; the guidance values are floats or float32 [1] tensors read at run time;
    ``workspace`` from `workspace` (a fresh zeroed one is allocated when None); ``numel``: count
    only the first numel (>= 1) elements of each row (None: all).
    """
    w_t = guidance_scale if isinstance(guidance_scale, torch.Tensor) else None
    phi_t = guidance_rescale if isinstance(guidance_rescale, torch.Tensor) else None
    w = 1.0 if w_t is not None else float(guidance_scale)
    phi = 1.0 if phi_t is not None else float(guidance_rescale)
    _ops().cfg_rescale_factors(f, w, phi, out, w_t, phi_t, workspace, numel)


def cfg_rescale(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float,
    *,
    out: torch.Tensor,
) -> None:
    """``out = k[b] (uncond + w (cond - uncond))`` in cond's dtype (Lin et al. Eq. 14-16)."""
    _ops().cfg_rescale(cond, uncond, float(guidance_scale), float(guidance_rescale), out=out)


# ----------------------------------------------------------------------------- prepared launches
# Closures over the validated static operands (`edmfast.ops.prepare_affine_step`, ...). The affine
# and CFG-factor launches call the kernel launchers directly, without the op dispatcher; ctx is
# ignored: Triton launches on torch's current stream itself.


def prepare_affine_step(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    f_like: torch.Tensor | None,
    hist: tuple[torch.Tensor | None, ...],
    hist_out: torch.Tensor | None,
    k: torch.Tensor | None,
    guidance_scale: float | torch.Tensor,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    stage: int,
    out_net: torch.Tensor | None,
    bad: torch.Tensor | None,
    bad_step: int,
) -> Callable[..., None]:
    """``launch(f, step, ctx)`` of `affine_step` on these static operands. Unchecked."""
    _ops()
    from .affine_step import launch

    h0, h1, h2, h3 = tuple(hist) + (None,) * (4 - len(hist))
    guidance = guidance_scale if isinstance(guidance_scale, torch.Tensor) else None
    w = 1.0 if guidance is not None else float(guidance_scale)

    def run(f: torch.Tensor | None, step: int, ctx: object) -> None:
        launch(
            x, coef, out, f, h0, h1, h2, h3, hist_out, k, w, guidance, noise, seeds, step, stage, out_net,
            bad, bad_step, False,
        )  # fmt: skip

    return run


def prepare_ancestral_step(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor,
    f_like: torch.Tensor,
    variance: str,
    clip: bool,
    k: torch.Tensor | None,
    guidance_scale: float | torch.Tensor,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    out_net: torch.Tensor | None,
    bad: torch.Tensor | None,
    bad_step: int,
) -> Callable[..., None]:
    """``launch(f, step, ctx)`` of `ancestral_step` on these static operands. Unchecked."""
    op = _ops().ancestral_step
    clip = bool(clip)
    guidance = guidance_scale if isinstance(guidance_scale, torch.Tensor) else None
    w = 1.0 if guidance is not None else float(guidance_scale)

    def run(f: torch.Tensor, step: int, ctx: object) -> None:
        op(x, f, coef, out, variance, clip, k, w, guidance, noise, seeds, step, out_net, bad, bad_step)

    return run


def prepare_cfg_rescale_factors(
    f_like: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    guidance_rescale: float | torch.Tensor,
    *,
    out: torch.Tensor,
    workspace: torch.Tensor | None,
    numel: int | None,
) -> Callable[..., None]:
    """``launch(f, ctx)`` of `cfg_rescale_factors` on these static operands (a workspace is
    allocated here, once, when None). Unchecked."""
    _ops()
    from .cfg_rescale import _launch_factors, new_workspace

    ws = new_workspace(f_like) if workspace is None else workspace
    w_t = guidance_scale if isinstance(guidance_scale, torch.Tensor) else None
    phi_t = guidance_rescale if isinstance(guidance_rescale, torch.Tensor) else None
    w = 1.0 if w_t is not None else float(guidance_scale)
    phi = 1.0 if phi_t is not None else float(guidance_rescale)
    batch = f_like.shape[0] // 2

    def run(f: torch.Tensor, ctx: object) -> None:
        _launch_factors(f[:batch], f[batch:], w, w_t, phi, phi_t, out, ws, numel)

    return run
