"""One conversion and check of a flag's value, whatever its source: the command line, a `--config` YAML
file, a checkpoint's saved settings, an application's overrides.

`flag_value(action, value, source)` returns `value` as the command line would have given it for that
argparse action (its type, choices, nargs and declared range: `bgmask.args.add(..., range=...)`), or
raises one UserError naming the flag, the value and where it came from. It reads only the action, so a
flag defined later is covered by its definition alone. The rules for typed sources (YAML, a saved
config), where the command line has only strings:
  - a switch (store_true / store_false / store_const) takes one of its own values: a YAML boolean for a
    true/false switch, never the string "false" (which argparse would keep, and Python reads as true);
  - a number flag takes a number (an integer for an int flag; a bool is not one) or a string that the
    flag's type reads, as on the command line ("1e-3": YAML 1.1 reads that spelling as a string);
  - a text flag takes a string, or a number written as one; a bool or a list is refused (unquoted YAML
    `no` is a bool);
  - a list flag (nargs) takes a list of such values (a single value is a list of one);
  - null only where the flag's own default is null (an optional flag left unset).
"""

from __future__ import annotations

import argparse
import math

from bgmask.errors import UserError

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
    """`value` converted and checked for `action` (see the module's rules); `source` (e.g. "--config
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
    if action.nargs == "?":  # an optional value: its constant when given bare (`true` in YAML), else a value
        if value is True:
            return action.const
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
