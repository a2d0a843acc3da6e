"""What a sampler is to the engine: a plan of fused passes over a few static buffers.

A plan is made on the host, in float64, once per (schedule, options) and cached; the engine then
runs it without any host work but kernel launches and network calls. It holds

* ``program``: the sequence of operations, each an ``(Op, index)`` pair: a fused pass
  (``passes[index]``), a network evaluation (``eval_in[index]``), an exact-noise draw
  (``draws[index]``), and the eager-only hook points (a k-diffusion callback after a step's first
  evaluation, the end of a step);
* ``coef``: the float32 coefficient rows the passes read at run time (`edmfast.layout` columns),
  so one captured CUDA graph replays any plan of the same structure;
* ``eval_in``: what the network is told at each evaluation (c_noise, sigma or a timestep).

Buffers are named by small integers: `START` (the caller's noise, read by the first pass only),
`X` (the state) and ``1..slots`` (history: a Heun correction point, earlier denoised estimates).

The plan builders live in `edmfast.solvers` (EDM's and k-diffusion's samplers, EDM's design
space) and `edmfast.ancestral` (DDPM / DDIM); `PlanBuilder` is the vocabulary they share.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .layout import (
    ANC_SIZE,
    COEF_A,
    COEF_B,
    COEF_HIST,
    COEF_HP,
    COEF_HQ,
    COEF_NET,
    COEF_SIZE,
    COEF_STD,
    HISTORY,
)

__all__ = [
    "Denoiser",
    "Draw",
    "Op",
    "Pass",
    "Plan",
    "PlanBuilder",
    "PlanCache",
    "Preconditioner",
    "StepInfo",
    "is_preconditioner",
]

START, X = -1, 0  # buffer ids: the caller's noise, the state; history slots are 1, 2, ...
F32_MAX = float(torch.finfo(torch.float32).max)


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, **cond) -> x0 estimate`` shaped like x: the plain denoiser the engine accepts."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor: ...


@runtime_checkable
class Preconditioner(Protocol):
    """A denoiser ``D = c_skip x + c_out F(c_in x; c_noise)`` whose coefficients the engine fuses.

    ``coefficients`` maps a float64 sigma tensor [K] to four float64 tensors [K] (elementwise, so
    the whole schedule is one call); ``raw`` is F alone; ``dtype`` the network's input dtype.
    """

    dtype: torch.dtype

    def coefficients(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, **cond: Any) -> torch.Tensor: ...


def is_preconditioner(denoiser: Any) -> bool:
    """True when the engine folds ``denoiser``'s coefficients into its passes and calls ``raw``."""
    return callable(getattr(denoiser, "coefficients", None)) and callable(getattr(denoiser, "raw", None))


class Op(enum.IntEnum):
    PASS = 0  # run passes[index]
    EVAL = 1  # F = network(net, eval_in[index])
    DRAW = 2  # exact mode: draw draws[index] (into the noise buffer when it is used)
    CALLBACK = 3  # eager only: the user's callback for step index (after its first evaluation)
    STEP_END = 4  # eager only: step index is complete (hooks may read / edit the state)


@dataclass(frozen=True)
class Pass:
    """One fused pass: ``out = a x + b F + sum c_k h_k + std eps; net = c out; h_out = p x + q F``
    (kind "affine"), or the learned-variance ancestral pass (kind "ancestral"), on buffer ids."""

    row: int  # its coefficient row in Plan.coef
    x: int = X
    out: int = X
    hist: tuple[int, ...] = ()  # buffer ids of h0, h1, ... (at most 4)
    hist_out: int | None = None
    f: bool = False  # reads the latest network output
    net: bool = False  # writes the next network input
    noise: int | None = None  # the draw whose noise it adds (exact: draws[noise]; fused: its step/stage)
    flag: int = 0  # written to `bad` for samples whose `out` is not finite (the step it ends, + 1)
    kind: str = "affine"


@dataclass(frozen=True)
class Draw:
    """One exact-noise draw, in the order the reference sampler draws (a seed gives its image)."""

    step: int  # also the Philox step of fused noise
    stage: int = 0  # the draw's index inside the step (the Philox stage)
    used: bool = True  # False: drawn only to keep the generator's stream (e.g. churn with gamma = 0)
    sigma: float = math.nan  # k-diffusion's noise_sampler(sigma, sigma_next) arguments
    sigma_next: float = math.nan


@dataclass(frozen=True)
class StepInfo:
    """What a callback learns about step i: its scalars and the row giving the denoised estimate."""

    info: tuple[tuple[str, float], ...]  # e.g. (("sigma", 2.5), ("sigma_hat", 2.7))
    denoise_row: int  # row of an affine pass giving D from (state, F) at the step's first evaluation
    renet_row: int | None = None  # row recomputing the next network input from an edited state


@dataclass
class Plan:
    """A sampler as data (see the module docstring). Made by a `PlanBuilder`; never mutated."""

    program: tuple[tuple[Op, int], ...]
    passes: tuple[Pass, ...]
    draws: tuple[Draw, ...]
    coef: torch.Tensor  # float32 [R, COEF_SIZE] on the CPU
    eval_in: torch.Tensor  # float64 [E] on the CPU
    eval_dtype: torch.dtype  # what the network gets: float32 (c_noise, sigma) or int64 (timesteps)
    slots: int
    steps: tuple[StepInfo, ...]
    draw_dtype: str  # exact noise: "float64" (EDM's script), "noise" (k-diffusion), "f" (diffusers)
    f_channels: int = 1  # the network returns f_channels * C channels (2: a learned variance half)
    ancestral: tuple = ()  # (variance, clip) of the ancestral passes
    kind: tuple = ()
    _dev: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.steps)

    @property
    def structure(self) -> tuple:
        """Everything a captured graph depends on besides tensor values (rows, eval inputs)."""
        return (
            self.program,
            self.passes,
            tuple((d.step, d.stage, d.used) for d in self.draws),
            self.eval_dtype,
            self.slots,
            self.draw_dtype,
            self.f_channels,
            self.ancestral,
        )

    def program_for(self, hooks: bool, draws: bool) -> tuple[tuple[Op, int], ...]:
        """The program without the operations a call would skip: hook points (no callback, hook or
        progress bar) and exact-noise draws (fused noise, or none): the hot loop never sees them."""
        return self._cached(
            ("program", hooks, draws),
            lambda: tuple(
                (op, i)
                for op, i in self.program
                if (hooks or op not in (Op.CALLBACK, Op.STEP_END)) and (draws or op is not Op.DRAW)
            ),
        )

    @property
    def stochastic(self) -> bool:
        """Some pass adds noise (fused mode then needs seeds)."""
        return any(p.noise is not None for p in self.passes)

    def coef_on(self, device: torch.device) -> torch.Tensor:
        """``coef`` on ``device`` (copied once per device, never an inference tensor)."""
        return self._cached(("coef", device), lambda: _to_device(self.coef, device))

    def rows_on(self, device: torch.device) -> list[torch.Tensor]:
        """``coef_on(device)`` as a list of row views."""
        return self._cached(("rows", device), lambda: list(self.coef_on(device).unbind(0)))

    def eval_on(self, device: torch.device, rows: int) -> torch.Tensor:
        """[E, rows]: evaluation j's network input value, repeated for every network row."""

        def make() -> torch.Tensor:
            with torch.inference_mode(False):
                t = self.eval_in.to(self.eval_dtype).reshape(-1, 1).expand(-1, rows).contiguous()
            return _to_device(t, device)

        return self._cached(("eval", device, rows), make)

    def eval_rows_on(self, device: torch.device, rows: int) -> list[torch.Tensor]:
        return self._cached(("eval_rows", device, rows), lambda: list(self.eval_on(device, rows).unbind(0)))

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        got = self._dev.get(key)
        if got is None:
            got = self._dev[key] = make()
        return got


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of host table ``t`` on ``device`` that is never an inference tensor (usable inside and
    outside inference mode). To CUDA through pinned memory, asynchronously: no host sync (the
    pinned source lives until the stream has read it: the caching host allocator records it)."""
    with torch.inference_mode(False):
        if device.type == "cpu":
            return t if not t.is_inference() else t.clone()
        return t.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------- building plans


class Coefficients:
    """c_skip, c_out, c_in, c_noise of a denoiser at every sigma a plan evaluates, from one
    vectorized ``coefficients()`` call (a plain denoiser: D = F(x; sigma), i.e. 0, 1, 1, sigma)."""

    def __init__(self, denoiser: Any, sigmas: list[float]):
        self.table: dict[float, tuple[float, float, float, float]] = {}
        if not sigmas:
            return
        if math.inf in sigmas:  # the limit form D(eps; inf) of a state holding the unit noise
            self.table[math.inf] = tuple(float(c) for c in denoiser.limit_coefficients())  # type: ignore[assignment]
            sigmas = [v for v in sigmas if v != math.inf]
            if not sigmas:
                return
        s = torch.tensor(sorted(set(sigmas)), dtype=torch.float64)
        if is_preconditioner(denoiser):
            cols = [
                torch.broadcast_to(torch.as_tensor(c, dtype=torch.float64).cpu(), s.shape).tolist()
                for c in denoiser.coefficients(s)
            ]
        else:
            cols = [[0.0] * len(s), [1.0] * len(s), [1.0] * len(s), s.tolist()]
        for k, sigma in enumerate(s.tolist()):
            self.table[sigma] = (cols[0][k], cols[1][k], cols[2][k], cols[3][k])

    def __call__(self, sigma: float) -> tuple[float, float, float, float]:
        return self.table[sigma]


class PlanBuilder:
    """Emits a plan's program and rows, step by step, in float64 Python numbers.

    Solver code asks for the denoiser's coefficients at each sigma it evaluates (`c`); a builder
    made without a table (``coefs=None``) only records those sigmas, so a solver runs twice: once
    to collect them (then one vectorized ``coefficients()`` call), once to build. The rows are
    affine pass rows unless an ancestral builder fills them itself.
    """

    def __init__(self, coefs: Coefficients | None, start_scale: float = 1.0):
        self.coefs = coefs
        self.requested: list[float] = []
        self.program: list[tuple[Op, int]] = []
        self.passes: list[Pass] = []
        self.draws: list[Draw] = []
        self.rows: list[list[float]] = []
        self.eval_in: list[float] = []
        self.steps: list[StepInfo] = []
        self.slots = 0
        self.start_scale = start_scale

    # coefficients ------------------------------------------------------------------------------
    def c(self, sigma: float) -> tuple[float, float, float, float]:
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (placeholders while collecting)."""
        if self.coefs is None:
            self.requested.append(float(sigma))
            return (0.0, 1.0, 1.0, 0.0)
        return self.coefs(float(sigma))

    # rows ----------------------------------------------------------------------------------------
    def row(
        self,
        a: float = 0.0,
        b: float = 0.0,
        hist: tuple[float, ...] = (),
        std: float = 0.0,
        net: float = 0.0,
        p: float = 0.0,
        q: float = 0.0,
    ) -> int:
        """An affine row ``out = a x + b F + sum hist[k] h_k + std eps; net = net out; h = p x + q F``."""
        r = [0.0] * COEF_SIZE
        r[COEF_A], r[COEF_B], r[COEF_STD], r[COEF_NET], r[COEF_HP], r[COEF_HQ] = a, b, std, net, p, q
        for k, v in enumerate(hist):
            r[COEF_HIST[k]] = v
        self.rows.append(r)
        return len(self.rows) - 1

    def raw_row(self, values: list[float]) -> int:
        """A row given column by column (the ancestral pass's layout)."""
        r = [float(v) for v in values] + [0.0] * (max(COEF_SIZE, ANC_SIZE) - len(values))
        self.rows.append(r)
        return len(self.rows) - 1

    # program -------------------------------------------------------------------------------------
    def evaluate(self, value: float) -> None:
        """A network evaluation told ``value`` (c_noise, sigma or a timestep)."""
        self.program.append((Op.EVAL, len(self.eval_in)))
        self.eval_in.append(float(value))

    def run(self, row: int, **kw: Any) -> None:
        """A pass on ``row`` (keyword arguments: the `Pass` fields)."""
        p = Pass(row=row, **kw)
        if len(p.hist) > HISTORY:
            raise AssertionError(f"a pass reads at most {HISTORY} history buffers")
        self.slots = max([self.slots, p.x, p.out, *p.hist, p.hist_out or 0])
        self.program.append((Op.PASS, len(self.passes)))
        self.passes.append(p)

    def draw(self, step: int, stage: int = 0, used: bool = True, sigma: float = math.nan,
             sigma_next: float = math.nan) -> int:  # fmt: skip
        """An exact-noise draw at this point of the program; returns its index (a pass's ``noise``)."""
        self.program.append((Op.DRAW, len(self.draws)))
        self.draws.append(Draw(step, stage, used, float(sigma), float(sigma_next)))
        return len(self.draws) - 1

    def callback(self, i: int, denoise_row: int, **info: float) -> None:
        """The user's callback point of step i (after its first evaluation)."""
        self.program.append((Op.CALLBACK, i))
        self.steps.append(StepInfo(tuple((k, float(v)) for k, v in info.items()), denoise_row))

    def step_end(self, i: int, renet: float | None) -> None:
        """The end of step i; ``renet``: the next network input scale (None on the last step)."""
        if renet is not None:
            row = self.row(a=1.0, net=renet)
            st = self.steps[i]
            self.steps[i] = StepInfo(st.info, st.denoise_row, row)
        self.program.append((Op.STEP_END, i))

    def finish(
        self,
        eval_dtype: torch.dtype,
        draw_dtype: str,
        kind: tuple,
        *,
        f_channels: int = 1,
        ancestral: tuple = (),
        what: Callable[[int], str] | None = None,
    ) -> Plan:
        """The plan, after checking that float32 represents every coefficient and evaluation input."""
        rows = torch.tensor(self.rows, dtype=torch.float64).reshape(-1, COEF_SIZE)
        eval_in = torch.tensor(self.eval_in, dtype=torch.float64)
        coef32 = rows.to(torch.float32)
        bad = ~(torch.isfinite(rows) & torch.isfinite(coef32)).all(dim=1)
        if eval_dtype == torch.float32:
            bad_eval = ~(torch.isfinite(eval_in) & torch.isfinite(eval_in.to(torch.float32)))
        else:
            bad_eval = torch.zeros_like(eval_in, dtype=torch.bool)
        if bool(bad.any()) or bool(bad_eval.any()):
            r = int(bad.nonzero()[0, 0]) if bool(bad.any()) else -1
            where = what(r) if (what is not None and r >= 0) else "an evaluation's input"
            raise ValueError(
                f"the sampling plan is not representable in float32 ({where}): the noise levels or "
                "options give coefficients beyond float32 (check sigmas, sigma_min / sigma_max, "
                "s_noise / s_churn)"
            )
        return Plan(
            program=tuple(self.program),
            passes=tuple(self.passes),
            draws=tuple(self.draws),
            coef=coef32,
            eval_in=eval_in,
            eval_dtype=eval_dtype,
            slots=self.slots,
            steps=tuple(self.steps),
            draw_dtype=draw_dtype,
            f_channels=f_channels,
            ancestral=ancestral,
            kind=kind,
        )


def build(solver: Callable[[PlanBuilder], Plan], denoiser: Any, start_scale: float = 1.0) -> Plan:
    """Run ``solver`` once to collect the sigmas it evaluates, then again with their coefficients."""
    probe = PlanBuilder(None, start_scale)
    solver(probe)
    return solver(PlanBuilder(Coefficients(denoiser, probe.requested), start_scale))


# ----------------------------------------------------------------------------- cache


class PlanCache:
    """A small LRU of plans, keyed by what determines them (schedule values, options, the denoiser's
    scalar settings). Plans are pure data, so one cache serves every front door. Thread-safe."""

    def __init__(self, size: int = 8):
        self.size = size
        self._plans: OrderedDict[Hashable, Plan] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def get(self, key: Hashable | None, make: Callable[[], Plan]) -> Plan:
        """The plan under ``key``, made by ``make()`` on a miss (``key`` None: never cached)."""
        if key is not None:
            with self._lock:
                plan = self._plans.get(key)
                if plan is not None:
                    self._plans.move_to_end(key)
                    return plan
        plan = make()
        if key is not None:
            with self._lock:
                self._plans[key] = plan
                while len(self._plans) > self.size:
                    self._plans.popitem(last=False)
        return plan


def tensor_key(values: Any, limit: int = 100_000) -> tuple | None:
    """A hashable key for a 1-D schedule's values (tensor or sequence), or None when it cannot be
    keyed cheaply (then the plan is made per call)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.numel() > limit:
            return None
        return ("t", str(values.dtype), tuple(values.detach().to("cpu").tolist()))
    if (
        isinstance(values, (list, tuple))
        and len(values) <= limit
        and all(isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)) for v in values)
    ):
        return ("s", tuple(values))
    return None


_SCALARS = frozenset((int, float, str, bool))


def settings_key(denoiser: Any) -> tuple:
    """The denoiser's scalar attributes (sigma_data, sigma_min, M, prediction_type, ...): a plan
    made before one of them was reassigned is not reused. Tensors changed in place are not seen."""
    attrs = getattr(denoiser, "__dict__", None)
    if not attrs:
        return ()
    return tuple([(k, v) for k, v in attrs.items() if v.__class__ in _SCALARS])
