"""The standard Waterbirds protocol: the synthetic benchmark's complete Waterbirds folder
(`make-synthetic --waterbirds_splits`: splits 0/1/2, exact placement, same birds as CUB, byte
determinism, the default output unchanged) and `WaterbirdsDataset` (records, masks, one-line errors).
The metadata is read back with the csv module, independently of bgmask's parser."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgmask.apps.cli import main as cli_main
from bgmask.data import CUBDataset, MaskSource, WaterbirdsDataset, build_transform
from bgmask.data.habitats import HABITATS, PLACE_OF_HABITAT, render_habitat
from bgmask.data.synthetic import WaterbirdsSplits, generate_synthetic
from bgmask.errors import UserError

WB = "waterbird_complete95_forest2water2"
TINY = dict(num_classes=3, image_size=32, train_per_class=5, test_per_class=3, seed=0, progress=False)
# 4 species (y = 1, 0, 1, 0), 40 train images each: 8 val, 32 train, of which floor(0.95 * 32 + 1/2) = 30
# on place == y; 5 test images each (odd: the extra image alternates between places within a class).
BIG = dict(num_classes=4, image_size=32, train_per_class=40, test_per_class=5, seed=0, progress=False)
NEW_KEYS = {"waterbirds_splits", "waterbirds_val_fraction", "waterbirds_correlation"}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_meta(root: Path) -> list[dict]:
    with open(root / WB / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_pairs(path: Path) -> dict[int, str]:
    return {int(a): b for a, b in (line.split(" ", 1) for line in path.read_text().splitlines())}


def species_of(root: Path) -> dict[int, int]:
    """img_id -> 0-based species."""
    return {i: int(c) - 1 for i, c in read_pairs(root / "image_class_labels.txt").items()}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb") / "big"
    generate_synthetic(root, **BIG, waterbirds=WaterbirdsSplits())
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb") / "tiny"
    summary = generate_synthetic(root, **TINY, waterbirds=WaterbirdsSplits())
    return root, summary


# ---------------------------------------------------------------- the generator


def test_same_seed_same_bytes_and_cub_files_unchanged(tiny, tmp_path):
    root, summary = tiny
    again = tmp_path / "again"
    generate_synthetic(again, **TINY, waterbirds=WaterbirdsSplits())
    assert tree(again) == tree(root)
    plain = tmp_path / "plain"
    generate_synthetic(plain, **TINY)
    a, b = tree(root), tree(plain)
    cub = [k for k in b if k.startswith(("images/", "segmentations/")) or k.endswith(".txt")]
    assert cub and all(a[k] == b[k] for k in cub)  # the flag adds to the Waterbirds folder only
    config, plain_config = (json.loads((r / "synthetic_config.json").read_text()) for r in (root, plain))
    assert not NEW_KEYS & set(plain_config)
    assert {k: config[k] for k in NEW_KEYS} == {"waterbirds_splits": True, "waterbirds_val_fraction": 0.2,
                                                "waterbirds_correlation": 0.95}
    assert {k: v for k, v in config.items() if k not in NEW_KEYS} == plain_config
    assert summary.waterbirds_split_sizes == (12, 3, 9) and "splits 0/1/2 = 12/3/9" in summary.to_text()


def test_default_output_unchanged_by_the_new_code(tmp_path):
    """Flag off: the test-only folder (split 2), the config with exactly the keys it always had."""
    root = tmp_path / "off"
    generate_synthetic(root, **TINY)
    config = json.loads((root / "synthetic_config.json").read_text())
    assert set(config) == {"generator", "version", "num_classes", "image_size", "train_per_class",
                           "test_per_class", "correlation", "seed"}
    test_ids = sorted(i for i, s in read_pairs(root / "train_test_split.txt").items() if s == "0")
    meta = read_meta(root)
    assert [int(r["img_id"]) for r in meta] == test_ids and {r["split"] for r in meta} == {"2"}
    assert generate_synthetic(root, **TINY).num_resumed == len(read_pairs(root / "images.txt"))


def test_split_sizes_and_exact_placement(big):
    meta, species = read_meta(big), species_of(big)
    is_train = {i: s == "1" for i, s in read_pairs(big / "train_test_split.txt").items()}
    assert sorted(int(r["img_id"]) for r in meta) == sorted(species)  # every CUB image once
    per = Counter((species[int(r["img_id"])], r["split"], r["y"] == r["place"]) for r in meta)
    for k in range(BIG["num_classes"]):
        assert per[k, "1", True] + per[k, "1", False] == 8
        assert (per[k, "0", True], per[k, "0", False]) == (30, 2)
        assert per[k, "2", True] + per[k, "2", False] == 5
    for r in meta:
        assert (r["split"] == "2") == (not is_train[int(r["img_id"])])
    groups = Counter((r["split"], r["y"], r["place"]) for r in meta)
    for split in "12":
        for y in "01":
            assert groups[split, y, "0"] == groups[split, y, "1"] > 0, (split, y, groups)


def test_odd_splits_balanced_up_to_one(tiny):
    root, _ = tiny
    groups = Counter((r["split"], r["y"], r["place"]) for r in read_meta(root))
    for split in "12":
        for y in "01":
            assert abs(groups[split, y, "0"] - groups[split, y, "1"]) <= 1
    assert groups["1", "0", "0"] + groups["1", "0", "1"] == 1  # one species of y = 0, 1 val image


def test_control_without_shortcut(tmp_path):
    root = tmp_path / "control"
    generate_synthetic(root, **{**TINY, "train_per_class": 10}, waterbirds=WaterbirdsSplits(correlation=0.5))
    species = species_of(root)
    per = Counter((species[int(r["img_id"])], r["y"] == r["place"]) for r in read_meta(root) if r["split"] == "0")
    assert all(per[k, True] == per[k, False] == 4 for k in range(TINY["num_classes"]))


def test_rows_files_y_and_place_of_the_background(big):
    """y is the place group of the species' home habitat; each file exists; the background is the
    habitat named in place_filename (re-rendered from the image's documented stream), whose place
    group is `place`; the bird is the CUB image's."""
    from bgmask.data.synthetic import _WB_RENDER

    species, size = species_of(big), BIG["image_size"]
    bird_diff = []
    for r in read_meta(big):
        i, rel = int(r["img_id"]), r["img_filename"]
        assert int(r["y"]) == PLACE_OF_HABITAT[species[i] % len(HABITATS)]
        habitat = HABITATS.index(r["place_filename"].split("/")[1])
        assert int(r["place"]) == PLACE_OF_HABITAT[habitat]
        wb = np.asarray(Image.open(big / WB / rel), dtype=np.float32)
        cub = np.asarray(Image.open(big / "images" / rel), dtype=np.float32)
        mask = np.asarray(Image.open(big / "segmentations" / (rel[:-4] + ".png")))
        bird_diff.append(np.abs(wb - cub).mean(axis=2)[mask == 255].mean())
        if i % 9:
            continue  # re-rendering every background would be slow: one image in nine
        j = i - 1 - species[i] * 45
        split, idx = (0, j) if j < 40 else (1, j - 40)
        bg_err = [np.abs(wb - 255 * render_habitat(h, np.random.default_rng([0, split, species[i], idx, _WB_RENDER]),
                                                   size))[mask == 0].mean() for h in range(len(HABITATS))]
        assert int(np.argmin(bg_err)) == habitat and bg_err[habitat] < 6, (rel, bg_err)
    assert np.mean(bird_diff) < 6 and np.max(bird_diff) < 15


def test_resume_with_the_flag_on(tiny, tmp_path):
    root, _ = tiny
    run = tmp_path / "run"
    generate_synthetic(run, **TINY, waterbirds=WaterbirdsSplits())
    train_rel = read_meta(run)[0]["img_filename"]
    (run / WB / train_rel).unlink()
    (run / WB / "metadata.csv").unlink()
    assert generate_synthetic(run, **TINY, waterbirds=WaterbirdsSplits()).num_resumed == 23
    assert tree(run) == tree(root)
    with pytest.raises(UserError, match="not empty"):  # the flag is part of the compared config
        generate_synthetic(run, **TINY)


@pytest.mark.parametrize("bad, match", [
    (WaterbirdsSplits(val_fraction=0.05), "gives 0 val images per species"),
    (WaterbirdsSplits(val_fraction=1.0), r"waterbirds_val_fraction must be a number in \(0, 1\)"),
    (WaterbirdsSplits(correlation=1.5), r"waterbirds_correlation must be a number in \[0, 1\], got 1.5"),
])
def test_bad_protocol_arguments(tmp_path, bad, match):
    with pytest.raises(UserError, match=match) as e:
        generate_synthetic(tmp_path / "x", **TINY, waterbirds=bad)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_cli_flags(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["make-synthetic", "--out", str(out), "--num_classes", "3", "--image_size", "32", "--train_per_class", "5",
            "--test_per_class", "3"]
    assert cli_main([*args, "--waterbirds_splits", "--waterbirds_correlation", "0.5"]) == 0
    assert "splits 0/1/2 = 12/3/9" in capsys.readouterr().out
    assert json.loads((out / "synthetic_config.json").read_text())["waterbirds_correlation"] == 0.5
    assert cli_main([*args[:2], str(tmp_path / "other"), "--waterbirds_val_fraction", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--waterbirds_val_fraction is used only with --waterbirds_splits" in err and "\n" not in err
    assert not (tmp_path / "other").exists()
    with pytest.raises(SystemExit):
        cli_main(["make-synthetic", "--help"])
    assert "--waterbirds_splits" in capsys.readouterr().out


# ---------------------------------------------------------------- WaterbirdsDataset


def test_records_match_cub_records(big):
    tf = build_transform(False, 24, crop_pct=1.0)
    cub_keys = set(CUBDataset(big, "test", masks=MaskSource("gt"), transform=tf)[0])
    sizes = {}
    for split in ("train", "val", "test"):
        ds = WaterbirdsDataset(big, split, masks=MaskSource("gt"), transform=tf)
        assert ds.num_classes == 2 and ds.class_names == ("landbird", "waterbird")
        sizes[split] = len(ds)
        assert ds.group_counts().tolist() == np.bincount(ds.group_of, minlength=4).tolist()
        for index in (0, len(ds) - 1):
            rec = ds[index]
            assert set(rec) == cub_keys and rec["index"] == index and rec["img_id"] == ds.ids[index]
            assert rec["label"] in (0, 1) and rec["place"] in (0, 1)
            assert rec["group"] == 2 * rec["label"] + rec["place"] == ds.group_of[index]
            assert rec["label"] == ds.labels()[index]
            assert rec["image"].shape == (3, 24, 24) and rec["mask"].shape == (1, 24, 24)
    assert sizes == {"train": 128, "val": 32, "test": 20}
    test = WaterbirdsDataset(big, "test")
    assert test.group_counts().tolist() == [5, 5, 5, 5]
    assert "mask" not in test[0]
    legacy_eval = CUBDataset(big, "test", image_subdir=WB)  # the CUB pipeline's Waterbirds test still works
    assert legacy_eval.ids == test.ids and {legacy_eval[0]["group"], test[0]["group"]} == {test.group_of[0]}


def test_masks_resolve_to_cub_segmentations_and_predicted_folders(big, tmp_path):
    ds = WaterbirdsDataset(big, "val", masks=MaskSource("gt"))
    for i in ds.ids:
        rel = ds.relpaths[i]
        assert ds.mask_path(i) == big / "segmentations" / (rel[:-4] + ".png") and ds.mask_path(i).is_file()
        assert ds.image_path(i) == big / WB / rel
    pred = tmp_path / "pred"
    shutil.copytree(big / "segmentations", pred / WB)
    ds_pred = WaterbirdsDataset(big, "val", masks=MaskSource(str(pred)))
    assert all(ds_pred.mask_path(i) == pred / WB / (ds.relpaths[i][:-4] + ".png") for i in ds.ids)
    assert np.array_equal(ds_pred[0]["mask"], ds[0]["mask"])


def test_waterbirds_folder_elsewhere(big, tmp_path):
    """The real download: the Waterbirds folder is any folder; the CUB root only serves GT masks."""
    elsewhere = tmp_path / "downloads" / WB
    shutil.copytree(big / WB, elsewhere)
    (elsewhere.parent / "images.txt").write_text("not a CUB root\n")
    alone = WaterbirdsDataset(None, "test", image_dir=elsewhere)
    assert alone.ids == WaterbirdsDataset(big, "test").ids and alone.image_path(alone.ids[0]).parent.parent == elsewhere
    with_gt = WaterbirdsDataset(big, "test", image_dir=elsewhere, masks=MaskSource("gt"))
    assert with_gt.mask_path(with_gt.ids[0]).is_relative_to(big / "segmentations") and "mask" in with_gt[0]
    pred = tmp_path / "pred"
    shutil.copytree(big / "segmentations", pred / WB)
    assert "mask" in WaterbirdsDataset(None, "test", image_dir=elsewhere, masks=MaskSource(str(pred)))[0]


def broken_copy(big: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the Waterbirds folder; `edit(rows)` changes its metadata rows (lists of strings)."""
    folder = tmp_path / "broken" / WB
    shutil.copytree(big / WB, folder)
    if edit is not None:
        lines = (folder / "metadata.csv").read_text().splitlines()
        rows = edit([line.split(",") for line in lines[1:]])
        (folder / "metadata.csv").write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    return folder


def set_column(column: int, value: str, row: int = 3):
    def edit(rows):
        rows[row][column] = value
        return rows
    return edit


@pytest.mark.parametrize("case, match", [
    ("no_val", r"metadata.csv has no split 1 \(val\) rows: expected the Waterbirds splits 0/1/2"),
    ("no_train", r"metadata.csv has no split 0 \(train\) rows"),
    ("y", r"metadata.csv:5: y is '2' \(expected one of 0, 1\)"),
    ("place", r"metadata.csv:5: place is '-1' \(expected one of 0, 1\)"),
    ("missing_images", r"image of a row of .*metadata.csv not found: .*\.jpg \(2 of 128 train images missing\)"),
    ("no_metadata", r"Waterbirds metadata.csv not found: .*metadata.csv \(expected the Waterbirds layout"),
    ("test_only", r"has no split 0 \(train\) or 1 \(val\) rows.*--waterbirds_splits"),
    ("gt_without_root", r"expected the CUB root as root, got None"),
    ("split", r"unknown Waterbirds split 'dev' \(expected one of train, val, test\)"),
])
def test_bad_inputs_are_one_line(big, tmp_path, case, match):
    masks, split = None, "train"
    edits = {"no_val": lambda rows: [r for r in rows if r[3] != "1"],
             "no_train": lambda rows: [r for r in rows if r[3] != "0"],
             "y": set_column(2, "2"), "place": set_column(4, "-1")}
    folder = broken_copy(big, tmp_path, edits.get(case))
    if case == "missing_images":
        train = [r for r in read_meta(big) if r["split"] == "0"]
        for r in train[3:5]:
            (folder / r["img_filename"]).unlink()
    elif case == "no_metadata":
        (folder / "metadata.csv").unlink()
    elif case == "test_only":
        folder = tmp_path / "legacy"
        generate_synthetic(folder.parent / "legacy_root", **TINY)
        folder = folder.parent / "legacy_root" / WB
    elif case == "gt_without_root":
        masks = MaskSource("gt")
    elif case == "split":
        split = "dev"
    with pytest.raises(UserError, match=match) as e:
        WaterbirdsDataset(None, split, image_dir=folder, masks=masks)
    assert "\n" not in str(e.value)


def test_weighted_accuracy_needs_train_groups():
    """A CUB-protocol test split may carry groups; without train group counts there is no weighted accuracy
    (it was a TypeError at the end of such a training run)."""
    from bgmask.eval import weighted_accuracy

    metrics = {f"test/group_{g}_acc": 0.5 + g / 10 for g in range(4)}
    assert weighted_accuracy(metrics, "test", None) == {}
    assert weighted_accuracy(metrics, "test", [3, 1, 0, 0]) == {"test/weighted_acc": pytest.approx(0.525)}
