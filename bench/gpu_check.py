"""One prepared GPU check: correctness of both engines, then timings and memory.

    python3 bench/gpu_check.py --out DIR --commit REV   # on a CUDA machine (e.g. one H100): about
                                                       # 3-5 minutes, new sections stop at --budget-s
    python3 bench/gpu_check.py --dry-run    # on a CPU: tiny shapes, Triton interpreter
    ncu ... python3 bench/gpu_check.py --steps 8   # only 8 Triton-engine steps, for a profiler

1. Correctness on the GPU: the torch and Triton engines against the float64
   reference (`reference_rmi`) for float32 / float16 / bfloat16 logits and a
   few options (loss and d(3.7 * loss)/dlogits, relative error in norm, the
   docs/DESIGN.md section 3 tolerances), confident predictions (logits of +-12, where
   float32 p near 1 would keep too little of 1 - p), logits that barely vary (1e-4:
   the narrow planes' float64 pass, `rmi_triton.narrow`), both engines under
   torch.use_deterministic_algorithms, the Triton engine with NaN-filled internal
   buffers, and two Triton runs compared bitwise.
2. Timings (`triton.testing.do_bench` medians) of forward, backward and
   forward+backward for F.cross_entropy (the floor users know), the published
   formula (float64 region stacks; `reference_rmi` computes exactly that), the
   torch engine on the GPU and the Triton engine; the peak memory each needs
   beyond its inputs; bytes the Triton engine must move over the measured
   device copy bandwidth.
3. torch.compile of a tiny training step with the loss (graph breaks counted,
   values compared with eager).
4. Mixed precision: autocast float16 and bfloat16 logits against float32 (1e-2),
   gradients in the logits' dtype, the same with backward() inside the autocast block
   (both engines); then 300 training steps on the Triton engine
   with the allocated device memory read every 25 (flat after warm-up).
5. Where a Triton-engine step goes (torch.profiler, the first timing shape):
   the GPU time of each of its kernels, of the other (glue) kernels, and
   the step's wall time -- whether the small ops' launches are hidden; the host
   time by op, and a timeline in DIR/triton_step_trace.json.
6. The same step timed side by side as shipped, without the Cholesky check's
   host sync (measurement only), as a CUDA-graph replay (the GPU time alone)
   and under torch.compile (default and "reduce-overhead"): what the host's work
   costs.
7. Max pooling's near-ties on a network's upsampled output (the first timing shape): the
   Triton engine with avg pooling and the softmax's max pooling on random and upsampled
   logits, and the cells that the softmax sends to kernel A's float64 pass for their ties.
8. Issue 3's bars at 16x21x513x513 avg 4, read from 2 and 5: forward+backward
   against cross-entropy's and the published formula's, the extra memory beyond
   the gradient, and kernels A and D's least bytes moved over the copy bandwidth.

The sections run in the order 1, the copy bandwidth, 5, 2, 6, 3, 4, 7 (what the bars need
first, then the step's variants next to the timings whose "eager" they repeat, the checks of
torch.compile and autocast before the max-pooling figures, which no bar reads); a section
that fails or is not started for the time budget is named with its reason in the report
and costs none of the others. The report printed last is the result; `--out DIR`
also holds it as JSON (gpu_check.json, written again after every section, so that a run
stopped at its time limit leaves what it measured).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
import traceback

_ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ARGS.add_argument("--dry-run", action="store_true",
                   help="run on the CPU with tiny shapes through the Triton interpreter")
_ARGS.add_argument("--out", default=os.environ.get("OUT"),
                   help="folder for gpu_check.json and the profiled step's trace (default: $OUT)")
_ARGS.add_argument("--commit", default=os.environ.get("RMI_COMMIT"),
                   help="the commit measured, for the report (default: $RMI_COMMIT, else git's HEAD if "
                        "this checkout has its .git)")
_ARGS.add_argument("--budget-s", type=float, default=None,
                   help="start no new section or timing after this many seconds (the sections that "
                        "feed the bars run first; default 240 on a GPU, none for --dry-run)")
_ARGS.add_argument("--steps", type=int, default=0,
                   help="only run this many Triton-engine forward+backward steps at the first timing "
                        "shape (for an external profiler such as ncu), then exit")
ARGS = _ARGS.parse_args() if __name__ == "__main__" else _ARGS.parse_args([])
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
# what cuBLAS needs for the deterministic-algorithms rows (PyTorch releases before the check's
# removal refuse float64 matrix products there without it); set before CUDA starts
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rmi_triton import RMILoss, reference_rmi, rmi_loss  # noqa: E402
from rmi_triton.engines import triton_engine  # noqa: E402

START = time.time()
DEVICE = torch.device("cpu" if ARGS.dry_run else "cuda")
if __name__ == "__main__" and not ARGS.dry_run and not torch.cuda.is_available():
    _ARGS.error("no CUDA device here (torch " + torch.__version__ + "): run it on a GPU machine, or pass "
                "--dry-run for the CPU rehearsal (tiny shapes through the Triton interpreter, a few minutes)")
# (loss, gradient) relative to the reference fed the same logits, whose gradient comes back in their
# dtype: a half-precision loss is a float32 one (the contract's 1e-2 for half precision let a loss
# rounded to the logits' dtype pass); a half-precision gradient within half an ulp of float16 and
# 1e-3 for bfloat16 (the H200 measured 6e-5; a float32 -> bfloat16 cast by truncation gives 4e-3).
# The interpreter truncates (a GPU rounds to nearest): the dry run allows a whole bfloat16 ulp.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-5, 2.0 ** -11),
       torch.bfloat16: (1e-5, 2.0 ** -7 if ARGS.dry_run else 1e-3)}
GRAD_SCALE = 3.7

if ARGS.dry_run:
    CHECK_SHAPE = (2, 3, 37, 53)
    BENCH_SHAPES = [((2, 3, 37, 53), 4), ((2, 3, 37, 53), 2), ((1, 4, 48, 48), 4), ((1, 6, 32, 32), 4)]
else:
    CHECK_SHAPE = (2, 5, 97, 131)
    BENCH_SHAPES = [((16, 21, 513, 513), 4), ((16, 21, 513, 513), 2), ((8, 19, 768, 768), 4),
                    ((8, 150, 512, 512), 4)]
# confident predictions (logits of +-12): the engines' exact p near 1 (bench/RESULTS.md, 2026-12-07)
CONFIDENT_OPTIONS = [{}, {"probs": "softmax", "pool": "max", "rmi_weight": 0.0}, {"probs": "softmax", "pixel_loss": "ce"}]
# logits all within about 1e-4 of 0: the narrow planes' float64 pass (kernel A's EXACT
# specialisation: float64 exponentials and square roots, which the interpreter takes from numpy)
NARROW_OPTIONS = [{"pool": "max"}, {"probs": "softmax", "pool": "max"}, {"exclude_ignored": True, "pool": "none"}]
# max pooling's near-ties (rmi_triton.narrow.tie_bound): the top half of each image flat, the softmax's
# tied cells pooled again in kernel A's EXACT pass
TIE_OPTIONS = [{"pool": "max"}, {"probs": "softmax", "pool": "max"}, {"probs": "softmax", "pool": "max", "pixel_loss": "ce"}]
CHECK_OPTIONS = [
    {},
    {"pool": "max"},
    {"pool": "interp"},
    {"probs": "softmax", "pixel_loss": "ce", "class_weights": [0.5, 1.0, 2.0, 1.5, 0.7]},
    {"exclude_ignored": True},
    {"radius": 5, "pool_size": 2},
    {"radius": 1, "pool": "none"},
]
PROVIDERS = ["cross_entropy", "published_f64", "torch_engine", "triton_engine"]
REPLAY_TOLERANCE = 1e-6  # the CUDA-graph replay's loss and gradient against eager's, relative


def log(*parts):
    print(f"[{time.time() - START:6.1f}s]", *parts, flush=True)


def over_budget() -> bool:
    budget = ARGS.budget_s if ARGS.budget_s is not None else float("inf") if ARGS.dry_run else 240.0
    return time.time() - START > budget


def random_inputs(shape, dtype=torch.float32, seed=0, ignore_frac=0.05, confident=None, scale=2.0, flat_half=False):
    """Logits N(0, scale^2), or (confident=A) A (2 y - 1) + 0.3 noise: a confident prediction, p
    within exp(-A) of its label, where float32 p near 1 would keep too little of 1 - p;
    flat_half: the top half of each image at 1e-4 N(0, 1), where max pooling's cells tie."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, c, h, w = shape
    logits = torch.randn(n, c, h, w, generator=g) * scale
    if flat_half:
        logits[:, :, :h // 2] *= 1e-4 / scale
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < ignore_frac] = 255
    if confident is not None:
        one_hot = F.one_hot(torch.where(labels == 255, 0, labels), c).permute(0, 3, 1, 2).float()
        logits = confident * (2 * one_hot - 1) + 0.15 * logits
    return logits.to(dtype).to(DEVICE), labels.to(DEVICE)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def loss_and_grad(fn, logits, labels):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels)
    (loss * GRAD_SCALE).backward()
    return loss.detach(), x.grad


# ----------------------------------------------------------------------------
# 1. correctness
# ----------------------------------------------------------------------------

def check_correctness():
    rows = []
    cases = [(opts, torch.float32, {}) for opts in CHECK_OPTIONS]
    cases += [(opts, dt, {}) for dt in (torch.float16, torch.bfloat16)
              for opts in ({}, {"probs": "softmax", "pixel_loss": "ce"}, {"pool": "max"})]
    cases += [(opts, torch.float32, {"confident": 12.0}) for opts in CONFIDENT_OPTIONS]
    cases += [(opts, torch.float32, {"scale": 1e-4}) for opts in NARROW_OPTIONS]
    cases += [(opts, torch.float32, {"flat_half": True}) for opts in TIE_OPTIONS]
    # under torch.use_deterministic_algorithms (ops that raise there on CUDA only: a float
    # cumsum, a product scatter_reduce, the interpolation's backward)
    cases += [(dict(opts, deterministic=True), torch.float32, {})
              for opts in ({}, {"pool": "max"}, {"pool": "interp"}, {"probs": "softmax", "pixel_loss": "ce"})]
    triton_engine.FILL_OUTPUTS_WITH_NAN = True
    try:
        for i, (opts, dtype, logit_kind) in enumerate(cases):
            deterministic = opts.pop("deterministic", False)
            logits, labels = random_inputs(CHECK_SHAPE, dtype, seed=100 + i, **logit_kind)
            if opts.get("class_weights") is not None:
                opts = dict(opts, class_weights=opts["class_weights"][:CHECK_SHAPE[1]])
            ref_loss, ref_grad = loss_and_grad(lambda x, y: reference_rmi(x.double(), y, **opts).loss,
                                               logits, labels)
            loss_tol, grad_tol = TOL[dtype]
            for backend in ("torch", "triton"):
                row = dict(backend=backend, dtype=str(dtype).split(".")[-1], options=opts or "defaults",
                           loss_rel=float("nan"), grad_rel=float("nan"), ok=False)
                if "confident" in logit_kind:
                    row["options"] = f"{row['options']}, logits +-{logit_kind['confident']:g}"
                if "scale" in logit_kind:
                    row["options"] = f"{row['options']}, logits {logit_kind['scale']:g} N(0, 1)"
                if "flat_half" in logit_kind:
                    row["options"] = f"{row['options']}, top half flat"
                if deterministic:
                    row["options"] = f"{row['options']}, deterministic algorithms"
                before = torch.are_deterministic_algorithms_enabled()
                try:  # one failing case must not cost the rest of the run's report
                    torch.use_deterministic_algorithms(deterministic)
                    loss, grad = loss_and_grad(lambda x, y: rmi_loss(x, y, backend=backend, **opts),
                                               logits, labels)
                    row.update(loss_rel=rel_err(loss, ref_loss), grad_rel=rel_err(grad, ref_grad))
                    row["ok"] = row["loss_rel"] <= loss_tol and row["grad_rel"] <= grad_tol and grad.dtype == dtype
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                finally:
                    torch.use_deterministic_algorithms(before)
                log("check", row)
                rows.append(row)
        try:
            logits, labels = random_inputs(CHECK_SHAPE, seed=7)
            fn = lambda x, y: rmi_loss(x, y, backend="triton", probs="softmax")  # noqa: E731
            first, second = loss_and_grad(fn, logits, labels), loss_and_grad(fn, logits, labels)
            same = torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
            rows.append(dict(backend="triton", dtype="float32", options="two runs bitwise identical",
                             loss_rel=0.0, grad_rel=0.0, ok=same))
            cl = logits.to(memory_format=torch.channels_last)
            cl_loss, cl_grad = loss_and_grad(fn, cl, labels)
            rows.append(dict(backend="triton", dtype="float32", options="channels_last vs contiguous",
                             loss_rel=rel_err(cl_loss, first[0]), grad_rel=rel_err(cl_grad, first[1]),
                             ok=rel_err(cl_grad, first[1]) < 1e-6 and cl_grad.is_contiguous(
                                 memory_format=torch.channels_last)))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append(dict(backend="triton", dtype="float32", options="determinism and channels_last",
                             loss_rel=float("nan"), grad_rel=float("nan"), ok=False,
                             error=f"{type(exc).__name__}: {exc}"[:300]))
    finally:
        triton_engine.FILL_OUTPUTS_WITH_NAN = False
    return rows


# ----------------------------------------------------------------------------
# 2. timings and memory
# ----------------------------------------------------------------------------

def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn):
    """Median milliseconds of fn()."""
    if DEVICE.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def provider_loss(name, pool_size):
    if name == "cross_entropy":
        return lambda x, y: F.cross_entropy(x, y.long(), ignore_index=255)
    if name == "published_f64":
        return lambda x, y: reference_rmi(x, y, pool_size=pool_size).loss
    backend = "torch" if name == "torch_engine" else "triton"
    return lambda x, y: rmi_loss(x, y, backend=backend, pool_size=pool_size, validate=False)


def published_fits(shape):
    """The float64 formula keeps about a dozen full-resolution float64 maps alive."""
    if DEVICE.type != "cuda":
        return True
    n, c, h, w = shape
    free, _ = torch.cuda.mem_get_info()
    return n * c * h * w * 8 * 14 < 0.8 * free


def measure_copy_bandwidth():
    """Bytes read + written per second of a large device-to-device copy."""
    if DEVICE.type != "cuda":
        return None
    src = torch.empty(1 << 28, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * (1 << 28) * 4 / (ms * 1e-3)


def time_provider(name, shape, pool_size):
    logits, labels = random_inputs(shape, seed=1)
    row = dict(shape="x".join(map(str, shape)), pool=f"avg {pool_size}", provider=name,
               logits_mb=logits.numel() * logits.element_size() / 2**20)
    if name == "published_f64" and not published_fits(shape):
        row["note"] = "skipped: needs more memory than the GPU has free"
        return row
    loss_fn = provider_loss(name, pool_size)
    x = logits.detach().clone().requires_grad_(True)
    try:
        # peak memory beyond the inputs, one forward+backward
        sync()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        loss = loss_fn(x, labels)
        sync()
        if DEVICE.type == "cuda":  # the forward's peak: when a network's activations are all held
            row["fwd_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        torch.autograd.grad(loss, x)
        sync()
        if DEVICE.type == "cuda":
            row["extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del loss
        t0 = time.time()
        row["fwd_ms"] = bench_ms(lambda: loss_fn(x, labels))
        loss = loss_fn(x, labels)
        row["bwd_ms"] = bench_ms(lambda: torch.autograd.grad(loss, x, retain_graph=True))
        del loss
        row["full_ms"] = bench_ms(lambda: torch.autograd.grad(loss_fn(x, labels), x))
        row["seconds"] = time.time() - t0
    except torch.cuda.OutOfMemoryError:
        row["note"] = "out of memory"
    except Exception as exc:  # noqa: BLE001 - one provider's failure must not cost the other rows
        row["note"] = f"error: {type(exc).__name__}: {exc}"[:300]
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    if name == "triton_engine":
        n, c, h, w = shape
        # the least a fused forward+backward can move: logits read twice
        # (forward, backward), labels read twice, the gradient written once
        row["bytes"] = 3 * n * c * h * w * logits.element_size() + 2 * n * h * w * labels.element_size()
    return row


def run_timings(bandwidth):
    rows = []
    for shape, pool_size in BENCH_SHAPES:
        for name in PROVIDERS:
            if over_budget():
                rows.append(dict(shape="x".join(map(str, shape)), pool=f"avg {pool_size}", provider=name,
                                 note="skipped: the run's time budget is spent"))
                continue
            log("timing", name, shape, f"avg {pool_size}")
            row = time_provider(name, shape, pool_size)
            if "bytes" in row and bandwidth and "full_ms" in row:
                row["bw_fraction"] = row["bytes"] / (row["full_ms"] * 1e-3) / bandwidth
            log("timed", row)
            rows.append(row)
    return rows


def triton_step(seed):
    """The Triton engine's loss at the first timing shape -> (its shape and pooling as a dict,
    loss_fn, logits requiring grad, labels, one forward+backward as a function)."""
    shape, pool_size = BENCH_SHAPES[0]
    logits, labels = random_inputs(shape, seed=seed)
    x = logits.detach().clone().requires_grad_(True)
    loss_fn = provider_loss("triton_engine", pool_size)
    header = dict(shape="x".join(map(str, shape)), pool=f"avg {pool_size}")
    return header, loss_fn, x, labels, lambda: torch.autograd.grad(loss_fn(x, labels), x)


def profile_triton_step(steps=5):
    """GPU time per kernel of a Triton-engine forward+backward (mean over `steps` after
    warm-up) against its wall time. On the CPU dry run there are no GPU kernels: the
    section then reports the wall time only, which still runs this code."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    result = dict(steps=steps)
    try:
        header, _, _, _, step = triton_step(seed=2)
        result.update(header)
        for _ in range(2):
            step()
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            result["wall_ms"] = (time.perf_counter() - t0) * 1e3 / steps
        # launches and GPU ms a step of each kernel, the glue's together as "other"
        kernels = {name: [0, 0.0] for name in triton_engine.KERNEL_NAMES + ("other",)}
        for event in prof.events():
            if event.device_type != DeviceType.CUDA:
                continue
            name = next((k for k in triton_engine.KERNEL_NAMES if k in event.name), "other")
            kernels[name][0] += 1 / steps
            kernels[name][1] += event.time_range.elapsed_us() * 1e-3 / steps
        result["kernels"] = kernels
        result["gpu_ms"] = sum(ms for _, ms in kernels.values())
        # host time by op and a timeline, for reading after the run
        result["host_table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        if ARGS.out:
            os.makedirs(ARGS.out, exist_ok=True)
            prof.export_chrome_trace(os.path.join(ARGS.out, "triton_step_trace.json"))
    except Exception as exc:  # noqa: BLE001 - a breakdown must not cost the rest of the report
        result["error"] = f"{type(exc).__name__}: {exc}"[-300:]
    return result


def time_step_variants():
    """Where a Triton-engine step's wall time goes (the first timing shape), timed side
    by side: eager as shipped; eager without the Cholesky check's host sync (unsafe:
    measurement only); the step captured in a CUDA graph and replayed (no host work at
    all: the GPU time alone; the loss's own capture path, its value and gradient checked
    against eager); the loss as a graphed callable in an eager step (checked the same way);
    the loss under torch.compile (inductor fuses the glue), and compiled
    with mode="reduce-overhead" (inductor replays it as CUDA graphs)."""
    from rmi_triton import algebra

    result, loss_fn, x, labels, step = triton_step(seed=3)

    def guarded(name, measure):
        if over_budget():
            result[name] = "skipped: the run's time budget is spent"
            return
        try:
            result[name] = measure()
        except Exception as exc:  # noqa: BLE001 - a variant must not cost the report
            result[name] = f"{type(exc).__name__}: {exc}"[:200]
        log("variant", name, result[name])

    guarded("eager_ms", lambda: bench_ms(step))
    checked = algebra._all_factored
    algebra._all_factored = lambda info: True  # no sync: measurement only
    try:
        guarded("eager_no_sync_ms", lambda: bench_ms(step))
    finally:
        algebra._all_factored = checked

    def loss_and_grad():
        loss = loss_fn(x, labels)
        return (loss.detach(),) + torch.autograd.grad(loss, x)

    def graph_replay():
        if DEVICE.type != "cuda":
            return None
        want = loss_and_grad()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                loss_and_grad()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = loss_and_grad()
        graph.replay()
        sync()
        errors = rel_err(got[0], want[0]), rel_err(got[1], want[1])
        result["graph_replay_check"] = f"loss rel err {errors[0]:.1e}, gradient rel err {errors[1]:.1e} against eager"
        result["graph_replay_rel"] = max(errors)
        return bench_ms(graph.replay)

    guarded("graph_replay_ms", graph_replay)

    def graphed_loss():
        """The loss alone made a graphed callable (torch.cuda.make_graphed_callables): an eager
        training loop replays its forward and backward graphs, copying the logits in."""
        if DEVICE.type != "cuda":
            return None
        want = loss_and_grad()
        graphed = torch.cuda.make_graphed_callables(loss_fn, (x, labels))
        loss = graphed(x, labels)
        got = (loss.detach(),) + torch.autograd.grad(loss, x)
        sync()
        result["graphed_loss_check"] = f"loss rel err {rel_err(got[0], want[0]):.1e}, " \
                                       f"gradient rel err {rel_err(got[1], want[1]):.1e} against eager"
        return bench_ms(lambda: torch.autograd.grad(graphed(x, labels), x))

    guarded("graphed_loss_ms", graphed_loss)
    compiled = torch.compile(loss_fn, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    guarded("compiled_ms", lambda: bench_ms(lambda: torch.autograd.grad(compiled(x, labels), x)))
    if DEVICE.type == "cuda":  # inductor's CUDA graphs: the compiled step replayed, no per-op host work
        graphed = torch.compile(loss_fn, mode="reduce-overhead")
        guarded("compiled_reduce_overhead_ms",
                lambda: bench_ms(lambda: torch.autograd.grad(graphed(x, labels), x)))
    return result


def upsampled_logits(shape, seed, factor=8):
    """Logits as a network's head gives them: drawn at 1/factor of the size (N(0, 9)) and
    upsampled as `rmi_triton.models` upsample (bilinear, align_corners=False), so that each
    image's first and last rows and columns repeat; the labels of `random_inputs`."""
    n, c, h, w = shape
    logits, labels = random_inputs(shape, seed=seed)
    coarse = logits[:, :, ::factor, ::factor] * 1.5
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).contiguous(), labels


def time_max_pooling():
    """Max pooling's near-ties on a network's output (the first timing shape): the Triton
    engine's forward+backward with avg pooling and with the softmax's max pooling, on random
    logits and on `upsampled_logits`. There the repeated edges tie every window exactly (equal
    p; at some size ratios the interpolation's rounding leaves edge pixels an ulp apart
    instead): the softmax's tied cells (kernel A's TIE_BIT) are pooled again in kernel A's
    EXACT pass, which runs over every block that holds one (reasoned: most blocks hold an
    image's edge cell). With each: the tied cells and the planes flagged for their ties
    alone, counted in a run before the timing."""
    shape, pool_size = BENCH_SHAPES[0]
    rows = []
    for kind in ("random", "upsampled 8x"):
        logits, labels = random_inputs(shape, seed=5) if kind == "random" else upsampled_logits(shape, seed=5)
        x = logits.detach().clone().requires_grad_(True)
        del logits
        for options in ({}, {"probs": "softmax", "pool": "max"}):
            row = dict(logits=kind, options=options or "defaults")
            rows.append(row)
            if over_budget():
                row["note"] = "skipped: the run's time budget is spent"
                continue
            loss_fn = lambda x, y, o=options: rmi_loss(x, y, backend="triton", pool_size=pool_size,  # noqa: E731
                                                       validate=False, **o)
            real, counts = triton_engine._launch_narrow, {}

            def spy(*args, **kwargs):
                flags = real(*args, **kwargs)
                ties = args[6] if len(args) > 6 else kwargs.get("ties")
                if ties is not None:
                    counts.update(tied_cells=int(((ties & triton_engine.TIE_BIT.value) != 0).sum()),
                                  tie_planes=int((flags == 2).sum()), cells=ties.numel())
                return flags

            triton_engine._launch_narrow = spy
            try:
                torch.autograd.grad(loss_fn(x, labels), x)
                triton_engine._launch_narrow = real
                row.update(counts)
                if options and not counts:
                    row["note"] = "no arg-max reached _launch_narrow: tied cells not counted"
                row["full_ms"] = bench_ms(lambda: torch.autograd.grad(loss_fn(x, labels), x))
            except Exception as exc:  # noqa: BLE001 - one case must not cost the others
                row["note"] = f"error: {type(exc).__name__}: {exc}"[:300]
            finally:
                triton_engine._launch_narrow = real
            log("max pooling", row)
    return dict(shape="x".join(map(str, shape)), pool_size=pool_size, rows=rows)


# ----------------------------------------------------------------------------
# 3. torch.compile of a tiny training step
# ----------------------------------------------------------------------------

def check_compile():
    torch.manual_seed(0)
    c = 4
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, c, 1)).to(DEVICE)
    crit = RMILoss(c, backend="triton", validate=False)
    images = torch.randn(2, 3, 33, 35, device=DEVICE)
    labels = torch.randint(0, c, (2, 33, 35), device=DEVICE)

    def forward(imgs, labs):  # the compiled part: network and loss (backward runs from its graph)
        return crit(model(imgs), labs)

    def step(fn, imgs, labs):
        loss = fn(imgs, labs)
        loss.backward()
        return loss.detach()

    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    result = dict(backend=backend)
    try:
        explain = torch._dynamo.explain(forward)(images, labels)
        result["graph_breaks"] = explain.graph_break_count
        result["break_reasons"] = sorted({str(b.reason).splitlines()[0][:80] for b in explain.break_reasons})
        model.zero_grad()
        eager = step(forward, images, labels)
        eager_grad = model[0].weight.grad.clone()
        model.zero_grad()
        got = step(torch.compile(forward, backend=backend, fullgraph=True), images, labels)
        result["loss_rel"] = rel_err(got, eager)
        result["grad_rel"] = rel_err(model[0].weight.grad, eager_grad)
        result["ok"] = result["loss_rel"] < 1e-5 and result["grad_rel"] < 1e-4
    except Exception as exc:  # noqa: BLE001 - reported in the table
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result


def check_autocast_and_soak(iterations=300, block=25):
    """Mixed precision (autocast float16 and bfloat16 vs float32) and memory stability:
    `iterations` training steps with the Triton engine, allocated memory read every `block`."""
    torch.manual_seed(0)
    c = 5
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, c, 1)).to(DEVICE)
    crit = RMILoss(c, backend="triton")
    h, w = (24, 28) if ARGS.dry_run else (96, 104)
    images = torch.randn(4, 3, h, w, device=DEVICE)
    labels = torch.randint(0, c, (4, h, w), device=DEVICE)
    result = dict(autocast={}, soak_iterations=iterations)
    try:
        reference = crit(model(images), labels).item()
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(DEVICE.type, dtype=dtype):
                logits = model(images)
                loss = crit(logits, labels)
            logits.retain_grad()
            loss.backward()
            # backward() inside the autocast block, both engines: the same gradient as outside it
            inside = {}
            for backend in ("triton", "torch"):
                outside_x = logits.detach().clone().requires_grad_()
                inside_x = logits.detach().clone().requires_grad_()
                loss_fn = RMILoss(c, backend=backend)
                with torch.autocast(DEVICE.type, dtype=dtype):
                    outside_loss = loss_fn(outside_x, labels)
                outside_loss.backward()
                with torch.autocast(DEVICE.type, dtype=dtype):
                    loss_fn(inside_x, labels).backward()
                # the Triton engine bitwise; the torch engine's scatter adds on CUDA run in no fixed
                # order, so its two gradients may differ by a rounding of the logits' dtype
                inside[backend] = bool(torch.equal(inside_x.grad, outside_x.grad)) if backend == "triton" \
                    else rel_err(inside_x.grad, outside_x.grad) <= 1e-3
            result["autocast"][str(dtype).replace("torch.", "")] = dict(
                logits=str(logits.dtype).replace("torch.", ""), loss=str(loss.dtype).replace("torch.", ""),
                rel=abs(loss.item() - reference) / abs(reference),
                grad_dtype=str(logits.grad.dtype).replace("torch.", ""),
                finite=bool(torch.isfinite(logits.grad).all()), backward_inside=inside)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        readings = []
        for step in range(iterations):
            loss = crit(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % block == 0:
                sync()
                readings.append(torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0)
        result["soak_growth_bytes"] = max(readings[1:]) - readings[1]
        result["ok"] = (all(r["rel"] < 1e-2 and r["finite"] and all(r["backward_inside"].values())
                            for r in result["autocast"].values())
                        and result["soak_growth_bytes"] <= 1 << 20)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result


# ----------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------

def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def kernel_bytes(shape, pool_size, logit_bytes=4, label_bytes=8):
    """The least bytes kernels A and D move at a shape with avg pooling (float32 logits, int64
    labels): A reads the logits and labels and writes y' (float32 where pool_size is a power
    of two) and p' (float64) (its EXACT pass reads each image's C flags and, no plane being
    narrow, nothing else); D reads the logits, the labels and dL/dp' (float32) and writes the
    gradient."""
    n, c, h, w = shape
    geo = triton_engine._Geometry(h, w, triton_engine.POOL_AVG, pool_size)
    full, labels, cells = n * c * h * w * logit_bytes, n * h * w * label_bytes, n * c * geo.h_low * geo.w_low
    y_bytes = 4 if pool_size & (pool_size - 1) == 0 else 8
    return {"_pool_forward_kernel": full + labels + cells * (y_bytes + 8),
            "_pool_backward_kernel": 2 * full + labels + cells * 4}


def bars(timings, breakdown, bandwidth, variants=None):
    """Issue 3's bars at the first timing shape (16x21x513x513, avg 4, on a GPU) -> rows of
    (bar, measured, met: True / False / None where a figure is missing); with the step's
    variants, a last row for the time bar read on the step captured in a CUDA graph (another
    way to run the same loss: no host work)."""
    shape, pool_size = BENCH_SHAPES[0]
    key = ("x".join(map(str, shape)), f"avg {pool_size}")
    row = {r["provider"]: r for r in timings if (r["shape"], r["pool"]) == key}
    triton_row = row.get("triton_engine", {})
    ms = {name: row.get(name, {}).get("full_ms") for name in ("cross_entropy", "published_f64", "triton_engine")}
    out = []
    ratio = ms["triton_engine"] / ms["cross_entropy"] if ms["triton_engine"] and ms["cross_entropy"] else None
    out.append(("fwd+bwd <= 1.3x F.cross_entropy", f"{fmt(ratio)}x ({fmt(ms['triton_engine'], '.3f')} / "
                f"{fmt(ms['cross_entropy'], '.3f')} ms)", None if ratio is None else ratio <= 1.3))
    speedup = ms["published_f64"] / ms["triton_engine"] if ms["triton_engine"] and ms["published_f64"] else None
    out.append((">= 20x faster than the published formula", f"{fmt(speedup, '.1f')}x",
                None if speedup is None else speedup >= 20))
    beyond = None
    if "extra_mb" in triton_row:
        beyond = (triton_row["extra_mb"] - triton_row["logits_mb"]) / triton_row["logits_mb"]
    out.append(("extra peak memory beyond the gradient <= 10% of the logits",
                f"{fmt(None if beyond is None else 100 * beyond, '.1f')}%", None if beyond is None else beyond <= 0.10))
    profiled = (breakdown.get("shape"), breakdown.get("pool")) == key
    for name, moved in kernel_bytes(shape, pool_size).items():
        kernel_ms = breakdown.get("kernels", {}).get(name, (0, 0.0))[1] if profiled else 0.0
        fraction = moved / (kernel_ms * 1e-3) / bandwidth if kernel_ms > 0 and bandwidth else None
        out.append((f"{name} >= 60% of copy bandwidth", f"{fmt(None if fraction is None else 100 * fraction, '.0f')}% "
                    f"({moved / 1e6:.0f} MB in {fmt(kernel_ms or None, '.3f')} ms)",
                    None if fraction is None else fraction >= 0.6))
    if variants is not None:
        replay = variants.get("graph_replay_ms")
        replay = replay if isinstance(replay, float) else None
        agrees = variants.get("graph_replay_rel", 0.0) <= REPLAY_TOLERANCE  # absent: figures from before the check
        captured = replay / ms["cross_entropy"] if replay and ms["cross_entropy"] and agrees else None
        out.append(("captured in a CUDA graph: replay <= 1.3x F.cross_entropy (eager)",
                    f"{fmt(captured)}x ({fmt(replay, '.3f')} ms replayed"
                    f"{'' if agrees else ', its loss or gradient differs from eager'})",
                    None if captured is None else captured <= 1.3))
    return out


def print_report(results):
    """The report, from whatever sections ran (a section that failed or was skipped holds its reason)."""
    machine, correctness, bandwidth = results["machine"], results.get("correctness", []), results.get("bandwidth")
    timings, compiled, mixed = results.get("timings", []), results.get("compile", {}), results.get("mixed", {})
    breakdown, variants = results.get("breakdown", {}), results.get("variants", {})
    print()
    print(f"== machine: {machine}")
    bad = [r for r in correctness if not r["ok"]]
    print(f"== correctness vs float64 reference: {len(correctness) - len(bad)}/{len(correctness)} ok "
          f"(loss 1e-5; grad float32 1e-4, float16 {TOL[torch.float16][1]:.1e}, bfloat16 "
          f"{TOL[torch.bfloat16][1]:.1e}; grad of {GRAD_SCALE} * loss)")
    for r in correctness:
        flag = "ok  " if r["ok"] else "FAIL"
        print(f"  {flag} {r['backend']:6s} {r['dtype']:8s} loss {r['loss_rel']:.1e} grad {r['grad_rel']:.1e}  "
              f"{r['options']} {r.get('error', '')}")
    print(f"== torch.compile step ({compiled.get('backend')}): ok={compiled.get('ok')} "
          f"graph_breaks={compiled.get('graph_breaks')} loss_rel={fmt(compiled.get('loss_rel'), '.1e')} "
          f"grad_rel={fmt(compiled.get('grad_rel'), '.1e')} {compiled.get('error', '')}")
    for reason in compiled.get("break_reasons", []):
        print(f"     break: {reason}")
    print(f"== autocast + {mixed.get('soak_iterations', 300)}-step soak: ok={mixed.get('ok')} "
          f"growth of allocated memory after warm-up {mixed.get('soak_growth_bytes')} B {mixed.get('error', '')}")
    for name, r in mixed.get("autocast", {}).items():
        print(f"     autocast {name}: logits {r['logits']}, loss {r['loss']} (rel to float32 {r['rel']:.1e}), "
              f"grad {r['grad_dtype']}, finite={r['finite']}, backward inside the block gives the same "
              f"gradient: {r['backward_inside']}")
    print(f"== device copy bandwidth (read + write): "
          f"{'-' if bandwidth is None else f'{bandwidth / 1e9:.0f} GB/s'}")
    print("== timings: medians in ms (do_bench), RMI providers with validate=False; "
          "extra = peak memory beyond the inputs for one forward+backward, gradient included; "
          "% = extra beyond the gradient, in % of the logits; fwd % = the forward's own peak beyond "
          "the inputs, in % of the logits")
    header = f"{'shape':>16s} {'pool':>5s} {'provider':>14s} {'fwd':>9s} {'bwd':>9s} {'fwd+bwd':>9s} " \
             f"{'extra MiB':>10s} {'%':>5s} {'fwd %':>6s} {'x CE':>7s} {'bw frac':>7s}  note"
    print(header)
    ce = {}
    for r in timings:
        if r["provider"] == "cross_entropy" and "full_ms" in r:
            ce[(r["shape"], r["pool"])] = r["full_ms"]
    for r in timings:
        ratio = None
        if "full_ms" in r and (r["shape"], r["pool"]) in ce:
            ratio = r["full_ms"] / ce[(r["shape"], r["pool"])]
        beyond = fwd_share = None
        if "extra_mb" in r:
            beyond = 100 * (r["extra_mb"] - r["logits_mb"]) / r["logits_mb"]
            fwd_share = 100 * r["fwd_extra_mb"] / r["logits_mb"]
        print(f"{r['shape']:>16s} {r['pool']:>5s} {r['provider']:>14s} {fmt(r.get('fwd_ms')):>9s} "
              f"{fmt(r.get('bwd_ms')):>9s} {fmt(r.get('full_ms')):>9s} {fmt(r.get('extra_mb'), '.0f'):>10s} "
              f"{fmt(beyond, '.0f'):>5s} {fmt(fwd_share, '.0f'):>6s} {fmt(ratio, '.1f'):>7s} "
              f"{fmt(r.get('bw_fraction'), '.2f'):>7s}  "
              f"{r.get('note', '')}")
    print(f"== Triton-engine step, profiled ({breakdown.get('shape')} {breakdown.get('pool')}, mean of "
          f"{breakdown.get('steps')}): wall {fmt(breakdown.get('wall_ms'))} ms, GPU kernels "
          f"{fmt(breakdown.get('gpu_ms'))} ms {breakdown.get('error', '')}")
    for name, (launches, ms) in breakdown.get("kernels", {}).items():
        print(f"     {name:28s} {launches:5.0f} launches {ms:8.3f} ms")
    print(f"== Triton-engine step variants ({variants.get('shape')} {variants.get('pool')}), fwd+bwd medians:")
    for name in ("eager_ms", "eager_no_sync_ms", "graph_replay_ms", "graph_replay_check", "graphed_loss_ms",
                 "graphed_loss_check", "compiled_ms", "compiled_reduce_overhead_ms"):
        value = variants.get(name)
        print(f"     {name:20s} {fmt(value) if isinstance(value, float) else value}")
    ties = results.get("max_pooling", {})
    print(f"== max pooling's near-ties, Triton engine ({ties.get('shape')}, pool size {ties.get('pool_size')}), "
          f"fwd+bwd medians; tied cells (kernel A's TIE_BIT) and planes flagged for their ties: "
          f"{ties.get('error', '')}")
    for r in ties.get("rows", []):
        print(f"     {r['logits']:13s} {str(r['options']):38s} {fmt(r.get('full_ms')):>9s} ms  "
              f"{r.get('tied_cells', '-')} of {r.get('cells', '-')} cells, {r.get('tie_planes', '-')} planes  "
              f"{r.get('note', '')}")
    for name, reason in results.get("not_run", {}).items():
        print(f"== section {name}: {reason}")
    print(f"== the performance targets ({'x'.join(map(str, BENCH_SHAPES[0][0]))} avg {BENCH_SHAPES[0][1]}):")
    for bar, measured, met in bars(timings, breakdown, bandwidth, variants or None):
        print(f"     {'-' if met is None else 'met' if met else 'NOT met':8s} {bar:60s} {measured}")
    print(f"== total {time.time() - START:.0f}s")


def run_steps(steps):
    header, _, _, _, step = triton_step(seed=4)
    for _ in range(steps):
        step()
    sync()
    log(f"{steps} Triton-engine steps at {header['shape']} {header['pool']}")


def commit() -> str:
    if ARGS.commit:
        return ARGS.commit
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_machine() -> str:
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        text = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
                f"{props.multi_processor_count} SMs) torch {torch.__version__} CUDA {torch.version.cuda}")
    else:
        text = f"CPU dry run (Triton interpreter) torch {torch.__version__}"
    try:
        import triton

        text += f" triton {triton.__version__}"
    except ImportError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{text}; {now:%Y-%m-%d %H:%M} UTC; commit {commit()}"


def save(results) -> None:
    """gpu_check.json in --out, with the bars as far as the sections so far give them."""
    if not ARGS.out:
        return
    data = dict(results)
    try:
        data["bars"] = bars(results.get("timings", []), results.get("breakdown", {}), results.get("bandwidth"),
                            results.get("variants") or None)
    except Exception as exc:  # noqa: BLE001 - the sections' own figures still get written
        data["bars"] = f"{type(exc).__name__}: {exc}"
    os.makedirs(ARGS.out, exist_ok=True)
    path = os.path.join(ARGS.out, "gpu_check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def sections(results):
    """(name, measure, what stands in for a result that failed or was not started), in the
    order they run: what the bars need first (the profile's kernel times, the timings)."""
    def checked(reason):  # a check that failed (ok False) or was skipped (ok None)
        return dict(ok=None if reason.startswith("skipped") else False, error=reason)

    def failed_rows(reason):
        return [dict(backend="-", dtype="-", options="the correctness section", loss_rel=float("nan"),
                     grad_rel=float("nan"), ok=False, error=reason)]

    return (
        ("correctness", check_correctness, failed_rows),
        ("bandwidth", measure_copy_bandwidth, lambda reason: None),
        ("breakdown", profile_triton_step, lambda reason: dict(error=reason)),
        ("timings", lambda: run_timings(results.get("bandwidth")), lambda reason: []),
        ("variants", time_step_variants, lambda reason: dict(error=reason)),
        ("compile", check_compile, checked),
        ("mixed", lambda: check_autocast_and_soak(iterations=20 if ARGS.dry_run else 300,
                                                  block=5 if ARGS.dry_run else 25), checked),
        ("max_pooling", time_max_pooling, lambda reason: dict(error=reason)),
    )


def main():
    if ARGS.steps:
        run_steps(ARGS.steps)
        return 0
    results = dict(machine=describe_machine(), not_run={})
    log(results["machine"])
    failures = []
    for name, measure, stand_in in sections(results):
        reason = None
        if name != "correctness" and over_budget():
            reason = "skipped: the run's time budget is spent"
        else:
            log(name)
            try:
                results[name] = measure()
            except Exception as exc:  # noqa: BLE001 - one section's failure must not cost the others
                traceback.print_exc()
                reason = f"failed: {type(exc).__name__}: {exc}"[:300]
                failures.append(name)
        if reason is not None:
            log(name, reason)
            results[name] = stand_in(reason)
            results["not_run"][name] = reason
        if name == "breakdown" and results[name].get("host_table"):
            print(results[name].pop("host_table"))
        save(results)
    print_report(results)
    ok = all(r["ok"] for r in results["correctness"]) and not failures
    ok = ok and all(results[name].get("ok") is not False for name in ("compile", "mixed"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
