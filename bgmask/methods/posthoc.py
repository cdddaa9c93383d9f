"""A post-hoc method applied to a trained checkpoint: DFR (`bgmask.methods.dfr`) under the Waterbirds protocol.

    settings = run_settings(dict(eval_only=True, checkpoint="RUN/best.pt", protocol="waterbirds",
                                 data_path=ROOT), "bgmask dfr")
    record = apply_dfr(settings, create_method("dfr", n_retrains=10, seed=0))

`apply_dfr` rebuilds the classifier from its checkpoint (as `bgmask.engine.evaluate` does), embeds the
protocol's val and test splits with the checkpoint's strategy and masks (the features entering the last
linear layer: `embed`), fits DFR on val and scores its predictions on test. The record has the keys of a
training run's final record (`test/acc`, `test/weighted_acc`, `test/mean_group_acc`,
`test/worst_group_acc`, `test/group_k_acc`), from DFR's predictions, plus `dfr/C`, `dfr/tuning`,
`method: "dfr"` and `base_checkpoint`.

This module builds on `bgmask.build` and `bgmask.checkpoint`, which import the method registry: it is
not imported by `bgmask.methods` itself (no import loop), only by those who apply DFR.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from bgmask import build
from bgmask.args import add
from bgmask.checkpoint import as_checkpoint, model_from_checkpoint, saved_config
from bgmask.distributed import DistInfo, resolve_device
from bgmask.errors import UserError
from bgmask.eval import weighted_accuracy
from bgmask.io import read_torch_file
from bgmask.methods.dfr import DFR
from bgmask.methods.features import embed


@dataclass
class BaseModel:
    """The trained classifier DFR starts from: the model (CPU, train mode), its data config (mean, std,
    geometry), the epoch it was saved at and the flags of the run that trained it."""

    path: Path
    model: torch.nn.Module
    data_config: dict
    epoch: int
    config: dict


def base_model(settings) -> BaseModel:
    """The checkpoint of `settings.checkpoint`, refused (one line, before any work) unless a bgmask
    checkpoint trained under --protocol waterbirds: DFR reads the val split's groups, and only that
    protocol's model classifies waterbird / landbird."""
    from bgmask.models.paper import is_paper_snapshot

    if settings.checkpoint is None:
        raise UserError("DFR needs --checkpoint (a best.pt / last.pt written by train.py under --protocol waterbirds)")
    path = Path(settings.checkpoint)
    raw = read_torch_file(path, "checkpoint", settings.trust_checkpoint)
    config = {} if is_paper_snapshot(raw) else saved_config(as_checkpoint(raw, path), path)
    protocol = config.get("protocol", "cub")
    if protocol != "waterbirds":
        raise UserError(f"DFR needs the Waterbirds protocol's val split with groups (waterbird/landbird x water/"
                        f"land) and a model of that task: checkpoint {path} was trained under --protocol {protocol}; "
                        "train the base model with --protocol waterbirds")
    return BaseModel(path, model_from_checkpoint(raw, path), dict(raw["data_config"]), int(raw["epoch"]), config)


def apply_dfr(settings, method: DFR, dist: DistInfo | None = None, base: BaseModel | None = None) -> dict:
    """DFR fitted on the val split's embeddings of the checkpoint's model and evaluated on the test
    split (see the module docstring). `settings`: resolved evaluation settings (eval_only, checkpoint,
    protocol waterbirds, data_path; masks from --mask_source or an online segmenter); `dist`: one process
    on settings.device when None; `base`: the loaded checkpoint (`base_model`), loaded here when None."""
    if not getattr(method, "post_hoc", False) or not hasattr(method, "fit"):
        raise UserError(f"apply_dfr needs the post-hoc DFR method, got {type(method).__name__}")
    base = base or base_model(settings)
    dist = dist or DistInfo(device=resolve_device(settings.device))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = base.model.to(dist.device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    mask_fn = build.online_segmenter(settings, dist, base.data_config)
    datasets = build.build_datasets(settings, base.data_config, train=False, with_masks=mask_fn is None)
    strategy = build.strategy_of(settings, base.data_config)
    kw = dict(batch_size=settings.eval_batch_size or 2 * settings.batch_size, num_workers=settings.num_workers,
              mask_fn=mask_fn, amp=settings.use_amp, amp_dtype=settings.amp_dtype,
              channels_last=settings.channels_last, progress=not settings.no_progress)
    val_x, val_y, val_g = embed(model, datasets["val"], strategy, dist, desc="embed val", **kw)  # (N, D), (N,), (N,)
    test_x, test_y, test_g = embed(model, datasets["test"], strategy, dist, desc="embed test", **kw)
    fitted = method.fit(val_x, val_y, val_g)
    metrics = method.evaluate(fitted, test_x, test_y, test_g, prefix="test")
    metrics.update(weighted_accuracy(metrics, "test", build.train_group_counts(settings)))
    return {"epoch": base.epoch, "split": "final", "method": DFR.name,
            "base_checkpoint": str(base.path), "num_classes": int(len(fitted.classes)), **metrics,
            "dfr/C": fitted.C, "dfr/tuning": fitted.tuning, "dfr/embedding_dim": int(val_x.shape[1]),
            "dfr/val_samples": int(len(val_y))}


def dfr_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add(parser, "--checkpoint", required=True,
          help="best.pt / last.pt of a run trained with --protocol waterbirds (any --method, any strategy)")
    add(parser, "--data_path", required=True,
          help="the CUB root holding the Waterbirds folder with its splits 0/1/2 (waterbird_complete95_forest2water2)")
    add(parser, "--out", default=None, output="folder", help="run folder (default: the checkpoint's folder/dfr)")
    g = parser.add_argument_group("DFR (bgmask.methods.dfr)")
    for flag in DFR.flags:
        add(g, f"--{flag.dest}", **flag.kwargs())
    e = parser.add_argument_group("embedding the val and test splits")
    add(e, "--mask_source", default="gt",
          help="masks of an early / late checkpoint: 'gt' (ROOT/segmentations) or a predicted-mask folder")
    add(e, "--eval_batch_size", type=int, default=None, range="[1, inf)", help="default: 2 x the run's batch size")
    add(e, "--num_workers", type=int, default=2, range="[0, inf)")
    add(e, "--device", default="auto", choices=["auto", "cpu", "cuda"])
    add(e, "--threads", type=int, default=None, range="[1, inf)", help="torch CPU threads")
    add(e, "--no_progress", action="store_true", help="no tqdm bars")
    add(e, "--trust_checkpoint", action="store_true",
          help="allow a checkpoint that needs arbitrary unpickling (only for files you trust)")
    return parser
