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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # rmi_triton and the other bench modules

from stubbed import count_repairs, stub_kernels  # noqa: E402  (first: sets TRITON_INTERPRET)

import torch  # noqa: E402

from rmi_triton import RMILoss  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 2, 64, 64], metavar=("N", "C", "H", "W"))
    parser.add_argument("--steps", type=int, default=100, help="steps a round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stub_kernels()
    repairs = count_repairs()
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
