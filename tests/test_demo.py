"""The whole demo pipeline on the tiny preset: every stage, every column and picture; rerun skips."""

from __future__ import annotations

import csv
import json

import pytest

from bgmask.apps.cli import main as cli_main
from bgmask.apps.demo import parse_rows
from bgmask.errors import UserError


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--preset", "tiny", "--out", str(out), "--threads", "1",
                     "--correlation_sweep", "0.1", "0.9", "--mask_sweep", "erode:2"]) == 0
    printed = capsys.readouterr().out
    report = out / "report"
    md = (report / "results.md").read_text()
    for col in ("in-dist. acc", "Waterbirds acc", "drop", "worst-group acc", "BG-only acc", "BG-gap"):
        assert col in md
    assert "## Segmenter" in md and "| test |" in md and "| waterbird_test |" in md
    rows = list(csv.DictReader(open(report / "results.csv")))
    assert len(rows) == 5
    keys = {(r["model"], r["strategy"], r["masks"], r["init"]) for r in rows}
    assert ("bgmask_resnet_tiny", "early", "predicted", "scratch") in keys
    assert ("bgmask_vit_tiny (GAP)", "late", "predicted", "pretrained, frozen") in keys
    assert ("bgmask_resnet_tiny", "baseline", "-", "pretrained, fine-tuned") in keys
    for r in rows:
        assert 0.0 <= float(r["test/acc"]) <= 1.0 and r["waterbirds/acc"] != ""
    sweep = json.loads((report / "correlation_sweep.json").read_text())
    assert sorted((p["correlation"], p["strategy"]) for p in sweep) == [
        (0.1, "baseline"), (0.1, "early"), (0.9, "baseline"), (0.9, "early")]
    assert "correlation_sweep.png" in md
    assert "## As the paper's tables" in md and "## Where the models look" in md and "BG attribution (test)" in md
    assert "## Accuracy against mask quality" in md
    sweep_rows = json.loads((out / "mask_sweep" / "sweep.json").read_text())["rows"]
    assert {(r["perturbation"], r["strength"]) for r in sweep_rows} >= {("erode", 2)}
    for png in ("accuracy_bars.png", "paper_bars.png", "examples.png", "attribution.png", "correlation_sweep.png",
                "mask_sweep.png"):
        data = (report / png).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 10_000, png
    assert json.loads((report / "results.json").read_text())[0]["seeds"] == 1
    assert (out / "predicted_masks" / "images").is_dir()
    assert (out / "data" / "synthetic_cub" / "images_masked_pred" / "masked_copy.json").is_file()
    assert "finished in" in printed and "results.md" in printed
    # a rerun skips every stage and every finished run
    assert cli_main(["demo", "--preset", "tiny", "--out", str(out), "--threads", "1"]) == 0
    again = capsys.readouterr().out
    assert again.count("up to date, skipped") >= 3 and "epoch 1/1" not in again


def test_demo_rows_are_validated(capsys):
    assert parse_rows(["cnn:late:GT:scratch"]) == [("cnn", "late", "GT", "scratch")]
    with pytest.raises(UserError, match="expected model:strategy:masks:init"):
        parse_rows(["cnn:late"])
    with pytest.raises(UserError, match="baseline takes masks"):
        parse_rows(["cnn:baseline:GT:scratch"])
    assert cli_main(["demo", "--rows", "xyz"]) == 2
    assert "--rows 'xyz'" in capsys.readouterr().err


def test_paper_preset_prints_commands(capsys):
    assert cli_main(["demo", "--preset", "paper", "--data_path", "/data/CUB_200_2011"]) == 0
    text = capsys.readouterr().out
    assert "torchrun --nproc_per_node=4" in text and "--image_size 518" in text and "/data/CUB_200_2011" in text


def test_default_rows_are_the_papers_grid_on_the_zoo():
    from pathlib import Path

    from bgmask.stages import PRESETS, ROWS_DEFAULT, ROWS_FULL, ROWS_SCRATCH, classifier_settings

    assert sorted(ROWS_DEFAULT) == sorted((m, s, "-" if s == "baseline" else "predicted", i)
                                          for m in ("cnn", "vit") for s in ("baseline", "early", "late")
                                          for i in ("frozen", "finetuned"))
    assert {r[0] for r in ROWS_FULL} == {"cnn", "vit", "vit_cls", "vit_both"} and PRESETS["full"].seeds == (0, 1, 2)
    assert {r[3] for r in ROWS_FULL} == {"frozen", "finetuned"} and {r[3] for r in ROWS_SCRATCH} == {"scratch"}
    p = PRESETS["default"]
    s = classifier_settings(("vit_cls", "late", "predicted", "frozen"), 1, p, Path("d"), Path("m"), Path("r"), None)
    assert s["pretrained_file"] == "zoo:vit" and s["mask_source"] == "m" and s["seed"] == 1
    assert s["class_token_only"] and s["freeze_backbone"] and s["lr"] == 1e-2
    s = classifier_settings(("cnn", "baseline", "-", "finetuned"), 0, p, Path("d"), None, Path("r"), None)
    assert s["pretrained_file"] == "zoo:cnn" and "freeze_backbone" not in s and s["scratch_lr_factor"] == 10
    assert s["lr"] == p.lr["cnn"] / 4
    s = classifier_settings(("vit", "early", "GT", "scratch"), 0, p, Path("d"), None, Path("r"), None)
    assert "pretrained_file" not in s and s["patch_tokens_only"]
    assert s["epochs"] == p.epochs["scratch"]["vit"]


@pytest.mark.parametrize("content", [b"{\"inputs\": {\"a\": 1", b"\xff\xfe not text", b"[1, 2]"])
def test_a_corrupt_stage_marker_reruns_the_stage(tmp_path, capsys, content):
    """A stage marker that cannot be read (torn, not UTF-8, not a mapping) means the stage runs again;
    it was a traceback that named no file."""
    from bgmask.stages import Stages

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "data.json").write_bytes(content)
    calls = []
    assert Stages(tmp_path, fresh=False).run("data", {"a": 1}, lambda: calls.append(1) or {"ok": True}) == {"ok": True}
    assert calls == [1] and "[demo] data: done" in capsys.readouterr().out
    assert Stages(tmp_path, fresh=False).run("data", {"a": 1}, lambda: calls.append(2)) == {"ok": True}
    assert calls == [1]  # read back once it is whole again


def test_a_corrupt_run_marker_retrains_the_run(tmp_path, monkeypatch):
    from bgmask import stages

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_settings.json").write_bytes(b"\x00\xff")
    (run / "done").write_text("")
    (run / "final_metrics.json").write_text("{")
    trained = []
    monkeypatch.setattr("bgmask.engine.run", lambda cfg: trained.append(cfg) or {"test/acc": 1.0})
    assert stages.train_run({"data_path": str(tmp_path), "snapshot_dir": str(run)}, run) == {"test/acc": 1.0}
    assert len(trained) == 1 and not trained[0].resume_training
