"""Seeds. Every epoch starts by re-seeding python, numpy and torch from (seed, epoch, rank), so an
epoch's augmentations and dropout depend only on those three numbers and a resumed run continues
exactly as if it had never stopped."""

from __future__ import annotations

import random

import numpy as np
import torch

from bgmask.signals import unblock_sigint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**31


def worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the worker; python/numpy follow the worker's torch seed
    (which torch derives from the loader's generator)."""
    unblock_sigint()
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
