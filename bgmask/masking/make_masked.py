"""`bgmask make-masked`: early-masked copies on disk (the paper's own workflow).

Writes ROOT/NAME/<rel> for every image of ROOT/images and ROOT/NAME_waterbirds/<rel> for the Waterbirds
folder (with its metadata.csv), each file atomically; a rerun skips finished files. Train on them with
`--image_sub_path_train NAME --image_sub_path_test NAME_waterbirds`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bgmask.data.cub import WATERBIRDS_SUBDIR, MaskSource, load_mask, load_rgb, read_cub_metadata
from bgmask.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bgmask.errors import UserError, require_dir, require_output
from bgmask.masking.strategies import apply_early_mask
from bgmask.io import atomic_path, atomic_save_image, atomic_write_text, remove_stale_temp
from bgmask.processes import run_each


def masked_pixels(image: Image.Image, mask: np.ndarray, fill: str = "black") -> Image.Image:
    """image * mask + fill * (1 - mask) with early masking's own fill (`apply_early_mask`), computed on
    the image normalised with the ImageNet mean / std and turned back into 8-bit pixels; mask (H, W) in
    {0, 1}, 1 = bird."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255 - mean) / std  # (3, H, W)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    y = apply_early_mask(x[None], m, fill, IMAGENET_MEAN, IMAGENET_STD)[0] * std + mean
    return Image.fromarray((y * 255).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def check_out_subdir(root: Path, out_subdir: str) -> None:
    if not out_subdir or "/" in out_subdir or out_subdir in ("images", "segmentations", WATERBIRDS_SUBDIR):
        raise UserError(f"--out_subdir must be a new folder name inside {root}, got {out_subdir!r}")
    for sub in (out_subdir, f"{out_subdir}_waterbirds"):  # a file of that name, a read-only root: before any work
        require_output(root / sub, "--out_subdir")


def make_masked(cub_root: str | Path, masks: str = "gt", out_subdir: str = "images_masked", fill: str = "black",
                threshold: int = 0, progress: bool = True, workers: int = 1) -> dict[str, int]:
    """Masked copies of ROOT/images (and of the Waterbirds test images); `workers` processes write them
    (0 or 1: this process), byte for byte the same files."""
    root = Path(cub_root)
    meta = read_cub_metadata(root)
    check_out_subdir(root, out_subdir)
    source = MaskSource(masks, threshold)
    jobs = [("images", out_subdir, meta.ids)]
    wb = root / WATERBIRDS_SUBDIR
    if wb.is_dir():
        test_ids = [i for i in meta.ids if not meta.is_train[i]]
        jobs.append((WATERBIRDS_SUBDIR, f"{out_subdir}_waterbirds", test_ids))
    counts = {}
    for src_sub, dst_sub, ids in jobs:
        source.check(root, src_sub)
        require_dir(root / src_sub, "image folder")
        remove_stale_temp(root / dst_sub, recursive=True)  # half-written files of a killed run
        todo = [(root / src_sub / rel, source.path(root, src_sub, rel), root / dst_sub / rel, fill, threshold)
                for rel in (meta.relpaths[i] for i in ids) if not (root / dst_sub / rel).is_file()]
        run_each(_write_masked_copy, todo, workers, f"make-masked {dst_sub}", progress)
        atomic_write_text(root / dst_sub / "masked_copy.json", json.dumps(
            {"source_images": src_sub, "masks": masks, "fill": fill, "threshold": threshold}, indent=2))
        if (root / src_sub / "metadata.csv").is_file():
            with atomic_path(root / dst_sub / "metadata.csv") as tmp:
                shutil.copyfile(root / src_sub / "metadata.csv", tmp)
        counts[dst_sub] = len(ids)
    return counts


def _write_masked_copy(job: tuple[Path, Path, Path, str, int]) -> None:
    """One (image, mask, output, fill, threshold) job: the masked copy, written atomically."""
    src, mask_path, dst, fill, threshold = job
    image = load_rgb(src)
    mask = load_mask(mask_path, image.size, threshold)
    atomic_save_image(dst, masked_pixels(image, mask, fill))
