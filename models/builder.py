"""``build_model``: segmentation network by name, plus SyncBatchNorm conversion."""

from __future__ import annotations

import functools
import math
import numbers
import operator
import os
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import numpy as np
from torch import nn

from .common import SegmentationModel
from .deeplab import DeepLabV3, DeepLabV3Plus
from .pspnet import PSPNet
from .resnet import BACKBONES, NormLayer, build_resnet, check_choice, check_output_stride

_MODELS: Dict[str, Type[SegmentationModel]] = {
    "deeplabv3": DeepLabV3,
    "deeplabv3plus": DeepLabV3Plus,
    "pspnet": PSPNet,
}

MODEL_NAMES: Tuple[str, ...] = tuple(_MODELS)
BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # nn.BatchNorm2d's defaults, build_model's norm layers by default


def _python_int(value):
    """numpy's integers (a config read with numpy, a class count from np.unique) as Python ints,
    which the build config, and a checkpoint of it, hold; anything else as it is, for the checks
    to name."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return operator.index(value)
    return value


def build_model(
    name: str,
    num_classes: int,
    backbone: str = "resnet101",
    output_stride: int = 16,
    pretrained: Optional[Union[str, os.PathLike]] = None,
    norm_layer: Optional[NormLayer] = None,
    sync_bn: bool = False,
    aux_head: bool = False,
    bn_eps: float = BN_EPS,
    bn_momentum: Optional[float] = BN_MOMENTUM,
) -> SegmentationModel:
    """Build a segmentation network.

    Args:
        name: one of :data:`MODEL_NAMES` (``"deeplabv3"``, ``"deeplabv3plus"``,
            ``"pspnet"``).
        num_classes: number of output channels (classes), >= 1.
        backbone: one of :data:`BACKBONES` (``"resnet18"`` .. ``"resnet101"``).
        output_stride: 16 (dilate ``layer4``) or 8 (dilate ``layer3`` and ``layer4``).
        pretrained: optional path to a local torchvision-format ImageNet state
            dict for the backbone (``fc.*`` keys ignored); nothing is downloaded.
        norm_layer: callable ``channels -> nn.Module`` used for every norm
            layer (default ``nn.BatchNorm2d``).
        sync_bn: use ``nn.SyncBatchNorm`` everywhere (it synchronises the batch
            statistics across an initialised ``torch.distributed`` process group;
            without one it normalises like plain BatchNorm);
            cannot be combined with ``norm_layer``.
        aux_head: add an auxiliary classifier on ``layer3``; in training mode
            ``forward`` then returns ``(logits, aux_logits)``.
        bn_eps, bn_momentum: the BatchNorm layers' eps and momentum (None: a
            cumulative average), e.g. 1e-3 for weights trained that way;
            cannot be combined with ``norm_layer``, whose layers set their own.

    Returns:
        A module mapping ``[N, 3, H, W]`` to logits ``[N, num_classes, H, W]``
        for any H, W; its ``build_config`` dict holds the arguments that
        rebuild it, ``build_model(**build_config)`` (but for norm layers of
        another kind, below), which checkpoints record
        (name, num_classes, backbone, output_stride, aux_head, and bn_eps and
        bn_momentum where they are not the defaults). A ``norm_layer`` whose
        layers are BatchNorm (or SyncBatchNorm) sharing one eps and momentum is
        recorded as those; any other (GroupNorm, ...) is code a checkpoint cannot
        hold: ``build_config["norm_layer"]`` then describes it, and
        `rmi_triton.checkpoint.build_from_checkpoint` says to build the network
        with that norm_layer and load the checkpoint's weights into it.

    Raises:
        TypeError: an argument of the wrong type: ``name``/``backbone`` not a
            str, ``num_classes``/``output_stride`` not an int (a float such as
            ``16.0`` or a bool is refused, not converted), ``sync_bn``/``aux_head``
            not a bool, ``pretrained`` not a path, ``norm_layer`` not callable
            (or the description a build_config keeps of one), ``bn_eps`` /
            ``bn_momentum`` not a number (or None for the momentum).
        ValueError: unknown ``name``/``backbone``, ``output_stride`` not 8 or
            16, ``num_classes`` < 1, both ``norm_layer`` and ``sync_bn`` (or
            ``bn_eps``/``bn_momentum``), ``bn_eps`` < 0 or not finite,
            ``bn_momentum`` outside [0, 1], or pretrained weights that do not
            fit the backbone.
        FileNotFoundError: ``pretrained`` names no file.
    """
    check_choice("model", name, MODEL_NAMES)
    check_choice("backbone", backbone, BACKBONES)
    output_stride, num_classes = _python_int(output_stride), _python_int(num_classes)
    check_output_stride(output_stride)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(
            f"num_classes must be an int, got {type(num_classes).__name__} {num_classes!r}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for flag, value in (("sync_bn", sync_bn), ("aux_head", aux_head)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__} {value!r}")
    sync_bn, aux_head = bool(sync_bn), bool(aux_head)
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be a path (str or os.PathLike) or None, "
                        f"got {type(pretrained).__name__}")
    if norm_layer is not None and not callable(norm_layer):
        described = isinstance(norm_layer, str)  # e.g. a build_config's record of layers it cannot rebuild
        raise TypeError(f"norm_layer must be a callable channels -> nn.Module, got {type(norm_layer).__name__}"
                        + (f" {norm_layer!r} (a build_config describes norm layers it cannot rebuild so: pass "
                           "the callable that made them)" if described else ""))
    if sync_bn and norm_layer is not None:
        raise ValueError("pass either norm_layer or sync_bn=True, not both")
    _check_bn_settings(bn_eps, bn_momentum)
    if norm_layer is not None and (bn_eps, bn_momentum) != (BN_EPS, BN_MOMENTUM):
        raise ValueError("pass either norm_layer or bn_eps/bn_momentum, not both (norm_layer's layers "
                         "set their own)")

    if norm_layer is None:
        norm_layer = functools.partial(nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d, eps=bn_eps,
                                       momentum=bn_momentum)
    made: List[nn.Module] = []

    def recorded(channels: int) -> nn.Module:
        layer = norm_layer(channels)
        made.append(layer)
        return layer

    trunk = build_resnet(backbone, output_stride, recorded, pretrained)
    model = _MODELS[name](trunk, num_classes, norm_layer=recorded, aux_head=aux_head)
    # what rebuilds this network (checkpoints, export): the architecture, not the weights
    model.build_config = {"name": name, "num_classes": num_classes, "backbone": backbone,
                          "output_stride": output_stride, "aux_head": aux_head, **_norm_config(made)}
    return model


def _check_bn_settings(eps: Any, momentum: Any) -> None:
    for flag, value in (("bn_eps", eps), ("bn_momentum", momentum)):
        if (value is not None or flag == "bn_eps") and (isinstance(value, bool)
                                                         or not isinstance(value, numbers.Real)):
            raise TypeError(f"{flag} must be a number{' or None' if flag == 'bn_momentum' else ''}, "
                            f"got {type(value).__name__} {value!r}")
    if not (0 <= eps and math.isfinite(eps)):  # (BatchNorm takes 0: its variance alone then)
        raise ValueError(f"bn_eps must be a finite number >= 0, got {eps!r}")
    if momentum is not None and not 0 <= momentum <= 1:
        raise ValueError(f"bn_momentum must be in [0, 1] or None, got {momentum!r}")


def _norm_config(layers: List[nn.Module]) -> Dict[str, Any]:
    """The network's norm layers as `build_config` entries: none for BatchNorm2d's defaults;
    bn_eps and bn_momentum for BatchNorm layers (SyncBatchNorm: the same weights and the same
    inference) that share other ones; else a description under "norm_layer", which no
    config can rebuild (a checkpoint holds no code)."""
    def settings(layer: nn.Module):
        rebuildable = type(layer) in (nn.BatchNorm2d, nn.SyncBatchNorm) and layer.affine and layer.track_running_stats
        return (layer.eps, layer.momentum) if rebuildable else None

    found = [settings(layer) for layer in layers]
    if None not in found and len(set(found)) == 1:
        eps, momentum = found[0]
        return {} if (eps, momentum) == (BN_EPS, BN_MOMENTUM) else {"bn_eps": float(eps), "bn_momentum": (
            None if momentum is None else float(momentum))}
    # the first layer no config rebuilds, else the first whose settings differ from the first layer's
    odd = found.index(None) if None in found else next(i for i, s in enumerate(found) if s != found[0])
    return {"norm_layer": repr(layers[odd]) + ("" if None in found else f" beside {layers[0]!r}")}


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Return ``model`` with every BatchNorm layer replaced by ``nn.SyncBatchNorm``.

    Thin wrapper over ``nn.SyncBatchNorm.convert_sync_batchnorm`` (weights and
    running statistics are kept) for multi-GPU training where per-GPU batches
    are too small for reliable batch statistics.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
