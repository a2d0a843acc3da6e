"""Noise-level discretizations (EDM Table 1) and discrete-time schedules (Lin et al. 2023).

Every sigma schedule is float64, descending, length N + 1 with sigma_N = 0 appended.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SPACINGS = ("linspace", "leading", "trailing")


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max)):
        raise ValueError(f"sigma_min and sigma_max must be finite, got {sigma_min}, {sigma_max}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _ramp(num_steps: int) -> torch.Tensor:
    """i / (N - 1) for i = 0..N-1 (a single step sits at the start of the range)."""
    return torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """EDM (Karras) steps: ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then 0."""
    _check_steps(num_steps)
    _check_range(sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + _ramp(num_steps) * (lo - hi)) ** rho)


def vp_sigma(t: torch.Tensor | float, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """VP noise level ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma: torch.Tensor | float, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """Inverse of `vp_sigma`: ``t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def vp_betas_for_range(sigma_min: float, sigma_max: float, eps_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) with sigma(eps_s) = sigma_min and sigma(1) = sigma_max (official EDM refit).

    beta_min can come out negative (-0.0048 for sigma in [0.002, 80]); `vp_sigma` is then real
    only for t >= -2 beta_min / beta_d (5.4e-4 there), which covers the t in [eps_s, 1] it is
    used at."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / eps_s - math.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def vp_sigmas(
    num_steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    *,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    eps_s: float = 1e-3,
) -> torch.Tensor:
    """VP steps: ``t_i = 1 + i/(N-1) (eps_s - 1)``, ``sigma_i = sigma(t_i)``, then 0.

    With ``sigma_min``/``sigma_max`` given, beta_d and beta_min are refitted so the schedule spans
    exactly [sigma_min, sigma_max], as the official EDM ablation code does.
    """
    _check_steps(num_steps)
    if sigma_min is not None or sigma_max is not None:
        lo = float(vp_sigma(eps_s, beta_d, beta_min)) if sigma_min is None else sigma_min
        hi = float(vp_sigma(1.0, beta_d, beta_min)) if sigma_max is None else sigma_max
        _check_range(lo, hi)
        beta_d, beta_min = vp_betas_for_range(lo, hi, eps_s)
    t = 1 + _ramp(num_steps) * (eps_s - 1)
    return _append_zero(vp_sigma(t, beta_d, beta_min))


def ve_sigmas(num_steps: int, sigma_min: float = 0.02, sigma_max: float = 100.0) -> torch.Tensor:
    """VE steps: ``sigma_i^2 = smax^2 (smin^2 / smax^2)^(i/(N-1))`` (geometric), then 0."""
    _check_steps(num_steps)
    _check_range(sigma_min, sigma_max)
    return _append_zero((sigma_max**2 * (sigma_min**2 / sigma_max**2) ** _ramp(num_steps)).sqrt())


def iddpm_u(M: int = 1000, C1: float = 0.001, C2: float = 0.008) -> torch.Tensor:
    """The iDDPM noise levels u_0 > ... > u_M = 0 (EDM Table 1, float64, length M + 1).

    ``u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C1) - 1)``,
    ``abar(j) = sin^2(pi j / (2 M (C2 + 1)))``.
    """
    j = torch.arange(M + 1, dtype=torch.float64)
    abar = torch.sin(0.5 * math.pi * j / M / (C2 + 1)) ** 2
    u = torch.zeros(M + 1, dtype=torch.float64)
    for i in range(M, 0, -1):
        u[i - 1] = ((u[i] ** 2 + 1) / (abar[i - 1] / abar[i]).clamp(min=C1) - 1).sqrt()
    return u


def iddpm_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 81.0,
    *,
    M: int = 1000,
    C1: float = 0.001,
    C2: float = 0.008,
) -> torch.Tensor:
    """iDDPM steps: N of the u_j inside [sigma_min, sigma_max], evenly spaced by index, then 0."""
    _check_steps(num_steps)
    _check_range(sigma_min, sigma_max)
    u = iddpm_u(M, C1, C2)
    inside = u[(u >= sigma_min) & (u <= sigma_max)]
    if inside.numel() == 0:
        raise ValueError(f"no iDDPM noise level lies in [{sigma_min}, {sigma_max}]")
    # (L-1)/(N-1) * i, in this order as in the official ablation code: (L-1) * (i/(N-1)) rounds
    # differently at exact .5 ties (e.g. N = 59 with the default range picks other levels)
    step = (inside.numel() - 1) / max(num_steps - 1, 1)
    index = (step * torch.arange(num_steps, dtype=torch.float64)).round().to(torch.int64)
    return _append_zero(inside[index])


def discrete_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Descending integer timesteps for S = num_steps of T = num_train_timesteps (Lin et al. Table 2).

    linspace: ``round(linspace(0, T-1, S))``; leading: ``arange(S) * (T//S) + offset``;
    trailing: ``round(arange(T, 0, -T/S)) - 1`` (always starts at T - 1). int64 [S].
    """
    _check_steps(num_steps)
    T = num_train_timesteps
    if num_steps > T:
        raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={T}")
    t: np.ndarray
    if spacing == "linspace":
        t = np.linspace(0, T - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        t = (np.arange(num_steps) * (T // num_steps))[::-1] + steps_offset
    elif spacing == "trailing":
        # arange over a float step can overshoot by one element (S = 61 of 1000 ends in t = -1, as
        # in diffusers); the first S are the intended ones
        t = (np.round(np.arange(T, 0, -T / num_steps)) - 1)[:num_steps]
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return torch.from_numpy(np.ascontiguousarray(t).astype(np.int64))


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale a beta schedule to zero terminal SNR (Lin et al. 2023, Algorithm 1).

    ``r = sqrt(cumprod(1 - betas))``; ``r = (r - r_T) r_0 / (r_0 - r_T)``; ``abar = r^2``; betas are
    re-derived from abar, so ``abar_T = 0`` exactly and ``abar_0`` is kept. Computed in float64,
    returned in the input's dtype.
    """
    if not isinstance(betas, torch.Tensor):
        betas = torch.as_tensor(betas)
    if betas.dim() != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be a 1-D tensor with >= 2 entries, got shape {tuple(betas.shape)}")
    b = betas.to(torch.float64)
    r = torch.cumprod(1 - b, 0).sqrt()
    r0, rT = r[0].clone(), r[-1].clone()
    r = (r - rT) * r0 / (r0 - rT)
    abar = r**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1 - alphas).to(betas.dtype)
