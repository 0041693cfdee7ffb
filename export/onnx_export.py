"""`export_onnx`: the plain segmentation network to ONNX with the dynamo-based exporter."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import onnx
import torch
from torch import nn
from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

import rmi_triton
from rmi_triton.files import write_atomically

from .base import EXPORTING, require
from .errors import ExportError
from .files import check_writable
from .network import contiguous_weights, eval_mode, find_network, model_config
from .shapes import InputSpec, format_shape, free_dims, spec_from_program

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_EXAMPLE_SHAPE = (1, 3, 256, 256)
NO_LOSS_NOTE = ("inference graph holds no loss: the segmentation network alone, in eval mode; "
                "the loss and training-only modules were stripped before export")

# Metadata keys written into every exported model (ModelProto.metadata_props).
META_VERSION = "rmi_triton.version"
META_CONFIG = "rmi_triton.model_config"
META_INFERENCE = "rmi_triton.inference_only"
META_INPUT_SPEC = "rmi_triton.input_spec"
META_INPUT_RULE = "rmi_triton.input_sizes"
META_EXPORTER = "rmi_triton.exporter"
META_RUNTIME_CHECKS = "rmi_triton.torch_runtime_checks"


@dataclass
class ExportInfo:
    """What `export_onnx` did: where, how long, which sizes the graph takes."""

    path: str
    seconds: float
    opset: int
    dynamic: bool
    input_shape: str  # e.g. "[batch, 3, height, width], dynamic: ..."
    input_spec: InputSpec = field(repr=False)
    config: Optional[Dict[str, Any]] = None
    torch_parameter_count: int = 0
    runtime_checks: List[str] = field(default_factory=list)  # see `_runtime_checks`

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "seconds": round(self.seconds, 3), "opset": self.opset,
                "dynamic": self.dynamic, "input_shape": self.input_shape, "config": self.config,
                "torch_parameter_count": self.torch_parameter_count, "runtime_checks": self.runtime_checks}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's own chatter (internal FutureWarnings, "torchvision is not
    installed" registry notes), which says nothing about the model being exported."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _trace(network: nn.Module, example: torch.Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    """torch.export the network with batch/height/width free, narrowing only where it must.

    1. Free N/H/W with ordinary guards: succeeds for a network that takes any size.
    2. Else torch's suggested fixes (e.g. ``height = 8*_height``), applied once: a
       real size rule, which `spec_from_program` reads back and the graph states.
    3. Else free N/H/W with the guards deferred to runtime assertions: for guards
       that are no size rule but a code path torch's own decompositions picked
       (PSPNet: the matmul decomposition special-cases a pooled axis of length 1).
       ONNX carries no assertions, so they are recorded (`_runtime_checks`) and
       `verify_onnx` runs a tiny input that violates them.

    strict=False traces the Python forward as written; backed_size_oblivious
    keeps an example size of 1 from being baked in; both as torch.onnx.export
    does. Exporting here instead of inside torch.onnx.export lets us read the
    accepted sizes off the program; torch.onnx.export would narrow them silently.
    """
    if not dynamic:
        return torch.export.export(network, (example,), strict=False)

    def attempt(dims, deferred: bool) -> torch.export.ExportedProgram:
        return torch.export.export(network, (example,), dynamic_shapes=(dims,), strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=deferred)

    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        try:
            return attempt(free_dims(), deferred=False)
        except torch._dynamo.exc.UserError as err:
            violation = err
        try:
            refined = refine_dynamic_shapes_from_suggested_fixes(violation.msg, (free_dims(),))[0]
        except Exception:  # no suggestion torch can apply
            refined = None
        if refined is not None:
            try:
                return attempt(refined, deferred=False)
            except torch._dynamo.exc.UserError:
                pass
        try:
            return attempt(free_dims(), deferred=True)
        except Exception as err:
            raise ExportError(f"network does not export with dynamic batch/height/width: "
                              f"{_first_line(violation)}; then {_first_line(err)}") from None


TRACE_SIDE = 65  # a small example is traced again at a multiple of its size at least this large


def _trace_at(network: nn.Module, example: torch.Tensor, dynamic: bool):
    """-> (program, the example traced). A dynamic export of a small example can fail where
    the example's deepest maps are 1 x 1 (torch specialises a size of 1: PSPNet at output
    stride 16 below 17 pixels); the graph is dynamic, so it is traced again at the smallest
    multiple of the example's height and width that reaches TRACE_SIDE (a multiple keeps any
    divisibility the size had); `export_onnx` then checks that the graph takes the example's
    own size."""
    try:
        return _trace(network, example, dynamic), example
    except ExportError:
        h, w = example.shape[-2:]
        if not dynamic or min(h, w) >= TRACE_SIDE:
            raise
        larger = torch.randn(*example.shape[:2], h * -(-TRACE_SIDE // h), w * -(-TRACE_SIDE // w),
                             generator=torch.Generator().manual_seed(0)).to(example.device)
        return _trace(network, larger, dynamic), larger


def _runtime_checks(program: torch.export.ExportedProgram) -> List[str]:
    """The size assertions torch.export deferred to run time, as expressions.

    They come from torch's own decompositions choosing a code path (e.g. the
    matmul decomposition assumes a pooled axis longer than 1); ONNX does not
    carry them, so they are recorded in the metadata and `verify_onnx`'s
    default sizes include a tiny input that falls outside them.
    """
    prefix = "Runtime assertion failed for expression "
    checks = []
    for node in program.graph.nodes:
        if node.target is torch.ops.aten._assert_scalar.default and len(node.args) > 1:
            text = str(node.args[1])
            text = text[len(prefix):] if text.startswith(prefix) else text
            checks.append(text.split(" on node ")[0])
    return sorted(set(checks))


def _rename_dims(proto: onnx.ModelProto, spec: InputSpec) -> None:
    """Give the image input's symbolic dims our names everywhere in the graph.

    The exporter names derived sizes after internal symbols ("8*s56"); the
    output and intermediate shapes reuse the same strings, so one mapping
    renames them consistently.
    """
    graph = proto.graph
    mapping = {}
    for rule, dim in zip(spec.dims, graph.input[0].type.tensor_type.shape.dim):
        if rule.fixed is None and dim.HasField("dim_param"):
            mapping[dim.dim_param] = rule.onnx_name
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def _set_metadata(proto: onnx.ModelProto, entries: Dict[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: Optional[int] = None,
                dynamic: bool = True, example_shape: Optional[Sequence[int]] = None,
                config: Optional[Dict[str, Any]] = None) -> ExportInfo:
    """Export the segmentation network inside ``model`` to an ONNX file.

    Args:
        model: a network mapping ``[N, 3, H, W]`` to logits ``[N, C, H, W]``, or a
            training wrapper holding one (plus loss, DDP, ...); see `find_network`.
        path: output file; written atomically (nothing is left on failure).
        opset: ONNX opset (default: the exporter's recommended one).
        dynamic: batch, height and width symbolic (True) or fixed to ``example_shape``.
        example_shape: ``[N, 3, H, W]`` used for tracing (default 1x3x256x256);
            the graph's only size when ``dynamic=False``. A dynamic export that fails
            at a small example is traced again at a multiple of its size (`_trace_at`).
        config: the network's build config for the metadata (default: read off
            the network when it is one of `rmi_triton.models`).

    Returns:
        `ExportInfo`. The graph has one input "image" and one output "logits".

    Raises:
        ExportError: unwritable ``path`` (checked before any work), a module the
            network cannot be found in, or a failing export.
    """
    require(EXPORTING)  # onnxscript: before the trace (the converter failed on it after)
    path = check_writable(path)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not (isinstance(opset, int) and 7 <= opset <= newest):
        raise ExportError(f"opset must be an int from 7 to {newest} (this onnx's newest); got {opset!r}")
    shape = tuple(int(n) for n in (example_shape or DEFAULT_EXAMPLE_SHAPE))
    if len(shape) != 4 or min(shape) < 1:
        raise ExportError(f"example_shape must be [N, C, H, W] with sizes >= 1; got {shape}")
    network = find_network(model)
    dtypes = {t.dtype for t in network.parameters() if t.is_floating_point()}
    if dtypes - {torch.float32}:  # the graph takes a float32 image (the example below is one)
        raise ExportError(f"export_onnx takes a float32 network; {type(network).__name__}'s weights are "
                          f"{', '.join(sorted(str(d) for d in dtypes))}: export a float32 copy "
                          f"(copy.deepcopy(network).float())")
    config = config if config is not None else model_config(network)
    started = time.perf_counter()
    # Trace where the weights live (a model may sit on a GPU); the graph does not record the device.
    device = next(iter(network.parameters()), torch.empty(0)).device
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    with eval_mode(network), contiguous_weights(network), torch.no_grad(), _quiet_exporter():
        try:
            program, example = _trace_at(network, example, dynamic)
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(f"torch.export failed for {type(network).__name__} at "
                              f"{format_shape(shape)}: {_first_line(err)}") from None
        spec = spec_from_program(program) if dynamic else InputSpec.static(shape)
        if tuple(example.shape) != shape:
            spec.check(shape)  # traced at a multiple (`_trace_at`): the graph must still take the size asked for
        checks = _runtime_checks(program)
        try:
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset,
                                             input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                             external_data=False, verbose=False)
        except Exception as err:
            raise ExportError(f"ONNX conversion failed for {type(network).__name__}: {_first_line(err)}") from None
        proto = onnx_program.model_proto
    if len(proto.graph.output) != 1:
        raise ExportError(f"{type(network).__name__} in eval mode returns {len(proto.graph.output)} outputs; "
                          f"a segmentation network must return the logits alone")
    _rename_dims(proto, spec)
    metadata = {
        META_VERSION: rmi_triton.__version__,
        META_CONFIG: json.dumps(config, sort_keys=True) if config is not None else "unknown",
        META_INFERENCE: NO_LOSS_NOTE,
        META_INPUT_SPEC: spec.to_json(),
        META_INPUT_RULE: spec.describe(),
        META_EXPORTER: f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
    }
    if checks:
        metadata[META_RUNTIME_CHECKS] = "; ".join(checks) + " (torch-side only, not enforced by the graph)"
    _set_metadata(proto, metadata)
    opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and opset_used != opset:  # the exporter falls back silently otherwise
        raise ExportError(f"the exporter cannot produce opset {opset} for this network (it gave {opset_used}; "
                          f"ask for {opset_used} or newer)")
    write_atomically(path, proto.SerializeToString())
    return ExportInfo(path=path, seconds=time.perf_counter() - started, opset=int(opset_used),
                      dynamic=spec.dynamic, input_shape=spec.describe(), input_spec=spec, config=config,
                      torch_parameter_count=sum(p.numel() for p in network.parameters()),
                      runtime_checks=checks)
