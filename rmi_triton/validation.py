"""Input checks of the loss front: clear errors instead of crashes deep inside.

Shape and dtype checks are free; the label-range and finite-logit checks
read the data and cost a device sync each, so `validate=False` skips them.
"""

from __future__ import annotations

import torch

from .options import RMIOptions

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int64, torch.int32, torch.uint8)


def check_inputs(logits: torch.Tensor, labels: torch.Tensor, opts: RMIOptions,
                 num_classes: int | None) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"logits and labels must be torch.Tensor, got {type(logits).__name__} "
                        f"and {type(labels).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"logits must be 4-D [N, C, H, W], got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64, int32 or uint8, got {labels.dtype}")
    for name, t in (("logits", logits), ("labels", labels)):
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense tensor, got layout {t.layout} ({name}.to_dense())")
    n, c, h, w = logits.shape
    if labels.shape != (n, h, w):
        hint = ""
        if labels.dim() == 4 and labels.shape[1] == 1:
            hint = ": one label map an image, without a channel dimension (labels.squeeze(1))"
        elif labels.shape == logits.shape[:3]:
            hint = (": the logits look channels-last, [N, H, W, C]; the loss takes [N, C, H, W] "
                    "(logits.permute(0, 3, 1, 2))")
        elif labels.dim() == 3 and labels.shape[0] == n and labels.shape[1] >= h and labels.shape[2] >= w:
            hint = (": the loss takes logits at the labels' resolution; upsample them first, e.g. "
                    "F.interpolate(logits, size=labels.shape[-2:], mode='bilinear', align_corners=False)")
        raise ValueError(f"labels of logits {list(logits.shape)} must have shape [N, H, W] = {[n, h, w]}, "
                         f"got {list(labels.shape)}{hint}")
    if labels.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but labels on {labels.device}")
    if logits.device.type == "meta":
        raise ValueError("logits and labels are on the meta device, which holds no values: the loss needs "
                         "tensors with values")
    if n == 0 or c == 0 or h == 0 or w == 0:
        raise ValueError(f"logits must not be empty, got shape {tuple(logits.shape)}")
    if num_classes is not None and c != num_classes:
        raise ValueError(f"logits have {c} classes (dim 1) but num_classes={num_classes}")
    if opts.class_weights is not None and len(opts.class_weights) != c:
        raise ValueError(f"class_weights has {len(opts.class_weights)} entries but logits have {c} classes")
    h_low, w_low = opts.pooled_size(h, w)
    if h_low < opts.radius or w_low < opts.radius:
        raise ValueError(
            f"the downsampled map is {h_low} x {w_low} (input {h} x {w}, pool={opts.pool!r}, "
            f"pool_size={opts.pool_size}), smaller than the {opts.radius} x {opts.radius} region: "
            f"use larger inputs, a smaller pool_size or a smaller radius")
    if opts.validate:
        _check_label_range(labels, c, opts.ignore_index)


def _check_label_range(labels: torch.Tensor, c: int, ignore_index: int) -> None:
    wide = labels.long() if labels.dtype == torch.uint8 else labels
    low, high = torch.aminmax(torch.where(wide == ignore_index, 0, wide))  # two passes, not six
    if bool((low < 0) | (high >= c)):
        bad = ((wide < 0) | (wide >= c)) & (wide != ignore_index)
        values = torch.unique(wide[bad])[:8].tolist()
        hint = ""
        if c == 1:  # a single foreground logit, as BCE users feed it
            hint = ("; the labels are class indices, one-hot over the logits' C channels: a binary task "
                    "takes C = 2 (background, foreground)")
        raise ValueError(f"labels hold values outside [0, {c}) that are not ignore_index={ignore_index}: "
                         f"{values}{hint}")


def raise_if_nonfinite(all_finite: torch.Tensor) -> None:
    """Engines fold the finite-logit check into their first pass and call this once."""
    if not bool(all_finite):
        raise ValueError("logits contain NaN or Inf values (pass validate=False to skip this check)")
