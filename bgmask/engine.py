"""One train / evaluate loop for every strategy (baseline, early, late), one process or `torchrun`.

Determinism: every epoch starts by re-seeding python, numpy and torch from (seed, epoch, rank), and
the training order comes from a DistributedSampler seeded with (seed, epoch). So an epoch's data
order, augmentations and dropout depend only on the seed and the epoch number, and a run resumed
from the checkpoint of epoch k continues exactly as if it had never stopped (same world size). With
another world size the rule is: each epoch's global permutation is the same, ranks take strided
shares of it, so the order per rank (and the result) differs.

Crash safety: checkpoints are replaced by an atomic rename, so a kill at any point leaves the previous
last.pt whole. results.jsonl is appended before last.pt is written; on --resume_training the lines
after the checkpoint's epoch (and any final record) are dropped, since those epochs run again.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from bgmask.checkpoint import load_checkpoint, model_from_checkpoint, rng_state, save_checkpoint, set_rng_state
from bgmask.data import CUBDataset, MaskSource, build_transform
from bgmask.data.cub import WATERBIRDS_SUBDIR
from bgmask.distributed import DistInfo, barrier, cleanup, init_distributed, resolve_device
from bgmask.errors import UserError, require_dir
from bgmask.eval import (DIAGNOSTICS, BackgroundDiagnostic, autocast_context, diagnostic_metrics, loader_iter, predict,
                         split_metrics, unblock_sigint)
from bgmask.io import atomic_path, atomic_write_text, remove_stale_temp
from bgmask.masking.strategies import create_strategy


# ------------------------------------------------------------------------------------------- seeds

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**31


def _worker_init(worker_id: int) -> None:
    unblock_sigint()
    s = torch.initial_seed() % 2**32  # torch seeds each worker from the loader's base seed
    random.seed(s)
    np.random.seed(s)


# ------------------------------------------------------------------------------------- validation

def validate_config(cfg: Namespace, model_is_vit: bool | None = None) -> None:
    """Flag combinations that cannot work, caught before anything is built."""
    if not cfg.data_path:
        raise UserError("--data_path is required (a CUB_200_2011 root, e.g. from `bgmask make-synthetic`)")
    require_dir(cfg.data_path, "--data_path")  # before the run folder is made
    if cfg.mask_dir:
        if cfg.mask_source not in ("gt", cfg.mask_dir):
            raise UserError(f"--mask_dir {cfg.mask_dir} conflicts with --mask_source {cfg.mask_source}")
        cfg.mask_source = cfg.mask_dir
    online = (cfg.seg_model_config_path, cfg.seg_model_checkpoint_path)
    if any(online) and not cfg.seg_model_checkpoint_path:
        raise UserError("--seg_model_config_path needs --seg_model_checkpoint_path")
    if any(online) and not create_strategy(cfg.strategy).needs_mask:
        raise UserError(f"an online segmenter is given but --strategy {cfg.strategy} uses no masks (use early or late)")
    if cfg.epochs < 1 and not cfg.eval_only:
        raise UserError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.resume_training and cfg.eval_only:
        raise UserError("--resume_training and --eval_only exclude each other")
    if cfg.use_amp and cfg.amp_dtype == "fp16" and resolve_device(cfg.device).type == "cpu":
        raise UserError("--amp_dtype fp16 needs CUDA; use the default bf16 on CPU")
    if cfg.freeze_backbone and cfg.drop_path > 0:
        raise UserError("--drop_path has no effect with --freeze_backbone (the backbone runs in eval mode)")
    if cfg.turn_on_mixup_or_cutmix and cfg.mixup <= 0 and cfg.cutmix <= 0:
        raise UserError("--turn_on_mixup_or_cutmix needs --mixup > 0 or --cutmix > 0")
    if cfg.scheduler_warmup_epochs >= cfg.epochs and cfg.scheduler_type != "none" and not cfg.eval_only:
        raise UserError(f"--scheduler_warmup_epochs ({cfg.scheduler_warmup_epochs}) must be < --epochs ({cfg.epochs})")
    if cfg.scheduler_type in ("cosine_with_warmup", "cosine_warmup_restart") and cfg.scheduler_warmup_epochs == 0:
        raise UserError(f"--scheduler_type {cfg.scheduler_type} needs --scheduler_warmup_epochs > 0")


def head_type(cfg: Namespace) -> str | None:
    if cfg.class_token_only:
        return "cls"
    if cfg.patch_tokens_only:
        return "gap"
    return None


# ------------------------------------------------------------------------------------------ data

def mask_source(cfg: Namespace) -> MaskSource:
    return MaskSource(cfg.mask_source, cfg.mask_threshold)


def build_datasets(cfg: Namespace, data_config: dict, train: bool = True, with_masks: bool = True) -> dict[str, CUBDataset]:
    """train (when `train`), val (when train_split < 1), test and waterbirds (when that folder exists).
    Masks are read from disk when the strategy needs them and no online segmenter supplies them."""
    root = require_dir(cfg.data_path, "--data_path")
    mean, std = data_config["mean"], data_config["std"]
    needs_mask = create_strategy(cfg.strategy).needs_mask and with_masks
    masks = mask_source(cfg) if needs_mask else None
    eval_tf = build_transform(False, cfg.image_size, mean=mean, std=std, crop_pct=cfg.crop_pct)
    common = dict(root=root, train_split=cfg.train_split, split_seed=cfg.split_seed)
    out = {}
    if train:
        train_tf = build_transform(True, cfg.image_size, cfg.augmentations_to_use, mean, std, cfg.crop_pct,
                                   cfg.color_jitter, cfg.reprob)
        out["train"] = CUBDataset(split="train", image_subdir=cfg.image_sub_path_train, masks=masks,
                                  transform=train_tf, **common)
    if cfg.train_split < 1.0:
        out["val"] = CUBDataset(split="val", image_subdir=cfg.image_sub_path_train, masks=masks,
                                transform=eval_tf, **common)
    out["test"] = CUBDataset(split="test", image_subdir=cfg.image_sub_path_train, masks=masks,
                             transform=eval_tf, **common)
    if (root / cfg.image_sub_path_test).is_dir():
        out["waterbirds"] = CUBDataset(split="test", image_subdir=cfg.image_sub_path_test, masks=masks,
                                       transform=eval_tf, **common)
    elif cfg.image_sub_path_test != WATERBIRDS_SUBDIR:
        raise UserError(f"--image_sub_path_test folder not found: {root / cfg.image_sub_path_test}")
    return out


def diagnostics_base(cfg: Namespace, data_config: dict) -> CUBDataset | None:
    """The in-distribution test split with GT masks (diagnostics need the true bird)."""
    root = Path(cfg.data_path)
    if not (root / "segmentations").is_dir():
        return None
    eval_tf = build_transform(False, cfg.image_size, mean=data_config["mean"], std=data_config["std"],
                              crop_pct=cfg.crop_pct)
    return CUBDataset(root, "test", image_subdir=cfg.image_sub_path_train, masks=MaskSource("gt", cfg.mask_threshold),
                      transform=eval_tf, train_split=cfg.train_split, split_seed=cfg.split_seed)


# ------------------------------------------------------------------------------- optimisation

def build_optimizer(model, cfg: Namespace) -> torch.optim.Optimizer:
    """Parameter groups: backbone at lr, head at lr x scratch_lr_factor; no weight decay on 1-d
    parameters (norms, biases) as in timm."""
    groups = []
    for params, lr in ((list(model.backbone_parameters()), cfg.lr),
                       (list(model.head_parameters()), cfg.lr * cfg.scratch_lr_factor)):
        decay = [p for p in params if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    if not groups:
        raise UserError("no trainable parameters")
    if cfg.optimizer_type == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas1, cfg.betas2))
    if cfg.optimizer_type == "adam":
        # Adam's L2 weight decay differs from AdamW's decoupled decay: kept as the paper's option.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.betas1, cfg.betas2))
    if cfg.optimizer_type == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise UserError(f"unknown --optimizer_type {cfg.optimizer_type!r}")


class EpochScheduler:
    """timm or torch scheduler behind one interface, stepped once per epoch (`step(next_epoch)`)."""

    def __init__(self, optimizer, cfg: Namespace):
        from timm.scheduler import CosineLRScheduler, StepLRScheduler

        self.kind = cfg.scheduler_type
        warm = dict(warmup_t=cfg.scheduler_warmup_epochs, warmup_lr_init=cfg.warmup_lr)
        if self.kind in ("cosine", "cosine_with_warmup"):
            self.impl = CosineLRScheduler(optimizer, t_initial=cfg.epochs - cfg.scheduler_warmup_epochs,
                                          lr_min=cfg.min_lr, warmup_prefix=True, **warm)
        elif self.kind == "cosine_warmup_restart":
            first = cfg.scheduler_restart_epochs or max(1, cfg.epochs // 3)
            self.impl = CosineLRScheduler(optimizer, t_initial=first, lr_min=cfg.min_lr,
                                          cycle_mul=cfg.scheduler_restart_factor, cycle_limit=10_000, **warm)
        elif self.kind == "steplr":
            self.impl = StepLRScheduler(optimizer, decay_t=cfg.scheduler_step_size, decay_rate=cfg.scheduler_gamma, **warm)
        elif self.kind == "linearlr":
            self.impl = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=cfg.linearlr_start_factor,
                                                          end_factor=1.0, total_iters=max(cfg.epochs - 1, 1))
        elif self.kind == "none":
            self.impl = None
        else:
            raise UserError(f"unknown --scheduler_type {self.kind!r}")

    def step(self, next_epoch: int) -> None:
        if self.impl is None:
            return
        if self.kind == "linearlr":
            self.impl.step()
        else:
            self.impl.step(next_epoch)

    def state_dict(self) -> dict:
        return self.impl.state_dict() if self.impl is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.impl is not None:
            self.impl.load_state_dict(state)


def build_loss(cfg: Namespace, mixup_on: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_on:
        return SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def build_mixup(cfg: Namespace, num_classes: int):
    if not cfg.turn_on_mixup_or_cutmix:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


def mix_batch(mixup, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor):
    """Mixup/cutmix with the masks mixed by the same permutation, lambda and boxes as the images:
    the mask rides along as a fourth channel through one call."""
    if masks is None:
        images, targets = mixup(images, labels)
        return images, None, targets
    both = torch.cat([images, masks.to(images.dtype)], dim=1)
    both, targets = mixup(both, labels)
    return both[:, :3], both[:, 3:], targets


# ------------------------------------------------------------------------------------- run folder

class RunFolder:
    """config.yaml, command.txt, git_revision.txt, results.jsonl; rank 0 writes, others do nothing."""

    def __init__(self, path: str | Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = self.path / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise UserError(f"cannot write to --snapshot_dir {self.path}: {e.strerror or e}") from None

    def write_config(self, cfg: Namespace) -> None:
        if not self.enabled:
            return
        import yaml

        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(vars(cfg), sort_keys=True))
        atomic_write_text(self.path / "command.txt", shlex.join([sys.executable, *sys.argv]) + "\n")
        atomic_write_text(self.path / "git_revision.txt", git_revision() + "\n")

    def log(self, record: dict) -> None:
        if self.enabled:
            path = self.path / "results.jsonl"
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, sort_keys=True) + "\n")
            except OSError as e:
                raise UserError(f"cannot append to {path}: {e.strerror or e}") from None

    def remove_stale_temp(self) -> None:
        """Temporary files of a process killed while writing (only when this run owns the folder)."""
        if self.enabled:
            remove_stale_temp(self.path)

    def prepare_resume(self, epoch: int) -> None:
        """Before a resumed run from the checkpoint of `epoch`: drop the results.jsonl lines that the
        run will write again (epochs after `epoch`, final records, a torn last line)."""
        if not self.enabled:
            return
        path = self.path / "results.jsonl"
        if not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if rec.get("split") == "final" or int(rec.get("epoch", 0)) > epoch:
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            atomic_write_text(path, "".join(kept))


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# ---------------------------------------------------------------------------------------- model

def build_model(cfg: Namespace, num_classes: int):
    from bgmask.models import create_classifier

    return create_classifier(
        cfg.model_arch, num_classes, head=head_type(cfg), pretrained=cfg.pretrained,
        pretrained_file=cfg.pretrained_file, drop_path=cfg.drop_path, image_size=cfg.image_size,
        freeze_backbone=cfg.freeze_backbone, late_mask_stage=getattr(cfg, "late_mask_stage", "last"),
        late_pool=getattr(cfg, "late_pool", "mean"), late_drop_cls=getattr(cfg, "late_drop_cls", False),
    )


def compile_model(model, backend: str):
    """`torch.compile`, with a clear line when the backend is unknown."""
    try:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
    except Exception:  # listing is best effort; torch.compile itself is the judge
        known = None
    if known is not None and backend not in known:
        raise UserError(f"unknown --torchcompile backend {backend!r} (expected one of {', '.join(sorted(known))})")
    return torch.compile(model, backend=backend)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# ------------------------------------------------------------------------------------- the loop

def train_one_epoch(model, loader, strategy, optimizer, loss_fn, dist: DistInfo, cfg: Namespace, epoch: int,
                    mixup=None, scaler=None, mask_fn=None) -> dict:
    model.train()
    # The loss sum stays on the device and is checked every `check_every` steps: a per-step `.item()`
    # would make the host wait for the GPU at every step.
    total_loss, seen, steps = torch.zeros((), dtype=torch.float64, device=dist.device), 0, 0
    check_every = 1 if dist.device.type == "cpu" else 25
    t0 = time.perf_counter()
    n_steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    bar = tqdm(loader_iter(loader), total=n_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not dist.is_main or cfg.no_progress)
    for batch in bar:
        if steps >= n_steps:
            break
        images = batch["image"].to(dist.device, non_blocking=True)
        labels = batch["label"].to(dist.device, non_blocking=True)
        masks = batch.get("mask")
        masks = masks.to(dist.device, non_blocking=True) if masks is not None else None
        if mask_fn is not None:
            masks = mask_fn(images)
        images = strategy.preprocess(images, masks)
        targets = labels
        if mixup is not None:
            images, masks, targets = mix_batch(mixup, images, masks, labels)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(dist.device, cfg.use_amp, cfg.amp_dtype):
            logits = strategy.forward(model, images, masks)
            loss = loss_fn(logits.float(), targets)
        if steps % check_every == 0:  # the epoch's sum, checked below, covers the steps in between
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at epoch {epoch + 1}, step {steps}: lower --lr or use "
                                   "--grad_norm_clip")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_norm_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_norm_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        total_loss += loss.detach().double() * len(labels)
        seen += len(labels)
        steps += 1
        if dist.is_main and not cfg.no_progress and steps % check_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    total_loss = float(total_loss)  # waits for the device: the epoch's time includes all of its work
    seconds = time.perf_counter() - t0
    if not math.isfinite(total_loss):
        raise UserError(f"the training loss of epoch {epoch + 1} is {total_loss}: lower --lr or use --grad_norm_clip")
    stats = torch.tensor([total_loss, seen], dtype=torch.float64)
    from bgmask.distributed import all_reduce_sum
    stats = all_reduce_sum(stats)
    return {"train/loss": float(stats[0] / max(stats[1], 1)), "train/images": int(stats[1]),
            "train/seconds": seconds, "train/images_per_s": float(stats[1]) / max(seconds, 1e-9),
            "train/lr": optimizer.param_groups[0]["lr"]}


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


def _set_threads(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def checkpoint_state(model, optimizer, scheduler, scaler, epoch: int, best: float | None, cfg: Namespace,
                     meta: dict, best_epoch: int | None = None) -> dict:
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch,
        "best_val_acc": best,
        "best_epoch": best_epoch,
        "config": {k: v for k, v in vars(cfg).items()},
        "rng": rng_state(),
        **meta,
    }


def complete_checkpoints(folder: Path, state: dict, cfg: Namespace) -> None:
    """After a kill between writing last.pt and best.pt / epoch_k.pt of the same epoch: write the missing
    ones from last.pt (they hold the same state)."""
    epoch, last, wanted = state["epoch"], folder / "last.pt", []
    if state.get("best_epoch") == epoch:
        best = folder / "best.pt"
        if not best.is_file() or load_checkpoint(best, trust=getattr(cfg, "trust_checkpoint", False))["epoch"] != epoch:
            wanted.append(best)
    if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and not (folder / f"epoch_{epoch}.pt").is_file():
        wanted.append(folder / f"epoch_{epoch}.pt")
    for dst in wanted:
        with atomic_path(dst) as tmp:
            shutil.copyfile(last, tmp)
        print(f"restored {dst} from {last} (the run was stopped while writing the checkpoints of epoch {epoch})",
              flush=True)


def online_segmenter(cfg: Namespace, dist: DistInfo, data_config: dict):
    """The mask function of --seg_model_config_path/--seg_model_checkpoint_path, or None."""
    if not cfg.seg_model_checkpoint_path:
        return None
    from bgmask.masking.segmenter import load_segmenter

    return load_segmenter(cfg.seg_model_config_path, cfg.seg_model_checkpoint_path, device=dist.device,
                          input_mean=tuple(data_config["mean"]), input_std=tuple(data_config["std"]),
                          trust_full_checkpoint=getattr(cfg, "trust_checkpoint", False))


def run(cfg: Namespace, mask_fn=None) -> dict:
    """Train (or with --eval_only evaluate) as configured; returns the final metrics."""
    validate_config(cfg)
    _set_threads(cfg)
    dist = init_distributed(cfg.device)
    try:
        return _run(cfg, dist, mask_fn)
    finally:
        cleanup()


def _run(cfg: Namespace, dist: DistInfo, mask_fn) -> dict:
    folder = RunFolder(cfg.snapshot_dir, dist.is_main)
    if cfg.eval_only:
        return evaluate_checkpoint(cfg, dist, mask_fn)
    last_path = Path(cfg.snapshot_dir) / "last.pt"
    if not cfg.resume_training and dist.is_main and (Path(cfg.snapshot_dir) / "results.jsonl").exists():
        raise UserError(f"--snapshot_dir {cfg.snapshot_dir} already holds a run; pass --resume_training to continue "
                        "it or choose another folder")
    folder.remove_stale_temp()
    barrier()
    seed_everything(cfg.seed)
    meta_probe = CUBDataset(cfg.data_path, "test", check_files=False)
    num_classes, class_names = meta_probe.num_classes, meta_probe.class_names
    model = build_model(cfg, num_classes)
    data_config = {"mean": list(model.data_config["mean"]), "std": list(model.data_config["std"]),
                   "image_size": cfg.image_size, "crop_pct": cfg.crop_pct}
    mask_fn = mask_fn or online_segmenter(cfg, dist, data_config)
    datasets = build_datasets(cfg, data_config, with_masks=mask_fn is None)
    strategy = create_strategy(cfg.strategy, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                               mask_fill=cfg.mask_fill)
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = EpochScheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if cfg.use_amp and cfg.amp_dtype == "fp16" else None
    start_epoch, best, best_epoch = 0, None, None
    if cfg.resume_training:
        if not last_path.is_file():
            raise UserError(f"--resume_training: no checkpoint at {last_path} (no epoch finished; start again "
                            "without --resume_training in an empty --snapshot_dir)")
        state = load_checkpoint(last_path, trust=getattr(cfg, "trust_checkpoint", False))
        _check_same_run(state["config"], cfg, last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch = state["epoch"], state["best_val_acc"], state.get("best_epoch")
        set_rng_state(state["rng"])
        folder.prepare_resume(start_epoch)
        if dist.is_main:
            complete_checkpoints(Path(cfg.snapshot_dir), state, cfg)
            print(f"resumed from {last_path} at epoch {start_epoch}", flush=True)
            saved_world = state.get("world_size", dist.world_size)
            if saved_world != dist.world_size:
                print(f"note: {last_path} was written by {saved_world} process(es), resuming with "
                      f"{dist.world_size}: each epoch's global data order is the same, but the ranks share "
                      "it differently and --batch_size is per process, so the result differs from an "
                      "uninterrupted run", flush=True)
    folder.write_config(cfg)
    train_model = model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.torchcompile:
        # Only the training model is compiled; checkpoints keep the plain module's keys (no `_orig_mod.`),
        # and evaluation runs the plain module (compiling no-grad eval would be a second graph).
        train_model = compile_model(train_model, cfg.torchcompile)
    loss_fn = build_loss(cfg, cfg.turn_on_mixup_or_cutmix)
    mixup = build_mixup(cfg, num_classes)
    sampler = DistributedSampler(datasets["train"], num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=cfg.seed)
    drop_last = len(sampler) >= cfg.batch_size  # as timm: no ragged last batch (mixup needs even sizes)
    if mixup is not None and cfg.batch_size % 2:
        raise UserError(f"mixup/cutmix needs an even --batch_size, got {cfg.batch_size}")
    wandb_run = _init_wandb(cfg, dist)
    meta = {"num_classes": num_classes, "class_names": class_names, "data_config": data_config,
            "world_size": dist.world_size}
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(epoch_seed(cfg.seed, epoch, dist.rank))
        sampler.set_epoch(epoch)
        g = torch.Generator()
        g.manual_seed(epoch_seed(cfg.seed, epoch, dist.rank))
        loader = DataLoader(datasets["train"], batch_size=cfg.batch_size, sampler=sampler,
                            num_workers=cfg.num_workers, drop_last=drop_last, worker_init_fn=_worker_init,
                            generator=g, pin_memory=dist.device.type == "cuda",
                            persistent_workers=False)
        stats = train_one_epoch(train_model, loader, strategy, optimizer, loss_fn, dist, cfg, epoch, mixup,
                                scaler, mask_fn)
        scheduler.step(epoch + 1)
        eval_split = "val" if cfg.eval_mode == "val" and "val" in datasets else "test"
        metrics = evaluate_splits(model, datasets, strategy, dist, cfg, [eval_split], mask_fn)
        record = {"epoch": epoch + 1, "split": eval_split, **stats, **metrics}
        improved = eval_split == "val" and (best is None or metrics["val/acc"] > best)
        if improved:
            best, best_epoch = metrics["val/acc"], epoch + 1
        if dist.is_main:
            folder.log(record)
            _wandb_log(wandb_run, record, epoch + 1)
            msg = f"epoch {epoch + 1}/{cfg.epochs} loss {stats['train/loss']:.4f} {eval_split}/acc {metrics[f'{eval_split}/acc']:.4f}"
            print(msg + f" ({stats['train/images_per_s']:.0f} img/s)", flush=True)
            state = checkpoint_state(model, optimizer, scheduler, scaler, epoch + 1, best, cfg, meta, best_epoch)
            # last.pt first: best.pt and epoch_k.pt are never from an epoch that last.pt does not hold (a
            # resume re-runs such an epoch, and under another world size the re-run may not beat the old
            # best). A kill before the other two is repaired on resume by complete_checkpoints.
            save_checkpoint(last_path, state)
            if improved:
                save_checkpoint(Path(cfg.snapshot_dir) / "best.pt", state)
            if cfg.save_every_n_epochs and (epoch + 1) % cfg.save_every_n_epochs == 0:
                save_checkpoint(Path(cfg.snapshot_dir) / f"epoch_{epoch + 1}.pt", state)
        barrier()
    # Final report: the best-on-val model when there is a val split, else the last one.
    final_from = "last"
    if best is not None and (Path(cfg.snapshot_dir) / "best.pt").is_file():
        barrier()
        model.load_state_dict(load_checkpoint(Path(cfg.snapshot_dir) / "best.pt")["model"])
        final_from = "best"
    final = evaluate_splits(model, datasets, strategy, dist, cfg, ["test", "waterbirds"], mask_fn,
                            diagnostics_base(cfg, data_config), data_config)
    record = {"epoch": cfg.epochs, "split": "final", "checkpoint": final_from, "num_classes": num_classes, **final}
    if dist.is_main:
        folder.log(record)
        atomic_write_text(Path(cfg.snapshot_dir) / "final_metrics.json", json.dumps(record, indent=2, sort_keys=True))
        atomic_write_text(Path(cfg.snapshot_dir) / "done", "")
        _wandb_log(wandb_run, record, cfg.epochs)
        if wandb_run is not None:
            wandb_run.finish()
    return record


_SAME_RUN_KEYS = ("model_arch", "strategy", "image_size", "data_path", "train_split", "split_seed", "seed",
                  "optimizer_type", "scheduler_type", "epochs", "batch_size", "lr")


def _check_same_run(saved: dict, cfg: Namespace, path: Path) -> None:
    diff = [k for k in _SAME_RUN_KEYS if k in saved and saved[k] != getattr(cfg, k, None)]
    if diff:
        k = diff[0]
        raise UserError(f"--resume_training: {path} was made with {k}={saved[k]!r}, not {getattr(cfg, k)!r} "
                        f"(differing: {', '.join(diff)})")


def evaluate_checkpoint(cfg: Namespace, dist: DistInfo, mask_fn=None) -> dict:
    """Evaluate a saved classifier on val (if any), test, Waterbirds and the diagnostics."""
    ckpt = cfg.checkpoint
    if ckpt is None:
        best = Path(cfg.snapshot_dir) / "best.pt"
        ckpt = best if best.is_file() else Path(cfg.snapshot_dir) / "last.pt"
    state = load_checkpoint(ckpt, trust=getattr(cfg, "trust_checkpoint", False))
    seed_everything(cfg.seed)
    # The architecture and strategy come from the checkpoint; the data may be pointed elsewhere.
    model = model_from_checkpoint(cfg, state, ckpt)
    model.to(dist.device)
    data_config = state["data_config"]
    mask_fn = mask_fn or online_segmenter(cfg, dist, data_config)
    datasets = build_datasets(cfg, data_config, train=False, with_masks=mask_fn is None)
    if datasets["test"].num_classes != state["num_classes"]:
        raise UserError(f"checkpoint {ckpt} has {state['num_classes']} classes but {cfg.data_path} has "
                        f"{datasets['test'].num_classes}")
    strategy = create_strategy(cfg.strategy, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                               mask_fill=cfg.mask_fill)
    metrics = evaluate_splits(model, datasets, strategy, dist, cfg, ["val", "test", "waterbirds"], mask_fn,
                              diagnostics_base(cfg, data_config), data_config)
    record = {"epoch": state["epoch"], "split": "eval_only", "checkpoint": str(ckpt), **metrics}
    return record


def _init_wandb(cfg: Namespace, dist: DistInfo):
    if not cfg.wandb or not dist.is_main:
        return None
    import wandb

    return wandb.init(project=cfg.wandb_project, group=cfg.group, job_type=cfg.job_type, config=vars(cfg),
                      dir=str(cfg.snapshot_dir))


def _wandb_log(run, record: dict, step: int) -> None:
    if run is not None:
        run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
