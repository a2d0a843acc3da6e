"""``compile=True``: the network (F inside a preconditioner, via its ``raw``) through torch.compile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .plan import is_preconditioner


class CompiledNetwork:
    """``torch.compile`` of what the engine calls per evaluation: ``denoiser.raw`` for a
    preconditioner (so e.g. iDDPM's learned-variance split and the input dtype cast are kept),
    else the denoiser itself. The default mode is used: it composes with the engine's own
    whole-loop graph capture (reduce-overhead would capture graphs of its own inside ours).

    ``compile_s`` is the time of the first call (tracing + code generation), which is
    synchronized so the number is wall time, not launch time.
    """

    def __init__(self, denoiser: Any):
        target = denoiser.raw if is_preconditioner(denoiser) else denoiser
        try:
            self.fn: Callable[..., Any] = torch.compile(target, dynamic=False)
        except Exception as e:  # surfaced, never silently ignored
            raise RuntimeError(f"torch.compile of the denoiser failed: {e}") from e
        self.compile_s = 0.0
        self._warm = False
        self._lock = threading.Lock()

    def __call__(self, x_in: torch.Tensor, sigma_in: torch.Tensor, **cond: Any) -> Any:
        if self._warm:
            return self.fn(x_in, sigma_in, **cond)
        with self._lock:  # the first call compiles; a concurrent one waits for it
            if self._warm:
                return self.fn(x_in, sigma_in, **cond)
            t0 = time.perf_counter()
            try:
                out = self.fn(x_in, sigma_in, **cond)
            except Exception as e:
                raise RuntimeError(f"the compiled denoiser failed on its first call: {e}") from e
            if x_in.is_cuda:
                torch.cuda.synchronize(x_in.device)
            self.compile_s = time.perf_counter() - t0
            self._warm = True
            return out
