"""Tiny demo backbones registered in timm's model registry (importing `bgmask.models` registers them).

They exist for the demo pipeline and the tests: CPU-fast, and with a fine final feature grid at 64 px
(8 x 8 for the ResNet and the ViTs) so that late masking has cells to mask. No pretrained weights are
published for them; pretrain one with the demo and pass it back with `--pretrained_file`.

    timm.create_model("bgmask_resnet_tiny", num_classes=10)   # after `import bgmask.models`
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.models.convnext import checkpoint_filter_fn as convnext_filter_fn
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter_fn

__all__: list[str] = []


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 64, 64),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "bgmask_resnet_tiny": _cfg(first_conv="conv1", classifier="fc"),
    "bgmask_convnext_tiny": _cfg(first_conv="stem.0", classifier="head.fc"),
    "bgmask_vit_tiny": _cfg(first_conv="patch_embed.proj", classifier="head", fixed_input_size=True),
    "bgmask_vit_tiny_reg4": _cfg(first_conv="patch_embed.proj", classifier="head", fixed_input_size=True),
})


@register_model
def bgmask_resnet_tiny(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet, BasicBlock layers (1, 1, 1, 1), channels 16-128 (~0.3 M params).
    output_stride=8 (layer3/4 dilated): a 64 px image gives an 8 x 8 final feature map."""
    model_args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128),
                      stem_width=16, output_stride=8)
    return build_model_with_cfg(ResNet, "bgmask_resnet_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def bgmask_convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt, depths (1, 1, 1, 1), dims 16-128, 1 x 1 stem patch (~0.2 M params): a 64 px image gives an
    8 x 8 final feature map (16 x 16 after the second-last stage)."""
    model_args = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), patch_size=1)
    return build_model_with_cfg(ConvNeXt, "bgmask_convnext_tiny", pretrained,
                                pretrained_filter_fn=convnext_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
                                **dict(model_args, **kwargs))


def _tiny_vit(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    model_args = dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0)
    return build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=vit_filter_fn,
                                **dict(model_args, **kwargs))


@register_model
def bgmask_vit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT, patch 8, embed 128, depth 4, 4 heads, 64 px (8 x 8 patch grid, ~0.8 M params)."""
    return _tiny_vit("bgmask_vit_tiny", pretrained, **kwargs)


@register_model
def bgmask_vit_tiny_reg4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """`bgmask_vit_tiny` with 4 register tokens; like DINOv2-reg, the position embedding covers the patch
    tokens only (no_embed_class)."""
    return _tiny_vit("bgmask_vit_tiny_reg4", pretrained, **dict(dict(reg_tokens=4, no_embed_class=True), **kwargs))
