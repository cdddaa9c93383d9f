"""Classifier checkpoints: written atomically, loaded with `torch.load(weights_only=True)`."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from bgmask.errors import UserError, require_file
from bgmask.io import atomic_path

FORMAT = "bgmask-classifier"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Temporary file + fsync + rename: a crash leaves the previous checkpoint intact."""
    import os

    state = {"format": FORMAT, "version": 1, **state}
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e} (the previous one is kept)") from None


def load_checkpoint(path: str | Path, trust: bool = False, map_location="cpu") -> dict:
    path = require_file(path, "checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
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
