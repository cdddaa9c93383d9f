"""The process side of a run: Ctrl-C handling, per-image worker pools, and seeds.

Ctrl-C handling: checkpoints and DataLoader start-up are never cut in half by an interrupt.

An interrupted run stops with the usual KeyboardInterrupt, between steps, with whole files behind it.

Per-image loops over worker processes: `run_each(fn, jobs, workers)` calls `fn(job)` for every job,
in this process (workers 0 or 1) or in `workers` forked processes, with a progress bar in the parent.

Each `fn` writes its output atomically (bgmask.io), so the outputs do not depend on the number of
workers or on the order jobs finish in. A UserError raised in a worker reaches the parent as the same
exception (printed as one line by `run_cli`); the jobs not yet started are then cancelled. Workers die
with the parent (Linux: PR_SET_PDEATHSIG), so a killed run leaves at most temporary files, which the
next run removes.

Seeds. Every epoch starts by re-seeding python, numpy and torch from (seed, epoch, rank), so an
epoch's augmentations and dropout depend only on those three numbers and a resumed run continues
exactly as if it had never stopped.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import random
import signal
import sys
import threading
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from bgmask.errors import UserError


PR_SET_PDEATHSIG = 1  # prctl(2)


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


def loader_iter(loader: DataLoader):
    """iter(loader), with Ctrl-C held while the DataLoader builds its iterator and forks its workers.
    Two ways it would go wrong otherwise: a SIGINT landing in Python's at-fork handlers is printed as
    "Exception ignored" and lost (training would go on), and a Ctrl-C whose flag is already set would
    raise inside the iterator's __init__, leaving a half-built iterator whose __del__ prints a traceback.
    So the signal is blocked (the workers inherit the mask and lift it in `unblock_sigint`, their
    worker_init_fn) and Python's handler is deferred; the interrupt arrives as the usual
    KeyboardInterrupt once the iterator is whole."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):  # (no signal masks on Windows)
        return iter(loader)
    with sigint_deferred():
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def die_with_parent() -> None:
    """Linux: this (worker) process gets SIGKILL when the process that forked it dies. A parent killed
    with SIGKILL runs no clean-up, and its DataLoader or pool workers would otherwise live on, blocked on
    a queue that nobody reads, holding memory and the run's files."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


def unblock_sigint(worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the worker again (see loader_iter), and the worker dies
    with its parent (`die_with_parent`)."""
    die_with_parent()
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def default_workers() -> int:
    return min(os.cpu_count() or 1, 8)


def _init_worker() -> None:
    """One torch thread per worker (the workers share the cores), and die when the parent dies."""
    import torch

    torch.set_num_threads(1)
    die_with_parent()


def _run_chunk(fn, chunk: list) -> int:
    for job in chunk:
        fn(job)
    return len(chunk)


def run_each(fn, jobs: list, workers: int, desc: str, progress: bool = True) -> None:
    """fn(job) for every job; `fn` must be a module-level function (sent to the workers by name)."""
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                fn(job)
                bar.update(1)
            return
        _run_pool(fn, jobs, min(workers, len(jobs)), bar)
    finally:
        bar.close()


def _run_pool(fn, jobs: list, workers: int, bar) -> None:
    size = max(1, min(32, len(jobs) // (workers * 4)))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    ex = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
    try:
        futures = [ex.submit(_run_chunk, fn, chunk) for chunk in chunks]
        for done in cf.as_completed(futures):
            bar.update(done.result())
    except BrokenProcessPool:
        raise UserError("a worker process ended abruptly (killed, e.g. out of memory?); the files written "
                        "are whole: rerun to resume (--workers 1 uses no worker process)") from None
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


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
