"""User-facing errors: one clear line, exit status 2, never a deep traceback."""

from __future__ import annotations

import argparse
import difflib
import errno
import functools
import math
import os
import re
import sys
from pathlib import Path

_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class UserError(Exception):
    """Bad input from the user (path, value, flag combination). Printed as one line; exit 2."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the project's rule for bad input: a bad flag or value raises a UserError,
    which `run_cli` prints as one line `error: ...` (exit status 2) naming the flag, the value and
    what was expected, instead of argparse's usage block. `--help` is argparse's own. Parsers made by
    `add_subparsers` are of this class too (argparse's `parser_class` defaults to `type(parent)`), and
    an unknown flag after a subcommand is reported against that subcommand."""

    TYPE_NAMES = {"int": "an integer", "float": "a number"}

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            self._chosen(ns).error(f"unrecognized arguments: {' '.join(extra)}")
        self._chosen(ns).check_ranges(ns)
        self._chosen(ns).check_outputs(ns)
        return ns

    def check_ranges(self, ns) -> None:
        """The one check of every setting's value (command line or --config), `bgmask.flagvalues`: its
        type, choices and the Interval its definition declared (`bgmask.args.add(..., range=...)`); NaN
        and inf never pass. None (an optional flag left unset) is allowed."""
        from bgmask.flagvalues import check_namespace

        check_namespace(self, ns)

    def check_outputs(self, ns) -> None:
        """Every output path a flag declared (`bgmask.args.add(..., output="folder" | "file" | "prefix")`)
        checked before any work: `require_output`."""
        for action in self._actions:
            kind = getattr(action, "output", None)
            value = getattr(ns, action.dest, None)
            if kind and isinstance(value, str):
                require_output(value, action.option_strings[0] if action.option_strings else action.dest, kind)

    def _chosen(self, ns) -> ArgumentParser:
        """The parser of the subcommand given on the command line (self without subcommands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(ns, action.dest, None))
                if isinstance(sub, ArgumentParser):
                    return sub._chosen(ns)
        return self

    def error(self, message: str):
        message = " ".join(str(message).split())
        hint = ""
        wrong_type = re.search(r"invalid (\w+) value: ", message)
        if wrong_type and wrong_type.group(1) in self.TYPE_NAMES:
            hint = f"expected {self.TYPE_NAMES[wrong_type.group(1)]}; "
        elif message.startswith("unrecognized arguments: "):
            unknown = next((a.split("=", 1)[0] for a in message.split()[2:] if a.startswith("-")), None)
            close = difflib.get_close_matches(unknown, self._option_string_actions, n=1) if unknown else []
            if close:
                hint = f"did you mean {close[0]}? "
        raise UserError(f"{message} ({hint}see {self.prog} --help)")


_INTERVAL = re.compile(r"^([\[(])\s*([-+.\w]+)\s*,\s*([-+.\w]+)\s*([\])])$")


class Interval:
    """The values a numeric flag accepts, written as in maths: "[0, 1]", "(0, inf)", "[1, 4096]";
    a bound of inf means unbounded on that side. NaN and +-inf are never inside."""

    def __init__(self, text: str):
        m = _INTERVAL.match(text)
        if not m:
            raise ValueError(f"not an interval: {text!r} (expected e.g. '[0, 1]' or '(0, inf)')")
        self.text, self.lo, self.hi = text, float(m[2]), float(m[3])
        self.lo_open, self.hi_open = m[1] == "(", m[4] == ")"

    def __contains__(self, v) -> bool:
        above = self.lo < v if self.lo_open else self.lo <= v
        below = v < self.hi if self.hi_open else v <= self.hi
        return math.isfinite(v) and above and below

    def __str__(self) -> str:
        if math.isinf(self.hi) and math.isinf(self.lo):
            return "finite"
        if math.isinf(self.hi):
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {self.text}"


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


PREFIX_SUFFIXES = (".json", ".md")  # what an output prefix (eval_waterbirds.py --out PREFIX) is written as


def require_output(path: str | Path, flag: str, kind: str = "folder") -> Path:
    """An output a command is about to write, checked without writing anything: `kind` "folder" (the path
    is a folder or can be made one), "file" (the path is no folder, its folder can be written) or
    "prefix" (PREFIX.json and PREFIX.md are no folders, PREFIX's folder can be written). A file where a folder belongs (or
    the reverse), a parent that is a file, or a folder this process may not write is one UserError naming
    the path."""
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file (expected a folder to write into)")
    if kind == "file" and path.is_dir():
        raise UserError(f"{flag} {path} is a folder (expected a file to write)")
    for written in [Path(f"{path}{suffix}") for suffix in PREFIX_SUFFIXES] if kind == "prefix" else []:
        if written.is_dir():
            raise UserError(f"{flag} {path}: {written} is a folder (expected a file to write)")
    folder = path if kind == "folder" else path.parent
    first = folder
    while not first.exists() and first.parent != first:  # missing folders are made by the command
        first = first.parent
    if first.exists() and not first.is_dir():
        raise UserError(f"{flag} {path}: {first} is a file, so no folder can be made under it")
    if first.exists() and not os.access(first, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {first} is read-only (for this user)")
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
