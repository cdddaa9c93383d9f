"""`Classifier`: a timm backbone + head with an optional late-masking forward, and `create_classifier`.

    clf = create_classifier("vit_small_patch14_dinov2", 200, image_size=224, pretrained=True)
    logits = clf(x)                       # baseline / early masking: x (B, 3, H, W) -> (B, K)
    logits = clf(x, feature_mask=mask)    # late masking: mask (B, 1, H, W), 1 = bird, 0 = background

Late masking: the mask is resized to the feature grid with `F.interpolate(mode="nearest-exact")` and
multiplies the map before pooling (the product is an ordinary autograd op, so the gradient reaching the
map is the upstream gradient times the mask).
  CNN, stage "last":         f = forward_features(x) * m; logits = forward_head(f)  (its average pool: the mean
                             over all cells, zeros included); "masked_mean" rescales f * m by h*w / sum(m)
                             first, so the same pool gives the mean over bird cells.
  CNN, stage "second_last":  the output of the second-last stage is masked, then the last stage and the head
                             run; "masked_mean" pools the final map over the bird cells (mask resized again).
  ViT, stage "last":         tokens = forward_features(x) (after the final norm); the patch tokens, as a grid
                             (B, D, gh, gw), are multiplied by m; the gap feature is their mean over all cells
                             ("mean") or over bird cells ("masked_mean"); the CLS token is used unchanged.
  ViT, stage "second_last":  the patch tokens after block N-1 are masked, block N and the final norm run on
                             all tokens, then the head pools with the same rule ("mean": plain mean of the
                             final patch tokens; "masked_mean": mean over bird cells).
`late_drop_cls=True` builds a ViT with the "gap" head (the CLS token is never used).
"""

from __future__ import annotations

import logging
import os

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from bgmask.errors import UserError
from bgmask.models.cnn_stages import CNN_STAGE_SPLITS, find_stage_split, head_avg_pool_problem
from bgmask.models.heads import check_late_pool, get_head, masked_mean_rescale, pool_grid
from bgmask.models.weights import check_model_arch, create_timm_model, load_pretrained_file

_logger = logging.getLogger(__name__)

LATE_MASK_STAGES = ("last", "second_last")
CNN_HEAD_TYPE = "timm"  # head_type of CNNs: the model's own pooled head


def resize_mask(mask: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, H, W) image-space mask -> (B, 1, h, w) on the feature grid (nearest-exact)."""
    m = mask.to(torch.float32)
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="nearest-exact")
    return m.to(dtype)


class Classifier(nn.Module):
    """A timm backbone plus head; see the module docstring for the late-masking forward.

    backbone: a timm model. CNNs keep their own classifier (built with num_classes=K); ViTs are
    `VisionTransformer`s built with num_classes=0 and get a registered `TokenHead` (`heads.HEADS`).
    """

    def __init__(self, backbone: nn.Module, model_arch: str, num_classes: int, *, head: str | None = None,
                 freeze_backbone: bool = False, late_mask_stage: str = "last", late_pool: str = "mean",
                 late_drop_cls: bool = False, image_size: int | None = None):
        super().__init__()
        if late_mask_stage not in LATE_MASK_STAGES:
            raise UserError(f"unknown late_mask_stage {late_mask_stage!r}; expected one of "
                            f"{', '.join(LATE_MASK_STAGES)}")
        self.late_pool = check_late_pool(late_pool)
        self.late_mask_stage = late_mask_stage
        self.model_arch = model_arch
        self.num_classes = num_classes
        self.backbone = backbone
        self.is_vit = isinstance(backbone, VisionTransformer)
        self._grid_cache: dict[tuple[int, int], tuple[int, int]] = {}
        if self.is_vit:
            self._init_vit_head(head, late_drop_cls)
            self.num_features = backbone.embed_dim
            self._late_problem = None
        else:
            if head is not None or late_drop_cls:
                flag = f"head={head!r}" if head is not None else "late_drop_cls=True"
                raise UserError("--class_token_only/--patch_tokens_only/--late_drop_cls apply to ViT models only; "
                                f"got model_arch={model_arch} ({type(backbone).__name__}) with {flag}")
            self.head_type = CNN_HEAD_TYPE
            self.head = None
            self.num_features = backbone.num_features
            self._stage_split = find_stage_split(backbone)
            self._late_problem = head_avg_pool_problem(backbone)
            if late_mask_stage == "second_last" and self._stage_split is None:
                raise UserError(f"late_mask_stage='second_last' is not supported for model_arch={model_arch} "
                                f"({type(backbone).__name__}); supported CNN families: "
                                f"{', '.join(c.__name__ for c in CNN_STAGE_SPLITS)}")
        self.data_config = self._resolve_data_config(image_size)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            head_ids = {id(p) for p in self.head_parameters()}
            for p in self.backbone.parameters():
                if id(p) not in head_ids:
                    p.requires_grad_(False)
            self.train(self.training)

    # ------------------------------------------------------------------ construction helpers
    def _init_vit_head(self, head: str | None, late_drop_cls: bool) -> None:
        vit = self.backbone
        if vit.attn_pool is not None or not isinstance(vit.fc_norm, nn.Identity):
            raise UserError(f"model_arch={self.model_arch} pools with an attention pool or a norm after pooling; "
                            "expected a ViT with the final norm on the tokens (e.g. DINOv2)")
        if head is None:
            head = "both"
        if late_drop_cls:
            if head == "cls":
                raise UserError("late_drop_cls=True drops the CLS token, but head='cls' uses only the CLS token; "
                                "use head='gap' or 'both'")
            head = "gap"
        head_cls = get_head(head)
        if "cls" in head_cls.parts and not vit.has_class_token:
            raise UserError(f"head={head!r} needs a CLS token but model_arch={self.model_arch} has none; "
                            "use head='gap'")
        self.head_type = head
        self.head = head_cls(vit.embed_dim, self.num_classes)

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
    def _head_module(self) -> nn.Module:
        return self.head if self.is_vit else self.backbone.get_classifier()

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the (newly initialised) classification head."""
        return [p for p in self._head_module().parameters() if p.requires_grad]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of everything else (empty with freeze_backbone)."""
        head_ids = {id(p) for p in self._head_module().parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]

    def head_state_keys(self) -> list[str]:
        """state_dict keys of the classification head (dropped on load when their shape does not fit)."""
        if self.is_vit:
            return [f"head.{k}" for k in self.head.state_dict()]
        name = next(n for n, m in self.backbone.named_modules() if m is self.backbone.get_classifier())
        return [f"backbone.{name}.{k}" for k in self.backbone.get_classifier().state_dict()]

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if getattr(self, "freeze_backbone", False):
            self.backbone.eval()  # linear probe: BatchNorm statistics and dropout stay frozen
        return self

    # ------------------------------------------------------------------ geometry
    def feature_grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the final feature grid (the grid the late mask is resized to) for an input size."""
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if self.is_vit:
            ph, pw = self.backbone.patch_embed.patch_size
            if H % ph or W % pw:
                raise UserError(f"image_size {H}x{W} is not a multiple of the patch size {ph} of {self.model_arch}")
            return H // ph, W // pw
        if (H, W) not in self._grid_cache:
            modes = [(m, m.training) for m in self.backbone.modules()]
            try:
                self.backbone.eval()
                p = next(self.backbone.parameters())
                with torch.no_grad():
                    f = self.backbone.forward_features(torch.zeros(1, 3, H, W, device=p.device, dtype=p.dtype))
            finally:
                for m, was in modes:
                    m.training = was
            self._grid_cache[(H, W)] = tuple(f.shape[-2:])
        return self._grid_cache[(H, W)]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 3, H, W) normalised images; feature_mask None or (B, 1, H, W) in [0, 1] -> logits (B, K)."""
        if feature_mask is not None:
            if feature_mask.ndim != 4 or feature_mask.shape[1] != 1 or feature_mask.shape[0] != x.shape[0]:
                raise UserError(f"feature_mask must have shape (B, 1, H, W) with B={x.shape[0]}; "
                                f"got {tuple(feature_mask.shape)}")
        if self.is_vit:
            return self._forward_vit(x, feature_mask)
        return self._forward_cnn(x, feature_mask)

    def _forward_cnn(self, x, mask):
        net = self.backbone
        if mask is None:
            return net.forward_head(net.forward_features(x))  # (B, K)
        if self._late_problem is not None:
            raise UserError(f"late masking is not supported for model_arch={self.model_arch}: {self._late_problem}")
        if self.late_mask_stage == "second_last":
            f = self._stage_split.to_second_last(net, x)  # (B, C', h', w')
            f = f * resize_mask(mask, f.shape[-2:], f.dtype)
            f = self._stage_split.after_second_last(net, f)  # (B, C, h, w)
            if self.late_pool == "masked_mean":
                m = resize_mask(mask, f.shape[-2:], f.dtype)
                f = masked_mean_rescale(f * m, m)
            return net.forward_head(f)
        f = net.forward_features(x)  # (B, C, h, w)
        if f.ndim != 4 or f.shape[1] != self.num_features:
            raise UserError(f"late masking needs a (B, C, h, w) feature map; {self.model_arch} gives {tuple(f.shape)}")
        m = resize_mask(mask, f.shape[-2:], f.dtype)
        f = f * m
        if self.late_pool == "masked_mean":
            f = masked_mean_rescale(f, m)
        return net.forward_head(f)  # (B, K)

    def _patch_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, D, gh, gw) grid of the patch tokens (prefix tokens dropped)."""
        B, _, D = tokens.shape
        gh, gw = self.backbone.patch_embed.grid_size
        return tokens[:, self.backbone.num_prefix_tokens:].transpose(1, 2).reshape(B, D, gh, gw)

    def _forward_vit(self, x, mask):
        vit = self.backbone
        pool_mask = None  # the mask the gap pooling applies (None: plain mean)
        if mask is None:
            tokens = vit.forward_features(x)  # (B, N, D), after the final norm
            grid = self._patch_grid(tokens)
        elif self.late_mask_stage == "last":
            tokens = vit.forward_features(x)
            m = resize_mask(mask, vit.patch_embed.grid_size, tokens.dtype)  # (B, 1, gh, gw)
            if self.late_pool == "masked_mean":
                grid, pool_mask = self._patch_grid(tokens), m  # pool_grid multiplies by m (once)
            else:
                grid = self._patch_grid(tokens) * m
        else:
            t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, N, D)
            for blk in vit.blocks[:-1]:
                t = blk(t)
            P = vit.num_prefix_tokens
            m = resize_mask(mask, vit.patch_embed.grid_size, t.dtype)
            patches = t[:, P:] * m.flatten(2).transpose(1, 2)  # (B, gh*gw, D) * (B, gh*gw, 1)
            t = torch.cat([t[:, :P], patches], dim=1)
            tokens = vit.norm(vit.blocks[-1](t))
            grid = self._patch_grid(tokens)
            if self.late_pool == "masked_mean":
                pool_mask = m
        cls = tokens[:, 0] if self.head.uses_cls else None  # (B, D)
        gap = pool_grid(grid, pool_mask, self.late_pool) if self.head.uses_gap else None  # (B, D)
        return self.head(cls, gap)  # (B, K)


def create_classifier(model_arch: str, num_classes: int, *, head: str | None = None, pretrained: bool = False,
                      pretrained_file: str | None = None, drop_path: float = 0.0, image_size: int | None = None,
                      freeze_backbone: bool = False, late_mask_stage: str = "last", late_pool: str = "mean",
                      late_drop_cls: bool = False) -> Classifier:
    """Build a Classifier from a timm model name (see the module docstring).

    pretrained: timm's pretrained weights (local cache first; UserError at once without network).
    pretrained_file: a checkpoint file to load instead (takes precedence over `pretrained`).
    image_size: ViT input size (position embedding sized / resampled to it); CNNs accept any size.
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1; got {num_classes}")
    if pretrained_file is not None and pretrained:
        _logger.info("pretrained_file given: loading %s instead of timm's pretrained weights", pretrained_file)
        pretrained = False
    if pretrained_file is not None and not os.path.isfile(pretrained_file):
        raise UserError(f"pretrained_file not found: {pretrained_file} (expected a .pth/.safetensors state dict)")
    check_model_arch(model_arch)

    def build(pretrained: bool) -> nn.Module:
        kwargs: dict = {"drop_path_rate": drop_path} if drop_path else {}
        kwargs["num_classes"] = 0 if is_vit else num_classes
        if is_vit and image_size is not None:
            kwargs["img_size"] = image_size
        return create_timm_model(model_arch, pretrained=pretrained, **kwargs)

    # Validate every flag on a weightless meta-device copy first: errors come before any download.
    with torch.device("meta"):
        meta = timm.create_model(model_arch, pretrained=False, num_classes=0)
        is_vit = isinstance(meta, VisionTransformer)
        meta = build(pretrained=False)
        if is_vit and image_size is not None:
            ph, pw = meta.patch_embed.patch_size
            if image_size % ph or image_size % pw:
                raise UserError(f"image_size={image_size} is not a multiple of the patch size {ph} of {model_arch}")
        kwargs = dict(head=head, freeze_backbone=freeze_backbone, late_mask_stage=late_mask_stage,
                      late_pool=late_pool, late_drop_cls=late_drop_cls, image_size=image_size)
        Classifier(meta, model_arch, num_classes, **kwargs)
    clf = Classifier(build(pretrained), model_arch, num_classes, **kwargs)
    if pretrained_file is not None:
        load_pretrained_file(clf, pretrained_file)
    return clf
