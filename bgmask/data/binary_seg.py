"""`bgmask make-binary-seg`: the `cub_binary_segmentation` dataset the MMSeg configs read.

    OUT/images/{train,val,test,waterbird_test}/<CUB relpath>.jpg      upright, no EXIF rotation
    OUT/annotations/{train,val,test}/<CUB relpath>.png      0 = background, 1 = bird (mask > 0)

`waterbird_test` holds the Waterbirds copies of the test images; they are scored against
`annotations/test` (the pasted bird keeps its CUB mask).

Images are exported by `bgmask.data.images.write_upright`: an upright RGB or grayscale JPEG is copied
byte for byte; any other file (an EXIF Orientation other than 1, CMYK, palette, alpha, 16-bit) is
written as the upright RGB the classifier decodes, without EXIF, so MMSeg's LoadImageFromFile reads the
same pixels with any backend (OpenCV applies EXIF Orientation, Pillow's 'unchanged' and turbojpeg do
not) and the annotation, drawn on the upright image, lines up with it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bgmask.data.cub import WATERBIRDS_SUBDIR, load_mask, load_rgb, mask_relpath, read_cub_metadata, split_ids
from bgmask.data.images import write_upright
from bgmask.errors import UserError
from bgmask.io import Marker, atomic_save_image
from bgmask.processes import run_each


@dataclass
class BinarySegSummary:
    out_dir: Path
    counts: dict

    def to_text(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in self.counts.items())
        return f"binary segmentation dataset in {self.out_dir} ({parts})"


def _refusal(out_dir: Path, marker: Marker, saved: dict) -> str:
    """Why `out_dir` is not taken: a dataset of other arguments (an unreadable split_info.json: of unknown
    arguments), or a folder that holds no dataset."""
    if marker.path.is_file():
        return f"output folder {out_dir} holds a dataset made with other arguments (pass --overwrite to replace it)"
    return f"output folder {out_dir} exists and is not empty (pass --overwrite to replace it)"


def make_binary_seg(cub_root: str | Path, out_dir: str | Path, val_fraction: float = 0.1, seed: int = 0,
                    overwrite: bool = False, progress: bool = True, workers: int = 1) -> BinarySegSummary:
    cub_root, out_dir = Path(cub_root), Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    meta = read_cub_metadata(cub_root)
    if not (cub_root / "segmentations").is_dir():
        raise UserError(f"ground-truth mask folder not found: {cub_root / 'segmentations'}")
    splits = {
        "train": split_ids(meta, "train", 1.0 - val_fraction, seed),
        "test": split_ids(meta, "test"),
    }
    if val_fraction > 0:  # the advice in this command's flags (split_ids' own names train.py's)
        splits["val"] = split_ids(meta, "val", 1.0 - val_fraction, seed,
                                  empty_val_hint=f" (--val_fraction {val_fraction:g} rounds to no image of any "
                                                 "class: raise it, or pass --val_fraction 0 for no val split)")
    config = {"cub_root": str(cub_root.resolve()), "val_fraction": val_fraction, "seed": seed}
    wb_dir = cub_root / WATERBIRDS_SUBDIR
    counts = {k: len(v) for k, v in splits.items()}
    if wb_dir.is_dir():
        counts["waterbird_test"] = len(splits["test"])
    # split_info.json first: a rerun of the same config resumes; --overwrite always starts again
    marker = Marker(out_dir / "split_info.json")
    marker.claim(out_dir, {"config": config}, overwrite, functools.partial(_refusal, out_dir, marker),
                 record={"config": config, "counts": counts}, fresh=overwrite)
    jobs = []  # (source image, source mask or None, out image, out annotation or None)
    for split, ids in splits.items():
        for i in ids:
            rel = meta.relpaths[i]
            jobs.append((cub_root / "images" / rel, cub_root / "segmentations" / mask_relpath(rel),
                         out_dir / "images" / split / rel, out_dir / "annotations" / split / mask_relpath(rel)))
    if wb_dir.is_dir():
        for i in splits["test"]:
            rel = meta.relpaths[i]
            jobs.append((wb_dir / rel, None, out_dir / "images" / "waterbird_test" / rel, None))
    todo = [job for job in jobs if not (job[2].is_file() and (job[3] is None or job[3].is_file()))]
    run_each(functools.partial(_export_one, images_txt=cub_root / "images.txt"), todo, workers,
             "make-binary-seg", progress)  # finished files of an earlier, interrupted run skipped
    return BinarySegSummary(out_dir, counts)


def _export_one(job: tuple[Path, Path, Path, Path | None], images_txt: Path) -> None:
    """One (source image, source mask, out image, out annotation or None) job, each file atomic."""
    src, src_mask, dst, dst_ann = job
    if not src.is_file():
        raise UserError(f"image listed in {images_txt} not found: {src}")
    image = load_rgb(src)  # upright RGB; also validates the image
    if dst_ann is not None:
        mask = load_mask(src_mask, image.size, threshold=0)
        atomic_save_image(dst_ann, Image.fromarray(mask.astype(np.uint8)))
    write_upright(src, image, dst)  # every decoder (OpenCV in MMSeg too) reads `image`
