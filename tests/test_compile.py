"""compile=True: the network (F inside a preconditioner) runs through torch.compile."""

import pytest
import torch

import edmfast


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, c_noise):
        return self.conv(x) * 0.1 + c_noise.reshape(-1, 1, 1, 1) * 0.01


def test_compiled_network_gives_the_eager_result_and_reports_compile_time():
    torch.manual_seed(0)
    den = edmfast.EDMPrecond(Net())
    noise = torch.randn(2, 3, 8, 8)
    s = edmfast.Sampler(den, num_steps=4, compile=True, backend="torch")
    out = s(noise)
    first = s.stats["compile_s"]
    assert first > 0
    again = s(noise)
    assert s.stats["compile_s"] == first  # compiled once, cached on the Sampler
    eager = edmfast.sample(den, noise, num_steps=4, backend="torch")
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(out, again)


def test_compile_failure_is_an_error_not_a_silent_fallback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match="torch.compile of the denoiser failed"):
        edmfast.Sampler(edmfast.EDMPrecond(Net()), compile=True)


class LearnedVarianceNet(torch.nn.Module):
    """iDDPM-style: twice the input channels out (mean then variance); F is the first half."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 1)

    def forward(self, x, c_noise, **cond):
        return self.conv(x) * 0.1 + c_noise.reshape(-1, 1, 1, 1) * 1e-4


def _every_preconditioner():
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    return {
        "edm": lambda: edmfast.EDMPrecond(Net()),
        "vp": lambda: edmfast.VPPrecond(Net()),
        "ve": lambda: edmfast.VEPrecond(Net()),
        "iddpm-learned-variance": lambda: edmfast.iDDPMPrecond(LearnedVarianceNet()),
        "discrete-vp": lambda: edmfast.DiscreteVPDenoiser(Net(), abar, "v_prediction"),
    }


@pytest.mark.parametrize("kind", list(_every_preconditioner()))
def test_compile_goes_through_the_preconditioners_raw(kind):
    """compile=True compiles ``raw`` (the learned-variance split, the dtype cast and all), so it
    gives the eager result for every preconditioner."""
    torch.manual_seed(0)
    den = _every_preconditioner()[kind]()
    noise = torch.randn(2, 3, 4, 4)
    out = edmfast.Sampler(den, num_steps=3, compile=True, backend="cpu")(noise)
    eager = edmfast.sample(den, noise, num_steps=3, backend="cpu")
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
