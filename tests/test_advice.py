"""Advice that works (issue 20): a flag named in an error message is a flag of the command that printed
it. Each case below is a bad invocation of one command; every `--flag` in its one-line error must be
one of that command's own flags. The two faults of the issue: `predict_masks.py` called a file of random
bytes "a full mmengine checkpoint" and suggested --trust-full-checkpoint (which then failed with an
UnpicklingError traceback); `make-binary-seg`'s empty val split recommended --train_split, a flag it
does not have."""

from __future__ import annotations

import argparse
import re

import pytest

from conftest import write_tiny_cub

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def _cli(name):
    from bgmask.apps.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _runner(name):
    from bgmask.seg import cli

    return getattr(cli, name)()


def _main(name):
    """(main(argv) -> exit code, the parser of that command)."""
    from bgmask.apps import scripts
    from bgmask.apps.cli import main as cli_main
    from bgmask.seg import cli as seg_cli

    if name.startswith("bgmask "):
        sub = name.split(" ", 1)[1]
        return (lambda argv: cli_main([sub, *argv])), _cli(sub)
    return {
        "train.py": (scripts.train_early, scripts.eval_parser("t", False)),  # train's flags (+ eval's --out)
        "eval_waterbirds.py": (scripts.eval_early, scripts.eval_parser("t", False)),
        "predict_masks.py": (seg_cli.predict_main, _runner("predict_parser")),
        "convert_checkpoint.py": (seg_cli.convert_main, _runner("convert_parser")),
        "seg test.py": (seg_cli.test_main if hasattr(seg_cli, "test_main") else None, _runner("test_parser")),
    }[name]


def _junk(t):
    p = t / "junk.pth"
    p.write_bytes(bytes(range(256)) * 8)
    return p


def _finished_run(t, cub):
    from bgmask.apps.scripts import train_early

    run = t / "run"
    assert train_early(["--data_path", str(cub), "--snapshot_dir", str(run), "--image_size", "32", "--epochs", "1",
                        "--batch_size", "4", "--num_workers", "0", "--no_progress", "--augmentations_to_use",
                        "none"]) == 0
    return run


# (command, argv with {t} = tmp folder and {cub} = a tiny CUB root, what the message must say)
CASES = [
    ("bgmask make-binary-seg", ["--cub_root", "{cub}", "--out", "{t}/seg", "--val_fraction", "0.01"], "val split"),
    ("bgmask make-binary-seg", ["--cub_root", "{t}/none", "--out", "{t}/seg"], "not found"),
    ("bgmask make-binary-seg", ["--cub_root", "{cub}", "--out", "{cub}", "--val_fraction", "0"], "not empty"),
    ("bgmask make-synthetic", ["--out", "{cub}"], "not empty"),
    ("bgmask make-masked", ["--cub_root", "{t}/none", "--out_subdir", "m"], "not found"),
    ("bgmask report", ["{t}"], "not a finished run folder"),
    ("bgmask demo", ["--rows", "cnn:sideways:-:scratch", "--out", "{t}/d"], "--rows"),
    ("bgmask mask-sweep", ["--perturbations", "melt:2", "--out", "{t}/s"], "--perturbations"),
    ("bgmask mask-sweep", ["--data_path", "{t}/none", "--out", "{t}/s"], "--data_path"),
    ("bgmask pretrain", ["--model", "cnn", "--recipes", "nope", "--work", "{t}/w", "--out", "{t}/z"], "--recipes"),
    ("bgmask pretrain", ["--model", "cnn", "--val_fraction", "0.01", "--train_per_class", "2", "--work", "{t}/w",
                         "--out", "{t}/z"], "--val_fraction"),
    ("predict_masks.py", ["--checkpoint", "{junk}", "--cub_root", "{cub}", "--out_dir", "{t}/m"], "not a torch"),
    ("predict_masks.py", ["--checkpoint", "{junk}", "--cub_root", "{cub}", "--out_dir", "{t}/m",
                          "--trust-full-checkpoint"], "not a torch"),
    ("predict_masks.py", ["--checkpoint", "{junk}", "--cub_root", "{cub}"], "--out_dir"),
    ("convert_checkpoint.py", ["{junk}", "{t}/slim.pth"], "not a torch"),
    ("train.py", ["--data_path", "{cub}", "--snapshot_dir", "{t}/r", "--resume_training"], "no checkpoint"),
    ("train.py", ["--data_path", "{cub}", "--snapshot_dir", "{t}/r", "--wandb_resume_id", "x"], "--wandb"),
    ("train.py", ["--data_path", "{cub}", "--snapshot_dir", "{t}/r", "--freeze_backbone", "--drop_path", "0.1"],
     "--drop_path"),
    ("train.py", ["--data_path", "{cub}", "--snapshot_dir", "{t}/r", "--mask_dir", "a", "--mask_source", "b"],
     "--mask_dir"),
    ("train.py", ["--data_path", "{cub}", "--snapshot_dir", "{run}", "--image_size", "32"], "--resume_training"),
    ("train.py", ["--data_path", "{cub}", "--snapshot_dir", "{t}/r", "--lr", "nan"], "--lr"),
    ("train.py", ["--data_path", "{cub}", "--snapshot_dir", "{t}/r", "--image_sizee", "3"], "--image_size"),
    ("eval_waterbirds.py", ["--data_path", "{cub}"], "--checkpoint"),
    ("eval_waterbirds.py", ["--data_path", "{cub}", "--checkpoint", "{junk}"], "not a torch"),
    ("eval_waterbirds.py", ["--data_path", "{cub}", "--checkpoint", "{run}/last.pt", "--model_arch",
                            "bgmask_vit_tiny"], "--model_arch"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    t = tmp_path_factory.mktemp("advice")
    cub = write_tiny_cub(t / "CUB", num_classes=3, per_class=(4, 2), size=(40, 32))
    return {"t": t, "cub": cub, "junk": _junk(t), "run": _finished_run(t, cub)}


@pytest.mark.parametrize("command, argv, says", CASES, ids=[f"{c[0]}:{i}" for i, c in enumerate(CASES)])
def test_flags_named_in_an_error_are_flags_of_that_command(world, tmp_path, capsys, command, argv, says):
    main, parser = _main(command)
    values = {**world, "t": tmp_path}
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err, err
    named = set(FLAG.findall(err)) - {"--help"} - set(argv)  # the user's own (mistyped) flag, echoed, is no advice
    own = set(parser._option_string_actions)
    assert named <= own, f"{command} suggests {sorted(named - own)}, which it does not have: {err}"


def test_empty_val_split_advice_names_val_fraction(world, tmp_path, capsys):
    from bgmask.apps.cli import main

    assert main(["make-binary-seg", "--cub_root", str(world["cub"]), "--out", str(tmp_path / "s"),
                 "--val_fraction", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "--val_fraction" in err and "--train_split" not in err and not (tmp_path / "s").exists()


def test_junk_segmenter_checkpoint_is_not_called_a_full_checkpoint(world, capsys):
    from bgmask.seg.checkpoint import load_checkpoint_file
    from bgmask.errors import UserError

    for trust in (False, True):
        with pytest.raises(UserError) as err:
            load_checkpoint_file(world["junk"], trust_full=trust)
        assert "not a torch checkpoint" in str(err.value) and "--trust" not in str(err.value)
