"""Bad input gets a clear ValueError / TypeError that names the problem."""

import re

import numpy as np
import pytest
import torch

from rmi_triton import RMILoss, RMIOptions, rmi_loss, rmi_terms

from helpers import random_inputs


@pytest.fixture
def good():
    return random_inputs(2, 3, 32, 32)


def test_logits_not_4d(good):
    logits, labels = good
    with pytest.raises(ValueError, match=r"logits must be 4-D \[N, C, H, W\]"):
        rmi_loss(logits[0], labels)


def test_labels_shape_mismatch(good):
    logits, labels = good
    with pytest.raises(ValueError, match=r"must have shape \[N, H, W\] = \[2, 32, 32\], got \[2, 16, 32\]"):
        rmi_loss(logits, labels[:, :16])
    with pytest.raises(ValueError, match=r"got \[2, 1, 32, 32\]: one label map an image, without a channel "
                                         r"dimension \(labels.squeeze\(1\)\)"):
        rmi_loss(logits, labels.unsqueeze(1))
    # logits at 1/8 of the labels' resolution (DeepLab's head) name the upsampling
    with pytest.raises(ValueError, match=r"got \[2, 256, 256\]: the loss takes logits at the labels' "
                                         r"resolution; upsample them first"):
        rmi_loss(logits, labels.repeat_interleave(8, 1).repeat_interleave(8, 2))
    # channels-last logits [N, H, W, C] (as a permuted network output or a numpy array comes)
    with pytest.raises(ValueError, match=r"the logits look channels-last, \[N, H, W, C\]; the loss takes "
                                         r"\[N, C, H, W\] \(logits.permute\(0, 3, 1, 2\)\)"):
        rmi_loss(logits.permute(0, 2, 3, 1), labels)


def test_sparse_tensors_are_named(good):
    logits, labels = good
    with pytest.raises(TypeError, match=r"logits must be a dense tensor, got layout torch.sparse_coo"):
        rmi_loss(logits.to_sparse(), labels)
    with pytest.raises(TypeError, match=r"labels must be a dense tensor, got layout torch.sparse_coo"):
        rmi_loss(logits, labels.to_sparse())


def test_one_channel_with_binary_labels_names_two_classes():
    """A single foreground logit with 0/1 masks, as binary BCE users feed it: the labels are class
    indices one-hot over C, so a binary task takes C = 2 -- said in the error."""
    logits, _ = random_inputs(2, 1, 32, 32)
    masks = (torch.rand(2, 32, 32) > 0.5).long()
    with pytest.raises(ValueError, match=r"outside \[0, 1\).*\[1\].*a binary task takes C = 2"):
        rmi_loss(logits, masks)
    assert torch.isfinite(rmi_loss(torch.cat([-logits, logits], 1), masks))


def test_repr_shows_every_option_that_changes_the_loss():
    assert repr(RMILoss()) == ("RMILoss(num_classes=None, radius=3, pool='avg', pool_size=4, pixel_loss='bce', "
                               "probs='sigmoid', rmi_weight=0.5, combine='weighted', backend='auto')")
    text = repr(RMILoss(3, ignore_index=0, exclude_ignored=True, class_weights=[1, 2, 3], class_reduction="mean",
                        validate=False))
    for part in ("ignore_index=0", "exclude_ignored=True", "class_weights=(1.0, 2.0, 3.0)",
                 "class_reduction='mean'", "validate=False"):
        assert part in text, text


def test_float_labels(good):
    logits, labels = good
    with pytest.raises(TypeError, match="labels must be int64, int32 or uint8, got torch.float32"):
        rmi_loss(logits, labels.float())
    with pytest.raises(TypeError, match="labels must be int64, int32 or uint8, got torch.int16"):
        rmi_loss(logits, labels.to(torch.int16))


def test_integer_logits(good):
    _, labels = good
    with pytest.raises(TypeError, match="logits must be float32, float16 or bfloat16"):
        rmi_loss(torch.zeros(2, 3, 32, 32, dtype=torch.int64), labels)


def test_non_tensor_input(good):
    logits, _ = good
    with pytest.raises(TypeError, match="must be torch.Tensor"):
        rmi_loss(logits, [[0]])


@pytest.mark.parametrize("value", [3, 7, -1, -5, 254])
def test_label_out_of_range(good, value):
    logits, labels = good
    labels = labels.clone()
    labels[1, 5, 7] = value
    with pytest.raises(ValueError, match=rf"outside \[0, 3\).*ignore_index=255.*{value}"):
        rmi_loss(logits, labels)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_label_range_check_can_be_skipped(good, backend, monkeypatch):
    """validate=False reads no label on the host (the check costs a device sync)."""
    import rmi_triton.validation as validation

    def read(*args):
        raise AssertionError("the label range was checked with validate=False")

    logits, labels = good
    expected = rmi_loss(logits, labels, backend=backend)
    monkeypatch.setattr(validation, "_check_label_range", read)
    assert torch.equal(rmi_loss(logits, labels, validate=False, backend=backend), expected)
    with pytest.raises(AssertionError, match="checked with validate=False"):  # where validate=True reads
        rmi_loss(logits, labels, backend=backend)


@pytest.mark.parametrize("where", ["label class", "other class", "ignored pixel"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits(good, bad, where):
    """Wherever it sits: the BCE's own pass does the check, so it must see every element."""
    logits, labels = good
    logits, labels = logits.clone(), labels.clone()
    labels[0, 2, 3] = 255 if where == "ignored pixel" else 1
    logits[0, 2 if where == "other class" else 1, 2, 3] = bad
    for options in ({}, {"pixel_loss": None}, {"pixel_loss": "ce", "probs": "softmax"}):
        with pytest.raises(ValueError, match="logits contain NaN or Inf"):
            rmi_loss(logits, labels, **options)


def test_num_classes_contradiction(good):
    logits, labels = good
    with pytest.raises(ValueError, match=r"logits have 3 classes \(dim 1\) but num_classes=5"):
        RMILoss(num_classes=5)(logits, labels)
    with pytest.raises(ValueError, match=r"num_classes must lie in \[1, "):
        RMILoss(num_classes=0)


@pytest.mark.parametrize("value, error", [(3.0, TypeError), ("3", TypeError), (True, TypeError), (0, ValueError)])
def test_num_classes_checked_in_every_front(good, value, error):
    logits, labels = good
    with pytest.raises(error, match="num_classes must"):
        RMILoss(num_classes=value)
    for front in (rmi_loss, rmi_terms):
        with pytest.raises(error, match="num_classes must"):
            front(logits, labels, num_classes=value)


def test_options_must_be_rmi_options(good):
    logits, labels = good
    with pytest.raises(TypeError, match="options must be an RMIOptions .* got dict"):
        rmi_loss(logits, labels, options={"radius": 3})


def test_numpy_numbers_are_taken_as_python_numbers(good):
    logits, labels = good
    opts = RMIOptions(radius=np.int64(3), pool_size=np.int32(4), ignore_index=np.uint8(255),
                      rmi_weight=np.float32(0.5), class_weights=np.array([1.0, 2.0, 0.5]),
                      exclude_ignored=np.bool_(False), validate=np.bool_(True))
    assert type(opts.radius) is int and type(opts.pool_size) is int and type(opts.ignore_index) is int
    assert opts.exclude_ignored is False and opts.validate is True  # (numpy's bools were refused)
    assert type(opts.rmi_weight) is float and opts.class_weights == (1.0, 2.0, 0.5)
    expected = rmi_loss(logits, labels, num_classes=3, class_weights=[1.0, 2.0, 0.5])
    assert torch.equal(rmi_loss(logits, labels, num_classes=np.int64(3), options=opts), expected)


def test_meta_tensors_are_refused(good):
    logits, labels = good
    with pytest.raises(ValueError, match="meta device"):
        rmi_loss(logits.to("meta"), labels.to("meta"))


def test_map_smaller_than_region():
    logits, labels = random_inputs(1, 2, 9, 40)
    with pytest.raises(ValueError, match=r"downsampled map is 3 x 11 .*smaller than the 5 x 5 region"):
        rmi_loss(logits, labels, radius=5)


@pytest.mark.parametrize("options, error, pattern", [
    ({"pool": "mean"}, ValueError, r"unknown pool 'mean': expected one of \('avg', 'max', 'interp', 'none'\)"),
    ({"pixel_loss": "focal"}, ValueError, "unknown pixel_loss 'focal'"),
    ({"probs": "tanh"}, ValueError, "unknown probs 'tanh'"),
    ({"class_reduction": "max"}, ValueError, "unknown class_reduction"),
    ({"combine": "mul"}, ValueError, "unknown combine"),
    ({"backend": "cuda"}, ValueError, "unknown backend"),
    ({"radius": 0}, ValueError, r"radius must lie in \[1, 10\], got 0"),
    ({"radius": 11}, ValueError, r"radius must lie in \[1, 10\]"),
    ({"radius": 2.5}, TypeError, "radius must be an int"),
    ({"pool_size": 9}, ValueError, r"pool_size must lie in \[1, 8\]"),
    ({"rmi_weight": -0.1}, ValueError, "rmi_weight must be finite and >= 0"),
    ({"rmi_weight": 1.5}, ValueError, r"rmi_weight must lie in \[0, 1\] with combine='weighted'"),
    ({"class_weights": [1.0, -1.0, 1.0]}, ValueError, "class_weights must be finite and >= 0"),
    ({"class_weights": "abc"}, TypeError, "class_weights must be a list, tuple, 1-D tensor or array"),
    ({"class_weights": {0: 1.0, 1: 2.0, 2: 3.0}}, TypeError, "class_weights must be a list.*got dict"),
    ({"class_weights": {1.0, 2.0, 3.0}}, TypeError, "class_weights must be a list.*got set"),
    ({"class_weights": [1.0, "a", 2.0]}, TypeError, "class_weights must be a sequence of real numbers"),
    ({"ignore_index": 2.0}, TypeError, "ignore_index must be an int"),
    ({"ignore_index": 2 ** 31}, ValueError, r"ignore_index must lie in \[-2147483648, 2147483647\]"),
    ({"ignore_index": 2 ** 64}, ValueError, "ignore_index must lie in"),
    ({"exclude_ignored": 1}, TypeError, "exclude_ignored must be True or False"),
    ({"validate": None}, TypeError, "validate must be True or False, got None"),
    ({"validate": "yes"}, TypeError, "validate must be True or False"),
    ({"rmi_weight": True}, TypeError, "rmi_weight must be a number"),
])
def test_unknown_option_values(options, error, pattern):
    with pytest.raises(error, match=pattern):
        RMILoss(**options)
    with pytest.raises(error, match=pattern):
        RMIOptions(**options)


def test_unknown_option_name(good):
    logits, labels = good
    with pytest.raises(TypeError, match="unknown option\\(s\\) 'radus'; the options are radius, pool"):
        rmi_loss(logits, labels, radus=3)


def test_class_weights_length(good):
    logits, labels = good
    with pytest.raises(ValueError, match="class_weights has 2 entries but logits have 3 classes"):
        rmi_loss(logits, labels, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="class_weights has 2 entries but num_classes=3"):
        RMILoss(3, class_weights=[1.0, 2.0])


@pytest.mark.parametrize("weights, named", [
    (["1", "2", "3"], "'1' in"), ([True, 1.0, 2.0], "True in"), (np.array(["a", "b", "c"]), "an array of <U1"),
    (torch.tensor([1 + 1j, 2, 3]), "a tensor of torch.complex64"), (torch.tensor([True, False, True]),
                                                                    "a tensor of torch.bool")])
def test_class_weights_that_are_not_real_numbers(weights, named):
    """float() took strings and bools, and a complex tensor lost its imaginary part with a warning."""
    with pytest.raises(TypeError, match=f"class_weights must .*real numbers, got {re.escape(named)}"):
        RMILoss(class_weights=weights)
    taken = RMILoss(class_weights=[np.float32(1.5), np.int64(2), torch.tensor(0.5)]).options.class_weights
    assert taken == (1.5, 2.0, 0.5)


def test_empty_batch():
    with pytest.raises(ValueError, match="must not be empty"):
        rmi_loss(torch.zeros(0, 3, 32, 32), torch.zeros(0, 32, 32, dtype=torch.long))


def test_class_weights_tensor_is_built_once_per_device_and_dtype():
    """Building it copies from host memory (on a GPU: a wait for the stream), so eager calls share one."""
    opts = RMIOptions(class_weights=[0.5, 2.0, 1.0])
    first = opts.weights_tensor(3, "cpu")
    assert first is opts.weights_tensor(3, torch.device("cpu"))
    assert first.dtype == torch.float64 and first.tolist() == [0.5, 2.0, 1.0]
    single = opts.weights_tensor(3, "cpu", dtype=torch.float32)
    assert single.dtype == torch.float32 and single is not first
    assert RMIOptions(class_weights=[0.5, 2.0, 1.0]).weights_tensor(3, "cpu") is first
    assert RMIOptions().weights_tensor(3, "cpu") is None


def test_class_weights_first_built_in_inference_mode_still_train():
    """An eval pass under torch.inference_mode (a trainer's sanity check) may build the shared
    class-weight tensor first; training afterwards saves it for backward."""
    weights = [0.25, 3.0, 1.5]
    logits, labels = random_inputs(1, 3, 20, 20, seed=21)
    loss_fn = RMILoss(class_weights=weights, backend="torch")
    with torch.inference_mode():
        loss_fn(logits, labels)
    x = logits.clone().requires_grad_()
    loss_fn(x, labels).backward()
    assert torch.isfinite(x.grad).all()
