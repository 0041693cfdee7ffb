"""Segmentation metrics: confusion matrix, (m)IoU, pixel accuracy, boundary F-score.

    m = SegmentationMetrics(num_classes=5, ignore_index=255, boundary_tolerance=2)
    for logits, labels in loader:
        m.update(logits.argmax(1), labels)
    result = m.compute()        # {"miou", "iou" [C], "pixel_acc", "boundary_f", ...}

The accumulated state is two integer tensors (`confusion` [C, C] and
`boundary_counts` [4]); summing them across processes (`state()` / `merge`, or
an all-reduce) gives the metrics of the union of the data.

Boundary F-score: a pixel is a boundary pixel of a label map when a valid pixel
of its 3 x 3 neighbourhood carries a different label (so both sides of a label
change are marked). Ground truths often mark object outlines as a band of
`ignore_index` (PASCAL VOC: about 5 px wide); the boundary runs through that band.
So an ignored pixel within `ignore_band` pixels (Chebyshev) of valid pixels of two or
more classes takes the label of a nearest valid pixel (`fill_ignore_bands`: the
band's two sides meet in its middle; `ignore_band=0` turns this off), and only the
ignored pixels that are left (a whole ignored object, crop padding but for the few
pixels next to a class change) are left out: they are no boundary, make none, and
the prediction is masked by them. A predicted boundary pixel is matched when a
ground-truth boundary pixel lies within `tolerance` pixels (Chebyshev distance,
done as a max-pool dilation), and vice versa; precision and recall are counted over
the whole data set, F = 2PR / (P + R), NaN where neither map has a boundary.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE_BAND = 5  # px: an ignore band this wide between two classes holds their boundary


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: Optional[int] = 255) -> torch.Tensor:
    """int64 [C, C] counts, rows = ground truth, columns = prediction.

    Pixels whose target is `ignore_index` are skipped. Targets must otherwise be in
    [0, C); predictions outside [0, C) raise.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel():
        if int(target.min()) < 0 or int(target.max()) >= num_classes:
            raise ValueError(f"target values must be in [0, {num_classes}) or ignore_index={ignore_index}")
        if int(pred.min()) < 0 or int(pred.max()) >= num_classes:
            raise ValueError(f"predicted values must be in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def iou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU, float64 [C]; NaN for classes absent from both prediction and ground truth."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / union
    return torch.where(union > 0, iou, torch.full_like(iou, float("nan")))


def mean_iou(conf: torch.Tensor) -> float:
    """Mean of the per-class IoUs that are defined (NaN classes excluded); NaN if none is."""
    iou = iou_from_confusion(conf)
    defined = iou[~torch.isnan(iou)]
    return float(defined.mean()) if defined.numel() else float("nan")


def pixel_accuracy(conf: torch.Tensor) -> float:
    total = conf.sum()
    return float(conf.diagonal().sum().double() / total) if total > 0 else float("nan")


def label_boundaries(labels: torch.Tensor, ignore_index: Optional[int] = 255) -> torch.Tensor:
    """bool [N, H, W]: valid pixels with a valid 3 x 3 neighbour of another label.

    labels: [N, H, W] or [H, W] integers; `ignore_index` pixels are never boundary
    pixels and do not make their neighbours boundary pixels.
    """
    if labels.dim() == 2:
        labels = labels[None]
    lab = labels.long()
    valid = lab != ignore_index if ignore_index is not None else torch.ones_like(lab, dtype=torch.bool)
    top, bottom = _label_range(lab, valid, 1)
    labd = lab.double()
    return valid & ((top != labd) | (bottom != labd))


def _label_range(lab: torch.Tensor, valid: torch.Tensor, radius: int):
    """(largest, smallest) valid label within `radius` px (Chebyshev) of each pixel of lab
    [N, H, W], float64 [N, H, W] (labels are far below 2^53: exact); -1 and a number past
    every label where no pixel within reach is valid."""
    past = int(lab[valid].max()) + 1 if bool(valid.any()) else 1
    hi = torch.where(valid, lab, -1).double()[:, None]
    lo = torch.where(valid, lab, past).double()[:, None]
    return _window_max(hi, radius)[:, 0], -_window_max(-lo, radius)[:, 0]


def _dilate(mask: torch.Tensor, tolerance: int) -> torch.Tensor:
    if tolerance <= 0:
        return mask
    k = 2 * tolerance + 1
    return F.max_pool2d(mask[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0


def fill_ignore_bands(labels: torch.Tensor, ignore_index: Optional[int] = 255,
                      band: int = IGNORE_BAND) -> torch.Tensor:
    """int64 [N, H, W]: `labels` ([N, H, W] or [H, W]) with each ignored pixel that lies within
    `band` pixels (Chebyshev) of valid pixels of two or more classes given the label of a
    nearest valid pixel (grown one pixel a step; the larger label where two meet); the
    other ignored pixels keep `ignore_index`."""
    lab = (labels[None] if labels.dim() == 2 else labels).long()
    if ignore_index is None or band <= 0:
        return lab
    valid = lab != ignore_index
    if bool(valid.all()) or not bool(valid.any()):
        return lab
    top, bottom = _label_range(lab, valid, band)
    between = ~valid & (top >= 0) & (bottom != top)  # two classes within `band`
    grown = torch.where(valid, lab, -1).double()[:, None]
    for _ in range(band):
        grown = torch.where(grown < 0, F.max_pool2d(grown, 3, stride=1, padding=1), grown)
    return torch.where(between, grown[:, 0].long(), lab).masked_fill_(~(valid | between), ignore_index)


def _window_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The maximum over each (2 radius + 1)^2 window of x [N, 1, H, W] (a row pass, then a column pass)."""
    k = 2 * radius + 1
    x = F.max_pool2d(x, (1, k), stride=1, padding=(0, radius))
    return F.max_pool2d(x, (k, 1), stride=1, padding=(radius, 0))


def boundary_counts(pred: torch.Tensor, target: torch.Tensor, tolerance: int = 2,
                    ignore_index: Optional[int] = 255, ignore_band: int = IGNORE_BAND) -> torch.Tensor:
    """int64 [4]: (matched predicted boundary px, predicted boundary px,
    matched ground-truth boundary px, ground-truth boundary px). The target's ignore
    bands are filled first (`fill_ignore_bands`, module doc)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if target.numel() == 0:  # an empty image (or batch) has no boundary
        return torch.zeros(4, dtype=torch.int64)
    if target.dim() == 2:
        pred, target = pred[None], target[None]
    pred = pred.long()
    target = fill_ignore_bands(target, ignore_index, ignore_band)
    if ignore_index is not None:
        pred = torch.where(target == ignore_index, torch.full_like(pred, ignore_index), pred)
    bp = label_boundaries(pred, ignore_index)
    bg = label_boundaries(target, ignore_index)
    matched_p = (bp & _dilate(bg, tolerance)).sum()
    matched_g = (bg & _dilate(bp, tolerance)).sum()
    return torch.stack([matched_p, bp.sum(), matched_g, bg.sum()]).long().cpu()


def boundary_fscore_from_counts(counts: torch.Tensor) -> Dict[str, float]:
    """Precision, recall and F from `boundary_counts` (summed over any number of images).

    With no predicted boundary, precision is 0 against a ground-truth boundary; with no
    ground-truth boundary, recall is 0 against a predicted one. With neither there is
    nothing to measure: all three are NaN (as mIoU is without valid pixels).
    """
    mp, tp, mg, tg = (int(v) for v in counts)
    if tp == 0 and tg == 0:
        nan = float("nan")
        return {"boundary_precision": nan, "boundary_recall": nan, "boundary_f": nan}
    precision = mp / tp if tp else 0.0
    recall = mg / tg if tg else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"boundary_precision": precision, "boundary_recall": recall, "boundary_f": f}


def boundary_fscore(pred: torch.Tensor, target: torch.Tensor, tolerance: int = 2,
                    ignore_index: Optional[int] = 255, ignore_band: int = IGNORE_BAND) -> float:
    counts = boundary_counts(pred, target, tolerance, ignore_index, ignore_band)
    return boundary_fscore_from_counts(counts)["boundary_f"]


class SegmentationMetrics:
    """Accumulates a confusion matrix and boundary counts over batches."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255, boundary_tolerance: int = 2,
                 class_names: Optional[Sequence[str]] = None, ignore_band: int = IGNORE_BAND):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.boundary_tolerance = int(boundary_tolerance)
        self.ignore_band = int(ignore_band)  # 0: ignored pixels never hold a boundary
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.boundary = torch.zeros(4, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: [N, H, W] (or [H, W]) class indices; pred may also be logits [N, C, H, W]
        (or [C, H, W])."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(-3)
        elif pred.is_floating_point():
            raise TypeError(f"pred is floating point ({pred.dtype}) and shaped like the target "
                            f"{tuple(target.shape)}: pass class indices (an integer tensor), or logits with a "
                            f"class axis before the last two, [N, C, H, W]")
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.boundary += boundary_counts(pred, target, self.boundary_tolerance, self.ignore_index, self.ignore_band)

    def state(self) -> torch.Tensor:
        """Flat int64 state, to be summed across processes and given back to `load_state`."""
        return torch.cat([self.confusion.reshape(-1), self.boundary])

    def load_state(self, flat: torch.Tensor) -> None:
        c2 = self.num_classes * self.num_classes
        flat = flat.reshape(-1).long().cpu()
        self.confusion = flat[:c2].reshape(self.num_classes, self.num_classes).clone()
        self.boundary = flat[c2:c2 + 4].clone()

    def merge(self, other: "SegmentationMetrics") -> None:
        self.confusion += other.confusion
        self.boundary += other.boundary

    def compute(self) -> Dict[str, object]:
        iou = iou_from_confusion(self.confusion)
        out: Dict[str, object] = {
            "miou": mean_iou(self.confusion),
            "iou": [float(v) for v in iou],
            "pixel_acc": pixel_accuracy(self.confusion),
            "class_names": list(self.class_names),
            "boundary_tolerance": self.boundary_tolerance,
        }
        out.update(boundary_fscore_from_counts(self.boundary))
        return out


def format_table(columns: Dict[str, Dict[str, object]], class_names: Sequence[str],
                 extra_rows: Optional[List[tuple]] = None) -> str:
    """A text table: one column per run (`compute()` results), rows mIoU, per-class IoU,
    pixel accuracy, boundary F; `extra_rows` = [(label, [value per column as str])]."""
    names = list(columns)
    width = max(10, *(len(n) + 2 for n in names))
    label_w = max(22, *(len(f"IoU {c}") + 2 for c in class_names))

    def fmt(v) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    lines = ["".ljust(label_w) + "".join(n.rjust(width) for n in names)]
    lines.append("-" * len(lines[0]))
    lines.append("mIoU (%)".ljust(label_w) + "".join(fmt(columns[n]["miou"]).rjust(width) for n in names))
    for c, cname in enumerate(class_names):
        lines.append(f"  IoU {cname}".ljust(label_w)
                     + "".join(fmt(columns[n]["iou"][c]).rjust(width) for n in names))
    lines.append("pixel accuracy (%)".ljust(label_w)
                 + "".join(fmt(columns[n]["pixel_acc"]).rjust(width) for n in names))
    tol = columns[names[0]].get("boundary_tolerance", "?") if names else "?"
    lines.append(f"boundary F@{tol}px (%)".ljust(label_w)
                 + "".join(fmt(columns[n]["boundary_f"]).rjust(width) for n in names))
    for label, values in extra_rows or []:
        lines.append(str(label).ljust(label_w) + "".join(str(v).rjust(width) for v in values))
    return "\n".join(lines)
