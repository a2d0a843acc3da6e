"""Preconditioners (EDM Table 1) and the discrete-time VP adapter.

A preconditioner wraps a raw network F and is itself a denoiser
``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` in VE scaling. The sampling engine reads
``coefficients(sigma)`` to fold c_skip / c_out / c_in into its fused kernels and calls
``raw(x_in, c_noise, **cond)`` for F alone (classifier-free guidance acts on F).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .schedules import iddpm_u, vp_sigma, vp_sigma_inv

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _model_output(out: Any) -> torch.Tensor:
    """Accept a tensor, a tuple/list (first element) or an object with ``.sample`` (diffusers)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(
        f"the model must return a tensor, a tuple or an object with .sample, got {type(out).__name__}"
    )


def _on(table: torch.Tensor, host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float64 lookup table on ``device``: the host copy for CPU math (the engine plans its
    schedule on the CPU; reading the module's CUDA buffer there would be a device sync per call),
    else the module's buffer."""
    return host if device.type == "cpu" else table.to(device)


def _param_dtype(model: nn.Module | Any) -> torch.dtype:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


class Precond(nn.Module):
    """Base class: ``D(x, sigma, **cond) = c_skip x + c_out F(c_in x, c_noise, **cond)``.

    Subclasses define `coefficients` (float64 math on a [B] sigma tensor) and may define
    `round_sigma`. ``dtype`` is the network's input dtype (default: the model's parameter dtype).
    """

    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def __init__(self, model: nn.Module | Any, dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.dtype = dtype if dtype is not None else _param_dtype(model)

    def coefficients(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for a sigma tensor, in its dtype (float64 for the engine)."""
        raise NotImplementedError

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Snap sigma to a level the network supports (identity unless the model is discrete)."""
        return torch.as_tensor(sigma)

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The raw network prediction F for an already-scaled input (shape of x_in)."""
        return _model_output(self.model(x_in.to(self.dtype), c_noise, **cond))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (
            c.reshape(-1, *([1] * (x.dim() - 1))) for c in self.coefficients(sigma)
        )
        f = self.raw((c_in * x).to(self.dtype), c_noise.reshape(-1).to(torch.float32), **cond)
        return (c_skip * x + c_out * f.to(torch.float64)).to(x.dtype)


class EDMPrecond(Precond):
    """EDM: ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``,
    ``c_noise = ln(s)/4`` with sd = sigma_data (0.5)."""

    def __init__(
        self,
        model,
        sigma_data: float = 0.5,
        sigma_min: float = 0.0,
        sigma_max: float = math.inf,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(model, dtype)
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def coefficients(self, sigma):
        sd = self.sigma_data
        norm = (sigma**2 + sd**2).sqrt()
        return sd**2 / norm**2, sigma * sd / norm, 1 / norm, sigma.log() / 4


class VPPrecond(Precond):
    """VP: ``c_skip = 1``, ``c_out = -s``, ``c_in = 1/sqrt(s^2+1)``, ``c_noise = (M-1) sigma^-1(s)``."""

    def __init__(
        self,
        model,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(model, dtype)
        self.beta_d, self.beta_min, self.M = beta_d, beta_min, M
        self.sigma_min = float(vp_sigma(epsilon_t, beta_d, beta_min))
        self.sigma_max = float(vp_sigma(1.0, beta_d, beta_min))

    def coefficients(self, sigma):
        t = vp_sigma_inv(sigma, self.beta_d, self.beta_min).to(sigma.dtype)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * t


class VEPrecond(Precond):
    """VE: ``c_skip = 1``, ``c_out = s``, ``c_in = 1``, ``c_noise = ln(s/2)``."""

    def __init__(
        self, model, sigma_min: float = 0.02, sigma_max: float = 100.0, dtype: torch.dtype | None = None
    ):
        super().__init__(model, dtype)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(Precond):  # noqa: N801 - the paper's name
    """iDDPM: ``c_skip = 1``, ``c_out = -s``, ``c_in = 1/sqrt(s^2+1)``, ``c_noise = M-1-argmin_j |u_j - s|``.

    ``round_sigma`` snaps to the nearest u_j. A model with twice the input channels (learned
    variance) has its first half used as F.
    """

    u: torch.Tensor

    def __init__(
        self, model, C1: float = 0.001, C2: float = 0.008, M: int = 1000, dtype: torch.dtype | None = None
    ):
        super().__init__(model, dtype)
        self.M = M
        self._u_host = iddpm_u(M, C1, C2)
        self.register_buffer("u", self._u_host.clone(), persistent=False)
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def _index(self, sigma: torch.Tensor) -> torch.Tensor:
        u = _on(self.u, self._u_host, sigma.device)
        return (
            (sigma.to(torch.float64).reshape(-1, 1) - u.reshape(1, -1))
            .abs()
            .argmin(dim=1)
            .reshape(sigma.shape)
        )

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return _on(self.u, self._u_host, sigma.device)[self._index(sigma)].to(sigma.dtype)

    def coefficients(self, sigma):
        c_noise = (self.M - 1 - self._index(sigma)).to(sigma.dtype)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise

    def raw(self, x_in, c_noise, **cond):
        f = super().raw(x_in, c_noise, **cond)
        return f[:, : x_in.shape[1]] if f.dim() > 1 and f.shape[1] == 2 * x_in.shape[1] else f


class DiscreteVPDenoiser(Precond):
    """A discrete-time VP model ``model(x_t, timestep, **cond)`` (diffusers style) as an EDM denoiser.

    ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the model sees ``x_t = x / sqrt(sigma^2 + 1)`` and a
    fractional timestep found by linear interpolation in log sigma. Prediction types:
    epsilon (``c_skip=1, c_out=-s``), v_prediction (``c_skip=1/(s^2+1), c_out=-s/sqrt(s^2+1)``),
    sample (``D = F``). A schedule with abar_T = 0 (zero terminal SNR) has sigma_T = inf; sampling
    from there needs v_prediction or sample (see `limit_coefficients`).
    """

    sigmas: torch.Tensor
    log_sigmas: torch.Tensor

    def __init__(
        self,
        model,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        dtype: torch.dtype | None = None,
    ):
        super().__init__(model, dtype)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        if abar.numel() < 2 or not ((abar >= 0) & (abar <= 1)).all():
            raise ValueError("alphas_cumprod must be a 1-D tensor of values in [0, 1]")
        self.prediction_type = prediction_type
        sigmas = ((1 - abar) / abar).sqrt()  # inf where abar = 0
        finite = sigmas[torch.isfinite(sigmas)]
        self._sigmas_host, self._log_sigmas_host = sigmas, finite.log()
        self.register_buffer("sigmas", sigmas.clone(), persistent=False)
        self.register_buffer("log_sigmas", finite.log(), persistent=False)
        self.sigma_min = float(finite.min())
        self.sigma_max = float(sigmas.max())

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.numel()

    def sigmas_for(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma_t (float64) for descending integer train timesteps, with 0 appended."""
        t = torch.as_tensor(timesteps, dtype=torch.int64).reshape(-1).cpu()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        return torch.cat([self._sigmas_host[t], torch.zeros(1, dtype=torch.float64)])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep for sigma: linear interpolation of the index in log sigma."""
        log_sigmas = _on(self.log_sigmas, self._log_sigmas_host, sigma.device)
        n = log_sigmas.numel()
        ls = sigma.to(torch.float64).clamp(min=self.sigma_min).log()
        hi = torch.searchsorted(log_sigmas, ls.reshape(-1)).clamp(1, n - 1).reshape(ls.shape)
        lo = hi - 1
        w = ((ls - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0, 1)
        t = lo.to(torch.float64) + w
        # sigma = inf exists only at the last timestep of a zero-terminal-SNR schedule
        return torch.where(torch.isinf(sigma), torch.full_like(t, self.num_train_timesteps - 1), t)

    def coefficients(self, sigma):
        c_in = 1 / (sigma**2 + 1).sqrt()
        t = self.sigma_to_t(sigma).to(sigma.dtype)
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in, t
        if self.prediction_type == "v_prediction":
            return 1 / (sigma**2 + 1), -sigma * c_in, c_in, t
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, t

    def limit_coefficients(self) -> tuple[float, float, float, float]:
        """(c_skip, c_out, c_in, c_noise) at sigma = inf for a state holding the unit noise itself.

        D(eps; inf) = c_skip eps + c_out F(c_in eps): the limits of (sigma c_skip, c_out, sigma c_in)
        as sigma -> inf. Epsilon prediction carries no information about x0 at SNR 0.
        """
        if self.prediction_type == "epsilon":
            raise ValueError(
                "sigmas[0] is inf (zero terminal SNR) but prediction_type='epsilon' carries no information "
                "at SNR 0; use a v_prediction or sample model"
            )
        c_out = -1.0 if self.prediction_type == "v_prediction" else 1.0
        return 0.0, c_out, 1.0, float(self.num_train_timesteps - 1)

    def raw(self, x_in, c_noise, **cond):
        return _model_output(self.model(x_in.to(self.dtype), c_noise.to(torch.float32), **cond))
