"""``callback=`` on `sample` / `Sampler` / `ablation_sample` (k-diffusion's convention)."""

import pytest
import torch

import edmfast
from edmfast import reference
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser
from edmfast.cli import load_k_diffusion_sampling
from edmfast.sampler import Sampler, ablation_sample
from tests.conftest import HAS_CUDA, gpu, rel_err

STEPS = 6
MU = 0.1


def _sigmas():
    return edmfast.karras_sigmas(STEPS, 0.002, 80.0)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, info):
        # keep the tensors themselves and copies: a later step must not overwrite what we hold
        self.calls.append(
            (info, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in info.items()})
        )


OPTIONS = [
    dict(),
    dict(solver="euler"),
    dict(solver="2nd", alpha=0.5),
    dict(s_churn=20, s_tmin=0.05, s_tmax=50, noise_mode="exact"),
    dict(s_churn=20, noise_mode="fused"),
    dict(guidance_scale=2.0, guidance_rescale=0.6),
]


def _kw(opts, noise):
    kw = dict(opts)
    if "guidance_scale" in kw:
        mu = torch.linspace(-1, 1, noise[0].numel()).reshape(noise.shape[1:]).expand_as(noise).contiguous()
        kw.update(cond={"mu": mu}, uncond={"mu": torch.zeros_like(noise)})
    if kw.get("s_churn"):
        kw.update(seeds=[1, 2, 3], generator=edmfast.PerSampleGenerator([1, 2, 3], device="cpu"))
    return kw


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "heun")
@pytest.mark.parametrize("kind", ["plain", "precond"])
def test_callback_changes_nothing(kind, opts, backend):
    if backend == "triton" and (kind == "plain" or opts.get("solver")):
        pytest.skip("interpreter time: triton on a subset")
    g = GaussianDenoiser(MU, 0.5)
    den = g if kind == "plain" else edmfast.EDMPrecond(EDMNetworkOf(g))
    noise = torch.randn(3, 2, 5, 3)
    rec = Recorder()
    a = edmfast.sample(den, noise, _sigmas(), backend=backend, **_kw(opts, noise))
    b = edmfast.sample(den, noise, _sigmas(), backend=backend, callback=rec, **_kw(opts, noise))
    assert torch.equal(a, b)  # bit-identical
    assert [c[0]["i"] for c in rec.calls] == list(range(STEPS))
    for info, copy in rec.calls:
        assert set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert torch.equal(info["x"], copy["x"]) and torch.equal(info["denoised"], copy["denoised"])


def test_callback_values():
    g = GaussianDenoiser(MU, 0.5)
    pre = edmfast.EDMPrecond(EDMNetworkOf(g))
    noise = torch.randn(2, 3, 4, 4)
    sig = _sigmas()
    rec = Recorder()
    edmfast.sample(pre, noise, sig, backend="cpu", callback=rec)
    for i, (info, _) in enumerate(rec.calls):
        assert float(info["sigma"]) == float(sig[i]) == float(info["sigma_hat"])  # no churn
        assert info["x"].dtype == torch.float32 and info["x"].shape == noise.shape
        d = g(info["x"].double(), float(info["sigma_hat"]))
        assert rel_err(info["denoised"], d) < 1e-6
    assert rel_err(rec.calls[0][0]["x"], noise * 80.0) < 1e-7


def test_callback_churn_and_guidance_values():
    g = GaussianDenoiser(0.0, 0.5)
    noise = torch.randn(3, 2, 4, 4)
    kw = _kw(dict(s_churn=20, s_tmin=0.05, s_tmax=50, guidance_scale=2.0, guidance_rescale=0.6), noise)
    rec = Recorder()
    edmfast.sample(g, noise, _sigmas(), backend="torch", callback=rec, **kw)
    churned = [c for c, _ in rec.calls if float(c["sigma_hat"]) > float(c["sigma"])]
    assert churned  # the window covers some steps
    for info, _ in rec.calls:
        x, sh = info["x"].double(), float(info["sigma_hat"])
        d_c, d_u = g(x, sh, mu=kw["cond"]["mu"].double()), g(x, sh, mu=kw["uncond"]["mu"].double())
        assert rel_err(info["denoised"], reference.cfg_rescale(d_c, d_u, 2.0, 0.6)) < 1e-6


@pytest.mark.parametrize("which", ["edmfast.k_diffusion", "k_diffusion"])
def test_callback_matches_k_diffusion(which):
    """The same callbacks as k-diffusion's sample_heun: edmfast's port, and k-diffusion's own
    sampling.py (loaded by path: the package's __init__ needs torchvision)."""
    if which == "k_diffusion":
        sampling = load_k_diffusion_sampling()
        if sampling is None:
            pytest.skip("k-diffusion's sampling.py does not load (pip install --no-deps k-diffusion)")
    else:
        from edmfast import k_diffusion as sampling
    g = GaussianDenoiser(MU, 0.5)
    noise = torch.randn(2, 3, 4, 4)
    sig = _sigmas().float()
    ours, theirs = Recorder(), Recorder()
    edmfast.sample(g, noise, sig, backend="cpu", callback=ours)
    sampling.sample_heun(lambda x, s: g(x, s).float(), noise * sig[0], sig, callback=theirs, disable=True)
    assert len(ours.calls) == len(theirs.calls) == STEPS
    for (a, _), (b, _) in zip(ours.calls, theirs.calls, strict=True):
        assert a["i"] == b["i"]
        assert float(a["sigma"]) == pytest.approx(float(b["sigma"]), rel=1e-6)
        assert float(a["sigma_hat"]) == pytest.approx(float(b["sigma_hat"]), rel=1e-6)
        assert rel_err(a["x"], b["x"]) < 2e-5 and rel_err(a["denoised"], b["denoised"]) < 2e-5


def test_sampler_callback_and_ablation():
    g = GaussianDenoiser(MU, 0.5)
    noise = torch.randn(2, 3, 4, 4)
    s = Sampler(g, num_steps=STEPS, backend="cpu")
    rec = Recorder()
    assert torch.equal(s(noise, callback=rec), s(noise))
    assert len(rec.calls) == STEPS
    kw = dict(num_steps=STEPS, discretization="vp", schedule="vp", scaling="vp", backend="cpu")
    rec = Recorder()
    a = ablation_sample(g, noise, callback=rec, **kw)
    assert torch.equal(a, ablation_sample(g, noise, **kw))
    for info, _ in rec.calls:
        sh = float(info["sigma_hat"])
        # the state is scaled by s = 1 / sqrt(1 + sigma^2); denoised is D(x / s; sigma_hat)
        d = g(info["x"].double() * (1 + sh**2) ** 0.5, sh)
        assert rel_err(info["denoised"], d) < 1e-6
    with pytest.raises(TypeError, match="callback"):
        s(noise, callback=3)


@gpu
def test_callback_forces_the_eager_loop_on_cuda():
    g = GaussianDenoiser(MU, 0.5).cuda()
    noise = torch.randn(2, 3, 8, 8, device="cuda")
    s = Sampler(g, num_steps=STEPS, cuda_graph=True)
    ref = s(noise)
    assert s.stats["captures"] == 1
    rec = Recorder()
    out = s(noise, callback=rec)
    assert s.stats["captures"] == 1 and s.stats["replays"] == 1  # no replay for the callback call
    assert len(rec.calls) == STEPS
    assert rel_err(out, ref) < 1e-6 if HAS_CUDA else True
