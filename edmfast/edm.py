"""Official NVlabs/edm networks on the fused engine.

The official preconditioners (``training/networks.py``: EDMPrecond, VPPrecond, VEPrecond,
iDDPMPrecond) compute ``D = c_skip x + c_out F(c_in x; c_noise, class_labels)`` in their
``forward``, so handing one to `edmfast.sample` works but fuses nothing. `from_edm` reads the
settings off such a module and returns the matching `edmfast.precond` preconditioner around its
inner UNet, whose coefficients the engine folds into its passes. `load_network` reads an official
network pickle (its classes live in the official ``dnnlib`` / ``torch_utils`` packages).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pickle
import pickletools
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .precond import EDMPrecond, Precond, VEPrecond, VPPrecond, iDDPMPrecond

__all__ = [
    "DownloadError",
    "NetworkFileError",
    "OfficialUNet",
    "download_network",
    "from_edm",
    "load_network",
]

# the attributes each official preconditioner sets in its __init__ (the inner network is `model`,
# EDM2's `Precond` calls it `unet`)
_KINDS: dict[str, tuple[str, ...]] = {
    "EDMPrecond": ("sigma_data", "sigma_min", "sigma_max", "model"),
    "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t", "model"),
    "VEPrecond": ("sigma_min", "sigma_max", "model"),
    "iDDPMPrecond": ("C_1", "C_2", "M", "model"),
    "Precond": ("sigma_data", "unet"),  # NVlabs/edm2 (EDM's coefficients, sigma in [0, inf))
}
_COMMON = ("label_dim", "use_fp16")


class OfficialUNet(nn.Module):
    """An official inner UNet (SongUNet / DhariwalUNet) called the way edmfast calls F.

    The official UNets take ``(x, noise_labels, class_labels)`` and require ``class_labels``:
    None for an unconditional network (label_dim 0); for a conditional one the given labels as
    float32 [B, label_dim], or one all-zero row when none are given (as the official forward does).
    """

    def __init__(self, unet: nn.Module, label_dim: int):
        super().__init__()
        self.unet = unet
        self.label_dim = int(label_dim)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Any = None, **kw: Any):
        if self.label_dim == 0:
            labels = None
        elif class_labels is None:
            labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            labels = (
                torch.as_tensor(class_labels, device=x.device).to(torch.float32).reshape(-1, self.label_dim)
            )
        return self.unet(x, noise_labels.flatten(), labels, **kw)


def _kind(net: Any) -> str:
    name = type(net).__name__
    if name in _KINDS:
        missing = [a for a in _KINDS[name] + _COMMON if not hasattr(net, a)]
        if missing:
            raise TypeError(
                f"net is a {name} but lacks the official attribute(s) {', '.join(missing)}: "
                "not an NVlabs/edm preconditioner"
            )
        return name
    # recognised by attributes alone (a renamed subclass): the most specific set first
    for kind in ("iDDPMPrecond", "VPPrecond", "EDMPrecond", "VEPrecond", "Precond"):
        if all(hasattr(net, a) for a in _KINDS[kind] + _COMMON):
            return kind
    raise TypeError(
        f"net must be an official NVlabs/edm EDMPrecond, VPPrecond, VEPrecond or iDDPMPrecond, or an "
        "NVlabs/edm2 Precond "
        f"(or the dict of a network pickle holding one under 'ema'), got {name}"
    )


def _device_of(net: Any) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without tensors)."""
    if not isinstance(net, nn.Module):
        return torch.device("cpu")
    for p in net.parameters():
        return p.device
    for b in net.buffers():
        return b.device
    return torch.device("cpu")


def _adopt_levels(pre: iDDPMPrecond, u: Any) -> None:
    """Use the official network's own levels u_j: it builds them in float32, whose recursion drifts
    from the float64 table by up to 5e-4 (relative, at u_(M-1)); rounding to the network's levels
    keeps sigma_min / sigma_max, round_sigma and c_noise identical to the official forward."""
    if not isinstance(u, torch.Tensor) or u.shape != pre._u_host.shape:
        return
    host = u.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()) or not bool((host[1:] < host[:-1]).all()):
        raise ValueError("net.u must be the official descending table of M + 1 finite levels")
    pre._u_host = host
    pre._u_asc_host = host.flip(0).contiguous()
    pre.u = host.clone()
    pre.sigma_min, pre.sigma_max = float(host[pre.M - 1]), float(host[0])


def from_edm(net: Any, dtype: torch.dtype | None = None) -> Precond:
    """The edmfast preconditioner equivalent to an official NVlabs/edm preconditioner ``net``
    (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond; or NVlabs/edm2's ``Precond``, as an EDMPrecond).

    Same coefficients, range (sigma_min / sigma_max), round_sigma (iDDPM), label plumbing
    (``cond={"class_labels": labels}``, float32 [B, label_dim] or one-hot) and network dtype. The
    dtype, unless given, is what the official forward runs on the device ``net`` is on now:
    float16 for a ``use_fp16`` network on CUDA, float32 otherwise (the official code uses fp16 on
    CUDA only; on the CPU fp16 would cost ~1e-3 relative error for nothing). So move ``net`` to
    its device first, as `load_network` does, or pass ``dtype``. The inner UNet is shared, not
    copied. ``net`` may also be the dict of a network pickle (its ``'ema'``).
    """
    if isinstance(net, dict):
        if "ema" not in net:
            raise TypeError(f"a network pickle's dict holds the network under 'ema'; got keys {sorted(net)}")
        net = net["ema"]
    kind = _kind(net)
    if dtype is None:
        on_cuda = _device_of(net).type == "cuda"
        dtype = torch.float16 if bool(net.use_fp16) and on_cuda else torch.float32
    label_dim = int(net.label_dim)
    if label_dim < 0:
        raise ValueError(f"net.label_dim must be >= 0, got {label_dim}")
    model = OfficialUNet(net.unet if kind == "Precond" else net.model, label_dim)
    pre: Precond
    if kind == "Precond":
        pre = EDMPrecond(model, sigma_data=float(net.sigma_data), dtype=dtype)
    elif kind == "EDMPrecond":
        pre = EDMPrecond(
            model,
            sigma_data=float(net.sigma_data),
            sigma_min=float(net.sigma_min),
            sigma_max=float(net.sigma_max),
            dtype=dtype,
        )
    elif kind == "VPPrecond":
        pre = VPPrecond(
            model,
            beta_d=float(net.beta_d),
            beta_min=float(net.beta_min),
            M=int(net.M),
            epsilon_t=float(net.epsilon_t),
            dtype=dtype,
        )
    elif kind == "VEPrecond":
        pre = VEPrecond(model, sigma_min=float(net.sigma_min), sigma_max=float(net.sigma_max), dtype=dtype)
    else:
        pre = iDDPMPrecond(model, C1=float(net.C_1), C2=float(net.C_2), M=int(net.M), dtype=dtype)
        _adopt_levels(pre, getattr(net, "u", None))
    # plain attributes the CLI reads (labels to make, image shape); nn.Module's typed setattr
    # does not know them
    setattr(pre, "label_dim", label_dim)  # noqa: B010
    for name in ("img_resolution", "img_channels"):
        value = getattr(net, name, None)
        if value is not None:
            setattr(pre, name, int(value))
    return pre


class NetworkFileError(ValueError):
    """A file that is not a (complete) network pickle; ``reason`` says what is wrong with it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path, self.reason = os.fspath(path), reason


class DownloadError(OSError):
    """A network pickle URL that could not be fetched (offline, HTTP error, cut-off transfer)."""


def is_url(path: Any) -> bool:
    """True for an ``http://`` / ``https://`` string (what `load_network` downloads)."""
    return isinstance(path, str) and path.split("://", 1)[0].lower() in ("http", "https") and "://" in path


# how pickletools.genops reports a stream that ends early (the wording depends on the opcode it was in)
_CUT_OFF = re.compile(r"exhausted|not enough data|only \d+ remain")


def pickle_problem(path: str | os.PathLike) -> str | None:
    """None if ``path`` holds one complete pickle stream, else what is wrong with it.

    Walks the opcodes with `pickletools` (nothing is imported or run), so it judges files whose
    classes are not importable here. The reasons name the usual causes: an empty or cut-off
    download, a text file (an HTML error page, a Git LFS pointer), a ``torch.save`` zip archive.
    """
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes; an interrupted download?)"
    with open(path, "rb") as f:
        head = f.read(64)
        if head.startswith(b"PK\x03\x04"):
            return (
                "a zip archive (torch.save's format, e.g. a state dict), not an NVlabs/edm network "
                "pickle; load it with torch.load and build the network yourself"
            )
        if head[:1] != b"\x80":  # every pickle protocol >= 2 starts with PROTO; official ones are 4
            text = head.decode("ascii", "replace")
            if all(c.isprintable() or c in "\r\n\t" for c in text):
                lfs = text.startswith("version https://git-lfs")
                return f"a text file, not a pickle: it starts with {head[:40]!r}" + (
                    " (a Git LFS pointer: fetch the real file)" if lfs else ""
                )
        f.seek(0)
        try:
            for _ in pickletools.genops(f):
                pass
        except ValueError as e:
            if _CUT_OFF.search(str(e)):
                return (
                    f"truncated: the pickle stream stops at byte {size} before its end mark "
                    "(an interrupted download?)"
                )
            return f"not a pickle ({e})"
    return None


def _describe_unpickling_error(path: str, e: BaseException) -> NetworkFileError:
    try:
        reason = pickle_problem(path)
    except OSError as oe:
        reason = f"cannot be read ({oe.strerror or oe})"
    return NetworkFileError(path, reason or f"cannot be unpickled ({type(e).__name__}: {e})")


def load_network(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> nn.Module:
    """The official network (the pickle's ``'ema'``) from an NVlabs/edm network pickle file or URL.

    ``path`` may be an ``http(s)://`` URL: it is downloaded once into ``cache_dir`` (see
    `download_network`) and loaded from there after. The pickle's classes come from the official
    code: its ``dnnlib`` and ``torch_utils`` packages must be importable (put the root of an
    NVlabs/edm checkout on ``sys.path``). Returns the module in eval mode, without gradients, on
    ``device``. A file that is empty, text or cut off raises `NetworkFileError` (a ValueError)
    naming the path and what is wrong. Unpickling runs code from the file, like any pickle.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path or an http(s) URL, got {type(path).__name__}")
    if is_url(path):
        path = download_network(str(path), cache_dir=cache_dir, progress=progress)
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"path must be a local file or an http(s) URL, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no network pickle at {path!r}")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in ("dnnlib", "torch_utils"):
            raise ImportError(
                f"loading {path!r} needs the official NVlabs/edm packages dnnlib and torch_utils "
                f"({e.name!r} is not importable): clone https://github.com/NVlabs/edm and put its root "
                "folder on sys.path (or PYTHONPATH)"
            ) from e
        raise
    except (EOFError, pickle.UnpicklingError) as e:
        raise _describe_unpickling_error(path, e) from None
    net = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(net, nn.Module):
        raise TypeError(f"{path!r} holds no network under 'ema' (got {type(net).__name__})")
    return net.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------- downloads

CACHE_ENV = "EDMFAST_NETWORK_CACHE"
_CHUNK = 1 << 20


def network_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where downloaded network pickles live: ``cache_dir``, else ``$EDMFAST_NETWORK_CACHE``, else
    ``$XDG_CACHE_HOME/edmfast/networks``, else ``~/.cache/edmfast/networks``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edmfast" / "networks"


def cached_name(url: str) -> str:
    """The cache file name of ``url``: a short hash of the whole URL (two URLs never share a file)
    and the URL's own file name, so the folder stays readable."""
    base = os.path.basename(urllib.parse.urlsplit(url).path) or "network.pkl"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-100:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _recorded(path: Path) -> str | None:
    """The sha256 written next to a downloaded file (``sha256sum`` format), None if absent."""
    try:
        text = Path(f"{path}.sha256").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    m = re.match(r"([0-9a-f]{64}) ", text)
    return m.group(1) if m else None


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """One downloader per file at a time (torchrun starts one process per GPU, all asking for the
    same URL): the others wait here, then find the finished file."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent downloads just race to the same complete file
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download_network(
    url: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True, timeout: float = 60.0
) -> Path:
    """The local path of a network pickle URL, downloaded once into the cache (`network_cache_dir`).

    A download is checked before it is kept: every byte the server announced arrived, and the
    bytes form one complete pickle stream (`pickle_problem`; nothing is run). Its SHA-256 is then
    written next to it (``NAME.sha256``, ``sha256sum -c`` format); a later call reuses the file when
    its content still has that hash and downloads it again otherwise. Progress is shown with tqdm
    (``progress``). Errors name the URL: `DownloadError` when it cannot be fetched (offline, HTTP
    404, a cut-off transfer), `NetworkFileError` when the server sent something else.
    """
    if not is_url(url):
        raise ValueError(f"url must start with http:// or https://, got {url!r}")
    folder = network_cache_dir(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(
            f"cannot create the network cache {folder} ({e.strerror or e}); set {CACHE_ENV} to a "
            "writable folder"
        ) from None
    dest = folder / cached_name(url)
    with _locked(folder / f".{dest.name}.lock"):
        if dest.is_file():
            want = _recorded(dest)
            if want is not None and _sha256(dest) == want:
                return dest
            # no record (killed between the rename and the record) or changed content: fetch again
        _fetch(url, dest, progress, timeout)
    return dest


def _fetch(url: str, dest: Path, progress: bool, timeout: float) -> None:
    from . import __version__

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    request = urllib.request.Request(url, headers={"User-Agent": f"edmfast/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as f:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            h = hashlib.sha256()
            got = 0
            from tqdm import tqdm

            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name.split("-", 1)[1],
                disable=not progress, leave=False,
            ) as bar:  # fmt: skip
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if total is not None and got != total:
            raise DownloadError(
                f"download of {url} was cut off: {got} of {total} bytes arrived; run again to retry"
            )
        problem = pickle_problem(tmp)
        if problem is not None:
            raise NetworkFileError(url, f"the server did not send a network pickle: {problem}")
        os.replace(tmp, dest)
        record = f"{h.hexdigest()}  {dest.name}\n"
        rec_tmp = tmp.with_suffix(".sha256.part")
        rec_tmp.write_text(record)
        os.replace(rec_tmp, f"{dest}.sha256")
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(
            f"cannot download {url}: {e.reason}; check the connection (offline?), or download the file "
            "yourself and give its local path"
        ) from None
    except (http.client.IncompleteRead, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise DownloadError(
            f"download of {url} was cut off ({type(e).__name__}: {e}); run again to retry"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".sha256.part").unlink(missing_ok=True)
