"""Flow-matching pipelines: an accelerated tiny FLUX (and SD3) pipeline against the stock one.

Tiny random-weight pipelines built offline (the test suite's: a FLUX transformer with one double
and one single block, 24k parameters, guidance embedding; a 1-layer SD3 transformer, 12k
parameters, CFG), prompts given as embeddings, 8x8 pixels (4x4 packed FLUX latents), batch 1, one
thread, 28 FlowMatchEuler steps (FLUX's default; its dynamic shifting with the pipeline's mu),
``output_type="latent"`` and the progress bar off on both sides, so what is timed is the
denoising loop. The network is so small that the loop's host path dominates, as on a
launch-bound GPU. Stock and accelerated calls alternate (interleaved repeats, medians);
ratio = stock / accelerated. Each row also records the relative error of the accelerated latents
against stock on the same generator.

Run: ``python benchmarks/bench_flow.py`` (writes benchmarks/results/<date>-<machine>-flow.*);
``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

STEPS = 28


def _vae(diffusers):
    return diffusers.AutoencoderKL(
        block_out_channels=[8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=4, layers_per_block=1,
        sample_size=8, shift_factor=0.06, scaling_factor=1.5,
    ).eval()  # fmt: skip


def pipelines(diffusers) -> dict[str, tuple]:
    """name -> (pipeline class, components, call arguments)."""
    no_text = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
    g = torch.Generator().manual_seed(5)
    embeds = {
        "prompt_embeds": torch.randn(1, 5, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 8, generator=g),
    }
    negative = {f"negative_{k}": torch.randn_like(v) for k, v in embeds.items()}
    torch.manual_seed(3)
    flux = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    torch.manual_seed(2)
    sd3 = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16,
    ).eval()  # fmt: skip
    common_kw = {"num_inference_steps": STEPS, "height": 8, "width": 8, "output_type": "latent"}
    fm = diffusers.FlowMatchEulerDiscreteScheduler
    return {
        "flux": (
            diffusers.FluxPipeline,
            dict(transformer=flux, scheduler=fm(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
                 vae=_vae(diffusers), **no_text),
            dict(guidance_scale=3.5, **embeds, **common_kw),
        ),
        "sd3_cfg": (
            diffusers.StableDiffusion3Pipeline,
            dict(transformer=sd3, scheduler=fm(shift=3.0), vae=_vae(diffusers), text_encoder_3=None,
                 tokenizer_3=None, **no_text),
            dict(guidance_scale=5.0, **embeds, **negative, **common_kw),
        ),
    }  # fmt: skip


def _network_alone(pipe, kw: dict):
    """The pipeline's transformer called STEPS times on the arguments of its first call in the
    stock loop (recorded by a forward pre-hook): the floor both sides share."""
    seen: list = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args, kwargs)) if not seen else None, with_kwargs=True
    )
    try:
        pipe(generator=torch.Generator().manual_seed(7), **kw)
    finally:
        hook.remove()
    args, kwargs = seen[0]

    def network():
        with torch.no_grad():
            for _ in range(STEPS):
                pipe.transformer(*args, **kwargs)

    return network


def run(quick: bool) -> dict:
    import diffusers

    import edmfast.diffusers as edd

    torch.set_num_threads(1)
    rows = []
    for name, (cls, comps, kw) in pipelines(diffusers).items():
        stock, fast = cls(**comps), edd.accelerate(cls(**comps))
        for p in (stock, fast):
            p.set_progress_bar_config(disable=True)
        a = stock(generator=torch.Generator().manual_seed(7), **kw).images
        b = fast(generator=torch.Generator().manual_seed(7), **kw).images
        network = _network_alone(stock, kw)
        fns = {
            "stock": lambda p=stock, kw=kw: p(generator=torch.Generator().manual_seed(7), **kw),
            "accelerated": lambda p=fast, kw=kw: p(generator=torch.Generator().manual_seed(7), **kw),
            "network": network,
        }
        repeats = 3 if quick else 40
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():  # warm: the cached Sampler, its plan and buffers
            fn()
        for _ in range(repeats):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        stock_s, fast_s = statistics.median(times["stock"]), statistics.median(times["accelerated"])
        net_s = statistics.median(times["network"])
        row = {
            "pipeline": name,
            "steps": STEPS,
            "batch": 1,
            "stock_ms": stock_s * 1e3,
            "accelerated_ms": fast_s * 1e3,
            "ratio": stock_s / fast_s,
            "network_alone_ms": net_s * 1e3,
            "stock_outside_network_ms": (stock_s - net_s) * 1e3,
            "accelerated_outside_network_ms": (fast_s - net_s) * 1e3,
            "rel_err_vs_stock": common.rel_err(b, a),
            "stock": common.stats(times["stock"]),
            "accelerated": common.stats(times["accelerated"]),
        }
        rows.append(row)
        print(
            f"{name:>8}: stock {row['stock_ms']:7.2f} ms  accelerated {row['accelerated_ms']:7.2f} ms  "
            f"ratio {row['ratio']:5.2f}  (network alone {row['network_alone_ms']:7.2f} ms)  "
            f"rel err vs stock {row['rel_err_vs_stock']:.1e}",
            flush=True,
        )
    by = {r["pipeline"]: r for r in rows}
    return {
        "benchmark": "bench_flow",
        "date": common.today(),
        "machine": common.machine_info(),
        "versions": common.versions(),
        "command": " ".join(["python", *sys.argv]),
        "threads": torch.get_num_threads(),
        "summary": {
            "flux_speedup_b1": by["flux"]["ratio"],
            "flux_rel_err_vs_stock": by["flux"]["rel_err_vs_stock"],
            "sd3_cfg_speedup_b1": by["sd3_cfg"]["ratio"],
            "sd3_cfg_rel_err_vs_stock": by["sd3_cfg"]["rel_err_vs_stock"],
        },
        "sections": {"pipelines": {"rows": rows}},
    }


def markdown(record: dict) -> str:
    rows = record["sections"]["pipelines"]["rows"]
    table = common.md_table(
        ["pipeline", "steps", "batch", "stock ms", "accelerated ms", "ratio (stock / accelerated)",
         "network alone ms", "outside the network: stock / accelerated ms", "rel err vs stock"],
        [
            [r["pipeline"], r["steps"], r["batch"], common.fmt(r["stock_ms"]),
             common.fmt(r["accelerated_ms"]), common.fmt(r["ratio"]), common.fmt(r["network_alone_ms"]),
             common.fmt(r["stock_outside_network_ms"]) + " / "
             + common.fmt(r["accelerated_outside_network_ms"]), common.fmt(r["rel_err_vs_stock"])]
            for r in rows
        ],
    )  # fmt: skip
    return (
        common.md_header("Flow-matching pipelines: accelerated vs stock (tiny FLUX and SD3)", record)
        + f"Tiny random-weight pipelines, batch 1, {record['threads']} thread, {STEPS} FlowMatchEuler steps, "
        "latents out, progress bar off; medians of interleaved calls. Network alone: the transformer "
        f"called {STEPS} times on the stock loop's first inputs (the floor both sides share); outside the "
        "network: a call's time minus that (prompt handling, latents, schedule, the loop's own work).\n\n"
        + table
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="result directory")
    parser.add_argument("--stem", default=None, help="file name stem (default <date>-<machine>-flow)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    record = run(args.quick)
    md = markdown(record)
    print(md)
    if not args.no_save:
        stem = args.stem or f"{record['date']}-{common.machine_tag()}-flow"
        common.write_results(args.out, stem, record, md)


if __name__ == "__main__":
    main()
