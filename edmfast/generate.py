"""Large-scale generation to disk (``edmfast generate``): one PNG per seed, resumable, multi-process.

Guarantees (SPEC §4, §6):

* **Per-seed images.** Sample b's latents and churn noise come from its own
  ``torch.Generator().manual_seed(seed)`` (`edmfast.PerSampleGenerator`), as in EDM's generate
  script, so an image depends on its seed only, not on the batch size, the batch it landed in or
  the number of processes (up to the network's own batch-size dependence, if any).
* **Multi-process.** Under ``torchrun`` (WORLD_SIZE > 1) rank r takes ``seeds[r::world]`` and the
  ranks meet in torch.distributed barriers (gloo on CPU, NCCL on GPU); the files are the same as a
  single-process run's.
* **Never a half-written file.** Every file is written to a temporary name in the output folder
  and renamed over its final name with ``os.replace`` (atomic on POSIX), so a kill leaves either no
  file or a complete one; stale temporaries of a killed run are removed at the next start.
* **Resume.** Seeds whose PNG exists are skipped, so rerunning after a kill finishes the job
  without losing or duplicating a seed.
* **No silent mixing.** ``manifest.json`` records what determines the images (model, image
  shape, sampler options, edmfast version); a rerun into the same folder with anything different is
  refused with the differing entries named. The backend and device are not recorded: they change
  the floats by rounding only, so a run may be resumed on another machine.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import to_uint8
from .rng import PerSampleGenerator
from .sampler import Sampler

DEFAULT_MODEL = "edmfast.data:default_model"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"

# sampler options that change the images; backend, device, compile, cuda_graph change only rounding
IMAGE_OPTIONS = (
    "num_steps",
    "sigma_min",
    "sigma_max",
    "rho",
    "solver",
    "alpha",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "s_noise",
    "noise_mode",
    "guidance_scale",
    "guidance_rescale",
)


class ManifestMismatch(RuntimeError):
    """The output folder holds images made with different options."""


# ----------------------------------------------------------------------------- seeds, files


def parse_seeds(text: str) -> list[int]:
    """``"0-49999"``, ``"3"`` or ``"0-9,20,30-31"`` -> a list of distinct non-negative seeds, in order."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"seeds must look like '0-49999' or '1,5,7-9', got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"seed range {part!r} is empty (end before start)")
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {text!r} repeat a seed")
    return seeds


def image_path(outdir: Path, seed: int) -> Path:
    return outdir / f"{seed:06d}.png"


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write via ``write(file_object)`` to a temporary file next to ``path``, then rename it over ``path``.

    Same folder, so the rename never crosses file systems and is atomic: readers and a resumed run
    see the old state or the complete new file, never a partial one.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(path: Path, image: np.ndarray) -> None:
    """uint8 [H, W, C] (C = 1 or 3) -> PNG, atomically."""
    img = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def remove_stale_temporaries(outdir: Path) -> int:
    """Delete temporaries left by a killed run (only ever called before any writer starts)."""
    stale = list(outdir.glob(TMP_PREFIX + "*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


# ----------------------------------------------------------------------------- manifest


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # "inf": strict JSON has no infinity
    return v


def make_manifest(
    model_spec: str, image_shape: Sequence[int], options: dict[str, Any], class_idx: int | None = None
) -> dict[str, Any]:
    """What determines the images. Options are validated and completed with their defaults first, so
    ``{}`` and the CLI's explicit defaults give the same manifest, and a bad option fails here,
    before anything is written."""
    from dataclasses import asdict

    from . import __version__
    from .options import SamplerOptions

    options = asdict(SamplerOptions.create(**options))
    return {
        "edmfast_version": __version__,
        "model": model_spec,
        "image_shape": [int(s) for s in image_shape],
        "class_idx": class_idx,
        "sampler": {k: _jsonable(options[k]) for k in IMAGE_OPTIONS},
        "noise": "per seed: torch.Generator().manual_seed(seed); latents randn [C, H, W] float32, then churn",
        "pixels": "uint8 = clip(x * 127.5 + 128, 0, 255) from x in [-1, 1]",
    }


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} in the folder, {new!r} now"]


def check_manifest(outdir: Path, manifest: dict[str, Any]) -> bool:
    """True if ``outdir`` has this manifest, False if it has none; raise ManifestMismatch otherwise."""
    path = outdir / MANIFEST
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestMismatch(
            f"{path} exists but cannot be read ({e}); move it away or pick a new --outdir"
        ) from e
    differences = _diff(old, manifest)
    if differences:
        raise ManifestMismatch(
            f"{outdir} holds images generated with different settings; refusing to mix them:\n  "
            + "\n  ".join(differences)
            + "\nRerun with the folder's settings to resume, or pick a new --outdir."
        )
    return True


def write_manifest(outdir: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(outdir / MANIFEST, lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------- model


def load_model(spec: str) -> tuple[Any, tuple[int, ...]]:
    """Import ``module:function``, call ``function()`` and return ``(denoiser, image_shape)``.

    The factory returns either ``(denoiser, image_shape)`` or a denoiser with an ``image_shape``
    attribute. ``image_shape`` is the shape of one sample, e.g. ``(3, 64, 64)``. This imports and
    runs the named module's code.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must be 'module:function', got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`, a module in the current folder is importable
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load --model {spec!r}: {e}") from e
    result = factory()
    if isinstance(result, tuple) and len(result) == 2:
        denoiser, shape = result
    else:
        denoiser, shape = result, getattr(result, "image_shape", None)
    if shape is None:
        raise ValueError(
            f"--model {spec!r} returned a denoiser without image_shape; return (denoiser, image_shape)"
        )
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W), got {shape}")
    if not callable(denoiser):
        raise ValueError(f"--model {spec!r} returned a {type(denoiser).__name__}, which is not callable")
    return denoiser, shape


# ----------------------------------------------------------------------------- distributed


class Dist:
    """Rank, world size and barriers; torch.distributed only when WORLD_SIZE > 1 (torchrun)."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and self.world > 1:
            device = f"cuda:{local}"  # one GPU per process
        self.device = torch.device(device)
        self.initialized = False
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.initialized = True

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialized = False


@contextmanager
def _distributed(device: str | None) -> Iterator[Dist]:
    d = Dist(device)
    try:
        yield d
    finally:
        d.close()


# ----------------------------------------------------------------------------- generation


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def label_dim_of(denoiser: Any) -> int:
    """Number of classes of a class-conditional model (EDM's ``label_dim``; 0: unconditional)."""
    dim = getattr(denoiser, "label_dim", None)
    if dim is None:
        dim = getattr(getattr(denoiser, "model", None), "label_dim", 0)
    return int(dim or 0)


def sample_seeds(
    sampler: Any,
    image_shape: Sequence[int],
    seeds: Sequence[int],
    device: torch.device,
    label_dim: int = 0,
    class_idx: int | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] (float32 [B, C, H, W]) for ``seeds`` with per-seed latents and churn noise.

    A class-conditional model (``label_dim`` > 0) gets one-hot ``class_labels``: drawn from each
    seed's generator right after its latents, as EDM's generate script does, or all ``class_idx``.
    With guidance, the unconditional call gets all-zero labels.

    ``sampler`` is one `edmfast.Sampler` kept across batches: on CUDA its graph is captured once
    per batch shape and replayed after (a fresh `edmfast.sample` per batch would warm up and
    capture the whole loop every time, running it twice).
    """
    rng = PerSampleGenerator(seeds, device)
    latents = rng.randn([len(seeds), *image_shape])
    cond = uncond = None
    if label_dim:
        index = rng.randint(0, label_dim, [len(seeds)]).to(device)
        if class_idx is not None:
            index = torch.full_like(index, class_idx)
        labels = torch.eye(label_dim, device=device)[index]
        cond, uncond = {"class_labels": labels}, {"class_labels": torch.zeros_like(labels)}
    return sampler(latents, generator=rng, seeds=rng.seeds.to(device), cond=cond, uncond=uncond)


def write_npz(outdir: Path, seeds: Sequence[int]) -> Path:
    """All seeds' PNGs as one ``images.npz`` (``arr_0``: uint8 [N, H, W, C] in seed order), atomically.

    The layout of the ADM / guided-diffusion evaluation suite's reference batches.
    """
    arrays = [np.asarray(Image.open(image_path(outdir, s)).convert("RGB")) for s in seeds]
    path = outdir / "images.npz"
    atomic_write(path, lambda f: np.savez(f, arr_0=np.stack(arrays)))
    return path


def generate(
    seeds: Sequence[int],
    outdir: str | os.PathLike,
    *,
    batch: int = 64,
    model: str = DEFAULT_MODEL,
    options: dict[str, Any] | None = None,
    device: str | None = None,
    npz: bool = False,
    progress: bool = True,
    class_idx: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write ``{seed:06d}.png`` for every seed into ``outdir``; see the module docstring.

    ``options`` are `edmfast.sample` keyword arguments (num_steps, solver, s_churn, ...). Returns
    counts and timings for this process. Raises ManifestMismatch when ``outdir`` was made with
    different settings.
    """
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds to generate")
    options = dict(options or {})
    out = Path(outdir)
    with _distributed(device) as dist:
        denoiser, image_shape = load_model(model)
        if isinstance(denoiser, torch.nn.Module):
            denoiser = denoiser.to(dist.device)
        label_dim = label_dim_of(denoiser)
        if class_idx is not None and not 0 <= class_idx < label_dim:
            raise ValueError(
                f"--class {class_idx} needs a class-conditional model with label_dim > {class_idx} "
                f"(this model's label_dim is {label_dim})"
            )
        manifest = make_manifest(model, image_shape, options, class_idx)
        sampler = Sampler(denoiser, **options)
        out.mkdir(parents=True, exist_ok=True)
        # Every rank checks (and refuses) alike; only rank 0 writes, before anyone starts writing images.
        exists = check_manifest(out, manifest)
        if dist.rank == 0:
            stale = remove_stale_temporaries(out)
            if stale:
                log(f"removed {stale} unfinished temporary file(s) of an interrupted run")
            if not exists:
                write_manifest(out, manifest)
        dist.barrier()

        mine = seeds[dist.rank :: dist.world]
        todo = [s for s in mine if not image_path(out, s).exists()]
        if dist.rank == 0:
            log(
                f"{len(seeds)} seeds, {dist.world} process(es), {len(mine) - len(todo)} of rank 0's "
                f"{len(mine)} already on disk; writing to {out}"
            )
        bar = None
        if progress and dist.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="img", desc=f"rank 0/{dist.world}")
        t0 = time.perf_counter()
        for batch_seeds in _batches(todo, batch):
            x = sample_seeds(sampler, image_shape, batch_seeds, dist.device, label_dim, class_idx)
            images = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, C]
            for seed, image in zip(batch_seeds, images, strict=True):
                save_png(image_path(out, seed), image)
            if bar is not None:
                bar.update(len(batch_seeds))
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        dist.barrier()  # every rank's images are on disk
        npz_path = write_npz(out, seeds) if npz and dist.rank == 0 else None
        dist.barrier()
        stats = {
            "rank": dist.rank,
            "world": dist.world,
            "generated": len(todo),
            "skipped": len(mine) - len(todo),
            "seconds": elapsed,
            "npz": str(npz_path) if npz_path else None,
        }
        if dist.rank == 0:
            per = f", {elapsed / len(todo) * 1e3:.2f} ms/image" if todo else ""
            log(
                f"rank 0 generated {len(todo)} image(s) in {elapsed:.2f} s{per}"
                + (f"; wrote {npz_path}" if npz_path else "")
            )
        return stats
