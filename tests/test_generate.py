"""``edmfast generate``: per-seed images, batch/process invariance, resume, refusal, kill safety.

The default model is the exact denoiser of the built-in 8-bit shapes data set, on which a correct
sampler lands exactly on training images: comparisons of PNG bytes are exact, not statistical.
Churn is on (S_churn = 10) so the per-seed churn noise streams are exercised too.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import edmfast
from edmfast import cli
from edmfast.data import ShapesDenoiser, to_uint8
from edmfast.generate import (
    ManifestMismatch,
    _machine_id,
    generate,
    image_path,
    load_model,
    parse_seeds,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLER = ["--steps", "6", "--churn", "10"]
OPTIONS = {"num_steps": 6, "s_churn": 10.0}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".png"}


def _run(outdir: Path, seeds: str, batch: int, *extra: str) -> int:
    return cli.main(
        [
            "generate",
            "--seeds",
            seeds,
            "--batch",
            str(batch),
            "--outdir",
            str(outdir),
            "--no-progress",
            *SAMPLER,
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict[str, bytes]:
    """Seeds 0-11 generated in one process with batch 5 (12 = 5 + 5 + 2: a ragged last batch)."""
    d = tmp_path_factory.mktemp("baseline")
    assert _run(d, "0-11", 5) == 0
    files = _files(d)
    assert sorted(files) == [f"{s:06d}.png" for s in range(12)]
    return files


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("7") == [7]
    assert parse_seeds("1,5,7-9") == [1, 5, 7, 8, 9]
    assert parse_seeds(f"{2**63 - 1}") == [2**63 - 1]
    for bad, why in (
        ("", "empty"),
        (" ", "empty"),
        ("a-b", "look like"),
        ("5-1", "end before start"),
        ("-3", ">= 0"),
        ("1,1", "repeat"),
        ("0-5,3-9", "repeat"),
        ("1-2-3", "look like"),
        (f"{2**63}", "int64"),
        ("0-99999999999999999999", "int64"),
        ("0-999999999999", "more than"),  # refused before expanding (this would be 8 TB of ints)
    ):
        with pytest.raises(ValueError, match=why):
            parse_seeds(bad)


def test_images_are_the_reference_samples(baseline):
    """Each PNG is edmfast.reference.sample with the official per-seed streams (latents, then churn)."""
    den = ShapesDenoiser()
    for seed in (0, 7, 11):
        rng = edmfast.PerSampleGenerator([seed])
        x = edmfast.reference.sample(den, rng.randn([1, 3, 32, 32]), generator=rng, **OPTIONS)
        expected = to_uint8(x)[0].permute(1, 2, 0).numpy()
        png = np.asarray(Image.open(io.BytesIO(baseline[f"{seed:06d}.png"])))
        assert np.array_equal(png, expected), seed


def test_batch_size_invariant(tmp_path, baseline):
    assert _run(tmp_path, "0-11", 3) == 0
    assert _files(tmp_path) == baseline
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sampler"]["s_churn"] == 10.0 and manifest["image_shape"] == [3, 32, 32]
    assert manifest["edmfast_version"] == edmfast.__version__


def test_resume_regenerates_exactly_the_missing(tmp_path, baseline):
    assert _run(tmp_path, "0-11", 4) == 0
    deleted = ["000002.png", "000003.png", "000010.png"]
    for name in deleted:
        (tmp_path / name).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    stats = generate(range(12), tmp_path, batch=4, options=OPTIONS, progress=False, log=lambda _: None)
    assert stats["generated"] == 3 and stats["skipped"] == 9
    assert _files(tmp_path) == baseline
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    assert all(after[n] == t for n, t in before.items()), "existing images must not be rewritten"


def test_changed_option_is_refused(tmp_path, capsys):
    assert _run(tmp_path, "0-1", 2) == 0
    capsys.readouterr()
    assert _run(tmp_path, "0-3", 2, "--s-noise", "1.003") == 2
    err = capsys.readouterr().err
    assert "made with --s-noise 1 (this run: --s-noise 1.003)" in err and "refusing" in err
    assert sorted(_files(tmp_path)) == ["000000.png", "000001.png"]  # nothing written
    # a bad option fails before anything is written
    assert _run(tmp_path / "new", "0", 1, "--alpha", "0.5") == 2
    assert "alpha" in capsys.readouterr().err and not (tmp_path / "new").exists()
    with pytest.raises(ManifestMismatch, match="model"):
        generate([0], tmp_path, model="tests.test_generate:tiny_model", options=OPTIONS, progress=False)
    # other seeds with the same options are fine (extend a run)
    assert _run(tmp_path, "2-3", 2) == 0
    assert len(_files(tmp_path)) == 4


def test_kill_and_resume(tmp_path):
    """SIGKILL a run mid-way, plant a half-written temporary, rerun: exactly the uninterrupted images."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # the built-in model, 20 ms slower per evaluation (the same images): the killed run has seconds
    # of work left whenever the test acts, however loaded the machine is
    slow = ("--model", "tests.test_generate_reliability:slow_model")
    assert _run(whole, "0-39", 8, *slow) == 0  # the uninterrupted run
    args = [
        "generate",
        "--seeds",
        "0-39",
        "--batch",
        "1",
        "--outdir",
        str(killed),
        "--no-progress",
        *SAMPLER,
        *slow,
    ]
    cmd = [sys.executable, "-m", "edmfast", *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(list(killed.glob("*.png"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list(killed.glob("*.png")))
    # a run that finished before the signal (a stalled test process) leaves nothing to resume: the
    # checks below still hold (every image intact, no temporaries)
    assert n_done >= 3, f"the kill came before the third image ({n_done} images)"
    # A kill during a write leaves a temporary like this one (the final name never sees a partial file).
    dead_pid = _dead_pid()
    stale = killed / f".edmfast-tmp-{_machine_id()}-{dead_pid}-0123abcd.part"
    stale.write_bytes(b"\x89PNG\r\n\x1a\n half")
    assert subprocess.run(cmd, env=_env(), capture_output=True, timeout=300).returncode == 0
    assert _files(killed) == _files(whole)
    assert sorted(p.name for p in killed.iterdir()) == sorted(
        p.name for p in whole.iterdir()
    )  # no temporaries


def _dead_pid() -> int:
    """The pid of a process that has exited (and was reaped), as a killed writer's would be."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def tiny_model():
    """A user factory (``--model tests.test_generate:tiny_model``): returns (denoiser, image_shape)."""
    return edmfast.analytic.GaussianDenoiser(mu=0.25, s=0.5), (1, 8, 6)


class _WithShape(torch.nn.Module):
    image_shape = (3, 4, 4)

    def forward(self, x, sigma):
        return torch.zeros_like(x)


def shaped_model():
    return _WithShape()


def test_user_model_and_npz(tmp_path):
    assert load_model("tests.test_generate:shaped_model")[1] == (3, 4, 4)
    with pytest.raises(ValueError, match="module:function"):
        load_model("edmfast.data")
    with pytest.raises(ValueError, match="cannot load"):
        load_model("edmfast.data:no_such_factory")
    generate(
        range(3),
        tmp_path,
        batch=2,
        model="tests.test_generate:tiny_model",
        options=OPTIONS,
        npz=True,
        progress=False,
        log=lambda _: None,
    )
    pngs = [np.asarray(Image.open(image_path(tmp_path, s))) for s in range(3)]
    assert pngs[0].shape == (8, 6) and pngs[0].dtype == np.uint8  # one channel -> greyscale PNG
    with np.load(tmp_path / "images.npz") as f:
        arr = f["arr_0"]
    assert arr.shape == (3, 8, 6, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[..., 0], np.stack(pngs))
    assert not np.array_equal(pngs[0], pngs[1])  # seeds differ


def test_torchrun_two_processes_match_single_process(tmp_path, baseline):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "edmfast",
        "generate",
        "--seeds",
        "0-11",
        "--batch",
        "4",
        "--outdir",
        str(tmp_path),
        "--no-progress",
        "--device",
        "cpu",
        *SAMPLER,
    ]
    out = subprocess.run(
        cmd, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stdout
    assert _files(tmp_path) == baseline


class _ClassGaussian(torch.nn.Module):
    """Class-conditional ideal denoiser: class c's data is N(mu_c, 0.5^2) with mu_c = -0.6 + 0.4 c."""

    label_dim = 4
    image_shape = (1, 4, 4)

    def forward(self, x, sigma, class_labels):
        mu = (class_labels.to(x.dtype) @ torch.linspace(-0.6, 0.6, 4, dtype=x.dtype)).reshape(-1, 1, 1, 1)
        return edmfast.analytic.GaussianDenoiser(0.0, 0.5)(x, sigma, mu=mu.expand_as(x))


def class_model():
    return _ClassGaussian()


def test_class_labels_are_drawn_per_seed_after_the_latents(tmp_path):
    """EDM's generate script: latents = rnd.randn(...), then labels = eye[rnd.randint(label_dim)]."""
    opts = {"num_steps": 8, "s_churn": 5.0}
    generate(
        range(5),
        tmp_path / "a",
        batch=2,
        model="tests.test_generate:class_model",
        options=opts,
        progress=False,
        log=lambda _: None,
    )
    generate(
        range(5),
        tmp_path / "b",
        batch=5,
        model="tests.test_generate:class_model",
        options=opts,
        progress=False,
        log=lambda _: None,
    )
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # per seed, whatever the batch
    for seed in range(5):
        rng = edmfast.PerSampleGenerator([seed])
        latents = rng.randn([1, 1, 4, 4])
        labels = torch.eye(4)[rng.randint(0, 4, [1])]
        ref = edmfast.reference.sample(
            class_model(), latents, generator=rng, cond={"class_labels": labels}, **opts
        )
        want = to_uint8(ref.float()).permute(0, 2, 3, 1).numpy()[0, ..., 0]
        got = np.asarray(Image.open(image_path(tmp_path / "a", seed)))
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float32 vs float64 rounding


def test_fixed_class_and_guidance(tmp_path, capsys):
    common = [
        "--seeds",
        "0-3",
        "--outdir",
        str(tmp_path / "c"),
        "--no-progress",
        "--steps",
        "6",
        "--model",
        "tests.test_generate:class_model",
    ]
    assert cli.main(["generate", *common, "--class", "3", "--guidance", "2.0"]) == 0
    means = [np.asarray(Image.open(image_path(tmp_path / "c", s))).mean() for s in range(4)]
    # class 3 has the brightest mean (mu = 0.6 -> ~204 of 255); guidance pushes further from uncond
    assert min(means) > 180
    assert cli.main(["generate", *common, "--class", "3", "--guidance", "3.0"]) == 2  # manifest differs
    assert "made with --guidance 2 (this run: --guidance 3)" in capsys.readouterr().err
    assert cli.main(["generate", *common[:-2], "--outdir", str(tmp_path / "d"), "--class", "1"]) == 2
    assert "label_dim" in capsys.readouterr().err
