"""Mask perturbations (bgmask.masking.perturb): exact pixels on hand-made masks, mIoU against an
independent numpy computation, seeding, bad input, and the perturbed folders the dataset reads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bgmask.data.cub import WATERBIRDS_SUBDIR, CUBDataset, MaskSource, read_cub_metadata
from bgmask.errors import UserError
from bgmask.masking.perturb import (
    PERTURBATIONS, IoUCounts, folder_miou, mask_miou, perturb_mask, squared_distance, write_perturbed_masks)


def square(size=30, lo=10, hi=20, value=255) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = value
    return m


def blobs(seed=0, shape=(24, 28)) -> list[np.ndarray]:
    """Three soft masks: an ellipse with a 1-px soft edge (values 1..254) around a 255 core."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    out = []
    for _ in range(3):
        cy, cx, ry, rx = rng.uniform(8, 16), rng.uniform(8, 20), rng.uniform(4, 7), rng.uniform(4, 8)
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        out.append(np.clip((1.2 - r) * 5 * 255, 0, 255).astype(np.uint8))
    return out


def names(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def numpy_miou(preds, gts, t=0) -> float:
    """The independent rule: per class, summed intersections over summed unions; mean of the classes."""
    ious = []
    for cls in (False, True):
        inter = sum(np.sum(((p > t) == cls) & ((g > t) == cls)) for p, g in zip(preds, gts))
        union = sum(np.sum(((p > t) == cls) | ((g > t) == cls)) for p, g in zip(preds, gts))
        ious.append(inter / union)
    return float(np.mean(ious))


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_miou_equals_numpy(name):
    gts = blobs()
    strength = PERTURBATIONS[name].defaults[1]
    preds = [perturb_mask(g, name, strength, seed=(0, i)) for i, g in enumerate(gts)]
    assert mask_miou(preds, gts) == pytest.approx(numpy_miou(preds, gts), abs=1e-12)
    assert mask_miou(preds, gts, threshold=100) == pytest.approx(numpy_miou(preds, gts, 100), abs=1e-12)


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_strength_zero_is_identity(name):
    for m in blobs():
        out = perturb_mask(m, name, 0, seed=3)
        assert out.dtype == np.uint8 and np.array_equal(out, m) and out is not m


def test_erode_dilate_rim_square_exact_counts():
    m = square()  # 10 x 10 bird
    for k, eroded, dilated in ((1, 64, 140), (2, 36, 184), (3, 16, 236)):
        # erosion by a disc keeps (10 - 2k)^2; dilation adds 4 sides of 10 x k and the lattice points of
        # the disc's quarter off the axes at each corner: 0 (k=1), 1 (k=2), 4 (k=3).
        assert np.count_nonzero(perturb_mask(m, "erode", k)) == eroded
        assert np.count_nonzero(perturb_mask(m, "dilate", k)) == dilated
        assert np.array_equal(perturb_mask(m, "rim", k) > 0, perturb_mask(m, "dilate", k) > 0)
    assert set(np.unique(perturb_mask(m, "dilate", 2)).tolist()) == {0, 255}
    # the rim is soft: 255 * (w + 1 - d) / (w + 1) at distance d, here w = 3
    assert perturb_mask(m, "rim", 3)[15, 5:11].tolist() == [0, 0, 64, 128, 191, 255]
    assert np.count_nonzero(perturb_mask(m, "rim", 3) > 127) == 100 + 4 * 10 * 2 + 4 * 1  # the inner 2 px


def test_border_is_neither_bird_nor_background():
    m = square(size=12, lo=0, hi=6)  # a 6 x 6 bird in the top-left corner, cut by the border
    assert np.count_nonzero(perturb_mask(m, "erode", 1)) == 25  # eroded from its two inner sides only
    assert np.count_nonzero(perturb_mask(m, "dilate", 1)) == 36 + 12


def test_erode_keeps_soft_values_it_does_not_move():
    m = square(size=20, lo=4, hi=16, value=200)
    m[9, 9] = 255
    out = perturb_mask(m, "erode", 2)
    assert out[9, 9] == 255 and out[8, 8] == 200 and out[5, 5] == 0


def test_threshold_exact():
    m = np.array([[0, 10, 64, 65], [128, 200, 254, 255]], np.uint8)
    assert perturb_mask(m, "threshold", 64).tolist() == [[0, 0, 0, 65], [128, 200, 254, 255]]
    assert perturb_mask(m, "threshold", 254).tolist() == [[0, 0, 0, 0], [0, 0, 0, 255]]


def test_drop_removes_exactly_the_fraction_as_blobs():
    m = square(size=40, lo=5, hi=35)  # 900 bird pixels
    for f in (0.1, 0.25, 0.5, 1.0):
        out = perturb_mask(m, "drop", f, seed=1)
        assert np.count_nonzero(m) - np.count_nonzero(out) == round(f * 900)
        assert not np.any((out > 0) & (m == 0))  # nothing added


def test_noise_moves_only_the_boundary_band():
    m = square(size=40, lo=10, hi=30)
    out = perturb_mask(m, "noise", 2, seed=5)
    changed = (out > 0) != (m > 0)
    assert changed.any() and np.any(changed & (m > 0)) and np.any(changed & (m == 0))
    near = squared_distance(m > 0, 4) <= 9  # within 3 px of the bird ...
    inner = squared_distance(m == 0, 4) <= 9  # ... or of the background
    assert not np.any(changed & ~(near & inner))


@pytest.mark.parametrize("name", ["drop", "noise"])
def test_seeded(name):
    m = blobs()[0]
    s = 0.4 if name == "drop" else 2
    a, b, c = (perturb_mask(m, name, s, seed=seed) for seed in ((7, 1), (7, 1), (7, 2)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("name", ["erode", "dilate", "rim"])
def test_miou_decreases_with_strength(name):
    gts = blobs()
    mious = [mask_miou([perturb_mask(g, name, k) for g in gts], gts) for k in range(5)]
    assert mious[0] == 1.0 and all(a > b for a, b in zip(mious, mious[1:])), mious


def test_squared_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    b = rng.random((13, 17)) < 0.08
    ys, xs = np.nonzero(b)
    yy, xx = np.indices(b.shape)
    brute = np.min((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2, axis=-1)
    d = squared_distance(b, 4)
    assert np.array_equal(d[brute <= 16], brute[brute <= 16]) and np.all(d[brute > 16] > 16)


def test_iou_counts_sum_over_images_then_divide():
    gt1, p1 = np.zeros((2, 2), bool), np.zeros((2, 2), bool)
    gt1[0, 0] = p1[0, 0] = p1[0, 1] = True  # bird 1/2, background 2/3
    gt2, p2 = np.ones((2, 2), bool), np.zeros((2, 2), bool)  # bird 0/4, background 0/4
    c = IoUCounts()
    c.add(p1, gt1)
    c.add(p2, gt2)
    assert c.intersect.tolist() == [2, 1] and c.union.tolist() == [7, 6]
    assert c.miou() == pytest.approx((2 / 7 + 1 / 6) / 2)
    empty = IoUCounts()
    empty.add(np.zeros((2, 2), bool), np.zeros((2, 2), bool))  # no bird anywhere: the class is left out
    assert empty.miou() == 1.0


@pytest.mark.parametrize("args, message", [
    (("blur", 1), "unknown perturbation 'blur' (expected one of erode, dilate, rim, drop, noise, threshold)"),
    (("erode", -1), "perturbation erode strength -1: expected an integer of px in [0, 64]"),
    (("erode", 1.5), "perturbation erode strength 1.5: expected an integer of px in [0, 64]"),
    (("drop", 1.5), "perturbation drop strength 1.5: expected a number of fraction of the bird area in [0, 1]"),
    (("noise", float("nan")), "perturbation noise strength nan: expected a number of px in [0, 32]"),
    (("threshold", True), "perturbation threshold strength True: expected an integer of mask value in [0, 254]"),
])
def test_bad_name_or_strength_is_one_line(args, message):
    with pytest.raises(UserError) as e:
        perturb_mask(square(), *args)
    assert str(e.value) == message


def test_bad_mask_is_one_line():
    with pytest.raises(UserError, match=r"a mask must be uint8 \(H, W\), got float64 \(3, 3\)"):
        perturb_mask(np.zeros((3, 3)), "erode", 1)


def test_written_folder_is_read_by_the_dataset(tiny_cub, tmp_path):
    out = tmp_path / "masks" / "dilate-2"
    summary = write_perturbed_masks(tiny_cub, out, "dilate", 2, seed=0, workers=1, progress=False)
    assert names(out / "images") == names(tiny_cub / "segmentations")
    meta = read_cub_metadata(tiny_cub)
    test_rels = sorted(meta.relpaths[i].replace(".jpg", ".png") for i in meta.ids if not meta.is_train[i])
    assert names(out / WATERBIRDS_SUBDIR) == test_rels
    for sub in ("images", WATERBIRDS_SUBDIR):
        ds = CUBDataset(tiny_cub, "test", image_subdir=sub, masks=MaskSource(str(out)))
        for k, img_id in enumerate(ds.ids):
            gt = np.asarray(Image.open(tiny_cub / "segmentations" / meta.relpaths[img_id].replace(".jpg", ".png")))
            assert np.array_equal(ds[k]["mask"], (perturb_mask(gt, "dilate", 2, (0, img_id)) > 0).astype(np.uint8))
    gts = [np.asarray(Image.open(tiny_cub / "segmentations" / r)) for r in test_rels]
    preds = [np.asarray(Image.open(out / "images" / r)) for r in test_rels]
    assert summary["miou"] == pytest.approx(numpy_miou(preds, gts)) and summary["masks"] == len(meta.ids)
    assert folder_miou(tiny_cub, out, image_subdir=WATERBIRDS_SUBDIR) == summary["miou"]


def test_folder_resumes_refuses_other_inputs_and_is_worker_independent(tiny_cub, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    write_perturbed_masks(tiny_cub, one, "noise", 2, seed=4, workers=1, progress=False)
    write_perturbed_masks(tiny_cub, two, "noise", 2, seed=4, workers=2, progress=False)
    files = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert files and all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    victim = one / files[0]
    victim.unlink()
    stamps = {f: (one / f).stat().st_mtime_ns for f in files[1:]}
    write_perturbed_masks(tiny_cub, one, "noise", 2, seed=4, workers=1, progress=False)  # resumes
    assert victim.read_bytes() == (two / files[0]).read_bytes()
    assert {f: (one / f).stat().st_mtime_ns for f in files[1:]} == stamps
    with pytest.raises(UserError, match=r"one holds masks of other inputs \(noise 2.0, seed 4\)"):
        write_perturbed_masks(tiny_cub, one, "noise", 2, seed=5, progress=False)
    write_perturbed_masks(tiny_cub, one, "erode", 1, overwrite=True, progress=False)
    assert not any("noise" in p.read_text() for p in one.glob("*.json"))


def test_folder_refusals_and_a_killed_runs_temp_file(tiny_cub, tmp_path):
    """A folder of other files is refused (replaced with overwrite); one that holds nothing but the
    temporary file of a run killed while writing its marker is taken, the file removed."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no perturbed_masks.json"):
        write_perturbed_masks(tiny_cub, foreign, "noise", 2, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".perturbed_masks.json.123-abc.tmp").write_text("half")
    write_perturbed_masks(tiny_cub, killed, "noise", 2, progress=False)
    assert not list(killed.rglob("*.tmp")) and (killed / "perturbed_masks.json").is_file()
