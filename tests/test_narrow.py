"""The rule that picks the planes both engines pool again from float64 probabilities."""

import pytest
import torch

from rmi_triton import RMIOptions
from rmi_triton.narrow import NARROW_SPREAD, covered_cells, find_narrow, narrow_planes
from rmi_triton.pooling import pool_map


def _plane(values):
    return torch.as_tensor(values, dtype=torch.float64).view(1, 1, *torch.as_tensor(values).shape)


def _noise(h=6, w=7, seed=0):
    return torch.randn(h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("level", [0.5, 0.3, 1e-5, 1 - 1e-7])
def test_the_bound_is_relative_to_the_smaller_side(level):
    """A spread just under NARROW_SPREAD of min(mean, 1 - mean) is narrow, just over it not:
    near 1 too, where float64 holds 1 - p to 1e-9 of itself."""
    noise = _noise()
    noise = (noise - noise.mean()) / noise.std(correction=0)
    side = min(level, 1 - level)
    for factor, expected in ((0.98, True), (1.02, False)):
        p = _plane(level + factor * NARROW_SPREAD * side * noise)
        assert narrow_planes(p).tolist() == [[expected]], (level, factor)


def test_the_dilution_and_cells_without_a_valid_pixel():
    """Avg pooling's padding and ignored pixels (p = 0) dilute a cell's p' by the valid
    pixels' share, a variation known exactly: divided out, a plane of equal probabilities is
    narrow (its statistics see the dilution only where labels vary with it, as when every
    valid pixel is one class; not divided out, such a plane looked wide and was 6e-4 off). A
    cell without a valid pixel does not count: share 0, or (no share: max pooling, none)
    p' at the floor."""
    opts = RMIOptions(pool_size=2, radius=2)
    valid = torch.ones(1, 11, 13, dtype=torch.bool)
    valid[0, 4, 5] = valid[0, 7:9, 9:11] = False
    share = pool_map(valid.unsqueeze(1).double(), opts)  # 6 x 7 cells
    assert share[0, 0, 0, 0] == 0.25 and share[0, 0, 2, 3] == 0.75 and share[0, 0, 4, 5] == 0
    p = (0.4 + 1e-6 * _plane(_noise())) * share
    assert narrow_planes(p, share).tolist() == [[True]]
    assert narrow_planes(p).tolist() == [[False]]
    q = 0.4 + 1e-6 * _plane(_noise())
    q[..., 4, 5] = 0
    assert narrow_planes(q, floor=1e-6).tolist() == [[True]]
    assert narrow_planes(q, floor=2e-6).tolist() == [[False]]  # above the floor a cell counts


def test_only_covered_cells_count():
    """exclude_ignored: the statistics see only cells of kept region vectors."""
    p = _plane(0.5 + 1e-6 * _noise())
    p[..., :, 5:] = 0.9  # cells no kept vector holds
    covered = torch.zeros(1, 1, 6, 7, dtype=torch.float64)
    covered[..., :, :5] = 1
    assert narrow_planes(p, None, covered).tolist() == [[True]]
    assert narrow_planes(p).tolist() == [[False]]
    assert narrow_planes(p, None, torch.zeros_like(covered)).tolist() == [[False]]  # no cell at all


def test_covered_cells_are_the_kept_windows_union():
    keep = torch.zeros(1, 4, 5, dtype=torch.bool)  # a 6 x 7 map at R = 3
    keep[0, 1, 2] = True
    keep[0, 3, 4] = True
    covered = covered_cells(keep, 3)[0, 0]
    expected = torch.zeros(6, 7, dtype=torch.float64)
    expected[1:4, 2:5] = 1
    expected[3:6, 4:7] = 1
    assert torch.equal(covered, expected)


def test_find_narrow_takes_each_plane_alone():
    """Per image and class, the floor added; max pooling divides by no share."""
    opts = RMIOptions(pool="max", pool_size=2, radius=2)
    g = torch.Generator().manual_seed(3)
    p = 0.5 + 0.2 * torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64)
    p[1, 2] = 0.25 + 1e-7 * torch.rand(6, 7, generator=g, dtype=torch.float64)
    p[1, :, 0, 0] = 0  # a cell without a valid pixel
    valid = torch.ones(2, 10, 12, dtype=torch.bool)
    valid[1, 0, 0] = False
    keep = torch.ones(2, 5, 6, dtype=torch.bool)
    assert find_narrow(p, valid, None, opts, 1e-6).tolist() == [[False, False, False], [False, False, True]]
    keep[1] = False
    assert find_narrow(p, valid, keep, opts, 1e-6).tolist() == [[False, False, False], [False, False, False]]


def test_chunks_of_classes_and_the_floor_change_nothing(monkeypatch):
    """Classes taken a few at a time (CHUNK) give what one pass gives; a floor passed apart,
    what it gives added to p'."""
    import rmi_triton.narrow as narrow_module

    g = torch.Generator().manual_seed(4)
    p = 0.3 + 0.2 * torch.rand(2, 5, 6, 7, generator=g, dtype=torch.float64)
    p[0, 1] = 0.6 + 1e-6 * p[0, 1]
    p[1, 3] = 1e-7 * (1 + 0.5 * torch.rand(6, 7, generator=g, dtype=torch.float64))  # narrow with the floor only
    whole = narrow_planes(p, floor=1e-6)
    assert whole.tolist() == [[False, True, False, False, False], [False, False, False, True, False]]
    assert narrow_planes(p + 2e-6).tolist()[1][3] is True and narrow_planes(p + 5e-7).tolist()[1][3] is False
    monkeypatch.setattr(narrow_module, "CHUNK", 2 * 6 * 7 * 2)  # two classes a chunk
    assert torch.equal(narrow_planes(p, floor=1e-6), whole)
    assert torch.equal(narrow_planes(p + 1e-6), whole)
