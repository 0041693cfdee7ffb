"""Data pipeline: the embedded synthetic dataset, VOC/CamVid loaders and augmentation.

Every dataset yields ``(image float32 [3, H, W] ImageNet-normalised, label int64
[H, W])`` with 255 as ignore, and has ``num_classes``, ``class_names``,
``ignore_index`` attributes plus ``raw(i)`` / ``rgb(i)`` for un-normalised uint8 data.
"""

from .base import ImageLabelFolder, SegmentationDataset
from .camvid import CAMVID_CLASSES, CamVidSegmentation
from .factory import DATASETS, DEFAULT_CROP, build_dataset
from .synthetic import (
    MAX_CLASSES,
    SHAPE_KINDS,
    SyntheticScenes,
    render_scene,
    synthetic_class_names,
)
from .transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN_PIXEL,
    Compose,
    Normalize,
    PadToMultiple,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    ToTensor,
    denormalize,
    train_transform,
    val_transform,
)
from .voc import VOC_CLASSES, VOCSegmentation, voc_palette

__all__ = [
    "CAMVID_CLASSES",
    "DATASETS",
    "DEFAULT_CROP",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_CLASSES",
    "MEAN_PIXEL",
    "SHAPE_KINDS",
    "VOC_CLASSES",
    "CamVidSegmentation",
    "Compose",
    "ImageLabelFolder",
    "Normalize",
    "PadToMultiple",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomScale",
    "SegmentationDataset",
    "SyntheticScenes",
    "ToTensor",
    "VOCSegmentation",
    "build_dataset",
    "denormalize",
    "render_scene",
    "synthetic_class_names",
    "train_transform",
    "val_transform",
    "voc_palette",
]
