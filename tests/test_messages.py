"""Errors that speak the user's language (issue 23 item 5): a network with the wrong signature
inside a preconditioner, command-line errors that name flags, and a short "made with ..." when a
folder holds images generated with other settings (the full list with --explain)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import edmfast
from edmfast.generate import cli_words, make_manifest, manifest_summary

ROOT = Path(__file__).resolve().parent.parent


class OneArgument(nn.Module):
    def forward(self, x):
        return x


class NoCond(nn.Module):
    def forward(self, x, c_noise):
        return x


class BrokenInside(nn.Module):
    """The right signature, and a TypeError of its own: that one must pass through unchanged."""

    def forward(self, x, c_noise, **cond):
        return x + "oops"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_wrong_network_signature_names_the_expected_call(backend):
    noise = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match=r"EDMPrecond calls its network as F\(x_in, c_noise, \*\*cond\)") as e:
        edmfast.sample(edmfast.EDMPrecond(OneArgument()), noise, num_steps=2, backend=backend)
    assert "OneArgument.forward(x)" in str(e.value) and "takes 2 positional" not in str(e.value)
    with pytest.raises(TypeError, match=r"class_labels.*cond keys \['class_labels'\]"):
        cond = {"class_labels": torch.zeros(2, 3)}
        edmfast.sample(edmfast.VPPrecond(NoCond()), noise, num_steps=2, cond=cond, backend=backend)
    with pytest.raises(TypeError, match=r"F\(x_in, c_noise, \*\*cond\)"):
        edmfast.reference.sample(edmfast.EDMPrecond(OneArgument()), noise.double(), num_steps=2)
    with pytest.raises(TypeError, match="unsupported operand") as e:
        edmfast.sample(edmfast.EDMPrecond(BrokenInside()), noise, num_steps=2, backend=backend)
    assert "calls its network" not in str(e.value)


def test_discrete_vp_model_signature_is_named():
    abar = torch.linspace(0.999, 0.01, 100, dtype=torch.float64)
    den = edmfast.DiscreteVPDenoiser(OneArgument(), abar)
    with pytest.raises(
        TypeError, match=r"DiscreteVPDenoiser calls its network as model\(x_t, timestep, \*\*cond\)"
    ):
        edmfast.sample(den, torch.randn(1, 3, 4, 4), num_steps=2, sigma_max=10.0)


def test_cli_words_translates_python_options():
    assert cli_words("num_steps must be >= 1, got 0") == "--steps must be >= 1, got 0"
    assert cli_words("alpha applies to solver='2nd' only, got alpha=0.5") == (
        "--alpha applies to --solver 2nd only, got --alpha 0.5"
    )
    assert cli_words("need s_tmin <= s_tmax, got s_tmin=5.0", ["--S_min", "5"]) == (
        "need --S_min <= --s-tmax, got --S_min 5.0"
    )
    assert cli_words("clip_denoised=False with eta") == "--no-clip with eta"
    # prose and attributes stay as they are
    for text in (
        "the noise schedule must decrease",
        "net.sigma_min is 0.002",
        "--steps must be >= 1",
        "--outdir /data/num_steps/run: cannot write",
    ):
        assert cli_words(text) == text


def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "edmfast", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )


def test_cli_errors_name_flags_not_python_options(tmp_path):
    for argv, must, never in (
        (["sample", "--steps", "0"], "--steps must be >= 1", "num_steps"),
        (["sample", "--alpha", "0.5"], "--alpha applies to --solver 2nd only", "solver='2nd'"),
        (["generate", "--outdir", "o", "--S_churn", "-1"], "--S_churn must be finite", "s_churn"),
        (
            ["generate", "--outdir", "o", "--sigma_min", "5", "--sigma_max", "1"],
            "--sigma_min <= --sigma_max",
            "sigma_min",
        ),
    ):
        res = _cli(tmp_path, *argv)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert must in lines[0] and never not in lines[0].replace(must, ""), lines[0]


def test_other_settings_say_what_matters_first(tmp_path):
    out = tmp_path / "out"
    base = ["generate", "--outdir", str(out), "--seeds", "0-1", "--steps", "3", "--no-progress"]
    assert _cli(tmp_path, *base).returncode == 0
    res = _cli(tmp_path, *base, "--sampler", "ancestral")
    assert res.returncode == 2
    line = res.stderr.strip()
    assert "\n" not in line and len(line) < 500, line  # was ~1,400 characters listing 20 fields
    assert (
        "made with --sampler heun, --model edmfast.data:default_model (this run: --sampler ancestral" in line
    )
    assert "--explain lists all" in line
    # --explain adds every differing recorded setting, one per line
    res = _cli(tmp_path, *base, "--sampler", "ancestral", "--explain")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and lines[0] == line and len(lines) > 10
    assert "  sampler.kind: '<missing>' in the folder, 'ancestral' now" in lines
    res = _cli(tmp_path, *base[:-3], "--steps", "4", "--S_noise", "1.1", "--no-progress")
    assert "made with --steps 3, --s-noise 1 (this run: --steps 4, --s-noise 1.1)" in res.stderr


def test_manifest_summary_caps_the_list():
    a = make_manifest("m:f", (3, 8, 8), {"num_steps": 3})
    b = make_manifest("m:f", (3, 8, 8), {"num_steps": 4, "rho": 5, "s_churn": 1, "s_noise": 2, "s_tmin": 0.1})
    made, now = manifest_summary(a, b)
    assert made == "--steps 3, --rho 7, --churn 0, --s-tmin 0 and 1 more"
    assert now == "--steps 4, --rho 5, --churn 1, --s-tmin 0.1 and 1 more"
