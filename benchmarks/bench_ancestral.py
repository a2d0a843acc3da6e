"""Host overhead of ancestral sampling: a repeated AncestralSampler call vs diffusers' DDPMScheduler loop.

On [1, 3, 8, 8] with a trivial 2C-output model (prediction x / 2, variance half 0) and one thread,
the network and the arithmetic cost next to nothing, so what is timed is the host path of each
loop: edmfast's validation + one fused pass per step, against the usual diffusers loop
(``for t in scheduler.timesteps: scheduler.step(model(x, t), t, x, generator=g)``) with
``variance_type="learned_range"``, the cosine schedule, clipping, respaced to N of 1000 steps.
Both draw their noise from a ``torch.Generator`` with the same seed (exact mode), so the outputs
agree up to float32 rounding (the relative difference is recorded). Also timed: the
`sample_ancestral` function path (the cached sampler behind it), and edmfast in fused-noise mode.

Medians of interleaved repeats; ratio = diffusers time / edmfast time (goal >= 2).
Run: ``python benchmarks/bench_ancestral.py`` (writes benchmarks/results/<date>-<machine>-ancestral.*).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from edmfast.ancestral import AncestralSampler, sample_ancestral  # noqa: E402
from edmfast.schedules import ddpm_betas  # noqa: E402

SHAPE = (1, 3, 8, 8)


class Trivial(torch.nn.Module):
    """The cheapest 2C-output model: prediction x / 2, variance half 0 (frac = 1/2)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([x * 0.5, torch.zeros_like(x)], 1)


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def run(quick: bool) -> dict:
    from diffusers import DDPMScheduler

    torch.set_num_threads(1)
    model = Trivial()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    betas = ddpm_betas(1000, "cosine")
    rows = []
    for n in (50, 250):
        sched = DDPMScheduler(
            beta_schedule="squaredcos_cap_v2", variance_type="learned_range", clip_sample=True
        )
        sched.set_timesteps(n)

        def diffusers_loop(s=sched) -> torch.Tensor:
            g = torch.Generator().manual_seed(1)
            x = noise
            with torch.no_grad():
                for t in s.timesteps:
                    x = s.step(model(x, t), t, x, generator=g).prev_sample
            return x

        exact = AncestralSampler(model, betas, num_steps=n)
        fused = AncestralSampler(model, betas, num_steps=n, noise_mode="fused")
        fns = {
            "edmfast": lambda s=exact: s(noise, generator=torch.Generator().manual_seed(1)),
            "edmfast-function": lambda n=n: sample_ancestral(
                model, noise, betas, num_steps=n, generator=torch.Generator().manual_seed(1)
            ),
            "edmfast-fused": lambda s=fused: s(noise, seeds=[1]),
            "diffusers": diffusers_loop,
        }
        rel = common.rel_err(fns["edmfast"](), diffusers_loop())
        repeats = (5 if n == 50 else 2) if quick else (60 if n == 50 else 15)
        t = interleaved(fns, repeats)
        med = {k: statistics.median(v) for k, v in t.items()}
        row = {
            "num_steps": n,
            "edmfast_ms": med["edmfast"] * 1e3,
            "edmfast_function_ms": med["edmfast-function"] * 1e3,
            "edmfast_fused_ms": med["edmfast-fused"] * 1e3,
            "diffusers_ms": med["diffusers"] * 1e3,
            "ratio": med["diffusers"] / med["edmfast"],
            "ratio_function": med["diffusers"] / med["edmfast-function"],
            "ratio_fused": med["diffusers"] / med["edmfast-fused"],
            "edmfast_us_per_step": med["edmfast"] / n * 1e6,
            "diffusers_us_per_step": med["diffusers"] / n * 1e6,
            "rel_diff_vs_diffusers": rel,
            "edmfast": common.stats(t["edmfast"]),
            "diffusers": common.stats(t["diffusers"]),
        }
        rows.append(row)
        print(
            f"N={n:<4} edmfast {row['edmfast_ms']:8.3f} ms (function {row['edmfast_function_ms']:.3f}, fused "
            f"{row['edmfast_fused_ms']:.3f})  diffusers {row['diffusers_ms']:8.3f} ms  "
            f"ratio {row['ratio']:5.2f} "
            f"(function {row['ratio_function']:.2f}, fused {row['ratio_fused']:.2f})  rel diff {rel:.1e}",
            flush=True,
        )
    return {
        "benchmark": "bench_ancestral",
        "date": common.today(),
        "machine": common.machine_info(),
        "versions": common.versions(),
        "command": " ".join(["python", *sys.argv]),
        "shape": list(SHAPE),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def markdown(record: dict) -> str:
    table = common.md_table(
        ["N", "edmfast ms", "sample_ancestral ms", "fused noise ms", "diffusers ms", "ratio (goal >= 2)",
         "ratio (function)", "ratio (fused)", "us/step ours", "us/step diffusers", "rel diff"],
        [
            [r["num_steps"], common.fmt(r["edmfast_ms"]), common.fmt(r["edmfast_function_ms"]),
             common.fmt(r["edmfast_fused_ms"]), common.fmt(r["diffusers_ms"]), common.fmt(r["ratio"]),
             common.fmt(r["ratio_function"]), common.fmt(r["ratio_fused"]),
             common.fmt(r["edmfast_us_per_step"]),
             common.fmt(r["diffusers_us_per_step"]), f"{r['rel_diff_vs_diffusers']:.1e}"]
            for r in record["rows"]
        ],
    )  # fmt: skip
    return (
        common.md_header("Host overhead: ancestral sampling vs diffusers' DDPMScheduler loop", record)
        + f"Shape {record['shape']}, trivial 2C-output model, learned_range variance, cosine betas, clip on, "
        f"{record['threads']} thread, medians of interleaved repeats; ratio = diffusers / edmfast. edmfast = "
        "a repeated AncestralSampler call (exact noise from a torch.Generator, like diffusers); function = "
        "`sample_ancestral` (its cached sampler); fused = in-kernel Philox noise.\n\n" + table + "\n"
    )


def main() -> None:
    assert __doc__ is not None
    common.host_bench_main(__doc__, run, markdown, "ancestral")


if __name__ == "__main__":
    main()
