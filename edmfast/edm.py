"""Official NVlabs/edm networks on the fused engine.

The official preconditioners (``training/networks.py``: EDMPrecond, VPPrecond, VEPrecond,
iDDPMPrecond) compute ``D = c_skip x + c_out F(c_in x; c_noise, class_labels)`` in their
``forward``, so handing one to `edmfast.sample` works but fuses nothing. `from_edm` reads the
settings off such a module and returns the matching `edmfast.precond` preconditioner around its
inner UNet, whose coefficients the engine folds into its passes. `load_network` reads an official
network pickle (its classes live in the official ``dnnlib`` / ``torch_utils`` packages).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import nn

from .precond import EDMPrecond, Precond, VEPrecond, VPPrecond, iDDPMPrecond

__all__ = ["OfficialUNet", "from_edm", "load_network"]

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
    (``cond={"class_labels": labels}``, float32 [B, label_dim] or one-hot) and network dtype:
    float16 when ``net.use_fp16``, else float32, unless ``dtype`` is given. (The official forward
    runs fp16 on CUDA only; pass ``dtype=torch.float32`` to match it on the CPU.) The inner UNet
    is shared, not copied. ``net`` may also be the dict of a network pickle (its ``'ema'``).
    """
    if isinstance(net, dict):
        if "ema" not in net:
            raise TypeError(f"a network pickle's dict holds the network under 'ema'; got keys {sorted(net)}")
        net = net["ema"]
    kind = _kind(net)
    if dtype is None:
        dtype = torch.float16 if bool(net.use_fp16) else torch.float32
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


def load_network(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The official network (the pickle's ``'ema'``) from an NVlabs/edm network pickle file.

    The pickle's classes come from the official code: its ``dnnlib`` and ``torch_utils`` packages
    must be importable (put the root of an NVlabs/edm checkout on ``sys.path``). Returns the
    module in eval mode, without gradients, on ``device``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"path must be a local file (download URLs first), got {path!r}")
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
    net = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(net, nn.Module):
        raise TypeError(f"{path!r} holds no network under 'ema' (got {type(net).__name__})")
    return net.eval().requires_grad_(False).to(device)
