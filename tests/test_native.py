"""The native extension edmfast._C and its glue edmfast.native.

Build probes, availability messages, argument checks that fire before any launch (the poisoned
out buffer stays untouched), the launcher's own re-checks, exact fp16/bf16 conversions in C++,
thread-count independence, torch.library registration (opcheck, torch.compile), and on a GPU:
CUDA graph capture and replay with new coefficients and seeds, and non-default streams.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, TOL, gpu, poisoned, rel_err

import edmfast
from edmfast import native, ops, reference

needs_C = pytest.mark.skipif(native._C is None, reason="edmfast._C is not built")
_C = native._C


# ----------------------------------------------------------------------------- probes


@needs_C
def test_probes():
    assert _C.version() == edmfast.__version__
    assert isinstance(_C.has_cuda(), bool) and isinstance(_C.has_openmp(), bool)
    count, message = _C.cuda_device_count()
    assert isinstance(count, int) and isinstance(message, str)
    if not _C.has_cuda():
        assert count == 0 and "without CUDA" in message and _C.cuda_runtime_version() == 0
    else:
        assert _C.cuda_runtime_version() >= 11000
        assert (count > 0) == (message == "")


def test_why_unavailable():
    with pytest.raises(ValueError, match="kind"):
        native.why_unavailable("tpu")
    if native._C is None:
        assert "not built" in native.why_unavailable("cpu")
        return
    assert native.why_unavailable("cpu") is None
    reason = native.why_unavailable("cuda")
    usable = _C.has_cuda() and HAS_CUDA and _C.cuda_device_count()[0] > 0
    assert (reason is None) == usable
    if not usable:
        assert isinstance(reason, str) and ("without CUDA" in reason or "device" in reason), reason


def test_cuda_backend_on_cpu_tensors_says_why():
    reason = ops.backend_status("cuda", torch.device("cpu"))
    assert reason is not None and "CUDA tensors" in reason
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.resolve_backend("cuda", torch.device("cpu"))


# ----------------------------------------------------------------------------- argument checks


def _step_args(device="cpu", dtype=torch.float16, batch=2, numel=12):
    return dict(
        x_hat=torch.randn(batch, numel, device=device),
        coef=torch.tensor([1.0, 0.5, 0.25, 0.1, 2.0], device=device),
        out=poisoned((batch, numel), torch.float32, device),
        x_prime=torch.randn(batch, numel, device=device),
        f=torch.randn(2 * batch, numel, device=device).to(dtype),
        k=torch.ones(batch, device=device),
        guidance_scale=2.0,
        noise=None,
        seeds=torch.arange(batch, device=device),
        step=3,
        out_net=poisoned((2 * batch, numel), dtype, device),
    )


BAD_STEP_INPUTS = [
    ("x_hat", lambda a: a.update(x_hat=a["x_hat"].double()), TypeError),
    ("x_prime", lambda a: a.update(x_prime=a["x_prime"][:, :6]), ValueError),
    ("out", lambda a: a.update(out=torch.full((12, 2), float("nan")).t()), ValueError),
    ("f", lambda a: a.update(f=torch.randn(3, 12).half()), ValueError),  # 3 rows for B = 2
    ("f", lambda a: a.update(f=a["f"].int()), TypeError),
    ("k", lambda a: a.update(f=a["f"][:2].contiguous()), ValueError),  # k without CFG rows
    ("k", lambda a: a.update(k=torch.ones(3)), ValueError),
    ("seeds", lambda a: a.update(seeds=a["seeds"].int()), TypeError),
    ("seeds", lambda a: a.update(noise=torch.randn(2, 12)), ValueError),  # noise and seeds
    ("coef", lambda a: a.update(coef=torch.ones(4)), ValueError),
    ("coef", lambda a: a.update(coef=torch.ones(5, dtype=torch.float64)), TypeError),
    (
        "out_net",
        lambda a: a.update(out_net=torch.full((2, 12), float("nan"), dtype=torch.bfloat16)),
        TypeError,
    ),
    (
        "out_net",
        lambda a: a.update(out_net=torch.full((6, 12), float("nan"), dtype=torch.float16)),
        ValueError,
    ),
]


@needs_C
@pytest.mark.parametrize(
    "name,mutate,exc", BAD_STEP_INPUTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_STEP_INPUTS)]
)
def test_bad_step_input_raises_before_launch(name, mutate, exc):
    args = _step_args()
    mutate(args)
    out, out_net = args["out"], args["out_net"]
    x_hat = args.pop("x_hat")
    coef = args.pop("coef")
    # Validation lives at the public boundary (edmfast.ops); native.* are the unchecked entries.
    with pytest.raises(exc, match=rf"\b{name}\b"):
        ops.heun_step(x_hat, coef, backend="cpu", **args)
    assert torch.isnan(out).all() and torch.isnan(out_net).all(), "a kernel ran despite the bad input"


@needs_C
def test_bad_cfg_input_raises_before_launch():
    f = torch.randn(4, 10)
    out = poisoned((2,), torch.float32, "cpu")
    with pytest.raises(ValueError, match="2B"):
        ops.cfg_rescale_factors(torch.randn(3, 10), 7.5, 0.7, out=out, backend="cpu")
    with pytest.raises(ValueError, match="out"):
        ops.cfg_rescale_factors(f, 7.5, 0.7, out=torch.empty(3), backend="cpu")
    with pytest.raises(ValueError, match="guidance_rescale"):
        ops.cfg_rescale_factors(f, 7.5, 1.5, out=out, backend="cpu")
    with pytest.raises(TypeError, match="uncond"):
        ops.cfg_rescale(f[:2], f[2:].half(), 7.5, 0.7, out=torch.empty(2, 10), backend="cpu")
    with pytest.raises(TypeError, match="out"):
        ops.cfg_rescale(f[:2], f[2:], 7.5, 0.7, out=torch.empty(2, 10, dtype=torch.float16), backend="cpu")
    assert torch.isnan(out).all()


@needs_C
def test_launcher_rechecks_arguments():
    """The C++ launchers reject inconsistent calls themselves (null state, bad flags, bad dtype)."""
    x = torch.randn(2, 8)
    h = torch.randn(2, 8)
    coef = torch.ones(16)
    out = torch.empty(2, 8)
    # device, ctx, x, h0..h3, f, k, noise, seeds, coef, out, hist_out, out_net, batch, numel, f_rows,
    # net_rows, dtype, guidance_scale, guidance, step, stage, churn, bad, bad_step
    good = [-1, 1, x.data_ptr(), 0, 0, 0, 0, 0, 0, 0, 0, coef.data_ptr(), out.data_ptr(), 0, 0, 2, 8, 0, 0, 0]
    good += [1.0, 0, 0, 0, False, 0, 0]
    _C.affine_step(*good)
    mutations = [(2, 0), (11, 0), (17, 6), (18, 1), (19, 7), (15, 0), (16, -1)]
    # a churn reads no history buffer and writes no history slot
    mutations += [((3, 24), (h.data_ptr(), True)), ((13, 24), (h.data_ptr(), True))]
    for index, value in mutations:
        bad = list(good)
        for i, v in zip(*((index, value) if isinstance(index, tuple) else ((index,), (value,))), strict=True):
            bad[i] = v
        with pytest.raises(RuntimeError, match="invalid argument"):
            _C.affine_step(*bad)
    with pytest.raises(RuntimeError, match="invalid argument"):
        _C.cfg_rescale_factors(
            -1, 1, x.data_ptr(), x.data_ptr(), out.data_ptr(), 2, 8, 0, 7.5, 2.0, 0, 0, 0, 0, 0
        )


# ----------------------------------------------------------------------------- numerics of the C++ layer


@needs_C
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_conversions_are_exact(dtype):
    """C++ bit-manipulation conversions: every 16-bit pattern widens exactly, and narrowing
    rounds to nearest even exactly like torch, across random float32 bit patterns and specials."""
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, -1)
    widened = poisoned((1, 65536), torch.float32, "cpu")
    coef = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0])  # out = F
    native.heun_step(
        torch.zeros(1, 65536), coef, out=widened, x_prime=None, f=patterns, k=None, guidance_scale=1.0,
        noise=None, seeds=None, step=0, out_net=None,
    )  # fmt: skip
    ref = patterns.float()
    assert ((widened == ref) | (widened.isnan() & ref.isnan())).all()

    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (1 << 18,), generator=gen, dtype=torch.int64).to(torch.int32)
    specials = [65504.0, 65519.99, 65520.0, 5.96e-8, 2.98e-8, 2.9802322e-8, 1e-45, float("inf"), float("nan")]
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8])  # halfway cases
    x = torch.cat([bits.view(torch.float32), torch.tensor(specials), -torch.tensor(specials), ties]).reshape(
        1, -1
    )
    narrowed = poisoned(x.shape, dtype, "cpu")
    native.heun_step(
        x, torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]), out=torch.empty_like(x), x_prime=None, f=None, k=None,
        guidance_scale=1.0, noise=None, seeds=None, step=0, out_net=narrowed,
    )  # fmt: skip
    ref = x.to(dtype)
    # Compared as values: -0 becomes +0 in the kernel (p x + 0 adds the absent operands).
    assert ((narrowed.float() == ref.float()) | (narrowed.isnan() & ref.isnan())).all()


@needs_C
def test_results_do_not_depend_on_thread_count():
    """Fixed chunking and chunk-ordered partial sums: bitwise equal with 1 thread or all."""
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(2, 200_000, generator=gen) * 3 + 1
    args = _step_args(dtype=torch.float32, batch=1, numel=200_000)
    args["f"] = f
    args["out_net"] = torch.empty(2, 200_000)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            k = torch.empty(1)
            native.cfg_rescale_factors(f, 7.5, 0.7, out=k)
            a = dict(args, out=torch.empty(1, 200_000), k=k)
            native.heun_step(a.pop("x_hat"), a.pop("coef"), **a)
            results.append((k, a["out"]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _big_pass(seed: int) -> torch.Tensor:
    """A pass large enough to use the helper threads (B * M >= 2**15), Philox noise included."""
    x = torch.full((3, 40_000), float(seed))
    out = torch.empty_like(x)
    coef = torch.tensor([0.5, 0.0, 0.0, 1.0, 1.0])
    native.heun_step(x, coef, out=out, seeds=torch.tensor([seed, 1, 2]), step=seed)
    return out


@needs_C
def test_concurrent_calls_from_python_threads():
    """The CPU kernels release the GIL and share one helper pool: calls from several threads at
    once (a caller that finds the pool busy runs alone) give the serial results."""
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = [_big_pass(s) for s in range(8)]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                threaded = list(pool.map(_big_pass, range(8)))
                assert all(torch.equal(a, b) for a, b in zip(serial, threaded, strict=True))
    finally:
        torch.set_num_threads(before)


def _child_pass(queue, x, out, coef, seeds) -> None:
    # No torch op here: torch's own OpenMP runtime (libgomp) is not fork-safe once the parent
    # used it. The launch goes to _C directly with 2 threads, so the helper pool must serve it.
    _C.affine_step(
        -1, 2, x.data_ptr(), 0, 0, 0, 0, 0, 0, 0, seeds.data_ptr(), coef.data_ptr(), out.data_ptr(), 0, 0, 3,
        40_000, 0, 0, 0, 1.0, 0, 3, 0, False, 0, 0,
    )  # fmt: skip
    queue.put(float(out.numpy().astype("float64").sum()))


@needs_C
def test_kernels_run_in_a_forked_child():
    """fork() after the helper pool started (a DataLoader worker, say): the child gets a fresh pool
    instead of waiting forever on threads that do not exist there."""
    import multiprocessing

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = float(_big_pass(3).double().sum())  # starts the pool in this process
    finally:
        torch.set_num_threads(before)
    x, out = torch.full((3, 40_000), 3.0), torch.empty(3, 40_000)
    coef, seeds = torch.tensor([0.5, 0.0, 0.0, 1.0, 1.0]), torch.tensor([3, 1, 2])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_pass, args=(queue, x, out, coef, seeds))
    child.start()
    child.join(timeout=30)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "the forked child hung or failed"
    assert queue.get(timeout=5) == want


# ----------------------------------------------------------------------------- torch.library integration


def _op_samples(device):
    a = _step_args(device=device)
    x_hat, coef, out, out_net, seeds = a["x_hat"], a["coef"], a["out"], a["out_net"], a["seeds"]
    row = torch.randn(16, device=device)
    noise = torch.randn(2, 12, device=device)
    hist = [torch.randn(2, 12, device=device) for _ in range(2)]
    bad = torch.full((2,), ops.BAD_NONE, dtype=torch.int32, device=device)
    f = torch.randn(4, 3, 5, device=device)
    w = torch.tensor([3.0], device=device)
    lib = torch.ops.edmfast
    # every argument explicit: the schemas have no defaults (issue 21)
    return [
        (
            lib.affine_step.default,
            (
                x_hat,
                coef,
                out,
                a["f"],
                a["x_prime"],
                None,
                None,
                None,
                None,
                a["k"],
                2.0,
                None,
                None,
                seeds,
                3,
                0,
                out_net,
                None,
                0,
                False,
            ),
        ),  # fmt: skip
        (
            lib.affine_step.default,
            (
                x_hat,
                row,
                out,
                a["f"][:2],
                *hist,
                None,
                None,
                torch.empty_like(out),
                None,
                1.0,
                w,
                noise,
                None,
                0,
                0,
                out_net[:2],
                bad,
                4,
                False,
            ),
        ),  # fmt: skip
        (
            lib.affine_step.default,
            (
                x_hat,
                coef,
                out,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                1.0,
                None,
                None,
                seeds,
                5,
                1,
                out_net,
                None,
                0,
                True,
            ),
        ),  # fmt: skip
        (
            lib.cfg_rescale_factors.default,
            (f, 7.5, 0.7, torch.empty(2, device=device), None, None, None, None),
        ),
        (lib.cfg_rescale.default, (f[:2], f[2:], 7.5, 0.7, torch.empty(2, 3, 5, device=device))),
    ]


def _devices():
    return ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])]


@needs_C
@pytest.mark.parametrize("device", _devices())
def test_opcheck(device):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of every op."""
    if device == "cuda" and native.why_unavailable("cuda"):
        pytest.skip(native.why_unavailable("cuda"))
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


@needs_C
def test_torch_compile_fullgraph():
    """The ops trace without graph breaks and run functionalized (in-place out= semantics kept)."""
    a = _step_args(dtype=torch.float32)
    x_hat, coef, x_prime, f, seeds = a["x_hat"], a["coef"], a["x_prime"], a["f"], a["seeds"]

    def step(x_hat, coef, out, net, k):
        native.cfg_rescale_factors(f, 2.0, 0.5, out=k)
        native.heun_step(
            x_hat, coef, out=out, x_prime=x_prime, f=f, k=k, guidance_scale=2.0, noise=None, seeds=seeds,
            step=3, out_net=net,
        )  # fmt: skip
        return out * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, net, k = torch.empty(2, 12), torch.empty(4, 12), torch.empty(2)
    doubled = compiled(x_hat, coef, out, net, k)
    ref_k = reference.cfg_rescale_factors(f, 2.0, 0.5)
    ref_x, ref_net = reference.heun_step(
        x_hat, coef, x_prime=x_prime, f=f, k=ref_k, guidance_scale=2.0, seeds=seeds, step=3, net_rows=2
    )
    assert rel_err(k, ref_k) <= TOL[torch.float32]
    assert rel_err(out, ref_x) <= TOL[torch.float32] and rel_err(net, ref_net) <= TOL[torch.float32]
    assert torch.equal(doubled, out * 2)


# ----------------------------------------------------------------------------- GPU only


def _require_cuda_backend():
    reason = native.why_unavailable("cuda") if native._C is not None else "edmfast._C is not built"
    if reason:
        pytest.skip(reason)


@gpu
@pytest.mark.gpu
def test_cuda_graph_replays_with_new_coef_and_seeds():
    """Capture CFG factors + heun_step once; replays pick up coef and seeds written in place."""
    _require_cuda_backend()
    dev = torch.device("cuda")
    batch, numel = 3, 3 * 37 * 41
    x_hat = torch.randn(batch, numel, device=dev)
    x_prime = torch.randn(batch, numel, device=dev)
    f = torch.randn(2 * batch, numel, device=dev, dtype=torch.bfloat16)
    coef = torch.tensor([1.0, 0.5, -0.3, 0.2, 0.7, 0, 0, 0], device=dev)
    seeds = torch.tensor([1, 2, 3], device=dev)
    k = torch.empty(batch, device=dev)
    out = torch.empty(batch, numel, device=dev)
    net = torch.empty(2 * batch, numel, device=dev, dtype=torch.bfloat16)

    def body():
        native.cfg_rescale_factors(f, 7.5, 0.7, out=k)
        native.heun_step(
            x_hat, coef, out=out, x_prime=x_prime, f=f, k=k, guidance_scale=7.5, noise=None, seeds=seeds,
            step=11, out_net=net,
        )  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()

    for trial in range(3):
        coef.copy_(torch.tensor([0.9 - 0.1 * trial, 0.4, -0.2 * trial, 0.3, 1.1, 0, 0, 0]))
        seeds.copy_(torch.tensor([10 * trial, 5, -trial]))
        out.fill_(float("nan"))
        net.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_k = reference.cfg_rescale_factors(f, 7.5, 0.7)
        ref_x, ref_net = reference.heun_step(
            x_hat, coef, x_prime=x_prime, f=f, k=ref_k, guidance_scale=7.5, seeds=seeds, step=11, net_rows=2
        )
        assert rel_err(k, ref_k) <= TOL[torch.float32]
        assert rel_err(out, ref_x) <= TOL[torch.float32]
        assert rel_err(net, ref_net) <= TOL[torch.bfloat16]


@gpu
@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream():
    """Launches join torch's current stream: work queued before on a side stream is seen."""
    _require_cuda_backend()
    dev = torch.device("cuda")
    x = torch.zeros(4, 1 << 20, device=dev)
    out = torch.empty_like(x)
    coef = torch.tensor([2.0, 0.0, 0.0, 0.0, 1.0], device=dev)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x.fill_(3.0)  # ordered before the kernel only if the kernel runs on `side`
        native.heun_step(
            x, coef, out=out, x_prime=None, f=None, k=None, guidance_scale=1.0, noise=None, seeds=None,
            step=0, out_net=None,
        )  # fmt: skip
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(x, 6.0))
