"""Drop-in replacements for k-diffusion's ``sample_euler`` and ``sample_heun`` on edmfast's fused ops.

Same signatures, same random stream, same callbacks as ``k_diffusion.sampling`` (crowsonkb,
0.1.1 and master): ``x`` is already scaled by ``sigmas[0]``; the model is called as
``model(x, sigma_hat * ones(B), **extra_args)``; ``gamma = min(s_churn / (len(sigmas) - 1),
sqrt(2) - 1)`` when ``s_tmin <= sigma_i <= s_tmax``, else 0; churn noise is
``torch.randn_like(x)`` from the global RNG, drawn on *every* step as k-diffusion does (also
when gamma = 0, then unused), so the global RNG ends in the same state and a seed gives the same
image; the step to sigma = 0 is an Euler step.

What changes is how the update is computed. k-diffusion spends about ten elementwise kernels per
Heun step (to_d twice, the two Euler points, the average, the churn); here each step is one
fused pass over the state (`edmfast.ops.heun_step`), with the next step's churn folded into it:

* Euler point  ``x' = x_hat + h (x_hat - D) / s_hat``       -> p = 1 + h/s_hat, r = -h/s_hat
* Heun update  ``x = x_hat + h (d + d') / 2`` with ``d = (x' - x_hat)/h``, ``d' = (x' - D')/s'``
                                                             -> p = 1/2, q = 1/2 + h/(2 s'), r = -h/(2 s')
* next churn   ``+ sqrt(s_hat'^2 - s'^2) S_noise eps``     -> std

(h = s' - s_hat, s' = sigmas[i + 1]). The state is float32 whatever x's dtype (the fused kernels'
state precision); the model sees and the result has x's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

from . import ops
from .layout import COEF_C, COEF_P
from .options import SamplerOptions
from .plan import make_plan


def _plain(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Stands for k-diffusion's model while planning: a plain denoiser (no preconditioner, no
    round_sigma), which is how k-diffusion treats every model."""
    return x


__all__ = ["sample_euler", "sample_heun"]


def _as_f(denoised: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The model output as a fused-op operand (float32/16/bf16, shaped like the state)."""
    if tuple(denoised.shape) != tuple(like.shape):
        raise ValueError(f"the model returned shape {tuple(denoised.shape)}, expected {tuple(like.shape)}")
    return denoised if denoised.dtype in ops.IO_DTYPES else denoised.float()


class _Plan:
    """k-diffusion's per-step churn (gamma, sigma_hat, RNG order) and the fused passes' coefficients.

    The rows come from `edmfast.plan.make_plan` (the one place that folds a schedule into
    coefficient rows) for a plain denoiser, whose gamma / sigma_hat / churn std / correction rules
    are k-diffusion's; only the start differs (x is already scaled by sigmas[0]). ``coef`` is a
    float32 [1 + 2N, 8] table on the device (row 0: the first churn; rows 1 + 2i, 2 + 2i: step
    i's passes), so the loop does no host-to-device copy per step.
    """

    def __init__(
        self,
        sigmas: torch.Tensor,
        heun: bool,
        s_churn: float,
        s_tmin: float,
        s_tmax: float,
        s_noise: float,
        device: torch.device,
    ):
        if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
            raise ValueError("sigmas must be a 1-D tensor with at least 2 entries (the last usually 0)")
        if not s_churn >= 0:
            raise ValueError(f"s_churn must be >= 0, got {s_churn}")
        self.sigmas = sigmas
        opts = SamplerOptions.create(
            solver="heun" if heun else "euler", s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise
        )
        # One host read of the schedule up front; the loop then needs no sync for its branches.
        plan = make_plan(_plain, sigmas.detach().cpu().double(), opts)
        self.n = plan.n
        self.churns = [st.churn for st in plan.steps]
        self.correct = list(plan.correct)
        rows = plan.coef.clone()
        rows[0, COEF_P], rows[0, COEF_C] = 1.0, 0.0  # x arrives already scaled by sigmas[0]
        self.coef = rows.to(device)
        self._gamma_max = min(s_churn / self.n, 2**0.5 - 1)

    def sigma_hat(self, i: int) -> torch.Tensor:
        """The tensor k-diffusion hands to the model and the callback (sigmas' dtype and device)."""
        return self.sigmas[i] * ((self._gamma_max if self.churns[i] else 0.0) + 1)

    def draw(self, i: int, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Step i's churn noise, or None. Draws on every step as k-diffusion does, to keep the global RNG
        in step; ``dtype`` is the dtype k-diffusion's state has then (randn differs per dtype)."""
        if i >= self.n:
            return None
        eps = torch.randn_like(x, dtype=dtype)
        return eps.float() if self.churns[i] else None


def _sample(
    heun: bool,
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None,
    callback: Callable[[dict[str, Any]], Any] | None,
    disable: bool | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a [B, ...] tensor with B >= 1")
    extra_args = {} if extra_args is None else extra_args
    device, dtype = x.device, x.dtype
    plan = _Plan(sigmas, heun, s_churn, s_tmin, s_tmax, s_noise, device)
    backend = ops.resolve_backend("auto", device)
    s_in = x.new_ones([x.shape[0]])

    def new() -> torch.Tensor:
        # Every tensor handed to the model or the callback is fresh (never overwritten later), as
        # in k-diffusion, so a callback may keep references to them.
        return torch.empty(x.shape, dtype=torch.float32, device=device)

    state = x.float().contiguous()
    # k-diffusion's state changes dtype after the first step: to_d divides by a [1, 1, ...]-shaped
    # sigma, so x becomes promote(x, denoised, sigmas) (float64 for an edmfast schedule). Its
    # noise is drawn in that dtype, so the draws follow the same promotion to give the same
    # images; our state stays float32.
    draw_dtype = x.dtype
    eps = plan.draw(0, x, draw_dtype)
    if eps is not None:
        state = ops.churn(state, plan.coef[0], out=new(), noise=eps, backend=backend)
    for i in trange(plan.n, disable=disable):
        x_hat, sigma_hat = state.to(dtype), plan.sigma_hat(i)
        denoised = model(x_hat, sigma_hat * s_in, **extra_args)
        f = _as_f(denoised, x_hat)
        draw_dtype = torch.promote_types(torch.promote_types(draw_dtype, denoised.dtype), sigmas.dtype)
        if callback is not None:
            callback({"x": x_hat, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        if plan.correct[i]:
            x_euler = ops.heun_step(state, plan.coef[1 + 2 * i], f=f, out=new(), backend=backend)
            f = _as_f(model(x_euler.to(dtype), sigmas[i + 1] * s_in, **extra_args), x_hat)
            # k-diffusion draws step i+1's noise right after this model call; drawing it here keeps
            # the global RNG order and lets the churn ride along in the same fused pass.
            eps = plan.draw(i + 1, x, draw_dtype)
            state = ops.heun_step(
                state, plan.coef[2 + 2 * i], x_prime=x_euler, f=f, noise=eps, out=new(), backend=backend
            )
        else:
            eps = plan.draw(i + 1, x, draw_dtype)
            state = ops.heun_step(state, plan.coef[1 + 2 * i], f=f, noise=eps, out=new(), backend=backend)
    return state.to(dtype)


@torch.no_grad()
def sample_euler(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """EDM Algorithm 2 with Euler steps, k-diffusion's ``sample_euler`` on fused ops.

    ``model(x, sigma[B], **extra_args) -> denoised``; ``x`` [B, ...] is the starting state
    (unit noise times ``sigmas[0]``); ``sigmas`` descending, usually ending in 0. Returns x's dtype.
    """
    return _sample(False, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_heun(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """EDM Algorithm 2 with Heun steps (Euler on the step to sigma 0), k-diffusion's ``sample_heun``.

    Same arguments as `sample_euler`; 2 model calls per step except the last (2N - 1 in all).
    """
    return _sample(True, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise)
