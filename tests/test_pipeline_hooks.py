"""``callback_on_step_end`` on accelerated pipelines against the stock ones (issue 22, items 2-3).

The callback runs on the engine's ``on_step_end`` hook after each step: the latents it sees are the
stock loop's, edits in place and returned latents change the course of the loop, ``pipe._interrupt``
stops it, guidance changes act from the next step, and ``pipe.num_timesteps`` is the stock value.
Each case runs the stock pipeline and the accelerated one with the same callback and generator.
The tiny pipelines come from `tests.test_pipeline`.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")

# the tiny pipelines' fixtures (sd, sdxl, sd3, flux; tokenizer for the first two) are used by name
from tests.test_pipeline import (  # noqa: E402, F401
    FM,
    PROMPT,
    SCHEDULERS,
    TOL,
    _copy,
    _embeds,
    _negative,
    _rel,
    flux,
    sd,
    sd3,
    sdxl,
    tokenizer,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sd_kw(**kw):
    return {
        "prompt": PROMPT,
        "num_inference_steps": 5,
        "output_type": "latent",
        "height": 8,
        "width": 8,
        **kw,
    }


def _flow_kw(**kw):
    return {"num_inference_steps": 5, "output_type": "latent", "height": 8, "width": 8, **_embeds(), **kw}


def _run(pipe, scheduler, callback, **kw):
    """(stock result, accelerated result, what each callback saw: (i, t, latents, num_timesteps))."""
    stock, fast = _copy(pipe, scheduler)
    seen: dict = {"stock": [], "fast": []}
    out = {}
    for key, p in (("stock", stock), ("fast", fast)):

        def cb(pipe, i, t, kwargs, key=key):
            seen[key].append((i, float(t), kwargs["latents"].clone(), pipe.num_timesteps))
            return callback(pipe, i, t, kwargs)

        torch.manual_seed(11)  # stochastic sampling draws from the global RNG
        out[key] = p(generator=torch.Generator().manual_seed(7), callback_on_step_end=cb, **kw).images
        out[key + "_pipe"] = p
    return out, seen


def _same_course(seen):
    assert [(i, t, n) for i, t, _, n in seen["fast"]] == [(i, t, n) for i, t, _, n in seen["stock"]]
    for (_, _, x, _), (_, _, y, _) in zip(seen["fast"], seen["stock"], strict=True):
        assert _rel(x, y) < TOL


def _scale_in_place(pipe, i, t, kw):
    kw["latents"].mul_(0.8)
    return kw


def _scale_returned(pipe, i, t, kw):
    return {"latents": kw["latents"] * 0.8 + 0.05 if i in (1, 3) else kw["latents"]}


PIPES = ["sd-euler", "sd-ddim", "sdxl-euler", "sd3-euler", "sd3-stochastic", "flux-euler"]


def _case(name, request, **kw):
    """(pipe, scheduler, call arguments) for a PIPES name."""
    kind, sched = name.split("-")
    pipe = request.getfixturevalue(kind)
    if kind in ("sd", "sdxl"):
        scheduler = SCHEDULERS["euler-leading-offset" if sched == "euler" else "ddim-sd"]()
        return pipe, scheduler, _sd_kw(guidance_scale=6.0, **kw)
    if kind == "sd3":
        scheduler = FM(shift=3.0, stochastic_sampling=sched == "stochastic")
        return pipe, scheduler, _flow_kw(guidance_scale=6.0, **_negative(), **kw)
    return pipe, FM(use_dynamic_shifting=True), _flow_kw(**kw)


@pytest.mark.parametrize("name", PIPES)
@pytest.mark.parametrize("edit", [_scale_in_place, _scale_returned], ids=["in-place", "returned"])
def test_edited_latents_change_the_course_as_in_stock(request, name, edit):
    """In-place ``latents.mul_(0.8)`` at every step, or new latents returned at steps 1 and 3: the
    loop continues from the edited state (DDIM's latents VP-scaled, flow's x_t)."""
    pipe, scheduler, kw = _case(name, request)
    out, seen = _run(pipe, scheduler, edit, **kw)
    _same_course(seen)
    assert _rel(out["fast"], out["stock"]) < TOL
    plain, _ = _run(pipe, _case(name, request)[1], lambda p, i, t, k: k, **kw)
    assert _rel(plain["fast"], out["fast"]) > 1e-2  # the edit matters


@pytest.mark.parametrize("name", PIPES)
def test_interrupt_stops_the_loop_as_in_stock(request, name):
    """``pipe._interrupt = True`` at step 1: stock skips the remaining steps, so its result is the
    latents after step 1; no callback after it."""

    def stop(pipe, i, t, kw):
        if i == 1:
            pipe._interrupt = True
        return kw

    pipe, scheduler, kw = _case(name, request)
    out, seen = _run(pipe, scheduler, stop, **kw)
    _same_course(seen)
    assert [i for i, *_ in seen["fast"]] == [0, 1]
    assert _rel(out["fast"], out["stock"]) < TOL
    # the result is step 1's latents (rounded through the pipeline's dtype, as stock's)
    assert _rel(out["fast"], seen["fast"][-1][2]) < TOL
    assert out["fast_pipe"].interrupt  # left set after the call, as stock leaves it


@pytest.mark.parametrize("name", ["sd-euler", "sd-ddim", "sdxl-euler", "sd3-euler"])
def test_guidance_change_acts_from_the_next_step(request, name):
    """Guidance 6 -> 3 at step 2 (and SD / SDXL's rescale 0.3 -> 0.6), read at the next step."""

    def lower(pipe, i, t, kw):
        if i == 2:
            pipe._guidance_scale = 3.0
            if hasattr(pipe, "_guidance_rescale"):
                pipe._guidance_rescale = 0.6
        return kw

    extra = {"guidance_rescale": 0.3} if name.startswith("sd-") or name.startswith("sdxl") else {}
    pipe, scheduler, kw = _case(name, request, **extra)
    out, seen = _run(pipe, scheduler, lower, **kw)
    _same_course(seen)
    assert _rel(out["fast"], out["stock"]) < TOL
    plain, _ = _run(pipe, _case(name, request)[1], lambda p, i, t, k: k, **kw)
    assert _rel(plain["fast"], out["fast"]) > 1e-3


def _cfg_off(names):
    """diffusers' documented pattern: at step 2 guidance off and the conditional embeddings kept."""

    def cb(pipe, i, t, kw):
        if i == 2:
            pipe._guidance_scale = 0.0
            for name in names:
                kw[name] = kw[name].chunk(2)[-1]
        return kw

    cb.tensor_inputs = ["latents", *names]
    return cb


@pytest.mark.parametrize(
    "name, names",
    [
        ("sd-euler", ["prompt_embeds"]),
        ("sdxl-euler", ["prompt_embeds", "add_text_embeds", "add_time_ids"]),
        ("sd3-euler", ["prompt_embeds", "pooled_prompt_embeds"]),
    ],
)
def test_turning_guidance_off_mid_call(request, name, names):
    pipe, scheduler, kw = _case(name, request)
    cb = _cfg_off(names)
    stock, fast = _copy(pipe, scheduler)
    a = stock(
        generator=torch.Generator().manual_seed(7), callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=cb.tensor_inputs, **kw,
    ).images  # fmt: skip
    b = fast(
        generator=torch.Generator().manual_seed(7), callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=cb.tensor_inputs, **kw,
    ).images  # fmt: skip
    assert _rel(b, a) < TOL
    assert _rel(b, fast(generator=torch.Generator().manual_seed(7), **kw).images) > 1e-3


def test_flux_guidance_change_has_no_effect_as_in_stock(request):
    """FLUX embeds its guidance once, before the loop: changing pipe._guidance_scale does nothing."""
    pipe = request.getfixturevalue("flux")

    def change(pipe, i, t, kw):
        pipe._guidance_scale = 9.0
        return kw

    out, _ = _run(pipe, FM(use_dynamic_shifting=True), change, **_flow_kw())
    plain, _ = _run(pipe, FM(use_dynamic_shifting=True), lambda p, i, t, k: k, **_flow_kw())
    assert _rel(out["fast"], out["stock"]) < TOL
    assert _rel(out["fast"], plain["fast"]) < TOL


def test_kept_latents_are_each_steps_own(request):
    """A callback that keeps the latents (a preview) gets a tensor per step, as in stock."""
    pipe = request.getfixturevalue("sd")
    kept: list = []
    _, fast = _copy(pipe, SCHEDULERS["euler-leading-offset"]())
    fast(callback_on_step_end=lambda p, i, t, kw: kept.append(kw["latents"]) or {}, **_sd_kw())
    assert len(kept) == 5 and all(_rel(kept[i], kept[i + 1]) > 1e-3 for i in range(4))


def test_refused_changes(request):
    """What the engine cannot follow is refused by name, never silently different."""
    pipe = request.getfixturevalue("sd")
    stock, fast = _copy(pipe, SCHEDULERS["euler-leading-offset"]())

    def double_embeds(pipe, i, t, kw):
        return {"prompt_embeds": kw["prompt_embeds"] * 2}

    with pytest.raises(ValueError, match="changed prompt_embeds"):
        fast(
            callback_on_step_end=double_embeds, callback_on_step_end_tensor_inputs=["prompt_embeds"],
            **_sd_kw(guidance_scale=6.0),
        )  # fmt: skip

    def cfg_on(pipe, i, t, kw):
        pipe._guidance_scale = 5.0
        return kw

    with pytest.raises(ValueError, match="turning it on mid-call"):
        fast(callback_on_step_end=cfg_on, **_sd_kw(guidance_scale=1.0))

    def rescale_on(pipe, i, t, kw):
        pipe._guidance_rescale = 0.5
        return kw

    with pytest.raises(ValueError, match="guidance_rescale"):
        fast(callback_on_step_end=rescale_on, **_sd_kw(guidance_scale=6.0))
    with pytest.raises(ValueError, match="HeunDiscreteScheduler"):
        _copy(pipe, SCHEDULERS["heun"]())[1](callback_on_step_end=lambda *a: {}, **_sd_kw())
    # the pipe works again after each refusal
    a = stock(generator=torch.Generator().manual_seed(7), **_sd_kw()).images
    assert _rel(fast(generator=torch.Generator().manual_seed(7), **_sd_kw()).images, a) < TOL


@pytest.mark.parametrize(
    "name, callback",
    [
        ("sd-euler", "SDCFGCutoffCallback"),
        ("sdxl-euler", "SDXLCFGCutoffCallback"),
        ("sd3-euler", "SD3CFGCutoffCallback"),
    ],
)
def test_diffusers_cfg_cutoff_callbacks(request, name, callback):
    """diffusers' own CFG-cutoff callbacks (batch 1: they keep the last embedding row), which read
    pipe.num_timesteps and ask for the embeddings only (no latents)."""
    pipe, scheduler, kw = _case(name, request)
    if "prompt" in kw:
        kw["prompt"] = PROMPT[:1]
    else:
        kw.update({k: v[:1] for k, v in {**_embeds(), **_negative()}.items()})
    cb = getattr(diffusers.callbacks, callback)(cutoff_step_ratio=0.4)
    stock, fast = _copy(pipe, scheduler)
    a = stock(generator=torch.Generator().manual_seed(7), callback_on_step_end=cb, **kw).images
    b = fast(generator=torch.Generator().manual_seed(7), callback_on_step_end=cb, **kw).images
    assert _rel(b, a) < TOL
    assert fast._guidance_scale == 0.0  # the cutoff happened (step int(5 * 0.4) = 2)
    assert _rel(b, fast(generator=torch.Generator().manual_seed(7), **kw).images) > 1e-3
