"""``python -m edmfast`` from a clone's parent folder (issue 23 item 9).

There the clone, a folder named ``edmfast`` without ``__init__.py``, is first on sys.path, so
Python makes it an empty namespace package; an editable install's finder (setuptools puts one on
``sys.meta_path``) still supplies ``edmfast.__main__`` and ``edmfast.cli``, and every command then
died with ``ImportError: cannot import name '__version__'``. The subprocess below sets up exactly
that: the current folder holds an empty ``edmfast/``, and a finder of setuptools' shape maps the
package's modules to this checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edmfast import cli

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import runpy, sys
from importlib.machinery import PathFinder

package = sys.argv[1]
# the environment's own editable finder (if any) would map edmfast elsewhere: use this checkout's
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]


class EditableFinder:  # the shape of setuptools' editable-install finder: top level and children
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "edmfast":
            return PathFinder.find_spec(fullname, path=[package.rsplit("/", 1)[0]])
        if fullname.startswith("edmfast."):
            return PathFinder.find_spec(fullname, path=[package])
        return None


sys.meta_path.append(EditableFinder)
sys.argv = ["edmfast", *sys.argv[2:]]
runpy.run_module("edmfast", run_name="__main__", alter_sys=True)
"""


def _run(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "edmfast"), *argv],
        cwd=cwd, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_namespace_shadow_is_named_with_what_to_do(tmp_path):
    (tmp_path / "edmfast").mkdir()  # the clone: a folder named edmfast, no __init__.py at its top
    res = _run(tmp_path, "info")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"the folder {tmp_path / 'edmfast'} shadows the edmfast package" in lines[0]
    assert "Run the command from another folder" in lines[0]


def test_without_the_shadow_the_same_finder_works(tmp_path):
    res = _run(tmp_path, "info")
    assert res.returncode == 0, res.stderr
    assert f"imported from {ROOT / 'edmfast'}" in res.stdout


def test_regular_import_has_no_shadow():
    assert cli.shadow_problem() is None
