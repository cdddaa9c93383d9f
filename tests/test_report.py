"""`bgmask report` against a table computed by hand from known run folders."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from bgmask.apps.cli import main as cli_main


def fake_run(path, cfg, metrics):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "final_metrics.json").write_text(json.dumps(metrics))
    return path


def test_report_by_hand(tmp_path, capsys):
    base = {"model_arch": "bgmask_resnet_tiny", "data_path": str(tmp_path), "image_sub_path_train": "images"}
    runs = [
        fake_run(tmp_path / "b0", {**base, "strategy": "baseline", "seed": 0},
                 {"test/acc": 0.9, "waterbirds/acc": 0.1, "waterbirds/drop": 0.8, "diag/bg_gap": 0.5}),
        fake_run(tmp_path / "b1", {**base, "strategy": "baseline", "seed": 1},
                 {"test/acc": 0.8, "waterbirds/acc": 0.3, "waterbirds/drop": 0.5, "diag/bg_gap": 0.3}),
        fake_run(tmp_path / "e0", {**base, "strategy": "early", "mask_source": "/some/pred", "seed": 0,
                                   "pretrained_file": "x.pth", "freeze_backbone": True},
                 {"test/acc": 0.95, "waterbirds/acc": 0.9, "waterbirds/drop": 0.05}),
    ]
    assert cli_main(["report", *map(str, runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "results.md").read_text()
    # baseline: mean 85.0 ± std 5.0 (population std of 0.9, 0.8), Waterbirds 20.0 ± 10.0
    assert "| bgmask_resnet_tiny | baseline | - | scratch | 2 | 85.0 ± 5.0 | 20.0 ± 10.0 | 65.0 ± 15.0 | – | – | 40.0 ± 10.0 |" in md
    assert "| bgmask_resnet_tiny | early | predicted | pretrained, frozen | 1 | 95.0 | 90.0 | 5.0 | – | – | – |" in md
    rows = list(csv.DictReader(open(tmp_path / "rep" / "results.csv")))
    assert len(rows) == 2 and float(rows[0]["test/acc"]) == pytest.approx(0.85)
    data = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert data[0]["waterbirds/acc_std"] == pytest.approx(0.1)
    png = (tmp_path / "rep" / "accuracy_bars.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_rejects_unfinished_run(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    assert cli_main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 2
    assert "not a finished run folder" in capsys.readouterr().err


def test_chance_line_follows_the_runs_number_of_classes(tmp_path):
    """The bar chart's chance line is 1 / num_classes of the runs (it was fixed at 10 %), and is left
    out when runs disagree or do not record it."""
    from bgmask.apps.report import chance_level, load_runs

    base = {"model_arch": "bgmask_resnet_tiny", "data_path": str(tmp_path), "image_sub_path_train": "images"}
    m = {"test/acc": 0.9, "waterbirds/acc": 0.1}
    four = [fake_run(tmp_path / f"r{s}", {**base, "strategy": "baseline", "seed": s}, {**m, "num_classes": 4})
            for s in (0, 1)]
    assert chance_level(load_runs(four)) == 0.25
    ten = fake_run(tmp_path / "e", {**base, "strategy": "early", "seed": 0}, {**m, "num_classes": 10})
    assert chance_level(load_runs([*four, ten])) is None
    old = fake_run(tmp_path / "old", {**base, "strategy": "late", "seed": 0}, m)
    assert chance_level(load_runs([*four, old])) is None


def test_paper_table_pivots_and_marks_the_best(tmp_path):
    """One line per backbone (with its ViT head) x init, strategy x (in-dist, WB, worst) across, the best of
    each column in bold; cells computed by hand; the grouped chart is written."""
    from bgmask.apps.report import load_runs, paper_table

    base = {"data_path": str(tmp_path), "image_sub_path_train": "images", "pretrained_file": "zoo:x"}
    runs = []
    for arch, head, frozen, strategy, values in [
        ("bgmask_vit_tiny", {"patch_tokens_only": True}, True, "baseline", (0.9, 0.1, 0.0)),
        ("bgmask_vit_tiny", {"patch_tokens_only": True}, True, "early", (0.8, 0.7, 0.6)),
        ("bgmask_vit_tiny", {}, False, "baseline", (0.95, 0.2, 0.1)),
        ("bgmask_vit_tiny", {}, False, "early", (0.85, 0.75, 0.5)),
        ("bgmask_resnet_tiny", {}, False, "late", (0.7, 0.5, 0.4)),
    ]:
        cfg = {**base, **head, "model_arch": arch, "strategy": strategy, "freeze_backbone": frozen, "seed": 0}
        if strategy != "baseline":
            cfg["mask_source"] = "/pred"
        runs.append(fake_run(tmp_path / f"r{len(runs)}", cfg, dict(zip(
            ("test/acc", "waterbirds/acc", "waterbirds/worst_group_acc"), values))))
    table = paper_table(load_runs(runs))
    lines = table.splitlines()
    assert lines[0] == ("| backbone | init | baseline: in-dist. | baseline: WB | baseline: worst | early (predicted): "
                        "in-dist. | early (predicted): WB | early (predicted): worst | late (predicted): in-dist. | "
                        "late (predicted): WB | late (predicted): worst |")
    assert "| vit_tiny (GAP) | pretrained, frozen | 90.0 | 10.0 | 0.0 | 80.0 | 70.0 | **60.0** | – | – | – |" in lines
    assert ("| vit_tiny (CLS+GAP) | pretrained, fine-tuned | **95.0** | **20.0** | **10.0** | **85.0** | **75.0** | 50.0 "
            "| – | – | – |") in lines
    assert "| resnet_tiny | pretrained, fine-tuned | – | – | – | – | – | – | **70.0** | **50.0** | **40.0** |" in lines
    assert cli_main(["report", *map(str, runs), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "paper_bars.png").read_bytes()[:4] == b"\x89PNG"
    assert "## As the paper's tables" in (tmp_path / "rep" / "results.md").read_text()


GOOD = {"test/acc": 0.9, "waterbirds/acc": 0.5}


@pytest.mark.parametrize("file, content, reason", [
    ("final_metrics.json", b'{"test/acc": 0.9,', "is not valid JSON"),
    ("final_metrics.json", b'[0.9]', "does not hold a mapping"),
    ("final_metrics.json", b'{"test/acc": "high"}', "test/acc is 'high', not a number"),
    ("config.yaml", b"model_arch: [unclosed\n", "is not valid YAML"),
    ("config.yaml", b"model_arch: caf\xe9\n", "is not UTF-8 text"),
    ("config.yaml", b"just a string\n", "does not hold a mapping"),
])
def test_report_skips_an_unreadable_run_naming_the_file(tmp_path, capsys, file, content, reason):
    """A malformed file in a run folder is one line naming it; the readable runs still appear, the other
    is listed as skipped with its reason (before: a traceback that named no file)."""
    base = {"model_arch": "bgmask_resnet_tiny", "data_path": str(tmp_path), "strategy": "baseline"}
    good = fake_run(tmp_path / "good", base, GOOD)
    bad = fake_run(tmp_path / "bad", {**base, "strategy": "early"}, GOOD)
    (bad / file).write_bytes(content)
    assert cli_main(["report", str(good), str(bad), "--out", str(tmp_path / "rep")]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"note: skipped {bad}: ") and str(bad / file) in err, err
    assert reason in err
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "| bgmask_resnet_tiny | baseline | - | scratch | 1 | 90.0 |" in md and "| early |" not in md
    assert "## Skipped" in md and f"`{bad}`: " in md and reason in md

    assert cli_main(["report", str(bad), "--out", str(tmp_path / "rep2")]) == 2  # nothing readable: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad / file) in err and reason in err
    assert not (tmp_path / "rep2").exists()


def test_report_reads_a_results_jsonl_that_is_not_text(tmp_path, capsys):
    run = fake_run(tmp_path / "r", {"model_arch": "m", "data_path": str(tmp_path)}, GOOD)
    (run / "results.jsonl").write_bytes(b'{"split": "eval", "test/attr_bg_fraction": 0.5}\n\xff\xfe\x00garbage\n')
    assert cli_main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert "BG attribution (test)" in (tmp_path / "rep" / "results.md").read_text()
