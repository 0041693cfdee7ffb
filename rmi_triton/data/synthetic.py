"""The embedded default dataset: procedurally generated scenes that need pixel context.

Each scene is a textured, blurred, noisy background with objects of up to six kinds:

========  ===============================================================
wire      open thin curves (cubic Bezier or sinusoid), 1-3 px wide
plate     large shapes filled with an oriented stripe texture
speck     small discs (radius ~1-3 px) in clusters
rock      large shapes with a mottled texture; touches plates along a wavy cut
ring      thin closed ellipse outlines (a wire that closes on itself)
mesh      fence-like grids of 1 px lines over a rotated rectangle
========  ===============================================================

Class ``c >= 1`` is ``SHAPE_KINDS[c - 1]``, class 0 is background, so
``num_classes=5`` gives background, wire, plate, speck, rock.

Colours are drawn from one distribution for every class (only their contrast to
what lies beneath is controlled), so a pixel's colour says little about its class:
the model has to use thickness, closure, size, texture and the neighbourhood, which
is the kind of structure RMI's region term rewards. Some region boundaries carry a
2 px ignore band (255), like PASCAL VOC's object outlines.

Item ``i`` of a split is a pure function of ``(seed, split, i)``: the generator is
seeded by ``np.random.SeedSequence([tag, seed, crc32(split), i])``, so splits never
share a stream and the same index always gives the same scene.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from .base import SegmentationDataset
from .transforms import IGNORE_INDEX

SHAPE_KINDS = ("wire", "plate", "speck", "rock", "ring", "mesh")
MAX_CLASSES = 1 + len(SHAPE_KINDS)
DEFAULT_NUM_CLASSES = 5
DEFAULT_LENGTHS = {"train": 2000, "val": 200, "test": 200}
_STREAM_TAG = 0x524D49  # "RMI": keeps these streams apart from other users of the same seed

# Kinds painted as large textured areas; their visible outlines may get ignore bands.
_REGION_KINDS = ("plate", "rock")


def synthetic_class_names(num_classes: int = DEFAULT_NUM_CLASSES) -> tuple[str, ...]:
    """``("background", "wire", ...)``: the names of the first ``num_classes`` classes."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"synthetic num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    return ("background",) + SHAPE_KINDS[: num_classes - 1]


def split_key(split: str) -> int:
    """A stable 32-bit id of a split name (Python's ``hash`` is salted per process)."""
    return zlib.crc32(split.encode("utf-8"))


# --- small vectorised drawing helpers -------------------------------------------------


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy [H, 1], xx [1, W])`` float32, broadcastable."""
    return (
        np.arange(h, dtype=np.float32)[:, None],
        np.arange(w, dtype=np.float32)[None, :],
    )


def _lerp_coords(n: int, cell: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index ``[n]`` left of each pixel and its smoothstep weight ``[n]``."""
    pos = np.arange(n, dtype=np.float32) / np.float32(cell) + np.float32(offset)
    i0 = pos.astype(np.int64)
    f = pos - i0
    # Smoothstep weights hide the lattice (plain linear leaves visible creases).
    return i0, f * f * (3 - 2 * f)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float, channels: int = 1) -> np.ndarray:
    """Value noise: random values on a ``cell``-px lattice, smoothly interpolated.

    Returns float32 ``[H, W, channels]`` with zero mean and unit std (per call), so
    callers choose the amplitude directly. The interpolation is separable (columns,
    then rows) and done with gathers: tiny BLAS products are slower here because of
    thread start-up.
    """
    y0, fy = _lerp_coords(h, cell, rng.uniform(0, 1))
    x0, fx = _lerp_coords(w, cell, rng.uniform(0, 1))
    lattice = rng.standard_normal((int(y0[-1]) + 2, int(x0[-1]) + 2, channels)).astype(np.float32)
    fx = fx[None, :, None]
    cols = lattice[:, x0] * (1 - fx) + lattice[:, x0 + 1] * fx  # [gh, W, C]
    fy = fy[:, None, None]
    out = cols[y0] * (1 - fy) + cols[y0 + 1] * fy  # [H, W, C]
    out -= out.mean(axis=(0, 1))
    out /= out.std(axis=(0, 1)) + 1e-6
    return out


def grating(rng: np.random.Generator, h: int, w: int, period: float) -> np.ndarray:
    """Oriented sinusoidal stripes of ``period`` px at a random angle: float32 ``[H, W]``, unit std."""
    yy, xx = _grid(h, w)
    theta = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    k = np.float32(2 * np.pi / period)
    return np.float32(np.sqrt(2)) * np.sin(k * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)


def stamp_curve(points: np.ndarray, width: int, h: int, w: int) -> np.ndarray:
    """Rasterise a densely sampled curve ``points [N, 2]`` (y, x) as a band of ``width`` px.

    Width 1 marks the pixel nearest each point (an 8-connected 1 px line); wider
    bands mark pixels whose centre lies within ``width / 2`` of a point. Returns bool
    ``[H, W]``.
    """
    mask = np.zeros((h, w), dtype=bool)
    base = np.rint(points)
    if width <= 1:
        cand = base.astype(np.int64)
    else:
        r = width / 2
        k = int(np.ceil(r))
        oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
        offsets = np.stack([oy.ravel(), ox.ravel()], axis=1)
        cand = base[:, None, :] + offsets[None]  # [N, M, 2]
        near = ((cand - points[:, None, :]) ** 2).sum(-1) <= r * r
        cand = cand[near].astype(np.int64)
    inside = (cand[:, 0] >= 0) & (cand[:, 0] < h) & (cand[:, 1] >= 0) & (cand[:, 1] < w)
    cand = cand[inside]
    mask[cand[:, 0], cand[:, 1]] = True
    return mask


def dilate4(mask: np.ndarray) -> np.ndarray:
    """4-neighbourhood dilation of a bool ``[H, W]`` mask."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (5-tap, edge-padded) of float ``[H, W, C]``."""
    taps = np.arange(-2, 3, dtype=np.float32)
    wts = np.exp(-(taps**2) / (2 * sigma * sigma))
    wts /= wts.sum()
    h, w = img.shape[:2]
    p = np.pad(img, ((2, 2), (0, 0), (0, 0)), mode="edge")
    img = sum(wt * p[i : i + h] for i, wt in enumerate(wts))
    p = np.pad(img, ((0, 0), (2, 2), (0, 0)), mode="edge")
    return sum(wt * p[:, i : i + w] for i, wt in enumerate(wts))


def _luminance(rgb: np.ndarray) -> float:
    return float(np.mean(rgb))


Window = tuple[slice, slice]
FULL: Window = (slice(None), slice(None))


# --- the scene ------------------------------------------------------------------------


class _Scene:
    """Mutable canvas for one scene: float image ``[H, W, 3]`` in [0, 1], labels, instances."""

    def __init__(self, rng: np.random.Generator, h: int, w: int, num_classes: int):
        self.rng, self.h, self.w = rng, h, w
        self.class_of = {kind: i + 1 for i, kind in enumerate(SHAPE_KINDS[: num_classes - 1])}
        self.scale = min(h, w) / 128  # object sizes are tuned at 128 px and scale with the image
        self.area = h * w / 128**2  # object counts scale with the area
        self.image = np.zeros((h, w, 3), dtype=np.float32)
        self.label = np.zeros((h, w), dtype=np.uint8)
        self.instance = np.zeros((h, w), dtype=np.int32)
        self.next_instance = 1
        self.banded: list[tuple[int, Window]] = []  # region instances whose outline becomes ignore

    def has(self, kind: str) -> bool:
        return kind in self.class_of

    def count(self, low: int, high: int) -> int:
        """An object count in ``[low, high]`` at 128 px, scaled with the image area."""
        return int(round(self.rng.integers(low, high + 1) * self.area))

    def random_point(self, margin: float = 0.0) -> tuple[float, float]:
        m = margin
        return self.rng.uniform(m * self.h, (1 - m) * self.h), self.rng.uniform(m * self.w, (1 - m) * self.w)

    def window(self, cy: float, cx: float, radius: float) -> tuple[Window, np.ndarray, np.ndarray]:
        """The frame around ``(cy, cx)`` +- ``radius`` px, clipped to the image, and its
        pixel coordinates ``(yy [h, 1], xx [1, w])``. Small objects are drawn inside
        such windows: full-frame masks for each speck would dominate generation time."""
        y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, self.h)
        x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, self.w)
        y0, x0 = min(y0, y1), min(x0, x1)  # objects centred off-image give empty windows
        yy, xx = _grid(self.h, self.w)
        return (slice(y0, y1), slice(x0, x1)), yy[y0:y1], xx[:, x0:x1]

    # painting ------------------------------------------------------------------
    def colour_against(self, mask: np.ndarray, min_contrast: float, win: Window = FULL) -> np.ndarray:
        """A random RGB colour whose luminance differs by at least ``min_contrast`` from
        what ``mask`` (inside ``win``) currently covers, so objects are visible without
        being class-coded."""
        rgb = self.rng.uniform(0.05, 0.95, size=3).astype(np.float32)
        ref = _luminance(self.image[win][mask].mean(axis=0)) if mask.any() else 0.5
        diff = _luminance(rgb) - ref
        if abs(diff) < min_contrast:
            go_up = ref + min_contrast <= 0.95 and (diff >= 0 or ref - min_contrast < 0.05)
            target = ref + min_contrast if go_up else ref - min_contrast
            rgb = np.clip(rgb + (target - _luminance(rgb)), 0.0, 1.0)
        return rgb

    def paint(
        self, mask: np.ndarray, kind: str, colour: np.ndarray, texture: np.ndarray | None = None, win: Window = FULL
    ) -> int:
        """Draw ``mask`` (shaped like ``win``) as one instance of ``kind``; ``texture``
        (shaped like ``mask``) is added to all channels."""
        value = np.broadcast_to(colour, (int(mask.sum()), 3))
        if texture is not None:
            value = value + texture[mask][:, None]
        self.image[win][mask] = value
        self.label[win][mask] = self.class_of[kind]
        inst = self.next_instance
        self.instance[win][mask] = inst
        self.next_instance += 1
        return inst

    # scene layers --------------------------------------------------------------
    def background(self) -> None:
        """Colour gradient + mottling (+ sometimes faint coarse stripes as a distractor)."""
        rng, h, w = self.rng, self.h, self.w
        base = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
        low = smooth_noise(rng, h, w, cell=rng.uniform(24, 64) * self.scale, channels=3)
        mid = smooth_noise(rng, h, w, cell=rng.uniform(6, 12) * self.scale)
        self.image[:] = base + rng.uniform(0.05, 0.12) * low + rng.uniform(0.02, 0.06) * mid
        if rng.random() < 0.3:
            self.image += rng.uniform(0.02, 0.05) * grating(rng, h, w, rng.uniform(9, 16))[..., None]

    def region_mask(self) -> tuple[Window, np.ndarray, np.ndarray, np.ndarray]:
        """A large shape, a smooth radial blob or a rotated rectangle:
        ``(window, mask [h, w] bool, yy [h, 1], xx [1, w])`` with ``mask`` inside ``window``."""
        rng = self.rng
        cy, cx = self.random_point(margin=0.1)
        if rng.random() < 0.6:
            radius = rng.uniform(16, 36) * self.scale
            harmonics = [(k, rng.uniform(0, 0.15), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
            win, yy, xx = self.window(cy, cx, radius * 1.5)  # 1 + 3 * 0.15 bounds the radius
            dy, dx = yy - cy, xx - cx
            theta = np.arctan2(dy, dx)
            r = np.ones_like(theta)
            for k, amp, phase in harmonics:  # a few low harmonics: lumpy, never self-intersecting
                r = r + amp * np.cos(k * theta + phase)
            return win, dy * dy + dx * dx <= (radius * r) ** 2, yy, xx
        a, b = rng.uniform(10, 32, size=2) * self.scale
        ang = rng.uniform(0, np.pi)
        win, yy, xx = self.window(cy, cx, np.hypot(a, b))
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = -dx * np.sin(ang) + dy * np.cos(ang)
        return win, (np.abs(u) <= a) & (np.abs(v) <= b), yy, xx

    def region_texture(self, kind: str, shape: tuple[int, int]) -> np.ndarray:
        """Stripes for plates, fine mottling for rocks: float32 ``shape``."""
        rng = self.rng
        if kind == "plate":
            return rng.uniform(0.10, 0.16) * grating(rng, *shape, rng.uniform(4, 7))
        return rng.uniform(0.08, 0.14) * smooth_noise(rng, *shape, cell=rng.uniform(2.5, 4))[..., 0]

    def paint_region(self, mask: np.ndarray, kind: str, win: Window) -> None:
        if mask.sum() < 20:
            return
        colour = self.colour_against(mask, 0.2, win)
        inst = self.paint(mask, kind, colour, self.region_texture(kind, mask.shape), win)
        if self.rng.random() < 0.5:
            self.banded.append((inst, win))

    def regions(self) -> None:
        """Large plates/rocks; with both classes present most are cut in two along a wavy
        line, giving touching objects of different classes that share a fine boundary
        (only texture and an independently drawn colour tell the halves apart)."""
        kinds = [k for k in _REGION_KINDS if self.has(k)]
        if not kinds:
            return
        rng = self.rng
        for _ in range(max(1, self.count(1, 3))):
            win, mask, yy, xx = self.region_mask()
            if len(kinds) == 2 and rng.random() < 0.6:
                ys, xs = np.nonzero(mask)
                if ys.size == 0:
                    continue
                cy, cx = ys.mean() + win[0].start, xs.mean() + win[1].start
                ang = rng.uniform(0, 2 * np.pi)
                along = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
                across = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
                wave = rng.uniform(0, 2.5 * self.scale) * np.sin(along * (2 * np.pi / rng.uniform(8, 25)))
                side = across + wave < rng.uniform(-4, 4) * self.scale
                first, second = rng.permutation(kinds)
                self.paint_region(mask & side, first, win)
                self.paint_region(mask & ~side, second, win)
            else:
                self.paint_region(mask, kinds[rng.integers(len(kinds))], win)

    def meshes(self) -> None:
        """Grids of thin lines over a rotated rectangle; the holes keep what lies beneath."""
        if not self.has("mesh"):
            return
        rng = self.rng
        for _ in range(self.count(0, 1)):
            cy, cx = self.random_point(margin=0.15)
            a, b = rng.uniform(10, 25, size=2) * self.scale
            win, yy, xx = self.window(cy, cx, np.hypot(a, b))
            ang = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
            v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
            period, half = rng.uniform(4, 7), rng.uniform(0.5, 0.8)
            on_line = (np.abs(u - period * np.round(u / period)) <= half) | (
                np.abs(v - period * np.round(v / period)) <= half
            )
            mask = (np.abs(u) <= a) & (np.abs(v) <= b) & on_line
            if mask.any():
                self.paint(mask, "mesh", self.colour_against(mask, 0.3, win), win=win)

    def rings(self) -> None:
        """Closed thin ellipse outlines, 1-2 px thick."""
        if not self.has("ring"):
            return
        rng = self.rng
        for _ in range(self.count(0, 3)):
            cy, cx = self.random_point(margin=0.05)
            a = rng.uniform(5, 16) * self.scale
            b = a * rng.uniform(0.6, 1.0)
            win, yy, xx = self.window(cy, cx, a + 2)
            ang = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
            v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
            q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            # First-order distance to the ellipse: (q - 1) / |grad q|.
            grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2) / np.maximum(q, 1e-6)
            dist = np.abs(q - 1) / np.maximum(grad, 1e-6)
            mask = dist <= rng.integers(1, 3) / 2 + 0.05
            if mask.any():
                self.paint(mask, "ring", self.colour_against(mask, 0.3, win), win=win)

    def specks(self) -> None:
        """Clusters of small discs (radius 1.2-3.2 px); neighbours sometimes merge."""
        if not self.has("speck"):
            return
        rng = self.rng
        for _ in range(max(1, self.count(1, 3))):
            cy, cx = self.random_point(margin=0.05)
            n = rng.integers(2, 7)
            centres = rng.normal(0, 7 * self.scale, size=(n, 2)) + (cy, cx)
            radii = rng.uniform(1.2, 3.2, size=n) * max(1.0, self.scale**0.5)
            for (sy, sx), r in zip(centres, radii):
                win, yy, xx = self.window(sy, sx, r)
                mask = (yy - sy) ** 2 + (xx - sx) ** 2 <= r * r
                if mask.any():
                    self.paint(mask, "speck", self.colour_against(mask, 0.3, win), win=win)

    def curve_points(self) -> np.ndarray:
        """A random open curve, sampled every <= 0.5 px: float ``[N, 2]`` (y, x)."""
        rng = self.rng
        p0 = np.array(self.random_point())
        length = rng.uniform(0.4, 1.0) * max(self.h, self.w)
        ang = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.sin(ang), np.cos(ang)])
        normal = np.array([direction[1], -direction[0]])
        if rng.random() < 0.5:  # cubic Bezier: control points bent off the chord
            p3 = p0 + length * direction
            p1 = p0 + (p3 - p0) / 3 + normal * rng.normal(0, 0.3 * length)
            p2 = p0 + 2 * (p3 - p0) / 3 + normal * rng.normal(0, 0.3 * length)
            ctrl = np.stack([p0, p1, p2, p3])
            n = int(2 * np.linalg.norm(np.diff(ctrl, axis=0), axis=1).sum()) + 2  # polygon >= arc
            t = np.linspace(0, 1, n)[:, None]
            return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
        amp = rng.uniform(2, 0.15 * min(self.h, self.w))
        cycles = rng.uniform(0.5, 3.0)
        n = int(2 * (length + 4 * amp * cycles)) + 2  # each cycle adds at most 4 * amp of arc
        t = np.linspace(0, 1, n)[:, None]
        offset = amp * np.sin(2 * np.pi * cycles * t + rng.uniform(0, 2 * np.pi))
        return p0 + t * length * direction + offset * normal

    def wires(self) -> None:
        """Open thin curves, 1-3 px wide, drawn last so they cross everything."""
        if not self.has("wire"):
            return
        for _ in range(max(1, self.count(1, 4))):
            width = int(self.rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
            points = self.curve_points()
            lo, hi = points.min(axis=0), points.max(axis=0)
            win, _, _ = self.window((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, max(hi - lo) / 2 + 2)
            top_left = np.array([win[0].start, win[1].start])
            size = (win[0].stop - win[0].start, win[1].stop - win[1].start)
            mask = stamp_curve(points - top_left, width, *size)
            if mask.sum() >= 4:
                self.paint(mask, "wire", self.colour_against(mask, 0.3, win), win=win)

    def ignore_bands(self, region_instance: np.ndarray) -> None:
        """Mark a 2 px band straddling chosen region outlines as ignore (255).

        Uses the instance map as it was right after the regions were drawn, so bands
        follow region outlines only (not the thin objects drawn over them), and never
        erases a thin object's pixels.
        """
        region_classes = [self.class_of[k] for k in _REGION_KINDS if self.has(k)]
        erasable = np.isin(self.label, [0, *region_classes])
        for inst, win in self.banded:
            # Windows have a >= 1 px margin around their object, so the band fits inside.
            m = region_instance[win] == inst
            if not m.any():
                continue
            # dilate(m) & ~erode(m): one pixel each side of the outline; the image border
            # counts as inside, so cropped objects get no band along the frame.
            band = dilate4(m) & dilate4(~m) & erasable[win]
            self.label[win][band] = IGNORE_INDEX

    def finish(self) -> np.ndarray:
        """Camera effects (colour cast, blur, sensor noise) -> uint8 ``[H, W, 3]``."""
        rng = self.rng
        img = self.image * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
        img += rng.uniform(-0.05, 0.05)
        img = gaussian_blur(img, rng.uniform(0.3, 0.8))
        img += rng.normal(0, rng.uniform(0.01, 0.04), size=img.shape).astype(np.float32)
        return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        self.background()
        self.regions()
        region_instance = self.instance.copy()
        self.meshes()
        self.rings()
        self.specks()
        self.wires()
        self.ignore_bands(region_instance)
        return self.finish(), self.label


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 16 or w < 16:
        raise ValueError(f"synthetic scenes need at least 16x16 pixels, got {h}x{w}")
    return h, w


def render_scene(
    seed: int,
    split: str,
    index: int,
    size: int | Sequence[int] = 128,
    num_classes: int = DEFAULT_NUM_CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of ``split``: ``(rgb uint8 [H, W, 3], label uint8 [H, W])``.

    A pure function of its arguments. Labels are in ``[0, num_classes)`` or 255.
    """
    synthetic_class_names(num_classes)  # validates num_classes
    h, w = _as_hw(size)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([_STREAM_TAG, int(seed), split_key(split), int(index)])
    return _Scene(rng, h, w, num_classes).render()


class SyntheticScenes(SegmentationDataset):
    """The ``"synthetic"`` dataset: ``length`` generated scenes of one split.

    Items: ``(image float32 [3, H, W] ImageNet-normalised, label int64 [H, W])``, with
    ``H, W = size``. ``transform`` defaults to normalisation only, which keeps item
    ``i`` a pure function of ``(seed, split, i)``; pass e.g.
    ``train_transform(crop_size=size)`` to augment. ``cache=True`` keeps the raw
    uint8 arrays after first use (``~4 * H * W`` bytes per item, per worker).

    Attributes: ``num_classes``, ``class_names``, ``ignore_index`` (255), ``split``,
    ``seed``, ``size`` (``(H, W)``).
    """

    def __init__(
        self,
        split: str = "train",
        length: int | None = None,
        size: int | Sequence[int] = 128,
        num_classes: int = DEFAULT_NUM_CLASSES,
        seed: int = 0,
        transform: Callable | None = None,
        aug_seed: int = 0,
        cache: bool = False,
    ):
        super().__init__(transform, aug_seed)
        self.class_names = synthetic_class_names(num_classes)
        self.num_classes = num_classes
        self.split = str(split)
        self.seed = int(seed)
        self.size = _as_hw(size)
        self.length = int(DEFAULT_LENGTHS.get(self.split, 200) if length is None else length)
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rgb uint8 [H, W, 3], label uint8 [H, W])`` of scene ``index``."""
        index = self._check_index(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        item = render_scene(self.seed, self.split, index, self.size, self.num_classes)
        if self._cache is not None:
            item[0].flags.writeable = False  # shared across calls: guard against in-place edits
            item[1].flags.writeable = False
            self._cache[index] = item
        return item
