"""Shared dataset machinery: transform application, augmentation RNG, image-folder loading."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .transforms import IGNORE_INDEX, val_transform


class SegmentationDataset(Dataset):
    """Base class: items are ``(image float32 [3, H, W], label int64 [H, W])``.

    Subclasses implement ``__len__`` and ``raw(index) -> (rgb uint8 [H, W, 3],
    label uint8 [H, W])`` (labels already mapped to train ids, 255 = ignore) and set
    ``num_classes`` / ``class_names``. This class applies ``transform`` with a
    per-process ``np.random.Generator``:

    * in the main process it is seeded with ``aug_seed``;
    * inside a DataLoader worker it is reseeded from ``(aug_seed, worker seed)``,
      where the worker seed is the one torch derives per worker and per epoch from
      the loader's generator. So workers never repeat each other's augmentations,
      and ``torch.manual_seed`` (or ``DataLoader(generator=...)``) makes runs
      reproducible without a ``worker_init_fn``.
    """

    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX

    def __init__(self, transform: Callable | None = None, aug_seed: int = 0):
        self.transform = transform if transform is not None else val_transform()
        if not 0 <= int(aug_seed):  # numpy's generators take non-negative entropy only
            raise ValueError(f"aug_seed must be >= 0, got {aug_seed}")
        self.aug_seed = int(aug_seed)
        self._rng: np.random.Generator | None = None
        self._rng_owner: object = None

    # -- augmentation randomness -------------------------------------------------
    @property
    def rng(self) -> np.random.Generator:
        """The generator the transform draws from in the current process/worker."""
        info = get_worker_info()
        owner = None if info is None else (info.id, info.seed)
        if self._rng is None or owner != self._rng_owner:
            entropy = [self.aug_seed] if info is None else [self.aug_seed, info.seed]
            self._rng = np.random.default_rng(entropy)
            self._rng_owner = owner
        return self._rng

    # -- items ---------------------------------------------------------------
    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def rgb(self, index: int) -> np.ndarray:
        """The un-normalised image of item ``index``: uint8 ``[H, W, 3]`` for plotting."""
        return self.raw(index)[0]

    def _check_index(self, index: int) -> int:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        return index

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.raw(self._check_index(index))
        return self.transform(image, label, self.rng)


def read_rgb(path: str) -> np.ndarray:
    """Decode an image file (RGB, grayscale, palette, RGBA, CMYK) to uint8 ``[H, W, 3]`` RGB,
    turned as its EXIF orientation says: as viewers show it, and as annotation tools (which
    apply the tag) draw the labels on it; a camera's portrait photo is stored sideways.
    16-bit grayscale and float images are refused: PIL's conversion clips them to 8 bits
    (PIL reads a 48-bit RGB PNG as 8-bit RGB itself, scaled, which is kept)."""
    with _decoding(path, "image") as im:  # (Pillow's absence named by `_pil`, before ImageOps is imported)
        from PIL import ImageOps

        if im.mode in ("I", "F") or im.mode.startswith("I;"):
            raise ValueError(f"image file {path} has PIL mode {im.mode!r} (16-bit or float): converting it to "
                             "8-bit RGB would clip its values; store images with 8 bits per channel")
        return np.array(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)  # a writable copy


@contextlib.contextmanager
def _decoding(path: str, what: str):
    """Image.open(path), with a file that fails to decode (truncated, corrupt) named in the error
    (PIL's own messages, e.g. 'image file is truncated', say which file in none of its forms)."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im.load()
            yield im
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, FileNotFoundError) or (isinstance(err, ValueError) and path in str(err)):
            raise
        raise OSError(f"{what} file {path} could not be decoded: {err}") from None


def read_index_png(path: str, colours=None) -> np.ndarray:
    """Decode a label PNG that stores class indices: uint8 ``[H, W]``.

    Palette ("P") PNGs give their palette indices, grayscale ("L") PNGs their
    values. Colour PNGs are rejected: their pixel values are not class ids.
    With ``colours`` (the dataset's colour map, uint8 ``[256, 3]``: class ``i`` drawn as
    ``colours[i]``) a palette PNG whose used colours are a reordering of the map is read by
    colour: an editor or PNG optimiser that reorders the palette moves every index but no
    colour. Other palettes (grey levels, the class colours alone) keep their indices.
    """
    with _decoding(path, "label") as im:
        if im.format == "JPEG":
            raise ValueError(f"label file {path} is a JPEG: its lossy compression changes class indices along "
                             "every edge (and makes ones that are not there); store labels as PNG")
        if im.mode not in ("P", "L"):
            raise ValueError(
                f"label file {path} has PIL mode {im.mode!r}: expected a palette ('P') or "
                "grayscale ('L') PNG whose pixel values are class indices"
            )
        label = np.array(im, dtype=np.uint8)
        if colours is not None and im.mode == "P":
            label = _ids_by_colour(label, im.getpalette() or [], colours)
        return label


def _ids_by_colour(label: np.ndarray, file_palette, colours: np.ndarray) -> np.ndarray:
    """The class ids of a palette PNG's indices `label`, by the colours its own palette gives
    them, where those colours are a reordering of the colour map; else the indices as they are.
    Not a reordering: an index past the file's palette (many tools write the 21 class colours
    only, and 255 then has none), a colour outside the map, or a used colour the palette
    holds twice (padded with black, 255 has the background's colour)."""
    used = np.unique(label)
    entries = len(file_palette) // 3
    if int(used[-1]) >= entries:
        return label
    own = np.asarray(file_palette[:3 * entries], dtype=np.uint8).reshape(-1, 3)
    if (own[used] == colours[used]).all():
        return label  # the colour map's own order (as the official files): indices are ids
    _, shared, counts = np.unique(own, axis=0, return_inverse=True, return_counts=True)
    if (counts[shared.reshape(-1)[used]] > 1).any():
        return label  # a used colour at two indices (padding): the colour does not name one class
    index_of = {tuple(colour): i for i, colour in enumerate(colours.tolist())}
    ids = [index_of.get(tuple(own[i].tolist())) for i in used]
    if any(i is None for i in ids) or len(set(ids)) < len(ids):
        return label
    table = np.arange(256, dtype=np.uint8)
    table[used] = ids
    return table[label]


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow ships with matplotlib
        raise ImportError("reading VOC/CamVid images needs Pillow: pip install pillow") from e
    return Image


class ImageLabelFolder(SegmentationDataset):
    """A list of ``(image path, label path)`` pairs decoded on access.

    ``decode_label(path) -> uint8 [H, W]`` turns a label file into train ids
    (255 = ignore) and validates its values.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, str]],
        transform: Callable | None = None,
        aug_seed: int = 0,
    ):
        super().__init__(transform, aug_seed)
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def decode_label(self, path: str) -> np.ndarray:
        raise NotImplementedError

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rgb uint8 [H, W, 3], label uint8 [H, W])`` of item ``index``, size-checked."""
        img_path, lab_path = self.samples[self._check_index(index)]
        image = read_rgb(img_path)
        label = self.decode_label(lab_path)
        if label.shape != image.shape[:2]:
            (h, w), (lh, lw) = image.shape[:2], label.shape
            raise ValueError(
                f"label {lab_path} is {lw}x{lh} (WxH) but its image {img_path} is {w}x{h}: "
                "every label map must have exactly the size of its image"
            )
        return image, label


_COMMENT = re.compile(r"(?:^|(?<=\s))#")


def read_split_list(path: str) -> list[list[str]]:
    """Non-empty, whitespace-split lines of a split list file (``#`` at the start of a line or
    after a space starts a comment; inside a name it is part of the name)."""
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is dropped
            lines = f.readlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"split list {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as "
                         "UTF-8, one sample per line") from None
    for line in lines:
        line = _COMMENT.split(line, 1)[0].strip()
        if line:
            rows.append(line.split())
    if not rows:
        raise ValueError(f"split list {path} is empty: expected one sample per line")
    return rows


def require_dir(path: str, what: str) -> str:
    """Return ``path`` if it is a directory, else raise FileNotFoundError explaining ``what``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(what)
    return path
