"""Where does a model look? Attribution maps through a strategy's full forward, and the share of the
positive attribution that lies on the background.

    attribute(model, strategy, images, masks)       (B, 3, H, W) attribution of the predicted class
    bg_fraction(attributions, gt_masks)             (B,) share of positive attribution on background
    evaluation_attribution(...)                     <split>/attr_bg_fraction, _std, <split>/attr_images
    draw_attribution_grid(path, images, gt_masks, columns, mean=, std=)   the example grid PNG

Method: captum's `InputXGradient` (input x d logit / d input) of the predicted class. It is pixel-level,
so it is the same for CNNs and ViTs, and it differentiates the strategy's whole forward,
`strategy.forward(model, strategy.preprocess(images, masks), masks)`: early masking's fill and late
masking's `feature_mask=` product are inside the attributed function. Grad-CAM would be tied to a conv
layer (no ViT, and late masking's product sits after it); Integrated Gradients costs one backward per
step, many times the cost for the same kind of pixel map, too slow to run by default. Input x gradient
costs about 4 no-grad forwards (predict, forward, backward), cheap enough for 64 images per split by
default (the measured speeds: benchmarks/README.md, "Attribution and the mask sweep"). Its limits: a
first-order explanation, whose reference is the normalised 0 (the mean colour): a pixel of exactly that
colour gets no attribution.

The fraction of an image: A = attribution summed over channels, clamped at >= 0 (positive evidence for
the predicted class); fraction = sum(A on GT background) / sum(A). GT masks (1 = bird, 0 = background)
come through the evaluation transform, so they have the model input's resolution. An image with no
positive attribution has no fraction (NaN) and is left out of the mean; `<split>/attr_images` counts
the images that have one. Memory: each pass keeps one backward graph, so the final evaluation attributes
`--attribution_batch_size` images at a time (not the training batch), under the run's autocast
(`--use_amp`); the input and its gradient stay float32, and each chunk's graph is freed by its backward.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from bgmask.distributed import DistInfo, all_gather_objects
from bgmask.errors import UserError, has_package, missing_package

DEFAULT_IMAGES = 64  # per split, when --attribution_images is not given and the data has GT masks
HEADER, PAD = 18, 2  # grid: the label strip's height and the gap between cells (pixels)


@contextmanager
def inputs_only(model: torch.nn.Module):
    """Parameters stop requiring gradients while inside: only the input's gradient is needed, and the
    backward graph then keeps no tensors for weight gradients (less memory)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def attribute(model, strategy, images: torch.Tensor, masks: torch.Tensor | None = None,
              target: torch.Tensor | None = None, amp: bool = False, amp_dtype: str = "bf16") -> torch.Tensor:
    """InputXGradient of the predicted class (or `target`, (B,) class indices) through the strategy's full
    forward. images (B, 3, H, W) normalised, masks (B, 1, H, W) as the strategy sees them, or None
    -> attributions (B, 3, H, W), float32, detached. The model is put in eval mode; `amp` runs the
    forward under autocast (the input and its gradient stay float32)."""
    from captum.attr import InputXGradient  # captum pulls in matplotlib: imported only when used

    from bgmask.eval import autocast_context

    def forward(x, m):
        with autocast_context(x.device, amp, amp_dtype):
            return strategy.forward(model, strategy.preprocess(x, m), m).float()

    model.eval()
    m = None if masks is None else masks.detach().float()
    with torch.enable_grad(), inputs_only(model):
        x = images.detach().float().clone().requires_grad_(True)  # captum warns on inputs without grad
        if target is None:
            with torch.no_grad():
                target = forward(x, m).argmax(1)
        return InputXGradient(forward).attribute(x, target=target, additional_forward_args=(m,)).detach()


def bg_fraction(attributions: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """attributions (B, C, H, W), gt_masks (B, 1, H, W) with 0 = background -> (B,) share of the positive
    channel-summed attribution on the background; NaN for an image without positive attribution."""
    if (attributions.ndim != 4 or gt_masks.ndim != 4 or gt_masks.shape[1] != 1
            or attributions.shape[0] != gt_masks.shape[0] or attributions.shape[-2:] != gt_masks.shape[-2:]):
        raise UserError(f"attributions {tuple(attributions.shape)} and GT masks {tuple(gt_masks.shape)} do not "
                        "match (expected (B, C, H, W) and (B, 1, H, W))")
    pos = attributions.sum(1).clamp_min(0)  # (B, H, W)
    on_bg = (pos * (gt_masks[:, 0] == 0)).flatten(1).sum(1)
    total = pos.flatten(1).sum(1)
    return torch.where(total > 0, on_bg / total.clamp_min(torch.finfo(total.dtype).tiny), torch.nan)


def subset_indices(length: int, n: int, seed: int) -> np.ndarray:
    """min(n, length) dataset positions drawn without replacement with `seed`, sorted. Splits of the
    same length get the same positions: test and Waterbirds hold the same birds in the same order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(length, size=min(n, length), replace=False))


def take(dataset, indices) -> dict:
    """The records at `indices`, collated: image (k, 3, H, W), mask (k, 1, H, W) when present, label..."""
    return default_collate([dataset[int(i)] for i in indices])


def split_fractions(model, strategy, dataset, gt_dataset, indices, dist: DistInfo, batch_size: int = 8,
                    mask_fn=None, amp: bool = False, amp_dtype: str = "bf16") -> np.ndarray:
    """bg_fraction of each position in `indices`, in that order, attributed `batch_size` images at a time.
    The strategy sees what evaluation gives it (`dataset`'s masks, or `mask_fn`'s); the fraction uses
    `gt_dataset`'s GT masks (the same positions). Ranks take strided shares of `indices`; every rank gets
    every fraction."""
    from bgmask.eval import batch_to_device

    mine, rows = np.asarray(indices)[dist.rank::dist.world_size], []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        batch = take(dataset, chunk)
        gt = batch["mask"] if gt_dataset is dataset else take(gt_dataset, chunk)["mask"]
        with torch.no_grad():  # the masks are the strategy's input, not part of the attributed function
            images, masks = batch_to_device(batch, dist.device, mask_fn)
        attributions = attribute(model, strategy, images, masks, amp=amp, amp_dtype=amp_dtype)
        fractions = bg_fraction(attributions, gt.to(dist.device))
        rows += zip(chunk.tolist(), fractions.cpu().tolist())
        del batch, images, masks, attributions  # nothing of this chunk outlives it
    gathered = dict(kv for part in all_gather_objects(rows) for kv in part)
    return np.array([gathered[int(i)] for i in indices], dtype=np.float64)


def fraction_metrics(fractions: np.ndarray, split: str) -> dict:
    """`<split>/attr_bg_fraction` and `_std` (mean and population std over the images that have a
    fraction; absent when none has) and `<split>/attr_images` (their number)."""
    ok = fractions[np.isfinite(fractions)]
    out = {f"{split}/attr_images": int(len(ok))}
    if len(ok):
        out[f"{split}/attr_bg_fraction"] = float(ok.mean())
        out[f"{split}/attr_bg_fraction_std"] = float(ok.std())
    return out


def requested_images(cfg) -> tuple[int, bool]:
    """(images per split, whether the flag was given). Parsers without the flag (train.py --eval_only) = 0."""
    n = getattr(cfg, "attribution_images", 0)
    return (DEFAULT_IMAGES, False) if n is None else (int(n), True)


def gt_mask_splits(cfg, datasets: dict, is_main: bool = True) -> dict:
    """The GT-mask twin of each evaluated split (the split itself when it already reads GT masks), or {}
    when attribution is off. Called before any prediction, so that a missing GT mask folder stops an
    explicit --attribution_images at once; without the flag it only skips attribution, with a note."""
    from bgmask.data import MaskSource

    n, given = requested_images(cfg)
    if n == 0 or not datasets:
        return {}
    root = Path(cfg.data_path)
    if not (root / "segmentations").is_dir():
        if given:
            raise UserError(f"--attribution_images {n} needs ground-truth masks, but {root / 'segmentations'} "
                            "does not exist (pass --attribution_images 0)")
        if is_main:
            print(f"note: no ground-truth masks ({root / 'segmentations'}): the attribution fraction is skipped",
                  flush=True)
        return {}
    if not has_package("captum"):  # found out now, not after the last epoch
        if given:
            raise missing_package("captum", f"--attribution_images {n}", "attribution")
        if is_main:
            print("note: captum is not installed: the attribution fraction is skipped (pip install captum, "
                  "or pass --attribution_images 0 to silence this)", flush=True)
        return {}
    gt = MaskSource("gt", cfg.mask_threshold)
    return {split: ds if ds.masks == gt else dataclasses.replace(ds, masks=gt) for split, ds in datasets.items()}


def evaluation_attribution(model, strategy, datasets: dict, gt_sets: dict, cfg, dist: DistInfo,
                           mask_fn=None) -> dict:
    """The attribution metrics of every split in `gt_sets` (from `gt_mask_splits`), each over the same
    seeded subset of --attribution_images positions (seed: --seed)."""
    n, _ = requested_images(cfg)
    metrics = {}
    for split, gt in gt_sets.items():
        indices = subset_indices(len(gt), n, cfg.seed)
        fractions = split_fractions(model, strategy, datasets[split], gt, indices, dist, cfg.attribution_batch_size,
                                    mask_fn, amp=cfg.use_amp, amp_dtype=cfg.amp_dtype)
        metrics.update(fraction_metrics(fractions, split))
    return metrics


# ------------------------------------------------------------------------------------------ the grid

def _heat(attr: torch.Tensor, grey: np.ndarray) -> np.ndarray:
    """attr (3, H, W) -> RGB uint8 (H, W, 3): positive attribution summed over channels, scaled to its 99th
    percentile (one hot pixel does not wash out the rest), inferno colours over the dimmed grey image."""
    import matplotlib

    pos = attr.sum(0).clamp_min(0).numpy()
    top = np.quantile(pos, 0.99) if pos.any() else 1.0
    top = top if top > 0 else pos.max()
    rgb = matplotlib.colormaps["inferno"](np.clip(pos / top, 0, 1))[..., :3]
    return (255 * (0.75 * rgb + 0.25 * grey[..., None])).astype(np.uint8)


def _cells(images, gt_masks, maps, mean, std) -> list[list[np.ndarray]]:
    """Rows of uint8 (H, W, 3) cells: image, GT mask, then one heat map per entry of `maps`."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    rows = []
    for r in range(len(images)):
        rgb = (images[r].detach().float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
        mask = np.repeat(gt_masks[r, 0].detach().float().cpu().numpy()[..., None], 3, axis=2)
        row = [(255 * rgb).astype(np.uint8), (255 * mask).astype(np.uint8)]
        rows.append(row + [_heat(a[r].cpu(), rgb.mean(2)) for a in maps])
    return rows


def draw_attribution_grid(path, images: torch.Tensor, gt_masks: torch.Tensor, columns, *, mean, std,
                          strategy_masks: torch.Tensor | None = None, cell: int = 96) -> Path:
    """Write a PNG: rows = images; columns = the image, its GT mask, then the attribution map (predicted
    class) of each (label, model, strategy) in `columns`, computed through the strategy's full forward.

    images (R, 3, H, W) normalised with (mean, std); gt_masks (R, 1, H, W), 1 = bird; strategy_masks: the
    masks the strategies see (default gt_masks). Models are already built (and on the images' device).
    Size: (2 + len(columns)) * (cell + PAD) - PAD wide, HEADER + R * (cell + PAD) - PAD high. E.g. from a
    dataset with GT masks: `b = take(ds, subset_indices(len(ds), 4, seed))`, then b["image"], b["mask"]."""
    from PIL import Image, ImageDraw, ImageFont

    from bgmask.io import atomic_save_image

    if images.ndim != 4 or gt_masks.shape != (images.shape[0], 1, *images.shape[-2:]):
        raise UserError(f"grid: images {tuple(images.shape)} and GT masks {tuple(gt_masks.shape)} do not match "
                        "(expected (R, 3, H, W) and (R, 1, H, W))")
    seen = gt_masks if strategy_masks is None else strategy_masks
    maps = [attribute(model, strategy, images, seen) for _, model, strategy in columns]
    labels = ["image", "GT mask", *(label for label, _, _ in columns)]
    W, H = len(labels) * (cell + PAD) - PAD, HEADER + len(images) * (cell + PAD) - PAD
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=11)
    for j, label in enumerate(labels):
        draw.text((j * (cell + PAD) + 2, 3), label, fill=(0, 0, 0), font=font)
    for r, row in enumerate(_cells(images, gt_masks, maps, mean, std)):
        for j, tile in enumerate(row):
            grid.paste(Image.fromarray(tile).resize((cell, cell), Image.NEAREST),
                       (j * (cell + PAD), HEADER + r * (cell + PAD)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(path, grid)
    return path
