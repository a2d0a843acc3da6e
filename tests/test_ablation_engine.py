"""`edmfast.sampler.ablation_sample`: EDM's design space (sigma(t), s(t), time steps) on the fused
engine, against `reference.ablation_sample`."""

import itertools

import pytest
import torch
from torch import nn

import edmfast
from edmfast import reference
from edmfast import solvers as P
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser
from edmfast.options import SamplerOptions
from edmfast.sampler import Sampler, ablation_sample
from tests.conftest import rel_err

DISCRETIZATIONS, SCHEDULES, SCALINGS = P.DISCRETIZATIONS, P.SCHEDULES, P.SCALINGS
SETTINGS = list(itertools.product(DISCRETIZATIONS, SCHEDULES, SCALINGS))
STEPS = 12
CHURN = dict(s_churn=30, s_tmin=0.05, s_tmax=30, s_noise=1.002)

# The engine's usual float32 budget. With schedule="ve" (t = sigma^2) one Heun step spans
# h / t ~ r^2 - 1 for a level ratio r per step, and the trapezoid pass weighs the float32 x' by
# ~(r^2 - 1) / 2: measured 2e-5..6e-5 at 12 steps (7.5e-5..3e-4 at 7 steps, 2.8e-5 at 18). The plan
# itself is exact: its float64 rows reproduce the reference to 2e-13 (`test_plan_rows_are_exact`).
RUN_TOL = 2e-5
VE_HEUN_TOL = 1.5e-4


def _tol(schedule, solver):
    return VE_HEUN_TOL if schedule == "ve" and solver != "euler" else RUN_TOL


class RawNet(nn.Module):
    """A smooth stand-in network F(c_in x; c_noise) for the VP / VE / iDDPM preconditioners."""

    def forward(self, x, c_noise):
        return torch.tanh(0.8 * x + 1e-3 * c_noise.reshape(-1, *([1] * (x.dim() - 1))))


def _gauss():
    return GaussianDenoiser(0.1, 0.5)


def _noise(b=3):
    return torch.randn(b, 2, 5, 3)


def _gen():
    return torch.Generator().manual_seed(11)


def _both(den, noise, backend="cpu", **kw):
    ref = reference.ablation_sample(den, noise.double(), num_steps=STEPS, generator=_gen(), **kw)
    out = ablation_sample(den, noise, num_steps=STEPS, generator=_gen(), backend=backend, **kw)
    assert out.dtype == noise.dtype and out.shape == noise.shape
    return out, ref


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("churn", [False, True], ids=["ode", "churn"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("setting", SETTINGS, ids=["/".join(s) for s in SETTINGS])
def test_every_setting_matches_reference(setting, solver, churn, backend):
    disc, sch, sc = setting
    kw = dict(discretization=disc, schedule=sch, scaling=sc, solver=solver, **(CHURN if churn else {}))
    out, ref = _both(_gauss(), _noise(), backend, **kw)
    assert rel_err(out, ref) < _tol(sch, solver)


@pytest.mark.parametrize("settings", [("vp", "vp", "vp"), ("ve", "ve", "none"), ("iddpm", "linear", "none")])
def test_triton_interpreter(settings):
    disc, sch, sc = settings
    kw = dict(discretization=disc, schedule=sch, scaling=sc, **CHURN)
    out, ref = _both(_gauss(), _noise(2), "triton", **kw)
    assert rel_err(out, ref) < _tol(sch, "heun")


def _preconds():
    return {
        "edm": edmfast.EDMPrecond(EDMNetworkOf(_gauss())),
        "vp": edmfast.VPPrecond(RawNet()),
        "ve": edmfast.VEPrecond(RawNet()),
        "iddpm": edmfast.iDDPMPrecond(RawNet()),
    }


# the paper's Table 2 baselines, each with its own preconditioner, named explicitly
BASELINES = {
    "VP baseline (vp/vp/vp)": ("vp", dict(discretization="vp", schedule="vp", scaling="vp")),
    "VE baseline (ve/ve/none)": ("ve", dict(discretization="ve", schedule="ve", scaling="none")),
    "iDDPM (iddpm/linear/none)": ("iddpm", dict(discretization="iddpm", schedule="linear", scaling="none")),
    "EDM (edm/linear/none)": ("edm", dict(discretization="edm", schedule="linear", scaling="none")),
}


@pytest.mark.parametrize("churn", [False, True], ids=["ode", "churn"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_with_their_preconditioners(name, solver, churn):
    kind, kw = BASELINES[name]
    den = _preconds()[kind]
    out, ref = _both(den, _noise(), "cpu", solver=solver, **kw, **(CHURN if churn else {}))
    assert rel_err(out, ref) < _tol(kw["schedule"], solver), name


@pytest.mark.parametrize("kind", ["vp", "ve", "iddpm"])
@pytest.mark.parametrize("setting", [("edm", "linear", "none"), ("vp", "vp", "vp"), ("ve", "ve", "none")])
def test_preconditioners_across_settings(kind, setting):
    disc, sch, sc = setting
    out, ref = _both(_preconds()[kind], _noise(), "cpu", discretization=disc, schedule=sch, scaling=sc)
    assert rel_err(out, ref) < _tol(sch, "heun")


@pytest.mark.parametrize("solver", ["heun", "2nd"])
def test_alpha_solver(solver):
    kw = dict(discretization="vp", schedule="vp", scaling="vp", alpha=0.5)
    noise = _noise()
    ref = reference.ablation_sample(_gauss(), noise.double(), num_steps=STEPS, solver="heun", **kw)
    out = ablation_sample(_gauss(), noise, num_steps=STEPS, solver=solver, backend="cpu", **kw)
    assert rel_err(out, ref) < RUN_TOL


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("setting", SETTINGS, ids=["/".join(s) for s in SETTINGS])
def test_plan_rows_are_exact(setting, alpha, monkeypatch):
    """The plan's float64 rows, applied in float64, are the reference's math (no kernels)."""
    disc, sch, sc = setting
    seen = {}
    assemble = P._assemble

    def keep(rows, sigma_in, den, sch, noise_on, cor, *rest):
        seen["rows"], seen["sigma"], seen["cor"] = rows.clone(), sigma_in.clone(), cor.tolist()
        return assemble(rows, sigma_in, den, sch, noise_on, cor, *rest)

    monkeypatch.setattr(P, "_assemble", keep)
    den = edmfast.VPPrecond(RawNet())
    solver = "2nd" if alpha != 1 else "heun"
    plan = P.make_plan(den, None, SamplerOptions.create(num_steps=8, solver=solver, alpha=alpha),
                       P.AblationOptions.create(discretization=disc, schedule=sch, scaling=sc))  # fmt: skip
    rows, sig = seen["rows"], seen["sigma"]
    noise = torch.randn(2, 3, 4, dtype=torch.float64)

    def f(x, j):
        return den.raw(x, sig[j].expand(x.shape[0]).float()).double()

    x = rows[0, 0] * noise
    net = rows[0, 4] * x
    for i in range(plan.n):
        fa = f(net, 2 * i)
        ra = rows[1 + 2 * i]
        if seen["cor"][i]:
            xp = ra[0] * x + ra[2] * fa
            rb = rows[2 + 2 * i]
            x = rb[0] * x + rb[1] * xp + rb[2] * f(ra[4] * xp, 2 * i + 1)
        else:
            x = ra[0] * x + ra[2] * fa
        net = (rb if seen["cor"][i] else ra)[4] * x
    den.dtype = torch.float64  # the reference's raw call in float64 too
    ref = reference.ablation_sample(den, noise, num_steps=8, solver="heun", alpha=alpha,
                                    discretization=disc, schedule=sch, scaling=sc)  # fmt: skip
    assert rel_err(x, ref) < 1e-6  # float32 c_noise in both; the state math agrees to ~1e-13


def test_edm_setting_equals_sample_with_guidance():
    """edm/linear/none is `sample` on the same Karras steps, CFG and rescale included."""
    g = _gauss()
    pre = edmfast.EDMPrecond(EDMNetworkOf(g))
    noise = _noise()
    mu = torch.linspace(-1, 1, noise[0].numel()).reshape(noise.shape[1:]).expand_as(noise)
    cfg = dict(cond={"mu": mu}, uncond={"mu": torch.zeros_like(mu)}, guidance_scale=2.5, guidance_rescale=0.5)
    sig = edmfast.karras_sigmas(STEPS, 0.002, 80.0)
    a = ablation_sample(pre, noise, num_steps=STEPS, backend="cpu", **cfg)
    b = edmfast.sample(pre, noise, sig, backend="cpu", **cfg)
    assert rel_err(a, b) < 1e-6


def test_sampler_takes_ablation_options_and_reuses_its_plan():
    den = _preconds()["vp"]
    ab = P.AblationOptions.create(discretization="vp", schedule="vp", scaling="vp")
    s = Sampler(den, ablation=ab, num_steps=STEPS, backend="cpu")
    noise = _noise()
    a = s(noise)
    assert len(s._plans) == 1
    b = s(noise)
    assert len(s._plans) == 1 and torch.equal(a, b)
    ref = reference.ablation_sample(
        den, noise.double(), num_steps=STEPS, discretization="vp", schedule="vp", scaling="vp"
    )
    assert rel_err(a, ref) < RUN_TOL
    # differs from the linear schedule on the same steps (the 12%)
    lin = ablation_sample(den, noise, num_steps=STEPS, discretization="vp", backend="cpu")
    assert rel_err(lin, a) > 1e-3


def test_fused_noise_is_seeded():
    noise = _noise()
    kw = dict(discretization="ve", schedule="ve", noise_mode="fused", backend="cpu", **CHURN)
    a = ablation_sample(_gauss(), noise, seeds=[1, 2, 3], **kw)
    b = ablation_sample(_gauss(), noise, seeds=[1, 2, 3], **kw)
    c = ablation_sample(_gauss(), noise, seeds=[1, 2, 4], **kw)
    assert torch.equal(a, b) and torch.equal(a[:2], c[:2]) and not torch.equal(a[2], c[2])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(discretization="ddim"), "discretization"),
        (dict(schedule="cosine"), "schedule"),
        (dict(scaling="ve"), "scaling"),
        (dict(solver="rk4"), "solver"),
        (dict(alpha=0.0), "alpha"),
        (dict(epsilon_s=1.5), "epsilon_s"),
        (dict(sigma_min=-1.0), "sigma_min"),
        (dict(sigma_min=5.0, sigma_max=1.0), "range"),
        (dict(M=0), "M"),
        (dict(bogus=1), "bogus"),
        (dict(s_churn=-1.0), "s_churn"),
    ],
)
def test_bad_options(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ablation_sample(_gauss(), _noise(), backend="cpu", **kw)


def test_sigmas_refused_with_ablation():
    ab = P.AblationOptions.create()
    with pytest.raises(ValueError, match="sigmas must be None"):
        Sampler(_gauss(), [1.0, 0.0], ablation=ab)
    with pytest.raises(ValueError, match="sigmas must be None"):
        Sampler(_gauss(), ablation=ab)(_noise(), [1.0, 0.0])
    with pytest.raises(TypeError, match="AblationOptions"):
        Sampler(_gauss(), ablation={"schedule": "vp"})
