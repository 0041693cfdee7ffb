"""The d x d algebra of one step, eager and under torch.compile: this tree's against REV's.

    python bench/algebra_time.py REV [--planes 336] [--radius 3] [--steps 40] [--threads 2]

Loads `rmi_triton/algebra.py` as it was at REV (git show) beside the working tree's and
runs forward+backward of `half_logdet_posterior` on `planes` statistics of d = R*R
(default: 16 images x 21 classes, R = 3, the paper's VOC setting), Sp and Syp needing
gradients as in a training step: eagerly, and compiled with inductor. Prints, for each
version, the compiled graphs' op counts (forward and backward; "library" = factorisations,
triangular solves and matrix products, which inductor cannot fuse: on a GPU each is at
least one kernel launch, also inside a CUDA graph) and the median time a step of both
modes, the versions interleaved step by step (this machine's CPU, not a GPU's).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # rmi_triton and the other bench modules

from paired_commits import module_at  # noqa: E402

from rmi_triton import algebra  # noqa: E402

LIBRARY = ("cholesky", "solve_triangular", "bmm", "mm", "matmul", "linalg")
NO_KERNEL = {"view", "_unsafe_view", "transpose", "t", "expand", "select", "slice", "unsqueeze", "squeeze",
             "permute", "detach", "alias", "diagonal", "getitem", "empty", "empty_strided"}


def statistics_for(planes: int, d: int, seed: int = 0):
    """Sy, Sp, Syp [planes, d, d] of random region vectors (centred sums of 400 of them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(planes, 2 * d, 400, dtype=torch.float64, generator=g)
    x = x - x.mean(-1, keepdim=True)
    joint = x @ x.transpose(1, 2)
    return joint[:, :d, :d].clone(), joint[:, d:, d:].clone(), joint[:, :d, d:].clone()


def graph_ops(fn, inputs):
    """-> {"forward"/"backward": (ops, library calls)} of fn's compiled graphs."""
    counts = {}

    def counting(name):
        def compile_graph(gm, _inputs):
            names = [getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in gm.graph.nodes
                     if n.op == "call_function"]
            names = [n for n in names if n not in NO_KERNEL]
            counts[name] = (len(names), sum(any(k in n for k in LIBRARY) for n in names),
                            collections.Counter(n for n in names if any(k in n for k in LIBRARY)))
            return make_boxed_func(gm.forward)
        return compile_graph

    def backend(gm, example):
        return aot_module_simplified(gm, example, fw_compiler=counting("forward"), bw_compiler=counting("backward"))

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs).backward()
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev")
    parser.add_argument("--planes", type=int, default=16 * 21)
    parser.add_argument("--radius", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sy, sp, syp = statistics_for(args.planes, args.radius ** 2)
    weight = torch.rand(args.planes, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    versions = {args.rev: module_at(args.rev, "rmi_triton/algebra.py"), "tree": algebra}

    def loss_of(module):
        return lambda a, b, c: (module.half_logdet_posterior(a, b, c) * weight).sum()

    def inputs():
        return sy, sp.clone().requires_grad_(), syp.clone().requires_grad_()

    runs = {}
    for name, module in versions.items():
        counts = graph_ops(loss_of(module), inputs())
        print(f"{name:8s} compiled graph: " + "; ".join(
            f"{part} {ops} ops, {lib} library calls ({dict(sorted(which.items()))})"
            for part, (ops, lib, which) in counts.items()))
        torch._dynamo.reset()
        runs[(name, "eager")] = loss_of(module)
        runs[(name, "compiled")] = torch.compile(loss_of(module), backend="inductor", fullgraph=True)
    times = collections.defaultdict(list)
    keys = list(runs)
    for step in range(args.steps + 3):  # three warm-up rounds (the compiles happen in the first)
        for key in (keys if step % 2 else keys[::-1]):
            start = time.perf_counter()
            runs[key](*inputs()).backward()
            if step >= 3:
                times[key].append((time.perf_counter() - start) * 1e3)
    for key in keys:
        print(f"{key[0]:8s} {key[1]:8s} median {statistics.median(times[key]):8.3f} ms   "
              f"min {min(times[key]):8.3f} ms")
    print(f"({args.planes} planes, d = {args.radius ** 2}, {args.threads} threads, {args.steps} steps "
          f"interleaved, forward+backward)")


if __name__ == "__main__":
    main()
