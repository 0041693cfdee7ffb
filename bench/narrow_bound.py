"""How far off the float32 pass is just outside the narrow planes' bound (`rmi_triton.narrow`).

    python bench/narrow_bound.py [--backend torch|triton] [--seeds 4] [--bound-log2 -6]

Logits N(0, s^2) plus a per-class offset (2 x seed), s from 0.01 to 0.1, 2 x 3 x 23 x 29 with
10% of the pixels ignored, every pooling (size 2), both probabilities, with and without
exclude_ignored, the RMI term alone (its gradient is the one the rounding spoils). Of the
cases where the rule flags no plane (all of it left to the float32 pass), prints how many
there were and the largest gradient error against `reference_rmi` (relative, in norm). The
Triton engine runs in the interpreter here (a few minutes a seed).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rmi_triton import reference_rmi, rmi_terms  # noqa: E402
from rmi_triton import narrow  # noqa: E402
from rmi_triton.engines import triton_engine  # noqa: E402

SCALES = (0.01, 0.015, 0.02, 0.03, 0.045, 0.07, 0.1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--bound-log2", type=int, default=None,
                        help="try NARROW_SPREAD = 2**K instead of the library's")
    args = parser.parse_args(argv)
    if args.bound_log2 is not None:
        narrow.NARROW_SPREAD = triton_engine.NARROW_SPREAD = 2.0 ** args.bound_log2
    flagged = []
    if args.backend == "torch":  # the torch engine calls the rule through rmi_triton.narrow
        rule = narrow.narrow_planes
        narrow.narrow_planes = lambda *a, **k: flagged.append(bool((found := rule(*a, **k)).any())) or found
    else:
        rule = triton_engine._launch_narrow
        triton_engine._launch_narrow = lambda *a: flagged.append(bool((found := rule(*a)).any())) or found
    worst, where, count = 0.0, None, 0
    for probs, pool, exclude, seed, scale in itertools.product(
            ("sigmoid", "softmax"), ("avg", "max", "none", "interp"), (False, True), range(args.seeds), SCALES):
        g = torch.Generator().manual_seed(seed)
        n, c, h, w = 2, 3, 23, 29
        logits = torch.randn(n, c, h, w, generator=g) * scale + torch.randn(1, c, 1, 1, generator=g) * 2 * seed
        labels = torch.randint(0, c, (n, h, w), generator=g)
        labels[torch.rand(n, h, w, generator=g) < 0.1] = 255
        options = dict(radius=3, pool=pool, pool_size=1 if pool == "none" else 2, probs=probs,
                       exclude_ignored=exclude, pixel_loss=None)
        flagged.clear()
        x = logits.clone().requires_grad_(True)
        rmi_terms(x, labels, backend=args.backend, **options).loss.backward()
        if any(flagged):
            continue
        count += 1
        ref = logits.double().requires_grad_(True)
        reference_rmi(ref, labels, **options).loss.backward()
        err = ((x.grad.double() - ref.grad).norm() / ref.grad.norm()).item()
        if err > worst:
            worst, where = err, dict(options, seed=seed, scale=scale)
    bound = narrow.NARROW_SPREAD
    print(f"{args.backend} engine, bound {bound:g}: {count} cases left to the float32 pass, "
          f"worst gradient error {worst:.2e} at {where}")


if __name__ == "__main__":
    main()
