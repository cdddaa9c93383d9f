"""Masks from a segmenter, for a whole folder of images: predicted mask files (predict_masks.py, and the
first step of gen_masked_image_dataset.py --cub_root) and masked image copies (the paper's
gen_masked_image_dataset.py --data_path).

Both output folders resume file by file and record the segmenter (its checkpoint's SHA-256) and, for the
copies, the fill in a marker (`bgmask.stages.Marker`), so a rerun with another segmenter or fill never
mixes two kinds of files: it is refused, or with `overwrite` the old outputs are replaced.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from bgmask.errors import UserError, require_dir
from bgmask.io import Marker

# what a rerun compares in a folder's marker: the segmenter, and the fill of a masked copy
SEGMENTER_FIELDS = ("checkpoint_sha256", "fill")


@dataclasses.dataclass(frozen=True)
class SegmenterOptions:
    """Which segmenter, how it runs and what a rerun may replace: the flags of `segmenter_args`."""

    checkpoint: str | Path
    config: str | None = None  # None: the config stored in a slim checkpoint
    batch_size: int = 16
    device: str = "auto"
    empty_warn_fraction: float = 0.05  # warn when more of the predicted masks have no bird pixel
    overwrite: bool = False  # replace the outputs of another segmenter (or fill)
    trust_full_checkpoint: bool = False
    progress: bool = True
    workers: int = 0  # DataLoader processes that decode the images

    @classmethod
    def from_args(cls, ns) -> SegmenterOptions:
        return cls(checkpoint=ns.checkpoint, config=ns.config, batch_size=ns.batch_size, device=ns.device,
                   empty_warn_fraction=ns.empty_warn_fraction, overwrite=ns.overwrite,
                   trust_full_checkpoint=ns.trust_full_checkpoint, progress=not ns.no_progress,
                   workers=ns.workers)


@dataclasses.dataclass(frozen=True)
class OutputFolder:
    """A kind of output folder: its marker file, what its files are, and the flag that names the folder."""

    marker: str
    what: str
    flag: str

    def claim(self, out: Path, info: dict, overwrite: bool, clear) -> bool:
        """`Marker.claim` of OUT for the segmenter (and fill) in `info`; `clear(out)` removes the outputs of
        another one when `overwrite` allows it. A folder without the marker is taken as it is."""
        with_fill = "fill" in info

        def refusal(old: dict) -> str:
            made_by = f"{old.get('checkpoint')}, fill {old.get('fill')}" if with_fill else old.get("checkpoint")
            return (f"{out} holds {self.what} of another segmenter{' or fill' if with_fill else ''} ({made_by}); "
                    f"pass --overwrite to replace them or choose another {self.flag}")

        return Marker(out / self.marker, SEGMENTER_FIELDS).claim(
            out, info, overwrite, refusal, text=json.dumps(info, indent=2) + "\n", clear=clear, keep_unmarked=True)


MASK_FOLDER = OutputFolder("predict_info.json", "masks", "--out_dir")
COPY_FOLDER = OutputFolder("masked_copy.json", "masked images", "--save_path")


def _image_hw(path: Path) -> tuple[int, int]:
    """Upright (h, w) from the image header (no decoding); (0, 0) when unreadable (load_rgb reports it later)."""
    from bgmask.data.images import upright_size

    try:
        w, h = upright_size(path)
        return h, w
    except Exception:  # noqa: BLE001
        return 0, 0


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_segmenter(opts: SegmenterOptions):
    """The segmenter, and its provenance (checkpoint path and SHA-256, config) for the output folder."""
    from bgmask.distributed import resolve_device
    from bgmask.seg.segmenter import load_segmenter

    if opts.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {opts.batch_size}")
    ckpt = Path(opts.checkpoint)
    seg = load_segmenter(opts.config, ckpt, device=resolve_device(opts.device), batch_size=opts.batch_size,
                         trust_full_checkpoint=opts.trust_full_checkpoint)
    info = {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": _file_digest(ckpt),
            "config": str(Path(opts.config).resolve()) if opts.config else None}
    return seg, info


def predict_masks(cub_root: str | Path, out_dir: str | Path, config: str | None, checkpoint: str | Path,
                  **options) -> dict:
    """`predict_mask_folder` with the segmenter's options as keywords (the fields of SegmenterOptions:
    batch_size, device, overwrite, progress, workers, ...)."""
    return predict_mask_folder(cub_root, out_dir, SegmenterOptions(checkpoint=checkpoint, config=config, **options))


def predict_mask_folder(cub_root: str | Path, out_dir: str | Path, opts: SegmenterOptions) -> dict:
    """Write DIR/images/<rel>.png for every image and DIR/<Waterbirds folder>/<rel>.png for the test
    images of the Waterbirds folder (0 = background, 255 = bird, the image's size), one atomic file at a
    time; files already there are kept; `opts.workers` DataLoader processes decode the images. Returns a
    summary (counts, images/s, coverage)."""
    from bgmask.data.cub import WATERBIRDS_SUBDIR, read_cub_metadata

    root, out = Path(cub_root), Path(out_dir)
    meta = read_cub_metadata(root)
    require_dir(root / "images", "CUB image folder")
    seg, info = _open_segmenter(opts)

    def clear(folder: Path) -> None:  # the masks of another segmenter: this command's sub-folders only
        for sub in ("images", WATERBIRDS_SUBDIR):
            shutil.rmtree(folder / sub, ignore_errors=True)

    MASK_FOLDER.claim(out, info, opts.overwrite, clear)
    return _run_jobs(seg, _mask_jobs(root, out, meta), _write_mask, out, opts)


def mask_image_folder(data_path: str | Path, save_path: str | Path | None, opts: SegmenterOptions,
                      fill: str = "black") -> dict:
    """The paper's gen_masked_image_dataset.py: every DATA_PATH/<class folder>/<file>.jpg is segmented and
    written as SAVE_PATH/<class folder>/<file>.jpg (JPEG) with the background filled (black: the pixels
    whose predicted class is background set to 0), early masking's own fill. A rerun skips finished
    files; SAVE_PATH/masked_copy.json records the segmenter and the fill. Returns a summary."""
    src, out = _paper_folders(data_path, save_path)
    jobs = [(p, out / p.parent.name / p.name) for p in sorted(src.glob("*/*.jpg"))]
    if not jobs:
        hint = f"; for a CUB root pass --data_path {src / 'images'}" if (src / "images").is_dir() else ""
        raise UserError(f"no .jpg one folder below --data_path {src} (expected {src}/<class folder>/<file>.jpg{hint})")
    seg, info = _open_segmenter(opts)
    info.update(source_images=str(src.resolve()), masks=info["checkpoint"], fill=fill)

    def clear(folder: Path) -> None:  # the copies of another segmenter or fill: every one is written again
        for _, dst in jobs:
            dst.unlink(missing_ok=True)

    COPY_FOLDER.claim(out, info, opts.overwrite, clear)
    return _run_jobs(seg, jobs, functools.partial(_write_masked, fill=fill), out, opts)


def _paper_folders(data_path: str | Path, save_path: str | Path | None) -> tuple[Path, Path]:
    src = require_dir(data_path, "--data_path (the folder that holds the class folders of .jpg)")
    if not save_path:
        raise UserError("--data_path needs --save_path (the output root: SAVE_PATH/<class folder>/<file>.jpg)")
    out = Path(save_path)
    if out.resolve() == src.resolve():
        raise UserError(f"--save_path {out} is --data_path: it would overwrite the images; choose another folder")
    return src, out


def _mask_jobs(root: Path, out: Path, meta) -> list[tuple[Path, Path]]:
    """(image, mask file) for every image, then for the test images of the Waterbirds folder."""
    from bgmask.data.cub import WATERBIRDS_SUBDIR, mask_relpath

    jobs = [(root / "images" / meta.relpaths[i], out / "images" / mask_relpath(meta.relpaths[i])) for i in meta.ids]
    if (root / WATERBIRDS_SUBDIR).is_dir():
        test_ids = [i for i in meta.ids if not meta.is_train[i]]
        jobs += [(root / WATERBIRDS_SUBDIR / meta.relpaths[i], out / WATERBIRDS_SUBDIR / mask_relpath(meta.relpaths[i]))
                 for i in test_ids]
    return jobs


def _write_mask(image, mask, dst: Path) -> None:
    """The mask itself: PNG, 0 = background, 255 = bird."""
    import numpy as np
    from PIL import Image

    from bgmask.io import atomic_save_image

    atomic_save_image(dst, Image.fromarray((mask * 255).astype(np.uint8)))


def _write_masked(image, mask, dst: Path, fill: str = "black") -> None:
    """The image with its background filled (`bgmask.masking.make_masked.masked_pixels`)."""
    from bgmask.io import atomic_save_image
    from bgmask.masking.make_masked import masked_pixels

    atomic_save_image(dst, masked_pixels(image, mask, fill))


def _run_jobs(seg, jobs: list[tuple[Path, Path]], write, out: Path, opts: SegmenterOptions) -> dict:
    """Segment the source image of every (source, output) job whose output is missing and
    `write(image, mask, output)`; returns the summary."""
    todo = [(src, dst) for src, dst in jobs if not dst.is_file()]
    todo.sort(key=lambda job: (_image_hw(job[0]), str(job[0])))  # equal sizes batch together
    t0 = time.perf_counter()
    coverage = _predict_and_save(seg, todo, write, opts)
    return _predict_summary(out, len(jobs), coverage, time.perf_counter() - t0, opts.empty_warn_fraction)


class _DecodedImages:
    """The (image, output) jobs as a map-style dataset: (upright RGB (h, w, 3) uint8, output path)."""

    def __init__(self, todo: list[tuple[Path, Path]]):
        self.todo = todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, i: int):
        import numpy as np

        from bgmask.data.cub import load_rgb

        src, dst = self.todo[i]
        return np.array(load_rgb(src)), dst


def _as_list(batch: list) -> list:
    return batch


def _predict_and_save(seg, todo: list[tuple[Path, Path]], write, opts: SegmenterOptions) -> list[float]:
    """Predict the masks of `todo` in batches of consecutive jobs (sorted by size) and write each output;
    `opts.workers` DataLoader processes decode the next batches meanwhile. Returns each mask's bird
    fraction."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from bgmask.processes import unblock_sigint

    size, workers = opts.batch_size, opts.workers
    batches = [list(range(i, min(i + size, len(todo)))) for i in range(0, len(todo), size)]
    loader = DataLoader(_DecodedImages(todo), batch_sampler=batches, num_workers=workers, collate_fn=_as_list,
                        prefetch_factor=4 if workers else None, worker_init_fn=unblock_sigint)
    coverage = []
    bar = tqdm(total=len(todo), desc="predict masks", unit="img", disable=not opts.progress)
    for chunk in loader:
        masks = seg.predict_images([image for image, _ in chunk])  # [(h, w) uint8 {0, 1}], 1 = bird
        for (image, dst), m in zip(chunk, masks):
            write(image, m, dst)
            coverage.append(float(m.mean()))
        bar.update(len(chunk))
    bar.close()
    return coverage


def _predict_summary(out: Path, total: int, coverage: list[float], seconds: float,
                     empty_warn_fraction: float) -> dict:
    """Counts, speed and bird coverage of one run; `coverage` holds one entry per predicted mask."""
    import numpy as np

    predicted = len(coverage)
    cov = np.array(coverage) if coverage else np.zeros(0)
    summary = {
        "out_dir": str(out), "total": total, "predicted": predicted, "skipped": total - predicted,
        "seconds": round(seconds, 2),
        "images_per_s": round(predicted / seconds, 1) if predicted and seconds > 0 else None,
        "mean_coverage": round(float(cov.mean()), 4) if cov.size else None,
        "empty": int((cov == 0).sum()), "empty_fraction": round(float((cov == 0).mean()), 4) if cov.size else None,
    }
    summary["warning"] = None
    if cov.size and summary["empty_fraction"] > empty_warn_fraction:
        summary["warning"] = (
            f"{summary['empty']} of {cov.size} predicted masks ({100 * summary['empty_fraction']:.0f}%) have no bird "
            "pixel: the segmenter looks undertrained, and early masking with these masks would black out whole "
            "images. Check it with mmsegmentation/test.py before using the masks.")
    return summary


def print_predict_summary(s: dict, what: str = "masks") -> None:
    if s["predicted"] == 0:
        print(f"all {s['total']} {what} already in {s['out_dir']}; nothing to do")
    else:
        print(f"predicted {s['predicted']} masks ({s['skipped']} already there) in {s['seconds']:.1f} s: "
              f"{s['images_per_s']} images/s; bird coverage {100 * s['mean_coverage']:.1f}% of pixels on average, "
              f"{s['empty']} empty masks; written to {s['out_dir']}")
    if s["warning"]:
        print(f"WARNING: {s['warning']}", file=sys.stderr)
