"""Classifier checkpoints: written atomically, loaded with `torch.load(weights_only=True)`."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from bgmask.errors import UserError, require_file
from bgmask.io import atomic_path

FORMAT = "bgmask-classifier"


@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl-C until the block ends (main thread only). torch.save interrupted by a
    KeyboardInterrupt turns it into a RuntimeError from its zip writer; deferring it lets the
    checkpoint finish and the interrupt arrive as the usual KeyboardInterrupt right after."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:  # None: set outside Python
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)
        elif caught and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)  # the default action, now


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


def load_weights_only(path: str | Path, map_location="cpu"):
    """torch.load(weights_only=True), without torch's warning about the pickle protocol of a file that
    torch.save did not write (the caller turns the refusal into one line; the warning would be a second)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


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
