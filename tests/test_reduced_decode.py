"""Reduced JPEG decoding (Pillow's draft mode) where a transform's first resize makes full resolution
useless: sizes, the mask following its image (EXIF-rotated, grayscale, CMYK), and `--decode_full`."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from PIL import Image

from bgmask.data.cub import CUBDataset, MaskSource, load_mask, load_rgb_reduced
from bgmask.data.images import ORIENTATION, decode_rgb, decode_rgb_reduced, reduce_mask
from bgmask.data.transforms import build_transform

W, H = 256, 192  # stored size; multiples of 8 x 8 keep every JPEG scale exact


def bird(w: int = W, h: int = H) -> tuple[np.ndarray, np.ndarray]:
    """Blue image, a red asymmetric block (any rotation shows), and its 0/255 mask."""
    mask = np.zeros((h, w), np.uint8)
    mask[32:96, 64:192] = 255
    mask[96:160, 64:112] = 255
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (10, 30, 120)
    img[mask > 0] = (240, 40, 40)
    return img, mask


def save_jpeg(path, arr, mode="RGB", **kw):
    Image.fromarray(arr).convert(mode).save(path, quality=95, subsampling=0, **kw)
    return path


@pytest.mark.parametrize("min_side,expected", [(None, (W, H)), (192, (W, H)), (96, (128, 96)), (95, (128, 96)),
                                               (48, (64, 48)), (24, (32, 24)), (10, (32, 24)), (97, (W, H))])
def test_jpeg_scale_is_the_smallest_keeping_both_sides(tmp_path, min_side, expected):
    path = save_jpeg(tmp_path / "a.jpg", bird()[0])
    image, full = decode_rgb_reduced(path, min_side)
    assert full == (W, H) and image.size == expected and image.mode == "RGB"


def test_png_is_never_reduced(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(bird()[0]).save(path)
    image, full = decode_rgb_reduced(path, 24)
    assert image.size == full == (W, H)
    assert np.array_equal(np.asarray(image), np.asarray(decode_rgb(path)))


def test_reduced_pixels_are_the_box_average(tmp_path):
    """libjpeg's DCT scaling is close to a 2x2 box average of the full decode (JPEG noise aside)."""
    path = save_jpeg(tmp_path / "a.jpg", bird()[0])
    full = np.asarray(decode_rgb(path)).astype(float)
    half = np.asarray(decode_rgb_reduced(path, 96)[0]).astype(float)
    box = full.reshape(H // 2, 2, W // 2, 2, 3).mean((1, 3))
    assert np.abs(half - box).mean() < 2.0


def test_reduce_mask_rounds_up_like_the_jpeg(tmp_path):
    arr, mask = bird(250, 187)
    path = save_jpeg(tmp_path / "odd.jpg", arr)
    image, full = decode_rgb_reduced(path, 90)
    assert full == (250, 187) and image.size == (125, 94)  # ceil(187 / 2)
    reduced = reduce_mask(Image.fromarray(mask), image.size)
    assert reduced.size == image.size
    assert np.array_equal(np.asarray(reduce_mask(Image.fromarray(mask), (250, 187))), mask)  # same size: as is


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_mask_follows_its_reduced_image(tmp_path, mode, orientation):
    """Stored rotated (EXIF 6) or not, in any JPEG mode: the reduced image's red region is the reduced mask."""
    up_img, up_mask = bird()
    stored = np.rot90(up_img, k=1) if orientation == 6 else up_img  # 6: display = stored turned 90 cw
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = save_jpeg(tmp_path / "b.jpg", np.ascontiguousarray(stored), mode, exif=exif.tobytes())
    Image.fromarray(up_mask).save(tmp_path / "b.png")
    image, full = load_rgb_reduced(path, 48)
    assert full == (W, H) and image.size == (64, 48)
    m = load_mask(tmp_path / "b.png", full, 127, image.size)
    assert m.shape == (48, 64)
    rgb = np.asarray(image).astype(int)
    if mode == "L":
        region = rgb[..., 0] > 67  # L: the bird 100, the background 34
    else:
        region = (rgb[..., 0] > 120) & (rgb[..., 2] < 110)
    assert (region == (m == 1)).mean() > 0.97


def test_mask_of_the_wrong_size_still_refused(tmp_path):
    from bgmask.errors import UserError

    arr, mask = bird()
    path = save_jpeg(tmp_path / "a.jpg", arr)
    Image.fromarray(mask[:, :-1]).save(tmp_path / "a.png")
    image, full = load_rgb_reduced(path, 48)
    with pytest.raises(UserError, match=r"a\.png is 255x192 but its image is 256x192"):
        load_mask(tmp_path / "a.png", full, 0, image.size)


@pytest.mark.parametrize("augmentations,expected", [("none", 64), ("flip", 64), ("cub_original", 64),
                                                    ("torchvision", math.floor(64 * 256 / 224)), ("timm", None)])
def test_each_training_set_declares_what_it_needs(augmentations, expected):
    assert build_transform(True, 64, augmentations).decode_min_side == expected


def test_eval_transform_needs_the_resize_size():
    assert build_transform(False, 64, crop_pct=0.875).decode_min_side == math.floor(64 / 0.875)


def cub_with_big_jpegs(tmp_path):
    from bgmask.data.synthetic import Quirks, generate_synthetic

    root = tmp_path / "CUB_200_2011"
    generate_synthetic(root, num_classes=2, image_size=160, train_per_class=2, test_per_class=2, seed=3,
                       progress=False, quirks=Quirks(varied_sizes=True, grayscale_fraction=0.3, cmyk_fraction=0.3))
    return root


def test_dataset_reduced_matches_full_decode(tmp_path):
    """The eval pipeline at 32 px: a reduced decode gives the same crop size, the same mask up to the
    boundary, and nearly the same pixels as full decoding."""
    root = cub_with_big_jpegs(tmp_path)
    reduced_tf, full_tf = build_transform(False, 32), build_transform(False, 32)
    full_tf.decode_min_side = None
    reduced = CUBDataset(root, "test", masks=MaskSource("gt", 127), transform=reduced_tf)
    full = CUBDataset(root, "test", masks=MaskSource("gt", 127), transform=full_tf)
    assert reduced_tf.decode_min_side == 32
    for i in range(len(reduced)):
        a, b = reduced[i], full[i]
        assert a["image"].shape == b["image"].shape == (3, 32, 32)
        assert a["mask"].shape == b["mask"].shape == (1, 32, 32)
        assert (a["mask"] != b["mask"]).float().mean() < 0.05
        # normalised units: 0.3 = 0.07 of [0, 1]; the synthetic textures carry per-pixel noise, which the DCT's
        # box and the resize's triangle filter average differently (smooth images: see the box-average test)
        assert (a["image"] - b["image"]).abs().mean() < 0.3


def test_decode_full_flag_turns_it_off(tmp_path):
    from bgmask.build import build_datasets, train_transform

    root = cub_with_big_jpegs(tmp_path)
    base = dict(data_path=str(root), strategy="early", mask_source="gt", mask_threshold=0, image_size=32,
                crop_pct=1.0, train_split=1.0, split_seed=0, image_sub_path_train="images", eval_mode="test",
                image_sub_path_test="waterbird_complete95_forest2water2", augmentations_to_use="flip",
                imagenet_default_mean_and_std=True, aa=None, train_interpolation="bicubic", color_jitter=0.0,
                reprob=0.0, remode="pixel", recount=1, protocol="cub")
    data_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    for decode_full, expected in ((False, 32), (True, None)):
        cfg = argparse.Namespace(**base, decode_full=decode_full)
        sets = build_datasets(cfg, data_cfg)
        assert {name: ds.transform.decode_min_side for name, ds in sets.items()} == dict.fromkeys(sets, expected)
        assert train_transform(cfg).decode_min_side == expected
