"""Accuracy metrics from per-sample predictions (exact: every sample counted once)."""

from __future__ import annotations

import numpy as np


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
