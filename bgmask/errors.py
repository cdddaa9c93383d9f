"""User-facing errors: one clear line, exit status 2, never a deep traceback; and the one check of a
flag's value from any source of settings (`flag_value`)."""

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

# The OSErrors that are the user's to fix, not bugs: a full disk or quota, a read-only file system, a
# forbidden file or folder, a path through a file. bgmask.io and run_cli report them as one line.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})


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
        """The one check of every setting's value (command line or --config), `flag_value` below: its
        type, choices and the Interval its definition declared (`bgmask.args.add(..., range=...)`); NaN
        and inf never pass. None (an optional flag left unset) is allowed."""
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
        except OSError as e:  # a full disk or a forbidden folder met outside bgmask.io: still one line
            if e.errno not in DISK_ERRNOS:
                raise
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror}", file=sys.stderr)
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


# ------------------------------------------------------------ settings: one check for every source
# One conversion and check of a flag's value, whatever its source: the command line, a `--config` YAML
# file, a checkpoint's saved settings, an application's overrides.
#
# `flag_value(action, value, source)` returns `value` as the command line would have given it for that
# argparse action (its type, choices, nargs and declared range: `bgmask.args.add(..., range=...)`), or
# raises one UserError naming the flag, the value and where it came from. It reads only the action, so a
# flag defined later is covered by its definition alone. The rules for typed sources (YAML, a saved
# config), where the command line has only strings:
#   - a switch (store_true / store_false / store_const) takes one of its own values: a YAML boolean for a
#     true/false switch, never the string "false" (which argparse would keep, and Python reads as true);
#   - a number flag takes a number (an integer for an int flag; a bool is not one) or a string that the
#     flag's type reads, as on the command line ("1e-3": YAML 1.1 reads that spelling as a string);
#   - a text flag takes a string, or a number written as one; a bool or a list is refused (unquoted YAML
#     `no` is a bool);
#   - a list flag (nargs) takes a list of such values (a single value is a list of one);
#   - null only where the flag's own default is null (an optional flag left unset).

_NOT_SETTINGS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
# argparse's own actions; another Action class (e.g. mmengine's DictAction) converts its values itself,
# into a form only it knows, and is passed through as it is
_KNOWN = (argparse._StoreAction, argparse._StoreConstAction, argparse._StoreTrueAction, argparse._StoreFalseAction,
          argparse._AppendAction, argparse._CountAction, argparse._ExtendAction)


def flag_name(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


def settable(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """dest -> the actions that set it (a flag and its `--no_` twin share one dest), for every setting
    of `parser` (not --help, --version or the subcommand)."""
    out: dict[str, list[argparse.Action]] = {}
    for a in parser._actions:
        if not isinstance(a, _NOT_SETTINGS) and a.dest != argparse.SUPPRESS:
            out.setdefault(a.dest, []).append(a)
    return out


def _show(value) -> str:
    return f"the string {value!r}" if isinstance(value, str) else repr(value)


class _Bad(Exception):
    """What the value should have been (turned into the UserError by flag_value)."""


def flag_value(action: argparse.Action, value, source: str | None = None, siblings=()):
    """`value` converted and checked for `action` (the rules above); `source` (e.g. "--config
    c.yaml") starts the error line; `siblings`: other actions with the same dest, whose constants are
    also values of it (--channels_last / --no_channels_last)."""
    if type(action) not in _KNOWN:
        return value
    try:
        return _convert(action, value, siblings)
    except _Bad as e:
        where = f"{source}: " if source else ""
        raise UserError(f"{where}{flag_name(action)} must be {e}, got {_show(value)}") from None


def _convert(action, value, siblings):
    if value is None:
        if action.default is None or isinstance(action, argparse._StoreConstAction) and action.const is None:
            return None
        raise _Bad(_expected(action, siblings) + " (null is not a value of this flag)")
    if action.nargs == 0:  # a switch
        allowed = [action.const, action.default, *[s.const for s in siblings]]
        if isinstance(action, argparse._CountAction):
            return _scalar(action, value)
        if any(v is not None and type(v) is type(value) and v == value for v in allowed):
            return value
        raise _Bad(_expected(action, siblings))
    if action.nargs == "?":  # an optional value: `true` is the flag given bare (its constant), `false` not given
        if value is True or value is False:
            return action.const if value else action.default
        return _scalar(action, value)
    if action.nargs in ("+", "*", argparse.REMAINDER) or isinstance(action.nargs, int) or \
            isinstance(action, argparse._AppendAction):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise _Bad(_expected(action, siblings))
        if action.nargs == "+" and not items:
            raise _Bad(_expected(action, siblings))
        if isinstance(value, dict):
            raise _Bad(_expected(action, siblings))
        return [_scalar(action, v) for v in items]
    return _scalar(action, value)


def _expected(action, siblings=()) -> str:
    if action.nargs == 0 and not isinstance(action, argparse._CountAction):
        consts = [action.const, action.default, *[s.const for s in siblings]]
        if set(consts) <= {True, False, None} and all(isinstance(c, bool) or c is None for c in consts):
            return "true or false (a YAML boolean, unquoted)"
        return "one of " + ", ".join(repr(c) for c in dict.fromkeys(consts))
    one = _kind(action)
    if isinstance(action.nargs, int):
        return f"a list of {action.nargs} values, each {one}"
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        return f"a list of values, each {one}"
    return one


def _kind(action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    rng = getattr(action, "range", None)
    if action.type is int or isinstance(action, argparse._CountAction):
        return "an integer" + (f" {rng}" if rng is not None else "")
    if action.type is float:
        return "a number" + (f" {rng}" if rng is not None else "")
    return "a string"


def _scalar(action, v):
    kind = int if isinstance(action, argparse._CountAction) else action.type
    if isinstance(v, (bool, list, tuple, dict)) or v is None:
        raise _Bad(_kind(action))
    if kind in (int, float):
        if isinstance(v, str):
            try:
                v = kind(v.strip())
            except ValueError:
                raise _Bad(_kind(action)) from None
        if kind is int and not isinstance(v, int) or not isinstance(v, (int, float)):
            raise _Bad(_kind(action))
        v = kind(v)
        rng = getattr(action, "range", None)
        if rng is not None and v not in rng:
            raise _Bad(str(rng))  # the line the command line has always given: "--lr must be > 0, got nan"
        if rng is None and not math.isfinite(v):
            raise _Bad("a finite number")
    elif kind is None:
        if not isinstance(v, (str, int, float)):
            raise _Bad(_kind(action))
        v = v if isinstance(v, str) else str(v)
    else:
        v = kind(v if isinstance(v, str) else str(v))
    if action.choices is not None and not any(type(c) is type(v) and c == v for c in action.choices):
        raise _Bad(_kind(action))
    return v


def settings_from_mapping(parser: argparse.ArgumentParser, values: dict, source: str,
                          unknown: str = "error") -> dict:
    """{dest: value} checked and converted for `parser` (every key through `flag_value`); a key that is
    no setting of `parser` is an error (`unknown="error"`) or kept as it is (`"keep"`: a checkpoint of
    another bgmask version). Flags of a mutually exclusive group set together are one line too."""
    actions = settable(parser)
    bad_keys = sorted(str(k) for k in values if not isinstance(k, str) or k not in actions)
    if bad_keys and unknown == "error":
        raise UserError(f"{source}: unknown keys {', '.join(bad_keys)}")
    out = {}
    for key, value in values.items():
        if key in actions:
            first, *others = actions[key]
            out[key] = flag_value(first, value, source, others)
        else:
            out[key] = value
    for group in parser._mutually_exclusive_groups:
        given = [a for a in group._group_actions if a.dest in out and out[a.dest] != a.default]
        if len(given) > 1:
            raise UserError(f"{source}: {flag_name(given[0])} and {flag_name(given[1])} exclude each other")
    return out


def check_namespace(parser: argparse.ArgumentParser, ns: argparse.Namespace, source: str | None = None) -> None:
    """Every setting of `parser` in `ns` through `flag_value` (argparse has converted the command line's
    values and checked their choices; this adds the declared ranges, and covers defaults set from other
    sources alike)."""
    for dest, (first, *others) in settable(parser).items():
        if hasattr(ns, dest):
            flag_value(first, getattr(ns, dest), source, others)
