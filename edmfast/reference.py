"""The oracle: plain eager PyTorch, float64-capable, named as in the papers.

Two halves:

* the fused-op contracts (`churn`, `heun_step`, `cfg_rescale_factors`, `cfg_rescale`): the exact
  per-element math every backend's kernel implements, computed here in float64;
* the samplers (`sample`, `ablation_sample`, `sample_ancestral`): EDM's Algorithms 1 and 2,
  k-diffusion's samplers and DDPM / DDIM written out step by step, float64 state like the official
  generate script, independent of the fused formulation: they import no planning code (plan,
  ancestral, sampler, engine, ops), only the option validation, the layout and the Philox stream.

Fused-op data layout (shared by every backend):

* tensors are [B, ...] and are viewed as [B, M] (M = elements per sample);
* state tensors (``x_hat``, ``x_prime``, ``noise``, ``out``) are float32 in the kernels;
* network-side tensors (``f``: the model output, ``out_net``: the next model input) may be
  float32, float16 or bfloat16 (both the same dtype);
* with classifier-free guidance ``f`` has 2B rows, cond first then uncond, and ``out_net`` has 2B
  rows too (the network input is written to both halves);
* ``coef`` is a float32 device tensor, read by the kernel at run time so a captured graph replays
  with new schedules; its columns are named in `edmfast.layout` (``heun_step``: the first five,
  ``[p, q, r, std, c]``; ``affine_step``: sixteen).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.polynomial import Polynomial

from .layout import (
    ANC_AF,
    ANC_AX,
    ANC_CF,
    ANC_CLIP,
    ANC_COEF1,
    ANC_COEF2,
    ANC_LOG_BETA,
    ANC_LOG_BETA_TILDE,
    ANC_S,
    ANC_VARIANCES,
    COEF_A,
    COEF_B,
    COEF_C,  # noqa: F401  (the Heun pass's column names, used by callers of this module)
    COEF_HIST,
    COEF_HP,
    COEF_HQ,
    COEF_NET,
    COEF_P,
    COEF_Q,
    COEF_R,
    COEF_SIZE,
    COEF_STD,
    HISTORY,
)
from .options import (
    CHURN_SOLVERS,
    ETA_SOLVERS,
    AncestralOptions,
    SamplerOptions,
    check_betas,
    check_cond,
    check_generator,
    check_noise,
    check_seeds,
    check_sigmas,
    check_timesteps,
    merge_cond,
    with_option_signature,
)
from .philox import philox_normal
from .schedules import karras_sigmas


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).reshape(t.shape[0] // batch, batch, -1)


def guided_prediction(
    f: torch.Tensor, batch: int, guidance_scale: float, k: torch.Tensor | None
) -> torch.Tensor:
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
    shape: tuple[int, ...],
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    stage: int = 0,
) -> torch.Tensor | None:
    """eps for a pass: the given tensor, the Philox stream of (seeds, step, stage), or None."""
    batch = shape[0]
    numel = 1
    for s in shape[1:]:
        numel *= s
    if noise is not None:
        return noise.reshape(batch, numel).double()
    if seeds is not None:
        return philox_normal(seeds, step, numel, stage=stage).to(seeds.device)
    return None


def affine_step(
    x: torch.Tensor,
    coef: torch.Tensor,
    *,
    f: torch.Tensor | None = None,
    hist: tuple[torch.Tensor | None, ...] = (),
    k: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    stage: int = 0,
    net_rows: int = 1,
    hist_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One affine pass of the sampler engine (the pass every sampler plan is made of), in float64.

    With the columns of `edmfast.layout` (a = coef[COEF_A], ...), per sample b and element e::

        out   = a x + b F + c0 h0 + c1 h1 + c2 h2 + c3 h3 + std eps
        net   = c_net out                       (repeated ``net_rows`` times along the batch)
        h_out = p x + q F                       (only when ``hist_out``)

    F from `guided_prediction` (f with 2B rows: CFG, ``k`` the rescale factors); ``hist`` holds up
    to four history tensors shaped like x (None or missing: absent); eps from `fused_noise` (the
    Philox stream of (seeds[b], step, stage) or the given noise). Absent operands contribute zero
    whatever their coefficient. Every pass of every sampler is an instance: EDM's Euler point and
    Heun correction (h0 = x'), the next step's churn (std), DPM-Solver++'s multistep updates (h_k
    = earlier denoised estimates, h_out = this step's), the ancestral samplers' noise.

    Returns (out [B, ...], net [net_rows B, ...], h_out [B, ...] or None), all float64.
    """
    if len(hist) > HISTORY:
        raise ValueError(f"at most {HISTORY} history tensors, got {len(hist)}")
    batch = x.shape[0]
    c = [float(v) for v in coef.double().cpu()]
    c += [0.0] * (COEF_SIZE - len(c))
    x64 = x.reshape(batch, -1).double()
    out = c[COEF_A] * x64
    F = guided_prediction(f, batch, guidance_scale, k) if f is not None else None
    if F is not None:
        out = out + c[COEF_B] * F
    for j, h in enumerate(hist):
        if h is not None:
            out = out + c[COEF_HIST[j]] * h.reshape(batch, -1).double()
    eps = fused_noise(tuple(x.shape), noise, seeds, step, stage)
    if eps is not None:
        out = out + c[COEF_STD] * eps
    net = (c[COEF_NET] * out).repeat(net_rows, 1)
    h_new = None
    if hist_out:
        h_new = c[COEF_HP] * x64
        if F is not None:
            h_new = h_new + c[COEF_HQ] * F
        h_new = h_new.reshape(x.shape)
    return out.reshape(x.shape), net.reshape((net_rows * batch, *x.shape[1:])), h_new


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
    if f64.shape[1] < 2 or guidance_rescale == 0:
        # phi = 0 is k = 1 exactly, also where std(cfg) is so small that the ratio overflows
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


def ancestral_step(
    x: torch.Tensor,
    f: torch.Tensor,
    coef: torch.Tensor,
    *,
    variance: str,
    clip: bool,
    k: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
) -> torch.Tensor:
    """One fused ancestral (DDPM / DDIM-eta) pass, in float64; the contract of ``ops.ancestral_step``.

    ``coef``: a row of 8 floats ``[ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c]`` or of 16
    that adds ``cf`` and the clip bound (the ANC_* columns of `edmfast.layout`); an 8-float row reads
    as cf = 0 (no term at all) and bound 1. With n elements per sample, ``f`` is [B or 2B, m] with
    m = 2n for the learned variances (the first n elements per row are the prediction F, the next
    n the variance output V of the cond rows) or m = n. ``x0 = ax x + af F`` (clamped to
    [-bound, bound] if ``clip``), ``mean = coef1 x0 + coef2 x + cf F`` (cf: the model's own
    prediction in DDIM's direction term, diffusers' use_clipped_model_output=False), std = ``s
    exp(logvar / 2)`` for the learned variances (logvar = V for "learned", the interpolation ``frac
    log_beta + (1 - frac) log_beta_tilde`` with frac = (V + 1) / 2 for "learned_range") or ``s``
    for "fixed"; ``out = mean + std z`` with z from `fused_noise` (none: the noise term is
    dropped). Returns out, float64, shaped like x (the network input is ``c out``).
    """
    if variance not in ANC_VARIANCES:
        raise ValueError(f"variance must be one of {ANC_VARIANCES}, got {variance!r}")
    batch = x.shape[0]
    n = x[0].numel()
    row = [float(v) for v in coef.double().cpu()]
    ax, af, coef1, coef2 = row[ANC_AX], row[ANC_AF], row[ANC_COEF1], row[ANC_COEF2]
    log_beta, log_beta_tilde, s = row[ANC_LOG_BETA], row[ANC_LOG_BETA_TILDE], row[ANC_S]
    cf = row[ANC_CF] if len(row) > ANC_CF else None
    bound = row[ANC_CLIP] if len(row) > ANC_CLIP else 1.0
    rows = f.reshape(f.shape[0], -1)
    learned = variance != "fixed"
    if rows.shape[1] != (2 * n if learned else n):
        raise ValueError(f"f has {rows.shape[1]} elements per row, expected {2 * n if learned else n}")
    F = guided_prediction(rows[:, :n], batch, guidance_scale, k)
    x64 = x.reshape(batch, n).double()
    x0 = ax * x64 + af * F
    if clip:
        x0 = x0.clamp(-bound, bound)
    out = coef1 * x0 + coef2 * x64
    if cf is not None:
        out = out + cf * F
    z = fused_noise(tuple(x.shape), noise, seeds, step) if s != 0 else None
    if z is not None:  # s = 0 (the last step) adds nothing, even where exp(logvar / 2) overflows
        if learned:
            v = rows[:batch, n:].double()
            if variance == "learned_range":
                frac = (v + 1) / 2
                logvar = frac * log_beta + (1 - frac) * log_beta_tilde
            else:
                logvar = v
            std = s * torch.exp(logvar / 2)
        else:
            std = torch.full_like(out, s)
        out = out + std * z
    return out.reshape(x.shape)


# ============================================================================= samplers
#
# Each sampler written out step by step in float64 from its paper / k-diffusion 0.1.1's formulas:
# the churn, the schedule, the multistep weights and the noise order are derived here, inline, and
# nothing is imported from the engine's planning (plan, ancestral, sampler, engine, ops), so a
# planning bug in the engine cannot pass both sides of an engine-vs-reference test.

IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the network input dtypes


def _is_preconditioner(denoiser) -> bool:
    """D = c_skip x + c_out F(c_in x; c_noise): the object exposes ``coefficients`` and ``raw``."""
    return callable(getattr(denoiser, "coefficients", None)) and callable(getattr(denoiser, "raw", None))


def draw_exact_noise(
    generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """One draw of standard normals shaped like the state, in ``dtype`` (float64: the official EDM
    generate script's churn; the state's dtype: k-diffusion's ``torch.randn_like(x)``).

    ``generator``: a `edmfast.PerSampleGenerator` (row b from sample b's stream), a
    ``torch.Generator`` (drawn on its own device), or None for torch's global RNG on ``device``.
    """
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, dtype=dtype, device=generator.device, generator=generator).to(device)
    return generator.randn(shape, dtype=dtype, device=device)


def _checked(out, like: torch.Tensor) -> torch.Tensor:
    """The denoiser's output as float64, after the same shape / device / dtype checks as the engine."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the denoiser returned {type(out).__name__}, expected a tensor")
    if out.shape != like.shape:
        raise ValueError(f"the denoiser returned shape {tuple(out.shape)}, expected {tuple(like.shape)}")
    if out.device != like.device:
        raise ValueError(f"the denoiser returned a tensor on {out.device}, expected {like.device}")
    if not out.is_floating_point():
        raise TypeError(f"the denoiser returned dtype {out.dtype}, expected a floating dtype")
    return out.to(torch.float64)


def _denoise(denoiser, x, sigma: float, cond: dict, merged: dict | None, opts, limit: bool = False):
    """D(x; sigma) in float64 with CFG(+rescale) in one batched call; on F for preconditioners.

    ``limit``: sigma = inf, x the unit noise itself, D = c_skip x + c_out F(c_in x) with the
    preconditioner's ``limit_coefficients()``."""
    batch = x.shape[0]
    cfg = merged is not None
    # the denoiser gets its own copy: one that writes into its input (x.mul_(...), an in-place
    # network stem) must not change the state the step goes on with, as it cannot in the engine
    xb = torch.cat([x, x]) if cfg else x.clone()
    kwargs: dict = merged if merged is not None else cond
    rows = xb.shape[0]
    if _is_preconditioner(denoiser):
        if limit:
            c_skip, c_out, c_in, c_noise = denoiser.limit_coefficients()
        else:
            sig = torch.tensor([sigma], dtype=torch.float64, device=x.device)
            c_skip, c_out, c_in, c_noise = (float(c) for c in denoiser.coefficients(sig))
        noise_in = torch.full((rows,), c_noise, dtype=torch.float32, device=x.device)
        f = _checked(denoiser.raw((c_in * xb).to(denoiser.dtype), noise_in, **kwargs), xb)
        if cfg:
            f = cfg_rescale(f[:batch], f[batch:], opts.guidance_scale, opts.guidance_rescale)
        return c_skip * x + c_out * f
    sig = torch.full((rows,), sigma, dtype=torch.float64, device=x.device)
    d = _checked(denoiser(xb, sig, **kwargs), xb)
    if cfg:
        d = cfg_rescale(d[:batch], d[batch:], opts.guidance_scale, opts.guidance_rescale)
    return d


def _levels(denoiser, sigmas, opts: SamplerOptions) -> list[float]:
    """The noise levels to run, float64: ``sigmas`` (checked), or EDM's (Karras) schedule over
    [max(sigma_min, den.sigma_min), min(sigma_max, den.sigma_max)], snapped by ``den.round_sigma``
    (the final 0 is kept)."""
    if sigmas is not None:
        return check_sigmas(sigmas).tolist()
    lo = max(opts.sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    hi = min(opts.sigma_max, float(getattr(denoiser, "sigma_max", math.inf)))
    s = karras_sigmas(opts.num_steps, lo, hi, opts.rho)
    levels = s[:-1]
    round_sigma = getattr(denoiser, "round_sigma", None)
    if round_sigma is not None:
        levels = torch.as_tensor(round_sigma(levels)).to("cpu", torch.float64)
    return levels.reshape(-1).tolist() + [float(s[-1])]


def _churn(denoiser, opts: SamplerOptions, n: int, sigma: float) -> tuple[float, float]:
    """EDM Algorithm 2 for a step from ``sigma`` (of n): (sigma_hat, std of the added noise).

    ``gamma = min(S_churn/N, sqrt(2)-1)`` when ``S_tmin <= sigma <= S_tmax`` (else 0, and no churn
    from sigma = inf), ``sigma_hat = round(sigma (1 + gamma))`` (the network's own levels, if it
    has a ``round_sigma``), ``std = sqrt(sigma_hat^2 - sigma^2) S_noise``."""
    gamma = min(opts.s_churn / n, math.sqrt(2) - 1)
    if gamma == 0 or math.isinf(sigma) or not opts.s_tmin <= sigma <= opts.s_tmax:
        return sigma, 0.0
    sigma_hat = sigma * (1 + gamma)
    round_sigma = getattr(denoiser, "round_sigma", None)
    if round_sigma is not None:
        rounded = round_sigma(torch.tensor([sigma_hat], dtype=torch.float64))
        sigma_hat = float(torch.as_tensor(rounded, dtype=torch.float64).reshape(-1)[0])
    return sigma_hat, math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * opts.s_noise


def _ancestral_split(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion's ``get_ancestral_step``):
    ``sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))``,
    ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``; eta = 0 gives (sigma_to, 0). From sigma = inf
    the limit ``sigma_up = min(1, eta) sigma_to``."""
    if eta == 0:
        return sigma_to, 0.0
    if math.isinf(sigma_from):
        up = min(1.0, eta) * sigma_to
    else:
        up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def _neg_log(sigma: float) -> float:
    """t = -log(sigma), DPM-Solver's time; +inf at sigma = 0, -inf at sigma = inf."""
    return math.inf if sigma == 0 else -math.log(sigma)


def _lms_weights(nodes: list[float], sigma_next: float) -> list[float]:
    """Linear multistep weights: ``w_j = integral over [sigma_i, sigma_next] of l_j(tau) dtau``,
    l_j the Lagrange basis polynomials on ``nodes`` (the levels of the stored derivatives, newest
    last: sigma_i = nodes[-1]); w_0 goes with the newest derivative.

    Exact in float64: with u = (tau - sigma_i) / h, h = sigma_next - sigma_i, each l_j is a
    polynomial in u (nodes at u_k = (sigma_k - sigma_i) / h, of order 1) integrated over [0, 1]
    in closed form."""
    sigma = nodes[-1]
    h = sigma_next - sigma
    u = [(v - sigma) / h for v in reversed(nodes)]
    weights = []
    for j, u_j in enumerate(u):
        basis = Polynomial([1.0])
        for k, u_k in enumerate(u):
            if k != j:
                basis = basis * Polynomial([-u_k, 1.0]) / (u_j - u_k)  # (u - u_k) / (u_j - u_k)
        integral = basis.integ()
        weights.append(h * float(integral(1.0) - integral(0.0)))
    return weights


class _Noise:
    """Where a sampler's noise comes from (the contract in `sample`'s docstring): exact draws
    (``generator`` or torch's global RNG), the caller's ``noise_sampler``, or the Philox stream of
    (seeds[b], step, stage) in fused mode."""

    def __init__(self, opts, generator, seeds, noise_sampler, like: torch.Tensor):
        self.fused = opts.noise_mode == "fused"
        self.generator, self.seeds, self.noise_sampler = generator, seeds, noise_sampler
        self.shape, self.device, self.dtype = tuple(like.shape), like.device, like.dtype

    def _stream(self, step: int, stage: int, dtype: torch.dtype) -> torch.Tensor:
        """A draw of standard normals shaped like the state, as float64: Philox in fused mode, else
        drawn in ``dtype`` from the generator (or torch's global RNG)."""
        if self.fused:
            numel = math.prod(self.shape[1:])
            return philox_normal(self.seeds, step, numel, stage=stage).reshape(self.shape).to(self.device)
        return draw_exact_noise(self.generator, self.shape, self.device, dtype).to(torch.float64)

    def churn(self, step: int, std: float, opts: SamplerOptions, dtype: torch.dtype) -> torch.Tensor | None:
        """EDM churn noise: in exact mode one draw on every step once S_churn > 0 (the official
        generate script's rule, kept by k-diffusion's dpm_2), in fused mode where std > 0."""
        if opts.s_churn == 0 or (self.fused and std == 0):
            return None
        return self._stream(step, 0, dtype)

    def add(self, x: torch.Tensor, step: int, sigmas: tuple[float, float], scale: float, stage: int = 0):
        """``x + scale z`` for a draw of an ancestral / SDE step: ``noise_sampler(*sigmas)`` when
        given, else the stream in the state's dtype. Exact mode draws even when scale = 0, as
        k-diffusion calls its noise sampler there too (fused mode has no stream to keep aligned)."""
        if self.fused and scale == 0:
            return x
        if self.noise_sampler is None:
            return x + self._stream(step, stage, self.dtype) * scale
        z = self.noise_sampler(*(torch.tensor(s, dtype=torch.float64, device=self.device) for s in sigmas))
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != self.shape or not z.is_floating_point():
            raise ValueError(
                f"noise_sampler returned {getattr(z, 'shape', type(z).__name__)}, expected a floating "
                f"tensor of the state's shape {self.shape}"
            )
        return x + z.to(self.device, torch.float64) * scale


class _Run:
    """One call's denoiser, conditioning, options, noise and callback, shared by the sampler loops."""

    def __init__(self, denoiser, cond, merged, opts, noise: _Noise, callback):
        self.denoiser, self.cond, self.merged, self.opts = denoiser, cond, merged, opts
        self.noise, self.callback = noise, callback

    def D(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return _denoise(self.denoiser, x, sigma, self.cond, self.merged, self.opts)

    def first(self, i: int, x: torch.Tensor, sigma: float, sigma_hat: float | None = None) -> torch.Tensor:
        """The step's first evaluation D(x; sigma_hat) (the limit form at sigma = inf), reported to
        the callback in k-diffusion's convention."""
        sigma_hat = sigma if sigma_hat is None else sigma_hat
        denoised = _denoise(
            self.denoiser, x, sigma_hat, self.cond, self.merged, self.opts, limit=math.isinf(sigma_hat)
        )
        if self.callback is not None:
            self.callback(
                {
                    "x": x.clone(),
                    "i": i,
                    "sigma": torch.tensor(sigma, dtype=torch.float64),
                    "sigma_hat": torch.tensor(sigma_hat, dtype=torch.float64),
                    "denoised": denoised.clone(),
                }
            )
        return denoised


def _check_finite(x: torch.Tensor, i: int, sigma: float) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"non-finite values appeared at step {i} (sigma={sigma:g})")


# ----------------------------------------------------------------------------- the sampler loops
# Each takes the float64 state x (sigma_0 x, or the unit noise itself when sigma_0 = inf) and the
# levels s[0..N], and returns x_N. A step from sigma = inf is the limit of the solver's first-order
# (Euler / DDIM) update, x_1 = D(eps; inf) + c eps (+ noise): see `sample`.


def _edm(run: _Run, x: torch.Tensor, s: list[float]) -> torch.Tensor:
    """EDM Algorithm 2: Euler, Heun, or the generalized 2nd-order step with alpha (x' at
    sigma_hat + alpha h; d' weighted 1/(2 alpha)); no correction into sigma = 0."""
    opts, n = run.opts, len(s) - 1
    a = opts.effective_alpha
    for i in range(n):
        sigma, sigma_next = s[i], s[i + 1]
        sigma_hat, std = _churn(run.denoiser, opts, n, sigma)
        # exact mode draws on every step, the sigma = inf one included: the stream position of
        # step i's noise is i whatever the schedule
        eps = run.noise.churn(i, std, opts, torch.float64)
        if math.isinf(sigma):
            x = run.first(i, x, sigma) + sigma_next * x
            _check_finite(x, i, sigma)
            continue
        x_hat = x if eps is None else x + std * eps
        d = (x_hat - run.first(i, x_hat, sigma, sigma_hat)) / sigma_hat
        h = sigma_next - sigma_hat
        if opts.solver == "euler" or sigma_next == 0:
            x = x_hat + h * d
        else:
            # Heun (alpha = 1) evaluates exactly at sigma_{i+1}, not at sigma_hat + h rounded
            sigma_prime = sigma_next if a == 1 else sigma_hat + a * h
            x_prime = x_hat + a * h * d
            d_prime = (x_prime - run.D(x_prime, sigma_prime)) / sigma_prime
            x = x_hat + h * ((1 - 1 / (2 * a)) * d + 1 / (2 * a) * d_prime)
        _check_finite(x, i, sigma)
    return x


def _dpm_2(run: _Run, x: torch.Tensor, s: list[float]) -> torch.Tensor:
    """DPM-Solver-2 in sigma with EDM's churn (k-diffusion ``sample_dpm_2``): d at sigma_hat, an
    Euler half step to the log-midpoint ``sigma_mid = sqrt(sigma_hat sigma_next)``, then the full
    step with d there; Euler into sigma = 0. Churn noise is drawn in the state's dtype."""
    opts, n = run.opts, len(s) - 1
    for i in range(n):
        sigma, sigma_next = s[i], s[i + 1]
        sigma_hat, std = _churn(run.denoiser, opts, n, sigma)
        eps = run.noise.churn(i, std, opts, run.noise.dtype)
        if math.isinf(sigma):
            x = run.first(i, x, sigma) + sigma_next * x
            _check_finite(x, i, sigma)
            continue
        x_hat = x if eps is None else x + std * eps
        d = (x_hat - run.first(i, x_hat, sigma, sigma_hat)) / sigma_hat
        if sigma_next == 0:
            x = x_hat + (sigma_next - sigma_hat) * d
        else:
            sigma_mid = math.exp(0.5 * (math.log(sigma_hat) + math.log(sigma_next)))
            x_2 = x_hat + (sigma_mid - sigma_hat) * d
            d_2 = (x_2 - run.D(x_2, sigma_mid)) / sigma_mid
            x = x_hat + (sigma_next - sigma_hat) * d_2
        _check_finite(x, i, sigma)
    return x


def _ancestral(run: _Run, x: torch.Tensor, s: list[float]) -> torch.Tensor:
    """euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral: a deterministic step from sigma_i
    down to sigma_down, then ``+ S_noise sigma_up z`` (`_ancestral_split`) when sigma_{i+1} > 0.

    The step to sigma_down: Euler; DPM-Solver-2 (midpoint ``sqrt(sigma_i sigma_down)``, and
    k-diffusion draws no noise when it falls back to Euler at sigma_down = 0); DPM-Solver++(2S)
    (t = -log sigma, h = t_down - t, x_2 = e^(-h/2) x - expm1(-h/2) D at sigma e^(-h/2), then
    x = e^(-h) x - expm1(-h) D(x_2))."""
    opts, n = run.opts, len(s) - 1
    eta, solver = opts.eta_value, opts.solver
    for i in range(n):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = run.first(i, x, sigma)
        sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, eta)
        noise = sigma_next > 0
        if math.isinf(sigma):
            x = denoised + sigma_down * x
        elif sigma_down == 0 or solver == "euler_ancestral":
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
            if solver == "dpm_2_ancestral":
                noise = False  # k-diffusion adds dpm_2_ancestral's noise after a DPM-2 step only
        elif solver == "dpm_2_ancestral":
            d = (x - denoised) / sigma
            sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_down)))
            x_2 = x + (sigma_mid - sigma) * d
            d_2 = (x_2 - run.D(x_2, sigma_mid)) / sigma_mid
            x = x + (sigma_down - sigma) * d_2
        else:
            t, t_down = -math.log(sigma), -math.log(sigma_down)
            h = t_down - t
            x_2 = math.exp(-h / 2) * x - math.expm1(-h / 2) * denoised
            x = math.exp(-h) * x - math.expm1(-h) * run.D(x_2, math.exp(-(t + h / 2)))
        if noise:
            x = run.noise.add(x, i, (sigma, sigma_next), opts.s_noise * sigma_up)
        _check_finite(x, i, sigma)
    return x


def _dpmpp_sde(run: _Run, x: torch.Tensor, s: list[float]) -> torch.Tensor:
    """DPM-Solver++ (stochastic), k-diffusion ``sample_dpmpp_sde``: t = -log sigma, h = t_{i+1} - t,
    s = t + r h. An ancestral first-order step to sigma_s = e^(-s) (split (sd, su) of sigma_i ->
    sigma_s, ``x_2 = (sd/sigma_i) x - expm1(t - t(sd)) D + S_noise su z_1``), then from x with
    ``D_d = (1 - 1/(2r)) D + 1/(2r) D(x_2; sigma_s)`` and the split of sigma_i -> sigma_{i+1}, plus
    ``S_noise su' z_2``. Two draws per step (stages 0 and 1); Euler into sigma = 0."""
    opts, n = run.opts, len(s) - 1
    eta, r = opts.eta_value, opts.r_value
    for i in range(n):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = run.first(i, x, sigma)
        if math.isinf(sigma):
            sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, eta)
            x = denoised + sigma_down * x
            if sigma_next > 0:
                x = run.noise.add(x, i, (sigma, sigma_next), opts.s_noise * sigma_up)
        elif sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_next)
            h = t_next - t
            # k-diffusion passes sigma_fn(t_fn(sigma)) = exp(-(-log sigma)) to its noise sampler
            sigma_t, sigma_s, sigma_n = math.exp(-t), math.exp(-(t + h * r)), math.exp(-t_next)
            sd, su = _ancestral_split(sigma_t, sigma_s, eta)
            x_2 = math.exp(t - _neg_log(sd)) * x - math.expm1(t - _neg_log(sd)) * denoised
            x_2 = run.noise.add(x_2, i, (sigma_t, sigma_s), opts.s_noise * su, stage=0)
            fac = 1 / (2 * r)
            denoised_d = (1 - fac) * denoised + fac * run.D(x_2, sigma_s)
            sd, su = _ancestral_split(sigma_t, sigma_n, eta)
            x = math.exp(t - _neg_log(sd)) * x - math.expm1(t - _neg_log(sd)) * denoised_d
            x = run.noise.add(x, i, (sigma_t, sigma_n), opts.s_noise * su, stage=1)
        _check_finite(x, i, sigma)
    return x


def _dpmpp_2m(run: _Run, x: torch.Tensor, s: list[float]) -> torch.Tensor:
    """DPM-Solver++(2M): t = -log sigma, h_i = t_{i+1} - t_i, r = h_{i-1} / h_i,
    ``D'_i = (1 + 1/(2r)) D_i - (1/(2r)) D_{i-1}`` (D_i on the first step and into sigma = 0),
    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h_i) D'_i``."""
    old: torch.Tensor | None = None
    h_last = math.nan
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = run.first(i, x, sigma)
        if math.isinf(sigma):
            # h_{-1} = inf: the next step's correction 1/(2r) vanishes, as with no history
            x, old = denoised + sigma_next * x, None
        else:
            h = _neg_log(sigma_next) + math.log(sigma)
            denoised_d = denoised
            if old is not None and sigma_next != 0:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            old, h_last = denoised, h
        _check_finite(x, i, sigma)
    return x


def _dpmpp_2m_sde(run: _Run, x: torch.Tensor, s: list[float]) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``), h = t_{i+1} - t_i, eta h:
    ``x = (sigma_{i+1}/sigma_i) e^(-eta h) x + (1 - e^(-h - eta h)) D_i`` plus, with history
    (r = h_{i-1}/h), ``c (D_i - D_{i-1}) / r`` with c = (1 - e^(-h - eta h))/2 (midpoint) or
    ``(1 - e^(-h - eta h))/(-h - eta h) + 1`` (heun), plus ``sigma_{i+1} sqrt(1 - e^(-2 eta h))
    S_noise z`` when eta != 0. Into sigma = 0: x = D_i (no draw)."""
    opts = run.opts
    eta, heun = opts.eta_value, opts.solver_type_value == "heun"
    old: torch.Tensor | None = None
    h_last = math.nan
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = run.first(i, x, sigma)
        if math.isinf(sigma):
            # h = inf: e^(-eta h) = 0 unless eta = 0, and the noise std is sigma_1 itself
            x, old = denoised + (sigma_next if eta == 0 else 0.0) * x, None
            if eta and sigma_next > 0:
                x = run.noise.add(x, i, (sigma, sigma_next), sigma_next * opts.s_noise)
        elif sigma_next == 0:
            x = denoised
        else:
            h = -math.log(sigma_next) + math.log(sigma)
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = sigma_next / sigma * math.exp(-eta_h) * x + phi * denoised
            if old is not None:
                c = phi / (-h - eta_h) + 1 if heun else 0.5 * phi
                x = x + c * (1 / (h_last / h)) * (denoised - old)
            if eta:
                std = sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * opts.s_noise
                x = run.noise.add(x, i, (sigma, sigma_next), std)
            old, h_last = denoised, h
        _check_finite(x, i, sigma)
    return x


def _dpmpp_3m_sde(run: _Run, x: torch.Tensor, s: list[float]) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``): with h_eta = (1 + eta) h,
    ``x = e^(-h_eta) x + (1 - e^(-h_eta)) D_i`` plus the divided-difference terms of the last two
    (r0 = h_{i-1}/h, r1 = h_{i-2}/h): ``phi_2 d1 - phi_3 d2`` with phi_2 = (e^(-h_eta) - 1)/h_eta + 1,
    phi_3 = phi_2/h_eta - 1/2 (only ``phi_2 (D_i - D_{i-1})/r0`` with one earlier), plus
    ``sigma_{i+1} sqrt(1 - e^(-2 eta h)) S_noise z`` when eta != 0. Into sigma = 0: x = D_i."""
    opts = run.opts
    eta = opts.eta_value
    d_1: torch.Tensor | None = None
    d_2: torch.Tensor | None = None
    h_1 = h_2 = math.nan
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = run.first(i, x, sigma)
        if math.isinf(sigma):
            # h = inf: the history it would leave enters later steps divided by inf (no history)
            x, d_1, d_2 = denoised + (sigma_next if eta == 0 else 0.0) * x, None, None
            if eta and sigma_next > 0:
                x = run.noise.add(x, i, (sigma, sigma_next), sigma_next * opts.s_noise)
        elif sigma_next == 0:
            x = denoised
        else:
            h = -math.log(sigma_next) + math.log(sigma)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if d_2 is not None and d_1 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif d_1 is not None:
                x = x + phi_2 * ((denoised - d_1) / (h_1 / h))
            if eta:
                std = sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * opts.s_noise
                x = run.noise.add(x, i, (sigma, sigma_next), std)
            d_1, d_2, h_1, h_2 = denoised, d_1, h, h_1
        _check_finite(x, i, sigma)
    return x


def _lms(run: _Run, x: torch.Tensor, s: list[float]) -> torch.Tensor:
    """Linear multistep in sigma (k-diffusion ``sample_lms``): d_i = (x_i - D_i)/sigma_i,
    ``x_{i+1} = x_i + sum_j w_ij d_{i-j}`` over the last min(i + 1, order) derivatives, w_ij from
    `_lms_weights` (exact integrals of the Lagrange basis in sigma)."""
    order = run.opts.order_value
    ds: list[torch.Tensor] = []
    nodes: list[float] = []
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = run.first(i, x, sigma)
        if math.isinf(sigma):
            # a node at infinity drops out of every later Lagrange basis: no history
            x = denoised + sigma_next * x
        else:
            ds, nodes = [*ds, (x - denoised) / sigma][-order:], [*nodes, sigma][-order:]
            for w, d in zip(_lms_weights(nodes, sigma_next), reversed(ds), strict=True):
                x = x + w * d
        _check_finite(x, i, sigma)
    return x


_LOOPS = {
    "euler": _edm,
    "heun": _edm,
    "2nd": _edm,
    "dpm_2": _dpm_2,
    "euler_ancestral": _ancestral,
    "dpm_2_ancestral": _ancestral,
    "dpmpp_2s_ancestral": _ancestral,
    "dpmpp_sde": _dpmpp_sde,
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_2m_sde": _dpmpp_2m_sde,
    "dpmpp_3m_sde": _dpmpp_3m_sde,
    "lms": _lms,
}


def _fused_noise_needed(denoiser, opts: SamplerOptions, s: list[float]) -> bool:
    """Whether some step adds noise with a nonzero std (fused mode then needs seeds)."""
    n = len(s) - 1
    if opts.solver in CHURN_SOLVERS:
        return opts.s_churn > 0 and any(_churn(denoiser, opts, n, sigma)[1] > 0 for sigma in s[:-1])
    return opts.eta_value > 0 and opts.s_noise > 0 and any(v > 0 for v in s[1:])


@with_option_signature
@torch.no_grad()
def sample(
    denoiser,
    noise: torch.Tensor,
    sigmas=None,
    *,
    cond=None,
    uncond=None,
    generator=None,
    seeds=None,
    noise_sampler=None,
    callback=None,
    **options,
) -> torch.Tensor:
    """Every sampler of `edmfast.sample`, eager, float64 state, written out step by step. Same
    signature as `edmfast.sample`; ``backend``, ``cuda_graph``, ``compile`` and ``progress`` are
    accepted and ignored here. Returns a tensor shaped and typed like ``noise``.

    The state starts at ``sigma_0 noise`` (the noise itself when sigma_0 = inf). ``sigmas`` None:
    EDM's schedule (`karras_sigmas` over the options' range clamped to the denoiser's, rounded by
    its ``round_sigma``). D is the denoiser, or ``c_skip x + c_out F(c_in x; c_noise)`` for a
    preconditioner, with classifier-free guidance (+ rescale) on its raw output F.

    Solvers: EDM's "euler" / "heun" / "2nd" (Algorithm 2: ``gamma = min(S_churn/N, sqrt(2)-1)``
    inside [S_tmin, S_tmax], ``sigma_hat = round(sigma (1 + gamma))``, ``x_hat = x + sqrt(sigma_hat^2
    - sigma^2) S_noise eps``, an Euler step, and for heun / 2nd a correction with d' at
    ``sigma_hat + alpha h`` unless sigma_{i+1} = 0), and k-diffusion 0.1.1's fixed-step samplers
    with its names, defaults and math: "dpm_2" (with the same churn), "euler_ancestral",
    "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde" (r), "dpmpp_2m", "dpmpp_2m_sde"
    (solver_type), "dpmpp_3m_sde", "lms" (order); eta (default 1) and s_noise as there. Each
    loop's docstring has its formulas.

    Noise (the engine implements the same contract):

    * euler / heun / 2nd, exact mode: once s_churn > 0, one float64 draw per step on every step
      (the official EDM generate script's rule); dpm_2: the same, drawn in ``noise.dtype``
      (k-diffusion's ``torch.randn_like(x)``). Fused mode: Philox (seeds[b], step i, stage 0) on
      the steps whose churn std is > 0.
    * ancestral / SDE solvers, exact mode: a draw of the state's shape in ``noise.dtype``, exactly
      where and when k-diffusion calls its noise sampler (also where the draw is multiplied by 0,
      e.g. eta = 0 in euler_ancestral; none where k-diffusion makes none, e.g. dpmpp_2m_sde with
      eta = 0 or a step into sigma = 0), from ``generator`` (a ``torch.Generator``, a
      `edmfast.PerSampleGenerator`, or None: torch's global RNG), or from
      ``noise_sampler(sigma, sigma_next)`` when given, called with k-diffusion's arguments as 0-d
      float64 tensors. The SDE solvers' default here is that Gaussian draw, not k-diffusion's
      Brownian tree: pass ``noise_sampler=k_diffusion.sampling.BrownianTreeNoiseSampler(...)``
      for its images. Fused mode: Philox (seeds[b], step i, stage j), j = 0 for a step's first
      draw and 1 for its second (dpmpp_sde draws twice per step).
    * ``seeds`` default to ``generator.seeds`` of a PerSampleGenerator.

    A schedule starting at sigma = inf (zero terminal SNR) needs a preconditioner with
    ``limit_coefficients()``. Its first step is the limit of the solver's first-order update from
    the unit noise eps: ``x_1 = D(eps; inf) + sigma_1 eps`` (ODE solvers; no 2nd-order correction
    from infinity, whose limit does not exist), ``D(eps; inf) + sigma_down eps + S_noise sigma_up z``
    with ``sigma_up = min(1, eta) sigma_1`` (euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral,
    dpmpp_sde: one draw, stage 0), ``D(eps; inf) + S_noise sigma_1 z`` (dpmpp_2m_sde / 3m_sde with
    eta > 0; their e^(-eta h) is 0). That step leaves no multistep history (an earlier point at
    h = inf enters every later correction divided by inf).

    ``callback(info)`` (k-diffusion's convention) is called at each step's first evaluation with
    fresh float64 tensors: ``{"x": x_hat_i, "i", "sigma": sigma_i, "sigma_hat", "denoised":
    D(x_hat_i; sigma_hat)}``, sigma / sigma_hat 0-d on the CPU.
    """
    opts = SamplerOptions.create(**options)
    noise = check_noise(noise)
    batch, device = noise.shape[0], noise.device
    cond = check_cond(cond, batch, device, "cond")
    uncond_checked = check_cond(uncond, batch, device, "uncond")
    use_cfg = opts.guidance_scale != 1.0
    if use_cfg and uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond (the unconditional keyword arguments, {} if none)")
    merged = merge_cond(cond, uncond_checked, batch) if use_cfg else None
    s = _levels(denoiser, sigmas, opts)
    check_generator(generator, batch)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise TypeError(
                f"noise_sampler must be callable(sigma, sigma_next), got {type(noise_sampler).__name__}"
            )
        if opts.solver not in ETA_SOLVERS:
            raise ValueError(
                f"noise_sampler applies to solver {' / '.join(ETA_SOLVERS)} only, got {opts.solver!r}"
            )
        if opts.noise_mode == "fused":
            raise ValueError("noise_sampler is exact-mode noise: noise_mode='fused' draws its own (Philox)")
        if generator is not None:
            raise ValueError("pass generator or noise_sampler, not both (noise_sampler makes every draw)")
    if math.isinf(s[0]) and not (
        _is_preconditioner(denoiser) and callable(getattr(denoiser, "limit_coefficients", None))
    ):
        raise ValueError(
            "sigmas[0] is inf (zero terminal SNR): the denoiser needs limit_coefficients() "
            "(use edmfast.DiscreteVPDenoiser with v_prediction or sample prediction)"
        )
    if opts.noise_mode == "fused" and _fused_noise_needed(denoiser, opts, s):
        if seeds is None:
            seeds = getattr(generator, "seeds", None)
            seeds = None if seeds is None else seeds.to(device)  # ours to move: the generator's CPU copy
        if seeds is None:
            raise ValueError(
                f"noise_mode='fused' with solver={opts.solver!r} adding noise needs seeds (int64 [B])"
            )
        seeds = check_seeds(seeds, batch, device)

    x = noise.to(torch.float64)
    if math.isfinite(s[0]):
        x = x * s[0]
    run = _Run(denoiser, cond, merged, opts, _Noise(opts, generator, seeds, noise_sampler, noise), callback)
    return _LOOPS[opts.solver](run, x, s).to(noise.dtype)


@torch.no_grad()
def ablation_sample(
    denoiser,
    noise: torch.Tensor,
    *,
    num_steps: int = 18,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    solver: str = "heun",
    discretization: str = "edm",
    schedule: str = "linear",
    scaling: str = "none",
    epsilon_s: float = 1e-3,
    C1: float = 0.001,
    C2: float = 0.008,
    M: int = 1000,
    alpha: float = 1.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator=None,
) -> torch.Tensor:
    """The general EDM sampler over the whole design space (Algorithms 1-2 with sigma(t), s(t)).

    discretization: edm | vp | ve | iddpm (Table 1 time steps); schedule sigma(t): linear (t) |
    vp | ve (sqrt t); scaling s(t): none (1) | vp (1/sqrt(1+sigma^2)). The ODE derivative is
    ``d = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x/s; sigma)``. With the official defaults:
    sigma range per discretization, clamped to the denoiser's, VP betas refitted to it.
    Float64 state; returns the scaled output x(t=0) (s(0) = 1), typed like ``noise``.
    """
    from .schedules import _check_eps_s, iddpm_sigmas, ve_sigmas, vp_betas_for_range, vp_sigma

    epsilon_s = _check_eps_s(epsilon_s, "epsilon_s")
    defaults = {
        "vp": (float(vp_sigma(epsilon_s)), float(vp_sigma(1.0))),
        "ve": (0.02, 100.0),
        "iddpm": (0.002, 81.0),
        "edm": (0.002, 80.0),
    }
    if discretization not in defaults:
        raise ValueError(f"discretization must be one of {tuple(defaults)}, got {discretization!r}")
    if schedule not in ("linear", "vp", "ve"):
        raise ValueError(f"schedule must be linear, vp or ve, got {schedule!r}")
    if scaling not in ("none", "vp"):
        raise ValueError(f"scaling must be none or vp, got {scaling!r}")
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be euler or heun, got {solver!r}")
    # the loop divides by 2 alpha and takes sqrt of the churn variance: say so before it does
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    for name, v in (("s_churn", s_churn), ("s_noise", s_noise)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    if not s_tmin <= s_tmax:
        raise ValueError(f"need s_tmin <= s_tmax, got {s_tmin}, {s_tmax}")
    lo = defaults[discretization][0] if sigma_min is None else sigma_min
    hi = defaults[discretization][1] if sigma_max is None else sigma_max
    lo = max(lo, float(getattr(denoiser, "sigma_min", 0.0)))
    hi = min(hi, float(getattr(denoiser, "sigma_max", math.inf)))
    beta_d, beta_min = vp_betas_for_range(lo, hi, epsilon_s)

    if discretization == "edm":
        sig_steps = karras_sigmas(num_steps, lo, hi, rho)[:-1]
    elif discretization == "vp":
        t = 1 + torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1) * (epsilon_s - 1)
        sig_steps = vp_sigma(t, beta_d, beta_min)
    elif discretization == "ve":
        sig_steps = ve_sigmas(num_steps, lo, hi)[:-1]
    else:
        sig_steps = iddpm_sigmas(num_steps, lo, hi, M=M, C1=C1, C2=C2)[:-1]

    # sigma(t), sigma'(t), sigma^-1; s(t), s'(t): float64 tensors throughout
    if schedule == "vp":

        def sig(t):
            return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()

        def sig_d(t):
            return 0.5 * (beta_min + beta_d * t) * (sig(t) + 1 / sig(t))

        def sig_inv(s):
            return ((beta_min**2 + 2 * beta_d * torch.log1p(s**2)).sqrt() - beta_min) / beta_d
    elif schedule == "ve":

        def sig(t):
            return t.sqrt()

        def sig_d(t):
            return 0.5 / t.sqrt()

        def sig_inv(s):
            return s**2
    else:

        def sig(t):
            return t

        def sig_d(t):
            return torch.ones_like(t)

        def sig_inv(s):
            return s

    if scaling == "vp":

        def s_of(t):
            return 1 / (1 + sig(t) ** 2).sqrt()

        def s_d(t):
            return -sig(t) * sig_d(t) * s_of(t) ** 3
    else:

        def s_of(t):
            return torch.ones_like(t)

        def s_d(t):
            return torch.zeros_like(t)

    round_sigma = getattr(denoiser, "round_sigma", lambda s: s)
    t_steps = sig_inv(torch.as_tensor(round_sigma(sig_steps), dtype=torch.float64))
    t_steps = torch.cat([t_steps, t_steps.new_zeros(1)])
    batch = noise.shape[0]

    def deriv(x, t):
        sg = sig(t)
        # x / s(t) is a new tensor: a denoiser that writes into its input cannot change x
        D = denoiser((x / s_of(t)), torch.full((batch,), float(sg), dtype=torch.float64, device=x.device))
        return (sig_d(t) / sg + s_d(t) / s_of(t)) * x - sig_d(t) * s_of(t) / sg * D.to(torch.float64)

    x = noise.to(torch.float64) * (sig(t_steps[0]) * s_of(t_steps[0]))
    gamma_max = min(s_churn / num_steps, math.sqrt(2) - 1)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        gamma = gamma_max if s_tmin <= float(sig(t_cur)) <= s_tmax else 0.0
        t_hat = sig_inv(torch.as_tensor(round_sigma(sig(t_cur) + gamma * sig(t_cur)), dtype=torch.float64))
        x_hat = s_of(t_hat) / s_of(t_cur) * x
        if s_churn > 0:
            std = (sig(t_hat) ** 2 - sig(t_cur) ** 2).clamp(min=0).sqrt() * s_of(t_hat) * s_noise
            x_hat = x_hat + std * draw_exact_noise(generator, tuple(x.shape), x.device)
        h = t_next - t_hat
        d = deriv(x_hat, t_hat)
        if solver == "euler" or i == num_steps - 1:
            x = x_hat + h * d
        else:
            t_prime = t_hat + alpha * h
            x_prime = x_hat + alpha * h * d
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * d + 1 / (2 * alpha) * deriv(x_prime, t_prime))
    return x.to(noise.dtype)


@torch.no_grad()

# ----------------------------------------------------------------------------- ancestral (DDPM / DDIM)


def _respaced(num_steps: int, num_train: int, spacing: str, steps_offset: int) -> list[int]:
    """The kept training timesteps, descending, for a spacing name.

    Lin et al. 2023, Table 2 (S = num_steps of T): linspace ``round(linspace(0, T-1, S))``;
    leading ``arange(S) * (T // S) + offset``; trailing ``round(arange(T, 0, -T/S)) - 1`` (its
    first S). iDDPM's respacing (S from the spacing itself): ``"ddimN"`` keeps ``range(0, T, k)``
    for the stride k that gives exactly N; section counts ``"n_1,n_2,..."`` split [0, T) into equal
    sections (the first T mod K one longer) and keep ``round(j (size - 1) / (n - 1))`` of each
    (stride 1 for n <= 1)."""
    T, S = num_train, num_steps
    if spacing in ("linspace", "leading", "trailing"):
        if S > T:
            raise ValueError(f"num_steps={S} exceeds the {T} training timesteps")
        kept: np.ndarray
        if spacing == "linspace":
            kept = np.linspace(0, T - 1, S).round()
        elif spacing == "leading":
            kept = np.arange(S) * (T // S) + steps_offset
        else:
            kept = (np.round(np.arange(T, 0, -T / S)) - 1)[:S]
        ts = sorted((int(v) for v in kept), reverse=True)
        if ts[0] > T - 1 or ts[-1] < 0 or len(set(ts)) != S:
            raise ValueError(
                f"spacing={spacing!r} with num_steps={S}, steps_offset={steps_offset} gives timesteps "
                f"outside [0, {T - 1}] or repeated ones"
            )
        return ts
    if spacing.startswith("ddim"):
        want = spacing[len("ddim") :]
        if not (want.isascii() and want.isdigit()) or int(want) < 1:
            raise ValueError(f"spacing {spacing!r}: expected 'ddimN' with an integer N >= 1")
        for k in range(1, max(T, 2)):
            if len(range(0, T, k)) == int(want):
                return list(range(0, T, k))[::-1]
        raise ValueError(f"spacing {spacing!r}: no stride gives exactly {want} of {T} timesteps")
    parts = [p.strip() for p in spacing.split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts) or sum(int(p) for p in parts) < 1:
        raise ValueError(
            "spacing must be 'linspace', 'leading', 'trailing', 'ddimN' or section counts like "
            f"'10,10,20' (a positive total), got {spacing!r}"
        )
    counts = [int(p) for p in parts]
    size, extra = divmod(T, len(counts))
    kept_set: set[int] = set()
    start = 0
    for k, count in enumerate(counts):
        section = size + (1 if k < extra else 0)
        if count > section:
            raise ValueError(f"spacing {spacing!r}: section {k} has {section} timesteps, cannot keep {count}")
        stride = (section - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):
            kept_set.add(start + round(position))
            position += stride  # accumulated as iDDPM does (j * stride can round a .5 tie the other way)
        start += section
    return sorted(kept_set, reverse=True)


@torch.no_grad()
def sample_ancestral(
    model,
    noise: torch.Tensor,
    betas,
    timesteps=None,
    *,
    cond=None,
    uncond=None,
    generator=None,
    seeds=None,
    **options,
) -> torch.Tensor:
    """Ancestral sampling written out step by step in float64; same signature as
    `edmfast.ancestral.sample_ancestral` (``backend``, ``cuda_graph``, ``compile``, ``progress``
    are accepted and ignored).

    Timesteps: the given ones, or those of ``spacing`` (`_respaced`). Per step t = tau_i
    (descending, tau_{i+1} below it, abar = 1 below the last): ``beta = 1 - abar_t / abar_prev``,
    ``beta_tilde = beta (1 - abar_prev) / (1 - abar_t)``; x0 from the prediction (epsilon:
    ``(x - sqrt(1 - abar) F) / sqrt(abar)``, v: ``sqrt(abar) x - sqrt(1 - abar) F``, sample: F),
    clamped to [-clip_range, clip_range] with clip_denoised.

    DDPM: ``mean = beta sqrt(abar_prev) / (1 - abar_t) x0 + (1 - abar_prev) sqrt(1 - beta) /
    (1 - abar_t) x_t`` and, except on the last step, ``+ exp(log var / 2) z`` with log var from the
    variance type (fixed_small: log beta_tilde, fixed_large: log beta, learned: V, learned_range:
    ``frac log beta + (1 - frac) log beta_tilde``, frac = (V + 1)/2, V the cond rows' variance half).

    DDIM (``eta`` given): ``sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z``,
    ``sigma = eta sqrt(beta_tilde)``, with eps = ``(x - sqrt(abar) x0) / sqrt(1 - abar)`` from the
    clipped x0 (use_clipped_model_output=True: iDDPM / ADM's ddim_sample) or from the unclipped one,
    the model's own eps (False: diffusers' DDIMScheduler.step default).

    Guidance acts on the prediction half. Exact noise: one draw of the state's shape in the model
    output's dtype whenever diffusers draws (DDPM: t > 0; DDIM: eta > 0); fused: the Philox
    stream of (seeds[b], step i, stage 0) where the noise term is nonzero.
    """
    opts = AncestralOptions.create(**options)
    b = check_betas(betas)
    noise = check_noise(noise)
    batch, device = noise.shape[0], noise.device
    T = b.numel()
    if timesteps is None:
        ts = _respaced(opts.num_steps, T, opts.spacing, opts.steps_offset)
    else:
        ts = check_timesteps(timesteps, T).tolist()
    cond = check_cond(cond, batch, device, "cond")
    w, phi = opts.guidance_scale, opts.guidance_rescale
    use_cfg = w != 1.0
    if use_cfg and uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond (the unconditional keyword arguments, {} if none)")
    kwargs = merge_cond(cond, check_cond(uncond, batch, device, "uncond"), batch) if use_cfg else cond
    check_generator(generator, batch)
    abar = torch.cumprod(1 - b, 0).tolist()
    if not abar[ts[0]] > 0:
        raise ValueError(
            f"abar({ts[0]}) = 0 (zero terminal SNR): the ancestral step divides by sqrt(abar); "
            "start at a lower timestep"
        )
    fused = opts.noise_mode == "fused"
    if fused:
        if seeds is None:
            seeds = getattr(generator, "seeds", None)
        noisy = opts.eta > 0 if opts.eta is not None else len(ts) > 1
        if seeds is None and noisy:
            raise ValueError("noise_mode='fused' needs seeds (int64 [B]) or a PerSampleGenerator")
        if seeds is not None:
            seeds = check_seeds(seeds.to(device) if isinstance(seeds, torch.Tensor) else seeds, batch, device)
    net_dtype = torch.float32
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            net_dtype = p.dtype if p.dtype in IO_DTYPES else torch.float32
            break
    C = noise.shape[1]
    x = noise.to(torch.float64)
    S = len(ts)
    for i, t in enumerate(ts):
        a, a_prev = abar[t], (abar[ts[i + 1]] if i + 1 < S else 1.0)
        beta = 1 - a / a_prev
        beta_tilde = beta * (1 - a_prev) / (1 - a)
        xin = torch.cat([x, x]) if use_cfg else x
        t_in = torch.full((xin.shape[0],), t, dtype=torch.int64, device=device)
        out = model(xin.to(net_dtype), t_in, **kwargs)
        channels = 2 * C if opts.learned else C
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (xin.shape[0], channels, *x.shape[2:]):
            raise ValueError(
                f"the model returned {getattr(out, 'shape', type(out))}, expected {channels} channels"
            )
        out_dtype = out.dtype
        out = out.double()
        F, V = out[:, :C], out[:batch, C:]
        if use_cfg:
            F = cfg_rescale(F[:batch], F[batch:], w, phi)
        if opts.prediction_type == "epsilon":
            x0 = (x - math.sqrt(1 - a) * F) / math.sqrt(a)
        elif opts.prediction_type == "v_prediction":
            x0 = math.sqrt(a) * x - math.sqrt(1 - a) * F
        else:
            x0 = F
        x0_model = x0
        if opts.clip_denoised:
            x0 = x0.clamp(-opts.clip_range, opts.clip_range)
        draw = (opts.eta > 0) if opts.eta is not None else t > 0
        z = None
        if not fused and draw:
            z = draw_exact_noise(generator, tuple(x.shape), device, out_dtype).double()
        if opts.eta is not None:
            sigma = opts.eta * math.sqrt(beta_tilde)
            eps = (x - math.sqrt(a) * (x0 if opts.use_clipped_model_output else x0_model)) / math.sqrt(1 - a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                if fused:
                    z = philox_normal(seeds, i, x[0].numel()).reshape(x.shape).to(device)
                if z is not None:
                    x = x + sigma * z
        else:
            x = beta * math.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a) * x
            if i + 1 < S:
                if opts.variance == "fixed_small":
                    logvar: torch.Tensor | float = math.log(beta_tilde)
                elif opts.variance == "fixed_large":
                    logvar = math.log(beta)
                elif opts.variance == "learned":
                    logvar = V
                else:
                    frac = (V + 1) / 2
                    logvar = frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)
                if fused:
                    z = philox_normal(seeds, i, x[0].numel()).reshape(x.shape).to(device)
                if z is not None:
                    std = torch.exp(torch.as_tensor(logvar, dtype=torch.float64) / 2)
                    x = x + std.to(device) * z
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite values appeared at step {i} (t={t})")
    return x.to(noise.dtype)
