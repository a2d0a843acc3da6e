"""Clear errors for inputs that used to give a bare exception or a silently wrong result (issue 22
item 10): ``ddpm_betas`` with too few linear steps, non-ASCII digits in a spacing string, seeds out
of int64, and a ``--model`` factory with a bad image_shape or label_dim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edmfast
from edmfast.schedules import ddpm_betas, respaced_timesteps, space_timesteps

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("T", [2, 10, 19, 20])
def test_ddpm_betas_linear_refuses_a_beta_of_one_or_more(T):
    # iDDPM scales 1e-4..0.02 by 1000/T: the last beta is 20/T, >= 1 for T <= 20
    with pytest.raises(ValueError, match=rf"ddpm_betas\(num_train_timesteps={T}, 'linear'\).*T >= 21"):
        ddpm_betas(T, "linear")


@pytest.mark.parametrize("T", [1, 21, 49, 50, 1000])
def test_ddpm_betas_linear_keeps_the_iddpm_rule_where_valid(T):
    b = ddpm_betas(T, "linear")
    scale = 1000 / T
    assert b.dtype == torch.float64 and b.numel() == T
    assert float(b[0]) == pytest.approx(scale * 1e-4) and float(b.max()) < 1
    if T > 1:
        assert float(b[-1]) == pytest.approx(scale * 0.02)
    assert ddpm_betas(T, "cosine").max() <= 0.999


@pytest.mark.parametrize("spacing", ["ddim٣", "ddim３", "ddim²", "١٠,١٠", "10,٢٠", "ddim 5x", "10,,5"])
def test_spacing_takes_ascii_digits_only(spacing):
    with pytest.raises(ValueError, match="ASCII digits"):
        space_timesteps(1000, spacing)
    with pytest.raises(ValueError, match="ASCII digits"):
        respaced_timesteps(50, 1000, spacing)


def test_spacing_ascii_forms_still_work():
    assert space_timesteps(1000, "ddim10").tolist()[:2] == [900, 800]
    assert space_timesteps(1000, "10, 10").numel() == 20  # iDDPM's int() takes the spaces too


@pytest.mark.parametrize("seed", [2**64, 2**63, -1])
def test_per_sample_generator_names_seeds_and_the_range(seed):
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*63 - 1\]"):
        edmfast.PerSampleGenerator([0, seed])


@pytest.mark.parametrize("seed", [1.5, True, "3", None])
def test_per_sample_generator_refuses_non_integer_seeds(seed):
    with pytest.raises(TypeError, match="seeds must be integers"):
        edmfast.PerSampleGenerator([seed])


def test_per_sample_generator_takes_int64_edges_and_integer_tensors():
    rng = edmfast.PerSampleGenerator([0, 2**63 - 1, torch.tensor(5)])
    assert rng.seeds.tolist() == [0, 2**63 - 1, 5]
    assert edmfast.PerSampleGenerator(torch.arange(3)).seeds.tolist() == [0, 1, 2]


_MODELS = """
import torch

class D(torch.nn.Module):
    def forward(self, x, sigma, **cond):
        return x * 0

def shape_text():
    return D(), ("a", 8, 8)

def shape_float():
    return D(), (3.7, 8, 8)

def shape_short():
    return D(), (3, 8)

def label_negative():
    d = D()
    d.image_shape, d.label_dim = (3, 8, 8), -1
    return d

def label_float():
    d = D()
    d.image_shape, d.label_dim = (3, 8, 8), 2.5
    return d
"""


@pytest.mark.parametrize(
    ("factory", "must"),
    [
        ("shape_text", "image_shape must be (C, H, W), three integers >= 1, got ('a', 8, 8)"),
        ("shape_float", "got (3.7, 8, 8)"),
        ("shape_short", "got (3, 8)"),
        ("label_negative", "label_dim must be an integer >= 0"),
        ("label_float", "got 2.5"),
    ],
)
def test_model_factory_errors_are_one_line(tmp_path, factory, must):
    (tmp_path / "badmodels.py").write_text(_MODELS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "edmfast", "generate", "--model", f"badmodels:{factory}", "--seeds", "0-1"]
    out = subprocess.run(
        [*argv, "--steps", "2", "--outdir", str(tmp_path / "out"), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"edmfast generate: error: --model 'badmodels:{factory}'") and must in lines[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
