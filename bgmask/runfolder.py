"""The run folder: the one writer of what a run leaves behind, for training, evaluation and the segmenter.

    config.yaml          the resolved flags (training)
    command.txt          the exact command line (`<name>_command.txt` for the segmenter's train / test)
    git_revision.txt     the code's revision (`-dirty` when the tree had changes)
    results.jsonl        one JSON line per evaluation: per epoch, the final one, and `split: "eval"` lines
                         written by `eval_waterbirds.py` / `--eval_only` / the segmenter's test
    final_metrics.json   the final record (training)
    done                 written last: the run finished

Only rank 0 writes (`enabled=False` elsewhere turns every method into a no-op). Files are replaced
atomically; results.jsonl is appended one whole line at a time. With `--wandb` every numeric value of a
logged record is mirrored to the wandb run.

One process per output folder: an exclusive `fcntl.flock` on FOLDER/.bgmask.lock, held for the whole
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
import json
import os
import shlex
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

from bgmask.errors import UserError
from bgmask.io import LOCK_NAME, atomic_write_text, pid_alive, remove_stale_temp


RESULTS = "results.jsonl"
EVAL_SPLIT = "eval"  # the `split` tag of a record written by an evaluation of a saved checkpoint


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


class RunFolder:
    def __init__(self, path: str | Path, enabled: bool = True, flag: str = "--snapshot_dir"):
        self.path, self.enabled, self.wandb = Path(path), enabled, None
        if enabled:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = self.path / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise UserError(f"cannot write to {flag} {self.path}: {e.strerror or e}") from None

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    def holds_run(self) -> bool:
        return self.results.exists()

    def no_epoch_finished(self) -> bool:
        """A run started here (config.yaml or results.jsonl) but was stopped before its first checkpoint:
        no `*.pt`, no `done`. Nothing can be resumed; the run starts over (`start_over`)."""
        started = (self.path / "config.yaml").is_file() or self.results.is_file()
        return started and not (self.path / "done").exists() and not any(self.path.glob("*.pt"))

    def start_over(self) -> None:
        """Empty results.jsonl (lines of epochs that no checkpoint holds: they run again)."""
        if self.enabled and self.results.is_file():
            atomic_write_text(self.results, "")

    def write_provenance(self, name: str = "", command: list[str] | None = None) -> None:
        """command.txt (or NAME_command.txt): `command`, by default this process's command line; and
        git_revision.txt."""
        if self.enabled:
            path = self.path / (f"{name}_command.txt" if name else "command.txt")
            atomic_write_text(path, shlex.join(command or [sys.executable, *sys.argv]) + "\n")
            atomic_write_text(self.path / "git_revision.txt", git_revision() + "\n")

    def write_config(self, cfg: Namespace) -> None:
        if self.enabled:
            import yaml

            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(dict(vars(cfg)), sort_keys=True))
            self.write_provenance(command=getattr(cfg, "command", None))

    def log(self, record: dict, step: int | None = None) -> None:
        """Append one line to results.jsonl (and mirror the numbers to wandb at `step`)."""
        if not self.enabled:
            return
        try:
            with open(self.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as e:
            raise UserError(f"cannot append to {self.results}: {e.strerror or e}") from None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def finish(self, record: dict, step: int | None = None) -> None:
        """The final record: a results.jsonl line, final_metrics.json, then `done`."""
        if not self.enabled:
            return
        self.log(record, step)
        atomic_write_text(self.path / "final_metrics.json", json.dumps(record, indent=2, sort_keys=True))
        atomic_write_text(self.path / "done", "")
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def start_wandb(self, cfg: Namespace) -> None:
        if self.enabled and cfg.wandb:
            import wandb

            resume = dict(id=cfg.wandb_resume_id, resume="must") if cfg.wandb_resume_id else {}
            self.wandb = wandb.init(project=cfg.wandb_project, group=cfg.group, job_type=cfg.job_type,
                                    config=vars(cfg), dir=str(self.path), **resume)

    def remove_stale_temp(self) -> None:
        """Temporary files of a process killed while writing (only when this run holds the folder's lock;
        a live writer's files are spared even so)."""
        if self.enabled:
            remove_stale_temp(self.path, spare_live=True)

    def prepare_resume(self, epoch: int) -> None:
        """Before a run resumed from the checkpoint of `epoch`: drop the results.jsonl lines that the
        run will write again (epochs after `epoch`, final records, a torn last line)."""
        if not self.enabled or not self.results.is_file():
            return
        kept, dropped = [], 0
        for line in self.results.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if rec.get("split") == "final" or int(rec.get("epoch", 0)) > epoch:
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            atomic_write_text(self.results, "".join(kept))


def checkpoint_of(cfg: Namespace) -> Path:
    """The checkpoint an evaluation reads: --checkpoint, else SNAPSHOT_DIR/best.pt, else last.pt."""
    if cfg.checkpoint is not None:
        return Path(cfg.checkpoint)
    best = Path(cfg.snapshot_dir) / "best.pt"
    return best if best.is_file() else Path(cfg.snapshot_dir) / "last.pt"


def folder_lock(cfg: Namespace, is_main: bool):
    """The lock on the folder a run writes (`bgmask.runfolder`), taken on rank 0 before anything is
    written: --snapshot_dir for training; for an evaluation the checkpoint's folder, where its line is
    logged (a folder that cannot be written, e.g. shared read-only weights, is evaluated unlocked: the
    evaluation writes nothing there)."""
    if not cfg.eval_only:
        return hold_folder(cfg.snapshot_dir, "--snapshot_dir", enabled=is_main)
    folder = checkpoint_of(cfg).parent
    writable = folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
    return hold_folder(folder, "the checkpoint's folder", enabled=is_main and writable)


ORPHAN_WAIT_S = 30.0  # how long a lock held only by the workers of a dead process is waited for

_held: dict[Path, list] = {}  # resolved folder -> [fd, depth]: a process may take its own folder again


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
