"""The demo's segmentation stages: binary-seg dataset -> small MMSeg segmenter -> test mIoU/mDice ->
predicted masks for every image -> early-masked copies. Runs the same code as the scripts in
`mmsegmentation/`, in this process; their output (mmengine's environment dump, config, hooks and
per-iteration logs) goes to a log file in the segmentation folder, and each stage prints one line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from bgmask.errors import UserError

SEG_CONFIG = "mmsegmentation/configs/unet/unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py"


def seg_config_path() -> Path:
    path = Path(__file__).resolve().parents[2] / SEG_CONFIG
    if not path.is_file():
        raise UserError(f"segmenter config not found: {path} (run the demo from a checkout of the repository)")
    return path


def _schedule_options(iters: int) -> list[str]:
    warm = max(1, min(50, iters // 10))  # the config's linear warm-up, shortened for short schedules
    return [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}", f"param_scheduler.0.end={warm}",
            f"param_scheduler.1.begin={warm}", f"param_scheduler.1.end={iters}",
            f"default_hooks.checkpoint.interval={iters}", f"default_hooks.logger.interval={max(iters // 5, 1)}",
            "train_dataloader.num_workers=1", "train_dataloader.persistent_workers=False"]


def _stream_handlers() -> list[logging.StreamHandler]:
    """The console handlers of Python's loggers and of mmengine's MMLogger instances (not file handlers)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    mm = sys.modules.get("mmengine.logging")
    if mm is not None:
        loggers += list(mm.MMLogger._instance_dict.values())
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def output_to(log_path: Path):
    """Everything the block prints goes to `log_path`: the stdout / stderr file descriptors (C code,
    subprocesses), Python's sys.stdout / sys.stderr and every logger's console handler, including the
    MMLogger handlers created inside the block. An exception (e.g. a UserError) leaves the block with
    the terminal restored, so its one line reaches the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:
        saved_fds = os.dup(1), os.dup(2)
        handlers = {h: h.stream for h in _stream_handlers()}
        for h in handlers:
            h.setStream(log)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            yield
        finally:
            sys.stdout, sys.stderr = streams
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
            for h in _stream_handlers():  # handlers made inside the block: to the terminal from now on
                if h in handlers or h.stream is log:
                    h.setStream(handlers.get(h, streams[0]))


def train_and_test_segmenter(data: Path, seg_dir: Path, p) -> dict:
    """Train the small segmenter and test it (mIoU / mDice); the MMSeg output goes to SEG_DIR/segmenter.log."""
    from bgmask.data.binary_seg import make_binary_seg
    from bgmask.seg.cli import test_main, train_main

    binseg = seg_dir / "cub_binary_segmentation"
    make_binary_seg(data, binseg, val_fraction=0.1, overwrite=True, progress=False)
    work = seg_dir / "work_dir"
    config = str(seg_config_path())
    out = seg_dir / "test_metrics.json"
    log = seg_dir / "segmenter.log"
    with output_to(log):  # the unwrapped mains raise a UserError instead of printing it into the log
        t0 = time.perf_counter()
        train_main.__wrapped__([config, "--data-root", str(binseg), "--work-dir", str(work),
                                "--cfg-options", *_schedule_options(p.seg_iters)])
        seconds = time.perf_counter() - t0
        test_main.__wrapped__([config, str(work / "segmenter_slim.pth"), "--data-root", str(binseg),
                               "--work-dir", str(work), "--out", str(out), "--cfg-options",
                               "test_dataloader.num_workers=0", "test_dataloader.persistent_workers=False"])
    metrics = json.loads(out.read_text())
    result = {"checkpoint": str(work / "segmenter_slim.pth"), "config": config, "seconds": seconds}
    for split, prefix in (("test", "test"), ("waterbird_test", "waterbirds")):
        keys = [k for k in metrics if k.startswith(prefix + "/")]
        if keys:
            result[split] = {"mIoU": 100 * metrics.get(f"{prefix}/mIoU", float("nan")),
                             "mDice": 100 * metrics.get(f"{prefix}/mDice", float("nan"))}
    result["log"] = str(log)
    return result


def describe_segmenter(result: dict) -> str:
    """The segmenter stage's one line (bgmask.stages.Stages)."""
    scores = " / ".join(f"{result[split]['mIoU']:.1f} {name}"
                        for split, name in (("test", "test"), ("waterbird_test", "Waterbirds")) if split in result)
    return f"mIoU {scores}, trained in {result['seconds']:.0f} s (log: {result.get('log')})"


def predict_and_copy(data: Path, seg_dir: Path, pred_masks: Path, p) -> dict:
    """Predicted masks for every image, then the early-masked copies; the output goes to SEG_DIR/predict_masks.log."""
    from bgmask.masking.make_masked import make_masked
    from bgmask.seg.predict import predict_masks

    log = seg_dir / "predict_masks.log"
    with output_to(log):
        summary = predict_masks(data, pred_masks, str(seg_config_path()), seg_dir / "work_dir" / "segmenter_slim.pth",
                                batch_size=64, device="cpu", overwrite=True)
        counts = make_masked(data, masks=str(pred_masks), out_subdir="images_masked_pred")
    return {"predict": {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, "masked": counts,
            "log": str(log)}


def describe_masks(result: dict) -> str:
    """The masks stage's one line (bgmask.stages.Stages)."""
    s = result["predict"]
    coverage = f"{100 * s['mean_coverage']:.1f}%" if s.get("mean_coverage") is not None else "-"
    return (f"{s['predicted']} predicted (bird coverage {coverage}, {s['empty']} empty), "
            f"{sum(result['masked'].values())} masked copies (log: {result.get('log')})")
