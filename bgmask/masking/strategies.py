"""Masking strategies: one registered object each. Mask convention: 1 = bird, 0 = background.

A strategy sees a batch after the data pipeline:
    images (B, 3, H, W) normalised, masks (B, 1, H, W) float in [0, 1] or None
`preprocess` runs before mixup/cutmix (early masking edits pixels here); `forward` runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bgmask.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bgmask.errors import UserError

STRATEGIES: dict[str, type["Strategy"]] = {}
MASK_FILLS = ("black", "mean", "blur")


def register_strategy(cls):
    STRATEGIES[cls.name] = cls
    return cls


def create_strategy(name: str, **kwargs) -> "Strategy":
    if name not in STRATEGIES:
        raise UserError(f"unknown --strategy {name!r} (expected one of {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[name](**kwargs)


@dataclass
class Strategy:
    """A registered strategy: `name` is its key in tables, the CLI and run folders; `needs_mask` says
    whether batches must carry masks; `masks_features` whether the model itself applies them (such
    strategies are trained with late_masking/train.py, the others with early_masking_and_baseline/)."""

    name = "base"
    needs_mask = False
    masks_features = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    mask_fill: str = "black"

    def preprocess(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        return images

    def forward(self, model, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        return model(images)

    def _require(self, masks):
        if masks is None:
            raise UserError(f"strategy {self.name!r} needs masks but the batch has none (set --mask_source)")


@register_strategy
class Baseline(Strategy):
    """Plain images."""

    name = "baseline"


@register_strategy
class EarlyMasking(Strategy):
    """Remove the background before the image enters the network."""

    name = "early"
    needs_mask = True

    def preprocess(self, images, masks):
        self._require(masks)
        return apply_early_mask(images, masks, self.mask_fill, self.mean, self.std)


@register_strategy
class LateMasking(Strategy):
    """Multiply the backbone's last spatial feature map (or ViT patch-token grid) by the mask, resized
    to the feature grid, before pooling. The model does the masking (`feature_mask=`); see
    `bgmask.models`."""

    name = "late"
    needs_mask = True
    masks_features = True

    def forward(self, model, images, masks):
        self._require(masks)
        return model(images, feature_mask=masks)


def fill_values(images: torch.Tensor, fill: str, mean, std) -> torch.Tensor:
    """What replaces the background, in normalised space, broadcastable to images (B, 3, H, W):
    black = the normalised value of a 0 pixel; mean = the normalisation mean colour (0 once normalised);
    blur = a Gaussian blur of the image (sigma = width / 16)."""
    if fill == "black":
        m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return -m / s
    if fill == "mean":
        return torch.zeros(1, 3, 1, 1, dtype=images.dtype, device=images.device)
    if fill == "blur":
        return gaussian_blur(images, sigma=max(images.shape[-1] / 16, 1.0))
    raise UserError(f"unknown --mask_fill {fill!r} (expected one of {', '.join(MASK_FILLS)})")


def apply_early_mask(images: torch.Tensor, masks: torch.Tensor, fill: str = "black", mean=None, std=None):
    """The one background fill of early masking (on-the-fly, the masked copies on disk, the diagnostics).
    images (B, 3, H, W) normalised with (mean, std), masks (B, 1, H, W) -> images * m + fill * (1 - m)."""
    if masks.shape[-2:] != images.shape[-2:] or masks.shape[0] != images.shape[0]:
        raise UserError(f"mask batch {tuple(masks.shape)} does not match image batch {tuple(images.shape)}")
    masks = masks.to(images.dtype)
    return images * masks + fill_values(images, fill, mean, std) * (1 - masks)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders (the kernel is cut to fit images thinner than 3 sigma)."""
    radius = min(int(3 * sigma), min(images.shape[-2:]) - 1)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(images.shape[1], 1, 1, 1)
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), k, groups=images.shape[1])
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), k.transpose(2, 3), groups=images.shape[1])
