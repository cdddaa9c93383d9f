"""Classifiers (timm backbones + heads) with an optional late-masking forward.

    from bgmask.models import create_classifier
    clf = create_classifier("bgmask_vit_tiny", num_classes=10, head="both")
    logits = clf(images)                         # (B, 3, H, W) -> (B, K)
    logits = clf(images, feature_mask=masks)     # late masking; masks (B, 1, H, W), 1 = bird, 0 = background

Importing this package registers the tiny demo backbones (`small.py`) with timm. What late masking needs to
know about a kind of backbone (ViT, ResNet, ConvNeXt, any other timm CNN) is its registered family
(`families.FAMILIES`); the ViT heads are registered in `heads.HEADS`.
"""

from bgmask.models import small  # noqa: F401  (registers bgmask_* models with timm)
from bgmask.models.classifier import (LATE_MASK_STAGES, Classifier, create_classifier, family_of_arch,  # noqa: F401
                                      resize_mask)
from bgmask.models.families import FAMILIES, BackboneFamily, CNNFamily, family_of, register_family  # noqa: F401
from bgmask.models.heads import HEADS, LATE_POOLS, TokenHead, register_head  # noqa: F401
from bgmask.models.weights import load_pretrained_file, read_state_dict  # noqa: F401

SMALL_MODELS = ("bgmask_resnet_tiny", "bgmask_convnext_tiny", "bgmask_vit_tiny", "bgmask_vit_tiny_reg4")
