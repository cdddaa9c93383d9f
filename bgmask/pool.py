"""Per-image loops over worker processes: `run_each(fn, jobs, workers)` calls `fn(job)` for every job,
in this process (workers 0 or 1) or in `workers` forked processes, with a progress bar in the parent.

Each `fn` writes its output atomically (bgmask.io), so the outputs do not depend on the number of
workers or on the order jobs finish in. A UserError raised in a worker reaches the parent as the same
exception (printed as one line by `run_cli`); the jobs not yet started are then cancelled. Workers die
with the parent (Linux: PR_SET_PDEATHSIG), so a killed run leaves at most temporary files, which the
next run removes.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import sys
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from bgmask.errors import UserError
from bgmask.signals import die_with_parent


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
