"""Metrics on small hand-computed cases."""

import math

import pytest
import torch

from rmi_triton.metrics import (SegmentationMetrics, boundary_counts, boundary_fscore, confusion_matrix,
                                format_table, iou_from_confusion, label_boundaries, mean_iou, pixel_accuracy)


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


def test_boundary_ignores_ignored_pixels():
    gt = _halves(3)
    gt[:, 2] = 255      # an ignore band between the two regions: no boundary in the ground truth
    assert label_boundaries(gt).sum().item() == 0
    pred = _halves(2)   # the label change falls inside the band: masked, no boundary either
    assert boundary_counts(pred, gt, tolerance=0).tolist() == [0, 0, 0, 0]
    assert boundary_fscore(pred, gt, tolerance=0) == 1.0
    wrong = pred.clone()
    wrong[0, 0] = 1     # a spurious blob in a valid area: its boundary is unmatched
    counts = boundary_counts(wrong, gt, tolerance=1)
    assert counts[0].item() == 0 and counts[1].item() == 4 and counts[3].item() == 0
    assert boundary_fscore(wrong, gt, tolerance=1) == 0.0


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
