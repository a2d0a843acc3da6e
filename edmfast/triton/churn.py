"""Churn noise injection fused with the network-input scaling: ``out = x + std eps``, ``out_net = c out``.

The same kernel as `heun_step` with p = 1 (a constexpr, so coef[0:3] are never read) and only the
noise operand: one read of x (plus the noise tensor, unless Philox makes it in registers) and one
write of each result. See `edmfast.reference.churn`.
"""

from __future__ import annotations

import torch

from . import _triton_op
from .heun_step import launch


@_triton_op("edmfast_triton::churn", mutates_args=("out", "out_net", "bad"))
def churn(
    x: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    step: int,
    out_net: torch.Tensor | None,
    bad: torch.Tensor | None = None,
    bad_step: int = 0,
) -> None:
    launch(
        x, coef, out, None, None, None, 1.0, noise, seeds, step, out_net, p_is_one=True, bad=bad,
        bad_step=bad_step,
    )  # fmt: skip
