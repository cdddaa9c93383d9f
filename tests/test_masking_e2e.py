"""Masked copies on disk, predicted-mask folders, and the online mask-function interface, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bgmask.apps.cli import main as cli_main
from bgmask.data.cub import read_cub_metadata
from bgmask.engine import run
from bgmask import args as A
from bgmask.masking.make_masked import make_masked
from bgmask.apps.scripts import train_early, train_late

from conftest import write_tiny_cub


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return write_tiny_cub(tmp_path_factory.mktemp("mask") / "CUB", num_classes=3, per_class=(6, 3), size=(40, 32))


def test_make_masked_black_background_and_resume(cub, capsys):
    assert cli_main(["make-masked", "--cub_root", str(cub), "--masks", "gt", "--out_subdir", "masked"]) == 0
    meta = read_cub_metadata(cub)
    rel = meta.relpaths[1]
    img = np.asarray(Image.open(cub / "masked" / rel)).astype(int)
    mask = np.asarray(Image.open(cub / "segmentations" / Path(rel).with_suffix(".png"))) > 0
    assert img[~mask].mean() < 1.5 and np.percentile(img[~mask], 95) <= 8  # black, JPEG ringing at the edge aside
    orig = np.asarray(Image.open(cub / "images" / rel)).astype(int)
    assert np.abs(img[mask] - orig[mask]).mean() < 6
    wb = sorted((cub / "masked_waterbirds").rglob("*.jpg"))
    assert len(wb) == 9 and (cub / "masked_waterbirds" / "metadata.csv").is_file()
    # rerun after an interruption: the missing file comes back, finished files are not rewritten
    victim, kept = cub / "masked" / meta.relpaths[2], cub / "masked" / meta.relpaths[3]
    victim.unlink()
    mtime = kept.stat().st_mtime_ns
    make_masked(cub, "gt", "masked", progress=False)
    assert victim.is_file() and kept.stat().st_mtime_ns == mtime
    assert cli_main(["make-masked", "--cub_root", str(cub), "--out_subdir", "images"]) == 2
    assert "--out_subdir must be a new folder" in capsys.readouterr().err


@pytest.mark.parametrize("fill", ["black", "mean", "blur"])
def test_masked_copy_pixels_equal_on_the_fly_early_masking(cub, fill):
    """One background fill: the pixels `make-masked` writes are early masking's on-the-fly result for the
    same image, mask and fill (ImageNet normalisation, native size), up to 8-bit rounding."""
    from bgmask.data import CUBDataset, build_transform
    from bgmask.data.cub import load_mask, load_rgb
    from bgmask.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from bgmask.masking import create_strategy
    from bgmask.masking.make_masked import masked_pixels

    tf = build_transform(False, 32, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0)
    ds = CUBDataset(cub, "test")
    strategy = create_strategy("early", mean=IMAGENET_MEAN, std=IMAGENET_STD, mask_fill=fill)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for k in range(3):
        rel = ds.meta.relpaths[ds.ids[k]]
        image = load_rgb(cub / "images" / rel).crop((4, 0, 36, 32))  # square: the eval transform keeps every pixel
        mask = load_mask(cub / "segmentations" / Path(rel).with_suffix(".png"), (40, 32), 0)[:, 4:36]
        on_disk = torch.from_numpy(np.asarray(masked_pixels(image, mask, fill)).astype(np.float32)).permute(2, 0, 1)
        x, m = tf(image, mask)  # the dataset's own pipeline: (3, 32, 32), (1, 32, 32)
        on_the_fly = strategy.preprocess(x[None], m[None])[0] * std + mean
        assert (on_disk - on_the_fly * 255).abs().max() <= 0.5 + 1e-3, (fill, k)
        background = on_disk[:, ~torch.from_numpy(mask.astype(bool))]  # (3, n)
        if fill == "black":
            assert background.max() == 0
        elif fill == "mean":
            assert torch.equal(background, (mean * 255).round().view(3, 1).expand_as(background))


def test_train_on_masked_copies(cub, tmp_path):
    make_masked(cub, "gt", "masked2", progress=False)
    run_dir = tmp_path / "run"
    assert train_early(["--data_path", str(cub), "--image_sub_path_train", "masked2", "--image_sub_path_test",
                        "masked2_waterbirds", "--image_size", "32", "--epochs", "1", "--batch_size", "6",
                        "--num_workers", "0", "--snapshot_dir", str(run_dir), "--no_progress", "--threads", "1"]) == 0
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["waterbirds/num_samples"] == 9 and "waterbirds/worst_group_acc" in final


def _write_pred_masks(cub, out, value=255):
    meta = read_cub_metadata(cub)
    for sub in ("images", "waterbird_complete95_forest2water2"):
        for i in meta.ids:
            if sub != "images" and meta.is_train[i]:
                continue
            p = out / sub / Path(meta.relpaths[i]).with_suffix(".png")
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 40), value, np.uint8)).save(p)


@pytest.mark.parametrize("arch", ["bgmask_resnet_tiny", "bgmask_vit_tiny_reg4"])
def test_late_masking_with_mask_folder(cub, tmp_path, arch):
    pred = tmp_path / "pred"
    _write_pred_masks(cub, pred)
    run_dir = tmp_path / "run"
    assert train_late(["--data_path", str(cub), "--mask_dir", str(pred), "--model_arch", arch, "--image_size", "32",
                       "--epochs", "1", "--batch_size", "6", "--num_workers", "0", "--snapshot_dir", str(run_dir),
                       "--no_progress", "--threads", "1"]) == 0
    cfg = (run_dir / "config.yaml").read_text()
    assert f"mask_source: {pred}" in cfg


def test_online_mask_function_is_used(cub, tmp_path):
    """An online segmenter is a callable (B, 3, H, W) -> (B, 1, H, W); an all-zero one must change the
    late-masked predictions to those of an all-zero feature map (every image gets the same logits)."""
    calls = []

    def all_background(images):
        calls.append(images.shape)
        return torch.zeros(images.shape[0], 1, *images.shape[-2:])

    cfg = A.parse_with_config(A.train_parser("t"), [
        "--data_path", str(cub), "--strategy", "late", "--image_size", "32", "--epochs", "1", "--batch_size", "6",
        "--num_workers", "0", "--snapshot_dir", str(tmp_path / "run"), "--no_progress", "--threads", "1"])
    record = run(cfg, mask_fn=all_background)
    assert calls and all(s[1:] == (3, 32, 32) for s in calls)
    # with zero features every sample gets the same class: accuracy = that class's share (1/3)
    assert record["test/acc"] == pytest.approx(1 / 3)
