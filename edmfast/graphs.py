"""Whole-loop CUDA graphs: capture one sampling loop, replay it for new inputs, keep a small LRU.

A configuration (shapes, dtypes, device, backend, the plan's structure, conditioning layout) is
captured once; everything that varies between calls with the same configuration lives in
static device buffers that the caller refills before each replay (noise, seeds, coefficient
rows, the network's evaluation inputs, guidance values, tensor conditioning). Exact noise is drawn
by the graph itself from registered generator states, or copied in from pinned host memory.
Nothing the kernels read at replay time is a host scalar frozen at capture.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch


def capture(
    run: Callable[[bool], None], device: torch.device, generators: Sequence[torch.Generator] = ()
) -> tuple[torch.cuda.CUDAGraph, float]:
    """Warm ``run(True)`` up on a side stream, then capture ``run(False)``; returns (graph, seconds).

    The warm-up absorbs lazy initialization, compilation and cuDNN autotuning, which must not
    happen during capture; it is told so (``True``) and draws no random numbers, so the caller's
    generators are where they were. ``generators``: CUDA generators (besides the device's default
    one, which every capture registers) that the captured loop draws from; registered with the
    graph, each replay advances them by the draws of one run, as eager draws would. The capture is
    thread-local, so another thread may keep using the device (e.g. a concurrent eager call).
    """
    t0 = time.perf_counter()
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run(True)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    default = torch.cuda.default_generators[device.index if device.index is not None else 0]
    for g in generators:
        if g is not default:
            graph.register_generator_state(g)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        run(False)
    torch.cuda.synchronize(device)
    return graph, time.perf_counter() - t0


class GraphCache:
    """LRU of ``key -> (graph, buffers)`` with at most ``size`` entries; dropping an entry frees
    its graph's private memory pool. ``seen`` remembers configurations run once (for "auto")."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Any]] = OrderedDict()
        self._seen: set[tuple] = set()
        self._lock = threading.Lock()

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def should_capture(self, key: tuple) -> bool:
        """For ``cuda_graph="auto"``: capture once a configuration repeats (a one-off call, e.g.
        a single sample(), runs eagerly instead of paying warm-up + capture + replay)."""
        with self._lock:
            if key in self._entries or key in self._seen:
                return True
            self._seen.add(key)
            return False

    def get(self, key: tuple) -> tuple[torch.cuda.CUDAGraph, Any] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple, entry: tuple[torch.cuda.CUDAGraph, Any]) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()
