"""Saving a training run's state each epoch and resuming from it (`--resume_training`).

Crash safety: checkpoints are replaced by an atomic rename, so a kill at any point leaves the previous
last.pt whole. results.jsonl is appended before last.pt is written; on resume the lines after the
checkpoint's epoch (and any final record) are dropped, since those epochs run again. last.pt is written
before best.pt / epoch_k.pt, so those two never come from an epoch that last.pt does not hold; a kill
between the writes is repaired on resume (`complete_checkpoints`).
"""

from __future__ import annotations

import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from bgmask.checkpoint import (load_checkpoint, load_model_state, rng_state, save_checkpoint, saved_config,
                               saved_model_kwargs, set_rng_state)
from bgmask.errors import UserError
from bgmask.io import atomic_path

# What a resumed run must share with the run it continues, besides its model (`model_kwargs`).
SAME_RUN_KEYS = ("strategy", "data_path", "train_split", "split_seed", "seed", "optimizer_type", "scheduler_type",
                 "epochs", "batch_size", "lr")
WEIGHT_SOURCES = ("pretrained", "pretrained_file")  # overwritten by the checkpoint's weights anyway
PATH_KEYS = ("data_path",)  # compared resolved: data/cub, data/cub/ and ./data/cub are one folder


def same_value(key: str, saved, now) -> bool:
    if key in PATH_KEYS and isinstance(saved, str) and isinstance(now, str):
        return Path(saved).expanduser().resolve() == Path(now).expanduser().resolve()
    return saved == now


@dataclass
class Progress:
    """Where a run stands: epochs finished and the best val accuracy so far (with its epoch)."""

    epoch: int = 0
    best: float | None = None
    best_epoch: int | None = None

    def update(self, epoch: int, val_acc: float | None) -> bool:
        """Record a finished epoch; True when its val accuracy is the best so far."""
        self.epoch = epoch
        if val_acc is None or (self.best is not None and val_acc <= self.best):
            return False
        self.best, self.best_epoch = val_acc, epoch
        return True


def training_state(parts, progress: Progress, cfg: Namespace, meta: dict) -> dict:
    """Everything a resumed run needs (`parts`: a `bgmask.engine.Parts`)."""
    scaler = parts.scaler
    return {
        "model": parts.model.state_dict(),
        "model_kwargs": parts.model_kwargs,
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": progress.epoch,
        "best_val_acc": progress.best,
        "best_epoch": progress.best_epoch,
        "config": dict(vars(cfg)),
        "rng": rng_state(),
        **meta,
    }


def save_epoch(folder: Path, state: dict, improved: bool, save_every: int) -> None:
    """last.pt first, then best.pt (when improved) and epoch_k.pt (every `save_every` epochs)."""
    save_checkpoint(folder / "last.pt", state)
    if improved:
        save_checkpoint(folder / "best.pt", state)
    if save_every and state["epoch"] % save_every == 0:
        save_checkpoint(folder / f"epoch_{state['epoch']}.pt", state)


def check_same_run(state: dict, cfg: Namespace, kwargs: dict, path: Path) -> None:
    saved_cfg, saved_model = saved_config(state, path), saved_model_kwargs(state, path)
    diff = [(k, saved_model[k], kwargs[k]) for k in kwargs if k not in WEIGHT_SOURCES and k in saved_model
            and saved_model[k] != kwargs[k]]
    diff += [(k, saved_cfg[k], getattr(cfg, k)) for k in SAME_RUN_KEYS
             if k in saved_cfg and not same_value(k, saved_cfg[k], getattr(cfg, k))]
    if diff:
        k, was, now = diff[0]
        raise UserError(f"--resume_training: {path} was made with {k}={was!r}, not {now!r} "
                        f"(differing: {', '.join(d[0] for d in diff)})")


def resume(parts, cfg: Namespace, world_size: int, is_main: bool) -> Progress:
    """Load SNAPSHOT_DIR/last.pt into `parts` (model, optimiser, scheduler, scaler, RNG) and return its
    progress; repairs best.pt / epoch_k.pt cut off by a kill."""
    folder = Path(cfg.snapshot_dir)
    path = folder / "last.pt"
    if not path.is_file():
        raise UserError(f"--resume_training: no checkpoint at {path} (nothing to resume; check --snapshot_dir, "
                        "or start without --resume_training)")
    state = load_checkpoint(path, trust=cfg.trust_checkpoint)
    check_same_run(state, cfg, parts.model_kwargs, path)
    load_model_state(parts.model, state["model"], f"checkpoint {path} does not fit model {cfg.model_arch}")
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # e.g. a checkpoint of an older bgmask, before the no-decay groups of timm's rule
        raise UserError(f"--resume_training: the optimiser state in {path} does not fit this run's parameter "
                        f"groups ({e}); start a new run from its weights with --pretrained_file {path}") from None
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.scaler is not None and state["scaler"]:
        parts.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if is_main:
        complete_checkpoints(folder, state, cfg)
        print(f"resumed from {path} at epoch {state['epoch']}", flush=True)
        saved_world = state.get("world_size", world_size)
        if saved_world != world_size:
            print(f"note: {path} was written by {saved_world} process(es), resuming with {world_size}: each "
                  "epoch's global data order is the same, but the ranks share it differently and --batch_size "
                  "is per process, so the result differs from an uninterrupted run", flush=True)
    return Progress(state["epoch"], state["best_val_acc"], state.get("best_epoch"))


def complete_checkpoints(folder: Path, state: dict, cfg: Namespace) -> None:
    """After a kill between writing last.pt and best.pt / epoch_k.pt of the same epoch: write the missing
    ones from last.pt (they hold the same state)."""
    epoch, last, wanted = state["epoch"], folder / "last.pt", []
    if state.get("best_epoch") == epoch:
        best = folder / "best.pt"
        if not best.is_file() or load_checkpoint(best, trust=cfg.trust_checkpoint)["epoch"] != epoch:
            wanted.append(best)
    if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and not (folder / f"epoch_{epoch}.pt").is_file():
        wanted.append(folder / f"epoch_{epoch}.pt")
    for dst in wanted:
        with atomic_path(dst) as tmp:
            shutil.copyfile(last, tmp)
        print(f"restored {dst} from {last} (the run was stopped while writing the checkpoints of epoch {epoch})",
              flush=True)
