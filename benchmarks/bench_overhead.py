"""Host overhead of the sampling loop: a repeated Sampler call on a tiny input, against k-diffusion.

On [1, 3, 8, 8] with a trivial network and one thread, the kernels and the network cost next to
nothing, so what is timed is the engine's host path (validation, planning, launches, checks):
the part that also bounds a launch-bound GPU loop. For each denoiser (a plain one,
`EDMPrecond`, `DiscreteVPDenoiser`) and N = 18 and 256 steps, one process times:

* ``edmfast``: a repeated ``Sampler(den, num_steps=N)(noise)`` call (plan and buffers cached);
* ``k-diffusion``: the real ``k_diffusion.sampling.sample_heun`` (`peers.load_k_diffusion_sampling`)
  with the same denoiser as its model (a preconditioner's ``forward`` is the full D(x; sigma));
* ``cold``: the first call of a fresh Sampler at N = 256 (plan + buffers + loop), and the plan
  alone (`edmfast.solvers.make_plan`).

Then every k-diffusion sampler the engine runs (``Sampler(plain, solver=NAME)`` against the real
``sample_NAME`` on the same plain denoiser; the SDE samplers get the same Gaussian noise sampler on
both sides, k-diffusion's Brownian tree would only slow its side), and the engine's own host time
per fused pass with a zero-cost network (it returns a preallocated tensor), timed back to back.

Medians of interleaved repeats; ratio = k-diffusion time / edmfast time (goals: >= 5 for Heun,
>= 3 for every other sampler; <= 3 us of host time per fused pass).
Run: ``python benchmarks/bench_overhead.py`` (writes benchmarks/results/<date>-<machine>-overhead.*).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import torch  # noqa: E402

import edmfast  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.peers import load_k_diffusion_sampling  # noqa: E402
from edmfast.options import SamplerOptions, resolve_sigmas  # noqa: E402
from edmfast.solvers import make_plan  # noqa: E402

SHAPE = (1, 3, 8, 8)


class Trivial(torch.nn.Module):
    """The cheapest network with a tensor output: F(x_in, c_noise) = x_in / 2."""

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, **cond) -> torch.Tensor:
        return x * 0.5


def plain(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x * 0.5


def denoisers() -> dict[str, object]:
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    return {
        "plain": plain,
        "EDMPrecond": edmfast.EDMPrecond(Trivial()),
        "DiscreteVPDenoiser": edmfast.DiscreteVPDenoiser(Trivial(), abar),
    }


def interleaved(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Per name, ``repeats`` timings taken in alternating rounds (slow drift hits every side)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # type: ignore[operator]
        fn()  # type: ignore[operator]
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            times[name].append(time.perf_counter() - t0)
    return times


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    kd = load_k_diffusion_sampling()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, den in denoisers().items():
        for n in (18, 256):
            sampler = edmfast.Sampler(den, num_steps=n)
            sigmas = resolve_sigmas(den, None, sampler.opts)
            k_sigmas = sigmas.float()  # k-diffusion's own schedules are float32
            x = noise * k_sigmas[0]
            out = sampler(noise)
            ref = kd.sample_heun(den, x, k_sigmas, disable=True)
            repeats = (20 if n == 18 else 4) if quick else (300 if n == 18 else 30)
            fns = {
                "edmfast": lambda s=sampler: s(noise),
                "k-diffusion": lambda d=den, s=k_sigmas, x=x: kd.sample_heun(d, x, s, disable=True),
            }
            if den is not plain:  # k-diffusion's cheapest possible model, for the strictest ratio
                fns["k-diffusion-plain"] = lambda s=k_sigmas, x=x: kd.sample_heun(plain, x, s, disable=True)
            t = interleaved(fns, repeats)
            ours, theirs = statistics.median(t["edmfast"]), statistics.median(t["k-diffusion"])
            cheapest = statistics.median(t.get("k-diffusion-plain", t["k-diffusion"]))
            row = {
                "denoiser": name,
                "num_steps": n,
                "edmfast_ms": ours * 1e3,
                "k_diffusion_ms": theirs * 1e3,
                "ratio": theirs / ours,
                "k_diffusion_plain_model_ms": cheapest * 1e3,
                "ratio_vs_plain_model": cheapest / ours,
                "edmfast_us_per_step": ours / n * 1e6,
                "rel_diff_vs_k_diffusion": common.rel_err(out, ref),
                "edmfast": common.stats(t["edmfast"]),
                "k_diffusion": common.stats(t["k-diffusion"]),
            }
            if n == 256:
                firsts, plans = [], []
                for _ in range(3 if quick else 7):
                    fresh = edmfast.Sampler(den, num_steps=n)
                    t0 = time.perf_counter()
                    fresh(noise)
                    firsts.append(time.perf_counter() - t0)
                    opts = SamplerOptions.create(num_steps=n)
                    t0 = time.perf_counter()
                    make_plan(den, resolve_sigmas(den, None, opts), opts)
                    plans.append(time.perf_counter() - t0)
                row["cold_first_call_ms"] = statistics.median(firsts) * 1e3
                row["cold_overhead_ms"] = row["cold_first_call_ms"] - row["edmfast_ms"]
                row["plan_ms"] = statistics.median(plans) * 1e3
            rows.append(row)
            print(
                f"{name:>20} N={n:<4} edmfast {ours * 1e3:8.3f} ms  k-diffusion {theirs * 1e3:8.3f} ms  "
                f"ratio {theirs / ours:5.2f} (vs its plain model {cheapest / ours:5.2f})"
                + (
                    f"  first call {row['cold_first_call_ms']:.2f} ms (plan {row['plan_ms']:.2f} ms)"
                    if n == 256
                    else ""
                ),
                flush=True,
            )
    solver_rows = solvers(kd, noise, quick)
    return {
        "benchmark": "bench_overhead",
        "date": common.today(),
        "machine": common.machine_info(),
        "versions": common.versions(),
        "command": " ".join(["python", *sys.argv]),
        "shape": list(SHAPE),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "solvers": solver_rows,
    }


SOLVERS = (
    "euler_ancestral", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m",
    "dpmpp_2m_sde", "dpmpp_3m_sde",
)  # fmt: skip


def solvers(kd, noise: torch.Tensor, quick: bool) -> list[dict]:
    """Every other sampler: a repeated Sampler call vs k-diffusion's function, and the engine's host
    time per fused pass with a zero-cost network."""
    rows = []
    zero = torch.zeros(SHAPE)

    def free(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return zero  # no torch op at all: what is timed is the engine

    for name in SOLVERS:
        for n in (18, 256):
            sampler = edmfast.Sampler(plain, num_steps=n, solver=name, backend="cpu")
            bare = edmfast.Sampler(free, num_steps=n, solver=name, backend="cpu")
            sigmas = resolve_sigmas(plain, None, sampler.opts).float()
            x = noise * sigmas[0]
            fn = getattr(kd, f"sample_{name}")
            kw = {"noise_sampler": lambda s, sn, x=x: torch.randn_like(x)} if name.endswith("_sde") else {}
            repeats = (10 if n == 18 else 3) if quick else (100 if n == 18 else 15)
            t = interleaved(
                {
                    "edmfast": lambda s=sampler: s(noise),
                    "k-diffusion": lambda f=fn, s=sigmas, x=x, kw=kw: f(plain, x, s, disable=True, **kw),
                },
                repeats,
            )
            # the engine alone, called back to back as a Sampler is in a generation loop (interleaved
            # with k-diffusion's calls its code and data leave the caches: 3x the time per pass)
            t.update(interleaved({"engine": lambda s=bare: s(noise)}, repeats))
            ours, theirs = statistics.median(t["edmfast"]), statistics.median(t["k-diffusion"])
            passes = len(bare.plan().passes)
            row = {
                "solver": name,
                "num_steps": n,
                "edmfast_ms": ours * 1e3,
                "k_diffusion_ms": theirs * 1e3,
                "ratio": theirs / ours,
                "passes": passes,
                "engine_us_per_pass": statistics.median(t["engine"]) / passes * 1e6,
            }
            rows.append(row)
            print(
                f"{name:>20} N={n:<4} edmfast {ours * 1e3:8.3f} ms  k-diffusion {theirs * 1e3:8.3f} ms  "
                f"ratio {theirs / ours:5.2f}  engine {row['engine_us_per_pass']:5.2f} us/pass",
                flush=True,
            )
    return rows


def markdown(record: dict) -> str:
    table = common.md_table(
        [
            "denoiser",
            "N",
            "edmfast ms",
            "k-diffusion ms",
            "ratio (goal >= 2)",
            "ratio vs k-diffusion on the plain model",
            "us/step",
            "first call ms",
            "plan ms",
        ],
        [
            [
                r["denoiser"],
                r["num_steps"],
                common.fmt(r["edmfast_ms"]),
                common.fmt(r["k_diffusion_ms"]),
                common.fmt(r["ratio"]),
                common.fmt(r["ratio_vs_plain_model"]),
                common.fmt(r["edmfast_us_per_step"]),
                common.fmt(r.get("cold_first_call_ms")),
                common.fmt(r.get("plan_ms")),
            ]
            for r in record["rows"]
        ],
    )
    solvers_table = common.md_table(
        ["solver", "N", "edmfast ms", "k-diffusion ms", "ratio (goal >= 3)", "engine us / pass (goal <= 3)"],
        [
            [
                r["solver"], r["num_steps"], common.fmt(r["edmfast_ms"]), common.fmt(r["k_diffusion_ms"]),
                common.fmt(r["ratio"]), common.fmt(r["engine_us_per_pass"]),
            ]
            for r in record.get("solvers", [])
        ],
    )  # fmt: skip
    return (
        common.md_header("Host overhead: repeated Sampler call vs k-diffusion sample_heun", record)
        + f"Shape {record['shape']}, trivial network, {record['threads']} thread, medians of "
        "interleaved repeats; ratio = k-diffusion / edmfast, k-diffusion given the same denoiser as its "
        "model (a preconditioner's forward), and given the plain trivial denoiser (its cheapest "
        "possible model: the strictest ratio). First call = a fresh Sampler's first "
        "call at N = 256 (plan + buffers + loop); plan = `make_plan` alone.\n\n"
        + table
        + "\n"
        + "\n## Every other sampler (plain trivial denoiser)\n\nSampler(solver=NAME) vs k-diffusion's "
        "sample_NAME, same denoiser (SDE samplers: the same Gaussian noise sampler on both sides); engine "
        "= host time per fused pass with a zero-cost network.\n\n" + solvers_table + "\n"
    )


def main() -> None:
    assert __doc__ is not None
    common.host_bench_main(__doc__, run, markdown, "overhead")


if __name__ == "__main__":
    main()
