"""Shared fixtures: tiny datasets in the CUB_200_2011 layout, written by hand (independent of the
synthetic generator) so that tests can also break them on purpose."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")

SUITE_PEAK_BYTES = 500 * 2**20  # the suite's temporary files at their peak (README: "Tested with")


def low_disk_warning(folder: str, free: int) -> str | None:
    """One line when the temp folder has less than twice the suite's peak free: tests then fail deep
    inside with 'No space left on device', so say it before they start."""
    if free >= 2 * SUITE_PEAK_BYTES:
        return None
    return (f"warning: only {free / 2**20:.0f} MB free in {folder}; the test suite writes about "
            f"{SUITE_PEAK_BYTES / 2**20:.0f} MB of temporary files at its peak (TMPDIR=... or --basetemp moves them)")


def pytest_sessionstart(session):
    folder = str(session.config.option.basetemp or tempfile.gettempdir())
    probe = folder
    while not os.path.exists(probe):  # --basetemp may not exist yet
        probe = os.path.dirname(probe) or "."
    line = low_disk_warning(folder, shutil.disk_usage(probe).free)
    if line:
        print(line, file=sys.stderr)


def write_tiny_cub(root: Path, num_classes=3, per_class=(4, 2), size=(40, 32), waterbirds=True, seed=0):
    """A CUB layout with solid-colour class images and one rectangle bird per image.
    per_class = (train, test). The mask has soft edge values (1..254) around a 255 core."""
    rng = np.random.default_rng(seed)
    w, h = size
    root.mkdir(parents=True, exist_ok=True)
    images, labels, split, classes, boxes = [], [], [], [], []
    img_id = 0
    for c in range(1, num_classes + 1):
        cname = f"{c:03d}.Class_{c}"
        classes.append(f"{c} {cname}")
        for k in range(sum(per_class)):
            img_id += 1
            rel = f"{cname}/Class_{c}_{k:04d}_{img_id}.jpg"
            is_train = k < per_class[0]
            arr = np.zeros((h, w, 3), np.uint8)
            arr[:] = rng.integers(0, 255, 3)
            x0, y0 = int(rng.integers(2, w // 2)), int(rng.integers(2, h // 2))
            arr[y0:y0 + 8, x0:x0 + 10] = (40 * c) % 255
            mask = np.zeros((h, w), np.uint8)
            mask[y0 - 1:y0 + 9, x0 - 1:x0 + 11] = 60  # soft rim
            mask[y0:y0 + 8, x0:x0 + 10] = 255
            (root / "images" / cname).mkdir(parents=True, exist_ok=True)
            (root / "segmentations" / cname).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / "images" / rel, quality=95)
            Image.fromarray(mask).save(root / "segmentations" / rel.replace(".jpg", ".png"))
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {c}")
            split.append(f"{img_id} {int(is_train)}")
            boxes.append(f"{img_id} {x0 - 1}.0 {y0 - 1}.0 12.0 10.0")
            if waterbirds and not is_train:
                wb = root / "waterbird_complete95_forest2water2" / cname
                wb.mkdir(parents=True, exist_ok=True)
                arr2 = arr.copy()
                arr2[mask == 0] = rng.integers(0, 255, 3)
                Image.fromarray(arr2).save(wb / Path(rel).name, quality=95)
    for name, rows in (("images.txt", images), ("image_class_labels.txt", labels),
                       ("train_test_split.txt", split), ("classes.txt", classes),
                       ("bounding_boxes.txt", boxes)):
        (root / name).write_text("\n".join(rows) + "\n")
    if waterbirds:
        rows = ["img_id,img_filename,y,split,place,place_filename"]
        for line, s, lab in zip(images, split, labels):
            i, rel = line.split(" ")
            if s.endswith(" 0"):
                c = int(lab.split()[1])
                rows.append(f"{i},{rel},{c % 2},2,{(c + 1) % 2},/x/{i}.jpg")
        (root / "waterbird_complete95_forest2water2" / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def tiny_cub(tmp_path):
    return write_tiny_cub(tmp_path / "CUB_200_2011")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run far faster on one thread than fighting over two loaded cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
