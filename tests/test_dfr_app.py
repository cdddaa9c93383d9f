"""`bgmask dfr` and `bgmask.methods.posthoc.apply_dfr`: DFR on a checkpoint trained 1 epoch under the
Waterbirds protocol, for every registered strategy; the record against an independent computation
(the model rebuilt, embed, dfr_fit, predictions and group accuracies recomputed here, the train groups
counted from metadata.csv with the csv module), the run folder read by `bgmask report`, the refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bgmask.apps.cli import main as cli_main
from bgmask.apps.report import load_runs
from bgmask.apps.report_waterbirds import load_protocol_runs
from bgmask.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from bgmask.data import MaskSource, WaterbirdsDataset, build_transform
from bgmask.data.synthetic import WaterbirdsSplits, generate_synthetic
from bgmask.distributed import DistInfo
from bgmask.masking.strategies import STRATEGIES, create_strategy
from bgmask.methods import dfr_fit, embed
from bgmask.stages import dfr_run, train_run

WB = "waterbird_complete95_forest2water2"
RETRAINS = 3  # fewer refits than the reference's 10: the same code path, faster


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dfr") / "data"
    generate_synthetic(root, num_classes=4, image_size=32, train_per_class=20, test_per_class=4, seed=0,
                       progress=False, waterbirds=WaterbirdsSplits())
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """strategy -> the folder of a 1-epoch ERM run under the protocol."""
    out = {}
    for strategy in STRATEGIES:
        run_dir = tmp_path_factory.mktemp("runs") / strategy
        train_run(dict(data_path=str(data), protocol="waterbirds", strategy=strategy, image_size=32, batch_size=16,
                       epochs=1, num_workers=0, no_progress=True, augmentations_to_use="flip", threads=1,
                       attribution_images=0, snapshot_dir=str(run_dir)), run_dir)
        out[strategy] = run_dir
    return out


def dfr_argv(run_dir: Path, data: Path, *more) -> list[str]:
    return ["dfr", "--checkpoint", str(run_dir / "last.pt"), "--data_path", str(data), "--num_workers", "0",
            "--threads", "1", "--no_progress", "--dfr_retrains", str(RETRAINS), *more]


def train_counts(data: Path) -> np.ndarray:
    with open(data / WB / "metadata.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "0"]
    return np.bincount([2 * int(r["y"]) + int(r["place"]) for r in rows], minlength=4)


def independent(run_dir: Path, data: Path, strategy: str) -> dict:
    """The test metrics of DFR computed here: the model rebuilt from the checkpoint, the splits built
    directly, embed + dfr_fit + predict, the group accuracies and the train-weighted accuracy by hand."""
    state = load_checkpoint(run_dir / "last.pt")
    model = model_from_checkpoint(state, run_dir / "last.pt").eval()
    cfg = state["data_config"]
    tf = build_transform(False, cfg["image_size"], mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"])
    masks = MaskSource("gt") if STRATEGIES[strategy].needs_mask else None
    split = {s: WaterbirdsDataset(data, s, masks=masks, transform=tf) for s in ("val", "test")}
    strat = create_strategy(strategy, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    dist = DistInfo()
    vx, vy, vg = embed(model, split["val"], strat, dist, channels_last=True)
    tx, ty, tg = embed(model, split["test"], strat, dist, channels_last=True)
    pred = dfr_fit(vx, vy, vg, n_retrains=RETRAINS, seed=0).predict(tx)
    groups = {k: float(np.mean(pred[tg == k] == ty[tg == k])) for k in range(4)}
    counts = train_counts(data)
    return {"test/acc": float(np.mean(pred == ty)), "test/worst_group_acc": min(groups.values()),
            "test/mean_group_acc": float(np.mean(list(groups.values()))),
            "test/weighted_acc": float(sum(counts[k] * groups[k] for k in range(4)) / counts.sum()),
            **{f"test/group_{k}_acc": a for k, a in groups.items()}}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_dfr_command_matches_an_independent_computation(strategy, runs, data, capsys):
    run_dir = runs[strategy]
    assert cli_main(dfr_argv(run_dir, data)) == 0
    printed = capsys.readouterr().out
    out = run_dir / "dfr"
    record = json.loads((out / "final_metrics.json").read_text())
    expected = independent(run_dir, data, strategy)
    assert {k: record[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert record["method"] == "dfr" and record["base_checkpoint"] == str(run_dir / "last.pt")
    assert record["dfr/C"] in [row["C"] for row in record["dfr/tuning"]] and len(record["dfr/tuning"]) == 7
    assert "Waterbirds test worst-group accuracy" in printed and "DFR on" in printed
    # laid out as a training run's folder
    for name in ("config.yaml", "final_metrics.json", "results.jsonl", "done", "command.txt", "dfr_run.json"):
        assert (out / name).is_file(), name
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == record
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "dfr" and cfg["dfr_retrains"] == RETRAINS and cfg["strategy"] == strategy
    assert cfg["protocol"] == "waterbirds" and cfg["snapshot_dir"] == str(out)
    assert (out / "command.txt").read_text().startswith("bgmask dfr --checkpoint ")
    # bgmask report reads it: a row of its own (never averaged with the ERM run), the protocol table too
    row = load_runs([out])[0]
    assert row.key["strategy"] == f"{strategy} + DFR" and row.values["test/acc"] == [record["test/acc"]]
    rows = load_protocol_runs([run_dir, out], [])
    assert [r.key["method"] for r in rows] == ["ERM", "DFR"] and {r.key["strategy"] for r in rows} == {strategy}


def test_a_finished_dfr_folder_is_read_back_and_redone_when_the_checkpoint_changes(runs, data, tmp_path, monkeypatch):
    run_dir = runs["baseline"]
    overrides = dict(checkpoint=str(run_dir / "last.pt"), data_path=str(data), num_workers=0, threads=1,
                     no_progress=True)
    first = dfr_run(overrides, {"dfr_retrains": RETRAINS}, tmp_path / "dfr")
    calls = []
    monkeypatch.setattr("bgmask.methods.posthoc.apply_dfr", lambda *a, **k: calls.append(1) or dict(first))
    assert dfr_run(overrides, {"dfr_retrains": RETRAINS}, tmp_path / "dfr") == first and not calls
    ckpt = tmp_path / "other.pt"
    state = load_checkpoint(run_dir / "last.pt")
    save_checkpoint(ckpt, {**state, "epoch": state["epoch"] + 1})
    dfr_run({**overrides, "checkpoint": str(ckpt)}, {"dfr_retrains": RETRAINS}, tmp_path / "dfr")
    assert calls == [1]


def refused(argv, capsys) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line(runs, data, tmp_path, capsys, monkeypatch):
    run_dir = runs["baseline"]
    state = load_checkpoint(run_dir / "last.pt")
    cub = tmp_path / "cub.pt"
    save_checkpoint(cub, {**state, "config": {**state["config"], "protocol": "cub"}})
    err = refused(["dfr", "--checkpoint", str(cub), "--data_path", str(data), "--num_workers", "0"], capsys)
    assert "DFR needs the Waterbirds protocol's val split with groups" in err and "--protocol cub" in err
    assert not (tmp_path / "dfr").exists()  # nothing written
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    err = refused(dfr_argv(run_dir, data, "--out", str(run_dir)), capsys)  # the base run's own folder
    assert "holds files but no DFR run" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name in before} == before
    assert "is not a file" in refused(dfr_argv(tmp_path / "missing", data), capsys)
    plain = tmp_path / "plain"
    generate_synthetic(plain, num_classes=4, image_size=32, train_per_class=5, test_per_class=2, progress=False)
    assert "no split" in refused(dfr_argv(run_dir, plain, "--out", str(tmp_path / "p")), capsys)
    assert "must be" in refused(dfr_argv(run_dir, data, "--dfr_retrains", "0"), capsys)
    monkeypatch.setattr("bgmask.errors.has_package", lambda name: False)
    assert "bgmask[dfr]" in refused(dfr_argv(run_dir, data), capsys)

