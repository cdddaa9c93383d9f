"""Bodies of the scripts in mmsegmentation/: train, test, predict_masks, gen_masked_image_dataset and
convert_checkpoint, and their flags. Each `*_main(argv)` returns an exit status; a UserError prints one
line, exit 2. The config they run with comes from `bgmask.seg.config`, the masks from `bgmask.seg.predict`.

MMSeg's flags keep MMSeg's spelling (`--work-dir`, `--cfg-options`, `--launcher`); bgmask's keep the
underscore spelling with a dashed alias (`--cub_root` / `--cub-root`). The paper's command lines run
as pasted (mmsegmentation/README.md, "The paper's commands"): `--launcher pytorch` outside a
launcher's environment is one process, a config's own `data_root` is used, and
gen_masked_image_dataset.py takes the paper's `--data_path/--config_file/--checkpoint_file/--save_path`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path

from bgmask import args as A
from bgmask.errors import ArgumentParser, UserError, require_dir, run_cli
from bgmask.io import atomic_write_text
from bgmask.runfolder import EVAL_SPLIT, RunFolder, git_revision, hold_folder
from bgmask.seg.config import LAUNCHER_ENV, load_config, require_data_root, split_folder
from bgmask.seg.predict import SegmenterOptions, mask_image_folder, predict_mask_folder, print_predict_summary

SLIM_NAME = "segmenter_slim.pth"
DEFAULT_OUT_SUBDIR = "images_masked_pred"
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
                   help="the `bgmask make-binary-seg` output folder (same as --cfg-options data_root=DIR); "
                        "default: the config's own data_root")
    A.add(g, "--work-dir", "--work_dir", dest="work_dir", default=None, output="folder",
          help="logs, checkpoints and results (default ./work_dirs/<config name>)")
    g.add_argument("--cfg-options", "--cfg_options", dest="cfg_options", nargs="+", action=DictAction,
                   help="override config entries, key=value (e.g. train_cfg.max_iters=500 load_from=PATH)")
    g.add_argument("--launcher", choices=list(LAUNCHER_ENV), default="none",
                   help="job launcher: pytorch under torchrun or `python -m torch.distributed.launch "
                        "--use_env` (without their environment: one process); none = one process")
    A.add(g, "--local_rank", type=int, default=0, range="[0, inf)",
          help="set by torch.distributed.launch without --use_env; becomes LOCAL_RANK")
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
    A.add(p, "--out", default=None, output="file", help="JSON file of the metrics (default WORK_DIR/test_metrics.json)")
    trust_arg(p)
    return p


def trust_arg(p) -> None:
    p.add_argument("--trust-full-checkpoint", "--trust_full_checkpoint", dest="trust_full_checkpoint",
                   action="store_true",
                   help="allow a full mmengine checkpoint (unpickles Python objects: only your own runs)")


def segmenter_args(add_help: bool = False) -> argparse.ArgumentParser:
    """Which segmenter and where it runs: shared by predict_masks.py and gen_masked_image_dataset.py.
    `--config_file` / `--checkpoint_file` are the paper's spellings of `--config` / `--checkpoint`."""
    p = ArgumentParser(add_help=add_help)
    g = p.add_argument_group("segmenter")
    A.add(g, "--config", "--config_file", "--config-file", default=None,
          help="MMSeg config (default: the one stored in a slim checkpoint)")
    A.add(g, "--checkpoint", "--checkpoint_file", "--checkpoint-file", required=True,
          help=f"slim checkpoint ({SLIM_NAME} written by train.py) or, with --trust_full_checkpoint, "
               "a full mmengine one (iter_N.pth)")
    A.add(g, "--out_dir", default=None, output="folder", help="mask folder: DIR/<image folder>/<relpath>.png (0/255)")
    A.add(g, "--batch_size", type=int, default=16, range="[1, inf)")
    A.add(g, "--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    A.add(g, "--empty_warn_fraction", type=float, default=0.05, range="[0, 1]",
          help="warn when more than this fraction of the predicted masks has no bird pixel")
    A.add(g, "--overwrite", action="store_true", help="replace the outputs of another segmenter")
    A.add(g, "--no_progress", action="store_true")
    A.workers_arg(g)
    trust_arg(g)
    return p


def cub_root_arg(group, required: bool = False) -> None:
    A.add(group, "--cub_root", required=required,
          help="CUB_200_2011 root (real or synthetic): ROOT/images, ROOT/images.txt")


def predict_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Predict bird masks for every image of CUB_ROOT/images and of the Waterbirds folder "
                    "(test images); a rerun skips finished files.", parents=[segmenter_args()])
    cub_root_arg(p, required=True)
    return p


GEN_MASKED_EPILOG = """two ways to call it:
  the paper's:  --data_path FOLDER --config_file CONFIG --checkpoint_file CKPT --save_path OUT
      FOLDER directly holds class sub-folders of .jpg (CUB_200_2011/images, or the Waterbirds folder);
      writes OUT/<class folder>/<file>.jpg with the background (predicted class 0) black.
      The paper's iter_160000.pth is a full mmengine checkpoint: add --trust_full_checkpoint.
  bgmask's:     --cub_root ROOT --config CONFIG --checkpoint CKPT [--out_subdir NAME] [--out_dir MASKS]
      predicts masks into MASKS (default ROOT/NAME_masks), then writes ROOT/NAME/<rel> for every
      image and ROOT/NAME_waterbirds/<rel> for the Waterbirds test images.
Both skip finished files on a rerun."""


def gen_masked_parser() -> argparse.ArgumentParser:
    from bgmask.masking.strategies import MASK_FILLS

    p = ArgumentParser(
        description="Mask out images using a segmenter: predict masks, then write masked image copies.",
        epilog=GEN_MASKED_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[segmenter_args()])
    g = p.add_argument_group("images in and out (the paper's flags or bgmask's)")
    src = g.add_mutually_exclusive_group(required=True)
    A.add(src, "--data_path", help="the paper's input: the folder that directly holds class sub-folders "
                                   "of .jpg (e.g. CUB_200_2011/images or the Waterbirds folder)")
    cub_root_arg(src)
    A.add(g, "--save_path", output="folder", help="with --data_path: output root, written as SAVE_PATH/<class folder>/<file>.jpg")
    A.add(g, "--out_subdir", default=None, help="with --cub_root: NAME of the masked image folder in CUB_ROOT "
                                                f"(default {DEFAULT_OUT_SUBDIR})")
    A.add(g, "--mask_fill", default="black", choices=list(MASK_FILLS),
          help="background fill (the paper: black)")
    return p


def convert_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Slim copy (weights_only-loadable) of a segmenter checkpoint.")
    p.add_argument("src", help="checkpoint to convert, e.g. WORK_DIR/iter_16000.pth")
    A.add(p, "dst", output="file", help=f"slim checkpoint to write, e.g. WORK_DIR/{SLIM_NAME}")
    p.add_argument("--config", default=None, help="config to store (default: the one inside SRC)")
    trust_arg(p)
    return p


# ------------------------------------------------------------------------------------- runs

def _unwrap(model):
    from mmengine.model import is_model_wrapper

    return model.module if is_model_wrapper(model) else model


def _is_main() -> bool:
    from mmengine.dist import is_main_process

    return is_main_process()


def _run_folder(work_dir: str | Path, name: str, command: list[str]) -> RunFolder:
    """The work dir as a run folder (written by rank 0 only), with NAME_command.txt and git_revision.txt."""
    folder = RunFolder(work_dir, enabled=_is_main(), flag="--work-dir")
    folder.write_provenance(name, command)
    return folder


def _command(script: str, argv: list[str] | None) -> list[str]:
    """The command line to record: this process's, or, for a main called with an argv (the demo trains its
    segmenter in-process), the equivalent `python mmsegmentation/SCRIPT ARGV` from the repository root."""
    if argv is None:
        return [sys.executable, *sys.argv]
    return [sys.executable, f"mmsegmentation/{script}", *map(str, argv)]


# -------------------------------------------------------------------------------------- train

@run_cli
def train_main(argv=None) -> int:
    from bgmask.seg import compat

    compat.install()
    ns = train_parser().parse_args(argv)
    import torch

    from bgmask.seg.segmenter import check_binary

    cfg = load_config(ns)
    check_binary(cfg, f"config {ns.config}")
    require_data_root(cfg, ns, "train_dataloader")
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
    with hold_folder(cfg.work_dir, "--work-dir", enabled=_is_main()):  # one process writes a work dir at a time
        return _train(cfg, _command("train.py", argv))


def _train(cfg, command: list[str]) -> int:
    from bgmask.seg.checkpoint import save_slim, trusted_full_checkpoints
    from bgmask.seg.compat import build_runner

    runner = build_runner(cfg)
    _run_folder(cfg.work_dir, "train", command)
    t0 = time.perf_counter()
    trusted = trusted_full_checkpoints(cfg.work_dir) if cfg.resume else contextlib.nullcontext()
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
    from bgmask.seg.compat import use_test_split

    use_test_split(runner, cfg[f"{split}_dataloader"], cfg.get(f"{split}_evaluator") or cfg.test_evaluator,
                   cfg.get("test_cfg") or dict(type="TestLoop"))
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
    from bgmask.seg.checkpoint import load_checkpoint_file, state_dict_and_meta
    from bgmask.seg.segmenter import check_binary

    cfg = load_config(ns)
    where = f"config {ns.config}"
    check_binary(cfg, where)
    require_data_root(cfg, ns, "test_dataloader")
    state_dict, _ = state_dict_and_meta(load_checkpoint_file(ns.checkpoint, trust_full=ns.trust_full_checkpoint),
                                        ns.checkpoint)
    splits = _present_splits(cfg, ns.splits, where)
    cfg.load_from = None
    cfg.resume = False
    cfg.test_dataloader = cfg[f"{splits[0]}_dataloader"]
    with hold_folder(cfg.work_dir, "--work-dir", enabled=_is_main()):  # its log, metrics and results line
        return _test(ns, cfg, state_dict, splits, where, _command("test.py", argv))


def _test(ns: argparse.Namespace, cfg, state_dict: dict, splits: list[str], where: str, command: list[str]) -> int:
    from bgmask.seg.compat import build_runner
    from bgmask.seg.segmenter import _load_weights

    runner = build_runner(cfg)
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
        _write_test_results(ns, cfg, record, splits, command)
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


def _write_test_results(ns: argparse.Namespace, cfg, record: dict, splits: list[str], command: list[str]) -> None:
    """test_command.txt + git_revision.txt, the metrics JSON (--out) and a `split: "eval"` line of
    WORK_DIR/results.jsonl; then the Markdown table. Rank 0 only."""
    folder = _run_folder(cfg.work_dir, "test", command)
    record["command"] = shlex.join(command)
    record["git_revision"] = git_revision()
    out = Path(ns.out) if ns.out else Path(cfg.work_dir) / "test_metrics.json"
    atomic_write_text(out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    folder.log({**record, "split": EVAL_SPLIT})
    print(metrics_markdown(record, splits, f"{Path(ns.config).stem} ({ns.checkpoint})"))
    print(f"wrote {out}")


# ------------------------------------------------------------------------------------ predict

@run_cli
def predict_main(argv=None) -> int:
    ns = predict_parser().parse_args(argv)
    if not ns.out_dir:
        raise UserError("--out_dir is required (the mask folder to write)")
    s = predict_mask_folder(ns.cub_root, ns.out_dir, SegmenterOptions.from_args(ns))
    print_predict_summary(s)
    return 0


@run_cli
def gen_masked_main(argv=None) -> int:
    ns = gen_masked_parser().parse_args(argv)
    if ns.data_path is not None:
        return _gen_masked_paper(ns)
    return _gen_masked_cub_root(ns)


def _gen_masked_paper(ns: argparse.Namespace) -> int:
    """--data_path FOLDER --save_path OUT: the paper's layout, OUT/<class folder>/<file>.jpg."""
    if ns.out_dir or ns.out_subdir:
        raise UserError("--out_dir / --out_subdir go with --cub_root; with --data_path the output is --save_path")
    s = mask_image_folder(ns.data_path, ns.save_path, SegmenterOptions.from_args(ns), fill=ns.mask_fill)
    print_predict_summary(s, "masked images")
    return 0


def _gen_masked_cub_root(ns: argparse.Namespace) -> int:
    """--cub_root ROOT: masks into --out_dir, then ROOT/NAME and ROOT/NAME_waterbirds (`bgmask make-masked`)."""
    from bgmask.masking.make_masked import check_out_subdir, make_masked

    if ns.save_path:
        raise UserError("--save_path goes with --data_path (the paper's layout); with --cub_root name the "
                        "output folder with --out_subdir NAME")
    out_subdir = ns.out_subdir or DEFAULT_OUT_SUBDIR
    check_out_subdir(Path(ns.cub_root), out_subdir)  # before the (long) prediction, not after it
    out_dir = ns.out_dir or str(Path(ns.cub_root) / f"{out_subdir}_masks")
    s = predict_mask_folder(ns.cub_root, out_dir, SegmenterOptions.from_args(ns))
    print_predict_summary(s)
    counts = make_masked(ns.cub_root, masks=out_dir, out_subdir=out_subdir, fill=ns.mask_fill,
                         progress=not ns.no_progress, workers=ns.workers)
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
