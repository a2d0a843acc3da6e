"""Shared benchmark plumbing: machine and version records, timing, result files.

Every benchmark writes one JSON (full numbers) and one Markdown (tables) file with the same
stem into ``benchmarks/results/`` (or ``--out``); the JSON always carries ``machine``,
``versions``, ``date``, ``summary`` and ``sections`` (see benchmarks/README.md).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # import edmfast from the source tree
    sys.path.insert(0, str(REPO))

if str(REPO / "benchmarks") not in sys.path:  # collect_results (torch-free record helpers)
    sys.path.insert(0, str(REPO / "benchmarks"))

import collect_results  # noqa: E402
import torch  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
PACKAGES = (
    "torch",
    "triton",
    "numpy",
    "diffusers",
    "k-diffusion",
    "torchsde",
    "torchdiffeq",
    "scipy",
    "matplotlib",
)


# ----------------------------------------------------------------------------- records


def today() -> str:
    """ISO date; ``EDMFAST_BENCH_DATE`` overrides it (for reproducible result file names)."""
    return os.environ.get("EDMFAST_BENCH_DATE") or _dt.date.today().isoformat()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, core count, torch threads, GPU (if any)."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_GiB"] = round(p.total_memory / 2**30, 1)
        info["gpu_sms"] = p.multi_processor_count
        info["cuda"] = torch.version.cuda
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.sm,clocks.mem,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def machine_tag() -> str:
    """Short machine name for result file names: ``h200``, ``cpu2`` (2-core CPU box), ..."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        m = re.search(r"(h200|h100|a100|l40s|l4|a10g|rtx ?\d+|v100|t4)", name)
        return (m.group(1) if m else "gpu").replace(" ", "")
    return f"cpu{os.cpu_count()}"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch_runtime"] = torch.__version__
    try:
        import edmfast

        out["edmfast"] = getattr(edmfast, "__version__", None)
    except Exception as e:  # noqa: BLE001 - record, never crash the record
        out["edmfast"] = f"import failed: {e}"
    out["edmfast_git"], out["edmfast_git_source"] = git_commit()
    return out


def git_commit() -> tuple[str | None, str]:
    """(commit, where it came from): ``collect_results.git_commit`` (no torch there, the GPU suite's
    summary records it before anything imports torch)."""
    return collect_results.git_commit()


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any], *, device: torch.device | str, repeats: int, warmup: int = 1
) -> list[float]:
    """Wall-clock seconds of ``fn()`` per repeat, synchronized before and after each call.

    Whole sampling loops are host-driven (Python, launches, host syncs), so the wall clock with
    a device sync around the call is the time a user waits. Take the median of the list.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def cuda_graph_time(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one replay of a CUDA graph capturing ``fn()`` (timed with CUDA events)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graphs advises
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times)


def stats(times: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "times_s": [round(t, 6) for t in times],
    }


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out has non-finite values)."""
    out64, ref64 = out.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
    if not torch.isfinite(out64).all():
        return math.inf
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


# ----------------------------------------------------------------------------- guarded sections


class Recorder:
    """Collects rows and errors; `guard` runs a section and records a failure instead of raising.

    A benchmark is several independent measurements; one failing piece (a missing optional
    package, a compile error, an OOM) must not lose the others.
    """

    def __init__(self) -> None:
        self.sections: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

    def guard(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            result = fn()
        except Skip as s:
            self.skipped[name] = str(s)
            print(f"[bench] {name}: skipped ({s})", flush=True)
            return None
        except Exception as e:  # noqa: BLE001 - recorded with its traceback
            self.errors[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            print(f"[bench] {name}: FAILED {type(e).__name__}: {e}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        self.sections[name] = result
        print(f"[bench] {name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        return result


class Skip(Exception):
    """A section that cannot run here (missing optional dependency, no GPU); recorded, not an error."""


def optional_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        raise Skip(f"{name} not importable: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- result files


def _finite_or_none(obj: Any) -> Any:
    """JSON has no inf/NaN: store them as strings so the file stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _finite_or_none(obj.tolist())
    return obj


def suite_run() -> str | None:
    """The GPU suite run this process belongs to (``EDMFAST_SUITE_RUN``); its summary takes numbers
    only from files that carry this id."""
    return os.environ.get("EDMFAST_SUITE_RUN") or None


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Strict JSON, written to a temporary file and renamed over ``path`` (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = collect_results.temporary_path(path)
    tmp.write_text(json.dumps(_finite_or_none(record), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_results(
    out_dir: Path, stem: str, record: dict[str, Any], markdown: str | None, md_dir: Path | None = None
) -> tuple[Path, Path | None]:
    """`<out_dir>/<stem>.json` (atomically) and `<md_dir or out_dir>/<stem>.md` (unless markdown is None)."""
    record.setdefault("suite_run", suite_run())
    json_path = out_dir / f"{stem}.json"
    write_json(json_path, record)
    md_path = None
    if markdown is not None:
        md_path = (md_dir or out_dir) / f"{stem}.md"
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown)
    print(f"[bench] wrote {json_path}" + (f" and {md_path}" if md_path else ""), flush=True)
    return json_path, md_path


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:,.{max(digits - len(str(int(abs(v)))), 0) + 1}f}"
    return str(v)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def md_header(title: str, record: dict[str, Any]) -> str:
    m, v = record["machine"], record["versions"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    ver = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    return (
        f"# {title}\n\n"
        f"- date: {record['date']}\n"
        f"- machine: {m.get('cpu')} ({m.get('cpu_count')} cores, "
        f"torch threads {m.get('torch_threads')}){gpu}\n"
        f"- versions: {ver}\n"
        f"- command: `{record.get('command', '')}`\n\n"
    )


def md_problems(record: dict[str, Any]) -> str:
    out = ""
    if record.get("skipped"):
        out += "\n## Skipped\n\n" + "".join(f"- {k}: {v}\n" for k, v in record["skipped"].items())
    if record.get("errors"):
        out += "\n## Errors\n\n" + "".join(
            f"- {k}: `{v.splitlines()[0] if v else ''}`\n" for k, v in record["errors"].items()
        )
    return out


def host_bench_main(
    doc: str, run: Callable[[bool], dict[str, Any]], markdown: Callable[[dict], str], kind: str
) -> None:
    """The command line of the small host-path benchmarks: ``--quick``, ``--out DIR``, ``--no-save``;
    prints the Markdown and writes ``<date>-<machine>-<kind>.{json,md}``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="result directory")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    record = run(args.quick)
    md = markdown(record)
    print(md)
    if not args.no_save:
        write_results(args.out, f"{record['date']}-{machine_tag()}-{kind}", record, md)
