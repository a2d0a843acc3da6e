"""The ``edmfast`` command: ``sample`` (a quick look), ``generate`` (images to disk), ``bench``, ``info``.

`EPILOG` is the ``--help`` text's closing part: plain text (argparse prints it as it is).
"""

# torch (and edmfast's own modules, which import it) are imported inside the commands: `--help`
# and usage errors answer at once instead of after a second of torch start-up.
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

EPILOG = """examples:
  edmfast sample --out grid.png                  # the built-in shapes data set, no download
  edmfast generate --seeds 0-49999 --batch 64 --outdir out/ --model mypkg.nets:load_edm
  edmfast generate --outdir=out --seeds=0-49999 --subdirs \\
      --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl
  edmfast generate --sampler ancestral --model my_adm:load --steps 250 --outdir out/   # iDDPM / ADM / DiT
  torchrun --standalone --nproc_per_node 8 -m edmfast generate --seeds 0-49999 --outdir out/
  edmfast bench --threads 1                      # edmfast against its peers; 44 s on a shared 2-core CPU
  edmfast info                                   # which edmfast is imported, which kernels are built

Official NVlabs/edm commands paste: 'edmfast generate' in place of 'python generate.py'.
"""

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
SAMPLE_MAX_SEEDS = 4096  # a 64 x 64 grid
GENERATE_DEFAULT_SEEDS = "0-63"  # a look at a model, not a 50k FID job: that one is asked for
# Pillow format by --out suffix for `sample`
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


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
        default=None,
        metavar="N",
        help="number of noise levels N (Heun uses 2N-1 network evaluations) [default: 18; with "
        "generate --sampler ancestral: respaced steps, 250]",
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
    g.add_argument(
        "--sigma-min",
        "--sigma_min",
        type=float,
        default=None,
        help="lowest noise level, clamped to the network's range [default: 0.002; with --disc etc. the "
        "discretization's]",
    )
    g.add_argument(
        "--sigma-max",
        "--sigma_max",
        type=float,
        default=None,
        help="highest noise level, clamped to the network's range [default: 80; with --disc etc. the "
        "discretization's]",
    )
    g.add_argument(
        "--rho",
        type=float,
        default=7.0,
        help="Karras schedule exponent: larger spends more steps at low noise [default: 7]",
    )
    g.add_argument(
        "--churn",
        "--S_churn",
        dest="s_churn",
        type=float,
        default=0.0,
        metavar="S_CHURN",
        help="stochasticity S_churn >= 0: fresh noise added per step (0 = deterministic ODE; "
        "EDM ImageNet-64 uses 40) [default: 0]",
    )
    g.add_argument(
        "--s-tmin",
        "--S_min",
        type=float,
        default=0.0,
        help="churn only at noise levels >= S_tmin [default: 0]",
    )
    g.add_argument(
        "--s-tmax",
        "--S_max",
        type=float,
        default=math.inf,
        help="churn only at noise levels <= S_tmax [default: inf]",
    )
    g.add_argument(
        "--s-noise",
        "--S_noise",
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
    """argparse namespace -> `edmfast.sample` keyword arguments (`edmfast.ablation_sample`'s with
    ``--disc`` / ``--schedule`` / ``--scaling``, whose sigma range defaults to the discretization's)."""
    design = {k: getattr(args, k, None) for k in DESIGN}
    design = {k: v for k, v in design.items() if v is not None}
    if design:
        sigma_range = {"sigma_min": args.sigma_min, "sigma_max": args.sigma_max}
    else:
        sigma_range = {
            "sigma_min": SIGMA_MIN if args.sigma_min is None else args.sigma_min,
            "sigma_max": SIGMA_MAX if args.sigma_max is None else args.sigma_max,
        }
    return {
        "num_steps": HEUN_STEPS if args.steps is None else args.steps,
        "solver": args.solver,
        "alpha": args.alpha,
        **sigma_range,
        **design,
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


HEUN_STEPS = 18
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM's (the official edm_sampler's) defaults
# --disc / --schedule / --scaling: EDM's design space, as the official generate script's ablation flags
DESIGN = ("discretization", "schedule", "scaling")
# options of the Heun sampler only, with their defaults: --sampler ancestral refuses a changed one
HEUN_ONLY = {
    "--solver": ("solver", "heun"),
    "--alpha": ("alpha", 1.0),
    "--sigma-min": ("sigma_min", None),
    "--sigma-max": ("sigma_max", None),
    "--rho": ("rho", 7.0),
    "--churn": ("s_churn", 0.0),
    "--s-tmin": ("s_tmin", 0.0),
    "--s-tmax": ("s_tmax", math.inf),
    "--s-noise": ("s_noise", 1.0),
    "--disc": ("discretization", None),
    "--schedule": ("schedule", None),
    "--scaling": ("scaling", None),
}
ANCESTRAL_ONLY = {
    "--spacing": "spacing",
    "--variance": "variance",
    "--prediction-type": "prediction_type",
    "--clip/--no-clip": "clip",
    "--eta": "eta",
}


def _generate_options(args: argparse.Namespace) -> dict:
    """argparse namespace -> `edmfast.sample` or `edmfast.sample_ancestral` keyword arguments, with a
    one-line refusal of an option that belongs to the other sampler."""
    if args.sampler != "ancestral":
        given = [flag for flag, dest in ANCESTRAL_ONLY.items() if getattr(args, dest) is not None]
        if given:
            raise ValueError(f"{given[0]} applies to --sampler ancestral only (this run uses --sampler heun)")
        return _options(args)
    changed = [flag for flag, (dest, default) in HEUN_ONLY.items() if getattr(args, dest) != default]
    if changed:
        raise ValueError(f"{changed[0]} applies to --sampler heun only (this run uses --sampler ancestral)")
    # None: the model's attribute (variance, prediction_type, clip_denoised) or the default
    return {
        "num_steps": args.steps,
        "spacing": args.spacing or "leading",
        "variance": args.variance,
        "prediction_type": args.prediction_type,
        "clip_denoised": args.clip,
        "eta": args.eta,
        "noise_mode": args.noise_mode,
        "backend": args.backend,
        "guidance_scale": args.guidance,
        "guidance_rescale": args.guidance_rescale,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edmfast",
        description="Fast, verified EDM-style diffusion sampling.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sample,generate,bench,info}")
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
    s.add_argument(
        "--out",
        default="grid.png",
        help="output image; the suffix picks the format: .png, or .jpg / .jpeg (JPEG, quality 95) "
        "[default: grid.png]",
    )
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
    s.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads (torch.set_num_threads); on a machine shared with other work fewer "
        "threads are often faster [default: torch's, the number of cores]",
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
        "Pixels: uint8 = clip(x * 127.5 + 128, 0, 255) from x in [-1, 1] (as EDM).\n"
        "Official commands paste: every NVlabs/edm generate.py option is accepted in its own spelling\n"
        "(--network, --outdir, --seeds, --subdirs, --class, --batch, --steps, --sigma_min, --sigma_max,\n"
        "--rho, --S_churn, --S_min, --S_max, --S_noise, --solver, --disc, --schedule, --scaling), so\n"
        "'edmfast generate' in place of 'python generate.py' gives the official images.",
    )
    g.add_argument(
        "--seeds",
        type=_seeds_arg,
        default=None,
        help=f"seeds, e.g. 0-49999 (FID's 50k) or 1,5,7-9; one image per seed "
        f"[default: {GENERATE_DEFAULT_SEEDS}, a quick look]",
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
        "--network",
        default=None,
        metavar="PATH|URL",
        help="an official EDM / EDM2 network pickle (NVlabs/edm network-snapshot-*.pkl), a file or an "
        "http(s) URL (downloaded once into $EDMFAST_NETWORK_CACHE, default ~/.cache/edmfast/networks), "
        "run on edmfast's fused preconditioner; instead of --model. Unpickling needs the official "
        "dnnlib / torch_utils code on PYTHONPATH and runs code from the pickle",
    )
    g.add_argument(
        "--subdirs",
        action="store_true",
        help="write OUTDIR/{seed - seed %% 1000:06d}/{seed:06d}.png: one folder per 1000 seeds, as the "
        "official script's --subdirs",
    )
    g.add_argument(
        "--explain",
        action="store_true",
        help="when OUTDIR was made with other settings, list every recorded setting that differs",
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
    design = g.add_argument_group(
        "EDM's design space (the official generate script's ablation flags; any of them runs "
        "edmfast.ablation_sample: --disc vp --schedule vp --scaling vp is the paper's VP baseline, "
        "--disc ve --schedule ve --scaling none its VE one)"
    )
    design.add_argument(
        "--disc",
        dest="discretization",
        choices=("vp", "ve", "iddpm", "edm"),
        default=None,
        help="time step discretization {t_i} (EDM Table 1) [default: edm]",
    )
    design.add_argument(
        "--schedule",
        choices=("vp", "ve", "linear"),
        default=None,
        help="noise schedule sigma(t): vp, ve (sqrt t) or linear (t) [default: linear]",
    )
    design.add_argument(
        "--scaling",
        choices=("vp", "none"),
        default=None,
        help="signal scaling s(t): vp (1/sqrt(1+sigma^2)) or none [default: none]",
    )
    g.add_argument(
        "--sampler",
        choices=("heun", "ancestral"),
        default="heun",
        help="heun: EDM's sampler on a denoiser D(x, sigma); ancestral: DDPM / iDDPM / ADM / DiT "
        "ancestral sampling of an epsilon model(x_t, t) with its betas and (learned) variance "
        "[default: heun]",
    )
    anc = g.add_argument_group(
        "--sampler ancestral",
        "--model's FUNCTION returns (model, image_shape) or a model with "
        "image_shape; model(x_t, t, **cond) gets the VP state and integer training timesteps [B] and "
        "returns 2C channels (prediction, variance) or C; optional model attributes: betas (float "
        "[T]) or num_train_timesteps (1000) + beta_schedule (linear|cosine, default linear), "
        "variance, prediction_type, clip_denoised. Without --model: the built-in shapes as an exact "
        "epsilon model, cosine betas, fixed_small)",
    )
    anc.add_argument(
        "--spacing",
        default=None,
        help="which training timesteps the --steps respaced steps keep: leading, linspace, trailing, "
        "ddimN (even stride, N steps) or iDDPM section counts such as 10,10,20 (these two ignore "
        "--steps) [default: leading]",
    )
    anc.add_argument(
        "--variance",
        choices=("learned_range", "learned", "fixed_small", "fixed_large"),
        default=None,
        help="reverse-process variance: learned_range / learned read the model's second C channels; "
        "fixed_small (beta tilde) / fixed_large (beta) need C channels [default: the model's "
        "variance attribute, else learned_range]",
    )
    anc.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "sample"),
        default=None,
        help="what the model's first C channels predict [default: the model's prediction_type, else epsilon]",
    )
    anc.add_argument(
        "--clip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clip the x0 estimate to [-1, 1] each step [default: the model's clip_denoised, else on]",
    )
    anc.add_argument(
        "--eta",
        type=float,
        default=None,
        help="DDIM with this eta >= 0 instead of DDPM (0: deterministic DDIM) [default: DDPM]",
    )
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser(
        "bench",
        help="time edmfast.sample against k-diffusion and a float64 eager loop; table and chart",
        description="Time edmfast.sample against k-diffusion's sample_heun (when installed) and "
        "edmfast.reference.sample (a float64 eager loop in the style of EDM's generate script) on the "
        "same analytic Gaussian denoiser and noise, deterministic and with EDM's churn. Prints a "
        "table and writes bench-<time>.{json,md} plus a speedup chart (.png, needs matplotlib) into "
        "--out. The default run took 44 s with --threads 1 on a shared 2-core CPU (1-min load average "
        "7.7 from other work, 2026-12-07); it prints the load beside its timings. The full benchmarks "
        "are benchmarks/*.py in a source checkout.",
    )
    b.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu or cuda:1 [default: cuda if available, else cpu]",
    )
    b.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the result files [default: $XDG_CACHE_HOME/edmfast/bench, else "
        "~/.cache/edmfast/bench; never the source tree]",
    )
    b.add_argument(
        "--batch", type=_positive_int, default=64, help="images per call, 3x64x64 each [default: 64]"
    )
    b.add_argument(
        "--steps", type=_positive_int, default=18, help="Heun steps N (2N-1 evaluations) [default: 18]"
    )
    b.add_argument(
        "--repeats", type=_positive_int, default=5, help="timed calls per method (median taken) [default: 5]"
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (4x3x16x16, 6 steps, 2 repeats): a smoke test in seconds",
    )
    b.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads (torch.set_num_threads); on a machine shared with other work fewer "
        "threads are often faster [default: torch's, the number of cores]",
    )
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser(
        "info",
        help="which edmfast is imported (path), its version and which kernels can run here",
        description="Print the imported edmfast's path and version, torch's, and for each backend "
        "whether it can run here and why not: the first thing to check when the native kernels are "
        "missing or a source checkout in the current folder shadows the installed package.",
    )
    i.set_defaults(func=cmd_info)
    return parser


def _set_threads(threads: int | None) -> int:
    """Apply ``--threads`` (torch's intra-op threads, which the native CPU kernels follow too)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_load(threads: int) -> tuple[dict[str, Any], str | None]:
    """The 1-minute load average beside a timing, and a warning when other work leaves this run
    fewer cores than ``threads``: ({"load_avg_1min", "cores", "threads"}, warning or None).

    On a loaded 2-core box, 2 torch threads made edmfast sample / bench 3-7x slower than 1 thread
    (a thread that is descheduled holds up the others at every parallel region). Busy means the
    load (taken before this run's own work) exceeds cores - threads + 0.5."""
    cores = _cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return {"load_avg_1min": None, "cores": cores, "threads": threads}, None
    info = {"load_avg_1min": round(load, 2), "cores": cores, "threads": threads}
    if load <= cores - threads + 0.5:
        return info, None
    fits = max(1, int(cores - load + 0.5))
    advice = (
        f"--threads {fits} may be faster" if fits < threads else "rerun on an idle machine for stable numbers"
    )
    return info, (
        f"warning: the machine is busy (1-min load average {load:.2f} on {cores} cores, {threads} "
        f"thread(s) asked for): timings are slower and noisier than on an idle machine; {advice}"
    )


def load_text(info: dict[str, Any], threads: bool = True) -> str:
    load = info["load_avg_1min"]
    where = "unknown" if load is None else f"{load:.2f}"
    text = f"1-min load average {where} on {info['cores']} cores (before the run)"
    return text + (f", {info['threads']} thread(s)" if threads else "")


def _device(name: str | None) -> torch.device:
    from .generate import resolve_device

    return resolve_device(name)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- sample


def image_format(out: Path) -> str:
    """Pillow's format name for ``--out``'s suffix; a ValueError for any other suffix."""
    fmt = IMAGE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"--out {out}: unknown image type {out.suffix or '(no suffix)'!r}; end the name in "
            f"{', '.join(IMAGE_FORMATS)}"
        )
    return fmt


def where_imported() -> str:
    """The folder ``edmfast`` was imported from: a source checkout in the current folder shadows
    an installed package, and its missing build is the usual reason for missing native kernels."""
    return str(Path(__file__).resolve().parent)


def native_note() -> str | None:
    """One line when the native CPU kernels are missing (the run then falls back to torch ops)."""
    from . import native

    why = native.why_unavailable("cpu")
    if why is None:
        return None
    # edmfast.native may name the folder itself; say it once
    return f"note: {why}" + (
        "" if "imported from" in why else f"; edmfast was imported from {where_imported()}"
    )


def quality_verdict(landed: float, distinct: int, n: int, k: int) -> str:
    """One line judging a sample of ``n`` seeds from a data set of ``k`` images.

    A correct sampler lands every sample on a training image and reaches as many distinct images
    as ``n`` fair draws would. Too few steps fail either way: one step gives blurred blends, two or
    three land exactly but on fewer images (the early giant steps pull samples towards a few
    modes), which "100% landed" alone would hide. Low variety means more than 3 standard
    deviations below the fair-draw count.
    """
    q1, q2 = (1 - 1 / k) ** n, (1 - 2 / k) ** n
    mean = k * (1 - q1)
    std = max(k * (k - 1) * q2 + k * q1 - (k * q1) ** 2, 0.0) ** 0.5
    if landed < 0.9:
        return (
            f"blurred or blended samples ({100 * (1 - landed):.0f}% off the data): too few --steps, "
            "or a sampler that is not converging"
        )
    if distinct < mean - 3 * std:
        return (
            f"sharp but low variety ({distinct} distinct images, ~{mean:.0f} expected): too few --steps "
            "pull samples onto a few images; use more steps"
        )
    return "exact samples with the variety of fair draws"


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from . import Sampler, ops
    from .data import ShapesDenoiser, image_grid, nearest_rms, to_uint8
    from .generate import atomic_write, sample_seeds

    device = _device(args.device)
    threads = _set_threads(args.threads)
    load, busy = machine_load(threads)
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
    fmt = image_format(out)
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
        save_kw: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {}
        atomic_write(out, lambda f: img.save(f, format=fmt, **save_kw))
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
    steps = options["num_steps"]
    print(f"wrote {out} ({len(seeds)} images, {img.width}x{img.height})")
    print(
        f"sampler: {options['solver']}, {steps} step{'s' if steps != 1 else ''} "
        f"({nfe} denoiser call{'s' if nfe != 1 else ''}), "
        f"S_churn={options['s_churn']:g}, backend {backend} on {device}"
    )
    print(
        f"time: {elapsed * 1e3 / len(seeds):.3f} ms per image ({elapsed:.3f} s for {len(seeds)}); "
        + load_text(load)
    )
    if busy is not None:
        print(busy)
    print(
        f"distance to the nearest training image (RMS, 8-bit levels): median {rms.median():.2f}, "
        f"max {rms.max():.2f}"
    )
    print(
        f"landed on a training image (RMS < 0.5 level): {int(on_data.sum())}/{len(seeds)} "
        f"({100 * float(on_data.double().mean()):.0f}%); distinct training images reached: "
        f"{int(hit[on_data].unique().numel())} of {k} (~{expected:.0f} expected from {len(seeds)} fair draws)"
    )
    distinct = int(hit[on_data].unique().numel())
    print(f"verdict: {quality_verdict(float(on_data.double().mean()), distinct, len(seeds), k)}")
    note = native_note()
    if note is not None:
        print(note)
    return 0


# ----------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import ManifestMismatch, OutputError, generate

    seeds = args.seeds
    if seeds is None:
        seeds = _seeds_arg(GENERATE_DEFAULT_SEEDS)
        print(f"--seeds not given: generating seeds {GENERATE_DEFAULT_SEEDS} (for FID: --seeds 0-49999)")
    try:
        generate(
            seeds,
            args.outdir,
            batch=args.batch,
            model=args.model,
            options=_generate_options(args),
            device=args.device,
            npz=args.npz,
            progress=not args.no_progress,
            class_idx=args.class_idx,
            network=args.network,
            sampler=args.sampler,
            subdirs=args.subdirs,
        )
    except ManifestMismatch as e:
        print(f"edmfast generate: error: {_one_line(e)}", file=sys.stderr)
        if args.explain:
            for line in e.details:
                print(f"  {line}", file=sys.stderr)
        return 2
    except OutputError as e:
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


def bench_dir(out: str | None) -> Path:
    """Where `edmfast bench` writes: ``--out``, else the user's cache folder (never the source tree)."""
    if out:
        return Path(out)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edmfast" / "bench"


def load_k_diffusion_sampling() -> Any:
    """k-diffusion's ``sampling`` module, or None when k-diffusion is not installed.

    Its package ``__init__`` imports torchvision and more; ``sampling.py`` needs only
    ``utils.append_dims``, so when the package does not import, ``sampling.py`` is loaded on its own
    with that one helper.
    """
    import importlib.util
    import types

    try:
        from k_diffusion import sampling  # type: ignore[import-not-found,import-untyped,unused-ignore]

        return sampling
    except ImportError:
        pass
    if "_edmfast_kd.sampling" in sys.modules:
        return sys.modules["_edmfast_kd.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]

    def append_dims(x: Any, target_dims: int) -> Any:  # k_diffusion/utils.py
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * dims_to_append]

    package = types.ModuleType("_edmfast_kd")
    package.__path__ = [root]
    utils = types.ModuleType("_edmfast_kd.utils")
    utils.append_dims = append_dims  # type: ignore[attr-defined]
    package.utils = utils  # type: ignore[attr-defined]
    sub = importlib.util.spec_from_file_location("_edmfast_kd.sampling", f"{root}/sampling.py")
    if sub is None or sub.loader is None:
        return None
    module = importlib.util.module_from_spec(sub)
    sys.modules.update({"_edmfast_kd": package, "_edmfast_kd.utils": utils, "_edmfast_kd.sampling": module})
    try:
        sub.loader.exec_module(module)
    except ImportError:  # its own dependencies (torchsde, scipy, ...) are missing
        for name in ("_edmfast_kd", "_edmfast_kd.utils", "_edmfast_kd.sampling"):
            sys.modules.pop(name, None)
        return None
    return module


CHURN = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}  # EDM's ImageNet-64 values


def builtin_bench(
    device: torch.device, batch: int = 64, num_steps: int = 18, repeats: int = 5, size: int = 64
) -> dict[str, Any]:
    """Median wall time of edmfast.sample, k-diffusion's sample_heun and edmfast.reference.sample.

    Same analytic denoiser (`GaussianDenoiser`, whose cost is small: the loop is what is timed),
    same noise and Karras schedule; deterministic and with churn. The methods run interleaved,
    one call each per round, so a load change on the machine hits them alike.
    """
    import torch

    from . import karras_sigmas, reference, sample
    from .analytic import GaussianDenoiser

    den = GaussianDenoiser(0.3, 0.5)
    shape = (batch, 3, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    seeds = torch.arange(batch, device=device)
    sigmas = karras_sigmas(num_steps)
    sig32 = sigmas.float().to(device)
    kd = load_k_diffusion_sampling()
    configs: list[dict[str, Any]] = []
    for churn in ({}, CHURN):
        name = "deterministic" if not churn else "churn"

        def run_edmfast(churn: dict = churn) -> torch.Tensor:
            mode = {"noise_mode": "fused", "seeds": seeds} if churn else {}
            return sample(den, noise, num_steps=num_steps, **churn, **mode)

        def run_reference(churn: dict = churn) -> torch.Tensor:
            g = torch.Generator(device).manual_seed(0)
            return reference.sample(den, noise.double(), num_steps=num_steps, generator=g, **churn)

        methods: dict[str, Any] = {"edmfast.sample": run_edmfast}
        if kd is not None:

            def run_kd(churn: dict = churn) -> torch.Tensor:
                torch.manual_seed(0)  # k-diffusion draws its churn noise from torch's global RNG
                return kd.sample_heun(den, noise * sig32[0], sig32, disable=True, **churn)

            methods["k-diffusion sample_heun"] = run_kd
        methods["edmfast.reference (float64)"] = run_reference
        outputs = {k: fn() for k, fn in methods.items()}  # warm-up (plans, caches, lazy init)
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(repeats):
            for k, fn in methods.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
        ref = outputs["edmfast.reference (float64)"]
        rows: list[dict[str, Any]] = []
        for k, t in times.items():
            med = sorted(t)[len(t) // 2]
            # churn noise streams differ between methods, so only the deterministic run has an error
            err = float((outputs[k].double() - ref).norm() / ref.norm()) if not churn else None
            rows.append({"method": k, "s": med, "images_per_s": batch / med, "rel_err": err})
        ed = float(rows[0]["s"])
        for r in rows:
            r["edmfast_speedup"] = float(r["s"]) / ed
        configs.append({"config": name, **({"churn": churn} if churn else {}), "rows": rows})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": list(shape),
        "num_steps": num_steps,
        "repeats": repeats,
        "denoiser": "edmfast.analytic.GaussianDenoiser(0.3, 0.5)",
        "skipped": {} if kd is not None else {"k-diffusion sample_heun": "install k-diffusion to compare"},
        "configs": configs,
    }


def bench_markdown(result: dict[str, Any]) -> str:
    n = result["num_steps"]
    lines = [
        f"edmfast bench, {result['date']}: {'x'.join(map(str, result['shape']))}, {n} Heun "
        f"step{'s' if n != 1 else ''} ({2 * n - 1} evaluations), analytic Gaussian denoiser, "
        f"{result['device']}, torch {result['torch']}, {result['threads']} thread(s), median of "
        f"{result['repeats']}",
        "",
    ]
    machine = result.get("machine")
    if machine is not None:
        lines[0] += (
            f"; {load_text(machine, threads=False)}; the whole comparison took {machine['wall_s']:.0f} s"
        )
    for c in result["configs"]:
        extra = (
            f" (S_churn={c['churn']['s_churn']:g}, fused Philox noise for edmfast)" if "churn" in c else ""
        )
        lines += [
            f"{c['config']}{extra}:",
            "",
            "| method | s / batch | images/s | edmfast speedup | rel. error vs float64 |",
            "|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
            speed = f"{r['edmfast_speedup']:.2f}x"
            lines.append(f"| {r['method']} | {r['s']:.4f} | {r['images_per_s']:.1f} | {speed} | {err} |")
        lines.append("")
    for name, why in result["skipped"].items():
        lines.append(f"{name}: skipped: {why}")
    return "\n".join(lines).rstrip() + "\n"


def bench_chart(result: dict[str, Any], path: Path) -> str | None:
    """A bar chart of edmfast's speedup over each peer; None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "install matplotlib for the chart"
    peers = [r["method"] for r in result["configs"][0]["rows"][1:]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / max(len(peers), 1)
    for j, peer in enumerate(peers):
        values = [
            next(r["edmfast_speedup"] for r in c["rows"] if r["method"] == peer) for c in result["configs"]
        ]
        xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(values))]
        bars = ax.bar(xs, values, width, label=f"vs {peer}")
        ax.bar_label(bars, fmt="%.1fx")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(result["configs"])), [c["config"] for c in result["configs"]])
    ax.set_ylabel("edmfast speedup")
    ax.set_title(f"edmfast.sample, {'x'.join(map(str, result['shape']))}, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    from .generate import atomic_write

    device = _device(args.device)
    threads = _set_threads(args.threads)
    load, busy = machine_load(threads)
    out = bench_dir(args.out)
    batch, steps, repeats, size = (4, 6, 2, 16) if args.quick else (args.batch, args.steps, args.repeats, 64)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create it ({e.strerror or e}); pick another folder") from e
    print(
        f"timing {batch}x3x{size}x{size}, {steps} Heun steps on {device}; {load_text(load)}; results go "
        f"to {out}",
        flush=True,
    )
    if busy is not None:
        print(busy, flush=True)
    t0 = time.perf_counter()
    result = builtin_bench(device, batch, steps, repeats, size)
    result["machine"] = {**load, "wall_s": round(time.perf_counter() - t0, 1)}
    md = bench_markdown(result)
    print()
    print(md, end="")
    stem = "bench-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    atomic_write(out / f"{stem}.json", lambda f: f.write(json.dumps(result, indent=2).encode() + b"\n"))
    atomic_write(out / f"{stem}.md", lambda f: f.write(md.encode()))
    written = [f"{stem}.json", f"{stem}.md"]
    why = bench_chart(result, out / f"{stem}.png")
    if why is None:
        written.append(f"{stem}.png")
    else:
        print(f"chart skipped: {why}")
    print(f"wrote {', '.join(str(out / w) for w in written)}")
    note = native_note()
    if note is not None:
        print(note)
    return 0


# ----------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, native, ops

    print(f"edmfast {__version__} imported from {where_imported()}")
    print(f"python {sys.version.split()[0]} at {sys.executable}; torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    print(f"CUDA devices: {torch.cuda.device_count() if cuda else 0}")
    for kind in ("cpu", "cuda"):
        why = native.why_unavailable(kind)
        print(f"native {kind} kernels: {'yes' if why is None else 'no: ' + why}")
    for name in ("cpu", "cuda"):
        if name == "cuda" and not cuda:
            continue
        print(f"backend auto on {name}: {ops.resolve_backend('auto', torch.device(name))}")
    return 0


def shadow_problem() -> str | None:
    """Why ``edmfast`` is not this package, or None.

    From a clone's parent folder, ``python -m edmfast`` finds the clone (a folder named edmfast
    without ``__init__.py``) first on sys.path and imports it as an empty namespace package; an
    editable install then still supplies this module, but ``edmfast.__version__`` and every lazy
    export are missing. Say so instead of an ImportError deep inside a command."""
    package = sys.modules.get(__package__ or "edmfast")
    spec = getattr(package, "__spec__", None)
    # a namespace package: found by the path finder, no file, only search locations
    if spec is None or spec.origin is not None or spec.submodule_search_locations is None:
        return None
    here = Path(__file__).resolve().parent
    others = [p for p in getattr(package, "__path__", []) if Path(p).resolve() != here]
    folder = others[0] if others else "a folder named edmfast"
    return (
        f"the folder {folder} shadows the edmfast package: it has no __init__.py, and python -m looks "
        "in the current folder first, so Python imported that folder as an empty namespace package. "
        f"Run the command from another folder (e.g. cd {folder}), or use the edmfast command, which "
        "does not search the current folder"
    )


def main(argv: list[str] | None = None) -> int:
    # torch's OpenMP threads spin-wait between parallel regions by default; beside the denoiser's
    # own small ops that burns the cores other threads (or other processes) need: with passive
    # waiting the 2-thread loop ran at 1.01x of 1 thread beside a busy process. It must be set
    # before torch is imported (every command imports it later); the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    shadow = shadow_problem()
    if shadow is not None:
        print(f"edmfast: error: {shadow}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from .ops import BackendUnavailable

    try:
        return args.func(args)
    except (ValueError, TypeError, BackendUnavailable) as e:
        # bad options (e.g. --alpha with --solver heun, --backend cuda without a GPU) come back from
        # edmfast's validation with the option named; a traceback would only bury that. The
        # library names its Python options (num_steps, solver='2nd'): say the flags instead
        where = ""
        if isinstance(e, BackendUnavailable) and "imported from" not in str(e):
            where = f" (edmfast imported from {where_imported()})"
        text = _one_line(e)
        if args.command in ("sample", "generate"):
            from .generate import cli_words

            text = cli_words(text, argv)
        print(f"edmfast {args.command}: error: {text}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: every finished file is complete (atomic renames), so a rerun picks up from here
        resume = "; rerun the same command to resume" if args.command == "generate" else ""
        print(f"edmfast {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
