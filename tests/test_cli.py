"""The ``edmfast`` command line: help, ``sample`` (PNG grid + figures), ``bench``, bad options."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edmfast import cli
from edmfast.data import ShapesDenoiser, image_grid, nearest_rms, shapes_dataset, to_uint8

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_help_via_python_m():
    out = subprocess.run(
        [sys.executable, "-m", "edmfast", "--help"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in ("sample", "generate", "bench"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["sample", "generate", "bench"])
def test_every_option_has_help(command, capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 15, f"{command} {action.option_strings} has no real help"
        assert action.option_strings[0] in text


def test_sample_writes_grid_and_figures(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--out", str(out), "--seeds", "0-15", "--steps", "12", "--zoom", "1"]) == 0
    text = capsys.readouterr().out
    img = Image.open(out)
    img.load()
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (4 * 34 + 2, 4 * 34 + 2)
    assert re.search(r"time: [\d.]+ ms per image", text)
    # the exact denoiser of an 8-bit data set: a correct sampler lands on training images exactly
    assert "landed on a training image (RMS < 0.5 level): 16/16 (100%)" in text
    # the grid holds those samples: every tile is one of the training images
    tiles = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
    data = to_uint8(shapes_dataset()).double().flatten(1)
    for i in range(16):
        r, c = divmod(i, 4)
        tile = tiles[:, 2 + r * 34 : 2 + r * 34 + 32, 2 + c * 34 : 2 + c * 34 + 32].double().flatten()
        assert torch.cdist(tile[None], data).min() == 0


def test_sample_quality_figure_detects_a_bad_sampler(tmp_path, capsys):
    """One Euler step returns the blurred posterior mean: the figure must say so."""
    assert (
        cli.main(
            [
                "sample",
                "--out",
                str(tmp_path / "g.png"),
                "--seeds",
                "0-7",
                "--steps",
                "1",
                "--solver",
                "euler",
            ]
        )
        == 0
    )
    assert "landed on a training image (RMS < 0.5 level): 0/8 (0%)" in capsys.readouterr().out


def test_bad_option_named(tmp_path, capsys):
    rc = cli.main(["sample", "--out", str(tmp_path / "g.png"), "--seeds", "0", "--alpha", "0.5"])
    assert rc == 2
    assert "alpha" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert (
            cli.main(["sample", "--out", str(tmp_path / "g.png"), "--seeds", "0", "--backend", "cuda"]) == 2
        )
        assert "backend 'cuda' is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sample", "--seeds", "9-3"])
    assert "empty" in capsys.readouterr().err


def test_data_set_and_metric():
    images = shapes_dataset()
    assert images.shape == (32, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, shapes_dataset())  # deterministic
    # all distinct, and on the 8-bit grid (x = u8 / 127.5 - 1)
    assert torch.cdist(images.flatten(1), images.flatten(1)).add(100 * torch.eye(32)).min() > 1
    assert torch.equal(to_uint8(images).double() / 127.5 - 1, images)
    assert torch.equal(nearest_rms(images, images), torch.zeros(32, dtype=torch.float64))
    assert nearest_rms(images.mean(0, keepdim=True), images).item() > 20
    den = ShapesDenoiser()
    noisy = images[:4] + 0.01 * torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(den(noisy, torch.full((4,), 0.01)), images[:4])
    assert image_grid(to_uint8(images[:5]), columns=2).shape == (3 * 34 + 2, 2 * 34 + 2, 3)
