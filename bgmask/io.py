"""Atomic file writes: a file is either absent or complete, never half-written."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

from PIL import Image

from bgmask.errors import UserError

# Write failures that are the user's to fix (full disk, read-only or forbidden folder): one line.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.
    A full disk or a read-only folder raises a UserError naming `path`; `path` itself is untouched."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the writer's pid in the name: clean-up leaves the files of a live process alone
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        raise


TEMP_PATTERN = ".*.tmp"  # the names atomic_path gives its temporary files: .NAME.<pid>-<random>.tmp
_TEMP_PID = re.compile(r"\.(\d+)-[^.]*\.tmp$")


def is_empty_folder(folder: str | Path) -> bool:
    """True when `folder` is missing, empty, or holds nothing but temporary files of atomic_path (what a
    run killed while writing its first file leaves) and a lock file left by a killed process: an output
    folder that a new run may take."""
    from bgmask.runfolder import LOCK_NAME

    folder = Path(folder)
    return not folder.is_dir() or all(p.match(TEMP_PATTERN) or p.name == LOCK_NAME for p in folder.iterdir())


def temp_writer(tmp: Path) -> int | None:
    """The pid of the process that made temporary file `tmp` (None for names without one)."""
    m = _TEMP_PID.search(tmp.name)
    return int(m.group(1)) if m else None


def remove_stale_temp(folder: str | Path, recursive: bool = False, spare_live: bool = False) -> int:
    """Delete the temporary files (`.NAME.<pid>-*.tmp`, see atomic_path) that a killed process left in
    `folder`; returns how many. Call it only where no other process is writing (a run folder: where this
    process holds its lock, `bgmask.runfolder`); with `spare_live`, the files of another live process
    are left alone all the same (a writer that took no lock)."""
    from bgmask.runfolder import pid_alive

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(TEMP_PATTERN) if recursive else folder.glob(TEMP_PATTERN)
    n = 0
    for tmp in found:
        pid = temp_writer(tmp) if spare_live else None
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
    return n


def read_json(path: str | Path, default=None):
    """The JSON value in `path`, or `default` when it is missing or unreadable (not UTF-8, not JSON, a
    folder): for the markers a rerun compares against, an unreadable one means the step runs again."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return default


def read_json_object(path: str | Path) -> dict:
    """The JSON object (mapping) in `path`, or {} when it is missing, unreadable or holds no object: for a
    marker whose fields a rerun compares, anything else means the step runs again."""
    value = read_json(path, {})
    return value if isinstance(value, dict) else {}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def encode_image(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def atomic_save_image(path: str | Path, img: Image.Image, **kwargs) -> None:
    """Save a PIL image atomically; format from the suffix (JPEG quality 95, 4:4:4, unless given)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported image suffix: {path}")
    if fmt == "JPEG":
        kwargs.setdefault("quality", 95)
        kwargs.setdefault("subsampling", 0)  # 4:4:4: no colour bleeding across mask edges
    # No fsync per image: thousands of small files; the rename alone keeps them whole on a crash
    # of the process (not of the machine), which is the failure we guard against.
    data = encode_image(img, fmt, **kwargs)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_weights_only(path: str | Path, map_location="cpu"):
    """torch.load(weights_only=True), without torch's warning about the pickle protocol of a file that
    torch.save did not write (the caller turns the refusal into one line; the warning would be a second)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def first_plain_value(f):
    """The first pickle in file `f`, read by an unpickler that refuses every global (so nothing can be
    called): plain values only, else pickle.UnpicklingError."""
    import pickle

    class NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"global {module}.{name}")

    return NoGlobals(f).load()


def is_torch_pickle(path: str | Path) -> bool:
    """True for a file that torch.save wrote: a zip archive holding `*/data.pkl`, or the legacy format,
    whose first pickle is torch's magic number. Read without unpickling anything that could run code."""
    import zipfile

    from torch.serialization import MAGIC_NUMBER

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
        with open(path, "rb") as f:
            return first_plain_value(f) == MAGIC_NUMBER
    except Exception:  # noqa: BLE001 -- junk may fail in any way; it is simply not a torch file
        return False


def read_torch_file(path: str | Path, what: str, trust: bool = False, map_location="cpu", *,
                    trust_flag: str = "--trust_checkpoint", unsafe: str | None = None, explain: bool = False):
    """torch.load with weights_only=True; `trust` allows arbitrary unpickling of a real torch file (never
    of junk). A missing, truncated, junk or unsafe file is one UserError naming `path` (`what`: how to
    call it, e.g. "checkpoint"); only a real torch pickle that needs more than weights suggests trust:
    the line `unsafe` when given, else one naming `trust_flag`. With `explain`, a file that torch cannot
    open (RuntimeError, EOFError, OSError: a truncated archive) is reported with torch's own reason; else
    every failure reads as junk, naming the exception's class. One implementation for the classifier's
    files and the segmenter's (`bgmask.seg.checkpoint.load_checkpoint_file`)."""
    import pickle

    path = Path(path)
    junk = f"cannot read {what} {path}: not a torch checkpoint (truncated or not a torch file"
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return load_weights_only(path, map_location)
    except pickle.UnpicklingError:
        if not is_torch_pickle(path):
            raise UserError(f"{junk})") from None
        if not trust:
            raise UserError(unsafe or f"{what} {path} needs arbitrary unpickling to load (unsafe); pass {trust_flag} "
                            "only if you trust its origin") from None
    except Exception as e:  # noqa: BLE001 -- random bytes fail in any way (KeyError, IndexError, ...)
        if not explain:
            raise UserError(f"{junk}: {e.__class__.__name__})") from None
        if not isinstance(e, (RuntimeError, EOFError, OSError)):
            raise UserError(f"{junk})") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "corrupt file"
        raise UserError(f"cannot read {what} {path}: {e.__class__.__name__}: {reason}") from None
    return load_trusted(path, map_location, f"{what} {path}", trust_flag)


def load_trusted(path: str | Path, map_location, label: str, trust_flag: str):
    """Full unpickling of a file the user vouched for with `trust_flag`; a broken pickle is one line
    naming `label`, not a traceback."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 -- a trusted but broken pickle fails in any way
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot unpickle {label} (with {trust_flag}): {e.__class__.__name__}: {reason}") from None
