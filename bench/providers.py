"""The providers every benchmark compares, on the same inputs.

* cross_entropy: F.cross_entropy, the floor users know.
* bce_with_logits: F.binary_cross_entropy_with_logits on one-hot targets (built
                 outside the timing): the paper's pixel term alone, as PyTorch does it.
* published:     the published formula, float64 region stacks and one-hot maps
                 (rmi_triton.reference_rmi follows the authors' training code).
* torch:         rmi_triton's PyTorch engine.
* triton:        rmi_triton's Triton engine (GPU only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rmi_triton import reference_rmi, rmi_loss

# name -> ((N, C, H, W), pool size (avg pooling), label maps: see make_inputs)
CPU_SHAPES = {
    "4x21x256x256-avg4": ((4, 21, 256, 256), 4, "uniform"),
    "4x21x256x256-avg4-scenes": ((4, 21, 256, 256), 4, "scenes"),
    "2x21x512x512-avg2": ((2, 21, 512, 512), 2, "uniform"),
}


def make_inputs(shape, seed=0, device="cpu", dtype=torch.float32, ignore_frac=0.05, labels="uniform"):
    """Random logits and labels. labels="uniform": every pixel's class drawn at random, 5%
    ignored -- every class in every image, the worst case for the RMI term; "scenes": what
    segmentation data looks like -- per image the background and two object classes in
    smooth regions, about 5% ignored in bands along their boundaries (as VOC marks them)."""
    n, c, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if labels == "uniform":
        label_maps = torch.randint(0, c, (n, h, w), generator=g)
        label_maps[torch.rand(n, h, w, generator=g) < ignore_frac] = 255
    elif labels == "scenes":
        label_maps = _scene_labels(n, c, h, w, ignore_frac, g)
    else:
        raise ValueError(f"unknown label kind {labels!r}")
    return logits, label_maps.to(device)


def _scene_labels(n, c, h, w, ignore_frac, g):
    field = torch.rand(n, 3, max(h // 32, 2), max(w // 32, 2), generator=g)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)
    top2 = field.topk(2, dim=1).values
    region = field.argmax(1)  # 0: background, 1 and 2: the image's two object classes
    objects = torch.stack([torch.randperm(c - 1, generator=g)[:2] + 1 for _ in range(n)])  # [n, 2]
    classes = torch.cat([torch.zeros(n, 1, dtype=torch.long), objects], 1)
    label_maps = classes.gather(1, region.flatten(1)).view(n, h, w)
    margin = top2[:, 0] - top2[:, 1]
    label_maps[margin < margin.flatten().quantile(ignore_frac)] = 255
    return label_maps


def loss_fn(provider: str, pool_size: int):
    if provider == "cross_entropy":
        return lambda x, y: F.cross_entropy(x, y, ignore_index=255)
    if provider == "bce_with_logits":
        cache = {}

        def bce(x, y):
            key = (tuple(x.shape), y.data_ptr())
            if key not in cache:  # one-hot targets and mask: built once, outside the timed region
                valid = (y != 255).unsqueeze(1)
                one_hot = F.one_hot(torch.where(valid[:, 0], y, 0), x.shape[1]).permute(0, 3, 1, 2)
                cache[key] = one_hot.to(x.dtype), valid.to(x.dtype)
            target, weight = cache[key]
            return F.binary_cross_entropy_with_logits(x, target, weight=weight, reduction="sum") / (weight.sum() + 1)
        return bce
    if provider == "published":
        return lambda x, y: reference_rmi(x, y, pool_size=pool_size).loss
    if provider in ("torch", "triton"):
        return lambda x, y: rmi_loss(x, y, pool_size=pool_size, backend=provider)
    raise ValueError(f"unknown provider {provider!r}")


def add_step_options(parser) -> None:
    """The options of the interleaved timers (side_by_side.py, paired_commits.py)."""
    parser.add_argument("shape", nargs="*", type=int, default=[4, 21, 256, 256, 4], help="N C H W POOL")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--labels", choices=["uniform", "scenes"], default="uniform")
    parser.add_argument("--upsample", type=int, default=1,
                        help="logits drawn on a grid this many times coarser, upsampled bilinearly (a "
                             "network's smooth output), times 3")


def step_inputs(args):
    """-> (logits requiring grad, labels, pool size) for those options; sets the thread count."""
    torch.set_num_threads(args.threads)
    n, c, h, w, pool = args.shape
    logits, labels = make_inputs((n, c, h, w), labels=args.labels)
    if args.upsample > 1:
        coarse = logits[:, :, ::args.upsample, ::args.upsample] * 3
        logits = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).contiguous()
    return logits.requires_grad_(True), labels, pool
