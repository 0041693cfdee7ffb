"""The float64 reference against cases computed on paper, and gradcheck."""

import math

import pytest
import torch

from rmi_triton import reference_rmi
from rmi_triton.options import LOG_EPS, RIDGE

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
    # 1 x 1 x 8 x 8 of class 0 everywhere, s = 4, padding 2 -> 3 x 3 cells; the corner cell
    # holds 2 x 2 real pixels out of 16 -> y' = 0.25, edges 0.5, centre 1
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    logits = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    out = reference_rmi(logits, labels, radius=3, pool="avg", pool_size=4, pixel_loss=None, rmi_weight=0)
    # one region vector only (3 x 3 grid, R = 3): all centred sums vanish -> V = 0
    expected = _log_diag(*([math.sqrt(A)] * 9)) / 9
    assert out.rmi.item() == pytest.approx(expected, rel=1e-12)


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
