"""Noise-level discretizations (EDM Table 1) and discrete-time schedules (Lin et al. 2023).

Every sigma schedule is float64, descending, length N + 1 with sigma_N = 0 appended.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from typing import Any

import numpy as np
import torch

SPACINGS = ("linspace", "leading", "trailing")


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _real(value: object, name: str) -> float:
    """``value`` as a Python float, or a TypeError naming the argument (bools and strings are not
    numbers here, even though ``float()`` takes them)."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None


def _finite(value: object, name: str) -> float:
    v = _real(value, name)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_range(sigma_min: float, sigma_max: float, num_steps: int = 1) -> tuple[float, float]:
    lo, hi = _real(sigma_min, "sigma_min"), _real(sigma_max, "sigma_max")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"sigma_min and sigma_max must be finite, got {lo}, {hi}")
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={lo}, sigma_max={hi}")
    if num_steps > 1 and lo == hi:
        raise ValueError(
            f"sigma_min == sigma_max ({lo}) gives {num_steps} equal levels; a schedule must be strictly "
            "decreasing (use num_steps=1 or a wider range)"
        )
    return lo, hi


def _ramp(num_steps: int) -> torch.Tensor:
    """i / (N - 1) for i = 0..N-1 (a single step sits at the start of the range)."""
    return torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _validated(sigmas: torch.Tensor, blame: str) -> torch.Tensor:
    """A generated schedule passes the checks a user-given one does (finite, > 0 before the final 0,
    strictly decreasing), else a ValueError that says which arguments to change."""
    s = sigmas.numpy()  # CPU float64; numpy's checks cost a fifth of torch's on a few hundred levels
    levels = s[:-1]
    ok = np.isfinite(levels) & (levels > 0)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"{blame}: level {bad} is {float(levels[bad])!r}, not a positive finite float64 "
            "(the arguments are outside what float64 represents)"
        )
    down = s[1:] < s[:-1]
    if not down.all():
        i = int(np.flatnonzero(~down)[0])
        raise ValueError(
            f"{blame}: levels {i} and {i + 1} ({float(s[i])!r}, {float(s[i + 1])!r}) are not "
            "strictly decreasing in float64"
        )
    return sigmas


def _karras_levels(t: torch.Tensor, lo: float, hi: float, rho: float) -> torch.Tensor:
    """``(hi^(1/rho) + t (lo^(1/rho) - hi^(1/rho)))^rho`` for t in [0, 1], accurate for any rho > 0."""
    try:
        a, b = hi ** (1 / rho), lo ** (1 / rho)
    except OverflowError:  # hi^(1/rho) > 1.8e308: rho far below 1
        a, b = math.inf, 0.0
    # The official formula (bitwise, where it is accurate). Its relative error is about
    # eps rho (a / b + |ln lo| + |ln hi|): ``a + t (b - a)`` cancels down to b at the last level,
    # and the rounding of 1/rho scales a by hi^(eps / rho). Up to 256 eps (rho = 7 on [0.002, 80]:
    # 106 eps) it is used as is; beyond (rho = 1 on that range, rho < 0.3 or ranges far from 1
    # anywhere) the levels come from the log form below, which has no such terms.
    if math.isfinite(a) and b > 0 and rho * (a / b + abs(math.log(lo)) + abs(math.log(hi))) <= 256:
        return (a + t * (b - a)) ** rho
    # sigma = hi ((1 - t) + t q)^rho = hi exp(rho log1p(t expm1(log q))), q = (lo / hi)^(1/rho):
    # no cancellation, no overflow (q may underflow to 0, expm1 then is -1), relative error a few
    # eps times |log(sigma / hi)| for every rho; the endpoints are pinned to the exact range
    log_ratio = math.log(lo) - math.log(hi)
    x = rho * torch.log1p(t * math.expm1(log_ratio / rho))  # log(sigma / hi), in [log_ratio, 0]
    # hi * exp(x) keeps log(hi)'s rounding out of it, unless exp(x) would underflow (hi / lo > 1e300)
    s = hi * torch.exp(x) if log_ratio > -690 else torch.exp(math.log(hi) + x)
    s[0] = hi
    if t.numel() > 1:
        s[-1] = lo
    return s


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """EDM (Karras) steps: ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then 0.

    The official float64 expression, bitwise, where it is accurate to 256 eps (rho = 7 on
    [0.002, 80]); a log form otherwise, so any rho > 0 and any float64 range work. A schedule
    float64 cannot hold strictly decreasing (rho so small, or a range so narrow, that neighbouring
    levels round together) is a ValueError.
    """
    _check_steps(num_steps)
    lo, hi = _check_range(sigma_min, sigma_max, num_steps)
    rho = _real(rho, "rho")
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be finite and > 0, got {rho}")
    s = _append_zero(_karras_levels(_ramp(num_steps), lo, hi, rho))
    return _validated(
        s,
        f"karras_sigmas(num_steps={num_steps}, sigma_min={lo!r}, sigma_max={hi!r}, rho={rho!r}): rho is too "
        "small for this many steps or the range too narrow (use a larger rho, fewer steps or a wider range)",
    )


def vp_sigma(t: torch.Tensor | float, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """VP noise level ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    e = 0.5 * beta_d * t**2 + beta_min * t
    # expm1 overflows past e = 709.8, sigma = e^(e/2) only past e = 1419.6
    return torch.where(e > 700, torch.exp(0.5 * e) * (-torch.expm1(-e)).sqrt(), torch.expm1(e).sqrt())


def vp_sigma_inv(sigma: torch.Tensor | float, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """Inverse of `vp_sigma`: ``t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    log1p_sq = torch.log1p(sigma**2)
    # sigma^2 overflows past 1.3e154: ln(1 + s^2) = 2 ln s + ln(1 + s^-2) there (checked first on the
    # CPU, where a preconditioner plans a schedule and the check is cheap; no sync on a device)
    if sigma.device.type != "cpu" or not bool(torch.isfinite(log1p_sq).all()):
        log1p_sq = torch.where(sigma > 1e150, 2 * sigma.log() + torch.log1p(sigma**-2), log1p_sq)
    return ((beta_min**2 + 2 * beta_d * log1p_sq).sqrt() - beta_min) / beta_d


def _log1p_sq(x: float) -> float:
    """ln(1 + x^2) as the official refit computes it, without overflow past x = 1.3e154."""
    return math.log(x**2 + 1) if x < 1e150 else 2 * math.log(x) + math.log1p(x**-2)


def _check_eps_s(eps_s: float, name: str = "eps_s") -> float:
    eps_s = _real(eps_s, name)
    if not 0 < eps_s < 1:
        raise ValueError(f"{name} must be in (0, 1), got {eps_s}")
    return eps_s


def vp_betas_for_range(sigma_min: float, sigma_max: float, eps_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) with sigma(eps_s) = sigma_min and sigma(1) = sigma_max (official EDM refit).

    beta_min can come out negative (-0.0048 for sigma in [0.002, 80]); `vp_sigma` is then real
    only for t >= -2 beta_min / beta_d (5.4e-4 there), which covers the t in [eps_s, 1] it is
    used at."""
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    eps_s = _check_eps_s(eps_s)
    beta_d = 2 * (_log1p_sq(sigma_min) / eps_s - _log1p_sq(sigma_max)) / (eps_s - 1)
    beta_min = _log1p_sq(sigma_max) - 0.5 * beta_d
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
    beta_d, beta_min = _finite(beta_d, "beta_d"), _finite(beta_min, "beta_min")
    eps_s = _check_eps_s(eps_s)
    blame = f"vp_sigmas(num_steps={num_steps}, beta_d={beta_d!r}, beta_min={beta_min!r}, eps_s={eps_s!r})"
    if sigma_min is not None or sigma_max is not None:
        lo = float(vp_sigma(eps_s, beta_d, beta_min)) if sigma_min is None else sigma_min
        hi = float(vp_sigma(1.0, beta_d, beta_min)) if sigma_max is None else sigma_max
        lo, hi = _check_range(lo, hi, num_steps)
        beta_d, beta_min = vp_betas_for_range(lo, hi, eps_s)
        blame = (
            f"vp_sigmas(num_steps={num_steps}, sigma_min={lo!r}, sigma_max={hi!r}, eps_s={eps_s!r}): the "
            f"refitted beta_d={beta_d:.6g}, beta_min={beta_min:.6g} do not give an increasing sigma(t) on "
            "[eps_s, 1] (widen the range or lower eps_s)"
        )
    else:
        blame += ": sigma(t) is not positive and increasing on [eps_s, 1]"
    t = 1 + _ramp(num_steps) * (eps_s - 1)
    return _validated(_append_zero(vp_sigma(t, beta_d, beta_min)), blame)


def ve_sigmas(num_steps: int, sigma_min: float = 0.02, sigma_max: float = 100.0) -> torch.Tensor:
    """VE steps: ``sigma_i^2 = smax^2 (smin^2 / smax^2)^(i/(N-1))`` (geometric), then 0."""
    _check_steps(num_steps)
    lo, hi = _check_range(sigma_min, sigma_max, num_steps)
    t = _ramp(num_steps)
    hi2 = hi * hi  # hi**2 would raise OverflowError instead of giving inf
    ratio = lo * lo / hi2
    if math.isfinite(hi2) and ratio >= sys.float_info.min:
        s = (hi**2 * (lo**2 / hi**2) ** t).sqrt()  # the official formula, bitwise
    else:  # the squares over- or underflow: sigma_i = hi (lo / hi)^t in log space
        log_ratio = math.log(lo) - math.log(hi)
        s = hi * torch.exp(t * log_ratio) if log_ratio > -690 else torch.exp(math.log(hi) + t * log_ratio)
        s[0] = hi
        if num_steps > 1:
            s[-1] = lo
    return _validated(
        _append_zero(s), f"ve_sigmas(num_steps={num_steps}, sigma_min={lo!r}, sigma_max={hi!r})"
    )


def _check_iddpm(M: int, C1: float, C2: float) -> tuple[int, float, float]:
    M = _check_int(M, "M", 1)
    C1, C2 = _real(C1, "C1"), _real(C2, "C2")
    # C1 >= 1 makes the recursion non-increasing (u_{M-1} imaginary); C2 < 0 makes abar(j) wrap past
    # its maximum, so the ratios exceed 1 and the levels stop decreasing
    if not 0 < C1 < 1:
        raise ValueError(f"C1 must be in (0, 1), got {C1}")
    if not (math.isfinite(C2) and C2 >= 0):
        raise ValueError(f"C2 must be finite and >= 0, got {C2}")
    return M, C1, C2


def iddpm_u(M: int = 1000, C1: float = 0.001, C2: float = 0.008) -> torch.Tensor:
    """The iDDPM noise levels u_0 > ... > u_M = 0 (EDM Table 1, float64, length M + 1).

    ``u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C1) - 1)``,
    ``abar(j) = sin^2(pi j / (2 M (C2 + 1)))``.
    """
    return _iddpm_levels(*_check_iddpm(M, C1, C2)).clone()


@functools.lru_cache(maxsize=8)
def _iddpm_levels(M: int, C1: float, C2: float) -> torch.Tensor:
    """`iddpm_u` for checked arguments, computed once per (M, C1, C2); callers get a copy."""
    j = torch.arange(M + 1, dtype=torch.float64)
    abar = (torch.sin(0.5 * math.pi * j / M / (C2 + 1)) ** 2).tolist()
    if not abar[1] > 0:
        raise ValueError(f"C2={C2!r} is too large for M={M}: abar(1) underflows to 0")
    # The recursion in Python floats, 40x faster than a per-element tensor loop: the official loop's
    # IEEE operations, all correctly rounded (as on CUDA; torch's CPU float64 sqrt is 1 ulp off for
    # ~1.4% of inputs, so a CPU tensor loop differs in the last bit at some levels)
    u = [0.0] * (M + 1)
    for i in range(M, 0, -1):
        u[i - 1] = math.sqrt(max((u[i] * u[i] + 1) / max(abar[i - 1] / abar[i], C1) - 1, 0.0))
    return _validated(torch.tensor(u, dtype=torch.float64), f"iddpm_u(M={M}, C1={C1!r}, C2={C2!r})")


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
    lo, hi = _check_range(sigma_min, sigma_max, num_steps)
    u = iddpm_u(M, C1, C2)
    inside = u[(u >= lo) & (u <= hi)]
    if inside.numel() == 0:
        raise ValueError(f"no iDDPM noise level lies in [sigma_min, sigma_max] = [{lo}, {hi}]")
    if num_steps > inside.numel():
        # more steps than levels would repeat levels (a schedule that is not strictly decreasing)
        raise ValueError(
            f"num_steps={num_steps} exceeds the {inside.numel()} iDDPM levels in [sigma_min, sigma_max] = "
            f"[{lo}, {hi}] (M={M}); use fewer steps, a wider range or a larger M"
        )
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
    trailing: ``round(arange(T, 0, -T/S)) - 1`` (always starts at T - 1). int64 [S], every entry in
    [0, T - 1], strictly decreasing.
    """
    _check_steps(num_steps)
    T = _check_int(num_train_timesteps, "num_train_timesteps", 1)
    steps_offset = _check_int(steps_offset, "steps_offset", 0)
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
    out = torch.from_numpy(np.ascontiguousarray(t).astype(np.int64))
    if int(out.max()) > T - 1:
        # only the offset can push "leading" past the table (diffusers would index out of range)
        raise ValueError(
            f"steps_offset={steps_offset} puts timestep {int(out.max())} past num_train_timesteps - 1 = "
            f"{T - 1} (spacing={spacing!r}, num_steps={num_steps})"
        )
    if int(out.min()) < 0 or not bool((out[1:] < out[:-1]).all()):
        raise ValueError(f"spacing={spacing!r} gives invalid timesteps for num_steps={num_steps} of T={T}")
    return out


def betas_float64(betas: Any, min_len: int = 1) -> torch.Tensor:
    """A beta table as float64 [T] on the CPU (a 1-D float tensor or sequence, >= ``min_len`` entries);
    the range checks are the caller's (they differ: training betas vs. a schedule to rescale)."""
    if not isinstance(betas, torch.Tensor):
        try:
            betas = torch.as_tensor(betas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"betas must be a 1-D tensor or sequence of floats: {e}") from None
    if not betas.is_floating_point():
        raise TypeError(f"betas must be floating point, got {betas.dtype}")
    if betas.dim() != 1 or betas.numel() < min_len:
        raise ValueError(
            f"betas must be a 1-D tensor with >= {min_len} {'entry' if min_len == 1 else 'entries'}, "
            f"got shape {tuple(betas.shape)}"
        )
    return betas.detach().to("cpu", torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale a beta schedule to zero terminal SNR (Lin et al. 2023, Algorithm 1).

    ``r = sqrt(cumprod(1 - betas))``; ``r = (r - r_T) r_0 / (r_0 - r_T)``; ``abar = r^2``; betas are
    re-derived from abar, so ``abar_T = 0`` exactly and ``abar_0`` is kept. Computed in float64,
    returned in the input's dtype. ``betas`` must be finite, in [0, 1), with the last one > 0 (else
    two levels would both map to SNR 0 and the re-derived beta is 0/0).
    """
    b = betas_float64(betas, min_len=2)
    if not bool(torch.isfinite(b).all()) or not bool(((b >= 0) & (b < 1)).all()):
        raise ValueError("betas must be finite and in [0, 1)")
    if not b[-1] > 0:
        raise ValueError("the last beta must be > 0 (with beta_T = 0, levels T-1 and T would both get SNR 0)")
    r = torch.cumprod(1 - b, 0).sqrt()
    r0, rT = r[0].clone(), r[-1].clone()
    if not bool((r[:-1] > rT).all()):
        raise ValueError(
            "cumprod(1 - betas) underflows to its final value before the last step; the rescale is undefined"
        )
    r = (r - rT) * r0 / (r0 - rT)
    abar = r**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1 - alphas).to(betas.device, betas.dtype)


# ============================================================================= DDPM betas, respacing

BETA_SCHEDULES = ("linear", "cosine")


# a step count in a spacing string: ASCII digits only (int() would also take '٣' or '３'), spaces
# around a section count allowed as iDDPM's int() allows them
_ASCII_INT = re.compile(r" *[0-9]+ *")

# the cosine schedule's cap (Nichol & Dhariwal): the linear one must stay below it too
LINEAR_BETA_MAX = 0.999
LINEAR_MIN_T = 21  # 20 / T <= 0.999


def ddpm_betas(num_train_timesteps: int = 1000, schedule: str = "linear") -> torch.Tensor:
    """The DDPM / iDDPM training betas, float64 [T].

    linear: ``linspace(1e-4 s, 0.02 s, T)`` with s = 1000 / T (Ho et al.; the iDDPM scaling, so other
    T keep the same total noise); its last beta is 20 / T, so T from 2 to 20 (a beta of 1 or more,
    the whole signal erased in one step) is a ValueError.
    cosine: ``beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999)`` with
    ``abar(u) = cos^2((u + 0.008) / 1.008 pi/2)`` (Nichol & Dhariwal, Eq. 17), as diffusers'
    ``squaredcos_cap_v2``.
    """
    T = _check_int(num_train_timesteps, "num_train_timesteps", 1)
    if schedule == "linear":
        scale = 1000 / T
        betas = torch.from_numpy(np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64))
        # the scaled range ends at 20/T: from T = 20 down a step would erase the whole signal (beta
        # >= 1), which no epsilon model can be sampled from; refuse rather than clip, since a
        # clipped chain is no longer the iDDPM schedule a model was trained on
        if float(betas.max()) > LINEAR_BETA_MAX:
            raise ValueError(
                f"ddpm_betas(num_train_timesteps={T}, 'linear'): the linear schedule scaled to T steps "
                f"(1e-4 to 0.02, times 1000/T) reaches beta = {float(betas.max()):.3g} > {LINEAR_BETA_MAX}; "
                f"it needs T >= {LINEAR_MIN_T} (or T = 1), or use 'cosine' for short chains"
            )
        return betas
    if schedule == "cosine":

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64
        )
    raise ValueError(f"schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")


def space_timesteps(num_train_timesteps: int, section_counts: str | list[int]) -> torch.Tensor:
    """iDDPM's respacing: the kept timesteps, descending int64.

    ``"ddimN"``: the even stride i for which ``range(0, T, i)`` has exactly N entries (an error if
    none does). Otherwise counts per equal section of [0, T) (``"10,10,20"`` or a list): section k
    keeps ``round(j (size_k - 1) / (count_k - 1))`` for j < count_k (its first element if count 1).
    """
    T = _check_int(num_train_timesteps, "num_train_timesteps", 1)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = section_counts[len("ddim") :]
            if not _ASCII_INT.fullmatch(want) or int(want) < 1:
                raise ValueError(f"spacing {section_counts!r}: expected 'ddimN' with N >= 1 in ASCII digits")
            n = int(want)
            for i in range(1, T):
                if len(range(0, T, i)) == n:
                    return torch.arange(0, T, i, dtype=torch.int64).flip(0)
            if n == T:
                return torch.arange(T - 1, -1, -1, dtype=torch.int64)
            raise ValueError(f"spacing {section_counts!r}: no even stride gives exactly {n} of {T} steps")
        parts = section_counts.split(",")
        if not all(_ASCII_INT.fullmatch(c) for c in parts):
            raise ValueError(
                f"spacing must be one of {SPACINGS}, 'ddimN' or section counts like '10,10,20' "
                f"(ASCII digits), got {section_counts!r}"
            )
        counts = [int(c) for c in parts]
    else:
        counts = [_check_int(c, "section_counts", 0) for c in section_counts]
    if not counts or any(c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"section counts must be >= 0 with a positive sum, got {counts}")
    size, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count > section:
            raise ValueError(f"cannot take {count} steps from a section of {section} timesteps (T={T})")
        stride = 1.0 if count <= 1 else (section - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += section
    return torch.tensor(sorted(set(kept), reverse=True), dtype=torch.int64)


def respaced_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Descending timesteps for a spacing name: `discrete_timesteps` for linspace / leading /
    trailing (num_steps of T), `space_timesteps` for ``"ddimN"`` and section counts (num_steps is
    not used there: the spacing says how many)."""
    if not isinstance(spacing, str):
        raise TypeError(f"spacing must be a string, got {type(spacing).__name__}")
    if spacing in SPACINGS:
        return discrete_timesteps(num_steps, num_train_timesteps, spacing, steps_offset)
    return space_timesteps(num_train_timesteps, spacing)


def respace_betas(betas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Betas of the respaced chain, float64 [S] in the order of ``timesteps`` (descending):
    ``beta_i = 1 - abar(tau_i) / abar(tau_{i-1})`` with abar of the step below (1 below the first)."""
    abar = torch.cumprod(1 - betas.detach().to("cpu", torch.float64), 0)
    t = torch.as_tensor(timesteps, dtype=torch.int64).flip(0)
    a = abar[t]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    return (1 - a / prev).flip(0)
