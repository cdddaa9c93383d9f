"""Per-family adapters that run a timm CNN's `forward_features` in two parts around the output of its
second-last stage (registry `CNN_STAGE_SPLITS`, keyed by model class; subclasses are found through the MRO).

Late masking at `late_mask_stage="second_last"` needs one; `late_mask_stage="last"` works for any timm CNN
whose `forward_features` returns (B, C, h, w) and whose head starts with a global average pool.
Adding a family = one registered subclass of `StageSplit`:

    @register_stage_split(MyNet)
    class MyNetSplit(StageSplit):
        def to_second_last(self, model, x): ...     # (B, 3, H, W) -> (B, C', h', w')
        def after_second_last(self, model, f): ...  # (B, C', h', w') -> forward_features output (B, C, h, w)
"""

from __future__ import annotations

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from torch import nn

CNN_STAGE_SPLITS: dict[type[nn.Module], StageSplit] = {}


def register_stage_split(model_cls: type[nn.Module]):
    def deco(cls: type[StageSplit]) -> type[StageSplit]:
        CNN_STAGE_SPLITS[model_cls] = cls()
        return cls

    return deco


def find_stage_split(model: nn.Module) -> StageSplit | None:
    for cls in type(model).__mro__:
        if cls in CNN_STAGE_SPLITS:
            return CNN_STAGE_SPLITS[cls]
    return None


class StageSplit:
    """forward_features(x) == after_second_last(model, to_second_last(model, x))."""

    def to_second_last(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_second_last(self, model: nn.Module, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_stage_split(ResNet)
class ResNetSplit(StageSplit):
    def to_second_last(self, model, x):
        x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        return model.layer3(model.layer2(model.layer1(x)))  # (B, C3, h3, w3)

    def after_second_last(self, model, f):
        return model.layer4(f)  # (B, C, h, w)


@register_stage_split(ConvNeXt)
class ConvNeXtSplit(StageSplit):
    def to_second_last(self, model, x):
        x = model.stem(x)
        for stage in model.stages[:-1]:
            x = stage(x)
        return x  # (B, C3, h3, w3)

    def after_second_last(self, model, f):
        return model.norm_pre(model.stages[-1](f))  # (B, C, h, w); the final norm is in ConvNeXt's head


def head_avg_pool_problem(model: nn.Module) -> str | None:
    """None when the model's head pools with exactly one global *average* pool (so masking the map before
    `forward_head` gives the paper's mean over all cells); otherwise why late masking cannot be applied."""
    pools = [m for m in model.modules() if isinstance(m, SelectAdaptivePool2d)]
    if len(pools) != 1:
        return f"its head has {len(pools)} global pooling layers (expected one average pool)"
    pool_type = pools[0].pool_type
    if not (pool_type == "fast" or pool_type.endswith("avg")):
        return f"its global pool is {pool_type!r} (expected 'avg')"
    return None
