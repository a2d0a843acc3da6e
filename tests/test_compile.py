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
