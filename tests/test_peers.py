"""The CI guard on peer comparisons (tests/peer_guard.py, loaded by tests/conftest.py): with
EDMFAST_REQUIRE_PEERS=1, a test or a module that skips naming a peer (k-diffusion, diffusers,
transformers, torchsde) fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.peer_guard import PEERS, peer_skip_failure

ROOT = Path(__file__).resolve().parent.parent

CASES = """
import pytest

def test_diffusers_missing():
    pytest.skip("diffusers is not installed (pip install diffusers)")

def test_k_diffusion_missing():
    pytest.skip("k-diffusion's sampling.py does not load")

def test_no_gpu():
    pytest.skip("needs a CUDA device")

@pytest.mark.xfail(reason="transformers: an expected failure is not a skip")
def test_expected_failure():
    assert False
"""
MODULE = """
import pytest

pytest.importorskip("torchsde_is_not_a_module_of_that_name")

def test_never_runs():
    pass
"""


def _pytest(tmp_path: Path, require: str | None) -> str:
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_module.py").write_text(MODULE)
    env = {k: v for k, v in os.environ.items() if k != "EDMFAST_REQUIRE_PEERS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if require is not None:
        env["EDMFAST_REQUIRE_PEERS"] = require
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "tests.peer_guard", "-p", "no:cacheprovider"]
    out = subprocess.run(
        [*cmd, "--continue-on-collection-errors", "test_cases.py", "test_module.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out.stdout + out.stderr


def test_peer_skips_fail_when_required(tmp_path):
    text = _pytest(tmp_path, "1")
    assert "FAILED test_cases.py::test_diffusers_missing" in text
    assert "FAILED test_cases.py::test_k_diffusion_missing" in text
    assert "ERROR test_module.py" in text  # the module-level skip, at collection
    assert "SKIPPED [1] test_cases.py" in text and "needs a CUDA device" in text
    assert "XFAIL test_cases.py::test_expected_failure" in text
    assert "EDMFAST_REQUIRE_PEERS=1 and this peer comparison skipped (diffusers: " in text


def test_peer_skips_are_skips_otherwise(tmp_path):
    for require in (None, "0"):
        text = _pytest(tmp_path, require)
        assert "FAILED" not in text and "ERROR" not in text, text[-3000:]
        assert text.count("SKIPPED") == 4 and "XFAIL" in text


def test_skip_reasons_name_the_peers():
    assert peer_skip_failure("needs a CUDA device") is None
    assert peer_skip_failure("interpreter time: triton on a subset") is None
    for module, words in PEERS.items():
        for word in words:
            message = peer_skip_failure(f"{word} is not installed")
            assert message is not None and f"{module}: " in message
    two = peer_skip_failure("could not import 'transformers'; diffusers needs it")
    assert two is not None and "diffusers: " in two and "transformers: " in two
