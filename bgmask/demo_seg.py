"""The demo's segmentation stages: binary-seg dataset -> small MMSeg segmenter -> test mIoU/mDice ->
predicted masks for every image -> early-masked copies. Runs the same code as the scripts in
`mmsegmentation/`, in this process."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bgmask.errors import UserError

SEG_CONFIG = "mmsegmentation/configs/unet/unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py"


def seg_config_path() -> Path:
    path = Path(__file__).resolve().parents[1] / SEG_CONFIG
    if not path.is_file():
        raise UserError(f"segmenter config not found: {path} (run the demo from a checkout of the repository)")
    return path


def _schedule_options(iters: int) -> list[str]:
    warm = max(1, min(50, iters // 10))  # the config's linear warm-up, shortened for short schedules
    return [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}", f"param_scheduler.0.end={warm}",
            f"param_scheduler.1.begin={warm}", f"param_scheduler.1.end={iters}",
            f"default_hooks.checkpoint.interval={iters}", f"default_hooks.logger.interval={max(iters // 5, 1)}",
            "train_dataloader.num_workers=1", "train_dataloader.persistent_workers=False"]


def train_and_test_segmenter(data: Path, seg_dir: Path, p) -> dict:
    from bgmask.data.binary_seg import make_binary_seg
    from bgmask.seg.runner import test_main, train_main

    binseg = seg_dir / "cub_binary_segmentation"
    make_binary_seg(data, binseg, val_fraction=0.1, overwrite=True)
    work = seg_dir / "work_dir"
    config = str(seg_config_path())
    t0 = time.perf_counter()
    rc = train_main([config, "--data-root", str(binseg), "--work-dir", str(work),
                     "--cfg-options", *_schedule_options(p.seg_iters)])
    seconds = time.perf_counter() - t0
    if rc:
        raise UserError(f"segmenter training failed (exit {rc}); see {work}")
    out = seg_dir / "test_metrics.json"
    rc = test_main([config, str(work / "segmenter_slim.pth"), "--data-root", str(binseg), "--work-dir", str(work),
                    "--out", str(out), "--cfg-options", "test_dataloader.num_workers=0",
                    "test_dataloader.persistent_workers=False"])
    if rc:
        raise UserError(f"segmenter evaluation failed (exit {rc}); see {work}")
    metrics = json.loads(out.read_text())
    result = {"checkpoint": str(work / "segmenter_slim.pth"), "config": config, "seconds": seconds}
    for split, prefix in (("test", "test"), ("waterbird_test", "waterbirds")):
        keys = [k for k in metrics if k.startswith(prefix + "/")]
        if keys:
            result[split] = {"mIoU": 100 * metrics.get(f"{prefix}/mIoU", float("nan")),
                             "mDice": 100 * metrics.get(f"{prefix}/mDice", float("nan"))}
    return result


def predict_and_copy(data: Path, seg_dir: Path, pred_masks: Path, p) -> dict:
    from bgmask.masking.make_masked import make_masked
    from bgmask.seg.runner import predict_masks

    summary = predict_masks(data, pred_masks, str(seg_config_path()), seg_dir / "work_dir" / "segmenter_slim.pth",
                            batch_size=64, device="cpu", overwrite=True)
    counts = make_masked(data, masks=str(pred_masks), out_subdir="images_masked_pred")
    return {"predict": {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, "masked": counts}
