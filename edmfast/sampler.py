"""The sampling engine: EDM's sampler on fused kernels, optionally one CUDA graph per call.

Per Heun step the loop runs two network evaluations and two fused passes (SPEC §3):

* pass A reads x_hat and F, writes the correction point x' and the next network input c_in x';
* pass B reads x_hat, x' and F', writes x_{i+1} already churned for the next step (x_hat_{i+1})
  and its network input.

Preconditioning (c_skip, c_out, c_in) and classifier-free guidance fold into the coefficients of
those passes (`edmfast.plan`). A call reads: validate -> plan (cached) -> buffers (cached) ->
run (eager loop or graph replay) -> check -> return. Inside the loop there is nothing but the
network calls and the kernel launches (2 per Heun step, 4 with CFG-rescale): no host sync, no
allocation, no other torch op; non-finite values are flagged per sample by the passes themselves
and read once, after the loop.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops
from .compile import CompiledNetwork
from .graphs import GraphCache, capture
from .options import (
    SamplerOptions,
    _real,
    check_cond,
    check_generator,
    check_noise,
    check_seeds,
    merge_cond,
    with_option_signature,
)
from .plan import F32_MAX, AblationOptions, Plan, PlanCache, is_preconditioner
from .reference import draw_exact_noise

INT32_MAX = 2**31 - 1
# solver="2nd" stores x' in float32 and pass B rebuilds d from x' - x_hat, so float32 rounding is
# amplified by ~1/(2 alpha^2): measured rel. error vs the float64 reference 2e-7 at alpha 0.5,
# 1.2e-5 at 0.1, 3e-4 at 0.02, 2e-3 at 0.01, 0.2 at 0.001 (12-32 steps). Below 0.1 the fused
# engine would exceed its 2e-5 budget, so it refuses; reference.sample accepts (0, 1].
ALPHA_MIN = 0.1


# ----------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class _Kernels:
    """The two fused ops of the loop for one backend, called on buffers validated at allocation
    (`ops.raw_heun_step` / `ops.raw_cfg_rescale_factors`: one launch each, no checks)."""

    step: Callable[..., Any]
    cfg: Callable[..., Any]
    workspace: Callable[[torch.Tensor], torch.Tensor]


@functools.cache
def _kernels(backend: str) -> _Kernels:
    return _Kernels(
        ops.raw_heun_step(backend),
        ops.raw_cfg_rescale_factors(backend),
        functools.partial(ops.cfg_workspace, backend=backend),
    )


# ----------------------------------------------------------------------------- buffers


@dataclass
class _Buffers:
    """Device memory of one configuration; validated once here, then used by raw kernel calls."""

    x_hat: torch.Tensor  # float32 state [B, ...]
    x_prime: torch.Tensor  # float32 correction point [B, ...]
    net: torch.Tensor  # network input [R B, ...] in the network dtype (R = 2 with CFG)
    k: torch.Tensor  # float32 [B] CFG-rescale factors
    bad: torch.Tensor  # int32 [B]: 1 + the first step whose state went non-finite (0: the noise)
    gs: torch.Tensor  # float32 [1] guidance scale
    phi: torch.Tensor  # float32 [1] guidance rescale
    workspace: torch.Tensor | None  # static CFG-rescale reduction workspace (with rescale only)
    exact_eps: torch.Tensor  # float32 [N | 1 | 0, B, ...] exact churn draws (N: graphs, 1: eager)
    # graphs only: static copies of what changes between replays
    noise: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    coef: torch.Tensor | None = None  # [1 + 2N, 8]
    sigma: torch.Tensor | None = None  # [2N, R B]
    cond: dict = field(default_factory=dict)
    plan: Plan | None = None  # whose rows are in coef / sigma
    values: tuple = ()  # (guidance_scale, guidance_rescale) in gs / phi


@dataclass(slots=True)
class _Call:
    """One validated call: its plan, inputs and per-call values, and the kernels to run."""

    plan: Plan
    noise: torch.Tensor
    seeds: torch.Tensor | None  # int64 [B] on the device (fused noise)
    generator: Any  # exact noise
    kwargs: dict  # the network's keyword arguments (cond and uncond batched with CFG)
    backend: str
    kernels: _Kernels
    net_dtype: torch.dtype
    rows: int  # network batch: B, or 2B with CFG
    use_cfg: bool
    rescale: bool
    w: float
    phi: float
    exact: bool


def _alloc(call: _Call, graph: bool) -> _Buffers:
    noise, plan, rows, net_dtype, exact = call.noise, call.plan, call.rows, call.net_dtype, call.exact
    dev, shape, n = noise.device, tuple(noise.shape), plan.n
    f32: dict[str, Any] = dict(dtype=torch.float32, device=dev)
    # never inference tensors: a Sampler warmed up under torch.inference_mode() keeps working
    # outside it (in-place writes to inference tensors are refused there), and vice versa
    with torch.inference_mode(False):
        net = torch.empty((rows, *shape[1:]), dtype=net_dtype, device=dev)
        buf = _Buffers(
            x_hat=torch.empty(shape, **f32),
            x_prime=torch.empty(shape, **f32),
            net=net,
            k=torch.ones(shape[0], **f32),
            bad=torch.empty(shape[0], dtype=torch.int32, device=dev),
            gs=torch.ones(1, **f32),
            phi=torch.zeros(1, **f32),
            workspace=call.kernels.workspace(net) if call.rescale else None,
            # eager loops draw exact noise step by step into one slot; graphs need all N up front
            exact_eps=torch.zeros(((n if graph else 1) if exact else 0, *shape), **f32),
        )
        if graph:
            buf.noise = torch.empty(shape, **f32)
            buf.seeds = torch.zeros(shape[0], dtype=torch.int64, device=dev)
            buf.coef = torch.empty_like(plan.coef, device=dev)
            buf.sigma = torch.empty(2 * n, rows, **f32)
            buf.cond = {k: torch.empty_like(v) for k, v in call.kwargs.items() if isinstance(v, torch.Tensor)}
    return buf


# ----------------------------------------------------------------------------- the sampler


class Sampler:
    """A reusable sampler: ``Sampler(denoiser, **options)(noise, cond=..., seeds=...)``.

    Options are those of `sample`. Per call: the noise, ``sigmas`` (default: EDM's), ``cond`` /
    ``uncond``, ``generator``, ``seeds``, and ``guidance_scale`` / ``guidance_rescale`` (override
    the options; kept in device memory, so a captured graph serves any value). On CUDA with
    ``cuda_graph`` on, the whole loop (all steps, both evaluations, CFG, noise) is captured once
    per configuration and replayed for new noise, seeds, sigma values, guidance values and tensor
    conditioning. A configuration is re-captured when any of these change: noise shape/dtype/
    device, the network dtype, conditioning keys/shapes/dtypes, guidance on/off or rescale on/off,
    number of steps, which steps churn or take the correction (that depends on s_tmin/s_tmax and
    trailing zeros), zero-SNR start, solver or noise mode. At most ``max_graphs`` configurations
    are kept (least recently used dropped, its memory pool released); `release` frees them all.
    With ``cuda_graph="auto"`` a configuration's first call runs eagerly and the capture happens
    when it repeats; ``True`` captures on the first call; ``False`` never captures.

    Threads: a Sampler may be called from several threads at once, and re-entrantly (from inside
    its own denoiser). One call at a time uses the cached buffers / graphs; a call that finds them
    busy runs eagerly on buffers of its own (correct, allocated per call).

    Plans (the float64 schedule folded into coefficient rows) are cached per schedule values and
    options: the denoiser's coefficients must not change while a Sampler uses it.

    A call with a ``callback`` (see `sample`) runs the eager loop, graphs or not.

    ``ablation`` (an `edmfast.plan.AblationOptions`): EDM's design space, sigma(t), s(t) and the
    discretization's time steps (see `ablation_sample`); ``sigmas`` must then be None.

    ``stats`` records ``compile_s`` (first call through the compiled network), ``capture_s``,
    ``captures`` and ``replays``.
    """

    @with_option_signature
    def __init__(
        self,
        denoiser: Any,
        sigmas: Any = None,
        *,
        max_graphs: int = 4,
        ablation: AblationOptions | None = None,
        **options: Any,
    ):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable D(x, sigma, **cond), got {type(denoiser).__name__}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.opts = SamplerOptions.create(**options)
        if self.opts.solver == "2nd" and self.opts.alpha < ALPHA_MIN:
            raise ValueError(
                f"alpha={self.opts.alpha} is below {ALPHA_MIN}: the fused float32 engine loses accuracy "
                "like 1/alpha^2 there (use edmfast.reference.sample or reference.ablation_sample for "
                "such ablations)"
            )
        self._check_guidance(self.opts.guidance_scale, self.opts.guidance_rescale)
        if ablation is not None and not isinstance(ablation, AblationOptions):
            raise TypeError(
                f"ablation must be an edmfast.plan.AblationOptions or None, got {type(ablation).__name__}"
            )
        if ablation is not None and sigmas is not None:
            raise ValueError(
                "sigmas must be None with ablation (the time steps come from the ablation options)"
            )
        self.ablation = ablation
        self._den: Callable[[], Any] = (
            (lambda: denoiser) if not isinstance(denoiser, weakref.ref) else denoiser
        )
        self.precond = is_preconditioner(self.denoiser)
        self.sigmas = sigmas
        self.max_graphs = max_graphs
        self.stats: dict[str, float] = {"compile_s": 0.0, "capture_s": 0.0, "captures": 0, "replays": 0}
        self._plans = PlanCache()
        self._graphs = GraphCache(max_graphs)
        self._eager: tuple[tuple, _Buffers] | None = None
        self._lock = threading.Lock()  # held by the call that uses the cached buffers / graphs
        self._backends: dict[torch.device, str] = {}
        self._network = CompiledNetwork(self.denoiser) if self.opts.compile else None

    @property
    def denoiser(self) -> Any:
        den = self._den()
        if den is None:
            raise RuntimeError("the denoiser of this cached Sampler was garbage-collected")
        return den

    # ------------------------------------------------------------------ checks

    @staticmethod
    def _check_guidance(w: Any, phi: Any) -> tuple[float, float]:
        w, phi = _real("guidance_scale", w), _real("guidance_rescale", phi)
        if not abs(w) <= F32_MAX:  # the kernels compute in float32; 1e39 would be inf there
            raise ValueError(f"guidance_scale must be finite in float32 (|w| <= 3.4e38), got {w}")
        if not 0 <= phi <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {phi}")
        return w, phi

    def _backend(self, device: torch.device) -> str:
        backend = self._backends.get(device)
        if backend is None:
            backend = self._backends[device] = ops.resolve_backend(self.opts.backend, device)
        return backend

    def _net_dtype(self) -> torch.dtype:
        dtype = getattr(self.denoiser, "dtype", torch.float32) if self.precond else torch.float32
        if dtype not in ops.IO_DTYPES:
            raise TypeError(f"the network dtype must be one of {ops.IO_DTYPES}, got {dtype}")
        return dtype

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        noise: torch.Tensor,
        sigmas: Any = None,
        *,
        cond: dict | None = None,
        uncond: dict | None = None,
        generator: Any = None,
        seeds: Any = None,
        guidance_scale: Any = None,
        guidance_rescale: Any = None,
        callback: Callable[[dict], Any] | None = None,
    ) -> torch.Tensor:
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        with torch.no_grad():
            call = self._prepare(
                noise, sigmas, cond, uncond, generator, seeds, guidance_scale, guidance_rescale
            )
            # One call at a time owns the cached buffers and graphs; a call that finds them busy
            # (another thread, or this one re-entering from its denoiser) runs on its own buffers.
            shared = self._lock.acquire(blocking=False)
            try:
                # a callback runs between the steps: the eager loop (a graph replays all at once)
                key = self._graph_key(call) if shared and callback is None else None
                if key is not None and (self.opts.cuda_graph is True or self._graphs.should_capture(key)):
                    buf = self._replay(key, call)  # static buffers, captured once, refilled, replayed
                else:
                    buf = self._eager_buffers(call, shared)
                    self._run_eager(call, buf, callback)
                return self._finish(buf, call)  # the one host sync: the flags, then the result
            finally:
                if shared:
                    self._lock.release()

    def _run_eager(self, call: _Call, buf: _Buffers, callback: Callable[[dict], Any] | None = None) -> None:
        self._set_guidance(buf, call)
        start = call.noise  # the first pass reads the caller's noise directly when it can
        if start.dtype != torch.float32 or not start.is_contiguous():
            start = start.float().contiguous()
        device = start.device
        coef, sigma = call.plan.rows(device), call.plan.sigma_rows(device, call.rows)
        self._loop(
            call, buf, coef, sigma, start, call.seeds, call.kwargs, self.opts.progress, callback=callback
        )

    def _prepare(
        self, noise, sigmas, cond, uncond, generator, seeds, guidance_scale, guidance_rescale
    ) -> _Call:
        """Validate a call's arguments (ValueError / TypeError naming the argument, before any
        kernel runs) and look its plan up (cached)."""
        opts = self.opts
        # the finiteness of the noise is checked by the first pass (no extra pass, no host sync)
        noise = check_noise(noise, finite=False)
        batch, device = noise.shape[0], noise.device
        backend = self._backend(device)
        w, phi = self._check_guidance(
            opts.guidance_scale if guidance_scale is None else guidance_scale,
            opts.guidance_rescale if guidance_rescale is None else guidance_rescale,
        )
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
        if self.ablation is not None and sigmas is not None:
            raise ValueError(
                "sigmas must be None with ablation (the time steps come from the ablation options)"
            )
        plan = self._plans.get(self.denoiser, self.sigmas if sigmas is None else sigmas, opts, self.ablation)
        if opts.noise_mode == "fused" and any(plan.noise_steps):
            if seeds is None:
                seeds = getattr(generator, "seeds", None)
                if seeds is not None and device.type == "cuda":  # the generator's CPU copy, ours to move:
                    seeds = seeds.pin_memory().to(device, non_blocking=True)  # without a host sync
                elif seeds is not None:
                    seeds = seeds.to(device)
            if seeds is None:
                raise ValueError("noise_mode='fused' with s_churn > 0 needs seeds (int64 [B])")
        seeds_t = check_seeds(seeds, batch, device).contiguous() if seeds is not None else None
        check_generator(generator, batch)
        if opts.cuda_graph is True and device.type != "cuda":
            raise ValueError("cuda_graph=True needs CUDA tensors")
        return _Call(
            plan=plan,
            noise=noise,
            seeds=seeds_t,
            generator=generator,
            kwargs=kwargs,
            backend=backend,
            kernels=_kernels(backend),
            net_dtype=self._net_dtype(),
            rows=2 * batch if use_cfg else batch,
            use_cfg=use_cfg,
            rescale=use_cfg and phi > 0,
            w=w,
            phi=phi,
            # like the official script (and the reference), exact mode draws on every step once
            # S_churn > 0, even where no step churns, so the generator ends in the same state
            exact=opts.noise_mode == "exact" and opts.s_churn > 0,
        )

    def _graph_key(self, call: _Call) -> tuple | None:
        """What a captured graph depends on besides tensor values; None when graphs are off here."""
        noise = call.noise
        if self.opts.cuda_graph is False or noise.device.type != "cuda":
            return None
        return (
            tuple(noise.shape),
            noise.dtype,
            noise.device,
            call.net_dtype,
            call.backend,
            call.plan.structure,
            call.use_cfg,
            call.rescale,
            tuple(
                (k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                for k, v in sorted(call.kwargs.items())
            ),
        )

    def _eager_buffers(self, call: _Call, shared: bool) -> _Buffers:
        """The cached eager buffers for this shape (``shared``), else buffers of this call's own."""
        noise = call.noise
        key = (
            tuple(noise.shape),
            noise.device,
            call.net_dtype,
            call.rows,
            call.plan.n,
            call.exact,
            call.rescale,
        )
        if shared and self._eager is not None and self._eager[0] == key:
            return self._eager[1]
        buf = _alloc(call, graph=False)
        if shared:
            self._eager = (key, buf)
        return buf

    def _set_guidance(self, buf: _Buffers, call: _Call) -> None:
        if call.use_cfg and buf.values != (call.w, call.phi):
            buf.gs.fill_(call.w)
            buf.phi.fill_(call.phi)
            buf.values = (call.w, call.phi)

    def _finish(self, buf: _Buffers, call: _Call) -> torch.Tensor:
        """The one host sync of a call: read the per-sample non-finite flags, then copy out."""
        if self._network is not None:
            self.stats["compile_s"] = self._network.compile_s
        bad = buf.bad.tolist()
        first = min(bad)
        if first != INT32_MAX:
            samples = [b for b, s in enumerate(bad) if s == first]
            first -= 1  # the start pass flags 0, step i's passes flag i + 1 (never a negative step)
            if first < 0:
                raise ValueError(f"noise must be finite (found NaN or inf in samples {samples[:8]})")
            raise FloatingPointError(
                f"non-finite values appeared at step {first} (sigma={call.plan.steps[first].sigma:g}) in "
                f"samples {samples[:8]}: the denoiser produced NaN or inf"
            )
        return buf.x_hat.to(call.noise.dtype, copy=True)

    # ------------------------------------------------------------------ graphs

    def _replay(self, key: tuple, call: _Call) -> _Buffers:
        """The configuration's graph (captured on first use) replayed on refilled static buffers."""
        device = call.noise.device
        entry = self._graphs.get(key)
        if entry is None:
            buf = _alloc(call, graph=True)
            # No exact-noise draws before the capture: the fill right before the first replay
            # draws, and drawing twice would advance the generator past the reference's stream.
            self._fill(buf, call, draw=False)
            assert buf.coef is not None and buf.sigma is not None and buf.noise is not None
            cond = {k: buf.cond.get(k, v) for k, v in call.kwargs.items()}
            coef_rows, sig_rows, start = list(buf.coef.unbind(0)), list(buf.sigma.unbind(0)), buf.noise
            graph, seconds = capture(
                lambda: self._loop(call, buf, coef_rows, sig_rows, start, buf.seeds, cond, False, graph=True),
                device,
            )
            self.stats["capture_s"] += seconds
            self.stats["captures"] += 1
            entry = (graph, buf)
            self._graphs.put(key, entry)
        graph, buf = entry
        self._fill(buf, call, draw=True)
        if self.opts.progress:  # the whole loop is one replay: one tick, closed when it has run
            from tqdm import tqdm

            with tqdm(total=1, desc="edmfast (graph replay)") as bar:
                graph.replay()
                torch.cuda.current_stream(device).synchronize()
                bar.update()
        else:
            graph.replay()
        self.stats["replays"] += 1
        return buf

    def _fill(self, buf: _Buffers, call: _Call, draw: bool) -> None:
        """Refill a graph's static inputs (device-to-device copies, no host sync)."""
        plan, noise, seeds_t, device = call.plan, call.noise, call.seeds, call.noise.device
        assert buf.noise is not None and buf.coef is not None and buf.sigma is not None
        buf.noise.copy_(noise)
        if buf.plan is not plan:  # the rows change only with the plan
            buf.coef.copy_(plan.coef_on(device))
            buf.sigma.copy_(plan.sigma_on(device, buf.sigma.shape[1]))
            buf.plan = plan
        if seeds_t is not None and buf.seeds is not None:
            buf.seeds.copy_(seeds_t)
        self._set_guidance(buf, call)
        if call.exact and draw:
            # a graph cannot call the generator: draw every step's noise before the replay, in
            # the same order the loop would (the official script draws on every step)
            for i, on in enumerate(plan.noise_steps):
                eps = draw_exact_noise(call.generator, tuple(noise.shape), device)
                if on:
                    buf.exact_eps[i].copy_(eps)
        for k, v in buf.cond.items():
            v.copy_(call.kwargs[k])

    # ------------------------------------------------------------------ the loop

    def _loop(
        self,
        call: _Call,
        buf: _Buffers,
        coef: list[torch.Tensor],
        sigma: list[torch.Tensor],
        start: torch.Tensor,
        seeds: torch.Tensor | None,
        cond: dict,
        progress: bool,
        graph: bool = False,
        callback: Callable[[dict], Any] | None = None,
    ) -> None:
        """The whole sampling loop on static buffers: capturable as one CUDA graph.

        ``coef`` / ``sigma``: per-pass rows and per-evaluation network sigma / c_noise tensors.
        In eager exact-noise mode step i's churn noise is drawn when the loop reaches it. With a
        ``callback`` (eager only) each step also copies x_hat and writes D(x_hat; sigma_hat) with
        one more pass into fresh tensors: the state and the passes are those of a run without.
        """
        plan, k = call.plan, call.kernels
        n, step_fn, cfg_fn = plan.n, k.step, k.cfg
        den = self.denoiser
        network: Callable[..., Any] = (
            self._network if self._network is not None else (den.raw if self.precond else den)
        )
        x_hat, x_prime, net, bad = buf.x_hat, buf.x_prime, buf.net, buf.bad
        shape, dtype, device = net.shape, net.dtype, net.device
        w, phi = buf.gs, buf.phi  # read by the kernels at run time (a graph serves any value)
        kk = buf.k if call.rescale else None
        ws = buf.workspace
        exact, noise_steps, correct = call.exact, plan.noise_steps, plan.correct
        eps_slots = buf.exact_eps
        generator = call.generator

        def draw_args(i: int) -> dict[str, Any]:
            """Noise operands for the pass that ends step i - 1 and churns step i."""
            if i >= n:
                return {}
            if exact:
                if graph:
                    return {"noise": eps_slots[i]} if noise_steps[i] else {}
                eps = draw_exact_noise(generator, tuple(x_hat.shape), device)  # drawn on every step
                if noise_steps[i]:
                    eps_slots[0].copy_(eps)
                    return {"noise": eps_slots[0]}
                return {}
            if noise_steps[i]:
                return {"seeds": seeds, "step": i}
            return {}

        # known before the loop unless exact noise is drawn step by step: look them up per pass
        churn_args: Callable[[int], dict[str, Any]] = (
            draw_args if exact else [draw_args(i) for i in range(n + 1)].__getitem__
        )

        def evaluate(j: int) -> torch.Tensor:
            f = network(net, sigma[j], **cond)
            if not isinstance(f, torch.Tensor):
                raise TypeError(
                    f"the denoiser returned {type(f).__name__}, expected a torch.Tensor shaped like its input"
                )
            if f.shape != shape:
                raise ValueError(f"the denoiser returned shape {tuple(f.shape)}, expected {tuple(shape)}")
            if f.device != device:
                raise ValueError(f"the denoiser returned a tensor on {f.device}, expected {device}")
            if f.dtype != dtype:
                if not f.is_floating_point():
                    raise TypeError(f"the denoiser returned dtype {f.dtype}, expected a floating dtype")
                f = f.to(dtype)
            if not f.is_contiguous():
                f = f.contiguous()
            if kk is not None:
                cfg_fn(f, w, phi, out=kk, workspace=ws)
            return f

        bad.fill_(INT32_MAX)
        step_fn(start, coef[0], out=x_hat, out_net=net, bad=bad, bad_step=0, **churn_args(0))
        if not graph and device.type == "cpu" and int(bad.min()) != INT32_MAX:
            # on the CPU reading the flags costs no sync: refuse bad noise before the network runs
            raise ValueError("noise must be finite (found NaN or inf)")
        steps: Any = range(n)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="edmfast")
        den_rows = plan.denoise_rows(device) if callback is not None else []
        for i in steps:
            next_net = net if i + 1 < n else None  # the last pass feeds no network
            f = evaluate(2 * i)
            if callback is not None:
                x_i = x_hat.clone()
                denoised = torch.empty_like(x_hat)
                step_fn(x_hat, den_rows[i], f=f, k=kk, guidance_scale=w, out=denoised)
            if correct[i]:
                step_fn(
                    x_hat, coef[1 + 2 * i], f=f, k=kk, guidance_scale=w,
                    out=x_prime, out_net=net, bad=bad, bad_step=i + 1,
                )  # fmt: skip
                f = evaluate(2 * i + 1)
                step_fn(
                    x_hat, coef[2 + 2 * i], x_prime=x_prime, f=f, k=kk, guidance_scale=w,
                    out=x_hat, out_net=next_net, bad=bad, bad_step=i + 1, **churn_args(i + 1),
                )  # fmt: skip
            else:
                step_fn(
                    x_hat, coef[1 + 2 * i], f=f, k=kk, guidance_scale=w,
                    out=x_hat, out_net=next_net, bad=bad, bad_step=i + 1, **churn_args(i + 1),
                )  # fmt: skip
            if callback is not None:
                st = plan.steps[i]
                callback({
                    "x": x_i, "i": i, "denoised": denoised,
                    "sigma": torch.tensor(st.sigma, dtype=torch.float64),
                    "sigma_hat": torch.tensor(st.sigma_hat, dtype=torch.float64),
                })  # fmt: skip

    def release(self) -> None:
        """Drop every captured graph and its memory pool, the eager buffers and the cached plans
        (with their device copies)."""
        with self._lock:
            self._graphs.clear()
            self._eager = None
            self._plans.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sample()

# sample() keeps its Samplers (so repeated calls reuse plans and buffers, and on CUDA get the graph
# path): a small LRU keyed by the denoiser's identity and the options, holding the denoiser weakly
# (an entry dies with its denoiser, never keeping a model alive).
_SAMPLE_CACHE_SIZE = 8
_samplers: OrderedDict[tuple, Sampler] = OrderedDict()
_samplers_lock = threading.Lock()


def _cached_sampler(
    denoiser: Any, opts: SamplerOptions, options: dict, ablation: AblationOptions | None = None
) -> Sampler:
    key = (id(denoiser), opts, ablation)
    with _samplers_lock:
        s = _samplers.get(key)
        if s is not None and s._den() is denoiser:
            _samplers.move_to_end(key)
            return s
    try:
        ref = weakref.ref(denoiser, functools.partial(_drop, key))
    except TypeError:  # not weak-referenceable (e.g. a builtin): no caching
        return Sampler(denoiser, ablation=ablation, **options)
    s = Sampler(ref, ablation=ablation, **options)
    with _samplers_lock:
        _samplers[key] = s
        while len(_samplers) > _SAMPLE_CACHE_SIZE:
            _samplers.popitem(last=False)
    return s


def _drop(key: tuple, _ref: Any = None) -> None:
    with _samplers_lock:
        _samplers.pop(key, None)


def clear_sample_cache() -> None:
    """Forget the Samplers `sample` keeps (their buffers and captured graphs are freed with them)."""
    with _samplers_lock:
        for s in _samplers.values():
            s.release()
        _samplers.clear()


@with_option_signature
def sample(
    denoiser: Any,
    noise: torch.Tensor,
    sigmas: Any = None,
    *,
    cond: dict | None = None,
    uncond: dict | None = None,
    generator: Any = None,
    seeds: Any = None,
    callback: Callable[[dict], Any] | None = None,
    **options: Any,
) -> torch.Tensor:
    """Sample with EDM's stochastic Heun sampler (Algorithm 2; Algorithm 1 when s_churn = 0).

    ``noise`` [B, ...] is unit-variance latents; the loop starts at ``noise * sigmas[0]`` (at the
    noise itself when sigmas[0] is inf). ``sigmas`` defaults to `karras_sigmas` with
    num_steps / sigma_min / sigma_max / rho, clamped to the denoiser's range. Options (defaults):
    solver "heun" | "euler" | "2nd" (with alpha), s_churn 0, s_tmin 0, s_tmax inf, s_noise 1,
    guidance_scale 1, guidance_rescale 0, noise_mode "exact" | "fused", backend "auto",
    cuda_graph "auto", compile False, progress False. Returns a tensor like ``noise``.

    Repeated calls with the same denoiser and options reuse one cached `Sampler` (its plans,
    buffers and, on CUDA, captured graphs): at most 8, each dropped with its denoiser or by
    `edmfast.sampler.clear_sample_cache`; with compile=True each call builds a fresh one.

    ``callback(info)``, k-diffusion's convention, runs after each step i with ``info`` = {"x":
    x_hat_i (the state the step started from, after churn), "i", "sigma": sigma_i, "sigma_hat",
    "denoised": D(x_hat_i; sigma_hat_i) (guided)}, fresh tensors (sigma / sigma_hat float64 0-d,
    on the CPU). A callback forces the eager loop (no CUDA graph; one copy and one extra pass per
    step) and never changes the result.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma, **cond), got {type(denoiser).__name__}")
    w = options.pop("guidance_scale", 1.0)
    phi = options.pop("guidance_rescale", 0.0)
    opts = SamplerOptions.create(**options)  # the guidance values are checked by the call
    if opts.compile:
        s = Sampler(denoiser, **options)
    else:
        s = _cached_sampler(denoiser, opts, options)
    return s(
        noise, sigmas, cond=cond, uncond=uncond, generator=generator, seeds=seeds,
        guidance_scale=w, guidance_rescale=phi, callback=callback,
    )  # fmt: skip


def ablation_sample(
    denoiser: Any,
    noise: torch.Tensor,
    *,
    num_steps: int = 18,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    solver: str = "heun",
    discretization: str = "edm",
    schedule: str = "linear",
    scaling: str = "none",
    epsilon_s: float = 1e-3,
    C1: float = 0.001,
    C2: float = 0.008,
    M: int = 1000,
    alpha: float = 1.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Any = None,
    cond: dict | None = None,
    uncond: dict | None = None,
    seeds: Any = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    callback: Callable[[dict], Any] | None = None,
    **options: Any,
) -> torch.Tensor:
    """EDM's general sampler over the whole design space, on the fused engine.

    The signature and math of `edmfast.reference.ablation_sample` (discretization edm | vp | ve |
    iddpm, schedule sigma(t) linear | vp | ve, scaling s(t) none | vp, solver euler | heun | 2nd
    with alpha, where heun with alpha != 1 is the 2nd-order alpha solver as there), plus the
    engine's ``cond`` / ``uncond`` / guidance, ``seeds`` and options (noise_mode, backend,
    cuda_graph, compile, progress). ``d = (sigma'/sigma + s'/s) x - (sigma' s/sigma) D(x/s; sigma)``
    is affine in (x, F), so every step runs as the same fused passes as `sample`. Returns x(t=0)
    typed like ``noise``. The paper's baselines: VP ``discretization="vp", schedule="vp",
    scaling="vp"``; VE ``discretization="ve", schedule="ve"``. ``callback`` as in `sample`
    (``x`` is the scaled state, ``denoised`` D(x_hat / s; sigma_hat)).
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma, **cond), got {type(denoiser).__name__}")
    ablation = AblationOptions.create(
        discretization=discretization,
        schedule=schedule,
        scaling=scaling,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        epsilon_s=epsilon_s,
        C1=C1,
        C2=C2,
        M=M,
    )
    if not isinstance(solver, str) or solver not in ("euler", "heun", "2nd"):
        raise ValueError(f"solver must be euler, heun or 2nd, got {solver!r}")
    alpha = _real("alpha", alpha)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if solver == "euler":
        alpha = 1.0  # unused by Euler, as in the reference
    elif alpha != 1.0:
        solver = "2nd"
    elif solver == "2nd":
        solver = "heun"  # alpha = 1 is Heun
    engine = dict(
        num_steps=num_steps,
        rho=rho,
        solver=solver,
        alpha=alpha,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        **options,
    )
    opts = SamplerOptions.create(**engine)
    s = (
        Sampler(denoiser, ablation=ablation, **engine)
        if opts.compile
        else _cached_sampler(denoiser, opts, engine, ablation)
    )
    return s(
        noise, cond=cond, uncond=uncond, generator=generator, seeds=seeds,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, callback=callback,
    )  # fmt: skip


__all__ = ["ALPHA_MIN", "Sampler", "ablation_sample", "clear_sample_cache", "sample"]
