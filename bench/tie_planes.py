"""How many cells (and planes) each engine pools again from float64 for max pooling's near-ties.

    python bench/tie_planes.py [--backends torch,triton] [--seed 0]

Softmax with max pooling, 4 x 21 x 97 x 97: logits N(0, 4) pixel by pixel, and a network's
smooth output (logits drawn on a 13 x 13 grid, upsampled bilinearly 8 times) at three scales,
corners aligned, and once as the networks of `rmi_triton.models` upsample (align_corners=False:
an image's edge rows and columns repeat).
Counts the cells with a near-tie (`rmi_triton.narrow.tie_bound`), and the planes that hold one:
the torch engine's `ties`, kernel A's TIE_BIT (the Triton engine runs through its interpreter on
a CPU).
"""

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rmi_triton import rmi_loss  # noqa: E402
from rmi_triton.engines import torch_engine, triton_engine  # noqa: E402

OPTIONS = dict(pool="max", probs="softmax")


def tied_cells(logits, labels, backend: str) -> torch.Tensor:
    """[N, C, H', W'] bool: the cells the engine found tied."""
    found = []
    if backend == "torch":
        real = torch_engine._pool_probs

        def spy(*args, **kwargs):
            real(*args, **kwargs)
            if kwargs.get("ties") is not None and len(args) > 5:  # the first pass's call, not its recursion
                found.append(kwargs["ties"].clone())

        module, name, replacement = torch_engine, "_pool_probs", spy
    else:
        real = triton_engine._launch_narrow

        def spy(*args):
            found.append((args[-1] & triton_engine.TIE_BIT.value) != 0)
            return real(*args)

        module, name, replacement = triton_engine, "_launch_narrow", spy
    setattr(module, name, replacement)
    try:
        rmi_loss(logits, labels, backend=backend, **OPTIONS)
    finally:
        setattr(module, name, real)
    return torch.cat(found)  # (the torch engine's blocks: whole images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,triton")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    n, c, h, w = 4, 21, 97, 97

    def smooth(scale, offset=0.0, align_corners=True):
        coarse = torch.randn(n, c, 13, 13, generator=g) * scale + offset
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=align_corners)

    confident = 8.0 * F.one_hot(torch.randint(0, c, (n, 13, 13), generator=g), c).permute(0, 3, 1, 2)
    cases = [("N(0, 4) a pixel", torch.randn(n, c, h, w, generator=g) * 2),
             ("smooth, N(0, 9) on the coarse grid", smooth(3.0)),
             ("smooth, N(0, 0.09) on the coarse grid", smooth(0.3)),
             ("smooth, N(0, 0.09) + 8 at a class a coarse cell", smooth(0.3, confident)),
             ("smooth, N(0, 9), the networks' upsampling", smooth(3.0, align_corners=False))]
    labels = torch.randint(0, c, (n, h, w), generator=g)
    for name, logits in cases:
        counts = []
        for backend in args.backends.split(","):
            cells = tied_cells(logits.contiguous(), labels, backend)
            counts.append(f"{backend} {int(cells.sum())} cells of {cells.numel()}, "
                          f"in {int(cells.flatten(2).any(2).sum())} planes of {n * c}")
        print(f"{name:48s} {'; '.join(counts)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
