"""The sampling engine: EDM's sampler on fused kernels, optionally one CUDA graph per call.

Per Heun step the loop runs two network evaluations and two fused passes (SPEC §3):

* pass A reads x_hat and F, writes the correction point x' and the next network input c_in x';
* pass B reads x_hat, x' and F', writes x_{i+1} already churned for the next step (x_hat_{i+1})
  and its network input.

Preconditioning (c_skip, c_out, c_in) and classifier-free guidance fold into the coefficients of
those passes: every pass is ``out = p x_hat + q x' + r F + std eps; net = c out`` (see
`edmfast.reference.heun_step`) with a row of float32 coefficients from a per-call table kept on
the device. The loop makes no host sync, no ``.item()`` and no allocation of its own; all float64
schedule arithmetic happens once, before the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops
from .options import (
    SamplerOptions,
    Step,
    check_cond,
    check_generator,
    check_noise,
    check_seeds,
    merge_cond,
    plan_steps,
    resolve_sigmas,
    with_option_signature,
)
from .reference import COEF_SIZE, draw_exact_noise

# A pass's coefficient row: [p, q, r, std, c, 0, 0, 0].


@dataclass
class _Eval:
    """One network evaluation: at which sigma, with which coefficients."""

    sigma: float
    c_skip: float
    c_out: float
    c_in: float
    c_noise: float


@dataclass
class _Plan:
    """Everything the loop needs, derived once per call in float64 on the host."""

    steps: list[Step]
    evals: list[tuple[_Eval, _Eval | None]]  # per step: (at sigma_hat, at sigma') evaluations
    coef: torch.Tensor  # float32 [1 + 2N, COEF_SIZE]: row 0 = start, rows 1+2i / 2+2i = passes A / B
    noise_steps: list[bool]  # which steps inject churn noise (std > 0)
    structure: tuple  # what a captured graph depends on besides tensor values


def _coefficients(denoiser: Any, sigma: float) -> tuple[float, float, float, float]:
    if hasattr(denoiser, "coefficients"):
        s = torch.tensor([sigma], dtype=torch.float64)
        return tuple(float(c) for c in denoiser.coefficients(s))  # type: ignore[return-value]
    return 0.0, 1.0, 1.0, 0.0  # a plain denoiser: D = F(x), network input = x


def make_plan(denoiser: Any, sigmas: torch.Tensor, opts: SamplerOptions) -> _Plan:
    """Fold the schedule, the preconditioner and the solver into per-pass coefficient rows."""
    steps = plan_steps(denoiser, sigmas, opts)
    n = len(steps)
    alpha = opts.effective_alpha
    rows = torch.zeros(1 + 2 * n, COEF_SIZE, dtype=torch.float64)
    evals: list[tuple[_Eval, _Eval | None]] = []
    noise_steps = [opts.s_churn > 0 and st.noise_std > 0 for st in steps]

    def churn_into(i: int) -> tuple[float, float]:
        """(std, c) of the churn + network input that a pass ending step i-1 applies for step i."""
        if i >= n:
            return 0.0, 0.0
        return (steps[i].noise_std if noise_steps[i] else 0.0), evals_c_in[i]

    # c_in at each step's first evaluation, needed by the pass that precedes it
    evals_c_in = []
    first_evals = []
    for st in steps:
        if math.isinf(st.sigma):
            if not hasattr(denoiser, "limit_coefficients"):
                raise ValueError(
                    "sigmas[0] is inf (zero terminal SNR): the denoiser needs limit_coefficients() "
                    "(use edmfast.DiscreteVPDenoiser with v_prediction or sample prediction)"
                )
            e = _Eval(st.sigma, *denoiser.limit_coefficients())
        else:
            e = _Eval(st.sigma_hat, *_coefficients(denoiser, st.sigma_hat))
        first_evals.append(e)
        evals_c_in.append(e.c_in)

    # start: x_hat_0 = sigma_0 noise + std_0 eps (the state is the noise itself when sigma_0 = inf)
    std0, c0 = churn_into(0)
    rows[0, :5] = torch.tensor([1.0 if math.isinf(steps[0].sigma) else steps[0].sigma, 0, 0, std0, c0])
    for i, st in enumerate(steps):
        e = first_evals[i]
        h = st.sigma_next - st.sigma_hat
        if math.isinf(st.sigma):
            # limit step x_1 = D(eps; inf) + sigma_1 eps = (c_skip + sigma_1) eps + c_out F
            std, c = churn_into(i + 1)
            rows[1 + 2 * i, :5] = torch.tensor([e.c_skip + st.sigma_next, 0, e.c_out, std, c])
            evals.append((e, None))
            continue
        # d = (x_hat - D) / sigma_hat with D = c_skip x_hat + c_out F
        d_x, d_f = (1 - e.c_skip) / st.sigma_hat, -e.c_out / st.sigma_hat
        if not st.correct:
            std, c = churn_into(i + 1)
            rows[1 + 2 * i, :5] = torch.tensor([1 + h * d_x, 0, h * d_f, std, c])
            evals.append((e, None))
            continue
        ep = _Eval(st.sigma_prime, *_coefficients(denoiser, st.sigma_prime))
        # pass A: x' = x_hat + alpha h d, and the network input at sigma'
        rows[1 + 2 * i, :5] = torch.tensor([1 + alpha * h * d_x, 0, alpha * h * d_f, 0, ep.c_in])
        # pass B: x_{i+1} = x_hat + h ((1 - 1/(2a)) d + 1/(2a) d') with d = (x' - x_hat)/(a h),
        # d' = ((1 - c_skip') x' - c_out' F') / sigma'  ->  P x_hat + Q x' + R F'
        w1 = (1 - 1 / (2 * alpha)) / alpha
        w2 = h / (2 * alpha * st.sigma_prime)
        std, c = churn_into(i + 1)
        rows[2 + 2 * i, :5] = torch.tensor([1 - w1, w1 + w2 * (1 - ep.c_skip), -w2 * ep.c_out, std, c])
        evals.append((e, ep))

    structure = (
        n,
        tuple(noise_steps),
        tuple(ep is not None for _, ep in evals),
        math.isinf(steps[0].sigma),
        opts.solver,
        opts.noise_mode,
    )
    return _Plan(steps, evals, rows.to(torch.float32), noise_steps, structure)


@dataclass
class _Buffers:
    """Static device memory of one (shape, dtype, device, options) configuration."""

    x_hat: torch.Tensor  # float32 state [B, ...]
    x_prime: torch.Tensor  # float32 correction point [B, ...]
    net: torch.Tensor  # network input [R B, ...] in the network dtype (R = 2 with CFG)
    noise: torch.Tensor  # float32 copy of the latents [B, ...]
    coef: torch.Tensor  # float32 [1 + 2N, 8]
    sigma_in: torch.Tensor  # float32 [2N, R B]: the sigma (plain denoiser) or c_noise fed per evaluation
    k: torch.Tensor  # float32 [B] CFG-rescale factors
    seeds: torch.Tensor  # int64 [B]
    exact_eps: torch.Tensor  # float32 [N | 1 | 0, B, ...] exact churn draws (N: graphs, 1: eager, 0: none)
    sums: torch.Tensor  # float32 [N, B] per-step sums of the state: non-finite -> the step it appeared
    cond: dict = field(default_factory=dict)  # static copies of tensor keyword arguments


class Sampler:
    """A reusable sampler: ``Sampler(denoiser, **options)(noise, cond=..., seeds=...)``.

    Options are those of `sample`. Per call: the noise, ``sigmas`` (default: EDM's), ``cond`` /
    ``uncond``, ``generator`` and ``seeds``. On CUDA with ``cuda_graph`` on, the whole loop (all
    steps, both evaluations, CFG, noise) is captured once per configuration and replayed for new
    noise, seeds, sigma values and tensor conditioning. A configuration is re-captured when any of
    these change: noise shape/dtype/device, the network dtype, conditioning keys/shapes/dtypes,
    number of steps, which steps churn or take the correction (that depends on s_tmin/s_tmax and
    trailing zeros), zero-SNR start, solver or noise mode. At most ``max_graphs`` configurations
    are kept (least recently used dropped, its memory pool released); `release` frees them all.
    With ``cuda_graph="auto"`` a configuration's first call runs eagerly and the capture happens
    when it repeats (so a one-off `sample` call never pays for a capture); ``True`` captures on
    the first call; ``False`` never captures.

    ``stats`` records ``compile_s`` (first call through the compiled network), ``capture_s``,
    ``captures`` and ``replays``.
    """

    @with_option_signature
    def __init__(self, denoiser: Any, sigmas: Any = None, *, max_graphs: int = 4, **options: Any):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable D(x, sigma, **cond), got {type(denoiser).__name__}")
        self.opts = SamplerOptions.create(**options)
        self.denoiser = denoiser
        self.sigmas = sigmas
        self.max_graphs = max_graphs
        self.stats: dict[str, float] = {"compile_s": 0.0, "capture_s": 0.0, "captures": 0, "replays": 0}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, _Buffers]] = {}
        self._eager: tuple[tuple, _Buffers] | None = None
        self._seen: set[tuple] = set()  # configurations run at least once (cuda_graph="auto")
        self._network = self._compiled_network() if self.opts.compile else None
        self._compiled_warm = False

    # ------------------------------------------------------------------ network

    def _compiled_network(self):
        """torch.compile of the raw network (of F inside a preconditioner), cached on the Sampler.

        The default mode is used: it composes with our own whole-loop graph capture (the
        reduce-overhead mode would capture graphs of its own inside ours).
        """
        target = getattr(self.denoiser, "model", None) if hasattr(self.denoiser, "raw") else self.denoiser
        if target is None:
            raise ValueError("compile=True needs a preconditioner with a .model or a callable denoiser")
        try:
            return torch.compile(target, dynamic=False)
        except Exception as e:  # surfaced, never silently ignored
            raise RuntimeError(f"torch.compile of the denoiser failed: {e}") from e

    def _call_network(self, x_in: torch.Tensor, sigma_in: torch.Tensor, cond: dict) -> torch.Tensor:
        if self._network is not None and not self._compiled_warm:
            t0 = time.perf_counter()
            try:
                out = self._raw(x_in, sigma_in, cond)
            except Exception as e:
                raise RuntimeError(f"the compiled denoiser failed on its first call: {e}") from e
            if x_in.is_cuda:
                torch.cuda.synchronize(x_in.device)
            self.stats["compile_s"] = time.perf_counter() - t0
            self._compiled_warm = True
            return out
        return self._raw(x_in, sigma_in, cond)

    def _raw(self, x_in: torch.Tensor, sigma_in: torch.Tensor, cond: dict) -> torch.Tensor:
        den = self.denoiser
        if hasattr(den, "raw"):
            if self._network is not None:
                from .precond import _model_output

                return _model_output(self._network(x_in, sigma_in, **cond))
            return den.raw(x_in, sigma_in, **cond)
        fn = self._network if self._network is not None else den
        return fn(x_in, sigma_in, **cond)

    def _net_dtype(self, noise: torch.Tensor) -> torch.dtype:
        dtype = (
            getattr(self.denoiser, "dtype", torch.float32) if hasattr(self.denoiser, "raw") else torch.float32
        )
        if dtype not in ops.IO_DTYPES:
            raise TypeError(f"the network dtype must be one of {ops.IO_DTYPES}, got {dtype}")
        return dtype

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        noise: torch.Tensor,
        sigmas: Any = None,
        *,
        cond: dict | None = None,
        uncond: dict | None = None,
        generator: Any = None,
        seeds: Any = None,
    ) -> torch.Tensor:
        opts = self.opts
        noise = check_noise(noise)
        batch, device = noise.shape[0], noise.device
        backend = ops.resolve_backend(opts.backend, device)
        cond = check_cond(cond, batch, device, "cond")
        use_cfg = opts.guidance_scale != 1.0
        if use_cfg:
            if uncond is None:
                raise ValueError(
                    "guidance_scale != 1 needs uncond (the unconditional keyword arguments, {} if none)"
                )
            kwargs = merge_cond(cond, check_cond(uncond, batch, device, "uncond"), batch)
        else:
            kwargs = cond
        sigmas = self.sigmas if sigmas is None else sigmas
        plan = make_plan(self.denoiser, resolve_sigmas(self.denoiser, sigmas, opts), opts)
        if opts.noise_mode == "fused" and any(plan.noise_steps):
            if seeds is None:
                seeds = getattr(generator, "seeds", None)
                seeds = None if seeds is None else seeds.to(device)  # ours to move: the generator's CPU copy
            if seeds is None:
                raise ValueError("noise_mode='fused' with s_churn > 0 needs seeds (int64 [B])")
        seeds_t = (
            check_seeds(seeds, batch, device) if seeds is not None else torch.zeros(batch, dtype=torch.int64)
        )
        check_generator(generator, batch)

        net_dtype = self._net_dtype(noise)
        if opts.cuda_graph is True and device.type != "cuda":
            raise ValueError("cuda_graph=True needs CUDA tensors")
        key = (
            tuple(noise.shape),
            noise.dtype,
            device,
            net_dtype,
            backend,
            plan.structure,
            use_cfg,
            tuple(
                (k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                for k, v in sorted(kwargs.items())
            ),
        )
        if opts.cuda_graph == "auto":
            # capture once a configuration repeats: a one-off call (e.g. sample()) runs eagerly
            # instead of paying warm-up + capture + replay for a single use
            use_graph = device.type == "cuda" and (key in self._graphs or key in self._seen)
            if device.type == "cuda":
                self._seen.add(key)
        else:
            use_graph = opts.cuda_graph is True
        # like the official script (and the reference), exact mode draws on every step once
        # S_churn > 0, even where no step churns, so the generator ends in the same state
        exact = opts.noise_mode == "exact" and opts.s_churn > 0

        def fill(buf: _Buffers, draw_noise: bool = True) -> None:
            buf.noise.copy_(noise)
            buf.coef.copy_(plan.coef)
            buf.sigma_in.copy_(self._sigma_table(plan, buf.sigma_in.shape[1]))
            buf.seeds.copy_(seeds_t)
            if exact and use_graph and draw_noise:
                # a graph cannot call the generator: draw every step's noise before the replay, in
                # the same order the loop would (the official script draws on every step)
                for i, on in enumerate(plan.noise_steps):
                    eps = draw_exact_noise(generator, tuple(noise.shape), device)
                    if on:
                        buf.exact_eps[i].copy_(eps)
            for key, v in buf.cond.items():
                v.copy_(kwargs[key])

        rows = 2 * batch if use_cfg else batch
        draw = (lambda: draw_exact_noise(generator, tuple(noise.shape), device)) if exact else None
        if not use_graph:
            # eager buffers are kept for the next call of the same shape (the result is a copy)
            eager_key = (tuple(noise.shape), device, net_dtype, rows, len(plan.steps), exact)
            if self._eager is None or self._eager[0] != eager_key:
                self._eager = (eager_key, self._alloc(noise, rows, net_dtype, plan, exact, {}, graph=False))
            buf = self._eager[1]
            fill(buf)
            self._loop(buf, plan, backend, use_cfg, kwargs, draw=draw, progress=opts.progress)
            out = buf.x_hat
            sums = buf.sums
        else:
            entry = self._graphs.pop(key, None)
            if entry is None:
                entry = self._capture(noise, rows, net_dtype, plan, exact, kwargs, backend, use_cfg, fill)
                while len(self._graphs) >= self.max_graphs:
                    self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = entry  # most recently used last
            graph, buf = entry
            fill(buf)
            if opts.progress:  # the whole loop is one replay: one tick, closed when it has run
                from tqdm import tqdm

                with tqdm(total=1, desc="edmfast (graph replay)") as bar:
                    graph.replay()
                    torch.cuda.current_stream(device).synchronize()
                    bar.update()
            else:
                graph.replay()
            self.stats["replays"] += 1
            out, sums = buf.x_hat, buf.sums
        self._check_finite(sums, plan)
        return out.to(noise.dtype, copy=True)

    # ------------------------------------------------------------------ internals

    def _sigma_table(self, plan: _Plan, rows: int) -> torch.Tensor:
        """Per evaluation (2 per step): c_noise for a preconditioner, sigma for a plain denoiser."""
        precond = hasattr(self.denoiser, "raw")
        vals = torch.zeros(2 * len(plan.steps), dtype=torch.float64)
        for i, (e, ep) in enumerate(plan.evals):
            vals[2 * i] = e.c_noise if precond else e.sigma
            if ep is not None:
                vals[2 * i + 1] = ep.c_noise if precond else ep.sigma
        return vals.to(torch.float32).reshape(-1, 1).expand(-1, rows)

    def _alloc(self, noise, rows, net_dtype, plan, exact, kwargs, graph: bool) -> _Buffers:
        dev, shape, n = noise.device, tuple(noise.shape), len(plan.steps)
        f32 = dict(dtype=torch.float32, device=dev)
        return _Buffers(
            x_hat=torch.empty(shape, **f32),
            x_prime=torch.empty(shape, **f32),
            net=torch.empty((rows, *shape[1:]), dtype=net_dtype, device=dev),
            noise=torch.empty(shape, **f32),
            coef=torch.empty(1 + 2 * n, COEF_SIZE, **f32),
            sigma_in=torch.empty(2 * n, rows, **f32),
            k=torch.ones(shape[0], **f32),
            seeds=torch.zeros(shape[0], dtype=torch.int64, device=dev),
            # eager loops draw exact noise step by step into one slot; graphs need all N up front
            exact_eps=torch.zeros(((n if graph else 1) if exact else 0, *shape), **f32),
            sums=torch.zeros(n, shape[0], **f32),
            cond={k: torch.empty_like(v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)},
        )

    def _loop(
        self,
        buf: _Buffers,
        plan: _Plan,
        backend: str,
        use_cfg: bool,
        cond: dict,
        draw=None,
        progress: bool = False,
    ) -> None:
        """The whole sampling loop on static buffers: capturable as one CUDA graph.

        ``draw`` (eager exact-noise mode only) draws step i's churn noise when the loop reaches it.
        """
        opts = self.opts
        batch, n = buf.x_hat.shape[0], len(plan.steps)
        w, phi = opts.guidance_scale, opts.guidance_rescale

        def noise_args(i: int) -> dict[str, Any]:
            if i >= n:
                return {}
            if draw is not None:
                eps = draw()  # drawn on every step, like the official script, to keep the stream
                if plan.noise_steps[i]:
                    buf.exact_eps[0].copy_(eps)
                    return {"noise": buf.exact_eps[0]}
                return {}
            if not plan.noise_steps[i]:
                return {}
            if buf.exact_eps.shape[0]:
                return {"noise": buf.exact_eps[i]}
            return {"seeds": buf.seeds, "step": i}

        def evaluate(j: int) -> torch.Tensor:
            f = self._call_network(buf.net, buf.sigma_in[j], cond)
            if f.shape != buf.net.shape:
                raise ValueError(
                    f"the denoiser returned shape {tuple(f.shape)}, expected {tuple(buf.net.shape)}"
                )
            if f.device != buf.net.device:
                raise ValueError(f"the denoiser returned a tensor on {f.device}, expected {buf.net.device}")
            if not f.is_floating_point():
                raise TypeError(f"the denoiser returned dtype {f.dtype}, expected a floating dtype")
            if f.dtype != buf.net.dtype:
                f = f.to(buf.net.dtype)
            if use_cfg and phi > 0:
                ops.cfg_rescale_factors(f, w, phi, out=buf.k, backend=backend)
            return f

        guide: dict[str, Any] = dict(k=buf.k if use_cfg and phi > 0 else None, guidance_scale=w)
        ops.heun_step(
            buf.noise, buf.coef[0], out=buf.x_hat, out_net=buf.net, backend=backend, **noise_args(0)
        )
        steps = range(len(plan.steps))
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="edmfast")
        for i in steps:
            next_net = buf.net if i + 1 < n else None  # the last pass feeds no network
            f = evaluate(2 * i)
            if plan.evals[i][1] is not None:
                ops.heun_step(
                    buf.x_hat,
                    buf.coef[1 + 2 * i],
                    f=f,
                    out=buf.x_prime,
                    out_net=buf.net,
                    backend=backend,
                    **guide,
                )
                f = evaluate(2 * i + 1)
                ops.heun_step(
                    buf.x_hat,
                    buf.coef[2 + 2 * i],
                    x_prime=buf.x_prime,
                    f=f,
                    out=buf.x_hat,
                    out_net=next_net,
                    backend=backend,
                    **guide,
                    **noise_args(i + 1),
                )
            else:
                ops.heun_step(
                    buf.x_hat,
                    buf.coef[1 + 2 * i],
                    f=f,
                    out=buf.x_hat,
                    out_net=next_net,
                    backend=backend,
                    **guide,
                    **noise_args(i + 1),
                )
            # one read of the state per step; NaN/inf anywhere makes its sample's sum non-finite
            torch.sum(buf.x_hat.reshape(batch, -1), dim=1, out=buf.sums[i])

    def _capture(self, noise, rows, net_dtype, plan, exact, kwargs, backend, use_cfg, fill):
        buf = self._alloc(noise, rows, net_dtype, plan, exact, kwargs, graph=True)
        # No exact-noise draws here: the caller fills again (drawing) right before the first
        # replay, and drawing twice would advance the generator past the reference's stream.
        # Warm-up and capture run on the zeroed exact_eps; only the replay's values matter.
        fill(buf, draw_noise=False)
        # tensor keyword arguments are read from static copies that each replay refills
        cond = {k: buf.cond.get(k, v) for k, v in kwargs.items()}
        t0 = time.perf_counter()
        # warm up on a side stream (lazy init, compilation, cuDNN autotuning) before capture
        side = torch.cuda.Stream(device=noise.device)
        side.wait_stream(torch.cuda.current_stream(noise.device))
        with torch.cuda.stream(side):
            self._loop(buf, plan, backend, use_cfg, cond)
        torch.cuda.current_stream(noise.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._loop(buf, plan, backend, use_cfg, cond)
        torch.cuda.synchronize(noise.device)
        self.stats["capture_s"] += time.perf_counter() - t0
        self.stats["captures"] += 1
        return graph, buf

    def _check_finite(self, sums: torch.Tensor, plan: _Plan) -> None:
        """The one host sync of a call: name the first step whose state went non-finite."""
        bad = ~torch.isfinite(sums).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            samples = (~torch.isfinite(sums[i])).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"non-finite values appeared at step {i} (sigma={plan.steps[i].sigma:g}) in samples "
                f"{samples[:8]}: the denoiser produced NaN or inf"
            )

    def release(self) -> None:
        """Drop every captured graph and its memory pool, and the eager buffers."""
        self._graphs.clear()
        self._eager = None
        self._seen.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
    **options: Any,
) -> torch.Tensor:
    """Sample with EDM's stochastic Heun sampler (Algorithm 2; Algorithm 1 when s_churn = 0).

    ``noise`` [B, ...] is unit-variance latents; the loop starts at ``noise * sigmas[0]`` (at the
    noise itself when sigmas[0] is inf). ``sigmas`` defaults to `karras_sigmas` with
    num_steps / sigma_min / sigma_max / rho, clamped to the denoiser's range. Options (defaults):
    solver "heun" | "euler" | "2nd" (with alpha), s_churn 0, s_tmin 0, s_tmax inf, s_noise 1,
    guidance_scale 1, guidance_rescale 0, noise_mode "exact" | "fused", backend "auto",
    cuda_graph "auto", compile False, progress False. Returns a tensor like ``noise``.

    Each call builds a fresh `Sampler`, so with ``cuda_graph="auto"`` it runs eagerly; keep a
    `Sampler` to get the whole loop captured once and replayed.
    """
    return Sampler(denoiser, sigmas, **options)(
        noise, cond=cond, uncond=uncond, generator=generator, seeds=seeds
    )
