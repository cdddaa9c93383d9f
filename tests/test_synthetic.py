"""Synthetic benchmark generator: determinism, exact CUB / Waterbirds layout (read back with a
minimal parser written here, independent of the module), correlation, resume and argument checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgmask.data.habitats import HABITATS, PLACE_OF_HABITAT
from bgmask.data.synthetic import Quirks, generate_synthetic
from bgmask.errors import UserError

TINY = dict(num_classes=3, image_size=32, train_per_class=3, test_per_class=2, seed=0, progress=False)
WB = "waterbird_complete95_forest2water2"


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_table(path: Path) -> dict[int, list[str]]:
    """CUB text format: '<id> <fields...>' per line, space separated."""
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split(" ")
        out[int(parts[0])] = parts[1:]
    return out


def read_cub(root: Path) -> dict:
    images = {i: v[0] for i, v in read_table(root / "images.txt").items()}
    classes = {i: v[0] for i, v in read_table(root / "classes.txt").items()}
    labels = {i: int(v[0]) for i, v in read_table(root / "image_class_labels.txt").items()}
    split = {i: int(v[0]) for i, v in read_table(root / "train_test_split.txt").items()}
    boxes = {i: [float(x) for x in v] for i, v in read_table(root / "bounding_boxes.txt").items()}
    habitats = {i: (v[0], int(v[1])) for i, v in read_table(root / "habitats.txt").items()}
    image_habitat = {i: int(v[0]) for i, v in read_table(root / "image_habitats.txt").items()}
    with open(root / WB / "metadata.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    return dict(images=images, classes=classes, labels=labels, split=split, boxes=boxes,
                habitats=habitats, image_habitat=image_habitat, meta=meta)


def home_habitat_id(class_id: int, num_habitats: int) -> int:
    """Spec: species k (0-based) lives on habitat k % num_habitats; ids in files are 1-based."""
    return (class_id - 1) % num_habitats + 1


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref") / "synth"
    summary = generate_synthetic(root, **TINY)
    return root, summary


def test_deterministic_and_seed_dependent(ref, tmp_path):
    root, _ = ref
    again = tmp_path / "again"
    generate_synthetic(again, **TINY)
    a, b = tree(root), tree(again)
    assert list(a) == list(b)
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    other = tmp_path / "other_seed"
    generate_synthetic(other, **{**TINY, "seed": 1})
    c = tree(other)
    jpgs = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != c[k] for k in jpgs) == len(jpgs)


def test_cub_layout(ref):
    root, summary = ref
    d = read_cub(root)
    n_cls, n_tr, n_te = TINY["num_classes"], TINY["train_per_class"], TINY["test_per_class"]
    n = n_cls * (n_tr + n_te)
    size = TINY["image_size"]
    for key in ("images", "labels", "split", "boxes", "image_habitat"):
        assert sorted(d[key]) == list(range(1, n + 1)), key
    assert sorted(d["classes"]) == list(range(1, n_cls + 1))
    assert sum(d["split"].values()) == n_cls * n_tr and list(d["split"].values()).count(0) == n_cls * n_te
    assert (summary.num_train, summary.num_test, summary.num_classes) == (n_cls * n_tr, n_cls * n_te, n_cls)
    # ids ordered by class then by image
    assert [d["labels"][i] for i in range(1, n + 1)] == sorted(d["labels"].values())
    seen_values = set()
    for i, rel in d["images"].items():
        folder, fname = rel.split("/")
        cid = d["labels"][i]
        assert folder == d["classes"][cid] and folder.startswith(f"{cid:03d}.")
        assert fname.startswith(folder.split(".", 1)[1] + "_") and fname.endswith(f"_{i}.jpg")
        with Image.open(root / "images" / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (size, size)
        with Image.open(root / "segmentations" / (rel[:-4] + ".png")) as m:
            assert m.format == "PNG" and m.mode == "L" and m.size == (size, size)
            mask = np.asarray(m)
        vals = set(np.unique(mask).tolist())
        assert {0, 255} <= vals and vals - {0, 255}, "mask needs 0, 255 and soft edge values"
        seen_values |= vals
        x, y, w, h = d["boxes"][i]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= size and y + h <= size
        ys, xs = np.nonzero(mask > 0)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert len(seen_values) > 20
    # habitats.txt agrees with the module's constants
    assert [d["habitats"][k] for k in sorted(d["habitats"])] == list(zip(HABITATS, PLACE_OF_HABITAT))
    assert summary.sample_grid.is_file() and str(root) in summary.to_text()
    config = json.loads((root / "synthetic_config.json").read_text())
    assert {k: config[k] for k in ("num_classes", "image_size", "seed")} == \
        {k: TINY[k] for k in ("num_classes", "image_size", "seed")}


def test_waterbirds_folder(ref):
    root, _ = ref
    d = read_cub(root)
    by_name = {name: (hid, place) for hid, (name, place) in d["habitats"].items()}
    nh = len(d["habitats"])
    test_ids = sorted(i for i, s in d["split"].items() if s == 0)
    assert [int(r["img_id"]) for r in d["meta"]] == test_ids
    listed = sorted(p.relative_to(root / WB).as_posix() for p in (root / WB).rglob("*.jpg"))
    assert listed == sorted(d["images"][i] for i in test_ids)
    bird_diff, bg_diff = [], []
    for r in d["meta"]:
        i = int(r["img_id"])
        rel = d["images"][i]
        assert r["img_filename"] == rel and r["split"] == "2"
        home = home_habitat_id(d["labels"][i], nh)
        _, hab_name, jpg = r["place_filename"].split("/")
        assert jpg == f"{i}.jpg"
        hid, place = by_name[hab_name]
        assert hid != home
        assert int(r["y"]) == d["habitats"][home][1] and int(r["place"]) == place
        # same bird pixels (up to JPEG), different background
        a = np.asarray(Image.open(root / "images" / rel), dtype=np.float32)
        b = np.asarray(Image.open(root / WB / rel), dtype=np.float32)
        mask = np.asarray(Image.open(root / "segmentations" / (rel[:-4] + ".png")))
        diff = np.abs(a - b).mean(axis=2)
        bird_diff.append(diff[mask == 255].mean())
        bg_diff.append(diff[mask == 0].mean())
    assert np.mean(bird_diff) < 10 and np.mean(bg_diff) > 25


@pytest.mark.parametrize("corr", [1.0, 0.0])
def test_correlation_extremes(tmp_path, corr):
    root = tmp_path / "c"
    generate_synthetic(root, **{**TINY, "correlation": corr, "num_classes": 4, "train_per_class": 6})
    d = read_cub(root)
    nh = len(d["habitats"])
    on_home = [d["image_habitat"][i] == home_habitat_id(d["labels"][i], nh) for i in d["images"]]
    assert all(on_home) if corr == 1.0 else not any(on_home)


def test_resume_after_kill_matches_clean_run(ref, tmp_path):
    root, _ = ref
    run = tmp_path / "killed"
    generate_synthetic(run, **TINY)
    d = read_cub(run)
    # simulate a kill: some images, masks, Waterbirds images and all metadata missing, a temp file left
    (run / "images" / d["images"][2]).unlink()
    (run / "segmentations" / (d["images"][7][:-4] + ".png")).unlink()
    test_rel = d["images"][max(d["images"])]
    (run / WB / test_rel).unlink()
    for name in ("images.txt", "bounding_boxes.txt", "sample_grid.png", f"{WB}/metadata.csv"):
        (run / name).unlink()
    (run / "images" / ".stale.jpg.abc.tmp").write_bytes(b"half")
    summary = generate_synthetic(run, **TINY)
    assert summary.num_resumed == len(d["images"]) - 3
    assert tree(run) == tree(root)


def test_rerun_with_other_args_needs_overwrite(ref, tmp_path):
    run = tmp_path / "run"
    generate_synthetic(run, **TINY)
    changed = {**TINY, "image_size": 40}
    with pytest.raises(UserError, match=str(run)):
        generate_synthetic(run, **changed)
    generate_synthetic(run, **changed, overwrite=True)
    clean = tmp_path / "clean"
    generate_synthetic(clean, **changed)
    assert tree(run) == tree(clean)


def test_config_is_compared_whole_and_overwrite_starts_again(tmp_path):
    """A dataset made with a quirk is not resumed by a run without it (an unset quirk is a key missing
    from the config), and --overwrite regenerates even a dataset of the same config."""
    run, gray = tmp_path / "run", Quirks(grayscale_fraction=0.5)
    generate_synthetic(run, **TINY, quirks=gray)
    with pytest.raises(UserError, match="not empty"):
        generate_synthetic(run, **TINY)
    assert generate_synthetic(run, **TINY, quirks=gray).num_resumed > 0
    (run / "stray.txt").write_text("x")
    assert generate_synthetic(run, **TINY, quirks=gray, overwrite=True).num_resumed == 0
    assert not (run / "stray.txt").exists()


def test_foreign_folder_is_never_touched(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate_synthetic(tmp_path, **TINY)
    with pytest.raises(UserError, match="refusing"):
        generate_synthetic(tmp_path, **TINY, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("bad", [
    {"num_classes": 1}, {"num_classes": 2.5}, {"image_size": 31}, {"train_per_class": 0},
    {"test_per_class": 0}, {"correlation": -0.1}, {"correlation": 1.5}, {"seed": -1},
])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(UserError) as e:
        generate_synthetic(tmp_path / "x", **{**TINY, **bad})
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
