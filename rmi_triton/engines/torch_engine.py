"""The PyTorch engine: lean RMI statistics for CPUs and any device without Triton.

One autograd.Function maps logits to the pixel term and the centred
covariance sums (Sy, Sp, Syp) of the region vectors; `rmi_triton.algebra`
turns those into the loss. Two stages, each run in chunks so temporaries
stay small (and in cache):

* full resolution, per group of images: probabilities, mask, pixel term and
  the pooling of p; the labels are pooled by counting (never a one-hot float
  copy of the full map). Backward recomputes the sigmoid/softmax from the
  logits instead of saving it.
* downsampled, per group of (n, c) planes: the region vectors of a chunk,
  per-tile float32 sums centred on each tile's mean, merged in float64.
  Backward applies dL/dp_m = (Gp + Gp^T)(p_m - pbar) + Gyp^T (y_m - ybar)
  and folds it back over the R x R windows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..algebra import merge_tiles, split_blocks
from ..options import PROB_CLIP, RMIOptions
from ..pooling import kept_regions
from ..validation import raise_if_nonfinite

FULL_RES_CHUNK = 1 << 20  # elements of logits handled per step of the full-resolution stage
REGION_CHUNK = 1 << 21  # elements of region-vector stacks alive per step of the low-resolution stage
TILE = 1024  # about this many region vectors per float32 tile before the float64 merge


class Statistics(NamedTuple):
    """What an engine hands to the shared algebra."""

    pixel: torch.Tensor  # scalar float64 (0 when pixel_loss is None)
    sy: torch.Tensor  # [N, C, d, d] float64
    sp: torch.Tensor  # [N, C, d, d] float64, differentiable
    syp: torch.Tensor  # [N, C, d, d] float64, differentiable


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
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


def pooled_labels(valid: torch.Tensor, safe: torch.Tensor, c: int, opts: RMIOptions) -> torch.Tensor:
    """The downsampled one-hot labels y' [N, C, H', W'] float32, built from class
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
    # pixel (i, j) lies in cell ((i + pad) // s, (j + pad) // s) if that cell exists
    rows = (torch.arange(h, device=safe.device) + pad) // s
    cols = (torch.arange(w, device=safe.device) + pad) // s
    inside = (rows < h_low).view(1, h, 1) & (cols < w_low).view(1, 1, w) & valid
    cell = (rows.clamp_max(h_low - 1) * w_low).view(1, h, 1) + cols.clamp_max(w_low - 1).view(1, 1, w)
    plane = torch.arange(n, device=safe.device).view(n, 1, 1) * c + safe
    index = (plane * (h_low * w_low) + cell)[inside]
    counts = torch.bincount(index, minlength=n * c * h_low * w_low).view(n, c, h_low, w_low)
    if opts.pool == "max":
        return (counts > 0).float()
    return counts.float() / (s * s)


def _one_hot(safe: torch.Tensor, valid: torch.Tensor, c: int) -> torch.Tensor:
    out = torch.zeros(safe.shape[0], c, *safe.shape[1:], device=safe.device)
    return out.scatter_(1, safe.unsqueeze(1), valid.unsqueeze(1).float())


# ----------------------------------------------------------------------------
# stage 1: full resolution
# ----------------------------------------------------------------------------

def _blocks(shape, opts: RMIOptions):
    """Blocks (images, classes) of about FULL_RES_CHUNK logits each, processed one at a time.

    With sigmoid probabilities and no cross-entropy every class plane is independent,
    so an image is split into groups of classes; softmax and cross-entropy need all
    classes of a pixel together, so their blocks are whole images.
    """
    n, c, h, w = shape
    if opts.probs == "sigmoid" and opts.pixel_loss != "ce" and c * h * w > FULL_RES_CHUNK:
        per = max(1, FULL_RES_CHUNK // (h * w))
        for image in range(n):
            for first in range(0, c, per):
                yield slice(image, image + 1), slice(first, min(first + per, c))
    else:
        step = max(1, FULL_RES_CHUNK // (c * h * w))
        for start in range(0, n, step):
            yield slice(start, min(start + step, n)), slice(0, c)


def _block_labels(safe: torch.Tensor, valid: torch.Tensor, images: slice, classes: slice, c: int):
    """Labels of a block, relative to its first class: (index [n, 1, H, W] clamped into the
    block, weight [n, 1, H, W] float: 1 where the pixel is valid and its class is in the block)."""
    lab = safe[images].unsqueeze(1)
    weight = valid[images].unsqueeze(1).float()
    if classes.start == 0 and classes.stop == c:
        return lab, weight
    local = lab - classes.start
    inside = (local >= 0) & (local < classes.stop - classes.start)
    return local.clamp(0, classes.stop - classes.start - 1), weight * inside


def _pool_probs(p: torch.Tensor, opts: RMIOptions):
    """-> (pooled p, argmax indices for max pooling or None)."""
    if not opts.downsamples:
        return p, None
    s = opts.pool_size
    if opts.pool == "avg":
        return F.avg_pool2d(p, s, s, s // 2), None
    if opts.pool == "max":
        return F.max_pool2d(p, s, s, s // 2, return_indices=True)
    return F.interpolate(p, size=opts.pooled_size(*p.shape[-2:]), mode="bilinear", align_corners=True), None


def _unpool_grad(grad_low: torch.Tensor, indices, shape, opts: RMIOptions) -> torch.Tensor:
    """Backward of `_pool_probs`: dL/dp' [n, C, H', W'] -> dL/dp [n, C, H, W] (new tensor)."""
    if not opts.downsamples:
        return grad_low
    s = opts.pool_size
    if opts.pool == "avg":
        return torch.ops.aten.avg_pool2d_backward(grad_low, grad_low.new_empty(shape), [s, s], [s, s],
                                                  [s // 2, s // 2], False, True, None)
    if opts.pool == "max":
        return F.max_unpool2d(grad_low, indices, s, s, s // 2, output_size=shape[-2:])
    return torch.ops.aten.upsample_bilinear2d_backward(grad_low, list(grad_low.shape[-2:]), list(shape),
                                                       True, None, None)


def _ignored_pixels(valid: torch.Tensor) -> list:
    """Per image, the flat indices of its ignored pixels (usually few)."""
    return [(~v).flatten().nonzero().squeeze(1) for v in valid]


def _zero_pixels(t: torch.Tensor, pixels: list) -> None:
    """Zero every class of the listed pixels of a contiguous [n, C, H, W] tensor, in place:
    the mask multiply, at a cost that scales with the ignored pixels, not the map."""
    for image, index in zip(t, pixels):
        if index.numel():
            image.view(image.shape[0], -1).index_fill_(1, index, 0.0)


def _pooled_clip(h: int, w: int, opts: RMIOptions, device) -> torch.Tensor:
    """What the 1e-6 added to every full-resolution probability becomes after pooling:
    avg pooling counts the padding, so a border cell gets 1e-6 times its share of real
    pixels; max, interp and none keep 1e-6."""
    if not (opts.downsamples and opts.pool == "avg"):
        return torch.tensor(PROB_CLIP, device=device)
    s, pad = opts.pool_size, opts.pool_size // 2
    h_low, w_low = opts.pooled_size(h, w)

    def share(size, cells):  # fraction of each cell's s positions that are real pixels
        start = torch.arange(cells, device=device) * s - pad
        return ((start + s).clamp(max=size) - start.clamp(min=0)).double() / s

    return (PROB_CLIP * share(h, h_low).unsqueeze(1) * share(w, w_low)).float()


def _full_res_forward(x, valid, safe, ignored, opts: RMIOptions, weights, keep_probs: bool):
    """-> pixel term (float64 scalar), pooled p [N, C, H', W'] float32, max-pool indices,
    and (keep_probs) the masked probabilities [N, C, H, W] float32 for the backward."""
    n, c, h, w = x.shape
    h_low, w_low = opts.pooled_size(h, w)
    p_low = x.new_empty((n, c, h_low, w_low), dtype=torch.float32)
    indices = torch.empty((n, c, h_low, w_low), dtype=torch.int64, device=x.device) if opts.pool == "max" \
        and opts.downsamples else None
    bce_per_class = torch.zeros(c, dtype=torch.float64, device=x.device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    ce_weight = torch.zeros((), dtype=torch.float64, device=x.device)
    checksum = torch.zeros((), dtype=torch.float64, device=x.device)
    # Keeping the probabilities spares the backward a transcendental pass over the logits;
    # they take the place of the log-softmax that cross-entropy keeps.
    kept = torch.empty(x.shape, device=x.device) if keep_probs else None
    for images, classes in _blocks(x.shape, opts):
        g = (images, classes)
        xc = x[g].float().contiguous()
        vf = valid[images].unsqueeze(1).float()
        lab, lab_weight = _block_labels(safe, valid, images, classes, c)
        if opts.validate:  # a finite sum proves every value finite, at the cost of one read
            checksum += xc.sum()
        lse = None
        if opts.pixel_loss == "bce":
            # sum over valid pixels of softplus(x) - x * y, per class
            bce_per_class[classes] += torch.einsum("nchw,nhw->c", F.softplus(xc), vf[:, 0]).double()
            at_label = xc.gather(1, lab) * lab_weight
            bce_per_class.scatter_add_(0, (lab + classes.start).flatten(), -at_label.flatten().double())
        elif opts.pixel_loss == "ce":  # blocks hold every class here
            lse = torch.logsumexp(xc, dim=1, keepdim=True)
            pw = vf if weights is None else weights.float()[lab] * vf
            ce_sum += ((lse - xc.gather(1, lab)) * pw).sum().double()
            ce_weight += pw.sum().double()
        p = kept[g] if kept is not None else torch.empty(xc.shape, device=x.device)
        if opts.probs == "sigmoid":
            torch.sigmoid(xc, out=p)
        elif lse is not None:
            torch.exp(xc - lse, out=p)
        else:
            p.copy_(torch.softmax(xc, dim=1))
        _zero_pixels(p, ignored[images])  # p * v; the + 1e-6 is added after pooling
        pooled, idx = _pool_probs(p, opts)
        p_low[g] = pooled
        if indices is not None:
            indices[g] = idx
    p_low += _pooled_clip(h, w, opts, x.device)
    if opts.validate and not bool(torch.isfinite(checksum)):
        raise_if_nonfinite(torch.isfinite(x).all())  # exact check: the sum may have overflowed
    if opts.pixel_loss == "bce":
        if weights is not None:
            bce_per_class = bce_per_class * weights
        pixel = bce_per_class.sum() / (valid.sum() + 1)
    elif opts.pixel_loss == "ce":
        pixel = ce_sum / torch.where(ce_weight > 0, ce_weight, torch.ones_like(ce_weight))
    else:
        pixel = torch.zeros((), dtype=torch.float64, device=x.device)
    return pixel, p_low, indices, kept


def _full_res_backward(x, valid, safe, ignored, opts: RMIOptions, weights, g_pixel, g_p_low, indices, kept):
    """dL/dlogits from dL/d(pixel term) (scalar or None) and dL/dp' [N, C, H', W'] (or None);
    kept: the forward's masked probabilities [N, C, H, W] (zero at ignored pixels)."""
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
    uniform_bce = weights is None and coef is not None and opts.pixel_loss == "bce"
    in_place = grad.dtype == torch.float32 and grad.is_contiguous()
    for images, classes in _blocks(x.shape, opts):
        g = (images, classes)
        xc = x[g].float().contiguous()
        lab, lab_weight = _block_labels(safe, valid, images, classes, c)
        # written in place into the result when it is float32, else into a float32 buffer
        out = grad[g] if in_place else torch.empty(xc.shape, device=x.device)
        # probabilities, masked or not: ignored pixels are zeroed once, at the end
        softmax = sigmoid = None
        if needs_softmax:
            softmax = kept[g] if opts.probs == "softmax" else torch.softmax(xc, dim=1)
        if needs_sigmoid:
            sigmoid = kept[g] if opts.probs == "sigmoid" else torch.sigmoid(xc)
        if g_p_low is None:
            out.zero_()
        else:
            g_p = _unpool_grad(g_p_low[g], None if indices is None else indices[g], xc.shape, opts)
            if opts.probs == "sigmoid":  # s (1 - s) dL/dp
                torch.ops.aten.sigmoid_backward.grad_input(g_p, sigmoid, grad_input=out)
            else:  # s (dL/dp - sum_c s dL/dp)
                out.copy_(torch.ops.aten._softmax_backward_data(g_p, softmax, 1, torch.float32))
        if coef is not None and opts.pixel_loss == "bce":
            # d/dx (softplus(x) - x y) = sigmoid(x) - y
            block_coef = coef[classes]
            out.addcmul_(sigmoid, block_coef.view(1, -1, 1, 1))
            out.scatter_add_(1, lab, -(block_coef[0] if uniform_bce else block_coef[lab]) * lab_weight)
        elif coef is not None:  # blocks hold every class here
            # d/dx (lse - x_label) = softmax - onehot, weighted per pixel
            pw = coef if weights is None else weights.float()[lab] * coef
            out.addcmul_(softmax, pw)
            out.scatter_add_(1, lab, (-pw).expand(lab.shape))
        _zero_pixels(out, ignored[images])  # ignored pixels take no part in either term
        if not in_place:
            grad[g] = out
    return grad


# ----------------------------------------------------------------------------
# stage 2: region vectors of the downsampled maps
# ----------------------------------------------------------------------------

class _Tiling(NamedTuple):
    """Region vectors of the (H'-R+1) x (W'-R+1) valid grid, cut into tiles of whole rows."""

    radius: int
    rows: int  # valid-grid rows per tile
    tiles: int  # T; the last tile may hold padding rows past the grid
    height: int  # valid-grid rows, H' - R + 1
    width: int  # valid-grid columns, W' - R + 1

    @staticmethod
    def of(h_low: int, w_low: int, radius: int) -> "_Tiling":
        height, width = h_low - radius + 1, w_low - radius + 1
        tiles = -(-height * width // TILE)
        rows = -(-height // tiles)
        return _Tiling(radius, rows, -(-height // rows), height, width)

    @property
    def padding(self) -> int:
        """Rows of the last tile past the grid (fewer than `rows`)."""
        return self.tiles * self.rows - self.height

    def plane_groups(self, num_planes: int):
        per_plane = 2 * self.radius ** 2 * self.tiles * self.rows * self.width
        step = max(1, REGION_CHUNK // per_plane)
        for start in range(0, num_planes, step):
            yield slice(start, min(start + step, num_planes))

    def joint_maps(self, y_low, p_low, planes: slice) -> torch.Tensor:
        """[B, 2, T*rows + R - 1, W']: the label and probability maps of a group of (n, c)
        planes in one buffer, zero rows below them for the last tile's padding."""
        y = y_low.flatten(0, 1)[planes]
        h = y.shape[-2]
        maps = y.new_empty(y.shape[0], 2, self.tiles * self.rows + self.radius - 1, y.shape[-1])
        maps[:, 0, :h] = y
        maps[:, 1, :h] = p_low.flatten(0, 1)[planes]
        maps[:, :, h:] = 0
        return maps

    def windows(self, maps: torch.Tensor) -> torch.Tensor:
        """[B, 2, T*rows + R - 1, W'] -> view [B, T, 2, R, R, rows, W'-R+1] of every region
        vector, tile by tile: no copy of the R*R-fold stack."""
        sb, sk, sh, _ = maps.stride()
        r = self.radius
        return maps.as_strided((maps.shape[0], self.tiles, 2, r, r, self.rows, self.width),
                               (sb, self.rows * sh, sk, sh, 1, sh, 1))

    def centred(self, windows: torch.Tensor, centre: torch.Tensor, weight) -> torch.Tensor:
        """Contiguous [B, T, 2, R, R, rows, W'v] copy of windows - centre [B, T or 1, 2, R, R],
        zero where a region vector does not count (left out, or a padding row)."""
        out = torch.sub(windows, centre[..., None, None], out=windows.new_empty(windows.shape))
        if weight is not None:
            out.mul_(weight)
        elif self.padding:
            out[:, -1, ..., self.rows - self.padding:, :] = 0
        return out

    def counts(self, weight, planes: int, like: torch.Tensor) -> torch.Tensor:
        """[B, T] number of region vectors that count in each tile."""
        if weight is not None:
            return weight.sum((-2, -1)).flatten(1).expand(planes, -1)
        count = like.new_full((planes, self.tiles), self.rows * self.width)
        count[:, -1] -= self.padding * self.width
        return count

    def sums(self, windows: torch.Tensor, weight) -> torch.Tensor:
        """[B, T, 2, R, R] sums of the region vectors that count in each tile."""
        if weight is not None:
            return (windows * weight).sum((-2, -1))
        total = windows.sum((-2, -1))
        if self.padding:  # padding rows' windows still reach real map rows: take them out
            total[:, -1] -= windows[:, -1, ..., self.rows - self.padding:, :].sum((-2, -1))
        return total

    def weights(self, keep, planes: slice, c: int):
        """Kept-region mask [N, H'v, W'v] -> the planes' 0/1 weights [B, T, 1, 1, 1, rows, W'v]
        (zero on padding rows), or None when every region vector counts."""
        if keep is None:
            return None
        keep = keep[torch.arange(planes.start, planes.stop, device=keep.device) // c]
        return F.pad(keep, (0, 0, 0, self.padding)).view(-1, self.tiles, 1, 1, 1, self.rows, self.width)


def _joint_gram(centred: torch.Tensor, d: int) -> torch.Tensor:
    """[..., 2d, M] -> [..., 2d, 2d] Gram matrix of the joint [y; p] vectors, computing
    only the three distinct blocks (y y^T, [y; p] p^T): a quarter fewer products."""
    y = centred[..., :d, :]
    right = centred @ centred[..., d:, :].transpose(-1, -2)  # [..., 2d, d]: Syp over Sp
    gram = centred.new_empty(*centred.shape[:-2], 2 * d, 2 * d)
    gram[..., :d, :d] = y @ y.transpose(-1, -2)
    gram[..., :, d:] = right
    gram[..., d:, :d] = right[..., :d, :].transpose(-1, -2)
    return gram


def region_moments(y_low, p_low, keep, radius: int):
    """Centred covariance sums of the joint [y; p] region vectors.

    y_low, p_low: [N, C, H', W'] float32;  keep: [N, H'-R+1, W'-R+1] 0/1 float or None
    returns (mean [N, C, 2d] float64, joint sums [N, C, 2d, 2d] float64)
    """
    n, c, h_low, w_low = y_low.shape
    tiling = _Tiling.of(h_low, w_low, radius)
    d2 = 2 * radius * radius
    means, sums = [], []
    for planes in tiling.plane_groups(n * c):
        vec = tiling.windows(tiling.joint_maps(y_low, p_low, planes))
        b = vec.shape[0]
        weight = tiling.weights(keep, planes, c)
        count = tiling.counts(weight, b, y_low)
        total = tiling.sums(vec, weight)
        tile_mean = total / count.clamp_min(1)[..., None, None, None]  # [B, T, 2, R, R]
        centred = tiling.centred(vec, tile_mean, weight).view(b, tiling.tiles, d2, -1)
        tile_sums = _joint_gram(centred, d2 // 2)  # [B, T, 2d, 2d] float32
        _, mean, joint = merge_tiles(count, tile_mean.view(b, tiling.tiles, d2), tile_sums)
        means.append(mean)
        sums.append(joint)
    return torch.cat(means).view(n, c, d2), torch.cat(sums).view(n, c, d2, d2)


def region_moments_backward(g_sp, g_syp, y_low, p_low, keep, mean, radius: int) -> torch.Tensor:
    """dL/dp' [N, C, H', W'] float32 from dL/dSp and dL/dSyp [N, C, d, d]:
    dL/dp_m = (Gp + Gp^T)(p_m - pbar) + Gyp^T (y_m - ybar), summed over the windows."""
    n, c, h_low, w_low = y_low.shape
    tiling = _Tiling.of(h_low, w_low, radius)
    r, d = radius, radius * radius
    # one matrix acting on the joint centred vector [y - ybar; p - pbar]
    g_joint = torch.cat([g_syp.transpose(-1, -2), g_sp + g_sp.transpose(-1, -2)], dim=-1)
    g_joint = g_joint.float().flatten(0, 1).unsqueeze(1)  # [NC, 1, d, 2d]
    centre = mean.float().flatten(0, 1).view(n * c, 1, 2, r, r)
    span = tiling.tiles * tiling.rows
    grad = torch.zeros(n * c, span + r - 1, w_low, device=p_low.device)
    for planes in tiling.plane_groups(n * c):
        windows = tiling.windows(tiling.joint_maps(y_low, p_low, planes))
        vec = tiling.centred(windows, centre[planes], tiling.weights(keep, planes, c))
        b = vec.shape[0]
        g_vec = g_joint[planes] @ vec.view(b, tiling.tiles, 2 * d, -1)  # [B, T, d, rows * W'v]
        g_vec = g_vec.view(b, tiling.tiles, r, r, tiling.rows, tiling.width)
        out = grad[planes]
        for i in range(r):
            for j in range(r):  # scatter each window offset back onto the map (the fold)
                out[:, i:i + span, j:j + tiling.width].unflatten(1, (tiling.tiles, tiling.rows)) \
                    .add_(g_vec[:, :, i, j])
    return grad[:, :h_low].reshape(n, c, h_low, w_low)


# ----------------------------------------------------------------------------
# the autograd Function
# ----------------------------------------------------------------------------

class _TorchStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, opts: RMIOptions):
        c = logits.shape[1]
        valid, safe = label_maps(labels, opts)
        ignored = _ignored_pixels(valid)
        weights = opts.weights_tensor(c, logits.device)
        pixel, p_low, indices, kept = _full_res_forward(logits, valid, safe, ignored, opts, weights,
                                                        keep_probs=ctx.needs_input_grad[0])
        y_low = pooled_labels(valid, safe, c, opts)
        keep = None
        if opts.exclude_ignored:
            keep = kept_regions((~valid).unsqueeze(1).float(), opts).squeeze(1).float()
        mean, joint = region_moments(y_low, p_low, keep, opts.radius)
        sy, sp, syp = split_blocks(joint, opts.d)
        ctx.opts, ctx.ignored = opts, ignored
        ctx.save_for_backward(logits, valid, safe, y_low, p_low, keep, mean, indices, kept)
        ctx.mark_non_differentiable(sy)
        return pixel, sy.contiguous(), sp.contiguous(), syp.contiguous()

    @staticmethod
    def backward(ctx, g_pixel, _g_sy, g_sp, g_syp):
        logits, valid, safe, y_low, p_low, keep, mean, indices, kept = ctx.saved_tensors
        opts = ctx.opts
        if not ctx.needs_input_grad[0]:
            return None, None, None
        g_p_low = None
        if g_sp is not None or g_syp is not None:
            zeros = mean.new_zeros(*mean.shape[:2], opts.d, opts.d)
            g_sp = zeros if g_sp is None else g_sp
            g_syp = zeros if g_syp is None else g_syp
            g_p_low = region_moments_backward(g_sp, g_syp, y_low, p_low, keep, mean, opts.radius)
        weights = opts.weights_tensor(logits.shape[1], logits.device)
        grad = _full_res_backward(logits, valid, safe, ctx.ignored, opts, weights, g_pixel, g_p_low,
                                  indices, kept)
        return grad, None, None
