"""Exact denoisers with closed forms: oracles for tests, the CLI's built-in model, benchmarks.

For data ~ N(mu, s^2 I) the ideal denoiser is ``D = mu + s^2/(s^2+sigma^2) (x - mu)`` and the
probability-flow ODE has the exact solution
``x(sigma_b) = mu + (x(sigma_a) - mu) sqrt((s^2+sigma_b^2)/(s^2+sigma_a^2))``.
A mixture of Gaussians has the softmax-weighted posterior mean as its ideal denoiser, with curved
ODE paths; with s = 0 it is the ideal denoiser of a finite data set.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _check_s(s: float) -> float:
    if isinstance(s, (bool, str, bytes)):
        raise TypeError(f"s must be a real number, got {type(s).__name__}")
    s = float(s)
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"s (the data's standard deviation) must be finite and >= 0, got {s}")
    return s


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.dim() - 1)))


class GaussianDenoiser(nn.Module):
    """Ideal denoiser of N(mu, s^2 I): ``D(x; sigma) = mu + s^2/(s^2+sigma^2) (x - mu)``."""

    mu: torch.Tensor

    def __init__(self, mu: float | torch.Tensor = 0.0, s: float = 0.5):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float64), persistent=False)
        self.s = _check_s(s)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, mu: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mu`` (optional, [B, ...] or broadcastable) overrides the mean: a conditional denoiser.

        Computed in float64 for float64 inputs, else in float32 (so a benchmark's denoiser costs
        what the caller's precision costs)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sig = _per_sample(sigma, x).to(dtype)
        mean = (self.mu if mu is None else mu).to(x.device, dtype)
        s2 = self.s**2
        out = mean + s2 / (s2 + sig**2) * (x.to(dtype) - mean)
        return out.to(x.dtype)

    def ode_solution(self, x_a: torch.Tensor, sigma_a: float, sigma_b: float) -> torch.Tensor:
        """Exact x(sigma_b) from x(sigma_a) along the probability-flow ODE (float64)."""
        mu = self.mu.to(x_a.device)
        s2 = self.s**2
        return mu + (x_a.to(torch.float64) - mu) * math.sqrt((s2 + sigma_b**2) / (s2 + sigma_a**2))


class GaussianMixtureDenoiser(nn.Module):
    """Ideal denoiser of ``sum_k w_k N(m_k, s^2 I)``; ``means`` is [K, ...] (one mode per row).

    ``D(x; sigma) = sum_k p_k(x) (m_k + s^2/(s^2+sigma^2) (x - m_k))`` with
    ``p_k ∝ w_k exp(-|x - m_k|^2 / (2 (s^2+sigma^2)))``. Computed in float64.
    """

    means: torch.Tensor
    log_weights: torch.Tensor

    def __init__(self, means: torch.Tensor, s: float = 0.0, weights: torch.Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() < 1 or means.shape[0] < 1 or not bool(torch.isfinite(means).all()):
            raise ValueError(
                f"means must be a finite [K, ...] tensor with K >= 1, got shape {tuple(means.shape)}"
            )
        k = means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        w = w.to(torch.float64)
        if w.shape != (k,) or not bool((torch.isfinite(w) & (w >= 0)).all()) or not w.sum() > 0:
            raise ValueError(f"weights must be [K={k}] finite, >= 0 and not all 0, got {w.tolist()}")
        self.register_buffer("means", means, persistent=False)
        self.register_buffer("log_weights", w.log(), persistent=False)
        self.s = _check_s(s)

    def posterior(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """p_k(x) [B, K] for noisy x at noise level sigma."""
        var = (self.s**2 + _per_sample(sigma, x).reshape(-1) ** 2).reshape(-1, 1)
        xf = x.to(torch.float64).reshape(x.shape[0], -1)
        m = self.means.to(x.device).reshape(self.means.shape[0], -1)
        # |x - m|^2 = |x|^2 - 2 x.m + |m|^2; |x|^2 cancels in the softmax
        dist = -2 * xf @ m.T + (m * m).sum(1)
        return torch.softmax(self.log_weights.to(x.device) - dist / (2 * var), dim=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        p = self.posterior(x, sigma)
        m = self.means.to(x.device).reshape(self.means.shape[0], -1)
        mean = p @ m  # [B, M]
        sig2 = _per_sample(sigma, x).reshape(-1, 1) ** 2
        shrink = self.s**2 / (self.s**2 + sig2)
        xf = x.to(torch.float64).reshape(x.shape[0], -1)
        return (mean + shrink * (xf - mean)).reshape(x.shape).to(x.dtype)


class EDMNetworkOf(nn.Module):
    """The raw network F that makes ``EDMPrecond(F)`` equal a given denoiser exactly.

    ``F(x_in, c_noise) = (D(x; sigma) - c_skip x) / c_out`` with ``sigma = exp(4 c_noise)`` and
    ``x = x_in / c_in``; lets tests drive the preconditioner-fused path with a known answer.
    """

    def __init__(self, denoiser: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be finite and > 0, got {sigma_data}")
        self.denoiser, self.sigma_data = denoiser, sigma_data

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, **cond: object) -> torch.Tensor:
        sd = self.sigma_data
        sigma = torch.exp(4 * c_noise.to(torch.float64)).reshape(-1, *([1] * (x_in.dim() - 1)))
        norm = (sigma**2 + sd**2).sqrt()
        x = x_in.to(torch.float64) * norm
        d = self.denoiser(x, sigma.reshape(-1), **cond).to(torch.float64)
        return ((d - sd**2 / norm**2 * x) / (sigma * sd / norm)).to(x_in.dtype)
