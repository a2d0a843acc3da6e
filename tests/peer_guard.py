"""With EDMFAST_REQUIRE_PEERS=1 (set by .ci/run, which installs every peer), a test or a module that
skips naming a peer the tests compare against fails instead: a comparison that silently never runs
checks nothing. tests/conftest.py imports the two hooks; ``-p tests.peer_guard`` loads them alone.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# the libraries the tests compare against: import name -> the words a skip reason names them by
PEERS = {
    "k_diffusion": ("k-diffusion", "k_diffusion"),
    "diffusers": ("diffusers",),
    "transformers": ("transformers",),
    "torchsde": ("torchsde",),
}


def _importable(module: str) -> bool:
    """Whether ``module`` can be found here; k-diffusion's by its sampling.py, which the tests load
    by path (the package's __init__ needs torchvision)."""
    spec = importlib.util.find_spec(module)
    if spec is None or module != "k_diffusion":
        return spec is not None
    return any((Path(p) / "sampling.py").is_file() for p in spec.submodule_search_locations or ())


def peer_skip_failure(reason: str) -> str | None:
    """The failure message for a skip ``reason`` that names a peer, None if it names none."""
    named = [m for m, words in PEERS.items() if any(w in reason.lower() for w in words)]
    if not named:
        return None
    found = ", ".join(f"{m}: {'importable here' if _importable(m) else 'NOT importable here'}" for m in named)
    return f"EDMFAST_REQUIRE_PEERS=1 and this peer comparison skipped ({found}): {reason}"


def _require_peers(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or os.environ.get("EDMFAST_REQUIRE_PEERS") != "1":
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)
    message = peer_skip_failure(reason)
    if message is not None:
        report.outcome = "failed"
        report.longrepr = message


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _require_peers(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _require_peers(report)
    return report
