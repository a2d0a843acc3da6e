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
* ``coef`` is a float32 device tensor, read by the kernel at run time so a captured graph replays
  with new schedules; its columns are named in `edmfast.layout` (``heun_step``: the first five,
  ``[p, q, r, std, c]``; ``affine_step``: sixteen).
"""

from __future__ import annotations

import math

import torch

from .layout import (
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
from .options import with_option_signature
from .philox import philox_normal


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

    ``coef = [ax, af, coef1, coef2, log_beta, log_beta_tilde, s, c]`` (the ANC_* indices). With n
    elements per sample, ``f`` is [B or 2B, m] with m = 2n for the learned variances (the first n
    elements per row are the prediction F, the next n the variance output V of the cond rows) or
    m = n. ``x0 = ax x + af F`` (clamped to [-1, 1] if ``clip``), ``mean = coef1 x0 + coef2 x``,
    std = ``s exp(logvar / 2)`` for the learned variances (logvar = V for "learned", the
    interpolation ``frac log_beta + (1 - frac) log_beta_tilde`` with frac = (V + 1) / 2 for
    "learned_range") or ``s`` for "fixed"; ``out = mean + std z`` with z from `fused_noise` (none:
    the noise term is dropped). Returns out, float64, shaped like x (the network input is ``c out``).
    """
    if variance not in ANC_VARIANCES:
        raise ValueError(f"variance must be one of {ANC_VARIANCES}, got {variance!r}")
    batch = x.shape[0]
    n = x[0].numel()
    ax, af, coef1, coef2, log_beta, log_beta_tilde, s, _c = (float(v) for v in coef.double().cpu()[:8])
    rows = f.reshape(f.shape[0], -1)
    learned = variance != "fixed"
    if rows.shape[1] != (2 * n if learned else n):
        raise ValueError(f"f has {rows.shape[1]} elements per row, expected {2 * n if learned else n}")
    F = guided_prediction(rows[:, :n], batch, guidance_scale, k)
    x64 = x.reshape(batch, n).double()
    x0 = ax * x64 + af * F
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    out = coef1 * x0 + coef2 * x64
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


def draw_exact_noise(generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One float64 churn draw shaped like the state (the official generate script's semantics).

    ``generator``: a `edmfast.PerSampleGenerator` (row b from sample b's stream), a
    ``torch.Generator``, or None for torch's global RNG on ``device``.
    """
    if generator is None:
        return torch.randn(shape, dtype=torch.float64, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, dtype=torch.float64, device=generator.device, generator=generator).to(
            device
        )
    return generator.randn(shape, dtype=torch.float64, device=device)


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
    """D(x; sigma) in float64 with CFG(+rescale) in one batched call; on F for preconditioners."""
    batch = x.shape[0]
    cfg = merged is not None
    # the denoiser gets its own copy: one that writes into its input (x.mul_(...), an in-place
    # network stem) must not change the state the step goes on with, as it cannot in the engine
    xb = torch.cat([x, x]) if cfg else x.clone()
    kwargs: dict = merged if merged is not None else cond
    rows = xb.shape[0]
    from .plan import is_preconditioner  # plan imports this module: a local import

    if is_preconditioner(denoiser):
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
    if limit:
        raise ValueError(
            "sigmas[0] is inf (zero terminal SNR): the denoiser needs limit_coefficients() "
            "(use edmfast.DiscreteVPDenoiser with v_prediction or sample prediction)"
        )
    sig = torch.full((rows,), sigma, dtype=torch.float64, device=x.device)
    d = _checked(denoiser(xb, sig, **kwargs), xb)
    if cfg:
        d = cfg_rescale(d[:batch], d[batch:], opts.guidance_scale, opts.guidance_rescale)
    return d


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
    **options,
) -> torch.Tensor:
    """EDM Algorithm 2 (Algorithm 1 when s_churn = 0), eager, float64 state. Same signature as
    `edmfast.sample`; ``backend``, ``cuda_graph``, ``compile`` and ``progress`` are accepted and
    ignored here.

    For i = 0..N-1: ``gamma_i = min(S_churn/N, sqrt(2)-1)`` if ``S_tmin <= sigma_i <= S_tmax``;
    ``sigma_hat = round(sigma_i (1 + gamma_i))``; ``x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise eps``;
    ``d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat``; ``x' = x_hat + alpha h d`` with
    ``h = sigma_{i+1} - sigma_hat``; then Euler ``x_{i+1} = x_hat + h d`` or, when sigma_{i+1} != 0,
    ``x_{i+1} = x_hat + h ((1 - 1/(2 alpha)) d + 1/(2 alpha) d')`` with d' at (x', sigma_hat + alpha h).
    A schedule starting at sigma = inf starts from the noise itself and takes the limit step
    ``x_1 = D(eps; inf) + sigma_1 eps``. Returns a tensor shaped and typed like ``noise``.
    """
    from .options import (
        SamplerOptions,
        check_cond,
        check_generator,
        check_noise,
        check_seeds,
        merge_cond,
        resolve_sigmas,
    )
    from .plan import plan_steps

    opts = SamplerOptions.create(**options)
    noise = check_noise(noise)
    batch, device = noise.shape[0], noise.device
    cond = check_cond(cond, batch, device, "cond")
    uncond_checked = check_cond(uncond, batch, device, "uncond")
    use_cfg = opts.guidance_scale != 1.0
    if use_cfg and uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond (the unconditional keyword arguments, {} if none)")
    merged = merge_cond(cond, uncond_checked, batch) if use_cfg else None
    sigmas = resolve_sigmas(denoiser, sigmas, opts)
    steps = plan_steps(denoiser, sigmas, opts)
    check_generator(generator, batch)
    if opts.noise_mode == "fused" and any(st.churn and st.noise_std > 0 for st in steps):
        if seeds is None:
            seeds = getattr(generator, "seeds", None)
            seeds = None if seeds is None else seeds.to(device)  # ours to move: the generator's CPU copy
        if seeds is None:
            raise ValueError("noise_mode='fused' with s_churn > 0 needs seeds (int64 [B])")
        seeds = check_seeds(seeds, batch, device)

    x = noise.to(torch.float64)
    if math.isfinite(steps[0].sigma):
        x = x * steps[0].sigma
    for i, st in enumerate(steps):
        # exact mode draws on every step, the sigma = inf one included, as the engine does: the
        # stream position of step i's noise is i whatever the schedule
        eps = None
        if opts.s_churn > 0:
            if opts.noise_mode == "exact":
                eps = draw_exact_noise(generator, tuple(x.shape), device)
            elif st.churn and st.noise_std > 0:
                eps = philox_normal(seeds, i, x[0].numel()).reshape(x.shape).to(device)
        if math.isinf(st.sigma):
            x = _denoise(denoiser, x, st.sigma, cond, merged, opts, limit=True) + st.sigma_next * x
            continue
        x_hat = x if eps is None else x + st.noise_std * eps
        d = (x_hat - _denoise(denoiser, x_hat, st.sigma_hat, cond, merged, opts)) / st.sigma_hat
        h = st.sigma_next - st.sigma_hat
        if not st.correct:
            x = x_hat + h * d
        else:
            a = opts.effective_alpha
            x_prime = x_hat + a * h * d
            d_prime = (
                x_prime - _denoise(denoiser, x_prime, st.sigma_prime, cond, merged, opts)
            ) / st.sigma_prime
            x = x_hat + h * ((1 - 1 / (2 * a)) * d + 1 / (2 * a) * d_prime)
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite values appeared at step {i} (sigma={st.sigma:g})")
    return x.to(noise.dtype)


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
        from .schedules import karras_sigmas

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

    Per step t = tau_i (descending, tau_{i+1} below it, abar = 1 below the last): ``beta = 1 -
    abar_t / abar_prev``, ``beta_tilde = beta (1 - abar_prev) / (1 - abar_t)``; x0 from the
    prediction (clamped to [-1, 1] with clip_denoised); DDPM: ``mean = beta sqrt(abar_prev) /
    (1 - abar_t) x0 + (1 - abar_prev) sqrt(1 - beta) / (1 - abar_t) x_t`` and, except on the last
    step, ``+ exp(log var / 2) z`` with log var from the variance type; DDIM (``eta`` given):
    ``sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z``, eps_hat recomputed
    from the (clipped) x0, ``sigma = eta sqrt(beta_tilde)``. Exact noise: one draw of the state's
    shape in the model output's dtype whenever diffusers draws (DDPM: t > 0; DDIM: eta > 0).
    """
    from .ancestral import AncestralOptions, _draw, check_betas, resolve_timesteps
    from .ops import IO_DTYPES
    from .options import check_cond, check_generator, check_noise, check_seeds, merge_cond

    opts = AncestralOptions.create(**options)
    b = check_betas(betas)
    noise = check_noise(noise)
    batch, device = noise.shape[0], noise.device
    ts = resolve_timesteps(timesteps, b.numel(), opts).tolist()
    cond = check_cond(cond, batch, device, "cond")
    w, phi = opts.guidance_scale, opts.guidance_rescale
    use_cfg = w != 1.0
    if use_cfg and uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond (the unconditional keyword arguments, {} if none)")
    kwargs = merge_cond(cond, check_cond(uncond, batch, device, "uncond"), batch) if use_cfg else cond
    check_generator(generator, batch)
    fused = opts.noise_mode == "fused"
    if fused:
        if seeds is None:
            seeds = getattr(generator, "seeds", None)
        if seeds is not None:
            seeds = check_seeds(seeds.to(device) if isinstance(seeds, torch.Tensor) else seeds, batch, device)
    net_dtype = torch.float32
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            net_dtype = p.dtype if p.dtype in IO_DTYPES else torch.float32
            break
    abar = torch.cumprod(1 - b, 0).tolist()
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
        if opts.clip_denoised:
            x0 = x0.clamp(-1, 1)
        draw = (opts.eta > 0) if opts.eta is not None else t > 0
        z = None
        if not fused and draw:
            z = _draw(generator, tuple(x.shape), out_dtype, device).double()
        if opts.eta is not None:
            sigma = opts.eta * math.sqrt(beta_tilde)
            eps_hat = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps_hat
            if sigma > 0:
                if fused:
                    if seeds is None:
                        raise ValueError("noise_mode='fused' needs seeds (int64 [B]) or a PerSampleGenerator")
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
                    if seeds is None:
                        raise ValueError("noise_mode='fused' needs seeds (int64 [B]) or a PerSampleGenerator")
                    z = philox_normal(seeds, i, x[0].numel()).reshape(x.shape).to(device)
                if z is not None:
                    std = torch.exp(torch.as_tensor(logvar, dtype=torch.float64) / 2)
                    x = x + std.to(device) * z
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite values appeared at step {i} (t={t})")
    return x.to(noise.dtype)
