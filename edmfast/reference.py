"""The oracle: plain eager PyTorch, float64-capable, named as in the papers.

Two halves:

* the fused-op contracts (`churn`, `heun_step`, `cfg_rescale_factors`, `cfg_rescale`): the exact
  per-element math every backend's kernel implements, computed here in float64;
* the samplers (`sample`, `ablation_sample`): EDM Algorithms 1 and 2 written out step by step,
  float64 state like the official generate script, independent of the fused formulation.

Fused-op data layout (shared by every backend):

* tensors are [B, ...] and are viewed as [B, M] (M = elements per sample);
* state tensors (``x_hat``, ``x_prime``, ``noise``, ``out``) are float32 in the kernels;
* network-side tensors (``f``: the model output, ``out_net``: the next model input) may be
  float32, float16 or bfloat16 (both the same dtype);
* with classifier-free guidance ``f`` has 2B rows, cond first then uncond, and ``out_net`` has 2B
  rows too (the network input is written to both halves);
* ``coef`` is a float32 device tensor with at least 5 entries, read by the kernel at run time so a
  captured graph replays with new schedules: ``coef = [p, q, r, std, c]``.
"""

from __future__ import annotations

import torch

from .philox import philox_normal

COEF_P, COEF_Q, COEF_R, COEF_STD, COEF_C = range(5)
COEF_SIZE = 8  # rows of the per-step coefficient table are padded to 8 floats (32 bytes)


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).reshape(t.shape[0] // batch, batch, -1)


def guided_prediction(f: torch.Tensor, batch: int, guidance_scale: float, k: torch.Tensor | None) -> torch.Tensor:
    """F[b] = k[b] * (uncond + w (cond - uncond)) when f has 2B rows, else f itself; float64 [B, M]."""
    f64 = f.reshape(f.shape[0], -1).double()
    if f.shape[0] == batch:
        return f64
    cond, uncond = f64[:batch], f64[batch:]
    cfg = uncond + guidance_scale * (cond - uncond)
    if k is not None:
        cfg = k.double().reshape(-1, 1) * cfg
    return cfg


def fused_noise(
    shape: tuple[int, ...], noise: torch.Tensor | None, seeds: torch.Tensor | None, step: int
) -> torch.Tensor | None:
    """eps for a churn: the given tensor, the Philox stream of (seeds, step), or None (no noise)."""
    batch = shape[0]
    numel = 1
    for s in shape[1:]:
        numel *= s
    if noise is not None:
        return noise.reshape(batch, numel).double()
    if seeds is not None:
        return philox_normal(seeds, step, numel).to(seeds.device)
    return None


def heun_step(
    x_hat: torch.Tensor,
    coef: torch.Tensor,
    *,
    x_prime: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    net_rows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused pass of the sampler, in float64.

    ``x = p x_hat + q x_prime + r F + std eps`` and ``net = c x`` (repeated ``net_rows`` times
    along the batch: 2 with CFG), with ``[p, q, r, std, c] = coef[:5]``, F from
    `guided_prediction`, eps from `fused_noise`. Missing operands contribute zero. Every loop pass
    is an instance: the Euler point (q = 0), the Heun/2nd-order correction, the next step's churn
    (std > 0) and the next network input (c = c_in) all fused in one read and one write.

    Returns (x [B, ...] float64, net [net_rows * B, ...] float64).
    """
    batch = x_hat.shape[0]
    p, q, r, std, c = (float(v) for v in coef.double().cpu()[:5])
    x = p * x_hat.reshape(batch, -1).double()
    if x_prime is not None:
        x = x + q * x_prime.reshape(batch, -1).double()
    if f is not None:
        x = x + r * guided_prediction(f, batch, guidance_scale, k)
    eps = fused_noise(tuple(x_hat.shape), noise, seeds, step)
    if eps is not None:
        x = x + std * eps
    net = (c * x).repeat(net_rows, 1)
    return x.reshape(x_hat.shape), net.reshape((net_rows * batch, *x_hat.shape[1:]))


def churn(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    net_rows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Churn noise injection fused with the network-input scaling, in float64.

    ``x_hat = x + std eps`` and ``net = c x_hat`` with ``std = coef[3]`` (which the engine sets to
    ``sqrt(sigma_hat^2 - sigma^2) S_noise``) and ``c = coef[4]`` (c_in(sigma_hat)); ``coef[0:3]``
    are ignored. The same kernel as `heun_step` with p = 1 and no other operand.
    """
    one = coef.double().cpu().clone()
    one[COEF_P], one[COEF_Q], one[COEF_R] = 1.0, 0.0, 0.0
    return heun_step(x, one, noise=noise, seeds=seeds, step=step, net_rows=net_rows)


def cfg_rescale_factors(f: torch.Tensor, guidance_scale: float, guidance_rescale: float) -> torch.Tensor:
    """Per-sample factor k[b] so that CFG-rescale output = k[b] * cfg[b] (Lin et al. Eq. 14-16).

    ``f`` is [2B, ...] (cond rows first). ``k = phi std(cond)/std(cfg) + (1 - phi)`` with unbiased
    (N-1) stds over all non-batch elements. Degenerate samples (std(cfg) = 0, or one element, where
    the unbiased std is undefined) use a ratio of 1, so the output stays finite. float64 [B].
    """
    batch = f.shape[0] // 2
    f64 = f.reshape(f.shape[0], -1).double()
    cond, uncond = f64[:batch], f64[batch:]
    cfg = uncond + guidance_scale * (cond - uncond)
    if f64.shape[1] < 2:
        return torch.ones(batch, dtype=torch.float64, device=f.device)
    std_pos = cond.std(dim=1, unbiased=True)
    std_cfg = cfg.std(dim=1, unbiased=True)
    ratio = torch.where(std_cfg > 0, std_pos / torch.where(std_cfg > 0, std_cfg, 1.0), 1.0)
    return guidance_rescale * ratio + (1.0 - guidance_rescale)


def cfg_rescale(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """Classifier-free guidance with rescale, float64, shaped like ``cond``.

    ``cfg = uncond + w (cond - uncond)``; ``out = phi cfg std(cond)/std(cfg) + (1 - phi) cfg``,
    stds per sample over all non-batch dims, unbiased (Lin et al. 2023, Eq. 14-16).
    """
    f = torch.cat([cond, uncond])
    k = cfg_rescale_factors(f, guidance_scale, guidance_rescale)
    return guided_prediction(f, cond.shape[0], guidance_scale, k).reshape(cond.shape)
