"""diffusers' flow-matching schedulers in edmfast's terms (SD3, FLUX, Wan, ...).

Rectified flow is an EDM special case (`edmfast.FlowMatchDenoiser`): with ``x_t = (1 - t) x0 + t eps``
the noise level is ``sigma = t / (1 - t)`` and edmfast's state is ``x_t / (1 - t)``. `schedule`
reproduces a `FlowMatchEulerDiscreteScheduler` / `FlowMatchHeunDiscreteScheduler` schedule exactly:
the scheduler's float32 times t (shift, dynamic shifting with the pipeline's ``mu``, shift_terminal,
Karras / exponential / beta sigmas, invert_sigmas, custom ``sigmas``) become float64 EDM sigmas
(``inf`` at t = 1, the first step of every such schedule), and the model is told the scheduler's
own float32 timesteps. `CONFIG_OPTIONS` lists each constructor option and the values reproduced.

Steps:

- FlowMatchEuler's step ``x_t += (t' - t) v`` *is* EDM's Euler step in sigma on the state
  ``x_t / (1 - t)`` (both exact for a constant denoiser): the engine's "euler".
- FlowMatchHeun averages the velocities in t, ``x_t += (t' - t) (v + v') / 2``, a different
  second-order method than EDM's Heun in sigma (they differ at O(h^3) per step), so it has its own
  plan here ("flow_heun"): the Euler point x', then ``x_{i+1} = ((1 - t_i) x_i + (1 - t') x') /
  (2 (1 - t')) + (t' - t_i) v' / (2 (1 - t'))``, affine in (x, x', F') like every engine pass. It
  corrects the first step from t = 1 too, as the scheduler does (x_0 is then the unit noise).
- FlowMatchEuler's ``stochastic_sampling`` replaces the noise every step: ``x_t' = (1 - t') x0 +
  t' z``, i.e. ``x_{i+1} = D_i + sigma_{i+1} z`` ("flow_stochastic"), with one float32 draw of the
  state's shape per step (also on the last one, where it is multiplied by 0), in the scheduler's
  order, from the caller's generator (the pipelines pass none: torch's global RNG).

`FlowSampler` runs these two plans on the engine; "euler" runs on `edmfast.Sampler` itself.

Importing this module does not import diffusers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..options import check_sigmas
from ..plan import START, Plan, PlanBuilder, X, build
from ..precond import FlowMatchDenoiser, _model_output
from ..sampler import Sampler

if TYPE_CHECKING:
    from .schedules import Schedule

# Every constructor option (diffusers 0.42.1) and the values edmfast reproduces (None: all of them);
# merged into `edmfast.diffusers.CONFIG_OPTIONS`, checked by its `check_config`.
CONFIG_OPTIONS: dict[str, dict[str, tuple[Any, ...] | None]] = {
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": None,
        "shift": None,
        "use_dynamic_shifting": None,  # with the mu the pipeline passes (required then, as in diffusers)
        "base_shift": None,  # read by the pipelines to make mu
        "max_shift": None,
        "base_image_seq_len": None,
        "max_image_seq_len": None,
        "invert_sigmas": None,
        "shift_terminal": None,
        "use_karras_sigmas": None,
        "use_exponential_sigmas": None,
        "use_beta_sigmas": None,
        "time_shift_type": ("exponential", "linear"),
        "stochastic_sampling": None,
    },
    "FlowMatchHeunDiscreteScheduler": {
        "num_train_timesteps": None,
        "shift": None,
    },
}
SCHEDULERS = tuple(CONFIG_OPTIONS)
SOLVERS = ("flow_heun", "flow_stochastic")  # this module's plans (`FlowSampler`)


def _time_shift(cfg: Any, mu: float, t: np.ndarray) -> np.ndarray:
    """Resolution-dependent shifting: ``e^mu / (e^mu + (1/t - 1))`` ("exponential") or
    ``mu / (mu + (1/t - 1))`` ("linear"), in t's numpy dtype as diffusers computes it."""
    if cfg.get("time_shift_type", "exponential") == "linear":
        return mu / (mu + (1 / t - 1) ** 1.0)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def _respaced(cfg: Any, t: np.ndarray, n: int) -> np.ndarray:
    """Karras (rho 7) / exponential / beta(0.6, 0.6) levels over [t_min, t_max] of the shifted times."""
    lo, hi = t[-1].item(), t[0].item()
    if cfg.get("use_karras_sigmas", False):
        ramp = np.linspace(0, 1, n)
        return (hi ** (1 / 7.0) + ramp * (lo ** (1 / 7.0) - hi ** (1 / 7.0))) ** 7.0
    if cfg.get("use_exponential_sigmas", False):
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    if cfg.get("use_beta_sigmas", False):
        import scipy.stats  # diffusers needs it for this option too

        ppf = [scipy.stats.beta.ppf(u, 0.6, 0.6) for u in 1 - np.linspace(0, 1, n)]
        return np.array([lo + (p * (hi - lo)) for p in ppf])
    return t


def _flow_times(
    scheduler: Any, n: int | None, mu: float | None, sigmas: Any
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(times t, float64 [N + 1] in the model's own direction; timesteps, float32 [N]; N) exactly as
    ``scheduler.set_timesteps`` computes them: float64 numpy, or float32 for custom sigmas, then
    float32 torch."""
    cfg = scheduler.config
    T = int(cfg.num_train_timesteps)
    heun = type(scheduler).__name__ == "FlowMatchHeunDiscreteScheduler"
    if sigmas is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {n!r}")
        t = np.linspace(float(scheduler.sigma_max) * T, float(scheduler.sigma_min) * T, n) / T
    else:
        if heun:
            raise ValueError("FlowMatchHeunDiscreteScheduler takes no custom sigmas")
        t = np.array(sigmas).astype(np.float32)
        if t.ndim != 1 or len(t) < 1 or (n is not None and n != len(t)):
            raise ValueError(
                f"sigmas must be a 1-D sequence of num_inference_steps ({n}) flow times, got shape {t.shape}"
            )
        n = len(t)
    if heun:
        shift = float(cfg.shift)
        t = shift * t / (1 + (shift - 1) * t)
    else:
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError("FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=True needs mu")
            t = _time_shift(cfg, float(mu), t)
        else:
            shift = float(scheduler.shift)  # set_shift() may have changed it
            t = shift * t / (1 + (shift - 1) * t)
        if cfg.shift_terminal:
            one_minus = 1 - t
            t = 1 - (one_minus / (one_minus[-1] / (1 - cfg.shift_terminal)))
        t = _respaced(cfg, t, n)
    t32 = torch.from_numpy(np.asarray(t)).to(torch.float32)
    if not heun and cfg.invert_sigmas:
        t32 = 1.0 - t32
        end = torch.ones(1)
    else:
        end = torch.zeros(1)
    timesteps = t32 * T
    return torch.cat([t32, end]).double(), timesteps, n


def schedule(
    scheduler: Any, num_inference_steps: int | None, *, mu: float | None = None, sigmas: Any = None
) -> Schedule:
    """The exact schedule of a flow-matching ``scheduler`` (see `Schedule`; ``scaling="flow"``).

    ``mu``: the pipeline's resolution shift (needed with ``use_dynamic_shifting``, ignored without,
    as in diffusers); ``sigmas``: custom flow times (FlowMatchEuler; the FLUX pipeline always
    passes ``linspace(1, 1/N, N)``), shifted like the scheduler's own. EDM's sigmas are
    ``t / (1 - t)`` of the scheduler's float32 times (the noise-side time ``1 - t`` with
    ``invert_sigmas``), ``inf`` at t = 1; ``timesteps`` are the scheduler's. The pipeline's latents
    are x_t: ``noise_scale = 1 / t_0`` (1 from t = 1, where the state is the noise itself),
    ``output_scale = 1 - t_N`` (1). Solvers: "euler", "flow_heun" (FlowMatchHeun), "flow_stochastic"
    (``stochastic_sampling=True``).
    """
    # imported here: `.schedules` imports this module to merge its option table
    from .schedules import Schedule, check_config

    check_config(scheduler)
    cfg = scheduler.config
    u, timesteps, n = _flow_times(scheduler, num_inference_steps, mu, sigmas)
    heun = type(scheduler).__name__ == "FlowMatchHeunDiscreteScheduler"
    inverted = not heun and bool(cfg.invert_sigmas)
    t = 1 - u if inverted else u  # the noise-side time: x_t = (1 - t) x0 + t eps
    if not (bool(((t >= 0) & (t <= 1)).all()) and bool((t[1:] < t[:-1]).all())):
        raise ValueError(
            f"{type(scheduler).__name__}: the flow times {u.tolist()} are not strictly decreasing in "
            "[0, 1] (noise to data), which edmfast.diffusers does not support"
        )
    sig = torch.where(t == 1, math.inf, t / (1 - t).clamp(min=1e-300))
    solver = "flow_heun" if heun else "flow_stochastic" if cfg.stochastic_sampling else "euler"
    t0, tn = float(t[0]), float(t[-1])
    return Schedule(sig, timesteps.double(), 1.0, 1 / t0, 1 - tn, solver, scaling="flow")


class TransformerCall(nn.Module):
    """Calls a diffusers flow transformer (SD3, FLUX) by keyword, as its pipeline does:
    ``transformer(hidden_states=x_t, timestep=timestep, **cond)``; FLUX's pipeline tells it
    ``timestep.to(latents dtype) / 1000`` (``timestep_divisor=1000``). FLUX's position ids
    (``txt_ids`` / ``img_ids``, [tokens, 3]) reach it batched like any conditioning, [B, tokens, 3]
    (the engine batches and captures them so): their first row is passed on."""

    def __init__(self, transformer: nn.Module, timestep_divisor: float = 1.0):
        super().__init__()
        self.transformer = transformer
        self.timestep_divisor = timestep_divisor

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        for key in ("txt_ids", "img_ids"):
            ids = cond.get(key)
            if ids is not None and ids.dim() == 3:  # per token, alike in every row: one row goes on
                cond[key] = ids[0]
        if self.timestep_divisor != 1.0:
            timestep = timestep.to(x.dtype) / self.timestep_divisor
        out = self.transformer(hidden_states=x, timestep=timestep, return_dict=False, **cond)
        return _model_output(out)


def denoiser(model: Any, scheduler: Any) -> FlowMatchDenoiser:
    """The velocity model as the EDM denoiser ``scheduler`` assumes: told ``t * num_train_timesteps``
    (float32, as the scheduler's timesteps), reversed time with ``invert_sigmas``."""
    cfg = scheduler.config
    inverted = bool(cfg.get("invert_sigmas", False))
    return FlowMatchDenoiser(model, timestep_scale=float(cfg.num_train_timesteps), inverted=inverted)


def check_against(real: Any, sched: Schedule) -> bool:
    """Whether the scheduler's own ``sigmas`` / ``timesteps`` (after its ``set_timesteps``) are
    ``sched``'s: equal float32 timesteps, and times whose EDM sigmas are ``sched.sigmas``."""
    theirs_t = real.timesteps.detach().cpu()
    theirs_s = real.sigmas.detach().cpu().double()
    if type(real).__name__ == "FlowMatchHeunDiscreteScheduler":  # levels and timesteps repeated
        theirs_t = torch.cat([theirs_t[:1], theirs_t[1::2]])
        theirs_s = torch.cat([theirs_s[:1], theirs_s[1:-1:2], theirs_s[-1:]])
    t = 1 - theirs_s if real.config.get("invert_sigmas", False) else theirs_s
    mine = sched.sigmas / (1 + sched.sigmas)
    mine = torch.where(torch.isinf(sched.sigmas), 1.0, mine)
    return (
        theirs_t.shape == sched.timesteps.shape
        and torch.equal(theirs_t.double(), sched.timesteps)
        and t.shape == mine.shape
        and torch.allclose(t, mine, rtol=1e-12, atol=1e-15)
    )


# ----------------------------------------------------------------------------- plans


def _start(b: PlanBuilder, s: list[float]) -> None:
    c_in = b.c(s[0])[2]
    b.run(b.row(a=b.start_scale, net=c_in), x=START, out=X, net=True, flag=0)


def _euler_row(b: PlanBuilder, s: float, s_next: float, cs: float, co: float, net: float) -> int:
    """EDM Euler x + (s' - s)(x - D)/s, or from s = inf the limit D(u; inf) + s' u."""
    if math.isinf(s):
        return b.row(a=cs + s_next, b=co, net=net)
    h = s_next - s
    return b.row(a=1 + h * (1 - cs) / s, b=-h * co / s, net=net)


def _heun_plan(den: Any, s: list[float]) -> Plan:
    """FlowMatchHeun: per step EVAL, CALLBACK, pass A (Euler point x' -> slot 1, or x_{i+1} on a step
    into t = 0), EVAL at t', pass B ``x_{i+1} = P x + Q x' + R F'``, STEP_END."""
    n = len(s) - 1

    def run(b: PlanBuilder) -> Plan:
        _start(b, s)
        for i in range(n):
            si, sn = s[i], s[i + 1]
            last = i + 1 == n
            cs, co, _, cn = b.c(si)
            b.evaluate(cn)
            b.callback(i, b.row(a=cs, b=co), sigma=si, sigma_hat=si)
            if sn == 0:  # the scheduler's last step is first order (it ends there)
                b.run(_euler_row(b, si, sn, cs, co, 0.0), x=X, out=X, f=True, flag=i + 1)
                b.step_end(i, None)
                continue
            cs2, co2, ci2, cn2 = b.c(sn)
            b.run(_euler_row(b, si, sn, cs, co, ci2), x=X, out=1, f=True, net=True, flag=i + 1)
            b.evaluate(cn2)
            # 1 - t and t from sigma (1 - t_0 stands for the unit-noise state's own scale 1)
            keep = 1.0 if math.isinf(si) else 1 / (1 + si)
            t_i = 1.0 if math.isinf(si) else si / (1 + si)
            keep_n, t_n = 1 / (1 + sn), sn / (1 + sn)
            dt = t_n - t_i
            # v' = (x_t' - D') / t' = -c_out' F' / t'  (c_skip = c_in, so x_t' - c_skip' x' = 0)
            r = dt / (2 * keep_n) * (-co2 / t_n)
            row = b.row(a=keep / (2 * keep_n), hist=(0.5,), b=r, net=0.0 if last else ci2)
            b.run(row, x=X, hist=(1,), out=X, f=True, net=not last, flag=i + 1)
            b.step_end(i, None if last else ci2)
        return b.finish(torch.float32, "noise", ("flow", "flow_heun"))

    return build(run, den, 1.0 if math.isinf(s[0]) else s[0])


def _stochastic_plan(den: Any, s: list[float]) -> Plan:
    """FlowMatchEuler with stochastic_sampling: ``x_{i+1} = D_i + sigma_{i+1} z``, one draw per step
    (the last one drawn and multiplied by 0, as the scheduler does)."""
    n = len(s) - 1

    def run(b: PlanBuilder) -> Plan:
        _start(b, s)
        for i in range(n):
            si, sn = s[i], s[i + 1]
            last = i + 1 == n
            cs, co, _, cn = b.c(si)
            b.evaluate(cn)
            b.callback(i, b.row(a=cs, b=co), sigma=si, sigma_hat=si)
            d = b.draw(i, used=sn > 0, sigma=si, sigma_next=sn)
            net = 0.0 if last else b.c(sn)[2]
            b.run(
                b.row(a=cs, b=co, std=sn, net=net), x=X, out=X, f=True, net=not last,
                noise=d if sn > 0 else None, flag=i + 1,
            )  # fmt: skip
            b.step_end(i, None if last else net)
        return b.finish(torch.float32, "noise", ("flow", "flow_stochastic"))

    return build(run, den, 1.0 if math.isinf(s[0]) else s[0])


_PLANS = {"flow_heun": _heun_plan, "flow_stochastic": _stochastic_plan}


class FlowSampler(Sampler):
    """A `edmfast.Sampler` running one of this module's plans: ``FlowSampler(denoiser, "flow_heun")
    (noise, sigmas, ...)`` (FlowMatchHeun's Heun in t) or ``"flow_stochastic"`` (FlowMatchEuler's
    stochastic sampling). ``sigmas`` is required (a flow `schedule`'s); every other argument,
    option and guarantee is `Sampler`'s (guidance, callbacks, hooks, graphs, exact / fused noise)."""

    def __init__(self, denoiser: Any, solver: str, **options: Any):
        if not isinstance(solver, str) or solver not in _PLANS:
            raise ValueError(f"solver must be one of {tuple(_PLANS)}, got {solver!r}")
        super().__init__(denoiser, **options)
        self.flow_solver = solver

    def _make_plan(self, den: Any, sigmas: Any) -> Plan:
        if sigmas is None:
            raise ValueError("FlowSampler needs sigmas (a flow schedule's)")
        s = check_sigmas(sigmas)
        if float(s[-1]) != 0:
            raise ValueError("FlowSampler's sigmas must end at 0 (t = 0)")
        if math.isinf(float(s[0])) and not callable(getattr(den, "limit_coefficients", None)):
            raise ValueError("sigmas[0] is inf (t = 1): the denoiser needs limit_coefficients()")
        return _PLANS[self.flow_solver](den, s.tolist())
