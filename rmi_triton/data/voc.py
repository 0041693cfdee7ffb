"""PASCAL VOC 2012 segmentation (optionally SBD-augmented) from a local directory.

Expected layout (``<root>`` is ``VOCdevkit/VOC2012``; its parent ``VOCdevkit`` or the
directory holding ``VOCdevkit`` are accepted too)::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png          palette PNGs, 0..20, 255 = boundary/ignore
    <root>/ImageSets/Segmentation/{train,val,trainval}.txt   one <id> per line
    <root>/SegmentationClassAug/<id>.png       optional SBD-augmented labels (palette or grayscale)
    <root>/ImageSets/Segmentation/train_aug.txt  (or <root>/train_aug.txt) for split="train_aug"
                                                 (likewise "trainaug", "aug")

Split-list lines hold either an id, or two root-relative paths
(``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``) as in common SBD lists.
Nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import numpy as np

from .base import ImageLabelFolder, read_index_png, read_split_list, require_dir

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

_LAYOUT = (
    "expected <root>/JPEGImages/*.jpg, <root>/SegmentationClass/*.png and "
    "<root>/ImageSets/Segmentation/{train,val,trainval}.txt, where <root> is "
    "VOCdevkit/VOC2012 (its parent VOCdevkit is accepted too)"
)


def voc_palette() -> np.ndarray:
    """The VOC colour map, uint8 ``[256, 3]``: class ``i`` is drawn as ``palette[i]``.

    Bits of the class id are spread over the high bits of R, G, B in turn, which is
    how the official palette PNGs are coloured (255 -> light beige boundary).
    """
    ids = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for ch in range(3):
            pal[:, ch] |= ((ids >> (3 * bit + ch)) & 1) << (7 - bit)
    return pal.astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _colours() -> np.ndarray:
    colours = voc_palette()
    colours.flags.writeable = False
    return colours


def resolve_voc_root(root: str) -> str:
    """Find the directory that holds ``JPEGImages/`` among ``root`` and its usual children."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"VOC root {root} does not exist: {_LAYOUT}")
    for cand in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")):
            return cand
    raise FileNotFoundError(f"VOC root {root} has no JPEGImages/ folder: {_LAYOUT}")


def _sbd_split(split: str) -> bool:
    """Whether `split` names an SBD-augmented list, whose labels are SegmentationClassAug/'s:
    "train_aug" (any "..._aug"), or the "trainaug" and "aug" of other tools."""
    return split.endswith("_aug") or split in ("trainaug", "aug")


def _find_split_list(root: str, split: str) -> str:
    seg_dir = os.path.join(root, "ImageSets", "Segmentation")
    candidates = [os.path.join(seg_dir, f"{split}.txt")]
    if _sbd_split(split):
        # SBD lists are often shipped next to the folders rather than in ImageSets.
        candidates.append(os.path.join(root, f"{split}.txt"))
    for path in candidates:
        if os.path.isfile(path):
            return path
    found = sorted(f[:-4] for f in os.listdir(seg_dir) if f.endswith(".txt")) if os.path.isdir(seg_dir) else []
    raise FileNotFoundError(
        f"VOC split list for split={split!r} not found: expected {' or '.join(candidates)} "
        f"(split lists present: {found or 'none'}); {_LAYOUT}"
    )


class VOCSegmentation(ImageLabelFolder):
    """PASCAL VOC 2012 semantic segmentation: 21 classes, 255 = ignore.

    Items: ``(image float32 [3, H, W], label int64 [H, W])`` after ``transform``
    (default: normalise only). ``split`` is ``train``, ``val``, ``trainval`` or any
    other list in ``ImageSets/Segmentation``; names ending in ``_aug`` (``train_aug``), and
    ``trainaug`` and ``aug``, read labels from ``SegmentationClassAug/``. All listed files are
    checked to exist when the dataset is built.
    """

    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES

    def __init__(
        self,
        root: str,
        split: str = "train",
        transform: Callable | None = None,
        aug_seed: int = 0,
        label_dir: str | None = None,
    ):
        self.root = resolve_voc_root(root)
        self.split = split
        self._label_dir = label_dir or ("SegmentationClassAug" if _sbd_split(split) else "SegmentationClass")
        list_path = _find_split_list(self.root, split)
        samples = [self._sample(row, list_path) for row in read_split_list(list_path)]
        super().__init__(samples, transform, aug_seed)

    def _label_root(self) -> str:
        """The folder of the labels of a bare id's line (a list of path pairs names its own)."""
        return require_dir(
            os.path.join(self.root, self._label_dir),
            f"VOC root {self.root} has no {self._label_dir}/ folder: expected "
            f"{os.path.join(self.root, self._label_dir)}/*.png label maps for split={self.split!r}; {_LAYOUT}",
        )

    def _sample(self, row: list[str], list_path: str) -> tuple[str, str]:
        if len(row) > 1 and os.path.isfile(os.path.join(self.root, "JPEGImages", f"{' '.join(row)}.jpg")):
            row = [" ".join(row)]  # an id with a space in it
        if len(row) == 1:
            img = os.path.join(self.root, "JPEGImages", f"{row[0]}.jpg")
            lab = os.path.join(self._label_root(), f"{row[0]}.png")
        elif len(row) == 2:
            img, lab = (os.path.join(self.root, *p.replace("\\", "/").lstrip("/").split("/")) for p in row)
        else:
            raise ValueError(
                f"VOC split list {list_path} has a malformed line {' '.join(row)!r}: expected "
                "'<id>' or '<image path> <label path>' relative to the VOC root"
            )
        if not os.path.isfile(img):
            raise FileNotFoundError(f"VOC split list {list_path} names image {row[0]!r}, but {img} does not exist")
        if not os.path.isfile(lab):
            raise FileNotFoundError(
                f"VOC split list {list_path} names image {row[0]!r}, but its label {lab} does not exist"
            )
        return img, lab

    def decode_label(self, path: str) -> np.ndarray:
        """Palette/grayscale PNG -> uint8 ``[H, W]`` with values 0..20 or 255 (a palette PNG in the
        VOC colours is read by colour, `read_index_png`)."""
        label = read_index_png(path, _colours())
        bad = np.unique(label[(label >= self.num_classes) & (label != self.ignore_index)])
        if bad.size:
            raise ValueError(
                f"label {path} contains values {bad[:10].tolist()}: VOC labels must be class "
                f"indices 0..{self.num_classes - 1} or {self.ignore_index} (ignore)"
            )
        return label
