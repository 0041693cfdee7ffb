"""ONNX export (dynamo exporter), verification against onnxruntime, comparison, CLI.

Exports take several seconds each on CPU, so every exported file is made once
per module (module-scoped fixtures) and shared by the tests that read it.
Networks are ResNet-18 with few classes and inputs are small.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rmi_triton import RMILoss  # noqa: E402
from rmi_triton.checkpoint import save_checkpoint  # noqa: E402
from rmi_triton.export import (  # noqa: E402
    ExportError,
    VerificationError,
    compare_exports,
    export_onnx,
    find_network,
    summarize,
    training_leftovers,
    verify_onnx,
)
from rmi_triton.export.__main__ import main  # noqa: E402
from rmi_triton.export.files import staged  # noqa: E402
from rmi_triton.models import build_model  # noqa: E402

# module-wide fixtures (the exported networks): under pytest-xdist this file runs whole in one worker
# (conftest.WHOLE_FILES)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

SIZES = [(1, 3, 128, 160), (2, 3, 96, 96)]
SMALL = (1, 3, 64, 64)  # latency size in tests: timing is reported, not judged, here
NUM_CLASSES = 4
MODELS = [(name, stride) for name in ("deeplabv3", "deeplabv3plus", "pspnet") for stride in (8, 16)]


def trained_like(model: nn.Module, seed: int, logit_scale: float = 8.0) -> nn.Module:
    """Give a fresh network the scale of a trained one (returned in eval mode).

    A fresh network's BN layers hold mean 0 / variance 1, so activations grow
    layer after layer and logits reach hundreds. float32 itself is then off by
    more than 1e-4 (PyTorch float32 vs float64 differ by ~4e-4 at logits of ~70:
    relative 1e-6 rounding), whatever ONNX Runtime does, and the tests below
    hold onnxruntime to 1e-4 absolute, stricter than `verify_onnx`'s default
    tolerance (which grows with the logits). So: running statistics measured
    on data (random images, cumulative average) keep the activations
    normalised, and the classifier is scaled so that logits reach
    ``logit_scale`` on a 128x160 image, the range of a trained network's logits.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64, generator=generator))
    for m in norms:
        m.momentum = 0.1
    model.eval()
    with torch.no_grad():
        peak = model(torch.randn(1, 3, 128, 160, generator=generator)).abs().max()
        model.head.classifier.weight.mul_(logit_scale / peak)
        model.head.classifier.bias.mul_(logit_scale / peak)
    return model


def make_model(name: str, stride: int, seed: int = 0, perturb: float = 0.0,
               aux_head: bool = False) -> nn.Module:
    """A resnet18 network at a trained network's scale; ``perturb`` adds noise to every weight first."""
    torch.manual_seed(seed)
    model = build_model(name, NUM_CLASSES, "resnet18", stride, aux_head=aux_head)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return trained_like(model, seed)


def config(name: str, stride: int) -> dict:
    return {"name": name, "num_classes": NUM_CLASSES, "backbone": "resnet18", "output_stride": stride}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def exports(workdir):
    """export(name, stride) -> (model, path, ExportInfo), each network exported once per module."""
    cache = {}

    def export(name: str, stride: int):
        if (name, stride) not in cache:
            model = make_model(name, stride)
            path = workdir / f"{name}-os{stride}.onnx"
            cache[name, stride] = model, path, export_onnx(model, path)
        return cache[name, stride]

    return export


@pytest.fixture(params=MODELS, ids=[f"{n}-os{s}" for n, s in MODELS])
def exported(request, exports):
    return exports(*request.param)


# ----------------------------------------------------------------- every network


def test_every_network_exports_and_matches_onnxruntime(exported):
    model, path, info = exported
    assert info.dynamic and info.opset >= 18 and info.seconds > 0
    report = verify_onnx(path, model, sizes=SIZES + [(1, 3, 8, 8)], latency_size=SMALL,
                         latency_runs=3, latency_warmup=1)
    assert report.passed and report.check_model.startswith("passed")
    assert set(report.max_abs_diff) == {"1x3x128x160", "2x3x96x96", "1x3x8x8"}
    assert max(report.max_abs_diff.values()) <= 1e-4, report.max_abs_diff
    assert report.outputs == [f"logits: float32[batch, {NUM_CLASSES}, height, width]"]
    assert report.inputs == ["image: float32[batch, 3, height, width]"]
    assert not {"Dropout", "BatchNormalization"} & set(report.op_histogram)
    assert report.latency_median_ms > 0 and report.latency_size == "1x3x64x64"
    json.loads(report.to_json())  # the report is JSON-serialisable as is
    proto = onnx.load(path)
    assert len(proto.graph.output) == 1 and training_leftovers(proto) == []
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["rmi_triton.model_config"])["name"] == info.config["name"]
    assert "no loss" in meta["rmi_triton.inference_only"]
    assert meta["rmi_triton.version"]
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp-")]  # no temp file left


def test_a_small_example_size_still_exports_dynamically(workdir):
    """PSPNet at output stride 16 traced at 9 x 5 has 1 x 1 deepest maps, where torch
    specialises; the exporter traces again at a multiple of that size and the graph takes
    the small size too (and any other)."""
    model = make_model("pspnet", 16)
    path = workdir / "pspnet-small-example.onnx"
    info = export_onnx(model, path, example_shape=(1, 3, 9, 5))
    assert info.dynamic and info.input_spec.check((1, 3, 9, 5)) is None
    report = verify_onnx(path, model, sizes=[(1, 3, 9, 5), (2, 3, 40, 33)], latency_size=(1, 3, 9, 5),
                         latency_runs=2, latency_warmup=1)
    assert report.passed and max(report.max_abs_diff.values()) <= 1e-4, report.max_abs_diff


def test_a_channels_last_network_exports_as_a_contiguous_one(workdir):
    """channels_last (a GPU speed-up) traced into a graph whose sizes torch.export narrowed
    (height, width >= 17 at batch 2) or refused at batch 1; the weights come back as they were."""
    model = make_model("deeplabv3plus", 16).to(memory_format=torch.channels_last)
    weights = {name: (p, p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    path = workdir / "deeplabv3plus-channels-last.onnx"
    info = export_onnx(model, path)  # batch 1
    assert info.dynamic and info.input_spec.check((1, 3, 8, 8)) is None
    for name, p in model.named_parameters():
        assert p is weights[name][0] and (p.data_ptr(), p.stride()) == weights[name][1:], name
    report = verify_onnx(path, model, sizes=[(2, 3, 8, 8), (1, 3, 37, 53)], latency_size=SMALL,
                         latency_runs=1, latency_warmup=0)
    assert report.passed and max(report.max_abs_diff.values()) <= 1e-4, report.max_abs_diff


def test_verify_reports_a_graph_that_is_not_the_model(exports):
    _, path, _ = exports("deeplabv3", 16)
    other = make_model("deeplabv3", 16, seed=5)  # same architecture, other weights
    with pytest.raises(VerificationError, match="onnxruntime disagrees with PyTorch") as caught:
        verify_onnx(path, other, sizes=[(1, 3, 32, 32)], latency_size=SMALL, latency_runs=1)
    assert "differs from float64" in str(caught.value)  # says whether float32 rounding could explain it
    report = caught.value.report
    assert report is not None and not report.passed and report.max_abs_diff["1x3x32x32"] > 1e-2


@pytest.fixture(scope="module")
def loud_export(workdir):
    """A correct export whose logits reach ~1e5 (the demo's network after two iterations does)."""
    model = make_model("deeplabv3", 16, seed=3)
    with torch.no_grad():
        model.head.classifier.weight.mul_(1e4)
        model.head.classifier.bias.mul_(1e4)
    path = workdir / "loud.onnx"
    export_onnx(model, path)
    return model, path


def test_verify_tolerance_grows_with_the_logits(loud_export):
    model, path = loud_export
    report = verify_onnx(path, model, sizes=SIZES, latency_size=SMALL, latency_runs=1)
    assert report.passed and (report.atol, report.rtol) == (1e-4, 1e-3)
    for key, diff in report.max_abs_diff.items():
        assert report.max_abs_logit[key] > 1e4
        assert report.tolerance[key] == pytest.approx(1e-4 + 1e-3 * report.max_abs_logit[key])
        assert 1e-4 < diff <= report.tolerance[key]  # float32 rounding that a fixed 1e-4 would refuse
    absolute_only = r"> tolerance 0\.0001 at 1x3x128x160 \(atol 0\.0001 \+ rtol 0 x"
    with pytest.raises(VerificationError, match=absolute_only):
        verify_onnx(path, model, sizes=SIZES[:1], rtol=0, latency_size=SMALL, latency_runs=1)
    with pytest.raises(ExportError, match="rtol must be a finite number >= 0, got -0.001"):
        verify_onnx(path, model, rtol=-1e-3)


def _align_corners(model, monkeypatch):
    def resize(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    for module in ("common", "deeplab"):
        monkeypatch.setattr(f"rmi_triton.models.{module}.resize_bilinear", resize)


# Faults an export could make, small ones included; each is put on the PyTorch side of
# the comparison, which cannot tell that from the same fault in the graph.
FAULTS = {
    "conv-weight-1%": lambda model, _: model.backbone.layer3[0].conv1.weight.mul_(1.01),
    "bias-of-one-class": lambda model, _: model.head.classifier.bias[0].add_(0.05),  # logits reach ~8
    "missing-relu": lambda model, _: setattr(model.backbone.layer4[1], "relu", nn.Identity()),
    "align-corners": _align_corners,
}


@pytest.mark.parametrize("fault", FAULTS)
def test_default_tolerance_still_catches_small_faults(exports, fault, monkeypatch):
    model, path, _ = exports("deeplabv3plus", 16)
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        FAULTS[fault](faulty, monkeypatch)
    with pytest.raises(VerificationError, match="onnxruntime disagrees with PyTorch"):
        verify_onnx(path, faulty, sizes=SIZES, latency_size=SMALL, latency_runs=1)


# ------------------------------------------------------- training wrapper / unwrap


class TrainingStep(nn.Module):
    """What a trainer holds: the network (here behind DataParallel) and the loss; forward gives the loss."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.model = nn.DataParallel(network)  # on CPU, a plain pass-through with a .module
        self.criterion = RMILoss(NUM_CLASSES)

    def forward(self, images, labels):
        return self.criterion(self.model(images), labels)


def test_training_wrapper_exports_the_bare_network(workdir, exports):
    model, bare, _ = exports("deeplabv3", 16)
    wrapped = workdir / "wrapped.onnx"
    step = TrainingStep(model).train()
    model.backbone.eval()  # a frozen trunk inside a training model keeps its own mode
    try:
        info = export_onnx(step, wrapped)
        # the caller's modes are back, module by module
        assert step.training and model.head.training and not model.backbone.training
    finally:
        model.eval()
    a, b = summarize(onnx.load(bare), bare), summarize(onnx.load(wrapped), wrapped)
    assert a.op_histogram == b.op_histogram and a.op_sequence == b.op_sequence
    assert a.parameter_count == b.parameter_count and a.initializer_shapes == b.initializer_shapes
    assert b.inputs == a.inputs and len(b.outputs) == 1
    assert info.config["name"] == "deeplabv3"
    report = verify_onnx(wrapped, step, sizes=[(1, 3, 40, 56)], latency_size=SMALL, latency_runs=2)
    assert report.passed


def test_find_network_unwraps_and_refuses_ambiguity():
    net = build_model("pspnet", 2, "resnet18", 16)
    assert find_network(nn.DataParallel(net)) is net
    assert find_network(TrainingStep(net)) is net

    class TwoNetworks(nn.Module):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = net, build_model("pspnet", 2, "resnet18", 16)

    with pytest.raises(ExportError, match="several segmentation networks"):
        find_network(TwoNetworks())

    class LossAndTwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.loss = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.CrossEntropyLoss()

    with pytest.raises(ExportError, match="unclear"):
        find_network(LossAndTwoConvs())


# ------------------------------------------------------------------ comparisons


def save_tiny_checkpoint(path, seed: int, name="deeplabv3", aux_head=False):
    """A 'trained' checkpoint: the architecture of ``name``, weights that differ with ``seed``."""
    model = make_model(name, 16, seed, perturb=0.01, aux_head=aux_head)  # as a different training run would
    save_checkpoint(path, model.state_dict(), model.build_config)
    return path


@pytest.fixture(scope="module")
def checkpoints(workdir):
    """Two checkpoints of one architecture with different weights, as two training runs leave."""
    return (save_tiny_checkpoint(workdir / "run-a.pt", 1),
            save_tiny_checkpoint(workdir / "run-b.pt", 2))


def test_checkpoints_of_one_architecture_export_to_identical_graphs(checkpoints):
    # Weights that differ (as a CE-trained and an RMI-trained network's would) give graphs equal
    # in all but weight values: the export depends on the architecture alone. That no trace of
    # the loss reaches the graph is test_training_wrapper_exports_the_bare_network's to show.
    run_a, run_b = checkpoints
    report = compare_exports(run_a, run_b, latency_size=SMALL, rounds=4, warmup=1)
    assert report.identical, report.mismatches
    assert report.mismatches == [] and report.op_histogram_diff == {}
    assert report.parameter_count[0] == report.parameter_count[1]
    assert report.latency_median_ms_a > 0 and report.latency_median_ms_b > 0
    assert report.latency_ratio_b_over_a == pytest.approx(
        report.latency_median_ms_b / report.latency_median_ms_a)
    assert report.sources == {"a": str(run_a), "b": str(run_b)}
    json.loads(report.to_json())


def test_compare_reports_different_architectures(exports):
    a, b = exports("deeplabv3", 16)[1], exports("pspnet", 16)[1]
    report = compare_exports(a, b, latency_size=SMALL, rounds=2, warmup=1)
    assert not report.identical
    text = " ".join(report.mismatches)
    assert "op histogram differs" in text and "MatMul 0 vs" in text  # PSPNet's pooling matmuls
    assert "MatMul" in report.op_histogram_diff and "ReduceMean" in report.op_histogram_diff
    assert "parameter count" in text


# --------------------------------------------------------- static and constrained


def test_static_export_takes_one_size_only(workdir, exports):
    model = exports("deeplabv3plus", 16)[0]
    path = workdir / "static.onnx"
    info = export_onnx(model, path, dynamic=False, example_shape=(1, 3, 64, 80))
    assert not info.dynamic
    dims = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 80]
    report = verify_onnx(path, model, latency_runs=2)  # the default: its one size, three seeds
    assert report.passed and len(report.max_abs_diff) == 3 and report.latency_size == "1x3x64x80"
    with pytest.raises(ExportError, match=r"2x3x96x96 is not a size this graph takes.*static"):
        verify_onnx(path, model, sizes=[(2, 3, 96, 96)])


class NeedsMultipleOf8(nn.Module):
    """A network that constrains its input: 8x8 patches are averaged (H, W multiples of 8)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        n, _, h, w = x.shape
        torch._check(h % 8 == 0)
        torch._check(w % 8 == 0)
        y = self.conv(x).reshape(n, 2, h // 8, 8, w // 8, 8).mean((3, 5))
        return F.interpolate(y, size=(h, w), mode="nearest")


def test_size_constraint_shows_in_graph_and_errors(workdir):
    model = NeedsMultipleOf8().eval()
    path = workdir / "multiple8.onnx"
    info = export_onnx(model, path, example_shape=(1, 3, 32, 48))
    assert info.config is None and info.input_spec.constrained
    proto = onnx.load(path)
    names = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert names == ["batch", "", "height_multiple_of_8", "width_multiple_of_8"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert "height a multiple of 8" in meta["rmi_triton.input_sizes"]
    assert meta["rmi_triton.model_config"] == "unknown"  # not one of rmi_triton.models
    report = verify_onnx(path, model, sizes=[(1, 3, 16, 24), (2, 3, 40, 8)], latency_size=(1, 3, 32, 32),
                         latency_runs=2)
    assert report.passed
    with pytest.raises(ExportError, match="height a multiple of 8"):
        verify_onnx(path, model, sizes=[(1, 3, 20, 24)])


def test_failed_export_leaves_nothing(workdir):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            if self.conv(x).sum() > 0:  # data-dependent branch: not traceable
                return x
            return -x

    folder = workdir / "broken"
    folder.mkdir()
    with pytest.raises(ExportError, match="Broken"):
        export_onnx(Broken().eval(), folder / "broken.onnx", example_shape=(1, 3, 8, 8))
    assert os.listdir(folder) == []


def test_unwritable_path_is_named_before_any_work(workdir):
    missing = workdir / "no-such-folder" / "m.onnx"
    with pytest.raises(ExportError, match="no-such-folder"):
        export_onnx(object(), missing)  # not even a module: the path is checked first
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(nn.Conv2d(3, 2, 1), workdir)


# -------------------------------------------------------- inference-only checks


def _tiny_graph(path, nodes, extra_outputs=()):
    """image -> nodes -> logits, as a hand-built ONNX file."""
    h = onnx.helper
    value = lambda name: h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, 2, 4, 4])  # noqa: E731
    graph = h.make_graph(nodes, "g", [value("image")], [value("logits"), *map(value, extra_outputs)])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 20)]), path)


def test_verify_refuses_logits_pytorch_cannot_give_finitely(workdir):
    # An infinite logit would make the tolerance infinite too; the comparison must not pass on that.
    class InfiniteCorner(nn.Module):
        def forward(self, x):
            y = x.clone()
            y[..., 0, 0] = float("inf")
            return y

    path = workdir / "identity.onnx"
    _tiny_graph(path, [onnx.helper.make_node("Identity", ["image"], ["logits"])])
    with pytest.raises(VerificationError, match="PyTorch's own logits are not finite at 1x2x4x4"):
        verify_onnx(path, InfiniteCorner(), sizes=[(1, 2, 4, 4)], latency_runs=1)


def test_training_leftovers_are_caught(workdir):
    h = onnx.helper
    path = workdir / "leftovers.onnx"
    _tiny_graph(path, [h.make_node("Dropout", ["image"], ["d"], name="head.dropout"),
                       h.make_node("Relu", ["d"], ["logits"], name="rmi_loss.relu"),
                       h.make_node("Identity", ["d"], ["loss"], name="loss_out")], extra_outputs=["loss"])
    problems = " | ".join(training_leftovers(onnx.load(path)))
    assert "op Dropout" in problems and "'rmi_loss.relu'" in problems
    assert "'loss' is named after the loss" in problems and "2 outputs" in problems
    with pytest.raises(VerificationError, match="not a pure inference graph"):
        verify_onnx(path, nn.Identity())
    clean = workdir / "clean.onnx"
    _tiny_graph(clean, [h.make_node("Relu", ["image"], ["logits"], name="permit_normalization")])
    assert training_leftovers(onnx.load(clean)) == []  # "rmi" inside a word is not the loss


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_run(workdir, checkpoints):
    run_a, run_b = checkpoints
    out = workdir / "cli" / "net.onnx"
    out.parent.mkdir()
    code = main([str(run_a), str(out), "--verify", "--atol", "2e-5", "--rtol", "5e-4",
                 "--compare", str(run_b), "--size", "64x64"])
    return code, out


def test_cli_exports_verifies_compares_and_writes_json(cli_run, capsys):
    code, out = cli_run
    assert code == 0 and out.is_file()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["verify"]["passed"] and max(report["verify"]["max_abs_diff"].values()) <= 1e-4
    assert (report["verify"]["atol"], report["verify"]["rtol"]) == (2e-5, 5e-4)
    assert report["verify"]["path"] == str(out)
    assert report["compare"]["identical"] and report["compare"]["latency_ratio_b_over_a"] > 0
    assert report["export"]["config"]["name"] == "deeplabv3"
    assert report["graph"]["op_histogram"] == report["verify"]["op_histogram"]
    assert sorted(os.listdir(out.parent)) == ["net.json", "net.onnx"]  # no staged files left


def _cli_error(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("rmi-export: error:"), err
    return err


def test_cli_missing_checkpoint(workdir, capsys):
    out = workdir / "e1.onnx"
    assert "does not exist" in _cli_error([workdir / "nope.pt", out], capsys)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_cli_truncated_checkpoint(workdir, checkpoints, capsys):
    data = checkpoints[0].read_bytes()
    bad = workdir / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    out = workdir / "e2.onnx"
    assert "corrupt or truncated" in _cli_error([bad, out], capsys)
    assert not out.exists()


class _Payload:
    """Unpickling this would create the marker file; a weights_only read must refuse it first."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_cli_refuses_pickled_objects_without_running_them(workdir, capsys):
    marker = workdir / "code-ran"
    bad = workdir / "pickled.pt"
    torch.save({"format": "rmi_triton.checkpoint", "version": 1, "model": _Payload(marker),
                "config": config("deeplabv3", 16)}, bad)
    out = workdir / "e3.onnx"
    assert "refused" in _cli_error([bad, out], capsys)
    assert not marker.exists() and not out.exists()


def test_cli_unknown_architecture(workdir, capsys):
    bad = workdir / "unknown.pt"
    save_checkpoint(bad, {"w": torch.zeros(1)}, dict(config("deeplabv3", 16), name="segformer"))
    out = workdir / "e4.onnx"
    err = _cli_error([bad, out], capsys)
    assert "cannot be built" in err and "segformer" in err
    assert not out.exists()


def test_cli_checkpoint_config_of_the_wrong_type(workdir, capsys):
    bad = workdir / "listname.pt"
    torch.save({"format": "rmi_triton.checkpoint", "version": 1, "model": {"w": torch.zeros(1)},
                "config": dict(config("deeplabv3", 16), name=["deeplabv3"])}, bad)
    out = workdir / "e7.onnx"
    assert "model config 'name' must be of type str, got list" in _cli_error([bad, out], capsys)
    assert not out.exists()


def test_cli_exports_an_aux_head_checkpoint_as_the_main_network(workdir, capsys):
    checkpoint = save_tiny_checkpoint(workdir / "aux.pt", 1, aux_head=True)
    out = workdir / "aux" / "net.onnx"
    out.parent.mkdir()
    assert main([str(checkpoint), str(out), "--verify", "--size", "64x64"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["export"]["config"]["aux_head"] is True and report["verify"]["passed"]
    assert report["graph"]["outputs"] == [f"logits: float32[batch, {NUM_CLASSES}, height, width]"]
    # inference never runs the aux head, so none of its weights is in the graph
    names = [init.name for init in onnx.load(out).graph.initializer]
    assert any(name.startswith("head.") for name in names)
    assert not any("aux" in name for name in names)


def test_cli_failed_verification_names_the_output_path(workdir, checkpoints, capsys):
    folder = workdir / "strict"
    folder.mkdir()
    out = folder / "net.onnx"
    # a zero tolerance fails on float32 rounding alone; the file checked is a staged copy of out
    args = [checkpoints[0], out, "--verify", "--atol", "0", "--rtol", "0", "--size", "64x64"]
    err = _cli_error(args, capsys)
    assert f"{str(out)!r}: onnxruntime disagrees with PyTorch" in err and "> tolerance 0 at" in err
    assert ".staged-" not in err
    assert os.listdir(folder) == []


@pytest.mark.parametrize("args, match", [
    (["--rtol", "1e-3"], "--atol and --rtol set the tolerance of --verify, which was not asked for"),
    (["--verify", "--atol", "-1"], "a tolerance must be a finite number >= 0, got '-1'"),
    (["--verify", "--rtol", "nan"], "a tolerance must be a finite number >= 0, got 'nan'"),
])
def test_cli_refuses_a_tolerance_it_cannot_use(workdir, checkpoints, capsys, args, match):
    out = workdir / "e8.onnx"
    assert match in _cli_error([checkpoints[0], out, *args], capsys)
    assert not out.exists()


def test_cli_unwritable_output_is_named_before_loading(workdir, capsys):
    out = workdir / "missing-folder" / "m.onnx"
    # the checkpoint does not exist either: the output is checked first
    assert "missing-folder" in _cli_error([workdir / "nope.pt", out], capsys)
    assert "is a directory" in _cli_error([workdir / "nope.pt", workdir], capsys)


def test_cli_never_writes_over_its_inputs(workdir, checkpoints, capsys):
    """OUT (or its report) on the checkpoint or the --compare file would replace an input: the
    trained weights would be gone. Refused before any work, the files untouched."""
    before = [pathlib.Path(c).read_bytes() for c in checkpoints]
    assert "is the checkpoint" in _cli_error([checkpoints[0], checkpoints[0]], capsys)
    linked = workdir / "linked.pt"
    linked.unlink(missing_ok=True)
    os.symlink(checkpoints[0], linked)  # the same file by another name
    assert "is the checkpoint" in _cli_error([checkpoints[0], linked], capsys)
    assert "is --compare" in _cli_error([checkpoints[0], checkpoints[1], "--compare", checkpoints[1]], capsys)
    report_of = workdir / "run-b"  # OUT 'run-b' writes its report to 'run-b.json'
    compare_json = workdir / "run-b.json"
    compare_json.write_bytes(before[1])
    assert "its report" in _cli_error([checkpoints[0], report_of, "--compare", compare_json], capsys)
    assert [pathlib.Path(c).read_bytes() for c in checkpoints] == before and not report_of.exists()


def test_compare_names_a_file_that_is_neither_checkpoint_nor_onnx(workdir, checkpoints, capsys, monkeypatch):
    """A short text file parses as an empty ONNX message: it is named, not a StopIteration,
    and before the export (which would take its time first)."""
    import rmi_triton.export.__main__ as cli

    def no_export(*a, **k):
        raise AssertionError("exported before --compare was checked")

    monkeypatch.setattr(cli, "export_onnx", no_export)
    notes = workdir / "notes.json"
    notes.write_text("{}\n")
    out = workdir / "e9.onnx"
    err = _cli_error([checkpoints[0], out, "--compare", notes, "--size", "32x32"], capsys)
    assert "is neither an rmi_triton checkpoint" in err and "is not an ONNX model" in err
    assert not out.exists()


def test_cli_refuses_an_opset_the_exporter_cannot_give(workdir, checkpoints, capsys):
    out = workdir / "e6.onnx"
    assert "opset must be an int from 7" in _cli_error([checkpoints[0], out, "--opset", "99"], capsys)
    assert not out.exists()


def test_staged_output_appears_only_on_success(workdir):
    target = workdir / "staged" / "model.onnx"
    target.parent.mkdir()
    with pytest.raises(RuntimeError):
        with staged(target) as tmp:
            pathlib.Path(tmp).write_bytes(b"half")
            raise RuntimeError("verification failed")
    assert os.listdir(target.parent) == []
    with staged(target) as tmp:
        pathlib.Path(tmp).write_bytes(b"whole")
    assert os.listdir(target.parent) == ["model.onnx"] and target.read_bytes() == b"whole"


def test_cli_compare_of_other_structures_exits_1(workdir, checkpoints, capsys):
    """It printed "same structure NO" and exited 0: a script could not tell."""
    other = workdir / "psp-for-compare.pt"
    save_tiny_checkpoint(other, seed=3, name="pspnet")
    out = workdir / "e10.onnx"
    assert main([str(checkpoints[0]), str(out), "--compare", str(other), "--size", "32x32"]) == 1
    printed = capsys.readouterr()
    assert "same structure" in printed.out and "NO" in printed.out and "differ in structure" in printed.err
    assert out.exists() and json.loads(out.with_suffix(".json").read_text())["compare"]["identical"] is False


def test_cli_leaves_nothing_staged_when_terminated(workdir, checkpoints, capsys, monkeypatch):
    """An export ended by SIGTERM (a scheduler's, `timeout`'s) left its staged model, a model's
    worth of disk each time; now it unwinds like an error. What a SIGKILL leaves goes once a
    day old; younger ones may be a live export's, verifying (removing those failed it)."""
    import signal

    import rmi_triton.export.__main__ as cli

    folder = workdir / "terminated"
    folder.mkdir()
    day_old = time.time() - 86400 - 60
    for name in (".staged-killed.onnx", ".staged-killed.json"):
        (folder / name).write_bytes(b"left by a SIGKILL")
        os.utime(folder / name, (day_old, day_old))
    hour_old = time.time() - 3600
    live = (".staged-verifying.onnx", ".staged-verifying.json", ".staged-notes.txt")
    for name in live:
        (folder / name).write_bytes(b"another export at work")
        os.utime(folder / name, (hour_old, hour_old))
    os.utime(folder / ".staged-notes.txt", (day_old, day_old))  # not the exporter's suffix

    def terminated(network, path, **kwargs):
        pathlib.Path(path).write_bytes(b"half an export")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM did not stop the export")

    monkeypatch.setattr(cli, "export_onnx", terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        main([str(checkpoints[0]), str(folder / "m.onnx"), "--size", "32x32"])
    assert stopped.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert sorted(os.listdir(folder)) == sorted(live)


@pytest.mark.parametrize("size", ["0x64", "64", "axb"])
def test_cli_refuses_a_size_no_network_takes(workdir, checkpoints, capsys, size):
    out = workdir / "e5.onnx"
    assert "size" in _cli_error([checkpoints[0], out, "--size", size], capsys)
    assert not out.exists()


_HIDE = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # as if not installed\n"


@pytest.mark.parametrize("hidden, argv, error", [
    (("onnx", "onnxruntime", "onnxscript"), [], "rmi_triton.export needs onnx, onnxscript, not installed"),
    (("onnxscript",), [], "rmi_triton.export needs onnxscript, not installed"),
    (("onnxruntime",), ["--verify"], "rmi_triton.export needs onnxruntime, not installed"),
    (("onnxruntime",), [], "checkpoint 'absent.pt' does not exist"),  # an export alone needs no onnxruntime
])
def test_without_the_export_extra_the_package_and_command_name_it(hidden, argv, error, tmp_path):
    """Without onnx, `import rmi_triton.export` and every `rmi-export` (--help too) ended in a
    traceback from a module-level `import onnx`; without onnxruntime, --verify's traceback exited
    with 1, which --compare uses for 'the graphs differ'."""
    import subprocess
    import sys

    script = _HIDE.format(names=hidden) + (
        "import rmi_triton.export\n"
        "try:\n"
        "    from rmi_triton.export import export_onnx\n"
        "    print('import: done')\n"
        "except ImportError as err:\n"
        "    print('import:', err)\n"
        "from rmi_triton.export.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n")

    def command(*args):
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)

    if "onnx" in hidden:  # --help needs none of the three (a process each: once is enough)
        helped = command("--help")
        assert helped.returncode == 0 and "usage: rmi-export" in helped.stdout, helped.stderr
    ran = command("absent.pt", "out.onnx", *argv)
    imported = ("import: rmi_triton.export needs onnx, onnxruntime, onnxscript, not installed here: pip install "
                "'rmi_triton[export]'") if "onnx" in hidden else "import: done"
    assert ran.stdout.splitlines()[0] == imported
    assert ran.returncode == 2 and ran.stderr.startswith(f"rmi-export: error: {error}")
    assert ran.stderr.count("\n") == 1 and ("needs" not in error or "pip install 'rmi_triton[export]'" in ran.stderr)
    assert not list(tmp_path.iterdir())


def test_an_onnx_that_is_installed_but_does_not_import_is_named(tmp_path):
    """A broken onnx install (a partial upgrade, a wheel for another Python) made `import
    rmi_triton.export` and every `rmi-export`, --help too, end in a traceback with exit 1."""
    import subprocess
    import sys

    broken = tmp_path / "site" / "onnx"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('onnx_cpp2py_export: undefined symbol')\n")
    script = (f"import sys\nsys.path.insert(0, {str(broken.parent)!r})\n"
              "import rmi_triton.export\n"
              "try:\n"
              "    rmi_triton.export.export_onnx\n"
              "except ImportError as err:\n"
              "    print('import:', err)\n"
              "from rmi_triton.export.__main__ import main\n"
              "print('help:', main(['--help']) if '--help' in sys.argv else '')\n"
              "sys.exit(main(['absent.pt', 'out.onnx']))\n")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    said = ("rmi_triton.export cannot import the ONNX packages installed here (ImportError: onnx_cpp2py_export: "
            "undefined symbol); reinstall them: pip install 'rmi_triton[export]'")
    assert ran.stdout.splitlines()[0] == f"import: {said}", ran.stderr
    assert ran.returncode == 2 and ran.stderr == f"rmi-export: error: {said}\n"
    helped = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert helped.returncode == 0 and "usage: rmi-export" in helped.stdout, helped.stderr


def test_verify_and_compare_name_onnxruntime_before_any_work(workdir, checkpoints, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    needs = r"needs onnxruntime, not installed here: pip install 'rmi_triton\[export\]'"
    with pytest.raises(ImportError, match=needs):
        verify_onnx(workdir / "never-written.onnx", make_model("pspnet", 16))
    with pytest.raises(ImportError, match=needs):
        compare_exports(checkpoints[0], checkpoints[1], workdir=workdir / "never-made")
    assert not (workdir / "never-made").exists()

def test_cli_an_unforeseen_error_is_one_line_and_exit_2(workdir, checkpoints, capsys, monkeypatch):
    """An error from torch or onnxruntime (e.g. --compare with a float16-input ONNX model) left a
    traceback and exit status 1, which --compare uses for 'the graphs differ'."""
    import rmi_triton.export.__main__ as cli

    def fails(*args, **kwargs):
        raise RuntimeError("Unexpected input data type.\n Actual: (tensor(float))")

    monkeypatch.setattr(cli, "export_onnx", fails)
    out = workdir / "e11.onnx"
    assert main([str(checkpoints[0]), str(out), "--size", "32x32"]) == 2
    assert capsys.readouterr().err == ("rmi-export: error: RuntimeError: Unexpected input data type. "
                                       "Actual: (tensor(float))\n")
    assert not out.exists()


def test_only_float32_networks_and_exportable_opsets(workdir):
    """A bfloat16 network failed inside torch.export with 'convert the input', which the caller of
    export_onnx cannot do; an opset the exporter cannot convert to was refused without the one to ask for."""
    model = build_model("pspnet", 2, backbone="resnet18").eval()
    with pytest.raises(ExportError, match=r"takes a float32 network; PSPNet's weights are torch.bfloat16: "
                                          r"export a float32 copy"):
        export_onnx(copy.deepcopy(model).to(torch.bfloat16), workdir / "bf16.onnx")
    with pytest.raises(ExportError, match=r"cannot produce opset 13 .*\(it gave (\d+); ask for \1 or newer\)"):
        export_onnx(model, workdir / "opset13.onnx", opset=13, example_shape=(1, 3, 32, 32))
    assert not (workdir / "bf16.onnx").exists() and not (workdir / "opset13.onnx").exists()
