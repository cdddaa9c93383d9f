"""Every numeric flag of every parser declares its range where it is defined, and the parser checks
them all (command line and --config) before a script builds or writes anything.

The catalogue is collected from the parsers themselves: a new numeric flag without a range (or
choices) fails `test_every_numeric_flag_declares_a_range`, and gets an out-of-range case here."""

from __future__ import annotations

import argparse
import math
import re

import pytest

from bgmask import args as A
from bgmask.errors import Interval, UserError


def _cli_sub(name):
    from bgmask.apps.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _runner(name):
    from bgmask.seg import cli

    return getattr(cli, name)()


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

    from bgmask.apps.cli import build_parser

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
    from bgmask.apps.scripts import train_early

    run = tmp_path / "run"
    rc = train_early(["--data_path", str(tmp_path / "no_cub"), "--snapshot_dir", str(run), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"error: {expected}"
    assert not run.exists()


def test_config_values_are_checked_alike(tmp_path):
    cfg = tmp_path / "c.yaml"
    where = f"--config {cfg}: "
    cfg.write_text("lr: .nan\n")
    with pytest.raises(UserError, match=rf"^{re.escape(where)}--lr must be > 0, got nan$"):
        A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])
    cfg.write_text("num_workers: -2\n")
    with pytest.raises(UserError, match=rf"^{re.escape(where)}--num_workers must be >= 0, got -2$"):
        A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])
    cfg.write_text("num_workers: two\n")  # a string goes through the flag's type, as on the command line
    with pytest.raises(UserError, match="--num_workers"):
        A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])
    cfg.write_text("num_workers: true\n")
    with pytest.raises(UserError, match=rf"^{re.escape(where)}--num_workers must be an integer >= 0, got True$"):
        A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])
    cfg.write_text("lr: 1e-3\nepochs: '3'\n")  # YAML 1.1 reads 1e-3 as a string: read as the command line would
    ns = A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])
    assert ns.lr == 1e-3 and ns.epochs == 3


# ------------------------------------------------------- the YAML path: every setting of every parser

def _settings(parser):
    """dest -> actions, as bgmask.errors.settable (written out here: the catalogue is collected from
    the parsers alone)."""
    out = {}
    for a in parser._actions:
        if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            out.setdefault(a.dest, []).append(a)
    return out


def _bad_yaml_values(action) -> list:
    """Typed values (as YAML gives them) that the flag must refuse."""
    if action.nargs == 0:  # a switch
        return ["false", "true", 1] if isinstance(action.default, bool) or action.default is None else ["x"]
    bad = [{"a": 1}]
    if action.default is not None:
        bad.append(None)
    listy = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if not listy and action.nargs != "?":
        bad.append([1, 2])
    if action.type in (int, float):
        bad += ["x", True] + ([] if action.choices else [_typed(v) for v in _bad_values(action)])
        if action.type is int:
            bad.append(1.5)
    elif action.choices is not None:
        bad.append("not_a_choice")
    else:
        bad += [False] if action.nargs != "?" else []
    return [[v] if listy and not isinstance(v, dict) and v is not None else v for v in bad]


def _typed(text: str):
    return float(text) if any(c in text for c in ".ni") else int(text)


def _yaml_cases(parsers):
    for name, make in parsers.items():
        parser = make()
        for dest, (action, *_) in _settings(parser).items():
            if type(action).__module__ != "argparse":  # e.g. mmengine's DictAction: its own conversion
                continue
            for value in _bad_yaml_values(action):
                yield pytest.param(name, dest, value, id=f"{name}:{dest}={value!r}")


YAML_CASES = list(_yaml_cases(PARSERS))


@pytest.mark.parametrize("name, dest, value", YAML_CASES)
def test_bad_yaml_value_is_one_line_naming_file_and_flag(tmp_path, name, dest, value):
    """The --config path of every setting of every parser: the value a YAML file gives is converted and
    checked as the command line's (bool, int, float, choice, list, null), one line naming file and flag."""
    import yaml

    from bgmask.errors import flag_name, settings_from_mapping

    parser = PARSERS[name]()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({dest: value}))
    with pytest.raises(UserError) as err:
        settings_from_mapping(parser, A.read_config(path), f"--config {path}")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--config {path}: ")
    assert flag_name(_settings(parser)[dest][0]) in message


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_default_passes_the_yaml_path_unchanged(tmp_path, name):
    """A YAML file of the flags' own defaults (what a run's config.yaml holds) reads back as those
    defaults: the check refuses nothing that the parser itself would give."""
    import yaml

    from bgmask.errors import settings_from_mapping

    parser = PARSERS[name]()
    defaults = {dest: actions[0].default for dest, actions in _settings(parser).items()}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(defaults))
    assert settings_from_mapping(parser, A.read_config(path), f"--config {path}") == defaults


def test_the_yaml_catalogue_covers_every_kind():
    kinds = {(d, repr(v)) for _, d, v in (c.values for c in YAML_CASES)}
    assert {("freeze_backbone", "'false'"), ("lr", "None"), ("lr", "[1, 2]"), ("seeds", "[True]"),
            ("strategy", "'not_a_choice'"), ("cutmix_minmax", "{'a': 1}"),
            ("channels_last", "'false'")} <= kinds


@pytest.mark.parametrize("text, expected", [
    ('freeze_backbone: "false"\n', "--freeze_backbone must be true or false (a YAML boolean, unquoted), got the "
                                    "string 'false'"),
    ("freeze_backbone: no_thanks\n", "--freeze_backbone must be true or false"),
    ("lr: [0.1]\n", "--lr must be a number > 0, got [0.1]"),
    ("lr: null\n", "--lr must be a number > 0 (null is not a value of this flag), got None"),
    ("epochs: ~\n", "--epochs must be an integer >= 1 (null is not a value of this flag), got None"),
    ("batch_size: 3.5\n", "--batch_size must be an integer >= 1, got 3.5"),
    ("cutmix_minmax: [0.1]\n", "--cutmix_minmax must be a list of 2 values"),
    ("cutmix_minmax: [0.1, 2]\n", "--cutmix_minmax must be in [0, 1], got [0.1, 2]"),
    ("aa: no\n", "--aa must be a string, got False"),
    ("class_token_only: true\npatch_tokens_only: true\n", "--class_token_only and --patch_tokens_only exclude"),
])
def test_train_config_value_refused_before_writing(tmp_path, capsys, text, expected):
    """The config cases of issue 20: each is one line naming the file, before the run folder exists
    (before: "false" trained a frozen model, a list or null ended in a TypeError traceback)."""
    from bgmask.apps.scripts import train_early

    cfg, run = tmp_path / "c.yaml", tmp_path / "run"
    cfg.write_text(text)
    rc = train_early(["--data_path", str(tmp_path), "--snapshot_dir", str(run), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --config {cfg}: {expected}")
    assert not run.exists()


def test_yaml_booleans_and_lists_are_read_as_the_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("freeze_backbone: false\nuse_amp: true\ncutmix_minmax: [0.2, 0.8]\nno_progress: true\n"
                   "channels_last: false\ntorchcompile: true\nsnapshot_dir: 2024\n")
    ns = A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])
    assert ns.freeze_backbone is False and ns.use_amp is True and ns.cutmix_minmax == [0.2, 0.8]
    assert ns.channels_last is False and ns.torchcompile == "inductor" and ns.snapshot_dir == "2024"
    ns = A.parse_with_config(A.train_parser("t"), ["--config", str(cfg), "--channels_last"])  # the command line wins
    assert ns.channels_last is True
    cfg.write_text("torchcompile: false\n")
    assert A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)]).torchcompile is None


def test_non_utf8_config_names_the_file(tmp_path, capsys):
    from bgmask.apps.scripts import train_early

    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"lr: 0.1\n# caf\xe9\n")
    rc = train_early(["--data_path", str(tmp_path), "--snapshot_dir", str(tmp_path / "run"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(cfg) in err and "UTF-8" in err


def test_a_run_config_yaml_is_a_valid_config(tmp_path):
    """A config.yaml written by a run reads back through the check (the checkpoint's saved settings are
    the same values)."""
    import yaml

    ns = A.parse_with_config(A.train_parser("t"), ["--lr", "0.01", "--cutmix_minmax", "0.1", "0.9"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(vars(ns)))
    assert vars(A.parse_with_config(A.train_parser("t"), ["--config", str(cfg)])) == {**vars(ns), "config": str(cfg)}


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
    from bgmask.apps.cli import main

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


def test_application_overrides_go_through_the_check_before_writing(tmp_path):
    """The flags an application builds for a run (the demo's, mask-sweep's, pretrain's) are checked as
    the command line's before anything is written: a bad value of a preset is one line."""
    import copy

    from bgmask import stages

    p = copy.deepcopy(stages.PRESETS["tiny"])
    p.lr = {"cnn": float("nan"), "vit": 1e-3}
    run = tmp_path / "run"
    overrides = stages.classifier_settings(("cnn", "baseline", "-", "scratch"), 0, p, tmp_path, None, run, None)
    with pytest.raises(UserError, match=r"^run .*: --lr must be > 0, got nan$"):
        stages.train_run(overrides, run)
    assert not run.exists()


def _accepts(flag: str, value) -> None:
    """Run `value` of `flag` through the code that implements the flag (a refusal raises)."""
    import torch

    from bgmask.data.transforms import build_transform
    from bgmask.eval import autocast_context
    from bgmask.masking.strategies import apply_early_mask
    from bgmask.models import create_classifier

    images, masks = torch.zeros(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
    if flag in ("augmentations_to_use", "train_interpolation", "remode"):
        kw = {"augmentations": value} if flag == "augmentations_to_use" else {flag: value}
        build_transform(True, 32, **kw)
    elif flag == "mask_fill":
        apply_early_mask(images, masks, value, (0.5,) * 3, (0.5,) * 3)
    elif flag in ("late_mask_stage", "late_pool"):
        create_classifier("bgmask_resnet_tiny", 2, **{flag: value})
    elif flag == "amp_dtype":
        with autocast_context(torch.device("cpu"), True, value):
            pass
    else:
        raise AssertionError(f"no check for --{flag}")


@pytest.mark.parametrize("flag", ["augmentations_to_use", "train_interpolation", "remode", "mask_fill",
                                  "late_mask_stage", "late_pool", "amp_dtype"])
def test_every_choice_is_accepted_by_the_code_that_implements_it(flag):
    """These flags' choices are derived from their code's registry (bgmask.args imports them): every choice
    the parser offers reaches that code and is accepted there."""
    action = next(a for a in A.train_parser("t")._actions if a.dest == flag)
    assert len(action.choices) > 1
    for value in action.choices:
        _accepts(flag, value)
