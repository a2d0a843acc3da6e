"""Version-skew check: the code paths a GPU machine will run, under that machine's versions, without it.

The GPU image pins older releases than a developer's venv (torch 2.11 + triton 3.6 against 2.13 +
3.9 here): torch 2.11 once broke three Triton ops that every test passed on 2.13. Run this in the
GPU image's versions (``bash benchmarks/gpu_env_rehearsal.sh`` builds that venv and runs it):

1. ``pytest -m "not slow" tests`` with ``TRITON_INTERPRET=1``: every public op on every backend
   reachable without a GPU (torch, cpu, triton interpreted) in grad, no-grad and inference mode,
   and every engine path (samplers, ancestral engine, torch.compile on the CPU, diffusers glue).
   A plugin records each Triton launch: kernel, argument types, constexprs, num_warps.
2. In fresh processes without the interpreter, each recorded kernel variant compiled for sm_90
   (``triton.compile(..., target=GPUTarget("cuda", 90, 32))``: Triton's own front end, LLVM and
   ptxas; no driver and no GPU are needed for a compile-only target), and the learned-variance
   ancestral kernels checked free of ``ex2.approx`` (tl.exp's approximate form).

    python benchmarks/skew_check.py                 # in the GPU image's versions; exit 1 on a failure
    python benchmarks/skew_check.py --any-version   # the same checks under whatever is installed
    python benchmarks/skew_check.py --compile-only RECORD.json   # part 2 of an earlier part 1

Writes ``skew_check.json`` (versions, test counts, variants compiled, failures) to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGE = {"torch": "2.11.", "triton": "3.6."}  # the GPU image's releases (benchmarks/README.md)
TARGET = ("cuda", 90, 32)  # sm_90: H100 and H200
POINTER = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "i1",
}


# ----------------------------------------------------------------------------- part 1: the recorder


def _arg_type(value: Any) -> str | None:
    """Triton's signature type for a launch argument (None: not something we can compile for)."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return "*" + POINTER[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def _probe_kernel(x_ptr):  # a kernel's Python function, only ever wrapped (never run)
    pass


def _launched_by_edmfast() -> bool:
    """Whether the launch comes from edmfast's own code (not a test launching a kernel directly,
    with arguments only the interpreter accepts): the first caller outside triton / torch / this
    file decides."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("edmfast."):
            return True
        if not (name.split(".")[0] in ("triton", "torch", "functools", "contextlib") or name == __name__):
            return False
        frame = frame.f_back
    return False


def _record(fn: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    if not fn.__module__.startswith("edmfast.") or not _launched_by_edmfast():
        return None  # the product's kernels as the product launches them
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    signature, constexprs = {}, {}
    for p in params:
        if "constexpr" in str(p.annotation):
            signature[p.name] = "constexpr"
            constexprs[p.name] = bound.get(p.name, p.default)
        else:
            kind = _arg_type(bound.get(p.name))
            if kind is None:
                return None
            signature[p.name] = kind
    return {
        "module": fn.__module__,
        "kernel": fn.__name__,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": int(kwargs.get("num_warps", 4)),
    }


def pytest_configure(config) -> None:
    """``-p skew_check``: record every interpreted Triton launch into $EDMFAST_SKEW_RECORD."""
    path = os.environ.get("EDMFAST_SKEW_RECORD")
    if not path:
        return
    import torch
    from triton.runtime import interpreter

    # torch < 2.13's wrap_triton rejects interpreted kernels ("only works on functions annotated with
    # triton.jit"): an interpreter-only incompatibility (on a GPU the kernels are JITFunctions) that
    # would hide every GPU-relevant path behind it. Let them through, as torch 2.13 does, and say so.
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is not None:
        probe = interpreter.InterpretedFunction(_probe_kernel)
        try:
            wrap(probe)
        except RuntimeError as e:
            Path(path + ".notes").write_text(
                f"torch {torch.__version__}: torch.library.wrap_triton rejects TRITON_INTERPRET=1 kernels "
                f"({e}): edmfast's triton backend on CPU tensors fails under this torch; the check "
                "passed interpreted kernels through (as torch 2.13 does) to reach the other paths"
            )
            torch.library.wrap_triton = lambda k: (
                k if isinstance(k, interpreter.InterpretedFunction) else wrap(k)
            )
    # triton < 3.9's interpreter takes a runtime loop bound (`range(n)`, n a loaded scalar) with
    # int() of a 1-element array, which numpy >= 2.5 refuses: interpreter-only again (compiled
    # kernels never see numpy). Take the element, and say so.
    import numpy as np

    try:
        int(np.zeros(1))
    except TypeError:
        patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
        if patch_tensor is not None:

            def patched(tensor, scope):
                patch_tensor(tensor, scope)
                scope.set_attr(
                    tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
                )

            interpreter._patch_lang_tensor = patched
            with open(path + ".notes", "a") as f:
                f.write(
                    f"\nnumpy {np.__version__} refuses int() of a 1-element array, which triton "
                    f"{importlib.metadata.version('triton')}'s interpreter uses for runtime loop bounds: "
                    "interpreter-only (compiled kernels never see numpy); the check took the element"
                )

    seen: dict[str, dict[str, Any]] = {}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        rec = _record(self.fn, args, kwargs)
        if rec is not None:
            seen.setdefault(json.dumps(rec, sort_keys=True, default=str), rec)
        return original(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    config._edmfast_skew = (path, seen)


def pytest_unconfigure(config) -> None:
    state = getattr(config, "_edmfast_skew", None)
    if state is not None:
        path, seen = state
        Path(path).write_text(json.dumps(sorted(seen.values(), key=lambda r: json.dumps(r, sort_keys=True))))


# ----------------------------------------------------------------------------- part 2: compile for sm_90


def compile_variant(rec: dict[str, Any]) -> dict[str, Any]:
    """Compile one recorded variant for sm_90 (in a process where the kernels are GPU kernels)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    out = {"kernel": f"{rec['module']}.{rec['kernel']}", "constexprs": rec["constexprs"]}
    out["pointers"] = {k: v for k, v in rec["signature"].items() if v.startswith("*")}
    try:
        fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
        src = ASTSource(fn, rec["signature"], constexprs=rec["constexprs"])
        compiled = triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": rec["num_warps"]})
        ptx = compiled.asm["ptx"]
        out["ok"] = "cubin" in compiled.asm
        out["ex2_approx"] = "ex2.approx" in ptx
    except Exception as e:  # noqa: BLE001 - every variant is tried; the failures are the report
        out["ok"], out["error"] = False, f"{type(e).__name__}: {str(e)[:2000]}"
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # GPU kernels, not interpreted ones
    sys.path.insert(0, str(ROOT))


def compile_all(records: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    ctx = __import__("multiprocessing").get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        return list(pool.map(compile_variant, records))


def learned_variance_exp_is_exact(results: list[dict[str, Any]]) -> list[str]:
    """The ancestral kernels with a learned variance must not evaluate exp with ex2.approx."""
    bad = []
    for r in results:
        c = r["constexprs"]
        if r["kernel"].endswith("_ancestral_step_kernel") and c.get("VARIANCE") and c.get("NOISE"):
            if r.get("ex2_approx"):
                bad.append(f"{r['kernel']} {c}: ex2.approx in the PTX (tl.exp is approximate on the GPU)")
    return bad


# ----------------------------------------------------------------------------- main


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."), help="folder for skew_check.json")
    p.add_argument("--any-version", action="store_true", help="do not require torch 2.11 / triton 3.6")
    p.add_argument("--compile-only", type=Path, default=None, help="a part-1 record: compile its variants")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--pytest-args", default="-m 'not slow' tests", help="what part 1 runs (shell words)")
    args = p.parse_args(argv)
    ver = versions()
    print(f"skew check under {ver}", flush=True)
    if not args.any_version and any(not (ver.get(k) or "").startswith(v) for k, v in IMAGE.items()):
        print(
            f"not the GPU image's versions ({IMAGE}): run it in gpu_env_rehearsal.sh's venv, or --any-version"
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"versions": ver, "target": f"sm_{TARGET[1]}"}
    record = args.compile_only or args.out / "skew_launches.json"
    if args.compile_only is None:
        for stale in (Path(record), Path(f"{record}.notes")):
            stale.unlink(missing_ok=True)
        t0 = time.perf_counter()
        env = dict(os.environ, TRITON_INTERPRET="1", EDMFAST_SKEW_RECORD=str(record))
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (str(ROOT / "benchmarks"), str(ROOT), env.get("PYTHONPATH")) if x
        )
        junit = args.out / "skew_tests.xml"
        cmd = f"{sys.executable} -m pytest -q -p no:cacheprovider -p skew_check --junitxml={junit} "
        cmd += args.pytest_args
        print(f"part 1: {cmd}", flush=True)
        rc = subprocess.run(cmd, shell=True, cwd=ROOT, env=env).returncode
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import collect_results

        report["tests"] = collect_results.junit_summary(junit)
        report["tests_exit"], report["tests_s"] = rc, round(time.perf_counter() - t0, 1)
    notes = Path(f"{record}.notes")
    if notes.is_file():
        report["notes"] = notes.read_text()
        print("NOTE:", report["notes"])
    records = json.loads(Path(record).read_text()) if Path(record).is_file() else []
    t0 = time.perf_counter()
    print(f"part 2: {len(records)} Triton kernel variants compiled for sm_{TARGET[1]}", flush=True)
    results = compile_all(records, args.workers) if records else []
    failed = [r for r in results if not r["ok"]]
    exp_bad = learned_variance_exp_is_exact(results)
    report.update(
        variants=len(results),
        compile_failures=failed,
        approx_exp=exp_bad,
        compile_s=round(time.perf_counter() - t0, 1),
        kernels=sorted({r["kernel"] for r in results}),
    )
    (args.out / "skew_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    tests = report.get("tests") or {}
    problems = []
    if args.compile_only is None and (report["tests_exit"] not in (0,) or not tests):
        problems.append(f"tests: exit {report['tests_exit']}, {tests.get('failures')} failed, "
                        f"{tests.get('errors')} errors: {tests.get('failed', [])[:10]}")  # fmt: skip
    if not results:
        problems.append("no Triton launch was recorded: nothing was compiled for the GPU")
    problems += [
        f"compile {r['kernel']} {r['constexprs']} {r['pointers']}: {r.get('error')}" for r in failed[:20]
    ]
    problems += exp_bad
    print(
        f"tests: {tests.get('passed')} passed, {tests.get('failures')} failed, {tests.get('errors')} "
        f"errors, {tests.get('skipped')} skipped; {len(results)} variants compiled for sm_{TARGET[1]}, "
        f"{len(failed)} failed ({report['compile_s']} s)"
    )
    for line in problems:
        print("SKEW CHECK FAILED:", line)
    print(f"wrote {args.out / 'skew_check.json'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
