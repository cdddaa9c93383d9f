"""Embeddings for post-hoc methods (DFR): the features entering a classifier's last linear layer.

A forward pre-hook on that layer captures its input, so the features are exactly what the trained model
classifies, for every strategy: a CNN's pooled features, a ViT head's [cls, gap] concatenation, late
masking's masked (and masked-mean) pooled features. The batches are prepared and run as
`bgmask.eval.predict` runs them (`prepare_batch`, the memory format, autocast, the strategy's forward),
in eval mode without gradients, each rank on its stride of the indices, gathered and ordered by index.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bgmask.distributed import ShardSampler, all_gather_objects
from bgmask.errors import UserError
from bgmask.eval import autocast_context, prepare_batch, to_memory_format
from bgmask.processes import loader_iter, unblock_sigint


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier's last linear layer: its family's head module (`family.head_module`) when that is a
    Linear, else the last Linear inside it (a ViT TokenHead's `linear`, a CNN classifier's final layer)."""
    clf = getattr(model, "module", model)  # a DDP-wrapped classifier
    if not hasattr(clf, "family"):
        raise UserError(f"embeddings need a bgmask Classifier, got {type(clf).__name__}")
    head = clf.family.head_module(clf)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{clf.model_arch}: its classification head ({type(head).__name__}) has no linear layer "
                        "to take embeddings from")
    return linears[-1]


@torch.no_grad()
def embed(model, dataset: Dataset, strategy, dist, batch_size: int = 64, num_workers: int = 0, mask_fn=None,
          amp: bool = False, amp_dtype: str = "bf16", channels_last: bool = False, progress: bool = False,
          desc: str = "embed") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,), groups (N,)) of every sample of `dataset`, in index order;
    D is the input width of the last linear layer (`last_linear`)."""
    if len(dataset) == 0:
        raise UserError(f"{desc}: the dataset is empty")
    model.eval()
    captured = []
    hook = last_linear(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    sampler = ShardSampler(len(dataset), dist.rank, dist.world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        worker_init_fn=unblock_sigint, pin_memory=dist.device.type == "cuda")
    rows = {"index": [], "features": [], "label": [], "group": []}
    try:
        for batch in tqdm(loader_iter(loader), total=len(loader), desc=desc, leave=False,
                          disable=not (progress and dist.is_main)):
            images, masks = prepare_batch(batch, strategy, dist.device, mask_fn)
            images = to_memory_format(images, channels_last)
            captured.clear()
            with autocast_context(dist.device, amp, amp_dtype):
                strategy.forward(model, images, masks)
            if len(captured) != 1:
                raise RuntimeError(f"the last linear layer ran {len(captured)} times in one forward")
            rows["features"].append(captured[0].float().flatten(1).cpu().numpy())  # (B, D)
            for key in ("index", "label", "group"):
                rows[key].append(np.asarray(batch[key]))
    finally:
        hook.remove()
    local = {k: np.concatenate(v) if v else np.zeros((0,), np.int64) for k, v in rows.items()}
    parts = [p for p in all_gather_objects(local) if len(p["index"])]
    out = {k: np.concatenate([p[k] for p in parts]) for k in local}
    order = np.argsort(out["index"], kind="stable")
    if not np.array_equal(out["index"][order], np.arange(len(dataset))):
        raise RuntimeError(f"embedding saw {len(out['index'])} samples of {len(dataset)}")
    return out["features"][order], out["label"][order], out["group"][order]
