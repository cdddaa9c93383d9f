"""Attribution maps and the share of positive attribution on the background (`bgmask.attribution`): a
closed form on a linear model, 0 for a model that cannot see the background, 1 for one that sees only
the background, late masking's maps through the masked forward, the evaluation script's keys (checked
against a computation of their own), the flag's range, the report's column and the example grid."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from bgmask.attribution import (HEADER, PAD, attribute, bg_fraction, draw_attribution_grid, fraction_metrics,
                                subset_indices, take)
from bgmask.errors import UserError
from bgmask.masking.strategies import Strategy, create_strategy
from bgmask.models import create_classifier


class Linear(nn.Module):
    """logits = W x (x flattened): input x gradient of class k is x * W[k], exactly."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


class BackgroundOnly(Strategy):
    """Unregistered on purpose (tests over the registry must not see it): the model gets the background."""

    name = "background_only"
    needs_mask = True

    def preprocess(self, images, masks):
        return images * (1 - masks)


def bird_masks(b: int, size: int) -> torch.Tensor:
    m = torch.zeros(b, 1, size, size)
    m[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1  # a centred square bird
    return m


def test_linear_model_closed_form():
    """Class 0's channel-summed weights per pixel are [[3, -1], [2, 1]] and x = 1, so the attribution
    summed over channels is that grid; class 1's weights are 0, so class 0 is predicted (logit 5 > 0).
    Positive mass 3 + 2 + 1 = 6; bird at (0, 0): 3 of it on the bird -> 3 / 6 on the background."""
    w0 = torch.tensor([[3.0, -1.0], [2.0, 1.0]]).expand(3, 2, 2) / 3  # (3, 2, 2): the sum over channels above
    weight = torch.stack([w0.flatten(), torch.zeros(12)])  # (K=2, 12)
    x = torch.ones(2, 3, 2, 2)
    masks = torch.zeros(2, 1, 2, 2)
    masks[0, 0, 0, 0] = 1  # image 0: bird on the 3
    masks[1, 0, 1, 0] = 1  # image 1: bird on the 2 -> background holds 3 + 1 = 4 of 6
    attr = attribute(Linear(weight), create_strategy("baseline"), x, masks)
    torch.testing.assert_close(attr, x * w0, rtol=0, atol=1e-6)  # x * W[predicted class]
    torch.testing.assert_close(bg_fraction(attr, masks), torch.tensor([3 / 6, 4 / 6]))


def test_attribution_equals_input_times_gradient_of_the_predicted_class():
    """Against autograd directly, for a conv net through early masking's full forward."""
    torch.manual_seed(0)
    model = create_classifier("bgmask_resnet_tiny", num_classes=3).eval()
    strategy = create_strategy("early", mask_fill="blur")  # the blur fill lets background gradients through
    x, m = torch.randn(3, 3, 32, 32), bird_masks(3, 32)
    x_ = x.clone().requires_grad_(True)
    logits = strategy.forward(model, strategy.preprocess(x_, m), m)
    grad, = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x_)
    torch.testing.assert_close(attribute(model, strategy, x, m), x * grad)
    assert all(p.requires_grad for p in model.parameters())  # restored after attribution


@pytest.mark.parametrize("arch", ["bgmask_resnet_tiny", "bgmask_vit_tiny"])
def test_early_masking_puts_nothing_on_the_background_and_background_only_everything(arch):
    torch.manual_seed(0)
    model = create_classifier(arch, num_classes=3, image_size=64)
    x, m = torch.randn(4, 3, 64, 64), bird_masks(4, 64)
    early = bg_fraction(attribute(model, create_strategy("early"), x, m), m)  # black fill: constant background
    assert torch.equal(early, torch.zeros(4))
    only_bg = bg_fraction(attribute(model, BackgroundOnly(), x, m), m)  # bird pixels multiplied by 0
    torch.testing.assert_close(only_bg, torch.ones(4))


def test_vit_late_masking_goes_through_the_masked_forward():
    torch.manual_seed(0)
    model = create_classifier("bgmask_vit_tiny", num_classes=3, image_size=64)
    x, m = torch.randn(2, 3, 64, 64), bird_masks(2, 64)
    late = attribute(model, create_strategy("late"), x, m)
    assert late.shape == (2, 3, 64, 64) and torch.isfinite(late).all()
    x_ = x.clone().requires_grad_(True)
    logits = model(x_, feature_mask=m)
    grad, = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x_)
    torch.testing.assert_close(late, x * grad)  # the model's masked forward, not the plain one
    plain = attribute(model, create_strategy("baseline"), x, m)
    background = (m == 0).expand_as(x)
    assert not torch.allclose(late[background], plain[background])
    assert 0 <= bg_fraction(late, m).min() and bg_fraction(late, m).max() <= 1


def test_fraction_without_positive_attribution_and_bad_shapes():
    m = bird_masks(2, 4)
    attr = torch.zeros(2, 3, 4, 4)
    attr[1, 0, 0, 0] = -1.0  # only negative evidence
    assert torch.isnan(bg_fraction(attr, m)).all()
    with pytest.raises(UserError, match=r"^attributions \(2, 3, 4, 4\) and GT masks \(2, 1, 8, 8\) do not match"):
        bg_fraction(attr, bird_masks(2, 8))


def test_fraction_metrics_and_subset():
    out = fraction_metrics(np.array([0.2, 0.4, np.nan]), "test")
    assert out["test/attr_images"] == 2
    assert out["test/attr_bg_fraction"] == pytest.approx(0.3) and out["test/attr_bg_fraction_std"] == pytest.approx(0.1)
    assert fraction_metrics(np.array([np.nan]), "waterbirds") == {"waterbirds/attr_images": 0}
    a = subset_indices(10, 4, seed=3)
    assert np.array_equal(a, subset_indices(10, 4, seed=3)) and np.array_equal(a, np.unique(a)) and len(a) == 4
    assert not np.array_equal(a, subset_indices(10, 4, seed=4))
    assert np.array_equal(subset_indices(5, 64, seed=0), np.arange(5))


def test_grid_png_size_and_cells(tmp_path):
    torch.manual_seed(0)
    cnn = create_classifier("bgmask_resnet_tiny", num_classes=3)
    vit = create_classifier("bgmask_vit_tiny", num_classes=3, image_size=64)
    x, m = torch.randn(3, 3, 64, 64), bird_masks(3, 64)
    columns = [("baseline", cnn, create_strategy("baseline")), ("early", cnn, create_strategy("early")),
               ("late", vit, create_strategy("late"))]
    cell = 32
    path = draw_attribution_grid(tmp_path / "g" / "grid.png", x, m, columns, mean=(0.5,) * 3, std=(0.25,) * 3,
                                 cell=cell)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (HEADER + 3 * (cell + PAD) - PAD, 5 * (cell + PAD) - PAD, 3) == (118, 168, 3)
    mask_cell = img[HEADER:HEADER + cell, cell + PAD: 2 * cell + PAD, 0]  # row 0, column "GT mask"
    assert np.array_equal(mask_cell, 255 * bird_masks(1, cell)[0, 0].numpy().astype(np.uint8))
    with pytest.raises(UserError, match="^grid: images"):
        draw_attribution_grid(tmp_path / "bad.png", x, m[:2], columns, mean=(0.5,) * 3, std=(0.25,) * 3)


# ------------------------------------------------------------------------------ the evaluation script

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from bgmask.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("attr") / "CUB"
    generate_synthetic(root, num_classes=3, image_size=32, train_per_class=4, test_per_class=3, progress=False)
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One-step runs: a random-ish checkpoint of each strategy is all the evaluation needs."""
    from bgmask.apps.scripts import train_early

    out = {}
    for strategy in ("baseline", "early"):
        run = tmp_path_factory.mktemp(strategy) / "run"
        assert train_early(["--data_path", str(data), "--snapshot_dir", str(run), "--strategy", strategy,
                            "--image_size", "32", "--batch_size", "4", "--epochs", "1", "--max_steps_per_epoch",
                            "1", "--augmentations_to_use", "none", "--num_workers", "0", "--threads", "1",
                            "--no_progress"]) == 0
        out[strategy] = run
    return out


def evaluate(data, run, out, *more) -> int:
    from bgmask.apps.scripts import eval_early

    return eval_early(["--checkpoint", str(run / "last.pt"), "--data_path", str(data), "--num_workers", "0",
                       "--threads", "1", "--no_progress", "--out", str(out), *more])


def own_fractions(data, run, split_dir: str, n: int, seed: int = 0) -> np.ndarray:
    """The per-image fractions computed here from the checkpoint, the GT masks and the same subset."""
    from bgmask.checkpoint import load_checkpoint, model_from_checkpoint
    from bgmask.data import CUBDataset, MaskSource, build_transform

    state = load_checkpoint(run / "last.pt")
    model, dc = model_from_checkpoint(state, run / "last.pt"), state["data_config"]
    tf = build_transform(False, dc["image_size"], mean=dc["mean"], std=dc["std"], crop_pct=dc["crop_pct"])
    ds = CUBDataset(data, "test", image_subdir=split_dir, masks=MaskSource("gt"), transform=tf)
    b = take(ds, subset_indices(len(ds), n, seed))
    return bg_fraction(attribute(model, create_strategy("baseline"), b["image"], None), b["mask"]).numpy()


def test_eval_writes_the_attribution_keys(data, runs, tmp_path, capsys):
    from bgmask.apps.cli import main as cli_main

    assert evaluate(data, runs["baseline"], tmp_path / "ev", "--attribution_images", "4") == 0
    rec = json.loads((tmp_path / "ev.json").read_text())
    for split, folder in (("test", "images"), ("waterbirds", "waterbird_complete95_forest2water2")):
        own = own_fractions(data, runs["baseline"], folder, 4)
        assert rec[f"{split}/attr_images"] == np.isfinite(own).sum() > 0
        assert rec[f"{split}/attr_bg_fraction"] == pytest.approx(np.nanmean(own), abs=1e-6)
        assert rec[f"{split}/attr_bg_fraction_std"] == pytest.approx(np.nanstd(own), abs=1e-6)
    assert "attribution on the background, CUB test" in (tmp_path / "ev.md").read_text()
    logged = [json.loads(line) for line in (runs["baseline"] / "results.jsonl").read_text().splitlines()]
    assert logged[-1]["split"] == "eval" and logged[-1]["test/attr_bg_fraction"] == rec["test/attr_bg_fraction"]
    assert cli_main(["report", str(runs["baseline"]), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "| BG attribution (test) | BG attribution (Waterbirds) |" in md
    assert f"| {100 * rec['test/attr_bg_fraction']:.1f} | {100 * rec['waterbirds/attr_bg_fraction']:.1f} |" in md


def test_eval_of_early_masking_and_the_default_subset(data, runs, tmp_path):
    """Early masking (black fill): no attribution on the background, exactly. Without the flag every
    test image is used here (the default 64 is more than the 9 there are)."""
    assert evaluate(data, runs["early"], tmp_path / "ev") == 0
    rec = json.loads((tmp_path / "ev.json").read_text())
    assert rec["test/attr_images"] == rec["waterbirds/attr_images"] == 9
    assert rec["test/attr_bg_fraction"] == rec["waterbirds/attr_bg_fraction"] == 0.0
    assert rec["test/attr_bg_fraction_std"] == 0.0


def test_eval_without_gt_masks(data, runs, tmp_path, capsys):
    bare = tmp_path / "CUB"
    shutil.copytree(data, bare, ignore=shutil.ignore_patterns("segmentations"))
    capsys.readouterr()
    assert evaluate(bare, runs["baseline"], tmp_path / "ev", "--attribution_images", "4") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --attribution_images 4 needs ground-truth masks, but {bare / 'segmentations'} does not "
                   "exist (pass --attribution_images 0)")
    assert not (tmp_path / "ev.json").exists()
    assert evaluate(bare, runs["baseline"], tmp_path / "ev") == 0  # the default only skips it, with a note
    assert "the attribution fraction is skipped" in capsys.readouterr().out
    assert not any("attr" in k for k in json.loads((tmp_path / "ev.json").read_text()))


def test_negative_count_is_refused_by_the_flag_range(data, runs, tmp_path, capsys):
    assert evaluate(data, runs["baseline"], tmp_path / "ev", "--attribution_images", "-1") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--attribution_images must be >= 0, got -1" in err, err
    assert not (tmp_path / "ev.json").exists()


def test_training_reports_the_fraction_in_its_final_metrics(runs):
    """train.py's final evaluation carries the fraction too (the default subset): exactly 0 for early
    masking, and the report reads it from final_metrics.json."""
    base = json.loads((runs["baseline"] / "final_metrics.json").read_text())
    early = json.loads((runs["early"] / "final_metrics.json").read_text())
    assert early["test/attr_bg_fraction"] == early["waterbirds/attr_bg_fraction"] == 0.0
    assert early["test/attr_images"] == 9 and 0.0 < base["test/attr_bg_fraction"] <= 1.0


def test_training_with_an_explicit_count_and_no_gt_masks_stops_before_training(data, tmp_path, capsys):
    from bgmask.apps.scripts import train_early

    bare = tmp_path / "CUB"
    shutil.copytree(data, bare, ignore=shutil.ignore_patterns("segmentations"))
    run = tmp_path / "run"
    assert train_early(["--data_path", str(bare), "--snapshot_dir", str(run), "--image_size", "32", "--epochs", "1",
                        "--num_workers", "0", "--attribution_images", "4", "--no_progress"]) == 2
    assert "--attribution_images 4 needs ground-truth masks" in capsys.readouterr().err
    assert not (run / "last.pt").exists()
