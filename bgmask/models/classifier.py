"""`Classifier`: a timm backbone + head with an optional late-masking forward, and `create_classifier`.

    clf = create_classifier("vit_small_patch14_dinov2", 200, image_size=224, pretrained=True)
    logits = clf(x)                       # baseline / early masking: x (B, 3, H, W) -> (B, K)
    logits = clf(x, feature_mask=mask)    # late masking: mask (B, 1, H, W), 1 = bird, 0 = background

What differs between backbones (ViT, ResNet, ConvNeXt, any other timm CNN) lives in their registered
family (`families.FAMILIES`, `clf.family`); the forward here is one path for all of them. Late masking:
the mask is resized to the feature grid with `F.interpolate(mode="nearest-exact")` and multiplies the grid
(the product is an ordinary autograd op, so the gradient reaching the grid is the upstream gradient times
the mask).
  stage "last":         grid = features(x) * m, then the head pools it: "mean" averages over all cells
                        (zeros included); "masked_mean" over the bird cells (sum(grid * m) / sum(m)).
                        A ViT's grid is its patch tokens after the final norm; the CLS token is unchanged.
  stage "second_last":  the output of the second-last stage / block is masked, the rest of the backbone runs
                        (a ViT's last block and final norm on all tokens), then "mean" pools the final grid
                        as it is; "masked_mean" multiplies it by the mask (resized again) and pools over the
                        bird cells.
`late_drop_cls=True` builds a ViT with the "gap" head (the CLS token is never used).
"""

from __future__ import annotations

import functools
import logging

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config
from torch import nn

from bgmask.errors import UserError
from bgmask.models.families import family_of
from bgmask.models.heads import check_late_pool
from bgmask.models.weights import check_model_arch, create_timm_model, load_pretrained_file, resolve_pretrained_file

_logger = logging.getLogger(__name__)

LATE_MASK_STAGES = ("last", "second_last")


def resize_mask(mask: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, H, W) image-space mask -> (B, 1, h, w) on the feature grid (nearest-exact)."""
    m = mask.to(torch.float32)
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="nearest-exact")
    return m.to(dtype)


class Classifier(nn.Module):
    """A timm backbone plus head; see the module docstring for the late-masking forward.

    backbone: a timm model; its family (`clf.family`) builds the head: CNNs keep their own classifier
    (built with num_classes=K); ViTs are `VisionTransformer`s built with num_classes=0 and get a registered
    `TokenHead` (`heads.HEADS`) as `clf.head`.
    """

    def __init__(self, backbone: nn.Module, model_arch: str, num_classes: int, *, head: str | None = None,
                 freeze_backbone: bool = False, late_mask_stage: str = "last", late_pool: str = "mean",
                 late_drop_cls: bool = False, image_size: int | None = None):
        super().__init__()
        if late_mask_stage not in (*LATE_MASK_STAGES, "auto"):
            raise UserError(f"unknown late_mask_stage {late_mask_stage!r}; expected auto or one of "
                            f"{', '.join(LATE_MASK_STAGES)}")
        self.late_pool = check_late_pool(late_pool)
        self.model_arch = model_arch
        self.num_classes = num_classes
        self.backbone = backbone
        self.family = family_of(backbone)
        if late_mask_stage == "auto":
            late_mask_stage = self.family.default_late_stage()
        self.late_mask_stage = late_mask_stage
        self._grid_cache: dict[tuple[int, int], tuple[int, int]] = {}
        self.head_type, self.head = self.family.build_head(backbone, model_arch, num_classes, head, late_drop_cls)
        self.family.check_stage(backbone, model_arch, late_mask_stage)
        self.num_features = self.family.num_features(backbone)
        self._late_problem = self.family.late_problem(backbone)
        self.data_config = self._resolve_data_config(image_size)
        self.freeze_backbone = freeze_backbone
        # As in the paper's code, a frozen backbone still trains some modules at the head's learning rate: what
        # runs after a second-last mask (the last stage or block and the final norm), ConvNeXt's head norm.
        tuned = self.family.tuned_when_frozen(backbone, late_mask_stage == "second_last") if freeze_backbone else []
        self._tuned = tuned  # a plain list: the modules stay registered (and saved) under the backbone only
        if freeze_backbone:
            head_ids = {id(p) for p in self._head_and_tuned()}
            for p in self.backbone.parameters():
                if id(p) not in head_ids:
                    p.requires_grad_(False)
            self.train(self.training)

    def _head_and_tuned(self) -> list[nn.Parameter]:
        modules = [self.family.head_module(self), *self._tuned]
        return [p for m in modules for p in m.parameters()]

    def _resolve_data_config(self, image_size: int | None) -> dict:
        try:
            cfg = resolve_model_data_config(self.backbone)
        except Exception:  # a model without pretrained_cfg
            cfg = {"input_size": (3, 224, 224), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
        cfg = dict(cfg)
        cfg["mean"] = tuple(float(v) for v in cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        cfg["std"] = tuple(float(v) for v in cfg.get("std", IMAGENET_DEFAULT_STD))
        if image_size is not None:
            cfg["input_size"] = (3, image_size, image_size)
        return cfg

    # ------------------------------------------------------------------ parameters / modes
    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters at the head's learning rate: the (newly initialised) classification head,
        plus the last stage / block and final norm of a frozen second-last variant."""
        return [p for p in self._head_and_tuned() if p.requires_grad]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of everything else (empty with freeze_backbone)."""
        head_ids = {id(p) for p in self._head_and_tuned()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept free of weight decay beyond timm's 1-d rule: the backbone's own list
        (timm ViTs: pos_embed, cls_token, reg_token, dist_token), prefixed with `backbone.`."""
        names = getattr(self.backbone, "no_weight_decay", set)()
        return {f"backbone.{n}" for n in names}

    def head_state_keys(self) -> list[str]:
        """state_dict keys of the classification head (dropped on load when their shape does not fit)."""
        head = self.family.head_module(self)
        name = next(n for n, m in self.named_modules() if m is head)
        return [f"{name}.{k}" for k in head.state_dict()]

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if getattr(self, "freeze_backbone", False):
            self.backbone.eval()  # linear probe: BatchNorm statistics and dropout stay frozen
            for m in getattr(self, "_tuned", []):
                m.train(mode)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing of the backbone (the head is small and never checkpointed)."""
        if not hasattr(self.backbone, "set_grad_checkpointing"):
            raise UserError(f"--grad_checkpointing: model_arch={self.model_arch} has no activation "
                            "checkpointing in timm")
        self.backbone.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ geometry
    def feature_grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the final feature grid (the grid the late mask is resized to) for an input size."""
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if (H, W) not in self._grid_cache:
            self._grid_cache[(H, W)] = self.family.grid_size(self.backbone, self.model_arch, H, W)
        return self._grid_cache[(H, W)]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 3, H, W) normalised images; feature_mask None or (B, 1, H, W) in [0, 1] -> logits (B, K)."""
        fam, net = self.family, self.backbone
        if feature_mask is None:
            grid, aside = fam.features(net, x)  # (B, C, h, w)
            return fam.classify(self, grid, aside, None)  # (B, K)
        self._check_late_input(x, feature_mask)
        if self.late_mask_stage == "second_last":
            grid, aside = fam.to_second_last(net, x)  # (B, C', h', w')
            grid = grid * resize_mask(feature_mask, grid.shape[-2:], grid.dtype)
            grid, aside = fam.after_second_last(net, grid, aside)  # (B, C, h, w)
            if self.late_pool == "mean":
                return fam.classify(self, grid, aside, None)  # (B, K)
        else:
            grid, aside = fam.features(net, x)  # (B, C, h, w)
            if grid.ndim != 4 or grid.shape[1] != self.num_features:
                raise UserError(f"late masking needs a (B, C, h, w) feature map; {self.model_arch} gives "
                                f"{tuple(grid.shape)}")
        m = resize_mask(feature_mask, grid.shape[-2:], grid.dtype)  # (B, 1, h, w)
        pool_mask = m if self.late_pool == "masked_mean" else None
        return fam.classify(self, grid * m, aside, pool_mask)  # (B, K)

    def _check_late_input(self, x: torch.Tensor, feature_mask: torch.Tensor) -> None:
        if feature_mask.ndim != 4 or feature_mask.shape[1] != 1 or feature_mask.shape[0] != x.shape[0]:
            raise UserError(f"feature_mask must have shape (B, 1, H, W) with B={x.shape[0]}; "
                            f"got {tuple(feature_mask.shape)}")
        if self._late_problem is not None:
            raise UserError(f"late masking is not supported for model_arch={self.model_arch}: {self._late_problem}")


@functools.lru_cache(maxsize=None)
def family_of_arch(model_arch: str):
    """The backbone family of a timm model name (an unknown name is one UserError), read from a
    weightless meta-device copy: what "auto" settings mean is known before anything is built."""
    check_model_arch(model_arch)
    with torch.device("meta"):
        return family_of(timm.create_model(model_arch, pretrained=False, num_classes=0))


def create_classifier(model_arch: str, num_classes: int, *, head: str | None = None, pretrained: bool = False,
                      pretrained_file: str | None = None, drop_path: float = 0.0, image_size: int | None = None,
                      freeze_backbone: bool = False, late_mask_stage: str = "last", late_pool: str = "mean",
                      late_drop_cls: bool = False, output_stride: int = 32) -> Classifier:
    """Build a Classifier from a timm model name (see the module docstring).

    pretrained: timm's pretrained weights (local cache first; UserError at once without network).
    pretrained_file: a checkpoint file or `zoo:NAME` to load instead (takes precedence over `pretrained`).
    image_size: ViT input size (position embedding sized / resampled to it); CNNs accept any size.
    late_mask_stage: "last", "second_last" or "auto" (the family's default: see `BackboneFamily`).
    output_stride: CNNs only, timm's dilation of the last stages (32 = none).
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1; got {num_classes}")
    if pretrained_file is not None and pretrained:
        _logger.info("pretrained_file given: loading %s instead of timm's pretrained weights", pretrained_file)
        pretrained = False
    if pretrained_file is not None:  # a missing file or a bad zoo:NAME fails before anything is built
        pretrained_file = resolve_pretrained_file(pretrained_file, model_arch)
    check_model_arch(model_arch)

    def build(pretrained: bool) -> nn.Module:
        kwargs = family.timm_kwargs(num_classes, image_size)
        if drop_path:
            kwargs["drop_path_rate"] = drop_path
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        return create_timm_model(model_arch, pretrained=pretrained, **kwargs)

    # Validate every flag on a weightless meta-device copy first: errors come before any download.
    with torch.device("meta"):
        family = family_of(timm.create_model(model_arch, pretrained=False, num_classes=0))
        if output_stride != 32 and not family.supports_output_stride:
            raise UserError(f"output_stride={output_stride} applies to CNNs; model_arch={model_arch} is a "
                            f"{family.name} (use 32)")
        meta = build(pretrained=False)
        family.check_image_size(meta, model_arch, image_size)
        kwargs = dict(head=head, freeze_backbone=freeze_backbone, late_mask_stage=late_mask_stage,
                      late_pool=late_pool, late_drop_cls=late_drop_cls, image_size=image_size)
        Classifier(meta, model_arch, num_classes, **kwargs)
    clf = Classifier(build(pretrained), model_arch, num_classes, **kwargs)
    if pretrained_file is not None:
        load_pretrained_file(clf, pretrained_file)
    return clf
