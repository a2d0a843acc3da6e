"""Accuracy vs NFE on analytic denoisers with exact answers: EDM's sampler findings, reproduced.

* Gaussian data N(mu, s^2 I): the probability-flow ODE has the closed form
  ``x(0) = mu + (x(sigma_max) - mu) s / sqrt(s^2 + sigma_max^2)``; every sampler's output is compared
  with it, sample by sample, from the same latents.
* A Gaussian mixture (curved ODE paths): the reference is a very fine float64 Heun solve
  (`edmfast.reference.sample`), whose own error is estimated against a solve with half the steps.

Sweeps (deterministic sampler unless said): Euler vs Heun vs the 2nd-order solver with
alpha = 0.5 (midpoint) at equal NFE; rho of the Karras schedule; churn on/off (stochastic
sampler, compared by a distribution distance to the true data law, since paths differ). The
plot shows the median over samples of ``||x - x_exact|| / ||x_exact - mu||`` against NFE, log-log, with the
fitted convergence orders (Euler ~1, Heun ~2: EDM Sec. 3, "Heun's 2nd order method ... at equal NFE").

    python benchmarks/bench_accuracy.py            # full sweep (~1 min on 2 CPU cores)
    python benchmarks/bench_accuracy.py --quick    # seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import Recorder, fmt, md_table  # noqa: E402

import edmfast  # noqa: E402

CHURN = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
SOLVERS = {
    "euler": dict(solver="euler"),
    "heun": dict(solver="heun"),
    "midpoint (2nd, alpha=0.5)": dict(solver="2nd", alpha=0.5),
}


def nfe(solver: str, steps: int) -> int:
    """Network evaluations of N steps: N for Euler, 2N - 1 for 2nd-order (no correction at sigma = 0)."""
    return steps if solver == "euler" else 2 * steps - 1


class Runner:
    """Calls the engine (`edmfast.sample`) or the float64 reference (`edmfast.reference.sample`)."""

    def __init__(self, engine: str, device: torch.device):
        self.engine, self.device = engine, device

    def __call__(self, den, noise: torch.Tensor, **opts: Any) -> torch.Tensor:
        if self.engine == "reference":
            return edmfast.reference.sample(den, noise.double(), **opts)
        return edmfast.sample(den, noise, backend="auto", **opts).double()


def fit_order(nfes: list[int], errs: list[float], floor: float = 1e-6, tail: int = 4) -> float | None:
    """Convergence order: minus the slope of log(error) vs log(NFE) over the last ``tail`` points
    (the asymptotic range; very few steps overshoot), excluding points near the float32 floor."""
    pts = [
        (math.log(n), math.log(e)) for n, e in zip(nfes, errs, strict=True) if e > floor and math.isfinite(e)
    ][-tail:]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(-np.polyfit(x, y, 1)[0])


def rel(out: torch.Tensor, exact: torch.Tensor, mu: torch.Tensor | float) -> float:
    """Median over samples of ``||x_b - x_exact_b|| / ||x_exact_b - mu||``.

    The median, not the batch norm: on the mixture one sample that Euler sends to a neighbouring
    mode (a discrete event, not a rounding error) would otherwise hide the convergence order of
    every other sample; the batch-norm error is kept as ``rel_err_batch``."""
    out, exact = out.double().cpu().flatten(1), exact.double().cpu().flatten(1)
    mu = torch.as_tensor(mu, dtype=torch.float64).flatten()
    return float(((out - exact).norm(dim=1) / (exact - mu).norm(dim=1)).median())


def rel_batch(out: torch.Tensor, exact: torch.Tensor, mu: torch.Tensor | float) -> float:
    out, exact = out.double().cpu(), exact.double().cpu()
    mu = torch.as_tensor(mu, dtype=torch.float64)
    return float((out - exact).norm() / (exact - mu).norm())


def gaussian_fd(x: torch.Tensor, mu: float, s: float) -> float:
    """Fréchet distance per dimension between the samples' diagonal Gaussian fit and N(mu, s^2 I)."""
    flat = x.double().cpu().reshape(x.shape[0], -1)
    m, sd = flat.mean(0), flat.std(0)
    return float((((m - mu) ** 2) + (sd - s) ** 2).mean())


def sweep_solvers(run: Runner, den, noise, exact, mu, grid: list[int], **extra) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, opts in SOLVERS.items():
        pts = []
        for n in grid:
            x = run(den, noise, num_steps=n, **opts, **extra)
            pts.append(
                {"steps": n, "nfe": nfe(opts["solver"], n), "rel_err": rel(x, exact(n, opts, extra), mu)}
            )
        out[name] = {"points": pts, "order": fit_order([p["nfe"] for p in pts], [p["rel_err"] for p in pts])}
    return out


def run_all(args: argparse.Namespace, rec: Recorder) -> dict[str, Any]:
    device = torch.device(args.device)
    run = Runner(args.engine, device)
    g = torch.Generator().manual_seed(args.seed)
    grid = [2, 4, 8] if args.quick else [2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    rhos = [1.0, 7.0] if args.quick else [1.0, 3.0, 7.0, 10.0]
    shape = (16, 1, 4, 4) if args.quick else (1024, 3, 8, 8)
    sections: dict[str, Any] = {}
    config = {
        "mixture_samples": 16 if args.quick else 256,
        "engine": args.engine,
        "device": str(device),
        "shape": list(shape),
        "grid_steps": grid,
        "rhos": rhos,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
    }

    # ---------------------------------------------------------------- Gaussian: closed-form ODE solution
    mu, s = 0.3, 0.5
    gauss = edmfast.analytic.GaussianDenoiser(mu=mu, s=s)
    noise = torch.randn(shape, generator=g).to(device)
    x_T = noise.double().cpu() * 80.0
    exact_g = gauss.ode_solution(x_T, 80.0, 0.0)

    def gaussian_solvers() -> dict[str, Any]:
        return sweep_solvers(run, gauss, noise, lambda n, o, e: exact_g, mu, grid)

    def gaussian_rho() -> dict[str, Any]:
        out = {}
        for rho in rhos:
            pts = [
                {
                    "steps": n,
                    "nfe": nfe("heun", n),
                    "rel_err": rel(run(gauss, noise, num_steps=n, rho=rho), exact_g, mu),
                }
                for n in grid
            ]
            out[f"rho={rho:g}"] = {
                "points": pts,
                "order": fit_order([p["nfe"] for p in pts], [p["rel_err"] for p in pts]),
            }
        return out

    sections["gaussian_solvers"] = rec.guard("gaussian_solvers", gaussian_solvers)
    sections["gaussian_rho"] = rec.guard("gaussian_rho", gaussian_rho)

    # ---------------------------------------------------------------- mixture: fine-step float64 reference
    k = 4 if args.quick else 8
    means = torch.randn((k, *shape[1:]), generator=g, dtype=torch.float64)
    mix = edmfast.analytic.GaussianMixtureDenoiser(means, s=0.1)
    mix_mu = means.mean(0)
    fine = 64 if args.quick else 512
    mix_noise = noise[:256]  # the float64 mixture denoiser is ~30x dearer than the Gaussian one

    def mixture_reference() -> dict[str, Any]:
        ref = edmfast.reference.sample(mix, mix_noise.double().cpu(), num_steps=fine)
        half = edmfast.reference.sample(mix, mix_noise.double().cpu(), num_steps=fine // 2)
        self_err = rel_batch(half, ref, mix_mu)  # Heun: the fine solve's own error is ~1/3 of this
        return {"ref": ref, "steps": fine, "rel_err_half_steps": self_err}

    mref = rec.guard("mixture_reference", mixture_reference)
    if mref is not None:
        ref_x = mref.pop("ref")
        sections["mixture_reference"] = mref
        sections["mixture_solvers"] = rec.guard(
            "mixture_solvers", lambda: sweep_solvers(run, mix, mix_noise, lambda n, o, e: ref_x, mix_mu, grid)
        )

        def mixture_rho() -> dict[str, Any]:
            out = {}
            for rho in rhos:
                ref_rho = (
                    ref_x
                    if rho == 7.0
                    else edmfast.reference.sample(mix, mix_noise.double().cpu(), num_steps=fine, rho=rho)
                )
                pts = [
                    {
                        "steps": n,
                        "nfe": nfe("heun", n),
                        "rel_err": rel(run(mix, mix_noise, num_steps=n, rho=rho), ref_rho, mix_mu),
                    }
                    for n in grid
                ]
                out[f"rho={rho:g}"] = {
                    "points": pts,
                    "order": fit_order([p["nfe"] for p in pts], [p["rel_err"] for p in pts]),
                }
            return out

        sections["mixture_rho"] = rec.guard("mixture_rho", mixture_rho)

    # ---------------------------------------------------------------- churn on/off: distribution distance
    churn_shape = (64, 1, 4, 4) if args.quick else (4096, 3, 8, 8)
    churn_noise = torch.randn(churn_shape, generator=g).to(device)
    seeds = torch.arange(churn_shape[0], dtype=torch.int64).to(device)

    def churn_sweep() -> dict[str, Any]:
        floor = gaussian_fd(gauss.ode_solution(churn_noise.double().cpu() * 80.0, 80.0, 0.0), mu, s)
        out: dict[str, Any] = {"finite_sample_floor": floor}
        for label, extra in (
            ("heun, churn off (ODE)", {}),
            ("heun, churn on", dict(noise_mode="fused", **CHURN)),
            ("euler, churn on", dict(noise_mode="fused", solver="euler", **CHURN)),
        ):
            pts = []
            for n in grid:
                solver = extra.get("solver", "heun")
                x = (
                    run(gauss, churn_noise, num_steps=n, seeds=seeds, **extra)
                    if extra
                    else run(gauss, churn_noise, num_steps=n)
                )
                pts.append({"steps": n, "nfe": nfe(solver, n), "fd_per_dim": gaussian_fd(x, mu, s)})
            out[label] = {"points": pts}
        return out

    sections["gaussian_churn"] = rec.guard("gaussian_churn", churn_sweep)
    return {"config": config, "sections": {k: v for k, v in sections.items() if v is not None}}


def error_at(points: list[dict], target_nfe: int, key: str = "rel_err") -> float | None:
    """Log-log interpolation of the error at a given NFE (None outside the measured range)."""
    xs = [math.log(p["nfe"]) for p in points]
    ys = [math.log(max(p[key], 1e-300)) for p in points]
    t = math.log(target_nfe)
    if not points or t < min(xs) or t > max(xs):
        return None
    return float(math.exp(np.interp(t, xs, ys)))


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    sec = result["sections"]
    summary: dict[str, Any] = {}
    for data in ("gaussian", "mixture"):
        solvers = sec.get(f"{data}_solvers") or {}
        for name, short in (("euler", "euler"), ("heun", "heun"), ("midpoint (2nd, alpha=0.5)", "midpoint")):
            if name in solvers:
                summary[f"{data}_order_{short}"] = solvers[name]["order"]
        if "euler" in solvers and "heun" in solvers:
            nfe_max = min(max(p["nfe"] for p in solvers["euler"]["points"]), 35)
            e, h = error_at(solvers["euler"]["points"], nfe_max), error_at(solvers["heun"]["points"], nfe_max)
            summary[f"{data}_euler_over_heun_error_at_nfe{nfe_max}"] = e / h if e and h else None
        rho = sec.get(f"{data}_rho") or {}
        if rho:
            at = {
                k: error_at(
                    v["points"], 35 if max(p["nfe"] for p in v["points"]) >= 35 else v["points"][-1]["nfe"]
                )
                for k, v in rho.items()
            }
            best = min((v, k) for k, v in at.items() if v is not None)[1] if any(at.values()) else None
            summary[f"{data}_best_rho_at_nfe35"] = best
    churn = sec.get("gaussian_churn")
    if churn:
        last = {k: v["points"][-1]["fd_per_dim"] for k, v in churn.items() if isinstance(v, dict)}
        summary["churn_fd_per_dim_at_max_steps"] = last
        summary["churn_finite_sample_floor"] = churn["finite_sample_floor"]
    summary["heun_beats_euler_at_equal_nfe"] = all(
        (
            summary.get(f"{d}_euler_over_heun_error_at_nfe35")
            or summary.get(f"{d}_euler_over_heun_error_at_nfe8")
            or 0
        )
        > 1
        for d in ("gaussian", "mixture")
        if f"{d}_order_heun" in summary
    )
    return summary


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sec = result["sections"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    panels = [
        ("gaussian_solvers", "Gaussian: ODE error vs NFE (closed form)", "rel_err"),
        ("mixture_solvers", "Gaussian mixture: ODE error vs NFE", "rel_err"),
        ("gaussian_churn", "Gaussian: churn on/off (distribution distance)", "fd_per_dim"),
        ("gaussian_rho", "Gaussian: Heun, rho sweep", "rel_err"),
        ("mixture_rho", "Gaussian mixture: Heun, rho sweep", "rel_err"),
    ]
    for ax, (name, title, key) in zip(axes.flat, panels, strict=False):
        data = sec.get(name)
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations)")
        ax.set_ylabel(
            "||x - x_exact|| / ||x_exact - mu||" if key == "rel_err" else "Fréchet distance per dim"
        )
        ax.grid(True, which="both", alpha=0.3)
        if not data:
            ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center")
            continue
        for label, series in data.items():
            if not isinstance(series, dict) or "points" not in series:
                continue
            pts = series["points"]
            order = series.get("order")
            tag = f"{label} (order {order:.2f})" if order else label
            ax.plot([p["nfe"] for p in pts], [max(p[key], 1e-16) for p in pts], "o-", ms=3, label=tag)
        if name == "gaussian_churn":
            ax.axhline(
                data["finite_sample_floor"],
                color="gray",
                ls=":",
                label="exact ODE samples (finite-sample floor)",
            )
        if key == "rel_err" and name.endswith("solvers"):
            first = next(iter(data.values()))["points"]
            n0, e0 = first[0]["nfe"], first[0]["rel_err"]
            ns = np.array([n0, 200])
            ax.plot(ns, e0 * (ns / n0) ** -1.0, "k:", lw=0.8, label="slope -1")
            ax.plot(ns, e0 * (ns / n0) ** -2.0, "k--", lw=0.8, label="slope -2")
        ax.legend(fontsize=7)
    cfg = result["config"]
    axes.flat[-1].axis("off")
    axes.flat[-1].text(
        0,
        0.95,
        "\n".join(
            [
                f"engine: {cfg['engine']} ({cfg['device']})",
                f"batch shape: {cfg['shape']}",
                f"Karras schedule sigma in [{cfg['sigma_min']}, {cfg['sigma_max']}]",
                "NFE: Euler N, Heun/midpoint 2N-1",
                "churn: S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003",
                f"date: {result['date']}",
            ]
        ),
        va="top",
        fontsize=9,
        family="monospace",
    )
    fig.suptitle("edmfast sampler accuracy vs NFE (EDM Sec. 3-4 findings)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"[bench] wrote {path}", flush=True)


def markdown(record: dict[str, Any], png_name: str | None) -> str:
    out = common.md_header("edmfast sampler accuracy vs NFE", record)
    if png_name:
        out += f"![accuracy vs NFE]({png_name})\n\n"
    out += "## Summary\n\n" + md_table(
        ["key", "value"],
        [
            [k, v if not isinstance(v, dict) else ", ".join(f"{a}: {fmt(b)}" for a, b in v.items())]
            for k, v in record["summary"].items()
        ],
    )
    for name, data in record["sections"].items():
        series = {k: v for k, v in data.items() if isinstance(v, dict) and "points" in v}
        if not series:
            continue
        key = "fd_per_dim" if name == "gaussian_churn" else "rel_err"
        steps = [p["steps"] for p in next(iter(series.values()))["points"]]
        rows = [[label] + [p[key] for p in v["points"]] + [v.get("order")] for label, v in series.items()]
        out += f"\n## {name} ({key} by number of steps)\n\n" + md_table(
            ["series"] + [f"N={n}" for n in steps] + ["order"], rows
        )
    return out + common.md_problems(record)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds: tiny sizes (CI smoke test)")
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--stem", default=None, help="file name stem (default <date>-<machine>-accuracy)")
    p.add_argument(
        "--engine",
        choices=("sample", "reference"),
        default="sample",
        help="edmfast.sample (the engine, float32 state) or edmfast.reference.sample (float64)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--md-dir", default=None, help="where the Markdown goes (default: --out)")
    args = p.parse_args(argv)
    rec = Recorder()
    t0 = time.perf_counter()
    with torch.no_grad():
        result = run_all(args, rec)
    record: dict[str, Any] = {
        "benchmark": "bench_accuracy",
        "mode": "quick" if args.quick else "full",
        "date": common.today(),
        "machine": common.machine_info(),
        "versions": common.versions(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": str(torch.device(args.device).type),
        "config": result["config"],
    }
    record["summary"] = summarize(result)
    record["sections"] = result["sections"]
    stem = args.stem or f"{record['date']}-{common.machine_tag()}-accuracy" + ("-quick" if args.quick else "")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = None
    if not args.no_plot:
        png = rec.guard("plot", lambda: plot({**result, "date": record["date"]}, out_dir / f"{stem}.png"))
        png = f"{stem}.png" if "plot" in rec.sections else None
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    record["errors"], record["skipped"] = rec.errors, rec.skipped
    common.write_results(
        out_dir, stem, record, markdown(record, png), Path(args.md_dir) if args.md_dir else None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
