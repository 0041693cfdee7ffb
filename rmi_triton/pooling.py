"""Downsampling geometry shared by the reference and the engines.

One place says how a map is downsampled (docs/DESIGN.md section 1, step 4) and
how an ignored pixel marks the downsampled cells and region vectors when
`exclude_ignored=True`:

* A downsampled cell is *ignored* when any full-resolution pixel that feeds
  it, in the labels' or the probabilities' downsampling, is ignored:
  avg / max pooling: a pixel of its s x s window (padding is no pixel);
  interp: the pixel nearest-neighbour picks for the labels, or any of the
  up to four pixels that bilinear interpolation weighs with a non-zero
  weight; none: the pixel itself.
* A region vector is left out when any of its R x R cells is ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import RMIOptions


def pool_map(x: torch.Tensor, opts: RMIOptions, *, labels_like: bool = False) -> torch.Tensor:
    """Downsample [N, K, H, W] the way the RMI term does.

    labels_like selects the label rule of "interp" (nearest instead of
    bilinear with align_corners=True); avg and max treat both alike.
    """
    if not opts.downsamples:
        return x
    s = opts.pool_size
    if opts.pool == "avg":
        return F.avg_pool2d(x, kernel_size=s, stride=s, padding=s // 2)
    if opts.pool == "max":
        return F.max_pool2d(x, kernel_size=s, stride=s, padding=s // 2)
    size = opts.pooled_size(x.shape[-2], x.shape[-1])
    if labels_like:
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def ignored_cells(ignored: torch.Tensor, opts: RMIOptions) -> torch.Tensor:
    """[N, 1, H, W] 0/1 float ignore mask -> [N, 1, H', W'] bool, the rule above."""
    if not opts.downsamples:
        return ignored > 0
    if opts.pool == "interp":
        h_low, w_low = opts.pooled_size(*ignored.shape[-2:])
        rows = _bilinear_sources(ignored.shape[-2], h_low, ignored)
        cols = _bilinear_sources(ignored.shape[-1], w_low, ignored)
        touched = rows @ ignored @ cols.transpose(0, 1) > 0
        return touched | (pool_map(ignored.float(), opts, labels_like=True) > 0)
    s = opts.pool_size
    return F.max_pool2d(ignored, kernel_size=s, stride=s, padding=s // 2) > 0


def _bilinear_sources(size: int, size_low: int, like: torch.Tensor) -> torch.Tensor:
    """[size_low, size] 0/1: which input rows bilinear interpolation with
    align_corners=True weighs with a non-zero weight for each output row."""
    first, second, frac = _bilinear_taps(size, size_low, like.device)
    second = torch.where(frac != 0, second, first)
    src = torch.arange(size, device=like.device)
    hit = (src == first.unsqueeze(1)) | (src == second.unsqueeze(1))
    return hit.to(like.dtype)


def bilinear_backward(grad_low: torch.Tensor, size) -> torch.Tensor:
    """The adjoint of `F.interpolate(x, grad_low.shape[-2:], mode="bilinear", align_corners=True)`
    for x [..., H, W] = size: dL/dx from dL/dx' = grad_low, one axis at a time. Each index_add
    below meets every target at most once (the steps between taps are >= 1 when downsampling),
    so the result is the same run after run on CUDA too, and allowed under
    torch.use_deterministic_algorithms, where PyTorch's own backward of the interpolation
    (atomic adds) raises."""
    g = grad_low
    for dim, length in ((g.dim() - 1, size[-1]), (g.dim() - 2, size[-2])):
        first, second, frac = _bilinear_taps(length, g.shape[dim], g.device)
        frac = frac.to(g.dtype).view([-1] + [1] * (g.dim() - 1 - dim))
        shape = list(g.shape)
        shape[dim] = length
        out = g.new_zeros(shape)
        out.index_add_(dim, first, g * (1 - frac))
        g = out.index_add_(dim, second, g * frac)
    return g


def _bilinear_taps(size: int, size_low: int, device):
    """Output k of an align_corners=True resize from `size` to `size_low` is
    (1 - f_k) x[first_k] + f_k x[second_k] (second_k = first_k + 1 within the map), f_k in
    float64. The taps in integer arithmetic, so that which inputs count does not depend on a
    float dtype: output k sits at k (size - 1) / (size_low - 1)."""
    num = torch.arange(size_low, device=device) * (size - 1)
    den = max(size_low - 1, 1)
    first = num // den
    return first, (first + 1).clamp(max=size - 1), (num % den).double() / den


def kept_regions(ignored: torch.Tensor, opts: RMIOptions) -> torch.Tensor:
    """[N, 1, H, W] 0/1 float ignore mask -> [N, 1, H'-R+1, W'-R+1] bool:
    True where the region vector enters the statistics."""
    cells = ignored_cells(ignored, opts).to(ignored.dtype)
    return F.max_pool2d(cells, kernel_size=opts.radius, stride=1) == 0
