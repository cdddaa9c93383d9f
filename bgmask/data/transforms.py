"""Joint image/mask transforms.

Geometric steps (crops, resizes, flips, affine moves) run on the image and the mask together through
torchvision transforms v2 (`tv_tensors.Mask` uses nearest interpolation and fill 0 = background), so
the mask stays on the bird. Photometric steps (timm's RandAugment colour ops, colour jitter, random
erasing) touch the image only. timm's RandAugment also contains rotate/shear/translate; applied to the
image alone they would move the bird off its mask, so here those moves come from one joint
`RandomAffine` instead and RandAugment keeps its photometric ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import tv_tensors
from torchvision.transforms import v2

from bgmask.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("timm", "cub_original", "flip", "none")
PHOTOMETRIC_RA_OPS = [
    "AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness",
]


@dataclass
class JointTransform:
    """callable(PIL image, mask (H, W) uint8 or None) -> (image (3, S, S) float normalised,
    mask (1, S, S) float {0, 1} or None)."""

    geometric: v2.Transform
    photometric: object | None  # PIL -> PIL, image only
    mean: tuple
    std: tuple
    erasing: object | None = None  # tensor -> tensor, image only

    def __post_init__(self):
        self._to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                      v2.Normalize(self.mean, self.std)])

    def __call__(self, image: Image.Image, mask: np.ndarray | None = None):
        if mask is not None:
            image, mask_t = self.geometric(image, tv_tensors.Mask(torch.from_numpy(mask)[None]))
        else:
            image, mask_t = self.geometric(image), None
        if self.photometric is not None:
            image = self.photometric(image)
        image = self._to_tensor(image)
        if self.erasing is not None:
            image = self.erasing(image)
        if mask_t is not None:
            mask_t = mask_t.as_subclass(torch.Tensor).float()  # (1, S, S)
        return image, mask_t


def build_transform(
    train: bool,
    image_size: int,
    augmentations: str = "timm",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    crop_pct: float = 0.875,
    color_jitter: float = 0.0,
    reprob: float = 0.25,
    rand_augment: str = "rand-m9-mstd0.5-inc1",
) -> JointTransform:
    """Training transforms follow timm's `create_transform` recipe ('timm'), the classic CUB recipe
    ('cub_original': resize + random crop + flip), a flip only, or nothing; evaluation is resize +
    centre crop with `crop_pct` (1.0 = resize only)."""
    if augmentations not in AUGMENTATIONS:
        raise UserError(f"unknown --augmentations_to_use {augmentations!r} (expected one of {', '.join(AUGMENTATIONS)})")
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"--crop_pct must be in (0, 1], got {crop_pct}")
    mean, std = tuple(mean), tuple(std)
    resize = int(round(image_size / crop_pct))
    if not train:
        geo = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])
        return JointTransform(geo, None, mean, std)
    photometric, erasing = None, None
    if augmentations == "timm":
        geo = v2.Compose([
            v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.RandomAffine(degrees=30, translate=(0.1, 0.1), shear=(-15, 15, -15, 15))], p=0.5),
        ])
        hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        photometric = rand_augment_transform(rand_augment, hparams, transforms=PHOTOMETRIC_RA_OPS)
        if reprob > 0:
            erasing = RandomErasing(reprob, mode="pixel", device="cpu")
    elif augmentations == "cub_original":
        geo = v2.Compose([v2.Resize(resize, antialias=True), v2.RandomCrop(image_size), v2.RandomHorizontalFlip()])
    elif augmentations == "flip":
        geo = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), v2.RandomHorizontalFlip()])
    else:
        geo = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    if color_jitter > 0:
        jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter)
        photometric = jitter if photometric is None else v2.Compose([jitter, photometric])
    return JointTransform(geo, photometric, mean, std, erasing)


def denormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) normalised -> [0, 1] pixels."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * s + m
