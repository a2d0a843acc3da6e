"""diffusers interop: `edmfast.DiscreteVPDenoiser` + `edmfast.sample` against the real diffusers.

Each test runs a tiny random-weight diffusers UNet (8x8, a few thousand parameters, CPU) through a
diffusers scheduler loop written the way its pipelines write it, and through edmfast on the same
noise, and compares the results:

(a) epsilon model, `EulerDiscreteScheduler` == edmfast Euler on ``sigmas_for(timesteps)``, for
    linspace / leading / trailing spacing;
(b) v-prediction, zero terminal SNR, trailing spacing, `DDIMScheduler` (eta 0) == edmfast Euler
    starting at sigma = inf (DDIM with eta = 0 *is* Euler in VE coordinates:
    ``x_prev / sqrt(abar_prev) = x0 + sigma_prev eps``);
(c) classifier-free guidance with rescale on `UNet2DConditionModel` == diffusers' own
    ``rescale_noise_cfg`` in an Euler loop.

Skipped when diffusers is not installed (``pip install diffusers``; it does not pull torch).
"""

from __future__ import annotations

import math

import pytest
import torch

import edmfast

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")

SHAPE = (2, 3, 8, 8)
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}  # Stable Diffusion's scaled_linear schedule
TOL = 1e-5  # relative L2: float32 UNet and float32 state on both sides; observed 1e-7 .. 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


def _unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def _cond_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _edm_euler(den, noise, sigmas, **kw):
    """edmfast's engine and its float64 reference on the same inputs."""
    with torch.no_grad():
        fast = edmfast.sample(den, noise, sigmas, solver="euler", **kw)
        ref = edmfast.reference.sample(den, noise, sigmas, solver="euler", **kw)
    return fast, ref


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@torch.no_grad()
def test_euler_discrete_scheduler(spacing):
    unet = _unet()
    sched = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        **SD_BETAS,
        timestep_spacing=spacing,
        steps_offset=1,
    )
    sched.set_timesteps(10)
    noise = _noise()
    # the pipeline loop (StableDiffusionPipeline without text)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(eps, t, x).prev_sample

    den = edmfast.DiscreteVPDenoiser(unet, sched.alphas_cumprod, prediction_type="epsilon")
    timesteps = edmfast.discrete_timesteps(10, 1000, spacing=spacing, steps_offset=1)
    assert torch.equal(timesteps, sched.timesteps.round().long())
    sigmas = den.sigmas_for(timesteps)
    torch.testing.assert_close(sigmas.float(), sched.sigmas, rtol=1e-6, atol=0)
    # diffusers starts "leading" runs at sqrt(sigma_0^2 + 1) times the noise, not sigma_0 (its
    # init_noise_sigma); edmfast starts at sigma_0, so the same start needs the noise scaled.
    scale = math.sqrt(1 + 1 / float(sigmas[0]) ** 2) if spacing == "leading" else 1.0
    assert float(sched.init_noise_sigma) == pytest.approx(float(sigmas[0]) * scale, rel=1e-6)
    fast, ref = _edm_euler(den, noise * scale, sigmas)
    assert _rel(ref, x) < TOL
    assert _rel(fast, x) < TOL


@torch.no_grad()
def test_ddim_zero_terminal_snr_v_prediction():
    unet = _unet(seed=2)
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        **SD_BETAS,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    sched.set_timesteps(8)
    noise = _noise(3)
    x = noise * sched.init_noise_sigma  # 1: at SNR 0 the state is the noise itself
    for t in sched.timesteps:
        v = unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(v, t, x, eta=0.0).prev_sample

    # edmfast's own zero-SNR schedule agrees with diffusers' rescale
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - edmfast.rescale_zero_terminal_snr(betas), 0)
    torch.testing.assert_close(abar.float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-7)
    timesteps = edmfast.discrete_timesteps(8, 1000, spacing="trailing")
    assert torch.equal(timesteps, sched.timesteps.long())

    den = edmfast.DiscreteVPDenoiser(unet, sched.alphas_cumprod, prediction_type="v_prediction")
    sigmas = den.sigmas_for(timesteps)
    assert math.isinf(sigmas[0])
    fast, ref = _edm_euler(den, noise, sigmas)
    assert _rel(ref, x) < TOL
    assert _rel(fast, x) < TOL

    eps_den = edmfast.DiscreteVPDenoiser(unet, sched.alphas_cumprod, prediction_type="epsilon")
    with pytest.raises(ValueError, match="epsilon"):
        edmfast.sample(eps_den, noise, sigmas, solver="euler")


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
@torch.no_grad()
def test_cfg_rescale_matches_diffusers(guidance_rescale):
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    unet = _cond_unet()
    sched = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", **SD_BETAS, timestep_spacing="trailing"
    )
    sched.set_timesteps(6)
    noise = _noise(4)
    g = torch.Generator().manual_seed(5)
    text = torch.randn(SHAPE[0], 4, 8, generator=g)  # [B, tokens, cross_attention_dim]
    empty = torch.randn(SHAPE[0], 4, 8, generator=g) * 0.1
    w = 7.5
    # the StableDiffusionPipeline loop: one batched call, uncond first there (order is irrelevant)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(torch.cat([x, x]), t)
        eps_uncond, eps_text = unet(x_in, t, encoder_hidden_states=torch.cat([empty, text])).sample.chunk(2)
        eps = eps_uncond + w * (eps_text - eps_uncond)
        if guidance_rescale > 0:
            eps = rescale_noise_cfg(eps, eps_text, guidance_rescale=guidance_rescale)
        x = sched.step(eps, t, x).prev_sample

    den = edmfast.DiscreteVPDenoiser(unet, sched.alphas_cumprod, prediction_type="epsilon")
    sigmas = den.sigmas_for(sched.timesteps.round().long())
    fast, ref = _edm_euler(
        den,
        noise,
        sigmas,
        cond={"encoder_hidden_states": text},
        uncond={"encoder_hidden_states": empty},
        guidance_scale=w,
        guidance_rescale=guidance_rescale,
    )
    assert _rel(ref, x) < TOL
    assert _rel(fast, x) < TOL


@torch.no_grad()
def test_guidance_rescale_acts():
    """Guards test (c): with phi = 0.7 the result must differ from plain CFG."""
    unet = _cond_unet()
    sched = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", **SD_BETAS
    )
    den = edmfast.DiscreteVPDenoiser(unet, sched.alphas_cumprod)
    sigmas = den.sigmas_for(edmfast.discrete_timesteps(4, 1000, spacing="trailing"))
    g = torch.Generator().manual_seed(5)
    kw = dict(
        cond={"encoder_hidden_states": torch.randn(2, 4, 8, generator=g)},
        uncond={"encoder_hidden_states": torch.randn(2, 4, 8, generator=g)},
        guidance_scale=7.5,
    )
    a = edmfast.sample(den, _noise(), sigmas, solver="euler", **kw)
    b = edmfast.sample(den, _noise(), sigmas, solver="euler", guidance_rescale=0.7, **kw)
    assert _rel(a, b) > 1e-3


# ----------------------------------------------------------------------------- from_diffusers


def _loop(unet, sched, x):
    """A diffusers pipeline's loop without text: scale_model_input, the model, step."""
    for t in sched.timesteps:
        x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


FROM_DIFFUSERS = {
    # SD's EulerDiscrete config: diffusers' default linspace (fractional timesteps), steps_offset=1
    "euler-linspace-sd": lambda: diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", **SD_BETAS, steps_offset=1
    ),
    "euler-karras": lambda: diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", **SD_BETAS, use_karras_sigmas=True, timestep_spacing="leading"
    ),
    "euler-original-sample": lambda: diffusers.EulerDiscreteScheduler(prediction_type="original_sample"),
    "heun-linspace": lambda: diffusers.HeunDiscreteScheduler(beta_schedule="scaled_linear", **SD_BETAS),
    "ddim-sd": lambda: diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", **SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    ),
}


@pytest.mark.parametrize("name", sorted(FROM_DIFFUSERS))
@torch.no_grad()
def test_from_diffusers_matches_scheduler_loop(name):
    import edmfast.diffusers as edd

    unet, sched, n = _unet(seed=6), FROM_DIFFUSERS[name](), 7
    sched.set_timesteps(n)
    latents = _noise(8) * sched.init_noise_sigma
    want = _loop(unet, sched, latents)
    s = edd.schedule(sched, n)
    den = edmfast.DiscreteVPDenoiser.from_diffusers(unet, sched)
    kw = dict(solver=s.solver)
    fast = edmfast.sample(den, latents * s.noise_scale, s.sigmas, **kw) * s.output_scale
    ref = edmfast.reference.sample(den, latents * s.noise_scale, s.sigmas, **kw) * s.output_scale
    assert _rel(ref, want) < TOL
    assert _rel(fast, want) < TOL


@torch.no_grad()
def test_old_recipe_misses_linspace():
    """Guards the test above: truncated integer timesteps and sigma(t_int) (the README's former
    recipe) miss diffusers' default linspace spacing by far more than float32 rounding."""
    unet, sched = _unet(seed=6), FROM_DIFFUSERS["euler-linspace-sd"]()
    sched.set_timesteps(7)
    latents = _noise(8) * sched.init_noise_sigma
    want = _loop(unet, sched, latents)
    den = edmfast.DiscreteVPDenoiser(unet, sched.alphas_cumprod)
    sigmas = den.sigmas_for(sched.timesteps.long())
    got = edmfast.sample(den, latents / float(sigmas[0]), sigmas, solver="euler")
    assert _rel(got, want) > 10 * TOL


def test_linear_interpolation_inverts_np_interp():
    import numpy as np

    sched = FROM_DIFFUSERS["euler-linspace-sd"]()
    t = np.linspace(0, 999, 23, dtype=np.float32).astype(np.float64)
    train = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).sqrt().numpy()
    s = torch.from_numpy(np.interp(t, np.arange(1000), train))
    lin = edmfast.DiscreteVPDenoiser.from_diffusers(_unet(), sched)
    assert lin.interpolation == "linear"
    torch.testing.assert_close(lin.sigma_to_t(s), torch.from_numpy(t), rtol=0, atol=1e-9)
    log = edmfast.DiscreteVPDenoiser(_unet(), sched.alphas_cumprod)  # _sigma_to_t's inverse
    assert float((log.sigma_to_t(s) - torch.from_numpy(t)).abs().max()) > 1e-3
