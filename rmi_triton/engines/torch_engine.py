"""The PyTorch engine: lean RMI statistics for CPUs and any device without Triton.

One autograd.Function maps logits to the pixel term and the centred
covariance sums (Sy, Sp, Syp) of the region vectors; `rmi_triton.algebra`
turns those into the loss. Two stages, each run in chunks so that
temporaries stay small (and in cache), with scratch buffers reused from
chunk to chunk:

* full resolution, per block of (images, classes): probabilities, mask,
  pixel term and the pooling of p; the labels are pooled by counting (never a
  one-hot float copy of the full map). Average pooling sums runs of whole
  rows, then columns, through views; its backward spreads each cell's
  gradient back through the same views, fused with the sigmoid's derivative.
  The BCE is softplus((1 - 2y) x), summed: the sign flip a scatter into a buffer in
  cache, then one softplus pass. Ignored
  pixels are masked by adding -inf to their logits in the pass that copies
  them (sigmoid(-inf) = 0), and the backward needs no mask of its own: each of
  its terms has a factor that is already zero at ignored pixels.
* downsampled, per group of (n, c) planes: the region vectors as runs of the
  flattened maps ("full width": a window row runs on past the grid's last
  column; those positions are zeroed), centred, and multiplied in float64
  tiles by one batched matrix product. When every vector
  counts there is no stack at all: the Gram's blocks are products of the
  maps' R column-shifted runs with themselves shifted by whole map rows, and
  the map's edge rows give the rest. The backward,
  dL/dp_m = (Gp + Gp^T)(p_m - pbar) + Gyp^T (y_m - ybar)
  summed over the windows that hold cell m, is a (2R-1) x (2R-1) stencil over the
  maps: one depthwise convolution, with the windows at the map's edges set right
  one by one. With `exclude_ignored` each kept vector's gradient is formed as one
  product and folded back over its window with R*R shifted adds.

Probabilities are held as t, p = k - t: k = 1 and t = 1 - p >= +0 where p > 1/2, k = 0
and t = -p <= -0 elsewhere (the sign bit of t is k's), so that both sides keep float32's
relative precision: a float32 p near 1 keeps too little of 1 - p for the statistics of a
confident prediction (V is then a small difference of large terms; at a logit of 8 the
rounding of p is 2e-4 of 1 - p), and a float32 softmax rounds to 1 beyond a margin of 17.
The sigmoid's t is copysign(sigmoid(-|x|), x); the softmax's 1 - p at the largest logit is
the other classes' share, rest / (1 + rest). The pooled p' is float64: the high and low
sides pooled apart, then met. The region stage works in float64 from there. Planes whose p'
barely varies, where even that rounding is a large part of the spread, are pooled again
from float64 probabilities (`rmi_triton.narrow`, `_pool_narrow`). Max pooling ranks the
sigmoid's pixels by their logits (exact); the softmax's cells with near-ties are pooled again
from float64 probabilities of their windows alone (`_pool_tied_cells`).

Planes whose labels are constant (a class absent from an image) carry an RMI
term with exactly zero gradient: their statistics, the pooling of their
probabilities and the gradient that would flow back through it are skipped.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..algebra import split_blocks
from ..differentiable import once
from ..narrow import find_narrow, tie_bound
from ..options import PROB_CLIP, RMIOptions
from ..pooling import bilinear_backward, kept_regions
from ..precision import autocast_off
from ..validation import raise_if_nonfinite

CAPTURABLE = False  # reads values on the host (which planes are informative): no CUDA graph capture
FULL_RES_CHUNK = 1 << 21  # elements of logits handled per step of the full-resolution stage
REGION_CHUNK = 1 << 21  # elements of region-vector stacks alive per step of the low-resolution stage
# Off the CPU (the engine serves GPUs without a recent Triton) the steps are GPU_CHUNK_SCALE times
# larger: there a step's hundred-odd small ops and two host syncs cost more time than its passes,
# and no cache rewards small temporaries (16x21x513x513: 5498 ops and 97 syncs a training step
# -> 1158 and 13; bench/RESULTS.md)
GPU_CHUNK_SCALE = 8
TILE = 8192  # about this many region vectors per Gram product
TIED_CELL_CHUNK = 1 << 20  # elements of the tied cells' windows gathered at a time (`_pool_tied_cells`, on a CPU)


def _chunk(elements: int, device: torch.device) -> int:
    """FULL_RES_CHUNK, REGION_CHUNK or TIED_CELL_CHUNK as used on `device`."""
    return elements if device.type == "cpu" else elements * GPU_CHUNK_SCALE


class Statistics(NamedTuple):
    """What an engine hands to the shared algebra."""

    pixel: torch.Tensor  # scalar float64 (0 when pixel_loss is None)
    sy: torch.Tensor  # [N, C, d, d] float64
    sp: torch.Tensor  # [N, C, d, d] float64, differentiable
    syp: torch.Tensor  # [N, C, d, d] float64, differentiable
    # [N, C, 2d, 2d] float64 [[Sp + aI, Syp^T], [Syp, Sy + aI]], not differentiable: the matrix
    # the algebra factorises, where an engine forms it with the statistics (else built from them)
    joint: Optional[torch.Tensor] = None


def statistics(logits: torch.Tensor, labels: torch.Tensor, opts: RMIOptions) -> Statistics:
    pixel, sy, sp, syp = _TorchStatistics.apply(logits, labels, opts)
    return Statistics(pixel, sy, sp, syp)


# ----------------------------------------------------------------------------
# labels: valid mask, safe indices, pooled one-hot by counting
# ----------------------------------------------------------------------------

def label_maps(labels: torch.Tensor, opts: RMIOptions):
    """-> valid [N, H, W] bool, safe [N, H, W] int64 (ignored pixels -> class 0)."""
    labels = labels.long()
    valid = labels != opts.ignore_index
    return valid, torch.where(valid, labels, 0)


def label_map_dtype(opts: RMIOptions) -> torch.dtype:
    """y' [N, C, H', W']: float32 where its values, counts over the s x s window / s^2, are
    exact (s^2 a power of two, max pooling, "interp", no pooling); float64 where a float32
    count / 9 would round: the statistics of a confident prediction feel 6e-8 of y' as they
    do of p' (module doc)."""
    area = opts.pool_size * opts.pool_size
    if opts.downsamples and opts.pool == "avg" and area & (area - 1):
        return torch.float64
    return torch.float32


def pooled_labels(valid: torch.Tensor, safe: torch.Tensor, c: int, opts: RMIOptions) -> torch.Tensor:
    """The downsampled one-hot labels y' [N, C, H', W'] (`label_map_dtype`), built from class
    counts per cell, so that no one-hot copy of the full-resolution map exists."""
    n, h, w = safe.shape
    h_low, w_low = opts.pooled_size(h, w)
    if not opts.downsamples:
        return _one_hot(safe, valid, c)
    if opts.pool == "interp":
        picked = F.interpolate(torch.where(valid, safe, -1).unsqueeze(1).float(), size=(h_low, w_low),
                               mode="nearest").squeeze(1).long()
        return _one_hot(picked.clamp_min(0), picked >= 0, c)
    s, pad = opts.pool_size, opts.pool_size // 2
    # Pixel (i, j) lies in cell ((i + pad) // s, (j + pad) // s); rows and columns past the
    # last cell count nowhere. The count of (class k, cell) of an image goes to its bin
    # k H'W' + cell, where class C holds the ignored pixels: one scatter-add into a row of
    # bins per image (parallel over the images, unlike a flat index_add, 1.5 -> 1.1 ms at
    # 4 x 256 x 256); the counts are whole numbers, at most s * s: exact in float32 in any order.
    h_used, w_used = min(h, h_low * s - pad), min(w, w_low * s - pad)
    area, planes = h_low * w_low, c + 1
    rows = (torch.arange(h_used, device=safe.device) + pad) // s
    cols = (torch.arange(w_used, device=safe.device) + pad) // s
    cell = (rows * w_low).view(-1, 1) + cols.view(1, -1)
    used = (slice(None), slice(0, h_used), slice(0, w_used))
    index = torch.add(cell, torch.where(valid[used], safe[used], c), alpha=area).view(n, -1)
    ones = torch.ones((1, 1), dtype=torch.float32, device=safe.device).expand(index.shape)
    counts = torch.zeros(n, planes * area, dtype=torch.float32, device=safe.device).scatter_add_(1, index, ones)
    counts = counts.view(n, planes, h_low, w_low)[:, :c]
    if opts.pool == "max":
        return counts.clamp(max=1)
    return counts.to(label_map_dtype(opts)) / (s * s)


def _one_hot(safe: torch.Tensor, valid: torch.Tensor, c: int) -> torch.Tensor:
    out = torch.zeros(safe.shape[0], c, *safe.shape[1:], dtype=torch.float32, device=safe.device)
    return out.scatter_(1, safe.unsqueeze(1), valid.unsqueeze(1).float())


# ----------------------------------------------------------------------------
# stage 1: full resolution
# ----------------------------------------------------------------------------

def _blocks(shape, opts: RMIOptions, device: torch.device):
    """Blocks (images, classes) of about FULL_RES_CHUNK logits each (`_chunk`), processed one at a
    time.

    With sigmoid probabilities and no cross-entropy every class plane is independent,
    so an image is split into groups of classes (of equal size, give or take one);
    softmax and cross-entropy need all classes of a pixel together, so their blocks
    are whole images.
    """
    n, c, h, w = shape
    chunk = _chunk(FULL_RES_CHUNK, device)
    if opts.probs == "sigmoid" and opts.pixel_loss != "ce" and c * h * w > chunk:
        groups = -(-c * h * w // chunk)
        bounds = [c * k // groups for k in range(groups + 1)]
        for image in range(n):
            for first, stop in zip(bounds, bounds[1:]):
                yield slice(image, image + 1), slice(first, stop)
    else:
        step = max(1, chunk // (c * h * w))
        for start in range(0, n, step):
            yield slice(start, min(start + step, n)), slice(0, c)


def _block_labels(safe: torch.Tensor, valid_f: torch.Tensor, images: slice, classes: slice, c: int):
    """Labels of a block, relative to its first class: (index [n, 1, H, W] clamped into the
    block, weight [n, 1, H, W] float: 1 where the pixel is valid and its class is in the block).
    valid_f: the valid mask [N, 1, H, W] as float."""
    lab = safe[images].unsqueeze(1)
    weight = valid_f[images]
    if classes.start == 0 and classes.stop == c:
        return lab, weight
    local = lab - classes.start
    inside = (local >= 0) & (local < classes.stop - classes.start)
    return local.clamp(0, classes.stop - classes.start - 1), weight * inside


class _Cells(NamedTuple):
    """How one axis of a map falls into the cells of average pooling (kernel = stride = s,
    padding s // 2, padding counted): runs of consecutive cells that hold the same number
    of pixels, so that each run is a plain view [.., cells, per_cell, ..] of the map."""

    runs: tuple  # ((cells: slice, pixels: slice, per_cell: int), ...), at most three
    dropped: slice  # pixels past the last cell, which no cell holds


@functools.lru_cache(maxsize=64)
def _cells(size: int, cells: int, s: int) -> _Cells:
    pad = s // 2

    def held(k):  # pixels of cell k: [k s - pad, k s - pad + s) within [0, size)
        return min(k * s - pad + s, size) - max(k * s - pad, 0)

    runs, k, pixel = [], 0, 0
    while k < cells:
        end = k + 1
        while end < cells and held(end) == held(k):
            end += 1
        runs.append((slice(k, end), slice(pixel, pixel + (end - k) * held(k)), held(k)))
        pixel += (end - k) * held(k)
        k = end
    return _Cells(tuple(runs), slice(pixel, size))


def _sum_strided(band: torch.Tensor, out: torch.Tensor) -> None:
    """out <- band.sum(-1) for a short last dimension, as strided adds (a reduction over a
    last dimension of 2..8 elements is far slower than its adds)."""
    if band.shape[-1] == 1:
        out.copy_(band[..., 0])
        return
    torch.add(band[..., 0], band[..., 1], out=out)
    for t in range(2, band.shape[-1]):
        out.add_(band[..., t])


def _cell_sums(p: torch.Tensor, s: int, out: torch.Tensor) -> None:
    """out [n, C, H', W'] <- the sums over the average pooling's cells (kernel = stride = s,
    padding s // 2) of p [n, C, H, W] (any dtype, bool too): whole-row sums over each run of
    cells, then column sums of the quarter-size result."""
    n, c, h, w = p.shape
    h_low, w_low = out.shape[-2:]
    rows = out.new_empty(n, c, h_low, w)
    for cells, pixels, per in _cells(h, h_low, s).runs:
        torch.sum(p[:, :, pixels].unflatten(2, (-1, per)), 3, out=rows[:, :, cells])
    for cells, pixels, per in _cells(w, w_low, s).runs:
        _sum_strided(rows[..., pixels].unflatten(3, (-1, per)), out[..., cells])


def _avg_pool(p: torch.Tensor, s: int, out: torch.Tensor) -> None:
    """out [n, C, H', W'] <- F.avg_pool2d(p, s, s, s // 2) of p [n, C, H, W]."""
    _cell_sums(p, s, out)
    out.div_(s * s)


def _avg_unpool(g_low: torch.Tensor, s: int, out: torch.Tensor, sigmoid=None) -> torch.Tensor:
    """Backward of `_avg_pool`: out [n, C, H, W] <- dL/dp from dL/dp' = g_low [n, C, H', W'].

    With `sigmoid` (s = sigmoid(x), shaped like out) it writes s (1 - s) dL/dp instead,
    the gradient with respect to the logits, without forming dL/dp at full resolution.
    """
    n, c, h, w = out.shape
    h_low, w_low = g_low.shape[-2:]
    g_low = g_low / (s * s)
    spread = g_low.new_empty(n, c, h_low, w)  # each cell's gradient on its columns
    col_cells = _cells(w, w_low, s)
    for cells, pixels, per in col_cells.runs:
        spread[..., pixels].unflatten(3, (-1, per)).copy_(g_low[..., cells, None])
    spread[..., col_cells.dropped] = 0
    row_cells = _cells(h, h_low, s)
    for cells, pixels, per in row_cells.runs:
        source = spread[:, :, cells].unsqueeze(3).expand(-1, -1, -1, per, -1)
        target = out[:, :, pixels].unflatten(2, (-1, per))
        if sigmoid is None:
            target.copy_(source)
        else:
            torch.ops.aten.sigmoid_backward.grad_input(source, sigmoid[:, :, pixels].unflatten(2, (-1, per)),
                                                       grad_input=target)
    out[:, :, row_cells.dropped] = 0
    return out


def _wanted_planes(wanted: torch.Tensor):
    """[n, C] bool -> None when every plane of a block is wanted, else the flat indices of
    those that are (maybe none). Planes whose labels are constant have their RMI
    statistics skipped (`informative_planes`), and so has the work that only feeds them."""
    return None if bool(wanted.all()) else wanted.flatten().nonzero().squeeze(1)


def _planes(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The planes `index` of t [n, C, ...] as one [1, k, ...] tensor."""
    return t.flatten(0, 1).index_select(0, index).unsqueeze(0)


def _high(t: torch.Tensor) -> torch.Tensor:
    """k: where p = k - t is the high side, 1 - t (module doc): t >= +0 (its sign bit clear), bool."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64) >= 0


def _high_halves(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- k - 1/2 = copysign(1/2, t) (module doc), float: faster than a bool and its conversion."""
    return torch.copysign(torch.full((), 0.5, dtype=t.dtype, device=t.device), t, out=out)


def _pool_probs(t: torch.Tensor, opts: RMIOptions, out: torch.Tensor, indices, buffer: torch.Tensor,
                wanted=None, order=None, ties=None) -> None:
    """out [n, C, H', W'] float64 <- the downsampled p = k - t of t [n, C, H, W] (module doc);
    indices: the arg-max of max pooling; buffer: scratch shaped like t. With `wanted` ([n, C]
    bool) only those planes are written. The high and low sides are summed apart (avg) or
    compared apart (max) and met in float64, so that p' near 1 keeps 1 - p' to float32's
    relative precision. Max pooling: `order` (shaped like t), where given, ranks the pixels
    in p's order exactly (the sigmoid's masked logits: a float32 p ties pixels whose p
    differ); else t does, and `ties` (shaped like out, bool, where given) is set at the cells
    whose two largest p are within `tie_bound` (`rmi_triton.narrow`)."""
    index = None if wanted is None else _wanted_planes(wanted)
    if index is not None:
        if len(index):
            part = out.new_empty(1, len(index), *out.shape[2:])
            part_indices = None if indices is None else indices.new_empty(part.shape)
            part_ties = None if ties is None else ties.new_zeros(part.shape)
            part_t = _planes(t, index)
            _pool_probs(part_t, opts, part, part_indices, buffer.flatten()[:part_t.numel()].view(part_t.shape),
                        order=None if order is None else _planes(order, index), ties=part_ties)
            out.flatten(0, 1).index_copy_(0, index, part[0])
            if indices is not None:
                indices.flatten(0, 1).index_copy_(0, index, part_indices[0])
            if ties is not None:
                ties.flatten(0, 1).index_copy_(0, index, part_ties[0])
        return
    if not opts.downsamples:
        out.copy_(_high_halves(t, buffer)).add_(0.5).sub_(t)
    elif opts.pool == "avg":
        # sum of k - t = sum of (k - 1/2) + (pixels) / 2 - sum of t; float32 sums: the first
        # in halves (exact), the second of small values
        s = opts.pool_size
        sums = t.new_empty(2, *out.shape)
        _cell_sums(_high_halves(t, buffer), s, sums[0])
        _cell_sums(t, s, sums[1])
        out.copy_(sums[0]).sub_(sums[1]).div_(s * s).add_(_pixel_share(*t.shape[-2:], opts, t.device), alpha=0.5)
    elif opts.pool == "max" and order is not None:
        s = opts.pool_size
        _, index = F.max_pool2d(order, s, s, s // 2, return_indices=True)
        indices.copy_(index)
        best = t.flatten(2).gather(2, index.flatten(2)).view(out.shape)
        out.copy_(best).neg_().add_(_high_halves(best, torch.empty_like(best)).add_(0.5))  # k - t, in float64
    elif opts.pool == "max":
        # any high pixel beats every low one; on either side the smallest t is the largest p
        s, high, neg = opts.pool_size, _high(t), t.neg()
        high_side = torch.where(high, neg, float("-inf"))  # -(1 - p)
        best_high, index_high = F.max_pool2d(high_side, s, s, s // 2, return_indices=True)
        low_side = neg.masked_fill_(high, float("-inf"))  # p: 0 at ignored pixels
        best_low, index_low = F.max_pool2d(low_side, s, s, s // 2, return_indices=True)
        has_high = best_high > float("-inf")
        torch.where(has_high, best_high.double() + 1.0, best_low.double(), out=out)
        torch.where(has_high, index_high, index_low, out=indices)
        if ties is not None:  # each side's second largest: its largest put out of the running
            high_side.flatten(2).scatter_(2, index_high.flatten(2), float("-inf"))
            low_side.flatten(2).scatter_(2, index_low.flatten(2), float("-inf"))
            best = torch.where(has_high, best_high, best_low)
            second = torch.where(has_high, F.max_pool2d(high_side, s, s, s // 2),
                                 F.max_pool2d(low_side, s, s, s // 2))
            ties |= (best - second).abs_() < tie_bound(best)
            # and across the sides: the float32 split at 1/2 (a sum of rounded terms) can put the
            # larger of two p near 1/2 on the low side (a review found a pair 1.5e-8 apart)
            ties |= has_high & (((best_high + 1.0) - best_low).abs_() < tie_bound(best_low))
    else:
        p = _high_halves(t, buffer).double().add_(0.5).sub_(t)
        out.copy_(F.interpolate(p, size=out.shape[-2:], mode="bilinear", align_corners=True))


def _unpool_grad(grad_low: torch.Tensor, indices, shape, opts: RMIOptions) -> torch.Tensor:
    """Backward of `_pool_probs`: dL/dp' [n, C, H', W'] -> dL/dp [n, C, H, W] (new tensor)."""
    if not opts.downsamples:
        return grad_low
    s = opts.pool_size
    if opts.pool == "avg":
        return _avg_unpool(grad_low, s, grad_low.new_empty(shape))
    if opts.pool == "max":
        # the windows do not overlap (kernel = stride): each pixel takes one cell's gradient at
        # most, a plain scatter (max_unpool2d has no deterministic implementation: it raises
        # under torch.use_deterministic_algorithms)
        out = grad_low.new_zeros(shape)
        out.flatten(2).scatter_(2, indices.flatten(2), grad_low.flatten(2))
        return out
    return bilinear_backward(grad_low, shape[-2:])


def _sigmoid_grad(g_low: torch.Tensor, indices, t: torch.Tensor, opts: RMIOptions, out: torch.Tensor,
                  buffer: torch.Tensor, wanted=None) -> None:
    """out <- dL/dx = s (1 - s) dL/dp for dL/dp' = g_low, s = sigmoid(x) held as t (module doc):
    s (1 - s) = |t| (1 - |t|); buffer: scratch shaped like t. With `wanted` ([n, C] bool),
    g_low is zero outside those planes: only they are computed."""
    index = None if wanted is None else _wanted_planes(wanted)
    if index is None:
        _small_side_grad(g_low, indices, torch.abs(t, out=buffer), opts, out)
        return
    out.zero_()
    if len(index):
        part = out.new_empty(1, len(index), *out.shape[2:])
        _small_side_grad(_planes(g_low, index), None if indices is None else _planes(indices, index),
                         _planes(t, index).abs_(), opts, part)  # _planes copies
        out.flatten(0, 1).index_copy_(0, index, part[0])


def _small_side_grad(g_low: torch.Tensor, indices, small: torch.Tensor, opts: RMIOptions, out: torch.Tensor):
    """out <- small (1 - small) dL/dp for dL/dp' = g_low, small = sigmoid(-|x|)."""
    if opts.downsamples and opts.pool == "avg":
        _avg_unpool(g_low, opts.pool_size, out, sigmoid=small)
    else:
        g_p = _unpool_grad(g_low, indices, out.shape, opts)
        torch.ops.aten.sigmoid_backward.grad_input(g_p, small, grad_input=out)


def _bce_sums(masked: torch.Tensor, lab: torch.Tensor, lab_weight: torch.Tensor) -> torch.Tensor:
    """Per class, the BCE summed over valid pixels, sum softplus(x) - x y: [n, C, H, W] -> [C] float64.

    softplus(x) - x y = softplus((1 - 2 y) x): the sign flip is a scatter into a buffer in
    cache (no gather of the logits at the labels), then one softplus pass, which takes
    log1p(exp(-|z|)) to float32's relative precision also where it is tiny (a confident
    prediction's terms are 6e-6 at logits of 12; the log of a float32 1 - s kept 1% of
    that). `masked` holds the logits with -inf at ignored pixels (`_masking_bias`), where
    the softplus is 0; the buffer is overwritten. lab, lab_weight: the block's labels
    (`_block_labels`).
    """
    # -x at the label (a gather and a scatter: a product scatter_reduce raises on CUDA under
    # torch.use_deterministic_algorithms)
    masked.scatter_(1, lab, masked.gather(1, lab).mul_(1 - 2 * lab_weight))
    return torch.ops.aten.softplus.out(masked, 1, 20, out=masked).sum((2, 3)).double().sum(0)


def _masking_bias(valid: torch.Tensor) -> torch.Tensor:
    """[N, H, W] bool -> [N, 1, H, W] float32: 0 at valid pixels, -inf at ignored ones. Added
    to the logits it masks them in the same pass that makes a copy to work on: x + 0 is x
    exactly, and sigmoid(-inf) = 0."""
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return bias.masked_fill_(~valid, float("-inf")).unsqueeze(1)


def _pixel_share(h: int, w: int, opts: RMIOptions, device) -> torch.Tensor:
    """[H', W'] float64: the share of each average-pooling cell's s x s positions that are
    image pixels (the padding counts as zeros)."""
    s, pad = opts.pool_size, opts.pool_size // 2
    h_low, w_low = opts.pooled_size(h, w)

    def share(size, cells):
        start = torch.arange(cells, device=device) * s - pad
        return ((start + s).clamp(max=size) - start.clamp(min=0)).double() / s

    return share(h, h_low).unsqueeze(1) * share(w, w_low)


def _pooled_clip(h: int, w: int, opts: RMIOptions, device) -> torch.Tensor:
    """What the 1e-6 added to every full-resolution probability becomes after pooling (float64):
    avg pooling counts the padding, so a border cell gets 1e-6 times its share of real
    pixels; max, interp and none keep 1e-6."""
    if not (opts.downsamples and opts.pool == "avg"):
        return torch.tensor(PROB_CLIP, dtype=torch.float64, device=device)
    return PROB_CLIP * _pixel_share(h, w, opts, device)


class _Scratch:
    """Buffers reused by every block of a stage: slot k hands out a view of the shape (and
    dtype, float32 unless asked) asked for, growing its buffer when a larger block comes."""

    def __init__(self, device):
        self.device = device
        self.buffers = {}

    def get(self, slot: int, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = self.buffers[slot] = torch.empty(size, device=self.device, dtype=dtype)
        return buffer[:size].view(shape)


def _signed_sigmoid(masked: torch.Tensor, small: torch.Tensor, out: torch.Tensor) -> None:
    """out <- t = copysign(sigmoid(-|x|), x) (module doc) of the masked logits x (-inf at
    ignored pixels: t = -0, p = 0), through `small` (scratch), sigmoid(-|x|): the smaller of
    p = sigmoid(x) and 1 - p. The masking's x + 0 makes a logit of -0.0 +0.0, so t's sign
    is x's."""
    torch.copysign(masked, -1.0, out=small)  # -|x|
    torch.sigmoid(small, out=small)
    torch.copysign(small, masked, out=out)


def _softmax_pieces(xc: torch.Tensor, out: torch.Tensor):
    """Per pixel of a block [n, C, H, W] holding every class: (m, top, rest) [n, 1, H, W], the
    largest logit, its first class and the sum of exp(x - m) over the other classes, which
    leaves out the largest's exact 1 (1 - softmax at the top is rest / (1 + rest), to float32's
    relative precision); out <- exp(x - m), 0 at the top class."""
    m, top = xc.max(1, keepdim=True)
    torch.sub(xc, m, out=out).exp_()
    out.scatter_(1, top, 0.0)
    return m, top, out.sum(1, keepdim=True)


def _signed_softmax(xc: torch.Tensor, valid: torch.Tensor, out: torch.Tensor):
    """out <- t of the softmax over the classes (module doc): +(1 - p) = rest / (1 + rest) at
    the top class where p > 1/2 there, -p elsewhere; -0 at ignored pixels (valid [n, 1, H, W]
    bool). -> `_softmax_pieces`' (m, top, rest)."""
    m, top, rest = _softmax_pieces(xc, out)
    inv = torch.add(rest, 1.0).reciprocal_()
    out.mul_(inv.neg())
    out.scatter_(1, top, torch.where(rest < 1.0, rest * inv, inv.neg()))
    out.masked_fill_(~valid, -0.0)
    return m, top, rest


def _cross_entropy(xc: torch.Tensor, lab: torch.Tensor, m, top, rest) -> torch.Tensor:
    """lse - x_label = (m - x_label) + log(1 + rest) per pixel [n, 1, H, W] from
    `_softmax_pieces`: the difference of logits first (exact near each other), so that lse is
    never rounded at the logits' scale (an ulp of 1e4 is 1e-3); log(1 + rest) alone where the
    label holds the largest logit."""
    log_rest = torch.log1p(rest)
    return torch.where((lab == top) & (rest < 1.0), log_rest, torch.sub(m, xc.gather(1, lab)).add_(log_rest))


def _full_res_forward(x, valid, safe, opts: RMIOptions, weights, keep_probs: bool, informative, keep):
    """-> pixel term (float64 scalar), pooled p [N, C, H', W'] float64, max-pool indices,
    and (keep_probs) t of the masked probabilities [N, C, H, W] float32 for the backward.
    informative: [N, C] bool, the planes whose pooled p is needed (zero in the others);
    keep: the region vectors that enter the statistics (exclude_ignored) or None."""
    n, c, h, w = x.shape
    h_low, w_low = opts.pooled_size(h, w)
    p_low = x.new_zeros((n, c, h_low, w_low), dtype=torch.float64)
    indices = torch.zeros((n, c, h_low, w_low), dtype=torch.int64, device=x.device) if opts.pool == "max" \
        and opts.downsamples else None
    # max pooling of the softmax: the cells with near-ties, pooled again from float64
    ties = torch.zeros(p_low.shape, dtype=torch.bool, device=x.device) if indices is not None \
        and opts.probs == "softmax" else None
    valid_f = valid.unsqueeze(1).float()
    checksum = torch.zeros((), dtype=torch.float32, device=x.device)  # a finite sum of x proves every x finite
    pixel = torch.zeros((), dtype=torch.float64, device=x.device)
    if opts.pixel_loss == "bce":
        bce = torch.zeros(c, dtype=torch.float64, device=x.device)  # per class
    ce_weight = torch.zeros((), dtype=torch.float64, device=x.device)
    # Keeping t of the probabilities spares the backward a transcendental pass over the
    # logits; it takes the place of the log-softmax that cross-entropy keeps.
    kept = torch.empty(x.shape, dtype=torch.float32, device=x.device) if keep_probs else None
    bias = _masking_bias(valid) if opts.probs == "sigmoid" or opts.pixel_loss == "bce" else None
    scratch = _Scratch(x.device)
    for images, classes in _blocks(x.shape, opts, x.device):
        g = (images, classes)
        xc = x[g].float().contiguous()
        if opts.validate:
            checksum += xc.sum()
        lab, lab_weight = _block_labels(safe, valid_f, images, classes, c)
        t = kept[g] if kept is not None else scratch.get(0, xc.shape)  # p = k - t (module doc)
        if opts.probs == "softmax" or opts.pixel_loss == "ce":  # blocks hold every class here
            if opts.probs == "softmax":  # the + 1e-6 is added after pooling
                pieces = _signed_softmax(xc, valid[images].unsqueeze(1), t)
            else:
                pieces = _softmax_pieces(xc, scratch.get(1, xc.shape))
            if opts.pixel_loss == "ce":
                pw = lab_weight if weights is None else weights.float()[lab] * lab_weight
                pixel += (_cross_entropy(xc, lab, *pieces) * pw).sum().double()
                ce_weight += pw.sum().double()
        if bias is not None:  # the masked logits, then t: sigmoid's p = 0 at ignored pixels
            masked = torch.add(xc, bias[images], out=scratch.get(2, xc.shape))
            if opts.probs == "sigmoid":
                _signed_sigmoid(masked, scratch.get(1, xc.shape), t)
        _pool_probs(t, opts, p_low[g], None if indices is None else indices[g], scratch.get(1, xc.shape),
                    informative[g], order=masked if opts.probs == "sigmoid" else None,
                    ties=None if ties is None else ties[g])
        if opts.pixel_loss == "bce":  # after the pooling, which may read `masked`: this overwrites it
            bce[classes] += _bce_sums(masked, lab, lab_weight)
    clip = _pooled_clip(h, w, opts, x.device)
    narrow = (find_narrow(p_low, valid, keep, opts, clip) & informative).cpu()
    if bool(narrow.any()):
        _pool_narrow(x, valid, opts, p_low, indices, narrow)
    if ties is not None:  # (a narrow plane's cells are all pooled again already)
        cells = ties.logical_and_(~narrow.to(x.device)[..., None, None]).nonzero()
        if len(cells):
            _pool_tied_cells(x, valid, opts, p_low, indices, cells)
    p_low += clip
    if opts.validate and not bool(torch.isfinite(checksum)):
        raise_if_nonfinite(torch.isfinite(x).all())  # exact check: the sum may have overflowed
    if opts.pixel_loss == "bce":
        pixel = (bce.sum() if weights is None else (bce * weights).sum()) / (valid.sum() + 1)
    elif opts.pixel_loss == "ce":
        pixel = pixel / torch.where(ce_weight > 0, ce_weight, torch.ones_like(ce_weight))
    return pixel, p_low, indices, kept


def _pool_narrow(x, valid, opts: RMIOptions, p_low, indices, narrow) -> None:
    """p_low and the max-pool indices of the planes `narrow` ([N, C] bool, on the CPU)
    recomputed from float64 probabilities (`rmi_triton.narrow`); the same steps as
    `_full_res_forward`'s in float64, block by block where some plane is narrow."""
    bias = _masking_bias(valid) if opts.probs == "sigmoid" else None
    scratch = _Scratch(x.device)
    # a CPU's blocks on any device: this pass is rare, and its float64 temporaries (three of a
    # block's size) stay small next to the first pass's scratch, which is still held
    for images, classes in _blocks(x.shape, opts, torch.device("cpu")):
        g = (images, classes)
        if not bool(narrow[g].any()):
            continue
        xc = x[g].double()
        t = scratch.get(0, xc.shape, torch.float64)
        if opts.probs == "softmax":
            _signed_softmax(xc, valid[images].unsqueeze(1), t)
        else:
            masked = torch.add(xc, bias[images], out=scratch.get(1, xc.shape, torch.float64))
            _signed_sigmoid(masked, scratch.get(2, xc.shape, torch.float64), t)
        _pool_probs(t, opts, p_low[g], None if indices is None else indices[g],
                    scratch.get(2, xc.shape, torch.float64), narrow[g].to(x.device),
                    order=masked if opts.probs == "sigmoid" else None)


def _pool_tied_cells(x, valid, opts: RMIOptions, p_low, indices, cells) -> None:
    """p_low and the max-pool indices of `cells` ([K, 4]: image, class, row, column of p_low)
    again from their windows' float64 softmax probabilities: each window's pixels gathered
    with every class once, for all the classes tied there (an edge of equal pixels ties in
    about every class: per tied cell it was C times the work), windows of TIED_CELL_CHUNK
    elements at a time; the first largest p in row-major order, as torch's max pooling
    (padding never, ignored pixels at p = 0). The probabilities are torch's float64 softmax
    over each pixel's classes, exp(x - m) / sum, ranked as the reference forms and ranks them
    (a randomised run on upsampled logits, bench/max_pool_sweep.py): a log-softmax's exp
    rounded log p at its own scale (an ulp of 8 is 1.8e-15) and tied pixels whose p differ
    by 8 of p's ulps; ranking the high side by 1 - p told apart pixels whose float64 p are
    one number, which the reference takes in row-major order."""
    h, w = x.shape[-2:]
    h_low, w_low = p_low.shape[-2:]
    s = opts.pool_size
    offsets = torch.arange(s, device=x.device) - s // 2
    windows, window_of = torch.unique((cells[:, 0] * h_low + cells[:, 2]) * w_low + cells[:, 3],
                                      return_inverse=True)
    order = torch.argsort(window_of, stable=True)
    cells, window_of = cells[order], window_of[order]
    ends = [0] + torch.bincount(window_of, minlength=len(windows)).cumsum(0).tolist()
    step = max(1, _chunk(TIED_CELL_CHUNK, x.device) // (s * s * x.shape[1]))
    for first in range(0, len(windows), step):
        last = min(first + step, len(windows))
        b, c, i, j = cells[ends[first]:ends[last]].unbind(1)
        window = window_of[ends[first]:ends[last]] - first
        place = windows[first:last]
        rows = (place // w_low % h_low)[:, None] * s + offsets  # [windows, s]
        cols = (place % w_low)[:, None] * s + offsets
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        r = rows.clamp(0, h - 1)[:, :, None].expand(-1, -1, s)
        q = cols.clamp(0, w - 1)[:, None, :].expand(-1, s, -1)
        image = (place // (h_low * w_low))[:, None, None].expand(-1, s, s)
        # each pixel's classes last: over [windows, C, s, s] an op's vector loop runs across
        # pixels and its tail rounds equal logits apart (the randomised run failed 490 times in
        # part of a range where this layout failed 203 times in all); not a guarantee either
        xw = x[image, :, r, q].double()  # [windows, s, s, C]
        # p = exp(x - m) / sum, as the reference's softmax forms it (and ranks it: its p near 1
        # rounds at 1.1e-16, and ordering that side by 1 - p split pixels it takes as equal)
        p = torch.softmax(xw, -1)[window, :, :, c].flatten(1)  # [k, s * s]
        ok = valid[image, r, q][window].flatten(1)
        key = torch.where(inside[window].flatten(1), torch.where(ok, p, 0.0), float("-inf"))  # padding never
        k = key.argmax(1)  # the first largest
        p_low[b, c, i, j] = key.gather(1, k[:, None]).squeeze(1)
        top_row = rows[window].gather(1, (k // s)[:, None]).squeeze(1)
        indices[b, c, i, j] = top_row * w + cols[window].gather(1, (k % s)[:, None]).squeeze(1)


def _softmax_grad(g_p: torch.Tensor, t: torch.Tensor, out: torch.Tensor, buffer: torch.Tensor) -> None:
    """out <- dL/dx = p (g - sum_c p_c g_c) of the softmax, g = dL/dp [n, C, H, W], p = k - t,
    taken about the class with p > 1/2 (k = 1), if any: sum_c t_c g_c = g_top (1 - p_top) -
    sum_{c != top} p_c g_c = g_top - sum_c p_c g_c, so dL/dx = p (g - g_top + sum_c t_c g_c),
    which forms no difference of the near-equal g_top and sum_c p_c g_c (it loses everything
    as p_top -> 1: a float32 softmax rounds to 1 beyond a margin of 17). No such class:
    g_top = 0 and sum_c t_c g_c = -sum_c p_c g_c."""
    k = _high_halves(t, buffer).add_(0.5)
    torch.sub(g_p, (g_p * k).sum(1, keepdim=True), out=out)  # g - g_top first: 0 at the top class
    out.add_((g_p * t).sum(1, keepdim=True)).mul_(k.sub_(t))


def _add_pixel_grad(out: torch.Tensor, t: torch.Tensor, lab: torch.Tensor, lab_weight: torch.Tensor, coef,
                    buffer: torch.Tensor) -> None:
    """out += coef (p - y) for p = k - t (module doc) and the block's one-hot labels y
    (`_block_labels`): k - y first (whole numbers, exact), then less t, so that p - y at a
    label whose p is near 1, -(1 - p) = -t, keeps its relative precision. coef: a number,
    [1, C, 1, 1] per class or [n, 1, H, W] per pixel."""
    b = _high_halves(t, buffer).add_(0.5)
    b.scatter_add_(1, lab, lab_weight.neg())
    out.addcmul_(b.sub_(t), coef)


def _full_res_backward(x, valid, safe, opts: RMIOptions, weights, g_pixel, g_p_low, indices, kept, informative):
    """dL/dlogits from dL/d(pixel term) (scalar or None) and dL/dp' [N, C, H', W'] (or None,
    and zero outside the planes `informative` [N, C] bool); kept: t of the forward's masked
    probabilities [N, C, H, W] (module doc)."""
    x = x.detach()  # the gradient carries no graph, also under create_graph=True
    n, c, h, w = x.shape
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if g_pixel is not None and opts.pixel_loss == "bce":
        coef = (g_pixel.double() / (valid.sum() + 1)) * (weights if weights is not None else 1.0)
        coef = coef.float().expand(c)
    elif g_pixel is not None and opts.pixel_loss == "ce":
        lab_w = valid.double() if weights is None else weights[safe] * valid
        total = lab_w.sum()
        coef = (g_pixel.double() / torch.where(total > 0, total, torch.ones_like(total))).float()
    else:
        coef = None
    needs_softmax = opts.probs == "softmax" or (coef is not None and opts.pixel_loss == "ce")
    needs_sigmoid = opts.probs == "sigmoid" or (coef is not None and opts.pixel_loss == "bce")
    bias = _masking_bias(valid) if needs_sigmoid and opts.probs != "sigmoid" else None
    in_place = grad.dtype == torch.float32 and grad.is_contiguous()
    valid_f = valid.unsqueeze(1).float()
    scratch = _Scratch(x.device)
    for images, classes in _blocks(x.shape, opts, x.device):
        g = (images, classes)
        xc = x[g].float().contiguous()
        lab, lab_weight = _block_labels(safe, valid_f, images, classes, c)
        # written in place into the result when it is float32, else into a float32 buffer
        out = grad[g] if in_place else scratch.get(0, xc.shape)
        # Every term below has a factor that is zero at ignored pixels (t or the label
        # weight), so the result needs no mask of its own.
        t_softmax = t_sigmoid = None
        if needs_softmax:
            t_softmax = kept[g] if opts.probs == "softmax" else scratch.get(1, xc.shape)
            if opts.probs != "softmax":
                _signed_softmax(xc, valid[images].unsqueeze(1), t_softmax)
        if needs_sigmoid:
            t_sigmoid = kept[g] if opts.probs == "sigmoid" else scratch.get(2, xc.shape)
            if opts.probs != "sigmoid":
                masked = torch.add(xc, bias[images], out=scratch.get(3, xc.shape))
                _signed_sigmoid(masked, scratch.get(4, xc.shape), t_sigmoid)
        if g_p_low is None:
            out.zero_()
        elif opts.probs == "sigmoid":  # s (1 - s) dL/dp
            _sigmoid_grad(g_p_low[g], None if indices is None else indices[g], t_sigmoid, opts, out,
                          scratch.get(3, xc.shape), informative[g])
        else:
            g_p = _unpool_grad(g_p_low[g], None if indices is None else indices[g], xc.shape, opts)
            _softmax_grad(g_p, t_softmax, out, scratch.get(3, xc.shape))
        if coef is not None and opts.pixel_loss == "bce":
            # d/dx (softplus(x) - x y) = sigmoid(x) - y
            _add_pixel_grad(out, t_sigmoid, lab, lab_weight, coef[classes].view(1, -1, 1, 1),
                            scratch.get(3, xc.shape))
        elif coef is not None:  # blocks hold every class here
            # d/dx (lse - x_label) = softmax - onehot, weighted per pixel
            pw = coef if weights is None else weights.float()[lab] * coef
            _add_pixel_grad(out, t_softmax, lab, lab_weight, pw, scratch.get(3, xc.shape))
        if not in_place:
            grad[g] = out
    return grad


# ----------------------------------------------------------------------------
# stage 2: region vectors of the downsampled maps
# ----------------------------------------------------------------------------

def _plane_groups(num_planes: int, per_plane: int, budget: int):
    """Slices of planes whose temporaries, `per_plane` elements a plane, stay within `budget`
    elements: as few groups as that allows, of equal size (give or take one)."""
    groups = -(-num_planes // max(1, budget // per_plane))
    bounds = [num_planes * k // max(groups, 1) for k in range(groups + 1)]
    for start, stop in zip(bounds, bounds[1:]):
        yield slice(start, stop)


class _Regions(NamedTuple):
    """The region vectors of a downsampled H' x W' map, "full width".

    Flatten the map: the window at grid position (i, j) with offset (a, b) reads element
    (i + a) W' + j + b, so for each offset the values over all positions m = i W' + j
    form one contiguous run of the flat map. Taking every m in [0, rows * W') puts
    W' - (W' - R + 1) = R - 1 positions per row past the grid's right edge; they get
    weight 0, like the padding rows that round the grid up to whole tiles. Tiles are
    `rows` grid rows each, so one strided view gives every tile's stack.
    """

    radius: int
    width: int  # W'
    height: int  # H'
    rows: int  # grid rows per tile
    tiles: int  # T

    @staticmethod
    def of(h_low: int, w_low: int, radius: int) -> "_Regions":
        grid_rows = h_low - radius + 1
        tiles = -(-grid_rows * w_low // TILE)
        rows = -(-grid_rows // tiles)
        return _Regions(radius, w_low, h_low, rows, -(-grid_rows // rows))

    @property
    def positions(self) -> int:
        """K, positions per tile (a whole number of map rows)."""
        return self.rows * self.width

    def plane_groups(self, num_planes: int, stacked: bool, device: torch.device):
        """Groups of planes for the stacks of region vectors (`stacked`), or for the maps'
        2R column-shifted runs (`_row_shift_sums`)."""
        budget = _chunk(REGION_CHUNK, device)
        if stacked:
            return _plane_groups(num_planes, 2 * self.radius ** 2 * self.tiles * self.positions, budget)
        return _plane_groups(num_planes, 2 * self.radius * self.height * self.width, budget)

    def flat_size(self) -> int:
        """Flat map length that every window of every tile stays inside."""
        return (self.tiles * self.rows + self.radius - 1) * self.width + self.radius - 1

    def joint_maps(self, y: torch.Tensor, p: torch.Tensor, planes: slice, scratch: "_Scratch") -> torch.Tensor:
        """[B, 2, flat_size]: the label and probability maps [P, H', W'] of a group of planes,
        flattened into one buffer, zeros past their end."""
        y = y[planes].flatten(1)
        maps = scratch.get(0, (y.shape[0], 2, self.flat_size()), p.dtype)
        area = y.shape[1]
        maps[:, 0, :area] = y
        maps[:, 1, :area] = p[planes].flatten(1)
        maps[:, :, area:] = 0
        return maps

    def windows(self, maps: torch.Tensor) -> torch.Tensor:
        """[B, 2, flat_size] -> view [B, T, 2, R, R, K] of every region vector, tile by tile."""
        sb, sk, _ = maps.stride()
        r, w = self.radius, self.width
        return maps.as_strided((maps.shape[0], self.tiles, 2, r, r, self.positions),
                               (sb, self.positions, sk, w, 1, 1))

    @property
    def grid(self) -> tuple:
        """(H' - R + 1, W' - R + 1): the positions of the region vectors."""
        return self.height - self.radius + 1, self.width - self.radius + 1

    def weights(self, keep, images: torch.Tensor):
        """The kept-region mask [N, H'-R+1, W'-R+1] of the planes' images (`images`: [B]
        indices) as 0/1 float32 weights [B, T, 1, 1, 1, K], zero past the grid; None when
        every vector counts."""
        if keep is None:
            return None
        return self._on_positions(keep[images].float()).view(-1, self.tiles, 1, 1, 1, self.positions)

    def count(self, weight) -> torch.Tensor:
        """[B] or scalar float64: how many region vectors count in each plane."""
        if weight is None:
            return torch.tensor(float(self.grid[0] * self.grid[1]), dtype=torch.float64)
        return weight.sum((1, 2, 3, 4, 5)).double()

    def _on_positions(self, grid_values: torch.Tensor) -> torch.Tensor:
        """[B, H'-R+1, W'-R+1] -> [B, T * rows, W']: zero past the grid's right edge and rows."""
        grid_rows, grid_cols = self.grid
        return F.pad(grid_values, (0, self.width - grid_cols, 0, self.tiles * self.rows - grid_rows))

    def kept_means(self, windows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Mean [B, 2, R, R] (float64) of each region-vector entry over the kept vectors."""
        count = self.count(weight).clamp_min(1).view(-1, 1, 1, 1)
        return (windows * weight).sum(-1).double().sum(1) / count

    def centred(self, windows: torch.Tensor, weight, mean: torch.Tensor, scratch: "_Scratch",
                dtype: torch.dtype) -> torch.Tensor:
        """Contiguous [B, T, 2, R, R, K] copy of (windows - mean) * weight in `dtype`: the
        centred region vectors, zero at positions that do not count (with no weights: those
        past the grid). The float64 mean is rounded to float32 first (the differences of
        float32 maps are then exact in float64; p' is float64, whose differences round at
        1e-16), and what the rounding leaves (`rounding_offset`) is taken out in float64
        afterwards."""
        centre = mean.float().to(dtype)[:, None, :, :, :, None]
        if torch.compiler.is_compiling():  # its functional sub keeps the windows' strides (no view of them)
            out = (windows - centre).to(dtype).contiguous()
        else:
            out = torch.sub(windows, centre, out=scratch.get(1, windows.shape, dtype))
        if weight is not None:
            return out.mul_(weight)
        grid_rows, grid_cols = self.grid
        rows = out.unflatten(-1, (self.rows, self.width))
        rows[..., grid_cols:] = 0
        padding = self.tiles * self.rows - grid_rows
        if padding:
            rows[:, -1, ..., self.rows - padding:, :] = 0
        return out

    def fold(self, grad: torch.Tensor, g_vec: torch.Tensor) -> None:
        """grad [B, flat_size] += each region vector's gradient g_vec [B, T, R*R, K] at its cells."""
        r, w = self.radius, self.width
        for a in range(r):
            for b in range(r):
                offset = a * w + b
                target = grad[:, offset:].as_strided((grad.shape[0], self.tiles, self.positions),
                                                     (grad.stride(0), self.positions, 1))
                target.add_(g_vec[:, :, a * r + b])


def informative_planes(y_low: torch.Tensor) -> torch.Tensor:
    """[N, C] bool: the (n, c) planes whose downsampled labels vary.

    Where y' is constant (a class absent from an image, or filling all of it), the centred
    y vectors are exactly zero, so Sy = Syp = 0 and V = 0 whatever Sp is: the plane's RMI
    term is a constant with zero gradient. Real label maps hold a few classes per image,
    so most planes are of this kind, and the engine skips their region statistics, the
    pooling of their probabilities and the zero gradient that would flow back.
    """
    flat = y_low.flatten(2)
    return flat.amax(2) > flat.amin(2)  # two plain reductions: ten times faster than aminmax(dim=2)


def _indices(informative: torch.Tensor) -> torch.Tensor:
    return informative.flatten().nonzero().squeeze(1)


def _pick(t: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """t [N, C, ...] -> its planes [P, ...]: a view when they are all of them."""
    flat = t.flatten(0, 1)
    return flat if len(planes) == flat.shape[0] else flat[planes]


def _place(values: torch.Tensor, planes: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of `_pick`: [P, ...] -> [N, C, ...], zero in the other planes (a view of
    `values`, strided as it is, when they are all of them)."""
    if len(planes) == shape[0] * shape[1]:
        return values.unflatten(0, shape[:2])
    out = values.new_zeros(shape[0] * shape[1], *values.shape[1:])
    out[planes] = values
    return out.view(shape)


def rounding_offset(mean: torch.Tensor) -> torch.Tensor:
    """mean - float32(mean), float64 [..., 2d]: the region vectors are centred on the float32
    mean, so each centred value is off by this much. Where the spread is as small as that
    (probabilities all near one value) the offset matters: the sums and the gradient take
    it out exactly."""
    return mean - mean.float().double()


def region_moments(y_low, p_low, keep, radius: int, informative: torch.Tensor):
    """Centred covariance sums of the joint [y; p] region vectors of the informative planes.

    y_low: [N, C, H', W'] (`label_map_dtype`), p_low: float64;  keep: [N, H'-R+1, W'-R+1] 0/1
    float or None;
    informative: [N, C] bool (`informative_planes`)
    returns (mean [N, C, 2d] float64, joint sums [N, C, 2d, 2d] float64), zero for the
    other planes

    The vectors are centred in float64 before the float64 products (on their kept means
    rounded to float32; with every vector counting, the probabilities on their map's mean
    and the labels on 0), so those hold the spread, not the level, and
    what the centre misses of the mean is measured on the centred values and taken out
    there. Float32 products would do for most inputs, but a confident prediction (p close
    to y) makes V = Sy - Syp (Sp + aI)^-1 Syp^T a small difference of large terms, and
    their rounding then costs the loss 1e-4 of its value and the gradient 1e-2.
    """
    n, c, h_low, w_low = y_low.shape
    regions = _Regions.of(h_low, w_low, radius)
    d2 = 2 * radius * radius
    planes = _indices(informative)
    y, p = _pick(y_low, planes), _pick(p_low, planes)
    if not len(planes):
        return y_low.new_zeros(n, c, d2, dtype=torch.float64), y_low.new_zeros(n, c, d2, d2, dtype=torch.float64)
    scratch = _Scratch(y_low.device)
    if keep is None:
        # every vector counts: no stack of vectors (`_row_shift_sums`), taken about one value
        # per map: 0 for the labels, the mean for the probabilities
        centres = torch.stack([torch.zeros_like(p[:, 0, 0]), p.flatten(1).mean(1)], 1)
        parts = [_row_products(regions, y[group], p[group], centres[group], scratch)
                 for group in regions.plane_groups(len(planes), stacked=False, device=y.device)]
        mean, sums = _row_shift_sums(regions, centres, *(torch.cat(part) for part in zip(*parts)))
    else:
        group_means, group_sums = [], []
        for group in regions.plane_groups(len(planes), stacked=True, device=y.device):
            vec = regions.windows(regions.joint_maps(y, p, group, scratch))
            weight = regions.weights(keep, planes[group] // c)
            mean = regions.kept_means(vec, weight)
            centred = regions.centred(vec, weight, mean, scratch, torch.float64)
            centred = centred.view(vec.shape[0], regions.tiles, d2, -1)
            count = regions.count(weight).view(-1, 1)
            # the kept means were summed in float32: measure the offset on the centred values
            offset = centred.sum(-1).sum(1) / count.clamp_min(1)
            group_means.append(mean.view(-1, d2).float().double() + offset)  # exact
            gram = (centred @ centred.transpose(-1, -2)).sum(1)
            # sum of (v - centre)(v - centre)^T = centred sums + count offset offset^T
            group_sums.append(gram - count.unsqueeze(-1) * offset.unsqueeze(-1) * offset.unsqueeze(-2))
        mean, sums = torch.cat(group_means), torch.cat(group_sums)
    return _place(mean, planes, (n, c, d2)), _place(sums, planes, (n, c, d2, d2))


def _row_products(regions: _Regions, y: torch.Tensor, p: torch.Tensor, centre: torch.Tensor, scratch: _Scratch):
    """The products `_row_shift_sums` assembles, for a group of planes: with u_i the 2R map
    cells a region vector reads on map row i (R columns of both maps, less `centre`
    [B, 2], in float64), all float64:
      first [B, R, 2R, 2R]:  sum of u_i u_{i+delta}^T over the grid rows i, delta = 0 .. R-1
      totals [B, 2R]:        sum of u_i over the grid rows
      pairs [B, 2(R-1) 2R, 2(R-1) 2R]: u_t u_t'^T of the R - 1 map rows above the grid's
                             second row (0 .. R-2) and the R - 1 after its last, summed over columns
      edge [B, 2, R-1, 2R]:  sums of u over the columns of those rows
    u of a row is a run of the flattened maps, its shift by delta rows another: plain views,
    nothing stacked. y, p: the group's maps [B, H', W'].
    """
    r, w, b = regions.radius, regions.width, y.shape[0]
    y, p = y.contiguous(), p.contiguous()  # read through as_strided below
    grid_rows, grid_cols = regions.grid
    area = regions.height * w
    # u [B, (k, b), H' W']: map k from column b on, less the centre, zero past the grid's last
    # column (which is where the shifted runs reach past the map's last cell)
    u = scratch.get(1, (b, 2, r, area), torch.float64)
    centred = scratch.get(2, (b, area), torch.float64)
    for k, m in enumerate((y, p)):
        centred.copy_(m.view(b, area)).sub_(centre[:, k, None].double())
        u[:, k, :, :area - r + 1] = centred.as_strided((b, r, area - r + 1), (area, 1, 1))
    u.view(b, 2, r, -1, w)[..., grid_cols:] = 0
    u = u.view(b, 2 * r, area)
    first = u.new_zeros(b, r, 2 * r, 2 * r)
    totals = u.new_zeros(b, 2 * r)
    for tile in range(regions.tiles):
        start, stop = tile * regions.rows * w, min((tile + 1) * regions.rows, grid_rows) * w
        rows = u[:, :, start:stop]
        totals += rows.sum(-1)
        first += torch.stack([rows @ u[:, :, start + delta * w:stop + delta * w].transpose(1, 2)
                              for delta in range(r)], 1)
    by_row = u.view(b, 2 * r, -1, w)
    edge = torch.cat([by_row[:, :, :r - 1], by_row[:, :, grid_rows:grid_rows + r - 1]], 2).transpose(1, 2)
    pairs = edge.reshape(b, -1, w) @ edge.reshape(b, -1, w).transpose(-1, -2)
    return first, totals, pairs, edge.sum(-1).view(b, 2, r - 1, 2 * r)


def _row_shift_sums(regions: _Regions, centre, first, totals, pairs, edge):
    """(mean [P, 2d] float64, centred sums [P, 2d, 2d] float64) when every vector counts,
    from `_row_products` (its outputs for all P planes) -- without a stack of region vectors.

    The vector at grid row i stacks u_i, ..., u_{i+R-1}, so block (a, a') of the Gram sums
    u_{i+a} u_{i+a'}^T over the grid rows: for a' = a + delta that is block (0, delta) with
    the first a rows of the map taken out and the a rows after the grid's last one put in;
    the sums of the entries likewise. The vectors are taken about one value per map,
    `centre` [P, 2], the same for every entry so that the blocks line up
    (`region_moments` passes 0 for the labels, the mean for the probabilities); the mean's
    offset from it comes from the sums, and
    sum (v - mean)(v - mean)^T = sum (v - c)(v - c)^T - n (mean - c)(mean - c)^T.
    """
    r, b = regions.radius, first.shape[0]
    grid_rows, grid_cols = regions.grid
    a = torch.arange(r, device=first.device)
    lag = a.view(1, -1) - a.view(-1, 1)  # a' - a
    blocks = first[:, lag.abs()]  # [P, a, a', 2R, 2R]: block (0, |a' - a|)
    totals = totals.unsqueeze(1)  # [P, a, 2R]: sum of u_{i+a} over the grid rows
    if r > 1:
        # running sums as adds (a float cumsum raises on CUDA under torch.use_deterministic_algorithms)
        steps = edge[:, 1] - edge[:, 0]
        running = [totals[:, 0]]
        for t in range(r - 1):
            running.append(running[-1] + steps[:, t])
        totals = torch.stack(running, 1)
        pairs = pairs.view(b, 2, r - 1, 2 * r, 2, r - 1, 2 * r)
        # change[t, t']: u u^T of the rows t, t' after the grid less that of the rows t, t' on top
        change = (pairs[:, 1, :, :, 1] - pairs[:, 0, :, :, 0]).transpose(2, 3)  # [P, t, t', 2R, 2R]
        # block (a, a') with a <= a' adds change[t, t + a' - a] for t < a: sums down the diagonals
        added = torch.zeros_like(blocks)
        for t in range(r - 1):
            added[:, t + 1, t + 1:] = added[:, t, t:r - 1] + change[:, t, t:]
        blocks += added
    # blocks (a, a') with a > a' are the transposes of (a', a)
    gram = torch.where((lag >= 0).view(1, r, r, 1, 1), blocks, blocks.transpose(1, 2).transpose(3, 4))
    # (a, k, b) -> the joint vector's order (k, a, b)
    gram = gram.view(b, r, r, 2, r, 2, r).permute(0, 3, 1, 4, 5, 2, 6).reshape(b, 2 * r * r, 2 * r * r)
    count = grid_rows * grid_cols
    offset = (totals / count).view(b, r, 2, r).transpose(1, 2).reshape(b, -1)  # mean - centre
    mean = centre.double().repeat_interleave(r * r, 1) + offset
    return mean, gram - count * offset.unsqueeze(-1) * offset.unsqueeze(-2)


def region_moments_backward(g_sp, g_syp, y_low, p_low, keep, mean, radius: int,
                            informative: torch.Tensor) -> torch.Tensor:
    """dL/dp' [N, C, H', W'] float32 from dL/dSp and dL/dSyp [N, C, d, d]:
    dL/dp_m = (Gp + Gp^T)(p_m - pbar) + Gyp^T (y_m - ybar), summed over the windows (a sum of
    large terms of both signs where V is nearly singular: `_stencil_backward` says how it
    keeps float32 out of that); zero outside the informative planes (whose statistics carry
    no gradient)."""
    n, c, h_low, w_low = y_low.shape
    planes = _indices(informative)
    if not len(planes):
        return p_low.new_zeros(n, c, h_low, w_low, dtype=torch.float32)
    # one matrix acting on the joint centred vector [y - ybar; p - pbar]
    g_joint = _pick(torch.cat([g_syp.transpose(-1, -2), g_sp + g_sp.transpose(-1, -2)], dim=-1), planes)
    mean = _pick(mean, planes)  # [P, 2d] float64
    y, p = _pick(y_low, planes), _pick(p_low, planes)
    if keep is None:
        grad = _stencil_backward(g_joint, mean, y, p, radius)
    else:
        grad = _weighted_backward(g_joint, mean, y, p, keep, planes // c, radius)
    return _place(grad.float(), planes, (n, c, h_low, w_low))  # a no-op but for exclude_ignored


# The backward when every region vector counts. The vector at grid origin m holds the
# cells m + (a, b), 0 <= a, b < R, of the y and the p map, and its gradient G (v_m - mean)
# goes back to the same cells. Summed over *every* origin whose window reaches the map
# (the grid and a frame R - 1 wide around it, reading zeros outside the map), that is a
# fixed stencil: a convolution, with no R*R-fold stack of vectors. The frame's few
# vectors are gathered and taken out again.

def _centred_maps(y: torch.Tensor, p: torch.Tensor, r: int):
    """-> the maps [P, 2, H', W'] minus their means, zero-padded by R - 1 on each side
    ([P, 2, H'+2R-2, W'+2R-2] float64), and those means [P, 2] float64."""
    planes, h_low, w_low = p.shape
    padded = p.new_empty(planes, 2, h_low + 2 * r - 2, w_low + 2 * r - 2, dtype=torch.float64)
    padded[:, :, :r - 1] = 0
    padded[:, :, r - 1 + h_low:] = 0
    padded[:, :, :, :r - 1] = 0
    padded[:, :, :, r - 1 + w_low:] = 0
    centre = torch.stack([y.double().mean((1, 2)), p.double().mean((1, 2))], 1)
    inside = _inside(padded, r)
    for k, m in enumerate((y, p)):
        torch.sub(m, centre[:, k, None, None], out=inside[:, k])
    return padded, centre


def _inside(padded: torch.Tensor, r: int) -> torch.Tensor:
    """The maps' own cells of `_centred_maps`' padded maps (a view)."""
    return padded[:, :, r - 1:padded.shape[2] - r + 1, r - 1:padded.shape[3] - r + 1]


@functools.lru_cache(maxsize=16)
def _off_grid_windows_cpu(h_low: int, w_low: int, r: int) -> torch.Tensor:
    wide = w_low + 2 * r - 2
    rows = torch.arange(h_low + r - 1) - (r - 1)  # every origin whose window reaches the map
    cols = torch.arange(w_low + r - 1) - (r - 1)
    on_grid = ((rows >= 0) & (rows <= h_low - r)).view(-1, 1) & ((cols >= 0) & (cols <= w_low - r)).view(1, -1)
    row, col = (~on_grid).nonzero(as_tuple=True)
    window = (torch.arange(r).view(-1, 1) * wide + torch.arange(r)).flatten()
    return window.view(-1, 1) + (row * wide + col).view(1, -1)


def _off_grid_windows(h_low: int, w_low: int, r: int, device) -> torch.Tensor:
    """[R*R, origins] flat indices into the padded maps of `_centred_maps`: column k lists
    the cells of the window of the k-th origin that reaches the map from off the grid, row
    ab its entry (a, b) -- the cells it reads, and the cells its gradient would go to."""
    return _off_grid_windows_cpu(h_low, w_low, r).to(device)


def _off_grid_vectors(padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[P, 2d, origins]: the region vectors of the off-grid origins."""
    planes, d = padded.shape[0], index.shape[0]
    vectors = padded.flatten(2).gather(2, index.view(1, 1, -1).expand(planes, 2, -1))
    return vectors.view(planes, 2 * d, index.shape[1])


@functools.lru_cache(maxsize=16)
def _stencil_taps_cpu(r: int) -> torch.Tensor:
    rel = torch.arange(r)
    ra, rb = [t.flatten() for t in torch.meshgrid(rel, rel, indexing="ij")]  # offset (a, b) of entry k
    lag_a, lag_b = ra.view(1, -1) - ra.view(-1, 1) + r - 1, rb.view(1, -1) - rb.view(-1, 1) + r - 1
    return (lag_a * (2 * r - 1) + lag_b).flatten()


def _stencil_taps(r: int, device) -> torch.Tensor:
    """[d * d]: for each pair of region-vector entries (ab, a'b') the flat index of the
    difference of their offsets, (a' - a, b' - b) + R - 1, in a (2R-1) x (2R-1) stencil."""
    return _stencil_taps_cpu(r).to(device)


def _bands(size: int, r: int, device) -> torch.Tensor:
    """[size, R] 0/1 float64: column a marks the cells that entry a of the grid's windows reads along
    an axis of `size` cells (size - R + 1 of them from a on)."""
    index = torch.arange(size, device=device).view(-1, 1) - torch.arange(r, device=device)
    return ((index >= 0) & (index <= size - r)).double()


def _stencil_backward(g_joint, mean, y, p, r: int) -> torch.Tensor:
    """dL/dp' [P, H', W'] when every region vector counts.

    Cell u receives G_ab (v_{u-ab} - mean) from each offset ab = (a, b) whose origin u - ab
    is on the grid. Over every origin, on the grid or not, that is one (2R-1) x (2R-1)
    stencil over the padded centred maps, tap e collecting the entries of G whose offsets
    differ by e (for the y and the p map: a depthwise convolution); what the off-grid
    origins added is taken out again. The mean, the same for every grid origin, spreads as
    G (mean - centre) over the box of cells each offset reaches.

    Where the prediction is nearly affine in the labels (a confident one: p ~ alpha y + beta),
    G is large and the y map's and the p map's parts nearly cancel: a float32 convolution of
    the two maps then missed the gradient by 1e-3 of itself (at logits of 12). The stencil
    is linear, so it is taken instead of y and of the residual p - alpha y (alpha: the
    plane's least-squares slope), with the y map's taps Gy + alpha Gp formed in float64:
    the cancellation happens there, exactly, and the float32 convolution sees small terms
    (1e-7 then). (PyTorch's float64 depthwise convolution on CPUs is its grouped fallback,
    9.4 ms at 168 maps of 65 x 65 against 1.3 ms in float32.)
    """
    planes, h_low, w_low = p.shape
    d, width = r * r, 2 * r - 1
    index = _off_grid_windows(h_low, w_low, r, p.device)
    tap = _stencil_taps(r, p.device)
    rows, cols = _bands(h_low, r, p.device), _bands(w_low, r, p.device)
    grad = p.new_empty(planes, h_low, w_low, dtype=torch.float32)
    # the padded maps (float64, then float32 for the convolution), the convolution's output,
    # the frame's gradients, the copies that the convolution may make in its own layout,
    # and the result. A convolution call costs about a millisecond on top of its work (CPU:
    # one of 168 maps 2.6 ms, two of 84 maps 3.7 ms), so these groups may take twice the
    # forward's budget, counted as 8 padded float32 maps a plane.
    per_plane = 8 * (h_low + 2 * r) * (w_low + 2 * r)
    # Few region vectors for their d entries (fewer than d: Sy singular): V is nearly singular
    # in many directions, G large, and a float32 stencil missed the gradient by up to 1e-3 (R = 4:
    # 7 x 5 maps, 8 vectors; 5e-4 at 8 x 7, 20; under 1e-4 from about 2d on), where the
    # residual does not help (p not affine in y). Such maps are small: float64 below 4d vectors.
    exact = (h_low - r + 1) * (w_low - r + 1) < 4 * d
    dtype = torch.float64 if exact else torch.float32
    for group in _plane_groups(planes, per_plane, 2 * _chunk(REGION_CHUNK, y.device)):
        g = g_joint[group]
        padded, centre = _centred_maps(y[group], p[group], r)
        offset = mean[group].view(-1, 2, d) - centre.unsqueeze(2)
        level = (g @ offset.view(-1, 2 * d, 1)).view(-1, r, r)  # G (mean - centre)
        out = (rows @ (level.neg() @ cols.t())).to(dtype)
        # [y; p] -> [y; p - alpha y] (centred), G -> [Gy + alpha Gp, Gp]: the same G v
        centred_y, centred_p = padded[:, 0], padded[:, 1]
        norm = centred_y.square().sum((1, 2))
        alpha = torch.where(norm > 0, (centred_y * centred_p).sum((1, 2)) / norm, torch.zeros_like(norm))
        centred_p.sub_(alpha.view(-1, 1, 1) * centred_y)
        g = g.view(-1, d, 2, d).clone()
        g[:, :, 0] += alpha.view(-1, 1, 1) * g[:, :, 1]
        # G entry (ab, h a'b') -> tap (a'-a, b'-b) of map h
        taps = g.new_zeros(len(g), 2, width * width).index_add_(2, tap, g.transpose(1, 2).flatten(2))
        g, padded, taps = g.view(-1, d, 2 * d).to(dtype), padded.to(dtype), taps.to(dtype)
        if exact:  # row a of the stencil: the taps (map, column) times the maps' column shifts
            rows_of_taps = taps.view(-1, 2, width, width).permute(0, 2, 1, 3).reshape(-1, width, 1, 2 * width)
            shifted = padded.new_empty(len(g), 2, width, padded.shape[2], w_low)
            for b in range(width):
                shifted[:, :, b] = padded[..., b:b + w_low]
            flat = out.view(-1, 1, h_low * w_low)
            for a in range(width):
                flat.baddbmm_(rows_of_taps[:, a], shifted[:, :, :, a:a + h_low].reshape(len(g), 2 * width, -1))
        else:
            conv = F.conv2d(padded.view(1, -1, *padded.shape[2:]), taps.view(-1, 1, width, width),
                            groups=2 * len(g)).view(-1, 2, h_low, w_low)
            out += conv[:, 0]
            out += conv[:, 1]
        if index.shape[1]:
            off = g @ _off_grid_vectors(padded, index)  # [B, d, origins]: what the frame added
            taken = padded.new_zeros(len(g), padded[0, 0].numel())
            for ab in range(d):  # one offset at a time: distinct cells, so a fixed order of sums
                taken.index_add_(1, index[ab], off[:, ab])
            out -= _inside(taken.view(len(g), 1, *padded.shape[2:]), r)[:, 0]
        grad[group] = out
    return grad


def _weighted_backward(g_joint, mean, y, p, keep, images, r: int) -> torch.Tensor:
    """dL/dp' [P, H', W'] when only the region vectors that `keep` marks count: the
    gradient of each counted vector, formed tile by tile and folded back over its windows."""
    regions = _Regions.of(p.shape[1], p.shape[2], r)
    d = r * r
    # G (v - mean) = G (v - float32 mean) - G offset: the second term is the same for every vector
    shift = (g_joint @ rounding_offset(mean).unsqueeze(-1)).view(-1, 1, d, 1)  # [P, 1, d, 1]
    g_joint = g_joint.unsqueeze(1)  # [P, 1, d, 2d]
    mean = mean.view(-1, 2, r, r)
    grad = torch.zeros(len(p), regions.flat_size(), device=p.device, dtype=torch.float64)
    scratch = _Scratch(p.device)
    for group in regions.plane_groups(len(p), stacked=True, device=p.device):
        vec = regions.windows(regions.joint_maps(y, p, group, scratch))
        weight = regions.weights(keep, images[group])
        centred = regions.centred(vec, weight, mean[group], scratch, torch.float64)
        g_vec = g_joint[group] @ centred.view(vec.shape[0], regions.tiles, 2 * d, -1)
        g_vec.addcmul_(shift[group], weight.view(-1, regions.tiles, 1, regions.positions), value=-1)
        regions.fold(grad[group], g_vec)
    h_low, w_low = p.shape[1:]
    return grad.as_strided((len(p), h_low, w_low), (grad.stride(0), w_low, 1))  # a view: no copy


# ----------------------------------------------------------------------------
# the autograd Function
# ----------------------------------------------------------------------------

class _TorchStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts: RMIOptions):
        c = logits.shape[1]
        valid, safe = label_maps(labels, opts)
        weights = opts.weights_tensor(c, logits.device)
        y_low = pooled_labels(valid, safe, c, opts)
        informative = informative_planes(y_low)
        keep = None
        if opts.exclude_ignored:
            keep = kept_regions((~valid).unsqueeze(1).float(), opts).squeeze(1).float()
        pixel, p_low, indices, kept = _full_res_forward(logits, valid, safe, opts, weights,
                                                        ctx.needs_input_grad[0], informative, keep)
        mean, joint = region_moments(y_low, p_low, keep, opts.radius, informative)
        sy, sp, syp = (block.contiguous() for block in split_blocks(joint, opts.d))
        ctx.opts = opts
        ctx.save_for_backward(logits, valid, safe, y_low, p_low, keep, mean, indices, kept, informative)
        ctx.mark_non_differentiable(sy)  # the labels' statistics: nothing to differentiate
        return pixel, sy, sp, syp

    @staticmethod
    @once  # a second derivative raises instead of coming out partial
    def backward(ctx, g_pixel, _g_sy, g_sp, g_syp):
        logits, valid, safe, y_low, p_low, keep, mean, indices, kept, informative = ctx.saved_tensors
        opts = ctx.opts
        if not ctx.needs_input_grad[0]:
            return None, None, None
        with autocast_off(logits.device.type):  # backward() may be called inside an autocast block
            g_p_low = None
            if g_sp is not None or g_syp is not None:
                zeros = mean.new_zeros(*mean.shape[:2], opts.d, opts.d)
                g_sp = zeros if g_sp is None else g_sp
                g_syp = zeros if g_syp is None else g_syp
                g_p_low = region_moments_backward(g_sp, g_syp, y_low, p_low, keep, mean, opts.radius, informative)
            weights = opts.weights_tensor(logits.shape[1], logits.device)
            grad = _full_res_backward(logits, valid, safe, opts, weights, g_pixel, g_p_low,
                                      indices, kept, informative)
        return grad, None, None
