"""Optimisation: the optimiser (backbone and head learning rates), the epoch-wise learning-rate
schedule, the loss, and mixup / cutmix with the masks mixed like the images."""

from __future__ import annotations

from argparse import Namespace

import torch
import torch.nn as nn

from bgmask.errors import UserError


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
