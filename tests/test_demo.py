"""The whole demo pipeline on the tiny preset: every stage, every column and picture; rerun skips."""

from __future__ import annotations

import csv
import json

import pytest

from bgmask.cli import main as cli_main
from bgmask.demo import parse_rows
from bgmask.errors import UserError


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--preset", "tiny", "--out", str(out), "--threads", "1",
                     "--correlation_sweep", "0.1", "0.9"]) == 0
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
    for png in ("accuracy_bars.png", "examples.png", "correlation_sweep.png"):
        data = (report / png).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 10_000, png
    assert json.loads((report / "results.json").read_text())[0]["seeds"] == 1
    assert (out / "predicted_masks" / "images").is_dir()
    assert (out / "data" / "synthetic_cub" / "images_masked_pred" / "masked_copy.json").is_file()
    assert "finished in" in printed and "results.md" in printed
    # a rerun skips every stage and every finished run
    assert cli_main(["demo", "--preset", "tiny", "--out", str(out), "--threads", "1"]) == 0
    again = capsys.readouterr().out
    assert again.count("up to date, skipped") >= 4 and "epoch 1/1" not in again


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
