"""End-to-end sampler benchmark: edmfast against its peers, both sides in one process, same inputs.

CPU mode (the 2-core CPU box): the analytic Gaussian denoiser, 64x3x64x64, 18 Heun steps,
churn on (S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003):
edmfast (backend "cpu", fused Philox noise) vs k-diffusion's ``sample_heun`` vs the official EDM
loop (float64, per-sample generators), plus edmfast's "torch" backend and exact-noise mode and two
torch.compile peers: the reference step's arithmetic compiled around the eager denoiser, and each
whole step compiled with the analytic denoiser inside (the strongest: inductor fuses the
denoiser in, which beats edmfast on such a cheap denoiser); images/s, speedups, and each result's
error against a float64 run of the same math on the same noise.

GPU mode (one H100 or H200): sections run one after another, each in its own subprocess under a
time limit (a crash or a timeout loses that section only) and within an overall ``--budget-s``:
``copy`` (device copy bandwidth), ``cifar`` (DDPM++-class UNet2DModel, ~56M parameters, 32x32:
official loop vs edmfast with graph capture, batches 1/16/64/256, and the graph-replayed denoiser
for the overhead ratio), ``sd`` (SD1.5-architecture UNet2DConditionModel, CFG 7.5 + rescale 0.7:
diffusers loops vs edmfast), ``compile_cold`` / ``compile_warm`` (first and cached compile in fresh
processes), ``cifar_compiled``, ``sd_compiled`` and ``cifar_diffusers`` (EDMEulerScheduler).

Results: ``<out>/<date>-<machine>.json`` and ``.md`` with ``machine``, ``versions``, ``date``,
``summary`` (the issue's keys; layout in benchmarks/README.md) and every measurement. GPU mode
rewrites the JSON (atomically) after every section, so a kill keeps the finished ones; with
``--append`` the sections an earlier invocation of the same suite run wrote there are kept.
CPU mode with ``--contention`` times the comparison again beside one busy process.

    python benchmarks/bench_sampler.py                 # CPU mode on a CPU machine, GPU mode with CUDA
    python benchmarks/bench_sampler.py --quick         # seconds: tiny sizes (CI smoke test)
    # the GPU code path with tiny networks, on the CPU:
    python benchmarks/bench_sampler.py --mode gpu --device cpu --tiny --in-process
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import collect_results  # noqa: E402
import common  # noqa: E402
import peers  # noqa: E402
import torch  # noqa: E402
from common import Recorder, Skip, fmt, md_table, ratio, rel_err, stats  # noqa: E402

import edmfast  # noqa: E402

CHURN = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
GOALS_CPU = {"speedup_vs_k_diffusion_cpu": 2.0, "speedup_vs_official_loop_cpu": 6.0}
GOALS_GPU = {
    "kernel_bandwidth_fraction": 0.85,
    "sampler_overhead_ratio": 1.02,
    "speedup_vs_official_loop": 3.0,
    "speedup_vs_diffusers_compiled_cfg_b1": 1.3,
    "first_compile_s": 60.0,
    "warm_compile_s": 10.0,
}
GPU_SUMMARY_KEYS = (
    "copy_bandwidth_GBps",
    "kernel_bandwidth_fraction",
    "sampler_overhead_ratio",
    "speedup_vs_official_loop",
    "speedup_vs_diffusers_compiled_cfg_b1",
    "first_compile_s",
    "warm_compile_s",
)
CPU_SUMMARY_KEYS = (
    "speedup_vs_official_loop_cpu",
    "speedup_vs_k_diffusion_cpu",
    "images_per_s_cpu",
    "sampler_overhead_ratio_cpu",
    "rel_err_vs_float64_cpu",
)


def interleaved(
    methods: dict[str, Callable[[], Any]], *, device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time several methods round-robin (one repeat of each in turn), so slow drifts in machine
    load (other processes on a shared box) hit every method alike. Seconds per call, per method."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name] += common.time_call(fn, device=device, repeats=1, warmup=0)
    return times


# ============================================================================= CPU mode


def cpu_mode(args: argparse.Namespace, rec: Recorder) -> dict[str, Any]:
    device = torch.device("cpu")
    shape = (4, 3, 16, 16) if args.quick else tuple(args.shape)
    num_steps = 6 if args.quick else args.steps
    repeats = 2 if args.quick else args.repeats
    batch = shape[0]
    seeds = torch.arange(batch, dtype=torch.int64) + args.seed
    if args.denoiser == "gaussian":
        den = edmfast.analytic.GaussianDenoiser(mu=0.1, s=0.5)
    else:
        g = torch.Generator().manual_seed(args.seed)
        den = edmfast.analytic.GaussianMixtureDenoiser(
            torch.randn((8, *shape[1:]), generator=g, dtype=torch.float64) * 0.5
        )
    sigmas = edmfast.karras_sigmas(num_steps)
    noise = edmfast.PerSampleGenerator(seeds).randn(shape)  # the official script's latents
    opts = dict(num_steps=num_steps, **CHURN)
    nfe = 2 * num_steps - 1
    config = {
        "shape": list(shape),
        "num_steps": num_steps,
        "nfe": nfe,
        "denoiser": type(den).__name__,
        **CHURN,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
    }
    methods: dict[str, Callable[[], Any]] = {}
    refs: dict[str, Callable[[], torch.Tensor]] = {}  # float64 reference of each method on its own noise
    outputs: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, Any]] = {}

    def fused_reference() -> torch.Tensor:
        return edmfast.reference.sample(den, noise.double(), sigmas, seeds=seeds, noise_mode="fused", **opts)

    def exact_reference() -> torch.Tensor:
        return edmfast.reference.sample(
            den,
            noise.double(),
            sigmas,
            generator=edmfast.PerSampleGenerator(seeds),
            noise_mode="exact",
            **opts,
        )

    def add_edmfast(name: str, backend: str, noise_mode: str) -> None:
        sampler = edmfast.Sampler(
            den, sigmas, backend=backend, noise_mode=noise_mode, cuda_graph=False, **opts
        )
        if noise_mode == "fused":

            def run() -> torch.Tensor:
                return sampler(noise, seeds=seeds)

            refs[name] = fused_reference
        else:

            def run() -> torch.Tensor:
                return sampler(noise, generator=edmfast.PerSampleGenerator(seeds))

            refs[name] = exact_reference
        outputs[name] = run()  # also the warm-up; raises here if the backend is unavailable
        methods[name] = run
        meta[name] = {"backend": backend, "noise_mode": noise_mode}

    rec.guard("edmfast_cpu_fused", lambda: add_edmfast("edmfast_cpu_fused", "cpu", "fused"))
    rec.guard("edmfast_torch_fused", lambda: add_edmfast("edmfast_torch_fused", "torch", "fused"))
    if not args.quick:
        rec.guard("edmfast_cpu_exact", lambda: add_edmfast("edmfast_cpu_exact", "cpu", "exact"))

    def add_k_diffusion() -> None:
        try:
            sampling = peers.load_k_diffusion_sampling()
        except ImportError as e:  # an optional peer: a skipped row, not an error
            raise Skip(f"install k-diffusion to compare ({e})") from None
        sig32 = sigmas.float()  # k-diffusion's get_sigmas_karras returns float32

        def run() -> torch.Tensor:
            torch.manual_seed(args.seed)  # k-diffusion draws from torch's global RNG
            return sampling.sample_heun(den, noise * sig32[0], sig32, disable=True, **CHURN)

        def reference() -> torch.Tensor:
            # sample_heun draws randn_like(x) (float32) on every step: replay those draws in float64
            torch.manual_seed(args.seed)
            draws = [torch.randn(shape) for _ in range(num_steps)]
            return official_loop(peers.NoiseFeeder(draws))

        outputs["k_diffusion_sample_heun"] = run()
        methods["k_diffusion_sample_heun"] = run
        refs["k_diffusion_sample_heun"] = reference
        meta["k_diffusion_sample_heun"] = {"utils": sampling.UTILS_SOURCE}

    def official_loop(randn_like: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return peers.official_edm_sampler(
            peers.OfficialNet(den),
            noise,
            randn_like=randn_like,
            num_steps=num_steps,
            S_churn=CHURN["s_churn"],
            S_min=CHURN["s_tmin"],
            S_max=CHURN["s_tmax"],
            S_noise=CHURN["s_noise"],
        )

    def add_official() -> None:
        def run() -> torch.Tensor:
            return official_loop(edmfast.PerSampleGenerator(seeds).randn_like)

        outputs["official_edm_loop"] = run()
        methods["official_edm_loop"] = run
        refs["official_edm_loop"] = exact_reference
        meta["official_edm_loop"] = {"state": "float64", "noise": "per-sample generators, every step"}

    def add_compiled_step() -> None:
        sampler = peers.compiled_reference_sampler(den)

        def run() -> torch.Tensor:
            return sampler(noise, sigmas, generator=torch.Generator().manual_seed(args.seed), **CHURN)

        def reference() -> torch.Tensor:
            g = torch.Generator().manual_seed(args.seed)
            return official_loop(
                peers.NoiseFeeder([torch.randn(shape, generator=g) for _ in range(num_steps)])
            )

        t0 = time.perf_counter()
        outputs["torch_compile_reference_step"] = run()
        meta["torch_compile_reference_step"] = {
            "first_call_s": time.perf_counter() - t0,
            "compiled": "the step's elementwise math; the denoiser eager",
        }
        methods["torch_compile_reference_step"] = run
        refs["torch_compile_reference_step"] = reference

    def add_compiled_whole_step() -> None:
        sampler = peers.compiled_whole_step_sampler(den)

        def run() -> torch.Tensor:
            return sampler(noise, sigmas, generator=torch.Generator().manual_seed(args.seed), **CHURN)

        def reference() -> torch.Tensor:
            g = torch.Generator().manual_seed(args.seed)
            return official_loop(
                peers.NoiseFeeder([torch.randn(shape, generator=g) for _ in range(num_steps)])
            )

        t0 = time.perf_counter()
        outputs["torch_compile_whole_step"] = run()
        meta["torch_compile_whole_step"] = {
            "first_call_s": time.perf_counter() - t0,
            "compiled": "each whole Heun step, the analytic denoiser inside (inductor fuses it in)",
        }
        methods["torch_compile_whole_step"] = run
        refs["torch_compile_whole_step"] = reference

    rec.guard("k_diffusion_sample_heun", add_k_diffusion)
    rec.guard("official_edm_loop", add_official)
    if args.compile_peer and not args.quick:
        rec.guard("torch_compile_reference_step", add_compiled_step)
        rec.guard("torch_compile_whole_step", add_compiled_whole_step)

    # the denoiser alone, NFE times: the floor any sampler on this denoiser pays
    x32 = noise * 10.0
    sig_b = torch.full((batch,), 10.0)

    def denoiser_only() -> None:
        for _ in range(nfe):
            den(x32, sig_b)

    methods["denoiser_only_nfe"] = denoiser_only
    times = interleaved(methods, device=device, repeats=repeats, warmup=0)
    contention = None
    if args.contention:
        contention = rec.guard("contention", lambda: under_contention(methods, device, repeats))

    rows: dict[str, dict[str, Any]] = {}
    for name, t in times.items():
        row: dict[str, Any] = {**stats(t), **meta.get(name, {})}
        row["images_per_s"] = batch / row["median_s"]
        if name in refs:
            row["rel_err_vs_float64"] = rec.guard(
                f"accuracy:{name}", lambda n=name: rel_err(outputs[n], refs[n]())
            )
        rows[name] = row
    breakdown = None
    if not args.quick:
        breakdown = rec.guard(
            "breakdown", lambda: cpu_breakdown(den, noise, sigmas, seeds, num_steps, repeats)
        )
    ed_name = "edmfast_cpu_fused" if "edmfast_cpu_fused" in rows else "edmfast_torch_fused"
    ed = rows.get(ed_name, {}).get("median_s")

    def med(name: str) -> float | None:
        return rows.get(name, {}).get("median_s")

    summary = {
        "speedup_vs_official_loop_cpu": ratio(med("official_edm_loop"), ed),
        "speedup_vs_k_diffusion_cpu": ratio(med("k_diffusion_sample_heun"), ed),
        "images_per_s_cpu": ratio(batch, ed),
        "sampler_overhead_ratio_cpu": ratio(ed, med("denoiser_only_nfe")),
        "rel_err_vs_float64_cpu": rows.get(ed_name, {}).get("rel_err_vs_float64"),
        "edmfast_backend_cpu": rows.get(ed_name, {}).get("backend"),
        "speedup_torch_backend_vs_official_loop_cpu": ratio(
            med("official_edm_loop"), med("edmfast_torch_fused")
        ),
        "speedup_torch_backend_vs_k_diffusion_cpu": ratio(
            med("k_diffusion_sample_heun"), med("edmfast_torch_fused")
        ),
        # below 1 where inductor, given the whole step, fuses a cheap analytic denoiser into it
        "speedup_vs_torch_compile_reference_step_cpu": ratio(med("torch_compile_reference_step"), ed),
        "speedup_vs_torch_compile_whole_step_cpu": ratio(med("torch_compile_whole_step"), ed),
        "goals": GOALS_CPU,
    }
    if contention is not None:
        busy = contention["rows"]

        def med_busy(name: str) -> float | None:
            return busy.get(name, {}).get("median_s")

        summary["speedup_vs_official_loop_cpu_contention"] = ratio(
            med_busy("official_edm_loop"), med_busy(ed_name)
        )
        summary["speedup_vs_k_diffusion_cpu_contention"] = ratio(
            med_busy("k_diffusion_sample_heun"), med_busy(ed_name)
        )
        summary["images_per_s_cpu_contention"] = ratio(batch, med_busy(ed_name))
    summary["goals_met"] = {
        k: (None if summary[k] is None else summary[k] >= goal) for k, goal in GOALS_CPU.items()
    }
    return {
        "summary": summary,
        "sections": {
            "cpu": {"config": config, "rows": rows, "breakdown": breakdown, "contention": contention}
        },
    }


# One busy neighbour: a single-threaded loop of small matmuls, as another tenant of a shared box
# would be. It ends by itself after BUSY_MAX_S even if this process dies without killing it.
BUSY_MAX_S = 600
BUSY = (
    "import time, torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(256, 256)\n"
    "print('ready', flush=True)\n"
    f"end = time.monotonic() + {BUSY_MAX_S}\n"
    "while time.monotonic() < end:\n"
    "    a = torch.tanh(a @ a)\n"
)
CONTENTION_METHODS = (
    "edmfast_cpu_fused",
    "edmfast_torch_fused",
    "k_diffusion_sample_heun",
    "official_edm_loop",
)


def under_contention(
    methods: dict[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, Any]:
    """The same comparison (edmfast vs k-diffusion vs the official loop) while one busy process runs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    busy = subprocess.Popen([sys.executable, "-c", BUSY], env=env, stdout=subprocess.PIPE, text=True)
    try:
        if busy.stdout is None or busy.stdout.readline().strip() != "ready":  # spinning before any timing
            raise RuntimeError(f"the busy process did not start (exit {busy.poll()})")
        chosen = {k: methods[k] for k in CONTENTION_METHODS if k in methods}
        times = interleaved(chosen, device=device, repeats=repeats, warmup=1)
    finally:
        busy.kill()
        busy.wait()
    return {
        "busy_process": "1 thread: torch.tanh(a @ a), a 256x256 float32, in a loop",
        "rows": {k: stats(t) for k, t in times.items()},
    }


def cpu_breakdown(den, noise, sigmas, seeds, num_steps: int, repeats: int) -> dict[str, Any]:
    """Where a CPU run's time goes: each ingredient timed alone at the benchmark shape, times how
    often one run of each method needs it (the engine: 2N fused passes, one per churn step with
    Philox noise, each recording non-finite rows in ``bad`` as the engine's passes do; k-diffusion and
    the official loop: one normal draw per step)."""
    from edmfast import ops

    shape, batch = tuple(noise.shape), noise.shape[0]
    churn_steps = sum(1 for s in sigmas[:-1].tolist() if CHURN["s_tmin"] <= s <= CHURN["s_tmax"])
    x, f, xp = noise * 3.0, noise * 2.0, noise * 1.5
    out, net = torch.empty_like(x), torch.empty_like(x)
    coef = torch.tensor([0.9, 0.1, 0.05, 0.3, 0.7, 0, 0, 0], dtype=torch.float32)
    sig_b = torch.full((batch,), 10.0)
    bad = torch.full((batch,), 2**31 - 1, dtype=torch.int32)
    parts = {
        "denoiser call": (lambda: den(x, sig_b), 2 * num_steps - 1),
        "edmfast pass, no noise (cpu)": (
            lambda: ops.heun_step(x, coef, x_prime=xp, f=f, out=out, out_net=net, bad=bad, backend="cpu"),
            2 * num_steps - churn_steps,
        ),
        "edmfast pass + Philox noise (cpu)": (
            lambda: ops.heun_step(
                x, coef, x_prime=xp, f=f, seeds=seeds, step=3, out=out, out_net=net, bad=bad, backend="cpu"
            ),
            churn_steps,
        ),
        "torch.randn float32 (k-diffusion, per step)": (lambda: torch.randn(shape), num_steps),
        "PerSampleGenerator float64 draw (official, per step)": (
            lambda: edmfast.PerSampleGenerator(seeds).randn(shape, dtype=torch.float64),
            num_steps,
        ),
    }
    out_rows = {}
    for name, (fn, count) in parts.items():
        t = stats(common.time_call(fn, device=torch.device("cpu"), repeats=max(3, repeats), warmup=1))[
            "median_s"
        ]
        out_rows[name] = {"per_call_s": t, "calls_per_run": count, "seconds_per_run": t * count}
    return {"churn_steps": churn_steps, "parts": out_rows}


def cpu_markdown(record: dict[str, Any]) -> str:
    sec = record["sections"].get("cpu", {})
    cfg, rows = sec.get("config", {}), sec.get("rows", {})
    ed = rows.get("edmfast_cpu_fused") or rows.get("edmfast_torch_fused") or {}
    out = common.md_header("edmfast sampler benchmark — CPU", record)
    out += (
        f"Analytic {cfg.get('denoiser')}, batch {cfg.get('shape')}, {cfg.get('num_steps')} Heun steps "
        f"({cfg.get('nfe')} NFE), churn S_churn={CHURN['s_churn']}, S_tmin={CHURN['s_tmin']}, "
        f"S_tmax={CHURN['s_tmax']}, S_noise={CHURN['s_noise']}; every method in one process on the same "
        f"latents, timed round-robin, median of {cfg.get('repeats')}. "
        "Error: ||x - x_ref|| / ||x_ref|| against "
        "a float64 run of the same algorithm on the same churn noise.\n\n"
    )
    table = []
    for name, r in rows.items():
        speed = ratio(r["median_s"], ed.get("median_s")) if ed else None
        table.append([name, r["median_s"], r["images_per_s"], speed, r.get("rel_err_vs_float64")])
    out += md_table(["method", "median s", "images/s", "time / edmfast", "rel. error vs float64"], table)
    parts = (sec.get("breakdown") or {}).get("parts")
    if parts:
        out += (
            "\n## Where the time goes (each ingredient timed alone, times its calls per run)\n\n"
            + md_table(
                ["ingredient", "per call s", "calls per run", "s per run"],
                [[k, v["per_call_s"], v["calls_per_run"], v["seconds_per_run"]] for k, v in parts.items()],
            )
        )
    out += "\n## Summary\n\n" + md_table(
        ["key", "value", "goal"],
        [[k, v, GOALS_CPU.get(k)] for k, v in record["summary"].items() if k not in ("goals", "goals_met")],
    )
    return out + common.md_problems(record)


# ============================================================================= GPU sections

SECTION_ORDER = (
    "copy",
    "cifar",
    "sd",
    "compile_cold",
    "compile_warm",
    "cifar_compiled",
    "sd_compiled",
    "cifar_diffusers",
)
# (minimum seconds worth starting with, cap in seconds) per section, for an H100 or H200
SECTION_TIME = {
    "copy": (10, 30),
    "cifar": (40, 150),
    "sd": (45, 120),
    "compile_cold": (60, 150),
    "compile_warm": (20, 60),
    "cifar_compiled": (40, 150),
    # diffusers' reduce-overhead compile of the SD UNet plus edmfast with the eager UNet under graph
    # capture gives the number (~60-90 s); edmfast's own compile follows while the deadline allows
    "sd_compiled": (90, 400),
    "cifar_diffusers": (60, 200),
}


class SectionResult(dict):
    """A section's results, rewritten to disk after every measurement (a timeout keeps the rest)."""

    def __init__(self, path: Path | None):
        super().__init__()
        self.path = path

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        if self.path is not None:  # renamed into place: a kill never leaves half a file
            common.write_json(self.path, dict(self))


def cifar_unet(device: torch.device, tiny: bool) -> torch.nn.Module:
    """diffusers UNet2DModel shaped like EDM's DDPM++ CIFAR-10 net: 256 channels at 32/16/8,
    4 residual blocks per level, attention at 16x16 (~59M parameters; DDPM++ has 56M). Random weights."""
    from diffusers import UNet2DModel

    if tiny:
        cfg = dict(
            sample_size=8,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
    else:
        cfg = dict(
            sample_size=32,
            block_out_channels=(256, 256, 256),
            layers_per_block=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
    torch.manual_seed(0)
    with torch.device(device):
        net = UNet2DModel(in_channels=3, out_channels=3, **cfg)
    return net.eval().requires_grad_(False)


def sd_unet(device: torch.device, tiny: bool, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers UNet2DConditionModel with Stable Diffusion 1.5's architecture (860M parameters,
    cross-attention on 77x768 text embeddings). Random weights."""
    from diffusers import UNet2DConditionModel

    if tiny:
        cfg = dict(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    else:
        cfg = dict(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
        )
    torch.manual_seed(0)
    with torch.device(device):
        net = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg)
    return net.to(dtype).eval().requires_grad_(False)


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def sec_copy(args, device, res: SectionResult) -> None:
    if device.type != "cuda":
        raise Skip("copy bandwidth needs a CUDA device")
    n = (1 << 28) if not args.tiny else (1 << 20)  # 1 GiB of float32 each way: far beyond the 60 MB L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = common.cuda_graph_time(lambda: dst.copy_(src), repeats=20)
    res.put("bytes_moved", 2 * src.nbytes)
    res.put("seconds", t)
    res.put("copy_bandwidth_GBps", 2 * src.nbytes / t / 1e9)


def _edmfast_cifar(net, device, *, compile: bool, steps: int, solver: str = "heun"):
    den = edmfast.EDMPrecond(net)
    graph = device.type == "cuda"
    return edmfast.Sampler(
        den, num_steps=steps, solver=solver, cuda_graph=graph, compile=compile, max_graphs=8
    )


def _official_cifar(net, steps: int):
    official = peers.OfficialEDMPrecond(net)

    def run(latents: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        rnd = edmfast.PerSampleGenerator(seeds, device=latents.device)
        return peers.official_edm_sampler(official, latents, randn_like=rnd.randn_like, num_steps=steps)

    return run


def sec_cifar(args, device, res: SectionResult, *, compiled: bool = False) -> None:
    """Official loop vs edmfast (graph capture; compiled network when ``compiled``), per batch size."""
    if compiled and args.no_compile:
        raise Skip("--no-compile")
    net = cifar_unet(device, args.tiny)
    res.put("params", n_params(net))
    steps = 4 if args.tiny else args.steps
    nfe = 2 * steps - 1
    res.put(
        "config",
        {
            "num_steps": steps,
            "nfe": nfe,
            "solver": "heun",
            "s_churn": 0,
            "compile": compiled,
            "network": "diffusers UNet2DModel, DDPM++-like, random weights, float32",
        },
    )
    sampler = _edmfast_cifar(net, device, compile=compiled and not args.no_compile, steps=steps)
    official = _official_cifar(net, steps)
    batches = [int(b) for b in (args.tiny_batches if args.tiny else args.cifar_batches)]
    if compiled:  # batch 64 first: it feeds the overhead ratio; other batch sizes recompile
        batches = sorted(batches, key=lambda b: (b != 64, b))
    size = 8 if args.tiny else 32
    deadline = time.monotonic() + args.section_budget_s
    rows: dict[str, Any] = {}
    for b in batches:
        if time.monotonic() > deadline:
            rows[f"b{b}"] = {"skipped": "section time budget spent"}
            break
        seeds = torch.arange(b, dtype=torch.int64)
        latents = edmfast.PerSampleGenerator(seeds, device=device).randn((b, 3, size, size))
        with torch.no_grad():
            t0 = time.perf_counter()
            out_ed = sampler(latents)  # first call: compile (if on) + capture
            common.sync(device)
            first_call_s = time.perf_counter() - t0
            methods = {"edmfast": lambda latents=latents: sampler(latents)}
            if not compiled:
                methods["official"] = lambda latents=latents, seeds=seeds: official(latents, seeds)
            reps = args.repeats if b <= 64 else max(2, args.repeats // 2)
            times = interleaved(methods, device=device, repeats=reps, warmup=1)
            row: dict[str, Any] = {
                "edmfast": stats(times["edmfast"]),
                "edmfast_first_call_s": first_call_s,
                "edmfast_stats": dict(sampler.stats),
            }
            row["images_per_s"] = b / row["edmfast"]["median_s"]
            if "official" in times:
                row["official"] = stats(times["official"])
                row["speedup_vs_official_loop"] = ratio(
                    row["official"]["median_s"], row["edmfast"]["median_s"]
                )
                row["rel_diff_vs_official"] = rel_err(out_ed, official(latents, seeds))
        rows[f"b{b}"] = row
        res.put("rows", rows)
        print(
            f"[cifar{'_compiled' if compiled else ''}] b{b}: {json.dumps(common._finite_or_none(row))[:300]}",
            flush=True,
        )
    # overhead ratio: engine time / (NFE x one graph-replayed evaluation of the same network)
    b = 64 if not args.tiny else batches[0]
    if f"b{b}" in rows and "edmfast" in rows[f"b{b}"]:
        x_in = torch.randn((b, 3, size, size), device=device)
        c_noise = torch.full((b,), 0.1, device=device)
        fn = torch.compile(net, dynamic=False) if compiled and not args.no_compile else net
        with torch.no_grad():
            if device.type == "cuda":
                t_net = common.cuda_graph_time(lambda: fn(x_in, c_noise), repeats=max(10, 2 * args.repeats))
            else:
                t_net = min(common.time_call(lambda: fn(x_in, c_noise), device=device, repeats=3))
        res.put("denoiser_graph_replay_s", t_net)
        res.put("overhead_batch", b)
        res.put("sampler_overhead_ratio", ratio(rows[f"b{b}"]["edmfast"]["median_s"], nfe * t_net))


def sec_compile_probe(args, device, res: SectionResult) -> None:
    """Time to first sample with compile=True in this (fresh) process; cache per TORCHINDUCTOR_CACHE_DIR."""
    if args.no_compile:
        raise Skip("--no-compile")
    net = cifar_unet(device, args.tiny)
    b = 64 if not args.tiny else 2
    size = 8 if args.tiny else 32
    steps = 4 if args.tiny else args.steps
    sampler = _edmfast_cifar(net, device, compile=True, steps=steps)
    latents = torch.randn((b, 3, size, size), device=device)
    with torch.no_grad():
        t0 = time.perf_counter()
        sampler(latents)
        common.sync(device)
        res.put("time_to_first_sample_s", time.perf_counter() - t0)
        res.put("compile_s", sampler.stats["compile_s"])
        res.put("capture_s", sampler.stats["capture_s"])
        t = common.time_call(lambda: sampler(latents), device=device, repeats=2)
    res.put("warm_call_s", min(t))
    res.put("cache_dir", os.environ.get("TORCHINDUCTOR_CACHE_DIR"))


def sec_sd(args, device, res: SectionResult, *, compiled: bool = False) -> None:
    """SD1.5-architecture UNet with CFG 7.5 + rescale 0.7: diffusers loops vs edmfast (same network,
    same latents, same timesteps and sigmas, same NFE)."""
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    if compiled and args.no_compile:
        raise Skip("--no-compile")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = sd_unet(device, args.tiny, dtype)
    res.put("params", n_params(unet))
    w, phi = 7.5, 0.7
    euler_steps = 3 if args.tiny else args.sd_steps
    heun_steps = 2 if args.tiny else (args.sd_steps + 1) // 2
    res.put(
        "config",
        {
            "guidance_scale": w,
            "guidance_rescale": phi,
            "dtype": str(dtype),
            "euler_steps": euler_steps,
            "heun_steps": heun_steps,
            "compile": compiled,
            "scheduler": peers.sd15_scheduler_config(),
        },
    )
    rescale, rescale_src = peers.rescale_noise_cfg_fn()
    res.put("rescale_noise_cfg", rescale_src)
    cfg = peers.sd15_scheduler_config()
    euler = EulerDiscreteScheduler(**cfg)
    den = edmfast.DiscreteVPDenoiser(unet, euler.alphas_cumprod, prediction_type="epsilon")
    do_compile = compiled and not args.no_compile
    ctx_len, ctx_dim = (77, 32) if args.tiny else (77, 768)
    size = 8 if args.tiny else 64
    if do_compile:
        unet_diffusers = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
    else:
        unet_diffusers = unet
    samplers = {
        solver: edmfast.Sampler(
            den,
            solver=solver,
            guidance_scale=w,
            guidance_rescale=phi,
            compile=do_compile,
            cuda_graph=device.type == "cuda",
            max_graphs=8,
        )
        for solver in ("euler", "heun")
    }
    # With compile on, edmfast with the eager network under graph capture is measured first against
    # diffusers compiled (no compile on edmfast's side, so the row exists early), then edmfast
    # compiled when the section's time allows; the row's speedup is edmfast's best.
    graph_samplers = {
        solver: edmfast.Sampler(
            den,
            solver=solver,
            guidance_scale=w,
            guidance_rescale=phi,
            cuda_graph=device.type == "cuda",
            max_graphs=8,
        )
        for solver in ("euler", "heun")
        if do_compile
    }
    rows: dict[str, Any] = {}
    deadline = time.monotonic() + args.section_budget_s
    for b in [int(x) for x in (args.sd_batches if not args.tiny else [1])]:
        for solver, sched_cls, steps in (
            ("euler", EulerDiscreteScheduler, euler_steps),
            ("heun", HeunDiscreteScheduler, heun_steps),
        ):
            key = f"{solver}_b{b}"
            if solver == "heun" and not args.sd_heun:
                continue
            if time.monotonic() > deadline:
                rows[key] = {"skipped": "section time budget spent"}
                continue
            g = torch.Generator(device="cpu").manual_seed(b)
            latents = torch.randn((b, 4, size, size), generator=g).to(device)
            pos = torch.randn((b, ctx_len, ctx_dim), generator=g).to(device, dtype)
            neg = torch.randn((b, ctx_len, ctx_dim), generator=g).to(device, dtype)
            sched = sched_cls(**cfg)
            sigmas = den.sigmas_for(
                edmfast.discrete_timesteps(steps, 1000, cfg["timestep_spacing"], cfg["steps_offset"])
            )
            sampler = samplers[solver]

            # diffusers starts at init_noise_sigma * noise = sqrt(sigma_0^2 + 1) noise (the VE-scaled
            # x_T of unit-variance data), EDM at sigma_0 noise: start edmfast at the same point so
            # rel_diff_vs_diffusers measures numerics only (it does not change the timing)
            sched.set_timesteps(steps)
            start = (latents * float(sched.init_noise_sigma) / float(sigmas[0])).contiguous()

            def run_edmfast(sampler=sampler, sigmas=sigmas, start=start, pos=pos, neg=neg):
                return sampler(
                    start, sigmas, cond={"encoder_hidden_states": pos}, uncond={"encoder_hidden_states": neg}
                )

            def run_diffusers(sched=sched, steps=steps, latents=latents, pos=pos, neg=neg):
                return peers.diffusers_cfg_loop(
                    unet_diffusers, sched, latents.to(dtype), pos, neg, steps, w, phi, rescale
                )

            methods = {"edmfast": run_edmfast, "diffusers": run_diffusers}
            if do_compile:

                def run_edmfast_graph(
                    sampler=graph_samplers[solver], sigmas=sigmas, start=start, pos=pos, neg=neg
                ):
                    return sampler(
                        start,
                        sigmas,
                        cond={"encoder_hidden_states": pos},
                        uncond={"encoder_hidden_states": neg},
                    )

                phases = [("edmfast_graph", "diffusers"), ("edmfast_graph", "diffusers", "edmfast")]
                methods["edmfast_graph"] = run_edmfast_graph
            else:
                phases = [("edmfast", "diffusers")]
            row: dict[str, Any] = {"nfe": steps if solver == "euler" else 2 * steps - 1}
            rows[key] = row
            with torch.no_grad():
                for phase in phases:
                    if "diffusers" in row and time.monotonic() > deadline:  # phase A always runs
                        row["edmfast_skipped"] = "section time budget spent before edmfast's compile"
                        break
                    for name in phase:
                        if f"{name}_first_call_s" not in row:  # first call: compile and/or capture
                            t0 = time.perf_counter()
                            methods[name]()
                            common.sync(device)
                            row[f"{name}_first_call_s"] = time.perf_counter() - t0
                    times = interleaved(
                        {n: methods[n] for n in phase}, device=device, repeats=args.repeats, warmup=1
                    )
                    row.update({n: stats(t) for n, t in times.items()})
                    best = min(row[n]["median_s"] for n in phase if n != "diffusers")
                    row["speedup_vs_diffusers"] = ratio(row["diffusers"]["median_s"], best)
                    name = phase[-1] if phase[-1] != "diffusers" else phase[0]
                    row["rel_diff_vs_diffusers"] = rel_err(methods[name](), run_diffusers().float())
                    res.put("rows", rows)
                    print(
                        f"[sd{'_compiled' if compiled else ''}] {key}: "
                        f"{json.dumps(common._finite_or_none(row))[:300]}",
                        flush=True,
                    )


def sec_cifar_diffusers(args, device, res: SectionResult) -> None:
    """diffusers EDMEulerScheduler on the CIFAR-class net (eager and reduce-overhead compiled) vs
    edmfast's Euler solver with graph capture, same sigmas (Karras, rho 7) and NFE, batch 64."""
    from diffusers import EDMEulerScheduler

    net = cifar_unet(device, args.tiny)
    steps = 4 if args.tiny else args.steps
    b = 2 if args.tiny else 64
    size = 8 if args.tiny else 32
    latents = torch.randn((b, 3, size, size), device=device)
    sampler = _edmfast_cifar(net, device, compile=not args.no_compile, steps=steps, solver="euler")
    compiled = net if args.no_compile else torch.compile(net, mode="reduce-overhead", fullgraph=True)
    methods = {
        "edmfast_euler": lambda: sampler(latents),
        "diffusers_edm_euler_eager": lambda: peers.diffusers_edm_loop(
            net, EDMEulerScheduler(), latents, steps
        ),
        "diffusers_edm_euler_compiled": lambda: peers.diffusers_edm_loop(
            compiled, EDMEulerScheduler(), latents, steps
        ),
    }
    with torch.no_grad():
        outs = {}
        for name, fn in methods.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            common.sync(device)
            res.put(f"{name}_first_call_s", time.perf_counter() - t0)
        times = interleaved(methods, device=device, repeats=args.repeats, warmup=1)
    res.put("batch", b)
    res.put("rows", {k: stats(v) for k, v in times.items()})
    for k in ("diffusers_edm_euler_eager", "diffusers_edm_euler_compiled"):
        res.put(
            f"speedup_vs_{k}", ratio(statistics_median(times[k]), statistics_median(times["edmfast_euler"]))
        )
    res.put("rel_diff_vs_diffusers", rel_err(outs["edmfast_euler"], outs["diffusers_edm_euler_eager"]))


def statistics_median(t: list[float]) -> float:
    return stats(t)["median_s"]


SECTIONS: dict[str, Callable[..., None]] = {
    "copy": sec_copy,
    "cifar": sec_cifar,
    "cifar_compiled": lambda a, d, r: sec_cifar(a, d, r, compiled=True),
    "compile_cold": sec_compile_probe,
    "compile_warm": sec_compile_probe,
    "sd": sec_sd,
    "sd_compiled": lambda a, d, r: sec_sd(a, d, r, compiled=True),
    "cifar_diffusers": sec_cifar_diffusers,
}


def run_section(args: argparse.Namespace) -> int:
    """Child-process entry point: run one section, results rewritten to --section-out as they come."""
    device = torch.device(args.device)
    res = SectionResult(Path(args.section_out) if args.section_out else None)
    try:
        SECTIONS[args.section](args, device, res)
    except Skip as s:
        res.put("skipped", str(s))
    return 0


def gpu_mode(
    args: argparse.Namespace, rec: Recorder, save: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the GPU sections in priority order, each in a subprocess under its own time limit;
    ``save(result)`` after every section (a kill keeps every finished one)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs CUDA (or --device cpu --tiny to exercise the code path)")
    wanted = [s for s in SECTION_ORDER if s in args.sections]
    start = time.monotonic()
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="edmfast-inductor-"))
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=str(cache),
        TRITON_CACHE_DIR=str(cache / "triton"),
        PYTHONUNBUFFERED="1",
    )
    sections: dict[str, Any] = dict(args.earlier_sections)
    ops = load_ops_json(args.ops_json)

    def result() -> dict[str, Any]:
        return {
            "summary": gpu_summary(sections, ops),
            "summary_details": gpu_summary_details(sections, ops),
            "sections": sections,
        }

    try:
        for name in wanted:
            if save is not None:
                save(result())
            left = args.budget_s - (time.monotonic() - start)
            need, cap = SECTION_TIME[name]
            if args.tiny:
                need, cap = 1, 600
            if left < need:
                rec.skipped[name] = f"budget: {left:.0f} s left, section needs at least {need} s"
                continue
            limit = min(cap, left)
            if args.in_process:
                sub = argparse.Namespace(**vars(args))
                sub.section_budget_s = 0.6 * limit
                res = SectionResult(None)
                rec.guard(name, lambda sub=sub, res=res, name=name: SECTIONS[name](sub, device, res))
                sections[name] = dict(res)
                continue
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                part = Path(f.name)
            cmd = [
                sys.executable,
                __file__,
                "--section",
                name,
                "--section-out",
                str(part),
                "--device",
                args.device,
                "--section-budget-s",
                str(0.6 * limit),
            ] + args.passthrough
            print(f"[bench] section {name} (limit {limit:.0f} s): {shlex.join(cmd)}", flush=True)
            t0 = time.monotonic()
            interrupted = False
            try:
                proc = subprocess.run(cmd, env=env, timeout=limit)
                rc: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            except KeyboardInterrupt:  # the GPU suite's limit (SIGINT): keep what the section saved
                rc, interrupted = "interrupted", True
            try:
                data = json.loads(part.read_text()) if part.stat().st_size else {}
            except (OSError, json.JSONDecodeError) as e:
                data = {"unreadable": str(e)}
            part.unlink(missing_ok=True)
            data["exit"] = rc
            data["seconds"] = round(time.monotonic() - t0, 1)
            sections[name] = data
            if "skipped" in data:
                rec.skipped[name] = data["skipped"]
            elif rc != 0:
                rec.errors[name] = (
                    f"section exited with {rc} after {data['seconds']} s (partial results kept)"
                )
            if interrupted:
                args.interrupted = True
                break
    finally:
        if not args.cache_dir:  # a cache made for this run only: the sections are done with it
            shutil.rmtree(cache, ignore_errors=True)
    return result()


def load_ops_json(path: str | None) -> dict[str, Any] | None:
    """bench_ops.py's JSON from THIS run, given by path. Never a default from benchmarks/results/:
    a committed file is another machine's (a CPU's 27.7 GB/s once passed for the GPU's copy
    bandwidth); a file from another suite run (``meta.suite_run``) is not taken either."""
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if common.suite_run() is not None and (data.get("meta") or {}).get("suite_run") != common.suite_run():
        return None
    data["_path"] = str(path)
    return data


def gpu_summary(sections: dict[str, Any], ops: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's summary: exactly GPU_SUMMARY_KEYS (null where not measured)."""
    return _gpu_numbers(sections, ops)[0]


def gpu_summary_details(sections: dict[str, Any], ops: dict[str, Any] | None) -> dict[str, Any]:
    """Numbers beside the summary (kept out of it: the issue fixes the summary's keys exactly)."""
    return _gpu_numbers(sections, ops)[1]


def _gpu_numbers(
    sections: dict[str, Any], ops: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One computation for here and for the GPU suite's summary (collect_results.py): only numbers
    measured in this run; copy bandwidth from bench_ops.py when it ran, else the ``copy`` section."""
    part, details = collect_results.sampler_numbers(sections)
    kernels = collect_results.ops_numbers(ops)
    summary = {
        "copy_bandwidth_GBps": kernels["copy_bandwidth_GBps"] or part["copy_bandwidth_GBps"],
        "kernel_bandwidth_fraction": kernels["kernel_bandwidth_fraction"],
        "sampler_overhead_ratio": part["sampler_overhead_ratio"],
        "speedup_vs_official_loop": part["speedup_vs_official_loop"],
        "speedup_vs_diffusers_compiled_cfg_b1": part["speedup_vs_diffusers_compiled_cfg_b1"],
        "first_compile_s": part["first_compile_s"],
        "warm_compile_s": part["warm_compile_s"],
    }
    details.update(
        ops_json=(ops or {}).get("_path"),
        ops_numel=kernels["kernel_numel"],
        ops_backend=kernels["kernel_backend"],
        kernel_bandwidth_GBps=kernels["kernel_bandwidth_GBps"],
        kernel_min_traffic_fraction=kernels["kernel_min_traffic_fraction"],
        goals=GOALS_GPU,
    )
    return summary, details


def gpu_markdown(record: dict[str, Any]) -> str:
    out = common.md_header("edmfast sampler benchmark — GPU", record)
    s = record["summary"]
    rows = [
        [
            k,
            ", ".join(f"{a}: {fmt(b)}" for a, b in s[k].items()) if isinstance(s.get(k), dict) else s.get(k),
            GOALS_GPU.get(k.removesuffix("_b1") if k.endswith("_b1") and k not in GOALS_GPU else k),
        ]
        for k in GPU_SUMMARY_KEYS
    ]
    out += "## Summary\n\n" + md_table(["key", "value", "goal"], rows)
    for name in ("cifar", "cifar_compiled"):
        sec = record["sections"].get(name, {})
        table = []
        for b, r in sec.get("rows", {}).items():
            if "edmfast" not in r:
                continue
            table.append(
                [
                    b,
                    med_of(r, "official"),
                    med_of(r, "edmfast"),
                    r.get("images_per_s"),
                    r.get("speedup_vs_official_loop"),
                    r.get("rel_diff_vs_official"),
                    r.get("edmfast_first_call_s"),
                ]
            )
        if table:
            out += (
                f"\n## {name}: official EDM loop vs edmfast "
                f"({sec.get('params', 0) / 1e6:.1f}M-parameter UNet, "
                f"{sec.get('config', {}).get('nfe')} NFE)\n\n"
            )
            out += md_table(
                [
                    "batch",
                    "official s",
                    "edmfast s",
                    "edmfast images/s",
                    "speedup",
                    "rel. diff",
                    "first call s",
                ],
                table,
            )
            out += (
                f"\nGraph-replayed network at batch {sec.get('overhead_batch')}: "
                f"{fmt(sec.get('denoiser_graph_replay_s'))} s per evaluation; sampler overhead ratio "
                f"{fmt(sec.get('sampler_overhead_ratio'))}.\n"
            )
    for name in ("sd", "sd_compiled"):
        sec = record["sections"].get(name, {})
        table = [
            [
                k,
                r.get("nfe"),
                med_of(r, "diffusers"),
                med_of(r, "edmfast"),
                med_of(r, "edmfast_graph"),
                r.get("speedup_vs_diffusers"),
                r.get("rel_diff_vs_diffusers"),
            ]
            for k, r in sec.get("rows", {}).items()
            if "diffusers" in r
        ]
        if table:
            out += (
                f"\n## {name}: diffusers loop vs edmfast, SD1.5-architecture UNet, CFG 7.5 + rescale 0.7\n\n"
            )
            out += md_table(
                [
                    "solver_batch",
                    "NFE",
                    "diffusers s",
                    "edmfast s",
                    "edmfast, eager net + graphs s",
                    "speedup (edmfast's best)",
                    "rel. diff",
                ],
                table,
            )
    for name in ("compile_cold", "compile_warm", "cifar_diffusers", "copy"):
        sec = record["sections"].get(name)
        if sec:
            flat = {k: v for k, v in sec.items() if not isinstance(v, dict)}
            out += f"\n## {name}\n\n" + md_table(["key", "value"], [[k, v] for k, v in flat.items()])
    return out + common.md_problems(record)


def med_of(row: dict, name: str) -> float | None:
    return (row.get(name) or {}).get("median_s")


# ============================================================================= main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI smoke test)")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="output folder")
    p.add_argument("--md-dir", default=None, help="where the Markdown goes (default: --out)")
    p.add_argument(
        "--append",
        action="store_true",
        help="GPU mode: keep the other sections of <out>/<stem>.json when this suite run wrote it",
    )
    p.add_argument("--stem", default=None, help="file name stem (default <date>-<machine>)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    # CPU mode
    p.add_argument("--shape", type=int, nargs="+", default=[64, 3, 64, 64])
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--denoiser", choices=("gaussian", "mixture"), default="gaussian")
    p.add_argument(
        "--contention",
        action="store_true",
        help="CPU mode: also time edmfast / k-diffusion / the official loop beside one busy process",
    )
    p.add_argument(
        "--no-compile-peer",
        dest="compile_peer",
        action="store_false",
        help="skip the torch.compile'd reference-step peer (CPU mode)",
    )
    # GPU mode
    p.add_argument("--device", default="cuda")
    p.add_argument("--sections", nargs="+", default=list(SECTION_ORDER), choices=SECTION_ORDER)
    p.add_argument("--budget-s", type=float, default=420.0, help="GPU mode: total seconds for all sections")
    p.add_argument("--cifar-batches", nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--sd-batches", nargs="+", default=[1, 8])
    p.add_argument("--sd-steps", type=int, default=25, help="Euler steps for SD (Heun uses half as many)")
    p.add_argument("--sd-heun", action="store_true", help="also time HeunDiscreteScheduler vs edmfast heun")
    p.add_argument("--no-compile", action="store_true", help="GPU mode: never torch.compile")
    p.add_argument("--tiny", action="store_true", help="GPU mode with tiny networks (runs on CPU too)")
    p.add_argument("--tiny-batches", nargs="+", default=[1, 2])
    p.add_argument("--in-process", action="store_true", help="GPU mode: run sections in this process")
    p.add_argument("--cache-dir", default=None, help="TORCHINDUCTOR_CACHE_DIR shared by the sections")
    p.add_argument(
        "--ops-json",
        default=None,
        help="bench_ops.py's JSON from this run (never a default: stored results are another machine's)",
    )
    # internal: one section in a child process
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--section-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--section-budget-s", type=float, default=300.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    passthrough = [
        "--repeats",
        str(args.repeats),
        "--steps",
        str(args.steps),
        "--sd-steps",
        str(args.sd_steps),
        "--cifar-batches",
        *map(str, args.cifar_batches),
        "--sd-batches",
        *map(str, args.sd_batches),
        "--tiny-batches",
        *map(str, args.tiny_batches),
    ]
    passthrough += [
        f
        for f, on in (("--tiny", args.tiny), ("--no-compile", args.no_compile), ("--sd-heun", args.sd_heun))
        if on
    ]
    args.passthrough = passthrough
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.section:
        return run_section(args)
    mode = args.mode
    if mode == "auto":
        mode = "gpu" if torch.cuda.is_available() else "cpu"
    rec = Recorder()
    t0 = time.perf_counter()
    stem = args.stem or f"{common.today()}-{common.machine_tag()}" + ("-quick" if args.quick else "")
    out_dir, md_dir = Path(args.out), Path(args.md_dir) if args.md_dir else None
    args.earlier_sections, args.interrupted = {}, False
    if args.append:  # sections an earlier invocation of this suite run wrote here are kept
        earlier = collect_results.load(out_dir / f"{stem}.json")
        if isinstance(earlier, dict) and earlier.get("suite_run") == common.suite_run() and mode == "gpu":
            args.earlier_sections = {
                k: v for k, v in (earlier.get("sections") or {}).items() if k not in args.sections
            }
            rec.errors.update(earlier.get("errors") or {})
            rec.skipped.update(earlier.get("skipped") or {})
    base = {
        "benchmark": "bench_sampler",
        "mode": mode + ("-quick" if args.quick else "") + ("-tiny" if args.tiny else ""),
        "device": torch.device(args.device).type if mode == "gpu" else "cpu",
        "date": common.today(),
        "machine": common.machine_info(),
        "versions": common.versions(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "suite_run": common.suite_run(),
    }

    def record_of(result: dict[str, Any], complete: bool) -> dict[str, Any]:
        return {
            **base,
            "wall_s": round(time.perf_counter() - t0, 1),
            "complete": complete,
            **result,
            "errors": rec.errors,
            "skipped": rec.skipped,
        }

    def save(result: dict[str, Any]) -> None:  # the JSON after every section, Markdown at the end
        common.write_results(out_dir, stem, record_of(result, False), None)

    with torch.no_grad():
        result = cpu_mode(args, rec) if mode == "cpu" else gpu_mode(args, rec, save)
    record = record_of(result, not args.interrupted)
    md = cpu_markdown(record) if mode == "cpu" else gpu_markdown(record)
    common.write_results(out_dir, stem, record, md, md_dir)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
