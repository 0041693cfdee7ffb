"""``build_model``: segmentation network by name, plus SyncBatchNorm conversion."""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple, Type, Union

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


def build_model(
    name: str,
    num_classes: int,
    backbone: str = "resnet101",
    output_stride: int = 16,
    pretrained: Optional[Union[str, os.PathLike]] = None,
    norm_layer: Optional[NormLayer] = None,
    sync_bn: bool = False,
    aux_head: bool = False,
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

    Returns:
        A module mapping ``[N, 3, H, W]`` to logits ``[N, num_classes, H, W]``
        for any H, W; its ``build_config`` dict holds the arguments that
        rebuild it (name, num_classes, backbone, output_stride, aux_head).

    Raises:
        TypeError: an argument of the wrong type: ``name``/``backbone`` not a
            str, ``num_classes``/``output_stride`` not an int (a float such as
            ``16.0`` or a bool is refused, not converted), ``sync_bn``/``aux_head``
            not a bool, ``pretrained`` not a path, ``norm_layer`` not callable.
        ValueError: unknown ``name``/``backbone``, ``output_stride`` not 8 or
            16, ``num_classes`` < 1, both ``norm_layer`` and ``sync_bn``, or
            pretrained weights that do not fit the backbone.
        FileNotFoundError: ``pretrained`` names no file.
    """
    check_choice("model", name, MODEL_NAMES)
    check_choice("backbone", backbone, BACKBONES)
    check_output_stride(output_stride)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(
            f"num_classes must be an int, got {type(num_classes).__name__} {num_classes!r}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for flag, value in (("sync_bn", sync_bn), ("aux_head", aux_head)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__} {value!r}")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be a path (str or os.PathLike) or None, "
                        f"got {type(pretrained).__name__}")
    if norm_layer is not None and not callable(norm_layer):
        raise TypeError(f"norm_layer must be a callable channels -> nn.Module, "
                        f"got {type(norm_layer).__name__}")
    if sync_bn and norm_layer is not None:
        raise ValueError("pass either norm_layer or sync_bn=True, not both")

    if sync_bn:
        norm_layer = nn.SyncBatchNorm
    elif norm_layer is None:
        norm_layer = nn.BatchNorm2d
    trunk = build_resnet(backbone, output_stride, norm_layer, pretrained)
    model = _MODELS[name](trunk, num_classes, norm_layer=norm_layer, aux_head=aux_head)
    # what rebuilds this network (checkpoints, export): the architecture, not the weights
    model.build_config = {"name": name, "num_classes": num_classes, "backbone": backbone,
                          "output_stride": output_stride, "aux_head": aux_head}
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Return ``model`` with every BatchNorm layer replaced by ``nn.SyncBatchNorm``.

    Thin wrapper over ``nn.SyncBatchNorm.convert_sync_batchnorm`` (weights and
    running statistics are kept) for multi-GPU training where per-GPU batches
    are too small for reliable batch statistics.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
