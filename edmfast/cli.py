"""The ``edmfast`` command: ``sample`` (a quick look), ``generate`` (images to disk), ``bench``.

edmfast sample --out grid.png                       # built-in shapes data set, no download
edmfast generate --seeds 0-49999 --batch 64 --outdir out/
torchrun --standalone --nproc_per_node 8 -m edmfast generate --seeds 0-49999 --outdir out/
edmfast bench
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
SAMPLE_MAX_SEEDS = 4096  # a 64 x 64 grid


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text would bury the message)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seeds_arg(text: str) -> list[int]:
    from .generate import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sampler_parent() -> _Parser:
    """Sampler options shared by ``sample`` and ``generate`` (EDM Algorithm 2's knobs)."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("sampler (EDM Algorithm 2; defaults are EDM's deterministic Heun sampler)")
    g.add_argument(
        "--steps",
        type=int,
        default=18,
        metavar="N",
        help="number of noise levels N (Heun uses 2N-1 network evaluations) [default: 18]",
    )
    g.add_argument(
        "--solver",
        choices=("heun", "euler", "2nd"),
        default="heun",
        help="heun: 2nd order (EDM); euler: 1st order, N evaluations; 2nd: generalized 2nd order "
        "with --alpha [default: heun]",
    )
    g.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="where solver 2nd evaluates its 2nd slope, in (0, 1]: 1 = Heun, 0.5 = midpoint; "
        "only with --solver 2nd [default: 1]",
    )
    g.add_argument("--sigma-min", type=float, default=0.002, help="lowest noise level [default: 0.002]")
    g.add_argument("--sigma-max", type=float, default=80.0, help="highest noise level [default: 80]")
    g.add_argument(
        "--rho",
        type=float,
        default=7.0,
        help="Karras schedule exponent: larger spends more steps at low noise [default: 7]",
    )
    g.add_argument(
        "--churn",
        dest="s_churn",
        type=float,
        default=0.0,
        metavar="S_CHURN",
        help="stochasticity S_churn >= 0: fresh noise added per step (0 = deterministic ODE; "
        "EDM ImageNet-64 uses 40) [default: 0]",
    )
    g.add_argument(
        "--s-tmin", type=float, default=0.0, help="churn only at noise levels >= S_tmin [default: 0]"
    )
    g.add_argument(
        "--s-tmax", type=float, default=math.inf, help="churn only at noise levels <= S_tmax [default: inf]"
    )
    g.add_argument(
        "--s-noise",
        type=float,
        default=1.0,
        help="scale of the churn noise S_noise (slightly > 1 offsets detail loss) [default: 1]",
    )
    g.add_argument(
        "--noise-mode",
        choices=("exact", "fused"),
        default="exact",
        help="exact: churn noise from each seed's torch.Generator, like EDM's generate script; "
        "fused: counter-based Philox noise made inside the kernels [default: exact]",
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="kernels for the per-step update: torch (eager), cpu (C++), cuda (CUDA C++), "
        "triton; auto picks the fastest available [default: auto]",
    )
    g.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu, cuda, cuda:1 [default: cuda if available, else cpu]",
    )
    return p


def _options(args: argparse.Namespace) -> dict:
    """argparse namespace -> `edmfast.sample` keyword arguments."""
    return {
        "num_steps": args.steps,
        "solver": args.solver,
        "alpha": args.alpha,
        "sigma_min": args.sigma_min,
        "sigma_max": args.sigma_max,
        "rho": args.rho,
        "s_churn": args.s_churn,
        "s_tmin": args.s_tmin,
        "s_tmax": args.s_tmax,
        "s_noise": args.s_noise,
        "noise_mode": args.noise_mode,
        "backend": args.backend,
        **(
            {"guidance_scale": args.guidance, "guidance_rescale": args.guidance_rescale}
            if "guidance" in args
            else {}
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edmfast",
        description="Fast, verified EDM-style diffusion sampling.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sample,generate,bench}")
    common = _sampler_parent()

    s = sub.add_parser(
        "sample",
        parents=[common],
        help="sample the built-in shapes data set into a PNG grid",
        description="Sample the built-in data set (32 procedurally drawn 32x32 images of shapes; its exact "
        "denoiser, no download) and write a PNG grid. Prints the time per image and how close each "
        "sample is to its nearest training image: an exact sampler lands on one (RMS 0 up to 8-bit "
        "rounding); too few steps give blurred blends.",
    )
    s.add_argument("--out", default="grid.png", help="output PNG path [default: grid.png]")
    s.add_argument(
        "--seeds",
        type=_seeds_arg,
        default=list(range(64)),
        help="seeds, e.g. 0-63 or 1,5,7-9: one image per seed [default: 0-63]",
    )
    s.add_argument(
        "--zoom",
        type=_positive_int,
        default=2,
        help="enlarge the grid by this integer factor (nearest neighbour) [default: 2]",
    )
    s.set_defaults(func=cmd_sample)

    g = sub.add_parser(
        "generate",
        parents=[common],
        help="write one PNG per seed (resumable; multi-GPU with torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write OUTDIR/{seed:06d}.png for every seed, e.g. 50k images for FID.",
        epilog="Each image depends on its seed only: latents and churn noise come from that seed's own\n"
        "torch.Generator, so results do not depend on --batch or on the number of processes.\n"
        "Multi-GPU / multi-node: torchrun --nproc_per_node G -m edmfast generate ... (rank r takes\n"
        "seeds[r::world]; NCCL on GPU, gloo on CPU). Files are written atomically; a rerun skips\n"
        "seeds whose PNG exists and decodes, so an interrupted run resumes where it stopped; jobs with\n"
        "disjoint seeds may write into one OUTDIR at the same time. OUTDIR/manifest.json records the\n"
        "model, image shape, sampler options and edmfast version; a rerun with different ones is refused.\n"
        "Pixels: uint8 = clip(x * 127.5 + 128, 0, 255) from x in [-1, 1] (as EDM).",
    )
    g.add_argument(
        "--seeds",
        type=_seeds_arg,
        default=list(range(50000)),
        help="seeds, e.g. 0-49999 or 1,5,7-9 [default: 0-49999]",
    )
    g.add_argument(
        "--batch", type=_positive_int, default=64, help="images per sampler call, per process [default: 64]"
    )
    g.add_argument("--outdir", required=True, help="output folder (created if missing)")
    g.add_argument(
        "--model",
        default="edmfast.data:default_model",
        metavar="MODULE:FUNCTION",
        help="import MODULE and call FUNCTION() (no arguments); it must return (denoiser, image_shape) "
        "or a denoiser with an image_shape attribute, where image_shape = (C, H, W) and "
        "denoiser(x, sigma, **cond) -> x0 estimate in [-1, 1] pixel space (e.g. an "
        "edmfast.EDMPrecond). THIS RUNS THAT MODULE'S CODE. The current folder is importable while "
        "MODULE is imported (only for a --model of yours). "
        "[default: edmfast.data:default_model, the built-in shapes data set]",
    )
    g.add_argument(
        "--npz",
        action="store_true",
        help="also write OUTDIR/images.npz (arr_0: uint8 [N, H, W, C], seed order) for FID tools",
    )
    g.add_argument(
        "--no-progress", action="store_true", help="do not show the progress bar (shown by rank 0 otherwise)"
    )
    cls = g.add_argument_group(
        "class-conditional models (a denoiser, or its .model, with label_dim > 0, called with "
        "class_labels=one-hot [B, label_dim])"
    )
    cls.add_argument(
        "--class",
        dest="class_idx",
        type=int,
        default=None,
        help="generate this class only [default: a random class per seed, drawn from the seed's "
        "generator after its latents, as in EDM's generate script]",
    )
    cls.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance scale w; the unconditional call gets all-zero labels "
        "[default: 1, off]",
    )
    cls.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="CFG rescale phi in [0, 1] (Lin et al. 2023) [default: 0]",
    )
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser(
        "bench",
        help="time edmfast.sample against the plain PyTorch reference",
        description="Run benchmarks/bench_sampler.py --quick when this is a source checkout; otherwise a "
        "small built-in timing of edmfast.sample vs edmfast.reference.sample (float64 eager loop) on the "
        "built-in data set's exact denoiser.",
    )
    b.add_argument(
        "--device", default=None, help="torch device for the built-in timing [default: cuda if available]"
    )
    b.set_defaults(func=cmd_bench)
    return parser


def _device(name: str | None) -> torch.device:
    from .generate import resolve_device

    return resolve_device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- sample


def cmd_sample(args: argparse.Namespace) -> int:
    from PIL import Image

    from . import Sampler, ops
    from .data import ShapesDenoiser, image_grid, nearest_rms, to_uint8
    from .generate import atomic_write, sample_seeds

    device = _device(args.device)
    options = _options(args)
    seeds = args.seeds
    if len(seeds) > SAMPLE_MAX_SEEDS:  # one batch and one grid: 10^6 seeds would be 12 GB of noise
        raise ValueError(
            f"--seeds: sample draws one grid of at most {SAMPLE_MAX_SEEDS} images, got {len(seeds)}; "
            "use edmfast generate for more"
        )
    if args.zoom > 64:  # 64x already turns a 64-image grid into 17k x 17k pixels
        raise ValueError(f"--zoom must be in [1, 64], got {args.zoom}")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path such as {out / 'grid.png'}")
    denoiser = ShapesDenoiser().to(device)
    sampler = Sampler(denoiser, **options)
    # warm-up on the same batch (lazy init, caches, the CUDA graph capture): the timed call is a
    # steady-state one
    sample_seeds(sampler, denoiser.image_shape, seeds, device)
    _sync(device)
    t0 = time.perf_counter()
    x = sample_seeds(sampler, denoiser.image_shape, seeds, device)
    _sync(device)
    elapsed = time.perf_counter() - t0

    images = to_uint8(x.cpu())
    grid = image_grid(images).numpy()
    img = Image.fromarray(grid)
    if args.zoom > 1:
        img = img.resize((img.width * args.zoom, img.height * args.zoom), Image.Resampling.NEAREST)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: img.save(f, format="PNG"))
    except OSError as e:
        why = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        raise ValueError(f"--out {out}: cannot write it ({why}); pick another path") from e

    rms = nearest_rms(x.cpu(), denoiser.images)
    nearest = torch.cdist(
        to_uint8(x.cpu()).flatten(1).double(), to_uint8(denoiser.images).flatten(1).double()
    )
    hit = nearest.argmin(dim=1)
    on_data = rms < 0.5  # the data set is 8-bit, so a sample on a training image matches it exactly
    k = denoiser.images.shape[0]
    expected = k * (1 - (1 - 1 / k) ** len(seeds))  # distinct images among len(seeds) uniform draws
    nfe = options["num_steps"] * (2 if options["solver"] != "euler" else 1) - (options["solver"] != "euler")
    backend = ops.resolve_backend(options["backend"], device)
    print(f"wrote {out} ({len(seeds)} images, {img.width}x{img.height})")
    print(
        f"sampler: {options['solver']}, {options['num_steps']} steps ({nfe} denoiser calls), "
        f"S_churn={options['s_churn']:g}, backend {backend} on {device}"
    )
    print(f"time: {elapsed * 1e3 / len(seeds):.3f} ms per image ({elapsed:.3f} s for {len(seeds)})")
    print(
        f"distance to the nearest training image (RMS, 8-bit levels): median {rms.median():.2f}, "
        f"max {rms.max():.2f}"
    )
    print(
        f"landed on a training image (RMS < 0.5 level): {int(on_data.sum())}/{len(seeds)} "
        f"({100 * float(on_data.double().mean()):.0f}%); distinct training images reached: "
        f"{int(hit[on_data].unique().numel())} of {k} (~{expected:.0f} expected from {len(seeds)} fair draws)"
    )
    return 0


# ----------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import ManifestMismatch, OutputError, generate

    try:
        generate(
            args.seeds,
            args.outdir,
            batch=args.batch,
            model=args.model,
            options=_options(args),
            device=args.device,
            npz=args.npz,
            progress=not args.no_progress,
            class_idx=args.class_idx,
        )
    except (ManifestMismatch, OutputError) as e:
        print(f"edmfast generate: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(
            f"edmfast generate: error: the model gave NaN or inf ({_one_line(e)}); check --model and "
            "its weights, or the sampler options (--sigma-max, --guidance); nothing was written for "
            "the failing batch",
            file=sys.stderr,
        )
        return 2
    return 0


# ----------------------------------------------------------------------------- bench


def bench_script() -> Path | None:
    """benchmarks/bench_sampler.py of a source checkout (next to the package), if there is one."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sampler.py"
    return path if path.is_file() else None


def builtin_bench(device: torch.device, batch: int = 16, num_steps: int = 18, repeats: int = 3) -> list[dict]:
    """Median wall time of edmfast.sample vs edmfast.reference.sample, same denoiser and inputs."""
    from . import PerSampleGenerator, reference, sample
    from .data import ShapesDenoiser

    denoiser = ShapesDenoiser().to(device)
    rows = []
    for churn in (0.0, 40.0):
        rng = PerSampleGenerator(range(batch), device)
        noise = rng.randn([batch, *denoiser.image_shape])
        kw: dict[str, Any] = dict(
            num_steps=num_steps, s_churn=churn, generator=torch.Generator(device).manual_seed(0)
        )
        times = {}
        for name, fn in (("edmfast.sample", sample), ("edmfast.reference.sample", reference.sample)):
            fn(denoiser, noise, **kw)  # warm-up
            runs = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                fn(denoiser, noise, **kw)
                _sync(device)
                runs.append(time.perf_counter() - t0)
            times[name] = sorted(runs)[len(runs) // 2]
        for name, t in times.items():
            rows.append(
                {
                    "loop": name,
                    "s_churn": churn,
                    "ms": t * 1e3,
                    "images_per_s": batch / t,
                    "speedup": times["edmfast.reference.sample"] / t,
                }
            )
    return rows


def cmd_bench(args: argparse.Namespace) -> int:
    script = bench_script()
    if script is not None:
        print(f"running {script} --quick")
        return subprocess.call([sys.executable, str(script), "--quick"])
    device = _device(args.device)
    batch, steps = 16, 18
    print(
        f"built-in timing: exact denoiser of the shapes data set, {batch}x3x32x32, {steps} Heun steps, "
        f"{device}, torch {torch.__version__} (median of 3)"
    )
    print(f"{'loop':<26} {'S_churn':>7} {'ms/batch':>10} {'images/s':>10} {'vs reference':>13}")
    for r in builtin_bench(device, batch, steps):
        speed = f"{r['speedup']:>12.2f}x"
        print(f"{r['loop']:<26} {r['s_churn']:>7g} {r['ms']:>10.2f} {r['images_per_s']:>10.1f} {speed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .ops import BackendUnavailable

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, BackendUnavailable) as e:
        # bad options (e.g. --alpha with --solver heun, --backend cuda without a GPU) come back from
        # edmfast's validation with the option named; a traceback would only bury that
        print(f"edmfast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: every finished file is complete (atomic renames), so a rerun picks up from here
        resume = "; rerun the same command to resume" if args.command == "generate" else ""
        print(f"edmfast {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
