"""Per-sample random streams: a sample's noise depends on its own seed only."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

# the seeds tensor is int64 (the fused noise keys on it): a seed must fit, and the official
# script's seeds are never negative
MAX_SEED = 2**63 - 1


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds as Python ints in [0, 2**63 - 1]; a TypeError / ValueError naming ``seeds`` otherwise."""
    try:
        values = list(seeds)
    except TypeError:
        raise TypeError(f"seeds must be a sequence of integers, got {type(seeds).__name__}") from None
    if not values:
        raise ValueError("seeds must hold at least one seed")
    out: list[int] = []
    for s in values:
        if isinstance(s, torch.Tensor) and s.numel() == 1 and not (s.is_floating_point() or s.is_complex()):
            s = s.item()  # a 0-d integer tensor from a seeds list built with torch
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"seeds must be integers, got {s!r} ({type(s).__name__})")
        if not 0 <= int(s) <= MAX_SEED:
            raise ValueError(f"seeds must be in [0, 2**63 - 1] (int64, not negative), got {int(s)}")
        out.append(int(s))
    return out


class PerSampleGenerator:
    """One ``torch.Generator(device).manual_seed(seed % 2**32)`` per sample; seeds in [0, 2**63 - 1].

    Draws are made sample by sample and stacked, so results do not depend on the batch size or
    on how seeds are split across processes. Drawing the latents first (``randn(shape)``) and
    then passing this object as the sampler's ``generator`` reproduces the official EDM
    generate script's per-seed streams.
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"):
        seeds = _check_seeds(seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)
        self.device = torch.device(device)
        self.seeds = torch.tensor(seeds, dtype=torch.int64)
        self.generators = [torch.Generator(self.device).manual_seed(s % (1 << 32)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _check(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"shape {shape} must start with the number of seeds ({len(self.generators)})")
        return shape

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Standard normals [B, ...]: row b from generator b."""
        shape = self._check(shape)
        return torch.stack(
            [torch.randn(shape[1:], generator=g, dtype=dtype, device=self.device) for g in self.generators]
        ).to(device or self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, low: int, high: int, shape: Sequence[int], device=None) -> torch.Tensor:
        """Uniform integers in [low, high) [B, ...]: row b from generator b (e.g. class labels)."""
        shape = self._check(shape)
        return torch.stack(
            [torch.randint(low, high, shape[1:], generator=g, device=self.device) for g in self.generators]
        ).to(device or self.device)
