"""The GPU suite's record: ``$OUT/summary.json`` while it runs, ``results/<date>-<gpu>.*`` afterwards.

Three uses, none of which imports torch (the suite calls the first two after every section):

    collect_results.py suite-init --out OUT --kind gpu|rehearsal --budget S --sections "a b" [--previous D]
    collect_results.py suite-update --out OUT --section NAME --status ok|failed|... [--seconds S] ...
    collect_results.py OUT_1 [OUT_2] [--out benchmarks/results] [--date D] [--tag T]

``suite-init`` writes a summary with every section ``pending`` and records the run's identity:
kind, commit and device (the GPU's name: an H100 or an H200, whichever ran it). A previous
invocation's summary (``--previous``) is taken only when all three match; its finished sections
are then ``done-in-call-1`` and printed on stdout so the suite skips them. ``suite-update``
records one section's status and recomputes the summary from the files in OUT that this run
wrote (``ops.json``, ``sampler.json``, ``accuracy.json``, ``junit.xml``, ...), then rewrites
``summary.json`` atomically (a temporary file renamed over it), so a kill at any second leaves a
valid file holding every finished section.

Never mislabel: a number enters the summary only from a file whose ``suite_run`` is this run's id
and whose device is this run's device (CUDA for ``kind`` gpu); nothing under ``benchmarks/results/``
is ever read for it. Merging two invocations keeps every number of the first and fills only its
gaps from the second (``summary_source`` says which measured each value), and only records of one
kind, one commit and one GPU model are ever merged. Results are filed as ``<date>-<gpu>`` (``h100``,
``h200``: the recorded device's name); a rehearsal only as ``<date>-rehearsal``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
SCHEMA = "edmfast-gpu-suite/2"
KERNEL_OPS = ("heun_step", "churn", "cfg_rescale")
SPEC_MIN_NUMEL = 64 * 2**20  # the kernel goal is stated for >= 64M elements
EDMFAST_BACKENDS = ("cuda", "triton", "cpu")  # rows of bench_ops.py that are edmfast's own kernels
OFFICIAL_BATCHES = ("b1", "b64")
# The documented summary keys (benchmarks/README.md), in this order, null until measured.
SUMMARY_KEYS = (
    "copy_bandwidth_GBps",
    "kernel_bandwidth_fraction",
    "kernel_bandwidth_GBps",
    "kernel_min_traffic_fraction",
    "kernel_backend",
    "kernel_numel",
    "sampler_overhead_ratio",
    "speedup_vs_official_loop",
    "speedup_vs_diffusers_compiled_cfg_b1",
    "first_compile_s",
    "warm_compile_s",
    "extension_cuda",
    "tests",
    "sanitize_clean",
    "accuracy_order_heun",
)
PER_OP_KEYS = (
    "kernel_bandwidth_fraction",
    "kernel_bandwidth_GBps",
    "kernel_min_traffic_fraction",
    "kernel_backend",
)
# Ratios measured on the device that ran (fractions of its own copy bandwidth, speedups in one
# process), so they hold on an H100 (~3.0 TB/s copy) and an H200 (~4.3 TB/s) alike.
GOALS = {
    "kernel_bandwidth_fraction": ">= 0.85 of measured copy bandwidth, each, at >= 64M elements",
    "sampler_overhead_ratio": "<= 1.02",
    "speedup_vs_official_loop": ">= 3",
    "speedup_vs_diffusers_compiled_cfg_b1": ">= 1.3",
    "first_compile_s": "< 60",
    "warm_compile_s": "< 10",
}
FINAL = ("ok", "failed", "timeout", "killed", "skipped", "no-time", "done-in-call-1")


# ----------------------------------------------------------------------------- small helpers


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def git_commit() -> tuple[str | None, str]:
    """(commit, where it came from). A copy of the tree without .git (the GPU machine's) is told the
    commit: ``EDMFAST_GIT_COMMIT``, else ``.suite/commit`` (written by ``gpu_suite.sh --prepare``),
    else ``git rev-parse`` (``+dirty`` when the tree differs from it)."""
    if os.environ.get("EDMFAST_GIT_COMMIT"):
        return os.environ["EDMFAST_GIT_COMMIT"], "EDMFAST_GIT_COMMIT"
    stamp = REPO / ".suite" / "commit"
    if stamp.is_file() and stamp.read_text().strip():
        return stamp.read_text().strip(), ".suite/commit"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None, "unknown"
    if rev.returncode != 0:
        return None, "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""), "git"


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (torch-free), None without one."""
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = smi.stdout.strip().splitlines() if smi.returncode == 0 else []
    return lines[0].strip() if lines else None


def identity(state: dict[str, Any]) -> dict[str, Any]:
    """What must match for two records to be merged: kind, commit and device (GPU model)."""
    env = state.get("env") or {}
    device = state.get("device") or env.get("gpu") or (None if state.get("kind") == "gpu" else "cpu")
    return {"kind": state.get("kind"), "commit": state.get("commit") or env.get("commit"), "device": device}


def mismatch(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """Why records ``a`` and ``b`` must not be merged (None when they may)."""
    ia, ib = identity(a), identity(b)
    for key in ("kind", "commit", "device"):
        if ia[key] != ib[key]:
            return f"{key} differs: {ia[key]!r} vs {ib[key]!r}"
    return None


def finite_or_none(obj: Any) -> Any:
    """Strict JSON: inf / NaN become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def temporary_path(path: Path) -> Path:
    """Where to write ``path``'s next version before renaming it over ``path``. In the GPU suite
    ``EDMFAST_TMPDIR`` is a folder beside $OUT on the same filesystem: a kill between write and
    rename then leaves nothing extra among $OUT's files. Else beside ``path``."""
    folder = os.environ.get("EDMFAST_TMPDIR")
    where = Path(folder) if folder and Path(folder).is_dir() else path.parent
    return where / f".{path.name}.{os.getpid()}.tmp"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file and rename it over ``path``: readers see old or new, never half."""
    tmp = temporary_path(path)
    tmp.write_text(json.dumps(finite_or_none(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def ratio(num: Any, den: Any) -> float | None:
    if not isinstance(num, (int, float)) or not isinstance(den, (int, float)) or not den:
        return None
    if not (math.isfinite(num) and math.isfinite(den)):
        return None
    return num / den


def empty_summary() -> dict[str, Any]:
    s: dict[str, Any] = {k: None for k in SUMMARY_KEYS}
    for k in PER_OP_KEYS:
        s[k] = {op: None for op in KERNEL_OPS}
    s["speedup_vs_official_loop"] = {b: None for b in OFFICIAL_BATCHES}
    return s


# ----------------------------------------------------------------------------- what counts as this run's


def same_run(record: dict[str, Any] | None, run: str | None) -> bool:
    """A file counts only when it carries this suite run's id (``EDMFAST_SUITE_RUN``)."""
    if not isinstance(record, dict):
        return False
    return run is None or record.get("suite_run") == run


def ops_device_ok(ops: dict[str, Any], kind: str) -> bool:
    meta = ops.get("meta") or {}
    return kind != "gpu" or meta.get("device") == "cuda"


def sampler_device_ok(rec: dict[str, Any], kind: str) -> bool:
    return kind != "gpu" or (rec.get("device") == "cuda" and bool((rec.get("machine") or {}).get("gpu")))


# ----------------------------------------------------------------------------- numbers from files


def ops_numbers(ops: dict[str, Any] | None) -> dict[str, Any]:
    """Copy bandwidth and per-op kernel figures from bench_ops.py's rows at the largest size measured.

    Per op the best of edmfast's backends (``frac`` = GB/s on the bytes the kernel moves / copy
    GB/s; ``bound_frac`` = the op's minimum-traffic time at copy bandwidth / measured time)."""
    out: dict[str, Any] = {k: {op: None for op in KERNEL_OPS} for k in PER_OP_KEYS}
    out.update(copy_bandwidth_GBps=None, kernel_numel=None, by_size={})
    rows = (ops or {}).get("rows") or []
    if not rows:
        return out
    numel = max(r["numel"] for r in rows)
    at = [r for r in rows if r["numel"] == numel]
    copies = [r["gbs"] for r in at if r["op"] == "copy"]
    out["copy_bandwidth_GBps"] = max(copies) if copies else None
    out["kernel_numel"] = numel
    for op in KERNEL_OPS:
        cands = [r for r in at if r["op"] == op and r["backend"] in EDMFAST_BACKENDS]
        best = max(cands, key=lambda r: r["frac"], default=None)
        if best is not None:
            out["kernel_bandwidth_fraction"][op] = best["frac"]
            out["kernel_bandwidth_GBps"][op] = best["gbs"]
            out["kernel_min_traffic_fraction"][op] = best.get("bound_frac")
            out["kernel_backend"][op] = best["backend"]
    for r in rows:  # every size: the goal is stated for >= 64M elements, several sizes show the trend
        if r["op"] in KERNEL_OPS and r["backend"] in EDMFAST_BACKENDS:
            cell = out["by_size"].setdefault(r["op"], {}).setdefault(str(r["numel"]), {})
            cell[r["backend"]] = round(r["frac"], 4)
    return out


def _med(row: Any, name: str) -> float | None:
    if not isinstance(row, dict):
        return None
    return (row.get(name) or {}).get("median_s")


def sampler_numbers(sections: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary part, details) from bench_sampler.py's GPU-mode sections (this run's only)."""
    cifar, cifar_c = sections.get("cifar") or {}, sections.get("cifar_compiled") or {}
    sd, sd_c = sections.get("sd") or {}, sections.get("sd_compiled") or {}
    speedups: dict[str, float | None] = {}
    for b in ("b1", "b16", "b64", "b256"):
        official = _med((cifar.get("rows") or {}).get(b), "official")
        engine = [
            t
            for t in (
                _med((cifar.get("rows") or {}).get(b), "edmfast"),
                _med((cifar_c.get("rows") or {}).get(b), "edmfast"),
            )
            if t
        ]
        speedups[b] = ratio(official, min(engine)) if engine else None
    sd_row_c = (sd_c.get("rows") or {}).get("euler_b1") or {}
    sd_row = (sd.get("rows") or {}).get("euler_b1") or {}
    # edmfast's best configuration: compiled network, eager network under graph capture, either section
    engine_sd = [
        t for t in (_med(sd_row_c, "edmfast"), _med(sd_row_c, "edmfast_graph"), _med(sd_row, "edmfast")) if t
    ]
    copy = sections.get("copy") or {}
    summary = {
        "copy_bandwidth_GBps": copy.get("copy_bandwidth_GBps"),
        "sampler_overhead_ratio": cifar_c.get("sampler_overhead_ratio")
        or cifar.get("sampler_overhead_ratio"),
        "speedup_vs_official_loop": {b: speedups[b] for b in OFFICIAL_BATCHES},
        "speedup_vs_diffusers_compiled_cfg_b1": ratio(_med(sd_row_c, "diffusers"), min(engine_sd))
        if engine_sd
        else None,
        "first_compile_s": (sections.get("compile_cold") or {}).get("compile_s"),
        "warm_compile_s": (sections.get("compile_warm") or {}).get("compile_s"),
    }
    details = {
        "speedup_vs_official_loop_b16": speedups["b16"],
        "speedup_vs_official_loop_b256": speedups["b256"],
        "sampler_overhead_ratio_eager_network": cifar.get("sampler_overhead_ratio"),
        "sampler_overhead_ratio_compiled_network": cifar_c.get("sampler_overhead_ratio"),
        "speedup_vs_diffusers_eager_cfg_b1": ratio(_med(sd_row, "diffusers"), min(engine_sd))
        if engine_sd
        else None,
        "copy_bandwidth_GBps_sampler": copy.get("copy_bandwidth_GBps"),
    }
    return summary, details


def junit_summary(path: Path) -> dict[str, Any] | None:
    """Counts and the names of failed/errored tests from a pytest junit xml."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out: dict[str, Any] = {
        k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
    }
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                msg = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                failed.append(f"{case.get('classname')}::{case.get('name')} [{tag}] {msg}")
    out["failed"] = failed[:60]
    return out


def sanitize_summary(path: Path) -> dict[str, Any] | None:
    """csrc/tests/sanitize.sh's SANITIZE_REPORT lines: one JSON object per tool run."""
    if not path.is_file():
        return None
    tools = []
    for line in path.read_text().splitlines():
        try:
            tools.append(json.loads(line))
        except ValueError:
            continue
    # a line without a tool: the reason none could run; a tool that refused the host ran nothing
    ran = [t for t in tools if t.get("tool") and not t.get("unavailable")]
    refused = [t.get("reason") for t in tools if t.get("unavailable")]
    out: dict[str, Any] = {"tools": tools, "clean": all(t.get("exit") == 0 for t in ran) if ran else None}
    if refused:
        out["unavailable"] = " / ".join(str(r) for r in refused)
    return out


# ----------------------------------------------------------------------------- the summary of one call


def build_summary(out: Path, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, details) from the files in ``out`` that this run wrote on this run's device."""
    kind, run = state.get("kind", "gpu"), state.get("suite_run")
    summary, details = empty_summary(), {"ignored_files": []}
    ops = load(out / "ops.json")
    if ops is not None:
        if same_run(ops.get("meta"), run) and ops_device_ok(ops, kind):
            k = ops_numbers(ops)
            for key in ("copy_bandwidth_GBps", "kernel_numel", *PER_OP_KEYS):
                summary[key] = k[key]
            details["kernel_fraction_by_size"] = k["by_size"]
            details["kernel_below_spec_numel"] = (
                k["kernel_numel"] is not None and k["kernel_numel"] < SPEC_MIN_NUMEL
            )
        else:
            details["ignored_files"].append("ops.json (another run or device)")
    sampler = load(out / "sampler.json")
    if sampler is not None:
        if same_run(sampler, run) and sampler_device_ok(sampler, kind):
            part, more = sampler_numbers(sampler.get("sections") or {})
            for key, value in part.items():
                if key == "copy_bandwidth_GBps":
                    summary[key] = summary[key] or value  # bench_ops' figure first (measured at >= 64M)
                else:
                    summary[key] = value
            details.update(more)
        else:
            details["ignored_files"].append("sampler.json (another run or device)")
    accuracy = load(out / "accuracy.json")
    if (
        accuracy is not None
        and same_run(accuracy, run)
        and (kind != "gpu" or accuracy.get("device") == "cuda")
    ):
        acc = accuracy.get("summary") or {}
        summary["accuracy_order_heun"] = acc.get("gaussian_order_heun")
        details["accuracy"] = {k: v for k, v in acc.items() if not isinstance(v, (dict, list))}
    results = state.get("results") or {}
    tests = results.get("tests")
    if tests:
        summary["tests"] = tests_counts(tests, state)
    san = results.get("sanitize")
    if san:
        summary["sanitize_clean"] = san.get("clean")
    build = results.get("build") or {}
    if "extension_cuda" in build:
        summary["extension_cuda"] = build["extension_cuda"]
    return summary, details


def tests_counts(tests: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The summary's test counts. A run that continued a previous invocation's (it deselected every
    test that invocation's junit holds) adds to that one's counts: together they are one run."""
    keys = ("passed", "failures", "errors", "skipped")
    out: dict[str, Any] = {k: tests.get(k) for k in keys}
    out["complete"], out["calls"] = tests.get("complete"), 1
    prev = ((state.get("previous") or {}).get("results") or {}).get("tests")
    if tests.get("continues_previous") and prev:
        out.update({k: (prev.get(k) or 0) + (tests.get(k) or 0) for k in keys})
        prev_summary = ((state.get("previous") or {}).get("summary") or {}).get("tests") or {}
        out["calls"] = int(prev_summary.get("calls") or 1) + 1
    return out


def merge_summaries(first: dict[str, Any], second: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every value of ``first`` kept; ``second`` fills only what ``first`` left null (per op / batch)."""
    merged: dict[str, Any] = {}
    source: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        a, b = first.get(key), second.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            if key == "tests":  # one run's counts: the second only when it continued (covers) the first
                wider = int(b.get("calls") or 1) > int(a.get("calls") or 1) if a and b else False
                if b and (not a or wider or (b.get("complete") and not a.get("complete"))):
                    merged[key], source[key] = b, 2
                else:
                    merged[key], source[key] = (a, 1) if a else (None, None)
                continue
            merged[key], source[key] = {}, {}
            for sub in list(a) + [s for s in b if s not in a]:
                va, vb = a.get(sub), b.get(sub)
                merged[key][sub] = va if va is not None else vb
                source[key][sub] = 1 if va is not None else (2 if vb is not None else None)
        else:
            merged[key] = a if a is not None else b
            source[key] = 1 if a is not None else (2 if b is not None else None)
    return merged, source


# ----------------------------------------------------------------------------- suite-init / suite-update


def cmd_suite_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    order = args.sections.split()
    previous = load(Path(args.previous) / "summary.json") if args.previous else None
    done: list[str] = []
    state: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": args.kind,
        "commit": git_commit()[0],
        "device": (gpu_name() if args.kind == "gpu" else "cpu"),
        "suite_run": args.run,
        "call": 1,
        "started_utc": now(),
        "updated_utc": now(),
        "budget_s": args.budget,
        "elapsed_s": 0,
        "complete": False,
        "env": {},
        "summary": empty_summary(),
        "summary_source": None,
        "summary_details": {},
        "goals": GOALS,
        "order": order,
        "sections": {name: {"status": "pending"} for name in order},
        "results": {},
        "previous": None,
    }
    why = None
    if previous is not None:
        why = (
            "not a summary of this schema" if previous.get("schema") != SCHEMA else mismatch(previous, state)
        )
    if previous is not None and why is None:
        state["call"] = int(previous.get("call", 1)) + 1
        state["previous"] = {
            k: previous.get(k)
            for k in (
                "suite_run",
                "call",
                "kind",
                "commit",
                "device",
                "env",
                "summary",
                "summary_source",
                "sections",
                "results",
                "started_utc",
            )
        }
        tests_done = ((previous.get("results") or {}).get("tests") or {}).get("complete")
        for name in order:
            prev = (previous.get("sections") or {}).get(name) or {}
            # the build is per machine and the probe per call; everything else that finished stays
            # done, and so do the tests when the previous junit holds every selected test's result
            # (failures included: running them again would only repeat them)
            finished = prev.get("status") in ("ok", "done-in-call-1") or (name == "tests" and tests_done)
            if name not in ("probe", "build") and finished:
                state["sections"][name] = {"status": "done-in-call-1", "previous": prev}
                done.append(name)
    elif previous is not None:
        state["previous_ignored"] = f"{args.previous}: {why}"
        print(f"collect_results: not continuing {args.previous}: {why}; every section runs", file=sys.stderr)
    write_json_atomic(out / "summary.json", state)
    print(" ".join(done))
    return 0


def cmd_suite_update(args: argparse.Namespace) -> int:
    out = Path(args.out)
    state = load(out / "summary.json")
    if not isinstance(state, dict):
        print("collect_results: no summary.json to update (suite-init first)", file=sys.stderr)
        return 2
    if args.section:
        sec = state["sections"].setdefault(args.section, {})
        if args.status:
            sec["status"] = args.status
        for key in ("seconds", "exit", "limit_s"):
            v = getattr(args, key)
            if v is not None:
                sec[key] = v
        if args.reason:
            sec["reason"] = args.reason[-2000:]
        if args.status == "running":
            sec["started_utc"] = now()
    if args.env_json:
        env = load(Path(args.env_json))
        if isinstance(env, dict):
            state["env"].update(env)
    if args.result_json and args.section:
        res = load(Path(args.result_json))
        if res is not None:
            state["results"][args.section] = res
    if args.junit:
        tests = [t for t in (junit_summary(Path(p)) for p in args.junit) if t]
        if tests:
            total = {
                k: sum(t[k] for t in tests) for k in ("tests", "passed", "failures", "errors", "skipped")
            }
            total["time_s"] = round(sum(t["time_s"] for t in tests), 1)
            total["failed"] = [f for t in tests for f in t["failed"]][:60]
            info = load(Path(args.tests_info)) if args.tests_info else None
            if isinstance(info, dict):
                # pytest exit 0 / 1 / 5: every selected test has its result in the junit (1: some
                # failed); anything else (a timeout's interrupt, a crash) leaves it partial
                total["complete"] = info.get("pytest_exit") in (0, 1, 5)
                total.update({k: v for k, v in info.items() if k != "complete"})
            state["results"]["tests"] = total
    if args.sanitize_report:
        san = sanitize_summary(Path(args.sanitize_report))
        if san is not None:
            state["results"]["sanitize"] = san
    if args.elapsed is not None:
        state["elapsed_s"] = args.elapsed
    if args.complete:
        state["complete"] = True
    summary, details = build_summary(out, state)
    if state.get("previous"):
        summary, source = merge_summaries(state["previous"].get("summary") or {}, summary)
        state["summary_source"] = {"1": "previous call", "2": "this call", "by_key": source}
    state["summary"], state["summary_details"] = summary, details
    state["updated_utc"] = now()
    write_json_atomic(out / "summary.json", state)
    return 0


# ----------------------------------------------------------------------------- merge into results/


def machine_tag(env: dict[str, Any]) -> str | None:
    name = str(env.get("gpu") or "").lower()
    m = re.search(r"(h200|h100|a100|l40s|l4|a10g|v100|t4)", name)
    return m.group(1) if m else None


def call_record(src: Path) -> dict[str, Any]:
    """One call's returned files, as one record: the suite state plus every bench file that is this run's."""
    state = load(src / "summary.json")
    if not isinstance(state, dict) or state.get("schema") != SCHEMA:
        raise SystemExit(f"{src}: no summary.json of schema {SCHEMA}")
    run, kind = state.get("suite_run"), state.get("kind")
    rec: dict[str, Any] = {"src": str(src), "state": state}
    ops = load(src / "ops.json")
    if ops is not None and same_run(ops.get("meta"), run) and ops_device_ok(ops, kind):
        rec["ops"] = ops
    sampler = load(src / "sampler.json")
    if sampler is not None and same_run(sampler, run) and sampler_device_ok(sampler, kind):
        rec["sampler"] = {
            k: sampler.get(k) for k in ("machine", "versions", "sections", "errors", "skipped", "date")
        }
    accuracy = load(src / "accuracy.json")
    if (
        accuracy is not None
        and same_run(accuracy, run)
        and (kind != "gpu" or accuracy.get("device") == "cuda")
    ):
        rec["accuracy"] = accuracy
    return rec


def merge_calls(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Calls in order; a later call fills gaps and never replaces what an earlier one measured."""
    states = [r["state"] for r in records]
    summary = states[0]["summary"]
    source: Any = {k: (1 if summary.get(k) is not None else None) for k in SUMMARY_KEYS}
    for i, st in enumerate(states[1:], start=2):
        summary, src = merge_summaries(summary, st["summary"])
        source = {k: (source.get(k) if src[k] == 1 else (i if src[k] == 2 else None)) for k in SUMMARY_KEYS}
        for k in SUMMARY_KEYS:  # per-op / per-batch sources
            if isinstance(src[k], dict):
                prev = source.get(k) if isinstance(source.get(k), dict) else {}
                source[k] = {
                    s: (prev.get(s, 1) if v == 1 else (i if v == 2 else None)) for s, v in src[k].items()
                }
    sections: dict[str, Any] = {}
    for i, st in enumerate(states, start=1):
        for name, sec in (st.get("sections") or {}).items():
            if sec.get("status") == "done-in-call-1":
                continue
            if name not in sections or sections[name].get("status") != "ok":
                sections[name] = {**sec, "call": i}
    return {
        "benchmark": "gpu_suite",
        "schema": SCHEMA,
        **identity(states[0]),
        "date": (states[0].get("env") or {}).get("date") or states[0].get("started_utc", "")[:10],
        "summary": summary,
        "summary_source": source,
        "goals": GOALS,
        "sections": sections,
        "calls": [
            {
                "call": i,
                "suite_run": st.get("suite_run"),
                "env": st.get("env"),
                "budget_s": st.get("budget_s"),
                "elapsed_s": st.get("elapsed_s"),
                "complete": st.get("complete"),
                "summary_details": st.get("summary_details"),
                "results": st.get("results"),
                "ops": r.get("ops"),
                "sampler": r.get("sampler"),
                "accuracy_summary": (r.get("accuracy") or {}).get("summary"),
                "src": r["src"],
            }
            for i, (st, r) in enumerate(zip(states, records, strict=True), start=1)
        ],
    }


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items())
    return str(v)


def markdown(merged: dict[str, Any]) -> str:
    kind = "" if merged.get("kind") == "gpu" else f" ({merged.get('kind')}: CPU, tiny sizes; not GPU results)"
    lines = [f"# edmfast GPU suite — {merged['date']}, {merged.get('device')}{kind}", ""]
    lines += [
        f"Commit {merged.get('commit')}. Goals are ratios measured on this device (fractions of its own",
        "copy bandwidth, speedups in one process): they apply to an H100 or an H200 alike.",
        "",
    ]
    for c in merged["calls"]:
        env = c.get("env") or {}
        lines.append(
            f"- call {c['call']}: {env.get('gpu')} (driver {env.get('driver')}), python {env.get('python')}, "
            f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
            f"numpy {env.get('numpy')}, setuptools {env.get('setuptools')}, commit {env.get('commit')}, "
            f"{c.get('elapsed_s')} s of {c.get('budget_s')} s{'' if c.get('complete') else ' (cut short)'}"
        )
    lines += [
        "",
        "## Summary",
        "",
        "| key | value | measured in call | goal |",
        "|---|---|---|---|",
    ]
    for k in SUMMARY_KEYS:
        lines.append(
            f"| {k} | {fmt(merged['summary'].get(k))} | {fmt(merged['summary_source'].get(k))} "
            f"| {GOALS.get(k, '')} |"
        )
    lines += ["", "## Sections", "", "| section | status | seconds | call | note |", "|---|---|---|---|---|"]
    for name, sec in merged["sections"].items():
        note = (sec.get("reason") or "").splitlines()[0][:120] if sec.get("reason") else ""
        lines.append(
            f"| {name} | {sec.get('status')} | {fmt(sec.get('seconds'))} | {sec.get('call')} | {note} |"
        )
    for c in merged["calls"]:
        tests = (c.get("results") or {}).get("tests")
        if tests:
            lines += [
                "",
                f"## Tests (call {c['call']})",
                "",
                f"{tests['tests']} tests: {tests['passed']} passed, "
                f"{tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped, "
                f"{tests['time_s']} s",
            ]
            lines += [f"- {f}" for f in tests.get("failed", [])]
        ops = c.get("ops")
        if ops:
            lines += [
                "",
                f"## Kernel bandwidth (call {c['call']}; GB/s on the bytes each kernel moves)",
                "",
                "| op | backend | elements | ms | GB/s | of copy | min-traffic bound reached |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in ops.get("rows", []):
                lines.append(
                    f"| {r['op']} | {r['backend']} | {r['numel']} | {r['ms']:.3f} | {r['gbs']:.0f} "
                    f"| {r['frac']:.0%} | {fmt(r.get('bound_frac'))} |"
                )
        sampler = c.get("sampler")
        if sampler and sampler.get("sections"):
            lines += ["", f"## bench_sampler (call {c['call']})", "", sampler_markdown(sampler)]
    return "\n".join(lines) + "\n"


def sampler_markdown(sampler: dict[str, Any]) -> str:
    """bench_sampler.py's own tables (per batch, per solver) for one call's sections."""
    sys.path.insert(0, str(HERE))
    import bench_sampler  # noqa: PLC0415 - imports torch: only when filing results, never per section

    sections = sampler["sections"]
    record = {**sampler, "summary": bench_sampler.gpu_summary(sections, None), "command": ""}
    for key in ("machine", "versions", "errors", "skipped"):
        record[key] = record.get(key) or {}
    # its header and summary table are the record's own above: the tables after them
    after = bench_sampler.gpu_markdown(record).partition("## Summary")[2].split("\n## ", 1)
    return "### " + after[1].replace("\n## ", "\n### ") if len(after) > 1 else ""


def cmd_collect(args: argparse.Namespace) -> int:
    records = [call_record(Path(s)) for s in args.src]
    for r in records[1:]:
        why = mismatch(records[0]["state"], r["state"])
        if why is not None:
            raise SystemExit(
                f"refusing to merge {records[0]['src']} and {r['src']}: {why} (collect them apart)"
            )
    kind = records[0]["state"].get("kind")
    if kind != "gpu" and not args.allow_rehearsal:
        raise SystemExit(
            f"refusing to file a {kind!r} record as GPU results (--allow-rehearsal writes -rehearsal)"
        )
    if kind != "gpu" and args.tag:
        raise SystemExit(
            f"refusing --tag {args.tag!r} for a {kind!r} record: it is filed as <date>-rehearsal only"
        )
    env = records[0]["state"].get("env") or {}
    tag = args.tag or (machine_tag(env) if kind == "gpu" else "rehearsal")
    if tag is None:
        raise SystemExit(f"the record names no known GPU ({env.get('gpu')!r}); pass --tag")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    merged = merge_calls(records)
    date = args.date or merged["date"] or now()[:10]
    merged["date"] = date
    target = out / f"{date}-{tag}.json"
    earlier = load(target)
    runs = {c.get("suite_run") for c in merged["calls"]}
    if earlier is not None:
        why = (
            "not a record of this schema"
            if not isinstance(earlier, dict) or earlier.get("schema") != SCHEMA
            else mismatch(earlier, merged)
        )
        if why is not None:
            raise SystemExit(f"refusing to merge into {target}: {why} (pass another --tag or --date)")
        old_runs = [c.get("suite_run") for c in earlier.get("calls", [])]
        if not runs & set(old_runs):  # a later call collected alone: the earlier file is call 1
            merged = _prepend(earlier, merged)
    write_json_atomic(target, merged)
    target.with_suffix(".md").write_text(markdown(merged))
    written = [target.name, target.with_suffix(".md").name]
    for r in records:
        png = Path(r["src"]) / "accuracy.png"
        if png.is_file() and r.get("accuracy"):
            shutil.copyfile(png, out / f"{date}-{tag}-accuracy.png")
            written.append(f"{date}-{tag}-accuracy.png")
            break
    print("wrote:", ", ".join(str(out / w) for w in written))
    return 0


def _prepend(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """An earlier results file (call 1) merged with a later collection: the earlier values win."""
    summary, src = merge_summaries(earlier["summary"], later["summary"])
    n = len(earlier.get("calls", []))
    calls = list(earlier.get("calls", [])) + [{**c, "call": c["call"] + n} for c in later["calls"]]
    source = {}
    for k in SUMMARY_KEYS:
        old = earlier.get("summary_source", {}).get(k)
        if isinstance(src[k], dict):
            old = old if isinstance(old, dict) else {}
            source[k] = {
                s: (old.get(s) if v == 1 else (n + 1 if v == 2 else None)) for s, v in src[k].items()
            }
        else:
            source[k] = old if src[k] == 1 else (n + 1 if src[k] == 2 else None)
    sections = dict(earlier.get("sections", {}))
    for name, sec in later["sections"].items():
        if name not in sections or sections[name].get("status") != "ok":
            sections[name] = {**sec, "call": sec.get("call", 1) + n}
    return {**earlier, "summary": summary, "summary_source": source, "sections": sections, "calls": calls}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "suite-init":
        p = argparse.ArgumentParser(prog="collect_results.py suite-init")
        p.add_argument("--out", required=True)
        p.add_argument("--kind", choices=("gpu", "rehearsal"), required=True)
        p.add_argument("--budget", type=int, required=True)
        p.add_argument("--sections", required=True, help="space-separated, in run order")
        p.add_argument("--run", default=None, help="this run's id (EDMFAST_SUITE_RUN)")
        p.add_argument("--previous", default=None, help="folder holding a previous invocation's summary.json")
        return cmd_suite_init(p.parse_args(argv[1:]))
    if argv and argv[0] == "suite-update":
        p = argparse.ArgumentParser(prog="collect_results.py suite-update")
        p.add_argument("--out", required=True)
        p.add_argument("--section", default=None)
        p.add_argument("--status", default=None, choices=("pending", "running", *FINAL))
        p.add_argument("--seconds", type=int, default=None)
        p.add_argument("--exit", type=int, default=None)
        p.add_argument("--limit-s", type=int, default=None)
        p.add_argument("--reason", default=None)
        p.add_argument("--env-json", default=None)
        p.add_argument("--result-json", default=None, help="a JSON object stored as results[section]")
        p.add_argument("--junit", nargs="*", default=None)
        p.add_argument("--tests-info", default=None, help="JSON: pytest_exit, continues_previous, ...")
        p.add_argument("--sanitize-report", default=None)
        p.add_argument("--elapsed", type=int, default=None)
        p.add_argument("--complete", action="store_true")
        return cmd_suite_update(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="+", help="one or two suite output folders ($OUT), the first first")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--tag", default=None, help="default: the recorded GPU (h100, h200); not for a rehearsal")
    p.add_argument("--date", default=None, help="default: the date the first invocation recorded")
    p.add_argument("--allow-rehearsal", action="store_true", help="file a rehearsal record (tag 'rehearsal')")
    return cmd_collect(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
