"""The one sampling engine: runs any `edmfast.plan.Plan` on fused kernels, eagerly or as one CUDA graph.

Every sampler (EDM's, k-diffusion's, DDPM / DDIM) reaches the kernels through here; the front
doors (`edmfast.sampler`, `edmfast.ancestral`, `edmfast.k_diffusion`, `edmfast.diffusers`) only
validate their own options and pick a plan. A call reads top-down:

1. `Engine.prepare`: the arguments every sampler shares (noise, cond / uncond, guidance values,
   seeds, generator or noise_sampler), checked before any kernel runs;
2. buffers: the state, the history slots, the network input, the flags (cached per shape);
3. run: the plan's program, op by op (`Engine._loop`), or a replay of its captured graph;
4. check: the one host sync, the per-sample non-finite flags the passes wrote; then the result.

The loop does nothing but network calls and kernel launches: one fused pass per network
evaluation (plus the one-launch CFG-rescale factors), no allocation, no host sync, so on CUDA the
whole program is captured once per configuration and replayed for new noise, seeds, schedules
(same structure), guidance values and tensor conditioning. Exact (generator) noise is drawn step
by step into one static buffer: in a graph, by the graph itself from generator states registered
with it (CUDA generators), or copied in from pinned host memory filled before the replay (CPU
generators).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops
from .graphs import GraphCache, capture
from .layout import INT32_MAX
from .options import check_cond, check_generator, check_guidance, check_noise, check_seeds, merge_cond
from .plan import START, Draw, Op, Pass, Plan, PlanCache, X

__all__ = ["Engine", "ReusableSampler", "StepView", "cached", "clear_sample_cache"]


# ----------------------------------------------------------------------------- a validated call


@dataclass
class Call:
    """One call's plan and arguments, validated (see `Engine.prepare`)."""

    plan: Plan
    noise: torch.Tensor
    backend: str
    net_dtype: torch.dtype
    rows: int  # network batch: B, or 2B with CFG
    kwargs: dict  # the network's keyword arguments (cond and uncond batched with CFG)
    use_cfg: bool
    rescale: bool
    w: float
    phi: float
    fused: bool  # noise from the in-kernel Philox stream
    seeds: torch.Tensor | None  # int64 [B] on the device (fused noise)
    source: _Noise | None  # exact noise
    callback: Callable[[dict], Any] | None = None
    on_step_end: Callable[[StepView], Any] | None = None

    @property
    def eager_only(self) -> bool:
        """Hooks run between the steps: only the eager loop has a between."""
        return (
            self.callback is not None
            or self.on_step_end is not None
            or (self.source is not None and not self.source.graphable)
        )


class StepView:
    """What an ``on_step_end`` hook gets after step ``i``: the state (writable in place: the engine
    then recomputes the next network input from it), the guidance values (``set_guidance``), and
    ``stop()`` to end the loop with the state as it is."""

    def __init__(self, engine_call: Call, buf: _Buffers, i: int):
        self._call, self._buf, self.i = engine_call, buf, i
        self.state = buf.bufs[X]
        self.stopped = False

    def set_guidance(self, guidance_scale: float, guidance_rescale: float | None = None) -> None:
        call = self._call
        phi = call.phi if guidance_rescale is None else guidance_rescale
        w, phi = check_guidance(guidance_scale, phi)
        if not call.use_cfg and w != 1.0:
            raise ValueError("guidance can change during a call only if the call started with guidance")
        if call.use_cfg and (phi > 0) != call.rescale:
            raise ValueError("guidance_rescale cannot be switched on or off during a call")
        call.w, call.phi = w, phi
        _set_guidance(self._buf, call)

    def stop(self) -> None:
        self.stopped = True


# ----------------------------------------------------------------------------- exact noise


class _Noise:
    """Exact noise: one draw of the state's shape per `Draw`, in the plan's order, from a generator
    (torch.Generator, `edmfast.PerSampleGenerator` or None: torch's global RNG) or from a
    k-diffusion-style ``noise_sampler(sigma, sigma_next)``."""

    def __init__(self, plan: Plan, noise: torch.Tensor, generator: Any, noise_sampler: Any):
        self.shape, self.device = tuple(noise.shape), noise.device
        self.generator, self.noise_sampler = generator, noise_sampler
        self.dtype = {"float64": torch.float64, "noise": noise.dtype}.get(plan.draw_dtype)
        # A CUDA graph can draw itself from CUDA generators registered with it; anything else is
        # drawn on the host before the replay (pinned staging) or runs eagerly (noise_sampler).
        self.graphable = noise_sampler is None
        gens = self.generators()
        self.in_graph = (
            self.device.type == "cuda"
            and noise_sampler is None
            and all(g.device == self.device for g in gens)
            and (not gens or hasattr(torch.cuda.CUDAGraph, "register_generator_state"))
        )

    def generators(self) -> list[torch.Generator]:
        g = self.generator
        if g is None:
            return []  # the default CUDA generator: part of every capture
        return list(getattr(g, "generators", [g]))

    def draw_into(self, d: Draw, eps: torch.Tensor, f_dtype: torch.dtype | None) -> None:
        """The draw ``d`` into the float32 noise buffer (drawn there directly when it can be: the same
        numbers, no temporary and no copy)."""
        dtype = self.dtype or f_dtype or torch.float32
        g = self.generator
        if self.noise_sampler is None and dtype == torch.float32 and (g is None or (
            isinstance(g, torch.Generator) and g.device == self.device
        )):  # fmt: skip
            torch.randn(self.shape, out=eps, generator=g)
        else:
            eps.copy_(self.draw(d, f_dtype))

    def draw(self, d: Draw, f_dtype: torch.dtype | None) -> torch.Tensor:
        """The draw ``d`` (a tensor shaped like the state, on its device)."""
        if self.noise_sampler is not None:
            s = torch.tensor(d.sigma, dtype=torch.float64)
            sn = torch.tensor(d.sigma_next, dtype=torch.float64)
            z = self.noise_sampler(s, sn)
            if not isinstance(z, torch.Tensor) or tuple(z.shape) != self.shape:
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"noise_sampler returned {got}, expected a tensor of shape {self.shape}")
            return z.to(self.device)
        dtype = self.dtype or f_dtype or torch.float32
        g = self.generator
        if g is None:
            return torch.randn(self.shape, dtype=dtype, device=self.device)
        if isinstance(g, torch.Generator):
            return torch.randn(self.shape, dtype=dtype, device=g.device, generator=g).to(self.device)
        return g.randn(self.shape, dtype=dtype, device=self.device)


# ----------------------------------------------------------------------------- buffers


@dataclass
class _Buffers:
    """Device memory of one configuration, validated once here and then used by raw launches."""

    state: torch.Tensor  # float32 [1 + slots, B, ...]: X, then the history slots
    bufs: list[torch.Tensor]  # views of state by buffer id
    net: torch.Tensor  # network input [R B, ...] in the network dtype
    k: torch.Tensor  # float32 [B] CFG-rescale factors
    bad: torch.Tensor  # int32 [B]: the flag of the first pass whose output went non-finite
    gs: torch.Tensor  # float32 [1] guidance scale (read by the kernels at run time)
    phi: torch.Tensor  # float32 [1] guidance rescale
    workspace: torch.Tensor | None  # CFG-rescale reduction workspace (with rescale only)
    eps: torch.Tensor | None  # float32 [B, ...]: the current exact-noise draw
    seeds: torch.Tensor | None  # int64 [B]: a static copy of the call's seeds (fused noise)
    # graphs only: static copies of what changes between replays
    start: torch.Tensor | None = None
    coef: torch.Tensor | None = None
    evals: torch.Tensor | None = None
    cond: dict = field(default_factory=dict)
    staging: torch.Tensor | None = None  # pinned host draws of a CPU generator, copied in by the graph
    plan: Plan | None = None  # whose rows are in coef / evals
    values: tuple = ()  # (guidance_scale, guidance_rescale) in gs / phi
    f_dtype: torch.dtype | None = None  # the network output's dtype (draws of plan.draw_dtype "f")
    launchers: OrderedDict = field(default_factory=OrderedDict)  # id(plan) -> (plan, launchers)
    f_like: torch.Tensor | None = None  # the network output's shape and dtype, when not net's
    cfg_launch: Any = None  # the prepared CFG-rescale factors


def _alloc(call: Call, graph: bool) -> _Buffers:
    plan, noise = call.plan, call.noise
    dev, shape = noise.device, tuple(noise.shape)
    f32: dict[str, Any] = dict(dtype=torch.float32, device=dev)
    n = noise[0].numel()
    # never inference tensors: a sampler warmed up under torch.inference_mode() keeps working
    # outside it (in-place writes to inference tensors are refused there), and vice versa
    with torch.inference_mode(False):
        state = torch.empty((1 + plan.slots, *shape), **f32)
        net = torch.empty((call.rows, *shape[1:]), dtype=call.net_dtype, device=dev)
        ws = None
        if call.rescale:  # the workspace follows the network output's whole rows
            f_like = torch.empty(call.rows, plan.f_channels * n, dtype=call.net_dtype, device=dev)
            ws = ops.cfg_workspace(f_like, call.backend)
        exact = call.source is not None and any(d.used for d in plan.draws)
        buf = _Buffers(
            state=state, bufs=list(state.unbind(0)), net=net, k=torch.ones(shape[0], **f32),
            bad=torch.empty(shape[0], dtype=torch.int32, device=dev), gs=torch.ones(1, **f32),
            phi=torch.zeros(1, **f32), workspace=ws, eps=torch.zeros(shape, **f32) if exact else None,
            seeds=torch.zeros(shape[0], dtype=torch.int64, device=dev) if call.seeds is not None else None,
        )  # fmt: skip
        if graph:
            buf.start = torch.empty(shape, **f32)
            buf.coef = torch.empty_like(plan.coef, device=dev)
            buf.evals = torch.empty(plan.eval_in.numel(), call.rows, dtype=plan.eval_dtype, device=dev)
            buf.cond = {k: torch.empty_like(v) for k, v in call.kwargs.items() if isinstance(v, torch.Tensor)}
            if exact and call.source is not None and not call.source.in_graph:
                used = sum(d.used for d in plan.draws)
                staging = torch.empty((used, *shape), dtype=torch.float32)
                buf.staging = staging.pin_memory() if dev.type == "cuda" else staging
    return buf


def _set_guidance(buf: _Buffers, call: Call) -> None:
    if call.use_cfg and buf.values != (call.w, call.phi):
        buf.gs.fill_(call.w)
        buf.phi.fill_(call.phi)
        buf.values = (call.w, call.phi)


# ----------------------------------------------------------------------------- launches


@functools.cache
def _kernels(backend: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """The unchecked entries of the ops the hooks use outside the prepared loop (callback rows)."""
    return ops.raw_affine_step(backend), ops.raw_ancestral_step(backend), ops.raw_cfg_rescale_factors(backend)


def _f_like(call: Call, buf: _Buffers) -> torch.Tensor:
    """A tensor shaped and typed like the network output (the prepared launches' f_like)."""
    if call.plan.f_channels == 1:
        return buf.net
    if buf.f_like is None:
        shape = (buf.net.shape[0], call.plan.f_channels * buf.net.shape[1], *buf.net.shape[2:])
        with torch.inference_mode(False):
            buf.f_like = torch.empty(shape, dtype=buf.net.dtype, device=buf.net.device)
    return buf.f_like


def _launcher(
    call: Call, buf: _Buffers, p: Pass, rows: list[torch.Tensor], start: torch.Tensor, checked: bool = False
) -> _Launch:
    """Pass ``p`` prepared (static pointers marshalled once): ``(launch, step)`` with ``launch(F,
    step, ctx)`` one native call. ``checked``: the operands were validated with an earlier pass of
    the same operand pattern over the same buffers (`_prepare_all`)."""
    plan = call.plan
    kk = buf.k if call.rescale and p.f else None
    noise = seeds = None
    step = stage = 0
    if p.noise is not None:
        d = plan.draws[p.noise]
        step, stage = d.step, d.stage
        if call.fused:
            seeds = buf.seeds
        else:
            noise = buf.eps
    x = start if p.x == START else buf.bufs[p.x]
    net = buf.net if p.net else None
    if p.kind == "ancestral":
        variance, clip = plan.ancestral
        launch = ops.prepare_ancestral_step(
            call.backend, x, rows[p.row], out=buf.bufs[p.out], f_like=_f_like(call, buf), variance=variance,
            clip=clip, k=kk, guidance_scale=buf.gs, noise=noise, seeds=seeds, out_net=net, bad=buf.bad,
            bad_step=p.flag,
        )  # fmt: skip
    else:
        launch = ops.prepare_affine_step(
            call.backend, x, rows[p.row], out=buf.bufs[p.out], f_like=_f_like(call, buf) if p.f else None,
            hist=tuple(buf.bufs[h] for h in p.hist),
            hist_out=None if p.hist_out is None else buf.bufs[p.hist_out],
            k=kk, guidance_scale=buf.gs, noise=noise, seeds=seeds, stage=stage, out_net=net, bad=buf.bad,
            bad_step=p.flag, checked=checked,
        )  # fmt: skip
    return launch, step


_Launch = tuple[Callable[[Any, int, Any], None], int]


def _prepare_all(
    call: Call, buf: _Buffers, rows: list[torch.Tensor], start: torch.Tensor, skip_start: bool
) -> list:
    """Every pass of the plan prepared: the first affine pass of each operand pattern (which
    buffers it reads and writes) fully checked (shapes, dtypes, devices, aliasing), the later ones
    of that pattern trusted (~1 us each instead of ~30: a 1000-step plan prepares in milliseconds).
    Only their coefficient row (a view of one checked table) and step differ."""
    seen: set[tuple] = set()
    out: list = []
    for p in call.plan.passes:
        if skip_start and p.x == START:
            out.append(None)
            continue
        pattern = (p.kind, p.x, p.out, p.hist, p.hist_out, p.f, p.net, p.noise is not None)
        out.append(_launcher(call, buf, p, rows, start, checked=pattern in seen and p.kind == "affine"))
        seen.add(pattern)
    return out


def _start_launcher(
    call: Call, buf: _Buffers, p: Pass, rows: list[torch.Tensor], start: torch.Tensor
) -> _Launch:
    """The start pass of an eager call reads the caller's noise, a new tensor each call: the unchecked
    entry (a few microseconds) rather than a prepared launch (validated per preparation, ~30)."""
    affine, _, _ = _kernels(call.backend)
    noise = seeds = None
    step = stage = 0
    if p.noise is not None:
        d = call.plan.draws[p.noise]
        step, stage = d.step, d.stage
        seeds, noise = (buf.seeds, None) if call.fused else (None, buf.eps)
    out_net = buf.net if p.net else None

    def launch(f: Any, step: int, ctx: Any) -> None:
        affine(
            start, rows[p.row], out=buf.bufs[p.out], noise=noise, seeds=seeds, step=step, stage=stage,
            out_net=out_net, bad=buf.bad, bad_step=p.flag,
        )  # fmt: skip

    return launch, step


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Runs plans for one network: buffers, the loop, graph capture / replay / LRU, the threading
    rule, per-call guidance, callbacks and hooks, the non-finite flags. One per front-door object.

    ``network()`` returns what an evaluation calls, ``fn(x_in, value, **cond)`` (a preconditioner's
    ``raw``, a plain denoiser, a DDPM model; looked up per call, so a front door may hold its model
    weakly); ``value`` is the plan's evaluation input for every network row.

    Threads: an Engine may be called from several threads at once, and re-entrantly (from inside
    its own network). One call at a time uses the cached buffers / graphs; a call that finds them
    busy runs eagerly on buffers of its own.
    """

    def __init__(
        self,
        network: Callable[[], Callable[..., Any]],
        *,
        backend: str = "auto",
        cuda_graph: Any = "auto",
        progress: bool | None = False,
        max_graphs: int = 4,
        describe: str = "the denoiser",
    ):
        self.network = network
        self.backend_option = backend
        self.cuda_graph = cuda_graph
        self.progress = progress
        self.describe = describe
        self.stats: dict[str, float] = {"compile_s": 0.0, "capture_s": 0.0, "captures": 0, "replays": 0}
        self._graphs = GraphCache(max_graphs)
        self._eager: tuple[tuple, _Buffers] | None = None
        self._lock = threading.Lock()  # held by the call that uses the cached buffers / graphs
        self._backends: dict[torch.device, str] = {}

    # ------------------------------------------------------------------ 1. validate

    def backend(self, device: torch.device) -> str:
        backend = self._backends.get(device)
        if backend is None:
            backend = self._backends[device] = ops.resolve_backend(self.backend_option, device)
        return backend

    def prepare(
        self,
        plan: Plan,
        noise: torch.Tensor,
        *,
        net_dtype: torch.dtype,
        cond: dict | None,
        uncond: dict | None,
        guidance_scale: Any,
        guidance_rescale: Any,
        noise_mode: str,
        generator: Any = None,
        seeds: Any = None,
        noise_sampler: Any = None,
        callback: Callable[[dict], Any] | None = None,
        on_step_end: Callable[[StepView], Any] | None = None,
    ) -> Call:
        """Check the arguments every sampler shares; raise ValueError / TypeError naming the bad one."""
        noise = check_noise(noise, finite=False)  # the first pass checks the values (no host sync)
        batch, device = noise.shape[0], noise.device
        backend = self.backend(device)
        if net_dtype not in ops.IO_DTYPES:
            raise TypeError(f"the network dtype must be one of {ops.IO_DTYPES}, got {net_dtype}")
        w, phi = check_guidance(guidance_scale, guidance_rescale)
        cond = check_cond(cond, batch, device, "cond")
        use_cfg = w != 1.0
        if use_cfg:
            if uncond is None:
                raise ValueError(
                    "guidance_scale != 1 needs uncond (the unconditional keyword arguments, {} if none)"
                )
            kwargs = merge_cond(cond, check_cond(uncond, batch, device, "uncond"), batch)
        else:
            kwargs = cond
        hooks = (("callback", callback), ("noise_sampler", noise_sampler), ("on_step_end", on_step_end))
        for name, fn in hooks:
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        check_generator(generator, batch)
        fused = noise_mode == "fused"
        if noise_sampler is not None:
            if noise_mode == "fused":
                raise ValueError("noise_sampler draws exact noise: it needs noise_mode='exact'")
            if generator is not None:
                raise ValueError("give generator or noise_sampler, not both (both would draw the noise)")
            if not plan.draws:
                raise ValueError(f"noise_sampler has no effect: this plan draws no noise ({plan.kind[-1]!r})")
        seeds_t = None
        if fused and plan.stochastic:
            if seeds is None:
                seeds = getattr(generator, "seeds", None)  # a PerSampleGenerator's (CPU) seeds
                if seeds is not None:
                    seeds = _to(seeds, device)
            if seeds is None:
                raise ValueError("noise_mode='fused' needs seeds (int64 [B]) or a PerSampleGenerator")
        if seeds is not None:
            seeds_t = check_seeds(seeds, batch, device).contiguous()
        if self.cuda_graph is True and device.type != "cuda":
            raise ValueError("cuda_graph=True needs CUDA tensors")
        source = None
        if not fused and plan.draws:
            source = _Noise(plan, noise, generator, noise_sampler)
        return Call(
            plan=plan, noise=noise, backend=backend, net_dtype=net_dtype,
            rows=2 * batch if use_cfg else batch, kwargs=kwargs, use_cfg=use_cfg,
            rescale=use_cfg and phi > 0, w=w, phi=phi, fused=fused,
            seeds=seeds_t if fused and plan.stochastic else None, source=source, callback=callback,
            on_step_end=on_step_end,
        )  # fmt: skip

    # ------------------------------------------------------------------ run

    def run(self, call: Call) -> torch.Tensor:
        """Sample: eagerly, or by replaying the configuration's graph; then check and return."""
        with torch.no_grad():
            # One call at a time owns the cached buffers and graphs; a call that finds them busy
            # (another thread, or this one re-entering from its network) runs on its own buffers.
            shared = self._lock.acquire(blocking=False)
            try:
                key = self._graph_key(call) if shared and not call.eager_only else None
                if key is not None and (self.cuda_graph is True or self._graphs.should_capture(key)):
                    buf = self._replay(key, call)
                else:
                    buf = self._eager_buffers(call, shared)
                    self._run_eager(call, buf)
                return self._finish(buf, call)  # the one host sync: the flags, then the result
            finally:
                if shared:
                    self._lock.release()

    def release(self) -> None:
        """Drop every captured graph and its memory pool, and the eager buffers."""
        with self._lock:
            self._graphs.clear()
            self._eager = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ 2. buffers

    def _eager_buffers(self, call: Call, shared: bool) -> _Buffers:
        """The cached eager buffers for this configuration (``shared``), else buffers of its own."""
        noise = call.noise
        plan = call.plan
        key = (
            tuple(noise.shape), noise.device, call.net_dtype, call.rows, plan.slots, plan.f_channels,
            call.source is not None, call.fused, call.rescale, call.backend,
        )  # fmt: skip
        if shared and self._eager is not None and self._eager[0] == key:
            return self._eager[1]
        buf = _alloc(call, graph=False)
        if shared:
            self._eager = (key, buf)
        return buf

    # ------------------------------------------------------------------ 3. run: eager

    def _run_eager(self, call: Call, buf: _Buffers) -> None:
        _set_guidance(buf, call)
        if call.seeds is not None and buf.seeds is not None:
            buf.seeds.copy_(call.seeds)
        start = call.noise  # the first pass reads the caller's noise directly when it can
        if start.dtype != torch.float32 or not start.is_contiguous():
            start = start.float().contiguous()
        device = start.device
        plan = call.plan
        rows = plan.rows_on(device)
        launchers = self._eager_launchers(call, buf, rows, start)
        self._loop(call, buf, launchers, plan.eval_rows_on(device, call.rows), call.kwargs, graph=False)

    @staticmethod
    def _eager_launchers(
        call: Call, buf: _Buffers, rows: list[torch.Tensor], start: torch.Tensor
    ) -> list[_Launch]:
        """The pass launchers of (plan, buffers), cached on the buffers; the start pass reads this
        call's noise, so it is bound per call."""
        plan = call.plan
        got = buf.launchers.get(id(plan))
        if got is None or got[0] is not plan:  # the plan is held with them: its id is not reused
            got = (plan, _prepare_all(call, buf, rows, start, skip_start=True))
            buf.launchers[id(plan)] = got
            while len(buf.launchers) > 4:
                buf.launchers.popitem(last=False)
        launchers = list(got[1])
        for j, p in enumerate(plan.passes):
            if p.x == START:
                launchers[j] = _start_launcher(call, buf, p, rows, start)
        return launchers

    def _loop(
        self,
        call: Call,
        buf: _Buffers,
        launchers: list[_Launch],
        evals: list[torch.Tensor],
        cond: dict,
        graph: bool,
        warmup: bool = False,
    ) -> None:
        """The whole program on static buffers: capturable as one CUDA graph (``graph``).

        Eager exact noise is drawn when the program reaches a DRAW; a graph draws inside itself or
        copies from the staging filled before the replay; a warm-up run draws nothing (it must not
        advance the caller's generator). CALLBACK and STEP_END run eagerly only.
        """
        plan = call.plan
        network = self.network()
        net, bad = buf.net, buf.bad
        shape, dtype, device = net.shape, net.dtype, net.device
        want = (shape[0], plan.f_channels * shape[1], *shape[2:])
        where = net.get_device()  # cheap per-evaluation device checks (a meta tensor also says -1)
        on_device: Callable[[torch.Tensor], bool] = (
            (lambda t: t.is_cpu) if where < 0 else (lambda t: t.get_device() == where)
        )
        ctx = ops.launch_context(call.backend, device)
        factors = self._cfg_launch(call, buf) if call.rescale else None
        source, eps = call.source, buf.eps
        staged = 0
        # on the CPU reading the flags costs no sync: bad noise is refused before the network runs
        check_start = not graph and device.type == "cpu"
        tensor = torch.Tensor
        PASS, EVAL, DRAW, CALLBACK = Op.PASS, Op.EVAL, Op.DRAW, Op.CALLBACK  # locals: the hot loop
        bar = None
        if self.progress is not False and not graph:  # None: tqdm decides (off without a terminal)
            from tqdm import tqdm

            bar = tqdm(total=plan.n, desc="edmfast", disable=None if self.progress is None else False)
        f = None
        bad.fill_(INT32_MAX)
        hooks = bar is not None or (not graph and (call.callback is not None or call.on_step_end is not None))
        program = plan.program_for(hooks, draws=source is not None and not warmup)
        try:
            for op, idx in program:
                if op is PASS:
                    launch, step = launchers[idx]
                    launch(f, step, ctx)
                    if idx == 0 and check_start and int(bad.min()) != INT32_MAX:
                        raise ValueError("noise must be finite (found NaN or inf)")
                elif op is EVAL:
                    f = network(net, evals[idx], **cond)
                    if (
                        f.__class__ is not tensor
                        or f.shape != want
                        or f.dtype is not dtype
                        or not on_device(f)
                    ):
                        buf.f_dtype = getattr(f, "dtype", None)  # exact draws of plan.draw_dtype "f"
                        f = self._checked(f, want, dtype, device, plan.f_channels)
                    else:
                        buf.f_dtype = dtype
                    if not f.is_contiguous():
                        f = f.contiguous()
                    if factors is not None:
                        factors(f, ctx)
                elif op is DRAW:
                    d = plan.draws[idx]
                    if source is None or warmup:
                        continue
                    if buf.staging is not None:  # graph with a host generator: copy the staged draw in
                        if d.used:
                            assert eps is not None
                            eps.copy_(buf.staging[staged], non_blocking=True)
                            staged += 1
                        continue
                    if d.used:
                        assert eps is not None
                        source.draw_into(d, eps, buf.f_dtype)
                    else:  # drawn only to keep the generator's stream where the reference leaves it
                        source.draw(d, buf.f_dtype)
                elif op is CALLBACK:
                    if call.callback is not None and not graph:
                        assert f is not None
                        self._callback(call, buf, idx, f)
                elif op is Op.STEP_END:
                    if bar is not None:
                        bar.update()
                    if call.on_step_end is not None and not graph and self._hook(call, buf, idx):
                        break
        finally:
            if bar is not None:
                bar.close()

    @staticmethod
    def _cfg_launch(call: Call, buf: _Buffers) -> Callable[[torch.Tensor, Any], None]:
        """The CFG-rescale factors over the prediction half of F, prepared (cached on the buffers)."""
        launch = buf.cfg_launch
        if launch is None:
            n = buf.bufs[X][0].numel()
            launch = buf.cfg_launch = ops.prepare_cfg_rescale_factors(
                call.backend, _f_like(call, buf), buf.gs, buf.phi, out=buf.k, workspace=buf.workspace,
                numel=n if call.plan.f_channels > 1 else None,
            )  # fmt: skip
        return launch

    def _checked(
        self, f: Any, want: tuple, dtype: torch.dtype, device: torch.device, channels: int
    ) -> torch.Tensor:
        """The network output as the next pass's operand (shape, device, dtype), or a clear error."""
        what = self.describe
        if not isinstance(f, torch.Tensor):
            raise TypeError(
                f"{what} returned {type(f).__name__}, expected a torch.Tensor shaped like its input"
            )
        if tuple(f.shape) != want:
            layout = (
                "as many channels as its input"
                if channels == 1
                else f"{channels}x its input's channels (the prediction, then the variance)"
            )
            raise ValueError(f"{what} returned shape {tuple(f.shape)}, expected {want}: {layout}")
        if f.device != device:
            raise ValueError(f"{what} returned a tensor on {f.device}, expected {device}")
        if not f.is_floating_point():
            raise TypeError(f"{what} returned dtype {f.dtype}, expected a floating dtype")
        return f.to(dtype)

    def _callback(self, call: Call, buf: _Buffers, i: int, f: torch.Tensor) -> None:
        """k-diffusion's callback after step i's first evaluation: fresh tensors (x, denoised)."""
        plan = call.plan
        st = plan.steps[i]
        x = buf.bufs[X]
        n = x[0].numel()
        if plan.f_channels > 1:  # the prediction half of a learned-variance output
            f = f.reshape(f.shape[0], -1)[:, :n].contiguous()
        denoised = torch.empty_like(x)
        affine, _, _ = _kernels(call.backend)
        affine(
            x, plan.rows_on(x.device)[st.denoise_row], out=denoised, f=f, k=buf.k if call.rescale else None,
            guidance_scale=buf.gs,
        )  # fmt: skip
        info: dict[str, Any] = {"x": x.clone(), "i": i, "denoised": denoised}
        info.update({k: torch.tensor(v, dtype=torch.float64) for k, v in st.info})
        assert call.callback is not None
        call.callback(info)

    def _hook(self, call: Call, buf: _Buffers, i: int) -> bool:
        """``on_step_end`` after step i; True when it stopped the loop. An in-place edit of the state
        is seen (its version counter moves) and the next network input is recomputed from it."""
        state = buf.bufs[X]
        version = state._version
        view = StepView(call, buf, i)
        assert call.on_step_end is not None
        call.on_step_end(view)
        renet = call.plan.steps[i].renet_row
        if state._version != version and renet is not None and not view.stopped:
            affine, _, _ = _kernels(call.backend)
            affine(state, call.plan.rows_on(state.device)[renet], out=state, out_net=buf.net)
        return view.stopped

    # ------------------------------------------------------------------ 3. run: graphs

    def _graph_key(self, call: Call) -> tuple | None:
        """What a captured graph depends on besides tensor values; None when graphs are off here."""
        noise = call.noise
        if self.cuda_graph is False or noise.device.type != "cuda":
            return None
        source = call.source
        return (
            tuple(noise.shape), noise.dtype, noise.device, call.net_dtype, call.backend, call.plan.structure,
            call.use_cfg, call.rescale, call.fused,
            None if source is None else (source.in_graph, source.dtype),
            tuple(
                (k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                for k, v in sorted(call.kwargs.items())
            ),
        )  # fmt: skip

    def _replay(self, key: tuple, call: Call) -> _Buffers:
        """The configuration's graph (captured on first use) replayed on refilled static buffers."""
        device = call.noise.device
        entry = self._graphs.get(key)
        if entry is None:
            buf = _alloc(call, graph=True)
            self._fill(buf, call, draw=False)
            assert buf.coef is not None and buf.evals is not None and buf.start is not None
            cond = {k: buf.cond.get(k, v) for k, v in call.kwargs.items()}
            rows, evals = list(buf.coef.unbind(0)), list(buf.evals.unbind(0))
            launchers = _prepare_all(call, buf, rows, buf.start, skip_start=False)
            gens = call.source.generators() if call.source is not None and call.source.in_graph else []
            graph, seconds = capture(
                lambda warm: self._loop(call, buf, launchers, evals, cond, graph=True, warmup=warm),
                device,
                generators=gens,
            )
            self.stats["capture_s"] += seconds
            self.stats["captures"] += 1
            entry = (graph, buf)
            self._graphs.put(key, entry)
        graph, buf = entry
        self._fill(buf, call, draw=True)
        if self.progress:  # the whole loop is one replay: one tick, closed when it has run
            from tqdm import tqdm

            with tqdm(total=1, desc="edmfast (graph replay)") as bar:
                graph.replay()
                torch.cuda.current_stream(device).synchronize()
                bar.update()
        else:
            graph.replay()
        self.stats["replays"] += 1
        return buf

    def _fill(self, buf: _Buffers, call: Call, draw: bool) -> None:
        """Refill a graph's static inputs (device-to-device copies, no host sync)."""
        plan, device = call.plan, call.noise.device
        assert buf.start is not None and buf.coef is not None and buf.evals is not None
        buf.start.copy_(call.noise)
        if buf.plan is not plan:  # the rows change only with the plan
            buf.coef.copy_(plan.coef_on(device))
            buf.evals.copy_(plan.eval_on(device, call.rows))
            buf.plan = plan
        if call.seeds is not None and buf.seeds is not None:
            buf.seeds.copy_(call.seeds)
        _set_guidance(buf, call)
        if draw and buf.staging is not None and call.source is not None:
            # a graph cannot call a host generator: every draw is made now, in the program's order
            u = 0
            for d in plan.draws:
                z = call.source.draw(d, buf.f_dtype)
                if d.used:
                    buf.staging[u].copy_(z)
                    u += 1
        for k, v in buf.cond.items():
            v.copy_(call.kwargs[k])

    # ------------------------------------------------------------------ 4. check

    def _finish(self, buf: _Buffers, call: Call) -> torch.Tensor:
        """The one host sync of a call: read the per-sample non-finite flags, then copy out."""
        compiled = getattr(self.network(), "compile_s", None)
        if compiled is not None:
            self.stats["compile_s"] = compiled
        bad = buf.bad.tolist()
        first = min(bad)
        if first != INT32_MAX:
            samples = [b for b, s in enumerate(bad) if s == first]
            first -= 1  # the start pass flags 0, step i's passes flag i + 1 (never a negative step)
            if first < 0:
                raise ValueError(f"noise must be finite (found NaN or inf in samples {samples[:8]})")
            where = ", ".join(f"{k}={v:g}" for k, v in call.plan.steps[first].info[:1])
            raise FloatingPointError(
                f"non-finite values appeared at step {first} ({where}) in samples {samples[:8]}: "
                f"{self.describe} produced NaN or inf"
            )
        return buf.bufs[X].to(call.noise.dtype, copy=True)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (seeds) on ``device`` without a host sync (pinned, non-blocking)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ----------------------------------------------------------------------------- front doors


class ReusableSampler:
    """What every reusable front door shares: its model (held weakly when the sampler cache made it:
    ``model`` may be a weakref), the one `Engine` that runs its plans, and a cache of those plans.

    ``network(model)`` picks what an evaluation calls (e.g. a preconditioner's ``raw``); with
    ``compile`` it goes through `edmfast.compile.CompiledNetwork` once.
    """

    what = "model"
    opts: Any  # every front door's validated options (guidance defaults, noise mode)

    def __init__(
        self,
        model: Any,
        network: Callable[[Any], Callable[..., Any]],
        *,
        backend: str,
        cuda_graph: Any,
        progress: bool | None,
        compile: bool,
        max_graphs: int,
        plans: int = 8,
    ):
        m = model() if isinstance(model, weakref.ref) else model
        if not callable(m):
            raise TypeError(f"{self.what} must be callable, got {type(m).__name__}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.model_ref: Callable[[], Any] = model if isinstance(model, weakref.ref) else (lambda: m)
        if compile:
            from .compile import CompiledNetwork

            compiled = CompiledNetwork(m)
            fn: Callable[[], Any] = lambda: compiled  # noqa: E731
        else:
            fn = lambda: network(self.model)  # noqa: E731
        self.engine = Engine(
            fn, backend=backend, cuda_graph=cuda_graph, progress=progress, max_graphs=max_graphs,
            describe=f"the {self.what}",
        )  # fmt: skip
        self._plans = PlanCache(plans)

    @property
    def model(self) -> Any:
        m = self.model_ref()
        if m is None:
            raise RuntimeError(f"the {self.what} of this cached sampler was garbage-collected")
        return m

    @property
    def stats(self) -> dict[str, float]:
        """``compile_s`` (the first call through a compiled network), ``capture_s``, ``captures``,
        ``replays``."""
        return self.engine.stats

    def _run(self, plan: Plan, noise: torch.Tensor, net_dtype: torch.dtype, **call: Any) -> torch.Tensor:
        """One call of ``plan``: the shared arguments checked (`Engine.prepare`), then run. Guidance
        values not given per call (None) come from the sampler's options, as does the noise mode."""
        opts = self.opts
        for name in ("guidance_scale", "guidance_rescale"):
            if call.get(name) is None:
                call[name] = getattr(opts, name)
        return self.engine.run(
            self.engine.prepare(plan, noise, net_dtype=net_dtype, noise_mode=opts.noise_mode, **call)
        )

    def release(self) -> None:
        """Drop every captured graph and its memory pool, the eager buffers and the cached plans."""
        self.engine.release()
        self._plans.clear()


# ----------------------------------------------------------------------------- the sampler cache

# The front doors (`sample`, `ablation_sample`, `sample_ancestral`, accelerated pipelines) keep
# their reusable samplers here, so repeated calls reuse plans, buffers and captured graphs: one LRU
# keyed by (front door, id(model), options), holding the model weakly (an entry dies with it).
_CACHE_SIZE = 8
_cache: OrderedDict[tuple, Any] = OrderedDict()
_cache_lock = threading.Lock()


def cached(key: tuple, model: Any, make: Callable[[Any], Any]) -> Any:
    """The cached sampler for (``key``, ``model``), made by ``make(weakref-or-model)`` on a miss.

    ``make`` receives a weak reference to ``model`` (or the model itself when it cannot be weakly
    referenced; then nothing is cached). The sampler must expose ``model_ref`` (that argument) so a
    reused id is never served another model's sampler."""
    full = (key, id(model))
    with _cache_lock:
        s = _cache.get(full)
        if s is not None and s.model_ref() is model:
            _cache.move_to_end(full)
            return s
    try:
        ref = weakref.ref(model, functools.partial(_drop, full))
    except TypeError:  # not weak-referenceable (a builtin function): no caching
        return make(model)
    s = make(ref)
    with _cache_lock:
        _cache[full] = s
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return s


def _drop(key: tuple, _ref: Any = None) -> None:
    with _cache_lock:
        _cache.pop(key, None)


def clear_sample_cache() -> None:
    """Forget every cached sampler (`sample`, `ablation_sample`, `sample_ancestral`, accelerated
    pipelines); their buffers and captured graphs are freed with them."""
    with _cache_lock:
        samplers = list(_cache.values())
        _cache.clear()
    for s in samplers:
        s.release()
