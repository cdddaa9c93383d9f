"""--protocol waterbirds and --method: every strategy trains and evaluates on the Waterbirds folder's own
splits, best.pt is chosen on val worst-group accuracy, GroupDRO resumes exactly, and bad inputs are one
line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bgmask import args as A
from bgmask.apps.scripts import eval_late, train_late
from bgmask.checkpoint import load_checkpoint
from bgmask.data.synthetic import generate_synthetic
from bgmask.data.synthetic_waterbirds import WaterbirdsSplits
from bgmask.errors import UserError
from bgmask.masking.strategies import STRATEGIES
from bgmask.methods import METHODS

WB = "waterbird_complete95_forest2water2"


@pytest.fixture(scope="module")
def wb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb") / "cub"
    generate_synthetic(root, num_classes=4, image_size=32, train_per_class=10, test_per_class=4, progress=False,
                       waterbirds=WaterbirdsSplits(val_fraction=0.3, correlation=0.9))
    return root


def argv(root, run, *more):
    return ["--data_path", str(root), "--protocol", "waterbirds", "--image_size", "32", "--batch_size", "8",
            "--num_workers", "0", "--snapshot_dir", str(run), "--no_progress", "--augmentations_to_use", "flip",
            "--threads", "1", "--attribution_images", "0", *more]


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains_and_evaluates_under_the_protocol(wb_root, tmp_path, strategy):
    run = tmp_path / "run"
    assert train_late(argv(wb_root, run, "--strategy", strategy, "--epochs", "2")) == 0
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["num_classes"] == 2 and final["test/num_samples"] == 4 * 4
    assert {f"test/group_{g}_acc" for g in range(4)} <= set(final)
    assert final["test/worst_group_acc"] == min(final[f"test/group_{g}_acc"] for g in range(4))
    assert abs(final["test/mean_group_acc"] - sum(final[f"test/group_{g}_acc"] for g in range(4)) / 4) < 1e-12
    assert "waterbirds/acc" not in final and 0.0 <= final["test/weighted_acc"] <= 1.0
    epochs = [r for r in lines(run / "results.jsonl") if r["split"] == "val"]
    assert all("val/worst_group_acc" in r for r in epochs)
    best = max(epochs, key=lambda r: (r["val/worst_group_acc"], -r["epoch"]))  # the first best on worst group
    assert load_checkpoint(run / "best.pt")["epoch"] == best["epoch"]
    out = tmp_path / "ev"
    assert eval_late(["--data_path", str(wb_root), "--checkpoint", str(run / "best.pt"), "--num_workers", "0",
                      "--no_progress", "--attribution_images", "0", "--out", str(out), "--threads", "1"]) == 0
    ev = json.loads(out.with_suffix(".json").read_text())
    for key in ("test/acc", "test/worst_group_acc", "test/mean_group_acc", "test/weighted_acc"):
        assert ev[key] == final[key], key  # the protocol comes from the checkpoint


def test_the_weighted_accuracy_is_weighted_by_the_train_groups(wb_root, tmp_path):
    from bgmask.data.waterbirds import WaterbirdsDataset

    run = tmp_path / "run"
    assert train_late(argv(wb_root, run, "--strategy", "baseline", "--epochs", "1")) == 0
    final = json.loads((run / "final_metrics.json").read_text())
    counts = WaterbirdsDataset(wb_root, "train", check_files=False).group_counts()
    expected = sum(c * final[f"test/group_{g}_acc"] for g, c in enumerate(counts)) / counts.sum()
    assert final["test/weighted_acc"] == pytest.approx(expected, abs=1e-12)


def test_groupdro_resumes_exactly(wb_root, tmp_path):
    """A GroupDRO run stopped after epoch 1 and resumed ends as the uninterrupted run: same weights, same
    group weights q, same metrics (the balanced sampler and q are part of the saved state)."""
    common = ["--strategy", "baseline", "--method", "groupdro", "--gdro_adj", "1.0", "--lr", "0.01"]
    whole = tmp_path / "whole"
    assert train_late(argv(wb_root, whole, *common, "--epochs", "3")) == 0
    # the same run stopped after epoch 1: its epoch-1 checkpoint as last.pt, then --resume_training
    stopped = tmp_path / "stopped"
    assert train_late(argv(wb_root, stopped, *common, "--epochs", "3", "--save_every_n_epochs", "1")) == 0
    e1 = load_checkpoint(stopped / "epoch_1.pt")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    torch.save(e1, resumed / "last.pt")
    (resumed / "results.jsonl").write_text("\n".join(json.dumps(r) for r in lines(stopped / "results.jsonl")
                                                     if r.get("epoch") == 1 and r["split"] == "val") + "\n")
    assert train_late(argv(wb_root, resumed, *common, "--epochs", "3", "--resume_training")) == 0
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["method"]["method"] == "groupdro" and torch.equal(a["method"]["q"], b["method"]["q"])
    assert not torch.equal(a["method"]["q"], torch.full((4,), 0.25, dtype=torch.float64))  # the weights moved
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    fa, fb = (json.loads((d / "final_metrics.json").read_text()) for d in (whole, resumed))
    assert fa["test/acc"] == fb["test/acc"] and fa["test/worst_group_acc"] == fb["test/worst_group_acc"]


def test_a_test_only_waterbirds_folder_is_one_line(tmp_path, capsys):
    root = tmp_path / "cub"
    generate_synthetic(root, num_classes=3, image_size=32, train_per_class=4, test_per_class=2, progress=False)
    assert train_late(argv(root, tmp_path / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no split 0 (train) or 1 (val) rows" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_label_outside_0_1_is_one_line(tmp_path, capsys):
    root = tmp_path / "cub"
    generate_synthetic(root, num_classes=3, image_size=32, train_per_class=6, test_per_class=2, progress=False,
                       waterbirds=WaterbirdsSplits())
    meta = root / WB / "metadata.csv"
    rows = meta.read_text().splitlines()
    cells = rows[3].split(",")
    cells[2] = "2"
    meta.write_text("\n".join([*rows[:3], ",".join(cells), *rows[4:]]) + "\n")
    assert train_late(argv(root, tmp_path / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{meta}:4: y is '2' (expected one of 0, 1)" in err


@pytest.mark.parametrize("flags, message", [
    (["--train_split", "0.8"], "--train_split 0.8 has no meaning with --protocol waterbirds"),
    (["--split_seed", "3"], "--split_seed 3 has no meaning with --protocol waterbirds"),
    (["--image_sub_path_train", "images_masked"], "--image_sub_path_train images_masked has no meaning"),
])
def test_cub_only_flags_are_refused_under_the_protocol(wb_root, tmp_path, capsys, flags, message):
    assert train_late(argv(wb_root, tmp_path / "run", "--epochs", "1", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_a_method_that_reads_groups_needs_the_protocol(wb_root, tmp_path, capsys):
    cub = [a for a in argv(wb_root, tmp_path / "run", "--epochs", "1", "--method", "groupdro") if a != "waterbirds"]
    cub.remove("--protocol")
    assert train_late(cub) == 2
    assert "--method groupdro reads each image's group" in capsys.readouterr().err


def test_groupdro_refuses_mixup(wb_root, tmp_path, capsys):
    assert train_late(argv(wb_root, tmp_path / "run", "--epochs", "1", "--method", "groupdro",
                           "--turn_on_mixup_or_cutmix")) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_on_the_command_line(name):
    """The --method choices and each method's flags come from the registry: a new method needs no edit."""
    parser = A.train_parser("t")
    choices = next(a.choices for a in parser._actions if a.dest == "method")
    assert (name in choices) == (not METHODS[name].post_hoc)
    flags = {a.dest: a for a in A.method_args(post_hoc=METHODS[name].post_hoc)._actions}
    for flag in METHODS[name].flags:
        assert flags[flag.dest].default == (list(flag.default) if flag.nargs else flag.default)


def test_protocol_choices_and_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"--protocol: invalid choice: 'imagenet' \(choose from 'cub', 'waterbirds'\)"):
        A.train_parser("t").parse_args(["--protocol", "imagenet"])
    with pytest.raises(UserError, match="unknown --method"):
        from bgmask.methods import create_method

        create_method("nope")


@pytest.mark.parametrize("head", ["--class_token_only", "--patch_tokens_only", None])
def test_a_vit_with_each_head_under_the_protocol(wb_root, tmp_path, head):
    run = tmp_path / "run"
    extra = [head] if head else []
    assert train_late(argv(wb_root, run, "--model_arch", "bgmask_vit_tiny", "--strategy", "late", "--epochs", "1",
                           *extra)) == 0
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["num_classes"] == 2 and "test/worst_group_acc" in final
