"""Every user error of the ``edmfast`` command: exit status 2 and one line naming the option.

No traceback, no usage dump: the line says which option is wrong and what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edmfast import cli

CUDA = torch.cuda.is_available()


def _main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code or 0)


def _generate(tmp: Path, *extra: str, outdir: str | None = None) -> list[str]:
    out = outdir if outdir is not None else str(tmp / "out")
    return ["generate", "--seeds", "0-1", "--steps", "2", "--outdir", out, "--no-progress", *extra]


# (arguments after the defaults, the text the line must hold)
GENERATE_CASES = {
    "device-garbage": (["--device", "gpu0"], "--device 'gpu0'"),
    "device-meta": (["--device", "meta"], "--device"),
    "device-cuda-missing": (["--device", "cuda"], "CUDA is not available"),
    "device-cuda-index": (["--device", "cuda:99"], "--device 'cuda:99'"),
    "seeds-empty": (["--seeds", ""], "--seeds"),
    "seeds-reversed": (["--seeds", "9-3"], "--seeds"),
    "seeds-negative": (["--seeds", "-3"], "--seeds"),
    "seeds-negative-range": (["--seeds", "-5-3"], "--seeds"),
    "seeds-int64": (["--seeds", "9223372036854775808"], "int64"),
    "seeds-huge-range": (["--seeds", "0-99999999999999999"], "split them"),
    "seeds-repeat": (["--seeds", "0-5,3"], "repeat"),
    "seeds-float": (["--seeds", "1.5"], "--seeds"),
    "batch-zero": (["--batch", "0"], "--batch"),
    "batch-text": (["--batch", "many"], "--batch"),
    "class-unconditional": (["--class", "1"], "--class"),
    "guidance-unconditional": (["--guidance", "3"], "--guidance"),
    "alpha-without-2nd": (["--alpha", "0.5"], "--alpha applies to --solver 2nd only"),
    "steps-zero": (["--steps", "0"], "--steps must be >= 1"),
    "model-format": (["--model", "edmfast.data"], "--model"),
    "model-missing": (["--model", "no_such_module_xyz:f"], "--model"),
    "backend-unknown": (["--backend", "fast"], "--backend"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_user_errors(case, tmp_path, capsys):
    extra, must = GENERATE_CASES[case]
    if case.startswith("device-cuda") and CUDA:
        if case == "device-cuda-missing":
            pytest.skip("CUDA is available here")
    assert _main(_generate(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("edmfast generate: error:") and must in lines[0], lines[0]
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("where", ["file", "under-a-file", "empty"])
def test_outdir_that_is_not_a_folder(where, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    outdir = {"file": str(afile), "under-a-file": str(afile / "sub"), "empty": ""}[where]
    assert _main(_generate(tmp_path, outdir=outdir)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--outdir" in lines[0] and "Traceback" not in err, err
    assert afile.read_text() == "keep me"


def test_seed_range_is_checked_before_it_is_expanded(monkeypatch, tmp_path, capsys):
    """A billion seeds are refused from their count: no list is ever built."""
    monkeypatch.setattr("edmfast.generate.MAX_SEEDS", 10)
    assert _main(_generate(tmp_path, "--seeds", "0-10")) == 2
    assert "11 seeds, more than 10" in capsys.readouterr().err
    monkeypatch.undo()
    assert _main(_generate(tmp_path, "--seeds", "0-999999999")) == 2
    assert "1000000000 seeds" in capsys.readouterr().err


@pytest.mark.parametrize("zoom", ["0", "-2", "x", "65"])
def test_sample_zoom_must_be_positive(zoom, tmp_path, capsys):
    assert _main(["sample", "--out", str(tmp_path / "g.png"), "--seeds", "0", "--zoom", zoom]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--zoom" in lines[0], err
    assert not (tmp_path / "g.png").exists()


def test_sample_bad_device_is_one_line(tmp_path, capsys):
    assert _main(["sample", "--out", str(tmp_path / "g.png"), "--seeds", "0", "--device", "tpu:0"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--device 'tpu:0'" in lines[0], err


@pytest.mark.parametrize("case", ["folder", "under-a-file", "too-many-seeds", "disk-full"])
def test_sample_output_errors_are_one_line(case, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out, seeds = {
        "folder": (tmp_path, "0"),
        "under-a-file": (afile / "g.png", "0"),
        "too-many-seeds": (tmp_path / "g.png", "0-999999"),  # refused before any noise is drawn
        "disk-full": (tmp_path / "g.png", "0"),
    }[case]
    if case == "disk-full":

        def full(*_, **__):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("PIL.Image.Image.save", full)
    assert _main(["sample", "--out", str(out), "--seeds", seeds, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert ("--seeds" if case == "too-many-seeds" else "--out") in lines[0], lines[0]
    assert afile.read_text() == "keep me" and not (tmp_path / "g.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no temporary left
