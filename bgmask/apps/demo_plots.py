"""Pictures of the demo report: an example grid with each model's prediction, the correlation sweep."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from bgmask.data.cub import WATERBIRDS_SUBDIR, MaskSource, load_mask, read_cub_metadata


def _run_model(run_dir: Path):
    """(config, model in eval mode, strategy, data_config) of a finished run."""
    from bgmask.checkpoint import load_checkpoint, model_from_checkpoint
    from bgmask.masking import create_strategy

    cfg = Namespace(**yaml.safe_load((run_dir / "config.yaml").read_text()))
    ckpt = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    state = load_checkpoint(ckpt)
    dc = state["data_config"]
    strategy = create_strategy(cfg.strategy, mean=tuple(dc["mean"]), std=tuple(dc["std"]), mask_fill=cfg.mask_fill)
    return cfg, model_from_checkpoint(state, ckpt).eval(), strategy, dc


def _predict_examples(run_dir: Path, ids: list[int]) -> dict[int, int]:
    """The run's predicted class for the Waterbirds version of each id."""
    from bgmask.data import CUBDataset
    from bgmask.data.transforms import build_transform

    cfg, model, strategy, dc = _run_model(run_dir)
    tf = build_transform(False, dc["image_size"], mean=dc["mean"], std=dc["std"], crop_pct=dc["crop_pct"])
    sub = cfg.image_sub_path_test
    masks = MaskSource(cfg.mask_source, cfg.mask_threshold) if strategy.needs_mask else None
    ds = CUBDataset(cfg.data_path, "test", image_subdir=sub, masks=masks, transform=tf, check_files=False)
    pos = {img_id: k for k, img_id in enumerate(ds.ids)}
    batch = [ds[pos[i]] for i in ids]
    images = torch.stack([b["image"] for b in batch])
    m = torch.stack([b["mask"] for b in batch]) if masks is not None else None
    with torch.no_grad():
        logits = strategy.forward(model, strategy.preprocess(images, m), m)
    return dict(zip(ids, logits.argmax(1).tolist()))


def example_grid(run_dirs, data_root: Path, pred_masks: Path | None, path: Path, n: int = 5) -> Path:
    """Rows: test birds (one per class). Columns: image, mask (predicted if available, else GT),
    early-masked image, Waterbirds version; below, each run's prediction on the Waterbirds image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data_root = Path(data_root)
    meta = read_cub_metadata(data_root)
    test = [i for i in meta.ids if not meta.is_train[i]]
    ids, seen = [], set()
    for i in test:
        if meta.labels[i] not in seen:
            ids.append(i)
            seen.add(meta.labels[i])
        if len(ids) == n:
            break
    preds = {Path(r).name: _predict_examples(Path(r), ids) for r in run_dirs}
    source = MaskSource(str(pred_masks)) if pred_masks else MaskSource("gt")
    cols = ["image", "predicted mask" if pred_masks else "GT mask", "early-masked", "Waterbirds version"]
    fig, axes = plt.subplots(len(ids), 5, figsize=(11, 2.0 * len(ids) + 0.6),
                             gridspec_kw={"width_ratios": [1, 1, 1, 1, 2.4]}, squeeze=False)
    for r, img_id in enumerate(ids):
        rel = meta.relpaths[img_id]
        img = Image.open(data_root / "images" / rel).convert("RGB")
        mask = load_mask(source.path(data_root, "images", rel), img.size)
        wb_path = data_root / WATERBIRDS_SUBDIR / rel
        wb = Image.open(wb_path).convert("RGB") if wb_path.is_file() else img
        masked = (np.asarray(img) * mask[..., None]).astype(np.uint8)
        for c, pic in enumerate((img, mask * 255, masked, wb)):
            ax = axes[r, c]
            ax.imshow(pic, cmap="gray" if c == 1 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        y = meta.labels[img_id]
        axes[r, 0].set_ylabel(meta.class_names[y].split(".", 1)[-1].replace("_", " "), fontsize=7)
        lines = [f"{'OK ' if p[img_id] == y else 'x  '}{name} {'' if p[img_id] == y else '-> class ' + str(p[img_id] + 1)}"
                 for name, p in preds.items()]
        axes[r, 4].axis("off")
        axes[r, 4].text(0.0, 0.5, "\n".join(lines), transform=axes[r, 4].transAxes, fontsize=6.5, va="center",
                        family="monospace")
    fig.suptitle("Test birds, their masks, and each model's prediction on the Waterbirds version (OK = correct)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_plot(points: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for strategy, color in (("baseline", "#4C72B0"), ("early", "#55A868")):
        pts = sorted((p for p in points if p["strategy"] == strategy), key=lambda p: p["correlation"])
        if not pts:
            continue
        xs = [p["correlation"] for p in pts]
        ax.plot(xs, [100 * p["test/acc"] for p in pts], "-o", color=color, label=f"{strategy}: in distribution")
        ax.plot(xs, [100 * p["waterbirds/acc"] for p in pts], "--s", color=color, label=f"{strategy}: Waterbirds")
    ax.set_xlabel("training correlation (fraction of birds on their home habitat)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title("Accuracy against species-habitat correlation (CNN)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def attribution_examples(run_dirs, data_root: Path, pred_masks: Path | None, path: Path, n: int = 4,
                         seed: int = 0) -> Path | None:
    """Where each model looks: n Waterbirds images (a seeded subset), their GT masks, and one attribution
    map per run (`bgmask.attribution`, through the run's strategy). Masked strategies see the predicted
    masks (`pred_masks`), as the demo's runs do, else GT masks; runs that read other masks are left out.
    None when no run is left."""
    from bgmask.attribution import draw_attribution_grid, subset_indices, take
    from bgmask.data import CUBDataset
    from bgmask.data.transforms import build_transform

    source = str(pred_masks) if pred_masks else "gt"
    runs = [(" ".join(Path(r).name.split("-")[:2]), *_run_model(Path(r))) for r in run_dirs]  # "cnn early"
    runs = [r for r in runs if not r[3].needs_mask or r[1].mask_source == source]
    if not runs:
        return None
    dc = runs[0][4]
    tf = build_transform(False, dc["image_size"], mean=dc["mean"], std=dc["std"], crop_pct=dc["crop_pct"])
    gt = CUBDataset(data_root, "test", image_subdir=WATERBIRDS_SUBDIR, masks=MaskSource("gt"), transform=tf)
    pick = subset_indices(len(gt), n, seed)
    batch = take(gt, pick)
    seen = take(CUBDataset(data_root, "test", image_subdir=WATERBIRDS_SUBDIR, masks=MaskSource(source),
                           transform=tf), pick)["mask"]
    columns = [(name, model, strategy) for name, _, model, strategy, _ in runs]
    return draw_attribution_grid(path, batch["image"], batch["mask"], columns, mean=dc["mean"], std=dc["std"],
                                 strategy_masks=seen, cell=96)
