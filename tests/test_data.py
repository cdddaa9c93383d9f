"""Data layer: CUB metadata, splits, records, masks, binary-seg export, bad input (transforms: test_transforms.py)."""

from __future__ import annotations

import re

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bgmask.apps.cli import main as cli_main
from bgmask.data import CUBDataset, MaskSource, build_transform, read_cub_metadata, split_ids
from bgmask.data.binary_seg import make_binary_seg
from bgmask.errors import UserError, one_line

from conftest import write_tiny_cub


def test_metadata_and_splits(tiny_cub):
    meta = read_cub_metadata(tiny_cub)
    assert meta.num_classes == 3 and len(meta.ids) == 18
    assert meta.labels[1] == 0 and meta.labels[18] == 2
    assert len(split_ids(meta, "train")) == 12 and len(split_ids(meta, "test")) == 6
    tr = split_ids(meta, "train", train_split=0.5, split_seed=3)
    va = split_ids(meta, "val", train_split=0.5, split_seed=3)
    assert len(tr) == 6 and len(va) == 6 and not set(tr) & set(va)
    assert set(tr) | set(va) == set(split_ids(meta, "train"))
    # stratified: 2 val images per class
    assert sorted(meta.labels[i] for i in va) == [0, 0, 1, 1, 2, 2]
    assert split_ids(meta, "val", 0.5, 3) == va  # seeded
    assert any(split_ids(meta, "val", 0.5, s) != va for s in range(4, 10))


def test_empty_val_split_is_clear(tiny_cub):
    with pytest.raises(UserError, match="val split .* is empty.*--train_split"):
        CUBDataset(tiny_cub, "val")


def test_record_shapes_and_mask_threshold(tiny_cub):
    tf = build_transform(False, 32, crop_pct=1.0)
    ds = CUBDataset(tiny_cub, "test", masks=MaskSource("gt"), transform=tf)
    rec = ds[0]
    assert rec["image"].shape == (3, 32, 32) and rec["image"].dtype == torch.float32
    assert rec["mask"].shape == (1, 32, 32) and set(rec["mask"].unique().tolist()) <= {0.0, 1.0}
    assert rec["place"] == -1 and rec["group"] == -1 and rec["index"] == 0
    # threshold > 0 keeps the soft rim (10x12 = 120 px); > 127 only the core (8x10 = 80 px)
    raw0 = CUBDataset(tiny_cub, "test", masks=MaskSource("gt", threshold=0))
    raw127 = CUBDataset(tiny_cub, "test", masks=MaskSource("gt", threshold=127))
    from bgmask.data.cub import load_mask
    img_id = raw0.ids[0]
    assert load_mask(raw0.mask_path(img_id), (40, 32), 0).sum() == 120
    assert load_mask(raw127.mask_path(img_id), (40, 32), 127).sum() == 80


def test_waterbirds_records_carry_place_and_group(tiny_cub):
    ds = CUBDataset(tiny_cub, "test", image_subdir="waterbird_complete95_forest2water2", masks=MaskSource("gt"))
    for k in range(len(ds)):
        rec = ds[k]
        c = rec["label"] + 1
        assert rec["place"] == (c + 1) % 2 and rec["group"] == (c % 2) * 2 + (c + 1) % 2
    # the same ids as the CUB test split
    assert ds.ids == CUBDataset(tiny_cub, "test").ids


def test_predicted_mask_folder_layout(tiny_cub, tmp_path):
    pred = tmp_path / "pred"
    ds = CUBDataset(tiny_cub, "test")
    for i in ds.ids:
        rel = Path(ds.meta.relpaths[i]).with_suffix(".png")
        (pred / "images" / rel.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 40), 255, np.uint8)).save(pred / "images" / rel)
    ds = CUBDataset(tiny_cub, "test", masks=MaskSource(str(pred)))
    rec = ds[0]
    assert rec["mask"].shape == (32, 40) or rec["mask"].sum() == 32 * 40


def test_eval_transform_shapes():
    tf = build_transform(False, 24, crop_pct=0.875)
    img, m = tf(Image.new("RGB", (50, 40)), np.ones((40, 50), np.uint8))
    assert img.shape == (3, 24, 24) and m.shape == (1, 24, 24)


@pytest.mark.parametrize("breakage, pattern", [
    ("no_root", "CUB root folder not found"),
    ("no_images_txt", "images.txt"),
    ("bad_class_id", "class id '9' of image 1 out of range"),
    ("missing_image", "image listed in .* not found"),
    ("bad_split_value", "expected 0 or 1"),
    ("malformed_line", r"images.txt:1: expected"),
])
def test_bad_dataset_errors(tiny_cub, breakage, pattern):
    root = tiny_cub
    if breakage == "no_root":
        root = tiny_cub.parent / "nope"
    elif breakage == "no_images_txt":
        (root / "images.txt").unlink()
    elif breakage == "bad_class_id":
        lines = (root / "image_class_labels.txt").read_text().splitlines()
        lines[0] = "1 9"
        (root / "image_class_labels.txt").write_text("\n".join(lines))
    elif breakage == "missing_image":
        next((root / "images").rglob("*.jpg")).unlink()
    elif breakage == "bad_split_value":
        (root / "train_test_split.txt").write_text("1 x\n")
    elif breakage == "malformed_line":
        (root / "images.txt").write_text("one two\n")
    with pytest.raises(UserError, match=pattern):
        CUBDataset(root, "train" if breakage != "missing_image" else "train")


def test_corrupt_image_and_bad_mask(tiny_cub):
    ds = CUBDataset(tiny_cub, "test", masks=MaskSource("gt"))
    ds.image_path(ds.ids[0]).write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="cannot read image .*corrupt"):
        ds[0]
    mp = ds.mask_path(ds.ids[1])
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(mp)
    with pytest.raises(UserError, match="mask .* is 5x5 but its image is 40x32"):
        ds[1]
    mp.unlink()
    with pytest.raises(UserError, match="mask listed in .* not found"):
        CUBDataset(tiny_cub, "test", masks=MaskSource("gt"))


def test_missing_mask_folder(tiny_cub, tmp_path):
    with pytest.raises(UserError, match="mask folder not found"):
        CUBDataset(tiny_cub, "test", masks=MaskSource(str(tmp_path / "none")))


def test_make_binary_seg_layout_and_resume(tiny_cub, tmp_path):
    out = tmp_path / "seg"
    s = make_binary_seg(tiny_cub, out, val_fraction=0.25, progress=False)
    assert s.counts == {"train": 9, "test": 6, "val": 3, "waterbird_test": 6}
    for split, n in s.counts.items():
        assert len(list((out / "images" / split).rglob("*.jpg"))) == n
        if split != "waterbird_test":
            anns = sorted((out / "annotations" / split).rglob("*.png"))
            assert len(anns) == n
            vals = np.unique(np.asarray(Image.open(anns[0])))
            assert set(vals.tolist()) == {0, 1}
    # interrupted run: a missing file is redone on rerun, the rest is kept
    victim = next((out / "images" / "test").rglob("*.jpg"))
    victim.unlink()
    make_binary_seg(tiny_cub, out, val_fraction=0.25, progress=False)
    assert victim.is_file()
    with pytest.raises(UserError, match="made with other arguments"):
        make_binary_seg(tiny_cub, out, val_fraction=0.5, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty"):
        make_binary_seg(tiny_cub, other, val_fraction=0.25, progress=False)


def test_make_binary_seg_overwrite_starts_again(tiny_cub, tmp_path):
    """--overwrite replaces even a dataset of the same arguments (it is never resumed)."""
    out = tmp_path / "seg"
    make_binary_seg(tiny_cub, out, val_fraction=0.25, progress=False)
    (out / "stray.txt").write_text("x")
    make_binary_seg(tiny_cub, out, val_fraction=0.25, overwrite=True, progress=False)
    assert not (out / "stray.txt").exists() and (out / "split_info.json").is_file()


def test_cli_bad_input_exit_2(tiny_cub, tmp_path, capsys):
    rc = cli_main(["make-binary-seg", "--cub_root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "missing" in err and err.startswith("error:")
    rc = cli_main(["make-binary-seg", "--cub-root", str(tiny_cub), "--out", str(tmp_path / "o2"), "--val-fraction", "0.25"])
    assert rc == 0


def test_one_line_unwraps_worker_traceback():
    wrapped = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1\nbgmask.errors.UserError: image not found: /a/b.jpg\n')
    assert one_line(wrapped) == "image not found: /a/b.jpg"


def test_mask_of_another_size_is_found_before_training(tmp_path, capsys):
    """Every mask's size is checked against its (upright) image's from the headers when a dataset is built,
    for every split: a mask one pixel wider stops train.py at once, naming it and the count."""
    from bgmask.data import CUBDataset, MaskSource
    from bgmask.apps.scripts import train_early

    root = write_tiny_cub(tmp_path / "CUB")
    rel = (root / "images.txt").read_text().split()[1]  # the first image (a training one)
    mask = root / "segmentations" / rel.replace(".jpg", ".png")
    arr = np.asarray(Image.open(mask))
    Image.fromarray(np.pad(arr, ((0, 0), (0, 1)))).save(mask)
    with pytest.raises(UserError, match=rf"1 of 12 train masks do not have their image's size: {re.escape(str(mask))} "
                                        r"is 41x32, its image 40x32$"):
        CUBDataset(root, "train", masks=MaskSource("gt"))
    CUBDataset(root, "test", masks=MaskSource("gt"))  # the other splits are fine
    CUBDataset(root, "train")  # no masks asked for: nothing to compare
    assert train_early(["--data_path", str(root), "--strategy", "early", "--snapshot_dir", str(tmp_path / "r"),
                        "--image_size", "32", "--epochs", "1", "--num_workers", "0", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 of 12 train masks do not have their image's size" in err
    assert not (tmp_path / "r" / "config.yaml").exists()
