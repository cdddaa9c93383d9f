"""The per-image loops over worker processes (bgmask.processes, predict_masks' DataLoader workers): the same
bytes as one worker, a worker's UserError is one line in the parent, a rerun skips finished files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bgmask.apps.cli import main as bgmask_main

REPO = Path(__file__).resolve().parents[1]
SMALL_SEG = REPO / "mmsegmentation/configs/unet/unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py"
SYNTH = dict(num_classes=2, image_size=64, train_per_class=12, test_per_class=6, correlation=0.9, seed=3)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from bgmask.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("parallel") / "cub"
    generate_synthetic(root, **SYNTH, progress=False)
    return root


def test_make_masked_same_bytes_with_two_workers(synth):
    from bgmask.masking.make_masked import make_masked

    one = make_masked(synth, "gt", "m1", progress=False, workers=1)
    two = make_masked(synth, "gt", "m2", progress=False, workers=2)
    assert list(one.values()) == list(two.values())
    for sub in ("", "_waterbirds"):
        a, b = tree(synth / f"m1{sub}"), tree(synth / f"m2{sub}")
        assert len(a) > 10 and a == b


def test_make_binary_seg_same_bytes_with_two_workers(synth, tmp_path):
    from bgmask.data.binary_seg import make_binary_seg

    make_binary_seg(synth, tmp_path / "one", 0.1, 0, progress=False, workers=1)
    assert bgmask_main(["make-binary-seg", "--cub_root", str(synth), "--out", str(tmp_path / "two"),
                        "--workers", "2"]) == 0
    a = tree(tmp_path / "one")
    assert len(a) > 20 and a == tree(tmp_path / "two")


def test_rerun_with_two_workers_skips_finished_files(synth, tmp_path):
    """Delete a few outputs: the rerun writes exactly those again (the others keep their mtime)."""
    from bgmask.data.binary_seg import make_binary_seg

    out = tmp_path / "out"
    make_binary_seg(synth, out, 0.1, 0, progress=False, workers=2)
    ref = tree(out)
    images = sorted((out / "images").rglob("*.jpg"))
    gone, kept = images[:3], images[3:]
    for p in gone:
        p.unlink()
    before = {p: p.stat().st_mtime_ns for p in kept}
    make_binary_seg(synth, out, 0.1, 0, progress=False, workers=2)
    assert tree(out) == ref
    assert {p: p.stat().st_mtime_ns for p in kept} == before


def corrupt_copy(synth: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(synth, dst)
    victim = sorted((dst / "images").rglob("*.jpg"))[5]
    victim.write_bytes(b"not a jpeg")
    return victim


def assert_one_error_line(err: str, name: str) -> None:
    """One `error: ...` line naming the file; nothing else but the progress bar's lines."""
    lines = [line.rpartition("\r")[2] for line in err.split("\n") if line.strip()]
    lines = [line for line in lines if "%|" not in line]  # tqdm's bar
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], err


def test_worker_user_error_is_one_line(synth, tmp_path, capsys):
    victim = corrupt_copy(synth, tmp_path / "cub")
    for argv in (["make-masked", "--cub_root", str(tmp_path / "cub"), "--out_subdir", "m"],
                 ["make-binary-seg", "--cub_root", str(tmp_path / "cub"), "--out", str(tmp_path / "seg")]):
        assert bgmask_main([*argv, "--workers", "2"]) == 2
        assert_one_error_line(capsys.readouterr().err, victim.name)


@pytest.fixture(scope="module")
def slim(tmp_path_factory) -> Path:
    pytest.importorskip("mmseg")
    import torch

    from bgmask.seg.checkpoint import save_slim
    from bgmask.seg.segmenter import build_model, read_config

    cfg = read_config(SMALL_SEG)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("slim") / "slim.pth"
    return save_slim(path, build_model(cfg).state_dict(),
                     {"classes": ["background", "bird"], "palette": [[0, 0, 0], [255, 255, 255]]}, cfg.pretty_text)


def predict_argv(synth: Path, slim: Path, out: Path, workers: int) -> list[str]:
    return ["--config", str(SMALL_SEG), "--checkpoint", str(slim), "--cub_root", str(synth), "--out_dir", str(out),
            "--batch_size", "4", "--device", "cpu", "--no_progress", "--workers", str(workers)]


def test_predict_masks_same_bytes_with_two_workers(synth, slim, tmp_path):
    from bgmask.seg.cli import predict_main

    assert predict_main(predict_argv(synth, slim, tmp_path / "zero", 0)) == 0
    assert predict_main(predict_argv(synth, slim, tmp_path / "two", 2)) == 0
    a = tree(tmp_path / "zero")
    assert len(a) > 20 and a == tree(tmp_path / "two")


def test_predict_masks_worker_user_error_is_one_line(synth, slim, tmp_path, capsys):
    from bgmask.seg.cli import predict_main

    victim = corrupt_copy(synth, tmp_path / "cub")
    assert predict_main(predict_argv(tmp_path / "cub", slim, tmp_path / "out", 2)) == 2
    assert_one_error_line(capsys.readouterr().err, victim.name)


def _die_on_three(job: int) -> None:
    import os

    if job == 3:
        os._exit(1)  # what the OOM killer does to a worker


def test_a_worker_killed_is_one_line():
    from bgmask.errors import UserError
    from bgmask.processes import run_each

    with pytest.raises(UserError, match="worker process ended abruptly"):
        run_each(_die_on_three, list(range(8)), 2, "jobs", progress=False)
