"""Flow matching as an EDM special case: `edmfast.FlowMatchDenoiser` on every engine solver, and
diffusers' flow-matching schedulers converted exactly (`edmfast.diffusers.flow`).

The analytic model is the exact velocity field of a Gaussian mixture under
``x_t = (1 - t) x0 + t eps``: ``v = (x_t - E[x0 | x_t]) / t``, with the posterior mean from
`edmfast.analytic.GaussianMixtureDenoiser` at ``sigma = t / (1 - t)`` (state ``x_t / (1 - t)``).
"""

from __future__ import annotations

import math

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
