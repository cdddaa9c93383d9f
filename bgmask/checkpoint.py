"""Classifier checkpoints: written atomically, loaded with `torch.load(weights_only=True)`, each carrying
the keyword arguments that rebuild its model (`create_classifier(**state["model_kwargs"])`), and the
rules for resuming a run from one (see `bgmask.resume`)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from bgmask.errors import UserError
from bgmask.io import atomic_path, read_torch_file
from bgmask.signals import sigint_deferred

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
    """(model, data config, epoch) of a saved classifier. A bgmask checkpoint rebuilds its own model and
    sets the strategy, fill and image size it was trained with on `cfg` (a --model_arch given explicitly,
    `cfg.model_arch_given`, must name its architecture); a `snapshot_best.pt` of the
    paper's code records no architecture, so its model is built from the flags (as the paper's
    evaluation did) and its weights converted (`bgmask.models.paper`)."""
    from bgmask.args import checked_settings
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
    saved = saved_config(state, ckpt)
    for key in ("strategy", "mask_fill", "image_size"):  # how the checkpoint's model sees its input
        setattr(cfg, key, saved.get(key, getattr(cfg, key)))
    crop = checked_settings({"crop_pct": state["data_config"]["crop_pct"]}, f"checkpoint {ckpt}") \
        if "crop_pct" in state["data_config"] else {}
    cfg.crop_pct = crop.get("crop_pct", cfg.crop_pct)  # its evaluation crop
    saved_arch = saved_model_kwargs(state, ckpt)["model_arch"]
    if getattr(cfg, "model_arch_given", False) and cfg.model_arch != saved_arch:
        raise UserError(f"--model_arch {cfg.model_arch} but checkpoint {ckpt} holds a {saved_arch} (a bgmask "
                        "checkpoint rebuilds its own model: drop --model_arch or pass the checkpoint's)")
    cfg.model_arch = saved_arch
    return model_from_checkpoint(state, ckpt), state["data_config"], state["epoch"]


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
