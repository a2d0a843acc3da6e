"""pytest plugin for the GPU suite's ``tests`` section (``-p suite_tests``, benchmarks/ on the path).

Selects what touches the GPU: every test marked ``gpu``, plus every test of the modules whose code
paths change when CUDA is present (``EDMFAST_SUITE_TEST_MODULES``, space-separated paths relative
to the root, e.g. ``tests/test_cli.py``). So one pytest run writes one junit.

With ``EDMFAST_SUITE_PREVIOUS_JUNIT`` (a previous invocation's junit, cut short by its time limit)
every test that junit already holds a result for is deselected: a second invocation runs only the
rest, and its counts add to the first's. ``EDMFAST_SUITE_TESTS_INFO`` receives a JSON object with
``continues_previous`` and ``deselected_from_previous``.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_ids(path: str) -> set[tuple[str, str]]:
    """(classname, name) of every testcase in a junit xml; empty when it is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return set()
    return {(c.get("classname") or "", c.get("name") or "") for c in root.iter("testcase")}


def junit_id(nodeid: str) -> tuple[str, str]:
    """The (classname, name) pytest's junitxml writes for a node id: the file path dotted without .py,
    classes joined to it, the test name with its parameters."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def pytest_collection_modifyitems(config, items) -> None:
    modules = set(os.environ.get("EDMFAST_SUITE_TEST_MODULES", "").split())
    previous = os.environ.get("EDMFAST_SUITE_PREVIOUS_JUNIT")
    done = junit_ids(previous) if previous else set()
    keep, drop, from_previous = [], [], 0
    for item in items:
        wanted = item.get_closest_marker("gpu") is not None or item.nodeid.split("::")[0] in modules
        if wanted and junit_id(item.nodeid) in done:
            wanted, from_previous = False, from_previous + 1
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    info = os.environ.get("EDMFAST_SUITE_TESTS_INFO")
    if info:  # every xdist worker collects the same items: each writes the same object
        data = {"continues_previous": bool(done), "deselected_from_previous": from_previous}
        tmp = Path(f"{info}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, info)
