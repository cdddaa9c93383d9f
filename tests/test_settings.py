"""Settings resolved once: read-only after resolution, what a checkpoint contributes returned rather than
written onto the caller's object, and runs built as data whose command line reproduces them."""

from __future__ import annotations

import argparse
import copy
import pickle
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from bgmask import args as A
from bgmask import engine
from bgmask.apps.scripts import eval_early, train_early, train_late
from bgmask.errors import UserError
from bgmask.settings import (FrozenSettingsError, Settings, command_line, from_argv, parse_noting_given, resolve,
                             run_settings)
from bgmask.stages import MODELS, PRESETS, ROWS_FULL, ROWS_SCRATCH, classifier_settings


def small(cub, run, *more):
    return ["--data_path", str(cub), "--image_size", "32", "--batch_size", "8", "--num_workers", "0", "--epochs", "1",
            "--snapshot_dir", str(run), "--no_progress", "--augmentations_to_use", "flip", "--threads", "1", *more]


def test_settings_refuse_writes_and_replace_makes_a_new_object(tiny_cub):
    s = run_settings({"data_path": str(tiny_cub)})
    with pytest.raises(FrozenSettingsError, match="read-only"):
        s.lr = 1.0
    with pytest.raises(FrozenSettingsError):
        del s.lr
    t = s.replace(lr=0.5)
    assert (s.lr, t.lr) == (1e-3, 0.5) and isinstance(t, Settings) and t.given == s.given
    for clone in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert clone.as_dict() == s.as_dict() and clone.given == s.given and clone.command == s.command
        with pytest.raises(FrozenSettingsError):
            clone.seed = 3
    assert "_given" not in vars(s) and "_command" not in vars(s)  # config.yaml holds the flags only


def test_resolution_leaves_the_parsed_namespace_alone(tiny_cub):
    ns = A.parse_with_config(A.train_parser("t"), ["--data_path", str(tiny_cub), "--strategy", "late",
                                                   "--model_arch", "vit_small", "--fm_second_last_block"])
    before = dict(vars(ns))
    s = resolve(ns)
    assert vars(ns) == before
    assert s.model_arch == "vit_small_patch14_dinov2.lvd142m" and s.pretrained
    assert s.late_mask_stage == "second_last" and s.channels_last is False  # a ViT: contiguous NCHW


def test_auto_values_come_from_the_family_before_anything_is_built(tiny_cub):
    cnn = run_settings({"data_path": str(tiny_cub), "strategy": "late"})
    vit = run_settings({"data_path": str(tiny_cub), "strategy": "late", "model_arch": "bgmask_vit_tiny"})
    assert (cnn.late_mask_stage, cnn.channels_last) == ("second_last", True)
    assert (vit.late_mask_stage, vit.channels_last) == ("last", False)
    base = run_settings({"data_path": str(tiny_cub), "channels_last": False})
    assert base.late_mask_stage == "auto" and base.channels_last is False  # no stage for pixel strategies
    with pytest.raises(UserError, match="nope"):
        run_settings({"data_path": str(tiny_cub), "model_arch": "nope"})


def test_given_holds_what_the_command_line_and_config_chose(tmp_path, tiny_cub):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.01\n")
    ns, given = parse_noting_given(A.train_parser("t"), ["--data_path", str(tiny_cub), "--config", str(cfg),
                                                         "--model_arch", "bgmask_resnet_tiny"])
    assert {"data_path", "lr", "model_arch", "config"} <= given and "seed" not in given and ns.lr == 0.01
    s = from_argv(["--data_path", str(tiny_cub)], A.train_parser("t"))
    assert "model_arch" not in s.given and s.command == [sys.executable, *sys.argv]  # what command.txt records


def test_training_evaluation_and_demo_run_on_frozen_settings(tmp_path, tiny_cub, monkeypatch):
    """Every entry point hands the engine a Settings (whose writes raise), so no step can change the
    settings of the run behind another's back; the run still finishes."""
    seen = []
    fit, evaluate = engine.fit, engine.evaluate

    def frozen(fn):
        def wrapper(cfg, *a, **kw):
            assert isinstance(cfg, Settings)
            with pytest.raises(FrozenSettingsError):
                cfg.strategy = "other"
            seen.append(fn.__name__)
            return fn(cfg, *a, **kw)
        return wrapper

    monkeypatch.setattr(engine, "fit", frozen(fit))
    monkeypatch.setattr(engine, "evaluate", frozen(evaluate))
    run = tmp_path / "run"
    assert train_late(small(tiny_cub, run, "--attribution_images", "0")) == 0
    assert eval_early(["--data_path", str(tiny_cub), "--checkpoint", str(run / "last.pt"), "--num_workers", "0",
                       "--no_progress", "--attribution_images", "0", "--out", str(tmp_path / "ev")]) == 0
    from bgmask.apps.cli import main as cli_main

    assert cli_main(["demo", "--preset", "tiny", "--rows", "cnn:baseline:-:scratch", "--out", str(tmp_path / "demo"),
                     "--threads", "1"]) == 0
    assert seen == ["fit", "evaluate", "fit"]


def test_the_checkpoint_contributes_by_return(tmp_path, tiny_cub):
    """An evaluation takes the strategy, fill, size and architecture of its checkpoint: in the resolved
    settings, with the parsed flags untouched. A --model_arch given for another architecture is one line."""
    run = tmp_path / "run"
    assert train_late(small(tiny_cub, run, "--attribution_images", "0", "--image_size", "48")) == 0
    ns = A.parse_with_config(A.train_parser("t"), ["--data_path", str(tiny_cub), "--checkpoint",
                                                   str(run / "last.pt"), "--eval_only"])
    before = dict(vars(ns))
    s = resolve(ns)
    assert vars(ns) == before and (ns.strategy, ns.image_size) == ("baseline", 224)
    assert (s.strategy, s.image_size, s.model_arch) == ("late", 48, "bgmask_resnet_tiny")
    with pytest.raises(UserError, match="--model_arch bgmask_vit_tiny but checkpoint .* holds a bgmask_resnet_tiny"):
        resolve(argparse.Namespace(**{**before, "model_arch": "bgmask_vit_tiny"}), given={"model_arch"})


ROWS = sorted(set(ROWS_FULL + ROWS_SCRATCH))


@pytest.mark.parametrize("row", ROWS, ids=lambda r: ":".join(r))
def test_a_demo_row_as_a_command_line_gives_the_same_settings(tmp_path, row):
    """The printed (command.txt) command line of an application's run is runnable and gives its settings:
    each flag once, parsed by the script it names."""
    overrides = classifier_settings(row, 2, PRESETS["default"], tmp_path, tmp_path / "masks", tmp_path / "r", 1)
    argv = command_line(overrides)
    flags = [a for a in argv if a.startswith("--")]
    assert len(flags) == len(set(flags))
    script = argv[1]
    assert Path(script).is_file() or (Path(__file__).resolve().parents[1] / script).is_file()
    strategies = None if script.startswith("late") else [s for s in ("baseline", "early")]
    parsed = A.parse_with_config(A.train_parser("t", strategies), argv[2:])
    defaults = A.parse_with_config(A.train_parser("t"), [])
    assert {k: v for k, v in vars(parsed).items() if v != getattr(defaults, k)} == {
        k: v for k, v in overrides.items() if v != getattr(defaults, k)}
    assert MODELS[row[0]] == parsed.model_arch


def test_an_application_run_records_its_command(tmp_path, tiny_cub):
    from bgmask.stages import train_run

    run = tmp_path / "run"
    overrides = {"data_path": str(tiny_cub), "snapshot_dir": str(run), "image_size": 32, "batch_size": 8,
                 "num_workers": 0, "epochs": 1, "no_progress": True, "augmentations_to_use": "flip",
                 "strategy": "late", "attribution_images": 0, "lr": 0.01}
    train_run(overrides, run)
    command = shlex.split((run / "command.txt").read_text())
    assert command[:2] == ["python", "late_masking/train.py"] and command.count("--lr") == 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    again = vars(A.parse_with_config(A.train_parser("t"), command[2:]))
    assert {k: again[k] for k in overrides} == {k: saved[k] for k in overrides}
    assert saved["late_mask_stage"] == "second_last"  # resolved before the run, recorded as what ran


def test_resolution_reads_the_checkpoints_settings_without_its_tensors(tmp_path, tiny_cub, monkeypatch):
    """The evaluation's resolution reads only the checkpoint's small entries: memory-mapped, its tensors
    stay on disk; the evaluation then loads the weights once, whole."""
    import torch

    run = tmp_path / "run"
    assert train_late(small(tiny_cub, run, "--attribution_images", "0")) == 0
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("mmap")) or real_load(*a, **kw))
    s = resolve(A.parse_with_config(A.train_parser("t"), ["--data_path", str(tiny_cub), "--checkpoint",
                                                          str(run / "last.pt"), "--eval_only"]))
    assert calls == [True] and s.strategy == "late"
    engine.evaluate(s, engine.init_distributed("cpu"))
    assert calls == [True, False]
