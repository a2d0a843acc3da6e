"""A newcomer's first commands: help without torch, bench output, generate's plan, file types and modes."""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edmfast import cli, native

ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> set[str]:
    return (
        {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()
    )


# ----------------------------------------------------------------------------- --help


_NO_TORCH_HELP = """
import importlib.util, sys, types
# edmfast/cli.py on its own (a bare package object: edmfast/__init__ is not run), then --help
pkg = types.ModuleType("edmfast")
pkg.__path__ = [sys.argv[1]]
sys.modules["edmfast"] = pkg
spec = importlib.util.spec_from_file_location("edmfast.cli", sys.argv[1] + "/cli.py")
cli = importlib.util.module_from_spec(spec)
sys.modules["edmfast.cli"] = cli
spec.loader.exec_module(cli)
for argv in (["--help"], ["sample", "--help"], ["generate", "--help"], ["bench", "--help"]):
    try:
        cli.main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = sorted(m for m in ("torch", "numpy", "PIL") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
"""


def test_cli_help_imports_no_torch():
    """cli.py imports torch only inside the commands: --help costs no torch start-up."""
    out = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_HELP, str(ROOT / "edmfast")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stderr, out.stderr
    assert "generate" in out.stdout and "--network" in out.stdout


_INIT_IS_LAZY = "def __getattr__" in (ROOT / "edmfast" / "__init__.py").read_text()


@pytest.mark.xfail(not _INIT_IS_LAZY, reason="edmfast/__init__.py imports torch eagerly", strict=True)
def test_python_m_help_imports_no_torch():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['edmfast', '--help']\n"
        "try:\n"
        "    runpy.run_module('edmfast', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "TORCH False" in out.stderr, out.stderr


# ----------------------------------------------------------------------------- bench


def test_bench_writes_into_the_user_cache_not_the_tree(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tree = _files(ROOT / "benchmarks")
    assert cli.main(["bench", "--quick", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert _files(ROOT / "benchmarks") == tree
    out = tmp_path / "cache" / "edmfast" / "bench"
    written = sorted(p.suffix for p in out.iterdir())
    assert written == [".json", ".md", ".png"], written
    assert str(out) in text
    # a clear table: every method with a time, a speedup and (deterministic run) its error
    assert "| edmfast.sample |" in text and "1.00x" in text
    assert re.search(r"\| k-diffusion sample_heun \| [\d.]+ \| [\d.]+ \| [\d.]+x \| \d\.\de-\d\d \|", text)
    data = json.loads(next(out.glob("*.json")).read_text())
    assert data["device"] == "cpu" and data["shape"] == [4, 3, 16, 16]
    assert [c["config"] for c in data["configs"]] == ["deterministic", "churn"]
    # edmfast agrees with the float64 oracle; speedups are ratios of the measured times
    row = data["configs"][0]["rows"][0]
    assert row["rel_err"] < 1e-5
    for r in data["configs"][1]["rows"]:
        assert r["edmfast_speedup"] == pytest.approx(r["s"] / data["configs"][1]["rows"][0]["s"])


def test_bench_without_k_diffusion_is_a_skip_not_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_k_diffusion_sampling", lambda: None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # and no matplotlib: no chart, said so
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "k-diffusion sample_heun: skipped: install k-diffusion to compare" in text
    assert "chart skipped: install matplotlib" in text
    assert "Error" not in text and "k-diffusion sample_heun |" not in text
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]


def test_bench_honours_device(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--out", str(tmp_path), "--device", "meta"]) == 2
    assert "--device 'meta'" in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_bench_default_dir_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.bench_dir(None) == tmp_path / ".cache" / "edmfast" / "bench"
    assert cli.bench_dir("x/y") == Path("x/y")


# ----------------------------------------------------------------------------- generate


def test_generate_without_seeds_is_small_and_plans_first(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["generate", "--outdir", str(out), "--steps", "2", "--batch", "16", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == [f"{s:06d}.png" for s in range(64)]
    plan = text.index("plan: seeds 0-63 (64 images)")
    assert "4 batch(es) of up to 16" in text
    assert text.index("--seeds not given") < plan < text.index("estimated time for the other 3 batch(es)")
    assert plan < text.index("rank 0 generated 64 image(s)")


def test_plan_text_names_seeds_batches_and_work():
    from edmfast import Sampler
    from edmfast.data import ShapesDenoiser
    from edmfast.generate import plan_text, seeds_text

    assert seeds_text([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert seeds_text([1, 3, 5, 7, 9]) == "1,3,5,... (5 ranges)"
    text = plan_text(
        [4], 1, 1, 0, 64, Sampler(ShapesDenoiser(), num_steps=1, solver="euler"), "cpu", Path("o")
    )
    assert "seeds 4 (1 image)" in text and "1 batch(es)" in text and "1 step (1 network evaluations" in text


# ----------------------------------------------------------------------------- output files


def test_output_files_get_normal_permissions(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert (
            cli.main(
                ["generate", "--seeds", "0-1", "--outdir", str(out), "--steps", "2", "--npz", "--no-progress"]
            )
            == 0
        )
        grid = tmp_path / "grid.png"
        assert cli.main(["sample", "--seeds", "0-3", "--steps", "2", "--out", str(grid)]) == 0
    finally:
        os.umask(old)
    for path in [*out.iterdir(), grid]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, (path.name, oct(path.stat().st_mode))


@pytest.mark.parametrize("name", ["grid.jpg", "GRID.JPEG"])
def test_sample_writes_jpeg_by_suffix(tmp_path, capsys, name):
    out = tmp_path / name
    assert cli.main(["sample", "--seeds", "0-3", "--steps", "2", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.mode == "RGB"


@pytest.mark.parametrize("name", ["grid.gif", "grid"])
def test_sample_refuses_an_unknown_suffix_before_sampling(tmp_path, capsys, monkeypatch, name):
    from edmfast import generate

    monkeypatch.setattr(generate, "sample_seeds", lambda *a, **k: pytest.fail("sampled"))
    assert cli.main(["sample", "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown image type" in err and ".jpg" in err
    assert not any(tmp_path.iterdir())


def test_one_step_is_singular(tmp_path, capsys):
    assert (
        cli.main(
            [
                "sample",
                "--seeds",
                "0-1",
                "--steps",
                "1",
                "--solver",
                "euler",
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    assert "euler, 1 step (1 denoiser call)," in capsys.readouterr().out


# ----------------------------------------------------------------------------- which edmfast


def test_info_names_the_imported_package(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"imported from {ROOT / 'edmfast'}" in text
    assert "native cpu kernels: yes" in text


def test_missing_native_kernels_name_the_imported_path(tmp_path, capsys, monkeypatch):
    why = "the native extension edmfast._C is not built (test)"
    monkeypatch.setattr(native, "why_unavailable", lambda kind: why)
    assert cli.main(["info"]) == 0
    assert f"native cpu kernels: no: {why}" in capsys.readouterr().out
    assert cli.native_note() == f"note: {why}; edmfast was imported from {ROOT / 'edmfast'}"
    # edmfast.native naming the folder itself: said once
    monkeypatch.setattr(native, "why_unavailable", lambda kind: why + "; edmfast was imported from /x")
    assert cli.native_note() == f"note: {why}; edmfast was imported from /x"

    from edmfast.ops import BackendUnavailable

    def refuse(args):
        raise BackendUnavailable("backend 'cpu' is not available: not built")

    monkeypatch.setattr(cli, "cmd_info", refuse)  # build_parser (run by main) binds it
    assert cli.main(["info"]) == 2
    assert f"(edmfast imported from {ROOT / 'edmfast'})" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --network


class _UNet(nn.Module):
    """Shaped like an official UNet: (x, noise_labels, class_labels) with class_labels required."""

    def __init__(self, label_dim: int):
        super().__init__()
        self.label_dim = label_dim
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.lab = nn.Linear(label_dim, 3, bias=False) if label_dim else None

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        h = self.conv(x) + noise_labels.reshape(-1, 1, 1, 1)
        if self.lab is not None:
            assert class_labels is not None, "the official UNets require class_labels"
            h = h + self.lab(class_labels)[:, :, None, None]
        return h


class EDMPrecond(nn.Module):
    """A stand-in with the official EDMPrecond's attributes and forward (Table 1's formulas)."""

    def __init__(self, label_dim: int = 0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = 8, 3, label_dim, False
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float("inf"), 0.5
        self.model = _UNet(label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
        if self.label_dim and class_labels is None:
            class_labels = torch.zeros([1, self.label_dim])
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), class_labels)


def _pickle(tmp_path: Path, label_dim: int) -> Path:
    torch.manual_seed(0)
    path = tmp_path / f"net{label_dim}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": EDMPrecond(label_dim).eval()}, f)
    return path


@pytest.mark.parametrize("label_dim", [0, 4])
def test_generate_network_pickle(tmp_path, capsys, label_dim):
    pytest.importorskip("edmfast.edm")
    from edmfast import PerSampleGenerator, reference

    path = _pickle(tmp_path, label_dim)
    out = tmp_path / "out"
    argv = [
        "generate",
        "--network",
        str(path),
        "--seeds",
        "3-5",
        "--outdir",
        str(out),
        "--steps",
        "4",
        "--no-progress",
    ]
    assert cli.main([*argv, *(["--class", "2"] if label_dim else [])]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"].startswith(f"network:{path.name}:sha256=") and manifest["image_shape"] == [
        3,
        8,
        8,
    ]
    # the official module itself, sampled by the float64 oracle from the same seeds and labels
    with open(path, "rb") as f:
        net = pickle.load(f)["ema"]
    rng = PerSampleGenerator([3, 4, 5])
    noise = rng.randn([3, 3, 8, 8])
    cond = {"class_labels": torch.eye(label_dim)[[2, 2, 2]]} if label_dim else None
    ref = reference.sample(net, noise.double(), num_steps=4, cond=cond)
    want = (ref * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, seed in enumerate([3, 4, 5]):
        got = np.asarray(Image.open(out / f"{seed:06d}.png"))
        assert np.abs(got.astype(int) - want[i].astype(int)).max() <= 1


def test_generate_network_needs_the_official_code(tmp_path, capsys):
    pytest.importorskip("edmfast.edm")
    path = tmp_path / "official.pkl"
    path.write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x06dnnlib\x8c\x08EasyDict\x93)\x81.")
    argv = ["generate", "--network", str(path), "--seeds", "0", "--outdir", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dnnlib" in err and "NVlabs/edm" in err
    assert (
        cli.main(["generate", "--network", str(tmp_path / "none.pkl"), "--outdir", str(tmp_path / "o")]) == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert (
        cli.main(["generate", "--network", str(path), "--model", "x:y", "--outdir", str(tmp_path / "o")]) == 2
    )
    assert "not both" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the quality line


@pytest.mark.parametrize(
    ("steps", "verdict"),
    [
        ("1", "blurred or blended"),
        ("2", "sharp but low variety"),
        ("3", "sharp but low variety"),
        ("8", "exact"),
    ],
)
def test_quality_line_sees_few_steps(tmp_path, capsys, steps, verdict):
    """2-3 steps land on training images but on too few of them: the verdict must say so."""
    assert cli.main(["sample", "--steps", steps, "--out", str(tmp_path / "g.png")]) == 0
    assert f"verdict: {verdict}" in capsys.readouterr().out


def test_quality_verdict_thresholds():
    assert cli.quality_verdict(1.0, 28, 64, 32).startswith("exact")
    assert cli.quality_verdict(1.0, 24, 64, 32).startswith("exact")  # within 3 std (1.6) of 28
    assert cli.quality_verdict(1.0, 23, 64, 32).startswith("sharp but low variety")
    assert cli.quality_verdict(0.5, 28, 64, 32).startswith("blurred")
    assert cli.quality_verdict(1.0, 1, 1, 32).startswith("exact")


def test_bench_sampler_without_k_diffusion_skips_it(tmp_path, monkeypatch, capsys):
    """benchmarks/bench_sampler.py: a missing optional peer is a skipped row, not an "## Errors" entry."""
    bench = ROOT / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    import bench_sampler
    import peers

    def missing():
        raise ImportError("k-diffusion is not installed")

    monkeypatch.setattr(peers, "load_k_diffusion_sampling", missing)
    assert bench_sampler.main(["--quick", "--mode", "cpu", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert "k_diffusion_sample_heun" not in record.get("errors", {})
    assert record["skipped"]["k_diffusion_sample_heun"].startswith("install k-diffusion to compare")
    md = next(tmp_path.glob("*.md")).read_text()
    assert "## Errors" not in md and "install k-diffusion to compare" in md
