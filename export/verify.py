"""`verify_onnx`: an exported model is valid ONNX, inference-only, and computes what PyTorch does."""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from torch import nn

from .base import DEFAULT_ATOL, DEFAULT_RTOL, require
from .errors import ExportError
from .graph import GraphSummary, summarize, training_leftovers
from .network import eval_mode, find_network
from .onnx_export import META_INPUT_SPEC
from .shapes import DIM_NAMES, DimRule, InputSpec, format_shape

# Two ordinary sizes of different batch, plus a tiny odd one: at 8x8 every
# network's deepest feature map is 1x1, the corner case torch's decompositions
# special-case (see `onnx_export._runtime_checks`).
DEFAULT_SIZES: Tuple[Tuple[int, int, int, int], ...] = ((1, 3, 128, 160), (2, 3, 96, 96), (1, 3, 8, 8))
LATENCY_SIZE = (1, 3, 256, 256)


class VerificationError(ExportError):
    """The exported graph is invalid, holds training pieces, or disagrees with PyTorch.

    ``report`` holds what was measured up to the failure (None if nothing ran).
    """

    def __init__(self, message: str, report: Optional["VerifyReport"] = None):
        super().__init__(message)
        self.report = report


@dataclass
class VerifyReport:
    """What `verify_onnx` checked and measured (JSON-serialisable with `to_dict`)."""

    path: str
    opset: int
    node_count: int
    op_histogram: Dict[str, int]
    parameter_count: int
    parameter_bytes: int
    file_bytes: int
    inputs: List[str]
    outputs: List[str]
    input_sizes: str  # the rule the graph's metadata states
    check_model: str  # "passed (full_check=True)"
    training_leftovers: List[str]
    atol: float
    rtol: float
    max_abs_diff: Dict[str, float]  # "NxCxHxW" -> max |onnxruntime - PyTorch|
    max_abs_logit: Dict[str, float]  # "NxCxHxW" -> max |PyTorch logit|, the scale rtol applies to
    tolerance: Dict[str, float]  # "NxCxHxW" -> atol + rtol * max_abs_logit, the bound the diff was held to
    latency_size: str
    latency_median_ms: float
    latency_runs: int
    latency_warmup: int
    onnxruntime_threads: int
    passed: bool
    seconds: float
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """`onnx.load` with a clear error for a missing or unreadable file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExportError(f"ONNX model {path!r} does not exist")
    try:
        model = onnx.load(path)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ExportError(f"{path!r} is not a readable ONNX model: {type(err).__name__}: {err}") from None
    if not model.opset_import or not model.graph.output:  # protobuf reads many short files as an empty message
        raise ExportError(f"{path!r} is not an ONNX model (no opset and no graph outputs in it)")
    return model


def input_spec_of(model: onnx.ModelProto) -> InputSpec:
    """The accepted sizes: from our metadata, else read off the graph input (fixed vs symbolic dims)."""
    for prop in model.metadata_props:
        if prop.key == META_INPUT_SPEC:
            return InputSpec.from_json(prop.value)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return InputSpec(tuple(DimRule(name, fixed=d.dim_value) if d.HasField("dim_value") else DimRule(name)
                           for name, d in zip(DIM_NAMES, dims)))


def session(path: str | os.PathLike, threads: int = 0, spinning: bool = True):
    """An onnxruntime CPU session (threads=0: onnxruntime's default).

    ``spinning=False`` stops idle worker threads from busy-waiting after a run;
    needed when two sessions alternate, or each one's spinning pool slows the other.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; the graph optimizer's notes are noise here
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def random_image(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard-normal float32 input, reproducible from ``seed``."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def time_runs(sess, shape: Sequence[int], runs: int, warmup: int, seed: int = 0) -> List[float]:
    """Wall-clock milliseconds of ``runs`` session runs after ``warmup`` untimed ones."""
    feed = {sess.get_inputs()[0].name: random_image(shape, seed).numpy()}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _float32_error(network: nn.Module, image: torch.Tensor) -> str:
    """How far PyTorch float32 itself is from float64 on ``image``: tells rounding from a real mismatch.

    Runs a float64 copy (only when a comparison failed, since it is slow).
    """
    try:
        reference = copy.deepcopy(network).cpu().double()(image.double())
    except Exception as err:  # a network that cannot run in float64 just gets no hint
        return f"float64 reference unavailable: {type(err).__name__}"
    device = next(iter(network.parameters()), torch.empty(0)).device
    error = float((network(image.to(device)).cpu().double() - reference).abs().max())
    return f"PyTorch float32 itself differs from float64 by {error:.3g}"


def _check_structure(model: onnx.ModelProto, path: str) -> List[str]:
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise VerificationError(f"{path!r} fails onnx.checker.check_model(full_check=True): "
                                f"{str(err).splitlines()[0]}") from None
    leftovers = training_leftovers(model)
    if leftovers:
        raise VerificationError(f"{path!r} is not a pure inference graph: {'; '.join(leftovers[:5])}")
    return leftovers


def verify_onnx(path: str | os.PathLike, model: nn.Module, *,
                sizes: Optional[Sequence[Sequence[int]]] = None, atol: float = DEFAULT_ATOL,
                rtol: float = DEFAULT_RTOL, seed: int = 0, latency_size: Sequence[int] = LATENCY_SIZE,
                latency_runs: int = 10, latency_warmup: int = 3, threads: int = 0,
                display_path: Optional[str | os.PathLike] = None) -> VerifyReport:
    """Check an exported model against the PyTorch network it came from.

    1. ``onnx.checker.check_model(full_check=True)``;
    2. no loss / training-only nodes (`graph.training_leftovers`);
    3. onnxruntime (CPU) vs PyTorch eager (eval mode) on one random
       ``[N, 3, H, W]`` input per entry of ``sizes`` (seed ``seed + i``):
       max |difference| <= ``atol + rtol * max|PyTorch logit|`` at each size,
       a bound that grows with the logits as float32 rounding does (see
       `DEFAULT_RTOL`; ``rtol=0`` makes it a plain absolute tolerance).  Sizes
       default to `DEFAULT_SIZES`, or for a static graph to its one shape three
       times with different seeds;
    4. median onnxruntime latency at ``latency_size`` (a static graph's own
       shape) over ``latency_runs`` runs after ``latency_warmup``.

    ``display_path`` is how messages and the report name the file (default
    ``path``): a caller that verifies a staged copy before publishing it passes
    the path it will be published at.

    Raises:
        ExportError: a missing/unreadable file, a size the graph does not take
            (the message states the graph's size rule), or a negative or
            non-finite tolerance.
        VerificationError: checks 1-3 fail; ``.report`` has the measurements.
    """
    require(["onnxruntime"])  # before any work
    started = time.perf_counter()
    for label, value in (("atol", atol), ("rtol", rtol)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and value >= 0):
            raise ExportError(f"{label} must be a finite number >= 0, got {value!r}")
    path = os.fspath(path)
    shown = os.fspath(display_path) if display_path is not None else path
    proto = load_model(path)
    _check_structure(proto, shown)
    summary: GraphSummary = summarize(proto, path)
    spec = input_spec_of(proto)
    notes = []
    if sizes is None:
        if spec.dynamic:
            sizes = DEFAULT_SIZES
        else:
            fixed = spec.pick(DEFAULT_SIZES[0])
            sizes = (fixed,) * 3
            notes.append(f"static graph: compared at its one size {format_shape(fixed)} with three seeds")
    sizes = [tuple(int(n) for n in s) for s in sizes]
    if not sizes:
        raise ExportError("verify_onnx needs at least one input size")
    for shape in sizes:
        spec.check(shape)
    if not spec.dynamic:
        latency_size = spec.pick(latency_size)
    spec.check(latency_size)

    network = find_network(model)
    device = next(iter(network.parameters()), torch.empty(0)).device  # PyTorch runs where the weights are
    sess = session(path, threads)
    input_name = sess.get_inputs()[0].name
    diffs: Dict[str, float] = {}
    scales: Dict[str, float] = {}
    bounds: Dict[str, float] = {}
    failures = []
    with eval_mode(network), torch.no_grad():
        for i, shape in enumerate(sizes):
            key = format_shape(shape) + (f"#seed{seed + i}" if sizes.count(shape) > 1 else "")
            image = random_image(shape, seed + i)
            expected = network(image.to(device))
            if not isinstance(expected, torch.Tensor):
                raise ExportError(f"{type(network).__name__} in eval mode returned "
                                  f"{type(expected).__name__}, not a logits tensor")
            expected = expected.float().cpu()
            (got,) = sess.run(None, {input_name: image.numpy()})
            if got.shape != tuple(expected.shape):
                failures.append(f"shape {got.shape} != PyTorch {tuple(expected.shape)} at {key}")
                continue
            diffs[key] = float(np.abs(got - expected.numpy()).max())
            scales[key] = float(expected.abs().max())
            bounds[key] = atol + rtol * scales[key]
            if not math.isfinite(scales[key]):
                failures.append(f"PyTorch's own logits are not finite at {key}: nothing to compare against")
            elif not diffs[key] <= bounds[key]:  # also catches NaN
                failures.append(f"max abs diff {diffs[key]:.3g} > tolerance {bounds[key]:.3g} at {key} "
                                f"(atol {atol:g} + rtol {rtol:g} x logits reaching {scales[key]:.3g}; "
                                f"{_float32_error(network, image)})")
    latency = time_runs(sess, latency_size, latency_runs, latency_warmup, seed)
    report = VerifyReport(
        path=shown, opset=summary.opset, node_count=summary.node_count, op_histogram=summary.op_histogram,
        parameter_count=summary.parameter_count, parameter_bytes=summary.parameter_bytes,
        file_bytes=summary.file_bytes, inputs=summary.inputs, outputs=summary.outputs,
        input_sizes=spec.describe(), check_model="passed (full_check=True)", training_leftovers=[],
        atol=atol, rtol=rtol, max_abs_diff=diffs, max_abs_logit=scales, tolerance=bounds,
        latency_size=format_shape(latency_size),
        latency_median_ms=statistics.median(latency), latency_runs=latency_runs,
        latency_warmup=latency_warmup, onnxruntime_threads=sess.get_session_options().intra_op_num_threads,
        passed=not failures, seconds=time.perf_counter() - started, notes=notes)
    if failures:
        raise VerificationError(f"{shown!r}: onnxruntime disagrees with PyTorch: {'; '.join(failures)}", report)
    return report
