"""Reading an ONNX model: op histogram, parameters, shapes, and leftovers of training.

Everything here works on the `onnx.ModelProto` alone, so the same summary is
used by `verify_onnx` and by `compare_exports`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

import numpy as np
import onnx

# Op types that only a loss or its linear algebra would bring into a graph
# (the RMI loss: Cholesky / log-det; pixel terms: BCE / NLL / softmax-CE), and
# the ONNX training-domain ops. Lower-cased; matched exactly.
DENIED_OPS = frozenset({
    "softmaxcrossentropyloss", "negativeloglikelihoodloss", "binarycrossentropy",
    "cholesky", "det", "logdet", "slogdet", "inverse", "triangularsolve", "lu", "qr",
    "gradient", "momentum", "adam", "adagrad", "dropout",
})
# Substrings of op types that mark loss computations in any (custom) domain.
DENIED_OP_FRAGMENTS = ("loss", "crossentropy", "cholesky", "logdet", "likelihood")
TRAINING_DOMAIN = "ai.onnx.preview.training"
# Name tokens that betray the loss: node or value names are split on non-letters
# first, so "rmi" matches "rmi_loss.0" but not a word that merely contains it.
DENIED_NAME_TOKENS = ("loss", "rmi")
_TOKEN = re.compile(r"[a-z]+")


def op_key(node: onnx.NodeProto) -> str:
    """"Conv" for the default domain, "domain::Op" otherwise."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def iter_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node: the main graph, nested subgraphs (If/Loop/Scan) and local functions."""
    def walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                for sub in attr.graphs:
                    yield from walk(sub)

    yield from walk(model.graph)
    for function in model.functions:
        yield from function.node


def _shape_text(value: onnx.ValueInfoProto) -> str:
    dims = [d.dim_param if d.HasField("dim_param") else str(d.dim_value) if d.HasField("dim_value") else "?"
            for d in value.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return f"{value.name}: {dtype}[{', '.join(dims)}]"


@dataclass
class GraphSummary:
    """Structure and size of an ONNX model.

    ``op_sequence`` and ``initializer_shapes`` are kept for comparisons and
    left out of `to_dict` (they run to hundreds of entries).
    """

    opset: int
    node_count: int
    op_histogram: Dict[str, int]
    parameter_count: int  # elements of all initializers (BatchNorm is folded into Conv on export)
    parameter_bytes: int
    initializer_count: int
    inputs: List[str]
    outputs: List[str]
    file_bytes: int
    metadata: Dict[str, str]
    op_sequence: List[str] = field(repr=False, default_factory=list)
    initializer_shapes: List[Tuple[str, Tuple[int, ...]]] = field(repr=False, default_factory=list)

    def to_dict(self) -> Dict[str, object]:
        return {"opset": self.opset, "node_count": self.node_count, "op_histogram": self.op_histogram,
                "parameter_count": self.parameter_count, "parameter_bytes": self.parameter_bytes,
                "initializer_count": self.initializer_count, "inputs": self.inputs, "outputs": self.outputs,
                "file_bytes": self.file_bytes}


def summarize(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> GraphSummary:
    """Count ops, initializer elements/bytes, and describe inputs/outputs of ``model``."""
    nodes = list(iter_nodes(model))
    histogram = Counter(op_key(n) for n in nodes)
    count = size = 0
    shapes = []
    for init in model.graph.initializer:
        elements = int(np.prod(init.dims, dtype=np.int64))
        count += elements
        size += elements * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        shapes.append((init.name, tuple(int(d) for d in init.dims)))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return GraphSummary(
        opset=int(opset), node_count=len(nodes),
        op_histogram=dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        parameter_count=count, parameter_bytes=size, initializer_count=len(model.graph.initializer),
        inputs=[_shape_text(v) for v in model.graph.input], outputs=[_shape_text(v) for v in model.graph.output],
        file_bytes=os.path.getsize(path) if path is not None else model.ByteSize(),
        metadata={p.key: p.value for p in model.metadata_props},
        op_sequence=[op_key(n) for n in nodes], initializer_shapes=shapes,
    )


def _name_tokens(name: str) -> List[str]:
    return _TOKEN.findall(name.lower())


def training_leftovers(model: onnx.ModelProto) -> List[str]:
    """Everything in the graph that belongs to a loss or to training; [] when clean.

    Checks op types (denylist and fragments, training domain), BatchNormalization
    in training mode (training_mode=1 or the extra running-stat outputs), node,
    graph input/output names that mention the loss, and the graph's interface
    (one image input, one output).
    """
    problems = []
    for node in iter_nodes(model):
        kind = node.op_type.lower()
        if (node.domain == TRAINING_DOMAIN or kind in DENIED_OPS
                or any(fragment in kind for fragment in DENIED_OP_FRAGMENTS)):
            problems.append(f"op {op_key(node)} (node {node.name!r})")
        if node.op_type == "BatchNormalization":
            training = any(a.name == "training_mode" and a.i == 1 for a in node.attribute)
            if training or len([o for o in node.output if o]) > 1:
                problems.append(f"training-mode BatchNormalization (node {node.name!r})")
        names = [node.name, *node.output]
        if any(token in DENIED_NAME_TOKENS for name in names for token in _name_tokens(name)):
            problems.append(f"node {node.name!r} ({node.op_type}) is named after the loss")
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        if any(token in DENIED_NAME_TOKENS for token in _name_tokens(value.name)):
            problems.append(f"graph input/output {value.name!r} is named after the loss")
    if len(graph.input) != 1:
        problems.append(f"graph has {len(graph.input)} inputs (labels or targets?); expected the image alone")
    if len(graph.output) != 1:
        problems.append(f"graph has {len(graph.output)} outputs; expected the logits alone")
    return problems
