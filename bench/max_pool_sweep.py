"""A randomised run of max pooling on upsampled logits against the contract, case by case.

    python bench/max_pool_sweep.py torch 0 20000        # about 100 s on one core
    python bench/max_pool_sweep.py triton 0 200 --canonical

Each case k draws (from random.Random(k)) 1-2 images of 2-6 classes, logits on a coarse grid
of 2-8 cells a side (N(0, s^2), s in 1e-3, 0.3, 3, 30; now and then +8 at one class a cell)
upsampled 2-9 times bilinearly (align_corners=False, as `rmi_triton.models` do: their edge
rows and columns repeat; sometimes True), labels with no, random (10%) or edge ignored pixels,
and max pooling of size 2-6 with the softmax (two cases in three) or the sigmoid, radius 1-3,
pixel loss None / CE / BCE, exclude_ignored sometimes. A case fails where the loss is more than
1e-5 or the gradient (of 3.7 * loss) more than 1e-4 off the float64 reference, relative.

--canonical gives the reference one float64 p for equal logits wherever they stand: torch's
float64 sigmoid and softmax round a vector loop's tail apart from its body, so two pixels of
equal logits can get p an ulp apart, and the reference then routes a cell's gradient to the
second (the engines take the first, as torch's max pooling does for equal values).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import types

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rmi_triton import RMIOptions, reference_rmi, rmi_loss  # noqa: E402


def draw(k: int):
    """Case k -> (what was drawn, options, logits, labels)."""
    rng = random.Random(k)
    n, c = rng.choice([1, 2]), rng.randint(2, 6)
    ch, cw = rng.randint(2, 8), rng.randint(2, 8)
    factor = rng.randint(2, 9)
    h, w = max(4, ch * factor + rng.randint(-3, 3)), max(4, cw * factor + rng.randint(-3, 3))
    probs = rng.choice(["softmax", "softmax", "sigmoid"])
    options = dict(pool="max", pool_size=rng.randint(2, 6), radius=rng.randint(1, 3), probs=probs,
                   pixel_loss=rng.choice([None, "ce", "bce"]), exclude_ignored=rng.random() < 0.3)
    if options["pixel_loss"] is None:
        options["rmi_weight"] = rng.choice([0.0, 0.5])
    scale = rng.choice([1e-3, 0.3, 3.0, 30.0])
    seed = rng.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, c, ch, cw, generator=g) * scale
    if rng.random() < 0.3:  # a confident class a coarse cell
        coarse += 8.0 * F.one_hot(torch.randint(0, c, (n, ch, cw), generator=g), c).permute(0, 3, 1, 2)
    align_corners = rng.random() < 0.3
    logits = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=align_corners).contiguous()
    labels = torch.randint(0, c, (n, h, w), generator=g)
    ignored = rng.choice(["none", "random", "edges"])
    if ignored == "random":
        labels[torch.rand(n, h, w, generator=g) < 0.1] = 255
    elif ignored == "edges":
        labels[:, 0] = 255
        labels[:, :, -1] = 255
    drawn = dict(n=n, c=c, h=h, w=w, coarse=(ch, cw), align_corners=align_corners, scale=scale, labels=ignored)
    return drawn, options, logits, labels


def canonical_reference() -> None:
    """Make `reference_rmi` form one p for equal logits (module doc)."""
    import rmi_triton.reference as reference

    def sigmoid(x):
        p = torch.sigmoid(x)
        values, where = torch.unique(x.detach().reshape(-1), return_inverse=True)
        return p + (torch.sigmoid(values)[where].view_as(x) - p).detach()

    def softmax(x, dim=1):
        p = torch.softmax(x, dim=dim)
        n, c, h, w = x.shape
        values, where = torch.unique(x.detach().permute(0, 2, 3, 1).reshape(-1, c), dim=0, return_inverse=True)
        same = torch.softmax(values, dim=1)[where].view(n, h, w, c).permute(0, 3, 1, 2)
        return p + (same - p).detach()

    class Torch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    module = Torch("torch")
    module.sigmoid, module.softmax = sigmoid, softmax
    reference.torch = module


def relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=["torch", "triton"])
    parser.add_argument("start", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--canonical", action="store_true", help="one reference p for equal logits")
    args = parser.parse_args()
    if args.canonical:
        canonical_reference()
    ran = failed = 0
    t0 = time.time()
    for k in range(args.start, args.start + args.count):
        drawn, options, logits, labels = draw(k)
        opts = RMIOptions(**options)
        if min(opts.pooled_size(drawn["h"], drawn["w"])) < opts.radius:
            continue
        ref_x = logits.double().requires_grad_(True)
        ref = reference_rmi(ref_x, labels, opts).loss
        (ref * 3.7).backward()
        x = logits.clone().requires_grad_(True)
        loss = rmi_loss(x, labels, backend=args.backend, **options)
        (loss * 3.7).backward()
        ran += 1
        loss_err, grad_err = relative(loss.detach(), ref.detach()), relative(x.grad, ref_x.grad)
        if loss_err > 1e-5 or grad_err > 1e-4:
            failed += 1
            print(f"FAIL case {k}: loss {loss_err:.2e} gradient {grad_err:.2e} {drawn} {options}", flush=True)
    print(f"{args.backend} cases {args.start}..{args.start + args.count}: {ran} ran, {failed} failed, "
          f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
