"""The torch engine's building blocks against plain PyTorch, on the shapes that are easy to
get wrong: odd sizes, every pool size, rows and columns that no pooling cell holds, saturated
logits, several tiles and plane groups."""

import pytest
import torch
import torch.nn.functional as F

from rmi_triton.engines import torch_engine
from rmi_triton.options import RMIOptions

from helpers import assert_close_rel


@pytest.mark.parametrize("pool_size", range(2, 9))
@pytest.mark.parametrize("size", [(5, 7), (13, 16), (37, 53), (41, 40)])
def test_avg_pool_and_its_backward_match_torch(pool_size, size):
    h, w = size
    opts = RMIOptions(pool_size=pool_size)
    g = torch.Generator().manual_seed(h * w + pool_size)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    p = torch.sigmoid(x).float()
    out = torch.full((2, 3, *opts.pooled_size(h, w)), float("nan"))
    torch_engine._avg_pool(p, pool_size, out)
    assert_close_rel(out, F.avg_pool2d(p.double(), pool_size, pool_size, pool_size // 2), 1e-6, "avg pool")

    # backward, plain and fused with the sigmoid's derivative, against autograd
    g_low = torch.randn(out.shape, generator=g, dtype=torch.float64)
    x.requires_grad_(True)
    (F.avg_pool2d(torch.sigmoid(x), pool_size, pool_size, pool_size // 2) * g_low).sum().backward()
    sig = torch.sigmoid(x.detach())
    unpooled = torch_engine._avg_unpool(g_low.float(), pool_size, torch.full(p.shape, float("nan")))
    assert_close_rel(unpooled * sig * (1 - sig), x.grad, 1e-6, "avg unpool")
    fused = torch_engine._avg_unpool(g_low.float(), pool_size, torch.full(p.shape, float("nan")), sigmoid=p)
    assert_close_rel(fused, x.grad, 1e-6, "avg unpool fused with the sigmoid")


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("pool_size", range(2, 9))
@pytest.mark.parametrize("size", [(5, 7), (37, 53), (41, 40)])
def test_pooled_labels_match_pooled_one_hot(pool, pool_size, size):
    """Counting labels per cell equals pooling the one-hot map (ignored pixels all zero),
    also where the last rows and columns fall in no cell."""
    h, w = size
    opts = RMIOptions(pool=pool, pool_size=pool_size)
    g = torch.Generator().manual_seed(h + w + pool_size)
    labels = torch.randint(0, 4, (3, h, w), generator=g)
    labels[torch.rand(3, h, w, generator=g) < 0.2] = 255
    valid, safe = torch_engine.label_maps(labels, opts)
    one_hot = F.one_hot(safe, 4).permute(0, 3, 1, 2).double() * valid.unsqueeze(1)
    pooling = F.avg_pool2d if pool == "avg" else F.max_pool2d
    expected = pooling(one_hot, pool_size, pool_size, pool_size // 2)
    got = torch_engine.pooled_labels(valid, safe, 4, opts)
    dtype = torch_engine.label_map_dtype(opts)  # float64 where a float32 count / s^2 would round
    assert got.dtype == dtype and got.is_contiguous()
    assert dtype == torch.float32 or pool == "avg" and pool_size in (3, 5, 6, 7)
    assert torch.equal(got, expected.to(dtype))  # counts / s^2, correctly rounded either way


def test_cells_cover_each_pixel_once():
    for size in range(1, 40):
        for s in range(2, 9):
            cells = RMIOptions(pool_size=s).pooled_size(size, size)[0]
            if cells < 1:
                continue
            geometry = torch_engine._cells(size, cells, s)
            owner = torch.full((size,), -1)
            for cell_slice, pixels, per in geometry.runs:
                assert pixels.stop - pixels.start == (cell_slice.stop - cell_slice.start) * per
                owner[pixels] = torch.arange(cell_slice.start, cell_slice.stop).repeat_interleave(per)
            expected = (torch.arange(size) + s // 2) // s  # the cell that avg_pool2d puts a pixel in
            held = expected < cells
            assert torch.equal(owner[held], expected[held]), (size, s)
            assert bool((owner[~held] == -1).all()) and geometry.dropped.start == int(held.sum())


@pytest.mark.parametrize("scale", [1e-4, 2.0, 30.0, 1e4])
def test_bce_sums_match_torch_bce(scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    n, c, h, w = 2, 5, 19, 23
    x = torch.randn(n, c, h, w, generator=g) * scale
    x[0, 0, :3] = 60.0  # saturated both ways
    x[1, 2, :3] = -60.0
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.2] = 255
    valid, safe = torch_engine.label_maps(labels, RMIOptions())
    valid_f = valid.unsqueeze(1).float()
    y = F.one_hot(safe, c).permute(0, 3, 1, 2).double() * valid_f
    expected = (F.binary_cross_entropy_with_logits(x.double(), y, reduction="none") * valid_f).sum((0, 2, 3))
    for classes in (slice(0, c), slice(1, 4)):  # a whole image and a class block
        block = x[:, classes].contiguous()
        lab, lab_weight = torch_engine._block_labels(safe, valid_f, slice(0, n), classes, c)
        masked = block + torch_engine._masking_bias(valid)
        got = torch_engine._bce_sums(masked, lab, lab_weight)
        # float32 logits: each term is exact to about 1e-7 of its own size
        assert_close_rel(got, expected[classes], 1e-6, f"BCE sums, classes {classes}")


@pytest.mark.parametrize("spread", [0.3, 3e-6])
@pytest.mark.parametrize("radius", [1, 2, 3, 5])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("size", [(17, 13), (41, 19)])
def test_region_moments_match_float64_unfold(monkeypatch, radius, exclude, spread, size):
    """Also for probabilities that barely vary (spread 3e-6 around 0.6): centring on the
    float32-rounded mean would then be off by a fair part of the spread itself. Two map
    sizes: the backward's frame of off-grid windows is a large part of the small one."""
    _check_region_moments(monkeypatch, radius, exclude, spread, size)


@pytest.mark.parametrize("radius, size", [(4, (5, 6)), (6, (8, 7)), (10, (12, 11)), (10, (11, 13))])
def test_region_moments_on_maps_barely_larger_than_the_region(monkeypatch, radius, size):
    """Fewer grid rows than the R - 1 edge rows at either end of the map: the row-shift
    sums' rows above the grid's second row and after its last one overlap (two or three
    grid rows: with one vector a plane, its gradient is float32 noise on an exact zero)."""
    _check_region_moments(monkeypatch, radius, False, 0.3, size)


def _check_region_moments(monkeypatch, radius, exclude, spread, size):
    monkeypatch.setattr(torch_engine, "TILE", 40)  # several tiles, the last one padded
    monkeypatch.setattr(torch_engine, "REGION_CHUNK", 1)  # one plane per group
    g = torch.Generator().manual_seed(radius + 10 * exclude + size[0])
    n, c, (h, w) = 2, 3, size
    y_low = torch.randint(0, 17, (n, c, h, w), generator=g).float() / 16
    p_low = torch.rand(n, c, h, w, generator=g) * spread + 0.6  # a level far from zero
    keep = (torch.rand(n, h - radius + 1, w - radius + 1, generator=g) > 0.3).float() if exclude else None
    every = torch.ones(n, c, dtype=torch.bool)
    mean, joint = torch_engine.region_moments(y_low, p_low, keep, radius, every)

    vec = torch.cat([F.unfold(m.double().flatten(0, 1).unsqueeze(1), radius) for m in (y_low, p_low)], 1)
    weight = torch.ones(n * c, 1, vec.shape[-1], dtype=torch.float64) if keep is None \
        else keep.double().repeat_interleave(c, 0).view(n * c, 1, -1)
    ref_mean = (vec * weight).sum(-1) / weight.sum(-1)
    centred = (vec - ref_mean.unsqueeze(-1)) * weight
    ref_joint = centred @ centred.transpose(1, 2)
    d = radius ** 2
    assert_close_rel(mean.view(n * c, -1), ref_mean, 1e-6, "means")
    joint = joint.view(n * c, 2 * d, 2 * d)
    for block, name in (((slice(None, d), slice(None, d)), "Sy"), ((slice(None, d), slice(d, None)), "Syp"),
                        ((slice(d, None), slice(d, None)), "Sp")):  # each on its own scale
        assert_close_rel(joint[:, block[0], block[1]], ref_joint[:, block[0], block[1]], 1e-6, name)

    # the backward stencil against autograd through the float64 formula; the two parts
    # (through Sp and through Syp) on their own, as their scales differ by the spread
    for part in ("sp", "syp"):
        g_sp = torch.randn(n, c, d, d, generator=g, dtype=torch.float64) * (part == "sp")
        g_syp = torch.randn(n, c, d, d, generator=g, dtype=torch.float64) * (part == "syp")
        _check_region_backward(g_sp, g_syp, y_low, p_low, keep, mean, radius, every, weight,
                               centred[:, :d], part)


def _check_region_backward(g_sp, g_syp, y_low, p_low, keep, mean, radius, every, weight, yc, part):
    grad = torch_engine.region_moments_backward(g_sp, g_syp, y_low, p_low, keep, mean, radius, every)
    p64 = p_low.double().requires_grad_(True)
    pv = F.unfold(p64.flatten(0, 1).unsqueeze(1), radius)
    pc = (pv - (pv * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True)) * weight
    d = radius ** 2
    objective = ((pc @ pc.transpose(1, 2)) * g_sp.view(-1, d, d)).sum() \
        + ((yc @ pc.transpose(1, 2)) * g_syp.view(-1, d, d)).sum()
    objective.backward()
    assert_close_rel(grad, p64.grad, 1e-5, f"region backward through {part}")


def test_planes_with_constant_labels_are_skipped_exactly():
    """A class absent from an image, or filling it, has Sy = Syp = 0: the RMI term of that
    plane is a constant with no gradient, so the engine may skip it -- and gets the
    reference's loss and gradient."""
    from helpers import loss_and_grad
    from rmi_triton import reference_rmi, rmi_loss

    g = torch.Generator().manual_seed(3)
    n, c, h, w = 3, 5, 40, 44
    logits = torch.randn(n, c, h, w, generator=g) * 2
    labels = torch.zeros(n, h, w, dtype=torch.long)
    labels[0, 10:30, 5:25] = 2  # image 0: classes 0 and 2
    labels[1] = 4  # image 1: class 4 fills it (avg pooling counts the padding: border cells vary)
    labels[2, :, 20:] = 1  # image 2: classes 0 and 1, a few ignored pixels
    labels[2, 5:8, 5:8] = 255
    valid, safe = torch_engine.label_maps(labels, RMIOptions())
    y_low = torch_engine.pooled_labels(valid, safe, c, RMIOptions())
    planes = torch_engine.informative_planes(y_low).flatten().nonzero().squeeze(1)
    assert planes.tolist() == [0, 2, 9, 10, 11]
    y_max = torch_engine.pooled_labels(valid, safe, c, RMIOptions(pool="max"))
    assert torch_engine.informative_planes(y_max).flatten().nonzero().squeeze(1).tolist() == [0, 2, 10, 11]
    for options in ({}, {"exclude_ignored": True}, {"probs": "softmax", "pixel_loss": "ce"}, {"pool": "max"}):
        loss, grad = loss_and_grad(lambda x, y, **o: rmi_loss(x, y, backend="torch", **o), logits, labels,
                                   **options)
        ref_loss, ref_grad = loss_and_grad(lambda x, y, **o: reference_rmi(x.double(), y, **o).loss,
                                           logits, labels, **options)
        assert_close_rel(loss, ref_loss, 1e-5, f"loss {options}")
        assert_close_rel(grad, ref_grad, 1e-4, f"gradient {options}")
