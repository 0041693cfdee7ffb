"""Host time of a Triton-engine training step, without a GPU: the kernels stubbed out.

    python bench/host_time.py [--shape N C H W] [--steps 100] [--rounds 7] [--profile]

On a GPU the Triton engine's step is host-bound where its host work (Python, the
ATen ops around the kernels, the launches) outlasts its kernels (bench/RESULTS.md,
"GPU"). This runs RMILoss forward+backward on the CPU with every Triton launch
replaced by nothing and every engine buffer zero-filled, so what is timed is that
host work plus the ATen ops' CPU work on tiny tensors (small by default: 1x2x64x64).
It prints the median and minimum over rounds of the time a step, and the Python
function calls a step (cProfile: a count, not a time, the same on every run). On a
shared machine compare two versions by alternating runs; the call and op counts
(bench/op_count.py) do not need that.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # the engine counts as available; no kernel runs

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rmi_triton import RMILoss, algebra  # noqa: E402
from rmi_triton.engines import triton_engine  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _MergeStub:
    """Kernel B3 stubbed: the matrix it writes for the algebra gets its ridge, aI (zero
    statistics then factorise like real ones, with no repair); one fill_ where a launch was."""

    joint_at = triton_engine._merge_moments_kernel.arg_names.index("joint_ptr")

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            joint = args[self.joint_at]
            joint.diagonal(dim1=-2, dim2=-1).fill_(kwargs["RIDGE_A"])
        return launch


def stub_kernels():
    for name in triton_engine.KERNEL_NAMES:
        setattr(triton_engine, name, _NoLaunch())
    triton_engine._merge_moments_kernel = _MergeStub()
    # zero statistics factorise (Sp + aI, V + aI = aI) like real ones
    triton_engine._new = lambda shape, dtype, device, fill=None: torch.zeros(shape, dtype=dtype, device=device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 2, 64, 64], metavar=("N", "C", "H", "W"))
    parser.add_argument("--steps", type=int, default=100, help="steps a round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stub_kernels()
    repairs = []
    repaired = algebra._repaired

    def counted(*args, **kwargs):
        repairs.append(1)
        return repaired(*args, **kwargs)

    algebra._repaired = counted
    n, c, h, w = args.shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).requires_grad_(True)
    labels = torch.randint(0, c, (n, h, w), generator=g)
    loss_fn = RMILoss(validate=False, backend="triton")

    def step():
        torch.autograd.grad(loss_fn(x, labels), x)

    for _ in range(20):
        step()
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - start) / args.steps * 1e3)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        step()
    profile.disable()
    stats = pstats.Stats(profile)
    if repairs:  # the stubs' statistics must factorise as real ones do
        raise SystemExit(f"the stubbed steps took the algebra's repair path {len(repairs)} times: "
                         f"their host time would not be a real step's")
    print(f"RMILoss() step at {n}x{c}x{h}x{w}, Triton kernels stubbed: host ms a step median "
          f"{statistics.median(times):.3f}, min {min(times):.3f} ({args.rounds} rounds of {args.steps}); "
          f"{stats.total_calls / args.steps:.0f} Python function calls a step")
    if args.profile:
        stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
