"""Bandwidth of the fused ops (heun_step pass B, churn, cfg_rescale, ancestral_step) per backend, vs copy.

For every backend available on the device, at several sizes, reports the median time and two
figures, kept apart on purpose:
  * ``gbs`` / ``frac``: GB/s on the bytes the kernel actually moves, and its fraction of the
    device-to-device copy bandwidth measured in the same run (how well the kernel streams);
  * ``bound_frac``: the op's minimum-traffic bound (every input read once, every output written
    once, at copy bandwidth) over the measured time (how close the op is to the best possible).
They differ for cfg_rescale: its per-sample std needs a reduction pass over cond and uncond before
the pass that writes, so it moves 5 units (2 + 3) against a minimum of 3. Three peers run the same
math in the same process on the same inputs (noise from torch.randn), each op's speedup is
reported against each of them:
  * ``eager``: the step as one would first write it (temporaries for every intermediate);
  * ``eager_tuned``: the strongest eager form: preallocated outputs and noise buffer, ``out=``,
    in-place ``add_(alpha=)`` / ``mul_`` with host scalars (one kernel per term, no allocation);
  * ``torch.compile``: the first form compiled (inductor fuses it into one or two kernels; on the
    CPU the noise is drawn eagerly into a buffer, inductor's own generator being far slower there).
GPU timings replay a CUDA graph of the op (the way the sampler runs it) so Python dispatch is
excluded; they use triton.testing.do_bench (median). CPU timings are time.perf_counter medians.
Each (op, backend) is measured under its own try/except and the JSON rewritten after it: one op
that fails is recorded in ``errors`` and never costs the others.

    python benchmarks/bench_ops.py                  # full run on CUDA if present, else CPU
    python benchmarks/bench_ops.py --quick          # a few seconds (CI smoke run)
    python benchmarks/bench_ops.py --device cpu --threads 1 --sizes 1048576 --json /tmp/ops.json
    python benchmarks/bench_ops.py --device cuda --sizes 67108864,134217728,268435456 --peers eager_tuned
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import collect_results  # noqa: E402

from edmfast import ops  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- timing


def time_cpu(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after two warm-up calls."""
    fn()
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def time_gpu(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of one ``fn`` replayed from a CUDA graph (no Python dispatch in the timing)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up: compilation, workspace allocation
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        from triton.testing import do_bench

        return do_bench(graph.replay, warmup=25, rep=max(reps, 20), return_mode="median") * 1e-3
    except ImportError:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(max(reps, 20)):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e-3)
        return statistics.median(samples)


# ----------------------------------------------------------------------------- workloads


def make_inputs(numel: int, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    m = numel // batch
    g = torch.Generator(device=device).manual_seed(0)
    return dict(
        x_hat=torch.randn(batch, m, device=device, generator=g),
        x_prime=torch.randn(batch, m, device=device, generator=g),
        f=torch.randn(batch, m, device=device, generator=g).to(dtype),
        cond=torch.randn(batch, m, device=device, generator=g).to(dtype),
        uncond=torch.randn(batch, m, device=device, generator=g).to(dtype),
        coef=torch.tensor([0.9, 0.3, -0.7, 0.05, 1.3, 0, 0, 0], device=device),
        seeds=torch.arange(batch, device=device, dtype=torch.int64),
        out=torch.empty(batch, m, device=device),
        out_net=torch.empty(batch, m, device=device, dtype=dtype),
        out_cfg=torch.empty(batch, m, device=device, dtype=dtype),
        k=torch.empty(batch, device=device),
        # the ancestral pass of a 2C-output model: prediction half, then the variance half in [-1, 1]
        f_anc=torch.cat(
            [
                torch.randn(batch, m, device=device, generator=g),
                torch.rand(batch, m, device=device, generator=g),
            ],
            dim=1,
        ).to(dtype),
        coef_anc=torch.tensor([1.02, -0.2, 0.3, 0.7, -4.0, -5.0, 1.0, 0.98], device=device),
    )


def op_calls(backend: str, t: dict) -> dict[str, Callable[[], object]]:
    """The three ops as the sampler calls them (heun_step in its pass-B form, with fused noise)."""
    x_hat, coef, out, out_net, seeds = t["x_hat"], t["coef"], t["out"], t["out_net"], t["seeds"]

    def heun_step():
        ops.heun_step(
            x_hat, coef, out=out, x_prime=t["x_prime"], f=t["f"], seeds=seeds, step=3, out_net=out_net,
            backend=backend,
        )  # fmt: skip

    def churn():
        ops.churn(x_hat, coef, out=out, seeds=seeds, step=3, out_net=out_net, backend=backend)

    def cfg_rescale():
        ops.cfg_rescale(t["cond"], t["uncond"], 7.5, 0.7, out=t["out_cfg"], backend=backend)

    def ancestral_step():
        ops.ancestral_step(
            x_hat, t["f_anc"], t["coef_anc"], out=out, variance="learned_range", clip=True, seeds=seeds,
            step=3, out_net=out_net, backend=backend,
        )  # fmt: skip

    return {
        "heun_step": heun_step,
        "churn": churn,
        "cfg_rescale": cfg_rescale,
        "ancestral_step": ancestral_step,
    }


def torch_step(x_hat, x_prime, f, coef, eps, out, out_net):
    """The pass-B math as plain torch ops in fp32 (the comparison baseline)."""
    x = coef[0] * x_hat + coef[1] * x_prime + coef[2] * f.float() + coef[3] * eps
    out.copy_(x)
    out_net.copy_(coef[4] * x)


def torch_ancestral(x, f, coef, z, out, out_net):
    """The learned_range ancestral step (clipped x0) as plain torch ops in fp32 (the baseline)."""
    n = x.shape[1]
    pred, v = f[:, :n].float(), f[:, n:].float()
    x0 = (coef[0] * x + coef[1] * pred).clamp(-1.0, 1.0)
    frac = (v + 1.0) * 0.5
    logvar = frac * coef[4] + (1.0 - frac) * coef[5]
    x_new = coef[2] * x0 + coef[3] * x + coef[6] * torch.exp(0.5 * logvar) * z
    out.copy_(x_new)
    out_net.copy_(coef[7] * x_new)


PEERS = ("eager", "eager_tuned", "torch.compile")


def naive_ops(randn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Callable[[dict], None]]:
    """The four ops as one would first write them in torch (an expression, temporaries included),
    each a function of the inputs dict ``t``; ``randn(like)`` draws the noise."""

    def heun_step(t: dict) -> None:
        torch_step(t["x_hat"], t["x_prime"], t["f"], t["coef"], randn(t["x_hat"]), t["out"], t["out_net"])

    def churn(t: dict) -> None:
        x = t["x_hat"] + t["coef"][3] * randn(t["x_hat"])
        t["out"].copy_(x)
        t["out_net"].copy_(t["coef"][4] * x)

    def cfg_rescale(t: dict) -> None:
        c, u = t["cond"].float(), t["uncond"].float()
        cfg = u + 7.5 * (c - u)
        k = 0.7 * c.std(dim=1, keepdim=True) / cfg.std(dim=1, keepdim=True) + 0.3
        t["out_cfg"].copy_(k * cfg)

    def ancestral_step(t: dict) -> None:
        torch_ancestral(t["x_hat"], t["f_anc"], t["coef_anc"], randn(t["x_hat"]), t["out"], t["out_net"])

    return {
        "heun_step": heun_step,
        "churn": churn,
        "cfg_rescale": cfg_rescale,
        "ancestral_step": ancestral_step,
    }


def tuned_calls(t: dict, generator: torch.Generator | None) -> dict[str, Callable[[], object]]:
    """The strongest eager form of each op: every buffer preallocated, ``out=`` and in-place ops with
    host scalars (the coefficients a loop knows on the host), noise drawn into a preallocated buffer.
    One kernel per term and no allocation; what it cannot do is fuse the terms into one pass."""
    x_hat, x_prime, f, out, net = t["x_hat"], t["x_prime"], t["f"], t["out"], t["out_net"]
    p, q, r, std, c = t["coef"][:5].tolist()
    eps, tmp = torch.empty_like(x_hat), torch.empty_like(x_hat)

    def heun_step():
        torch.randn(eps.shape, generator=generator, out=eps)
        torch.mul(x_hat, p, out=out)
        out.add_(x_prime, alpha=q).add_(f, alpha=r).add_(eps, alpha=std)
        torch.mul(out, c, out=net)

    def churn():
        torch.randn(eps.shape, generator=generator, out=eps)
        torch.add(x_hat, eps, alpha=std, out=out)
        torch.mul(out, c, out=net)

    def cfg_rescale():
        cond, uncond = t["cond"], t["uncond"]
        torch.sub(cond, uncond, out=tmp)
        tmp.mul_(7.5).add_(uncond)  # cfg = u + w (c - u)
        k = (
            torch.std(cond, dim=1, keepdim=True)
            .float()
            .div_(tmp.std(dim=1, keepdim=True))
            .mul_(0.7)
            .add_(0.3)
        )
        torch.mul(tmp, k, out=t["out_cfg"])

    ax, af, c1, c2, log_beta, log_beta_tilde, s, c_anc = t["coef_anc"].tolist()
    n = x_hat.shape[1]

    def ancestral_step():
        pred, v = t["f_anc"][:, :n], t["f_anc"][:, n:]
        torch.randn(eps.shape, generator=generator, out=eps)
        torch.mul(x_hat, ax, out=out)
        out.add_(pred, alpha=af).clamp_(-1.0, 1.0)  # x0
        # s exp(logvar / 2), logvar = lbt + (v + 1) / 2 (lb - lbt)
        torch.add(v, 1.0, out=tmp)
        tmp.mul_(0.25 * (log_beta - log_beta_tilde)).add_(0.5 * log_beta_tilde).exp_().mul_(eps).mul_(s)
        out.mul_(c1).add_(x_hat, alpha=c2).add_(tmp)
        torch.mul(out, c_anc, out=net)

    return {
        "heun_step": heun_step,
        "churn": churn,
        "cfg_rescale": cfg_rescale,
        "ancestral_step": ancestral_step,
    }


def peer_calls(peer: str, device: torch.device, t: dict) -> dict[str, Callable[[], object]]:
    """One peer's four ops on ``t``. CUDA draws from the default generator (safe to capture in a CUDA
    graph), the CPU from a seeded one; inductor draws its own (torch.randn_like, compiled in)."""
    gen = None if device.type == "cuda" else torch.Generator().manual_seed(1)
    if peer == "eager_tuned":
        return tuned_calls(t, gen)
    if peer == "eager":
        fns = naive_ops(lambda like: torch.randn(like.shape, generator=gen, device=like.device))
    elif peer == "torch.compile" and device.type == "cuda":
        fns = {op: torch.compile(fn) for op, fn in naive_ops(torch.randn_like).items()}
    elif peer == "torch.compile":
        # inductor's own random numbers cost several times torch.randn on the CPU (80 vs 19 ms at 1M
        # elements): the noise is drawn eagerly into a buffer, the rest compiled (the stronger form)
        eps = torch.empty_like(t["x_hat"])
        fns = {op: torch.compile(fn) for op, fn in naive_ops(lambda like: eps).items()}

        def call(fn: Callable[[dict], None]) -> None:
            torch.randn(eps.shape, generator=gen, out=eps)
            fn(t)

        return {op: (lambda fn=fn: call(fn)) for op, fn in fns.items()}
    else:
        raise ValueError(f"peer must be one of {PEERS}, got {peer!r}")
    return {op: (lambda fn=fn: fn(t)) for op, fn in fns.items()}


def min_bytes(op: str, numel: int, dtype: torch.dtype) -> int:
    """The op's minimum traffic: every input read once, every output written once."""
    io = torch.empty((), dtype=dtype).element_size()
    if op == "heun_step":  # read x_hat, x_prime, f; write out, out_net
        return numel * (4 + 4 + io + 4 + io)
    if op == "churn":  # read x; write out, out_net
        return numel * (4 + 4 + io)
    if op == "cfg_rescale":  # read cond, uncond; write out
        return numel * 3 * io
    if op == "ancestral_step":  # read x, f (prediction and variance halves); write out, out_net
        return numel * (4 + 2 * io + 4 + io)
    raise ValueError(f"op must be heun_step, churn, cfg_rescale or ancestral_step, got {op!r}")


def moved_bytes(op: str, numel: int, dtype: torch.dtype) -> int:
    """Bytes edmfast's kernels move. heun_step, churn and ancestral_step are one pass (the minimum;
    the Philox noise is generated, never read). cfg_rescale is two: cfg_rescale_factors reads cond
    and uncond for the per-sample sums, then the apply pass reads both again and writes out: 5
    units, not 3."""
    if op == "cfg_rescale":
        return numel * 5 * torch.empty((), dtype=dtype).element_size()
    return min_bytes(op, numel, dtype)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="network-side dtype (f, out_net)"
    )
    parser.add_argument("--batch", type=int, default=1, help="samples the elements are split into")
    parser.add_argument(
        "--sizes", type=str, default=None, help="comma-separated element counts, e.g. 1e6,4e6"
    )
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few seconds: small sizes, few repetitions")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; both sides)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the results as JSON (and a .md beside it)"
    )
    parser.add_argument("--md", type=Path, default=None, help="the Markdown's path (default: beside --json)")
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"comma-separated peers to compare with, of {', '.join(PEERS)} (default: all three)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="no peers (the same as --peers '')")
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: all four)")
    args = parser.parse_args(argv)
    peers = [] if args.no_baseline else [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in PEERS:
            parser.error(f"--peers: unknown peer {p!r} (known: {', '.join(PEERS)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        # never a CPU measurement under a GPU's name: the GPU suite asks for cuda explicitly
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")

    if args.threads:
        torch.set_num_threads(args.threads)  # the native CPU ops follow torch's thread count
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gpu = device.type == "cuda"
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    elif args.quick:
        sizes = [1 << 20] if gpu else [1 << 16]
    else:
        sizes = [1 << p for p in (20, 24, 26, 27, 28)] if gpu else [1 << p for p in (18, 20, 22)]
    reps = args.reps or (5 if args.quick else 50 if gpu else 15)

    def timer(fn: Callable[[], object]) -> float:
        return time_gpu(fn, reps) if gpu else time_cpu(fn, reps)

    backends = [b for b in (("cuda", "triton") if gpu else ("cpu",)) if ops.backend_status(b, device) is None]
    rows: list[dict] = []
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device.type,
        machine=torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=_version("triton"),
        python=platform.python_version(),
        suite_run=os.environ.get("EDMFAST_SUITE_RUN") or None,
        dtype=args.dtype,
        batch=args.batch,
        quick=args.quick,
        sizes=sizes,
    )

    errors: list[dict] = []

    def save(rows: list[dict], final: bool) -> None:
        lines = table(rows)
        if final:
            print("\n".join(lines))
            for e in errors:
                print(f"ERROR {e['op']} / {e['backend']} at {e['numel']}: {e['error']}")
        if not args.json:
            return
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # renamed into place: a kill between two measurements leaves the previous complete file
        tmp = collect_results.temporary_path(args.json)
        record = dict(meta=dict(meta, complete=final, peers=peers), rows=rows, errors=errors)
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, args.json)
        if final:
            md_path = args.md or args.json.with_suffix(".md")
            md = [f"# bench_ops ({meta['machine']}, {meta['date']})", "", f"`{json.dumps(meta)}`", "", "```"]
            md_path.parent.mkdir(parents=True, exist_ok=True)
            md_path.write_text("\n".join(md + lines + ["```", ""] + [f"- error: {e}" for e in errors]))
            print(f"wrote {args.json} and {md_path}")

    wanted_ops = args.ops.split(",") if args.ops else None

    def measure(backend: str, op: str, fn: Callable[[], object], numel: int, copy_gbs: float) -> None:
        """One (op, backend) at one size, appended to rows; a failure goes to errors, never further."""
        try:
            sec = timer(fn)
        except Exception as e:  # noqa: BLE001 - recorded with its traceback, the other ops go on
            errors.append(dict(op=op, backend=backend, numel=numel, error=f"{type(e).__name__}: {e}",
                               traceback=traceback.format_exc(limit=8)))  # fmt: skip
            save(rows, final=False)
            return
        least = min_bytes(op, numel, dtype)
        # what a peer moves is not known (eager torch makes temporaries): the minimum
        moved = moved_bytes(op, numel, dtype) if backend in backends else least
        gbs = moved / sec / 1e9
        rows.append(
            dict(
                op=op,
                backend=backend,
                numel=numel,
                ms=sec * 1e3,
                moved_bytes=moved,
                min_bytes=least,
                gbs=gbs,
                frac=gbs / copy_gbs,
                bound_frac=least / (copy_gbs * 1e9) / sec,
            )
        )
        # rewritten after every measurement: a run stopped by a time limit keeps what it measured
        save(rows, final=False)

    for numel in sizes:
        numel -= numel % args.batch
        t = make_inputs(numel, args.batch, dtype, device)
        src, dst = t["x_hat"].flatten(), t["out"].flatten()
        copy_s = timer(lambda: dst.copy_(src))  # noqa: B023
        copy_gbs = 8 * numel / copy_s / 1e9
        rows.append(
            dict(
                op="copy",
                backend="torch",
                numel=numel,
                ms=copy_s * 1e3,
                moved_bytes=8 * numel,
                min_bytes=8 * numel,
                gbs=copy_gbs,
                frac=1.0,
                bound_frac=1.0,
            )
        )
        candidates = [(b, lambda b=b, t=t: op_calls(b, t)) for b in backends]
        candidates += [(p, lambda p=p, t=t: peer_calls(p, device, t)) for p in peers]
        for backend, make in candidates:
            try:
                calls = make()
            except Exception as e:  # noqa: BLE001 - a peer that cannot be built here (no inductor...)
                errors.append(dict(op="*", backend=backend, numel=numel, error=f"{type(e).__name__}: {e}"))
                continue
            for op, fn in calls.items():
                if wanted_ops is None or op in wanted_ops:
                    measure(backend, op, fn, numel, copy_gbs)
        ms = {(r["backend"], r["op"]): r["ms"] for r in rows if r["numel"] == numel}
        for row in rows:
            if row["numel"] == numel and row["backend"] in backends:
                for p in peers:
                    if (p, row["op"]) in ms:
                        row[f"speedup_vs_{p}"] = ms[(p, row["op"])] / row["ms"]
        del t
        save(rows, final=False)

    save(rows, final=True)


def table(rows: list[dict]) -> list[str]:
    """GB/s and 'of copy' on the bytes moved; 'of bound': minimum-traffic time at copy GB/s / time;
    one speedup column per peer (its time / this row's)."""
    peers = [p for p in PEERS if any(f"speedup_vs_{p}" in r for r in rows)]
    header = (
        f"{'op':<16}{'backend':<15}{'elements':>12}{'ms':>10}{'GB/s':>9}{'of copy':>9}{'of bound':>10}"
        + "".join(f"{'vs ' + p:>18}" for p in peers)
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        speedups = "".join(
            f"{r[f'speedup_vs_{p}']:>17.2f}x" if f"speedup_vs_{p}" in r else " " * 18 for p in peers
        )
        lines.append(
            f"{r['op']:<16}{r['backend']:<15}{r['numel']:>12}{r['ms']:>10.3f}{r['gbs']:>9.1f}"
            f"{r['frac']:>8.0%}{r['bound_frac']:>10.0%}{speedups}"
        )
    return lines


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
