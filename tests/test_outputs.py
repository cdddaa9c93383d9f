"""Every command's outputs are checked up front (issue 20): an output path that is a file where a folder
belongs (or a folder where a file belongs), a parent that is a file, or a folder that cannot be written
is one line from the parser, before any work. (Before: `pretrain`, `mask-sweep`, `report` and `demo`
raised FileExistsError, `pretrain` only after the whole pretraining.)"""

from __future__ import annotations

import os

import pytest

from bgmask import args as A
from bgmask.errors import UserError

from test_flag_ranges import PARSERS

OUTPUT_DESTS = {"out", "out_dir", "save_path", "work", "work_dir", "dst", "snapshot_dir"}


def _eval_parser():
    from bgmask.apps.scripts import eval_parser

    return eval_parser("t", feature_level=True)


ALL = {**PARSERS, "eval_waterbirds.py": _eval_parser}


def outputs(parser):
    return [a for a in parser._actions if getattr(a, "output", None)]


def _argv(parser, action, value):
    """Placeholders for every required argument, `value` for `action`."""
    argv = []
    for a in parser._actions:
        placeholder = value if a is action else str(next(iter(a.choices))) if a.choices else "x"
        if not a.option_strings and (a.required or a is action) and a.nargs not in ("?", "*"):
            argv.append(placeholder)
        elif a.required and a is not action:
            argv += [a.option_strings[0], placeholder]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            argv += [group._group_actions[0].option_strings[0], "x"]
    if action.option_strings:
        argv += [action.option_strings[0], value]
    return argv


def _cases():
    for name, make in ALL.items():
        for a in outputs(make()):
            for fault in ("wrong kind", "parent is a file", "read-only"):
                yield pytest.param(name, a.dest, fault, id=f"{name}:{a.dest}:{fault}")


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_output_flag_declares_its_kind(name):
    """A flag that names what a command writes declares output=... (so the parser checks it); training's
    --snapshot_dir is checked by the run folder instead (an evaluation may read a read-only one)."""
    parser = ALL[name]()
    for a in parser._actions:
        if a.dest in OUTPUT_DESTS - {"snapshot_dir"}:
            assert getattr(a, "output", None) in ("folder", "file", "prefix"), (name, a.dest)


def test_the_output_catalogue_is_not_empty():
    names = {c.values[0] for c in _cases()}
    assert {"bgmask report", "bgmask demo", "bgmask pretrain", "bgmask mask-sweep", "bgmask make-synthetic",
            "eval_waterbirds.py", "convert_checkpoint.py"} <= names


@pytest.mark.parametrize("name, dest, fault", list(_cases()))
def test_bad_output_is_one_line_from_the_parser(tmp_path, monkeypatch, name, dest, fault):
    parser = ALL[name]()
    action = next(a for a in outputs(parser) if a.dest == dest)
    if fault == "wrong kind":
        target = tmp_path / "target"
        if action.output == "file":
            target.mkdir()
        elif action.output == "prefix":  # PREFIX.json is written: a folder of that name
            (tmp_path / "target.json").mkdir()
        else:
            target.write_text("a file")
        value = str(target)
    elif fault == "parent is a file":
        (tmp_path / "f").write_text("a file")
        value = str(tmp_path / "f" / "target")
    else:  # root writes anywhere, so the folder is made read-only for os.access (what the check asks)
        ro = tmp_path / "ro"
        ro.mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(ro) else real(p, mode, **k))
        value = str(ro / "target") if action.output != "folder" else str(ro)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError) as err:
        parser.parse_args(_argv(parser, action, value))
    message = str(err.value)
    assert "\n" not in message and value in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("argv", [
    ["report", "{t}/run", "--out", "{t}/file"],
    ["demo", "--preset", "tiny", "--out", "{t}/file"],
    ["mask-sweep", "--preset", "tiny", "--out", "{t}/file"],
    ["pretrain", "--model", "cnn", "--work", "{t}/work", "--out", "{t}/file"],
    ["pretrain", "--model", "cnn", "--work", "{t}/file", "--out", "{t}/zoo"],
    ["make-synthetic", "--out", "{t}/file"],
], ids=lambda a: " ".join(a[:1] + [x for x in a if "file" in x or x.startswith("--work")][:1]))
def test_subcommand_with_a_file_as_output_folder_is_one_line_before_any_work(tmp_path, capsys, argv):
    from bgmask.apps.cli import main

    (tmp_path / "file").write_text("a file")
    assert main([a.format(t=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/file is a file" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no work folder, no data


def test_missing_parents_of_an_output_are_made(tmp_path):
    """A missing parent that can be made is not an error: the command makes it (nothing is made by the
    check itself)."""
    ns = A.make_synthetic_args(A.ArgumentParser()).parse_args(["--out", str(tmp_path / "a" / "b" / "c")])
    assert ns.out == str(tmp_path / "a" / "b" / "c") and not (tmp_path / "a").exists()


def test_make_masked_output_that_is_a_file_is_one_line_before_any_work(tiny_cub, capsys):
    from bgmask.apps.cli import main

    (tiny_cub / "masked_waterbirds").write_text("a file")
    assert main(["make-masked", "--cub_root", str(tiny_cub), "--out_subdir", "masked"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tiny_cub / 'masked_waterbirds'} is a file" in err, err
    assert not (tiny_cub / "masked").exists()
