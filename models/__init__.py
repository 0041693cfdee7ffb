"""Segmentation networks used with the RMI loss: DeepLabv3, DeepLabv3+ and PSPNet
on dilated ResNet-18/34/50/101 backbones.

Every model maps ``[N, 3, H, W]`` to logits ``[N, num_classes, H, W]`` for any
input size and exports to ONNX (dynamo exporter) with dynamic batch/height/width.

    >>> from rmi_triton.models import build_model
    >>> model = build_model("deeplabv3", num_classes=21, backbone="resnet101",
    ...                     output_stride=16, pretrained="resnet101.pth")  # doctest: +SKIP
"""

from .builder import MODEL_NAMES, build_model, convert_sync_batchnorm
from .common import AuxHead, SegmentationModel
from .deeplab import ASPP, DeepLabV3, DeepLabV3Head, DeepLabV3Plus, DeepLabV3PlusHead, aspp_rates
from .pooling import adaptive_avg_pool2d_exportable
from .pspnet import PSPHead, PSPNet, PyramidPooling
from .resnet import (
    BACKBONES,
    OUTPUT_STRIDES,
    BasicBlock,
    Bottleneck,
    ResNet,
    build_resnet,
    load_torchvision_weights,
)

__all__ = [
    "ASPP",
    "AuxHead",
    "BACKBONES",
    "BasicBlock",
    "Bottleneck",
    "DeepLabV3",
    "DeepLabV3Head",
    "DeepLabV3Plus",
    "DeepLabV3PlusHead",
    "MODEL_NAMES",
    "OUTPUT_STRIDES",
    "PSPHead",
    "PSPNet",
    "PyramidPooling",
    "ResNet",
    "SegmentationModel",
    "adaptive_avg_pool2d_exportable",
    "aspp_rates",
    "build_model",
    "build_resnet",
    "convert_sync_batchnorm",
    "load_torchvision_weights",
]
