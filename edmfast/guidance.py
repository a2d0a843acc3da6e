"""Classifier-free guidance with rescale (Lin et al. 2023, Eq. 14-16)."""

from __future__ import annotations

import torch

from . import ops


def cfg_rescale(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """``cfg = uncond + w (cond - uncond)``; ``out = phi cfg std(cond)/std(cfg) + (1 - phi) cfg``.

    Per-sample unbiased stds over all non-batch dims; ``w`` = guidance_scale, ``phi`` =
    guidance_rescale in [0, 1] (0: plain CFG). Same shape and dtype as ``cond``; computed in
    float32 with the fused kernels when available for the tensors' device.
    """
    backend = ops.resolve_backend("auto", cond.device) if isinstance(cond, torch.Tensor) else "torch"
    return ops.cfg_rescale(cond, uncond, guidance_scale, guidance_rescale, backend=backend)
