"""The torch engine of another commit against the working tree's, interleaved step by step.

    python bench/paired_commits.py REV [--steps 60] [--labels uniform|scenes] [--upsample K]
                                   [--option NAME=VALUE ...] [N C H W POOL]

Loads `rmi_triton/engines/torch_engine.py` as it was at REV (git show) beside the working
tree's and times forward+backward of `rmi_loss` with each, alternating which goes first,
plus `F.cross_entropy` in every round. Everything else (loss front, algebra, checks) is
the working tree's, so the ratio is the engine's own change. Prints the median and
quartiles of the per-step ratio (working tree / REV), its geometric mean, and the
minimums and medians of all three.
"""

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from providers import add_step_options, step_inputs  # noqa: E402

import rmi_triton.loss as front  # noqa: E402
from rmi_triton import rmi_loss  # noqa: E402
from rmi_triton.engines import torch_engine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_at(rev: str, path: str):
    """The module at `path` of the repository (e.g. "rmi_triton/algebra.py") as it was at `rev`,
    imported under a private name; its relative imports resolve against the installed package."""
    source = subprocess.check_output(["git", "-C", ROOT, "show", f"{rev}:{path}"], text=True)
    package = path.rsplit("/", 1)[0].split("/")

    def absolute(match):  # "from ..algebra" in rmi_triton/engines -> "from rmi_triton.algebra"
        base = ".".join(package[:len(package) + 1 - len(match.group(1))])
        return f"from {base}.{match.group(2)}" if match.group(2) else f"from {base}"

    source = re.sub(r"from (\.+)(\w*)", absolute, source)
    name = os.path.basename(path)[:-3] + "_at_rev"
    file = os.path.join(tempfile.mkdtemp(), name + ".py")
    with open(file, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # torch.compile imports the modules it traces
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev")
    add_step_options(parser)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an RMILoss option for both engines (pool=max, probs=softmax, ...)")
    args = parser.parse_args()
    logits, labels, pool = step_inputs(args)
    options = dict(_option(text) for text in args.option)
    n, c, h, w = logits.shape
    engines = {"rev": module_at(args.rev, "rmi_triton/engines/torch_engine.py"), "tree": torch_engine}
    times = {"rev": [], "tree": [], "cross_entropy": []}
    chosen = front._engine
    try:
        for step in range(args.steps + 2):  # two warm-up rounds
            order = ["rev", "tree"] if step % 2 else ["tree", "rev"]
            for name in order + ["cross_entropy"]:
                logits.grad = None
                start = time.perf_counter()
                if name == "cross_entropy":
                    F.cross_entropy(logits, labels, ignore_index=255).backward()
                else:
                    front._engine = lambda x, backend, module=engines[name]: module
                    rmi_loss(logits, labels, pool_size=pool, **options).backward()
                if step >= 2:
                    times[name].append(time.perf_counter() - start)
    finally:
        front._engine = chosen
    ratios = sorted(t / r for t, r in zip(times["tree"], times["rev"]))
    quarter, mid = len(ratios) // 4, len(ratios) // 2
    print(f"working tree / {args.rev}: per-step median {ratios[mid]:.3f} "
          f"(quartiles {ratios[quarter]:.3f}..{ratios[-1 - quarter]:.3f}), "
          f"geometric mean {statistics.geometric_mean(ratios):.3f}")
    for name, values in times.items():
        values.sort()
        print(f"{name:14s} min {values[0] * 1e3:7.1f} ms   median {values[mid] * 1e3:7.1f} ms")
    print(f"({n}x{c}x{h}x{w}, pool size {pool}, {options or 'defaults'}, {args.labels} labels, "
          f"upsampled {args.upsample}x, {args.threads} threads, {args.steps} steps)")


def _option(text: str):
    """"pool=max" -> ("pool", "max"); numbers as numbers."""
    name, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


if __name__ == "__main__":
    main()
