"""Ancestral sampling (DDPM / iDDPM / ADM / DiT, and DDIM with eta): its plan, and its front door.

Per step the engine runs the network once and one fused ancestral pass (plus the CFG-rescale
factors when guidance rescale is on): x0 from the prediction, clipping, the posterior mean, the
(learned) variance, the noise, the next network input and the non-finite check all happen in
that pass (`edmfast.ops.ancestral_step`), with the step's coefficients in a float32 row.

The plan is computed in float64 from the training betas (`edmfast.schedules.ddpm_betas`):
respaced betas ``beta_i = 1 - abar(tau_i) / abar(tau_{i-1})`` and the posterior coefficients
(Nichol & Dhariwal 2021, Eq. 10-12, 15), or DDIM's (Song et al. 2021, Eq. 12-16) when ``eta`` is
given. `edmfast.reference.sample_ancestral` is the float64 oracle of the same semantics.
`AncestralSampler` / `sample_ancestral` validate, plan and hand the call to `edmfast.engine`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch

from . import ops
from .engine import ReusableSampler, StepView, cached
from .layout import (
    ANC_AF,
    ANC_AX,
    ANC_C,
    ANC_CF,
    ANC_CLIP,
    ANC_COEF1,
    ANC_COEF2,
    ANC_LOG_BETA,
    ANC_LOG_BETA_TILDE,
    ANC_S,
    ANC_SIZE,
)
from .options import (
    F32_MAX,
    PREDICTION_TYPES,  # noqa: F401  (re-exported: edmfast.ancestral.PREDICTION_TYPES)
    VARIANCES,  # noqa: F401
    AncestralOptions,
    check_betas,
    check_guidance,
    check_timesteps,
)
from .plan import START, Plan, PlanBuilder, X
from .schedules import respaced_timesteps

# ----------------------------------------------------------------------------- plan


def resolve_timesteps(timesteps: Any, num_train: int, opts: AncestralOptions) -> torch.Tensor:
    """Descending int64 training indices: the given ones (checked) or those of the spacing."""
    if timesteps is None:
        return respaced_timesteps(opts.num_steps, num_train, opts.spacing, opts.steps_offset)
    return check_timesteps(timesteps, num_train)


def _eps_of(prediction_type: str, a: float, ax: float, af: float) -> tuple[float, float]:
    """The model's epsilon as ``ex x_t + ef F`` (F its raw output, abar = a)."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x_t
        return math.sqrt(1 - a), math.sqrt(a)
    # sample: eps = (x_t - sqrt(a) x0) / sqrt(1 - a), x0 = ax x_t + af F
    k = 1 / math.sqrt(1 - a)
    return k * (1 - math.sqrt(a) * ax), -k * math.sqrt(a) * af


def make_plan(betas: torch.Tensor, timesteps: torch.Tensor, opts: AncestralOptions) -> Plan:
    """The plan of ancestral sampling over ``timesteps`` (descending training indices): per step
    EVAL (the timestep), CALLBACK, DRAW (where diffusers' scheduler draws), the ancestral pass."""
    rows, noise_on, draws, variance = step_rows(betas, timesteps, opts)
    ts = timesteps.tolist()
    b = PlanBuilder(None)
    b.run(b.row(a=1.0, net=1.0), x=START, out=X, net=True, flag=0)  # x_T = the noise
    for i, t in enumerate(ts):
        last = i + 1 == len(ts)
        b.evaluate(t)
        r = rows[i].tolist()
        b.callback(i, b.row(a=r[ANC_AX], b=r[ANC_AF]), t=t)
        d = b.draw(i, used=noise_on[i]) if draws[i] else None
        row = b.raw_row(r)
        b.run(row, x=X, out=X, f=True, net=not last, noise=d if noise_on[i] else None, flag=i + 1,
              kind="ancestral")  # fmt: skip
        b.step_end(i, None if last else 1.0)
    return b.finish(
        torch.int64, "f", ("ancestral",), f_channels=2 if variance != "fixed" else 1,
        ancestral=(variance, opts.clip_denoised),
    )  # fmt: skip


def step_rows(betas: torch.Tensor, timesteps: torch.Tensor, opts: AncestralOptions):
    """Per step the float64 ancestral row (layout ANC_*), whether it adds noise, whether diffusers
    draws there, and the op's variance kind."""
    abar_all = torch.cumprod(1 - betas, 0)
    ts = timesteps.tolist()
    S = len(ts)
    rows = torch.zeros(S, ANC_SIZE, dtype=torch.float64)
    noise_on, draws = [], []
    tilde: list[float] = []
    for i, t in enumerate(ts):
        a = float(abar_all[t])
        a_prev = float(abar_all[ts[i + 1]]) if i + 1 < S else 1.0
        if not a > 0:
            raise ValueError(
                f"abar({t}) = 0 (zero terminal SNR): the ancestral step divides by sqrt(abar); "
                "start at a lower timestep"
            )
        if a >= a_prev:
            raise ValueError(f"betas give abar({t}) >= abar of the step below: beta must be > 0")
        beta = 1 - a / a_prev
        tilde.append(beta * (1 - a_prev) / (1 - a))
        r = rows[i]
        if opts.prediction_type == "epsilon":
            r[ANC_AX], r[ANC_AF] = math.sqrt(1 / a), -math.sqrt(1 / a - 1)
        elif opts.prediction_type == "v_prediction":
            r[ANC_AX], r[ANC_AF] = math.sqrt(a), -math.sqrt(1 - a)
        else:
            r[ANC_AX], r[ANC_AF] = 0.0, 1.0
        last = i + 1 == S
        r[ANC_LOG_BETA] = math.log(beta)
        r[ANC_C] = 1.0  # the network sees x_t itself
        r[ANC_CLIP] = opts.clip_range
        if opts.eta is not None:
            sigma = opts.eta * math.sqrt((1 - a_prev) / (1 - a) * beta)
            rest = math.sqrt(max(1 - a_prev - sigma * sigma, 0.0))
            if opts.use_clipped_model_output or not opts.clip_denoised:
                # eps recomputed from the (clipped) x0: eps = (x - sqrt(a) x0) / sqrt(1 - a)
                r[ANC_COEF1] = math.sqrt(a_prev) - rest * math.sqrt(a / (1 - a))
                r[ANC_COEF2] = rest / math.sqrt(1 - a)
            else:
                # the model's own eps = ex x + ef F in the direction term (diffusers' default step)
                ex, ef = _eps_of(opts.prediction_type, a, float(r[ANC_AX]), float(r[ANC_AF]))
                r[ANC_COEF1] = math.sqrt(a_prev)
                r[ANC_COEF2], r[ANC_CF] = rest * ex, rest * ef
            if opts.learned:
                # a 2C model under DDIM: the learned_range pass with both ends at log sigma^2 is a
                # fixed std whatever V says (the op reads f as [.., 2n]; no copy of the first half)
                lv = 2 * math.log(sigma) if sigma > 0 else 0.0
                r[ANC_LOG_BETA], r[ANC_LOG_BETA_TILDE] = lv, lv
                r[ANC_S] = 1.0 if sigma > 0 else 0.0
            else:
                r[ANC_S] = sigma
            noise_on.append(sigma > 0)
            draws.append(opts.eta > 0)  # DDIMScheduler draws on every step once eta > 0
            continue
        r[ANC_COEF1] = beta * math.sqrt(a_prev) / (1 - a)
        r[ANC_COEF2] = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        if opts.variance == "fixed_small":
            r[ANC_S] = math.sqrt(tilde[i])
        elif opts.variance == "fixed_large":
            r[ANC_S] = math.sqrt(beta)
        else:
            r[ANC_S] = 1.0
        if last:
            r[ANC_S] = 0.0  # x_0 is the posterior mean: no noise on the last step
        noise_on.append(not last)
        draws.append(t > 0)  # DDPMScheduler draws whenever the timestep is > 0
    for i in range(S):
        # iDDPM's clipped log variance: beta_tilde is 0 on the last step, use the one above
        bt = tilde[i] if tilde[i] > 0 else (tilde[i - 1] if i > 0 else 0.0)
        if opts.eta is None:
            rows[i, ANC_LOG_BETA_TILDE] = math.log(bt) if bt > 0 else float(rows[i, ANC_LOG_BETA])
    if opts.eta is not None:
        op_variance = "learned_range" if opts.learned else "fixed"
    else:
        op_variance = opts.variance if opts.learned else "fixed"
    if not bool(torch.isfinite(rows).all()) or float(rows.abs().max()) > F32_MAX:
        raise ValueError("the schedule's coefficients are not representable in float32")
    return rows, noise_on, draws, op_variance


# ----------------------------------------------------------------------------- front door


def network_dtype(model: Any) -> torch.dtype:
    """The dtype a model gets its input in: that of most of its floating parameters (its body: a
    float32 embedding registered first must not decide for a bfloat16 network), else float32."""
    params = getattr(model, "parameters", None)
    count: dict[torch.dtype, int] = {}
    if callable(params):
        for p in params():
            if p.dtype in ops.IO_DTYPES:
                count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=lambda d: count[d]) if count else torch.float32


class AncestralSampler(ReusableSampler):
    """A reusable ancestral sampler: ``AncestralSampler(model, betas, **options)(noise, ...)``.

    Options are those of `sample_ancestral`. Per call: ``noise`` (x_T), ``timesteps`` (default:
    from num_steps / spacing / steps_offset), ``cond`` / ``uncond``, ``generator``, ``seeds``,
    ``guidance_scale`` / ``guidance_rescale`` (override the options; kept in device memory, so a
    captured graph serves any value), ``callback`` (k-diffusion's convention, with ``t`` for
    sigma and ``denoised`` the predicted x0 before clipping) and ``on_step_end`` (see
    `edmfast.engine.StepView`). On CUDA with ``cuda_graph`` on, the whole loop is captured once per
    configuration (shape, dtypes, step count, which steps draw noise, CFG / rescale on or off,
    conditioning layout) and replayed for new noise, seeds, timesteps and guidance values.
    ``stats`` records compile time, captures and replays. The model sees x_t in the dtype of most
    of its parameters (`network_dtype`).
    """

    def __init__(self, model: Any, betas: Any, *, max_graphs: int = 4, **options: Any):
        self.opts = opts = AncestralOptions.create(**options)
        self.betas = check_betas(betas)  # a copy: the caller may change theirs later
        super().__init__(
            model, lambda m: m, backend=opts.backend, cuda_graph=opts.cuda_graph, progress=opts.progress,
            compile=opts.compile, max_graphs=max_graphs, plans=16,
        )  # fmt: skip
        # the default timesteps, resolved once (they are checked like any other)
        self._default_t = resolve_timesteps(None, self.betas.numel(), opts)

    def plan(self, timesteps: Any = None) -> Plan:
        t = (
            self._default_t
            if timesteps is None
            else resolve_timesteps(timesteps, self.betas.numel(), self.opts)
        )
        return self._plans.get(tuple(t.tolist()), lambda: make_plan(self.betas, t, self.opts))

    def __call__(
        self,
        noise: torch.Tensor,
        timesteps: Any = None,
        *,
        cond: dict | None = None,
        uncond: dict | None = None,
        generator: Any = None,
        seeds: Any = None,
        guidance_scale: Any = None,
        guidance_rescale: Any = None,
        callback: Callable[[dict], Any] | None = None,
        on_step_end: Callable[[StepView], Any] | None = None,
    ) -> torch.Tensor:
        return self._run(
            self.plan(timesteps), noise, network_dtype(self.model), cond=cond, uncond=uncond,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generator,
            seeds=seeds, callback=callback, on_step_end=on_step_end,
        )  # fmt: skip


def sample_ancestral(
    model: Any,
    noise: torch.Tensor,
    betas: Any,
    timesteps: Any = None,
    *,
    cond: dict | None = None,
    uncond: dict | None = None,
    generator: Any = None,
    seeds: Any = None,
    callback: Callable[[dict], Any] | None = None,
    **options: Any,
) -> torch.Tensor:
    """Ancestral sampling of a DDPM / iDDPM / ADM / DiT model (see `AncestralSampler`).

    ``model(x_t, t, **cond)`` gets the state and the original integer timesteps [B] (2B with CFG)
    and returns [B, 2C, ...] (prediction, then variance: ``variance="learned_range"`` / "learned")
    or [B, C, ...] (``"fixed_small"`` / ``"fixed_large"``). ``noise`` is x_T. ``eta`` (a float)
    selects DDIM with that eta instead of DDPM (eta = 0: deterministic DDIM). The AncestralSampler
    of a (model, betas, options) is kept in the engine's cache while the model lives, so repeated
    calls reuse its plans, buffers and graphs.
    """
    b = check_betas(betas)
    opts = AncestralOptions.create(**options)  # bad options fail before any cache entry is made
    check_guidance(opts.guidance_scale, opts.guidance_rescale)
    digest = hashlib.sha1(b.numpy().tobytes()).hexdigest()
    key = ("ancestral", digest, opts)
    sampler = cached(key, model, lambda ref: AncestralSampler(ref, b, **options))
    return sampler(
        noise, timesteps, cond=cond, uncond=uncond, generator=generator, seeds=seeds, callback=callback
    )
