"""Bodies of the scripts in mmsegmentation/: train, test, predict_masks, gen_masked_image_dataset and
convert_checkpoint. Each `*_main(argv)` returns an exit status; a UserError prints one line, exit 2.

MMSeg's flags keep MMSeg's spelling (`--work-dir`, `--cfg-options`, `--launcher`); bgmask's keep the
underscore spelling with a dashed alias (`--cub_root` / `--cub-root`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from bgmask import args as A
from bgmask.errors import ArgumentParser, UserError, require_dir, run_cli
from bgmask.io import atomic_write_text, remove_stale_temp
from bgmask.runfolder import EVAL_SPLIT, RunFolder, git_revision

SLIM_NAME = "segmenter_slim.pth"
# split -> metric prefix (the classifier side names Waterbirds metrics `waterbirds/...`)
SPLIT_PREFIX = {"val": "val", "test": "test", "waterbird_test": "waterbirds"}
METRIC_KEYS = ("mIoU", "mDice", "IoU.bird", "Dice.bird", "aAcc")


# ----------------------------------------------------------------------------------------- flags

def config_args(add_help: bool = False) -> argparse.ArgumentParser:
    """The MMSeg config and how to change it: shared by train.py and test.py."""
    from mmengine.config import DictAction

    p = ArgumentParser(add_help=add_help)
    g = p.add_argument_group("config")
    g.add_argument("config", help="MMSeg config file, e.g. mmsegmentation/configs/segformer/...py")
    g.add_argument("--data-root", "--data_root", dest="data_root", default=None,
                   help="the `bgmask make-binary-seg` output folder (same as --cfg-options data_root=DIR)")
    g.add_argument("--work-dir", "--work_dir", dest="work_dir", default=None,
                   help="logs, checkpoints and results (default ./work_dirs/<config name>)")
    g.add_argument("--cfg-options", "--cfg_options", dest="cfg_options", nargs="+", action=DictAction,
                   help="override config entries, key=value (e.g. train_cfg.max_iters=500 load_from=PATH)")
    g.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                   help="job launcher (pytorch = torchrun); one process with 'none'")
    g.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def train_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train an MMSeg background/bird segmenter; writes WORK_DIR/"
                       f"{SLIM_NAME} (slim inference checkpoint) at the end.",
                       parents=[config_args()])
    p.add_argument("--resume", action="store_true",
                   help="resume from the latest checkpoint in the work dir (our own run: unpickled in full)")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision (CUDA only)")
    return p


def test_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="mIoU / mDice of a segmenter on the CUB test split and on the "
                       "Waterbirds images (scored against the CUB test masks).", parents=[config_args()])
    p.add_argument("checkpoint", help=f"slim checkpoint ({SLIM_NAME}) or, with --trust-full-checkpoint, iter_N.pth")
    p.add_argument("--splits", nargs="+", default=["test", "waterbird_test"], choices=list(SPLIT_PREFIX))
    p.add_argument("--out", default=None, help="JSON file of the metrics (default WORK_DIR/test_metrics.json)")
    trust_arg(p)
    return p


def trust_arg(p) -> None:
    p.add_argument("--trust-full-checkpoint", "--trust_full_checkpoint", dest="trust_full_checkpoint",
                   action="store_true",
                   help="allow a full mmengine checkpoint (unpickles Python objects: only your own runs)")


def segmenter_args(add_help: bool = False) -> argparse.ArgumentParser:
    """Which segmenter and where it runs: shared by predict_masks.py and gen_masked_image_dataset.py."""
    p = ArgumentParser(add_help=add_help)
    g = p.add_argument_group("segmenter")
    A.add(g, "--config", default=None, help="MMSeg config (default: the one stored in a slim checkpoint)")
    A.add(g, "--checkpoint", required=True, help=f"slim checkpoint ({SLIM_NAME} written by train.py)")
    A.add(g, "--cub_root", required=True, help="CUB_200_2011 root (real or synthetic): ROOT/images, ROOT/images.txt")
    A.add(g, "--out_dir", default=None, help="mask folder: DIR/<image folder>/<relpath>.png (0/255)")
    A.add(g, "--batch_size", type=int, default=16)
    A.add(g, "--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    A.add(g, "--empty_warn_fraction", type=float, default=0.05,
          help="warn when more than this fraction of the predicted masks has no bird pixel")
    A.add(g, "--overwrite", action="store_true", help="replace masks of another segmenter in --out_dir")
    A.add(g, "--no_progress", action="store_true")
    trust_arg(g)
    return p


def predict_parser() -> argparse.ArgumentParser:
    return ArgumentParser(
        description="Predict bird masks for every image of CUB_ROOT/images and of the Waterbirds folder "
                    "(test images); a rerun skips finished files.", parents=[segmenter_args()])


def gen_masked_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="The paper's one step: predict masks with a segmenter, then write masked image copies "
                    "(CUB_ROOT/NAME and CUB_ROOT/NAME_waterbirds).", parents=[segmenter_args()])
    A.add(p, "--out_subdir", default="images_masked_pred", help="NAME of the masked image folder in CUB_ROOT")
    A.add(p, "--mask_fill", default="black", choices=["black", "mean", "blur"])
    return p


def convert_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Slim copy (weights_only-loadable) of a segmenter checkpoint.")
    p.add_argument("src", help="checkpoint to convert, e.g. WORK_DIR/iter_16000.pth")
    p.add_argument("dst", help=f"slim checkpoint to write, e.g. WORK_DIR/{SLIM_NAME}")
    p.add_argument("--config", default=None, help="config to store (default: the one inside SRC)")
    trust_arg(p)
    return p


# ------------------------------------------------------------------------------------- config

def is_unset(value) -> bool:
    return isinstance(value, str) and value.startswith("<unset")


def _datasets(ds: dict):
    """A dataloader's dataset dict and the ones it wraps (RepeatDataset, ConcatDataset)."""
    if not isinstance(ds, dict):
        return
    yield ds
    yield from _datasets(ds.get("dataset"))
    for inner in ds.get("datasets") or []:
        yield from _datasets(inner)


def dataloader_keys(cfg) -> list[str]:
    return [k for k in cfg.keys() if k.endswith("_dataloader") and isinstance(cfg.get(k), dict)]


def fill_data_root(cfg) -> None:
    """Every dataset whose data_root is still the placeholder gets the top-level `data_root`."""
    root = cfg.get("data_root")
    if root is None or is_unset(root):
        return
    for key in dataloader_keys(cfg):
        for ds in _datasets(cfg[key].get("dataset")):
            if is_unset(ds.get("data_root")):
                ds["data_root"] = str(root)


def split_folder(cfg, key: str) -> Path:
    """The image folder a dataloader reads; UserError when the data root was never set."""
    ds = next(d for d in _datasets(cfg[key].get("dataset")) if "data_prefix" in d or "data_root" in d)
    if is_unset(ds.get("data_root")):
        raise UserError("the data root is not set: pass --data-root DIR (the output of `bgmask make-binary-seg`) "
                        "or --cfg-options data_root=DIR")
    return Path(ds.get("data_root") or "") / (ds.get("data_prefix") or {}).get("img_path", "")


def load_config(ns: argparse.Namespace):
    """Config file + --cfg-options + --data-root, with the data root filled in and the launcher set."""
    import torch

    from bgmask.seg.segmenter import read_config

    cfg = read_config(ns.config)
    if ns.cfg_options:
        try:
            cfg.merge_from_dict(ns.cfg_options)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"--cfg-options: {e}") from None
    if ns.data_root:
        require_dir(ns.data_root, "--data-root (the `bgmask make-binary-seg` output)")
        cfg.data_root = str(Path(ns.data_root).resolve())
    fill_data_root(cfg)
    for key in dataloader_keys(cfg):  # e.g. --cfg-options train_dataloader.num_workers=0
        if not cfg[key].get("num_workers"):
            cfg[key]["persistent_workers"] = False
    cfg.launcher = ns.launcher
    if ns.launcher != "none":
        os.environ.setdefault("LOCAL_RANK", str(ns.local_rank))
    if not torch.cuda.is_available():
        # CPU processes: gloo, and BN stays BN (torch's SyncBatchNorm runs on GPUs only)
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
        cfg.sync_bn = None
        if ns.launcher != "none":
            _init_cpu_distributed(ns.launcher)
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
    cfg.work_dir = ns.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(ns.config).stem)
    return cfg


def _init_cpu_distributed(launcher: str) -> None:
    """mmengine's pytorch launcher always calls torch.cuda.set_device; on CPU start gloo ourselves."""
    import torch.distributed as dist

    if launcher != "pytorch":
        raise UserError(f"--launcher {launcher} needs GPUs; on CPU use torchrun with --launcher pytorch")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("--launcher pytorch: RANK / WORLD_SIZE are not set (start the script with torchrun)")
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def _unwrap(model):
    from mmengine.model import is_model_wrapper

    return model.module if is_model_wrapper(model) else model


def _is_main() -> bool:
    from mmengine.dist import is_main_process

    return is_main_process()


def _run_folder(work_dir: str | Path, name: str) -> RunFolder:
    """The work dir as a run folder (written by rank 0 only), with NAME_command.txt and git_revision.txt."""
    folder = RunFolder(work_dir, enabled=_is_main(), flag="--work-dir")
    folder.write_provenance(name)
    return folder


# -------------------------------------------------------------------------------------- train

@run_cli
def train_main(argv=None) -> int:
    from bgmask.seg import compat

    compat.install()
    ns = train_parser().parse_args(argv)
    import torch
    from mmengine.runner import Runner

    from bgmask.seg.checkpoint import save_slim, trusted_full_checkpoints
    from bgmask.seg.segmenter import check_binary

    cfg = load_config(ns)
    check_binary(cfg, f"config {ns.config}")
    require_dir(split_folder(cfg, "train_dataloader"), "training image folder")
    if cfg.get("val_dataloader") and not split_folder(cfg, "val_dataloader").is_dir():
        print(f"note: no validation split ({split_folder(cfg, 'val_dataloader')} is missing); training without it")
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    if ns.amp:
        if not torch.cuda.is_available():
            raise UserError("--amp needs a CUDA device (mmengine's AmpOptimWrapper); none is available")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    cfg.resume = ns.resume
    runner = Runner.from_cfg(cfg)
    _run_folder(cfg.work_dir, "train")
    t0 = time.perf_counter()
    trusted = trusted_full_checkpoints(cfg.work_dir) if ns.resume else contextlib.nullcontext()
    with trusted:
        runner.train()
    seconds = time.perf_counter() - t0
    if _is_main():
        meta = runner.train_dataloader.dataset.metainfo
        slim = save_slim(Path(cfg.work_dir) / SLIM_NAME, _unwrap(runner.model).state_dict(),
                         {"classes": list(meta["classes"]), "palette": [list(c) for c in meta["palette"]]},
                         cfg.pretty_text, iter=runner.iter, train_seconds=round(seconds, 1))
        print(f"trained {runner.iter} iterations in {seconds:.1f} s; slim checkpoint: {slim}")
    return 0


# --------------------------------------------------------------------------------------- test

def _run_split(runner, cfg, split: str) -> dict:
    """Test one split with the runner's model. mmengine builds one test loop per runner; swapping its
    dataloader/evaluator settings keeps one model, one log and the usual hooks for every split."""
    runner._test_dataloader = cfg[f"{split}_dataloader"]
    runner._test_evaluator = cfg.get(f"{split}_evaluator") or cfg.test_evaluator
    runner._test_loop = cfg.get("test_cfg") or dict(type="TestLoop")
    return runner.test()


def metrics_markdown(record: dict, splits: list[str], title: str) -> str:
    lines = [f"### {title}", "", "| split | images | mIoU | mDice | bird IoU | bird Dice | aAcc |",
             "|---|---|---|---|---|---|---|"]
    for split in splits:
        p = SPLIT_PREFIX[split]
        if f"{p}/mIoU" not in record:
            continue
        vals = " | ".join(f"{record.get(f'{p}/{k}', float('nan')):.4f}" for k in METRIC_KEYS)
        lines.append(f"| {split} | {record.get(f'{p}/num_images', '')} | {vals} |")
    return "\n".join(lines) + "\n"


@run_cli
def test_main(argv=None) -> int:
    from bgmask.seg import compat

    compat.install()
    ns = test_parser().parse_args(argv)
    from mmengine.runner import Runner

    from bgmask.seg.checkpoint import load_checkpoint_file, state_dict_and_meta
    from bgmask.seg.segmenter import _load_weights, check_binary

    cfg = load_config(ns)
    where = f"config {ns.config}"
    check_binary(cfg, where)
    state_dict, _ = state_dict_and_meta(load_checkpoint_file(ns.checkpoint, trust_full=ns.trust_full_checkpoint),
                                        ns.checkpoint)
    splits = _present_splits(cfg, ns.splits, where)
    cfg.load_from = None
    cfg.resume = False
    cfg.test_dataloader = cfg[f"{splits[0]}_dataloader"]
    runner = Runner.from_cfg(cfg)
    _load_weights(_unwrap(runner.model), state_dict, where)
    record = {"config": str(ns.config), "checkpoint": str(ns.checkpoint), "data_root": cfg.get("data_root")}
    for split in splits:
        t0 = time.perf_counter()
        metrics = _run_split(runner, cfg, split)
        p = SPLIT_PREFIX[split]
        record[f"{p}/num_images"] = len(runner.test_dataloader.dataset)
        record[f"{p}/seconds"] = round(time.perf_counter() - t0, 2)
        for k in METRIC_KEYS:
            if k in metrics:
                record[f"{p}/{k}"] = round(float(metrics[k]) / 100.0, 6)  # MMSeg reports percent
    if _is_main():
        _write_test_results(ns, cfg, record, splits)
    return 0


def _present_splits(cfg, names: list[str], where: str) -> list[str]:
    """The requested splits whose image folder exists; a missing Waterbirds folder is skipped with a note."""
    splits = []
    for split in names:
        if not cfg.get(f"{split}_dataloader"):
            raise UserError(f"{where} defines no {split}_dataloader")
        folder = split_folder(cfg, f"{split}_dataloader")
        if folder.is_dir():
            splits.append(split)
        elif split == "waterbird_test":
            print(f"note: {folder} is missing (no Waterbirds folder when the dataset was made); skipping it")
        else:
            raise UserError(f"{split} image folder not found: {folder} (expected the `bgmask make-binary-seg` layout)")
    return splits


def _write_test_results(ns: argparse.Namespace, cfg, record: dict, splits: list[str]) -> None:
    """test_command.txt + git_revision.txt, the metrics JSON (--out) and a `split: "eval"` line of
    WORK_DIR/results.jsonl; then the Markdown table. Rank 0 only."""
    folder = _run_folder(cfg.work_dir, "test")
    record["command"] = shlex.join([sys.executable, *sys.argv])
    record["git_revision"] = git_revision()
    out = Path(ns.out) if ns.out else Path(cfg.work_dir) / "test_metrics.json"
    atomic_write_text(out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    folder.log({**record, "split": EVAL_SPLIT})
    print(metrics_markdown(record, splits, f"{Path(ns.config).stem} ({ns.checkpoint})"))
    print(f"wrote {out}")


# ------------------------------------------------------------------------------------ predict

def _image_hw(path: Path) -> tuple[int, int]:
    """(h, w) from the image header (no decoding); (0, 0) when unreadable (load_rgb reports it later)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Exception:  # noqa: BLE001
        return 0, 0


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def predict_masks(cub_root: str | Path, out_dir: str | Path, config: str | None, checkpoint: str | Path,
                  batch_size: int = 16, device: str = "auto", empty_warn_fraction: float = 0.05,
                  overwrite: bool = False, trust_full_checkpoint: bool = False, progress: bool = True) -> dict:
    """Write DIR/images/<rel>.png for every image and DIR/<Waterbirds folder>/<rel>.png for the test
    images of the Waterbirds folder (0 = background, 255 = bird, the image's size), one atomic file at a
    time; files already there are kept. Returns a summary (counts, images/s, coverage)."""
    from bgmask.data.cub import read_cub_metadata
    from bgmask.distributed import resolve_device
    from bgmask.seg.segmenter import load_segmenter

    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    root, out = Path(cub_root), Path(out_dir)
    meta = read_cub_metadata(root)
    require_dir(root / "images", "CUB image folder")
    ckpt = Path(checkpoint)
    seg = load_segmenter(config, ckpt, device=resolve_device(device), batch_size=batch_size,
                         trust_full_checkpoint=trust_full_checkpoint)
    info = {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": _file_digest(ckpt),
            "config": str(Path(config).resolve()) if config else None}
    _claim_mask_folder(out, info, overwrite)
    jobs = _mask_jobs(root, out, meta)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(out, recursive=True)  # half-written files of a killed run
    atomic_write_text(out / "predict_info.json", json.dumps(info, indent=2) + "\n")
    todo = [(src, dst) for src, dst in jobs if not dst.is_file()]
    todo.sort(key=lambda job: (_image_hw(job[0]), str(job[0])))  # equal sizes batch together
    t0 = time.perf_counter()
    coverage = _predict_and_save(seg, todo, batch_size, progress)
    return _predict_summary(out, len(jobs), len(todo), coverage, time.perf_counter() - t0, empty_warn_fraction)


def _claim_mask_folder(out: Path, info: dict, overwrite: bool) -> None:
    """A mask folder of another checkpoint: UserError, or with `overwrite` its masks are removed."""
    from bgmask.data.cub import WATERBIRDS_SUBDIR

    info_path = out / "predict_info.json"
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        if old.get("checkpoint_sha256") != info["checkpoint_sha256"]:
            if not overwrite:
                raise UserError(f"{out} holds masks of another segmenter ({old.get('checkpoint')}); "
                                "pass --overwrite to replace them or choose another --out_dir")
            for sub in ("images", WATERBIRDS_SUBDIR):
                shutil.rmtree(out / sub, ignore_errors=True)


def _mask_jobs(root: Path, out: Path, meta) -> list[tuple[Path, Path]]:
    """(image, mask file) for every image, then for the test images of the Waterbirds folder."""
    from bgmask.data.cub import WATERBIRDS_SUBDIR, mask_relpath

    jobs = [(root / "images" / meta.relpaths[i], out / "images" / mask_relpath(meta.relpaths[i])) for i in meta.ids]
    if (root / WATERBIRDS_SUBDIR).is_dir():
        test_ids = [i for i in meta.ids if not meta.is_train[i]]
        jobs += [(root / WATERBIRDS_SUBDIR / meta.relpaths[i], out / WATERBIRDS_SUBDIR / mask_relpath(meta.relpaths[i]))
                 for i in test_ids]
    return jobs


def _predict_and_save(seg, todo: list[tuple[Path, Path]], batch_size: int, progress: bool) -> list[float]:
    """Predict and write the masks of `todo` in batches; returns each mask's bird fraction."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from bgmask.data.cub import load_rgb
    from bgmask.io import atomic_save_image

    coverage = []
    bar = tqdm(total=len(todo), desc="predict masks", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        masks = seg.predict_images([load_rgb(src) for src, _ in chunk])  # [(h, w) uint8 {0, 1}]
        for (_, dst), m in zip(chunk, masks):
            atomic_save_image(dst, Image.fromarray((m * 255).astype(np.uint8)))
            coverage.append(float(m.mean()))
        bar.update(len(chunk))
    bar.close()
    return coverage


def _predict_summary(out: Path, total: int, predicted: int, coverage: list[float], seconds: float,
                     empty_warn_fraction: float) -> dict:
    import numpy as np

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


def _print_predict_summary(s: dict) -> None:
    if s["predicted"] == 0:
        print(f"all {s['total']} masks already in {s['out_dir']}; nothing to do")
    else:
        print(f"predicted {s['predicted']} masks ({s['skipped']} already there) in {s['seconds']:.1f} s: "
              f"{s['images_per_s']} images/s; bird coverage {100 * s['mean_coverage']:.1f}% of pixels on average, "
              f"{s['empty']} empty masks; written to {s['out_dir']}")
    if s["warning"]:
        print(f"WARNING: {s['warning']}", file=sys.stderr)


@run_cli
def predict_main(argv=None) -> int:
    ns = predict_parser().parse_args(argv)
    if not ns.out_dir:
        raise UserError("--out_dir is required (the mask folder to write)")
    s = predict_masks(ns.cub_root, ns.out_dir, ns.config, ns.checkpoint, ns.batch_size, ns.device,
                      ns.empty_warn_fraction, ns.overwrite, ns.trust_full_checkpoint, not ns.no_progress)
    _print_predict_summary(s)
    return 0


@run_cli
def gen_masked_main(argv=None) -> int:
    from bgmask.masking.make_masked import check_out_subdir, make_masked

    ns = gen_masked_parser().parse_args(argv)
    check_out_subdir(Path(ns.cub_root), ns.out_subdir)  # before the (long) prediction, not after it
    out_dir = ns.out_dir or str(Path(ns.cub_root) / f"{ns.out_subdir}_masks")
    s = predict_masks(ns.cub_root, out_dir, ns.config, ns.checkpoint, ns.batch_size, ns.device,
                      ns.empty_warn_fraction, ns.overwrite, ns.trust_full_checkpoint, not ns.no_progress)
    _print_predict_summary(s)
    counts = make_masked(ns.cub_root, masks=out_dir, out_subdir=ns.out_subdir, fill=ns.mask_fill,
                         progress=not ns.no_progress)
    for sub, n in counts.items():
        print(f"{n} masked images in {Path(ns.cub_root) / sub}")
    return 0


@run_cli
def convert_main(argv=None) -> int:
    from bgmask.seg.checkpoint import convert_to_slim

    ns = convert_parser().parse_args(argv)
    text = None
    if ns.config:
        from bgmask.seg.segmenter import read_config

        text = read_config(ns.config).pretty_text
    dst = convert_to_slim(ns.src, ns.dst, trust_full=ns.trust_full_checkpoint, config_text=text)
    print(f"wrote {dst}")
    return 0
