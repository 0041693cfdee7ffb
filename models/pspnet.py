"""PSPNet (Zhao et al. 2017): dilated ResNet + pyramid pooling module."""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor, nn

from .common import SegmentationModel, conv_bn_relu, init_head_weights, resize_bilinear
from .pooling import adaptive_avg_pool2d_exportable
from .resnet import NormLayer, ResNet

PYRAMID_BINS = (1, 2, 3, 6)


class PyramidPooling(nn.Module):
    """Pool the feature map into k x k bins for each k, reduce, upsample, concat.

    Each bin level: adaptive average pool to ``[N, C, k, k]`` -> 1x1 conv to
    ``C / len(bins)`` channels -> norm -> ReLU -> bilinear upsample.  The input
    is concatenated with all levels:
    ``[N, C, h, w]`` -> ``[N, 2 * C, h, w]`` (``self.out_channels``).

    The pooling uses :func:`adaptive_avg_pool2d_exportable` so the module
    exports to ONNX with a dynamic feature size.  The 1x1 level feeds a norm
    layer a ``[N, C', 1, 1]`` input, so BatchNorm in training needs N >= 2.
    """

    def __init__(
        self,
        in_channels: int,
        norm_layer: NormLayer,
        bins: Sequence[int] = PYRAMID_BINS,
    ) -> None:
        super().__init__()
        self.bins = tuple(bins)
        reduced = in_channels // len(self.bins)
        self.stages = nn.ModuleList(
            conv_bn_relu(in_channels, reduced, 1, norm_layer) for _ in self.bins
        )
        self.out_channels = in_channels + reduced * len(self.bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [x]
        for bins, stage in zip(self.bins, self.stages):
            pooled = adaptive_avg_pool2d_exportable(x, bins)
            outs.append(resize_bilinear(stage(pooled), size))
        return torch.cat(outs, dim=1)


class PSPHead(nn.Module):
    """Pyramid pooling -> 3x3 conv (512) -> dropout -> 1x1 classifier on ``layer4``.

    ``features["layer4"]`` ``[N, C4, h, w]`` -> logits ``[N, num_classes, h, w]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm_layer: NormLayer,
        channels: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels, norm_layer)
        self.conv = conv_bn_relu(self.ppm.out_channels, channels, 3, norm_layer)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: Dict[str, Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.conv(self.ppm(features["layer4"]))))


class PSPNet(SegmentationModel):
    """PSPNet.  ``[N, 3, H, W]`` -> ``[N, num_classes, H, W]``."""

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
        aux_head: bool = False,
    ) -> None:
        head = PSPHead(backbone.channels["layer4"], num_classes, norm_layer)
        init_head_weights(head)
        super().__init__(backbone, head, num_classes, norm_layer, aux_head)
