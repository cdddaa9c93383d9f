"""User-facing errors: one clear line, exit status 2, never a deep traceback."""

from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path

_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class UserError(Exception):
    """Bad input from the user (path, value, flag combination). Printed as one line; exit 2."""

    exit_code = 2


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} (expected an existing file)")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what} not found: {path} (expected an existing folder)")
    return path


def run_cli(main_fn):
    """Wrap a `main(argv)` so that a UserError prints `error: ...` on one line and exits 2."""

    @functools.wraps(main_fn)
    def wrapper(argv=None):
        try:
            return main_fn(argv)
        except UserError as e:
            print(f"error: {one_line(str(e))}", file=sys.stderr)
            return UserError.exit_code
        except OSError as e:  # a full disk or a read-only folder met outside bgmask.io: still one line
            if e.errno not in _DISK_ERRNOS:
                raise
            where = f" {e.filename}" if e.filename else ""
            print(f"error: cannot write{where}: {e.strerror}", file=sys.stderr)
            return UserError.exit_code

    return wrapper


def one_line(message: str) -> str:
    """The user's line out of a message; a UserError raised in a DataLoader worker arrives wrapped in
    the worker's traceback text, whose last `UserError: ...` line is the one to show."""
    if "\n" not in message:
        return message
    for line in reversed(message.splitlines()):
        if "UserError: " in line:
            return line.split("UserError: ", 1)[1]
    return message.strip().splitlines()[-1]
