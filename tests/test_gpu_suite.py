"""The GPU suite's record (benchmarks/gpu_suite.sh, benchmarks/collect_results.py) on the CPU.

A device call can be cut off at any second; its summary must then still be valid JSON holding every
finished section. And a number may enter a GPU summary only when this run measured it on the GPU:
never a committed CPU result, never another run's file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import collect_results  # noqa: E402

sys.path.remove(str(BENCH))


def _ops(run: str | None, device: str, copy_gbs: float = 4000.0) -> dict:
    rows = [dict(op="copy", backend="torch", numel=1 << 26, ms=1.0, gbs=copy_gbs, frac=1.0, bound_frac=1.0)]
    for op in collect_results.KERNEL_OPS:
        rows.append(dict(op=op, backend="cuda", numel=1 << 26, ms=1.0, gbs=3600.0, frac=0.9, bound_frac=0.8))
    return {"meta": {"device": device, "suite_run": run}, "rows": rows}


def _init(out: Path, kind: str, run: str, previous: Path | None = None) -> str:
    argv = ["suite-init", "--out", str(out), "--kind", kind, "--budget", "420", "--run", run]
    argv += ["--sections", "probe build tests ops sampler"]
    if previous is not None:
        argv += ["--previous", str(previous)]
    assert collect_results.main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def _update(out: Path, *args: str) -> dict:
    assert collect_results.main(["suite-update", "--out", str(out), *args]) == 0
    return json.loads((out / "summary.json").read_text())


def test_gpu_summary_takes_no_cpu_or_foreign_figure(tmp_path):
    """The committed CPU roofline, a CPU file of this run and a GPU file of another run: all null."""
    _init(tmp_path, "gpu", "run-1")
    committed = BENCH / "results" / "bench_ops_cpu_1thread.json"
    assert committed.is_file()  # the file that once passed for the GPU's copy bandwidth
    for ops in (json.loads(committed.read_text()), _ops("run-1", "cpu"), _ops("run-0", "cuda")):
        (tmp_path / "ops.json").write_text(json.dumps(ops))
        state = _update(tmp_path, "--section", "ops", "--status", "ok")
        assert state["summary"]["copy_bandwidth_GBps"] is None
        assert set(state["summary"]["kernel_bandwidth_fraction"].values()) == {None}
        assert state["summary_details"]["ignored_files"]
    # this run's GPU file is taken (the check above can fail)
    (tmp_path / "ops.json").write_text(json.dumps(_ops("run-1", "cuda")))
    state = _update(tmp_path, "--section", "ops", "--status", "ok")
    assert state["summary"]["copy_bandwidth_GBps"] == 4000.0
    assert state["summary"]["kernel_bandwidth_fraction"] == {op: 0.9 for op in collect_results.KERNEL_OPS}
    assert state["summary"]["kernel_min_traffic_fraction"]["cfg_rescale"] == 0.8


def test_bench_sampler_gpu_mode_never_reads_results_dir(tmp_path, monkeypatch):
    """GPU mode without --ops-json: null copy bandwidth and kernel fractions, whatever lies in
    benchmarks/results/ (it once loaded the newest *ops*.json there and reported a CPU's 27.7 GB/s)."""
    pytest.importorskip("diffusers")
    monkeypatch.setenv("EDMFAST_SUITE_RUN", "run-x")
    sys.path.insert(0, str(BENCH))
    try:
        import bench_sampler
    finally:
        sys.path.remove(str(BENCH))
    assert list((BENCH / "results").glob("*ops*.json"))  # there is a CPU file to (wrongly) pick up
    argv = ["--mode", "gpu", "--device", "cpu", "--tiny", "--in-process", "--sections", "copy"]
    assert (
        bench_sampler.main([*argv, "--out", str(tmp_path), "--stem", "s", "--md-dir", str(tmp_path / "md")])
        == 0
    )
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["summary"]["copy_bandwidth_GBps"] is None
    assert set(record["summary"]["kernel_bandwidth_fraction"].values()) == {None}
    assert record["suite_run"] == "run-x" and record["device"] == "cpu"
    assert "copy" in record["skipped"] and not (tmp_path / "s.md").exists()


def test_second_call_fills_gaps_and_never_overwrites_the_first(tmp_path):
    call1, call2, results = tmp_path / "call1", tmp_path / "call2", tmp_path / "results"
    _init(call1, "gpu", "run-1")
    _update(call1, "--section", "probe", "--status", "ok")
    (call1 / "ops.json").write_text(json.dumps(_ops("run-1", "cuda", copy_gbs=4000.0)))
    _update(call1, "--section", "ops", "--status", "ok")
    _update(call1, "--section", "sampler", "--status", "timeout")
    # call 2 carries call 1's summary: ops is done there, the sampler is run again
    (tmp_path / "prev").mkdir()
    shutil.copy(call1 / "summary.json", tmp_path / "prev" / "summary.json")
    state = _init(call2, "gpu", "run-2", previous=tmp_path / "prev")
    assert state["call"] == 2
    assert state["sections"]["ops"]["status"] == "done-in-call-1"
    assert state["sections"]["sampler"]["status"] == "pending"  # timed out in call 1: runs again
    (call2 / "ops.json").write_text(json.dumps(_ops("run-2", "cuda", copy_gbs=1.0)))  # must not win
    sampler = {
        "suite_run": "run-2",
        "device": "cuda",
        "machine": {"gpu": "NVIDIA H200"},
        "sections": {"compile_cold": {"compile_s": 42.0}},
    }
    (call2 / "sampler.json").write_text(json.dumps(sampler))
    state = _update(call2, "--section", "sampler", "--status", "ok")
    assert state["summary"]["copy_bandwidth_GBps"] == 4000.0
    assert state["summary"]["first_compile_s"] == 42.0
    assert state["summary_source"]["by_key"]["copy_bandwidth_GBps"] == 1
    assert state["summary_source"]["by_key"]["first_compile_s"] == 2
    # collecting the two calls' files: the same rule, and the GPU named by the record, not a default
    for d, gpu in ((call1, "NVIDIA H200"), (call2, "NVIDIA H200")):
        _update(d, "--env-json", str(_env(tmp_path, gpu)))
    assert collect_results.main([str(call1), str(call2), "--out", str(results), "--date", "2000-01-01"]) == 0
    merged = json.loads((results / "2000-01-01-h200.json").read_text())
    assert merged["summary"]["copy_bandwidth_GBps"] == 4000.0
    assert merged["summary"]["first_compile_s"] == 42.0
    assert merged["summary_source"]["copy_bandwidth_GBps"] == 1
    assert [c["call"] for c in merged["calls"]] == [1, 2]
    # call 2 collected alone later: merged into the existing file, call 1's numbers kept
    assert collect_results.main([str(call2), "--out", str(results), "--date", "2000-01-01"]) == 0
    again = json.loads((results / "2000-01-01-h200.json").read_text())
    assert again["summary"]["copy_bandwidth_GBps"] == 4000.0


def _env(tmp: Path, gpu: str) -> Path:
    p = tmp / f"env-{gpu.replace(' ', '_')}.json"
    p.write_text(json.dumps({"gpu": gpu, "driver": "580", "date": "2000-01-01"}))
    return p


def test_rehearsal_record_is_not_filed_as_gpu_results(tmp_path):
    _init(tmp_path / "r", "rehearsal", "run-r")
    with pytest.raises(SystemExit, match="refusing"):
        collect_results.main([str(tmp_path / "r"), "--out", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def test_rehearsal_is_never_filed_under_a_gpu_tag(tmp_path):
    """`--allow-rehearsal --tag h200` once wrote CPU figures into <date>-h200.json, where a later real
    collection of that date merged them in as call 1 and the CPU values won."""
    _init(tmp_path / "r", "rehearsal", "run-r")
    _update(tmp_path / "r", "--env-json", str(_env(tmp_path, "AMD EPYC")))
    argv = [str(tmp_path / "r"), "--out", str(tmp_path / "results"), "--date", "2000-01-01"]
    with pytest.raises(SystemExit, match="refusing --tag"):
        collect_results.main([*argv, "--allow-rehearsal", "--tag", "h200"])
    assert not (tmp_path / "results" / "2000-01-01-h200.json").exists()
    assert collect_results.main([*argv, "--allow-rehearsal"]) == 0
    assert (tmp_path / "results" / "2000-01-01-rehearsal.json").is_file()
    # a GPU record never merges into a file of another kind, even one planted under its name
    shutil.copy(
        tmp_path / "results" / "2000-01-01-rehearsal.json", tmp_path / "results" / "2000-01-01-h200.json"
    )
    _init(tmp_path / "g", "gpu", "run-g")
    _update(tmp_path / "g", "--env-json", str(_env(tmp_path, "NVIDIA H200")))
    with pytest.raises(SystemExit, match="kind differs"):
        collect_results.main(
            [str(tmp_path / "g"), "--out", str(tmp_path / "results"), "--date", "2000-01-01"]
        )


def test_records_of_other_commits_or_gpus_are_never_merged(tmp_path, monkeypatch):
    monkeypatch.setenv("EDMFAST_GIT_COMMIT", "aaaa")
    _init(tmp_path / "c1", "gpu", "run-1")
    _update(tmp_path / "c1", "--env-json", str(_env(tmp_path, "NVIDIA H200")))
    (tmp_path / "c1" / "ops.json").write_text(json.dumps(_ops("run-1", "cuda")))
    _update(tmp_path / "c1", "--section", "ops", "--status", "ok")
    monkeypatch.setenv("EDMFAST_GIT_COMMIT", "bbbb")
    # a second invocation on another commit does not continue the first: everything runs again
    state = _init(tmp_path / "c2", "gpu", "run-2", previous=tmp_path / "c1")
    assert state["call"] == 1 and state["previous"] is None
    assert "commit differs" in state["previous_ignored"]
    assert state["sections"]["ops"]["status"] == "pending"
    _update(tmp_path / "c2", "--env-json", str(_env(tmp_path, "NVIDIA H200")))
    results = tmp_path / "results"
    with pytest.raises(SystemExit, match="commit differs"):
        collect_results.main([str(tmp_path / "c1"), str(tmp_path / "c2"), "--out", str(results)])
    assert collect_results.main([str(tmp_path / "c1"), "--out", str(results), "--date", "2000-01-01"]) == 0
    with pytest.raises(SystemExit, match="commit differs"):  # collected alone into the first's file
        collect_results.main([str(tmp_path / "c2"), "--out", str(results), "--date", "2000-01-01"])
    # the same commit on an H100: labelled by its device, never merged with the H200's record
    monkeypatch.setenv("EDMFAST_GIT_COMMIT", "aaaa")
    _init(tmp_path / "c3", "gpu", "run-3")
    _update(tmp_path / "c3", "--env-json", str(_env(tmp_path, "NVIDIA H100 80GB HBM3")))
    with pytest.raises(SystemExit, match="device differs"):
        collect_results.main([str(tmp_path / "c1"), str(tmp_path / "c3"), "--out", str(results)])
    assert collect_results.main([str(tmp_path / "c3"), "--out", str(results), "--date", "2000-01-01"]) == 0
    h100 = json.loads((results / "2000-01-01-h100.json").read_text())
    assert h100["device"] == "NVIDIA H100 80GB HBM3" and h100["commit"] == "aaaa"
    assert "H100 or an H200" in (results / "2000-01-01-h100.md").read_text()


def test_second_call_does_not_rerun_tests_call_1_holds(tmp_path):
    """Call 1's tests ran to the end (some failed: the section is "failed"): call 2 does not run them
    again. A call 1 cut short passes its junit on; call 2's counts then add to call 1's."""
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0" time="1.0">'
        '<testcase classname="tests.test_a" name="test_x"/><testcase classname="tests.test_a" name="test_y"/>'
        '<testcase classname="tests.test_a" name="test_z"><failure message="boom"/></testcase>'
        "</testsuite></testsuites>"
    )
    for exit_code, done in ((1, True), (2, False)):
        call1 = tmp_path / f"call1-{exit_code}"
        _init(call1, "gpu", "run-1")
        info = tmp_path / "info.json"
        info.write_text(json.dumps({"pytest_exit": exit_code}))
        state = _update(
            call1,
            "--section",
            "tests",
            "--status",
            "failed",
            "--junit",
            str(junit),
            "--tests-info",
            str(info),
        )
        assert state["summary"]["tests"]["complete"] is done
        prev = _init(tmp_path / f"call2-{exit_code}", "gpu", "run-2", previous=call1)
        assert (prev["sections"]["tests"]["status"] == "done-in-call-1") is done
    # call 2 ran the two tests call 1 had not reached, deselecting the three it holds
    call2 = tmp_path / "call2-2"
    junit2 = tmp_path / "junit2.xml"
    junit2.write_text(
        '<testsuite tests="2" failures="0" errors="0" skipped="1" time="1.0">'
        '<testcase classname="tests.test_b" name="test_p"/>'
        '<testcase classname="tests.test_b" name="test_q"><skipped/></testcase></testsuite>'
    )
    info.write_text(json.dumps({"pytest_exit": 0, "continues_previous": True, "deselected_from_previous": 3}))
    state = _update(
        call2, "--section", "tests", "--status", "ok", "--junit", str(junit2), "--tests-info", str(info)
    )
    tests = state["summary"]["tests"]
    assert (tests["passed"], tests["failures"], tests["skipped"], tests["calls"]) == (3, 1, 1, 2)
    assert tests["complete"] is True


FAKE_NVCC = """#!/bin/sh
# stands for nvcc: records its arguments, "builds" a program that exits 0
echo "$*" >>"$(dirname "$0")/nvcc.calls"
while [ $# -gt 0 ]; do
  if [ "$1" = -o ]; then printf '#!/bin/sh\\nexit 0\\n' >"$2"; chmod +x "$2"; fi
  shift
done
"""
# what compute-sanitizer printed on a gVisor host: refused the device, then CUDA's error 999
REFUSING_SANITIZER = """#!/bin/sh
echo "========= COMPUTE-SANITIZER"
echo "========= Error: Device not supported. Target application will not be instrumented"
echo "probe: CUDA error 999: unknown error"
exit 1
"""


def _fake_cuda(tmp: Path, sanitizer: str | None) -> dict[str, str]:
    """A bin folder with a fake nvcc, an nvidia-smi that sees a GPU and (optionally) a fake
    compute-sanitizer; the environment that makes csrc/tests/sanitize.sh use them."""
    bin_dir = tmp / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    tools = {"nvcc": FAKE_NVCC, "nvidia-smi": "#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n"}
    if sanitizer is not None:
        tools["compute-sanitizer"] = sanitizer
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, NVCC=str(bin_dir / "nvcc"), SANITIZE_BUILD_DIR=str(tmp / "build"))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["SANITIZE_REPORT"] = str(tmp / "report.jsonl")
    env.pop("COMPUTE_SANITIZER", None)
    return env


@pytest.mark.parametrize("sanitizer", ["refusing", "absent"])
def test_sanitizer_refused_or_absent_is_unavailable_not_unclean(tmp_path, sanitizer):
    """A host whose compute-sanitizer answers "Device not supported" (gVisor), or one without the
    tool: exit 2 with the reason, the driver never built, and the suite's summary says unavailable
    (sanitize_clean null), never clean: false."""
    env = _fake_cuda(tmp_path, REFUSING_SANITIZER if sanitizer == "refusing" else None)
    if sanitizer == "absent" and shutil.which("compute-sanitizer", path=env["PATH"]):
        pytest.skip("a real compute-sanitizer is on PATH here")
    proc = subprocess.run(
        ["bash", str(ROOT / "csrc" / "tests" / "sanitize.sh"), "cuda", "--quick"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    calls = (tmp_path / "cuda" / "bin" / "nvcc.calls").read_text() if sanitizer == "refusing" else ""
    assert "sanitize_cuda" not in calls  # the probe only: the driver is not built for nothing
    lines = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert lines[-1]["unavailable"] is True and lines[-1]["tool"] is None
    assert ("Device not supported" if sanitizer == "refusing" else "not found") in lines[-1]["reason"]
    san = collect_results.sanitize_summary(tmp_path / "report.jsonl")
    assert san["clean"] is None and san["unavailable"] == lines[-1]["reason"]


def test_kill_between_write_and_rename_leaves_out_as_it_was(tmp_path, monkeypatch):
    """$OUT may hold at most 8 named files: a summary write killed between its temporary file and the
    rename left a ninth. The suite's EDMFAST_TMPDIR puts the temporary beside $OUT instead."""
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("EDMFAST_TMPDIR", str(scratch))
    _init(out, "gpu", "run-1")

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies here: written, not renamed

    monkeypatch.setattr(collect_results.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        collect_results.main(["suite-update", "--out", str(out), "--section", "probe", "--status", "ok"])
    assert [p.name for p in out.iterdir()] == ["summary.json"]
    assert json.loads((out / "summary.json").read_text())["sections"]["probe"]["status"] == "pending"
    assert len(list(scratch.iterdir())) == 1


def test_suite_names_at_most_seven_files():
    """Seven named files (+ at most one temporary where no folder beside $OUT can be made) <= 8."""
    script = (BENCH / "gpu_suite.sh").read_text()
    cleared = script.split('rm -f "$OUT"/{', 1)[1].split("}", 1)[0].split(",")
    written = {
        name
        for name in (
            "summary.json",
            "log",
            "junit.xml",
            "ops.json",
            "sampler.json",
            "accuracy.json",
            "accuracy.png",
        )
        if name in script
    }
    assert len(written) == 7 and written <= set(cleared)
    assert '"$OUT/overhead.json"' not in script  # kept in summary.json's results instead


def test_suite_test_selection_continues_a_previous_junit(tmp_path):
    """benchmarks/suite_tests.py: the gpu-marked tests plus the named modules, less every test the
    previous invocation's junit holds (call 2 runs only what call 1 did not reach)."""
    (tmp_path / "test_paths.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('n', [1, 2])\ndef test_a(n):\n    pass\n\n"
        "def test_b():\n    pass\n"
    )
    (tmp_path / "test_other.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_marked():\n    pass\n\ndef test_plain():\n    pass\n"
    )
    previous = tmp_path / "previous.xml"
    previous.write_text('<testsuite><testcase classname="test_paths" name="test_a[1]"/></testsuite>')
    info, junit = tmp_path / "info.json", tmp_path / "junit.xml"
    env = dict(
        os.environ,
        PYTHONPATH=str(BENCH),
        EDMFAST_SUITE_TEST_MODULES="test_paths.py",
        EDMFAST_SUITE_PREVIOUS_JUNIT=str(previous),
        EDMFAST_SUITE_TESTS_INFO=str(info),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "suite_tests",
            "-o",
            "markers=gpu",
        ]
        + [f"--junitxml={junit}", "-o", "junit_family=xunit2", "test_paths.py", "test_other.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = {(c.get("classname"), c.get("name")) for c in ET.parse(junit).getroot().iter("testcase")}
    assert ran == {("test_paths", "test_a[2]"), ("test_paths", "test_b"), ("test_other", "test_marked")}
    assert json.loads(info.read_text()) == {"continues_previous": True, "deselected_from_previous": 1}


def test_headline_sections_come_first_and_sd_before_compile(tmp_path):
    """The first invocation must bring back every headline number: sd (the SD CFG vs diffusers
    number) once came after compile with ~80 s left, and the tests (70-120 s) before both."""
    sections = "probe build ops sampler sd compile tests sanitize accuracy overhead"
    env = dict(os.environ, OUT=str(tmp_path / "out"), SUITE_WORK=str(tmp_path / "work"), SUITE_SKIP=sections)
    env.update(PYTHON=sys.executable)
    env.pop("SUITE_SECTIONS", None)
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_suite.sh"), "--rehearse"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    order = json.loads((tmp_path / "out" / "summary.json").read_text())["order"]
    headline = ("ops", "sampler", "sd", "compile")
    assert order.index("sd") < order.index("compile") < order.index("tests")
    assert max(order.index(s) for s in headline) < min(
        order.index(s) for s in ("tests", "sanitize", "accuracy")
    )


def test_skew_check_records_launches_and_compiles_them_for_sm90(tmp_path):
    """benchmarks/skew_check.py end to end on a small selection under whatever is installed: the
    interpreted launches of the product's kernels are recorded and each compiles for sm_90 (Triton's
    front end, LLVM, ptxas: no GPU); the learned-variance ancestral kernels use no ex2.approx."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend to compile with")
    selection = "tests/test_churn.py tests/test_ancestral_step.py -q -k triton"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "skew_check.py"),
            "--any-version",
            "--out",
            str(tmp_path),
            "--workers",
            "2",
        ]
        + ["--pytest-args", selection],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "skew_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["tests"]["passed"] > 0 and report["tests"]["failures"] == 0
    assert report["variants"] > 0 and not report["compile_failures"] and not report["approx_exp"]
    assert "edmfast.triton.ancestral_step._ancestral_step_kernel" in report["kernels"]


def test_tests_collect_without_hypothesis(tmp_path):
    """The GPU image may lack hypothesis: the suite's `pytest -m gpu tests` must still collect every
    module and write its junit (a conftest that imported hypothesis stopped pytest before any test).
    A package named hypothesis that raises ModuleNotFoundError, first on the path, stands for it."""
    fake = tmp_path / "hypothesis"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'hypothesis\'", name="hypothesis")\n'
    )
    path = os.pathsep.join(p for p in (str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
        + ["-m", "gpu", "--co", f"--junitxml={junit}", "tests"],
        env=dict(os.environ, PYTHONPATH=path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the property tests need hypothesis" in proc.stdout, proc.stdout[-3000:]
    assert junit.is_file()


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session this test started (sections run in their own process
    groups under `timeout`, so killing one group would leave them running)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue


@pytest.mark.slow
def test_rehearsal_killed_midway_leaves_valid_partial_summary(tmp_path):
    """Kill the whole suite (SIGKILL, its process group) while a section runs: the summary on disk is
    valid JSON with the finished sections and their numbers, the running one marked running."""
    env = dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        SUITE_WORK=str(tmp_path / "work"),  # a killed suite cannot remove its scratch: pytest does
        SUITE_SECTIONS="probe ops sampler accuracy",
        PYTHON=sys.executable,
    )
    env.pop("TRITON_INTERPRET", None)  # the suite's benchmarks use the CPU backends
    proc = subprocess.Popen(
        ["bash", str(BENCH / "gpu_suite.sh"), "--rehearse"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    summary = tmp_path / "out" / "summary.json"
    deadline = time.monotonic() + 120
    state = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if summary.is_file():
                state = json.loads(summary.read_text())  # every read sees a whole file
                if state["sections"]["sampler"]["status"] == "running":
                    time.sleep(1.0)  # well inside the section
                    break
    finally:
        _kill_session(proc.pid)  # the suite and every section under it, as a device timeout does
        proc.wait()
    assert state is not None and state["sections"]["sampler"]["status"] == "running", state
    state = json.loads(summary.read_text())
    assert state["kind"] == "rehearsal" and not state["complete"]
    assert state["sections"]["probe"]["status"] == "ok" and state["env"]["python"]
    assert state["sections"]["ops"]["status"] == "ok"
    assert state["summary"]["copy_bandwidth_GBps"] > 0  # the finished ops section's number
    assert state["sections"]["sampler"]["status"] == "running"
    assert state["sections"]["accuracy"]["status"] == "pending"
    assert set(state["summary"]) == set(collect_results.SUMMARY_KEYS)
    files = [p.name for p in (tmp_path / "out").iterdir()]
    assert len(files) <= 7 and not [f for f in files if f.startswith(".")], files


@pytest.mark.slow
def test_rehearsal_second_call_skips_what_the_first_finished(tmp_path):
    """The script's side of the two calls: a section call 1 finished is not run again and its numbers
    stay in call 2's summary; the probe runs in every call."""
    env = dict(os.environ, PYTHON=sys.executable, SUITE_WORK=str(tmp_path / "work"))
    env.pop("TRITON_INTERPRET", None)

    def call(out: str, sections: str, **extra: str) -> dict:
        subprocess.run(
            ["bash", str(BENCH / "gpu_suite.sh"), "--rehearse"],
            env=dict(env, OUT=str(tmp_path / out), SUITE_SECTIONS=sections, **extra),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
            check=True,
        )
        return json.loads((tmp_path / out / "summary.json").read_text())

    first = call("call1", "probe ops")
    assert first["sections"]["ops"]["status"] == "ok"
    copy = first["summary"]["copy_bandwidth_GBps"]
    second = call("call2", "probe ops", SUITE_PREVIOUS=str(tmp_path / "call1"))
    assert second["call"] == 2
    assert second["sections"]["probe"]["status"] == "ok"  # every call probes its own machine
    assert second["sections"]["ops"]["status"] == "done-in-call-1"
    assert not (tmp_path / "call2" / "ops.json").exists()  # not run again
    assert second["summary"]["copy_bandwidth_GBps"] == copy
    assert second["summary_source"]["by_key"]["copy_bandwidth_GBps"] == 1
