"""Ancestral sampling (DDPM / iDDPM / ADM / DiT, and DDIM with eta) on one fused pass per step.

A call reads: validate -> plan (cached per timesteps) -> buffers (cached per shape) -> run (eager
loop or one CUDA graph replay) -> check the per-sample non-finite flags -> return. Per step the
loop runs the network once and one `ops.ancestral_step` pass (plus the CFG-rescale factors when
guidance rescale is on): x0 from the prediction, clipping, the posterior mean, the (learned)
variance, the noise, the next network input and the non-finite check all happen in that pass,
with the step's coefficients read from a float32 [S, 8] table in device memory.

The plan is computed in float64 from the training betas (`edmfast.schedules.ddpm_betas`):
respaced betas ``beta_i = 1 - abar(tau_i) / abar(tau_{i-1})`` and the posterior coefficients
(Nichol & Dhariwal 2021, Eq. 10-12, 15), or DDIM's (Song et al. 2021, Eq. 12-16) when ``eta`` is
given. `edmfast.reference.sample_ancestral` is the float64 oracle of the same semantics.
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
from .graphs import GraphCache, capture
from .layout import ANC_AF, ANC_AX, ANC_COEF1, ANC_COEF2, ANC_LOG_BETA, ANC_LOG_BETA_TILDE, ANC_S
from .options import (
    F32_MAX,
    PREDICTION_TYPES,  # noqa: F401  (re-exported: edmfast.ancestral.PREDICTION_TYPES)
    VARIANCES,  # noqa: F401
    AncestralOptions,
    check_betas,
    check_cond,
    check_generator,
    check_guidance,
    check_noise,
    check_seeds,
    check_timesteps,
    merge_cond,
)
from .schedules import respaced_timesteps

INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- plan


def resolve_timesteps(timesteps: Any, num_train: int, opts: AncestralOptions) -> torch.Tensor:
    """Descending int64 training indices: the given ones (checked) or those of the spacing."""
    if timesteps is None:
        return respaced_timesteps(opts.num_steps, num_train, opts.spacing, opts.steps_offset)
    return check_timesteps(timesteps, num_train)


@dataclass(frozen=True)
class AncestralPlan:
    """One schedule folded into per-step coefficient rows (float64 [S, 8], ANC_* columns)."""

    timesteps: torch.Tensor  # int64 [S], descending training indices (what the network sees)
    rows: torch.Tensor  # float64 [S, 8]
    noise_on: tuple[bool, ...]  # step i adds noise (s > 0)
    draws: tuple[bool, ...]  # exact mode draws a randn at step i (diffusers' rule)
    op_variance: str  # "fixed" | "learned" | "learned_range" for ops.ancestral_step
    _device: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def coef_on(self, device: torch.device) -> torch.Tensor:
        """The float32 row table on ``device`` (copied once per device)."""
        t = self._device.get(("coef", device))
        if t is None:
            t = self._device[("coef", device)] = self.rows.to(torch.float32).to(device).contiguous()
        return t

    def t_on(self, device: torch.device, rows: int) -> torch.Tensor:
        """int64 [S, rows]: step i's timestep for every network row."""
        t = self._device.get(("t", device, rows))
        if t is None:
            t = self.timesteps.reshape(-1, 1).expand(-1, rows).contiguous().to(device)
            self._device[("t", device, rows)] = t
        return t


def make_plan(betas: torch.Tensor, timesteps: torch.Tensor, opts: AncestralOptions) -> AncestralPlan:
    """The float64 coefficient rows of every step (see the module docstring)."""
    abar_all = torch.cumprod(1 - betas, 0)
    ts = timesteps.tolist()
    S = len(ts)
    rows = torch.zeros(S, 8, dtype=torch.float64)
    noise_on, draws = [], []
    tilde: list[float] = []
    for i, t in enumerate(ts):
        a = float(abar_all[t])
        a_prev = float(abar_all[ts[i + 1]]) if i + 1 < S else 1.0
        if not a > 0:
            raise ValueError(
                f"abar({t}) = 0 (zero terminal SNR): the ancestral step divides by sqrt(abar); "
                "start at a lower timestep"
            )
        if a >= a_prev:
            raise ValueError(f"betas give abar({t}) >= abar of the step below: beta must be > 0")
        beta = 1 - a / a_prev
        tilde.append(beta * (1 - a_prev) / (1 - a))
        r = rows[i]
        if opts.prediction_type == "epsilon":
            r[ANC_AX], r[ANC_AF] = math.sqrt(1 / a), -math.sqrt(1 / a - 1)
        elif opts.prediction_type == "v_prediction":
            r[ANC_AX], r[ANC_AF] = math.sqrt(a), -math.sqrt(1 - a)
        else:
            r[ANC_AX], r[ANC_AF] = 0.0, 1.0
        last = i + 1 == S
        r[ANC_LOG_BETA] = math.log(beta)
        r[7] = 1.0  # c: the network sees x_t itself
        if opts.eta is not None:
            sigma = opts.eta * math.sqrt((1 - a_prev) / (1 - a) * beta)
            rest = math.sqrt(max(1 - a_prev - sigma * sigma, 0.0))
            r[ANC_COEF1] = math.sqrt(a_prev) - rest * math.sqrt(a / (1 - a))
            r[ANC_COEF2] = rest / math.sqrt(1 - a)
            if opts.learned:
                # a 2C model under DDIM: the learned_range pass with both ends at log sigma^2 is a
                # fixed std whatever V says (the op reads f as [.., 2n]; no copy of the first half)
                lv = 2 * math.log(sigma) if sigma > 0 else 0.0
                r[ANC_LOG_BETA], r[ANC_LOG_BETA_TILDE] = lv, lv
                r[ANC_S] = 1.0 if sigma > 0 else 0.0
            else:
                r[ANC_S] = sigma
            noise_on.append(sigma > 0)
            draws.append(opts.eta > 0)  # DDIMScheduler draws on every step once eta > 0
            continue
        r[ANC_COEF1] = beta * math.sqrt(a_prev) / (1 - a)
        r[ANC_COEF2] = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        if opts.variance == "fixed_small":
            r[ANC_S] = math.sqrt(tilde[i])
        elif opts.variance == "fixed_large":
            r[ANC_S] = math.sqrt(beta)
        else:
            r[ANC_S] = 1.0
        if last:
            r[ANC_S] = 0.0  # x_0 is the posterior mean: no noise on the last step
        noise_on.append(not last)
        draws.append(t > 0)  # DDPMScheduler draws whenever the timestep is > 0
    for i in range(S):
        # iDDPM's clipped log variance: beta_tilde is 0 on the last step, use the one above
        bt = tilde[i] if tilde[i] > 0 else (tilde[i - 1] if i > 0 else 0.0)
        if opts.eta is None:
            rows[i, ANC_LOG_BETA_TILDE] = math.log(bt) if bt > 0 else float(rows[i, ANC_LOG_BETA])
    if opts.eta is not None:
        op_variance = "learned_range" if opts.learned else "fixed"
    else:
        op_variance = opts.variance if opts.learned else "fixed"
    if not bool(torch.isfinite(rows).all()) or float(rows.abs().max()) > F32_MAX:
        raise ValueError("the schedule's coefficients are not representable in float32")
    return AncestralPlan(timesteps.clone(), rows, tuple(noise_on), tuple(draws), op_variance)


# ----------------------------------------------------------------------------- engine


@functools.cache
def _kernels(backend: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    return ops.raw_ancestral_step(backend), ops.raw_heun_step(backend), ops.raw_cfg_rescale_factors(backend)


@dataclass
class _Buffers:
    x: torch.Tensor  # float32 state [B, ...]
    net: torch.Tensor  # network input [R B, ...] in the network dtype
    k: torch.Tensor  # float32 [B] CFG-rescale factors
    bad: torch.Tensor  # int32 [B]
    gs: torch.Tensor  # float32 [1]
    phi: torch.Tensor  # float32 [1]
    workspace: torch.Tensor | None
    eps: torch.Tensor  # float32 [S | 1 | 0, B, ...] exact noise
    start: torch.Tensor  # float32 [8] the start pass's heun_step row: x = noise, net = x
    noise: torch.Tensor | None = None  # graphs: static copies
    seeds: torch.Tensor | None = None
    coef: torch.Tensor | None = None
    t: torch.Tensor | None = None
    cond: dict = field(default_factory=dict)
    plan: AncestralPlan | None = None
    values: tuple = ()
    f_dtype: torch.dtype | None = None  # the model output's dtype (graphs draw exact noise in it)


@dataclass
class _Call:
    plan: AncestralPlan
    noise: torch.Tensor
    seeds: torch.Tensor | None
    generator: Any
    kwargs: dict
    backend: str
    net_dtype: torch.dtype
    rows: int
    use_cfg: bool
    rescale: bool
    w: float
    phi: float
    exact: bool


class AncestralSampler:
    """A reusable ancestral sampler: ``AncestralSampler(model, betas, **options)(noise, ...)``.

    Options are those of `sample_ancestral`. Per call: ``noise`` (x_T), ``timesteps`` (default:
    from num_steps / spacing / steps_offset), ``cond`` / ``uncond``, ``generator``, ``seeds`` and
    ``guidance_scale`` / ``guidance_rescale`` (override the options; kept in device memory, so a
    captured graph serves any value). On CUDA with ``cuda_graph`` on, the whole loop is captured
    once per configuration (shape, dtypes, step count, which steps draw noise, CFG / rescale on or
    off, conditioning layout) and replayed for new noise, seeds, timesteps and guidance values.
    ``stats`` records captures and replays.
    """

    def __init__(self, model: Any, betas: Any, *, max_graphs: int = 4, **options: Any):
        self._model: Callable[[], Any] = model if isinstance(model, weakref.ref) else (lambda: model)
        if not callable(self.model):
            raise TypeError(f"model must be callable model(x_t, t, **cond), got {type(self.model).__name__}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.opts = AncestralOptions.create(**options)
        self.betas = check_betas(betas)
        self.stats: dict[str, float] = {"capture_s": 0.0, "captures": 0, "replays": 0}
        self._plans: OrderedDict[tuple, AncestralPlan] = OrderedDict()
        self._graphs = GraphCache(max_graphs)
        self._eager: tuple[tuple, _Buffers] | None = None
        self._lock = threading.Lock()  # held by the call that uses the cached buffers / graphs
        self._plan_lock = threading.Lock()
        self._backends: dict[torch.device, str] = {}
        self._compiled: Callable[..., Any] | None = None
        if self.opts.compile:
            try:
                self._compiled = torch.compile(self.model, dynamic=False)
            except Exception as e:
                raise RuntimeError(f"torch.compile of the model failed: {e}") from e
        # default timesteps, resolved once (they are checked like any other)
        self._default_t = resolve_timesteps(None, self.betas.numel(), self.opts)

    @property
    def model(self) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this cached AncestralSampler was garbage-collected")
        return model

    # ------------------------------------------------------------------ checks

    def _plan(self, timesteps: Any) -> AncestralPlan:
        t = (
            self._default_t
            if timesteps is None
            else resolve_timesteps(timesteps, self.betas.numel(), self.opts)
        )
        key = tuple(t.tolist())
        with self._plan_lock:  # calls from several threads share the cache
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = make_plan(self.betas, t, self.opts)
        with self._plan_lock:
            self._plans[key] = plan
            while len(self._plans) > 16:
                self._plans.popitem(last=False)
        return plan

    def _net_dtype(self) -> torch.dtype:
        params = getattr(self.model, "parameters", None)
        if callable(params):
            for p in params():
                if p.dtype in ops.IO_DTYPES:
                    return p.dtype
                break
        return torch.float32

    def _prepare(self, noise, timesteps, cond, uncond, generator, seeds, w, phi) -> _Call:
        opts = self.opts
        noise = check_noise(noise, finite=False)
        batch, device = noise.shape[0], noise.device
        backend = self._backends.get(device)
        if backend is None:
            backend = self._backends[device] = ops.resolve_backend(opts.backend, device)
        w, phi = check_guidance(
            opts.guidance_scale if w is None else w, opts.guidance_rescale if phi is None else phi
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
        plan = self._plan(timesteps)
        check_generator(generator, batch)
        if opts.noise_mode == "fused" and any(plan.noise_on):
            if seeds is None:
                seeds = getattr(generator, "seeds", None)
                seeds = None if seeds is None else seeds.to(device)
            if seeds is None:
                raise ValueError("noise_mode='fused' needs seeds (int64 [B]) or a PerSampleGenerator")
        seeds_t = check_seeds(seeds, batch, device).contiguous() if seeds is not None else None
        if opts.cuda_graph is True and device.type != "cuda":
            raise ValueError("cuda_graph=True needs CUDA tensors")
        return _Call(
            plan=plan, noise=noise, seeds=seeds_t, generator=generator, kwargs=kwargs, backend=backend,
            net_dtype=self._net_dtype(), rows=2 * batch if use_cfg else batch, use_cfg=use_cfg,
            rescale=use_cfg and phi > 0, w=w, phi=phi, exact=opts.noise_mode == "exact",
        )  # fmt: skip

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        noise: torch.Tensor,
        timesteps: Any = None,
        *,
        cond: dict | None = None,
        uncond: dict | None = None,
        generator: Any = None,
        seeds: Any = None,
        guidance_scale: Any = None,
        guidance_rescale: Any = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            call = self._prepare(
                noise, timesteps, cond, uncond, generator, seeds, guidance_scale, guidance_rescale
            )
            shared = self._lock.acquire(blocking=False)
            try:
                key = self._graph_key(call) if shared else None
                if key is not None and (self.opts.cuda_graph is True or self._graphs.should_capture(key)):
                    buf = self._replay(key, call)
                else:
                    buf = self._eager_buffers(call, shared)
                    self._set_guidance(buf, call)
                    start = call.noise
                    if start.dtype != torch.float32 or not start.is_contiguous():
                        start = start.float().contiguous()
                    dev = start.device
                    coef = list(call.plan.coef_on(dev).unbind(0))
                    t = list(call.plan.t_on(dev, call.rows).unbind(0))
                    self._loop(call, buf, coef, t, start, call.seeds, call.kwargs, self.opts.progress)
                return self._finish(buf, call)
            finally:
                if shared:
                    self._lock.release()

    def _alloc(self, call: _Call, graph: bool) -> _Buffers:
        noise, plan = call.noise, call.plan
        dev, shape = noise.device, tuple(noise.shape)
        f32: dict[str, Any] = dict(dtype=torch.float32, device=dev)
        n = noise[0].numel()
        S = plan.num_steps
        with torch.inference_mode(False):
            net = torch.empty((call.rows, *shape[1:]), dtype=call.net_dtype, device=dev)
            ws = None
            if call.rescale:
                # the workspace follows the model output's whole rows (2n with a variance half)
                m = 2 * n if self.opts.learned else n
                ws = ops.cfg_workspace(
                    torch.empty(call.rows, m, dtype=call.net_dtype, device=dev), call.backend
                )
            slots = (S if graph else 1) if call.exact else 0
            start = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], **f32)
            buf = _Buffers(
                x=torch.empty(shape, **f32), net=net, k=torch.ones(shape[0], **f32),
                bad=torch.empty(shape[0], dtype=torch.int32, device=dev), gs=torch.ones(1, **f32),
                phi=torch.zeros(1, **f32), workspace=ws,
                eps=torch.zeros((slots, *shape), **f32), start=start,
            )  # fmt: skip
            if graph:
                buf.noise = torch.empty(shape, **f32)
                buf.seeds = None if call.seeds is None else torch.empty_like(call.seeds)
                buf.coef = torch.empty(S, 8, **f32)
                buf.t = torch.empty(S, call.rows, dtype=torch.int64, device=dev)
                buf.cond = {
                    k: torch.empty_like(v) for k, v in call.kwargs.items() if isinstance(v, torch.Tensor)
                }
        return buf

    def _eager_buffers(self, call: _Call, shared: bool) -> _Buffers:
        noise = call.noise
        key = (tuple(noise.shape), noise.device, call.net_dtype, call.rows, call.exact, call.rescale,
               call.plan.op_variance, call.backend)  # fmt: skip
        if shared and self._eager is not None and self._eager[0] == key:
            return self._eager[1]
        buf = self._alloc(call, graph=False)
        if shared:
            self._eager = (key, buf)
        return buf

    def _set_guidance(self, buf: _Buffers, call: _Call) -> None:
        if call.use_cfg and buf.values != (call.w, call.phi):
            buf.gs.fill_(call.w)
            buf.phi.fill_(call.phi)
            buf.values = (call.w, call.phi)

    def _finish(self, buf: _Buffers, call: _Call) -> torch.Tensor:
        bad = buf.bad.tolist()
        first = min(bad)
        if first != INT32_MAX:
            samples = [b for b, s in enumerate(bad) if s == first]
            if first == 0:
                raise ValueError(f"noise must be finite (found NaN or inf in samples {samples[:8]})")
            t = int(call.plan.timesteps[first - 1])
            raise FloatingPointError(
                f"non-finite values appeared at step {first - 1} (t={t}) in samples {samples[:8]}: "
                "the model produced NaN or inf"
            )
        return buf.x.to(call.noise.dtype, copy=True)

    # ------------------------------------------------------------------ graphs

    def _graph_key(self, call: _Call) -> tuple | None:
        noise = call.noise
        if self.opts.cuda_graph is False or noise.device.type != "cuda":
            return None
        plan = call.plan
        return (
            tuple(noise.shape), noise.dtype, noise.device, call.net_dtype, call.backend, plan.num_steps,
            plan.noise_on, plan.draws if call.exact else (), plan.op_variance, call.use_cfg, call.rescale,
            call.seeds is not None,
            tuple(
                (k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                for k, v in sorted(call.kwargs.items())
            ),
        )  # fmt: skip

    def _replay(self, key: tuple, call: _Call) -> _Buffers:
        device = call.noise.device
        entry = self._graphs.get(key)
        if entry is None:
            buf = self._alloc(call, graph=True)
            self._fill(buf, call, draw=False)
            assert buf.coef is not None and buf.t is not None and buf.noise is not None
            cond = {k: buf.cond.get(k, v) for k, v in call.kwargs.items()}
            coef, t, start = list(buf.coef.unbind(0)), list(buf.t.unbind(0)), buf.noise
            graph, seconds = capture(
                lambda: self._loop(call, buf, coef, t, start, buf.seeds, cond, False, graph=True), device
            )
            self.stats["capture_s"] += seconds
            self.stats["captures"] += 1
            entry = (graph, buf)
            self._graphs.put(key, entry)
        graph, buf = entry
        self._fill(buf, call, draw=True)
        graph.replay()
        self.stats["replays"] += 1
        return buf

    def _fill(self, buf: _Buffers, call: _Call, draw: bool) -> None:
        plan, device = call.plan, call.noise.device
        assert buf.noise is not None and buf.coef is not None and buf.t is not None
        buf.noise.copy_(call.noise)
        if buf.plan is not plan:
            buf.coef.copy_(plan.coef_on(device))
            buf.t.copy_(plan.t_on(device, call.rows))
            buf.plan = plan
        if call.seeds is not None and buf.seeds is not None:
            buf.seeds.copy_(call.seeds)
        self._set_guidance(buf, call)
        if call.exact and draw:
            # a graph cannot call the generator: every step's draw is made before the replay, in
            # the loop's order, in the dtype the model returned at capture
            dtype = buf.f_dtype or call.net_dtype
            for i, on in enumerate(plan.draws):
                if on:
                    buf.eps[i].copy_(_draw(call.generator, tuple(call.noise.shape), dtype, device))
        for k, v in buf.cond.items():
            v.copy_(call.kwargs[k])

    # ------------------------------------------------------------------ the loop

    def _loop(
        self,
        call: _Call,
        buf: _Buffers,
        coef: list[torch.Tensor],
        t: list[torch.Tensor],
        start: torch.Tensor,
        seeds: torch.Tensor | None,
        cond: dict,
        progress: bool,
        graph: bool = False,
    ) -> None:
        """The whole loop on static buffers: per step one network call and one fused pass."""
        plan = call.plan
        step_fn, start_fn, cfg_fn = _kernels(call.backend)
        network = self._compiled if self._compiled is not None else self.model
        x, net, bad = buf.x, buf.net, buf.bad
        rows, shape, dtype, device = call.rows, net.shape, net.dtype, net.device
        C = shape[1]
        want = (rows, 2 * C if plan.op_variance != "fixed" or self.opts.learned else C, *shape[2:])
        w, phi = buf.gs, buf.phi
        kk = buf.k if call.rescale else None
        ws = buf.workspace
        n = x[0].numel()
        part = {"numel": n} if self.opts.learned else {}  # the factors see the prediction half only
        variance, clip = plan.op_variance, self.opts.clip_denoised
        S = plan.num_steps

        bad.fill_(INT32_MAX)
        start_fn(start, buf.start, out=x, out_net=net, bad=bad, bad_step=0)
        if not graph and device.type == "cpu" and int(bad.min()) != INT32_MAX:
            raise ValueError("noise must be finite (found NaN or inf)")
        steps: Any = range(S)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="edmfast ancestral")
        for i in steps:
            f = network(net, t[i], **cond)
            if not isinstance(f, torch.Tensor):
                raise TypeError(f"the model returned {type(f).__name__}, expected a torch.Tensor")
            if tuple(f.shape) != want:
                raise ValueError(
                    f"the model returned shape {tuple(f.shape)}, expected {want} "
                    f"(variance={self.opts.variance!r}: {'2C' if self.opts.learned else 'C'} channels)"
                )
            if f.device != device:
                raise ValueError(f"the model returned a tensor on {f.device}, expected {device}")
            if not f.is_floating_point():
                raise TypeError(f"the model returned dtype {f.dtype}, expected a floating dtype")
            f_dtype = f.dtype
            buf.f_dtype = f_dtype
            if f.dtype != dtype:
                f = f.to(dtype)
            if not f.is_contiguous():
                f = f.contiguous()
            if kk is not None:
                cfg_fn(f, w, phi, out=kk, workspace=ws, **part)
            noise_args: dict[str, Any] = {}
            if call.exact:
                if graph:
                    if plan.noise_on[i]:
                        noise_args = {"noise": buf.eps[i]}
                elif plan.draws[i]:
                    z = _draw(call.generator, tuple(x.shape), f_dtype, device)
                    if plan.noise_on[i]:
                        buf.eps[0].copy_(z)
                        noise_args = {"noise": buf.eps[0]}
            elif plan.noise_on[i]:
                noise_args = {"seeds": seeds, "step": i}
            step_fn(
                x, f, coef[i], out=x, variance=variance, clip=clip, k=kk, guidance_scale=w,
                out_net=net if i + 1 < S else None, bad=bad, bad_step=i + 1,
                **{"noise": None, "seeds": None, "step": 0, **noise_args},
            )  # fmt: skip

    def release(self) -> None:
        """Free the captured graphs and cached buffers."""
        self._graphs.clear()
        self._eager = None


def _draw(generator: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One exact-noise draw like diffusers' ``randn_tensor``: the state's shape, the model output's
    dtype, from the generator's device (a PerSampleGenerator: row b from stream b)."""
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, dtype=dtype, device=generator.device, generator=generator).to(device)
    return generator.randn(shape, dtype=dtype, device=device)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def sample_ancestral(
    model: Any,
    noise: torch.Tensor,
    betas: Any,
    timesteps: Any = None,
    *,
    cond: dict | None = None,
    uncond: dict | None = None,
    generator: Any = None,
    seeds: Any = None,
    **options: Any,
) -> torch.Tensor:
    """Ancestral sampling of a DDPM / iDDPM / ADM / DiT model (see `AncestralSampler`).

    ``model(x_t, t, **cond)`` gets the state and the original integer timesteps [B] (2B with CFG)
    and returns [B, 2C, ...] (prediction, then variance: ``variance="learned_range"`` / "learned")
    or [B, C, ...] (``"fixed_small"`` / ``"fixed_large"``). ``noise`` is x_T. ``eta`` (a float)
    selects DDIM with that eta instead of DDPM (eta = 0: deterministic DDIM). The AncestralSampler
    of a (model, betas, options) is kept while the model lives, so repeated calls reuse its plans
    and buffers.
    """
    b = check_betas(betas)
    AncestralOptions.create(**options)  # bad options fail before any cache entry is made
    key = (b.numel(), b.numpy().tobytes(), tuple(sorted((k, repr(v)) for k, v in options.items())))
    sampler = None
    try:
        with _CACHE_LOCK:
            per_model = _CACHE.setdefault(model, {})
            sampler = per_model.get(key)
            if sampler is None:
                # the cached sampler holds the model weakly, so the cache never keeps it alive
                sampler = per_model[key] = AncestralSampler(weakref.ref(model), b, **options)
                while len(per_model) > 4:
                    per_model.pop(next(iter(per_model)))
    except TypeError:  # a model that cannot be weakly referenced: no cache
        sampler = AncestralSampler(model, b, **options)
    return sampler(noise, timesteps, cond=cond, uncond=uncond, generator=generator, seeds=seeds)
