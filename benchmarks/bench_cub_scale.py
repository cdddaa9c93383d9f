"""Every data stage on a CUB-sized tree: 200 classes, 11,400 images (29 train / 28 test per class; CUB has
5,994 / 5,794) plus their Waterbirds copies, CUB-like non-square sizes (4:3 and 3:4, long side 300-500 px),
a few grayscale and CMYK JPEGs.

    python benchmarks/bench_cub_scale.py --out /tmp/cub_scale [--workers 2] [--seg_config CFG --seg_checkpoint CKPT]
    python benchmarks/bench_cub_scale.py --out /tmp/small --num_classes 20   # a tenth, to try it

The tree is generated once (`bgmask make-synthetic --varied_sizes`, resumable) and reused. Rows, each
timed in this process: the start-up checks (metadata, files, mask headers of every split), one epoch
of training-data loading at 224 px with masks (the timm recipe, DataLoader with --workers), make-binary-seg,
make-masked, and predict_masks (with a segmenter). Images/s and seconds; no ratios (no reference).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import add_common_args, emit, machine_line, make_row

import bgmask  # noqa: F401  (before torch: the OpenMP wait policy default)
from torch.utils.data import DataLoader

from bgmask.data import CUBDataset, MaskSource, build_transform
from bgmask.data.cub import WATERBIRDS_SUBDIR

CUB_TRAIN, CUB_TEST = 5994, 5794


def generate(a) -> Path:
    from bgmask.data.synthetic import Quirks, generate_synthetic

    out = Path(a.out) / "CUB_200_2011"
    if not (out / "done").is_file():
        t0 = time.perf_counter()
        generate_synthetic(out, num_classes=a.num_classes, image_size=500, train_per_class=CUB_TRAIN // 200,
                           test_per_class=CUB_TEST // 200, seed=0,
                           quirks=Quirks(varied_sizes=True, grayscale_fraction=0.01, cmyk_fraction=0.002))
        (out / "done").write_text(f"{time.perf_counter() - t0:.0f} s\n")
    return out


def timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def stage_rows(a, root: Path) -> list[tuple[str, int, float]]:
    masks = MaskSource("gt")

    def startup():
        sets = [CUBDataset(root, s, masks=masks) for s in ("train", "test")]
        sets.append(CUBDataset(root, "test", image_subdir=WATERBIRDS_SUBDIR, masks=masks))
        return sum(len(d) for d in sets)

    def epoch():
        ds = CUBDataset(root, "train", masks=masks, transform=build_transform(True, 224))
        return sum(len(b["label"]) for b in DataLoader(ds, batch_size=64, num_workers=a.workers, shuffle=True))

    from bgmask.data.binary_seg import make_binary_seg
    from bgmask.masking.make_masked import make_masked

    work = Path(a.out) / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(root / "images_bench_masked", ignore_errors=True)
    shutil.rmtree(root / "images_bench_masked_waterbirds", ignore_errors=True)
    stages = {
        "start-up checks (3 splits, mask headers)": startup,
        f"one epoch of training data, 224 px + masks, {a.workers} workers": epoch,
        f"make-binary-seg, {a.workers} workers": lambda: sum(make_binary_seg(
            root, work / "binseg", progress=False, workers=a.workers).counts.values()),
        f"make-masked, {a.workers} workers": lambda: sum(make_masked(
            root, "gt", "images_bench_masked", progress=False, workers=a.workers).values()),
    }
    if a.seg_checkpoint:
        from bgmask.seg.predict import predict_masks

        stages[f"predict_masks (loop only), {a.workers} decode workers"] = lambda: predict_masks(
            root, work / "pred", a.seg_config, a.seg_checkpoint, device="cpu", progress=False, workers=a.workers)
    rows = []
    for name, fn in stages.items():
        n, seconds = timed(fn)
        if isinstance(n, dict):  # predict_masks' summary: the prediction loop alone
            n, seconds = n["predicted"], n["seconds"]
        rows.append((name, n, seconds))
        print(f"{name}: {n} images in {seconds:.1f} s", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where the tree is generated (once) and the stages write")
    p.add_argument("--num_classes", type=int, default=200, help="200 = CUB's size; fewer to try it")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seg_config", default=None)
    p.add_argument("--seg_checkpoint", default=None, help="a slim segmenter checkpoint: adds predict_masks")
    add_common_args(p)
    a = p.parse_args(argv)
    root = generate(a)
    rows = [make_row("CUB scale", f"{a.num_classes} classes", name, n, seconds, None)
            for name, n, seconds in stage_rows(a, root)]
    made = (root / "done").read_text().strip()
    return emit(rows, f"CUB-scale data stages, {root} (generated in {made}); {machine_line()}", a.json)


if __name__ == "__main__":
    main()
