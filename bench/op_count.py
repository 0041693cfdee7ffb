"""Launches a forward+backward of RMILoss costs, counted on the CPU: ATen ops and Triton kernels.

    python bench/op_count.py [--shape N C H W] [--validate]

On a GPU each ATen op that computes something is a kernel launch (about 5 us of
host time in eager PyTorch, whatever its size), so at small sizes the loss's
glue -- the d x d algebra, the merges, the checks -- costs launches rather than
bandwidth. This counts, for the torch engine and the Triton engine (kernels
run by the Triton interpreter, their own ops not counted), the ATen ops one
training step of the loss dispatches, views and allocations left out, and the
host synchronisations (reads of a tensor's value), and the ops and launches after the
last of those (on a GPU the host queues them while the device waits). Counts, not times: a GPU run
of bench/gpu_check.py gives the times.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rmi_triton import RMILoss  # noqa: E402
from rmi_triton.engines import triton_engine  # noqa: E402

# ops that only make views or allocate: no kernel on a GPU
NO_KERNEL = {"view", "_unsafe_view", "as_strided", "transpose", "t", "expand", "select", "slice", "unsqueeze",
             "squeeze", "permute", "detach", "alias", "diagonal", "unflatten", "split", "split_with_sizes",
             "unbind", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
SYNC = {"_local_scalar_dense"}  # a tensor's value read on the host: .item(), bool(), int()


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, except inside a Triton launch."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.syncs = 0
        self.after_sync = 0  # ops and Triton launches since the last sync: on a GPU, host work not hidden
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # `to`, `reshape`, ...: count what they decompose into (a copy, or nothing)
                return func.decompose(*args, **kwargs)
        if not self.paused:
            if name in SYNC:
                self.syncs += 1
                self.after_sync = 0
            elif name not in NO_KERNEL:
                self.ops[name] += 1
                self.after_sync += 1
        return func(*args, **kwargs)


def count_triton_launches(counter: OpCounter, set_attribute=setattr):
    """Wrap the engine's kernels: count their launches, pause the op count inside them
    (tests pass monkeypatch.setattr to have the kernels put back)."""
    launches = collections.Counter()

    class Launcher:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            run = self.kernel[grid]

            def launch(*args, **kwargs):
                launches[self.name] += 1
                counter.after_sync += 1
                counter.paused = True
                try:
                    return run(*args, **kwargs)
                finally:
                    counter.paused = False
            return launch

    for name in triton_engine.KERNEL_NAMES:
        set_attribute(triton_engine, name, Launcher(name, getattr(triton_engine, name)))
    return launches


def step(counter: OpCounter, launches, logits, labels, **options):
    """One forward+backward of RMILoss(**options), counted (after a warm-up step)."""
    loss_fn = RMILoss(**options)
    x = logits.clone().requires_grad_(True)
    loss_fn(x, labels).backward()  # warm-up: caches filled outside the count
    x.grad = None
    counter.ops.clear()
    counter.syncs = counter.after_sync = 0
    if launches is not None:
        launches.clear()
    with counter:
        loss_fn(x, labels).backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 3, 37, 53], metavar=("N", "C", "H", "W"))
    parser.add_argument("--validate", action="store_true", help="with the input checks (default: validate=False)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    n, c, h, w = args.shape
    logits = torch.randn(n, c, h, w, generator=g) * 2
    labels = torch.randint(0, c, (n, h, w), generator=g)
    print(f"RMILoss() forward+backward at {n}x{c}x{h}x{w}, validate={args.validate}: ops that launch a kernel "
          f"on a GPU (views and allocations left out), host synchronisations")
    counter = OpCounter()
    triton_engine.use_gpu_blocks()  # the blocking, and so the launches, of a GPU step
    launches = count_triton_launches(counter) if triton_engine.available() else None
    for backend in ("torch", "triton"):
        if backend == "triton" and launches is None:
            print("  triton: not available (no triton)")
            continue
        step(counter, launches, logits, labels, backend=backend, validate=args.validate)
        kernels = sum(launches.values()) if backend == "triton" else 0
        top = ", ".join(f"{k} {v}" for k, v in counter.ops.most_common(8))
        print(f"  {backend:6s} {sum(counter.ops.values()):4d} ATen ops + {kernels} Triton kernels, "
              f"{counter.syncs} syncs, {counter.after_sync} ops and launches after the last   (most: {top})")


if __name__ == "__main__":
    main()
