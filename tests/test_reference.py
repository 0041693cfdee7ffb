"""The float64 reference against cases computed on paper, and gradcheck."""

import math
from fractions import Fraction

import pytest
import torch

from rmi_triton import reference_rmi
from rmi_triton.options import LOG_EPS, RIDGE, RMIOptions
from rmi_triton.pooling import ignored_cells, kept_regions, pool_map

A = RIDGE


def _column_labels():
    # 1 image, 1 class, 4 x 4: the first column is class 0, the rest ignored -> y = 1 there, 0 elsewhere
    labels = torch.full((1, 4, 4), 255, dtype=torch.long)
    labels[0, :, 0] = 0
    return labels


def _log_diag(*diag):
    return sum(math.log(v + LOG_EPS) for v in diag)


def test_hand_case_constant_prediction():
    # logits 0 -> p = 0.5 * valid + 1e-6; ignore everything but column 0 so that
    # p is constant on column 0 (0.5 + 1e-6) and 1e-6 elsewhere: p_m = 1e-6 + 0.5 y_m
    # R = 2, no pooling: 9 region vectors (y(i,j), y(i,j+1), y(i+1,j), y(i+1,j+1));
    # three are (1,0,1,0) (j = 0), six are 0; mean (1/3, 0, 1/3, 0)
    # Sy = [[2,0,2,0],[0,0,0,0],[2,0,2,0],[0,0,0,0]], Sp = Sy / 4, Syp = Sy / 2
    # V = Sy - (Sy/2)(Sy/4 + aI)^-1(Sy/2) keeps Sy's eigenvectors; along (1,0,1,0)/sqrt2
    # (eigenvalue 4 of Sy) its eigenvalue is mu = 4 - 2^2 / (1 + a), zero elsewhere
    logits = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    out = reference_rmi(logits, _column_labels(), radius=2, pool="none", pixel_loss=None, rmi_weight=0.0)
    lam_sy = 4.0
    mu = lam_sy - (lam_sy / 2) ** 2 / (lam_sy / 4 + A)  # V's eigenvalue along (1,0,1,0)/sqrt2
    # V + aI restricted to coordinates (0, 2): [[mu/2 + a, mu/2], [mu/2, mu/2 + a]]; a on coordinates 1, 3
    l11 = math.sqrt(mu / 2 + A)
    l33 = math.sqrt(mu / 2 + A - (mu / 2) ** 2 / (mu / 2 + A))
    expected = _log_diag(l11, math.sqrt(A), l33, math.sqrt(A)) / 4
    assert out.rmi.item() == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)  # rmi_weight 0: loss = rmi


def test_hand_case_uninformative_prediction():
    # all pixels valid, labels: column 0 is class 1, else class 0; 2 classes, logits 0:
    # p = 0.5 + 1e-6 everywhere, so Sp = Syp = 0 and V = Sy for both classes
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, 0] = 1
    logits = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    out = reference_rmi(logits, labels, radius=2, pool="none")
    # class 1: y as above, Sy = [[2,0,2,0],...]; class 0 is 1 - y: same Sy
    l1 = math.sqrt(2 + A)
    l3 = math.sqrt(2 + A - 4 / (2 + A))
    h = _log_diag(l1, math.sqrt(A), l3, math.sqrt(A))
    assert out.rmi_per_class.tolist() == pytest.approx([h / 4, h / 4], rel=1e-9)
    # BCE at logit 0 is log 2 for every (pixel, class); 16 valid pixels -> / 17
    bce = 2 * 16 * math.log(2) / 17
    assert out.pixel.item() == pytest.approx(bce, rel=1e-12)
    assert out.loss.item() == pytest.approx(0.5 * bce + 0.5 * (2 * h / 4), rel=1e-9)


def test_hand_case_class_reduction_and_additive():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, 0] = 1
    logits = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    base = reference_rmi(logits, labels, radius=2, pool="none")
    mean = reference_rmi(logits, labels, radius=2, pool="none", class_reduction="mean",
                         combine="additive", rmi_weight=2.0)
    assert mean.rmi.item() == pytest.approx(base.rmi.item() / 2, rel=1e-12)
    assert mean.loss.item() == pytest.approx(base.pixel.item() + 2.0 * mean.rmi.item(), rel=1e-12)


def test_avg_pool_geometry_matches_hand_count():
    # 1 x 1 x 8 x 8 ones, s = 4, padding 2 -> 3 x 3 cells; the corner cell holds 2 x 2 real pixels
    # out of 16 -> 0.25, edges 0.5, centre 1 (the padding counts as zeros, as the published code)
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    opts = RMIOptions(pool="avg", pool_size=4)
    expected = torch.tensor([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]], dtype=torch.float64)
    assert torch.equal(pool_map(ones, opts)[0, 0], expected)
    assert torch.equal(pool_map(ones, opts, labels_like=True)[0, 0], expected)  # labels pool alike
    # max pooling over the same windows: 1 wherever a real pixel is
    assert torch.equal(pool_map(ones, RMIOptions(pool="max", pool_size=4))[0, 0], torch.ones(3, 3).double())


def _cells_by_the_rule(ignored, pool: str, s: int):
    """The README's rule for `exclude_ignored`, written out pixel by pixel: a cell is ignored when an
    ignored pixel feeds it (avg / max: its s x s window, padding s // 2; interp: the pixel nearest
    picks for the labels or one bilinear interpolation (align_corners=True) weighs; none: itself)."""
    h, w = len(ignored), len(ignored[0])
    if pool == "none":
        return [row[:] for row in ignored]
    if pool in ("avg", "max"):
        pad = s // 2
        h_low, w_low = (h + 2 * pad - s) // s + 1, (w + 2 * pad - s) // s + 1
        return [[any(ignored[r][c] for r in range(max(i * s - pad, 0), min(i * s - pad + s, h))
                     for c in range(max(j * s - pad, 0), min(j * s - pad + s, w)))
                 for j in range(w_low)] for i in range(h_low)]
    h_low, w_low = h // s, w // s

    def sources(k, size, size_low):  # exact: output k samples k (size - 1) / (size_low - 1)
        position = Fraction(k * (size - 1), max(size_low - 1, 1))
        first = math.floor(position)
        return {first} | ({first + 1} if position != first else set())

    def nearest(k, size, size_low):  # PyTorch's "nearest": floor(k * size / size_low)
        return min(k * size // size_low, size - 1)

    return [[any(ignored[r][c] for r in sources(i, h, h_low) for c in sources(j, w, w_low))
             or ignored[nearest(i, h, h_low)][nearest(j, w, w_low)]
             for j in range(w_low)] for i in range(h_low)]


@pytest.mark.parametrize("pool, s, radius", [("avg", 4, 3), ("avg", 3, 2), ("max", 2, 3), ("max", 5, 1),
                                              ("interp", 4, 3), ("interp", 3, 2), ("none", 1, 3)])
def test_exclude_ignored_follows_the_written_rule(pool, s, radius):
    """The reference and both engines take the kept region vectors from `pooling.kept_regions`, so
    their agreement cannot check it: here it meets the rule written out cell by cell."""
    g = torch.Generator().manual_seed(s * 10 + radius)
    opts = RMIOptions(pool=pool, pool_size=s, radius=radius, exclude_ignored=True)
    for h, w in ((23, 31), (17, 17), (30, 19)):
        for frac in (0.01, 0.05):
            ignored = (torch.rand(2, 1, h, w, generator=g) < frac).double()
            cells = ignored_cells(ignored, opts)
            kept = kept_regions(ignored, opts)
            for n in range(2):
                rule = _cells_by_the_rule(ignored[n, 0].bool().tolist(), pool, s)
                assert cells[n, 0].tolist() == rule, (h, w, frac)
                h_low, w_low = len(rule), len(rule[0])
                expected = [[not any(rule[a + i][b + j] for i in range(radius) for j in range(radius))
                             for b in range(w_low - radius + 1)] for a in range(h_low - radius + 1)]
                assert kept[n, 0].tolist() == expected, (h, w, frac)


def test_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 2, (2, 9, 11))
    labels[0, 0, :3] = 255
    for options in (dict(pool="avg", pool_size=2, radius=2), dict(pool="none", radius=2, probs="softmax",
                                                                   pixel_loss="ce"),
                    dict(pool="max", pool_size=2, radius=2, exclude_ignored=True)):
        assert torch.autograd.gradcheck(lambda x: reference_rmi(x, labels, **options).loss, (logits,),
                                        fast_mode=True)
