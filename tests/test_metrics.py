"""Metrics on small hand-computed cases."""

import math

import pytest
import torch

from rmi_triton.metrics import (SegmentationMetrics, boundary_counts, boundary_fscore, confusion_matrix,
                                fill_ignore_bands, format_table, iou_from_confusion, label_boundaries, mean_iou, pixel_accuracy)


def test_confusion_iou_accuracy_by_hand():
    target = torch.tensor([[0, 0], [1, 255]])
    pred = torch.tensor([[0, 1], [1, 0]])  # the ignored pixel's prediction must not count
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    iou = iou_from_confusion(conf)
    assert iou[0].item() == pytest.approx(0.5)  # tp 1 / (2 gt + 1 pred - 1)
    assert iou[1].item() == pytest.approx(0.5)  # tp 1 / (1 gt + 2 pred - 1)
    assert math.isnan(iou[2].item())  # absent from both: NaN, left out of the mean
    assert mean_iou(conf) == pytest.approx(0.5)
    assert pixel_accuracy(conf) == pytest.approx(2 / 3)


def test_class_only_predicted_counts_as_zero_iou():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    pred = torch.tensor([[[0, 0], [0, 2]]])
    conf = confusion_matrix(pred, target, 3)
    iou = iou_from_confusion(conf)
    assert iou[0].item() == pytest.approx(0.75)
    assert math.isnan(iou[1].item())
    assert iou[2].item() == 0.0
    assert mean_iou(conf) == pytest.approx(0.375)


def test_confusion_rejects_out_of_range():
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)


def _halves(split_col, size=5):
    lab = torch.zeros(size, size, dtype=torch.long)
    lab[:, split_col:] = 1
    return lab


def test_boundaries_mark_both_sides_and_diagonals():
    lab = _halves(2)
    b = label_boundaries(lab)[0]
    assert b.sum().item() == 10
    assert b[:, 1].all() and b[:, 2].all() and not b[:, [0, 3, 4]].any()
    dot = torch.zeros(5, 5, dtype=torch.long)
    dot[2, 2] = 1
    b = label_boundaries(dot)[0]
    assert b.sum().item() == 9 and b[1:4, 1:4].all()


def test_boundary_fscore_tolerance_by_hand():
    gt = _halves(2)      # boundary columns 1, 2
    pred = _halves(3)    # boundary columns 2, 3
    assert boundary_counts(pred, gt, tolerance=0).tolist() == [5, 10, 5, 10]
    assert boundary_fscore(pred, gt, tolerance=0) == pytest.approx(0.5)
    assert boundary_fscore(pred, gt, tolerance=1) == pytest.approx(1.0)
    far = _halves(4)     # boundary columns 3, 4: with 1 px, column 3 matches 2 and column 2 matches 3
    assert boundary_counts(far, gt, tolerance=1).tolist() == [5, 10, 5, 10]
    assert boundary_fscore(far, gt, tolerance=1) == pytest.approx(0.5)
    assert boundary_fscore(gt, gt, tolerance=0) == pytest.approx(1.0)
    flat = torch.zeros(5, 5, dtype=torch.long)  # no predicted boundary at all
    assert boundary_fscore(flat, gt, tolerance=2) == 0.0


def test_ignore_band_holds_the_boundary():
    gt = _halves(3)
    gt[:, 2] = 255      # an ignore band between the two regions, as VOC marks outlines
    assert label_boundaries(gt).sum().item() == 0  # the raw map: no valid pixel meets another class
    assert fill_ignore_bands(gt)[0, :, 2].tolist() == [1] * 5  # the larger label where the sides meet
    pred = _halves(2)   # its label change inside the band: on the filled boundary
    assert boundary_counts(pred, gt, tolerance=0).tolist() == [10, 10, 10, 10]
    assert boundary_fscore(pred, gt, tolerance=0) == 1.0
    missed = torch.zeros_like(gt)  # the region on the right not found: nothing recalled
    assert boundary_counts(missed, gt, tolerance=1).tolist() == [0, 0, 0, 10]
    assert boundary_fscore(missed, gt, tolerance=1) == 0.0
    plain = SegmentationMetrics(2, boundary_tolerance=0, ignore_band=0)  # ignored pixels hold no boundary
    plain.update(pred, gt)
    assert plain.boundary.tolist() == [0, 0, 0, 0]


def _voc_square(size=40, lo=12, hi=28, band=5):
    """A square object (class 1) on background, its outline an ignore band `band` px wide."""
    lab = torch.zeros(size, size, dtype=torch.long)
    lab[lo:hi, lo:hi] = 1
    inner, outer = lo + band // 2, hi - band // 2
    edge = torch.zeros_like(lab, dtype=torch.bool)
    edge[lo - band // 2:hi + band // 2, lo - band // 2:hi + band // 2] = True
    edge[inner + (band % 2 == 0):outer, inner + (band % 2 == 0):outer] = False
    lab[edge] = 255
    return lab


def test_voc_style_outline_band():
    gt = _voc_square()
    square = torch.zeros(40, 40, dtype=torch.long)
    square[12:28, 12:28] = 1
    filled = fill_ignore_bands(gt)[0]
    assert (filled != 255).all()  # every band pixel has both classes within 5 px
    assert boundary_fscore(square, gt) == 1.0  # the annotated object: its outline in the band's middle
    assert boundary_fscore(torch.zeros_like(gt), gt) == 0.0  # the object missed
    bigger = torch.zeros_like(gt)
    bigger[8:32, 8:32] = 1  # 4 px too big on every side: beyond the 2 px tolerance
    assert boundary_fscore(bigger, gt) == 0.0
    near = torch.zeros_like(gt)
    near[11:29, 11:29] = 1  # 1 px too big: within it
    assert boundary_fscore(near, gt) == 1.0


def test_ignored_region_far_from_a_class_change_stays_out():
    gt = torch.zeros(30, 30, dtype=torch.long)
    gt[10:20, 10:20] = 255  # a whole ignored object on background (VOC's "difficult")
    assert (fill_ignore_bands(gt)[0] == gt).all()  # one class around it: nothing filled
    pred = torch.zeros_like(gt)
    pred[10:20, 10:20] = 3  # predicted as something: masked by the ignored region, no boundary
    assert boundary_counts(pred, gt).tolist() == [0, 0, 0, 0]
    assert math.isnan(boundary_fscore(pred, gt))  # nothing to measure, as mIoU without pixels
    all_ignored = torch.full((6, 6), 255)
    assert math.isnan(boundary_fscore(torch.zeros(6, 6, dtype=torch.long), all_ignored))
    spurious = torch.zeros_like(gt)
    spurious[0:3, 0:3] = 1  # a blob in a valid area with no boundary in the ground truth
    counts = boundary_counts(spurious, gt, tolerance=1)
    assert counts[1].item() == 12 and counts[0].item() == 0 and counts[3].item() == 0
    assert boundary_fscore(spurious, gt) == 0.0


def test_update_takes_one_image_logits_and_refuses_float_indices():
    gt = _halves(2, size=3)  # C == H == W: a wrong class axis would still run
    logits = torch.nn.functional.one_hot(gt, 3).permute(2, 0, 1).float()  # [C, H, W]
    m = SegmentationMetrics(3)
    m.update(logits, gt)
    assert m.confusion.diagonal().sum().item() == 9
    with pytest.raises(TypeError, match="floating point"):
        m.update(gt.float(), gt)


def test_an_empty_image_adds_nothing():
    m = SegmentationMetrics(2)
    m.update(_halves(2)[None], _halves(2)[None])
    before = m.state().clone()
    for shape in ((1, 0, 5), (0, 5), (2, 4, 0)):
        m.update(torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long))
    assert torch.equal(m.state(), before)


def test_accumulator_sums_batches_and_state_round_trip():
    m = SegmentationMetrics(2, boundary_tolerance=0, class_names=["a", "b"])
    gt, pred = _halves(2)[None], _halves(3)[None]
    m.update(pred, gt)
    logits = torch.nn.functional.one_hot(gt, 2).permute(0, 3, 1, 2).float()
    m.update(logits, gt)  # logits are reduced by argmax: a perfect prediction
    r = m.compute()
    # column 2 is class 1 but predicted 0 in the first batch
    assert m.confusion.tolist() == [[10 + 10, 0], [5, 10 + 15]]
    assert r["iou"][0] == pytest.approx(20 / 25) and r["iou"][1] == pytest.approx(25 / 30)
    assert r["boundary_f"] == pytest.approx(2 * 0.75 * 0.75 / 1.5)  # (5 + 10) / 20 both ways
    other = SegmentationMetrics(2, boundary_tolerance=0)
    other.load_state(m.state() * 2)
    assert other.confusion.tolist() == (m.confusion * 2).tolist()
    assert other.compute()["boundary_f"] == pytest.approx(r["boundary_f"])
    table = format_table({"ce": r, "rmi": other.compute()}, ["a", "b"], [("s/it", ["1.0", "2.0"])])
    assert "IoU a" in table and "80.00" in table and "s/it" in table
