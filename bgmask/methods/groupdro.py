"""GroupDRO (Sagawa et al., 2020, "Distributionally Robust Neural Networks for Group Shifts") and the
group-balanced training sampler its reference trains with (`reweight_groups`).

The method keeps group weights q (n_groups numbers, uniform at the start, float64 so that the
recurrence does not drift over many steps) and updates them at every training step by exponentiated
gradient on the batch's per-group mean losses L_g, as the reference's `compute_robust_loss`:

    adjusted_g = L_g + adj / sqrt(n_g)          (n_g: training samples of group g; the term only if adj > 0)
    q_g       <- q_g * exp(eta * adjusted_g)     (adjusted detached: q is no parameter)
    q         <- q / sum(q)
    loss       = sum_g q_g L_g                   (with the updated q)

A group absent from the batch has L_g = 0 (the reference's guarded mean), so its weight changes only by
the renormalisation and, with adj > 0, by its adjustment term (which the reference adds as well). The
loss is the q-weighted sum of the unadjusted means: the reference adds the adjustment to the loss in place,
which shifts its value by a constant and leaves its gradient as here.

Distributed (DDP): every rank must hold the same q. The per-group loss sums and sample counts that feed
the q update are summed over ranks (`bgmask.distributed.all_reduce_sum`, detached), so the update sees
the global batch's per-group means, identical on every rank. The loss a rank backpropagates is its own
per-group means weighted by that shared q; DDP then averages the gradients over ranks. With one process
the reduction is the identity, so the result does not depend on it.
"""

from __future__ import annotations

import math
from argparse import Namespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from bgmask import distributed
from bgmask.errors import UserError
from bgmask.methods.base import Flag, Method, register_method

SAMPLINGS = ("balanced", "plain")


def check_groups(groups, n_groups: int, what: str = "the training split") -> np.ndarray:
    """The group ids as an int64 array; an unknown group (< 0) or one outside [0, n_groups) is one
    UserError (GroupDRO needs a group for every training sample)."""
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) == 0 or not np.issubdtype(g.dtype, np.integer):
        raise UserError(f"{what}: group ids must be a non-empty list of integers, got shape {g.shape}, {g.dtype}")
    bad = (g < 0) | (g >= n_groups)
    if bad.any():
        raise UserError(f"{what}: {int(bad.sum())} of {len(g)} samples have no group in [0, {n_groups}) "
                        f"(e.g. {int(g[bad][0])}); this method needs the group of every sample (Waterbirds)")
    return g.astype(np.int64)


def group_counts(groups, n_groups: int = 4, what: str = "the training split") -> list[int]:
    """Samples per group id 0 .. n_groups - 1 (GroupDRO's `group_counts`), after `check_groups`."""
    return np.bincount(check_groups(groups, n_groups, what), minlength=n_groups).tolist()


class GroupBalancedSampler(Sampler[int]):
    """Group-balanced sampling with replacement, distributed like DistributedSampler.

    Each epoch draws len(groups) indices with replacement, sample i with weight 1 / count(group of i)
    (so each group is drawn equally often in expectation: the reference's WeightedRandomSampler), from a
    torch generator seeded with seed + epoch: the same draw on every rank. The draw is padded by repeating
    its start to a multiple of num_replicas; rank r takes positions r, r + R, r + 2R, ... Call
    `set_epoch(epoch)` before each epoch."""

    def __init__(self, groups, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        g = np.asarray(groups)
        if g.ndim != 1 or len(g) == 0 or not np.issubdtype(g.dtype, np.integer) or (g < 0).any():
            raise UserError("group-balanced sampling needs a known group (an integer >= 0) for every training "
                            "sample; use --gdro_sampling plain or a dataset with groups (Waterbirds)")
        if not 0 <= rank < num_replicas:
            raise UserError(f"rank {rank} is not in [0, {num_replicas})")
        counts = np.bincount(g)
        self.weights = torch.as_tensor(1.0 / counts[g], dtype=torch.float64)  # (N,)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(g) / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> list[int]:
        """The whole epoch's padded draw, before it is shared out (identical on every rank)."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=gen).tolist()
        pad = self.total_size - len(drawn)
        return drawn + (drawn * math.ceil(pad / len(drawn)))[:pad]

    def __iter__(self):
        return iter(self.epoch_indices()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


@register_method("groupdro")
class GroupDRO(Method):
    """Online group DRO; see the module docstring for the update and its distributed form."""

    label = "GroupDRO"
    needs_groups = True
    flags = (
        Flag("gdro_eta", "eta", float, 0.01, "GroupDRO: step size of the exponentiated-gradient update of "
             "the group weights", range="(0, inf)"),
        Flag("gdro_adj", "adj", float, 0.0, "GroupDRO: generalisation adjustment C, added to each group's loss "
             "as C / sqrt(training samples of the group) in the weight update (0: none)", range="[0, inf)"),
        Flag("gdro_sampling", "sampling", str, "balanced", "GroupDRO: training order; balanced draws each "
             "group equally often (with replacement, as the reference), plain is the usual shuffle",
             choices=SAMPLINGS),
    )

    def __init__(self, n_groups: int = 4, eta: float = 0.01, adj: float = 0.0, group_counts=None,
                 smoothing: float = 0.0, sampling: str = "balanced"):
        if n_groups < 1 or not eta > 0 or not adj >= 0 or not 0 <= smoothing < 1:
            raise UserError(f"GroupDRO needs n_groups >= 1, eta > 0, adj >= 0 and 0 <= smoothing < 1; got "
                            f"n_groups={n_groups}, eta={eta}, adj={adj}, smoothing={smoothing}")
        if sampling not in SAMPLINGS:
            raise UserError(f"unknown --gdro_sampling {sampling!r} (expected one of {', '.join(SAMPLINGS)})")
        self.n_groups, self.eta, self.adj, self.smoothing, self.sampling = n_groups, eta, adj, smoothing, sampling
        self.counts = None if group_counts is None else torch.as_tensor(group_counts, dtype=torch.float64)
        if adj > 0 and (self.counts is None or self.counts.shape != (n_groups,) or (self.counts < 1).any()):
            raise UserError(f"--gdro_adj {adj} needs the training samples of each of the {n_groups} groups, at "
                            f"least one each; got {group_counts}")
        self.q = torch.full((n_groups,), 1.0 / n_groups, dtype=torch.float64)

    @classmethod
    def check(cls, cfg: Namespace) -> None:
        if getattr(cfg, "turn_on_mixup_or_cutmix", False):
            raise UserError("--method groupdro does not work with --turn_on_mixup_or_cutmix: its per-group losses "
                            "need hard labels, and a mixed image belongs to two groups")

    @classmethod
    def from_config(cls, cfg: Namespace, *, criterion=None, group_counts=None) -> GroupDRO:
        """GroupDRO from its flags, --smoothing (the per-sample loss honours label smoothing) and the
        training split's group counts (their number is n_groups; 4 without them)."""
        cls.check(cfg)
        n_groups = len(group_counts) if group_counts is not None else 4
        return cls(n_groups=n_groups, group_counts=group_counts, smoothing=getattr(cfg, "smoothing", 0.0),
                   **cls.flag_values(cfg))

    def group_means(self, logits, targets, groups):
        """Per-group mean losses (G,) with gradients, and the detached (2, G) float64 statistics [loss sums;
        sample counts] that the update all-reduces. A group absent from the batch has mean 0."""
        if groups is None:
            raise UserError("--method groupdro needs each sample's group, and the batch has none (use a dataset "
                            "with groups: Waterbirds)")
        if targets.ndim != 1 or targets.is_floating_point():
            raise UserError("--method groupdro needs hard class labels; mixup / cutmix (soft targets) is refused")
        per_sample = F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.smoothing)  # (B,)
        ids = torch.arange(self.n_groups, device=logits.device).unsqueeze(1)  # (G, 1)
        member = (groups.to(logits.device).view(1, -1) == ids).to(per_sample.dtype)  # (G, B)
        sums, counts = member @ per_sample, member.sum(1)  # (G,), (G,)
        stats = torch.stack([sums.detach(), counts]).double()  # (2, G)
        return sums / counts.clamp_min(1), stats

    def update(self, stats: torch.Tensor) -> None:
        """One exponentiated-gradient step of q from the (all-reduced) statistics [sums; counts] (2, G)."""
        self.q = self.q.to(stats.device)
        adjusted = stats[0] / stats[1].clamp_min(1)
        if self.adj > 0:
            adjusted = adjusted + self.adj / torch.sqrt(self.counts.to(stats.device))
        q = self.q * torch.exp(self.eta * adjusted)
        self.q = q / q.sum()

    def loss(self, logits, targets, groups=None):
        means, stats = self.group_means(logits, targets, groups)
        self.update(distributed.all_reduce_sum(stats))
        return (means * self.q.to(means.dtype)).sum()

    def train_sampler(self, groups, num_replicas, rank, seed):
        if self.sampling == "plain":
            return None
        return GroupBalancedSampler(check_groups(groups, self.n_groups), num_replicas, rank, seed)

    def summary(self) -> dict[str, float]:
        return {f"train/gdro_q_{g}": float(v) for g, v in enumerate(self.q.cpu().tolist())}

    def state_dict(self) -> dict:
        return {"method": self.name, "q": self.q.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, {"method", "q"})
        q = torch.as_tensor(state["q"], dtype=torch.float64)
        if q.shape != (self.n_groups,):
            raise UserError(f"--resume_training: the checkpoint's GroupDRO weights are for {q.numel()} groups, "
                            f"this run has {self.n_groups}")
        self.q = q.to(self.q.device).clone()
