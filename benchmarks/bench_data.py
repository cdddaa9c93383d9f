"""Data loading speed: CUBDataset + joint transforms + DataLoader, no model.

    python benchmarks/bench_data.py --data_path DIR [--image_size 64] [--num_workers 1]

Rows (per pipeline, images/s after the first batch, so worker start-up is not counted):
- train, images: JPEG decode + the training transforms (timm recipe), the reference;
- train, images + GT masks: the same with the ground-truth PNG masks through the joint transforms;
- train, images + mask folder: masks read from a `--mask_dir`-style folder (DIR/images/<rel>.png);
- eval, images + masks: resize + centre crop, with masks.
Ratios are against `train, images` of the same run. Prints a Markdown table (see run_all.py).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import add_common_args, emit, machine_line, make_row, peak_memory_mib, reset_peak_memory

import bgmask  # noqa: F401  (before torch: the OpenMP wait policy default)
from torch.utils.data import DataLoader, RandomSampler

from bgmask.data import CUBDataset, MaskSource, build_transform


def loader_rate(dataset, batch_size: int, num_workers: int, max_batches: int) -> tuple[int, float]:
    # Sampling with replacement: any split size gives max_batches + 1 full batches.
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * (max_batches + 1))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not counted
    images, t0 = 0, time.perf_counter()
    for batch in it:
        images += len(batch["label"])
    return images, time.perf_counter() - t0


def mask_folder_copy(root: Path, dst: Path) -> Path:
    """The GT masks laid out as a predicted-mask folder (DIR/images/<rel>.png): same files, same cost."""
    shutil.copytree(root / "segmentations", dst / "images")
    return dst


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="a CUB-layout dataset (e.g. `bgmask make-synthetic`)")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--max_batches", type=int, default=20)
    p.add_argument("--augmentations", default="timm")
    add_common_args(p)
    a = p.parse_args(argv)
    root = Path(a.data_path)
    train_tf = build_transform(True, a.image_size, a.augmentations)
    eval_tf = build_transform(False, a.image_size)
    rows = []
    model = f"{a.image_size} px, {a.num_workers} worker(s)"
    with tempfile.TemporaryDirectory() as tmp:
        mask_dir = mask_folder_copy(root, Path(tmp) / "masks")
        pipelines = {
            "train, images": CUBDataset(root, "train", transform=train_tf),
            "train, images + GT masks": CUBDataset(root, "train", masks=MaskSource("gt"), transform=train_tf),
            "train, images + mask folder": CUBDataset(root, "train", masks=MaskSource(str(mask_dir)),
                                                      transform=train_tf),
            "eval, images + masks": CUBDataset(root, "test", masks=MaskSource("gt"), transform=eval_tf),
        }
        for name, ds in pipelines.items():
            reset_peak_memory("cpu")
            images, seconds = loader_rate(ds, a.batch_size, a.num_workers, a.max_batches)
            rows.append(make_row("data loading", model, name, images, seconds, peak_memory_mib("cpu"),
                                 ref=None if name == "train, images" else "train, images"))
    return emit(rows, f"data loading (no model), batch {a.batch_size}; main-process peak RSS; {machine_line()}",
                a.json)


if __name__ == "__main__":
    main()
