"""A built-in data set and its exact denoiser, so the CLI samples real images with no download.

`shapes_dataset` draws 32 RGB 32x32 images of simple shapes (discs, squares, rings, stripes,
crosses, triangles, gradients, checkerboards) in four colour schemes, procedurally and
deterministically. `ShapesDenoiser` is the *ideal* denoiser of that finite set,
``D(x; sigma) = sum_k softmax_k(-|x - y_k|^2 / (2 sigma^2)) y_k`` (`GaussianMixtureDenoiser` with
s = 0), in EDM's [-1, 1] pixel space. A correct sampler lands every sample on one of the training
images, so `nearest_rms` (distance to the nearest one, in 8-bit levels) measures the sampler:
discretisation error shows up as blur or as a blend of two shapes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .analytic import GaussianMixtureDenoiser

IMAGE_SHAPE = (3, 32, 32)

# (background, foreground) RGB in [0, 1]: four schemes that stay distinct in grey level too.
_PALETTES = (
    ((0.05, 0.05, 0.15), (1.00, 0.85, 0.10)),  # yellow on navy
    ((0.95, 0.95, 0.95), (0.85, 0.10, 0.10)),  # red on white
    ((0.10, 0.35, 0.10), (0.55, 0.85, 1.00)),  # sky blue on green
    ((0.55, 0.10, 0.55), (1.00, 1.00, 1.00)),  # white on purple
)
_SHAPES = ("disc", "square", "ring", "hstripes", "vstripes", "cross", "triangle", "checker")


def _mask(kind: str, size: int) -> torch.Tensor:
    """Foreground coverage in [0, 1] ([size, size], float64), slightly anti-aliased."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    y, x = torch.meshgrid(c, c, indexing="ij")
    r = (x**2 + y**2).sqrt()
    soft = 2.0 / size  # one pixel of smoothing: edges stay crisp but not aliased

    def inside(signed: torch.Tensor) -> torch.Tensor:  # signed distance < 0 inside
        return (0.5 - signed / soft).clamp(0, 1)

    if kind == "disc":
        return inside(r - 0.6)
    if kind == "square":
        return inside(torch.maximum(x.abs(), y.abs()) - 0.55)
    if kind == "ring":
        return inside((r - 0.55).abs() - 0.15)
    if kind == "hstripes":
        return (torch.sin(y * 2.5 * math.pi) > 0).double()
    if kind == "vstripes":
        return (torch.sin(x * 2.5 * math.pi) > 0).double()
    if kind == "cross":
        return inside(torch.minimum(x.abs(), y.abs()) - 0.18) * inside(torch.maximum(x.abs(), y.abs()) - 0.8)
    if kind == "triangle":  # apex at the top (rows grow downwards), base at y = 0.6
        return inside(torch.maximum(y - 0.6, x.abs() - 0.6 * (y + 0.65)))
    if kind == "checker":
        return ((torch.floor((x + 1) * 2) + torch.floor((y + 1) * 2)) % 2).double()
    raise ValueError(f"unknown shape {kind!r}")


def shapes_dataset(size: int = 32) -> torch.Tensor:
    """The 32 built-in images, float64 [32, 3, size, size] in [-1, 1] on the 8-bit grid (deterministic).

    Eight shapes x four colour schemes; the last scheme also fades the background vertically so
    that a smooth gradient is part of the set.
    """
    images = []
    for p, (bg, fg) in enumerate(_PALETTES):
        for kind in _SHAPES:
            m = _mask(kind, size)
            bg_t = torch.tensor(bg, dtype=torch.float64).reshape(3, 1, 1).expand(3, size, size)
            if p == len(_PALETTES) - 1:
                bg_t = bg_t * torch.linspace(1.0, 0.3, size, dtype=torch.float64).reshape(1, size, 1)
            fg_t = torch.tensor(fg, dtype=torch.float64).reshape(3, 1, 1)
            images.append(bg_t * (1 - m) + fg_t * m)
    # Stored as 8-bit like any image data set, then mapped to [-1, 1] the EDM way (u8 / 127.5 - 1):
    # a sample that lands on a training image then converts back to exactly its bytes in `to_uint8`.
    u8 = (torch.stack(images) * 255).round()
    return u8 / 127.5 - 1


class ShapesDenoiser(nn.Module):
    """Ideal denoiser of `shapes_dataset`: ``D(x, sigma)`` for x [B, 3, 32, 32] in [-1, 1] + noise.

    ``image_shape`` = (3, 32, 32) tells generators what to sample; ``images`` holds the set.
    """

    image_shape = IMAGE_SHAPE

    def __init__(self, s: float = 0.0):
        super().__init__()
        self.images = shapes_dataset(IMAGE_SHAPE[-1])
        self.mixture = GaussianMixtureDenoiser(self.images, s=s)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **_: object) -> torch.Tensor:
        return self.mixture(x, sigma)


def default_model() -> tuple[nn.Module, tuple[int, ...]]:
    """The CLI's default model factory (``--model edmfast.data:default_model``)."""
    return ShapesDenoiser(), IMAGE_SHAPE


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to uint8 the way EDM's generate script does: ``(x * 127.5 + 128).clip(0, 255)``."""
    return (x.to(torch.float64) * 127.5 + 128).clip(0, 255).to(torch.uint8)


def nearest_rms(samples: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS distance to the nearest image of ``images``, in 8-bit levels (float64 [B]).

    Computed on the uint8 images a user would see, so 0 means pixel-identical.
    """
    a = to_uint8(samples).reshape(samples.shape[0], -1).double()
    b = to_uint8(images).reshape(images.shape[0], -1).double()
    return torch.cdist(a, b).min(dim=1).values / math.sqrt(a.shape[1])


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 [B, C, H, W] -> one uint8 [H', W', C] grid image (row-major, ``pad`` pixels of black)."""
    b, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = torch.zeros(c, rows * (h + pad) + pad, columns * (w + pad) + pad, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid.permute(1, 2, 0).contiguous()
