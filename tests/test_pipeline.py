"""`edmfast.diffusers.accelerate` against the stock diffusers pipelines.

Tiny random-weight Stable Diffusion and SDXL pipelines are built here (UNet, CLIP text encoders
with an offline byte-level tokenizer, VAE; no downloads). Each test runs the stock pipeline,
then the same pipeline after ``accelerate`` on the same generator, and compares the results.
Skipped without diffusers / transformers (``pip install diffusers transformers``).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import threading

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import edmfast.diffusers as edd  # noqa: E402

TOL = 1e-5  # relative L2, float32 on both sides


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these networks are tiny, and on a loaded 2-core machine a second
    spinning OpenMP thread made these tests 3x slower (11 s vs 37 s for the Heun cases)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SD_SCHED = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
PROMPT = ["a photo of a cat", "an astronaut"]


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP's byte-to-unicode table: a tokenizer vocabulary covering every byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    chars = _byte_chars()
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=8)


def _text_config(**kw):
    return transformers.CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=514,
        max_position_embeddings=8,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **kw,
    )


def _vae():
    return diffusers.AutoencoderKL(
        block_out_channels=[8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=8,
    ).eval()


def _unet(**kw):
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **kw,
    ).eval()


@pytest.fixture(scope="module")
def sd(tokenizer):
    torch.manual_seed(0)
    return diffusers.StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=transformers.CLIPTextModel(_text_config()).eval(),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=16),
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHED),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def sdxl(tokenizer):
    torch.manual_seed(1)
    unet = _unet(
        cross_attention_dim=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 8,
    )
    return diffusers.StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=transformers.CLIPTextModel(_text_config()).eval(),
        text_encoder_2=transformers.CLIPTextModelWithProjection(_text_config(projection_dim=8)).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHED),
    )


def _copy(pipe, scheduler):
    """A stock and an accelerated pipeline sharing the components, with this scheduler."""
    comps = {**pipe.components, "scheduler": scheduler}
    stock = type(pipe)(**comps)
    fast = edd.accelerate(type(pipe)(**comps))
    return stock, fast


def _both(pipe, scheduler, **kw):
    stock, fast = _copy(pipe, scheduler)
    # 5 of 1000 steps: DDIM's t - T // N is then the next announced timestep for every spacing
    kw = {"prompt": PROMPT, "num_inference_steps": 5, "output_type": "latent", "height": 8, "width": 8, **kw}
    a = stock(generator=torch.Generator().manual_seed(7), **kw).images
    b = fast(generator=torch.Generator().manual_seed(7), **kw).images
    return a, b


EULER = diffusers.EulerDiscreteScheduler
SCHEDULERS = {
    "euler-linspace": lambda: EULER(**SD_SCHED),
    "euler-leading-offset": lambda: EULER(**SD_SCHED, timestep_spacing="leading", steps_offset=1),
    "euler-trailing": lambda: EULER(**SD_SCHED, timestep_spacing="trailing"),
    "euler-karras": lambda: EULER(**SD_SCHED, use_karras_sigmas=True),
    "euler-sigma-min-v": lambda: EULER(
        **SD_SCHED, final_sigmas_type="sigma_min", prediction_type="v_prediction"
    ),
    "euler-zero-snr-v": lambda: EULER(
        **SD_SCHED, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
    ),
    "heun": lambda: diffusers.HeunDiscreteScheduler(**SD_SCHED),
    "heun-karras": lambda: diffusers.HeunDiscreteScheduler(**SD_SCHED, use_karras_sigmas=True),
    "ddim-sd": lambda: diffusers.DDIMScheduler(
        **SD_SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    ),
    "ddim-alpha-one": lambda: diffusers.DDIMScheduler(
        **SD_SCHED, clip_sample=False, set_alpha_to_one=True, steps_offset=1
    ),
    "ddim-zero-snr-v": lambda: diffusers.DDIMScheduler(
        **SD_SCHED,
        clip_sample=False,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    ),
    "ddim-sample": lambda: diffusers.DDIMScheduler(**SD_SCHED, clip_sample=False, prediction_type="sample"),
    "edm-euler": lambda: diffusers.EDMEulerScheduler(),
    "edm-euler-exp-v": lambda: diffusers.EDMEulerScheduler(
        sigma_schedule="exponential", prediction_type="v_prediction"
    ),
    "edm-euler-sigma-min": lambda: diffusers.EDMEulerScheduler(final_sigmas_type="sigma_min"),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_sd_matches_stock(sd, name):
    a, b = _both(sd, SCHEDULERS[name](), guidance_scale=7.5)
    # observed 0.7e-6 .. 4e-6; diffusers' own float32 arithmetic loses more where it cancels:
    # x ~ 4096 noise at EulerDiscrete's zero-SNR start, eps = (x - sqrt(abar) x0) / sqrt(1 - abar)
    # from a sample prediction near t = 0 (both 2.2e-5)
    tol = 5e-5 if name in ("euler-zero-snr-v", "ddim-sample") else TOL
    assert _rel(b, a) < tol


def test_sd_guidance_rescale_and_images_per_prompt(sd):
    a, b = _both(
        sd, SCHEDULERS["euler-trailing"](), guidance_scale=5.0, guidance_rescale=0.7, num_images_per_prompt=2
    )
    assert a.shape[0] == 4
    assert _rel(b, a) < TOL
    c, _ = _both(sd, SCHEDULERS["euler-trailing"](), guidance_scale=5.0, num_images_per_prompt=2)
    assert _rel(c, a) > 1e-3  # the rescale acts


def test_sd_no_guidance_and_decoded_output(sd):
    a, b = _both(sd, SCHEDULERS["euler-leading-offset"](), guidance_scale=1.0, output_type="np")
    assert a.shape == (2, 8, 8, 3)
    assert _rel(b, a) < TOL


def test_sd_given_latents_and_per_call_guidance(sd):
    stock, fast = _copy(sd, SCHEDULERS["euler-karras"]())
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for w in (3.0, 9.0):  # one cached Sampler serves both values
        kw = dict(
            prompt=PROMPT, num_inference_steps=5, guidance_scale=w, output_type="latent", latents=latents
        )
        assert _rel(fast(**kw).images, stock(**kw).images) < TOL
    assert len(fast._edmfast.samplers) == 1


@pytest.mark.parametrize("name", ["euler-linspace", "ddim-sd", "heun"])
def test_sdxl_matches_stock(sdxl, name):
    a, b = _both(sdxl, SCHEDULERS[name](), guidance_scale=6.0, guidance_rescale=0.5)
    assert _rel(b, a) < TOL


def test_sdxl_no_guidance(sdxl):
    a, b = _both(sdxl, SCHEDULERS["euler-trailing"](), guidance_scale=1.0)
    assert _rel(b, a) < TOL


def _ddim_reference(unet, abar, timesteps, x, final_abar, text):
    """DDIM (eta 0, epsilon) in float64 between the announced timesteps; CFG off."""
    x = x.double()
    abar = abar.double()
    for i, t in enumerate(timesteps):
        a = abar[t]
        a_prev = (
            abar[timesteps[i + 1]]
            if i + 1 < len(timesteps)
            else torch.tensor(final_abar, dtype=torch.float64)
        )
        eps = unet(x.float(), t, encoder_hidden_states=text).sample.double()
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def test_ddim_trailing_follows_the_math(sd):
    """diffusers steps to t - T // N; at 30 trailing steps the announced timesteps are 33 or 34
    apart, so it leaves them (here 7 steps: 142 or 143 apart, T // N = 142). edmfast integrates
    between the announced timesteps."""
    sched = diffusers.DDIMScheduler(
        **SD_SCHED, clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True
    )
    stock, fast = _copy(sd, sched)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    kw = dict(
        prompt=PROMPT[:1], num_inference_steps=7, guidance_scale=1.0, output_type="latent", latents=latents
    )
    got = fast(**kw).images
    theirs = stock(**kw).images
    text = sd.encode_prompt(PROMPT[:1], "cpu", 1, False)[0]
    sched.set_timesteps(7)
    ref = _ddim_reference(sd.unet, sched.alphas_cumprod, sched.timesteps.tolist(), latents, 1.0, text)
    assert _rel(got, ref) < TOL
    assert _rel(theirs, ref) > 10 * TOL  # diffusers' own result is the different one


def test_schedule_equals_scheduler():
    for name in sorted(SCHEDULERS):
        sched = SCHEDULERS[name]()
        for n in (1, 7, 20):
            s = edd.schedule(sched, n)
            sched.set_timesteps(n)
            if isinstance(sched, diffusers.DDIMScheduler):
                assert torch.equal(s.timesteps, sched.timesteps.double()), name
                continue
            theirs = sched.sigmas.double()
            if isinstance(sched, diffusers.HeunDiscreteScheduler):
                theirs = torch.cat([theirs[:1], theirs[1:-1:2], theirs[-1:]])
            if theirs[-1] == theirs[-2]:  # a final dt = 0 step (sigma_min after t = 0)
                theirs = theirs[:-1]
            # float32 storage (EDMEuler's exponential ramp is even a float32 linspace)
            torch.testing.assert_close(s.sigmas, theirs, rtol=1e-6, atol=0, msg=name)
            assert torch.equal(edd.sigmas(sched, n), s.sigmas)
            assert s.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6), name
            assert s.sigmas.dtype == torch.float64


def test_schedule_ddim_final_level():
    one = edd.schedule(SCHEDULERS["ddim-alpha-one"](), 10)
    sd = edd.schedule(SCHEDULERS["ddim-sd"](), 10)
    assert one.sigmas[-1] == 0 and one.output_scale == 1.0
    abar0 = float(SCHEDULERS["ddim-sd"]().alphas_cumprod[0])
    assert float(sd.sigmas[-1]) == pytest.approx(math.sqrt((1 - abar0) / abar0), rel=1e-12)
    assert sd.output_scale == pytest.approx(math.sqrt(abar0), rel=1e-12)
    assert math.isinf(edd.schedule(SCHEDULERS["ddim-zero-snr-v"](), 10).sigmas[0])


def test_refusals(sd):
    with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
        edd.schedule(diffusers.LMSDiscreteScheduler(**SD_SCHED), 10)
    with pytest.raises(ValueError, match="clip_sample"):
        edd.schedule(diffusers.DDIMScheduler(**SD_SCHED), 10)
    with pytest.raises(ValueError, match="use_exponential_sigmas"):
        edd.schedule(EULER(**SD_SCHED, use_exponential_sigmas=True), 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        edd.sigmas(EULER(**SD_SCHED), 0)
    with pytest.raises(TypeError, match="pipe must be"):
        edd.accelerate(object())
    _, fast = _copy(sd, diffusers.DPMSolverMultistepScheduler(**SD_SCHED))
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        fast(PROMPT, num_inference_steps=2, output_type="latent")
    _, fast = _copy(sd, SCHEDULERS["ddim-sd"]())
    with pytest.raises(ValueError, match="eta"):
        fast(PROMPT, num_inference_steps=2, eta=0.5, output_type="latent")
    with pytest.raises(
        ValueError, match="timesteps"
    ):  # positional: (prompt, height, width, steps, timesteps)
        fast(PROMPT, 8, 8, 2, [999, 500], output_type="latent")
    for kw, what in (
        ({"timesteps": [999, 500]}, "timesteps"),
        ({"callback_on_step_end": lambda p, i, t, kw: {"latents": kw["latents"][:1]}}, "returned latents"),
        (
            {"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["add_time_ids"]},
            "tensor",
        ),
    ):
        with pytest.raises(ValueError, match=what):
            fast(PROMPT, num_inference_steps=2, output_type="latent", **kw)
    # the pipe is usable again after a refused call, with its own scheduler and UNet
    assert isinstance(fast.scheduler, diffusers.DDIMScheduler)
    assert isinstance(fast.unet, diffusers.UNet2DConditionModel)


def test_heun_clip_sample_is_refused(sd, sdxl):
    """Heun's clip_sample clamps x0 at every evaluation, which edmfast does not: refused by name.
    SDXL's constructor keeps the option; SD's resets it, but it can be set afterwards."""
    kw = dict(prompt=PROMPT, num_inference_steps=3, output_type="latent", height=8, width=8)
    heun = diffusers.HeunDiscreteScheduler(**SD_SCHED, clip_sample=True, clip_sample_range=0.5)
    stock, fast = _copy(sdxl, heun)  # they share the scheduler
    assert fast.scheduler.config.clip_sample
    clipped = stock(generator=torch.Generator().manual_seed(7), **kw).images
    with pytest.raises(ValueError, match="HeunDiscreteScheduler with clip_sample=True is not supported"):
        fast(generator=torch.Generator().manual_seed(7), **kw)
    heun.register_to_config(clip_sample=False)
    plain = stock(generator=torch.Generator().manual_seed(7), **kw).images
    assert _rel(plain, clipped) > 0.1  # the option changes the result a lot
    assert _rel(fast(generator=torch.Generator().manual_seed(7), **kw).images, plain) < TOL

    stock, fast = _copy(sd, diffusers.HeunDiscreteScheduler(**SD_SCHED, clip_sample=True))
    assert not fast.scheduler.config.clip_sample  # StableDiffusionPipeline.__init__ reset it
    fast.scheduler.register_to_config(clip_sample=True)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler with clip_sample=True is not supported"):
        fast(**kw)


def test_accelerate_is_idempotent(sd):
    _, fast = _copy(sd, SCHEDULERS["euler-linspace"]())
    cls = type(fast)
    assert edd.accelerate(fast) is fast and type(fast) is cls
    sig = inspect.signature(cls.__call__)
    assert sig == inspect.signature(diffusers.StableDiffusionPipeline.__call__)  # the stock signature
    assert isinstance(fast, diffusers.StableDiffusionPipeline)


@pytest.mark.parametrize("name", ["euler-leading-offset", "ddim-sd"])
def test_callback_on_step_end(sd, name):
    """The accelerated loop reports the latents after each step as the stock loop does (DDIM's in
    VP scaling), with the scheduler's timesteps; the result is unchanged by the callback."""
    seen: dict = {"stock": [], "fast": []}

    def record(key):
        def cb(pipe, i, t, kw):
            seen[key].append((i, float(t), kw["latents"].clone()))
            return {}

        return cb

    stock, fast = _copy(sd, SCHEDULERS[name]())
    kw = dict(
        prompt=PROMPT, num_inference_steps=4, guidance_scale=4.0, output_type="latent", height=8, width=8
    )
    a = stock(generator=torch.Generator().manual_seed(2), callback_on_step_end=record("stock"), **kw).images
    b = fast(generator=torch.Generator().manual_seed(2), callback_on_step_end=record("fast"), **kw).images
    c = fast(generator=torch.Generator().manual_seed(2), **kw).images
    assert torch.equal(b, c)
    assert _rel(b, a) < TOL
    assert [(i, t) for i, t, _ in seen["fast"]] == [(i, t) for i, t, _ in seen["stock"]]
    for (_, _, x), (_, _, y) in zip(seen["fast"], seen["stock"], strict=True):
        assert _rel(x, y) < TOL


# ----------------------------------------------------------------------------- pipe.to, deepcopy, threads


def _own(pipe, scheduler):
    """Like _copy, on a deep copy of the components (a test that changes them keeps the fixture)."""
    comps = {**copy.deepcopy(pipe.components), "scheduler": scheduler}
    return type(pipe)(**comps), edd.accelerate(type(pipe)(**comps))


def _kw(**kw):
    return {
        "prompt": PROMPT,
        "num_inference_steps": 3,
        "output_type": "latent",
        "height": 8,
        "width": 8,
        **kw,
    }


def _seeded(pipe, **kw):
    return pipe(generator=torch.Generator().manual_seed(7), **_kw(**kw)).images


def test_sampler_follows_pipe_to_dtype(sd):
    stock, fast = _own(sd, SCHEDULERS["euler-trailing"]())  # they share the components
    a32 = _seeded(fast, guidance_scale=5.0)
    assert _rel(a32, _seeded(stock, guidance_scale=5.0)) < TOL
    fast.to(torch.bfloat16)  # after an accelerated call: the cached Sampler was float32's
    b16 = _seeded(fast, guidance_scale=5.0)
    assert b16.dtype == torch.bfloat16
    # stock rounds its state to bf16 every step, edmfast keeps float32 (README: about 5e-3)
    assert _rel(b16.float(), _seeded(stock, guidance_scale=5.0).float()) < 3e-2
    fast.to(torch.float32)  # the float32 Sampler again, on the weights rounded to bf16 and back
    assert _rel(_seeded(fast, guidance_scale=5.0), _seeded(stock, guidance_scale=5.0)) < TOL
    assert len(fast._edmfast.samplers) == 2  # one per UNet dtype
    fast.to(torch.float64)  # stock runs float64; the fused engine does not: refused, named
    with pytest.raises(TypeError, match="UNet is torch.float64"):
        _seeded(fast, guidance_scale=5.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_follows_pipe_to_device(sd):
    stock, fast = _own(sd, SCHEDULERS["ddim-sd"]())
    a = _seeded(fast, guidance_scale=5.0)
    fast.to("cuda")
    b = _seeded(fast, guidance_scale=5.0)
    assert b.device.type == "cuda"
    assert _rel(b.cpu(), _seeded(stock, guidance_scale=5.0).cpu()) < 1e-4  # cuDNN vs CPU convolutions
    fast.to("cpu")
    assert torch.equal(_seeded(fast, guidance_scale=5.0), a)


def test_deepcopy_after_an_accelerated_call(sd):
    _, fast = _own(sd, SCHEDULERS["ddim-sd"]())
    a = _seeded(fast, guidance_scale=4.0)
    twin = copy.deepcopy(fast)
    assert type(twin) is type(fast) and twin.unet is not fast.unet
    assert twin._edmfast is not fast._edmfast and not twin._edmfast.samplers
    assert torch.equal(_seeded(twin, guidance_scale=4.0), a)  # accelerated, same weights
    with torch.no_grad():
        for p in twin.unet.parameters():
            p.mul_(0.5)
    assert _rel(_seeded(twin, guidance_scale=4.0), a) > 1e-3  # its own UNet ...
    assert torch.equal(_seeded(fast, guidance_scale=4.0), a)  # ... the original's unchanged
    assert len(fast._edmfast.samplers) == 1 and len(twin._edmfast.samplers) == 1


def test_calls_from_two_threads_run_one_at_a_time(sd):
    """A second thread's call waits for the running one and gets its own correct result (the
    stock __call__ keeps per-call values on the pipe); other threads see the real components."""
    _, fast = _copy(sd, SCHEDULERS["euler-leading-offset"]())
    kw_a, kw_b = (
        dict(guidance_scale=3.0, num_inference_steps=4),
        dict(guidance_scale=8.0, guidance_rescale=0.5),
    )
    want_a, want_b = _seeded(fast, **kw_a), _seeded(fast, **kw_b)
    a_inside, b_calling = threading.Event(), threading.Event()
    order: list[str] = []
    seen: dict = {}
    results: dict = {}

    def cb_a(pipe, i, t, kw):
        order.append("a")
        if i == 0:
            seen["own"] = type(pipe.unet).__name__
            other = threading.Thread(target=lambda: seen.update(other=type(fast.unet).__name__))
            other.start()
            other.join(30)
            a_inside.set()
            assert b_calling.wait(60)
            # B is about to call: give it time to reach the pipe (the result does not depend on it)
            threading.Event().wait(0.2)
        return {}

    def cb_b(pipe, i, t, kw):
        order.append("b")
        return {}

    def run(name, kw, cb, before=None):
        try:
            if before is not None:
                before()
            results[name] = _seeded(fast, callback_on_step_end=cb, **kw)
        except BaseException as e:  # reported below, in the test's thread
            results[name] = e

    def b_starts():
        assert a_inside.wait(60)
        b_calling.set()

    ta = threading.Thread(target=run, args=("a", kw_a, cb_a))
    tb = threading.Thread(target=run, args=("b", kw_b, cb_b, b_starts))
    ta.start()
    tb.start()
    ta.join(300)
    tb.join(300)
    assert not ta.is_alive() and not tb.is_alive()
    for name in "ab":
        assert isinstance(results[name], torch.Tensor), results[name]
    assert torch.equal(results["a"], want_a) and torch.equal(results["b"], want_b)
    assert order == ["a"] * 4 + ["b"] * 3
    assert seen == {"own": "_UNetProxy", "other": "UNet2DConditionModel"}


def test_pipes_sharing_a_scheduler_in_two_threads(sd):
    """Two accelerated pipes with one scheduler object, called at once: each call keeps the
    timesteps it set (its callback reports them) and gets its own result."""
    sched = SCHEDULERS["ddim-sd"]()
    _, one = _copy(sd, sched)
    _, two = _copy(sd, sched)
    assert one.scheduler is two.scheduler
    jobs = {"one": (one, dict(num_inference_steps=2)), "two": (two, dict(num_inference_steps=5))}

    def call(pipe, kw):
        ts: list[float] = []
        out = _seeded(pipe, callback_on_step_end=lambda p, i, t, d: ts.append(float(t)) or {}, **kw)
        return out, ts

    want = {name: call(pipe, kw) for name, (pipe, kw) in jobs.items()}
    got: dict = {name: [] for name in jobs}

    def run(name):
        try:
            for _ in range(3):
                got[name].append(call(*jobs[name]))
        except BaseException as e:  # reported below, in the test's thread
            got[name].append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for name in jobs:
        assert len(got[name]) == 3, got[name]
        for out, ts in got[name]:
            assert ts == want[name][1] and torch.equal(out, want[name][0]), name


def test_reentrant_call_is_refused_and_the_pipe_recovers(sd):
    _, fast = _copy(sd, SCHEDULERS["euler-leading-offset"]())

    def nested(pipe, i, t, kw):
        pipe(**_kw())
        return {}

    with pytest.raises(RuntimeError, match="inside its own call"):
        _seeded(fast, callback_on_step_end=nested)
    assert isinstance(fast.unet, diffusers.UNet2DConditionModel)
    _seeded(fast)  # usable again


# ----------------------------------------------------------------------------- flow matching: SD3, FLUX

FM = diffusers.FlowMatchEulerDiscreteScheduler
NO_TEXT = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}


def _flow_vae():
    return diffusers.AutoencoderKL(
        block_out_channels=[8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=8,
        shift_factor=0.06,
        scaling_factor=1.5,
    ).eval()


@pytest.fixture(scope="module")
def sd3():
    """A 1-layer SD3 transformer (12k parameters) and a tiny VAE; prompts come as embeddings."""
    torch.manual_seed(2)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FM(shift=3.0),
        vae=_flow_vae(),
        text_encoder_3=None,
        tokenizer_3=None,
        **NO_TEXT,
    )


@pytest.fixture(scope="module")
def flux():
    """A FLUX transformer with one double and one single block (24k parameters), guidance embedding."""
    torch.manual_seed(3)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    sched = FM(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return diffusers.FluxPipeline(transformer=transformer, scheduler=sched, vae=_flow_vae(), **NO_TEXT)


def _embeds(batch: int = 2, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(batch, 5, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(batch, 8, generator=g),
    }


def _negative(batch: int = 2) -> dict:
    return {f"negative_{k}": v for k, v in _embeds(batch, seed=6).items()}


def _flow_both(pipe, scheduler, seed: int = 7, **kw):
    """Stock and accelerated on the same generator (and global RNG: stochastic sampling uses it)."""
    stock, fast = _copy(pipe, scheduler)
    kw = {"num_inference_steps": 5, "output_type": "latent", "height": 8, "width": 8, **_embeds(), **kw}
    torch.manual_seed(seed)
    a = stock(generator=torch.Generator().manual_seed(seed), **kw).images
    torch.manual_seed(seed)
    b = fast(generator=torch.Generator().manual_seed(seed), **kw).images
    return a, b, stock, fast


FLOW_PIPE_SCHEDULERS = {
    "euler-shift": lambda: FM(shift=3.0),
    "euler-karras": lambda: FM(shift=3.0, use_karras_sigmas=True),
    "euler-terminal": lambda: FM(shift=3.0, shift_terminal=0.05),
    "euler-dynamic": lambda: FM(use_dynamic_shifting=True),
    "euler-stochastic": lambda: FM(shift=3.0, stochastic_sampling=True),
    "heun": lambda: diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0),
}


@pytest.mark.parametrize("name", sorted(FLOW_PIPE_SCHEDULERS))
def test_sd3_matches_stock(sd3, name):
    """SD3 with CFG batched as the stock pipeline batches it; num_timesteps reads the stock value."""
    a, b, stock, fast = _flow_both(sd3, FLOW_PIPE_SCHEDULERS[name](), guidance_scale=5.0, **_negative())
    assert _rel(b, a) < TOL  # observed 2e-7 .. 8e-7
    assert fast.num_timesteps == stock.num_timesteps == (9 if name == "heun" else 5)
    assert _rel(a, _flow_both(sd3, FLOW_PIPE_SCHEDULERS[name](), guidance_scale=1.5, **_negative())[0]) > 1e-3


def test_sd3_no_guidance_mu_custom_sigmas_and_decoded_output(sd3):
    a, b, *_ = _flow_both(sd3, FM(shift=3.0), guidance_scale=1.0, output_type="np")
    assert a.shape == (2, 8, 8, 3) and _rel(b, a) < TOL
    a, b, *_ = _flow_both(sd3, FM(use_dynamic_shifting=True), guidance_scale=1.0, mu=1.3)
    assert _rel(b, a) < TOL
    sig = [1.0, 0.8, 0.5, 0.3, 0.1]
    a, b, *_ = _flow_both(sd3, FM(shift=2.0), guidance_scale=4.0, sigmas=sig, **_negative())
    assert _rel(b, a) < TOL


@pytest.mark.parametrize("name", ["euler-dynamic", "euler-stochastic", "heun"])
def test_flux_matches_stock(flux, name):
    """FLUX: packed latents, the guidance embedding, timestep / 1000, its linspace sigmas and mu."""
    sched = FLOW_PIPE_SCHEDULERS[name]()
    if name == "heun":  # FlowMatchHeun takes no custom sigmas: FLUX's call refuses it, as stock does
        stock, fast = _copy(flux, sched)
        kw = {"num_inference_steps": 4, "output_type": "latent", "height": 8, "width": 8, **_embeds()}
        with pytest.raises(ValueError, match="sigmas"):
            stock(**kw)
        with pytest.raises(ValueError, match="sigmas"):
            fast(**kw)
        return
    a, b, stock, fast = _flow_both(flux, sched, guidance_scale=3.5)
    assert a.shape == (2, 16, 16)  # packed: 4 x 4 patches of 4 channels x 2 x 2
    assert _rel(b, a) < TOL  # observed 1e-7
    assert fast.num_timesteps == stock.num_timesteps == 5
    c, *_ = _flow_both(flux, FLOW_PIPE_SCHEDULERS[name](), guidance_scale=6.0)
    assert _rel(c, a) > 1e-4  # the guidance embedding acts


def test_flux_true_cfg_decoded_and_given_latents(flux):
    """True CFG (a second, negative, transformer call in stock) runs batched on the engine."""
    a, b, *_ = _flow_both(flux, FM(use_dynamic_shifting=True), true_cfg_scale=4.0, **_negative())
    assert _rel(b, a) < TOL
    plain, *_ = _flow_both(flux, FM(use_dynamic_shifting=True))
    assert _rel(plain, a) > 1e-3
    a, b, *_ = _flow_both(flux, FM(use_dynamic_shifting=True), output_type="np")
    assert a.shape == (2, 8, 8, 3) and _rel(b, a) < TOL
    latents = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(9))
    a, b, *_ = _flow_both(flux, FM(use_dynamic_shifting=True), latents=latents, sigmas=[1.0, 0.7, 0.4])
    assert _rel(b, a) < TOL


def test_flux_follows_pipe_to_bfloat16(flux):
    stock, fast = _own(flux, FM(use_dynamic_shifting=True))
    kw = {"num_inference_steps": 4, "output_type": "latent", "height": 8, "width": 8, **_embeds()}
    a = fast(generator=torch.Generator().manual_seed(1), **kw).images
    fast.to(torch.bfloat16)
    kw16 = {**kw, **{k: v.bfloat16() for k, v in _embeds().items()}}
    b = fast(generator=torch.Generator().manual_seed(1), **kw16).images
    assert b.dtype == torch.bfloat16
    c = stock(generator=torch.Generator().manual_seed(1), **kw16).images  # the same bf16 weights
    # stock rounds its state (and timestep / 1000) to bf16 every step, edmfast keeps a float32 state
    assert _rel(b.float(), c.float()) < 3e-2 and _rel(b.float(), a) < 5e-2


def test_flow_refusals(sd3, flux):
    _, fast = _copy(sd3, FM(shift=3.0))
    kw = {"num_inference_steps": 2, "output_type": "latent", "height": 8, "width": 8, **_embeds()}
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        fast(guidance_scale=1.0, skip_guidance_layers=[0], **kw)
    with pytest.raises(ValueError, match="ip_adapter_image_embeds"):
        fast(guidance_scale=1.0, ip_adapter_image_embeds=[torch.zeros(1)], **kw)
    with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler"):
        _, heun = _copy(sd3, diffusers.FlowMatchHeunDiscreteScheduler())
        heun(guidance_scale=1.0, callback_on_step_end=lambda *a: {}, **kw)
    _, wrong = _copy(sd3, diffusers.EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline with EulerDiscreteScheduler"):
        wrong(guidance_scale=1.0, **kw)
    stock_sd = _copy(sd3, FM())[1]
    assert isinstance(stock_sd.transformer, diffusers.SD3Transformer2DModel)  # usable, its own again
    _, fast = _copy(flux, FM(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="negative_ip_adapter_image_embeds"):
        fast(negative_ip_adapter_image_embeds=[torch.zeros(1)], **kw)
