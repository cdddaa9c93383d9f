"""Classifier checkpoints: written atomically, loaded with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from bgmask.errors import UserError, require_file
from bgmask.io import atomic_path, load_weights_only
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
    path = require_file(path, "checkpoint")
    try:
        state = load_weights_only(path, map_location)
    except pickle.UnpicklingError:
        if not trust:
            raise UserError(
                f"checkpoint {path} needs arbitrary unpickling to load (unsafe); pass --trust_checkpoint "
                "only if you trust its origin"
            ) from None
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"cannot read checkpoint {path}: truncated or not a torch file ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a bgmask classifier checkpoint (no '{FORMAT}' format tag)")
    return state


# What a checkpoint's own config decides about the model it holds (and the strategy it was trained
# with); the data, batch size, device... may be pointed elsewhere by the caller's cfg.
MODEL_KEYS = ("model_arch", "strategy", "mask_fill", "class_token_only", "patch_tokens_only", "late_mask_stage",
              "late_pool", "late_drop_cls", "image_size")


def model_from_checkpoint(cfg, state: dict, path: str | Path) -> torch.nn.Module:
    """The classifier held by `state` (what load_checkpoint(path) returned). `cfg` takes the checkpoint's
    MODEL_KEYS and loses hub / file weights, freezing and drop path; the model is built from it and gets
    the saved weights. Weights of another architecture are one UserError naming `path`. Returns the model
    on the CPU in train mode: the caller moves it and calls `.eval()` where it needs to."""
    from bgmask.engine import build_model  # engine imports this module

    saved = state["config"]
    for key in MODEL_KEYS:
        if key in saved:
            setattr(cfg, key, saved[key])
    cfg.pretrained, cfg.pretrained_file, cfg.freeze_backbone, cfg.drop_path = False, None, False, 0.0
    model = build_model(cfg, state["num_classes"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        ours, theirs = model.state_dict(), state["model"]
        missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        shape = [k for k in ours if k in theirs and ours[k].shape != theirs[k].shape]
        example = (missing or unexpected or shape)[0]
        raise UserError(f"checkpoint {path} does not fit model {cfg.model_arch} ({len(missing)} tensors missing, "
                        f"{len(unexpected)} unexpected, {len(shape)} of another shape, e.g. {example!r}): "
                        "weights of another architecture?") from None
    return model


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
