"""The benchmark scripts: `make bench`'s one table (every section and row, ratios against the reference
row of the same run, goals) on a smoke-sized run, and the row arithmetic on rows made by hand."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import make_row, markdown_table, resolve  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_ratios_and_goals_by_hand():
    rows = resolve([
        make_row("train", "m", "bare", 100, 1.0, 10.0),
        make_row("train", "m", "engine", 90, 1.0, 11.0, ref="bare", goal=0.9),
        make_row("train", "m", "late", 80, 1.0, 12.0, ref="engine", goal=0.9),
        make_row("eval", "m", "fwd", 50, 2.0, None, ref="train:bare"),
        make_row("generation", "g", "64 px", 300, 2.0, 5.0, goal=200, goal_kind="rate"),
    ])
    assert [r["ratio"] for r in rows] == [None, 0.9, pytest.approx(80 / 90), 0.25, None]
    assert [r["met"] for r in rows] == [None, True, False, None, False]
    assert rows[3]["vs"] == "bare" and rows[4]["images_per_s"] == 150
    table = markdown_table(rows)
    assert "| train | m | late | 80.0 | 1.00 | 12 | 0.89 | engine | >= 0.90x **missed** |" in table
    assert "| generation | g | 64 px | 150.0 | 2.00 | 5 |  |  | >= 200 img/s **missed** |" in table
    with pytest.raises(KeyError, match="missing row 'nope'"):
        resolve([make_row("train", "m", "x", 1, 1.0, None, ref="nope")])


@pytest.mark.slow
def test_run_all_quick_prints_one_table_of_every_part(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks/run_all.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    by = {(r["section"], r["model"], r["row"]): r for r in rows}
    assert {r["section"] for r in rows} == {"generation", "data loading", "masks", "train", "eval"}
    for arch in ("bgmask_resnet_tiny", "bgmask_vit_tiny"):
        names = [r["row"] for r in rows if r["model"] == arch]
        assert names == ["bare timm model", "engine/baseline", "engine/early", "engine/late",
                         "engine/late + online segmenter", "segmenter forward alone",
                         "engine/late + segmenter forward (sum of both)", "engine+data/baseline", "engine+data/early",
                         "engine+data/late", "bare forward, no grad", "eval/baseline", "eval/early", "eval/late"]
        for r in rows:
            if r["model"] == arch and r["ref"]:
                section = "eval" if r["row"].startswith(("eval/", "bare forward")) else "train"
                ref = by[(section, arch, r["ref"])]
                assert r["ratio"] == pytest.approx(r["images_per_s"] / ref["images_per_s"])
        assert by[("train", arch, "engine/late")]["vs"] == "engine/baseline"
        assert by[("train", arch, "engine/late")]["goal"] == 0.85
        late, seg, both = (by[("train", arch, n)] for n in ("engine/late", "segmenter forward alone",
                                                              "engine/late + segmenter forward (sum of both)"))
        assert both["seconds"] == pytest.approx(late["seconds"] + seg["seconds"]) and both["images"] == late["images"]
        online = by[("train", arch, "engine/late + online segmenter")]
        assert online["vs"] == both["row"] and online["goal"] == 0.95
    masks = [r for r in rows if r["section"] == "masks"]
    assert masks[1]["row"].startswith("predict_masks.py") and masks[1]["images"] == 4 * 10 + 2 * 10 * 2
    assert all(r["images_per_s"] > 0 and r["seconds"] > 0 and r["peak_mem_mib"] > 0 for r in rows)
    table = p.stdout.split("# All figures", 1)[1]
    assert table.count("\n| ") == len(rows) + 1  # one table: header + a line per row
    with open(out / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "bench.md").read_text().count("\n| ") == len(rows) + 1


@pytest.mark.slow
def test_bench_train_torchcompile_and_gpu_preset_without_cuda(tmp_path):
    rows_file = tmp_path / "rows.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_train.py"), "--models", "bgmask_resnet_tiny",
                        "--strategies", "baseline", "late", "--image_size", "32", "--batch_size", "4", "--steps", "1",
                        "--warmup", "1", "--repeats", "1", "--no_eval", "--torchcompile", "eager", "--json",
                        str(rows_file)], capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "torchcompile=eager" in p.stdout
    assert [r["row"] for r in json.loads(rows_file.read_text())] == ["bare timm model", "engine/baseline",
                                                                     "engine/late"]
    import torch

    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, str(REPO / "benchmarks/run_all.py"), "--gpu", "--out", str(tmp_path / "g")],
                           capture_output=True, text=True, env=ENV, timeout=120)
        assert p.returncode == 2 and p.stderr.strip() == \
            "error: --gpu needs a CUDA device, and torch.cuda.is_available() is False"


def test_bench_prep_rows(tmp_path):
    """bench_prep.py on a tiny tree: a 1-worker and a 2-worker row per stage, the second divided by the first,
    and the data folder itself left untouched (it works on a copy)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_tiny_cub

    import bench_prep

    root = write_tiny_cub(tmp_path / "CUB", per_class=(10, 2))  # 10 % of 10 per class: a val split for make-binary-seg
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    rows = bench_prep.main(["--data_path", str(root), "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert [(r["model"], r["row"]) for r in rows] == [
        ("make-binary-seg", "1 worker(s)"), ("make-binary-seg", "2 worker(s)"),
        ("make-masked", "1 worker(s)"), ("make-masked", "2 worker(s)")]
    assert all(r["images"] > 0 for r in rows) and rows[1]["ratio"] == pytest.approx(
        rows[1]["images_per_s"] / rows[0]["images_per_s"]) and rows[1]["goal"] == 1.7
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert json.loads((tmp_path / "r.json").read_text())[3]["row"] == "2 worker(s)"


@pytest.mark.slow
def test_bench_cub_scale_smoke(tmp_path):
    """bench_cub_scale.py at 2 classes: the tree is generated once (CUB-like sizes, non-square) and every
    data stage gives a row; a second call reuses the tree."""
    import bench_cub_scale
    from PIL import Image

    rows = bench_cub_scale.main(["--out", str(tmp_path), "--num_classes", "2"])
    assert [r["row"].split(",")[0] for r in rows] == [
        "start-up checks (3 splits", "one epoch of training data", "make-binary-seg", "make-masked"]
    assert rows[0]["images"] == 2 * (29 + 28) + 2 * 28 and rows[1]["images"] == 2 * 29
    sizes = {Image.open(p).size for p in (tmp_path / "CUB_200_2011" / "images").rglob("*.jpg")}
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes) and max(max(s) for s in sizes) <= 500
    done = (tmp_path / "CUB_200_2011" / "done").read_text()
    bench_cub_scale.main(["--out", str(tmp_path), "--num_classes", "2"])
    assert (tmp_path / "CUB_200_2011" / "done").read_text() == done  # not generated again


@pytest.mark.slow
def test_bench_defaults_smoke(tmp_path):
    """bench_defaults.py on a tiny tree of 200 px JPEGs: every stage gives a default row divided by its
    plain row, measured in the same run."""
    import bench_defaults

    from bgmask.data.synthetic import Quirks, generate_synthetic

    root = tmp_path / "CUB_200_2011"
    generate_synthetic(root, num_classes=2, image_size=200, train_per_class=4, test_per_class=2, seed=0,
                       progress=False, quirks=Quirks(varied_sizes=True))
    rows = bench_defaults.main(["--root", str(root), "--model", "bgmask_resnet_tiny", "--num_classes", "2",
                                "--image_size", "32", "--batch_size", "2", "--steps", "1", "--epoch_steps", "1",
                                "--images", "4", "--repeats", "1"])
    assert len(rows) == 16 and [r["row"].rsplit(" — ", 1)[1] for r in rows] == ["default", "plain"] * 8
    for default, plain in zip(rows[::2], rows[1::2]):
        assert default["vs"] == plain["row"] and default["ratio"] == pytest.approx(
            default["images_per_s"] / plain["images_per_s"])
