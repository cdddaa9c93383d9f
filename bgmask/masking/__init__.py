"""Masking strategies (registry), early masking, and mask sources.

A mask function (the online-segmenter interface) maps a normalised image batch (B, 3, H, W) to a
(B, 1, H, W) float mask in {0, 1}, 1 = bird.
"""

from typing import Callable

import torch

from bgmask.masking.strategies import STRATEGIES, Strategy, apply_early_mask, create_strategy, register_strategy  # noqa: F401

MaskFn = Callable[[torch.Tensor], torch.Tensor]
