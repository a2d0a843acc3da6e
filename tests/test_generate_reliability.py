"""``edmfast generate`` when things go wrong: shared folders, kills, damaged files, failed runs.

Properties about processes (kill -9, Ctrl-C, two jobs writing one folder) run real ``python -m
edmfast generate`` processes; the rest runs in-process. Everything is small (32x32 images of the
built-in shapes model, 6 steps) and every wait is bounded. The expected images come from one
uninterrupted in-process run: a correct run, whatever happened to it, gives the same bytes.

No test depends on winning a race against a process: the processes a test interrupts or waits
for run `slow_model` (the built-in model, slower by a fixed sleep per evaluation), so several
seconds of work remain whenever the test acts, however loaded the machine; and a process that
finished before its signal arrived passes when every image is intact.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edmfast import cli
from edmfast.data import IMAGE_SHAPE, ShapesDenoiser
from edmfast.generate import (
    MANIFEST,
    TMP_PREFIX,
    TMP_SUFFIX,
    ManifestMismatch,
    _machine_id,
    claim_manifest,
    generate,
    load_model,
    make_manifest,
    remove_stale_temporaries,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLER = ["--steps", "6", "--churn", "10"]
OPTIONS = {"num_steps": 6, "s_churn": 10.0}
N_SEEDS = 40


def _env() -> dict:
    # no empty entry: an empty PYTHONPATH item means the current folder
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


class _SlowShapes(ShapesDenoiser):
    """The built-in model (the same images), 20 ms slower per evaluation: 11 evaluations make an
    image at least 0.2 s, so a run interrupted after its k-th new image has (40 - k) * 0.2 s left."""

    def forward(self, x, sigma, **kw):
        time.sleep(0.02)
        return super().forward(x, sigma, **kw)


def slow_model():
    return _SlowShapes(), IMAGE_SHAPE


SLOW = ("--model", "tests.test_generate_reliability:slow_model")


def _cmd(outdir: Path, seeds: str, *extra: str) -> list[str]:
    args = ["--seeds", seeds, "--batch", "1", "--outdir", str(outdir), "--no-progress", *SAMPLER, *extra]
    return [sys.executable, "-m", "edmfast", "generate", *args]


def _pngs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("[0-9]*.png"))}


def _temporaries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(TMP_PREFIX)) if d.is_dir() else []


def _count(d: Path, pattern: str) -> int:
    return len(list(d.glob(pattern))) if d.is_dir() else 0


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped, as a killed writer's would be."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _run(outdir: Path, seeds: str, *extra: str) -> int:
    return cli.main(
        ["generate", "--seeds", seeds, "--outdir", str(outdir), "--no-progress", *SAMPLER, *extra]
    )


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {err!r}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict[str, bytes]:
    """Seeds 0-39 in one uninterrupted in-process run."""
    d = tmp_path_factory.mktemp("baseline")
    generate(range(N_SEEDS), d, batch=8, options=OPTIONS, progress=False, log=lambda _: None)
    files = _pngs(d)
    assert len(files) == N_SEEDS
    return files


def _subset(files: dict[str, bytes], seeds: range) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if int(k[:-4]) in seeds}


# ----------------------------------------------------------------------------- cleanup (items 2, 3)


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    me, dead, other = _machine_id(), _dead_pid(), "f" * 12
    keep = {
        f"{TMP_PREFIX}{me}-{os.getpid()}-0000bbbb{TMP_SUFFIX}": "a live job's write in flight",
        f"{TMP_PREFIX}{other}-{dead}-0000cccc{TMP_SUFFIX}": "another machine's: its pid means nothing here",
        f"{TMP_PREFIX}{me}-{dead}-0000eeee.txt": "not our suffix",
        f"{TMP_PREFIX}{me}-{dead}-0000eeee{TMP_SUFFIX}.bak": "not our suffix",
        ".tmp-abc123.png": "a user's file (and the old temporary naming)",
        ".tmp-notes.txt": "a user's file",
        "notes.part": "a user's file",
    }
    remove = [
        f"{TMP_PREFIX}{me}-{dead}-0000aaaa{TMP_SUFFIX}",  # its writer was killed
        f"{TMP_PREFIX}{other}-{dead}-0000dddd{TMP_SUFFIX}",  # two days old, whoever wrote it
    ]
    for name in [*keep, *remove]:
        (tmp_path / name).write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp_path / remove[1], (two_days_ago, two_days_ago))
    # a folder and a link with a temporary's name are not files this program wrote
    folder = tmp_path / f"{TMP_PREFIX}{me}-{dead}-0000ffff{TMP_SUFFIX}"
    folder.mkdir()
    (folder / "inside.txt").write_text("user data")
    link = tmp_path / f"{TMP_PREFIX}{me}-{dead}-00001111{TMP_SUFFIX}"
    link.symlink_to(tmp_path / ".tmp-notes.txt")

    assert remove_stale_temporaries(tmp_path) == 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*keep, folder.name, link.name])
    assert (folder / "inside.txt").read_text() == "user data"


def test_user_files_named_like_temporaries_survive_a_run(tmp_path, baseline):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-notes.txt").write_text("mine")
    (out / ".tmp-abc123.png").write_bytes(b"not an edmfast file")
    (out / ".tmp-dir").mkdir()
    (out / ".tmp-dir" / "data.txt").write_text("mine too")
    assert _run(out, "0-3") == 0
    assert _pngs(out) == _subset(baseline, range(4))
    assert (out / ".tmp-notes.txt").read_text() == "mine"
    assert (out / ".tmp-abc123.png").read_bytes() == b"not an edmfast file"
    assert (out / ".tmp-dir" / "data.txt").read_text() == "mine too"


# ----------------------------------------------------------------------------- resume integrity (item 4)


def test_damaged_images_are_generated_again_and_npz_works(tmp_path, baseline):
    generate(range(7), tmp_path, batch=4, options=OPTIONS, progress=False, log=lambda _: None)
    good = tmp_path / "000000.png"
    untouched = good.stat().st_mtime_ns
    data = {s: (tmp_path / f"{s:06d}.png").read_bytes() for s in range(7)}
    (tmp_path / "000001.png").write_bytes(data[1][: len(data[1]) // 2])  # cut in the pixel data
    (tmp_path / "000002.png").write_bytes(b"")  # an empty file
    (tmp_path / "000003.png").write_bytes(data[3][:-12])  # the end chunk lost
    Image.new("RGB", (8, 8)).save(tmp_path / "000004.png")  # a valid PNG of the wrong size
    flipped = bytearray(data[5])
    flipped[len(flipped) // 2] ^= 0xFF  # one bad byte: the chunk CRC fails
    (tmp_path / "000005.png").write_bytes(bytes(flipped))
    Image.new("L", (32, 32)).save(tmp_path / "000006.png")  # right size, wrong mode
    logged: list[str] = []
    stats = generate(
        range(7), tmp_path, batch=4, options=OPTIONS, npz=True, progress=False, log=logged.append
    )
    assert stats["repaired"] == 6 and stats["generated"] == 6 and stats["skipped"] == 1
    assert any("6 damaged image(s)" in line for line in logged)
    assert _pngs(tmp_path) == _subset(baseline, range(7))
    assert good.stat().st_mtime_ns == untouched
    with np.load(tmp_path / "images.npz") as f:
        arr = f["arr_0"]
    assert arr.shape == (7, 32, 32, 3)
    for s in range(7):
        assert np.array_equal(arr[s], np.asarray(Image.open(tmp_path / f"{s:06d}.png")))


# ----------------------------------------------------------------------------- manifest (items 2, 10)


def nan_model():
    """A user model that returns NaN (a broken checkpoint, say)."""
    return (lambda x, sigma: torch.full_like(x, float("nan"))), (3, 32, 32)


def test_failed_first_run_does_not_block_the_corrected_run(tmp_path, capsys):
    out = tmp_path / "out"
    # the model fails in sampling: one line, and the folder is left without a manifest
    assert _run(out, "0-3", "--model", "tests.test_generate_reliability:nan_model") == 2
    line = _one_line(capsys.readouterr().err)
    assert "NaN" in line and "--model" in line
    assert not (out / MANIFEST).exists()
    # a bad option found up front
    assert _run(out, "0-3", "--guidance", "2") == 2
    assert "--guidance" in _one_line(capsys.readouterr().err)
    # the corrected command runs
    assert _run(out, "0-3") == 0
    assert json.loads((out / MANIFEST).read_text())["model"] == "edmfast.data:default_model"


def test_images_without_a_manifest_are_refused(tmp_path, capsys):
    assert _run(tmp_path, "0-3") == 0
    before = _pngs(tmp_path)
    (tmp_path / MANIFEST).unlink()
    capsys.readouterr()
    for extra in (["--s-noise", "1.003"], []):  # the settings of those images are unknown
        assert _run(tmp_path, "0-7", *extra) == 2
        line = _one_line(capsys.readouterr().err)
        assert "no manifest.json" in line and "--outdir" in line
    assert _pngs(tmp_path) == before and not (tmp_path / MANIFEST).exists()


def test_different_settings_on_an_imageless_folder_say_how_to_start_afresh(tmp_path, capsys):
    manifest = make_manifest("edmfast.data:default_model", (3, 32, 32), OPTIONS)
    tmp_path.mkdir(exist_ok=True)
    assert claim_manifest(tmp_path, manifest)
    assert _run(tmp_path, "0", "--s-noise", "1.5") == 2
    line = _one_line(capsys.readouterr().err)
    assert (
        "made with --s-noise 1 (this run: --s-noise 1.5)" in line
        and f"deleting {MANIFEST} starts it afresh" in line
    )


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00\x01 binary",
        b"[1, 2, 3]",
        b'{"model": 5}',
        b'{"edmfast_version": "0", "model": "m", "image_shape": "3x32x32", "sampler": {}}',
        b'{"edmfast_version": "0", "model": "m", "image_shape": [3, true, 32], "sampler": {}}',
        b"[" * 100000,
        b" " * (2 << 20),
        "folder",
    ],
    ids=["json", "binary", "list", "types", "shape", "bool", "deep", "huge", "folder"],
)
def test_garbage_manifest_is_one_clear_line(tmp_path, capsys, content):
    path = tmp_path / MANIFEST
    if content == "folder":
        path.mkdir()
    else:
        path.write_bytes(content)
    assert _run(tmp_path, "0-1") == 2
    line = _one_line(capsys.readouterr().err)
    assert str(path) in line and "move it away or pick a new --outdir" in line
    assert not _pngs(tmp_path)


def test_manifest_claim_is_atomic(tmp_path, monkeypatch):
    """Many jobs claiming one folder at once: exactly one creates the manifest, all agree."""
    manifest = make_manifest("edmfast.data:default_model", (3, 32, 32), OPTIONS)
    for fallback in (False, True):
        d = tmp_path / f"fallback{fallback}"
        d.mkdir()
        if fallback:  # a file system without hard links (some network and FUSE mounts)

            def no_link(*_):
                raise OSError(errno.EPERM, "Operation not permitted")

            monkeypatch.setattr(os, "link", no_link)
        start = threading.Barrier(8)
        results: list[bool] = []

        def claim(d=d, start=start, results=results):
            start.wait()
            results.append(claim_manifest(d, manifest))

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == [False] * 7 + [True]
        assert json.loads((d / MANIFEST).read_text()) == manifest
        assert not _temporaries(d)
        with pytest.raises(ManifestMismatch, match="--s-noise 1.1"):
            claim_manifest(d, make_manifest("edmfast.data:default_model", (3, 32, 32), {"s_noise": 1.1}))


# ----------------------------------------------------------------------------- security (item 11)


def test_current_folder_is_not_importable_without_model(tmp_path):
    """A planted ``fractions.py`` (imported by PIL, numpy, ...) in the working folder never runs."""
    marker = tmp_path / "PLANTED_CODE_RAN"
    for name in ("fractions", "decimal", "tqdm", "struct", "zlib"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    # -P: like the installed `edmfast` script, python itself adds no folder to sys.path
    cmd = [sys.executable, "-P", "-m", "edmfast", "generate", "--seeds", "0-1", "--outdir", "out"]
    out = subprocess.run(
        [*cmd, "--npz", *SAMPLER], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert not marker.exists(), f"code planted in the working folder ran: {marker.read_text()}"
    assert (tmp_path / "out" / "images.npz").exists()


def test_user_model_imports_from_the_current_folder_only_for_its_import(tmp_path, monkeypatch):
    (tmp_path / "my_edmfast_model.py").write_text(
        "import torch\ndef factory():\n    return (lambda x, sigma: torch.zeros_like(x)), (1, 4, 4)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    seen: list[list[str]] = []
    real_import = __import__("importlib").import_module

    def recording_import(name, *a, **k):
        seen.append(list(sys.path))
        return real_import(name, *a, **k)

    monkeypatch.setattr("importlib.import_module", recording_import)
    assert load_model("my_edmfast_model:factory")[1] == (1, 4, 4)
    assert seen[-1][0] == str(tmp_path)  # importable during its import ...
    assert sys.path == before  # ... and only then
    load_model("edmfast.data:default_model")
    assert str(tmp_path) not in seen[-1] and sys.path == before


# ----------------------------------------------------------------------------- disk errors, Ctrl-C


def test_disk_full_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys, baseline):
    real_save = Image.Image.save
    calls = {"n": 0}
    count = threading.Lock()  # two writer threads save at once: `+= 1` then `==` is not atomic

    def save_until_full(self, fp, *args, **kwargs):
        with count:
            calls["n"] += 1
            n = calls["n"]
        if n == 3:
            fp.write(b"\x89PNG\r\n\x1a\n partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    assert _run(tmp_path, "0-5", "--batch", "2") == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--outdir {tmp_path}" in line and "No space left" in line and "rerun the same command" in line
    # the first batch and the other image of the failing one (written by another thread) are
    # complete; the failed one left neither a file nor a temporary
    written = _pngs(tmp_path)
    assert set(_subset(baseline, range(2))) <= set(written) <= set(_subset(baseline, range(4)))
    assert len(written) == 3
    assert all(baseline[k] == v for k, v in written.items()) and not _temporaries(tmp_path)
    monkeypatch.undo()
    assert _run(tmp_path, "0-5", "--batch", "2") == 0
    assert _pngs(tmp_path) == _subset(baseline, range(6))


def test_unwritable_outdir_is_one_line_before_sampling(tmp_path, monkeypatch, capsys):
    """A read-only folder (simulated: the tests may run as root, who can write anyway)."""
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr("edmfast.generate.sample_seeds", lambda *a, **k: pytest.fail("sampled anyway"))
    assert _run(out, "0-3") == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--outdir {out}" in line and "Read-only" in line and "writable" in line
    assert not list(out.iterdir())


def test_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys, baseline):
    import edmfast.generate as gen

    real = gen.sample_seeds
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "sample_seeds", interrupted)
    try:
        rc = _run(tmp_path, "0-7", "--batch", "2")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a traceback")
    assert rc == 130
    line = _one_line(capsys.readouterr().err)
    assert line == "edmfast generate: interrupted; rerun the same command to resume"
    assert len(_pngs(tmp_path)) == 4 and not _temporaries(tmp_path)
    monkeypatch.undo()
    assert _run(tmp_path, "0-7", "--batch", "2") == 0
    assert _pngs(tmp_path) == _subset(baseline, range(8))


# ----------------------------------------------------------------------------- campaigns


def _wait_for(proc: subprocess.Popen, ready, limit_s: float = 120.0) -> bool:
    """Poll until ``ready()`` or the process exits (bounded); True if it is still running."""
    deadline = time.monotonic() + limit_s
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.002)
    return proc.poll() is None


def test_kill_campaign(tmp_path, baseline):
    """kill -9 at the manifest, during a write, mid-run (twice) and Ctrl-C; then one resume.

    Whatever the moment, the finished folder holds exactly the uninterrupted run's images, no
    temporary is left and nothing was duplicated or lost. Each round waits for its own progress
    (new images since it started), so every round has most of the run left to interrupt.
    """
    out = tmp_path / "out"
    png = "[0-9]*.png"
    rounds = [
        ("kill at the manifest", lambda n0: (out / MANIFEST).exists()),
        # a write lasts about a millisecond: polling may miss it, then it is a kill mid-run
        ("kill during a write", lambda n0: bool(_temporaries(out)) or _count(out, png) >= n0 + 2),
        ("kill mid-run", lambda n0: _count(out, png) >= n0 + 3),
        ("kill mid-run", lambda n0: _count(out, png) >= n0 + 3),
        ("Ctrl-C mid-run", lambda n0: _count(out, png) >= n0 + 3),
    ]
    landed = 0
    for what, ready in rounds:
        n0 = _count(out, png)
        ctrl_c = what.startswith("Ctrl-C")
        proc = subprocess.Popen(
            _cmd(out, f"0-{N_SEEDS - 1}", *SLOW),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _wait_for(proc, lambda n0=n0, ready=ready: ready(n0))
        proc.send_signal(signal.SIGINT if ctrl_c else signal.SIGKILL)  # a no-op once it has exited
        _, err = proc.communicate(timeout=300)
        on_disk = _pngs(out)
        # every image on disk at any moment is complete and right
        assert all(baseline[k] == v for k, v in on_disk.items()), what
        if on_disk.keys() == baseline.keys() and proc.returncode in (0, 130, -signal.SIGINT):
            continue  # it finished first: nothing was left to interrupt
        if ctrl_c:
            assert proc.returncode == 130, err.decode()[-2000:]
            assert err.decode().strip().splitlines()[-1] == (
                "edmfast generate: interrupted; rerun the same command to resume"
            )
        else:
            assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        landed += 1
    # each interrupted round left >= 5 s of work; a round the run finished first still passes
    assert landed >= 3, f"only {landed} of {len(rounds)} interruptions hit a running job"
    final = subprocess.run(_cmd(out, f"0-{N_SEEDS - 1}", *SLOW), env=_env(), capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    assert _pngs(out) == baseline
    assert not _temporaries(out)
    assert json.loads((out / MANIFEST).read_text())["sampler"]["s_churn"] == 10.0


def test_concurrent_jobs_campaign(tmp_path, baseline):
    """Two jobs with disjoint seeds on one folder (two machines, one share): both finish, nothing lost.

    Trial 1 starts both at once on a fresh folder (they race to create the manifest); trial 2
    starts the second job while the first is writing (its start-up cleanup runs next to live
    temporaries), with a killed writer's temporary and user files planted, and a third job with
    other settings that must be refused without touching anything.
    """
    half = N_SEEDS // 2
    for trial in (1, 2):
        out = tmp_path / f"trial{trial}"
        out.mkdir()
        (out / ".tmp-notes.txt").write_text("user file")
        (out / ".tmp-dir").mkdir()
        stale = out / f"{TMP_PREFIX}{_machine_id()}-{_dead_pid()}-0123abcd{TMP_SUFFIX}"
        stale.write_bytes(b"half")
        # slow_model: job A has >= 3 s of work left when trial 2 sees its third image
        a = subprocess.Popen(_cmd(out, f"0-{half - 1}", *SLOW), env=_env(), stderr=subprocess.PIPE)
        if trial == 2:
            assert _wait_for(a, lambda out=out: _count(out, "[0-9]*.png") >= 3), "job A ended too early"
        b = subprocess.Popen(_cmd(out, f"{half}-{N_SEEDS - 1}", *SLOW), env=_env(), stderr=subprocess.PIPE)
        c = None
        if trial == 2:
            c = subprocess.run(
                _cmd(out, f"{N_SEEDS}-{N_SEEDS + 3}", *SLOW, "--s-noise", "1.1"),
                env=_env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
        for name, proc in (("A", a), ("B", b)):
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"trial {trial}, job {name}: {err.decode()[-2000:]}"
        if c is not None:
            assert c.returncode == 2
            assert "--s-noise" in _one_line(c.stderr)
        assert _pngs(out) == baseline, f"trial {trial}"
        assert not _temporaries(out), f"trial {trial}"
        assert (out / ".tmp-notes.txt").read_text() == "user file" and (out / ".tmp-dir").is_dir()
