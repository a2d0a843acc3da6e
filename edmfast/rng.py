"""Per-sample random streams: a sample's noise depends on its own seed only."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PerSampleGenerator:
    """One ``torch.Generator(device).manual_seed(seed % 2**32)`` per sample.

    Draws are made sample by sample and stacked, so results do not depend on the batch size or
    on how seeds are split across processes. Drawing the latents first (``randn(shape)``) and
    then passing this object as the sampler's ``generator`` reproduces the official EDM
    generate script's per-seed streams.
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"):
        seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
        if not seeds:
            raise ValueError("seeds must hold at least one seed")
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
