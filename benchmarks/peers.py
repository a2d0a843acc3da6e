"""Peer implementations that the benchmarks run side by side with edmfast, on the same inputs.

(a) `official_edm_sampler`: the official EDM generate script's loop (NVlabs/edm ``generate.py``,
    ``edm_sampler``), written from the paper's Algorithm 2 and that script's defaults: float64
    state, eager network, ``round_sigma``, churn noise drawn on every step (also when gamma = 0)
    with the caller's ``randn_like`` (a per-sample generator), Heun correction when i < N - 1, the
    network called as ``net(x_hat, t_hat, class_labels)`` and its output upcast to float64.
    `OfficialEDMPrecond` is the official ``EDMPrecond`` (float32 coefficient math).
(b) `load_k_diffusion_sampling`: k-diffusion's real ``sampling.py`` (``sample_heun``), loaded
    without the package ``__init__`` (which imports torchvision, kornia, wandb, ...).
(c) `diffusers_cfg_loop` / `diffusers_edm_loop`: the StableDiffusionPipeline denoising loop
    around a diffusers scheduler (EulerDiscreteScheduler, HeunDiscreteScheduler, EDMEulerScheduler),
    for an eager or ``torch.compile(mode="reduce-overhead")`` network.
(d) `compiled_reference_sampler`: EDM Algorithm 2 with float32 state whose per-step elementwise
    math (edmfast's fused-op contract, `edmfast.reference.heun_step`) is ``torch.compile``'d, the
    denoiser called eagerly: what the compiler makes of the step around an opaque network.
(e) `compiled_whole_step_sampler`: the whole Heun step, denoiser included, as one
    ``torch.compile``'d function: the strongest compiler peer. With a cheap analytic denoiser
    inductor fuses the denoiser into the step's arithmetic, which edmfast (a kernel per pass, the
    network called between them) cannot; with a real network there is nothing to fuse it with.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------- (a) official EDM


class OfficialEDMPrecond(nn.Module):
    """NVlabs/edm ``training/networks.py`` EDMPrecond: coefficients in float32, F upcast to float32.

    ``model(x_in, c_noise)`` is the raw network (a diffusers UNet2DModel's ``.sample`` is taken).
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, use_fp16: bool = False):
        super().__init__()
        self.model, self.sigma_data, self.use_fp16 = model, sigma_data, use_fp16
        self.sigma_min, self.sigma_max = 0.0, float("inf")

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        dtype = (
            torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        )
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), **model_kwargs)
        F_x = getattr(F_x, "sample", F_x)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class OfficialNet:
    """Adapts a plain denoiser ``D(x, sigma)`` to the official ``net`` interface (no round_sigma)."""

    sigma_min, sigma_max = 0.0, float("inf")

    def __init__(self, denoiser: Callable[..., torch.Tensor]):
        self.denoiser = denoiser

    def __call__(self, x, sigma, class_labels=None):
        return self.denoiser(x, sigma)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def official_edm_sampler(
    net,
    latents,
    class_labels=None,
    randn_like=torch.randn_like,
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80,
    rho=7,
    S_churn=0,
    S_min=0,
    S_max=float("inf"),
    S_noise=1,
):
    """The official ``edm_sampler`` (EDM Algorithm 2), line for line; returns float64."""
    # Adjust noise levels based on what's supported by the network.
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    # Time step discretization.
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (
        sigma_max ** (1 / rho)
        + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])  # t_N = 0

    # Main sampling loop.
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # noqa: B905 - 0, ..., N-1
        x_cur = x_next

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    return x_next


class NoiseFeeder:
    """A ``randn_like`` that replays given noise tensors in order (upcast to the request's dtype).

    Lets the float64 official loop serve as the reference for a run whose churn noise came from
    another stream (k-diffusion's global RNG, edmfast's Philox).
    """

    def __init__(self, draws: list[torch.Tensor]):
        self.draws, self.i = draws, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.draws[self.i].to(dtype=x.dtype, device=x.device).reshape(x.shape)
        self.i += 1
        return eps


# ----------------------------------------------------------------------------- (b) k-diffusion

_K_DIFFUSION_PACKAGE = "_edmfast_peer_k_diffusion"


def _append_dims(x, target_dims):
    """k_diffusion.utils.append_dims, verbatim (used only when k_diffusion.utils cannot import)."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def load_k_diffusion_sampling() -> types.ModuleType:
    """k-diffusion's ``sampling.py`` as a module, loaded under a synthetic package.

    The package ``__init__`` imports every submodule (torchvision, kornia, clean-fid, wandb...);
    ``sampling.py`` itself needs only scipy, torchdiffeq, torchsde, tqdm and ``utils.append_dims``.
    The real ``utils.py`` is used when it imports (it needs torchvision), else a verbatim copy of
    ``append_dims``; ``module.UTILS_SOURCE`` says which.
    """
    if f"{_K_DIFFUSION_PACKAGE}.sampling" in sys.modules:
        return sys.modules[f"{_K_DIFFUSION_PACKAGE}.sampling"]
    spec = importlib.util.find_spec("k_diffusion")  # locates the package without running __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "k-diffusion is not installed (pip install --no-deps k-diffusion torchsde trampoline)"
        )
    root = list(spec.submodule_search_locations)[0]
    package = types.ModuleType(_K_DIFFUSION_PACKAGE)
    package.__path__ = [root]
    sys.modules[_K_DIFFUSION_PACKAGE] = package

    def load(name: str) -> types.ModuleType:
        full = f"{_K_DIFFUSION_PACKAGE}.{name}"
        sub = importlib.util.spec_from_file_location(full, f"{root}/{name}.py")
        assert sub is not None and sub.loader is not None
        module = importlib.util.module_from_spec(sub)
        sys.modules[full] = module
        try:
            sub.loader.exec_module(module)
        except BaseException:
            del sys.modules[full]
            raise
        setattr(package, name, module)
        return module

    try:
        load("utils")
        utils_source = "k_diffusion/utils.py"
    except ImportError:
        stub = types.ModuleType(f"{_K_DIFFUSION_PACKAGE}.utils")
        stub.append_dims = _append_dims  # type: ignore[attr-defined]
        sys.modules[stub.__name__] = stub
        package.utils = stub  # type: ignore[attr-defined]
        utils_source = "stub append_dims (k_diffusion.utils needs torchvision)"
    sampling = load("sampling")
    sampling.UTILS_SOURCE = utils_source  # type: ignore[attr-defined]
    return sampling


# ----------------------------------------------------------------------------- (c) diffusers


def rescale_noise_cfg_fn() -> tuple[Callable[..., torch.Tensor], str]:
    """diffusers' own ``rescale_noise_cfg`` when its pipeline module imports (needs transformers),
    else a verbatim copy of it; returns (function, where it came from)."""
    try:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        return rescale_noise_cfg, "diffusers.pipelines.stable_diffusion"
    except Exception:  # noqa: BLE001 - transformers missing or the module moved

        def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
            std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
            std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
            noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
            return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg

        return rescale_noise_cfg, "verbatim copy of diffusers' rescale_noise_cfg"


def sd15_scheduler_config() -> dict[str, Any]:
    """Stable Diffusion 1.5's scheduler settings (scaled-linear betas, leading spacing, offset 1)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def diffusers_cfg_loop(
    unet: Callable[..., Any],
    scheduler: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    rescale_noise_cfg: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """StableDiffusionPipeline.__call__'s denoising loop (no VAE, no callbacks, no progress bar).

    ``latents`` are unit noise [B, 4, H, W]; the scheduler is reset here (set_timesteps), as the
    pipeline does on every call. Classifier-free guidance batches (uncond, cond) in one call.
    """
    if rescale_noise_cfg is None:
        rescale_noise_cfg = rescale_noise_cfg_fn()[0]
    device = latents.device
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    latents = latents * scheduler.init_noise_sigma
    do_cfg = guidance_scale > 1.0
    embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
    for t in timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            if guidance_rescale > 0.0:
                noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def diffusers_edm_loop(
    unet: Callable[..., Any], scheduler: Any, latents: torch.Tensor, num_inference_steps: int
) -> torch.Tensor:
    """The same loop, unconditional, for an EDM-parameterized network and EDMEulerScheduler.

    The scheduler applies c_in (scale_model_input), passes c_noise = ln(sigma)/4 as the timestep
    and applies c_skip / c_out in ``step``: the diffusers way to sample an EDMPrecond network.
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        model_output = unet(model_input, t, return_dict=False)[0]
        latents = scheduler.step(model_output, t, latents, return_dict=False)[0]
    return latents


# ----------------------------------------------------------------------------- (d) compiled reference step


def _reference_step(x_hat, x_prime, f, eps, p, q, r, std, c):
    """`edmfast.reference.heun_step`'s contract ``x = p x_hat + q x' + r F + std eps``, ``net = c x``."""
    x = p * x_hat + q * x_prime + r * f + std * eps
    return x, c * x


class CompiledReferenceSampler:
    """EDM Algorithm 2 (Heun, churn) with float32 state; the elementwise step is torch.compile'd.

    Every pass of the loop is one call of the compiled `_reference_step` (coefficients are 0-d
    float32 tensors, so new values never recompile). Churn noise comes from ``torch.randn`` with
    one generator, drawn on every step like k-diffusion. The denoiser is called eagerly.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], compile_mode: str | None = "default"):
        self.denoiser = denoiser
        self.step = (
            torch.compile(_reference_step, mode=compile_mode, dynamic=False)
            if compile_mode
            else _reference_step
        )

    def __call__(
        self,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        device = noise.device
        num_steps = len(sigmas) - 1
        sig = [float(s) for s in sigmas]
        zero = torch.zeros((), device=device)

        def s(v: float) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float32, device=device)

        x = (noise.float() * sig[0]).contiguous()
        for i in range(num_steps):
            sigma, sigma_next = sig[i], sig[i + 1]
            gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
            sigma_hat = sigma * (1 + gamma)
            eps = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
            x_hat, _ = self.step(
                x, zero, zero, eps, s(1.0), zero, zero, s(math.sqrt(sigma_hat**2 - sigma**2) * s_noise), zero
            )
            sig_hat_b = torch.full((x.shape[0],), sigma_hat, device=device)
            denoised = self.denoiser(x_hat, sig_hat_b).float()
            h = sigma_next - sigma_hat
            # Euler: x' = x_hat + h (x_hat - D) / sigma_hat = (1 + h/sigma_hat) x_hat - h/sigma_hat D
            x_euler, _ = self.step(
                x_hat, zero, denoised, zero, s(1 + h / sigma_hat), zero, s(-h / sigma_hat), zero, zero
            )
            if sigma_next == 0:
                x = x_euler
                continue
            denoised2 = self.denoiser(x_euler, torch.full((x.shape[0],), sigma_next, device=device)).float()
            # Heun: x = x_hat + h/2 (d + d'), d = (x_hat - D)/sigma_hat, d' = (x' - D')/sigma_next;
            # D enters through x' - x_hat = h d, so x = p x_hat + q x' + r D' with
            # p = 1 - h/(2 sigma_next) ... expanded: x = x_hat + (x' - x_hat)/2 + h/2 (x' - D')/sigma_next
            a = h / (2 * sigma_next)
            x, _ = self.step(x_hat, x_euler, denoised2, zero, s(0.5), s(0.5 + a), s(-a), zero, zero)
        return x


def compiled_reference_sampler(
    denoiser: Callable[..., torch.Tensor], compile_mode: str | None = "default"
) -> CompiledReferenceSampler:
    return CompiledReferenceSampler(denoiser, compile_mode)


# ----------------------------------------------------------------------------- (e) compiled whole step


def _whole_heun_step(denoiser, x, eps, sigma, sigma_hat, sigma_next, s_noise):
    """One EDM Heun step (Algorithm 2) with churn, denoiser inside; sigmas are 0-d float32 tensors."""
    b = x.shape[0]
    x_hat = x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * eps
    d = (x_hat - denoiser(x_hat, sigma_hat.expand(b))) / sigma_hat
    x_euler = x_hat + (sigma_next - sigma_hat) * d
    d2 = (x_euler - denoiser(x_euler, sigma_next.expand(b))) / sigma_next
    return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d2)


def _whole_euler_step(denoiser, x, eps, sigma, sigma_hat, sigma_next, s_noise):
    """The last step (sigma_next = 0): Euler only, as Algorithm 2."""
    b = x.shape[0]
    x_hat = x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * eps
    return x_hat + (sigma_next - sigma_hat) * (x_hat - denoiser(x_hat, sigma_hat.expand(b))) / sigma_hat


class CompiledWholeStepSampler:
    """EDM Algorithm 2 (Heun, churn), float32 state, each whole step (both denoiser calls, the churn,
    Euler and the correction) one ``torch.compile``'d call. The churn noise is drawn eagerly with
    ``torch.randn`` and one generator on every step, as k-diffusion draws it, and passed in (the
    same draws in every run; sigmas as 0-d tensors, so new values never recompile)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], compile_mode: str | None = "default"):
        def wrap(fn):
            def step(*args):
                return fn(denoiser, *args)

            return torch.compile(step, mode=compile_mode, dynamic=False) if compile_mode else step

        self.heun, self.euler = wrap(_whole_heun_step), wrap(_whole_euler_step)

    def __call__(
        self,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        device = noise.device
        num_steps = len(sigmas) - 1
        sig = [float(s) for s in sigmas]

        def s(v: float) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float32, device=device)

        x = (noise.float() * sig[0]).contiguous()
        for i in range(num_steps):
            gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
            eps = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
            step = self.heun if sig[i + 1] > 0 else self.euler
            x = step(x, eps, s(sig[i]), s(sig[i] * (1 + gamma)), s(sig[i + 1]), s(s_noise))
        return x


def compiled_whole_step_sampler(
    denoiser: Callable[..., torch.Tensor], compile_mode: str | None = "default"
) -> CompiledWholeStepSampler:
    return CompiledWholeStepSampler(denoiser, compile_mode)
