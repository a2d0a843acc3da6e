"""Flow matching as an EDM special case: `edmfast.FlowMatchDenoiser` on every engine solver, and
diffusers' flow-matching schedulers converted exactly (`edmfast.diffusers.flow`).

The analytic model is the exact velocity field of a Gaussian mixture under
``x_t = (1 - t) x0 + t eps``: ``v = (x_t - E[x0 | x_t]) / t``, with the posterior mean from
`edmfast.analytic.GaussianMixtureDenoiser` at ``sigma = t / (1 - t)`` (state ``x_t / (1 - t)``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import edmfast
from edmfast import reference
from edmfast.analytic import GaussianMixtureDenoiser
from tests.conftest import rel_err

RUN_TOL = 2e-5  # float32 state vs the float64 oracle: within float32 rounding


class MixtureVelocity(nn.Module):
    """The exact flow-matching velocity of a Gaussian mixture, told ``scale * t`` (float32).

    ``bias`` (optional cond, [B, ...]) is added to v: a conditional model for guidance tests.
    ``inverted``: the same field in reversed time, told ``scale * (1 - t)``, predicting ``x0 - eps``."""

    def __init__(self, numel: int, scale: float = 1000.0, inverted: bool = False, seed: int = 11):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = GaussianMixtureDenoiser(torch.randn(3, numel, generator=g, dtype=torch.float64), s=0.3)
        self.scale, self.inverted = scale, inverted
        self.calls = 0

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, bias: torch.Tensor | None = None):
        self.calls += 1
        shape = (-1, *([1] * (x_t.dim() - 1)))
        u = timestep.to(torch.float64).reshape(shape) / self.scale
        t = 1 - u if self.inverted else u
        x = x_t.to(torch.float64)
        one = t == 1
        # t = 1: the posterior is the prior (the posterior mean at sigma = inf from any finite input)
        xs = torch.where(one, torch.zeros_like(x), x / (1 - t).masked_fill(one, 1.0))
        sigma = torch.where(one, math.inf, t / (1 - t).masked_fill(one, 1.0)).reshape(-1)
        v = (x - self.mix(xs, sigma)) / t
        if bias is not None:
            v = v + bias.to(torch.float64)
        return (-v if self.inverted else v).to(x_t.dtype)


def _flow_sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    """SD3's default schedule in EDM terms: t = linspace(1, 0, n + 1), shifted, sigma = t / (1 - t)."""
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return torch.cat([torch.tensor([math.inf], dtype=torch.float64), t[1:] / (1 - t[1:])])


def _flow_euler(model, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The flow-matching Euler loop in t, written out (float64): x_t += (t' - t) v(x_t, t)."""
    t = torch.where(torch.isinf(sigmas), 1.0, sigmas / (1 + sigmas))
    x = noise.double()
    for i in range(len(t) - 1):
        ts = torch.full((x.shape[0],), float(t[i]), dtype=torch.float32) * 1000  # the model's timestep
        x = x + (t[i + 1] - t[i]) * model(x, ts).double()
    return x


SHAPE = (2, 3, 5, 7)
SOLVERS = [
    ("euler", {}),
    ("heun", {}),
    ("dpmpp_2m", {}),
    ("lms", {}),
    ("euler_ancestral", {}),
    ("dpmpp_sde", {}),
    ("dpmpp_2m_sde", dict(eta=0.5)),
]


@pytest.mark.parametrize("solver, kw", SOLVERS, ids=[s for s, _ in SOLVERS])
def test_every_solver_runs_a_flow_model_like_the_oracle(solver, kw):
    """sigma_0 = inf (t = 1) on every solver, exact and fused noise, against the float64 oracle."""
    model = MixtureVelocity(math.prod(SHAPE[1:]))
    den = edmfast.FlowMatchDenoiser(model)
    sig = _flow_sigmas(9)
    noise = torch.randn(SHAPE)
    for mode in ("exact", "fused"):
        o = dict(solver=solver, noise_mode=mode, **kw)
        got = edmfast.sample(
            den, noise, sig, generator=torch.Generator().manual_seed(1), seeds=[3, 4], backend="cpu", **o
        )
        ref = reference.sample(den, noise, sig, generator=torch.Generator().manual_seed(1), seeds=[3, 4], **o)
        assert rel_err(got, ref) < RUN_TOL, mode


def test_guidance_on_a_flow_model():
    """CFG (+ rescale) acts on the velocity F, batched, as for any preconditioner."""
    model = MixtureVelocity(math.prod(SHAPE[1:]))
    den = edmfast.FlowMatchDenoiser(model)
    noise = torch.randn(SHAPE)
    bias = {"bias": torch.randn(SHAPE)}
    o = dict(
        solver="dpmpp_2m", guidance_scale=4.0, guidance_rescale=0.6, cond=bias,
        uncond={"bias": torch.zeros(SHAPE)},
    )  # fmt: skip
    got = edmfast.sample(den, noise, _flow_sigmas(6), backend="cpu", **o)
    ref = reference.sample(den, noise, _flow_sigmas(6), **o)
    assert rel_err(got, ref) < RUN_TOL
    plain = reference.sample(den, noise, _flow_sigmas(6), solver="dpmpp_2m", cond=bias)
    assert rel_err(plain, ref) > 1e-2  # guidance acts


@pytest.mark.parametrize("n", [1, 4, 13])
def test_euler_is_flow_matching_euler_in_t(n):
    """EDM Euler in sigma on the state x_t / (1 - t) is the flow-matching Euler loop in t."""
    model = MixtureVelocity(math.prod(SHAPE[1:]))
    noise = torch.randn(SHAPE)
    sig = _flow_sigmas(n)
    got = edmfast.sample(edmfast.FlowMatchDenoiser(model), noise, sig, solver="euler", backend="cpu")
    want = _flow_euler(model, noise, sig)
    assert rel_err(got, want) < RUN_TOL
    # ... and not trivially: the loop moves far from the noise and from the schedule's 1-step result
    assert rel_err(want, noise.double()) > 0.3
    if n > 1:
        assert rel_err(_flow_euler(model, noise, _flow_sigmas(1)), want) > 1e-3


def test_flow_heun_converges_to_the_ode_solution():
    """EDM's Heun on a flow model is a 2nd-order method: against the exact ODE solution of a
    single Gaussian (x(sigma_b) = mu + (x_a - mu) sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2))),
    started at a finite sigma, its error falls ~4x per doubling of the steps."""
    mu, s = 0.3, 0.5
    model = MixtureVelocity(1)
    model.mix = GaussianMixtureDenoiser(torch.full((1, math.prod(SHAPE[1:])), mu, dtype=torch.float64), s=s)
    den = edmfast.FlowMatchDenoiser(model)
    noise = torch.randn(SHAPE, dtype=torch.float64)
    errs = []
    for n in (8, 16, 32):
        t = torch.linspace(0.95, 0.0, n + 1, dtype=torch.float64)
        sig = t / (1 - t)
        exact = mu + (noise * sig[0] - mu) * math.sqrt(s**2 / (s**2 + float(sig[0]) ** 2))
        errs.append(rel_err(reference.sample(den, noise, sig, solver="heun"), exact))
    assert 3.0 < errs[0] / errs[1] < 5.0 and 3.0 < errs[1] / errs[2] < 5.0, errs


def test_coefficients_are_the_flow_matching_denoiser():
    """D(x; sigma) = x_t - t v with x_t = x / (1 + sigma); the limit form is the large-sigma limit
    of (sigma c_skip, c_out, sigma c_in, c_noise); c_noise is diffusers' float32 timestep."""
    model = MixtureVelocity(math.prod(SHAPE[1:]))
    den = edmfast.FlowMatchDenoiser(model)
    x = torch.randn(SHAPE, dtype=torch.float64) * 3
    for sigma in (0.05, 1.0, 7.0):
        t = sigma / (1 + sigma)
        x_t = x / (1 + sigma)
        ts = torch.full((SHAPE[0],), t, dtype=torch.float32) * 1000
        want = x_t - t * model(x_t.float(), ts).double()
        assert rel_err(den(x.float(), sigma).double(), want) < 1e-6
    c = [float(v) for v in den.coefficients(torch.tensor([1e9], dtype=torch.float64))]
    lim = den.limit_coefficients()
    assert lim == (1.0, -1.0, 1.0, 1000.0)
    assert c[0] * 1e9 == pytest.approx(lim[0]) and c[1] == pytest.approx(lim[1])
    assert c[2] * 1e9 == pytest.approx(lim[2]) and c[3] == lim[3]
    t32 = torch.tensor([0.123456789, 0.5, 0.987654321], dtype=torch.float32)
    sig = t32.double() / (1 - t32.double())
    assert torch.equal(den.coefficients(sig)[3], (t32 * 1000).double())  # bit for bit
    assert den.coefficients(torch.zeros(1, dtype=torch.float64))[1].item() == 0.0  # D(x; 0) = x


def test_inverted_time():
    """``inverted=True``: the model told (1 - t) * scale predicting x0 - eps samples the same."""
    noise = torch.randn(SHAPE)
    sig = _flow_sigmas(5)
    n = math.prod(SHAPE[1:])
    plain = edmfast.FlowMatchDenoiser(MixtureVelocity(n, scale=1.0), timestep_scale=1.0)
    inv = edmfast.FlowMatchDenoiser(MixtureVelocity(n, scale=1.0, inverted=True), 1.0, inverted=True)
    assert inv.limit_coefficients() == (1.0, 1.0, 1.0, 0.0)
    for solver in ("euler", "dpmpp_2m"):
        a = edmfast.sample(plain, noise, sig, solver=solver, backend="cpu")
        b = edmfast.sample(inv, noise, sig, solver=solver, backend="cpu")
        assert rel_err(b, a) < RUN_TOL


def test_bad_arguments():
    model = MixtureVelocity(4)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="timestep_scale"):
            edmfast.FlowMatchDenoiser(model, timestep_scale=bad)
    with pytest.raises(TypeError, match="timestep_scale"):
        edmfast.FlowMatchDenoiser(model, timestep_scale="1000")
    with pytest.raises(TypeError, match="inverted"):
        edmfast.FlowMatchDenoiser(model, inverted=1)

    def no_timestep(x):  # a model that takes no timestep: named, with the call a flow model gets
        return x

    den = edmfast.FlowMatchDenoiser(no_timestep)
    with pytest.raises(TypeError, match=r"model\(x_t, timestep, \*\*cond\).*no_timestep"):
        edmfast.sample(den, torch.randn(1, 4), _flow_sigmas(3), solver="euler")


# ----------------------------------------------------------------------------- diffusers' flow schedulers

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")

import edmfast.diffusers as edd  # noqa: E402
import edmfast.diffusers.schedules as edds  # noqa: E402
from edmfast.diffusers import flow  # noqa: E402

FM = diffusers.FlowMatchEulerDiscreteScheduler
# Non-default values of every option `flow.CONFIG_OPTIONS` claims (diffusers 0.42.1), each run
# through `edd.schedule` and the engine against the scheduler's own loop. The dynamic-shifting
# parameters of the pipelines (base / max shift, sequence lengths) only make the pipeline's mu.
DYNAMIC = {"base_shift": 0.3, "max_shift": 1.5, "base_image_seq_len": 64, "max_image_seq_len": 1024}
FLOW_VARIANTS = {
    "FlowMatchEulerDiscreteScheduler": [
        {},
        {"num_train_timesteps": 500},
        {"shift": 3.0},
        {"use_dynamic_shifting": True, **DYNAMIC},
        {"use_dynamic_shifting": True, "time_shift_type": "linear"},
        {"shift": 3.0, "shift_terminal": 0.02},
        {"shift": 3.0, "use_karras_sigmas": True},
        {"shift": 3.0, "use_exponential_sigmas": True},
        {"shift": 3.0, "use_beta_sigmas": True},
        {"invert_sigmas": True, "shift": 2.0},
        {"shift": 3.0, "stochastic_sampling": True},
    ],
    "FlowMatchHeunDiscreteScheduler": [{"shift": 3.0}, {"num_train_timesteps": 500}],
}
FLOW_CASES = [(name, i) for name in sorted(FLOW_VARIANTS) for i in range(len(FLOW_VARIANTS[name]))]
FLOW_IDS = [
    name.replace("FlowMatch", "").replace("DiscreteScheduler", "")
    + "-"
    + (",".join(f"{k}={v}" for k, v in FLOW_VARIANTS[name][i].items()) or "default")
    for name, i in FLOW_CASES
]


def _make(name: str, i: int):
    """(scheduler, the mu a dynamic-shifting pipeline passes)."""
    kw = FLOW_VARIANTS[name][i]
    return getattr(diffusers, name)(**kw), ({"mu": 0.8} if kw.get("use_dynamic_shifting") else {})


@pytest.mark.parametrize("name", flow.SCHEDULERS)
def test_every_flow_scheduler_option_is_audited(name):
    """The table names every constructor option, and the cases cover a non-default value of each."""
    defaults = edds._defaults(getattr(diffusers, name))
    table = flow.CONFIG_OPTIONS[name]
    assert set(table) == set(defaults), f"diffusers {diffusers.__version__}: audit {name}"
    assert edd.CONFIG_OPTIONS[name] is table and name in edd.SCHEDULERS
    for key in table:
        assert any(not edds._same(kw.get(key, defaults[key]), defaults[key]) for kw in FLOW_VARIANTS[name]), (
            key
        )
    sched = getattr(diffusers, name)()
    key, value = ("time_shift_type", "quadratic") if "time_shift_type" in table else ("shift", 3.0)
    if table[key] is not None:  # a value outside the table is refused by name, before any work
        sched.register_to_config(**{key: value})
        with pytest.raises(ValueError, match=rf"{name} with {key}={value!r} is not supported"):
            edd.schedule(sched, 4)


def _set(sched, n: int, **kw) -> None:
    if "sigmas" in kw:
        sched.set_timesteps(**kw)
    else:
        sched.set_timesteps(n, **kw)


@pytest.mark.parametrize("name, i", FLOW_CASES, ids=FLOW_IDS)
def test_schedule_equals_the_flow_scheduler(name, i):
    """The scheduler's own float32 times and timesteps after its set_timesteps, for several N."""
    for n in (2, 7, 28):
        sched, kw = _make(name, i)
        s = edd.schedule(sched, n, **kw)
        _set(sched, n, **kw)
        assert flow.check_against(sched, s), n
        theirs = sched.timesteps.double()
        if name == "FlowMatchHeunDiscreteScheduler":
            theirs = torch.cat([theirs[:1], theirs[1::2]])
        assert torch.equal(s.timesteps, theirs)
        assert s.sigmas.dtype == torch.float64 and len(s.sigmas) == n + 1
        assert math.isinf(s.sigmas[0]) and s.sigmas[-1] == 0  # t = 1 ... t = 0
        assert (s.noise_scale, s.output_scale, s.scaling) == (1.0, 1.0, "flow")
        t = s.sigmas[1:] / (1 + s.sigmas[1:])  # the float32 times, up to float64 round-off
        torch.testing.assert_close(t.float().double(), t, rtol=1e-15, atol=1e-300)
    heun = name == "FlowMatchHeunDiscreteScheduler"
    stochastic = sched.config.get("stochastic_sampling", False)
    assert s.solver == ("flow_heun" if heun else "flow_stochastic" if stochastic else "euler")


def test_schedule_custom_sigmas_and_set_shift():
    """FLUX's call: custom flow times plus mu (dynamic shifting); set_shift() is read at call time."""
    sched = FM(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sig = np.linspace(1.0, 1 / 6, 6)
    s = edd.schedule(sched, None, sigmas=sig, mu=0.9)
    sched.set_timesteps(sigmas=sig, mu=0.9)
    assert flow.check_against(sched, s) and len(s.timesteps) == 6
    shifted = FM(shift=3.0)
    shifted.set_shift(5.0)
    s = edd.schedule(shifted, 9)
    shifted.set_timesteps(9)
    assert flow.check_against(shifted, s)
    s3 = edd.schedule(FM(shift=3.0), 9)
    assert not torch.equal(s3.sigmas, s.sigmas)  # the shift acts


def test_schedule_refusals():
    with pytest.raises(ValueError, match="needs mu"):
        edd.schedule(FM(use_dynamic_shifting=True), 5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        edd.schedule(FM(), 0)
    with pytest.raises(ValueError, match="no custom sigmas"):
        edd.schedule(diffusers.FlowMatchHeunDiscreteScheduler(), 3, sigmas=[1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="sigmas must be a 1-D"):
        edd.schedule(FM(), 4, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="not strictly decreasing"):
        edd.schedule(FM(), None, sigmas=[1.0, 0.5, 0.5])
    with pytest.raises(TypeError, match="flow-matching options"):
        edd.schedule(diffusers.EulerDiscreteScheduler(), 5, mu=0.5)
    assert set(flow.CONFIG_OPTIONS) <= set(edd.CONFIG_OPTIONS) and set(flow.SCHEDULERS) <= set(edd.SCHEDULERS)


def _scheduler_loop(sched, model, noise: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """diffusers' own loop as its pipelines write it (float32)."""
    _set(sched, n, **kw)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def _flow_heun64(model, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Heun in t, written out in float64: x_t += (t' - t)(v + v')/2, Euler into t = 0."""
    x = noise.double()

    def v(x, u):
        return model(x, torch.full((x.shape[0],), float(u), dtype=torch.float32) * model.scale).double()

    for i in range(len(t) - 1):
        v1 = v(x, t[i])
        euler = x + (t[i + 1] - t[i]) * v1
        x = euler if t[i + 1] == 0 else x + (t[i + 1] - t[i]) * (v1 + v(euler, t[i + 1])) / 2
    return x


@pytest.mark.parametrize("name, i", FLOW_CASES, ids=FLOW_IDS)
def test_flow_schedulers_on_the_engine_equal_their_loops(name, i):
    """The schedule run by the engine (Euler, FlowMatchHeun's Heun in t, stochastic sampling with
    torch's global RNG as the pipelines leave it) against the scheduler's own step loop."""
    inverted = FLOW_VARIANTS[name][i].get("invert_sigmas", False)
    model = MixtureVelocity(math.prod(SHAPE[1:]), inverted=inverted)
    noise = torch.randn(SHAPE)
    # one step with shift_terminal divides by 1 - t_N = 0 in diffusers (NaN times; refused here)
    for n in (1, 3, 10) if "shift_terminal" not in FLOW_VARIANTS[name][i] else (3, 10):
        sched, kw = _make(name, i)
        model.scale = float(sched.config.num_train_timesteps)
        s = edd.schedule(sched, n, **kw)
        den = flow.denoiser(model, sched)
        run = edmfast.Sampler(den, solver="euler") if s.solver == "euler" else flow.FlowSampler(den, s.solver)
        torch.manual_seed(5)
        got = run(noise * s.noise_scale, s.sigmas) * s.output_scale
        torch.manual_seed(5)
        want = _scheduler_loop(sched, model, noise, n, **kw)
        assert rel_err(got, want) < 1e-5, n
    if s.solver == "flow_heun":  # diffusers' float32 loop cancels more than the fused passes do
        t = torch.where(torch.isinf(s.sigmas), 1.0, s.sigmas / (1 + s.sigmas))
        exact = _flow_heun64(model, noise, t)
        assert rel_err(got, exact) < RUN_TOL
        assert rel_err(got, exact) <= rel_err(want, exact)
        # and it is not EDM's Heun in sigma: the two methods differ at this step count
        edm_heun = edmfast.sample(den, noise, s.sigmas, solver="heun")
        assert rel_err(edm_heun, exact) > 1e-4
    if s.solver == "flow_stochastic":  # the noise matters: another seed, another result
        torch.manual_seed(6)
        assert rel_err(run(noise, s.sigmas), got) > 1e-2


def test_flow_sampler_arguments():
    den = edmfast.FlowMatchDenoiser(MixtureVelocity(4))
    with pytest.raises(ValueError, match="solver must be one of"):
        flow.FlowSampler(den, "heun")
    with pytest.raises(ValueError, match="needs sigmas"):
        flow.FlowSampler(den, "flow_heun")(torch.randn(1, 4))
    with pytest.raises(ValueError, match="end at 0"):
        flow.FlowSampler(den, "flow_heun")(torch.randn(1, 4), torch.tensor([math.inf, 1.0, 0.5]))
