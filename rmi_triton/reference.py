"""The float64 reference: docs/DESIGN.md section 1 written out, step by step.

This is the oracle of every test. It favours being obviously right over
being fast or light: it materialises one-hot labels and the R*R-fold stacks
of region vectors in float64, exactly as the published formula reads.
Its input checks are the front's (`rmi_triton.loss`); call it with valid input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .options import LOG_EPS, PROB_CLIP, RIDGE, RMIOptions
from .pooling import kept_regions, pool_map


class ReferenceTerms(NamedTuple):
    loss: torch.Tensor  # scalar
    pixel: torch.Tensor  # scalar (0 when pixel_loss is None)
    rmi: torch.Tensor  # scalar
    rmi_per_class: torch.Tensor  # [C]


def reference_rmi(logits: torch.Tensor, labels: torch.Tensor, opts: RMIOptions | None = None, *,
                  float32_maps: bool = False, float32_products: bool = False, **options) -> ReferenceTerms:
    """logits [N, C, H, W] (any float dtype; computed in float64), labels [N, H, W].

    float32_maps:     round each probability's smaller side, min(p, 1 - p), to float32, as
                      both engines hold the probabilities, and go on in float64, as both
                      engines pool them and form the statistics;
    float32_products: compute p in float32 (a float32 softmax of near-equal logits is off
                      by several ulps, more than one rounding of the exact p), round the
                      pooled maps to float32 and form the centred products in float32:
                      more than either engine's backward rounds now
                      (kernel C is float64, the torch engine's float32 stencil runs on the
                      regression residual), a bound for what their float32 steps can add.
    Tests use them to measure how sensitive an input is to that rounding: when V is
    nearly singular (a prediction affine in the labels, fewer region vectors than d), the
    log-determinant amplifies float32's relative 6e-8 beyond the contract's 1e-5.
    """
    opts = opts or RMIOptions(**options)
    x = logits.double()
    n, c, h, w = x.shape
    labels = labels.long()

    # 1. valid pixels and one-hot labels (all zero at ignored pixels)
    valid = labels != opts.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    y = F.one_hot(safe, c).permute(0, 3, 1, 2).double() * valid.unsqueeze(1)
    vmask = valid.unsqueeze(1).double()
    weights = opts.weights_tensor(c, x.device)

    # 2. pixel term
    if opts.pixel_loss == "bce":
        per_element = F.binary_cross_entropy_with_logits(x, y, reduction="none") * vmask
        if weights is not None:
            per_element = per_element * weights.view(1, c, 1, 1)
        pixel = per_element.sum() / (valid.sum() + 1)
    elif opts.pixel_loss == "ce":
        nll = F.cross_entropy(x, labels, ignore_index=opts.ignore_index, reduction="none")
        pixel_weight = valid.double() if weights is None else weights[safe] * valid
        total = pixel_weight.sum()
        pixel = (nll * pixel_weight).sum() / torch.where(total > 0, total, torch.ones_like(total))
    else:
        pixel = x.new_zeros(())

    # 3. probabilities, masked and clipped
    if float32_products:  # as a float32 pass computes them: exp, sum and division each round
        probs = (torch.sigmoid(x.float()) if opts.probs == "sigmoid" else torch.softmax(x.float(), dim=1)).double()
    else:
        probs = torch.sigmoid(x) if opts.probs == "sigmoid" else torch.softmax(x, dim=1)
    p = probs * vmask
    if float32_maps and not float32_products:  # each side to float32's relative precision
        p = torch.where(p > 0.5, 1 - (1 - p).float().double(), p.float().double())
    p = p + PROB_CLIP
    if float32_products:
        p = p.float().double()

    # 4. downsampling
    y_low = pool_map(y, opts, labels_like=True)
    p_low = pool_map(p, opts)
    if float32_products:
        p_low = p_low.float().double()
    h_low, w_low = y_low.shape[-2:]
    r, d = opts.radius, opts.d

    # 5. region vectors [N, C, d, M], row-major window order
    y_vec = F.unfold(y_low.reshape(n * c, 1, h_low, w_low), r).view(n, c, d, -1)
    p_vec = F.unfold(p_low.reshape(n * c, 1, h_low, w_low), r).view(n, c, d, -1)
    if opts.exclude_ignored:
        keep = kept_regions((~valid).unsqueeze(1).double(), opts).reshape(n, 1, 1, -1).double()
    else:
        keep = torch.ones_like(y_vec[:, :1, :1])

    # 6. centred covariance sums over the kept region vectors
    count = keep.sum(-1, keepdim=True).clamp_min(1)
    y_cen = (y_vec - (y_vec * keep).sum(-1, keepdim=True) / count) * keep
    p_cen = (p_vec - (p_vec * keep).sum(-1, keepdim=True) / count) * keep
    if float32_products:
        y_cen, p_cen = y_cen.float(), p_cen.float()
    sy = (y_cen @ y_cen.transpose(-1, -2)).double()
    sp = (p_cen @ p_cen.transpose(-1, -2)).double()
    syp = (y_cen @ p_cen.transpose(-1, -2)).double()

    # 7. posterior variance approximation
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    v = sy - syp @ torch.linalg.inv(sp + RIDGE * eye) @ syp.transpose(-1, -2)

    # 8. half log-determinant by Cholesky
    chol = torch.linalg.cholesky(v + RIDGE * eye)
    half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + LOG_EPS).sum(-1)

    # 9. per-class terms and their reduction
    per_class = half_logdet.mean(0) / d
    if weights is not None:
        per_class = per_class * weights
    rmi = per_class.sum() if opts.class_reduction == "sum" else per_class.mean()

    # 10. total
    lam = opts.rmi_weight
    loss = lam * pixel + (1 - lam) * rmi if opts.combine == "weighted" else pixel + lam * rmi
    return ReferenceTerms(loss, pixel, rmi, per_class)
