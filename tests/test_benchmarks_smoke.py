"""The benchmarks must not rot: run them in --quick mode (seconds) and check their JSON layout.

They time nothing here (performance is measured by benchmarks, never by timed tests);
they check that every script runs end to end and writes the documented keys with finite numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CPU_KEYS = (
    "speedup_vs_official_loop_cpu",
    "speedup_vs_k_diffusion_cpu",
    "images_per_s_cpu",
    "sampler_overhead_ratio_cpu",
    "rel_err_vs_float64_cpu",
)
GPU_KEYS = (
    "copy_bandwidth_GBps",
    "kernel_bandwidth_fraction",
    "sampler_overhead_ratio",
    "speedup_vs_official_loop",
    "speedup_vs_diffusers_compiled_cfg_b1",
    "first_compile_s",
    "warm_compile_s",
)
HAS_K_DIFFUSION = (
    importlib.util.find_spec("k_diffusion") is not None and importlib.util.find_spec("torchsde") is not None
)


def run_bench(script: str, out: Path, *args: str) -> dict:
    # extend PYTHONPATH, never replace it: on the GPU machine the carried wheels live on it (/tmp/site)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, EDMFAST_BENCH_DATE="2000-01-01")
    env.pop("TRITON_INTERPRET", None)  # the benchmarks use the CPU backends, not interpreted Triton
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--out", str(out), "--stem", "smoke", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    record = json.loads((out / "smoke.json").read_text())
    assert (out / "smoke.md").read_text().startswith("# ")
    for key in ("machine", "versions", "date", "summary"):
        assert key in record, f"{script}: missing {key!r}"
    assert record["date"] == "2000-01-01"
    return record


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_bench_sampler_cpu_quick(tmp_path):
    record = run_bench("bench_sampler.py", tmp_path, "--quick", "--mode", "cpu", "--contention")
    summary, rows = record["summary"], record["sections"]["cpu"]["rows"]
    assert not record["errors"], record["errors"]
    for key in CPU_KEYS:
        if key == "speedup_vs_k_diffusion_cpu" and not HAS_K_DIFFUSION:
            assert summary[key] is None and "k_diffusion_sample_heun" in record["skipped"] | record["errors"]
            continue
        assert finite(summary[key]), f"{key} = {summary[key]!r}"
    for name in ("edmfast_torch_fused", "official_edm_loop", "denoiser_only_nfe"):
        assert finite(rows[name]["median_s"]) and rows[name]["median_s"] > 0
    # --contention: the same comparison beside one busy process
    assert finite(summary["speedup_vs_official_loop_cpu_contention"])
    assert finite(summary["images_per_s_cpu_contention"])
    if HAS_K_DIFFUSION:
        assert finite(summary["speedup_vs_k_diffusion_cpu_contention"])
    # every sampler agrees with a float64 run of its own algorithm on its own noise
    for name, row in rows.items():
        if "rel_err_vs_float64" in row:
            assert row["rel_err_vs_float64"] < 1e-4, (name, row["rel_err_vs_float64"])


def test_bench_accuracy_quick(tmp_path):
    record = run_bench("bench_accuracy.py", tmp_path, "--quick")
    assert not record["errors"], record["errors"]
    assert (tmp_path / "smoke.png").stat().st_size > 0
    for data in ("gaussian", "mixture"):
        for solver in ("euler", "heun", "midpoint"):
            assert finite(record["summary"][f"{data}_order_{solver}"])
        pts = record["sections"][f"{data}_solvers"]["heun"]["points"]
        assert all(finite(p["rel_err"]) for p in pts)
    assert finite(record["summary"]["churn_finite_sample_floor"])


def test_gpu_summary_layout_without_results():
    """The GPU summary keeps every documented key (as null) when nothing could be measured."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_sampler
    finally:
        sys.path.remove(str(BENCH))
    summary = bench_sampler.gpu_summary({}, None)
    assert tuple(summary) == GPU_KEYS  # exactly the keys
    assert set(summary["kernel_bandwidth_fraction"]) == {"heun_step", "churn", "cfg_rescale"}
    assert set(summary["speedup_vs_official_loop"]) == {"b1", "b64"}
    assert summary["copy_bandwidth_GBps"] is None  # nothing measured: null, never a stored file's figure
    ops = {
        "rows": [
            dict(op="copy", backend="torch", numel=8, gbs=100.0, frac=1.0),
            dict(op="heun_step", backend="cuda", numel=8, gbs=90.0, frac=0.9),
            dict(op="heun_step", backend="triton", numel=8, gbs=95.0, frac=0.95),
            dict(op="heun_step", backend="torch.compile", numel=8, gbs=99.0, frac=0.99),
        ]
    }
    summary = bench_sampler.gpu_summary({}, ops)
    assert summary["copy_bandwidth_GBps"] == 100.0
    assert summary["kernel_bandwidth_fraction"]["heun_step"] == 0.95  # the best of edmfast's backends


def test_bench_sampler_gpu_code_path_tiny_on_cpu(tmp_path):
    """The GPU sections (official loop, diffusers loops, edmfast) with tiny networks on the CPU."""
    pytest.importorskip("diffusers")
    record = run_bench(
        "bench_sampler.py",
        tmp_path,
        "--mode",
        "gpu",
        "--device",
        "cpu",
        "--tiny",
        "--no-compile",
        "--repeats",
        "1",
        "--tiny-batches",
        "1",
        "--sections",
        "cifar",
        "sd",
    )
    assert not record["errors"], record["errors"]
    assert tuple(record["summary"]) == GPU_KEYS
    cifar = record["sections"]["cifar"]["rows"]["b1"]
    assert cifar["rel_diff_vs_official"] < 1e-3  # the same network and latents: the same images
    sd = record["sections"]["sd"]["rows"]["euler_b1"]
    assert sd["rel_diff_vs_diffusers"] < 1e-3  # the same timesteps, CFG rescale and start point


def _import_bench(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_bench_ops_keeps_every_op_when_one_fails(tmp_path, monkeypatch):
    """One op that raises (torch 2.11 broke three Triton ops this way) is recorded under errors; the
    other ops, the peers and the JSON are still there (it once lost ops.json entirely)."""
    bench_ops = _import_bench("bench_ops")
    real = bench_ops.op_calls

    def broken(backend, t):
        calls = dict(real(backend, t))

        def churn():
            raise IndexError("tuple index out of range")

        calls["churn"] = churn
        return calls

    monkeypatch.setattr(bench_ops, "op_calls", broken)
    monkeypatch.setenv("EDMFAST_TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out" / "ops.json"
    bench_ops.main(
        ["--device", "cpu", "--quick", "--reps", "1", "--peers", "eager,eager_tuned", "--json", str(out)]
    )
    record = json.loads(out.read_text())
    measured = {(r["op"], r["backend"]) for r in record["rows"]}
    assert ("heun_step", "cpu") in measured and ("cfg_rescale", "cpu") in measured
    assert ("churn", "cpu") not in measured and ("churn", "eager_tuned") in measured
    assert [(e["op"], e["backend"]) for e in record["errors"]] == [("churn", "cpu")]
    assert "IndexError" in record["errors"][0]["error"]
    heun = next(r for r in record["rows"] if (r["op"], r["backend"]) == ("heun_step", "cpu"))
    assert finite(heun["speedup_vs_eager"]) and finite(heun["speedup_vs_eager_tuned"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["ops.json", "ops.md"]  # no temporary left


def test_bench_ops_refuses_cuda_without_a_gpu(capsys):
    """The GPU suite asks for --device cuda: without CUDA that is an error, never a CPU benchmark."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    bench_ops = _import_bench("bench_ops")
    with pytest.raises(SystemExit) as e:
        bench_ops.main(["--device", "cuda", "--quick"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_whole_step_peer_is_algorithm_2():
    """The compiled-whole-step peer computes EDM's Algorithm 2 (run uncompiled here: the same code
    inductor compiles) on the same churn draws as the float64 official loop."""
    import torch

    import edmfast

    peers = _import_bench("peers")
    den = edmfast.analytic.GaussianDenoiser(mu=0.1, s=0.5)
    shape, steps = (3, 2, 5, 7), 6
    noise = torch.randn(shape)
    sigmas = edmfast.karras_sigmas(steps)
    churn = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    out = peers.compiled_whole_step_sampler(den, compile_mode=None)(
        noise, sigmas, generator=torch.Generator().manual_seed(5), **churn
    )
    g = torch.Generator().manual_seed(5)
    ref = peers.official_edm_sampler(
        peers.OfficialNet(den),
        noise,
        randn_like=peers.NoiseFeeder([torch.randn(shape, generator=g) for _ in range(steps)]),
        num_steps=steps,
        S_churn=40.0,
        S_min=0.05,
        S_max=50.0,
        S_noise=1.003,
    )
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_bench_flow_quick(tmp_path):
    """Accelerated vs stock tiny FLUX / SD3 pipelines: runs, records finite ratios and errors."""
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    record = run_bench("bench_flow.py", tmp_path, "--quick")
    summary = record["summary"]
    for key in ("flux_speedup_b1", "sd3_cfg_speedup_b1"):
        assert finite(summary[key]) and summary[key] > 0, key
    for key in ("flux_rel_err_vs_stock", "sd3_cfg_rel_err_vs_stock"):
        assert finite(summary[key]) and summary[key] < 1e-5, key  # equal to stock within float32 rounding
    for row in record["sections"]["pipelines"]["rows"]:
        assert row["steps"] == 28 and row["batch"] == 1 and finite(row["network_alone_ms"])
