"""One process per output folder: an exclusive `fcntl.flock` on FOLDER/.bgmask.lock, held for the whole
life of what writes there (a training run, an evaluation logging into a run folder, a mask sweep, a demo,
a pretraining). A second process is refused with one line naming the folder and the process holding it.

The OS drops a flock when its holder exits in any way, SIGKILL included: a folder left by a killed run is
free again (its lock file stays and is simply taken by the next holder), so `--resume_training` works.
Processes forked while the lock is held (DataLoader and pool workers) share it until they exit; they
follow a killed parent within seconds, so a lock whose recorded holder is gone is waited for briefly
rather than refused. Only rank 0 of a distributed run writes, so only rank 0 takes the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from bgmask.errors import UserError

LOCK_NAME = ".bgmask.lock"
ORPHAN_WAIT_S = 30.0  # how long a lock held only by the workers of a dead process is waited for

_held: dict[Path, list] = {}  # resolved folder -> [fd, depth]: a process may take its own folder again


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_pid(folder: str | Path) -> int | None:
    """The pid recorded by the process holding (or that last held) FOLDER's lock."""
    try:
        return int((Path(folder) / LOCK_NAME).read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def _make_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {what} {folder}: {e.strerror or e}") from None


def _try_lock(lock: Path) -> int | None:
    """An fd holding the lock on `lock`'s current file, or None when another process holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:  # the file may have been unlinked by the previous holder as it let go: take the new one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def acquire(folder: str | Path, what: str = "folder", wait: bool = False) -> None:
    """Take FOLDER's lock for this process (made if missing); nested calls for the same folder count.
    Held by another process: one UserError naming the folder and its pid, or with `wait` wait for it
    (short critical sections, e.g. a shared index file)."""
    folder = Path(folder)
    _make_folder(folder, what)
    key = folder.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    lock, deadline = key / LOCK_NAME, time.monotonic() + ORPHAN_WAIT_S
    while True:
        try:
            fd = _try_lock(lock)
        except OSError as e:
            raise UserError(f"cannot lock {what} {folder}: {e.strerror or e}") from None
        if fd is not None:
            break
        pid = holder_pid(key)
        if not wait and (pid is None or pid_alive(pid) or time.monotonic() > deadline):
            holder = f"process {pid}" if pid is not None else "another process"
            raise UserError(f"{what} {folder} is in use by {holder} (one process writes a folder at a time); "
                            "wait for it to finish or choose another folder")
        time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]


def release(folder: str | Path) -> None:
    key = Path(folder).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        with contextlib.suppress(OSError):  # unlinked while still held: a waiter then takes a new file
            (key / LOCK_NAME).unlink()
        os.close(entry[0])


@contextlib.contextmanager
def hold_folder(folder: str | Path, what: str = "folder", wait: bool = False, enabled: bool = True):
    """`acquire` for the block's duration (nothing when not `enabled`, e.g. on ranks other than 0)."""
    if not enabled:
        yield
        return
    acquire(folder, what, wait)
    try:
        yield
    finally:
        release(folder)


def holds(folder: str | Path) -> bool:
    """True when this process holds FOLDER's lock."""
    return Path(folder).resolve() in _held
