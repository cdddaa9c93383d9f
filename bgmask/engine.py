"""One train / evaluate loop for every strategy (baseline, early, late), one process or `torchrun`.

    fit(cfg)       set up, build, resume, train epoch by epoch, final evaluation
    evaluate(cfg)  a saved checkpoint on val, test, Waterbirds and the diagnostics (--eval_only)
    run(cfg)       either of them, with the flags validated and the process group set up

Determinism: every epoch starts by re-seeding python, numpy and torch from (seed, epoch, rank), and
the training order comes from a DistributedSampler seeded with (seed, epoch). So an epoch's data
order, augmentations and dropout depend only on the seed and the epoch number, and a run resumed
from the checkpoint of epoch k continues exactly as if it had never stopped (same world size). With
another world size the rule is: each epoch's global permutation is the same, ranks take strided
shares of it, so the order per rank (and the result) differs. Checkpoints and resuming: `bgmask.checkpoint`.
"""

from __future__ import annotations

import math
import time
from argparse import Namespace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from bgmask import build
from bgmask.attribution import evaluation_attribution, gt_mask_splits
from bgmask.checkpoint import Progress, load_checkpoint, resume, save_epoch, saved_classifier, training_state
from bgmask.data import CUBDataset
from bgmask.distributed import DistInfo, all_reduce_sum, allow_tf32, barrier, cleanup, init_distributed
from bgmask.errors import UserError
from bgmask.eval import (DIAGNOSTICS, BackgroundDiagnostic, autocast_context, diagnostic_metrics, predict,
                         prepare_batch, split_metrics, to_memory_format, weighted_accuracy)
from bgmask.optim import accumulation_groups, mix_batch, optimizer_step, sync_context
from bgmask.processes import epoch_seed, loader_iter, seed_everything, worker_init
from bgmask.runfolder import EVAL_SPLIT, RunFolder, checkpoint_of, folder_lock
from bgmask.settings import resolve


# ------------------------------------------------------------------------------------- the loop

def train_step(model, batch, strategy, dist: DistInfo, cfg: Namespace, mixup=None, mask_fn=None):
    """The logits of one batch and its targets: the batch prepared as evaluation prepares it
    (`bgmask.eval.prepare_batch`: masks, the strategy's preprocess), then mixup, then the memory format,
    then the autocast forward."""
    images, masks = prepare_batch(batch, strategy, dist.device, mask_fn)
    targets = labels = batch["label"].to(dist.device, non_blocking=True)
    if mixup is not None:
        images, masks, targets = mix_batch(mixup, images, masks, labels)
    images = to_memory_format(images, cfg.channels_last)
    with autocast_context(dist.device, cfg.use_amp, cfg.amp_dtype):
        logits = strategy.forward(model, images, masks)
    return logits, targets


def train_one_epoch(model, loader, strategy, optimizer, method, dist: DistInfo, cfg: Namespace, epoch: int,
                    mixup=None, scaler=None, mask_fn=None) -> dict:
    """One epoch of micro-batches; the optimiser steps once per `--grad_accum_steps` of them, on the
    mean loss of the group (each micro-batch's loss divided by the group's size), which is the update of
    one batch that many times larger. The loss is the method's (`bgmask.methods`: ERM, GroupDRO ...)."""
    model.train()
    # The loss sum stays on the device and is checked every `check_every` steps: a per-step `.item()`
    # would make the host wait for the GPU at every step.
    total_loss, seen, steps = torch.zeros((), dtype=torch.float64, device=dist.device), 0, 0
    check_every = 1 if dist.device.type == "cpu" else 25
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    t0 = time.perf_counter()
    n_steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    group_of = [size for size in accumulation_groups(n_steps, cfg.grad_accum_steps) for _ in range(size)]
    bar = tqdm(loader_iter(loader), total=n_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not dist.is_main or cfg.no_progress)
    optimizer.zero_grad(set_to_none=True)
    in_group = 0
    for batch in bar:
        if steps >= n_steps:
            break
        group, in_group = group_of[steps], in_group + 1
        with sync_context(model, in_group == group):
            logits, targets = train_step(model, batch, strategy, dist, cfg, mixup, mask_fn)
            groups = batch["group"].to(dist.device, non_blocking=True) if method.needs_groups else None
            loss = method.loss(logits.float(), targets, groups)
            if steps % check_every == 0 and not torch.isfinite(loss):  # the epoch's sum, checked below, covers the rest
                raise UserError(f"loss is {loss.item()} at epoch {epoch + 1}, step {steps}: lower --lr or use "
                                "--grad_norm_clip")
            scaled = loss / group if group > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if in_group == group:
            optimizer_step(optimizer, scaler, cfg.grad_norm_clip)
            in_group = 0
        total_loss += loss.detach().double() * len(targets)
        seen += len(targets)
        steps += 1
        if dist.is_main and not cfg.no_progress and steps % cfg.log_interval == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    total_loss = float(total_loss)  # waits for the device: the epoch's time includes all of its work
    seconds = time.perf_counter() - t0
    if not math.isfinite(total_loss):
        raise UserError(f"the training loss of epoch {epoch + 1} is {total_loss}: lower --lr or use --grad_norm_clip")
    stats = all_reduce_sum(torch.tensor([total_loss, seen], dtype=torch.float64, device=dist.device)).cpu()
    out = {"train/loss": float(stats[0] / max(stats[1], 1)), "train/images": int(stats[1]),
           "train/seconds": seconds, "train/images_per_s": float(stats[1]) / max(seconds, 1e-9),
           "train/lr": optimizer.param_groups[0]["lr"]}
    if dist.device.type == "cuda":
        out["train/peak_mem_mib"] = torch.cuda.max_memory_allocated(dist.device) / 2**20
    return out


def evaluate_splits(model, datasets: dict, strategy, dist: DistInfo, cfg: Namespace, splits, mask_fn=None,
                    diagnostics: CUBDataset | None = None, data_config: dict | None = None) -> dict:
    """Metrics for the named splits (+ Waterbirds drop and diagnostics when asked for)."""
    kw = dict(batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, num_workers=cfg.num_workers, mask_fn=mask_fn,
              amp=cfg.use_amp, amp_dtype=cfg.amp_dtype, channels_last=cfg.channels_last,
              progress=not cfg.no_progress)
    metrics = {}
    for split in splits:
        if split in datasets:
            pred = predict(model, datasets[split], strategy, dist, desc=split, **kw)
            metrics.update(split_metrics(pred, split))
    if "test/acc" in metrics and "waterbirds/acc" in metrics:
        metrics["waterbirds/drop"] = metrics["test/acc"] - metrics["waterbirds/acc"]
    if diagnostics is not None:
        kw["mask_fn"] = None  # diagnostics use the true bird mask
        preds = {v: predict(model, BackgroundDiagnostic(diagnostics, v, data_config["mean"], data_config["std"],
                                                        seed=cfg.seed), strategy, dist, desc=v, **kw)
                 for v in DIAGNOSTICS}
        metrics.update(diagnostic_metrics(preds))
    return metrics


def final_splits(model, datasets: dict, strategy, dist, cfg, mask_fn, data_config, splits) -> dict:
    """The splits of a final report plus the Waterbirds drop (or, under --protocol waterbirds, the test
    accuracy weighted by the train split's groups) and the background diagnostics."""
    metrics = evaluate_splits(model, datasets, strategy, dist, cfg, splits, mask_fn,
                              build.diagnostics_base(cfg, data_config), data_config)
    return {**metrics, **weighted_accuracy(metrics, "test", build.train_group_counts(cfg))}


# ------------------------------------------------------------------------------------------- fit

def open_run_folder(cfg: Namespace, dist: DistInfo) -> tuple[RunFolder, bool]:
    """The run folder, and whether the run resumes from its last.pt. A folder whose run stopped before
    its first checkpoint (results lines, no last.pt) starts over from epoch 0, with or without
    --resume_training; a folder with checkpoints needs --resume_training."""
    folder = RunFolder(cfg.snapshot_dir, dist.is_main)
    restart = folder.no_epoch_finished()  # every rank decides before rank 0 changes anything
    if dist.is_main and restart:
        print(f"note: no epoch of the run in {cfg.snapshot_dir} finished (no checkpoint)"
              f"{'; nothing to resume' if cfg.resume_training else ''}: it starts over from epoch 0", flush=True)
        folder.start_over()
    elif not cfg.resume_training and dist.is_main and folder.holds_run():
        raise UserError(f"--snapshot_dir {cfg.snapshot_dir} already holds a run; pass --resume_training to continue "
                        "it or choose another folder")
    folder.remove_stale_temp()
    barrier()
    return folder, cfg.resume_training and not restart


def epoch_loader(dataset, sampler, cfg: Namespace, dist: DistInfo, epoch: int) -> DataLoader:
    """The training batches of one epoch, seeded from (seed, epoch, rank)."""
    seed_everything(epoch_seed(cfg.seed, epoch, dist.rank))
    sampler.set_epoch(epoch)
    g = torch.Generator()
    g.manual_seed(epoch_seed(cfg.seed, epoch, dist.rank))
    drop_last = len(sampler) >= cfg.batch_size  # as timm: no ragged last batch (mixup needs even sizes)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                      drop_last=drop_last, worker_init_fn=worker_init, generator=g,
                      pin_memory=dist.device.type == "cuda", persistent_workers=False)


def end_epoch(parts: build.Parts, progress: Progress, stats: dict, folder: RunFolder, cfg: Namespace,
              dist: DistInfo) -> None:
    """Evaluate after an epoch (not with --eval_mode none), log it, write the checkpoints."""
    eval_split = {"train": "train_eval", "val": "val", "none": None}.get(cfg.eval_mode, "test")
    eval_split = eval_split if eval_split in parts.datasets or eval_split is None else "test"  # no val split
    metrics = evaluate_splits(parts.model, parts.datasets, parts.strategy, dist, cfg, [eval_split],
                              parts.mask_fn) if eval_split else {}
    epoch = progress.epoch + 1
    improved = progress.update(epoch, metrics.get(build.selection_metric(cfg)) if eval_split == "val" else None)
    if dist.is_main:
        folder.log({"epoch": epoch, "split": eval_split or "train", **stats, **parts.method.summary(), **metrics},
                   step=epoch)
        acc = f" {eval_split}/acc {metrics[f'{eval_split}/acc']:.4f}" if eval_split else ""
        print(f"epoch {epoch}/{cfg.epochs} loss {stats['train/loss']:.4f}{acc} "
              f"({stats['train/images_per_s']:.0f} img/s)", flush=True)
        state = training_state(parts, progress, cfg, {**parts.meta, "world_size": dist.world_size})
        save_epoch(Path(cfg.snapshot_dir), state, improved, cfg.save_every_n_epochs)
    barrier()


def attribution_sets(cfg: Namespace, datasets: dict, dist: DistInfo) -> dict:
    """The GT-mask twins of the final splits for the attribution fraction (see bgmask.attribution)."""
    return gt_mask_splits(cfg, {s: datasets[s] for s in ("test", "waterbirds") if s in datasets}, dist.is_main)


def final_report(parts: build.Parts, progress: Progress, folder: RunFolder, cfg: Namespace,
                 dist: DistInfo, gt_sets: dict) -> dict:
    """Test, Waterbirds, diagnostics and attribution of the best-on-val model when there is a val split,
    else the last."""
    final_from, best = "last", Path(cfg.snapshot_dir) / "best.pt"
    if progress.best is not None and best.is_file():
        barrier()
        parts.model.load_state_dict(load_checkpoint(best)["model"])
        final_from = "best"
    final = final_splits(parts.model, parts.datasets, parts.strategy, dist, cfg, parts.mask_fn, parts.data_config,
                         ["test", "waterbirds"])
    final.update(evaluation_attribution(parts.model, parts.strategy, parts.datasets, gt_sets, cfg, dist,
                                        parts.mask_fn))
    record = {"epoch": cfg.epochs, "split": "final", "checkpoint": final_from,
              "num_classes": parts.meta["num_classes"], **final}
    folder.finish(record, step=cfg.epochs)
    return record


def fit(cfg: Namespace, dist: DistInfo, mask_fn=None) -> dict:
    """Train as configured; returns the final metrics."""
    folder, resuming = open_run_folder(cfg, dist)
    seed_everything(cfg.seed)
    parts = build.build_parts(cfg, dist, mask_fn)
    gt_sets = attribution_sets(cfg, parts.datasets, dist)  # an explicit N without GT masks stops here
    progress = resume(parts, cfg, dist.world_size, dist.is_main) if resuming else Progress()
    if resuming:
        folder.prepare_resume(progress.epoch)
    folder.write_config(cfg)
    model = build.training_model(parts.model, cfg, dist)
    sampler = build.train_sampler(parts, cfg, dist)
    folder.start_wandb(cfg)
    for epoch in range(progress.epoch, cfg.epochs):
        loader = epoch_loader(parts.datasets["train"], sampler, cfg, dist, epoch)
        stats = train_one_epoch(model, loader, parts.strategy, parts.optimizer, parts.method, dist, cfg, epoch,
                                parts.mixup, parts.scaler, parts.mask_fn)
        parts.scheduler.step(epoch + 1)
        end_epoch(parts, progress, stats, folder, cfg, dist)
    return final_report(parts, progress, folder, cfg, dist, gt_sets)


# -------------------------------------------------------------------------------------- evaluate

def evaluate(cfg: Namespace, dist: DistInfo, mask_fn=None) -> dict:
    """A saved classifier (bgmask's, or the paper's snapshot_best.pt: `checkpoint.saved_classifier`) on val (if
    any), test, Waterbirds, the diagnostics and where it looks (`bgmask.attribution`); the data may be pointed
    elsewhere. The record is appended to the results.jsonl beside the checkpoint, tagged `split: "eval"`."""
    ckpt = cfg.checkpoint if cfg.checkpoint is not None else checkpoint_of(cfg)  # as given: the record keeps it
    model, data_cfg, epoch = saved_classifier(Path(ckpt), cfg, build.classes_of(cfg)[0])
    seed_everything(cfg.seed)
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    mask_fn = mask_fn or build.online_segmenter(cfg, dist, data_cfg)
    datasets = build.build_datasets(cfg, data_cfg, train=False, with_masks=mask_fn is None)
    strategy = build.strategy_of(cfg, data_cfg)
    gt_sets = gt_mask_splits(cfg, datasets, dist.is_main)  # before predicting: no GT masks stops at once
    metrics = final_splits(model, datasets, strategy, dist, cfg, mask_fn, data_cfg, ["val", "test", "waterbirds"])
    metrics.update(evaluation_attribution(model, strategy, datasets, gt_sets, cfg, dist, mask_fn))
    record = {"epoch": epoch, "split": EVAL_SPLIT, "checkpoint": str(ckpt), **metrics}
    log_evaluation(record, Path(ckpt).parent, dist)
    return record


def log_evaluation(record: dict, run_dir: Path, dist: DistInfo) -> None:
    """Append an evaluation to the results.jsonl of the run that wrote the checkpoint; a folder that
    cannot be written (e.g. shared read-only weights) only costs that line, with a note."""
    try:
        RunFolder(run_dir, dist.is_main, flag="the checkpoint's folder").log(record)
    except UserError as e:
        print(f"note: the evaluation is not logged in {run_dir / 'results.jsonl'} ({e})", flush=True)


def run(cfg, mask_fn=None) -> dict:
    """Train (or with --eval_only evaluate) as configured (a parsed Namespace is resolved first:
    `bgmask.settings.resolve`); returns the final metrics."""
    cfg = resolve(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed(cfg.device)
    allow_tf32(dist, not cfg.no_tf32)
    try:
        with folder_lock(cfg, dist.is_main):
            return evaluate(cfg, dist, mask_fn) if cfg.eval_only else fit(cfg, dist, mask_fn)
    finally:
        cleanup()
