"""Files: atomic writes (a file is either absent or complete, never half-written), the readers of JSON
markers and torch files, a file's sha256, and the stage cache (`Marker`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from bgmask.errors import DISK_ERRNOS, UserError


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


LOCK_NAME = ".bgmask.lock"  # the run-folder lock (bgmask.runfolder): never part of a folder's content
TEMP_PATTERN = ".*.tmp"  # the names atomic_path gives its temporary files: .NAME.<pid>-<random>.tmp
_TEMP_PID = re.compile(r"\.(\d+)-[^.]*\.tmp$")


def is_empty_folder(folder: str | Path) -> bool:
    """True when `folder` is missing, empty, or holds nothing but temporary files of atomic_path (what a
    run killed while writing its first file leaves) and a lock file left by a killed process: an output
    folder that a new run may take."""
    folder = Path(folder)
    return not folder.is_dir() or all(p.match(TEMP_PATTERN) or p.name == LOCK_NAME for p in folder.iterdir())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def temp_writer(tmp: Path) -> int | None:
    """The pid of the process that made temporary file `tmp` (None for names without one)."""
    m = _TEMP_PID.search(tmp.name)
    return int(m.group(1)) if m else None


def remove_stale_temp(folder: str | Path, recursive: bool = False, spare_live: bool = False) -> int:
    """Delete the temporary files (`.NAME.<pid>-*.tmp`, see atomic_path) that a killed process left in
    `folder`; returns how many. Call it only where no other process is writing (a run folder: where this
    process holds its lock, `bgmask.runfolder`); with `spare_live`, the files of another live process
    are left alone all the same (a writer that took no lock)."""
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


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def load_weights_only(path: str | Path, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True), without torch's warning about the pickle protocol of a file that
    torch.save did not write (the caller turns the refusal into one line; the warning would be a second).
    `mmap`: tensors stay in the file until touched (zip-format files only; others load whole)."""
    import zipfile

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True,
                          mmap=mmap and zipfile.is_zipfile(path))


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
                    trust_flag: str = "--trust_checkpoint", unsafe: str | None = None, explain: bool = False,
                    mmap: bool = False):
    """torch.load with weights_only=True; `trust` allows arbitrary unpickling of a real torch file (never
    of junk). A missing, truncated, junk or unsafe file is one UserError naming `path` (`what`: how to
    call it, e.g. "checkpoint"); only a real torch pickle that needs more than weights suggests trust:
    the line `unsafe` when given, else one naming `trust_flag`. With `explain`, a file that torch cannot
    open (RuntimeError, EOFError, OSError: a truncated archive) is reported with torch's own reason; else
    every failure reads as junk, naming the exception's class. With `mmap`, a caller that reads only the
    file's small entries (a checkpoint's saved settings) leaves its tensors on disk. One implementation
    for the classifier's files and the segmenter's (`bgmask.seg.checkpoint.load_checkpoint_file`)."""
    import pickle

    path = Path(path)
    junk = f"cannot read {what} {path}: not a torch checkpoint (truncated or not a torch file"
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return load_weights_only(path, map_location, mmap)
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


# ------------------------------------------------------------------------------------ the stage cache
# Skip a piece of work when its marker holds the same inputs, else do it and write the marker
# atomically. A marker is a JSON object in a file, written only after the work it describes is whole
# (`run`), or, for a folder filled file by file, before the first file (`claim`), so a rerun with the same
# inputs resumes the folder and a rerun with other inputs never mixes two kinds of files. A marker that is
# missing, unreadable or not a JSON object counts as "other inputs": the work runs again.

class Marker:
    """The marker file at `path`; `fields` (default: every key of the inputs) are the ones compared. With
    `exact`, the saved object must also hold no key the inputs lack (a config compared as a whole, where
    a missing key is a setting left at its default)."""

    def __init__(self, path: str | Path, fields=None, exact: bool = False):
        self.path = Path(path)
        self.fields = tuple(fields) if fields is not None else None
        self.exact = exact

    def saved(self) -> dict:
        return read_json_object(self.path)

    def holds(self, inputs: dict, key: str | None = None) -> bool:
        """Whether the marker records these inputs (under `key`, or as the marker object itself)."""
        if not self.path.is_file():
            return False
        saved = self.saved()
        saved = saved.get(key, {}) if key else saved
        if not isinstance(saved, dict):
            return False
        keys = self.fields if self.fields is not None else tuple(inputs)
        if (self.exact or (self.fields is None and key)) and set(saved) != set(inputs):
            return False
        return all(saved.get(k) == inputs.get(k) for k in keys)

    def write(self, record: dict) -> None:
        atomic_write_text(self.path, json.dumps(record, indent=2))

    def run(self, inputs: dict, fn, fresh: bool = False):
        """(result, seconds): fn()'s result and its duration, or the saved result and None when the marker
        holds `inputs` (and not `fresh`). The marker records {"inputs", "result", "seconds"}; `fn` returns
        JSON-serialisable data."""
        if not fresh and self.holds(inputs, key="inputs"):
            return self.saved().get("result"), None
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.write({"inputs": inputs, "result": result, "seconds": seconds})
        return result, seconds

    def claim(self, folder: str | Path, inputs: dict, overwrite: bool, refusal: str | Callable[[dict], str],
              record: dict | None = None, text: str | None = None, fresh: bool = False, *, clear=None,
              keep_unmarked: bool = False) -> bool:
        """Make `folder` the home of outputs of `inputs`, before its first file is written. True when the
        folder already held them (the caller resumes it: finished files are kept). A folder of other inputs
        (or a non-empty one without the marker) is replaced with `overwrite`, else refused with
        `refusal` (one line; `{saved}` in it is the saved marker; or a function of the saved marker that
        returns the line, for a message that depends on it). With `fresh`, a folder that holds the inputs
        is treated like one of other inputs (an `--overwrite` that always starts again). The marker then
        holds `record` (default: the inputs), written as `text` when given (a file whose exact bytes
        matter).

        `clear(folder)` removes the old outputs before a replacement (default: the whole folder, for an
        output folder that holds nothing else). With `keep_unmarked`, a folder without the marker is taken
        as it is and its files count as finished: for an output folder the user may share with other
        files, which must be neither refused nor deleted."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"output folder {folder} exists and is not a folder")
        resumed = not fresh and self.holds(inputs)
        taken = self.path.is_file() if keep_unmarked else not is_empty_folder(folder)
        if not resumed and taken:
            if not overwrite:
                saved = self.saved()
                raise UserError(refusal(saved) if callable(refusal) else refusal.format(saved=saved))
            (clear or shutil.rmtree)(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp(folder, recursive=True)  # half-written files of a killed run
        if text is not None:
            atomic_write_text(self.path, text)
        else:
            self.write(record if record is not None else inputs)
        return resumed
