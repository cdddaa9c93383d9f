"""The run folder's rules around a run that starts again or is evaluated: a folder whose run stopped
before its first checkpoint restarts (with or without --resume_training) and ends as an uninterrupted
run; --resume_training compares data folders resolved; `--out PREFIX` keeps every dot of PREFIX; an
explicit --model_arch that is not the checkpoint's architecture is one line. (The SIGKILL version of the
first case: tests/test_faults.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bgmask.apps.scripts import eval_early, train_early

from conftest import write_tiny_cub


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return write_tiny_cub(tmp_path_factory.mktemp("runfolder") / "CUB", num_classes=3, per_class=(6, 2),
                          size=(40, 32))


def argv(cub, run, *more):
    return ["--data_path", str(cub), "--snapshot_dir", str(run), "--image_size", "32", "--batch_size", "4",
            "--num_workers", "0", "--threads", "1", "--no_progress", "--augmentations_to_use", "flip",
            "--train_split", "0.75", "--epochs", "2", "--seed", "5", *more]


def records(run: Path) -> list[dict]:
    timing = ("train/seconds", "train/images_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "results.jsonl").read_text().splitlines() if json.loads(line)["split"] != "eval"]


@pytest.fixture(scope="module")
def reference(cub, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    assert train_early(argv(cub, run)) == 0
    return run


def stuck_folder(cub, run: Path) -> None:
    """What a run killed after its first results.jsonl line and before its first last.pt leaves."""
    assert train_early(argv(cub, run, "--epochs", "1")) == 0
    for p in [*run.glob("*.pt"), run / "done", run / "final_metrics.json"]:
        p.unlink()
    lines = (run / "results.jsonl").read_text().splitlines()
    (run / "results.jsonl").write_text(lines[0] + "\n")  # epoch 1's line, not its final record
    (run / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")


@pytest.mark.parametrize("flag", [[], ["--resume_training"]], ids=["fresh", "resume_training"])
def test_folder_without_a_checkpoint_starts_over(cub, reference, tmp_path, capsys, flag):
    run = tmp_path / "run"
    stuck_folder(cub, run)
    capsys.readouterr()
    assert train_early(argv(cub, run, *flag)) == 0
    out = capsys.readouterr().out
    assert "no epoch of the run" in out and "starts over from epoch 0" in out
    assert ("nothing to resume" in out) == bool(flag)
    assert records(run) == records(reference)  # the stale epoch-1 line is gone, nothing twice
    assert not list(run.glob(".*.tmp")) and (run / "done").is_file()


def test_a_finished_run_still_needs_resume_training(cub, reference, capsys):
    assert train_early(argv(cub, reference)) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["trailing slash", "dot slash", "dot dot"])
def test_resume_takes_the_same_data_folder_spelled_otherwise(cub, tmp_path, monkeypatch, capsys, spelling):
    run = tmp_path / "run"
    assert train_early(argv(cub, run)) == 0  # resumed at its last epoch: only the final evaluation runs again
    monkeypatch.chdir(cub.parent)
    data = {"trailing slash": str(cub) + "/", "dot slash": f"./{cub.name}",
            "dot dot": os.path.join("..", cub.parent.name, cub.name, "")}[spelling]
    capsys.readouterr()
    assert train_early(argv(data, run, "--resume_training")) == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().out


def test_resume_still_refuses_another_data_folder(cub, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_early(argv(cub, run)) == 0
    other = write_tiny_cub(tmp_path / "CUB2", num_classes=3, per_class=(6, 2), size=(40, 32))
    capsys.readouterr()
    assert train_early(argv(other, run, "--resume_training")) == 2
    assert "was made with data_path=" in capsys.readouterr().err


def eval_argv(cub, ckpt, *more):
    return ["--checkpoint", str(ckpt), "--data_path", str(cub), "--num_workers", "0", "--no_progress",
            "--threads", "1", *more]


@pytest.mark.parametrize("prefix", ["run.eval_1", "run", "a.b.c", "run.json"])
def test_eval_out_prefix_keeps_its_dots(cub, reference, tmp_path, capsys, prefix):
    out = tmp_path / "evals" / prefix
    assert eval_early(eval_argv(cub, reference / "last.pt", "--out", str(out))) == 0
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == sorted([f"{prefix}.json", f"{prefix}.md"])
    assert json.loads((out.parent / f"{prefix}.json").read_text())["split"] == "eval"
    assert f"wrote {out}.json and {out}.md" in capsys.readouterr().out


def test_eval_default_out_beside_the_checkpoint(cub, reference, tmp_path):
    assert eval_early(eval_argv(cub, reference / "last.pt")) == 0
    assert (reference / "waterbirds_eval.json").is_file() and (reference / "waterbirds_eval.md").is_file()


@pytest.mark.parametrize("how", ["flag", "config"])
def test_eval_model_arch_other_than_the_checkpoint_is_one_line(cub, reference, tmp_path, capsys, how):
    """The checkpoint holds bgmask_resnet_tiny; an explicit --model_arch bgmask_vit_tiny (on the command
    line or in --config) is refused, where it used to evaluate the checkpoint's model silently."""
    if how == "flag":
        more = ["--model_arch", "bgmask_vit_tiny"]
    else:
        (tmp_path / "c.yaml").write_text("model_arch: bgmask_vit_tiny\n")
        more = ["--config", str(tmp_path / "c.yaml")]
    rc = eval_early(eval_argv(cub, reference / "last.pt", "--out", str(tmp_path / "ev"), *more))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "--model_arch bgmask_vit_tiny" in err and "bgmask_resnet_tiny" in err and str(reference) in err
    assert not (tmp_path / "ev.json").exists()


def test_eval_model_arch_default_or_the_checkpoints_own(cub, reference, tmp_path):
    for more in ([], ["--model_arch", "bgmask_resnet_tiny"]):
        out = tmp_path / f"ev{len(more)}"
        assert eval_early(eval_argv(cub, reference / "last.pt", "--out", str(out), *more)) == 0
        assert out.with_name(out.name + ".json").is_file()


def test_train_eval_only_checks_model_arch_too(cub, reference, tmp_path, capsys):
    rc = train_early(argv(cub, tmp_path / "r", "--eval_only", "--checkpoint", str(reference / "last.pt"),
                          "--model_arch", "bgmask_vit_tiny"))
    assert rc == 2 and "--model_arch bgmask_vit_tiny" in capsys.readouterr().err


def test_training_config_has_no_bookkeeping_key(cub, reference):
    import yaml

    assert "model_arch_given" not in yaml.safe_load((reference / "config.yaml").read_text())


@pytest.mark.parametrize("key, value", [("image_size", [32]), ("strategy", "sideways"), ("mask_fill", None)])
def test_a_checkpoints_saved_setting_is_checked_like_a_flag(cub, reference, tmp_path, capsys, key, value):
    """A checkpoint's saved settings go through the command line's check when bgmask reads them back:
    a bad one is one line naming the checkpoint and the flag (it was a TypeError traceback or a model
    evaluated with a value no flag allows)."""
    import torch

    from bgmask.checkpoint import save_checkpoint

    state = torch.load(reference / "last.pt", weights_only=True)
    state["config"][key] = value
    ckpt = tmp_path / "edited" / "last.pt"
    save_checkpoint(ckpt, state)
    rc = eval_early(eval_argv(cub, ckpt, "--out", str(tmp_path / "ev")))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: checkpoint {ckpt}: --{key} must be ") and "\n" not in err, err
    assert not (tmp_path / "ev.json").exists()
