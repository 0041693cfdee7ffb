"""Pieces shared by the segmentation networks: conv blocks, upsampling,
the optional auxiliary head and the backbone-plus-decoder base class."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import NormLayer, ResNet, init_norm_as_identity


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm_layer: NormLayer,
    dilation: int = 1,
) -> nn.Sequential:
    """Conv (no bias: the norm layer has one) -> norm -> ReLU, size preserving.

    ``[N, in_channels, H, W]`` -> ``[N, out_channels, H, W]``.
    """
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size,
            padding=padding, dilation=dilation, bias=False,
        ),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    )


def resize_bilinear(x: Tensor, size: Union[Sequence[int], Tuple[int, int]]) -> Tensor:
    """Bilinear resize of ``[N, C, h, w]`` to ``[N, C, *size]`` (align_corners=False).

    ``size`` is taken from another tensor's ``shape[-2:]`` so it stays symbolic
    under ONNX export instead of being baked in as constants.
    """
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def check_image(x: Tensor, channels: int) -> None:
    """Raise unless ``x`` is a floating-point batch ``[N, channels, H, W]``.

    Without this check an integer image (uint8 straight from a decoder) or a
    single image without its batch dimension fails deep inside the first
    convolution with a message about scalar types or weight shapes.

    Raises:
        TypeError: ``x`` is not a tensor or not floating point.
        ValueError: ``x`` is not 4-D, has a channel count other than ``channels``,
            or has a size of 0.
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"expected an image batch tensor [N, {channels}, H, W], got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point image batch [N, {channels}, H, W], got dtype "
                        f"{x.dtype}; convert and normalise integer images first")
    if x.dim() != 4 or x.shape[1] != channels:
        hint = "; add the batch dimension (x[None]) for a single image" if x.dim() == 3 else ""
        raise ValueError(
            f"expected an image batch [N, {channels}, H, W], got shape {tuple(x.shape)}{hint}"
        )
    if min(x.shape) == 0:
        raise ValueError(f"expected a non-empty image batch [N, {channels}, H, W], got shape {tuple(x.shape)}")


def init_head_weights(module: nn.Module) -> None:
    """He init for the convolutions of a freshly built head; norms start as identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:
            init_norm_as_identity(m)


class AuxHead(nn.Sequential):
    """FCN-style auxiliary classifier on ``layer3`` (deep supervision, as in PSPNet).

    ``[N, in_channels, h, w]`` -> ``[N, num_classes, h, w]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm_layer: NormLayer,
        channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(
            conv_bn_relu(in_channels, channels, 3, norm_layer),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, kernel_size=1),
        )


class SegmentationModel(nn.Module):
    """Backbone + decode head, logits resized back to the input resolution.

    ``head`` maps the backbone's feature dict (see :class:`ResNet`) to
    low-resolution logits ``[N, num_classes, h, w]``.

    ``forward(x)`` with ``x`` a floating-point ``[N, 3, H, W]`` returns logits
    ``[N, num_classes, H, W]``; any other input raises (see :func:`check_image`).
    When built with ``aux_head=True`` the model has an extra classifier on
    ``layer3`` and, *in training mode only*, ``forward`` returns the pair
    ``(logits, aux_logits)`` (both ``[N, num_classes, H, W]``) so a trainer
    can add the auxiliary loss; in eval mode (inference, export) it always
    returns the single tensor.
    """

    def __init__(
        self,
        backbone: ResNet,
        head: nn.Module,
        num_classes: int,
        norm_layer: NormLayer,
        aux_head: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.aux_head: Optional[AuxHead] = None
        if aux_head:
            self.aux_head = AuxHead(backbone.channels["layer3"], num_classes, norm_layer)
            init_head_weights(self.aux_head)

    def forward(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        check_image(x, self.backbone.conv1.in_channels)
        weight = self.backbone.conv1.weight
        # (autocast converts float32 inputs to its dtype, but leaves float64 ones as they are)
        if x.dtype != weight.dtype and (x.dtype == torch.float64 or not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"image batch is {x.dtype} but the network's weights are {weight.dtype}: convert the "
                            f"input (x.to({weight.dtype})) or the network"
                            + ("" if x.dtype == torch.float64 else ", or run under torch.autocast"))
        size = x.shape[-2:]
        features = None
        try:
            features = self.backbone(x)
            head = self.head(features)
        except ValueError as err:
            if "Expected more than 1 value per channel when training" not in str(err):
                raise
            where = (f"the backbone (its feature maps shrink to 1 x 1 at {size[0]} x {size[1]})" if features is None
                     else "the head's global-pooling branch (ASPP's image pooling, PSP's 1 x 1 bin)")
            if not self.training:  # BatchNorm without running statistics normalises by the batch in eval too
                raise ValueError(
                    f"a batch of {x.shape[0]} image: {where} gives BatchNorm one value per channel, and its "
                    "BatchNorm layers keep no running statistics (track_running_stats=False), so they normalise "
                    "by the batch in eval mode too; pass 2 or more images, or build the network with "
                    "BatchNorm layers that track running statistics") from None
            raise ValueError(
                f"a batch of {x.shape[0]} image in training mode: {where} gives BatchNorm one value per "
                "channel, which it cannot normalise; train with 2 or more images a step (per process, "
                "unless SyncBatchNorm pools them), or put the BatchNorm layers in eval mode") from None
        logits = resize_bilinear(head, size)
        if self.aux_head is not None and self.training:
            aux = resize_bilinear(self.aux_head(features["layer3"]), size)
            return logits, aux
        return logits
