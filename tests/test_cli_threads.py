"""Timings people can trust on a shared machine (issue 23 item 6): ``--threads`` for ``sample`` and
``bench``, the load average printed beside the timings, a warning when the machine is busy, and a
passive OpenMP wait policy set before torch loads (unless the user chose one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edmfast import cli

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_bench_threads_and_load_are_reported(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "edmfast", "bench", "--quick", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "1-min load average" in res.stdout and "1 thread(s)" in res.stdout
    record = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert record["threads"] == 1
    machine = record["machine"]
    assert machine["threads"] == 1 and machine["cores"] >= 1 and machine["wall_s"] > 0
    assert machine["load_avg_1min"] == pytest.approx(os.getloadavg()[0], abs=100)
    md = next(tmp_path.glob("bench-*.md")).read_text()
    assert "1-min load average" in md.splitlines()[0] and "the whole comparison took" in md


def test_sample_threads_and_load_are_reported(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        argv = [
            "sample",
            "--seeds",
            "0-3",
            "--steps",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "g.png"),
        ]
        assert cli.main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    time_line = next(line for line in out.splitlines() if line.startswith("time:"))
    assert "ms per image" in time_line and "1-min load average" in time_line and "1 thread(s)" in time_line


def test_busy_machine_warning(monkeypatch):
    monkeypatch.setattr(cli, "_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.1, 1.0, 1.0))  # one busy process on 2 cores
    info, warning = cli.machine_load(2)
    assert info == {"load_avg_1min": 1.1, "cores": 2, "threads": 2}
    assert warning is not None and "busy" in warning and "--threads 1 may be faster" in warning
    assert cli.machine_load(1)[1] is None  # one thread fits beside it
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert cli.machine_load(2)[1] is None
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    assert "rerun on an idle machine" in cli.machine_load(1)[1]


@pytest.mark.parametrize(("user", "want"), [(None, "passive"), ("active", "active")])
def test_cli_sets_a_passive_wait_policy_unless_the_user_chose(monkeypatch, user, want):
    if user is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", user)
    seen = []
    # the command is looked up when main builds its parser: record the environment it runs with
    monkeypatch.setattr(cli, "cmd_info", lambda args: seen.append(os.environ.get("OMP_WAIT_POLICY")) or 0)
    assert cli.main(["info"]) == 0
    assert seen == [want]


def test_wait_policy_is_in_place_before_torch_loads(tmp_path):
    # a finder that only watches: it records the variable when torch is first looked up
    code = (
        "import os, sys\n"
        "seen = []\n"
        "class Watch:\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name == 'torch' and not seen:\n"
        "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch)\n"
        "import edmfast.cli as cli\n"
        "assert not seen and 'OMP_WAIT_POLICY' not in os.environ\n"
        "rc = cli.main(['info'])\n"
        "print('TORCH SAW', seen)\n"
        "sys.exit(rc)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert "TORCH SAW ['passive']" in res.stdout
