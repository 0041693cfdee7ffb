"""Narrow planes: pooled probabilities that barely vary, pooled again from float64.

Both engines form each pixel's probability in float32, as its smaller side min(p, 1 - p) to
float32's relative precision (the engines' module docs): a rounding of about 1e-7 of that
side a pixel. Where a plane's probabilities vary by little more, its statistics and above
all its gradient are made of that rounding. Logits all within about 1e-4 of each other put
the gradient 1.6e-4 to 1.2e-2 off (test_numerics.py); with exclude_ignored the error went as
about 1.4e-7 over the logits' spread (1.4e-5 at 1e-2, 1.6e-6 at 1e-1), and max pooling's
float32 ties routed a cell's gradient to another pixel. Such planes are rare in training (a
network whose output hardly depends on the image), so the engines pool every plane from
float32 probabilities, then pool the narrow ones again from float64 probabilities, whose
rounding is 1e-16: kernel A's EXACT pass on the Triton engine, `_pool_narrow` on the torch
engine.

A plane is narrow when its labels vary (a plane of constant y' has no RMI gradient) and the
standard deviation of q over the cells that enter its statistics is at most NARROW_SPREAD of
min(mean, 1 - mean). With avg pooling (and "interp") q = p' / the valid pixels' share of the
cell: the padding and ignored pixels (p = 0) dilute p' exactly, and where every valid pixel
is one class y' varies by that dilution alone, so counting it as spread left such planes to
the float32 pass (5e-4 to 1.4e-3 off, found by a review). A cell counts where some valid
pixel feeds it (share > 0; with max pooling and none, p' above the 1e-6 floor, which they put
exactly where no valid pixel is) and, with exclude_ignored, a kept region vector holds it.
Just outside the bound the float32 pass's gradient was at most 6.0e-6 off the reference (121
cases on the torch engine, 46 and 3.1e-6 on the Triton engine's interpreter: every pooling,
both probabilities, with and without exclude_ignored; `bench/narrow_bound.py`), 16 times
inside docs/DESIGN.md's 1e-4; at half the bound (2^-6) it was 1.3e-5. The torch engine takes
this rule as written here; the Triton engine's `_narrow_kernel` is the same rule in one
kernel (a step's host time follows its op count).

Max pooling's ties. A plane flat in one region only is not narrow, and there a float32 p
ranked near-equal pixels of a cell otherwise than the float64 reference, which sent the
cell's gradient to another pixel (with the top half of an image at logits of about 1e-4, up
to 1.2e-1 off: `test_numerics.py`). The sigmoid is increasing, so both engines now rank its
pixels by their logits, which is exact. The softmax's p is ranked as before, and the cells
whose largest p has another within `tie_bound` of it (the high side's 1 - p against 1 - p,
and against the low side's p near 1/2: the float32 split at 1/2 is itself rounded) are
pooled again from float64 probabilities, those cells alone: kernel A marks them in its
arg-max byte for its EXACT pass, the torch engine gathers their windows
(`_pool_tied_cells`). The bound, |p| (4 + |ln p|) TIE_TOLERANCE (of 1 - p on the high
side), is 3.2 times the largest relative error of the float32 p measured on either engine,
1.5e-7 (4 + |ln p|) (Triton's interpreter; the torch engine's, 7e-8), so two pixels outside
it keep their order (measured down to p = 1e-9; a cell's gradient is as small as p there).
Pixels of equal logits (an image's edge after an upsampling that repeats it) tie exactly
and are pooled again too, for nothing: `bench/tie_planes.py`, bench/RESULTS.md.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .options import PROB_CLIP, RMIOptions
from .pooling import pool_map

NARROW_SPREAD = 2.0 ** -5
TIE_TOLERANCE = 2.0 ** -21
CHUNK = 1 << 20  # elements of p' taken at a time: 8 MiB of float64 temporaries


def find_narrow(p_low: torch.Tensor, valid: torch.Tensor, keep: Optional[torch.Tensor], opts: RMIOptions,
                floor=None) -> torch.Tensor:
    """The torch engine's call: p' [N, C, H', W'] float64, valid [N, H, W] bool, keep: the
    region vectors that enter the statistics (exclude_ignored; any shape holding
    N x (H'-R+1) x (W'-R+1)) or None, floor: what the statistics add to p' still (the 1e-6
    floor, where it is not in p' yet: [H', W'] or a number) -> [N, C] bool. Planes whose
    labels are constant are the caller's to leave out (`informative_planes`)."""
    n, _, h_low, w_low = p_low.shape
    share = None
    if opts.downsamples and opts.pool in ("avg", "interp"):
        share = pool_map(valid.unsqueeze(1).to(torch.float64), opts)
    covered = None
    if keep is not None:
        covered = covered_cells(keep.reshape(n, h_low - opts.radius + 1, w_low - opts.radius + 1), opts.radius)
    return narrow_planes(p_low, share, covered, floor)


def covered_cells(keep: torch.Tensor, radius: int) -> torch.Tensor:
    """keep [N, H'-R+1, W'-R+1] (bool or 0/1: the region vectors that enter the statistics)
    -> [N, 1, H', W'] float64 0/1, the cells some such vector holds."""
    k = keep.to(torch.float64).unsqueeze(1)
    pad = radius - 1
    return F.max_pool2d(F.pad(k, (pad, pad, pad, pad)), radius, stride=1)


def narrow_planes(p_low: torch.Tensor, share: Optional[torch.Tensor] = None, covered: Optional[torch.Tensor] = None,
                  floor=None) -> torch.Tensor:
    """p' [N, C, H', W'] float64 (plus `floor`, if given) -> [N, C] bool, the narrow planes
    (module doc); the Triton engine's `_narrow_kernel` is the same rule, with the planes whose
    labels are constant left out.

    share ([N, 1, H', W'], `pool_map` of the valid mask: avg pooling and "interp"): the part
    of each cell's p' that valid pixels make; q = p' / share, their mean p, over the cells
    where it is positive. Without it (max pooling, none), q = p' over the cells above the
    1e-6 floor, which max pooling and none put exactly where no valid pixel is. covered
    ([N, 1, H', W'] 0/1, `covered_cells`): only cells a kept region vector holds count. A
    plane without such cells is not narrow. Classes are taken CHUNK elements at a time, so
    that the temporaries stay small next to p'; no value is read on the host."""
    n, c = p_low.shape[:2]
    step = max(1, CHUNK // max(1, n * p_low[0, 0].numel()))
    if share is not None:  # [N, 1, H', W'], the same for every class: formed once
        counted = share > 0
        divisor = torch.where(counted, share, torch.ones_like(share))
    found = []
    for first in range(0, c, step):
        q = p_low[:, first:first + step]
        q = q + floor if floor is not None else q.clone()
        if share is not None:
            q /= divisor
        else:
            counted = q > PROB_CLIP
        weight = counted.to(q.dtype)
        if covered is not None:
            weight *= covered
        count = weight.sum((2, 3))
        safe = count.clamp(min=1)
        mean = (q * weight).sum((2, 3)) / safe
        var = q.sub_(mean[..., None, None]).mul_(weight).square_().sum((2, 3)) / safe
        level = torch.minimum(mean, 1 - mean)
        found.append((var <= (NARROW_SPREAD * level).square()) & (count > 0))
    return torch.cat(found, 1)


def tie_bound(top: torch.Tensor) -> torch.Tensor:
    """How near another pixel's key must come to a cell's largest (`top`: p, or -(1 - p) on the
    high side) for max pooling's float32 order to be in doubt: |top| (4 + |ln |top||)
    TIE_TOLERANCE (module doc); 0, so no tie, where top is 0."""
    size = top.abs()
    return size * size.clamp(min=torch.finfo(torch.float32).tiny).log_().abs_().add_(4.0) * TIE_TOLERANCE
