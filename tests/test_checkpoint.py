"""Checkpoints: atomic writes, safe reads, clear errors."""

import functools
import os
import re

import pytest
import torch

from rmi_triton.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint, save_checkpoint
from rmi_triton.models import build_model

# module-wide fixtures: under pytest-xdist this file runs whole in one worker (conftest.WHOLE_FILES)

CONFIG = {"name": "deeplabv3plus", "num_classes": 3, "backbone": "resnet18", "output_stride": 16}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(**CONFIG).eval()


def test_round_trip_rebuilds_the_network(tmp_path, model):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model.state_dict(), CONFIG, iteration=7)
    payload = load_checkpoint(path)
    assert payload["iteration"] == 7 and payload["config"] == CONFIG
    rebuilt = build_from_checkpoint(path)
    x = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert not rebuilt.training
    assert rebuilt.aux_head is None  # CONFIG has no aux_head, as checkpoints written before it


def test_aux_head_checkpoint_rebuilds_with_its_head(tmp_path):
    torch.manual_seed(1)
    model = build_model("pspnet", 3, backbone="resnet18", aux_head=True).eval()
    path = tmp_path / "aux.pt"
    save_checkpoint(path, model.state_dict(), model.build_config)
    rebuilt = build_from_checkpoint(path)
    assert rebuilt.aux_head is not None and rebuilt.build_config == model.build_config
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))  # eval mode: the main logits alone
    aux_logits = rebuilt.train()(x)[1]
    assert aux_logits.shape == (2, 3, 40, 48)


def _with_running_statistics(model):
    """BatchNorm statistics away from (0, 1), so that eps shows in the logits."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(1e-3, 1e-2)
    return model.eval()


@pytest.mark.parametrize("build", [
    lambda: build_model("deeplabv3", 3, backbone="resnet18",
                        norm_layer=functools.partial(torch.nn.BatchNorm2d, eps=1e-3, momentum=0.01)),
    lambda: build_model("pspnet", 3, backbone="resnet18", bn_eps=1e-3, bn_momentum=None),
])
def test_batchnorm_settings_survive_the_checkpoint(tmp_path, build):
    """The config recorded no norm settings: a network of eps 1e-3 came back with 1e-5 layers and
    other logits (0.02 off at logits of 3; the export then verified against the wrong network)."""
    torch.manual_seed(2)
    model = _with_running_statistics(build())
    path = tmp_path / "bn.pt"
    save_checkpoint(path, model.state_dict(), model.build_config)
    rebuilt = build_from_checkpoint(path)
    assert rebuilt.build_config == model.build_config and model.build_config["bn_eps"] == 1e-3
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert [(m.eps, m.momentum) for m in rebuilt.modules() if isinstance(m, torch.nn.BatchNorm2d)] == \
        [(m.eps, m.momentum) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_a_network_of_other_norm_layers_is_named_not_misloaded(tmp_path):
    """A GroupNorm network's checkpoint failed to load with 'missing backbone.bn1.running_mean...'."""
    model = build_model("deeplabv3", 3, backbone="resnet18", norm_layer=lambda c: torch.nn.GroupNorm(8, c))
    assert model.build_config["norm_layer"].startswith("GroupNorm(8, ")
    path = tmp_path / "gn.pt"
    save_checkpoint(path, model.state_dict(), model.build_config)
    with pytest.raises(CheckpointError, match=r"built with norm_layer GroupNorm\(8, .* cannot rebuild .* "
                                              r"build_model\(\.\.\., norm_layer=<the same>\)"):
        build_from_checkpoint(path)
    mixed = build_model("pspnet", 2, backbone="resnet18", norm_layer=lambda c: torch.nn.BatchNorm2d(
        c, eps=1e-3 if c > 256 else 1e-5))
    assert re.fullmatch(r"BatchNorm2d\(512, eps=0.001, .*\) beside BatchNorm2d\(64, eps=1e-05, .*\)",
                        mixed.build_config["norm_layer"])
    untracked = build_model("pspnet", 2, backbone="resnet18", norm_layer=lambda c: torch.nn.BatchNorm2d(
        c, track_running_stats=c < 256))  # the layer named is one no config rebuilds, not the first
    assert re.fullmatch(r"BatchNorm2d\(256, .*track_running_stats=False\)", untracked.build_config["norm_layer"])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_folder_or_an_onnx_model_is_named_for_what_it_is(tmp_path):
    """A run's --out folder was reported as a checkpoint that 'does not exist', an ONNX model
    as a 'corrupt or truncated' one."""
    with pytest.raises(FileNotFoundError, match="is a folder, not a checkpoint file .*last.pt"):
        load_checkpoint(tmp_path)
    onnx_model = tmp_path / "rmi.onnx"
    onnx_model.write_bytes(b"\x08\x08\x12\x07pytorch")  # the opening of an ONNX protobuf
    with pytest.raises(CheckpointError, match="is an ONNX model, not a checkpoint"):
        load_checkpoint(onnx_model)


def test_wrapper_weights_are_named(tmp_path, model):
    """A DistributedDataParallel or torch.compile wrapper's state dict was saved without a
    word and refused later as 'unexpected module.backbone...'."""
    for prefix, advice in (("module.", "model.module.state_dict()"), ("_orig_mod.", "model._orig_mod.state_dict()"),
                           ("module._orig_mod.", "model.module._orig_mod.state_dict()")):  # compiled, then wrapped
        wrapped = {prefix + k: v for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=re.escape(advice)):
            save_checkpoint(tmp_path / "ck.pt", wrapped, CONFIG)
        assert not (tmp_path / "ck.pt").exists()
        with pytest.raises(CheckpointError, match=re.escape(advice)):  # a file another tool wrote
            build_from_checkpoint({"config": CONFIG, "model": wrapped})


def test_truncated_file(tmp_path, model):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model.state_dict(), CONFIG)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_bytes_changed_after_saving_fail_the_checksum(tmp_path):
    """torch.load reads a torch.save archive without its CRC-32s: a tensor damaged on disk
    loaded as if intact (and --resume trained on with it)."""
    path = tmp_path / "ck.pt"
    weights = torch.arange(256, dtype=torch.float32) + 0.5
    save_checkpoint(path, {"w": weights}, CONFIG)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weights.numpy().tobytes())
    assert at > 0
    data[at + 40] ^= 0x01  # one bit of one weight: still a finite float
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupt: its entry \S+/data/0 fails its checksum"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this would create a file: the marker proves nothing ran."""

    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    _Payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"format": "rmi_triton.checkpoint", "version": 1, "model": {}, "config": CONFIG,
                "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused without running it") as refused:
        load_checkpoint(path)
    assert not marker.exists()
    # the reason names what the file would have run (its __reduce__ calls open); PyTorch's advice
    # to load it again with weights_only=False or to allowlist that, either of which would run
    # it, is not passed on
    message = str(refused.value)
    assert "it names io.open" in message
    assert not any(word in message for word in ("weights_only", "trust", "allowlist", "safe_globals"))


def test_foreign_or_incomplete_payloads(tmp_path, model):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="not an rmi_triton checkpoint"):
        load_checkpoint(path)
    torch.save({"format": "rmi_triton.checkpoint", "version": 1, "model": {}, "config": {"name": "x"}}, path)
    lacks = r"no usable model config: the model config lacks \['num_classes'"
    with pytest.raises(CheckpointError, match=lacks):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="config lacks"):
        save_checkpoint(path, {}, {"name": "deeplabv3"})


@pytest.mark.parametrize(
    "change, match",
    [
        ({"name": ["deeplabv3plus"]}, r"'name' must be of type str, got list \['deeplabv3plus'\]"),
        ({"num_classes": "3"}, r"'num_classes' must be of type int, got str '3'"),
        ({"num_classes": True}, r"'num_classes' must be of type int, got bool True"),
        ({"backbone": None}, r"'backbone' must be of type str, got NoneType None"),
        ({"output_stride": 16.0}, r"'output_stride' must be of type int, got float 16\.0"),
        ({"aux_head": "yes"}, r"'aux_head' must be of type bool, got str 'yes'"),
    ],
)
def test_config_of_the_wrong_type_is_refused_naming_the_key(tmp_path, model, change, match):
    path = tmp_path / "ck.pt"
    torch.save({"format": "rmi_triton.checkpoint", "version": 1, "model": model.state_dict(),
                "config": dict(CONFIG, **change)}, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=match):
        build_from_checkpoint(path)
    with pytest.raises(ValueError, match=match):  # and such a checkpoint is never written
        save_checkpoint(tmp_path / "new.pt", model.state_dict(), dict(CONFIG, **change))
    assert not (tmp_path / "new.pt").exists()


def test_config_that_is_not_a_dict(tmp_path, model):
    path = tmp_path / "ck.pt"
    torch.save({"format": "rmi_triton.checkpoint", "version": 1, "model": model.state_dict(),
                "config": ["deeplabv3plus", 3]}, path)
    with pytest.raises(CheckpointError, match="the model config is a list, not a dict"):
        load_checkpoint(path)


def test_non_finite_weights_are_refused_naming_them(tmp_path, model):
    """A checkpoint with NaN/Inf weights would train or export garbage with no error until
    much later (the trainer never writes one; another tool might)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["classifier.weight" if "classifier.weight" in state else next(iter(state))].view(-1)[0] = float("nan")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    path = tmp_path / "nan.pt"
    save_checkpoint(path, state, CONFIG)
    with pytest.raises(CheckpointError, match=f"non-finite .*weights in {bad[0]}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="non-finite"):
        build_from_checkpoint(path)


def test_a_state_that_load_would_refuse_is_never_saved(tmp_path):
    with pytest.raises(ValueError, match="the model state must be a dict of tensors"):
        save_checkpoint(tmp_path / "x.pt", {"a": 1}, CONFIG)
    assert not (tmp_path / "x.pt").exists()


def test_a_payload_without_config_or_weights_is_named(model):
    with pytest.raises(CheckpointError, match="no usable model config"):
        build_from_checkpoint({"model": model.state_dict()})
    with pytest.raises(CheckpointError, match="no model state dict"):
        build_from_checkpoint({"config": CONFIG})


def test_weights_that_do_not_fit(tmp_path, model):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model.state_dict(), dict(CONFIG, num_classes=5))
    with pytest.raises(CheckpointError, match="do not fit"):
        build_from_checkpoint(path)
    save_checkpoint(path, model.state_dict(), dict(CONFIG, name="unet"))
    with pytest.raises(CheckpointError, match="cannot be built"):
        build_from_checkpoint(path)


def test_crash_during_save_keeps_the_previous_file(tmp_path, model, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model.state_dict(), CONFIG, iteration=1)
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model.state_dict(), CONFIG, iteration=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind


def test_saved_file_has_ordinary_permissions(tmp_path, model):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model.state_dict(), CONFIG)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
