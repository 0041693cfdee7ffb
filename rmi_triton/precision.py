"""Full precision under autocast.

A network trained with autocast hands the loss float16 or bfloat16 logits, and may call
backward() inside its autocast block. The statistics, the d x d algebra and the engines'
backward must still run in float32 / float64 (docs/DESIGN.md section 3's tolerances), so the
loss front and the torch engine's backward switch autocast off around their work.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_off(device_type: str):
    """A context with autocast disabled for `device_type` (nothing to disable where that
    device type has no autocast)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()
