"""User-facing errors: one clear line, exit status 2, never a deep traceback."""

from __future__ import annotations

import argparse
import difflib
import errno
import functools
import math
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
        return ns

    def check_ranges(self, ns) -> None:
        """The one range check: every numeric flag's value (command line or --config) against the
        Interval its definition declared (`bgmask.args.add(..., range=...)`); NaN and inf never pass.
        None (an optional flag left unset) is allowed."""
        for action in self._actions:
            if action.type not in (int, float) or action.option_strings == []:
                continue
            value = getattr(ns, action.dest, None)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                _check_number(action.option_strings[0], v, getattr(action, "range", None), action.type)

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


def _check_number(flag: str, v, interval: Interval | None, kind) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise UserError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if interval is not None and v not in interval:
        raise UserError(f"{flag} must be {interval}, got {v}")
    if interval is None and not math.isfinite(v):
        raise UserError(f"{flag} must be a finite number, got {v}")


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


def has_package(name: str) -> bool:
    """Whether an optional package can be imported (found, not imported: captum pulls in matplotlib)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def missing_package(name: str, why: str, extra: str) -> UserError:
    """The one-line error for an optional package that the flags ask for and that is not installed."""
    return UserError(f"{why} needs the optional package {name}, which is not installed "
                     f"(pip install {name}, or pip install 'bgmask[{extra}]')")


def require_package(name: str, why: str, extra: str) -> None:
    """Raise `missing_package`'s error, before any work, when `name` cannot be imported."""
    if not has_package(name):
        raise missing_package(name, why, extra)
