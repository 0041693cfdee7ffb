"""The options of the RMI loss, checked once, shared by every engine.

`RMIOptions` is a frozen record: the module front builds it from keyword
arguments (rejecting unknown values with a message that names the allowed
ones), and the reference and both engines read it. Nothing here touches a
tensor's values.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import capture

POOLS = ("avg", "max", "interp", "none")
PIXEL_LOSSES = ("bce", "ce", None)
PROBS = ("sigmoid", "softmax")
CLASS_REDUCTIONS = ("sum", "mean")
COMBINES = ("weighted", "additive")
BACKENDS = ("auto", "torch", "triton")
MAX_RADIUS = 10
MAX_POOL_SIZE = 8
# The Triton kernels compare labels as int32: an ignore_index outside it would match wrapped labels.
IGNORE_INDEX_RANGE = (-2 ** 31, 2 ** 31 - 1)

# Constants of the published formula (docs/DESIGN.md section 1).
PROB_CLIP = 1e-6  # added to every probability: p = prob * valid + 1e-6
RIDGE = 5e-4  # a, the ridge on Sp and on V before the Cholesky factorisation
LOG_EPS = 1e-8  # inside log(diag(chol) + 1e-8)


@dataclass(frozen=True)
class RMIOptions:
    """Every knob of the loss. Defaults are the paper's Table-1 setting.

    radius:          R, the side of the square region (d = R*R), 1..10.
    pool:            how y and p are downsampled before the regions are taken:
                     "avg" (avg_pool2d, kernel = stride = pool_size,
                     padding = pool_size // 2, padding counted), "max"
                     (max_pool2d, same geometry), "interp" (labels nearest,
                     probabilities bilinear with align_corners=True, to
                     (H // s, W // s)) or "none".
    pool_size:       s, 1..8; s = 1 means no downsampling whatever `pool` says.
    pixel_loss:      "bce" (sigmoid BCE summed over classes / (valid + 1)),
                     "ce" (cross-entropy, mean over valid pixels) or None.
    probs:           "sigmoid" or "softmax" (over classes) for the RMI term.
    ignore_index:    label value of pixels that take no part.
    exclude_ignored: leave region vectors that touch an ignored pixel out of
                     the statistics (see `rmi_triton.loss` for the rule).
    class_weights:   optional per-class factors of the pixel and RMI terms.
    class_reduction: "sum" (paper) or "mean" of the per-class RMI terms.
    rmi_weight:      lambda, 0.5 by default.
    combine:         "weighted": lambda * pixel + (1 - lambda) * rmi (paper);
                     "additive": pixel + lambda * rmi.
    backend:         "auto" (Triton for CUDA tensors, torch otherwise),
                     "torch" or "triton".
    validate:        run the checks that need a device sync (label range,
                     finite logits).
    """

    radius: int = 3
    pool: str = "avg"
    pool_size: int = 4
    pixel_loss: Optional[str] = "bce"
    probs: str = "sigmoid"
    ignore_index: int = 255
    exclude_ignored: bool = False
    class_weights: Optional[tuple] = None
    class_reduction: str = "sum"
    rmi_weight: float = 0.5
    combine: str = "weighted"
    backend: str = "auto"
    validate: bool = True

    def __post_init__(self):
        # integers and numbers of any kind (numpy's too) are stored as Python int and float
        object.__setattr__(self, "radius", check_int("radius", self.radius, 1, MAX_RADIUS))
        _check_choice("pool", self.pool, POOLS)
        object.__setattr__(self, "pool_size", check_int("pool_size", self.pool_size, 1, MAX_POOL_SIZE))
        _check_choice("pixel_loss", self.pixel_loss, PIXEL_LOSSES)
        _check_choice("probs", self.probs, PROBS)
        object.__setattr__(self, "ignore_index", check_int("ignore_index", self.ignore_index, *IGNORE_INDEX_RANGE))
        object.__setattr__(self, "exclude_ignored", _check_bool("exclude_ignored", self.exclude_ignored))
        _check_choice("class_reduction", self.class_reduction, CLASS_REDUCTIONS)
        _check_choice("combine", self.combine, COMBINES)
        _check_choice("backend", self.backend, BACKENDS)
        object.__setattr__(self, "validate", _check_bool("validate", self.validate))
        if isinstance(self.rmi_weight, (bool, np.bool_)) or not isinstance(self.rmi_weight, numbers.Real):
            raise TypeError(f"rmi_weight must be a number, got {self.rmi_weight!r}")
        object.__setattr__(self, "rmi_weight", float(self.rmi_weight))
        if not math.isfinite(self.rmi_weight) or self.rmi_weight < 0:
            raise ValueError(f"rmi_weight must be finite and >= 0, got {self.rmi_weight}")
        if self.combine == "weighted" and self.rmi_weight > 1:
            raise ValueError(
                f"rmi_weight must lie in [0, 1] with combine='weighted' "
                f"(lambda * pixel + (1 - lambda) * rmi), got {self.rmi_weight}")
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", _as_weights(self.class_weights))

    @property
    def d(self) -> int:
        """Dimension of a region vector, R * R."""
        return self.radius * self.radius

    @property
    def downsamples(self) -> bool:
        return self.pool != "none" and self.pool_size > 1

    def pooled_size(self, h: int, w: int) -> tuple:
        """(H', W') of the map the regions are taken from."""
        if not self.downsamples:
            return h, w
        s = self.pool_size
        if self.pool == "interp":
            return h // s, w // s
        pad = s // 2
        return (h + 2 * pad - s) // s + 1, (w + 2 * pad - s) // s + 1

    def weights_tensor(self, num_classes: int, device, dtype=torch.float64) -> Optional[torch.Tensor]:
        """The class weights on `device` (None without them); not to be modified in place.

        Eager calls share one tensor per device and dtype: building it is a copy from host
        memory, which on a GPU waits for the stream (a host sync a call, two a step). A CUDA
        graph capture builds its own with fill kernels (a capture allows no such copy)."""
        if self.class_weights is None:
            return None
        device = torch.device(device)
        if torch.compiler.is_compiling():
            return torch.tensor(self.class_weights, device=device, dtype=dtype)
        if capture.capturing(device):  # no copy from host memory in a capture; kept only by the graph
            weights = torch.empty(len(self.class_weights), device=device, dtype=dtype)
            for i, value in enumerate(self.class_weights):
                weights[i].fill_(value)
            return weights
        return _device_constant(self.class_weights, device, dtype)


@functools.lru_cache(maxsize=64)
def _device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # built in an eval pass, still usable in training
        return torch.tensor(values, device=device, dtype=dtype)


def check_int(name, value, lo, hi) -> int:
    """value as a Python int (numpy integers too; not bools), or a TypeError / ValueError
    that names the option and its range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    value = operator.index(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


def _check_bool(name, value) -> bool:
    """value as a Python bool (numpy's too, as the numbers are taken), or a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: expected one of {allowed}")


def _real_number(value) -> bool:
    """A Python or numpy real number, or a 0-d real tensor; not a bool or a string."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_weights(weights) -> tuple:
    """A list, tuple, 1-D tensor or 1-D array of numbers, one a class, as a tuple of floats."""
    if isinstance(weights, np.ndarray):
        if weights.dtype.kind not in "iuf":
            raise TypeError(f"class_weights must hold real numbers, got an array of {weights.dtype}")
        weights = torch.from_numpy(weights)
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"class_weights must be 1-D [C], got shape {tuple(weights.shape)}")
        if weights.is_complex() or weights.dtype == torch.bool:
            raise TypeError(f"class_weights must hold real numbers, got a tensor of {weights.dtype}")
        weights = weights.detach().cpu().double().tolist()
    if isinstance(weights, (str, bytes, Mapping, Set)) or not isinstance(weights, Sequence):
        raise TypeError(f"class_weights must be a list, tuple, 1-D tensor or array of numbers, one a class, "
                        f"got {type(weights).__name__} {weights!r}")
    odd = [w for w in weights if not _real_number(w)]
    if odd:  # (float() would take "1" and True)
        raise TypeError(f"class_weights must be a sequence of real numbers, got {odd[0]!r} in {weights!r}")
    values = tuple(float(w) for w in weights)
    if not values:
        raise ValueError("class_weights must not be empty")
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"class_weights must be finite and >= 0, got {values}")
    return values
