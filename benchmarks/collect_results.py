"""Merge the files a GPU suite run returned ($OUT of benchmarks/gpu_suite.sh) into benchmarks/results/.

    python benchmarks/collect_results.py /work/.device/<files_at>   [--tag h200] [--date 2026-11-23]

Writes ``<date>-<tag>.json`` / ``.md`` (the sampler record, with the suite's step exit codes, the
test counts from junit.xml and the kernel roofline summary folded in) and, beside them,
``<date>-<tag>-accuracy.{json,md,png}`` and ``<date>-<tag>-ops.{json,md}`` when those came back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def junit_summary(path: Path) -> dict[str, Any] | None:
    """Counts and the names of failed/errored tests from a pytest junit xml."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out: dict[str, Any] = {
        k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
    }
    out["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                msg = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                failed.append(f"{case.get('classname')}::{case.get('name')} [{tag}] {msg}")
    out["failed"] = failed
    return out


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder holding the returned files (files_at)")
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--tag", default="h200")
    p.add_argument("--date", default=None, help="default: the sampler record's date, else today")
    args = p.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import bench_accuracy
    import bench_sampler

    sampler = load(src / "sampler.json")
    suite = load(src / "suite.json")
    accuracy = load(src / "accuracy.json")
    ops = load(src / "ops.json")
    date = args.date or (sampler or accuracy or {}).get("date") or common.today()
    stem = f"{date}-{args.tag}"
    written = []

    if ops is not None:
        shutil.copyfile(src / "ops.json", out / f"{stem}-ops.json")
        written.append(f"{stem}-ops.json")
        if (src / "ops.md").is_file():
            shutil.copyfile(src / "ops.md", out / f"{stem}-ops.md")
            written.append(f"{stem}-ops.md")
    if accuracy is not None:
        png = None
        if (src / "accuracy.png").is_file():
            shutil.copyfile(src / "accuracy.png", out / f"{stem}-accuracy.png")
            png = f"{stem}-accuracy.png"
            written.append(png)
        common.write_results(out, f"{stem}-accuracy", accuracy, bench_accuracy.markdown(accuracy, png))
        written += [f"{stem}-accuracy.json", f"{stem}-accuracy.md"]

    record: dict[str, Any] = sampler or {
        "benchmark": "bench_sampler",
        "date": date,
        "machine": {},
        "versions": {},
        "summary": bench_sampler.gpu_summary({}, None),  # every key, null: filled from ops below
        "sections": {},
        "errors": {"sampler": "sampler.json did not come back"},
        "skipped": {},
    }
    if ops is not None:  # the roofline may have finished after the sampler looked for it
        kernels = bench_sampler.ops_summary(ops)
        record["summary"]["copy_bandwidth_GBps"] = kernels["copy_bandwidth_GBps"] or record["summary"].get(
            "copy_bandwidth_GBps"
        )
        record["summary"]["kernel_bandwidth_fraction"] = kernels["kernel_bandwidth_fraction"]
    record["suite"] = suite
    record["tests"] = junit_summary(src / "junit.xml")
    record["accuracy_summary"] = (accuracy or {}).get("summary")
    record["collected_from"] = str(src)
    md = bench_sampler.gpu_markdown(record) if record.get("machine") else f"# edmfast GPU results {date}\n\n"
    if suite:
        md += "\n## Suite steps\n\n" + common.md_table(
            ["step", "exit", "seconds"],
            [[k, v.get("exit"), v.get("seconds")] for k, v in suite.get("steps", {}).items()],
        )
    tests = record["tests"]
    if tests:
        md += (
            f"\n## Tests (GPU machine, all markers)\n\n{tests['tests']} tests, {tests['failures']} failures, "
            f"{tests['errors']} errors, {tests['skipped']} skipped, {tests['time_s']} s\n"
        )
        md += "".join(f"- {f}\n" for f in tests["failed"][:40])
    if accuracy is not None:
        md += f"\nAccuracy vs NFE on the GPU engine: [{stem}-accuracy.md]({stem}-accuracy.md)\n"
    if ops is not None:
        md += f"\nKernel roofline: [{stem}-ops.json]({stem}-ops.json)\n"
    common.write_results(out, stem, record, md)
    written += [f"{stem}.json", f"{stem}.md"]
    print("wrote:", ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
