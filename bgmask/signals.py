"""Ctrl-C handling: checkpoints and DataLoader start-up are never cut in half by an interrupt.

An interrupted run stops with the usual KeyboardInterrupt, between steps, with whole files behind it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from torch.utils.data import DataLoader

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
