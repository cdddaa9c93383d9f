"""Optimisation: the optimiser (backbone and head learning rates, timm's weight-decay rule), the
epoch-wise learning-rate schedules of the paper, the optimiser step with gradient accumulation, the loss,
and mixup / cutmix with the masks mixed like the images."""

from __future__ import annotations

import fnmatch
import math
from argparse import Namespace
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from bgmask.errors import UserError


def param_groups(model, lr: float, scratch_lr_factor: float, weight_decay: float) -> list[dict]:
    """Up to four groups, in this order: backbone with / without decay, head with / without decay.

    Learning rates: the backbone (`model.backbone_parameters()`) trains at `lr`, the head
    (`model.head_parameters()`) at `lr * scratch_lr_factor`. Weight decay follows timm's rule
    (`timm.optim.param_groups_weight_decay`): none on 1-d parameters (norm weights, biases), on names
    ending in `.bias`, and on the names (fnmatch patterns) the model lists in `no_weight_decay()`
    (a timm ViT: pos_embed, cls_token, reg_token, dist_token); everything else decays. The paper
    decays every parameter alike; there is no flag for this rule."""
    skip = set(getattr(model, "no_weight_decay", set)())
    head_ids = {id(p) for p in model.head_parameters()}
    trainable = head_ids | {id(p) for p in model.backbone_parameters()}
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            continue
        decays = not (p.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, s) for s in skip))
        buckets.setdefault((id(p) in head_ids, decays), []).append(p)
    return [{"params": buckets[head, decays], "lr": lr * scratch_lr_factor if head else lr,
             "weight_decay": weight_decay if decays else 0.0}
            for head in (False, True) for decays in (True, False) if (head, decays) in buckets]


OPTIMIZERS = ("adamw", "adam", "sgd")  # --optimizer_type: the optimisers build_optimizer makes


def build_optimizer(model, cfg: Namespace) -> torch.optim.Optimizer:
    """The paper's optimisers over `param_groups` (backbone lr, head lr x scratch_lr_factor, timm's
    no-decay rule)."""
    groups = param_groups(model, cfg.lr, cfg.scratch_lr_factor, cfg.weight_decay)
    if not groups:
        raise UserError("no trainable parameters")
    # On CUDA, Adam(W) runs as one fused kernel over all parameters instead of several per tensor; the
    # update is the same (to float rounding), and checkpoints load across both.
    fused = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) else {}
    if cfg.optimizer_type == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas1, cfg.betas2), **fused)
    if cfg.optimizer_type == "adam":
        # Adam's L2 weight decay differs from AdamW's decoupled decay: kept as the paper's option.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.betas1, cfg.betas2), **fused)
    if cfg.optimizer_type == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise UserError(f"unknown --optimizer_type {cfg.optimizer_type!r}")


# ------------------------------------------------------------------------ steps and accumulation

def optimizer_step(optimizer, scaler, grad_norm_clip) -> None:
    """One update from the gradients accumulated so far (unscaled first, so clipping sees true norms),
    then the gradients are cleared for the next accumulation group."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_norm_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_norm_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync_context(model, sync: bool):
    """DDP's `no_sync` on the micro-batches of an accumulation group that do not end it: their gradients
    add up locally and are all-reduced once, with the group's last backward."""
    no_sync = getattr(model, "no_sync", None)
    return nullcontext() if sync or no_sync is None else no_sync()


def accumulation_groups(n_steps: int, accum: int) -> list[int]:
    """The size of each accumulation group of an epoch of `n_steps` micro-batches: `accum` each, the
    last one shorter when `accum` does not divide `n_steps` (as timm's last_accum_steps)."""
    return [min(accum, n_steps - start) for start in range(0, n_steps, accum)]


# ------------------------------------------------------------------------ learning-rate schedules

@dataclass(frozen=True)
class LRSchedule:
    """The paper's per-epoch schedules (its `engine/utils.py::build_scheduler`) in closed form:
    `lr_at(base, e)` is the learning rate during epoch e (0-based) of a param group whose base lr is
    `base`, i.e. what the paper's torch scheduler holds after e calls of `step()`. T = --epochs,
    W = --scheduler_warmup_epochs; --min_lr is absolute, the same for every group.

      cosine                 CosineAnnealingLR(T_max=T, eta_min=min_lr):
                               min_lr + (base - min_lr)(1 + cos(pi e / T)) / 2
      cosine_with_warmup     LinearWarmupCosineAnnealingLR(W, T, warmup_start_lr=0, eta_min=min_lr):
                               e < W:   base e / (W - 1)   (epoch 0 trains at lr 0, as in the paper)
                               e >= W:  min_lr + (base - min_lr)(1 + cos(pi (e - W) / (T - W))) / 2
                             W = 1: epoch 0 at lr 0, then the cosine from base (what the paper's stepped
                             scheduler does; its closed form would divide 0 by 0). W >= T is allowed: the
                             run is the warm-up part only.
      cosine_warmup_restart  CosineAnnealingWarmRestarts(T_0=W, T_mult=r, eta_min=min_lr), r =
                             --scheduler_restart_factor: the cosine over the current cycle, cycles of
                             W, W r, W r^2, ... epochs (SGDR: no warm-up despite the name)
      steplr                 StepLR(step_size, gamma) (--scheduler_step_size, --scheduler_gamma):
                               base gamma^floor(e / step_size)
      linearlr               LinearLR(start, end, total_iters=T) (--scheduler_start/end_factor):
                               base (start + (end - start) min(e, T) / T)
      none                   base
    """

    # the fields are the flags (`--scheduler_type` ...), defaults the paper's
    scheduler_type: str
    epochs: int
    scheduler_warmup_epochs: int = 10
    min_lr: float = 1e-6
    scheduler_restart_factor: int = 2
    scheduler_step_size: int = 10
    scheduler_gamma: float = 0.1
    scheduler_start_factor: float = 0.333
    scheduler_end_factor: float = 1.0

    @classmethod
    def from_config(cls, cfg: Namespace) -> LRSchedule:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def __post_init__(self):
        """Values that make no schedule (torch's schedulers refuse them or divide by zero), as one line."""
        kind, bad = self.scheduler_type, None
        factors_ok = 0 < self.scheduler_start_factor <= 1 and 0 <= self.scheduler_end_factor <= 1
        if kind not in SCHEDULES:
            bad = f"unknown --scheduler_type {kind!r}; expected one of {', '.join(SCHEDULES)}"
        elif self.epochs < 1:
            bad = f"--epochs must be >= 1, got {self.epochs}"
        elif kind in ("cosine_with_warmup", "cosine_warmup_restart") and self.scheduler_warmup_epochs < 1:
            bad = (f"--scheduler_type {kind} needs --scheduler_warmup_epochs >= 1, "
                   f"got {self.scheduler_warmup_epochs}")
        elif kind == "cosine_warmup_restart" and self.scheduler_restart_factor < 1:
            bad = f"--scheduler_restart_factor must be >= 1, got {self.scheduler_restart_factor}"
        elif kind.startswith("cosine") and self.min_lr < 0:
            bad = f"--min_lr must be >= 0, got {self.min_lr}"
        elif kind == "steplr" and self.scheduler_step_size < 1:
            bad = f"--scheduler_step_size must be >= 1, got {self.scheduler_step_size}"
        elif kind == "linearlr" and not factors_ok:
            bad = (f"--scheduler_type linearlr needs 0 < --scheduler_start_factor <= 1 and 0 <= "
                   f"--scheduler_end_factor <= 1, got {self.scheduler_start_factor} and {self.scheduler_end_factor}")
        if bad:
            raise UserError(bad)

    def lr_at(self, base: float, epoch: int) -> float:
        return SCHEDULES[self.scheduler_type](self, base, epoch)


def _cosine(s: LRSchedule, base: float, t: int, span: int) -> float:
    """From base (t = 0) down to min_lr (t = span) along half a cosine."""
    return s.min_lr + (base - s.min_lr) * (1 + math.cos(math.pi * t / max(span, 1))) / 2


def _warmup_cosine(s: LRSchedule, base: float, e: int) -> float:
    w = s.scheduler_warmup_epochs
    if e < w:
        return base * e / (w - 1) if w > 1 else 0.0
    return _cosine(s, base, e - w, s.epochs - w)


def _restarts(s: LRSchedule, base: float, e: int) -> float:
    t, cycle = e, s.scheduler_warmup_epochs
    while t >= cycle:
        t, cycle = t - cycle, cycle * s.scheduler_restart_factor
    return _cosine(s, base, t, cycle)


def _linear(s: LRSchedule, base: float, e: int) -> float:
    start, end = s.scheduler_start_factor, s.scheduler_end_factor
    return base * (start + (end - start) * min(e, s.epochs) / s.epochs)


# --scheduler_type (its choices are these keys) -> lr_at(schedule, base, epoch)
SCHEDULES = {
    "cosine": lambda s, base, e: _cosine(s, base, e, s.epochs),
    "cosine_with_warmup": _warmup_cosine,
    "cosine_warmup_restart": _restarts,
    "linearlr": _linear,
    "steplr": lambda s, base, e: base * s.scheduler_gamma ** (e // s.scheduler_step_size),
    "none": lambda s, base, e: base,
}


class EpochScheduler:
    """Sets every param group's lr to `LRSchedule.lr_at(its base lr, epoch)`: at construction for
    epoch 0, then `step(next_epoch)` once per epoch. The state is (epoch, base lrs), so a resumed run
    continues the same curve exactly."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Namespace):
        self.schedule = LRSchedule.from_config(cfg)
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.epoch = 0
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.schedule.lr_at(base, self.epoch)

    def step(self, next_epoch: int) -> None:
        self.epoch = next_epoch
        self._apply()

    def state_dict(self) -> dict:
        return {"schedule": asdict(self.schedule), "epoch": self.epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved curve (the saved base lrs, as the optimiser's state does); the schedule
        flags may differ from the saved ones only where the curve does not use them."""
        if set(state) != {"schedule", "epoch", "base_lrs"} or len(state["base_lrs"]) != len(self.base_lrs):
            raise UserError("the checkpoint's learning-rate schedule state is from another bgmask version or "
                            "model; start the run again without --resume_training")
        saved, now = state["schedule"], asdict(self.schedule)
        epochs = range(max(saved["epochs"], self.schedule.epochs) + 1)
        if [LRSchedule(**saved).lr_at(1.0, e) for e in epochs] != [self.schedule.lr_at(1.0, e) for e in epochs]:
            diff = ", ".join(f"--{k} {saved[k]!r} (now {now[k]!r})" for k in now if saved[k] != now[k])
            raise UserError(f"--resume_training: the checkpoint's learning-rate schedule differs: {diff}")
        self.epoch, self.base_lrs = state["epoch"], list(state["base_lrs"])
        self._apply()


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
                 cutmix_minmax=tuple(cfg.cutmix_minmax) if cfg.cutmix_minmax else None,
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
