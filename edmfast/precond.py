"""Preconditioners (EDM Table 1) and the discrete-time VP adapter.

A preconditioner wraps a raw network F and is itself a denoiser
``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` in VE scaling. The sampling engine reads
``coefficients(sigma)`` to fold c_skip / c_out / c_in into its fused kernels and calls
``raw(x_in, c_noise, **cond)`` for F alone (classifier-free guidance acts on F).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from .schedules import _check_eps_s, _check_iddpm, _check_int, _finite, _real, iddpm_u, vp_sigma

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
INTERPOLATIONS = ("log", "linear")


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


def _call_network(pre: Precond, form: str, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> Any:
    """``pre.model(x_in, c_noise, **cond)``; a network whose signature cannot take that call gets a
    TypeError naming the form a preconditioner calls (``form``), not Python's bare arity message.

    Only a failed call is inspected, so a TypeError raised inside a matching network passes through
    unchanged."""
    try:
        return pre.model(x_in, c_noise, **cond)
    except TypeError as e:
        target = pre.model.forward if isinstance(pre.model, nn.Module) else pre.model
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            raise e from None  # no signature to judge (a builtin): Python's message it is
        try:
            sig.bind(x_in, c_noise, **cond)
        except TypeError as why:
            name = getattr(target, "__qualname__", type(pre.model).__name__)
            keys = f", cond keys {sorted(cond)}" if cond else ""
            raise TypeError(
                f"{type(pre).__name__} calls its network as {form}, but {name}{sig} cannot take that "
                f"({why}{keys}); wrap the network so that it takes those arguments"
            ) from e
        raise


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


def _check_sigma_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """A denoiser's supported range: 0 <= sigma_min < sigma_max <= inf (inf: unbounded)."""
    lo, hi = _real(sigma_min, "sigma_min"), _real(sigma_max, "sigma_max")
    if not (math.isfinite(lo) and lo >= 0):
        raise ValueError(f"sigma_min must be finite and >= 0, got {lo}")
    if not hi > lo:  # NaN fails here too
        raise ValueError(f"sigma_max must be > sigma_min, got sigma_min={lo}, sigma_max={hi}")
    return lo, hi


def _check_alphas_cumprod(alphas_cumprod: Any) -> torch.Tensor:
    """alphas_cumprod as float64 CPU [T], or a ValueError saying what is wrong with the table."""
    try:
        abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"alphas_cumprod must be a 1-D tensor or sequence of floats: {e}") from None
    if abar.dim() != 1 or abar.numel() < 2:
        raise ValueError(
            f"alphas_cumprod must be a 1-D tensor with >= 2 entries, got shape {tuple(abar.shape)}"
        )
    if not bool(torch.isfinite(abar).all()) or not bool(((abar >= 0) & (abar <= 1)).all()):
        raise ValueError("alphas_cumprod must be finite and in [0, 1]")
    if bool((abar[:-1] == 0).any()):
        raise ValueError(
            "only the last alphas_cumprod may be 0 (zero terminal SNR); an earlier 0 is sigma = inf"
        )
    up = (abar[1:] > abar[:-1]).nonzero()
    if up.numel():
        i = int(up[0])
        raise ValueError(
            f"alphas_cumprod must be non-increasing (noise grows with the timestep), but entry {i + 1} "
            f"({float(abar[i + 1])!r}) > entry {i} ({float(abar[i])!r}); a reversed table?"
        )
    if int(((abar > 0) & (abar < 1)).sum()) < 2:
        raise ValueError("alphas_cumprod needs at least 2 entries strictly between 0 and 1")
    return abar


class Precond(nn.Module):
    """Base class: ``D(x, sigma, **cond) = c_skip x + c_out F(c_in x, c_noise, **cond)``.

    Subclasses define `coefficients` (float64 math on a [B] sigma tensor) and may define
    `round_sigma`. ``dtype`` is the network's input dtype (default: the model's parameter dtype).
    """

    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def __init__(self, model: nn.Module | Any, dtype: torch.dtype | None = None):
        super().__init__()
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.model = model
        self.dtype = dtype if dtype is not None else _param_dtype(model)

    def coefficients(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for a sigma tensor, in its dtype (float64 for the engine).

        Elementwise and vectorized: the engine plans a whole schedule with one call on a float64
        CPU vector, whose entries equal those of per-sigma calls bitwise; CPU math reads host copies
        of lookup tables, never a device buffer."""
        raise NotImplementedError

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Snap sigma to a level the network supports (identity unless the model is discrete)."""
        return torch.as_tensor(sigma)

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The raw network prediction F for an already-scaled input (shape of x_in)."""
        return _model_output(
            _call_network(self, "F(x_in, c_noise, **cond)", x_in.to(self.dtype), c_noise, cond)
        )

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
        sigma_data = _real(sigma_data, "sigma_data")
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(
                f"sigma_data must be finite and > 0 (the data's standard deviation), got {sigma_data}"
            )
        self.sigma_data = sigma_data
        self.sigma_min, self.sigma_max = _check_sigma_range(sigma_min, sigma_max)

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
        beta_d, beta_min = _finite(beta_d, "beta_d"), _finite(beta_min, "beta_min")
        epsilon_t = _check_eps_s(epsilon_t, "epsilon_t")
        if not beta_d > 0:
            raise ValueError(f"beta_d must be > 0, got {beta_d}")
        # sigma(t) must be real and increasing on [epsilon_t, 1]: its exponent
        # beta_d t^2 / 2 + beta_min t > 0 at epsilon_t (and then growing, beta_d > 0)
        if not 0.5 * beta_d * epsilon_t + beta_min > 0:
            raise ValueError(
                f"beta_min={beta_min} is too negative for beta_d={beta_d}, epsilon_t={epsilon_t}: "
                "sigma(epsilon_t) is not a positive real number (need beta_min > -beta_d * epsilon_t / 2)"
            )
        self.beta_d, self.beta_min, self.M = beta_d, beta_min, _check_int(M, "M", 1)
        self.sigma_min = float(vp_sigma(epsilon_t, beta_d, beta_min))
        self.sigma_max = float(vp_sigma(1.0, beta_d, beta_min))
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(
                f"beta_d={beta_d}, beta_min={beta_min}, epsilon_t={epsilon_t} give the sigma range "
                f"[{self.sigma_min}, {self.sigma_max}], not a finite positive interval"
            )

    def coefficients(self, sigma):
        # t = `vp_sigma_inv`(sigma) written out to share sigma^2 and skip its overflow branch: past
        # sigma = 1.3e154 c_noise is inf here, where c_out = -sigma is far beyond float32 anyway
        s2 = sigma.to(torch.float64) ** 2
        bd, bm = self.beta_d, self.beta_min
        t = (((bm**2 + 2 * bd * torch.log1p(s2)).sqrt() - bm) / bd).to(sigma.dtype)
        return torch.ones_like(sigma), -sigma, 1 / (s2.to(sigma.dtype) + 1).sqrt(), (self.M - 1) * t


class VEPrecond(Precond):
    """VE: ``c_skip = 1``, ``c_out = s``, ``c_in = 1``, ``c_noise = ln(s/2)``."""

    def __init__(
        self, model, sigma_min: float = 0.02, sigma_max: float = 100.0, dtype: torch.dtype | None = None
    ):
        super().__init__(model, dtype)
        self.sigma_min, self.sigma_max = _check_sigma_range(sigma_min, sigma_max)

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
        M, C1, C2 = _check_iddpm(M, C1, C2)
        if M < 2:
            raise ValueError(f"M must be >= 2 (sigma_min is u_(M-1) and must lie below u_0), got {M}")
        self.M = M
        self._u_host = iddpm_u(M, C1, C2)
        # ascending copy for searchsorted (u_M = 0 first); a contiguous host tensor, made once
        self._u_asc_host = self._u_host.flip(0).contiguous()
        self.register_buffer("u", self._u_host.clone(), persistent=False)
        self.sigma_min = float(self._u_host[M - 1])
        self.sigma_max = float(self._u_host[0])

    def _nearest(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(j, u_j) with j = argmin_j |u_j - sigma| (the first, i.e. the larger u_j, on a tie).

        Bisection and the two neighbours instead of all M + 1 distances: the rounded distance
        |sigma - u| does not decrease away from sigma on either side, so the nearest neighbour on
        each side attains that side's minimum and the two-way comparison is the dense argmin."""
        s = sigma.to(torch.float64)
        ua = self._u_asc_host if s.device.type == "cpu" else self.u.to(s.device).flip(0)
        k = torch.searchsorted(ua, s.reshape(-1)).clamp_(1, self.M).reshape(s.shape)
        k_lo = k - 1
        u_hi, u_lo = ua.take(k), ua.take(k_lo)
        # ties go to the larger level (smaller j), as argmin's first occurrence in descending u
        take_hi = (s - u_hi).abs() <= (s - u_lo).abs()
        return self.M - torch.where(take_hi, k, k_lo), torch.where(take_hi, u_hi, u_lo)

    def _index(self, sigma: torch.Tensor) -> torch.Tensor:
        return self._nearest(sigma)[0]

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self._nearest(sigma)[1].to(sigma.dtype)

    def coefficients(self, sigma):
        c_noise = (self.M - 1 - self._index(sigma)).to(sigma.dtype)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise

    def raw(self, x_in, c_noise, **cond):
        f = super().raw(x_in, c_noise, **cond)
        return f[:, : x_in.shape[1]] if f.dim() > 1 and f.shape[1] == 2 * x_in.shape[1] else f


class DiscreteVPDenoiser(Precond):
    """A discrete-time VP model ``model(x_t, timestep, **cond)`` (diffusers style) as an EDM denoiser.

    ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the model sees ``x_t = x / sqrt(sigma^2 + 1)`` and a
    fractional timestep found by linear interpolation of the index in log sigma
    (``interpolation="log"``, diffusers' ``_sigma_to_t``) or in sigma (``"linear"``: the inverse of
    diffusers' ``np.interp(t, arange(T), sigmas)``, which its linspace spacing uses). Prediction types:
    epsilon (``c_skip=1, c_out=-s``), v_prediction (``c_skip=1/(s^2+1), c_out=-s/sqrt(s^2+1)``),
    sample (``D = F``; diffusers' "original_sample" is accepted as its alias).
    `from_diffusers` reads all of this from a diffusers scheduler. A schedule with abar_T = 0
    (zero terminal SNR) has sigma_T = inf; sampling from there needs v_prediction or sample (see
    `limit_coefficients`).

    ``alphas_cumprod`` [T] must be what diffusers produces: finite, non-increasing, in (0, 1], with
    only the last entry allowed to be 0 (zero terminal SNR) and at least two entries in (0, 1).
    """

    sigmas: torch.Tensor
    log_sigmas: torch.Tensor
    interp_table: torch.Tensor

    def __init__(
        self,
        model,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        dtype: torch.dtype | None = None,
        interpolation: str = "log",
    ):
        super().__init__(model, dtype)
        if prediction_type == "original_sample":  # diffusers' older name for "sample"
            prediction_type = "sample"
        if not isinstance(prediction_type, str) or prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if not isinstance(interpolation, str) or interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        abar = _check_alphas_cumprod(alphas_cumprod)
        self.prediction_type = prediction_type
        self.interpolation = interpolation
        sigmas = ((1 - abar) / abar).sqrt()  # inf where abar = 0 (last), 0 where abar = 1 (first)
        # The interpolation table: the positive finite levels, timesteps first..last (a run of
        # abar = 1 at the start is sigma = 0, which has no log; the model is never asked there)
        inner = (sigmas > 0) & torch.isfinite(sigmas)
        self._first = int(inner.nonzero()[0])
        log_sigmas = sigmas[inner].log()
        # what the timestep is interpolated in: log sigma, or sigma itself
        table = log_sigmas if interpolation == "log" else sigmas[inner].clone()
        self._sigmas_host, self._log_sigmas_host, self._table_host = sigmas, log_sigmas, table
        self._zero_terminal = bool(abar[-1] == 0)
        self.register_buffer("sigmas", sigmas.clone(), persistent=False)
        self.register_buffer("log_sigmas", log_sigmas.clone(), persistent=False)
        self.register_buffer("interp_table", table.clone(), persistent=False)
        self.sigma_min = float(sigmas[self._first])
        self.sigma_max = float(sigmas[-1])

    @property
    def num_train_timesteps(self) -> int:
        return self._sigmas_host.numel()

    def sigmas_for(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma_t (float64) for descending integer train timesteps, with 0 appended."""
        if isinstance(timesteps, torch.Tensor):
            if timesteps.is_floating_point() or timesteps.dtype == torch.bool:
                raise TypeError(f"timesteps must be integers, got {timesteps.dtype}")
            t = timesteps.reshape(-1).to("cpu", torch.int64)
        else:
            try:
                t = torch.as_tensor(timesteps, dtype=torch.int64).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"timesteps must be a sequence of ints or an int tensor: {e}") from None
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        return torch.cat([self._sigmas_host[t], torch.zeros(1, dtype=torch.float64)])

    @classmethod
    def from_diffusers(cls, unet, scheduler, dtype: torch.dtype | None = None) -> DiscreteVPDenoiser:
        """The denoiser a diffusers discrete-time scheduler assumes for ``unet``, from its config.

        Takes the scheduler's own ``alphas_cumprod`` (so every ``beta_schedule``, ``trained_betas``
        and ``rescale_betas_zero_snr`` variant is what the scheduler computed, including
        EulerDiscrete's 2^-24 stand-in for abar_T = 0), its ``prediction_type`` ("original_sample"
        included) and the timestep interpolation it uses: log sigma with Karras / exponential /
        beta sigmas (``_sigma_to_t``), sigma otherwise (``np.interp`` over the train levels). The
        model is called as ``unet(x, t, **cond)``; a diffusers output object is unwrapped.
        """
        cfg = getattr(scheduler, "config", None)
        abar = getattr(scheduler, "alphas_cumprod", None)
        if cfg is None or not isinstance(abar, torch.Tensor):
            raise TypeError(
                f"scheduler must be a diffusers discrete-time scheduler with config and alphas_cumprod, "
                f"got {type(scheduler).__name__}"
            )
        name = type(scheduler).__name__
        for key, ok in (("timestep_type", "discrete"), ("interpolation_type", "linear")):
            value = cfg.get(key, ok)
            if value != ok:
                raise ValueError(f"{name} with {key}={value!r} is not supported (only {ok!r})")
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in (*PREDICTION_TYPES, "original_sample"):
            raise ValueError(f"{name} with prediction_type={pred!r} is not supported")
        spaced = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        log = any(cfg.get(k, False) for k in spaced)
        return cls(unet, abar.detach(), pred, dtype=dtype, interpolation="log" if log else "linear")

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep for sigma: linear interpolation of the index in log sigma (or in
        sigma, ``interpolation="linear"``).

        Below sigma_min it is the first timestep with a positive sigma; above the largest finite
        level, the last; sigma = inf (zero terminal SNR) is the last timestep, T - 1."""
        table = _on(self.interp_table, self._table_host, sigma.device)
        n = table.numel()
        ls = sigma.to(torch.float64).clamp(min=self.sigma_min)
        if self.interpolation == "log":
            ls = ls.log()
        flat = ls.reshape(-1)
        hi = torch.searchsorted(table, flat).clamp_(1, n - 1)
        lo = hi - 1
        l_lo = table.take(lo)
        # equal neighbours (a flat stretch of abar) would divide 0 by 0 at their left end: w = 0 there
        w = (flat - l_lo).div_(table.take(hi).sub_(l_lo).clamp_(min=1e-300)).clamp_(0, 1)
        t = w.add_(lo)  # lo + w (int64 promoted exactly), in w's memory
        if self._first:
            t += self._first
        t = t.reshape(ls.shape)
        if self._zero_terminal:
            # sigma = inf exists only at the last timestep of a zero-terminal-SNR schedule
            t = torch.where(torch.isinf(sigma), torch.full_like(t, self.num_train_timesteps - 1), t)
        return t

    def coefficients(self, sigma):
        s2p1 = sigma**2 + 1
        c_in = 1 / s2p1.sqrt()
        t = self.sigma_to_t(sigma).to(sigma.dtype)
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in, t
        if self.prediction_type == "v_prediction":
            return 1 / s2p1, -sigma * c_in, c_in, t
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
        x, t = x_in.to(self.dtype), c_noise.to(torch.float32)
        return _model_output(_call_network(self, "model(x_t, timestep, **cond)", x, t, cond))


class FlowMatchDenoiser(Precond):
    """A rectified-flow velocity model ``model(x_t, timestep, **cond) -> v`` as an EDM denoiser.

    Flow matching (SD3, FLUX, Wan, ...) trains on ``x_t = (1 - t) x0 + t eps`` with ``v = eps - x0``.
    With ``sigma = t / (1 - t)`` the EDM state is ``x = x_t / (1 - t) = x0 + sigma eps`` and
    ``D(x; sigma) = x_t - t v``, i.e. ``c_in = c_skip = 1 / (1 + sigma)``, ``c_out = -sigma / (1 +
    sigma) = -t``, and the model is told ``c_noise = timestep_scale * t`` (diffusers' convention,
    1000 t, by default). As in diffusers' flow schedulers, ``t`` is rounded to float32 and the
    product taken in float32, so the model sees the very timesteps a diffusers loop passes.

    ``inverted=True``: a model whose time runs the other way (diffusers' ``invert_sigmas``): it is
    told ``timestep_scale * (1 - t)`` and predicts ``x0 - eps`` (``c_out = +t``).

    sigma = inf (t = 1, the first step of every flow schedule) has the limit form
    ``D(u; inf) = u - v(u, timestep_scale)`` for the unit noise u (`limit_coefficients`), so every
    engine solver starts there exactly. ``dtype``: what the model gets (default its parameters').
    """

    def __init__(
        self,
        model,
        timestep_scale: float = 1000.0,
        inverted: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(model, dtype)
        scale = _real(timestep_scale, "timestep_scale")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"timestep_scale must be finite and > 0, got {scale}")
        if not isinstance(inverted, bool):
            raise TypeError(f"inverted must be a bool, got {type(inverted).__name__}")
        self.timestep_scale = scale
        self.inverted = inverted

    def _timestep(self, t: torch.Tensor, one_minus_t: torch.Tensor) -> torch.Tensor:
        """``timestep_scale * t`` (inverted: ``* (1 - t)``) in float32 arithmetic, in t's dtype."""
        u = one_minus_t if self.inverted else t
        return (u.to(torch.float32) * torch.tensor(self.timestep_scale, dtype=torch.float32)).to(t.dtype)

    def coefficients(self, sigma):
        # t = sigma / (1 + sigma) and 1 - t = 1 / (1 + sigma), each to full relative precision
        # (t near 0, 1 - t near 1 alike); sigma = inf is t = 1 exactly
        t = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
        c_in = 1 / (1 + sigma)
        c_out = t if self.inverted else -t
        return c_in, c_out, c_in, self._timestep(t, c_in)

    def limit_coefficients(self) -> tuple[float, float, float, float]:
        """(c_skip, c_out, c_in, c_noise) at sigma = inf for a state holding the unit noise u:
        ``D(u; inf) = x_t - t v`` at t = 1 with x_t = u, i.e. ``u - v(u, timestep at t = 1)``."""
        one = torch.ones(1, dtype=torch.float64)
        return 1.0, 1.0 if self.inverted else -1.0, 1.0, float(self._timestep(one, one - 1))

    def raw(self, x_in, c_noise, **cond):
        x, t = x_in.to(self.dtype), c_noise.to(torch.float32)
        return _model_output(_call_network(self, "model(x_t, timestep, **cond)", x, t, cond))
