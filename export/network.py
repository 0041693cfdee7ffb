"""Finding the inference network inside whatever the caller hands over.

Training code often exports what it holds: a wrapper with the network, the
loss and other training-only pieces, maybe behind `DistributedDataParallel`
or `torch.compile`.  Only the segmentation network belongs in an inference
graph, so it is dug out here; the loss (the RMI loss has no parameters) and
everything else stays behind.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from rmi_triton.loss import RMILoss
from rmi_triton.models import SegmentationModel

from .errors import ExportError

# Wrappers that hold the real module under one attribute: DistributedDataParallel
# and DataParallel use `.module`, torch.compile's OptimizedModule `._orig_mod`.
_WRAPPER_ATTRIBUTES = ("module", "_orig_mod")


def _is_loss(module: nn.Module) -> bool:
    return isinstance(module, (RMILoss, nn.modules.loss._Loss))


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile shells (any depth)."""
    while True:
        inner = next((getattr(module, a) for a in _WRAPPER_ATTRIBUTES
                      if isinstance(getattr(module, a, None), nn.Module)), None)
        if inner is None or inner is module:
            return module
        module = inner


def _segmentation_models(root: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The outermost SegmentationModel instances under ``root`` (not nested in one another)."""
    found: List[Tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if isinstance(module, SegmentationModel) and not any(
                name.startswith(prefix + ".") for prefix, _ in found):
            found.append((name, module))
    return found


def find_network(model: nn.Module) -> nn.Module:
    """The segmentation network to export, out of a network or a training wrapper.

    Order of preference: a `rmi_triton.models.SegmentationModel` (the model
    itself or the single one inside it); else, when the module holds loss
    modules, the single non-loss child that has parameters; else the module
    itself (any plain network mapping ``[N, 3, H, W]`` to ``[N, C, H, W]``).

    Raises:
        ExportError: not an nn.Module, or a wrapper whose network is ambiguous.
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    if isinstance(model, SegmentationModel):
        return model
    found = _segmentation_models(model)
    if len(found) == 1:
        return found[0][1]
    if len(found) > 1:
        names = ", ".join(repr(name) for name, _ in found)
        raise ExportError(f"{type(model).__name__} holds several segmentation networks ({names}); "
                          f"pass the one to export")
    if any(_is_loss(m) for m in model.modules()):
        candidates = [(name, _unwrap(child)) for name, child in model.named_children()
                      if not _is_loss(child) and any(True for _ in child.parameters())]
        if len(candidates) != 1:
            names = ", ".join(repr(name) for name, _ in candidates) or "none"
            raise ExportError(f"{type(model).__name__} holds a loss, and which child is the network is "
                              f"unclear (children with parameters: {names}); pass the network itself")
        return candidates[0][1]
    return model


def model_config(network: nn.Module) -> Optional[Dict[str, Any]]:
    """The `build_model` config of one of our networks (its ``build_config``: name, num_classes,
    backbone, output_stride, aux_head, BatchNorm settings other than the defaults), or None for
    a network `build_model` did not make."""
    config = getattr(network, "build_config", None)
    return dict(config) if isinstance(config, dict) else None


def _row_major_strides(shape) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@contextlib.contextmanager
def contiguous_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Hold every parameter and buffer of `module` in the contiguous layout for the block, and
    give each back its own tensor after. A channels_last network (a common GPU speed-up)
    otherwise traces into a graph whose sizes torch.export narrows (or refuses at batch 1)."""
    kept = []
    for owner in module.modules():
        for store in (owner._parameters, owner._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.stride() != _row_major_strides(tensor.shape):
                    # (not is_contiguous(): a 1 x 1 kernel in channels_last passes that test, yet
                    # its strides still make the convolution's output channels_last)
                    kept.append((tensor, tensor.data))
                    tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    try:
        yield module
    finally:
        for tensor, data in kept:
            tensor.data = data


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block; give back each one's own mode after.

    Submodules can differ (a frozen, eval-mode backbone in a training model),
    so the flags are restored one by one rather than with a single ``train()``.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
