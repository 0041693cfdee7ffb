"""``build_dataset``: one entry point for the training tool."""

from __future__ import annotations

from typing import Callable, Sequence

from .base import SegmentationDataset
from .camvid import CamVidSegmentation
from .synthetic import SyntheticScenes
from .transforms import train_transform, val_transform
from .voc import VOCSegmentation

DATASETS = ("synthetic", "voc", "camvid")

# Training crop per dataset when crop_size is not given: VOC uses the paper's 513;
# CamVid keeps the full 360x480 frame (scaled-down frames get padded); synthetic
# scenes are rendered at this size and are not cropped unless augment=True.
DEFAULT_CROP = {"synthetic": 128, "voc": 513, "camvid": (360, 480)}


def build_dataset(
    name: str,
    root: str | None = None,
    split: str = "train",
    crop_size: int | Sequence[int] | None = None,
    augment: bool | None = None,
    transform: Callable | None = None,
    pad_multiple: int | None = None,
    **kw,
) -> SegmentationDataset:
    """Build dataset ``name`` (one of :data:`DATASETS`) for ``split``.

    * ``root``: local directory (required for ``voc`` / ``camvid``; nothing is
      downloaded; ignored by ``synthetic``).
    * ``crop_size``: training crop, int or ``(h, w)``; defaults per dataset
      (:data:`DEFAULT_CROP`). For ``synthetic`` it is the rendered scene size.
    * ``augment``: use :func:`train_transform` (scale 0.5-2 / crop / flip). Defaults
      to ``True`` for the ``train*`` splits of real datasets, ``False`` otherwise
      (synthetic scenes stay pure functions of their index unless asked).
    * ``transform``: overrides the above entirely.
    * ``pad_multiple``: for non-augmented items, pad H, W up to a multiple.
    * ``**kw``: passed to the dataset class (e.g. ``num_classes``, ``length``,
      ``seed`` for synthetic; ``aug_seed`` for all).

    The result has ``num_classes``, ``class_names`` and ``ignore_index`` attributes and
    yields ``(image float32 [3, H, W], label int64 [H, W])``.
    """
    key = str(name).lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: allowed values are {', '.join(map(repr, DATASETS))}")
    crop = DEFAULT_CROP[key] if crop_size is None else crop_size
    if augment is None:
        augment = key != "synthetic" and split.startswith("train")
    if transform is None:
        transform = train_transform(crop_size=crop) if augment else val_transform(pad_multiple)

    if key == "synthetic":
        kw.setdefault("size", crop)
        return SyntheticScenes(split=split, transform=transform, **kw)
    if root is None:
        raise ValueError(f"dataset {key!r} needs root=<local directory>; nothing is downloaded")
    cls = VOCSegmentation if key == "voc" else CamVidSegmentation
    return cls(root, split=split, transform=transform, **kw)
