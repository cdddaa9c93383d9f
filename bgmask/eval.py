"""Evaluation: exact predictions over a split (distributed or not), the Waterbirds report and the
background-reliance diagnostics of the Backgrounds Challenge (Xiao et al., 2020).

Diagnostics are built from the in-distribution test images and their ground-truth masks:
- fg_only:    the bird on black (background removed);
- bg_only:    the background with the bird region filled black (an unbiased model is near chance);
- mixed_same: the bird pasted on the background of another test image of the same class;
- mixed_rand: the bird pasted on the background of a test image of a random other class;
- bg_gap = mixed_same - mixed_rand (how much the background's class moves predictions).
In mixed images the partner's own bird is removed and its hole filled with the partner's mean
background colour. The strategy sees the pasted bird's mask as its mask.

Accuracy metrics from per-sample predictions (exact: every sample counted once).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bgmask.distributed import ShardSampler, all_gather_objects
from bgmask.io import atomic_write_text
from bgmask.masking.strategies import apply_early_mask
from bgmask.processes import loader_iter, unblock_sigint


DIAGNOSTICS = ("fg_only", "bg_only", "mixed_same", "mixed_rand")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp_dtype -> the autocast dtype


def autocast_context(device: torch.device, enabled: bool, dtype: str = "bf16"):
    if not enabled:
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[dtype])


def batch_to_device(batch: dict, device: torch.device, mask_fn=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, masks) of a collated batch on `device` (non-blocking copies): the masks are the batch's
    own, or, with `mask_fn` (an online segmenter), its prediction from the images as loaded: contiguous
    NCHW, since the segmenter is a network of its own with its own memory format."""
    images = batch["image"].to(device, non_blocking=True)
    masks = batch.get("mask")
    masks = masks.to(device, non_blocking=True) if masks is not None else None
    if mask_fn is not None:
        masks = mask_fn(images)
    return images, masks


def prepare_batch(batch: dict, strategy, device: torch.device,
                  mask_fn=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one preparation of a batch for the classifier, in training (`bgmask.engine.train_step`) and
    evaluation (`predict`), in this order: to the device, the masks (`mask_fn` sees the contiguous batch,
    see `batch_to_device`), the strategy's preprocess. The memory format comes last, right before the
    forward (`to_memory_format`): training mixes (mixup / cutmix) between the two, so the model gets the
    same layout in both paths."""
    images, masks = batch_to_device(batch, device, mask_fn)
    return strategy.preprocess(images, masks), masks


def to_memory_format(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The classifier's input layout (`--channels_last`), applied last, right before the forward."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.no_grad()
def predict(model, dataset: Dataset, strategy, dist, batch_size: int = 64, num_workers: int = 0,
            mask_fn=None, amp: bool = False, amp_dtype: str = "bf16", channels_last: bool = False,
            progress: bool = True, desc: str = "eval") -> dict[str, np.ndarray]:
    """Per-sample predictions over the whole dataset, gathered from every rank and ordered by index.
    Each rank takes a disjoint stride of the indices (no padding), so every sample counts once."""
    model.eval()
    sampler = ShardSampler(len(dataset), dist.rank, dist.world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        worker_init_fn=unblock_sigint, pin_memory=dist.device.type == "cuda")
    rows = {"index": [], "pred": [], "label": [], "group": [], "place": []}
    for batch in tqdm(loader_iter(loader), total=len(loader), desc=desc, disable=not (progress and dist.is_main),
                      leave=False):
        images, masks = prepare_batch(batch, strategy, dist.device, mask_fn)
        images = to_memory_format(images, channels_last)
        with autocast_context(dist.device, amp, amp_dtype):
            logits = strategy.forward(model, images, masks)
        rows["pred"].append(logits.argmax(1).cpu().numpy())
        for key in ("index", "label", "group", "place"):
            rows[key].append(np.asarray(batch[key]))
    local = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in rows.items()}
    parts = all_gather_objects(local)
    out = {k: np.concatenate([p[k] for p in parts]) for k in local}
    order = np.argsort(out["index"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    if not np.array_equal(out["index"], np.arange(len(dataset))):
        raise RuntimeError(f"evaluation saw {len(out['index'])} predictions for {len(dataset)} samples")
    return out


def split_metrics(pred: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    m = {f"{prefix}/acc": accuracy(pred["pred"], pred["label"]), f"{prefix}/num_samples": int(len(pred["label"]))}
    m.update(group_summary(pred["pred"], pred["label"], pred["group"], prefix))
    return m


class BackgroundDiagnostic(Dataset):
    """A diagnostic variant of a test split that has GT masks and a deterministic transform."""

    def __init__(self, base: Dataset, variant: str, mean, std, seed: int = 0):
        if variant not in DIAGNOSTICS:
            raise ValueError(f"unknown diagnostic {variant!r}")
        self.base, self.variant, self.mean, self.std = base, variant, mean, std
        labels = np.asarray(base.labels())
        rng = np.random.default_rng(seed)
        self.partner = np.arange(len(labels))
        for i, y in enumerate(labels):
            if variant == "mixed_same":
                pool = np.flatnonzero((labels == y) & (np.arange(len(labels)) != i))
            elif variant == "mixed_rand":
                pool = np.flatnonzero(labels != y)
            else:
                continue
            if len(pool):
                self.partner[i] = rng.choice(pool)

    def __len__(self):
        return len(self.base)

    def _background(self, rec):
        img, m = rec["image"], rec["mask"]
        bg = 1 - m
        mean_bg = (img * bg).sum((1, 2), keepdim=True) / bg.sum().clamp_min(1)
        return img * bg + mean_bg * m

    def __getitem__(self, i):
        rec = dict(self.base[i])
        img, m = rec["image"], rec["mask"]
        if self.variant in ("fg_only", "bg_only"):  # the bird (or the background) on black, as early masking fills
            keep = m if self.variant == "fg_only" else 1 - m
            rec["image"] = apply_early_mask(img[None], keep[None], "black", self.mean, self.std)[0]
        else:
            bg = self._background(self.base[int(self.partner[i])])
            rec["image"] = img * m + bg * (1 - m)
        return rec


def diagnostic_metrics(preds: dict[str, dict]) -> dict[str, float]:
    out = {f"diag/{name}_acc": accuracy(p["pred"], p["label"]) for name, p in preds.items()}
    if "mixed_same" in preds and "mixed_rand" in preds:
        out["diag/bg_gap"] = out["diag/mixed_same_acc"] - out["diag/mixed_rand_acc"]
    return out


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def group_accuracies(preds, labels, groups) -> dict[int, float]:
    """Accuracy per group id (groups < 0 = unknown, ignored)."""
    preds, labels, groups = map(np.asarray, (preds, labels, groups))
    out = {}
    for g in sorted(set(groups.tolist())):
        if g < 0:
            continue
        sel = groups == g
        out[int(g)] = float(np.mean(preds[sel] == labels[sel]))
    return out


def group_summary(preds, labels, groups, prefix: str) -> dict[str, float]:
    """`prefix/group_<g>_acc`, `prefix/worst_group_acc`, `prefix/mean_group_acc` (empty if no groups)."""
    accs = group_accuracies(preds, labels, groups)
    if not accs:
        return {}
    out = {f"{prefix}/group_{g}_acc": a for g, a in accs.items()}
    out[f"{prefix}/worst_group_acc"] = min(accs.values())
    out[f"{prefix}/mean_group_acc"] = float(np.mean(list(accs.values())))
    return out


# ------------------------------------------------------------------------- an evaluation's files

METRIC_ROWS = [
    ("test/acc", "CUB test accuracy (in distribution)"),
    ("waterbirds/acc", "Waterbirds accuracy (out of distribution)"),
    ("waterbirds/drop", "drop (test - Waterbirds)"),
    ("waterbirds/mean_group_acc", "Waterbirds mean group accuracy"),
    ("waterbirds/worst_group_acc", "Waterbirds worst-group accuracy"),
    ("diag/fg_only_acc", "FG-only (background removed)"),
    ("diag/bg_only_acc", "BG-only (bird removed)"),
    ("diag/mixed_same_acc", "mixed-same"),
    ("diag/mixed_rand_acc", "mixed-rand"),
    ("diag/bg_gap", "BG-gap (mixed-same - mixed-rand)"),
    ("test/attr_bg_fraction", "attribution on the background, CUB test (share)"),
    ("waterbirds/attr_bg_fraction", "attribution on the background, Waterbirds (share)"),
]
# --protocol waterbirds: the test split is the Waterbirds folder's split 2, with groups
PROTOCOL_ROWS = [
    ("test/acc", "Waterbirds test accuracy (split 2, every image counted once)"),
    ("test/weighted_acc", "Waterbirds test accuracy weighted by the train split's groups (the published 'average')"),
    ("test/mean_group_acc", "Waterbirds test mean group accuracy"),
    ("test/worst_group_acc", "Waterbirds test worst-group accuracy"),
    *[(key, name) for key, name in METRIC_ROWS if key.startswith("diag/")],
    ("test/attr_bg_fraction", "attribution on the background, Waterbirds test (share)"),
]


def metrics_markdown(record: dict, title: str) -> str:
    protocol = "test/worst_group_acc" in record  # only the Waterbirds protocol's test split has groups
    lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
    for key, name in PROTOCOL_ROWS if protocol else METRIC_ROWS:
        if key in record:
            lines.append(f"| {name} | {record[key]:.4f} |")
    split = "test" if protocol else "waterbirds"
    for k in sorted(k for k in record if k.startswith(f"{split}/group_")):
        g = int(k.split("_")[1])
        lines.append(f"| Waterbirds group {g} (y={g // 2}, place={g % 2}) | {record[k]:.4f} |")
    return "\n".join(lines) + "\n"


def weighted_accuracy(metrics: dict, prefix: str, counts) -> dict:
    """`prefix/weighted_acc`: the per-group accuracies weighted by `counts` (the train split's samples per
    group), the "average accuracy" that Sagawa et al. (2020) and the papers after them report for
    Waterbirds; {} when a group's accuracy is missing."""
    if counts is None:  # not the Waterbirds protocol: a CUB test split may have groups, but no train groups
        return {}
    accs = [metrics.get(f"{prefix}/group_{g}_acc") for g in range(len(counts))]
    if any(a is None for a in accs) or not sum(counts):
        return {}
    return {f"{prefix}/weighted_acc": float(sum(c * a for c, a in zip(counts, accs)) / sum(counts))}


def output_paths(out: str | None, checkpoint: str) -> tuple[Path, Path]:
    """--out PREFIX: PREFIX.json and PREFIX.md exactly, whatever dots PREFIX holds (`run.eval_1` ->
    `run.eval_1.json`); default: waterbirds_eval.json / .md beside the checkpoint."""
    prefix = out if out else str(Path(checkpoint).parent / "waterbirds_eval")
    return Path(prefix + ".json"), Path(prefix + ".md")


def write_evaluation(record: dict, cfg, prefix: str | None) -> tuple[Path, Path]:
    """An evaluation of cfg.checkpoint as PREFIX.json and PREFIX.md (`output_paths`); prints the table."""
    json_path, md_path = output_paths(prefix, cfg.checkpoint)
    md = metrics_markdown(record, f"{cfg.model_arch} / {cfg.strategy} ({cfg.checkpoint})")
    atomic_write_text(json_path, json.dumps(record, indent=2, sort_keys=True))
    atomic_write_text(md_path, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path
