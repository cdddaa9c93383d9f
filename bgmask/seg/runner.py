"""Bodies of the scripts in mmsegmentation/: train, test, predict_masks, gen_masked_image_dataset and
convert_checkpoint. Each `*_main(argv)` returns an exit status; a UserError prints one line, exit 2.

MMSeg's flags keep MMSeg's spelling (`--work-dir`, `--cfg-options`, `--launcher`); bgmask's keep the
underscore spelling with a dashed alias (`--cub_root` / `--cub-root`). The paper's command lines run
as pasted (mmsegmentation/README.md, "The paper's commands"): `--launcher pytorch` outside a
launcher's environment is one process, a config's own `data_root` is used, and
gen_masked_image_dataset.py takes the paper's `--data_path/--config_file/--checkpoint_file/--save_path`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from bgmask import args as A
from bgmask.errors import ArgumentParser, UserError, require_dir, run_cli
from bgmask.runfolder import hold_folder
from bgmask.io import atomic_write_text, file_sha256, read_json_object, remove_stale_temp
from bgmask.runfolder import EVAL_SPLIT, RunFolder, git_revision

SLIM_NAME = "segmenter_slim.pth"
DEFAULT_OUT_SUBDIR = "images_masked_pred"
# split -> metric prefix (the classifier side names Waterbirds metrics `waterbirds/...`)
SPLIT_PREFIX = {"val": "val", "test": "test", "waterbird_test": "waterbirds"}
METRIC_KEYS = ("mIoU", "mDice", "IoU.bird", "Dice.bird", "aAcc")
# launcher -> the environment variables its processes are started with
LAUNCHER_ENV = {"none": (), "pytorch": ("RANK", "WORLD_SIZE"), "slurm": ("SLURM_PROCID", "SLURM_NTASKS"),
                "mpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")}


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


def fill_data_root(cfg, config_root=None) -> None:
    """Every dataset whose data_root is the placeholder or the config file's own `config_root` gets the
    top-level `data_root` (the paper's configs copy the path into each dataset; bgmask's leave the
    placeholder), so --data-root and --cfg-options data_root=DIR reach every dataloader."""
    root = cfg.get("data_root")
    if root is None or is_unset(root):
        return
    for key in dataloader_keys(cfg):
        for ds in _datasets(cfg[key].get("dataset")):
            if is_unset(ds.get("data_root")) or (config_root is not None and ds.get("data_root") == config_root):
                ds["data_root"] = str(root)


def _split_dataset(cfg, key: str) -> dict:
    return next(d for d in _datasets(cfg[key].get("dataset")) if "data_prefix" in d or "data_root" in d)


def split_folder(cfg, key: str) -> Path:
    """The image folder a dataloader reads; UserError when the data root was never set."""
    ds = _split_dataset(cfg, key)
    if is_unset(ds.get("data_root")):
        raise UserError("the data root is not set: pass --data-root DIR (the output of `bgmask make-binary-seg`) "
                        "or --cfg-options data_root=DIR")
    return Path(ds.get("data_root") or "") / (ds.get("data_prefix") or {}).get("img_path", "")


def require_data_root(cfg, ns: argparse.Namespace, key: str) -> None:
    """One line naming --data-root and the config's data_root when the dataloader's root is not a folder."""
    root = _split_dataset(cfg, key).get("data_root")
    if root is not None and not is_unset(root) and Path(root).is_dir():
        return
    config = Path(ns.config).name
    if root is None or is_unset(root):
        problem = f"no data root: no --data-root given and the config {config} sets no data_root"
    elif ns.data_root:
        problem = f"data root not found: {root} (from --data-root)"
    else:
        problem = f"data root not found: {root} (the data_root of the config {config}; no --data-root given)"
    raise UserError(f"{problem}; pass --data-root DIR (the `bgmask make-binary-seg` output) or set "
                    "data_root in the config")


def load_config(ns: argparse.Namespace):
    """Config file + --cfg-options + --data-root, with the data root filled in and the launcher set."""
    import torch

    from bgmask.seg.segmenter import read_config

    cfg = read_config(ns.config)
    config_root = cfg.get("data_root")
    if ns.cfg_options:
        try:
            cfg.merge_from_dict(ns.cfg_options)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"--cfg-options: {e}") from None
    if ns.data_root:
        require_dir(ns.data_root, "--data-root (the `bgmask make-binary-seg` output)")
        cfg.data_root = str(Path(ns.data_root).resolve())
    fill_data_root(cfg, config_root)
    for key in dataloader_keys(cfg):  # e.g. --cfg-options train_dataloader.num_workers=0
        if not cfg[key].get("num_workers"):
            cfg[key]["persistent_workers"] = False
    cfg.launcher = resolve_launcher(ns.launcher, ns.local_rank, torch.cuda.is_available())
    if not torch.cuda.is_available():
        # CPU processes: gloo, and BN stays BN (torch's SyncBatchNorm runs on GPUs only)
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
        cfg.sync_bn = None
        if cfg.launcher != "none":
            _init_cpu_distributed()
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
    cfg.work_dir = ns.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(ns.config).stem)
    return cfg


def resolve_launcher(launcher: str, local_rank: int, cuda: bool) -> str:
    """The launcher to run with. `pytorch` without its environment (plain `python train.py ...
    --launcher pytorch`) runs as one process, with a note; under torchrun / torch.distributed.launch
    LOCAL_RANK comes from --local_rank when the launcher did not set it (as MMSeg's tools/train.py)."""
    missing = [v for v in LAUNCHER_ENV[launcher] if v not in os.environ]
    if launcher in ("slurm", "mpi") and not cuda:
        raise UserError(f"--launcher {launcher} needs GPUs; on CPU use torchrun with --launcher pytorch")
    if launcher == "pytorch" and missing:
        print("note: --launcher pytorch without torchrun / torch.distributed.launch (RANK, WORLD_SIZE unset): "
              "running as one process")
        return "none"
    if missing:
        raise UserError(f"--launcher {launcher}: {', '.join(missing)} not set (start the script under "
                        f"{launcher}, or use --launcher none for one process)")
    if launcher == "pytorch":
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    return launcher


def _init_cpu_distributed() -> None:
    """mmengine's pytorch launcher always calls torch.cuda.set_device; on CPU start gloo ourselves."""
    import torch.distributed as dist

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
        return _train(cfg)


def _train(cfg) -> int:
    from mmengine.runner import Runner

    from bgmask.seg.checkpoint import save_slim, trusted_full_checkpoints

    runner = Runner.from_cfg(cfg)
    _run_folder(cfg.work_dir, "train")
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
        return _test(ns, cfg, state_dict, splits, where)


def _test(ns: argparse.Namespace, cfg, state_dict: dict, splits: list[str], where: str) -> int:
    from mmengine.runner import Runner

    from bgmask.seg.segmenter import _load_weights

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
    """Upright (h, w) from the image header (no decoding); (0, 0) when unreadable (load_rgb reports it later)."""
    from bgmask.data.images import upright_size

    try:
        w, h = upright_size(path)
        return h, w
    except Exception:  # noqa: BLE001
        return 0, 0


def _open_segmenter(config: str | None, checkpoint: str | Path, batch_size: int, device: str,
                    trust_full_checkpoint: bool):
    """The segmenter, and its provenance (checkpoint path and SHA-256, config) for the output folder."""
    from bgmask.distributed import resolve_device
    from bgmask.seg.segmenter import load_segmenter

    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    ckpt = Path(checkpoint)
    seg = load_segmenter(config, ckpt, device=resolve_device(device), batch_size=batch_size,
                         trust_full_checkpoint=trust_full_checkpoint)
    info = {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt),
            "config": str(Path(config).resolve()) if config else None}
    return seg, info


def predict_masks(cub_root: str | Path, out_dir: str | Path, config: str | None, checkpoint: str | Path,
                  batch_size: int = 16, device: str = "auto", empty_warn_fraction: float = 0.05,
                  overwrite: bool = False, trust_full_checkpoint: bool = False, progress: bool = True,
                  workers: int = 0) -> dict:
    """Write DIR/images/<rel>.png for every image and DIR/<Waterbirds folder>/<rel>.png for the test
    images of the Waterbirds folder (0 = background, 255 = bird, the image's size), one atomic file at a
    time; files already there are kept; `workers` DataLoader processes decode the images. Returns a summary
    (counts, images/s, coverage)."""
    from bgmask.data.cub import WATERBIRDS_SUBDIR, read_cub_metadata

    root, out = Path(cub_root), Path(out_dir)
    meta = read_cub_metadata(root)
    require_dir(root / "images", "CUB image folder")
    seg, info = _open_segmenter(config, checkpoint, batch_size, device, trust_full_checkpoint)
    if _claim_folder(out, "predict_info.json", info, overwrite, "masks", "--out_dir"):
        for sub in ("images", WATERBIRDS_SUBDIR):
            shutil.rmtree(out / sub, ignore_errors=True)
    _start_folder(out, "predict_info.json", info)
    return _run_jobs(seg, _mask_jobs(root, out, meta), _write_mask, out, batch_size, progress, empty_warn_fraction,
                     workers=workers)


def mask_image_folder(data_path: str | Path, save_path: str | Path | None, config: str | None,
                      checkpoint: str | Path, fill: str = "black", batch_size: int = 16, device: str = "auto",
                      empty_warn_fraction: float = 0.05, overwrite: bool = False,
                      trust_full_checkpoint: bool = False, progress: bool = True, workers: int = 0) -> dict:
    """The paper's gen_masked_image_dataset.py: every DATA_PATH/<class folder>/<file>.jpg is segmented and
    written as SAVE_PATH/<class folder>/<file>.jpg (JPEG) with the background filled (black: the pixels
    whose predicted class is background set to 0), early masking's own fill. A rerun skips finished
    files; SAVE_PATH/masked_copy.json records the segmenter and the fill. Returns a summary."""
    src, out = _paper_folders(data_path, save_path)
    jobs = [(p, out / p.parent.name / p.name) for p in sorted(src.glob("*/*.jpg"))]
    if not jobs:
        hint = f"; for a CUB root pass --data_path {src / 'images'}" if (src / "images").is_dir() else ""
        raise UserError(f"no .jpg one folder below --data_path {src} (expected {src}/<class folder>/<file>.jpg{hint})")
    seg, info = _open_segmenter(config, checkpoint, batch_size, device, trust_full_checkpoint)
    info.update(source_images=str(src.resolve()), masks=info["checkpoint"], fill=fill)
    replace = _claim_folder(out, "masked_copy.json", info, overwrite, "masked images", "--save_path")
    _start_folder(out, "masked_copy.json", info)
    return _run_jobs(seg, jobs, functools.partial(_write_masked, fill=fill), out, batch_size, progress,
                     empty_warn_fraction, replace=replace, workers=workers)


def _paper_folders(data_path: str | Path, save_path: str | Path | None) -> tuple[Path, Path]:
    src = require_dir(data_path, "--data_path (the folder that holds the class folders of .jpg)")
    if not save_path:
        raise UserError("--data_path needs --save_path (the output root: SAVE_PATH/<class folder>/<file>.jpg)")
    out = Path(save_path)
    if out.resolve() == src.resolve():
        raise UserError(f"--save_path {out} is --data_path: it would overwrite the images; choose another folder")
    return src, out


def _claim_folder(out: Path, info_name: str, info: dict, overwrite: bool, what: str, flag: str) -> bool:
    """True when OUT holds outputs of another segmenter (or fill) that `overwrite` lets us replace;
    without `overwrite` that is a UserError."""
    info_path = out / info_name
    if not info_path.is_file():
        return False
    old = read_json_object(info_path)  # unreadable: outputs of an unknown segmenter
    if all(old.get(k) == info.get(k) for k in ("checkpoint_sha256", "fill")):
        return False
    if not overwrite:
        made_by = f"{old.get('checkpoint')}, fill {old.get('fill')}" if "fill" in info else old.get("checkpoint")
        raise UserError(f"{out} holds {what} of another segmenter{' or fill' if 'fill' in info else ''} "
                        f"({made_by}); pass --overwrite to replace them or choose another {flag}")
    return True


def _start_folder(out: Path, info_name: str, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(out, recursive=True)  # half-written files of a killed run
    atomic_write_text(out / info_name, json.dumps(info, indent=2) + "\n")


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


def _run_jobs(seg, jobs: list[tuple[Path, Path]], write, out: Path, batch_size: int, progress: bool,
              empty_warn_fraction: float, replace: bool = False, workers: int = 0) -> dict:
    """Segment the source image of every (source, output) job whose output is missing (every job with
    `replace`) and `write(image, mask, output)`; returns the summary."""
    todo = [(src, dst) for src, dst in jobs if replace or not dst.is_file()]
    todo.sort(key=lambda job: (_image_hw(job[0]), str(job[0])))  # equal sizes batch together
    t0 = time.perf_counter()
    coverage = _predict_and_save(seg, todo, batch_size, progress, write, workers)
    return _predict_summary(out, len(jobs), len(todo), coverage, time.perf_counter() - t0, empty_warn_fraction)


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


def _predict_and_save(seg, todo: list[tuple[Path, Path]], batch_size: int, progress: bool, write,
                      workers: int = 0) -> list[float]:
    """Predict the masks of `todo` in batches of consecutive jobs (sorted by size) and write each output;
    `workers` DataLoader processes decode the next batches meanwhile. Returns each mask's bird fraction."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from bgmask.processes import unblock_sigint

    batches = [list(range(i, min(i + batch_size, len(todo)))) for i in range(0, len(todo), batch_size)]
    loader = DataLoader(_DecodedImages(todo), batch_sampler=batches, num_workers=workers, collate_fn=_as_list,
                        prefetch_factor=4 if workers else None, worker_init_fn=unblock_sigint)
    coverage = []
    bar = tqdm(total=len(todo), desc="predict masks", unit="img", disable=not progress)
    for chunk in loader:
        masks = seg.predict_images([image for image, _ in chunk])  # [(h, w) uint8 {0, 1}], 1 = bird
        for (image, dst), m in zip(chunk, masks):
            write(image, m, dst)
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


def _print_predict_summary(s: dict, what: str = "masks") -> None:
    if s["predicted"] == 0:
        print(f"all {s['total']} {what} already in {s['out_dir']}; nothing to do")
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
                      ns.empty_warn_fraction, ns.overwrite, ns.trust_full_checkpoint, not ns.no_progress,
                      ns.workers)
    _print_predict_summary(s)
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
    s = mask_image_folder(ns.data_path, ns.save_path, ns.config, ns.checkpoint, ns.mask_fill, ns.batch_size,
                          ns.device, ns.empty_warn_fraction, ns.overwrite, ns.trust_full_checkpoint,
                          not ns.no_progress, ns.workers)
    _print_predict_summary(s, "masked images")
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
    s = predict_masks(ns.cub_root, out_dir, ns.config, ns.checkpoint, ns.batch_size, ns.device,
                      ns.empty_warn_fraction, ns.overwrite, ns.trust_full_checkpoint, not ns.no_progress,
                      ns.workers)
    _print_predict_summary(s)
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
