"""Joint image/mask transforms: the paper's training augmentation sets and its evaluation transform.

Masks are `BirdMask`s (a `tv_tensors.Mask`; 1 = bird, 0 = background). Every geometric step moves the image
and the mask together with the same random parameters; the mask is resampled nearest-neighbour and filled
with 0 = background where a move uncovers the canvas. Photometric steps (colour ops, colour jitter, random
erasing) touch the image only.

Training sets (`--augmentations_to_use`), after the paper's `engine/transforms_cub.py`:
- `timm`: timm's `create_transform(is_training=True)`: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3,
  `--train_interpolation`) -> horizontal flip -> timm's RandAugment / AutoAugment as `--aa` names it ->
  ColorJitter(`--color_jitter`) only where timm applies it (`--aa none`, or a '3a' policy) -> normalise ->
  RandomErasing(`--reprob`, `--remode`, `--recount`). timm builds the policy and draws the ops, magnitudes
  and signs; its geometric ops (Rotate, ShearX/Y, TranslateX/Y[Rel]) replay the same draws on the mask.
  One deviation: at --image_size <= 32 the paper's code swaps the crop for RandomCrop(padding=4) (a CIFAR
  leftover); bgmask keeps RandomResizedCrop at every size.
- `cub_original`: Resize(image_size) -> hflip -> ColorJitter(brightness 0.1) -> RandomAffine(90 degrees,
  translate 0.2, scale 0.8-1.2; nearest, fill 0) -> RandomCrop(image_size). The brightness factor runs after
  the geometry here: it commutes with nearest resampling and the black fill, so the images are distributed
  as in the paper.
- `torchvision`: the paper loads the weights' torchvision EVAL preset here (no random augmentation):
  Resize(floor(image_size * 256 / 224)) -> CenterCrop(image_size), bilinear. At the paper's 224 that is
  torchvision's `ImageClassification` default (resize 256, crop 224); other sizes scale with --image_size
  (the paper ignored --image_size here, and its ResNet/ConvNeXt presets resize to 232-236).
- `flip`, `none` (bgmask's): Resize(image_size) -> CenterCrop(image_size) (-> hflip).

Evaluation: Resize(floor(image_size / crop_pct)) (shorter side, bilinear, antialias) -> CenterCrop(image_size).
crop_pct 1.0 (the default) is the paper's Resize(image_size) + CenterCrop(image_size); 0.875 is timm's crop.

Decoding: a transform whose first step resizes the shorter side to R (every set but `timm`, whose random
crop reads full-resolution pixels) declares `decode_min_side = R`, and the dataset decodes a JPEG at least
twice that size at 1/2, 1/4 or 1/8 scale in libjpeg (`--decode_full` turns it off), mask reduced alike.
Normalisation: train and eval use the same mean/std (the model's). The paper's
`--imagenet_default_mean_and_std` switched the timm TRAIN transform alone to Inception mean/std 0.5 while
evaluation kept ImageNet's; bgmask refuses it, since early masking's fill and the online segmenter read
the one mean/std of the run.
"""

from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment, auto_augment_transform, posterize, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_interp_mode, str_to_pil_interp
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from bgmask.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_AA = "rand-m9-mstd0.5-inc1"
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random")
ERASE_MODES = ("pixel", "rand", "const")
TORCHVISION_RESIZE = 256 / 224  # torchvision ImageClassification: resize 256, crop 224
# timm's ops that move pixels; the others are colour ops (image only)
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"})
RAND_KEYS = ("mstd", "mmax", "inc", "m", "n", "p")  # the sections timm's rand_augment_transform reads
RAND_OP_SETS = ("weights", "3aw", "3a")  # 'rand-t<name>'
AA_POLICIES = ("v0", "v0r", "original", "originalr", "3a")  # timm's auto_augment_policy names
AA_GRAMMAR = ("rand[-m<int>][-n<int>][-p<float>][-mstd<float>][-mmax<int>][-inc<0|1>][-t<weights|3aw|3a>], "
              f"{'|'.join(AA_POLICIES)}[-mstd<float>], or none")
MASK_OP_KWARGS = {"fillcolor": 0, "resample": Image.Resampling.NEAREST}


# ------------------------------------------------------------------------------------------ masks

class BirdMask(tv_tensors.Mask):
    """(1, H, W) uint8, 1 = bird, 0 = background. Resizes take the source pixel under each output pixel's
    centre (nearest-exact, PIL's pixel grid, so the mask's edge sits where the resized image's edge is);
    every other geometric kernel is `tv_tensors.Mask`'s (nearest, fill 0)."""


def resize_mask_nearest_exact(mask: torch.Tensor, size, max_size: int | None = None) -> torch.Tensor:
    """(..., H, W) -> (..., h, w), nearest-exact. `F.resize_mask` takes no `interpolation` before torchvision
    0.27 (it is always NEAREST there), so this calls `F.resize_image` (what `resize_mask` itself calls, on
    every torchvision bgmask supports): one code path, the same pixels on each version."""
    squeeze = mask.ndim < 3  # resize_image reads (C, H, W)
    out = F.resize_image(mask.unsqueeze(0) if squeeze else mask, size,
                         interpolation=v2.InterpolationMode.NEAREST_EXACT, max_size=max_size)
    return out.squeeze(0) if squeeze else out


@F.register_kernel(F.resize, BirdMask)
def _resize_bird_mask(mask, size, interpolation=None, max_size=None, antialias=None):
    out = resize_mask_nearest_exact(mask.as_subclass(torch.Tensor), size, max_size=max_size)
    return tv_tensors.wrap(out, like=mask)


@F.register_kernel(F.resized_crop, BirdMask)
def _resized_crop_bird_mask(mask, top, left, height, width, size, interpolation=None, antialias=None):
    out = F.crop_mask(mask.as_subclass(torch.Tensor), top, left, height, width)
    return _resize_bird_mask(tv_tensors.wrap(out, like=mask), size)


# ------------------------------------------------------------------------- timm's auto-augment, joint

def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize; keeping 0 bits gives a black image, as Pillow < 11 did (timm's PosterizeIncreasing
    reaches 0 bits at magnitude 10, e.g. m9 + mstd noise, and newer Pillow refuses 0)."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep)


class JointOp:
    """One of timm's `AugmentOp`s on an (image, mask) pair. The image goes through timm's op unchanged. A
    geometric op is first replayed on the mask (PIL 'L', nearest, fill 0) from the same state of `random`,
    so it draws the same probability, magnitude and sign; `random` then ends where timm's op alone leaves it."""

    def __init__(self, op):
        if op.aug_fn is posterize:
            op.aug_fn = posterize_any_bits
        self.op = op
        self.name = op.name
        self.geometric = op.name in GEOMETRIC_OPS

    def __call__(self, pair):
        image, mask = pair
        if self.geometric and mask is not None:
            mask_op = copy.copy(self.op)
            mask_op.kwargs = MASK_OP_KWARGS
            state = random.getstate()
            mask = mask_op(mask)
            random.setstate(state)
        return self.op(image), mask

    def __repr__(self):
        return f"Joint{self.op!r}"


class JointAutoAugment:
    """timm's RandAugment / AutoAugment (as timm builds it from `--aa`) on (PIL image, BirdMask or None):
    timm's own op choice, with each op wrapped in a `JointOp`."""

    def __init__(self, timm_augment):
        self.timm = timm_augment
        if isinstance(timm_augment, RandAugment):
            timm_augment.ops = [JointOp(op) for op in timm_augment.ops]
        else:
            timm_augment.policy = [[JointOp(op) for op in sub] for sub in timm_augment.policy]

    @property
    def ops(self) -> list[JointOp]:
        if isinstance(self.timm, RandAugment):
            return list(self.timm.ops)
        return [op for sub in self.timm.policy for op in sub]

    def __call__(self, image: Image.Image, mask: BirdMask | None = None):
        pil_mask = None
        if mask is not None:
            pil_mask = Image.fromarray(np.ascontiguousarray(mask.as_subclass(torch.Tensor)[0].numpy()))
        image, pil_mask = self.timm((image, pil_mask))
        if pil_mask is not None:
            mask = BirdMask(torch.from_numpy(np.array(pil_mask))[None])
        return image, mask


def _aa_error(aa: str, why: str) -> UserError:
    return UserError(f"--aa {aa!r}: {why}; expected {AA_GRAMMAR}")


def check_aa(aa: str) -> None:
    """Refuse what timm would reject, and what it would silently skip (an unknown section or op set)."""
    head, *sections = aa.split("-")
    if head.startswith("augmix"):
        raise _aa_error(aa, "AugMix blends differently moved copies of the image, which no single mask can follow")
    if head != "rand" and head not in AA_POLICIES:
        raise _aa_error(aa, f"unknown policy {head!r}")
    keys = RAND_KEYS if head == "rand" else ("mstd",)
    for section in sections:
        key = re.split(r"(\d.*)", section)[0]
        op_set = head == "rand" and section.startswith("t") and section[1:] in RAND_OP_SETS
        if not op_set and (key not in keys or key == section):
            raise _aa_error(aa, f"unknown section {section!r}")


def joint_auto_augment(aa: str | None, image_size: int, mean=IMAGENET_MEAN,
                       interpolation: str = "bicubic") -> JointAutoAugment | None:
    """The `--aa` policy with the hyper-parameters timm's `create_transform` gives it (translate_const
    0.45 x image_size, fill = the mean colour, `--train_interpolation` unless 'random'); None for none/''."""
    aa = (aa or "").strip()
    if aa.lower() in ("", "none"):
        return None
    check_aa(aa)
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean)}
    if interpolation != "random":
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    make = rand_augment_transform if aa.startswith("rand") else auto_augment_transform
    try:
        return JointAutoAugment(make(aa, hparams))
    except (AssertionError, ValueError, KeyError) as e:
        raise _aa_error(aa, f"timm cannot parse it ({type(e).__name__}: {e})") from None


# -------------------------------------------------------------------------------- the transform

@dataclass
class JointTransform:
    """callable(PIL image, mask (H, W) uint8 {0, 1} or None) -> (image (3, S, S) float normalised,
    mask (1, S, S) float {0, 1} or None). Steps: geometric (image + mask) -> augment (timm's
    auto-augment, image + mask) -> photometric (image) -> to tensor, normalise -> erasing (image)."""

    geometric: v2.Transform
    photometric: object | None  # PIL -> PIL, image only
    mean: tuple
    std: tuple
    erasing: object | None = None  # tensor -> tensor, image only
    augment: JointAutoAugment | None = None
    # the shorter side the first resize brings the image to: a JPEG decoded reduced to no less than this
    # (see CUBDataset) loses nothing that resize keeps; None = the first step crops at full resolution
    decode_min_side: int | None = None

    def __post_init__(self):
        self._to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                      v2.Normalize(self.mean, self.std)])

    def __call__(self, image: Image.Image, mask: np.ndarray | None = None):
        if mask is not None:
            image, mask_t = self.geometric(image, BirdMask(torch.from_numpy(np.asarray(mask, np.uint8))[None]))
        else:
            image, mask_t = self.geometric(image), None
        if self.augment is not None:
            image, mask_t = self.augment(image, mask_t)
        if self.photometric is not None:
            image = self.photometric(image)
        image = self._to_tensor(image)
        if self.erasing is not None:
            image = self.erasing(image)
        if mask_t is not None:
            mask_t = mask_t.as_subclass(torch.Tensor).float()  # (1, S, S)
        return image, mask_t


@dataclass(frozen=True)
class TimmFlags:
    """The flags of the `timm` set, with the paper's defaults."""

    aa: str | None = DEFAULT_AA
    train_interpolation: str = "bicubic"
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1

    def __post_init__(self):
        checks = [(self.train_interpolation in INTERPOLATIONS, "--train_interpolation", self.train_interpolation,
                   f"one of {', '.join(INTERPOLATIONS)}"),
                  (self.remode in ERASE_MODES, "--remode", self.remode, f"one of {', '.join(ERASE_MODES)}"),
                  (0.0 <= self.reprob <= 1.0, "--reprob", self.reprob, "a probability in [0, 1]"),
                  (self.recount >= 1, "--recount", self.recount, "an integer >= 1"),
                  (self.color_jitter >= 0.0, "--color_jitter", self.color_jitter, "a number >= 0")]
        for ok, flag, value, expected in checks:
            if not ok:
                raise UserError(f"{flag} {value!r}: expected {expected}")


def resize_center_crop(image_size: int, resize: int) -> v2.Transform:
    """Shorter side -> `resize` (bilinear, antialias), then the central image_size x image_size."""
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])


def random_resized_crop(image_size: int, interpolation: str) -> v2.Transform:
    """timm's RandomResizedCropAndInterpolation; 'random' picks bilinear or bicubic per image."""
    modes = ("bilinear", "bicubic") if interpolation == "random" else (interpolation,)
    crops = [v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                  interpolation=str_to_interp_mode(m), antialias=True) for m in modes]
    return crops[0] if len(crops) == 1 else v2.RandomChoice(crops)


def timm_set(image_size: int, mean: tuple, std: tuple, flags: TimmFlags) -> JointTransform:
    geometric = v2.Compose([random_resized_crop(image_size, flags.train_interpolation), v2.RandomHorizontalFlip()])
    augment = joint_auto_augment(flags.aa, image_size, mean, flags.train_interpolation)
    jitter = None
    if flags.color_jitter > 0 and (augment is None or "3a" in flags.aa):  # timm: no jitter beside AA unless '3a'
        jitter = v2.ColorJitter(flags.color_jitter, flags.color_jitter, flags.color_jitter)
    erasing = None
    if flags.reprob > 0:
        erasing = RandomErasing(flags.reprob, mode=flags.remode, max_count=flags.recount, device="cpu")
    return JointTransform(geometric, jitter, mean, std, erasing, augment)


def cub_original_set(image_size: int, mean: tuple, std: tuple, flags: TimmFlags) -> JointTransform:
    geometric = v2.Compose([v2.Resize(image_size, antialias=True), v2.RandomHorizontalFlip(),
                            v2.RandomAffine(degrees=90, translate=(0.2, 0.2), scale=(0.8, 1.2)),
                            v2.RandomCrop(image_size)])
    return JointTransform(geometric, v2.ColorJitter(brightness=0.1), mean, std, decode_min_side=image_size)


def torchvision_set(image_size: int, mean: tuple, std: tuple, flags: TimmFlags) -> JointTransform:
    resize = math.floor(image_size * TORCHVISION_RESIZE)
    return JointTransform(resize_center_crop(image_size, resize), None, mean, std, decode_min_side=resize)


def flip_set(image_size: int, mean: tuple, std: tuple, flags: TimmFlags) -> JointTransform:
    geometric = v2.Compose([resize_center_crop(image_size, image_size), v2.RandomHorizontalFlip()])
    return JointTransform(geometric, None, mean, std, decode_min_side=image_size)


def none_set(image_size: int, mean: tuple, std: tuple, flags: TimmFlags) -> JointTransform:
    return JointTransform(resize_center_crop(image_size, image_size), None, mean, std, decode_min_side=image_size)


TRAIN_SETS = {"timm": timm_set, "cub_original": cub_original_set, "torchvision": torchvision_set,
              "flip": flip_set, "none": none_set}
AUGMENTATIONS = tuple(TRAIN_SETS)


def build_transform(train: bool, image_size: int, augmentations: str = "timm", mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, crop_pct: float = 1.0, *, imagenet_default_mean_and_std: bool = True,
                    **timm_flags) -> JointTransform:
    """Training: the `augmentations` set (see the module docstring); `timm_flags` are `TimmFlags`' fields
    (aa, train_interpolation, color_jitter, reprob, remode, recount), read by the `timm` set. Evaluation:
    Resize(floor(image_size / crop_pct)) + CenterCrop(image_size)."""
    if augmentations not in TRAIN_SETS:
        raise UserError(f"unknown --augmentations_to_use {augmentations!r} (expected one of {', '.join(TRAIN_SETS)})")
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"--crop_pct must be in (0, 1], got {crop_pct}")
    mean, std = tuple(mean), tuple(std)
    if not train:
        resize = math.floor(image_size / crop_pct)
        return JointTransform(resize_center_crop(image_size, resize), None, mean, std, decode_min_side=resize)
    if not imagenet_default_mean_and_std:
        raise UserError("--imagenet_default_mean_and_std is not supported: in the paper it switched the training "
                        "transform alone to Inception mean/std 0.5 while evaluation kept ImageNet's; bgmask always "
                        "normalises train and eval alike with the model's mean/std (drop the flag)")
    return TRAIN_SETS[augmentations](image_size, mean, std, TimmFlags(**timm_flags))


def denormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) normalised -> [0, 1] pixels."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * s + m
