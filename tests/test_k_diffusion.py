"""edmfast.k_diffusion against the real k-diffusion ``sample_euler`` / ``sample_heun``.

k-diffusion's package ``__init__`` imports torchvision, kornia, wandb...; its ``sampling.py``
needs only ``utils.append_dims`` from the package (plus scipy, torchdiffeq, torchsde, tqdm at
import time). We load ``sampling.py`` from the installed distribution under a synthetic package
whose ``utils`` holds that one function, copied verbatim, so the code under test is k-diffusion's
own. Install: ``pip install --no-deps k-diffusion torchsde torchdiffeq trampoline``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from edmfast import k_diffusion as kd
from edmfast.analytic import GaussianMixtureDenoiser
from edmfast.schedules import karras_sigmas


def _load_k_diffusion_sampling() -> types.ModuleType:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "k-diffusion is not installed (pip install --no-deps k-diffusion torchsde torchdiffeq trampoline)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    pkg = types.ModuleType("_kd_ref")
    pkg.__path__ = []  # a package, so "from . import utils" resolves against it

    utils = types.ModuleType("_kd_ref.utils")

    def append_dims(x, target_dims):  # k_diffusion/utils.py, verbatim
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules.setdefault("_kd_ref", pkg)
    sys.modules.setdefault("_kd_ref.utils", utils)
    try:
        mod_spec = importlib.util.spec_from_file_location("_kd_ref.sampling", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except ImportError as e:
        pytest.skip(f"k-diffusion's sampling.py does not import here: {e}")
    return module


@pytest.fixture(scope="module")
def ref():
    return _load_k_diffusion_sampling()


def _mixture(shape, k=5, seed=0):
    """A curved-path denoiser (Gaussian mixture, s = 0.2) with a known closed form."""
    g = torch.Generator().manual_seed(seed)
    return GaussianMixtureDenoiser(torch.randn((k, *shape), generator=g, dtype=torch.float64) * 0.5, s=0.2)


class _Recorder:
    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, info):
        self.calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in info.items()})


class _Model:
    """Wraps a denoiser to record sigma arguments and to check the kwargs arrive (extra_args)."""

    def __init__(self, denoiser):
        self.denoiser, self.sigmas = denoiser, []

    def __call__(self, x, sigma, *, scale):
        assert sigma.shape == (x.shape[0],)
        self.sigmas.append(sigma.detach().double().clone())
        return self.denoiser(x, sigma) * scale


def _compare(ref, name, shape, sigmas, dtype=torch.float32, **churn):
    denoiser = _mixture(shape[1:])
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype) * sigmas[0].to(dtype)
    out, rec, model = {}, {}, {}
    for side, fn in (("ref", getattr(ref, name)), ("ours", getattr(kd, name))):
        model[side], rec[side] = _Model(denoiser), _Recorder()
        torch.manual_seed(1234)  # churn noise comes from the global RNG on both sides
        out[side] = fn(
            model[side],
            x0.clone(),
            sigmas,
            extra_args={"scale": 1.0},
            callback=rec[side],
            disable=True,
            **churn,
        )
        out[side + "_rng"] = torch.randn(4)  # the global RNG must end in the same state too
    return out, rec, model


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun"])
@pytest.mark.parametrize(
    "churn",
    [
        {},
        {"s_churn": 40.0},  # gamma > 0 on every step
        {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003},  # official ImageNet settings
    ],
    ids=["ode", "churn", "churn-window"],
)
def test_matches_k_diffusion(ref, name, churn):
    shape = (3, 3, 7, 5)  # odd sizes on purpose
    sigmas = ref.get_sigmas_karras(12, 0.002, 80.0)  # k-diffusion's own float32 schedule
    out, rec, model = _compare(ref, name, shape, sigmas, **churn)
    assert out["ours"].dtype == out["ref"].dtype == torch.float32
    assert _rel(out["ours"], out["ref"]) < 2e-5
    assert torch.equal(out["ours_rng"], out["ref_rng"]), "global RNG consumed differently"
    # the same model calls (count and sigma arguments) and the same callbacks
    assert len(model["ours"].sigmas) == len(model["ref"].sigmas)
    for a, b in zip(model["ours"].sigmas, model["ref"].sigmas, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert len(rec["ours"].calls) == len(rec["ref"].calls) == len(sigmas) - 1
    for a, b in zip(rec["ours"].calls, rec["ref"].calls, strict=True):
        assert a.keys() == b.keys() == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"]
        torch.testing.assert_close(a["sigma"], b["sigma"], rtol=0, atol=0)
        torch.testing.assert_close(a["sigma_hat"], b["sigma_hat"], rtol=1e-6, atol=0)
        assert _rel(a["x"], b["x"]) < 2e-5
        assert _rel(a["denoised"], b["denoised"]) < 2e-5


def test_churn_changes_the_result(ref):
    """Guards the comparison above: churn must actually act (else 'churn' == 'ode' trivially)."""
    sigmas = ref.get_sigmas_karras(8, 0.002, 80.0)
    ode, _, _ = _compare(ref, "sample_heun", (2, 3, 4, 4), sigmas)
    sde, _, _ = _compare(ref, "sample_heun", (2, 3, 4, 4), sigmas, s_churn=40.0)
    assert _rel(sde["ours"], ode["ours"]) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtype_follows_x(ref, dtype):
    """edmfast's float64 schedule: k-diffusion promotes its state (and its noise draws) to float64
    after the first step; ours keeps x's dtype but must draw the same noise."""
    sigmas = karras_sigmas(8)
    out, _, _ = _compare(ref, "sample_heun", (2, 3, 4, 4), sigmas, dtype=dtype, s_churn=10.0)
    assert out["ours"].dtype == dtype
    assert torch.equal(out["ours_rng"], out["ref_rng"])
    # Our model inputs are in x's dtype while k-diffusion's are float64 after step 0, so low
    # precision differs by the rounding of ~17 model inputs (fp16: 11 bits, bf16: 8 bits).
    tol = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 2e-5}[dtype]
    assert _rel(out["ours"], out["ref"]) < tol


def test_ideal_denoiser_converges_to_data():
    """Heun on the exact denoiser of two points lands on one of them (end-to-end sanity)."""
    means = torch.tensor([[1.0, -1.0, 0.5], [-0.5, 0.25, -1.0]], dtype=torch.float64)
    denoiser = GaussianMixtureDenoiser(means, s=0.0)
    sigmas = karras_sigmas(32)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    out = kd.sample_heun(lambda x, s: denoiser(x, s), x, sigmas, disable=True)
    nearest = torch.cdist(out.double(), means).min(dim=1).values
    assert nearest.max() < 1e-3


def test_bad_input():
    with pytest.raises(ValueError, match="sigmas"):
        kd.sample_euler(lambda x, s: x, torch.zeros(1, 2), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="s_churn"):
        kd.sample_heun(lambda x, s: x, torch.zeros(1, 2), karras_sigmas(3), s_churn=-1.0)
    with pytest.raises(ValueError, match="shape"):
        kd.sample_heun(lambda x, s: x[:, :1], torch.zeros(1, 2), karras_sigmas(3))
