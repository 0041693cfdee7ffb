"""Paired image/label transforms: the augmentation used by the RMI paper.

Every transform is a callable ``t(image, label, rng) -> (image, label)``:

* ``image``: ``np.ndarray`` uint8 ``[H, W, 3]`` (RGB) before :class:`Normalize`,
  float32 ``[H, W, 3]`` after it, ``torch.Tensor`` float32 ``[3, H, W]`` after
  :class:`ToTensor`.
* ``label``: ``np.ndarray`` ``[H, W]`` of class ids (uint8, 255 = ignore), int64
  ``torch.Tensor`` ``[H, W]`` after :class:`ToTensor`.
* ``rng``: a ``np.random.Generator``. Random transforms draw from it and nothing
  else, so a seeded generator makes the whole pipeline reproducible.

The training pipeline of the paper is scale (0.5-2.0) -> crop (513 for VOC, padded
with the mean pixel / ignore) -> horizontal flip -> ImageNet normalisation; see
:func:`train_transform`. Validation only normalises (:func:`val_transform`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255

# The uint8 pixel used for padding images: after Normalize it becomes ~0, so padded
# regions look like "no information" to the network rather than like black.
MEAN_PIXEL = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)

Transform = Callable[[object, object, np.random.Generator], tuple]


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``513`` -> ``(513, 513)``; ``(h, w)`` stays ``(h, w)``."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _check_pair(image: np.ndarray, label: np.ndarray) -> None:
    """Both arrays must describe the same H x W grid, the label in uint8 class ids (a resize
    in another dtype would wrap ids past 255 and -1 into other classes)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {tuple(image.shape)}")
    if np.asarray(label).dtype != np.uint8:
        raise TypeError(f"label must be uint8 class ids (255 = ignore), got {np.asarray(label).dtype}: "
                        f"map ids to 0..{IGNORE_INDEX - 1} and the ignored pixels to {IGNORE_INDEX} first")
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"label shape {tuple(label.shape)} does not match image H x W {tuple(image.shape[:2])}"
        )


class Compose:
    """Apply transforms in order, threading the same ``rng`` through all of them."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image, label, rng: np.random.Generator):
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int]):
    """Resize image ``[H, W, 3]`` uint8 bilinearly and label ``[H, W]`` by nearest neighbour.

    Returns ``(image [h, w, 3] uint8, label [h, w] uint8)`` for ``size = (h, w)``.
    Labels must never be interpolated: a blend of class 3 and class 7 is not class 5.
    """
    _check_pair(image, label)
    h, w = size
    if (h, w) == image.shape[:2]:
        return image, label
    # torch.tensor copies (read-only inputs such as cached scenes are fine); it rejects
    # negative strides, which ascontiguousarray removes (flipped inputs).
    img = torch.tensor(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    # Antialias only when shrinking, so downscaled images do not alias fine textures.
    shrink = h < image.shape[0] or w < image.shape[1]
    img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    out_img = img[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    lab = torch.tensor(np.ascontiguousarray(label, dtype=np.uint8))[None, None]
    # "nearest-exact" samples at pixel centres; plain "nearest" shifts by half a pixel.
    out_lab = F.interpolate(lab, size=(h, w), mode="nearest-exact")[0, 0].numpy()
    return out_img, out_lab


class RandomScale:
    """Rescale both arrays by one factor drawn uniformly from ``[min_scale, max_scale]``."""

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(self, image, label, rng):
        s = rng.uniform(self.min_scale, self.max_scale)
        h, w = image.shape[:2]
        size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        return resize_pair(image, label, size)

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


def pad_pair(
    image: np.ndarray,
    label: np.ndarray,
    size: tuple[int, int],
    image_fill: Sequence[int] = MEAN_PIXEL,
    label_fill: int = IGNORE_INDEX,
):
    """Pad at the bottom/right up to at least ``size = (h, w)``; never crops.

    Image ``[H, W, 3]`` is filled with ``image_fill`` (the mean pixel), label ``[H, W]``
    with ``label_fill`` (ignore), so padding adds no fake evidence or fake targets.
    """
    _check_pair(image, label)
    H, W = image.shape[:2]
    ph, pw = max(size[0] - H, 0), max(size[1] - W, 0)
    if ph == 0 and pw == 0:
        return image, label
    out_img = np.empty((H + ph, W + pw, 3), dtype=image.dtype)
    out_img[...] = np.asarray(image_fill, dtype=image.dtype)
    out_img[:H, :W] = image
    out_lab = np.full((H + ph, W + pw), label_fill, dtype=label.dtype)
    out_lab[:H, :W] = label
    return out_img, out_lab


class RandomCrop:
    """Crop a random ``size`` window, padding first (mean pixel / ignore) if too small."""

    def __init__(
        self,
        size: int | Sequence[int] = 513,
        image_fill: Sequence[int] = MEAN_PIXEL,
        label_fill: int = IGNORE_INDEX,
    ):
        self.size = _as_hw(size)
        self.image_fill = tuple(image_fill)
        self.label_fill = int(label_fill)

    def __call__(self, image, label, rng):
        image, label = pad_pair(image, label, self.size, self.image_fill, self.label_fill)
        ch, cw = self.size
        H, W = image.shape[:2]
        top = int(rng.integers(0, H - ch + 1))
        left = int(rng.integers(0, W - cw + 1))
        return image[top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class RandomHorizontalFlip:
    """Mirror image and label together (left <-> right) with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            return image[:, ::-1], label[:, ::-1]
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class PadToMultiple:
    """Pad bottom/right so H and W are multiples of ``multiple`` (for strided backbones)."""

    def __init__(self, multiple: int, image_fill: Sequence[int] = MEAN_PIXEL, label_fill: int = IGNORE_INDEX):
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.multiple = int(multiple)
        self.image_fill = tuple(image_fill)
        self.label_fill = int(label_fill)

    def __call__(self, image, label, rng):
        m = self.multiple
        H, W = image.shape[:2]
        size = (-(-H // m) * m, -(-W // m) * m)
        return pad_pair(image, label, size, self.image_fill, self.label_fill)

    def __repr__(self) -> str:
        return f"PadToMultiple({self.multiple})"


class Normalize:
    """uint8 ``[H, W, 3]`` -> float32 ``[H, W, 3]`` as ``(x / 255 - mean) / std``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image, label, rng):
        x = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
        return (x - self.mean) / self.std, label

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class ToTensor:
    """Arrays -> ``(float32 Tensor [3, H, W], int64 Tensor [H, W])``, contiguous."""

    def __call__(self, image, label, rng):
        img = torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)))
        lab = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return img, lab

    def __repr__(self) -> str:
        return "ToTensor()"


def train_transform(
    crop_size: int | Sequence[int] = 513,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """The paper's training augmentation: scale -> crop(+pad) -> flip -> normalise -> tensor.

    ``scale_range=None`` skips scaling, ``flip=False`` skips flipping.
    Output: ``(float32 [3, ch, cw], int64 [ch, cw])``.
    """
    steps: list[Transform] = []
    if scale_range is not None:
        steps.append(RandomScale(*scale_range))
    steps.append(RandomCrop(crop_size, image_fill=tuple(int(round(255 * m)) for m in mean)))
    if flip:
        steps.append(RandomHorizontalFlip())
    steps += [Normalize(mean, std), ToTensor()]
    return Compose(steps)


def val_transform(
    pad_multiple: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Evaluation transform: (optional pad to a multiple) -> normalise -> tensor.

    Output: ``(float32 [3, H', W'], int64 [H', W'])`` with ``H' = H`` unless padded.
    """
    steps: list[Transform] = []
    if pad_multiple:
        steps.append(PadToMultiple(pad_multiple, image_fill=tuple(int(round(255 * m)) for m in mean)))
    steps += [Normalize(mean, std), ToTensor()]
    return Compose(steps)


def denormalize(
    image: torch.Tensor | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Undo :class:`Normalize` for plotting: float ``[3, H, W]`` -> uint8 ``[H, W, 3]``."""
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a normalised image [3, H, W], got shape {tuple(x.shape)}")
    x = x.transpose(1, 2, 0) * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
