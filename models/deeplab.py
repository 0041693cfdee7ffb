"""DeepLabv3 (Chen et al. 2017) and DeepLabv3+ (Chen et al. 2018) heads and models."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from .common import SegmentationModel, conv_bn_relu, init_head_weights, resize_bilinear
from .resnet import NormLayer, ResNet, check_output_stride

# Atrous rates of the three 3x3 ASPP branches at output stride 16; at output
# stride 8 the feature map is twice as fine, so the rates double to cover the
# same image area.
ASPP_RATES_OS16: Tuple[int, int, int] = (6, 12, 18)


def aspp_rates(output_stride: int) -> Tuple[int, ...]:
    """ASPP atrous rates for ``output_stride`` 16 (6, 12, 18) or 8 (12, 24, 36)."""
    check_output_stride(output_stride)
    scale = 16 // output_stride
    return tuple(rate * scale for rate in ASPP_RATES_OS16)


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global context broadcast back to every pixel.

    ``[N, in_channels, h, w]`` -> ``[N, out_channels, h, w]``.  The norm layer
    sees a ``[N, C, 1, 1]`` input, so BatchNorm in training mode needs N >= 2.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        # mean over H, W exports as ReduceMean for any size (global pooling).
        pooled = self.relu(self.bn(self.conv(x.mean(dim=(2, 3), keepdim=True))))
        # Bilinear upsampling of a 1x1 map is a constant broadcast, so expand is
        # the same "upsample" without interpolation arithmetic.
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling.

    Branches: one 1x1 conv, one 3x3 conv per atrous rate, image pooling; each
    gives ``out_channels``.  They are concatenated and projected by 1x1
    conv -> norm -> ReLU -> dropout.
    ``[N, in_channels, h, w]`` -> ``[N, out_channels, h, w]``.
    """

    def __init__(
        self,
        in_channels: int,
        rates: Sequence[int],
        norm_layer: NormLayer,
        out_channels: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        branches = [conv_bn_relu(in_channels, out_channels, 1, norm_layer)]
        branches += [
            conv_bn_relu(in_channels, out_channels, 3, norm_layer, dilation=rate)
            for rate in rates
        ]
        self.branches = nn.ModuleList(branches)
        self.image_pool = ImagePooling(in_channels, out_channels, norm_layer)
        self.project = nn.Sequential(
            nn.Conv2d(out_channels * (len(rates) + 2), out_channels, kernel_size=1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.image_pool(x))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Head(nn.Module):
    """ASPP -> 3x3 conv (256) -> 1x1 classifier on ``layer4``.

    ``features["layer4"]`` ``[N, C4, h, w]`` -> logits ``[N, num_classes, h, w]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rates: Sequence[int],
        norm_layer: NormLayer,
        channels: int = 256,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, rates, norm_layer, channels)
        self.conv = conv_bn_relu(channels, channels, 3, norm_layer)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: Dict[str, Tensor]) -> Tensor:
        return self.classifier(self.conv(self.aspp(features["layer4"])))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on ``layer4`` plus a decoder that refines with ``layer1`` details.

    The low-level features (stride 4) are reduced to 48 channels so they do
    not outweigh the 256 ASPP channels; the ASPP output is upsampled to their
    size, concatenated, and refined by two 3x3 convs (256) before the 1x1
    classifier.  Output logits ``[N, num_classes, h1, w1]`` at ``layer1``'s size.
    """

    def __init__(
        self,
        in_channels: int,
        low_level_channels: int,
        num_classes: int,
        rates: Sequence[int],
        norm_layer: NormLayer,
        channels: int = 256,
        low_level_reduced: int = 48,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, rates, norm_layer, channels)
        self.reduce = conv_bn_relu(low_level_channels, low_level_reduced, 1, norm_layer)
        self.fuse = nn.Sequential(
            conv_bn_relu(channels + low_level_reduced, channels, 3, norm_layer),
            conv_bn_relu(channels, channels, 3, norm_layer),
        )
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: Dict[str, Tensor]) -> Tensor:
        low = self.reduce(features["layer1"])
        context = resize_bilinear(self.aspp(features["layer4"]), low.shape[-2:])
        return self.classifier(self.fuse(torch.cat([context, low], dim=1)))


class DeepLabV3(SegmentationModel):
    """DeepLabv3: dilated ResNet + ASPP head.  ``[N, 3, H, W]`` -> ``[N, num_classes, H, W]``."""

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
        aux_head: bool = False,
    ) -> None:
        head = DeepLabV3Head(
            backbone.channels["layer4"], num_classes,
            aspp_rates(backbone.output_stride), norm_layer,
        )
        init_head_weights(head)
        super().__init__(backbone, head, num_classes, norm_layer, aux_head)


class DeepLabV3Plus(SegmentationModel):
    """DeepLabv3+: DeepLabv3's ASPP plus a low-level decoder.

    ``[N, 3, H, W]`` -> ``[N, num_classes, H, W]``.
    """

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
        aux_head: bool = False,
    ) -> None:
        head = DeepLabV3PlusHead(
            backbone.channels["layer4"], backbone.channels["layer1"], num_classes,
            aspp_rates(backbone.output_stride), norm_layer,
        )
        init_head_weights(head)
        super().__init__(backbone, head, num_classes, norm_layer, aux_head)
