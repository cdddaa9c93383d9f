"""Classifier checkpoints: written atomically, loaded with `torch.load(weights_only=True)`, each carrying
the keyword arguments that rebuild its model (`create_classifier(**state["model_kwargs"])`), and the
rules for resuming a run from one (see `bgmask.checkpoint`).

Saving a training run's state each epoch and resuming from it (`--resume_training`).

Crash safety: checkpoints are replaced by an atomic rename, so a kill at any point leaves the previous
last.pt whole. results.jsonl is appended before last.pt is written; on resume the lines after the
checkpoint's epoch (and any final record) are dropped, since those epochs run again. last.pt is written
before best.pt / epoch_k.pt, so those two never come from an epoch that last.pt does not hold; a kill
between the writes is repaired on resume (`complete_checkpoints`).
"""

from __future__ import annotations

import os
import random
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bgmask.errors import UserError
from bgmask.io import atomic_path, read_torch_file
from bgmask.processes import sigint_deferred


FORMAT = "bgmask-classifier"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Temporary file + fsync + rename: a crash leaves the previous checkpoint intact."""
    state = {"format": FORMAT, "version": 1, **state}
    try:
        with sigint_deferred(), atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
    except UserError as e:  # full disk / read-only folder, already one line naming the path
        raise UserError(f"{e} (the previous checkpoint is kept)") from None
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e} (the previous one is kept)") from None


def load_checkpoint(path: str | Path, trust: bool = False, map_location="cpu") -> dict:
    return as_checkpoint(read_torch_file(path, "checkpoint", trust, map_location), path)


def as_checkpoint(state, path: str | Path) -> dict:
    """`state` (a loaded file) when it is a bgmask classifier checkpoint, else one UserError."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a bgmask classifier checkpoint (no '{FORMAT}' format tag)")
    return state


# Weights come from the checkpoint itself, and a rebuilt model is for evaluation: no hub or file
# weights, no frozen parameters, no drop path.
REBUILD = dict(pretrained=False, pretrained_file=None, freeze_backbone=False, drop_path=0.0)


def saved_config(state: dict, path: str | Path) -> dict:
    """The flags of the run that wrote `state`, each through the command line's check
    (`bgmask.args.checked_settings`): a bad saved value is one line naming the checkpoint."""
    from bgmask.args import checked_settings

    return checked_settings(state.get("config", {}), f"checkpoint {path}")


def saved_model_kwargs(state: dict, path: str | Path = "checkpoint") -> dict:
    """The `create_classifier` keyword arguments of the model in `state`. Checkpoints written before
    they were stored carry only the run's flags, from which the same arguments are derived."""
    if "model_kwargs" in state:
        return dict(state["model_kwargs"])
    from bgmask.build import model_kwargs

    return model_kwargs(saved_config(state, path), state["num_classes"])


def model_from_checkpoint(state: dict, path: str | Path) -> torch.nn.Module:
    """The classifier held by `state` (what load_checkpoint(path) returned), rebuilt with
    `create_classifier(**model_kwargs)` and given the saved weights. Weights of another architecture
    are one UserError naming `path`. Returns the model on the CPU in train mode."""
    from bgmask.models import create_classifier

    kwargs = {**saved_model_kwargs(state, path), **REBUILD}
    model = create_classifier(**kwargs)
    load_model_state(model, state["model"], f"checkpoint {path} does not fit model {kwargs['model_arch']}")
    return model


def saved_classifier(ckpt: Path, cfg, num_classes: int):
    """(model, data config, epoch) of a saved classifier. A bgmask checkpoint rebuilds its own model (the
    settings it contributes, `checkpoint_settings`, are already in `cfg`); a `snapshot_best.pt` of the
    paper's code records no architecture, so its model is built from the flags (as the paper's evaluation
    did) and its weights converted (`bgmask.models.paper`)."""
    from bgmask.build import build_model, data_config, model_kwargs
    from bgmask.models.paper import convert_paper_state, is_paper_snapshot

    raw = read_torch_file(ckpt, "checkpoint", cfg.trust_checkpoint)
    if is_paper_snapshot(raw):
        model = build_model({**model_kwargs(vars(cfg), num_classes), **REBUILD})
        model.load_state_dict(convert_paper_state(raw["model_state"], model, source=str(ckpt)))
        return model, data_config(model, cfg), raw.get("finished_epoch")
    state = as_checkpoint(raw, ckpt)
    if state["num_classes"] != num_classes:
        raise UserError(f"checkpoint {ckpt} has {state['num_classes']} classes but {cfg.data_path} has {num_classes}")
    return model_from_checkpoint(state, ckpt), state["data_config"], state["epoch"]


def checkpoint_settings(ckpt: Path, cfg: dict, arch_given: bool) -> dict:
    """The settings an evaluated bgmask checkpoint decides: how its model sees its input (strategy, fill,
    image size, evaluation crop) and its architecture, which a --model_arch given explicitly
    (`arch_given`) must name. A paper snapshot decides nothing: its model is built from the flags."""
    from bgmask.args import checked_settings
    from bgmask.models.paper import is_paper_snapshot

    # Only the settings are read here; the evaluation loads the weights after resolution (`saved_classifier`).
    raw = read_torch_file(ckpt, "checkpoint", cfg["trust_checkpoint"], mmap=True)
    if is_paper_snapshot(raw):
        return {}
    state = as_checkpoint(raw, ckpt)
    saved = saved_config(state, ckpt)
    out = {key: saved[key] for key in ("strategy", "mask_fill", "image_size", "protocol") if key in saved}
    if "crop_pct" in state["data_config"]:
        out.update(checked_settings({"crop_pct": state["data_config"]["crop_pct"]}, f"checkpoint {ckpt}"))
    saved_arch = saved_model_kwargs(state, ckpt)["model_arch"]
    if arch_given and cfg["model_arch"] != saved_arch:
        raise UserError(f"--model_arch {cfg['model_arch']} but checkpoint {ckpt} holds a {saved_arch} (a bgmask "
                        "checkpoint rebuilds its own model: drop --model_arch or pass the checkpoint's)")
    out["model_arch"] = saved_arch
    return out


def load_model_state(model: torch.nn.Module, weights: dict, what: str) -> None:
    """model.load_state_dict(weights); a mismatch is one UserError starting with `what`."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        ours = model.state_dict()
        missing, unexpected = sorted(set(ours) - set(weights)), sorted(set(weights) - set(ours))
        shape = [k for k in ours if k in weights and ours[k].shape != weights[k].shape]
        example = (missing or unexpected or shape)[0]
        raise UserError(f"{what} ({len(missing)} tensors missing, {len(unexpected)} unexpected, {len(shape)} of "
                        f"another shape, e.g. {example!r}): weights of another architecture?") from None


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What a resumed run must share with the run it continues, besides its model (`model_kwargs`).
SAME_RUN_KEYS = ("strategy", "protocol", "method", "data_path", "train_split", "split_seed", "seed", "optimizer_type",
                 "scheduler_type", "epochs", "batch_size", "lr")
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
        "method": parts.method.state_dict(),
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
    parts.method.load_state_dict(state.get("method", {"method": "erm"}))  # before methods were saved: ERM's
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
