"""The torch engine against the float64 reference: every option, gradients, dtypes, layouts."""

import pytest
import torch

from rmi_triton import RMILoss, RMIOptions, reference_rmi, rmi_loss, rmi_terms
from rmi_triton.algebra import CholeskyReport
from rmi_triton.engines import torch_engine

from helpers import OPTION_CASES, assert_close_rel, case_id, loss_and_grad, random_inputs


def _ref(x, labels, **options):
    return reference_rmi(x.double(), labels, **options).loss


def _torch(x, labels, **options):
    return rmi_loss(x, labels, backend="torch", **options)


@pytest.mark.parametrize("options", OPTION_CASES, ids=case_id)
def test_matches_reference_float32(options):
    ignore = options.get("ignore_index", 255)
    h, w = (37, 53) if options.get("radius", 3) < 10 else (61, 67)
    logits, labels = random_inputs(2, 3, h, w, ignore_index=ignore, seed=len(case_id(options)))
    loss, grad = loss_and_grad(_torch, logits, labels, **options)
    ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)
    assert loss.dtype == torch.float32
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"probs": "softmax", "pixel_loss": "ce"}, {"pool": "max"}], ids=case_id)
def test_half_precision_logits(dtype, options):
    logits, labels = random_inputs(2, 3, 37, 53, dtype=dtype, seed=3)
    loss, grad = loss_and_grad(_torch, logits, labels, **options)
    # the reference sees the same (rounded) half-precision values, and its gradient comes back in
    # their dtype too: the engine, computing in float32 from them, is held to the float32 contract
    # (the contract's 1e-2 for half precision let a loss rounded to the logits' dtype pass)
    ref_loss, ref_grad = loss_and_grad(_ref, logits, labels, **options)
    assert grad.dtype == dtype and ref_grad.dtype == dtype
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8])
def test_label_dtypes(label_dtype):
    """int64 labels are held to the reference (test_matches_reference_float32); the others give the same."""
    logits, labels = random_inputs(2, 3, 33, 41, seed=5)
    loss, grad = loss_and_grad(_torch, logits, labels)
    other_loss, other_grad = loss_and_grad(_torch, logits, labels.to(label_dtype))
    assert torch.equal(other_loss, loss) and torch.equal(other_grad, grad)


def test_channels_last_and_non_contiguous():
    logits, labels = random_inputs(2, 3, 37, 53, seed=6)
    loss, grad = loss_and_grad(_torch, logits, labels)
    cl_loss, cl_grad = loss_and_grad(_torch, logits.to(memory_format=torch.channels_last), labels)
    assert_close_rel(cl_loss, loss, 1e-6, "channels_last loss")
    assert_close_rel(cl_grad, grad, 1e-6, "channels_last gradient")
    wide = torch.randn(2, 3, 37, 60)
    wide[..., :53] = logits
    nc_loss, nc_grad = loss_and_grad(_torch, wide[..., :53], labels)
    assert_close_rel(nc_loss, loss, 1e-6, "sliced loss")
    assert_close_rel(nc_grad, grad, 1e-6, "sliced gradient")


@pytest.mark.parametrize("options", [{"exclude_ignored": True},
                                     {"pool": "max", "probs": "softmax", "pixel_loss": "ce",
                                      "class_weights": [1.0, 0.2, 3.0]}], ids=case_id)
def test_under_torch_compile_the_same_values(options):
    """The torch engine compiled (graph breaks where it picks planes by their data) gives what it
    gives eagerly. With exclude_ignored it did not compile: AOTAutograd's functional torch.sub
    kept the region windows' strides, which a view of its out= buffer could not take."""
    torch._dynamo.reset()
    logits, labels = random_inputs(2, 3, 21, 23, seed=11)
    compiled = torch.compile(_torch, backend="aot_eager")
    loss, grad = loss_and_grad(_torch, logits, labels, validate=False, **options)
    compiled_loss, compiled_grad = loss_and_grad(compiled, logits, labels, validate=False, **options)
    assert_close_rel(compiled_loss, loss, 1e-6, "loss")
    assert_close_rel(compiled_grad, grad, 1e-6, "gradient")


@pytest.mark.parametrize("options", [{"exclude_ignored": True}, {"class_weights": [1.0, 0.2, 3.0, 0.5]},
                                     {"pool": "max"}, {"probs": "softmax", "pixel_loss": "ce"}], ids=case_id)
def test_small_chunks_give_the_same_result(monkeypatch, options):
    """Chunking of both stages (class blocks, image blocks, plane groups, tiles) is invisible:
    tiny chunk sizes change nothing beyond rounding."""
    logits, labels = random_inputs(3, 4, 45, 47, seed=7)
    loss, grad = loss_and_grad(_torch, logits, labels, **options)
    monkeypatch.setattr(torch_engine, "FULL_RES_CHUNK", 2 * 45 * 47)  # two classes of one image
    monkeypatch.setattr(torch_engine, "REGION_CHUNK", 1)
    monkeypatch.setattr(torch_engine, "TILE", 16)
    small_loss, small_grad = loss_and_grad(_torch, logits, labels, **options)
    assert_close_rel(small_loss, loss, 1e-6, "loss")
    assert_close_rel(small_grad, grad, 1e-5, "gradient")


def test_blocks_off_the_cpu_are_larger():
    """On a GPU (the engine's place where Triton cannot run) a block's small ops and host syncs
    cost more than its passes: blocks and plane groups GPU_CHUNK_SCALE times larger there, at
    the paper's setting 48 -> 6 full-resolution blocks a 16-image batch."""
    opts = RMIOptions()
    shape = (16, 21, 513, 513)
    cpu = list(torch_engine._blocks(shape, opts, torch.device("cpu")))
    gpu = list(torch_engine._blocks(shape, opts, torch.device("cuda")))
    assert (len(cpu), len(gpu)) == (48, 6)
    covered = torch.zeros(16, 21, dtype=torch.int64)
    for images, classes in gpu:
        covered[images, classes] += 1
    assert bool((covered == 1).all())  # every plane in one block
    regions = torch_engine._Regions.of(129, 129, 3)
    groups = [len(list(regions.plane_groups(336, stacked, torch.device(kind)))) for kind in ("cpu", "cuda")
              for stacked in (False, True)]
    assert groups[2] < groups[0] and groups[3] < groups[1]


def test_terms_match_reference_parts():
    logits, labels = random_inputs(2, 3, 40, 40, seed=8)
    terms = rmi_terms(logits, labels, backend="torch", class_weights=[1.0, 0.5, 2.0])
    ref = reference_rmi(logits.double(), labels, class_weights=[1.0, 0.5, 2.0])
    assert_close_rel(terms.pixel, ref.pixel, 1e-6, "pixel term")
    assert_close_rel(terms.rmi, ref.rmi, 1e-5, "rmi term")
    assert_close_rel(terms.rmi_per_class, ref.rmi_per_class, 1e-5, "per-class rmi")
    assert terms.rmi_per_class.shape == (3,)


def test_deterministic_bitwise():
    logits, labels = random_inputs(2, 3, 37, 53, seed=9)
    first = loss_and_grad(_torch, logits, labels, exclude_ignored=True)
    second = loss_and_grad(_torch, logits, labels, exclude_ignored=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_module_defaults_are_the_paper_setting():
    logits, labels = random_inputs(2, 4, 64, 64, seed=10)
    crit = RMILoss()
    paper = reference_rmi(logits.double(), labels, radius=3, pool="avg", pool_size=4, pixel_loss="bce",
                          probs="sigmoid", rmi_weight=0.5, combine="weighted", class_reduction="sum")
    assert_close_rel(crit(logits, labels), paper.loss, 1e-5, "default loss")
    assert crit.terms(logits, labels).loss.item() == crit(logits, labels).item()


def test_functional_forms_take_the_same_arguments():
    """rmi_loss takes what rmi_terms takes (num_classes, options, report or keyword options)
    and gives the same loss, bitwise, as rmi_terms and RMILoss."""
    logits, labels = random_inputs(1, 3, 32, 32, seed=21)
    opts = RMIOptions(backend="torch", radius=2)
    expected = rmi_terms(logits, labels, options=opts).loss
    assert rmi_loss(logits, labels, num_classes=3, options=opts).item() == expected.item()
    assert rmi_loss(logits, labels, backend="torch", radius=2, report=CholeskyReport()).item() == expected.item()
    assert RMILoss(3, backend="torch", radius=2)(logits, labels).item() == expected.item()
    with pytest.raises(ValueError, match="4"):
        rmi_loss(logits, labels, num_classes=4, options=opts)
    with pytest.raises(TypeError, match="either options"):
        rmi_loss(logits, labels, options=opts, radius=2)
    full = RMIOptions(backend="torch", radius=2, pool="max", exclude_ignored=True, class_weights=[1.0, 2.0, 0.5],
                      class_reduction="mean", rmi_weight=0.3, combine="additive", validate=False)
    module = RMILoss.from_options(full, num_classes=3)  # the module of an RMIOptions: every field
    assert module.options == full and module.num_classes == 3
    assert module(logits, labels).item() == rmi_loss(logits, labels, options=full).item()
    with pytest.raises(TypeError, match="options must be an RMIOptions, got dict"):
        RMILoss.from_options({"radius": 2})


def test_no_grad_for_labels_and_works_without_grad():
    logits, labels = random_inputs(1, 2, 20, 20, seed=11)
    with torch.no_grad():
        value = _torch(logits, labels)
    assert value.requires_grad is False and torch.isfinite(value)
