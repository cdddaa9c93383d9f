"""The standard Waterbirds protocol (Sagawa et al. 2020) as a dataset.

A Waterbirds folder holds CUB birds pasted on new backgrounds, laid out as CUB's species folders, and a
metadata.csv (columns img_id,img_filename,y,split,place,place_filename). The protocol trains, selects
and tests on the folder's own splits (0 = train, 1 = val, 2 = test), with the binary label y
(1 = waterbird) and the groups 2 * y + place, in which its per-group, mean-group, worst-group and
average accuracies are reported. `WaterbirdsDataset` is one of those splits.

Where the files are:
  * the Waterbirds folder: ROOT/<image_subdir> (the synthetic benchmark, or a CUB root holding the
    download), or any folder given as `image_dir` (the real `waterbird_complete95_forest2water2/`
    unpacked elsewhere);
  * masks (`MaskSource`): "gt" = the CUB segmentation of the same bird, ROOT/segmentations/<rel>.png,
    `img_filename` being the CUB relpath (ROOT is then needed only for these); a predicted-mask folder
    DIR/<image_subdir>/<rel>.png, the layout `bgmask.seg` writes for the Waterbirds images.

A record has the keys of a `CUBDataset` record: image, label (= y), index, img_id, place, group and,
when masks are asked for, mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from bgmask.data.cub import (WATERBIRDS_SUBDIR, MaskSource, WaterbirdsRow, check_item_files, item_record,
                             read_waterbirds_rows)
from bgmask.errors import UserError, require_dir

__all__ = ["CLASS_NAMES", "SPLIT_CODES", "WaterbirdsDataset", "check_protocol_splits"]

CLASS_NAMES = ("landbird", "waterbird")  # y = 0, 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # metadata.csv's split column
NUM_GROUPS = 4  # group = 2 * y + place


def check_protocol_splits(meta_csv: Path, rows: list[WaterbirdsRow]) -> None:
    """The protocol needs all three of the folder's splits: a folder without one of them (e.g. the
    synthetic test-only folder, split 2 alone) is one line naming the file and the missing splits."""
    present = {r.split for r in rows}
    missing = [f"{code} ({name})" for name, code in SPLIT_CODES.items() if code not in present]
    if missing:
        raise UserError(f"{meta_csv} has no split {' or '.join(missing)} rows: expected the Waterbirds splits "
                        "0/1/2 (train/val/test) of the standard protocol (a synthetic folder gets them from "
                        "`bgmask make-synthetic --waterbirds_splits`)")


@dataclass
class WaterbirdsDataset(Dataset):
    """One split ("train", "val" or "test") of a Waterbirds folder, in img_id order.

    root: the CUB root: ROOT/<image_subdir> is the Waterbirds folder unless `image_dir` is given, and
    ROOT/segmentations holds the GT masks (may be None with `image_dir` and no GT masks).
    transform: callable(image: PIL.Image, mask: np.ndarray | None) -> (image tensor, mask tensor | None),
    see `bgmask.data.transforms`.
    Attributes: ids, relpaths (img_id -> img_filename), group_of (int array, the group of each item),
    groups (img_filename -> (y, place, split), as `CUBDataset.groups`), metadata_csv, image_dir.
    """

    root: str | Path | None = None
    split: str = "train"
    image_subdir: str = WATERBIRDS_SUBDIR
    masks: MaskSource | None = None
    transform: Callable | None = None
    check_files: bool = True
    image_dir: str | Path | None = None

    def __post_init__(self):
        if self.split not in SPLIT_CODES:
            raise UserError(f"unknown Waterbirds split {self.split!r} (expected one of {', '.join(SPLIT_CODES)})")
        self.root = None if self.root is None else Path(self.root)
        if self.image_dir is None:
            if self.root is None:
                raise UserError("WaterbirdsDataset needs root (holding <image_subdir>) or image_dir (the Waterbirds "
                                "folder), got neither")
            self.image_dir = self.root / self.image_subdir
        self.image_dir = require_dir(self.image_dir, "Waterbirds folder")
        self.metadata_csv = self.image_dir / "metadata.csv"
        if not self.metadata_csv.is_file():
            raise UserError(f"Waterbirds metadata.csv not found: {self.metadata_csv} (expected the Waterbirds "
                            "layout: metadata.csv with columns img_id,img_filename,y,split,place,place_filename "
                            "beside the species folders)")
        rows = read_waterbirds_rows(self.metadata_csv)
        check_protocol_splits(self.metadata_csv, rows)
        self.groups = {r.img_filename: (r.y, r.place, r.split) for r in rows}
        mine = sorted((r for r in rows if r.split == SPLIT_CODES[self.split]), key=lambda r: r.img_id)
        self.ids = [r.img_id for r in mine]
        self.relpaths = {r.img_id: r.img_filename for r in mine}
        self._y = {r.img_id: r.y for r in mine}
        self._place = {r.img_id: r.place for r in mine}
        self.group_of = np.array([2 * r.y + r.place for r in mine], dtype=np.int64)
        if self.masks is not None:
            if self.masks.source == "gt" and self.root is None:
                raise UserError("ground-truth masks of Waterbirds images are the CUB segmentations "
                                "ROOT/segmentations/<rel>.png: expected the CUB root as root, got None")
            self.masks.check(self.root, self.image_subdir)
        if self.check_files:
            check_item_files(self, f"of a row of {self.metadata_csv}")

    @property
    def num_classes(self) -> int:
        return len(CLASS_NAMES)

    @property
    def class_names(self) -> tuple[str, str]:
        return CLASS_NAMES

    def group_counts(self) -> np.ndarray:
        """Items per group 0..3 (group = 2 * y + place), e.g. for a group-balanced sampler."""
        return np.bincount(self.group_of, minlength=NUM_GROUPS)

    def image_path(self, img_id: int) -> Path:
        return self.image_dir / self.relpaths[img_id]

    def mask_path(self, img_id: int) -> Path:
        return self.masks.path(self.root, self.image_subdir, self.relpaths[img_id])

    def labels(self) -> list[int]:
        return [self._y[i] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        img_id = self.ids[index]
        return item_record(self, index, img_id, self._y[img_id], self._place[img_id], int(self.group_of[index]))
