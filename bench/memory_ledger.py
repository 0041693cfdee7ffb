"""Peak memory of a Triton-engine training step without a GPU: its allocations, added up.

    python bench/memory_ledger.py [--shape N C H W POOL] [--providers triton cross_entropy ...]

On a GPU, `torch.cuda.max_memory_allocated` during one forward+backward, less what was
allocated before it, is the step's extra peak memory (bench/gpu_check.py reports it, the
gradient of the logits included, and beyond the gradient as a share of the logits' size:
the target is 10% at 16x21x513x513 avg 4). The Triton engine's large buffers are
allocated by its launchers in Python, the same on any device; so this runs the step on
the CPU with the kernels stubbed out (bench/stubbed.py: no kernel runs, buffers are
zero-filled) and follows the CPU allocator's live bytes through the torch profiler's
memory events. The CPU allocator does not round sizes up as the CUDA caching allocator
does (to 512 bytes), and the d x d algebra's LAPACK calls keep their workspace outside it
(kilobytes): the figures agreed with an H200's to about 1 MiB at these shapes
(bench/RESULTS.md). The other providers run for real on the CPU (slow at large shapes);
their CPU kernels may allocate differently from their CUDA ones.

Per shape: the logits' size, the gradient's, the forward's peak, what the forward leaves
for the backward (the saved tensors), the forward+backward's peak, and that peak beyond
the gradient as a share of the logits' size.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # rmi_triton and the other bench modules

from stubbed import count_repairs, stub_kernels  # noqa: E402  (first: sets TRITON_INTERPRET)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from providers import loss_fn, make_inputs  # noqa: E402

# gpu_check.py's shapes: (N, C, H, W, avg pool size)
GPU_SHAPES = [(16, 21, 513, 513, 4), (16, 21, 513, 513, 2), (8, 19, 768, 768, 4), (8, 150, 512, 512, 4)]
MIB = 2.0 ** 20


def allocations(fn):
    """-> (fn(), peak, net): the CPU allocator's live bytes while fn() runs, beyond those
    live before it -- their high-water mark and what is still live at the end."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    changes = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    changes.sort(key=lambda event: event.start_ns())  # stable: an allocation and a free at one tick keep their order
    live = peak = 0
    for event in changes:
        live += event.nbytes()
        peak = max(peak, live)
    return out, peak, live


def step_ledger(loss, logits, labels):
    """-> dict of bytes: the logits', the gradient's, the forward's peak and net (what it
    leaves for the backward, the loss included), and the forward+backward's peak."""
    x = logits.requires_grad_(True)
    value, forward_peak, forward_net = allocations(lambda: loss(x, labels))
    grads, backward_peak, backward_net = allocations(lambda: torch.autograd.grad(value, x))
    gradient = grads[0].untyped_storage().nbytes()
    return {"logits": x.untyped_storage().nbytes(), "gradient": gradient, "forward peak": forward_peak,
            "forward net": forward_net, "peak": max(forward_peak, forward_net + backward_peak)}


def beyond_gradient(ledger) -> float:
    """The step's peak less the gradient, as a share of the logits' size (gpu_check's column)."""
    return (ledger["peak"] - ledger["gradient"]) / ledger["logits"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=5, action="append", metavar=("N", "C", "H", "W", "POOL"),
                        help="one shape and avg pool size (repeatable; default: gpu_check.py's four)")
    parser.add_argument("--providers", nargs="+", default=["triton"],
                        help="triton (stubbed kernels), cross_entropy, torch, published (run on the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    stub_kernels()
    repairs = count_repairs()
    print("| shape | pool | provider | logits MiB | gradient MiB | forward peak MiB | saved MiB | "
          "peak MiB | peak beyond the gradient, % of the logits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, c, h, w, pool in args.shape or GPU_SHAPES:
        for provider in args.providers:
            logits, labels = make_inputs((n, c, h, w))
            ledger = step_ledger(loss_fn(provider, pool), logits, labels)
            print(f"| {n}x{c}x{h}x{w} | avg {pool} | {provider} | {ledger['logits'] / MIB:.1f} | "
                  f"{ledger['gradient'] / MIB:.1f} | {ledger['forward peak'] / MIB:.1f} | "
                  f"{ledger['forward net'] / MIB:.1f} | {ledger['peak'] / MIB:.1f} | "
                  f"{100 * beyond_gradient(ledger):.2f} |", flush=True)
    if repairs:
        raise SystemExit(f"the stubbed steps took the algebra's repair path {len(repairs)} times: "
                         f"their allocations would not be a real step's")


if __name__ == "__main__":
    main()
