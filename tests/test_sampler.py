"""The engine (fused passes, every backend) against the float64 reference sampler."""

import pytest
import torch

import edmfast
from edmfast import reference
from edmfast.analytic import EDMNetworkOf, GaussianDenoiser, GaussianMixtureDenoiser
from tests.conftest import rel_err

# fp32 state over a whole run: the budget is 2e-5 relative error
RUN_TOL = 2e-5

OPTIONS = [
    dict(),
    dict(solver="euler"),
    dict(solver="2nd", alpha=0.5),
    dict(s_churn=40, s_tmin=0.05, s_tmax=50, s_noise=1.003, noise_mode="fused"),
    dict(s_churn=10, noise_mode="exact"),
    # exact noise with a window: steps outside it still draw (the official stream positions)
    dict(s_churn=40, s_tmin=0.05, s_tmax=10, noise_mode="exact"),
    dict(guidance_scale=3.0, guidance_rescale=0.7),
]


def _denoisers():
    g = GaussianDenoiser(0.0, 0.5)
    gen = torch.Generator().manual_seed(5)
    mix = GaussianMixtureDenoiser(torch.randn(4, 3, 5, 7, generator=gen, dtype=torch.float64) * 0.5, s=0.1)
    return {"plain": g, "precond": edmfast.EDMPrecond(EDMNetworkOf(g)), "mixture": mix}


def _call(fn, den, noise, opts, seeds):
    kw = dict(opts)
    if "guidance_scale" in kw:
        if isinstance(den, GaussianMixtureDenoiser):
            pytest.skip("the mixture denoiser takes no conditioning")
        mu = (
            torch.linspace(-1, 1, noise[0].numel()).reshape(noise.shape[1:]).expand_as(noise).to(noise.device)
        )
        kw.update(cond={"mu": mu.contiguous()}, uncond={"mu": torch.zeros_like(noise)})
    rng = edmfast.PerSampleGenerator(seeds.tolist(), device="cpu")
    return fn(den, noise, generator=rng, seeds=seeds, **kw)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "heun")
@pytest.mark.parametrize("kind", ["plain", "precond", "mixture"])
def test_engine_matches_reference(backend_device, kind, opts):
    backend, device = backend_device
    if backend == "triton" and device.type == "cpu" and kind != "precond":
        pytest.skip("interpreter time: triton runs the preconditioned path only on CPU")
    den = _denoisers()[kind].to(device)
    noise = torch.randn(3, 3, 5, 7, device=device)
    seeds = torch.tensor([3, 1 << 33, 17], device=device)
    out = _call(edmfast.sample, den, noise, dict(opts, num_steps=12, backend=backend), seeds)
    ref = _call(reference.sample, den, noise.double(), dict(opts, num_steps=12), seeds)
    assert out.dtype == noise.dtype and out.shape == noise.shape
    assert rel_err(out, ref) < RUN_TOL


def test_sampler_is_reusable_and_deterministic(backend_device):
    backend, device = backend_device
    den = _denoisers()["precond"].to(device)
    s = edmfast.Sampler(den, num_steps=6, backend=backend, s_churn=20, noise_mode="fused")
    a, b = torch.randn(2, 2, 4, 4, device=device), torch.randn(2, 2, 4, 4, device=device)
    seeds = torch.tensor([1, 2], device=device)
    ra, rb, ra2 = s(a, seeds=seeds), s(b, seeds=seeds), s(a, seeds=seeds)
    assert torch.equal(ra, ra2) and not torch.equal(ra, rb)
    assert torch.equal(
        ra, edmfast.sample(den, a, num_steps=6, backend=backend, s_churn=20, noise_mode="fused", seeds=seeds)
    )
    # seeds drive the fused noise per sample: swapping seeds swaps the churn
    rs = s(a, seeds=torch.tensor([2, 1], device=device))
    assert not torch.equal(rs, ra)


def test_cfg_is_one_batched_call_per_evaluation():
    calls = []

    def den(x, sigma, mu):
        calls.append((x.shape[0], sigma.shape[0], mu.shape[0]))
        return GaussianDenoiser(0.0, 0.5)(x, sigma, mu=mu)

    noise = torch.randn(3, 2, 4, 4)
    mu = torch.ones_like(noise)
    edmfast.sample(
        den, noise, num_steps=5, guidance_scale=2.0, cond={"mu": mu}, uncond={"mu": 0 * mu}, backend="torch"
    )
    assert calls == [(6, 6, 6)] * 9


def test_nan_from_the_denoiser_names_the_step():
    def den(x, sigma):
        # NaN from the 4th evaluation on: step 1's correction (evaluations 0,1 = step 0; 2,3 = step 1)
        den.n += 1
        return x * float("nan") if den.n >= 4 else x * 0.5

    den.n = 0
    with pytest.raises(FloatingPointError, match="step 1"):
        edmfast.sample(den, torch.randn(2, 3, 4, 4), num_steps=5, backend="torch")


def test_wrong_shape_from_the_denoiser():
    with pytest.raises(ValueError, match="denoiser returned shape"):
        edmfast.sample(lambda x, s: x[:, :1], torch.randn(2, 3, 4, 4), num_steps=3, backend="torch")


def test_progress_bar_does_not_change_results(capsys):
    den = _denoisers()["precond"]
    noise = torch.randn(2, 3, 4, 4)
    a = edmfast.sample(den, noise, num_steps=5, backend="torch")
    b = edmfast.sample(den, noise, num_steps=5, backend="torch", progress=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "churn", [{}, dict(s_churn=20, noise_mode="exact"), dict(s_churn=20, noise_mode="fused")]
)
def test_zero_snr_engine_matches_reference(backend_device, churn):
    """The inf-start limit step, with churn after it: the engine's exact noise stream draws on the
    inf step too, so the reference must (step i's noise is draw i whatever the schedule)."""
    backend, device = backend_device
    from tests.test_precond import ExactVPModel

    betas = edmfast.rescale_zero_terminal_snr(
        torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    )
    abar = torch.cumprod(1 - betas, 0)
    den = edmfast.DiscreteVPDenoiser(ExactVPModel(abar.to(device), "v_prediction"), abar, "v_prediction").to(
        device
    )
    sig = den.sigmas_for(edmfast.discrete_timesteps(10, 1000, "trailing"))
    noise = torch.randn(2, 4, 8, 8, device=device)
    seeds = torch.tensor([4, 9], device=device)
    kw = dict(solver="euler", seeds=seeds, **churn)
    gen = [torch.Generator(device).manual_seed(7) for _ in range(2)]
    out = edmfast.sample(den, noise, sig, backend=backend, generator=gen[0], **kw)
    ref = reference.sample(den, noise.double(), sig, generator=gen[1], **kw)
    assert torch.isfinite(out).all() and rel_err(out, ref) < RUN_TOL


def test_half_precision_network_input():
    """A float16 preconditioner gets float16 inputs; the state stays float32."""
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x, c_noise):
            seen.append(x.dtype)
            return (x.float() * 0.1).half()

    den = edmfast.EDMPrecond(Net(), dtype=torch.float16)
    noise = torch.randn(2, 3, 4, 4)
    out = edmfast.sample(den, noise, num_steps=4, backend="torch")
    ref = reference.sample(den, noise.double(), num_steps=4)
    assert set(seen) == {torch.float16} and rel_err(out, ref) < 2e-3


def test_signatures_show_every_option_with_its_default():
    import inspect

    for fn in (edmfast.sample, reference.sample, edmfast.Sampler):
        params = inspect.signature(fn).parameters
        assert params["num_steps"].default == 18 and params["rho"].default == 7.0
        assert params["noise_mode"].default == "exact" and params["cuda_graph"].default == "auto"
        assert "options" not in params
