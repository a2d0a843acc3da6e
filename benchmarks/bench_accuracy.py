"""Accuracy vs NFE for every sampler, on analytic denoisers with exact answers.

* Gaussian data N(mu, s^2 I): the probability-flow ODE has the closed form
  ``x(0) = mu + (x(sigma_max) - mu) s / sqrt(s^2 + sigma_max^2)``; every sampler's output is compared
  with it, sample by sample, from the same latents.
* A Gaussian mixture (curved ODE paths): the reference is a very fine float64 Heun solve
  (`edmfast.reference.sample`, 2048 steps), whose own error is estimated against 1024 steps; errors
  within 10x of it are kept out of the order fits.

Every solver of `edmfast.sample`: EDM's Euler / Heun / midpoint (2nd order, alpha = 0.5) and
k-diffusion's dpm_2, lms, dpmpp_2m, and the ancestral / SDE samplers at eta = 0, their ODE limit (with
noise a single path is not a convergence measure: tests/test_reference_samplers.py checks their
distributions). At eta = 0 four of them are another solver's math exactly (euler_ancestral = euler,
dpm_2_ancestral = dpm_2, dpmpp_2m_sde midpoint = dpmpp_2m, dpmpp_sde r = 1/2 = dpmpp_2s_ancestral):
measured anyway, left out of the chart. The plot shows the median over samples of
``||x - x_exact|| / ||x_exact - mu||`` against NFE, log-log; the order is the least-squares slope of
log error vs log NFE over the last four points (the asymptotic range); the winners at 10, 20 and 50
NFE are runs with the most steps whose NFE fits the budget. Also: rho of the Karras
schedule (Heun) and churn on/off (stochastic sampler, by a distribution distance).

``--impl engine`` runs `edmfast.sample` (float32 state) and falls back to the float64 reference,
saying why, for a solver the engine refuses or whose result on a small probe differs from the
reference's (a solver it does not implement yet); ``--impl reference`` runs the oracle alone.

    python benchmarks/bench_accuracy.py --impl reference   # full sweep (~1 min on 2 loaded CPU cores)
    python benchmarks/bench_accuracy.py --quick            # seconds (CI smoke test)
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
# series name -> sampler options; the ancestral / SDE samplers at eta = 0 (their ODE limit)
SOLVERS: dict[str, dict[str, Any]] = {
    "euler": dict(solver="euler"),
    "heun": dict(solver="heun"),
    "midpoint (2nd, alpha=0.5)": dict(solver="2nd", alpha=0.5),
    "dpm_2": dict(solver="dpm_2"),
    "lms (order 4)": dict(solver="lms"),
    "dpmpp_2m": dict(solver="dpmpp_2m"),
    "dpmpp_2s_ancestral (eta=0)": dict(solver="dpmpp_2s_ancestral", eta=0.0),
    "dpmpp_sde (eta=0, r=0.3)": dict(solver="dpmpp_sde", eta=0.0, r=0.3),
    "dpmpp_2m_sde (eta=0, heun)": dict(solver="dpmpp_2m_sde", eta=0.0, solver_type="heun"),
    "dpmpp_3m_sde (eta=0)": dict(solver="dpmpp_3m_sde", eta=0.0),
    "euler_ancestral (eta=0)": dict(solver="euler_ancestral", eta=0.0),
    "dpm_2_ancestral (eta=0)": dict(solver="dpm_2_ancestral", eta=0.0),
    "dpmpp_sde (eta=0, r=0.5)": dict(solver="dpmpp_sde", eta=0.0),
    "dpmpp_2m_sde (eta=0, midpoint)": dict(solver="dpmpp_2m_sde", eta=0.0),
}
# at eta = 0 these are exactly another series' math (same numbers up to rounding): not plotted
TWINS = {
    "euler_ancestral (eta=0)": "euler",
    "dpm_2_ancestral (eta=0)": "dpm_2",
    "dpmpp_sde (eta=0, r=0.5)": "dpmpp_2s_ancestral (eta=0)",
    "dpmpp_2m_sde (eta=0, midpoint)": "dpmpp_2m",
}
# summary keys: <data>_order_<short>
SHORT = {
    "midpoint (2nd, alpha=0.5)": "midpoint",
    "lms (order 4)": "lms",
    "dpmpp_2s_ancestral (eta=0)": "dpmpp_2s_ancestral",
    "dpmpp_sde (eta=0, r=0.3)": "dpmpp_sde_r0.3",
    "dpmpp_sde (eta=0, r=0.5)": "dpmpp_sde",
    "dpmpp_2m_sde (eta=0, heun)": "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde (eta=0, midpoint)": "dpmpp_2m_sde",
    "dpmpp_3m_sde (eta=0)": "dpmpp_3m_sde",
    "euler_ancestral (eta=0)": "euler_ancestral",
    "dpm_2_ancestral (eta=0)": "dpm_2_ancestral",
}
# two evaluations per step but one into sigma = 0 (Euler there, as EDM and k-diffusion do)
TWO_EVAL = ("heun", "2nd", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde")
WIN_NFE = (10, 20, 50)


def nfe(solver: str, steps: int) -> int:
    """Network evaluations of N steps into sigma = 0: 2N - 1 for the two-stage solvers, else N."""
    return 2 * steps - 1 if solver in TWO_EVAL else steps


class Runner:
    """Runs a sampler on the engine (`edmfast.sample`) or the float64 reference
    (`edmfast.reference.sample`); in engine mode a solver the engine refuses, or whose answer on a
    small probe differs from the reference's, runs on the reference instead (``fallbacks`` says why)."""

    def __init__(self, impl: str, device: torch.device):
        self.impl, self.device = impl, device
        self.fallbacks: dict[str, str] = {}
        self._engine_ok: dict[tuple, bool] = {}

    def _probe(self, opts: dict[str, Any]) -> bool:
        """Whether the engine runs these options' math: 6 Karras steps on a Gaussian, vs float64."""
        key = tuple(sorted((k, repr(v)) for k, v in opts.items() if k not in ("num_steps", "rho", "seeds")))
        if key not in self._engine_ok:
            den = edmfast.analytic.GaussianDenoiser(mu=0.3, s=0.5)
            noise = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0)).to(self.device)
            kw = {k: v for k, v in opts.items() if k not in ("num_steps", "rho", "seeds")}
            if kw.get("noise_mode") == "fused":
                kw["seeds"] = torch.arange(2).to(self.device)
            sig = edmfast.karras_sigmas(6, 0.002, 80.0)
            name = ", ".join(f"{k}={v}" for k, v in kw.items() if k != "seeds")
            try:
                got = edmfast.sample(den, noise, sig, backend="auto", **kw).double().cpu()
            except (ValueError, TypeError, NotImplementedError) as e:
                self.fallbacks[name] = f"the engine refuses it: {type(e).__name__}: {e}"
            else:
                want = edmfast.reference.sample(den, noise.double(), sig, **kw).cpu()
                err = float((got - want).norm() / want.norm())
                if not err < 1e-4:  # float32 state: ~1e-7 when the math is the same
                    self.fallbacks[name] = (
                        f"the engine's result differs from the float64 reference by {err:.2g} (relative): "
                        "it does not run this solver's math yet"
                    )
            self._engine_ok[key] = name not in self.fallbacks
            if name in self.fallbacks:
                print(f"[bench] {name}: using edmfast.reference ({self.fallbacks[name]})", flush=True)
        return self._engine_ok[key]

    def __call__(self, den, noise: torch.Tensor, **opts: Any) -> torch.Tensor:
        if self.impl == "engine" and self._probe(opts):
            return edmfast.sample(den, noise, backend="auto", **opts).double()
        return edmfast.reference.sample(den, noise.double(), **opts)


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


def sweep_solvers(
    run: Runner, den, noise, exact, mu, grid: list[int], floor: float, **extra
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, opts in SOLVERS.items():
        pts = []
        for n in grid:
            x = run(den, noise, num_steps=n, **opts, **extra)
            pts.append({"steps": n, "nfe": nfe(opts["solver"], n), "rel_err": rel(x, exact, mu)})
        order = fit_order([p["nfe"] for p in pts], [p["rel_err"] for p in pts], floor=floor)
        # at a budget of 10 / 20 / 50 NFE: the most steps that fit (run, not interpolated: the
        # multistep solvers' errors are not monotone between grid points)
        budget = {}
        for target in WIN_NFE:
            n = max(k for k in range(1, target + 1) if nfe(opts["solver"], k) <= target)
            x = run(den, noise, num_steps=n, **opts, **extra)
            budget[str(target)] = {"steps": n, "nfe": nfe(opts["solver"], n), "rel_err": rel(x, exact, mu)}
        out[name] = {"points": pts, "order": order, "budget": budget}
        if name in TWINS:
            out[name]["same_math_as"] = TWINS[name]
    return out


def run_all(args: argparse.Namespace, rec: Recorder) -> dict[str, Any]:
    device = torch.device(args.device)
    run = Runner(args.impl, device)
    g = torch.Generator().manual_seed(args.seed)
    grid = [2, 4, 8] if args.quick else [2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    # the solver sweeps go further: multistep methods (dpmpp_3m_sde) reach their asymptotic rate late
    solver_grid = grid if args.quick else [*grid, 96, 128]
    rhos = [1.0, 7.0] if args.quick else [1.0, 3.0, 7.0, 10.0]
    shape = (16, 1, 4, 4) if args.quick else (128, 3, 8, 8)
    # below this an error says more about the arithmetic than the solver: float32 state (engine)
    floor = 1e-6 if args.impl == "engine" else 1e-12
    sections: dict[str, Any] = {}
    config = {
        "mixture_samples": shape[0],
        "impl": args.impl,
        "device": str(device),
        "shape": list(shape),
        "grid_steps": grid,
        "solver_grid_steps": solver_grid,
        "rhos": rhos,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "solvers": SOLVERS,
        "engine_fallbacks": run.fallbacks,
    }

    # ---------------------------------------------------------------- Gaussian: closed-form ODE solution
    mu, s = 0.3, 0.5
    gauss = edmfast.analytic.GaussianDenoiser(mu=mu, s=s)
    noise = torch.randn(shape, generator=g).to(device)
    x_T = noise.double().cpu() * 80.0
    exact_g = gauss.ode_solution(x_T, 80.0, 0.0)

    def gaussian_solvers() -> dict[str, Any]:
        return sweep_solvers(run, gauss, noise, exact_g, mu, solver_grid, floor)

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
                "order": fit_order([p["nfe"] for p in pts], [p["rel_err"] for p in pts], floor=floor),
            }
        return out

    sections["gaussian_solvers"] = rec.guard("gaussian_solvers", gaussian_solvers)
    sections["gaussian_rho"] = rec.guard("gaussian_rho", gaussian_rho)

    # ---------------------------------------------------------------- mixture: fine-step float64 reference
    k = 4 if args.quick else 8
    means = torch.randn((k, *shape[1:]), generator=g, dtype=torch.float64)
    mix = edmfast.analytic.GaussianMixtureDenoiser(means, s=0.1)
    mix_mu = means.mean(0)
    fine = 64 if args.quick else 2048
    mix_noise = noise

    def mixture_reference() -> dict[str, Any]:
        ref = edmfast.reference.sample(mix, mix_noise.double(), num_steps=fine).cpu()
        half = edmfast.reference.sample(mix, mix_noise.double(), num_steps=fine // 2).cpu()
        self_err = rel_batch(half, ref, mix_mu)  # Heun: the fine solve's own error is ~1/3 of this
        return {"ref": ref, "steps": fine, "rel_err_half_steps": self_err}

    mref = rec.guard("mixture_reference", mixture_reference)
    if mref is not None:
        ref_x = mref.pop("ref")
        sections["mixture_reference"] = mref
        # an error within ~10x the fine solve's own is not measured: keep it out of the fits
        mix_floor = max(floor, 3 * mref["rel_err_half_steps"])
        sections["mixture_solvers"] = rec.guard(
            "mixture_solvers",
            lambda: sweep_solvers(run, mix, mix_noise, ref_x, mix_mu, solver_grid, mix_floor),
        )

        def mixture_rho() -> dict[str, Any]:
            out = {}
            for rho in rhos:
                # Heun at fine/2 steps: ~1e-6 off, far below the rho sweep's errors (>= 1e-4 at 64 steps)
                ref_rho = (
                    ref_x
                    if rho == 7.0
                    else edmfast.reference.sample(mix, mix_noise.double(), num_steps=fine // 2, rho=rho).cpu()
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
                    "order": fit_order([p["nfe"] for p in pts], [p["rel_err"] for p in pts], floor=mix_floor),
                }
            return out

        sections["mixture_rho"] = rec.guard("mixture_rho", mixture_rho)

    # ---------------------------------------------------------------- churn on/off: distribution distance
    churn_shape = (64, 1, 4, 4) if args.quick else (2048, 1, 8, 8)
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


def at_nfe(series: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Each solver's error at a budget of 10, 20 and 50 NFE (the most steps that fit)."""
    return {str(n): {name: v["budget"][str(n)]["rel_err"] for name, v in series.items()} for n in WIN_NFE}


def winner(errors: dict[str, float | None]) -> str | None:
    """The solver with the smallest error; a twin (the same math) never displaces its original."""
    ranked = sorted((e, name) for name, e in errors.items() if e is not None and name not in TWINS)
    return ranked[0][1] if ranked else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    sec = result["sections"]
    summary: dict[str, Any] = {}
    for data in ("gaussian", "mixture"):
        solvers = sec.get(f"{data}_solvers") or {}
        for name in solvers:
            summary[f"{data}_order_{SHORT.get(name, name)}"] = solvers[name]["order"]
        if solvers:
            for n, errors in at_nfe(solvers).items():
                summary[f"{data}_winner_at_nfe{n}"] = winner(errors)
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
    fig, axes = plt.subplots(2, 3, figsize=(18, 11))
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
        styles = ["o-", "s-", "^-", "v-", "D-", "x-", "+-", "*-", "<-", ">-"]
        colors = plt.get_cmap("tab10").colors
        plotted = 0
        for label, series in data.items():
            if not isinstance(series, dict) or "points" not in series or label in TWINS:
                continue
            pts = series["points"]
            order = series.get("order")
            tag = f"{label} (order {order:.2f})" if order else label
            ax.plot(
                [p["nfe"] for p in pts],
                [max(p[key], 1e-16) for p in pts],
                styles[plotted % len(styles)],
                color=colors[plotted % len(colors)],
                ms=3,
                lw=1,
                label=tag,
            )
            plotted += 1
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
            for n in WIN_NFE:
                ax.axvline(n, color="gray", lw=0.5, alpha=0.5)
        ax.legend(fontsize=6 if name.endswith("solvers") else 7)
    cfg = result["config"]
    axes.flat[-1].axis("off")
    axes.flat[-1].text(
        0,
        0.95,
        "\n".join(
            [
                f"impl: {cfg['impl']} ({cfg['device']})",
                f"batch shape: {cfg['shape']}",
                f"Karras schedule sigma in [{cfg['sigma_min']}, {cfg['sigma_max']}]",
                "NFE: N, or 2N-1 for the two-stage solvers",
                "ancestral / SDE solvers at eta = 0; not drawn (same math):",
                *[f"  {a} = {b}" for a, b in TWINS.items()],
                "churn: S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003",
                f"date: {result['date']}",
            ]
        ),
        va="top",
        fontsize=9,
        family="monospace",
    )
    fig.suptitle("edmfast sampler accuracy vs NFE: every solver, Karras schedule (rho = 7)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"[bench] wrote {path}", flush=True)


def markdown(record: dict[str, Any], png_name: str | None) -> str:
    out = common.md_header("edmfast sampler accuracy vs NFE", record)
    if png_name:
        out += f"![accuracy vs NFE]({png_name})\n\n"
    cfg = record["config"]
    out += (
        f"impl: `{cfg['impl']}` on {cfg['device']}; Karras schedules (rho = 7) over [{cfg['sigma_min']}, "
        f"{cfg['sigma_max']}] into 0; error = median over samples of ||x - x_exact|| / ||x_exact - mu||. "
        "The ancestral / SDE solvers run at eta = 0, their ODE limit (with noise one path is no convergence "
        "measure; tests/test_reference_samplers.py checks their distributions); at eta = 0 "
        + ", ".join(f"{a} is {b}" for a, b in TWINS.items())
        + " (same math: measured, not plotted, never a winner).\n\n"
    )
    if cfg.get("engine_fallbacks"):
        out += "Run on `edmfast.reference` instead of the engine:\n\n" + "".join(
            f"- {k}: {v}\n" for k, v in cfg["engine_fallbacks"].items()
        )
        out += "\n"
    sec = record["sections"]
    for data in ("gaussian", "mixture"):
        solvers = sec.get(f"{data}_solvers")
        if not solvers:
            continue
        errs = at_nfe(solvers)
        wins = {n: record["summary"].get(f"{data}_winner_at_nfe{n}") for n in errs}
        out += f"## {data}: convergence order and error at {', '.join(map(str, WIN_NFE))} NFE\n\n"
        out += "Winners: " + "; ".join(f"{n} NFE: **{w}**" for n, w in wins.items()) + ".\n\n"
        rows = [
            [f"**{name}**" if name in wins.values() else name, v["order"]]
            + [f"{fmt(errs[n][name])} ({v['budget'][n]['nfe']})" for n in errs]
            for name, v in solvers.items()
        ]
        out += md_table(
            ["solver", "order (slope vs NFE)"] + [f"error within {n} NFE (NFE used)" for n in errs], rows
        )
        out += "\n"
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
        "--impl",
        choices=("engine", "reference"),
        default=None,
        help="edmfast.sample (the engine, float32 state; default), falling back to the reference for a "
        "solver it refuses or does not implement yet, or edmfast.reference.sample (float64)",
    )
    p.add_argument("--engine", choices=("sample", "reference"), default=None, help="older name of --impl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--md-dir", default=None, help="where the Markdown goes (default: --out)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the tensors are small, a second thread only adds barrier waits)",
    )
    args = p.parse_args(argv)
    if args.impl is None:
        args.impl = "reference" if args.engine == "reference" else "engine"
    torch.set_num_threads(args.threads)
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
