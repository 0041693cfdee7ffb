"""Interleaved timing of cross-entropy and the torch engine, forward+backward, same inputs.

    python bench/side_by_side.py [N C H W POOL] [--rounds R] [--labels uniform|scenes]

Alternates the two providers round by round so that drifts of a shared machine hit
both alike; prints the minimum and median of each and their ratios, and the median (with
quartiles) of the per-round ratios: each round times the two one right after the other,
so that ratio sees the same state of the machine.
"""

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(__file__))
from providers import add_step_options, loss_fn, step_inputs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_options(parser)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    logits, labels, pool = step_inputs(args)
    n, c, h, w = logits.shape
    providers = {name: loss_fn(name, pool) for name in ("cross_entropy", "torch")}
    times = {name: [] for name in providers}
    for round_ in range(args.rounds + 1):
        order = list(providers.items())
        for name, fn in order if round_ % 2 else order[::-1]:  # who goes first alternates
            logits.grad = None
            start = time.perf_counter()
            fn(logits, labels).backward()
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    paired = sorted(e / c for e, c in zip(times["torch"], times["cross_entropy"]))
    for name in times:
        times[name].sort()
    mid = args.rounds // 2
    for name, values in times.items():
        print(f"{name:14s} min {values[0] * 1e3:7.1f} ms   median {values[mid] * 1e3:7.1f} ms")
    ce, eng = times["cross_entropy"], times["torch"]
    print(f"torch / CE     min {eng[0] / ce[0]:.2f}x   median {eng[mid] / ce[mid]:.2f}x   "
          f"({n}x{c}x{h}x{w}, avg pool {pool}, {args.labels} labels, {args.threads} threads)")
    quarter = len(paired) // 4
    print(f"per round      median {paired[mid]:.2f}x   quartiles {paired[quarter]:.2f}x..{paired[-1 - quarter]:.2f}x")


if __name__ == "__main__":
    main()
