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

import numpy as np
import pytest
import torch

import edmfast
import edmfast.diffusers as edd
import edmfast.diffusers.schedules as edds

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")

SHAPE = (2, 3, 8, 8)


SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}  # Stable Diffusion's scaled_linear schedule
TOL = 1e-5  # relative L2: float32 UNet and float32 state on both sides; observed 1e-7 .. 1e-6


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these networks are tiny, and on a loaded 2-core machine a second
    spinning OpenMP thread made these tests 3x slower (11 s vs 37 s for the Heun cases)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ----------------------------------------------------------------------------- every scheduler option

BASE = {"DDIMScheduler": {"clip_sample": False}}  # DDIM's default clips x0 (refused below)
BETAS = np.linspace(2e-4, 0.015, 1000)
# Non-default values of every option edmfast claims to reproduce (`edd.CONFIG_OPTIONS`); each case
# runs the scheduler's own loop and edmfast on the same noise. Options that refine another one
# (Karras' range, DDIM's clip range) come with it, and also alone (inert there).
VARIANTS = {
    "EulerDiscreteScheduler": [
        {"num_train_timesteps": 500},
        {"beta_start": 5e-4, "beta_end": 0.015, "beta_schedule": "scaled_linear"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": BETAS},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"prediction_type": "original_sample"},
        {"use_karras_sigmas": True},
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 20.0},
        {"sigma_min": 0.1, "sigma_max": 20.0},
        {"timestep_spacing": "leading", "steps_offset": 1},
        {"timestep_spacing": "trailing", "steps_offset": 1},
        {
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            **SD_BETAS,
            "beta_schedule": "scaled_linear",
        },
        {"final_sigmas_type": "sigma_min"},
    ],
    "HeunDiscreteScheduler": [
        {"num_train_timesteps": 500},
        {"beta_start": 5e-4, "beta_end": 0.015, "beta_schedule": "scaled_linear"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": BETAS},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"use_karras_sigmas": True},
        {"clip_sample_range": 0.5},
        {"timestep_spacing": "leading", "steps_offset": 1},
        {"timestep_spacing": "trailing", "steps_offset": 1},
    ],
    "DDIMScheduler": [
        {"num_train_timesteps": 500},
        {"beta_start": 5e-4, "beta_end": 0.015, "beta_schedule": "scaled_linear"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": BETAS},
        {"set_alpha_to_one": False, "steps_offset": 1},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"dynamic_thresholding_ratio": 0.5, "sample_max_value": 0.5, "clip_sample_range": 0.5},
        {"timestep_spacing": "linspace"},
        {"timestep_spacing": "trailing"},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    ],
    "EDMEulerScheduler": [
        {"sigma_min": 0.01, "sigma_max": 40.0, "rho": 5.0},
        {"sigma_data": 1.0},
        {"sigma_schedule": "exponential"},
        {"num_train_timesteps": 500},
        {"prediction_type": "v_prediction"},
        {"final_sigmas_type": "sigma_min"},
    ],
}
# One value outside `edd.CONFIG_OPTIONS` for each restricted option: a valid diffusers value that
# changes its math where one exists, else one diffusers itself rejects.
REFUSED = {
    "EulerDiscreteScheduler": {
        "prediction_type": "flow_prediction",
        "interpolation_type": "log_linear",
        "use_exponential_sigmas": True,
        "use_beta_sigmas": True,
        "timestep_spacing": "uniform",
        "timestep_type": "continuous",
        "final_sigmas_type": "sigma_max",
    },
    "HeunDiscreteScheduler": {
        "prediction_type": "original_sample",
        "use_exponential_sigmas": True,
        "use_beta_sigmas": True,
        "clip_sample": True,
        "timestep_spacing": "uniform",
    },
    "DDIMScheduler": {
        "clip_sample": True,
        "prediction_type": "original_sample",
        "thresholding": True,
        "timestep_spacing": "uniform",
    },
    "EDMEulerScheduler": {
        "sigma_schedule": "linear",
        "prediction_type": "sample",
        "final_sigmas_type": "sigma_max",
    },
}
CASES = [(name, i) for name in sorted(VARIANTS) for i in range(len(VARIANTS[name]))]


@pytest.mark.parametrize(
    "name", [n for n in edd.SCHEDULERS if n not in edd.flow.SCHEDULERS]
)  # flow: test_flow
def test_every_scheduler_option_is_audited(name):
    """The table names every constructor option of diffusers 0.42.1's scheduler, and the cases
    above cover each: every value edmfast claims, and one refused value per restricted option."""
    cls = getattr(diffusers, name)
    table = edd.CONFIG_OPTIONS[name]
    assert set(table) == set(edds._defaults(cls)), f"diffusers {diffusers.__version__}: audit {name}"
    defaults = edds._defaults(cls)
    tried: dict = {}
    for kw in VARIANTS[name]:
        for key, value in {**BASE.get(name, {}), **kw}.items():
            tried.setdefault(key, []).append(value)
    for key, ok in table.items():
        new = [v for v in tried.get(key, []) if not edds._same(v, defaults[key])]
        if ok is None:
            assert new, f"{key}: no case with a value other than its default"
        else:
            assert {v for v in ok if not edds._same(v, defaults[key])} <= set(new), key
    assert set(REFUSED[name]) == {k for k, ok in table.items() if ok is not None}


@pytest.mark.parametrize("name,key", [(n, k) for n in sorted(REFUSED) for k in sorted(REFUSED[n])])
def test_unreproduced_option_is_refused_by_name(name, key):
    value = REFUSED[name][key]
    sched = getattr(diffusers, name)(**BASE.get(name, {}))
    sched.register_to_config(**{key: value})  # as a config file would (some constructors check)
    with pytest.raises(ValueError, match=rf"{name} with {key}={value!r} is not supported"):
        edd.schedule(sched, 4)
    with pytest.raises(ValueError, match=rf"{key}={value!r}"):
        edd.denoiser(_unet(), sched)


def test_an_option_missing_from_the_table_is_accepted_at_its_default_only(monkeypatch):
    """A newer diffusers' option edmfast has not audited: refused unless it has its default."""
    table = {k: v for k, v in edd.CONFIG_OPTIONS["EulerDiscreteScheduler"].items() if k != "steps_offset"}
    monkeypatch.setitem(edd.CONFIG_OPTIONS, "EulerDiscreteScheduler", table)
    edd.schedule(diffusers.EulerDiscreteScheduler(steps_offset=0), 4)
    with pytest.raises(ValueError, match="steps_offset=1"):
        edd.schedule(diffusers.EulerDiscreteScheduler(steps_offset=1), 4)


def test_zero_snr_euler_with_a_falling_sigma_is_refused_by_name():
    """EulerDiscrete's 2^-24 stand-in for abar_T = 0 lies above abar_998 for its default betas."""
    sched = diffusers.EulerDiscreteScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert sched.alphas_cumprod[-1] > sched.alphas_cumprod[-2]
    with pytest.raises(ValueError, match="EulerDiscreteScheduler with rescale_betas_zero_snr=True"):
        edd.schedule(sched, 4)


def _ddim_between_announced(unet, sched, x):
    """DDIM (eta 0) stepping between the announced timesteps, float64 (see the module docstring
    of edmfast.diffusers: diffusers steps to t - T // N instead)."""
    abar = sched.alphas_cumprod.double()
    ts = sched.timesteps.tolist()
    x = x.double()
    for i, t in enumerate(ts):
        a = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else sched.final_alpha_cumprod.double()
        eps = unet(x.float(), t).sample.double()
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@pytest.mark.parametrize("name,i", CASES, ids=[f"{n}-{i}" for n, i in CASES])
@torch.no_grad()
def test_every_reproduced_option_matches_the_scheduler(name, i):
    kw = {**BASE.get(name, {}), **VARIANTS[name][i]}
    sched = getattr(diffusers, name)(**kw)
    unet, n = _unet(seed=6), 4
    sched.set_timesteps(n)
    latents = _noise(8) * sched.init_noise_sigma
    ddim_linspace = name == "DDIMScheduler" and kw.get("timestep_spacing") == "linspace"
    want = _ddim_between_announced(unet, sched, latents) if ddim_linspace else _loop(unet, sched, latents)
    s = edd.schedule(sched, n)
    den = edd.denoiser(unet, sched)
    noise = latents * s.noise_scale
    got = edmfast.sample(den, noise, s.sigmas, solver=s.solver) * s.output_scale
    ref = edmfast.reference.sample(den, noise.double(), s.sigmas, solver=s.solver) * s.output_scale
    assert _rel(got, ref) < TOL, kw
    # diffusers' own float32 arithmetic cancels where sigma is large (zero-SNR Euler starts at
    # 4096, squaredcos at 2e4): there it is 1e-4 from float64; edmfast stays within its error of it
    assert _rel(got, want) < max(TOL, 2 * _rel(want, ref)), kw
