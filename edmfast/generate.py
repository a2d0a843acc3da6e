"""Large-scale generation to disk (``edmfast generate``): one PNG per seed, resumable, multi-process.

Guarantees (docs/design.md §7, §8):

* **Per-seed images.** Sample b's latents and churn noise come from its own
  ``torch.Generator().manual_seed(seed)`` (`edmfast.PerSampleGenerator`), as in EDM's generate
  script, so an image depends on its seed only, not on the batch size, the batch it landed in or
  the number of processes (up to the network's own batch-size dependence, if any).
* **Multi-process.** Under ``torchrun`` (WORLD_SIZE > 1) rank r takes ``seeds[r::world]`` and the
  ranks meet in torch.distributed barriers (gloo on CPU, NCCL on GPU); the files are the same as a
  single-process run's.
* **Never a half-written file.** Every file is written to a temporary name in the output folder,
  ``fsync``-ed and renamed over its final name with ``os.replace`` (atomic on POSIX), then the folder
  is ``fsync``-ed, so a kill or a crash leaves either no file or a complete one.
* **Several jobs, one folder.** Temporaries are named ``.edmfast-tmp-<machine>-<pid>-<random>.part``;
  a start-up removes only such regular files whose process is dead on this machine (or that are
  older than a day), never another live job's temporary nor any other file. The manifest is created
  atomically (hard link, else ``O_EXCL``), so jobs with disjoint seeds may share one folder.
* **Resume.** Seeds whose PNG exists and decodes to the right size and mode are skipped; a missing,
  empty or truncated PNG is generated again. Rerunning after a kill finishes the job without
  losing or duplicating a seed.
* **Two samplers.** ``sampler="heun"`` (default) runs EDM's sampler on a denoiser
  ``D(x, sigma, **cond)``; ``sampler="ancestral"`` runs `edmfast.sample_ancestral` on a DDPM / iDDPM /
  ADM / DiT-style model ``model(x_t, t, **cond)`` (see `ancestral_setup` for what the model's factory
  provides). Both draw each seed's latents, class label and step noise from that seed's generator.
* **No silent mixing.** ``manifest.json`` records what determines the images (model, image
  shape, sampler options, edmfast version); a rerun into the same folder with anything different is
  refused with the differing entries named. It is written once the first batch has been sampled,
  so a run that fails before that leaves no manifest and does not block the corrected run; a folder
  with images but no manifest is refused. The backend and device are not recorded: they change
  the floats by rounding only, so a run may be resumed on another machine.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib
import json
import math
import os
import pickle
import re
import secrets
import socket
import stat
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .ancestral import AncestralSampler
from .data import IMAGE_SHAPE, ShapesDenoiser, to_uint8
from .options import AncestralOptions, check_betas
from .rng import PerSampleGenerator
from .sampler import Sampler
from .schedules import ddpm_betas
from .solvers import AblationOptions

DEFAULT_MODEL = "edmfast.data:default_model"
# what --sampler ancestral runs when no --model is given (the same shapes, as an epsilon model)
DEFAULT_ANCESTRAL_MODEL = "edmfast.generate:default_ancestral_model"
SAMPLERS = ("heun", "ancestral")
ANCESTRAL_STEPS = 250  # --steps default of --sampler ancestral (ADM's usual respaced count)
MANIFEST = "manifest.json"
TMP_PREFIX = ".edmfast-tmp-"
TMP_SUFFIX = ".part"
# <prefix><machine: 12 hex>-<pid>-<random: 8 hex><suffix>; nothing else is ever deleted
_TMP_NAME = re.compile(
    re.escape(TMP_PREFIX) + r"([0-9a-f]{12})-([0-9]{1,10})-[0-9a-f]{8}" + re.escape(TMP_SUFFIX)
)
# A temporary lives for the milliseconds of one write (seconds for images.npz): one a day old is
# surely dead, whichever machine made it (that is the only rule for another machine's files).
STALE_AGE_S = 24 * 3600.0
# torch.Generator seeds and the int64 seed tensors of the fused noise
MAX_SEED = 2**63 - 1
# One run's seed list is built in memory (~40 bytes a seed); larger jobs are split into several runs
# sharing --outdir (disjoint seeds), which is supported.
MAX_SEEDS = 10_000_000
_IMAGE_NAME = re.compile(r"[0-9]{6,}\.png")
_SUBDIR_NAME = re.compile(r"[0-9]{6,}")  # --subdirs folders: 000000, 001000, ...
_PNG_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # what Image.fromarray makes of C channels
_MANIFEST_MAX_BYTES = 1 << 20
WRITERS = 8  # threads encoding and fsync-ing PNGs (both release the GIL)

# --disc / --schedule / --scaling: EDM's design space (`edmfast.ablation_sample`), given among the
# options; with any of them the Karras range options become the design's (None: its default)
DESIGN_OPTIONS = ("discretization", "schedule", "scaling")
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
ANCESTRAL_IMAGE_OPTIONS = (
    "num_steps",
    "spacing",
    "steps_offset",
    "variance",
    "prediction_type",
    "clip_denoised",
    "eta",
    "noise_mode",
    "guidance_scale",
    "guidance_rescale",
)
# sampler option names (SamplerOptions, AncestralOptions, AblationOptions) -> the command-line flags
# that set them, edmfast's spelling first, then the official generate script's: errors and the
# manifest summary speak the command line's language
OPTION_FLAGS: dict[str, tuple[str, ...]] = {
    "num_steps": ("--steps",),
    "solver": ("--solver",),
    "alpha": ("--alpha",),
    "sigma_min": ("--sigma-min", "--sigma_min"),
    "sigma_max": ("--sigma-max", "--sigma_max"),
    "rho": ("--rho",),
    "s_churn": ("--churn", "--S_churn"),
    "s_tmin": ("--s-tmin", "--S_min"),
    "s_tmax": ("--s-tmax", "--S_max"),
    "s_noise": ("--s-noise", "--S_noise"),
    "noise_mode": ("--noise-mode",),
    "backend": ("--backend",),
    "guidance_scale": ("--guidance",),
    "guidance_rescale": ("--guidance-rescale",),
    "discretization": ("--disc",),
    "schedule": ("--schedule",),
    "scaling": ("--scaling",),
    "spacing": ("--spacing",),
    "variance": ("--variance",),
    "prediction_type": ("--prediction-type",),
    "clip_denoised": ("--clip",),
    "eta": ("--eta",),
}
# single words that are also plain English ("the schedule"): rewritten only where a message states
# something about the option itself, e.g. "rho must be > 0", "alpha applies to ..."
_PLAIN_WORDS = {
    "solver",
    "alpha",
    "rho",
    "backend",
    "schedule",
    "scaling",
    "discretization",
    "spacing",
    "eta",
}
_ABOUT = r"(?= must\b| applies\b| is not\b| needs\b)"
_CLAUSE_START = r"(?:^|(?<=: )|(?<=; )|(?<=, )|(?<=\())"


def _flag(name: str, argv: Sequence[str] | None) -> str:
    """The flag for option ``name``: the spelling the user typed (``--S_churn``), else edmfast's."""
    spellings = OPTION_FLAGS[name]
    for arg in argv or ():
        for flag in spellings:
            if arg == flag or arg.startswith(flag + "="):
                return flag
    return spellings[0]


def _flag_with_value(flag: str, value: str) -> str:
    if flag == "--clip" and value in ("True", "False"):
        return "--clip" if value == "True" else "--no-clip"
    return f"{flag} {value}"


def cli_words(text: str, argv: Sequence[str] | None = None) -> str:
    """An option error of the Python API in command-line terms: ``num_steps`` -> ``--steps``,
    ``solver='2nd'`` -> ``--solver 2nd``, ``s_tmin=5.0`` -> ``--s-tmin 5.0`` (the spelling from
    ``argv`` when the user typed an alias). Text already in flags is left as it is."""
    for name in OPTION_FLAGS:
        flag = _flag(name, argv)

        # name=value (a quoted string or a bare token) -> --flag value
        def with_value(m: re.Match[str], flag: str = flag) -> str:
            return _flag_with_value(flag, next(g for g in m.groups() if g is not None))

        text = re.sub(rf"(?<![\w.\-/\\]){name}=(?:'([^']*)'|\"([^\"]*)\"|([^\s,;)]+))", with_value, text)
        if "_" in name:
            text = re.sub(rf"(?<![\w.\-/\\]){name}\b(?![(/\\])", flag, text)
        elif name in _PLAIN_WORDS:
            text = re.sub(rf"{_CLAUSE_START}{name}{_ABOUT}", flag, text)
    return text


class ManifestMismatch(RuntimeError):
    """The output folder holds images made with different options (or cannot tell which).

    ``details``: every recorded setting that differs, one line each (the message names the few
    that matter, as command-line flags)."""

    def __init__(self, message: str, details: Sequence[str] = ()):
        super().__init__(message)
        self.details = list(details)


class OutputError(RuntimeError):
    """The output folder cannot be created, read or written (not a folder, read-only, disk full)."""


# ----------------------------------------------------------------------------- seeds


def parse_seeds(text: str, limit: int | None = None) -> list[int]:
    """``"0-49999"``, ``"3"`` or ``"0-9,20,30-31"`` -> a list of distinct seeds in [0, 2**63), in order.

    The count is checked before anything is expanded, so ``0-99999999999`` fails at once.
    """
    text = str(text)
    if not text.strip():
        raise ValueError("seeds are empty; give e.g. 0-49999 or 1,5,7-9")
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            if re.fullmatch(r"-\d+(?:-\d+)?|\d+--\d+", part):
                raise ValueError(f"seeds must be >= 0, got {part!r} in {text!r}")
            raise ValueError(f"seeds must look like '0-49999' or '1,5,7-9', got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi > MAX_SEED:
            raise ValueError(f"seed {hi} in {text!r} does not fit in int64 (max {MAX_SEED})")
        if hi < lo:
            raise ValueError(f"seed range {part!r} is empty (end before start); write it as {hi}-{lo}")
        ranges.append((lo, hi))
    count = sum(hi - lo + 1 for lo, hi in ranges)
    limit = MAX_SEEDS if limit is None else limit
    if count > limit:
        raise ValueError(
            f"seeds {text!r} are {count} seeds, more than {limit} in one run; split them into several "
            "runs (they may share --outdir)"
        )
    spans = sorted(ranges)
    for (lo0, hi0), (lo1, _) in zip(spans, spans[1:], strict=False):
        if lo1 <= hi0:
            raise ValueError(f"seeds {text!r} repeat a seed ({lo1} is in {lo0}-{hi0} too)")
    return [s for lo, hi in ranges for s in range(lo, hi + 1)]


def _check_seeds(seeds: Sequence[Any]) -> list[int]:
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"seeds must be integers, got {s!r} ({type(s).__name__})")
        s = int(s)
        if not 0 <= s <= MAX_SEED:
            raise ValueError(f"seeds must be in [0, 2**63 - 1], got {s}")
        out.append(s)
    if not out:
        raise ValueError("no seeds to generate")
    if len(set(out)) != len(out):
        raise ValueError("seeds repeat a seed")
    return out


# ----------------------------------------------------------------------------- files


def image_path(outdir: Path, seed: int, subdirs: bool = False) -> Path:
    """``OUTDIR/{seed:06d}.png``; with ``subdirs`` in a folder per 1000 seeds,
    ``OUTDIR/{seed - seed % 1000:06d}/{seed:06d}.png`` (the official script's ``--subdirs``)."""
    if subdirs:
        return outdir / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"
    return outdir / f"{seed:06d}.png"


def _image_folders(outdir: Path) -> list[Path]:
    """``outdir`` and its per-1000-seeds subfolders (``--subdirs``): where images and temporaries live."""
    folders = [outdir]
    with os.scandir(outdir) as entries:
        for entry in entries:
            if _SUBDIR_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
    return folders


@functools.cache
def _machine_id() -> str:
    """Who may judge a temporary's pid: same host, same boot and same pid namespace (containers)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _pid_alive(pid: int) -> bool:
    """False only when ``pid`` surely is no process here (in doubt: alive, so nothing is deleted)."""
    if pid <= 0 or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # EPERM: someone else's live process
    return True


def _open_temp(folder: Path) -> tuple[int, Path]:
    """Create a new temporary file of this process in ``folder``: (fd, path). Mode 0666 less umask."""
    prefix = f"{TMP_PREFIX}{_machine_id()}-{os.getpid()}-"
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}{TMP_SUFFIX}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return fd, path


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a crash then cannot undo a finished image)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # no directory handles on this platform
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise  # some file systems cannot fsync a folder; that only weakens durability
    finally:
        os.close(fd)


def _write_temp(folder: Path, write: Callable[[Any], None]) -> Path:
    """``write(file_object)`` into a new fsync-ed temporary of this process; removed on any error."""
    fd, tmp = _open_temp(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[Any], None], *, sync_dir: bool = True) -> None:
    """Write via ``write(file_object)`` to a temporary file next to ``path``, then rename it over ``path``.

    Same folder, so the rename never crosses file systems and is atomic: readers and a resumed run
    see the old state or the complete new file, never a partial one. The data is fsync-ed before
    the rename (else a crash can leave the new name on an empty file); the folder after it, unless
    ``sync_dir`` is False (the caller then syncs it once for many files).
    """
    tmp = _write_temp(path.parent, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def save_png(path: Path, image: np.ndarray, *, sync_dir: bool = True) -> None:
    """uint8 [H, W, C] (C = 1 to 4) -> PNG, atomically."""
    img = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    atomic_write(path, lambda f: img.save(f, format="PNG"), sync_dir=sync_dir)


def png_problem(path: Path, image_shape: Sequence[int]) -> str | None:
    """None if ``path`` is a complete PNG of ``image_shape`` (C, H, W); else what is wrong with it."""
    c, h, w = (int(v) for v in image_shape)
    try:
        with Image.open(path) as img:
            want = f"PNG {_PNG_MODES.get(c)} {w}x{h}"
            got = f"{img.format} {img.mode} {img.size[0]}x{img.size[1]}"
            if got != want:
                return f"a {got} image, not {want}"
            img.verify()  # every chunk's CRC, through IEND: a cut after the pixel data fails here
        with Image.open(path) as img:
            img.load()  # decodes every row: a truncated file fails here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def remove_stale_temporaries(outdir: Path, max_age_s: float = STALE_AGE_S) -> int:
    """Delete temporaries whose writer is dead; safe while other jobs write into ``outdir``.

    Only regular files named like this program's temporaries: those of a dead process on this
    machine (see `_machine_id`), or older than ``max_age_s`` whatever their origin. A live job's
    temporary, a user's file, a folder or a link is left alone.
    """
    me, now, removed = _machine_id(), time.time(), 0
    for folder in _image_folders(outdir):
        removed += _remove_stale_in(folder, me, now, max_age_s)
    return removed


def _remove_stale_in(folder: Path, me: str, now: float, max_age_s: float) -> int:
    removed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            m = _TMP_NAME.fullmatch(entry.name)
            if m is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            pid = int(m.group(2))
            dead_here = m.group(1) == me and pid != os.getpid() and not _pid_alive(pid)
            if dead_here or now - st.st_mtime > max_age_s:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # another job removed it first
                except OSError:
                    continue  # not ours to fight over (permissions): it is only clutter
                removed += 1
    return removed


def _first_image(outdir: Path) -> str | None:
    """The name of an image in ``outdir`` or a ``--subdirs`` folder of it (relative), else None."""
    for folder in _image_folders(outdir):
        with os.scandir(folder) as entries:
            for entry in entries:
                if _IMAGE_NAME.fullmatch(entry.name):
                    return str(Path(entry.path).relative_to(outdir))
    return None


def _output_error(out: Path, e: OSError, doing: str) -> OutputError:
    """An OSError on the output folder as one line that names --outdir and what to do."""
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = "free some space, then rerun the same command to resume"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make it writable or pick another --outdir"
    else:
        hint = "fix that, then rerun the same command to resume"
    name = Path(e.filename).name if e.filename and Path(e.filename) != out else ""
    name = "" if _TMP_NAME.fullmatch(name) else f" {name}" if name else ""  # a temporary's name says nothing
    return OutputError(f"--outdir {out}: cannot {doing}{name} ({why}); {hint}")


@contextmanager
def _on_output(out: Path, doing: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _output_error(out, e, doing) from e


def prepare_outdir(out: Path) -> None:
    """Create ``out`` if needed and check that this process can write into it, before any sampling."""
    with _on_output(out, "create the folder"):
        if out.exists() and not out.is_dir():
            raise OutputError(f"--outdir {out} exists and is not a folder; pick a folder path")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:  # a parent is a file
            raise OutputError(f"--outdir {out}: cannot create it ({e.strerror}: {e.filename})") from e
    with _on_output(out, "write into the folder"):
        fd, probe = _open_temp(out)
        os.close(fd)
        probe.unlink()


# ----------------------------------------------------------------------------- manifest


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # "inf": strict JSON has no infinity
    return v


def make_manifest(
    model_spec: str,
    image_shape: Sequence[int],
    options: dict[str, Any],
    class_idx: int | None = None,
    betas: torch.Tensor | None = None,
    design: AblationOptions | None = None,
    subdirs: bool = False,
) -> dict[str, Any]:
    """What determines the images. Options are validated and completed with their defaults first, so
    ``{}`` and the CLI's explicit defaults give the same manifest, and a bad option fails here,
    before anything is written. With ``betas`` (the training betas of ``--sampler ancestral``) the
    options are `sample_ancestral`'s and the sampler entry says ``"kind": "ancestral"`` and which
    betas. ``design`` (``--disc`` / ``--schedule`` / ``--scaling``) is recorded as the sampler's
    ``"design"`` in place of its sigma range, ``subdirs`` as ``"layout": "subdirs"``; a Heun manifest
    without them is as it always was, so older folders still resume."""
    from dataclasses import asdict

    from . import __version__
    from .options import SamplerOptions

    if betas is None:
        options = asdict(SamplerOptions.create(**options))
        sampler = {k: _jsonable(options[k]) for k in IMAGE_OPTIONS}
        if design is not None:  # the design's own range replaces the Karras one
            del sampler["sigma_min"], sampler["sigma_max"]
            sampler["design"] = {k: _jsonable(v) for k, v in asdict(design).items()}
        noise = "per seed: torch.Generator().manual_seed(seed); latents randn [C, H, W] float32, then churn"
    else:
        options = asdict(AncestralOptions.create(**options))
        b = check_betas(betas)
        digest = hashlib.sha256(b.numpy().tobytes()).hexdigest()[:16]
        sampler = {
            "kind": "ancestral",
            "betas": f"float64 [{b.numel()}] sha256={digest}",
            **{k: _jsonable(options[k]) for k in ANCESTRAL_IMAGE_OPTIONS},
        }
        noise = (
            "per seed: torch.Generator().manual_seed(seed); latents randn [C, H, W] float32, then step noise"
        )
    return {
        "edmfast_version": __version__,
        "model": model_spec,
        "image_shape": [int(s) for s in image_shape],
        "class_idx": class_idx,
        "sampler": sampler,
        "noise": noise,
        "pixels": "uint8 = clip(x * 127.5 + 128, 0, 255) from x in [-1, 1]",
        **({"layout": "subdirs"} if subdirs else {}),
    }


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} in the folder, {new!r} now"]


def _manifest_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for key, kind in (("edmfast_version", str), ("model", str), ("image_shape", list), ("sampler", dict)):
        if not isinstance(data.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in data["image_shape"]):
        return "'image_shape' is not a list of integers"
    return None


def read_manifest(outdir: Path) -> dict[str, Any] | None:
    """The folder's manifest, None if it has none; ManifestMismatch if it is not a valid one."""
    path = outdir / MANIFEST
    advice = "move it away or pick a new --outdir"
    for attempt in range(50):
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise ManifestMismatch(f"{path} is not a file; {advice}")
            if st.st_size > _MANIFEST_MAX_BYTES:
                raise ManifestMismatch(f"{path} is not an edmfast manifest ({st.st_size} bytes); {advice}")
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ManifestMismatch(f"{path} exists but cannot be read ({e.strerror}); {advice}") from e
        # Where hard links are unsupported the manifest is created empty, then written: a moment of
        # an empty file that another job may see. Wait for it rather than call it garbage.
        if raw or time.time() - st.st_mtime > 5 or attempt == 49:
            break
        time.sleep(0.05)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ManifestMismatch(f"{path} is not valid JSON ({e}); {advice}") from e
    problem = _manifest_problem(data)
    if problem:
        raise ManifestMismatch(f"{path} is not an edmfast manifest ({problem}); {advice}")
    return data


def check_manifest(outdir: Path, manifest: dict[str, Any]) -> bool:
    """True if ``outdir`` has this manifest, False if it has none and no images.

    Raises ManifestMismatch for a different or invalid manifest, and for images without one (their
    settings are unknown, e.g. the manifest was deleted).
    """
    old = read_manifest(outdir)
    if old is None:
        image = _first_image(outdir)
        if image is not None:
            raise ManifestMismatch(
                f"{outdir} holds images ({image}, ...) but no {MANIFEST}, so their settings are unknown; "
                "refusing to add to them: pick a new --outdir or move the images away"
            )
        return False
    differences = _diff(old, manifest)
    if differences:
        empty = _first_image(outdir) is None
        made, now = manifest_summary(old, manifest)
        raise ManifestMismatch(
            f"{outdir} holds images made with {made} (this run: {now}); refusing to mix them. Rerun "
            "with the folder's settings to resume, or pick a new --outdir"
            + (f" (it holds no images yet: deleting {MANIFEST} starts it afresh)" if empty else "")
            + f"; --explain lists all {len(differences)} recorded setting(s) that differ",
            differences,
        )
    return True


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _settings(m: dict[str, Any]) -> dict[str, str]:
    """A manifest as {setting: how a command line says it}, in the order that matters to a user:
    the sampler, the model, the design space, the sampler's options, then the rest."""
    raw = m.get("sampler")
    sampler: dict[str, Any] = raw if isinstance(raw, dict) else {}
    out = {"sampler": f"--sampler {sampler.get('kind', 'heun')}"}
    model = str(m.get("model"))
    if model.startswith("network:"):
        name, _, digest = model[len("network:") :].partition(":sha256=")
        out["model"] = f"--network {name} (sha256 {digest})"
    else:
        out["model"] = f"--model {model}"
    design = sampler.get("design")
    if isinstance(design, dict):
        out["design"] = " ".join(
            f"{OPTION_FLAGS[k][0]} {_shown(design[k])}"
            for k in (*DESIGN_OPTIONS, "sigma_min", "sigma_max")
            if design.get(k) is not None
        )
    else:
        out["design"] = "no --disc/--schedule/--scaling"
    for key in dict.fromkeys([*IMAGE_OPTIONS, *ANCESTRAL_IMAGE_OPTIONS, *sorted(sampler)]):
        if key in ("kind", "design") or key not in sampler:
            continue
        value = sampler[key]
        if key in OPTION_FLAGS:
            flag = OPTION_FLAGS[key][0]
            if key == "clip_denoised" and isinstance(value, bool):
                out[key] = "--clip" if value else "--no-clip"
            elif value is None:
                out[key] = f"no {flag}"
            else:
                out[key] = f"{flag} {_shown(value)}"
        else:
            out[key] = f"{key} {_shown(value)}"
    out["class_idx"] = "no --class" if m.get("class_idx") is None else f"--class {m.get('class_idx')}"
    out["layout"] = "--subdirs" if m.get("layout") == "subdirs" else "no --subdirs"
    shape = m.get("image_shape")
    out["image_shape"] = f"image shape {'x'.join(map(str, shape))}" if isinstance(shape, list) else str(shape)
    for key in sorted(set(m) - {"sampler", "model", "class_idx", "layout", "image_shape"}):
        out[key] = "edmfast " + str(m[key]) if key == "edmfast_version" else f"{key} {_shown(m[key])}"
    return out


def manifest_summary(old: dict[str, Any], new: dict[str, Any], most: int = 4) -> tuple[str, str]:
    """(what the folder was made with, what this run uses): the settings that differ, as flags.

    A different sampler says only that (every option of one sampler differs from the other's); at
    most ``most`` settings are named, then how many more."""
    a, b = _settings(old), _settings(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    if "sampler" in keys:
        keys = [k for k in keys if k in ("sampler", "model")]
    more = len(keys) - most
    keys = keys[:most]
    tail = f" and {more} more" if more > 0 else ""
    # a setting one side lacks (the Karras range beside a design's own) is left unsaid there
    return (
        ", ".join(a[k] for k in keys if k in a) + tail,
        ", ".join(b[k] for k in keys if k in b) + tail,
    )


def claim_manifest(outdir: Path, manifest: dict[str, Any]) -> bool:
    """Create ``manifest.json`` if absent (True), else check the one there (False); atomic.

    A complete, fsync-ed temporary is hard-linked to the name: the link fails if any job created
    the name first, and a reader never sees a partial file. Where hard links are unsupported (some
    network and FUSE file systems) the name is created with ``O_EXCL`` instead.
    """
    path = outdir / MANIFEST
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    tmp = _write_temp(outdir, lambda f: f.write(data))
    try:
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                raise
            created = _create_exclusive(path, data)
    finally:
        tmp.unlink(missing_ok=True)
    if created:
        _fsync_dir(outdir)
        return True
    if not check_manifest(outdir, manifest):
        raise ManifestMismatch(f"{path} vanished while this run was starting; rerun the same command")
    return False


def _create_exclusive(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def write_manifest(outdir: Path, manifest: dict[str, Any]) -> None:
    """Write (or overwrite) ``manifest.json`` atomically; `generate` uses `claim_manifest`."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(outdir / MANIFEST, lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------- model


def _import_factory(module_name: str, attr: str, user_module: bool) -> Any:
    """``module.attr``; a user's module may live in the current folder, as with ``python -m``.

    The folder goes on ``sys.path`` only for a user's --model and only during its import: anything
    else (a planted ``fractions.py`` next to the outputs, say) must never shadow a real module.
    """
    added = None
    if user_module:
        cwd = os.getcwd()
        if "" not in sys.path and cwd not in sys.path:
            sys.path.insert(0, cwd)
            added = cwd
    try:
        return getattr(importlib.import_module(module_name), attr)
    finally:
        if added is not None and added in sys.path:
            sys.path.remove(added)


def _image_shape(spec: str, shape: Any) -> tuple[int, int, int]:
    """A factory's image_shape as three positive ints, or a ValueError naming --model and the value."""
    bad = ValueError(f"--model {spec!r}: image_shape must be (C, H, W), three integers >= 1, got {shape!r}")
    try:
        values = list(shape)
    except TypeError:
        raise bad from None
    if len(values) != 3:
        raise bad
    out = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
            v = v.item()
        # 3.7 or '3' would otherwise become 3 silently
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
            raise bad
        out.append(int(v))
    return out[0], out[1], out[2]


def load_model(spec: str) -> tuple[Any, tuple[int, ...]]:
    """Import ``module:function``, call ``function()`` and return ``(denoiser, image_shape)``.

    The factory returns either ``(denoiser, image_shape)`` or a denoiser with an ``image_shape``
    attribute. ``image_shape`` is the shape of one sample, e.g. ``(3, 64, 64)``. This imports and
    runs the named module's code.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must be 'module:function', got {spec!r}")
    try:
        factory = _import_factory(module_name, attr, spec != DEFAULT_MODEL)
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
    shape = _image_shape(spec, shape)
    if shape[0] not in _PNG_MODES:
        raise ValueError(f"--model {spec!r}: a PNG holds 1 to 4 channels, image_shape has C = {shape[0]}")
    if not callable(denoiser):
        raise ValueError(f"--model {spec!r} returned a {type(denoiser).__name__}, which is not callable")
    return denoiser, shape


class ShapesEpsilon(torch.nn.Module):
    """The shapes data set's exact denoiser as a DDPM epsilon model (``--sampler ancestral``'s default).

    Training index t has abar_t (cosine betas, T = 1000). ``x_t / sqrt(abar_t)`` is a VE-noised image
    at sigma_t = sqrt((1 - abar_t) / abar_t), so with D = `ShapesDenoiser` in VE scaling
    ``eps = (x_ve - D(x_ve; sigma_t)) / sigma_t``, computed as the equal
    ``(x_t - sqrt(abar_t) D) / sqrt(1 - abar_t)`` (no difference of two huge terms near t = T).
    It returns C channels: ``variance = "fixed_small"``. An exact epsilon, so a converged sampler
    lands on training images, as the Heun default does.
    """

    image_shape = IMAGE_SHAPE
    variance = "fixed_small"
    prediction_type = "epsilon"

    def __init__(self, num_train_timesteps: int = 1000):
        super().__init__()
        self.denoiser = ShapesDenoiser()
        self.betas = ddpm_betas(num_train_timesteps, "cosine")  # float64 [T], read by ancestral_setup
        self.abar = torch.cumprod(1 - self.betas, 0)  # float64 [T], moved per call (tiny)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        a = self.abar.to(x.device)[t.long()].reshape(-1, *([1] * (x.dim() - 1)))  # float64 [B, 1, 1, 1]
        sigma = ((1 - a) / a).sqrt().reshape(-1)
        d = self.denoiser((x.double() / a.sqrt()).to(x.dtype), sigma.to(x.dtype))
        return ((x.double() - a.sqrt() * d.double()) / (1 - a).sqrt()).to(x.dtype)


def default_ancestral_model() -> ShapesEpsilon:
    """``--sampler ancestral``'s default model factory (the built-in shapes, no download)."""
    return ShapesEpsilon()


def ancestral_setup(model: Any, spec: str, options: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The training betas and the completed `sample_ancestral` options of a ``--model`` for
    ``--sampler ancestral``.

    The model's factory returns ``(model, (C, H, W))`` or a model with ``image_shape``, as for Heun;
    ``model(x_t, t, **cond)`` gets the VP state and the integer training timesteps [B]. Optional
    attributes of the model: ``betas`` (float [T]) or ``num_train_timesteps`` (default 1000) and
    ``beta_schedule`` ("linear", the default, or "cosine"); ``variance`` (default "learned_range":
    2C output channels), ``prediction_type`` (default "epsilon") and ``clip_denoised`` (default True).
    An option given in ``options`` (not None) wins over the attribute.
    """
    opts = {k: v for k, v in options.items() if not (v is None and k != "eta")}
    for key, default in (
        ("variance", "learned_range"),
        ("prediction_type", "epsilon"),
        ("clip_denoised", True),
    ):
        if key not in opts:
            opts[key] = getattr(model, key, default)
    opts.setdefault("num_steps", ANCESTRAL_STEPS)
    try:
        betas = getattr(model, "betas", None)
        if betas is None:
            T = getattr(model, "num_train_timesteps", 1000)
            betas = ddpm_betas(T, getattr(model, "beta_schedule", "linear"))
        betas = check_betas(betas)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model {spec!r}: its training betas: {e}") from None
    return betas, opts


def ancestral_option_error(e: Exception) -> ValueError:
    """An option error of `AncestralSampler` as a ValueError that names the CLI flag."""
    text = cli_words(str(e))
    return ValueError(text if "--" in text else f"--sampler ancestral: {text}")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def network_spec(path: str | os.PathLike, local: str | os.PathLike | None = None) -> str:
    """The manifest's ``model`` entry for ``--network PATH`` (or URL): the file's name and content
    (``local``: where a URL's file was downloaded), so a URL and the same file on disk agree."""
    from .edm import is_url

    name = urllib.parse.urlsplit(str(path)).path.rsplit("/", 1)[-1] if is_url(path) else Path(path).name
    return f"network:{name}:sha256={_file_digest(Path(local if local is not None else path))}"


def fetch_network(source: str | os.PathLike, progress: bool = True) -> Path:
    """``--network``'s local file: the path itself, or a URL's copy in the download cache."""
    from . import edm

    if not edm.is_url(source):
        p = Path(source)
        if "://" in str(source):
            raise ValueError(f"--network {source}: only http:// and https:// URLs can be downloaded")
        if not p.is_file():
            raise ValueError(
                f"--network {p}: no such file; give the path or the http(s) URL of an official EDM "
                "network pickle"
            )
        return p
    try:
        return edm.download_network(str(source), progress=progress)
    except (edm.DownloadError, edm.NetworkFileError) as e:
        raise ValueError(f"--network: {e}") from None


def load_network(
    path: str | os.PathLike, device: Any = "cpu", *, progress: bool = True
) -> tuple[Any, tuple[int, ...], Path]:
    """An official EDM network pickle (path or http(s) URL) -> (fused edmfast preconditioner,
    (C, H, W), the local file).

    A URL is downloaded once into the cache (`edmfast.edm.download_network`). Loaded by
    `edmfast.edm.load_network` and converted by `edmfast.edm.from_edm` (label_dim, range, dtype:
    float16 only for a ``use_fp16`` network on CUDA, as the official code). Unpickling needs the
    official persistence code (``dnnlib``, ``torch_utils``) on the import path; without it this is
    one ValueError saying so. Unpickling runs code from the pickle, like any ``torch.load``.
    """
    from . import edm

    p = fetch_network(path, progress)
    src = path if edm.is_url(path) else p
    try:
        net = edm.load_network(p, device)
    except ImportError as e:  # the official dnnlib / torch_utils are not importable
        raise ValueError(f"--network {src}: {e}") from None
    except edm.NetworkFileError as e:
        raise ValueError(f"--network {src}: not an official EDM network pickle: {e.reason}") from None
    except (TypeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"--network {src}: not an official EDM network pickle ({e})") from None
    try:
        denoiser = edm.from_edm(net)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--network {src}: {e}") from None
    channels = getattr(denoiser, "img_channels", None)
    resolution = getattr(denoiser, "img_resolution", None)
    if channels is None or resolution is None:
        raise ValueError(f"--network {src}: the network has no img_channels / img_resolution")
    shape = (int(channels), int(resolution), int(resolution))
    if shape[0] not in _PNG_MODES:
        raise ValueError(f"--network {src}: {shape[0]} channels cannot be written as PNG (1 to 4)")
    return denoiser, shape, p


# ----------------------------------------------------------------------------- distributed


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``--device`` -> torch.device, with a clear ValueError for one that cannot run here."""
    if name is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {name!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type == "meta":
        raise ValueError("--device 'meta' holds no data; use e.g. cpu or cuda")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:
            raise ValueError(f"--device {name!r} is not usable here ({e}); use e.g. cpu or cuda") from None
    return device


class Dist:
    """Rank, world size and barriers; torch.distributed only when WORLD_SIZE > 1 (torchrun)."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda" and self.world > 1:
            device = f"cuda:{local}"  # one GPU per process
        self.device = resolve_device(device, local)
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
    """Number of classes of a class-conditional model (EDM's ``label_dim``; 0: unconditional).

    A ValueError when the attribute is not an integer >= 0 (labels are drawn in [0, label_dim))."""
    dim = getattr(denoiser, "label_dim", None)
    owner = "label_dim"
    if dim is None:
        dim = getattr(getattr(denoiser, "model", None), "label_dim", 0)
        owner = "model.label_dim"
    if dim is None:
        return 0
    if isinstance(dim, torch.Tensor) and dim.numel() == 1 and not dim.is_floating_point():
        dim = dim.item()
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 0:
        raise ValueError(
            f"the model's {owner} must be an integer >= 0 (the number of classes; 0: unconditional), "
            f"got {dim!r}"
        )
    return int(dim)


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


def write_npz(outdir: Path, seeds: Sequence[int], subdirs: bool = False) -> Path:
    """All seeds' PNGs as one ``images.npz`` (``arr_0``: uint8 [N, H, W, C] in seed order), atomically.

    The layout of the ADM / guided-diffusion evaluation suite's reference batches.
    """
    arrays = []
    for s in seeds:
        with Image.open(image_path(outdir, s, subdirs)) as img:
            arrays.append(np.asarray(img.convert("RGB")))
    path = outdir / "images.npz"
    atomic_write(path, lambda f: np.savez(f, arr_0=np.stack(arrays)))
    return path


def existing_images(
    outdir: Path, seeds: Sequence[int], image_shape: Sequence[int], subdirs: bool = False
) -> tuple[set[int], dict[int, str]]:
    """(seeds whose PNG is complete, {seed: problem} for damaged ones) among ``seeds``."""
    done: set[int] = set()
    damaged: dict[int, str] = {}
    for s in seeds:
        path = image_path(outdir, s, subdirs)
        if not os.path.lexists(path):
            continue
        problem = png_problem(path, image_shape)
        if problem is None:
            done.add(s)
        else:
            damaged[s] = problem
    return done, damaged


def _finish_writes(out: Path, pending: list[Future[None]], bar: Any, folders: set[Path]) -> None:
    """Wait for one batch's PNGs (raising the first error), then make their renames durable."""
    if not pending:
        return
    with _on_output(out, "write"):
        for f in pending:
            f.result()
        for folder in sorted(folders):
            _fsync_dir(folder)  # once per batch and folder
    if bar is not None:
        bar.update(len(pending))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def seeds_text(seeds: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (at most a few ranges shown)."""
    spans: list[list[int]] = []
    for s in seeds:
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    parts = [f"{lo}-{hi}" if hi > lo else f"{lo}" for lo, hi in spans]
    return ",".join(parts) if len(parts) <= 4 else ",".join(parts[:3]) + f",... ({len(parts)} ranges)"


def plan_text(
    seeds: Sequence[int], world: int, mine: int, done: int, batch: int, sampler: Any, device: Any, out: Path
) -> str:
    """What a run is about to do, printed before the first batch."""
    o = getattr(sampler, "opts", None)
    steps = getattr(o, "num_steps", None)
    solver = getattr(o, "solver", None)
    todo = mine - done
    what = ""
    if isinstance(sampler, AncestralSampler):
        n = int(sampler._default_t.numel())
        what = (
            f"; ancestral ({sampler.opts.variance}), {n} step{'s' if n != 1 else ''} "
            f"({n} network evaluations per image)"
        )
    elif steps is not None and solver is not None:
        nfe = steps if solver == "euler" else 2 * steps - 1
        what = f"; {solver}, {steps} step{'s' if steps != 1 else ''} ({nfe} network evaluations per image)"
        ab = getattr(sampler, "ablation", None)
        if ab is not None:
            what += f", design --disc {ab.discretization} --schedule {ab.schedule} --scaling {ab.scaling}"
    return (
        f"plan: seeds {seeds_text(seeds)} ({len(seeds)} image{'s' if len(seeds) != 1 else ''}) on "
        f"{world} process(es); rank 0: {done} of {mine} already on disk, {todo} to sample in "
        f"{math.ceil(todo / batch)} batch(es) of up to {batch} on {device}{what}; writing to {out}"
    )


def _design(options: dict[str, Any], ancestral: bool) -> AblationOptions | None:
    """Take EDM's design-space options (`DESIGN_OPTIONS`, and then the sigma range) out of
    ``options``: None when none is given (plain `edmfast.sample`)."""
    given = {k: options.pop(k) for k in DESIGN_OPTIONS if k in options}
    if not given:
        return None
    if ancestral:
        flags = {"discretization": "--disc", "schedule": "--schedule", "scaling": "--scaling"}
        raise ValueError(f"{flags[next(iter(given))]} applies to --sampler heun only (EDM's design space)")
    for k in ("sigma_min", "sigma_max"):
        given[k] = options.pop(k, None)
    return AblationOptions.create(**given)


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
    network: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    sampler: str = "heun",
    subdirs: bool = False,
) -> dict[str, Any]:
    """Write ``{seed:06d}.png`` for every seed into ``outdir``; see the module docstring.

    ``options`` are `edmfast.sample` keyword arguments (num_steps, solver, s_churn, ...); with any
    of ``discretization`` / ``schedule`` / ``scaling`` they are `edmfast.ablation_sample`'s (EDM's
    design space; ``sigma_min`` / ``sigma_max`` None or absent: the discretization's range).
    ``subdirs``: one folder per 1000 seeds (`image_path`), as the official script's ``--subdirs``. Returns
    counts and timings for this process. Raises ManifestMismatch when ``outdir`` was made with
    different settings, OutputError when it cannot be written. ``network`` (an official EDM
    network pickle, see `load_network`) takes the place of ``model``. ``sampler="ancestral"``: the
    model is a DDPM-style ``model(x_t, t, **cond)`` (see `ancestral_setup`; default: the shapes as
    `ShapesEpsilon`) and ``options`` are `edmfast.sample_ancestral` keyword arguments.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {SAMPLERS}, got {sampler!r}")
    ancestral = sampler == "ancestral"
    if ancestral and network is not None:
        raise ValueError(
            "--network is an EDM denoiser: sample it with --sampler heun; --sampler ancestral needs a "
            "--model epsilon / v model(x_t, t)"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch must be an integer >= 1, got {batch!r}")
    seeds = _check_seeds(list(seeds))
    options = dict(options or {})
    design = _design(options, ancestral)
    out = Path(outdir)
    if not str(outdir):
        raise ValueError("--outdir is empty; give a folder path")
    with _distributed(device) as dist:
        if network is not None:
            if model != DEFAULT_MODEL:
                raise ValueError("give --model or --network, not both")
            denoiser, image_shape, local = load_network(
                network, dist.device, progress=progress and dist.rank == 0
            )
            model = network_spec(network, local)
        else:
            if ancestral and model == DEFAULT_MODEL:
                model = DEFAULT_ANCESTRAL_MODEL  # the same shapes, as an epsilon model
            denoiser, image_shape = load_model(model)
        if isinstance(denoiser, torch.nn.Module):
            denoiser = denoiser.to(dist.device)
        try:
            label_dim = label_dim_of(denoiser)
        except ValueError as e:
            raise ValueError(f"--model {model!r}: {e}") from None
        if class_idx is not None and not 0 <= class_idx < label_dim:
            raise ValueError(
                f"--class {class_idx} needs a class-conditional model with label_dim > {class_idx} "
                f"(this model's label_dim is {label_dim})"
            )
        if label_dim == 0 and options.get("guidance_scale", 1.0) != 1.0:
            raise ValueError(
                "--guidance needs a class-conditional model (label_dim > 0): this model is "
                "unconditional, drop --guidance"
            )
        engine: Any
        if ancestral:
            betas, options = ancestral_setup(denoiser, model, options)
            try:
                engine = AncestralSampler(denoiser, betas, **options)
            except (TypeError, ValueError) as e:
                raise ancestral_option_error(e) from None
            manifest = make_manifest(model, image_shape, options, class_idx, betas=betas, subdirs=subdirs)
        else:
            manifest = make_manifest(model, image_shape, options, class_idx, design=design, subdirs=subdirs)
            engine = Sampler(denoiser, ablation=design, **options)
        prepare_outdir(out)
        # Every rank and every job checks (and refuses) alike; nothing is written before the
        # barrier, so all ranks see the same folder. Any job may clean up: only dead writers' files.
        has_manifest = check_manifest(out, manifest)
        with _on_output(out, "clean up"):
            stale = remove_stale_temporaries(out)
        if stale:
            log(f"removed {stale} unfinished temporary file(s) of an interrupted run")
        dist.barrier()

        mine = seeds[dist.rank :: dist.world]
        with _on_output(out, "read"):
            done, damaged = existing_images(out, mine, image_shape, subdirs)
        todo = [s for s in mine if s not in done]
        if damaged:
            first = min(damaged)
            log(
                f"rank {dist.rank}: {len(damaged)} damaged image(s) will be generated again, e.g. "
                f"{image_path(out, first, subdirs).relative_to(out)}: {damaged[first]}"
            )
        if dist.rank == 0:
            log(plan_text(seeds, dist.world, len(mine), len(done), batch, engine, dist.device, out))
        bar = None
        if progress and dist.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="img", desc=f"rank 0/{dist.world}")
        t0 = time.perf_counter()
        # PNG encoding and the fsyncs run on writer threads, overlapped with sampling the next batch:
        # a file's fsync costs 0.5-3 ms on a local disk (more on a network share), about as much
        # as sampling a small image on a GPU. A batch's errors surface before the next one is written.
        with ThreadPoolExecutor(WRITERS, thread_name_prefix="edmfast-png") as pool:
            pending: list[Future[None]] = []
            folders: set[Path] = set()
            for index, batch_seeds in enumerate(_batches(todo, batch)):
                try:
                    x = sample_seeds(engine, image_shape, batch_seeds, dist.device, label_dim, class_idx)
                except ValueError as e:
                    if ancestral and str(e).startswith("the model returned shape"):
                        raise ValueError(
                            f"--variance {options['variance']}: {e}; a model that returns C channels "
                            "needs --variance fixed_small or fixed_large, one that returns 2C "
                            "learned_range or learned"
                        ) from None
                    raise
                if index == 0 and dist.rank == 0 and len(todo) > len(batch_seeds):
                    first_s = time.perf_counter() - t0
                    rest = math.ceil(len(todo) / batch) - 1
                    log(
                        f"first batch: {first_s:.2f} s (with warm-up); estimated time for the other "
                        f"{rest} batch(es) of rank 0: about {_duration(first_s * rest)}"
                    )
                images = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, C]
                _finish_writes(out, pending, bar, folders)
                if not has_manifest:
                    # only now: a run that fails before its first batch leaves the folder as it was
                    with _on_output(out, "write"):
                        claim_manifest(out, manifest)
                    has_manifest = True
                paths = [image_path(out, seed, subdirs) for seed in batch_seeds]
                folders = {path.parent for path in paths}
                if subdirs:
                    with _on_output(out, "create a folder in"):
                        for folder in folders - {out}:
                            folder.mkdir(exist_ok=True)
                        _fsync_dir(out)  # the new folders' names
                pending = [
                    pool.submit(save_png, path, image, sync_dir=False)
                    for path, image in zip(paths, images, strict=True)
                ]
            _finish_writes(out, pending, bar, folders)
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        dist.barrier()  # every rank's images are on disk
        npz_path = None
        if npz and dist.rank == 0:
            with _on_output(out, "write images.npz from"):
                npz_path = write_npz(out, seeds, subdirs)
        dist.barrier()
        stats = {
            "rank": dist.rank,
            "world": dist.world,
            "generated": len(todo),
            "skipped": len(done),
            "repaired": len(damaged),
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
