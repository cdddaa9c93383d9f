"""The MMSeg config a segmentation command runs with: the config file, `--cfg-options` and
`--data-root` merged, the data root filled into every dataset, and the launcher resolved.

The paper's configs copy their `data_root` into each dataset; bgmask's leave a `<unset ...>` placeholder.
Either way `--data-root DIR` (or `--cfg-options data_root=DIR`) reaches every dataloader, and a config
run without one uses its own data_root.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bgmask.errors import UserError, require_dir

# launcher -> the environment variables its processes are started with
LAUNCHER_ENV = {"none": (), "pytorch": ("RANK", "WORLD_SIZE"), "slurm": ("SLURM_PROCID", "SLURM_NTASKS"),
                "mpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")}


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
