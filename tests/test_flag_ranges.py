"""Every numeric flag of every parser declares its range where it is defined, and the parser checks
them all (command line and --config) before a script builds or writes anything.

The catalogue is collected from the parsers themselves: a new numeric flag without a range (or
choices) fails `test_every_numeric_flag_declares_a_range`, and gets an out-of-range case here."""

from __future__ import annotations

import argparse
import math

import pytest

from bgmask import args as A
from bgmask.errors import Interval, UserError


def _cli_sub(name):
    from bgmask.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _runner(name):
    from bgmask.seg import runner

    return getattr(runner, name)()


PARSERS = {
    "train.py": lambda: A.train_parser("t"),
    "bgmask make-synthetic": lambda: _cli_sub("make-synthetic"),
    "bgmask make-binary-seg": lambda: _cli_sub("make-binary-seg"),
    "bgmask make-masked": lambda: _cli_sub("make-masked"),
    "bgmask report": lambda: _cli_sub("report"),
    "seg train.py": lambda: _runner("train_parser"),
    "seg test.py": lambda: _runner("test_parser"),
    "predict_masks.py": lambda: _runner("predict_parser"),
    "gen_masked_image_dataset.py": lambda: _runner("gen_masked_parser"),
    "convert_checkpoint.py": lambda: _runner("convert_parser"),
    "bgmask demo": lambda: _cli_sub("demo"),
}


def _cli_subcommands() -> list[str]:
    import argparse

    from bgmask.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


# every `bgmask` subcommand, also one added later (pretrain, mask-sweep, ...)
PARSERS.update({f"bgmask {name}": (lambda n=name: _cli_sub(n)) for name in _cli_subcommands()})


def numeric_actions(parser):
    return [a for a in parser._actions if a.option_strings and a.type in (int, float)]


def _bad_values(action) -> list[str]:
    """Values just outside the declared range (or choices), plus nan and inf for float flags."""
    if action.choices is not None:
        return [str(max(action.choices) + 1)]
    rng: Interval = action.range
    step = 1 if action.type is int else 0.5
    out = []
    if math.isfinite(rng.lo):
        out.append(rng.lo if rng.lo_open else rng.lo - step)
    if math.isfinite(rng.hi):
        out.append(rng.hi if rng.hi_open else rng.hi + step)
    out = [str(action.type(v)) for v in out]
    return out + (["nan", "inf"] if action.type is float else [])


def _argv(parser, action, value: str) -> list[str]:
    """The bad value plus a placeholder for every required argument, so only the range can fail."""
    n = action.nargs if isinstance(action.nargs, int) else 1
    argv = [action.option_strings[0], *[value] * n]
    for a in parser._actions:
        placeholder = str(next(iter(a.choices))) if a.choices else "x"  # a required choice flag takes a valid one
        if a.required and not a.option_strings:
            argv.append(placeholder)
        elif a.required:
            argv += [a.option_strings[0], placeholder]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            argv += [group._group_actions[0].option_strings[0], "x"]
    return argv


def _cases(parsers):
    for name, make in parsers.items():
        for action in numeric_actions(make()):
            for value in _bad_values(action) if (action.choices or hasattr(action, "range")) else ["nan"]:
                yield pytest.param(name, action.option_strings[0], value, id=f"{name}:{action.option_strings[0]}={value}")


CASES = list(_cases(PARSERS))


def _flag_action(parser, flag):
    return next(a for a in numeric_actions(parser) if a.option_strings[0] == flag)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_numeric_flag_declares_a_range(name):
    parser = PARSERS[name]()
    missing = [a.option_strings[0] for a in numeric_actions(parser) if a.choices is None and not hasattr(a, "range")]
    assert not missing, f"{name}: numeric flags without range=...: {missing}"
    for a in numeric_actions(parser):  # the declared default is itself allowed
        if a.default is not None and a.choices is None:
            for v in a.default if isinstance(a.default, (list, tuple)) else [a.default]:
                assert v in a.range, (name, a.option_strings[0], a.default, a.range.text)


def test_the_catalogue_is_not_empty():
    flags = {flag for _, flag, _ in (c.values for c in CASES)}
    assert {"--image_size", "--lr", "--num_workers", "--eval_batch_size", "--mask_threshold", "--epochs",
            "--crop_pct", "--reprob", "--batch_size", "--empty_warn_fraction", "--local_rank"} <= flags


@pytest.mark.parametrize("name, flag, value", CASES)
def test_out_of_range_value_is_one_line(name, flag, value):
    parser = PARSERS[name]()
    argv = _argv(parser, _flag_action(parser, flag), value)
    with pytest.raises(UserError) as err:
        parser.parse_args(argv)
    message = str(err.value)
    assert "\n" not in message and flag in message
    if _flag_action(parser, flag).choices is None:  # choices: argparse's own "invalid choice" line
        assert message.startswith(f"{flag} must be ") and value.lstrip("-").split(".")[0] in message.rsplit("got ", 1)[1]


@pytest.mark.parametrize("flag, value, expected", [
    ("--image_size", "0", "--image_size must be in [1, 4096], got 0"),
    ("--image_size", "-3", "--image_size must be in [1, 4096], got -3"),
    ("--lr", "nan", "--lr must be > 0, got nan"),
    ("--lr", "-0.1", "--lr must be > 0, got -0.1"),
    ("--num_workers", "-1", "--num_workers must be >= 0, got -1"),
    ("--eval_batch_size", "0", "--eval_batch_size must be >= 1, got 0"),
    ("--mask_threshold", "300", "--mask_threshold must be in [0, 254], got 300"),
    ("--epochs", "0", "--epochs must be >= 1, got 0"),
    ("--crop_pct", "0", "--crop_pct must be in (0, 1], got 0.0"),
    ("--min_lr", "inf", "--min_lr must be finite, got inf"),
])
def test_train_script_refuses_before_writing(tmp_path, capsys, flag, value, expected):
    from bgmask.scripts import train_early

    run = tmp_path / "run"
    rc = train_early(["--data_path", str(tmp_path / "no_cub"), "--snapshot_dir", str(run), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"error: {expected}"
    assert not run.exists()


def test_config_values_are_checked_alike(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: .nan\n")
    with pytest.raises(UserError, match=r"^--lr must be > 0, got nan$"):
        A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])
    cfg.write_text("num_workers: -2\n")
    with pytest.raises(UserError, match=r"^--num_workers must be >= 0, got -2$"):
        A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])
    cfg.write_text("num_workers: two\n")  # a string default goes through the flag's type
    with pytest.raises(UserError, match="--num_workers"):
        A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])
    cfg.write_text("num_workers: true\n")
    with pytest.raises(UserError, match=r"^--num_workers must be an integer, got True$"):
        A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])


def test_unset_optional_flags_pass():
    cfg = A.parse_with_config(A.train_parser("t"), [])
    assert cfg.eval_batch_size is None and cfg.grad_norm_clip is None and cfg.cutmix_minmax is None


@pytest.mark.parametrize("argv, out", [
    (["make-synthetic", "--out", "{t}/syn", "--image_size", "0"], "syn"),
    (["make-synthetic", "--out", "{t}/syn", "--correlation", "nan"], "syn"),
    (["make-binary-seg", "--cub_root", "{t}", "--out", "{t}/seg", "--val_fraction", "1"], "seg"),
    (["make-masked", "--cub_root", "{t}", "--out_subdir", "m", "--mask_threshold", "300"], "m"),
])
def test_cli_refuses_before_writing(tmp_path, capsys, argv, out):
    from bgmask.cli import main

    assert main([a.format(t=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and argv[-2] in err and argv[-1] in err
    assert not (tmp_path / out).exists()


def test_interval_notation():
    assert 0 in Interval("[0, 1]") and 1 in Interval("[0, 1]") and 1 not in Interval("[0, 1)")
    assert 0 not in Interval("(0, inf)") and 1e30 in Interval("(0, inf)") and math.inf not in Interval("(0, inf)")
    assert str(Interval("(0, inf)")) == "> 0" and str(Interval("[1, inf)")) == ">= 1"
    with pytest.raises(ValueError):
        Interval("0..1")
