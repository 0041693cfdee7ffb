"""`compare_exports`: the same network trained with two losses gives the same inference graph.

The RMI loss lives only in training: it has no parameters and nothing of it
is exported. So a network trained with RMI and one trained with plain
cross-entropy must export to graphs that differ in weight values alone; this
module shows that (op histogram, op sequence, node attributes, input/output
shapes, initializer count and shapes) and times both graphs interleaved
(A, B, A, B, ...) so that drift of the machine hits both alike.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import onnx

from .base import require
from .errors import ExportError
from .graph import GraphSummary, iter_nodes, summarize
from .shapes import format_shape
from .verify import LATENCY_SIZE, input_spec_of, load_model, random_image, session


@dataclass
class CompareReport:
    """Structural comparison and interleaved latency of two exported models."""

    path_a: str
    path_b: str
    identical: bool  # same structure; weights may differ
    mismatches: List[str]  # one line per difference, empty when identical
    node_count: Tuple[int, int]
    parameter_count: Tuple[int, int]
    op_histogram_a: Dict[str, int]
    op_histogram_diff: Dict[str, Tuple[int, int]]  # op -> (count in A, count in B), differing ops only
    inputs: Tuple[List[str], List[str]]
    outputs: Tuple[List[str], List[str]]
    latency_size: str
    rounds: int
    latency_median_ms_a: Optional[float]
    latency_median_ms_b: Optional[float]
    latency_ratio_b_over_a: Optional[float]
    sources: Dict[str, str] = field(default_factory=dict)  # checkpoint each model was exported from

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _attributes(node: onnx.NodeProto) -> Tuple:
    """A node's attributes without tensor payloads (a constant's values may be weights)."""
    items = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            items.append((attr.name, tuple(attr.t.dims), attr.t.data_type))
        elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            items.append((attr.name, "subgraph"))  # their nodes are compared through iter_nodes
        else:
            items.append((attr.name, str(onnx.helper.get_attribute_value(attr))))
    return tuple(sorted(items))


def structural_differences(a: onnx.ModelProto, sa: GraphSummary,
                           b: onnx.ModelProto, sb: GraphSummary) -> List[str]:
    """Each way the two graphs differ other than in weight values; [] when none."""
    out = []
    if sa.opset != sb.opset:
        out.append(f"opset {sa.opset} vs {sb.opset}")
    ops = sorted(set(sa.op_histogram) | set(sb.op_histogram))
    differing = [f"{op} {sa.op_histogram.get(op, 0)} vs {sb.op_histogram.get(op, 0)}" for op in ops
                 if sa.op_histogram.get(op, 0) != sb.op_histogram.get(op, 0)]
    if differing:
        out.append("op histogram differs: " + ", ".join(differing))
    if sa.op_sequence != sb.op_sequence:
        index = next((i for i, (x, y) in enumerate(zip(sa.op_sequence, sb.op_sequence)) if x != y),
                     min(len(sa.op_sequence), len(sb.op_sequence)))
        at = lambda seq: seq[index] if index < len(seq) else "<end>"  # noqa: E731
        out.append(f"node sequence differs first at node {index}: {at(sa.op_sequence)} vs "
                   f"{at(sb.op_sequence)} ({len(sa.op_sequence)} vs {len(sb.op_sequence)} nodes)")
    else:
        attrs = [i for i, (x, y) in enumerate(zip(iter_nodes(a), iter_nodes(b)))
                 if _attributes(x) != _attributes(y)]
        if attrs:
            out.append(f"node attributes differ at {len(attrs)} nodes, first node {attrs[0]} "
                       f"({sa.op_sequence[attrs[0]]})")
    if sa.inputs != sb.inputs:
        out.append(f"inputs {sa.inputs} vs {sb.inputs}")
    if sa.outputs != sb.outputs:
        out.append(f"outputs {sa.outputs} vs {sb.outputs}")
    if sa.parameter_count != sb.parameter_count:
        out.append(f"parameter count {sa.parameter_count} vs {sb.parameter_count}")
    shapes_a = [s for _, s in sa.initializer_shapes]
    shapes_b = [s for _, s in sb.initializer_shapes]
    if shapes_a != shapes_b:
        bad = next((i for i, (x, y) in enumerate(zip(shapes_a, shapes_b)) if x != y), None)
        where = (f"first at {sa.initializer_shapes[bad][0]!r}: {shapes_a[bad]} vs {shapes_b[bad]}"
                 if bad is not None else "in number")
        out.append(f"initializer shapes differ ({len(shapes_a)} vs {len(shapes_b)} initializers), {where}")
    return out


def _is_checkpoint(path: str) -> bool:
    """torch.save writes a zip archive; an ONNX model is a bare protobuf, never a zip."""
    return zipfile.is_zipfile(path)


def comparable(path: str | os.PathLike):
    """What ``path`` holds for a comparison: a checkpoint's payload (`load_checkpoint`), or
    None for an ONNX model. Raises `ExportError` (or `CheckpointError`) for a file that is
    neither, so a command line can check it before any other work."""
    from rmi_triton.checkpoint import load_checkpoint

    from .verify import load_model

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExportError(f"{path!r} does not exist")
    if _is_checkpoint(path):
        return load_checkpoint(path)
    try:
        load_model(path)
    except ExportError as err:
        raise ExportError(f"{path!r} is neither an rmi_triton checkpoint (a complete torch.save archive) "
                          f"nor an ONNX model ({err})") from None
    return None


def _as_onnx(path: str | os.PathLike, workdir: str, label: str, export_options: Dict[str, Any]) -> Tuple[str, str]:
    """``path`` itself if it is an ONNX model; else the checkpoint's network exported into workdir."""
    from rmi_triton.checkpoint import build_from_checkpoint

    from .onnx_export import export_onnx

    path = os.fspath(path)
    payload = comparable(path)
    if payload is None:
        return path, ""
    network = build_from_checkpoint(payload)
    target = os.path.join(workdir, f"{label}.onnx")
    export_onnx(network, target, config=dict(payload["config"]), **export_options)
    return target, path


def interleaved_latency(path_a: str, path_b: str, shape: Sequence[int], rounds: int,
                        warmup: int, threads: int = 0) -> Tuple[List[float], List[float]]:
    """Milliseconds per run of A and B, timed alternately A, B, A, B, ... on the same input."""
    import time

    # No spinning: an idle session's busy-waiting workers would steal the cores of the other.
    sessions = [session(path_a, threads, spinning=False), session(path_b, threads, spinning=False)]
    image = random_image(shape, 0).numpy()
    feeds = [{s.get_inputs()[0].name: image} for s in sessions]
    for _ in range(warmup):
        for s, feed in zip(sessions, feeds):
            s.run(None, feed)
    times: Tuple[List[float], List[float]] = ([], [])
    for _ in range(rounds):
        for k, (s, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - start) * 1e3)
    return times


def compare_exports(path_a: str | os.PathLike, path_b: str | os.PathLike, *,
                    latency_size: Sequence[int] = LATENCY_SIZE, rounds: int = 10, warmup: int = 2,
                    threads: int = 0, opset: Optional[int] = None, dynamic: bool = True,
                    example_shape: Optional[Sequence[int]] = None, workdir: Optional[str | os.PathLike] = None) -> CompareReport:
    """Compare two exported models (or two checkpoints, exported first) structurally and by speed.

    Args:
        path_a, path_b: ONNX files or rmi_triton checkpoints (told apart by content).
        latency_size: ``[N, 3, H, W]`` input timed on both (a static graph's own size
            when either graph is static).
        rounds: timed runs per model, interleaved A, B, A, B, ...; ``warmup`` untimed first.
        opset, dynamic, example_shape: `export_onnx` options for checkpoints.
        workdir: where checkpoint exports go (default: a temporary folder, removed after).

    Returns:
        `CompareReport`; ``identical`` is False and ``mismatches`` says how when the
        structures differ. Latency is measured whenever both graphs take the same input.
    """
    require()  # onnxruntime times them: named before any export
    with tempfile.TemporaryDirectory(prefix="rmi-compare-") as scratch:
        folder = os.fspath(workdir) if workdir is not None else scratch
        options = {"opset": opset, "dynamic": dynamic, "example_shape": example_shape}
        onnx_a, source_a = _as_onnx(path_a, folder, "a", options)
        onnx_b, source_b = _as_onnx(path_b, folder, "b", options)
        model_a, model_b = load_model(onnx_a), load_model(onnx_b)
        sa, sb = summarize(model_a, onnx_a), summarize(model_b, onnx_b)
        mismatches = structural_differences(model_a, sa, model_b, sb)

        spec_a, spec_b = input_spec_of(model_a), input_spec_of(model_b)
        shape = spec_b.pick(spec_a.pick(latency_size))
        medians: List[Optional[float]] = [None, None]
        try:
            spec_a.check(shape)
            spec_b.check(shape)
        except ExportError as err:
            mismatches.append(f"no common input size for timing: {err}")
        else:
            times = interleaved_latency(onnx_a, onnx_b, shape, rounds, warmup, threads)
            medians = [statistics.median(t) for t in times]
    ops = sorted(set(sa.op_histogram) | set(sb.op_histogram))
    return CompareReport(
        path_a=onnx_a if workdir is not None or not source_a else os.fspath(path_a),
        path_b=onnx_b if workdir is not None or not source_b else os.fspath(path_b),
        identical=not mismatches, mismatches=mismatches,
        node_count=(sa.node_count, sb.node_count), parameter_count=(sa.parameter_count, sb.parameter_count),
        op_histogram_a=sa.op_histogram,
        op_histogram_diff={op: (sa.op_histogram.get(op, 0), sb.op_histogram.get(op, 0)) for op in ops
                           if sa.op_histogram.get(op, 0) != sb.op_histogram.get(op, 0)},
        inputs=(sa.inputs, sb.inputs), outputs=(sa.outputs, sb.outputs),
        latency_size=format_shape(shape), rounds=rounds,
        latency_median_ms_a=medians[0], latency_median_ms_b=medians[1],
        latency_ratio_b_over_a=(medians[1] / medians[0]) if medians[0] else None,
        sources={k: v for k, v in (("a", source_a), ("b", source_b)) if v},
    )
