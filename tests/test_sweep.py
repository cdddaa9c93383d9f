"""`bgmask mask-sweep`: the grid flag, the rows (means and stds over seeds), the outputs, bad input as
one line, and the tiny sweep end to end (every output, one row per grid point, a rerun skips)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math

import pytest

from bgmask.apps.cli import build_parser
from bgmask.apps.cli import main as cli_main
from bgmask.masking.perturb import PERTURBATIONS, folder_miou, write_perturbed_masks
from bgmask.apps.sweep import GT, MaskPoint, fingerprint, parse_grid, sweep_csv, sweep_markdown, sweep_rows
from bgmask.apps.sweep_plots import sweep_plot


def sweep_parser():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["mask-sweep"]


def test_grid_flag():
    assert parse_grid(["erode:1,2", "drop:0.5", "erode:2.0", "threshold"]) == [
        ("erode", 1), ("erode", 2), ("drop", 0.5), ("threshold", 64), ("threshold", 128), ("threshold", 192)]
    assert parse_grid(["noise"]) == [("noise", float(s)) for s in PERTURBATIONS["noise"].defaults]


@pytest.mark.parametrize("argv, message", [
    (["--perturbations", "blur:1"], "--perturbations 'blur:1': unknown perturbation 'blur' (expected one of erode, "
                                    "dilate, rim, drop, noise, threshold)"),
    (["--perturbations", "erode:1,x"], "--perturbations 'erode:1,x': expected NAME or NAME:S1,S2,... with numbers "
                                       "as strengths"),
    (["--perturbations", "erode:70"], "--perturbations 'erode:70': perturbation erode strength 70: expected an "
                                      "integer of px in [0, 64]"),
    (["--perturbations", "drop:-0.1"], "--perturbations 'drop:-0.1': perturbation drop strength -0.1: expected a "
                                       "number of fraction of the bird area in [0, 1]"),
    (["--data_path", "/nonexistent/cub"], "--data_path not found: /nonexistent/cub (expected an existing folder)"),
    (["--pred_masks", "/nonexistent/masks"], "--pred_masks not found: /nonexistent/masks (expected an existing "
                                             "folder)"),
    (["--perturb_at", "eval"], "invalid choice: 'eval' (choose from 'test', 'train', 'both')"),
])
def test_bad_input_is_one_line(argv, message, capsys, tmp_path):
    assert cli_main(["mask-sweep", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_numeric_flags_declare_ranges(capsys):
    actions = [a for a in sweep_parser()._actions if a.option_strings and a.type in (int, float)]
    assert {a.dest for a in actions} == {"seeds", "epochs", "threads", "mask_seed", "mask_threshold", "workers"}
    for a in actions:
        too_big = a.range.hi + 1
        assert cli_main(["mask-sweep", a.option_strings[0], str(int(too_big))]) == 2, a.dest
        assert a.option_strings[0] in capsys.readouterr().err


def _points():
    erode = MaskPoint("erode-2", "erode", 2, None, 0.8, 0.8)
    pts = []
    for seed, acc in ((0, 0.5), (1, 0.7)):
        for masks in ("gt", "erode-2"):
            pts.append({"perturb_at": "test", "masks": masks, "model": "cnn", "strategy": "late", "seed": seed,
                        "run_dir": f"r{seed}", "test/acc": acc, "waterbirds/acc": acc / 2,
                        "waterbirds/worst_group_acc": 0.0})
    return pts, [GT, erode]


def test_rows_average_over_seeds():
    rows = sweep_rows(*_points())
    assert [(r["perturbation"], r["strength"], r["miou"]) for r in rows] == [("none", 0, 1.0), ("erode", 2, 0.8)]
    cell = rows[1]["results"]["cnn/late"]
    assert cell["seeds"] == [0, 1] and cell["runs"] == ["r0", "r1"]
    assert cell["test/acc"] == pytest.approx(0.6) and cell["test/acc_std"] == pytest.approx(math.sqrt(0.02))
    assert cell["waterbirds/acc"] == pytest.approx(0.3) and cell["waterbirds/worst_group_acc_std"] == 0.0
    md = sweep_markdown(rows)
    assert "| erode | 2 | 80.0 | 60.0 ± 14.1 | 30.0 ± 7.1 | 0.0 ± 0.0 |" in md
    assert "## perturbed at test: trained on GT masks, tested on perturbed masks" in md
    lines = list(csv.DictReader(io.StringIO(sweep_csv(rows))))
    assert len(lines) == 2 and float(lines[1]["cnn/late/test/acc"]) == pytest.approx(0.6)
    assert lines[0]["perturbation"] == "none" and float(lines[1]["miou"]) == 0.8


def test_plot_with_segmenter(tmp_path):
    pts, masks = _points()
    seg = MaskPoint("segmenter", "segmenter", None, None, 0.9, 0.85)
    pts.append(dict(pts[0], masks="segmenter"))
    rows = sweep_rows(pts, [*masks, seg])
    assert "| segmenter | - | 90.0 |" in sweep_markdown(rows)
    data = sweep_plot(rows, tmp_path / "s.png").read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 10_000


def test_fingerprint_sees_rewritten_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    before = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == before
    (tmp_path / "images" / "a.png").write_bytes(b"yy")
    assert fingerprint(tmp_path) != before


@pytest.mark.slow
def test_tiny_sweep_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["mask-sweep", "--preset", "tiny", "--out", str(out), "--threads", "1", "--workers", "1",
            "--models", "cnn", "--perturb_at", "test", "train"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    keys = [(r["perturb_at"], r["masks"]) for r in rows]
    assert keys == [(m, k) for m in ("test", "train") for k in ("gt", "erode-2", "dilate-2")]
    assert len(list(csv.DictReader(open(out / "sweep.csv")))) == len(rows)
    assert printed.count("[sweep] test ") == 6 and printed.count("[sweep] train ") == 6
    md = (out / "sweep.md").read_text()
    assert "perturbed at train: trained on perturbed masks, tested on GT masks" in md and "sweep.png" in md
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    by = {(r["perturb_at"], r["masks"]): r for r in rows}
    data = out / "data" / "synthetic_cub"
    assert by["test", "erode-2"]["miou"] == pytest.approx(folder_miou(data, out / "masks" / "erode-2"))
    assert by["test", "gt"]["results"] == by["train", "gt"]["results"]  # one GT-trained run for every mode
    # test: the GT-trained run evaluated with the perturbed masks; train: the perturbed run evaluated on GT
    ev = json.loads((out / "runs" / "cnn-late-gt-s0" / "sweep_evals" / "dilate-2.json").read_text())
    assert by["test", "dilate-2"]["results"]["cnn/late"]["waterbirds/acc"] == ev["waterbirds/acc"]
    ev = json.loads((out / "runs" / "cnn-early-erode-2-s0" / "sweep_evals" / "gt.json").read_text())
    assert by["train", "erode-2"]["results"]["cnn/early"]["test/acc"] == ev["test/acc"]

    # rerun with a stand-in segmenter: every finished point is read back, only the segmenter's are new
    pred = tmp_path / "pred"
    write_perturbed_masks(data, pred, "noise", 1, seed=9, progress=False)
    files = [p for d in ("runs", "masks", "stages") for p in (out / d).rglob("*") if p.is_file()]
    logs = {p: p.read_text() for p in files if p.name == "results.jsonl"}  # the new evaluations append a line
    stamps = {p: p.stat().st_mtime_ns for p in files if p not in logs}
    assert cli_main([*argv, "--pred_masks", str(pred)]) == 0
    again = capsys.readouterr().out
    assert again.count("up to date, skipped") == 3  # data and the two mask folders
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert all(p.read_text().startswith(text) for p, text in logs.items())
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    seg = [r for r in rows if r["perturbation"] == "segmenter"]
    assert [r["perturb_at"] for r in seg] == ["test", "train"] and len(rows) == 8
    assert seg[0]["miou"] == pytest.approx(folder_miou(data, pred)) and "| segmenter | - |" in again
