"""The Triton engine against the float64 reference, run through the Triton interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported. Every
test here runs with the engine's internal output buffers pre-filled with NaN
(255 for the max-pool arg-max), so an element a kernel forgot to write fails.
Shapes are tiny and odd: the interpreter pays per operation.
"""

import shutil
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from rmi_triton import reference_rmi, rmi_loss, rmi_terms
from rmi_triton.algebra import joint_matrix
from rmi_triton.engines import triton_engine
from rmi_triton.options import RMIOptions

from helpers import OPTION_CASES, assert_close_rel, bench_module, case_id, loss_and_grad, random_inputs

pytestmark = pytest.mark.skipif(not triton_engine.available(),
                                reason="triton is not installed or TRITON_INTERPRET is not set")


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    monkeypatch.setattr(triton_engine, "FILL_OUTPUTS_WITH_NAN", True)


def _ref(x, labels, **options):
    return reference_rmi(x.double(), labels, **options).loss


def _triton(x, labels, **options):
    return rmi_loss(x, labels, backend="triton", **options)


def _shape(options):
    return (2, 3, 37, 53) if options.get("radius", 3) < 10 else (1, 1, 61, 67)


@pytest.mark.parametrize("options", OPTION_CASES, ids=case_id)
def test_matches_reference_float32(options):
    ignore = options.get("ignore_index", 255)
    logits, labels = random_inputs(*_shape(options), ignore_index=ignore, seed=len(case_id(options)))
    loss, grad = loss_and_grad(_triton, logits, labels, **options)
    ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"probs": "softmax", "pixel_loss": "ce"}, {"pool": "max"}], ids=case_id)
def test_half_precision_logits(dtype, options):
    logits, labels = random_inputs(2, 3, 37, 53, dtype=dtype, seed=3)
    loss, grad = loss_and_grad(_triton, logits, labels, **options)
    ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)  # same rounded inputs
    assert grad.dtype == dtype and ref_grad.dtype == dtype  # the reference's gradient rounded as the engine's
    assert_close_rel(loss, ref_loss, 1e-5, "loss")  # float32 from the same inputs: the float32 contract
    # The interpreter casts float32 to bfloat16 by truncation (a GPU rounds to nearest: bench/gpu_check.py
    # holds that), which leaves the stored gradient up to one bfloat16 ulp, 2^-7, from the rounded reference
    assert_close_rel(grad, ref_grad, 2.0 ** -7 if dtype == torch.bfloat16 else 1e-4, "gradient")


GPU_BLOCK_CASES = [
    ({}, (1, 2, 37, 53)),
    ({"pool": "none"}, (1, 2, 40, 45)),  # 1634 positions: several tiles and sub-blocks
    ({"pool_size": 2, "radius": 5}, (1, 2, 37, 53)),  # two joint-covariance blocks per side
    ({"pool": "max", "exclude_ignored": True, "probs": "softmax"}, (1, 3, 37, 53)),
]


@pytest.mark.parametrize("options,shape", GPU_BLOCK_CASES, ids=[case_id(o) for o, _ in GPU_BLOCK_CASES])
def test_gpu_block_sizes(monkeypatch, options, shape):
    """The blocking a GPU gets (the interpreter otherwise uses larger blocks)."""
    triton_engine.use_gpu_blocks(monkeypatch.setattr)
    logits, labels = random_inputs(*shape, seed=11)
    loss, grad = loss_and_grad(_triton, logits, labels, **options)
    ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")


FULL_RES_BLOCK_CASES = [  # kernels A and D: window sides 4, 3 (padded to 4), 1, 5 (padded to 8)
    ({}, (1, 2, 37, 53), False),
    ({"pool": "max", "pool_size": 3, "probs": "softmax"}, (1, 3, 29, 31), True),
    ({"pool": "none", "probs": "softmax", "pixel_loss": "ce", "class_weights": [0.5, 2.0, 1.0]}, (1, 3, 21, 23),
     True),
    ({"pool_size": 5, "radius": 2, "exclude_ignored": True}, (1, 2, 37, 53), False),
]


@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("options,shape,channels_last", FULL_RES_BLOCK_CASES,
                         ids=[case_id(o) + ("-channels_last" if cl else "") for o, _, cl in FULL_RES_BLOCK_CASES])
def test_full_resolution_blocks(monkeypatch, options, shape, channels_last, wide):
    """Kernels A and D over many small blocks (the last one partial), with the int32
    offsets within an image or the int64 ones an image of 2**31 elements gets."""
    monkeypatch.setattr(triton_engine, "FULL_RES_ELEMENTS", 256)
    monkeypatch.setattr(triton_engine, "_wide", lambda *images: wide)
    logits, labels = random_inputs(*shape, seed=12)
    if channels_last:
        logits = logits.to(memory_format=torch.channels_last)
    loss, grad = loss_and_grad(_triton, logits, labels, **options)
    ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")


def test_wide_offsets_decided_by_the_image_extent():
    """int64 offsets exactly when an image's last pixel (or label) lies 2**31 elements on."""
    def meta(shape, stride):
        return torch.empty_strided(shape, stride, device="meta")

    small = meta((2, 150, 1024, 2048), (150 * 1024 * 2048, 1024 * 2048, 2048, 1))
    assert not triton_engine._wide(small)  # 16 x 150 x 1024 x 2048 images stay int32 within an image
    def channels_last(c, h, w):
        return meta((1, c, h, w), (c * h * w, 1, w * c, c))

    assert not triton_engine._wide(channels_last(1024, 2048, 1024))  # (H-1, W-1): 2047 * 2**20 + 1023 * 2**10
    assert triton_engine._wide(channels_last(1024, 2049, 1024))  # 2**31 + 1023 * 2**10
    assert not triton_engine._wide(meta((1, 1, 46340, 46340), (46340**2,) * 2 + (46340, 1)))
    assert triton_engine._wide(meta((1, 1, 46341, 46341), (46341**2,) * 2 + (46341, 1)))  # the labels
    strided = meta((1, 1, 3, 3), (10, 10, 2**30 - 1, 1))  # 2 (2**30 - 1) + 2 = 2**31
    assert triton_engine._wide(strided)
    assert not triton_engine._wide(meta((1, 1, 3, 3), (10, 10, 2**30 - 2, 1)))  # 2**31 - 2


def test_sigmoid_and_softplus_pieces():
    """The kernels' sigmoid(-|x|) (one exp2 and an rsqrt squared: the smaller of p and 1 - p)
    and log(1 + exp(-|x|)) (a polynomial) against float64 over |x| <= 80, tiny values
    included: within 3e-7 (1 + |x|) relative, the float32 rounding of |x| / ln 2 in the
    exponent growing with |x|."""
    import triton
    import triton.language as tl

    @triton.jit
    def pieces(x_ptr, p_ptr, l_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        x = tl.load(x_ptr + i)
        small, e = triton_engine._sigmoid_small(x)
        tl.store(p_ptr + i, small)
        tl.store(l_ptr + i, triton_engine._log1p_unit(e))

    x = torch.cat([torch.linspace(-80, 80, 4093), torch.tensor([0.0, 1e-7, -1e-7])])
    p, l = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    pieces[(1,)](x, p, l, N=x.numel())
    x64 = x.double()
    exact_p, exact_l = torch.sigmoid(-x64.abs()), torch.log1p(torch.exp(-x64.abs()))
    bound = 3e-7 * (1 + x64.abs())
    assert ((p.double() - exact_p).abs() / exact_p <= bound).all()
    assert ((l.double() - exact_l).abs() / exact_l <= bound).all()


def test_launches_of_a_step(monkeypatch):
    """bench/op_count.py's count of a training step: the kernels A, B0-B3, C0, C, D; eager
    calls skip the torch.library dispatch (its host time exceeds the glue's); one host
    synchronisation, the check of the one (joint) Cholesky factorisation (validate=False); no
    zero-filled gradient maps."""
    op_count = bench_module("op_count")
    monkeypatch.setattr(triton_engine, "FILL_OUTPUTS_WITH_NAN", False)  # count what a user's step runs
    triton_engine.use_gpu_blocks(monkeypatch.setattr)  # and with a GPU's blocking
    counter = op_count.OpCounter()
    launches = op_count.count_triton_launches(counter, monkeypatch.setattr)
    logits, labels = random_inputs(1, 2, 21, 23, seed=14)
    op_count.step(counter, launches, logits, labels, backend="triton", validate=False)
    # kernel A twice: its EXACT pass over the narrow planes (here none) follows the narrow kernel
    assert sorted(launches) == sorted(triton_engine.KERNEL_NAMES)
    assert launches == dict.fromkeys(triton_engine.KERNEL_NAMES, 1) | {"_pool_forward_kernel": 2}
    assert counter.syncs == 1
    assert counter.ops["linalg_cholesky_ex"] == 1
    assert counter.ops["eye"] == 0  # L^-1's identity is made once per size and device
    assert counter.ops["cat"] == 0  # kernel B3 writes the matrix the algebra factorises
    assert counter.ops["sum"] >= 1  # the pixel term's partials: the engine's own glue is counted too
    assert counter.ops["stack"] == 0  # the maps' centres come from kernel B0 (were two means and a stack)
    # host time a step follows the op count (bench/RESULTS.md): 98 before kernels B3 and C0, 53 before B0,
    # 50 before the joint factorisation, 44 before kernel D took the pixel term's coefficient, 42
    # before the algebra's gradient moved into the forward (one op more, twelve before the sync), 43
    # before the mean over images became a sum and one product, 37 before B3 wrote the factorised
    # matrix and the identity was kept (42 before the training step's loss left out the other terms'
    # casts and combined the terms in one op), 32 before the closed form shared G_V Y^T and the pixel
    # term's partials were summed in float64 without a copy, 30 before the closed form shared
    # diag(L) + eps with h and formed multiples of the gradients (the backward's addcmul scales
    # them), 27 before the training loss took the RMI term as one weighted sum of h, 26 before it
    # combined the terms as total * c + pixel * c' (one add, where a lerp's backward took two ops)
    assert sum(counter.ops.values()) <= 25, counter.ops
    # what the host queues after the sync while the GPU waits: the loss's backward (the seed,
    # the float64 cast, dL/dpixel and dL/dtotal: 4 ops), scaling h's gradients (2), kernels C0, C,
    # D (the terms themselves are queued before it; after it they were 10 more; the lerp's
    # backward was one op more)
    assert counter.after_sync <= 9, counter.after_sync
    assert not {"triton_statistics", "triton_statistics_backward"} & set(counter.ops)
    assert counter.ops["zeros"] == 0  # no zero gradients for y', p', ... (set_materialize_grads)
    assert not set(counter.ops) & op_count.NO_KERNEL


def test_host_time_script_runs_a_step_without_kernels():
    """bench/host_time.py (host time a step, kernels stubbed) runs the loss and counts its Python
    calls; in its own process, since it replaces the engine's kernels for good."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "host_time.py"), "--steps", "3",
                           "--rounds", "2"], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"median (\d+\.\d+), min (\d+\.\d+) .*; (\d+) Python function calls a step", proc.stdout)
    assert found, proc.stdout
    assert 0 < float(found.group(2)) <= float(found.group(1)) and int(found.group(3)) > 100, proc.stdout


def test_max_pool_ties_route_like_torch():
    """Windows whose maximum is shared (logits on a coarse grid): the gradient goes to the
    first maximal pixel in row-major order, where torch's max pooling routes it."""
    logits, labels = random_inputs(2, 3, 37, 53, seed=13)
    logits = (logits * 0.5).round()  # values -3 .. 3: most windows hold ties
    options = dict(pool="max")
    loss, grad = loss_and_grad(_triton, logits, labels, **options)
    ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")


REGION_GRAD_MAPS = [  # (H', W', R, kept): interior tiles across and down, maps with an empty interior
    # (R = 10: test_matches_reference_float32)
    (23, 45, 3, False), (23, 45, 3, True), (40, 45, 1, False), (37, 53, 2, False), (37, 53, 2, True),
    (5, 5, 3, False), (6, 9, 3, False), (5, 7, 3, True), (3, 4, 3, False), (19, 24, 5, False),
    (19, 24, 5, True),
]


@pytest.mark.parametrize("h_low,w_low,radius,weighted,one_sided",
                         [(*case, None) for case in REGION_GRAD_MAPS]
                         + [(23, 45, 3, False, "sp"), (19, 24, 5, True, "syp")])
def test_region_grad_kernel_against_a_float64_fold(monkeypatch, h_low, w_low, radius, weighted, one_sided):
    """Kernels C0 and C alone, with small tiles and frame blocks (many of each): dL/dp'_q
    is the sum of [G (v_m - vbar)]_k over the windows m that hold q at offset k,
    G = [Gyp^T, Gp + Gp^T], which F.fold computes in float64 from the stack of region
    vectors. C0's outputs are pre-filled with NaN: it must write every entry."""
    monkeypatch.setattr(triton_engine, "FILL_OUTPUTS_WITH_NAN", True)
    monkeypatch.setattr(triton_engine, "STENCIL_TILE", 64)
    monkeypatch.setattr(triton_engine, "STENCIL_TILE_W", 16)
    monkeypatch.setattr(triton_engine, "STENCIL_FRAME_ELEMENTS", 4096)
    g = torch.Generator().manual_seed(h_low * 1000 + w_low * 10 + radius)
    n, c, d = 1, 2, radius * radius
    y = (torch.rand(n, c, h_low, w_low, generator=g) < 0.3).float()
    p = torch.rand(n, c, h_low, w_low, generator=g) * 0.8 + 0.1
    vectors = torch.cat([F.unfold(y.view(n * c, 1, h_low, w_low).double(), radius),
                         F.unfold(p.view(n * c, 1, h_low, w_low).double(), radius)], 1)  # [P, 2d, M]
    m = vectors.shape[-1]
    keep = (torch.rand(n, m, generator=g) < 0.7).float() if weighted else None
    if weighted:
        keep[:, 0] = 1  # a mean to centre on
    weight = keep.repeat_interleave(c, 0).double() if weighted else torch.ones(n * c, m, dtype=torch.float64)
    mean = (vectors * weight.unsqueeze(1)).sum(-1) / weight.sum(-1, keepdim=True)  # [P, 2d]
    g_sp = torch.randn(n * c, d, d, generator=g, dtype=torch.float64)
    g_syp = torch.randn(n * c, d, d, generator=g, dtype=torch.float64)
    if one_sided == "sp":  # only dL/dSp arrives (dL/dSyp is None: zero)
        g_syp = None
    elif one_sided == "syp":
        g_sp = None
    zeros = torch.zeros(n * c, d, d, dtype=torch.float64)
    g_sp_full, g_syp_full = (zeros if t is None else t for t in (g_sp, g_syp))
    g_joint = torch.cat([g_syp_full.transpose(1, 2), g_sp_full + g_sp_full.transpose(1, 2)], 2)  # [P, d, 2d]
    window_grads = g_joint @ (vectors - mean.unsqueeze(-1)) * weight.unsqueeze(1)  # [P, d, M]
    expected = F.fold(window_grads, (h_low, w_low), radius).view(n, c, h_low, w_low)
    as_planes = (lambda t: None if t is None else t.view(n, c, d, d))
    got = triton_engine._launch_region_grad(y, p, keep, mean.view(n, c, 2 * d), as_planes(g_sp),
                                            as_planes(g_syp), radius)
    layout = triton_engine._StencilLayout.of(h_low, w_low, radius, weighted)
    assert layout.n_tiles == (0 if weighted or min(h_low, w_low) < 2 * radius - 1 else
                              -(-(h_low - 2 * radius + 2) // layout.tile_h) * -(-(w_low - 2 * radius + 2) // layout.tile_w))
    assert_close_rel(got, expected, 1e-5, "dL/dp'")


def test_every_launch_is_on_the_logits_device_and_within_cudas_grid_limits(monkeypatch):
    """Two things only a GPU tells, asked of every launch of a step (the interpreter has
    neither): Triton launches on the current CUDA device, not the tensors' (logits on cuda:1
    while cuda:0 was current ran the forward's kernels on GPU 0), and CUDA allows 65535
    programs on a grid's second and third axes, where kernel C ran a plane's frame blocks:
    with exclude_ignored 131072 of them for a 1024 x 2048 map at R = 10. It runs them on the
    first axis now (2**31 - 1), the planes on the second."""
    import contextlib
    import inspect
    import re

    logits, labels = random_inputs(1, 3, 21, 23, seed=2)
    inside, launched = [], []

    @contextlib.contextmanager
    def guard(device):
        assert device == logits.device
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    grid = triton_engine._grid

    def checked(kernel, *dims):
        assert inside, f"{kernel} launched outside the logits' device guard"
        launched.append((kernel, dims))
        return grid(kernel, *dims)

    monkeypatch.setattr(triton_engine, "_device_guard", guard)
    monkeypatch.setattr(triton_engine, "_grid", checked)
    loss_and_grad(_triton, logits, labels, exclude_ignored=True)
    kernels = {kernel for kernel, _ in launched}
    assert {"kernel A", "the narrow-plane kernel", "kernel B2", "kernel B3", "kernel C0", "kernel C",
            "kernel D"} <= kernels, kernels
    assert all(dims[1] == 3 for kernel, dims in launched if kernel == "kernel C")  # the planes
    assert not re.search(r"_kernel\[\(", inspect.getsource(triton_engine))  # every launch through _grid

    triton_engine.use_gpu_blocks(monkeypatch.setattr)
    layout = triton_engine._StencilLayout.of(1024, 2048, 10, weighted=True)
    blocks = layout.n_tiles + layout.n_frame_blocks
    assert blocks > 65535
    assert grid("kernel C", blocks, 16 * 19) == (blocks, 16 * 19)
    with pytest.raises(ValueError, match=r"kernel C would launch 304 x 131072 programs, past CUDA's limits .* "
                                         r"use a larger pool_size, or backend='torch'"):
        grid("kernel C", 16 * 19, blocks)


@pytest.mark.parametrize("h_low,w_low,radius,weighted", REGION_GRAD_MAPS)
def test_region_moments_against_a_float64_unfold(monkeypatch, h_low, w_low, radius, weighted):
    """Kernel B alone, with small chunks, tiles, position blocks and merge row blocks
    (several of each): the mean and the centred sums of products of the (kept) region
    vectors, against F.unfold in float64; the shifted-product sums, the outer lines' sums
    taken out again (several offset groups and steps a line) and the origins beside the
    corners put back must agree to float32 rounding of the products. Outputs are
    pre-filled with NaN: B0 must write every entry of its padded maps, B3 every entry of
    the sums and of the matrix the algebra factorises. The maps are centred on their first
    cells, here an outlier."""
    monkeypatch.setattr(triton_engine, "FILL_OUTPUTS_WITH_NAN", True)
    monkeypatch.setattr(triton_engine, "CENTRE_ELEMENTS", 64)
    monkeypatch.setattr(triton_engine, "MERGE_ELEMENTS", 64)
    monkeypatch.setattr(triton_engine, "BORDER_ELEMENTS", 64)
    monkeypatch.setattr(triton_engine, "PRODUCT_ELEMENTS", 256)
    monkeypatch.setattr(triton_engine, "PRODUCT_TILE", 96)
    monkeypatch.setattr(triton_engine, "MOMENT_BLOCK_M", 16)
    monkeypatch.setattr(triton_engine, "MOMENT_TILE_POSITIONS", 64)
    g = torch.Generator().manual_seed(h_low * 1000 + w_low * 10 + radius + 7)
    n, c, d = 2, 1, radius * radius
    y = (torch.rand(n, c, h_low, w_low, generator=g) < 0.3).float()
    p = torch.rand(n, c, h_low, w_low, generator=g) * 0.05 + 0.9  # nearly constant: centring matters
    y[:, :, 0, 0], p[:, :, 0, 0] = 1.0, 0.01
    vectors = torch.cat([F.unfold(y.view(n * c, 1, h_low, w_low).double(), radius),
                         F.unfold(p.view(n * c, 1, h_low, w_low).double(), radius)], 1)  # [P, 2d, M]
    m = vectors.shape[-1]
    keep = (torch.rand(n, m, generator=g) < 0.7).float() if weighted else None
    if weighted:
        keep[:, 0] = 1
    weight = keep.double() if weighted else torch.ones(n, m, dtype=torch.float64)
    mean = (vectors * weight.unsqueeze(1)).sum(-1) / weight.sum(-1, keepdim=True)
    centred = (vectors - mean.unsqueeze(-1)) * weight.unsqueeze(1)
    expected = centred @ centred.transpose(1, 2)
    got_mean, *blocks = triton_engine._launch_region_moments(y, p, keep, radius, 0)  # B0's maps an image a run
    assert_close_rel(got_mean.view(n * c, 2 * d), mean, 1e-7, "mean")
    for got, (name, rows, cols) in zip(blocks, (("Sy", slice(0, d), slice(0, d)), ("Sp", slice(d, None), slice(d, None)),
                                                ("Syp", slice(0, d), slice(d, None)))):
        assert_close_rel(got.view(n * c, d, d), expected[:, rows, cols], 1e-6, name)
    sy, sp, syp, joint = blocks  # B3's matrix for the algebra: bitwise the one built from Sy, Sp, Syp
    torch.testing.assert_close(joint, joint_matrix(sy, sp, syp), rtol=0, atol=0)


@pytest.mark.parametrize("options,shape", [({"pool_size": 4}, (1, 2, 39, 43)), ({"pool_size": 3}, (1, 2, 39, 42)),
                                           ({"pool": "max", "pool_size": 4}, (1, 2, 43, 39))],
                         ids=["avg4", "avg3", "max4"])
def test_edge_pixels_outside_the_pooled_map(options, shape):
    """Sizes where the last row/column of pixels feeds no pooled cell: they
    still take part in the pixel term and get its gradient."""
    logits, labels = random_inputs(*shape, seed=14)
    loss, grad = loss_and_grad(_triton, logits, labels, **options)
    ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")
    assert_close_rel(grad[:, :, -1], ref_grad[:, :, -1], 1e-4, "gradient of the last row")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
          phases=[Phase.explicit, Phase.generate])  # shrinking under the interpreter takes minutes
@given(h=st.integers(5, 45), w=st.integers(5, 45), pool=st.sampled_from(["avg", "max", "none"]),
       pool_size=st.integers(1, 8), radius=st.integers(1, 3), c=st.integers(1, 3),
       seed=st.integers(0, 2**16))
@example(h=31, w=41, pool="avg", pool_size=6, radius=2, c=1, seed=622)  # total loss cancels to -0.026
def test_random_geometry(h, w, pool, pool_size, radius, c, seed):
    """Any image size, pool size and radius: the cell grid, padding and edges."""
    opts = RMIOptions(pool=pool, pool_size=pool_size, radius=radius)
    h_low, w_low = opts.pooled_size(h, w)
    # enough region vectors for a well-conditioned Sp (else float32 rounding is amplified)
    assume(h_low >= radius and w_low >= radius)
    assume((h_low - radius + 1) * (w_low - radius + 1) >= 4 * radius * radius)
    options = dict(pool=pool, pool_size=pool_size, radius=radius)
    logits, labels = random_inputs(1, c, h, w, seed=seed)
    loss, grad = loss_and_grad(_triton, logits, labels, **options)
    ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)
    # each part on its own: the total 0.5 * pixel + 0.5 * rmi can cancel to near zero
    terms = rmi_terms(logits, labels, backend="triton", **options)
    ref = reference_rmi(logits.double(), labels, **options)
    assert_close_rel(terms.pixel, ref.pixel, 1e-5, "pixel term")
    assert_close_rel(terms.rmi, ref.rmi, 1e-5, "rmi term")
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * 0.5 * (abs(ref.pixel.item()) + abs(ref.rmi.item()))
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")


@pytest.mark.parametrize("options", [{}, {"exclude_ignored": True}, {"radius": 1}, {"pool": "interp"},
                                     {"pool_size": 2, "radius": 5}], ids=case_id)
def test_region_moments_by_runs_of_images(options, monkeypatch):
    """Kernel B0's float64 maps made a run of images at a time (MAP_BYTES_PER_LOGIT) give the
    loss and gradient bitwise: each plane's sums are the same whichever run makes them, and
    B3 merges the runs' sums. One run where the maps fit, one image a run where they do not."""
    logits, labels = random_inputs(3, 2, 37, 53, ignore_frac=0.003, seed=31)  # a few ignored pixels an image
    results, runs = [], []
    chunks = triton_engine._image_chunks
    monkeypatch.setattr(triton_engine, "_image_chunks", lambda *a: runs.append(chunks(*a)) or runs[-1])
    monkeypatch.setattr(triton_engine, "MAP_BYTES_FLOOR", 0)
    for budget in (1 << 40, 0):
        monkeypatch.setattr(triton_engine, "MAP_BYTES_PER_LOGIT", budget)
        results.append(loss_and_grad(_triton, logits, labels, **options))
    assert [len(r) for r in runs] == [1, 3]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


def test_bitwise_deterministic():
    logits, labels = random_inputs(2, 3, 37, 53, seed=7)
    first = loss_and_grad(_triton, logits, labels, probs="softmax")
    second = loss_and_grad(_triton, logits, labels, probs="softmax")
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8])
def test_label_dtypes(label_dtype):
    logits, labels = random_inputs(2, 3, 33, 41, seed=5)
    loss, grad = loss_and_grad(_triton, logits, labels)
    narrow_loss, narrow_grad = loss_and_grad(_triton, logits, labels.to(label_dtype))
    assert torch.equal(loss, narrow_loss)
    assert torch.equal(grad, narrow_grad)


def test_channels_last_and_non_contiguous():
    logits, labels = random_inputs(2, 3, 37, 53, seed=6)
    loss, grad = loss_and_grad(_triton, logits, labels)
    cl = logits.to(memory_format=torch.channels_last)
    cl_loss, cl_grad = loss_and_grad(_triton, cl, labels)
    assert cl_grad.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(cl_loss, loss, 1e-6, "channels_last loss")
    assert_close_rel(cl_grad, grad, 1e-6, "channels_last gradient")
    wide = torch.randn(2, 3, 37, 60)
    wide[..., :53] = logits
    nc_loss, nc_grad = loss_and_grad(_triton, wide[..., :53], labels)
    assert_close_rel(nc_loss, loss, 1e-6, "sliced loss")
    assert_close_rel(nc_grad, grad, 1e-6, "sliced gradient")


def test_terms_match_reference():
    logits, labels = random_inputs(2, 3, 37, 53, seed=8)
    terms = rmi_terms(logits, labels, backend="triton", class_weights=[0.5, 1.0, 2.0])
    ref = reference_rmi(logits.double(), labels, class_weights=[0.5, 1.0, 2.0])
    assert_close_rel(terms.pixel, ref.pixel, 1e-6, "pixel term")
    assert_close_rel(terms.rmi_per_class, ref.rmi_per_class, 1e-5, "per-class RMI")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_raise(bad):
    logits, labels = random_inputs(1, 2, 17, 19, seed=9)
    logits[0, 1, 5, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        _triton(logits, labels)
    # validate=False skips the check: the engine runs through. NaN and +inf propagate; a logit
    # of -inf is a probability of exactly 0 and softplus(-inf) = 0 (its label is class 0 here)
    opts = RMIOptions(backend="triton", validate=False)
    stats = triton_engine.statistics(logits, labels, opts)
    if bad == -float("inf"):
        assert labels[0, 5, 7] == 0
        finite = triton_engine.statistics(logits.nan_to_num(neginf=-200.0), labels, opts)
        torch.testing.assert_close(stats.pixel, finite.pixel, rtol=0, atol=0)
        torch.testing.assert_close(stats.sp, finite.sp, rtol=0, atol=0)
    else:
        assert not torch.isfinite(stats.pixel)


def test_cpu_tensors_on_a_cuda_machine_are_refused(monkeypatch):
    """Outside the interpreter the kernels need CUDA tensors: CPU logits on a machine that has a
    GPU get a message that says so, not an error from inside Triton's launcher."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    logits, labels = random_inputs(1, 2, 17, 19, seed=9)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors, got logits on cpu"):
        rmi_loss(logits, labels, backend="triton")


def test_rmi_only_gradient_and_pixel_only_gradient():
    """Backward with only one of the two gradient paths alive."""
    logits, labels = random_inputs(1, 2, 21, 23, seed=10)
    for options in ({"rmi_weight": 1.0}, {"rmi_weight": 0.0}):
        loss, grad = loss_and_grad(_triton, logits, labels, **options)
        ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)
        assert_close_rel(grad, ref_grad, 1e-4, f"gradient {options}")


def test_backward_frees_the_pooled_maps_before_the_gradient(monkeypatch):
    """y' and p' go once kernel C has read them, before kernel D allocates dL/dlogits: the
    step's peak then holds one pooled map beside the gradient, not three. With the graph
    kept for another backward they stay, and the second backward gives the same gradient."""
    maps, alive_at_d = [], []
    pool_forward, pool_backward = triton_engine._launch_pool_forward, triton_engine._launch_pool_backward

    def recording_forward(*args, **kwargs):
        out = pool_forward(*args, **kwargs)
        maps[:] = [weakref.ref(t) for t in out[:2]]  # p', y'
        return out

    def recording_backward(*args, **kwargs):
        alive_at_d.append([m() is not None for m in maps])
        return pool_backward(*args, **kwargs)

    monkeypatch.setattr(triton_engine, "_launch_pool_forward", recording_forward)
    monkeypatch.setattr(triton_engine, "_launch_pool_backward", recording_backward)
    logits, labels = random_inputs(2, 3, 21, 23, seed=13)
    x = logits.requires_grad_()
    loss = _triton(x, labels)
    kept = torch.autograd.grad(loss, x, retain_graph=True)[0]
    last = torch.autograd.grad(loss, x)[0]
    assert alive_at_d == [[True, True], [False, False]]
    torch.testing.assert_close(last, kept, rtol=0, atol=0)
    del loss
    torch.autograd.grad(_triton(x, labels), x)
    assert alive_at_d[-1] == [False, False]


def test_custom_op_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the op."""
    logits, labels = random_inputs(1, 2, 13, 15, seed=12)
    args = (logits.requires_grad_(), labels, None, torch.tensor([0.5, 2.0]), 2, "avg", 2, "bce",
            "sigmoid", 255, False, True)
    torch.library.opcheck(torch.ops.rmi_triton.triton_statistics.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_without_graph_breaks():
    """torch.compile keeps the engine (forward and backward) in one graph."""
    logits, labels = random_inputs(1, 2, 17, 19, seed=13)
    opts = RMIOptions(backend="triton", validate=False)

    def step(x):
        stats = triton_engine.statistics(x, labels, opts)
        return stats.pixel + stats.sp.sum() + 0.5 * stats.syp.sum()

    # inductor where a C++ compiler can build its CPU code, else the graph capture alone
    backend = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    x = logits.clone().requires_grad_()
    out = compiled(x)
    out.backward()
    x_eager = logits.clone().requires_grad_()
    expected = step(x_eager)
    expected.backward()
    assert_close_rel(out, expected, 1e-12, "compiled value")
    assert_close_rel(x.grad, x_eager.grad, 1e-12, "compiled gradient")


def test_available_under_interpreter():
    assert triton_engine.available()


@pytest.mark.parametrize("version, runs", [("3.3.1", False), ("3.4.0", False), ("3.5.0", True),
                                           ("3.10.0+git5a1b2c3", True), ("4.0.0", True), ("3.5.0rc1", True),
                                           ("v3.4.0", False), ("git-abc1234", True), ("", True)])
def test_triton_older_than_its_kernels_need_is_named(monkeypatch, version, runs):
    """Kernel B2's float64 tl.dot does not compile before Triton 3.5 (PyTorch 2.8's 3.4 stops
    with "Unsupported lhs dtype fp64"): such a Triton is named before any kernel is compiled."""
    monkeypatch.setattr(triton_engine.triton, "__version__", version)
    assert triton_engine.available() is runs
    logits, labels = random_inputs(1, 2, 12, 12, seed=1)
    if runs:
        assert torch.isfinite(rmi_loss(logits, labels, backend="triton"))
    else:
        with pytest.raises(RuntimeError, match=f"cannot run here: triton {version} is installed and the "
                                               "kernels need 3.5 or newer.*; use backend='torch'"):
            rmi_loss(logits, labels, backend="triton")


def test_no_device_to_run_on_is_named(monkeypatch):
    """Without a CUDA device (and not interpreted), backend="triton" says so and what to pass."""
    monkeypatch.setattr(triton_engine, "_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logits, labels = random_inputs(1, 2, 12, 12, seed=1)
    with pytest.raises(RuntimeError, match=r"the Triton engine cannot run here: no CUDA device \(nor "
                                           r"TRITON_INTERPRET=1 set before triton is imported\); use backend='torch'"):
        rmi_loss(logits, labels, backend="triton")


def test_auto_warns_once_when_cuda_tensors_take_the_torch_engine(monkeypatch):
    """backend="auto" on CUDA tensors where the Triton engine cannot run (no or an old triton):
    the PyTorch engine computes the loss, and a warning says so once, with the reason."""
    import warnings

    from rmi_triton import loss
    from rmi_triton.engines import torch_engine

    monkeypatch.setattr(triton_engine.triton, "__version__", "3.4.0")
    loss._warn_fallback.cache_clear()
    cuda_logits = types.SimpleNamespace(is_cuda=True)  # all that the choice reads
    with pytest.warns(UserWarning, match="PyTorch engine.*cannot run here: triton 3.4.0 is installed"):
        assert loss._engine(cuda_logits, "auto") is torch_engine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loss._engine(cuda_logits, "auto") is torch_engine  # no second warning
        assert loss._engine(types.SimpleNamespace(is_cuda=False), "auto") is torch_engine
    loss._warn_fallback.cache_clear()


def test_whole_loss_compiles_in_one_graph():
    """A compiled training step keeps the whole loss (engine op + d x d algebra) in its graph:
    fullgraph=True fails on any break. validate=False drops the checks that must sync."""
    from rmi_triton import RMILoss

    logits, labels = random_inputs(2, 3, 24, 28, seed=14)
    crit = RMILoss(backend="triton", validate=False)
    backend = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"
    compiled = torch.compile(lambda x: crit(x, labels), backend=backend, fullgraph=True)
    x = logits.clone().requires_grad_()
    out = compiled(x)
    (out * 3.7).backward()
    x_eager = logits.clone().requires_grad_()
    expected = crit(x_eager, labels)
    (expected * 3.7).backward()
    assert_close_rel(out, expected, 1e-6, "compiled loss")
    assert_close_rel(x.grad, x_eager.grad, 1e-5, "compiled gradient")
    assert crit.cholesky_retries == 0


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("with_keep", [False, True])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_narrow_kernel_follows_the_rule(block, with_keep, pool, monkeypatch):
    """Kernel _narrow_kernel flags the planes `rmi_triton.narrow.narrow_planes` finds whose
    labels vary: spreads at half and twice the bound, around 1/2, near 0 and near 1 (where a
    sum of squares less its mean's square would be all rounding), a step between the plane's
    halves, cells diluted by padding or ignored pixels, a cell without a valid pixel, a plane
    of constant labels, and with exclude_ignored's kept vectors an image where no cell counts.
    block=16: a plane in many blocks, their moments merged."""
    from rmi_triton.narrow import NARROW_SPREAD, covered_cells, narrow_planes
    from rmi_triton.pooling import pool_map

    if block is not None:
        monkeypatch.setattr(triton_engine, "NARROW_ELEMENTS", block)
    opts = RMIOptions(pool=pool, pool_size=2, radius=3, exclude_ignored=with_keep)
    h, w = opts.pooled_size(17, 21)
    n, c = 2, 8
    g = torch.Generator().manual_seed(8)
    noise = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    noise[:, 6] = torch.where(torch.arange(h).view(h, 1) < h // 2, -1.0, 1.0)  # a step: spread between blocks
    noise = (noise - noise.mean((2, 3), keepdim=True)) / noise.std((2, 3), correction=0, keepdim=True)
    level = torch.tensor([0.5, 0.5, 1e-5, 1e-5, 1 - 1e-7, 1 - 1e-7, 0.3, 0.3], dtype=torch.float64).view(1, c, 1, 1)
    factor = torch.tensor([0.5, 2.0, 0.5, 2.0, 0.5, 2.0, 2.0, 8.0], dtype=torch.float64).view(1, c, 1, 1)
    p = level + factor * NARROW_SPREAD * torch.minimum(level, 1 - level) * noise
    valid = torch.ones(n, 17, 21, dtype=torch.bool)
    valid[1, 8:10, 10:12] = False  # one cell without a valid pixel
    valid[:, 3, 4] = False
    share = None
    if pool == "avg":  # the floor: 1e-6 a pixel of the image, the valid ones' p diluted by their share
        share = pool_map(valid.unsqueeze(1).double(), opts)
        p = p * share + 1e-6 * pool_map(torch.ones_like(valid).unsqueeze(1).double(), opts)
    else:
        p[1, :, 4, 5] = 0
        p = p + 1e-6
    y = torch.rand(n, c, h, w, generator=g)
    y[0, 0] = 0.0  # constant labels: never narrow
    y[1, 0] = 0.0
    y[1, 0, 0, 0] = 1.0  # labels that vary only in the first block: narrow
    keep = covered = None
    if with_keep:
        keep = torch.rand(n, h - 2, w - 2, generator=g) < 0.5
        keep[1] = False
        covered = covered_cells(keep, 3)
        keep = keep.flatten(1).float()
    expected = narrow_planes(p, share, covered) & (y.flatten(2).amax(2) > y.flatten(2).amin(2))
    counts = None if share is None else (4 * share[:, 0]).float().contiguous()  # kernel A's: valid pixels a cell
    flags = triton_engine._launch_narrow(p, y, counts, keep, 3, 4)
    assert flags.bool().tolist() == expected.tolist()
    assert expected.any() and not expected.all()
    assert not expected[0, 0] and narrow_planes(p, share, covered)[0, 0]
    assert expected[1, 0] or with_keep


@pytest.mark.parametrize("tied_chunk", [1, None], ids=["a cell a chunk", "one chunk"])
def test_near_ties_of_max_pooling_send_their_cells_to_the_float64_pass(monkeypatch, tied_chunk):
    """Softmax with max pooling: where a cell's largest p has another within `tie_bound` of it,
    a float32 p may rank the two otherwise than the float64 reference. One cell of image 0 holds
    nine pixels whose logits differ by about 2e-7 (the rest: N(0, 16)): kernel A sets TIE_BIT
    there in every class and nowhere else, `_narrow_kernel` flags image 0's planes 2 (ties
    alone), the EXACT pass rewrites that cell alone (blocks of 4 cells: the other blocks
    return after reading the flags and their bytes) and leaves no TIE_BIT behind; the torch
    engine pools the same cells again (a cell at a time, or its three classes' from one window)."""
    from rmi_triton.engines import torch_engine

    g = torch.Generator().manual_seed(14)
    n, c, h, w = 2, 3, 17, 22
    logits = torch.randn(n, c, h, w, generator=g) * 4
    # pool size 3 (padding 1): cell (2, 3) is rows 5-7, columns 8-10
    logits[0, :, 5:8, 8:11] = torch.randn(c, 1, 1, generator=g) * 0.5 + torch.randn(c, 3, 3, generator=g) * 2e-7
    labels = torch.randint(0, c, (n, h, w), generator=g)
    options = dict(pool="max", pool_size=3, probs="softmax", radius=2)
    monkeypatch.setattr(triton_engine, "FULL_RES_ELEMENTS", 64)  # 4 cells a block
    if tied_chunk is not None:
        monkeypatch.setattr(torch_engine, "TIED_CELL_CHUNK", tied_chunk)

    seen = {}
    narrow, repool = triton_engine._launch_narrow, triton_engine._repool_narrow

    def spy_narrow(*a):
        seen["bits"] = (a[-1] & triton_engine.TIE_BIT.value) != 0
        seen["flags"] = narrow(*a)
        return seen["flags"]

    def spy_repool(x, labels, opts, p_low, arg, flags):
        before = p_low.clone()
        repool(x, labels, opts, p_low, arg, flags)
        seen["after"] = arg.clone()
        seen["rewritten"] = p_low != before

    monkeypatch.setattr(triton_engine, "_launch_narrow", spy_narrow)
    monkeypatch.setattr(triton_engine, "_repool_narrow", spy_repool)
    pool_tied = torch_engine._pool_tied_cells
    monkeypatch.setattr(torch_engine, "_pool_tied_cells",
                        lambda *a: seen.setdefault("torch", a[-1].tolist()) is None or pool_tied(*a))
    for backend in ("triton", "torch"):
        loss, grad = loss_and_grad(lambda x, y, **o: rmi_loss(x, y, backend=backend, **o), logits, labels, **options)
        ref_loss, ref_grad = loss_and_grad(lambda x, y, **o: reference_rmi(x, y, RMIOptions(**o)).loss,
                                           logits.double(), labels, **options)
        assert_close_rel(loss, ref_loss, 1e-5, f"{backend} loss")
        assert_close_rel(grad, ref_grad, 1e-4, f"{backend} gradient")
    expected = torch.zeros(n, c, 6, 8, dtype=torch.bool)
    expected[0, :, 2, 3] = True
    assert seen["bits"].tolist() == expected.tolist()
    assert seen["flags"].tolist() == [[2] * c, [0] * c]  # ties alone: those cells only
    assert not ((seen["after"] & triton_engine.TIE_BIT.value) != 0).any()
    assert seen["rewritten"].tolist() == expected.tolist()
    assert seen["torch"] == [[0, k, 2, 3] for k in range(c)]


def test_ignored_pixels_are_no_near_tie(monkeypatch):
    """A cell of one valid pixel at p = 1/2 + 1e-7 (class 0, the high side: its key 1 - p) and
    three ignored ones (p = 0): kernel A took the ignored pixels' key as -0.5, within the tie
    bound of the valid one's -(1 - p), and sent the cell to the float64 pass for nothing (found
    by a review); ignored pixels are never near now."""
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(1, 3, 8, 8, generator=g) * 4
    labels = torch.randint(0, 3, (1, 8, 8), generator=g)
    logits[0, :, 1, 1] = torch.tensor([0.0, -0.6931476, -0.6931476])  # pool size 2: cell (1, 1) is rows and columns 1-2
    labels[0, 1:3, 1:3] = 255
    labels[0, 1, 1] = 0
    seen = []
    narrow = triton_engine._launch_narrow
    monkeypatch.setattr(triton_engine, "_launch_narrow",
                        lambda *a: seen.append((a[-1] & triton_engine.TIE_BIT.value) != 0) or narrow(*a))
    rmi_loss(logits, labels, backend="triton", pool="max", pool_size=2, probs="softmax", radius=2)
    assert not seen[0][0, 0, 1, 1]


@pytest.mark.parametrize("options", [{"pool_size": 2}, {"pool_size": 5}, {"pool_size": 5, "exclude_ignored": True},
                                     {"pool": "max", "pool_size": 3}, {"pool": "interp", "pool_size": 3},
                                     {"pool": "none", "radius": 2}], ids=case_id)
def test_both_engines_find_the_same_narrow_planes(options, monkeypatch):
    """On kernel A's own p' (its floor rounded as it rounds it: at pool size 5 a border cell
    without a valid pixel came out a float64 ulp above 1e-6) the kernel flags what the torch
    engine's rule flags: narrow planes near 1/2, near 0 (logits -8) and near 1 among wide
    ones, a class absent from an image (never narrow), ignored pixels along a border."""
    from rmi_triton.engines.torch_engine import informative_planes, label_maps
    from rmi_triton.narrow import find_narrow
    from rmi_triton.pooling import kept_regions

    g = torch.Generator().manual_seed(12)
    n, c, h, w = 2, 4, 33, 37
    logits = torch.randn(n, c, h, w, generator=g) * 1e-4
    logits[:, 1] = torch.randn(n, h, w, generator=g) * 2  # wide
    logits[:, 2] -= 8.0
    logits[:, 3] += 9.0
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[0][labels[0] == 2] = 0  # class 2 absent from image 0
    labels[:, :3, 33:] = 255
    labels[torch.rand(n, h, w, generator=g) < 0.002] = 255
    seen = []
    real = triton_engine._launch_narrow
    monkeypatch.setattr(triton_engine, "_launch_narrow", lambda *a: seen.append((a, real(*a))) or seen[-1][1])
    options = dict(dict(radius=3), **options)
    rmi_loss(logits, labels, backend="triton", **options)
    opts = RMIOptions(**options)
    (p_low, y_low, _share, keep, _radius, _area, _ties), flags = seen[0]
    valid, _ = label_maps(labels, opts)
    if opts.exclude_ignored:
        keep = kept_regions((~valid).unsqueeze(1).float(), opts)
    expected = find_narrow(p_low, valid, keep, opts) & informative_planes(y_low)
    assert flags.bool().tolist() == expected.tolist()
    assert expected[1].tolist() == [True, False, True, True] and not expected[0, 2]
