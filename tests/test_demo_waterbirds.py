"""`bgmask demo --protocol waterbirds`: the tiny preset end to end (rows from the registries, files, picture,
a rerun that skips every stage and run), the refusals, the real-data commands parsed by the current flags,
and the default demo's recipe and data unchanged by the protocol's additions."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest

from bgmask import args as A
from bgmask.apps.cli import build_parser, main as cli_main
from bgmask.apps.demo_waterbirds import PROTOCOL_PRESETS, paper_commands, protocol_rows
from bgmask.apps.scripts import script_strategies
from bgmask.masking.strategies import STRATEGIES
from bgmask.methods import METHODS
from bgmask.settings import resolve


def test_rows_come_from_the_registries():
    rows = protocol_rows()
    assert rows == [("erm", "baseline", "shortcut"), ("groupdro", "baseline", "shortcut"), ("dfr", "baseline", "shortcut"),
                    ("erm", "early", "shortcut"), ("erm", "late", "shortcut"), ("dfr", "early", "shortcut"),
                    ("erm", "baseline", "control")]
    assert {m for m, _, _ in rows} == set(METHODS) and {s for _, s, _ in rows} == set(STRATEGIES)
    assert PROTOCOL_PRESETS["default"].seeds == (0, 1, 2) and PROTOCOL_PRESETS["default"].recipe.image_size == 64


def test_tiny_protocol_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--protocol", "waterbirds", "--preset", "tiny", "--out", str(out), "--threads", "1"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    report = out / "report"
    recs = json.loads((report / "waterbirds.json").read_text())
    labels = [(METHODS[m].label, s, "0.50" if d == "control" else f"{0.94:.2f}") for m, s, d in protocol_rows()]
    assert [(r["method"], r["strategy"], r["data"]) for r in recs] == labels  # 0.94: 15 of 16 train images per species
    assert [r["masks"] for r in recs] == ["GT" if STRATEGIES[s].needs_mask else "-" for _, s, _ in protocol_rows()]
    for r in recs:
        assert r["seeds"] == 1 and all(0 <= r[m] <= 1 for m in ("test/worst_group_acc", "test/mean_group_acc",
                                                                "test/acc", "test/weighted_acc"))
        assert r["test/worst_group_acc"] <= r["test/mean_group_acc"]
    assert len(list(csv.DictReader(open(report / "waterbirds.csv")))) == len(recs)
    md = (report / "waterbirds.md").read_text()
    for col in ("worst-group acc", "mean-group acc", "test acc", "weighted acc", "train P(place = y)"):
        assert col in md
    png = (report / "waterbirds.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| DFR | early | GT |" in printed and "finished in" in printed
    finals = sorted(out.glob("runs/**/final_metrics.json"))
    assert len(finals) == 7  # 5 trainings + 2 DFR folders (in the ERM runs of baseline and early)
    stamps = {p: p.stat().st_mtime_ns for p in finals}
    # a rerun skips both data stages and reads every run back
    assert cli_main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("up to date, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in finals} == stamps


@pytest.mark.parametrize("flags, match", [
    (["--preset", "full"], "with --protocol waterbirds: default, tiny, paper"),
    (["--rows", "cnn:baseline:-:scratch"], "--rows belongs to the CUB-protocol demo"),
    (["--correlation_sweep", "0.5"], "--correlation_sweep belongs"),
])
def test_refusals(tmp_path, capsys, flags, match):
    assert cli_main(["demo", "--protocol", "waterbirds", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_real_data_commands_parse_with_the_current_flags(tmp_path, capsys):
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    assert cli_main(["demo", "--protocol", "waterbirds", "--preset", "paper", "--data_path", str(root)]) == 0
    text = capsys.readouterr().out
    assert text == paper_commands(str(root)) + "\n"  # printed
    commands = [shlex.split(line.replace("$SEED", "1")) for line in text.splitlines()
                if line.startswith(("python ", "bgmask "))]
    trained, applied = [], []
    for argv in commands:
        if argv[0] == "python":
            parser = A.train_parser("t", script_strategies(argv[1].startswith("late_masking/")))
            settings = resolve(parser.parse_args(argv[2:]))  # every flag combination checked, as train.py does
            assert settings.protocol == "waterbirds" and settings.seed == 1 and settings.pretrained
            assert settings.mask_source == "gt" and settings.model_arch == "resnet50.tv_in1k"
            trained.append((settings.method, settings.strategy, settings.snapshot_dir))
        else:
            ns = build_parser().parse_args(argv[1:])
            if ns.command == "dfr":
                assert ns.dfr_seed == 1 and ns.data_path == str(root) and ns.checkpoint.endswith("-s1/last.pt")
                applied.append(str(Path(ns.checkpoint).parent))
            else:
                assert ns.command == "report" and ns.protocol == "waterbirds"
    rows = protocol_rows()
    assert sorted((m, s) for m, s, _ in trained) == sorted((m, s) for m, s, _ in rows if not METHODS[m].post_hoc)
    assert all(d in [t[2] for t in trained] for d in applied) and len(applied) == 2  # DFR on trained ERM runs
    groupdro = next(line for line in text.splitlines() if "--method groupdro" in line)
    assert "--lr 1e-5 --weight_decay 1.0 --gdro_eta 0.01" in groupdro
    assert "--lr 1e-3 --weight_decay 1e-4" in next(line for line in text.splitlines() if "--method erm" in line)


# ----------------------------------------------------------------- the default demo is unchanged

def test_default_demo_recipe_and_data_unchanged(monkeypatch, tmp_path):
    from bgmask import stages
    from bgmask.apps.report import with_method

    p = stages.PRESETS["default"]
    s = stages.classifier_settings(("cnn", "early", "predicted", "finetuned"), 0, p, Path("d"), Path("m"), Path("r"), 2)
    assert s == {"data_path": "d", "model_arch": "bgmask_resnet_tiny", "strategy": "early", "image_size": 64,
                 "crop_pct": 1.0, "augmentations_to_use": "flip", "epochs": 3, "batch_size": 64, "lr": 5e-4,
                 "weight_decay": 0.05, "scheduler_type": "cosine", "min_lr": 1e-5, "seed": 0, "snapshot_dir": "r",
                 "num_workers": 1, "no_progress": True, "smoothing": 0.0, "eval_mode": "none", "threads": 2,
                 "mask_source": "m", "pretrained_file": "zoo:cnn", "scratch_lr_factor": 10.0}
    assert (p.num_classes, p.image_size, p.train_per_class, p.test_per_class, p.correlation, p.seeds) == \
        (10, 64, 200, 50, 0.95, (0,))
    seen = []
    monkeypatch.setattr(stages.Stages, "run", lambda self, name, inputs, fn, describe=None: seen.append((name, inputs)))
    data_args = {"num_classes": 3, "seed": 0}
    assert stages.make_data(stages.Stages(tmp_path), tmp_path, data_args) == tmp_path / "data" / "synthetic_cub"
    assert seen == [("data", data_args)]  # the same stage marker: a finished default demo is not redone
    key = {"model": "m", "strategy": "early", "masks": "GT", "init": "scratch"}
    assert with_method(key, {"method": "erm"}) == key and with_method(key, {}) == key
