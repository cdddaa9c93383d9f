"""Backbone families (registry `FAMILIES`, keyed by short name): what late masking needs to know about one
kind of timm backbone. A backbone's family is the first registered model class in its class's MRO, so
`cnn` (registered for `nn.Module`) is the fallback for any model that no other family claims.

A family says how to build its head and which module that is, how to get the final feature grid
(B, C, h, w) of an image batch, how to run up to the second-last stage / block and on from there, and how
to pool + classify a (masked) grid. `Classifier.forward` is one generic path over these methods.

Grids carry a second value `aside`, what the family keeps beside the spatial cells (a ViT's prefix tokens
(B, P, D); None for CNNs). Mask convention: 1 = bird (foreground), 0 = background.

How to add a family: one registered object, plus a small model of it in `EXAMPLES` of tests/test_families.py
(whose tests are parametrised over `FAMILIES`):

    @register_family("regnet", RegNet)
    class RegNetFamily(CNNFamily):
        supports_second_last = True

        def to_second_last(self, net, x):      # (B, 3, H, W) -> ((B, C', h', w'), None)
            return net.s3(net.s2(net.s1(net.stem(x)))), None

        def after_second_last(self, net, f, aside):  # (B, C', h', w') -> forward_features output (B, C, h, w)
            return net.final_conv(net.s4(f)), aside
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from timm.layers import SelectAdaptivePool2d
from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from bgmask.errors import UserError
from bgmask.models.heads import get_head, masked_mean_rescale, pool_grid

FAMILIES: dict[str, BackboneFamily] = {}


def run_blocks(blocks, x: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """x through `blocks` in order. When timm's activation checkpointing is on for `net`
    (`set_grad_checkpointing`) and a graph is being recorded, each block's activations are recomputed in
    the backward pass instead of kept, as timm's own forward_features does; the split forwards of
    second-last late masking then save the same memory as the plain forward."""
    if getattr(net, "grad_checkpointing", False) and torch.is_grad_enabled():
        for blk in blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return x
    for blk in blocks:
        x = blk(x)
    return x


def register_family(name: str, model_cls: type[nn.Module]):
    """Class decorator: `@register_family("resnet", ResNet)` adds an instance to FAMILIES under `name`;
    it serves every backbone whose class has `model_cls` as its nearest registered base."""

    def deco(cls: type[BackboneFamily]) -> type[BackboneFamily]:
        if name in FAMILIES:
            raise ValueError(f"backbone family {name!r} is already registered")
        if any(f.model_cls is model_cls for f in FAMILIES.values()):
            raise ValueError(f"{model_cls.__name__} already has a backbone family")
        cls.name, cls.model_cls = name, model_cls
        FAMILIES[name] = cls()
        return cls

    return deco


def family_of(backbone: nn.Module) -> BackboneFamily:
    """The family of the nearest registered class in the backbone's MRO."""
    by_cls = {f.model_cls: f for f in FAMILIES.values()}
    return next(by_cls[c] for c in type(backbone).__mro__ if c in by_cls)


def _family_by_name(name: str) -> BackboneFamily:
    return FAMILIES[name]


Grid = tuple[torch.Tensor, torch.Tensor | None]  # (B, C, h, w) cells, and what is kept aside


class BackboneFamily:
    """Stateless adapter: every method takes the backbone (or the Classifier) it works on."""

    name: str = ""
    model_cls: type[nn.Module] = nn.Module
    supports_second_last: bool = False
    supports_output_stride: bool = False  # timm's dilated last stages (CNNs)
    # what --channels_last means when neither it nor --no_channels_last is given: on for convolutional
    # families, whose conv kernels run faster in NHWC (benchmarks/README.md, bench_defaults); a ViT has one conv
    prefers_channels_last: bool = False

    def default_late_stage(self) -> str:
        """What late_mask_stage="auto" means (the paper: the second-last stage of a CNN, the last ViT block)."""
        return "second_last" if self.supports_second_last else "last"

    def last_part(self, backbone: nn.Module) -> list[nn.Module]:
        """The modules `after_second_last` runs: what the paper's frozen second-last variants still train."""
        raise NotImplementedError

    def tuned_when_frozen(self, backbone: nn.Module, second_last: bool) -> list[nn.Module]:
        """Backbone modules that train beside the head under --freeze_backbone (as the paper's code)."""
        return self.last_part(backbone) if second_last else []

    def __reduce__(self):  # pickling / deepcopy of a Classifier keeps the registered instance
        return _family_by_name, (self.name,)

    def __repr__(self) -> str:
        return f"<backbone family {self.name!r} ({self.model_cls.__name__})>"

    # ---------------------------------------------------------------- construction
    def timm_kwargs(self, num_classes: int, image_size: int | None) -> dict:
        """Keyword arguments of timm.create_model for this family."""
        raise NotImplementedError

    def check_image_size(self, backbone: nn.Module, model_arch: str, image_size: int | None) -> None:
        """UserError when `image_size` cannot work (checked on a weightless copy, before any download)."""

    def build_head(self, backbone: nn.Module, model_arch: str, num_classes: int, head: str | None,
                   late_drop_cls: bool) -> tuple[str, nn.Module | None]:
        """-> (head_type, a new head module or None when the backbone keeps its own classifier)."""
        raise NotImplementedError

    def check_stage(self, backbone: nn.Module, model_arch: str, late_mask_stage: str) -> None:
        """UserError when this backbone cannot mask at `late_mask_stage`."""

    def late_problem(self, backbone: nn.Module) -> str | None:
        """Why late masking cannot be applied to this backbone (raised on a masked forward), or None."""
        return None

    def num_features(self, backbone: nn.Module) -> int:
        return backbone.num_features

    def head_module(self, clf: nn.Module) -> nn.Module:
        """The classification head of a Classifier (head_parameters / backbone_parameters / head_state_keys)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- geometry
    def grid_size(self, backbone: nn.Module, model_arch: str, H: int, W: int) -> tuple[int, int]:
        """(h, w) of the final feature grid for an (H, W) input: by a probe forward in eval mode, no grad;
        the modes of all submodules are restored afterwards."""
        modes = [(m, m.training) for m in backbone.modules()]
        try:
            backbone.eval()
            p = next(backbone.parameters())
            with torch.no_grad():
                grid, _ = self.features(backbone, torch.zeros(1, 3, H, W, device=p.device, dtype=p.dtype))
        finally:
            for m, was in modes:
                m.training = was
        return tuple(grid.shape[-2:])

    # ---------------------------------------------------------------- forward pieces
    def features(self, backbone: nn.Module, x: torch.Tensor) -> Grid:
        """(B, 3, H, W) -> the final feature grid (B, C, h, w), aside."""
        raise NotImplementedError

    def to_second_last(self, backbone: nn.Module, x: torch.Tensor) -> Grid:
        """(B, 3, H, W) -> the output of the second-last stage / block (B, C', h', w'), aside."""
        raise NotImplementedError

    def after_second_last(self, backbone: nn.Module, grid: torch.Tensor, aside) -> Grid:
        """The rest: after_second_last(to_second_last(x)) == features(x)."""
        raise NotImplementedError

    def classify(self, clf: nn.Module, grid: torch.Tensor, aside, pool_mask: torch.Tensor | None) -> torch.Tensor:
        """grid (B, C, h, w), already multiplied by the mask where one applies -> logits (B, K).
        pool_mask None: the mean over all cells; else (B, 1, h, w): the mean over bird cells (`late_pool`
        "masked_mean"), i.e. sum(grid) / sum(pool_mask) -- the grid is not multiplied by it again."""
        raise NotImplementedError


@register_family("vit", VisionTransformer)
class ViTFamily(BackboneFamily):
    """timm VisionTransformer (num_classes=0) + a registered TokenHead (`heads.HEADS`). The grid is the patch
    tokens after the final norm; the prefix tokens (CLS, registers) are kept aside, never masked."""

    supports_second_last = True

    def default_late_stage(self):
        return "last"

    def last_part(self, vit):
        return [vit.blocks[-1], vit.norm]

    def timm_kwargs(self, num_classes, image_size):
        return {"num_classes": 0} if image_size is None else {"num_classes": 0, "img_size": image_size}

    def check_image_size(self, vit, model_arch, image_size):
        ph, pw = vit.patch_embed.patch_size
        if image_size is not None and (image_size % ph or image_size % pw):
            raise UserError(f"image_size={image_size} is not a multiple of the patch size {ph} of {model_arch}")

    def build_head(self, vit, model_arch, num_classes, head, late_drop_cls):
        if vit.attn_pool is not None or not isinstance(vit.fc_norm, nn.Identity):
            raise UserError(f"model_arch={model_arch} pools with an attention pool or a norm after pooling; "
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
            raise UserError(f"head={head!r} needs a CLS token but model_arch={model_arch} has none; "
                            "use head='gap'")
        return head, head_cls(vit.embed_dim, num_classes)

    def num_features(self, vit):
        return vit.embed_dim

    def head_module(self, clf):
        return clf.head

    def grid_size(self, vit, model_arch, H, W):
        ph, pw = vit.patch_embed.patch_size
        if H % ph or W % pw:
            raise UserError(f"image_size {H}x{W} is not a multiple of the patch size {ph} of {model_arch}")
        return H // ph, W // pw

    def _split(self, vit, tokens: torch.Tensor) -> Grid:
        """(B, N, D) tokens -> (B, D, gh, gw) grid of the patch tokens, (B, P, D) prefix tokens."""
        B, _, D = tokens.shape
        P = vit.num_prefix_tokens
        gh, gw = vit.patch_embed.grid_size
        return tokens[:, P:].transpose(1, 2).reshape(B, D, gh, gw), tokens[:, :P]

    def features(self, vit, x):
        return self._split(vit, vit.forward_features(x))  # tokens (B, N, D) after the final norm

    def to_second_last(self, vit, x):
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, N, D)
        return self._split(vit, run_blocks(vit.blocks[:-1], t, vit))

    def after_second_last(self, vit, grid, prefix):
        t = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)  # (B, N, D)
        return self._split(vit, vit.norm(run_blocks(vit.blocks[-1:], t, vit)))

    def classify(self, clf, grid, prefix, pool_mask):
        cls = prefix[:, 0] if clf.head.uses_cls else None  # (B, D)
        gap = pool_grid(grid, pool_mask) if clf.head.uses_gap else None  # (B, D)
        return clf.head(cls, gap)  # (B, K)


@register_family("cnn", nn.Module)
class CNNFamily(BackboneFamily):
    prefers_channels_last = True
    """Any timm CNN whose forward_features gives (B, C, h, w) and whose head pools with one global average
    pool: the model keeps its own classifier (built with num_classes=K, head_type "timm"). Masks the last
    stage only; subclasses that can split off the last stage set `supports_second_last`."""

    HEAD_TYPE = "timm"
    supports_output_stride = True

    def timm_kwargs(self, num_classes, image_size):
        return {"num_classes": num_classes}

    def build_head(self, net, model_arch, num_classes, head, late_drop_cls):
        if head is not None or late_drop_cls:
            flag = f"head={head!r}" if head is not None else "late_drop_cls=True"
            raise UserError("--class_token_only/--patch_tokens_only/--late_drop_cls apply to ViT models only; "
                            f"got model_arch={model_arch} ({type(net).__name__}) with {flag}")
        return self.HEAD_TYPE, None

    def check_stage(self, net, model_arch, late_mask_stage):
        if late_mask_stage == "second_last" and not self.supports_second_last:
            supported = [f.model_cls.__name__ for f in FAMILIES.values()
                         if isinstance(f, CNNFamily) and f.supports_second_last]
            raise UserError(f"late_mask_stage='second_last' is not supported for model_arch={model_arch} "
                            f"({type(net).__name__}); supported CNN families: {', '.join(supported)}")

    def late_problem(self, net):
        """None when the head pools with exactly one global *average* pool (so masking the map before
        `forward_head` gives the paper's mean over all cells)."""
        pools = [m for m in net.modules() if isinstance(m, SelectAdaptivePool2d)]
        if len(pools) != 1:
            return f"its head has {len(pools)} global pooling layers (expected one average pool)"
        pool_type = pools[0].pool_type
        if not (pool_type == "fast" or pool_type.endswith("avg")):
            return f"its global pool is {pool_type!r} (expected 'avg')"
        return None

    def head_module(self, clf):
        return clf.backbone.get_classifier()

    def features(self, net, x):
        return net.forward_features(x), None  # (B, C, h, w)

    def classify(self, clf, grid, aside, pool_mask):
        if pool_mask is not None:  # the model's own average pool then gives the mean over bird cells
            grid = masked_mean_rescale(grid, pool_mask)
        return clf.backbone.forward_head(grid)  # (B, K)


@register_family("resnet", ResNet)
class ResNetFamily(CNNFamily):
    supports_second_last = True

    def to_second_last(self, net, x):
        x = net.maxpool(net.act1(net.bn1(net.conv1(x))))
        return run_blocks([net.layer1, net.layer2, net.layer3], x, net), None  # (B, C3, h3, w3)

    def after_second_last(self, net, f, aside):
        return run_blocks([net.layer4], f, net), aside  # (B, C, h, w)

    def last_part(self, net):
        return [net.layer4]


@register_family("convnext", ConvNeXt)
class ConvNeXtFamily(CNNFamily):
    supports_second_last = True

    def to_second_last(self, net, x):
        x = net.stem(x)
        for stage in net.stages[:-1]:
            x = stage(x)
        return x, None  # (B, C3, h3, w3)

    def after_second_last(self, net, f, aside):
        return net.norm_pre(net.stages[-1](f)), aside  # (B, C, h, w); the final norm is in ConvNeXt's head

    def last_part(self, net):
        return [net.stages[-1], net.norm_pre]

    def tuned_when_frozen(self, net, second_last):
        """The paper froze every module but `head`, whose norm (before the classifier) trains."""
        return [net.head.norm, *super().tuned_when_frozen(net, second_last)]
