"""Joint transforms: every augmentation set keeps the mask on the bird; the `timm` set's RandAugment is timm's,
as `--aa` names it, with its geometric ops moving the mask too; the evaluation crop is the paper's."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from torchvision import transforms as tv1
from torchvision.transforms import v2

from bgmask.args import data_args
from bgmask.data.transforms import (AUGMENTATIONS, GEOMETRIC_OPS, TORCHVISION_RESIZE, BirdMask, JointOp,
                                    build_transform, joint_auto_augment, resize_mask_nearest_exact)
from bgmask.errors import UserError

BIRD, BACKGROUND, FILL = (220, 40, 40), (40, 220, 40), (0, 0, 0)  # FILL: canvas uncovered by a move (mean 0)
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def bird_picture(w=120, h=90, box=(30, 20, 80, 60)):
    """A non-square picture, background one colour and the bird (a rectangle) another; its mask."""
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = BACKGROUND
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = BIRD
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return Image.fromarray(arr), mask


def bird_coloured(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (H, W) bool: pixels nearer the bird's colour than the background's or the fill's."""
    pixels = image.permute(1, 2, 0).reshape(-1, 3) * 255
    palette = torch.tensor([BIRD, BACKGROUND, FILL], dtype=torch.float32)
    return (torch.cdist(pixels, palette).argmin(1) == 0).reshape(image.shape[1:])


def assert_mask_on_bird(image: torch.Tensor, mask: torch.Tensor, edge: int = 2):
    """The mask marks exactly the bird-coloured pixels more than `edge` px from its boundary (there,
    interpolation blends colours), and overall IoU > 0.9 wherever the bird is big enough to measure."""
    m = mask[0].bool()
    bird = bird_coloured(image)
    k = 2 * edge + 1
    near_one = nnf.max_pool2d(m[None, None].float(), k, 1, edge)[0, 0].bool()
    near_zero = nnf.max_pool2d((~m)[None, None].float(), k, 1, edge)[0, 0].bool()
    interior = ~(near_one & near_zero)
    assert torch.equal(bird[interior], m[interior]), f"{(bird != m)[interior].sum().item()} interior pixels disagree"
    if m.sum() >= 100:
        iou = (bird & m).sum().item() / (bird | m).sum().item()
        assert iou > 0.9, iou


def geometry_only(tf):
    """The same transform without its colour steps (they would recolour the bird): timm's RandAugment keeps
    only its geometric ops, so each draw applies some of them."""
    tf.photometric, tf.erasing = None, None
    if tf.augment is not None:
        tf.augment.timm.ops = [op for op in tf.augment.timm.ops if op.geometric]
    return tf


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ the mask follows

@pytest.mark.parametrize("aug", AUGMENTATIONS)
def test_every_set_keeps_mask_on_bird(aug):
    image, mask = bird_picture()
    tf = build_transform(True, 64, aug, mean=ZERO, std=ONE)
    if aug == "timm":
        tf = geometry_only(tf)
    seed_all(0)
    moved = 0
    for _ in range(40):
        out, m = tf(image, mask)
        assert out.shape == (3, 64, 64) and m.shape == (1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
        assert_mask_on_bird(out, m)
        moved += int(m.sum().item())
    assert moved > 0


def test_eval_transform_keeps_mask_on_bird_exactly():
    """Resize + centre crop: the mask (nearest-exact) marks the bird-coloured pixels up to its 1-px rim (the
    antialiased resize blends a rim pixel about half and half)."""
    image, mask = bird_picture()
    for size, crop_pct in [(64, 1.0), (48, 0.875), (90, 1.0)]:
        out, m = build_transform(False, size, mean=ZERO, std=ONE, crop_pct=crop_pct)(image, mask)
        assert_mask_on_bird(out, m, edge=1)


def test_bird_mask_resize_is_nearest_exact_pinned():
    """The BirdMask resize takes the source pixel under each output pixel's centre, the same pixels on every
    supported torchvision. Pinned on tiny masks: plain NEAREST (what torchvision 0.26's `resize_mask` does,
    having no `interpolation`) would give the 2x2 block and the even rows/columns instead."""
    plus = BirdMask(torch.tensor([[[0, 0, 0], [0, 1, 0], [0, 0, 0]]], dtype=torch.uint8))  # (1, 3, 3)
    up = v2.functional.resize(plus, [5, 5])
    assert type(up) is BirdMask and up.dtype == torch.uint8
    expected = torch.zeros(1, 5, 5, dtype=torch.uint8)
    expected[0, 2, 2] = 1  # source rows/cols floor((i + 0.5) * 3 / 5) = 0, 0, 1, 2, 2
    assert torch.equal(up.as_subclass(torch.Tensor), expected)

    labels = BirdMask(torch.arange(24, dtype=torch.uint8).reshape(1, 4, 6))
    down = v2.functional.resize(labels, [2, 3])  # source rows 1, 3; columns 1, 3, 5
    assert down.as_subclass(torch.Tensor).tolist() == [[[7, 9, 11], [19, 21, 23]]]
    crop = v2.functional.resized_crop(labels, 0, 2, 4, 4, [2, 2])  # columns 2-5 -> 3, 5
    assert crop.as_subclass(torch.Tensor).tolist() == [[[9, 11], [21, 23]]]
    # PIL's NEAREST is the same pixel grid (the resized image's edge is where the mask's is)
    pil = Image.fromarray(labels[0].numpy()).resize((3, 2), Image.Resampling.NEAREST)
    assert np.array(pil).tolist() == down[0].tolist()
    assert resize_mask_nearest_exact(labels[0], [2, 3]).tolist() == down[0].tolist()  # (H, W) in, (h, w) out


@pytest.mark.parametrize("name", sorted(GEOMETRIC_OPS - {"TranslateX", "TranslateY"}))
def test_randaugment_geometric_op_moves_mask_with_image(name):
    """One of timm's geometric ops, forced (p = 1) at m9: the mask moves, and with the image."""
    tf = build_transform(True, 64, "timm", mean=ZERO, std=ONE, aa="rand-m9-mstd0.5-inc1")
    op = next(op for op in tf.augment.ops if op.name == name)
    op.op.prob = 1.0
    image, mask = bird_picture(64, 64, (16, 12, 44, 40))
    for seed in range(5):
        seed_all(seed)
        out, out_mask = op((image, Image.fromarray(mask)))
        out_mask = np.array(out_mask)
        assert (out_mask != mask).sum() > 20, "the mask did not move"
        assert_mask_on_bird(v2.functional.pil_to_tensor(out).float() / 255, torch.from_numpy(out_mask)[None])


def test_joint_op_image_is_timms_op():
    """A JointOp's image is timm's op on the same draws, and `random` ends where timm's op leaves it."""
    aug = joint_auto_augment("rand-m9-mstd0.5-inc1", 64)
    image, mask = bird_picture(64, 64, (16, 12, 44, 40))
    for op in aug.ops:
        op.op.prob = 1.0
        seed_all(3)
        alone = op.op(image)
        after = random.getstate()
        seed_all(3)
        joint, _ = op((image, Image.fromarray(mask)))
        assert np.array_equal(np.array(alone), np.array(joint)), op.name
        assert random.getstate() == after, op.name


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd1-mmax12", "rand-m9-tweights", "v0"])
def test_auto_augment_stage_equals_timms(aa):
    """The image out of the joint auto-augment stage equals timm's create_transform stage, draw for draw."""
    mean = (0.485, 0.456, 0.406)
    timm_tf = create_transform(64, is_training=True, auto_augment=aa, interpolation="bicubic", mean=mean,
                               std=ONE, re_prob=0.0)
    timm_augment = timm_tf.transforms[2]  # RandomResizedCrop, flip, auto-augment, ...
    ours = joint_auto_augment(aa, 64, mean, "bicubic")
    assert type(ours.timm) is type(timm_augment)
    image, mask = bird_picture(64, 64, (16, 12, 44, 40))
    compared = 0
    for seed in range(30):
        seed_all(seed)
        try:
            expected = timm_augment(image)
        except ValueError:  # timm's Posterize at 0 bits, which this Pillow refuses (bgmask: a black image)
            continue
        seed_all(seed)
        got, _ = ours(image, torch.from_numpy(mask)[None])
        assert np.array_equal(np.array(expected), np.array(got)), seed
        compared += 1
    assert compared >= 20


def test_posterize_to_zero_bits_is_black():
    aug = joint_auto_augment("rand-m10-inc1", 64)
    op = next(op for op in aug.ops if op.name == "PosterizeIncreasing")
    op.op.prob = 1.0
    out, _ = op((Image.new("RGB", (8, 8), (200, 100, 50)), None))
    assert np.array(out).max() == 0


# ------------------------------------------------------------------------------ --aa as timm reads it

def test_inc1_uses_timms_increasing_ops():
    names = lambda aa: {op.name for op in joint_auto_augment(aa, 64).ops}  # noqa: E731
    inc, plain = names("rand-m9-mstd0.5-inc1"), names("rand-m9-mstd0.5")
    increasing = {"PosterizeIncreasing", "SolarizeIncreasing", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing"}
    assert increasing <= inc and not increasing & plain
    assert {"Posterize", "Solarize", "Color"} <= plain
    assert {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"} <= inc & plain


def test_inc1_solarizes_harder_at_m9():
    """At m9, Solarize inverts only pixels above 230; SolarizeIncreasing all above 26."""
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1)))
    changed = {}
    for aa, name in [("rand-m9-inc1", "SolarizeIncreasing"), ("rand-m9", "Solarize")]:
        op = next(op for op in joint_auto_augment(aa, 64).ops if op.name == name)
        op.op.prob = 1.0
        out, _ = op((ramp.convert("RGB"), None))
        changed[name] = (np.array(out)[..., 0] != np.array(ramp)).mean()
    assert changed["SolarizeIncreasing"] > 0.85 and changed["Solarize"] < 0.15


@pytest.mark.parametrize("aa", ["rand-m9-foo", "rand-mX", "rand-m9.5", "rand-tnope", "augmix-m5", "bogus",
                                "randx-m9", "v0-m3", "rand-m9-"])
def test_bad_aa_is_one_clear_user_error(aa):
    with pytest.raises(UserError) as err:
        build_transform(True, 64, "timm", aa=aa)
    message = str(err.value)
    assert message.startswith(f"--aa {aa!r}: ") and "\n" not in message and "expected rand" in message


def test_aa_none_turns_auto_augment_off_and_colour_jitter_on():
    """As timm: colour jitter only without an auto-augment policy (or with a '3a' one)."""
    default = build_transform(True, 64, "timm")
    assert default.augment is not None and default.photometric is None
    off = build_transform(True, 64, "timm", aa="none", color_jitter=0.3)
    assert off.augment is None and isinstance(off.photometric, v2.ColorJitter)
    assert off.photometric.brightness == (0.7, 1.3) and off.photometric.saturation == (0.7, 1.3)
    assert isinstance(build_transform(True, 64, "timm", aa="rand-m9-t3a").photometric, v2.ColorJitter)
    assert build_transform(True, 64, "timm", aa="none", color_jitter=0.0).photometric is None


def test_timm_flags_reach_timms_pieces():
    tf = build_transform(True, 64, "timm", reprob=0.5, remode="rand", recount=3, train_interpolation="bilinear")
    assert (tf.erasing.probability, tf.erasing.mode, tf.erasing.max_count) == (0.5, "rand", 3)
    crop = tf.geometric.transforms[0]
    assert crop.interpolation == v2.InterpolationMode.BILINEAR and crop.scale == (0.08, 1.0)
    assert all(op.op.kwargs["resample"] == Image.Resampling.BILINEAR for op in tf.augment.ops)
    assert build_transform(True, 64, "timm", reprob=0.0).erasing is None
    rnd = build_transform(True, 64, "timm", train_interpolation="random")
    assert isinstance(rnd.geometric.transforms[0], v2.RandomChoice)
    assert all(isinstance(op.op.kwargs["resample"], tuple) for op in rnd.augment.ops)  # timm's random choice
    assert isinstance(rnd.augment.timm, RandAugment)


@pytest.mark.parametrize("flags, pattern", [
    (dict(remode="zero"), "--remode 'zero'"), (dict(recount=0), "--recount 0"), (dict(reprob=1.5), "--reprob 1.5"),
    (dict(train_interpolation="cubic"), "--train_interpolation 'cubic'"),
    (dict(imagenet_default_mean_and_std=False), "--imagenet_default_mean_and_std is not supported.*train and eval"),
])
def test_bad_timm_flags_are_clear(flags, pattern):
    with pytest.raises(UserError, match=pattern):
        build_transform(True, 64, "timm", **flags)


# ------------------------------------------------------------------------------ deterministic crops

def test_eval_transform_is_resize_then_center_crop():
    """The paper's evaluation: torchvision Resize(image_size) (shorter side) + CenterCrop(image_size), computed
    here independently with torchvision's v1 transforms on a non-square image; crop_pct 0.875 is timm's."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (97, 131, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for size, crop_pct, resize in [(64, 1.0, 64), (64, 0.875, 73), (97, 1.0, 97)]:
        reference = tv1.Compose([tv1.Resize(resize), tv1.CenterCrop(size), tv1.ToTensor(), tv1.Normalize(mean, std)])
        ours, _ = build_transform(False, size, mean=mean, std=std, crop_pct=crop_pct)(image)
        assert ours.shape == (3, size, size)
        torch.testing.assert_close(ours, reference(image), rtol=0, atol=1e-6)


def test_torchvision_set_is_torchvisions_eval_preset():
    """At 224 px: torchvision's ImageClassification(crop_size=224) (resize 256, bilinear), no randomness."""
    from torchvision.transforms._presets import ImageClassification

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (300, 410, 3), dtype=np.uint8))
    ours, _ = build_transform(True, 224, "torchvision")(image)
    torch.testing.assert_close(ours, ImageClassification(crop_size=224)(image), rtol=0, atol=1e-5)
    assert int(224 * TORCHVISION_RESIZE) == 256
    again, _ = build_transform(True, 224, "torchvision")(image)
    assert torch.equal(ours, again)


def test_photometric_steps_leave_mask_untouched():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 6:18] = 1
    tf = build_transform(True, 32, "timm", aa="rand-m9-mstd0.5-inc1-n4", reprob=1.0)
    tf.geometric = v2.Identity()
    tf.augment.timm.ops = [op for op in tf.augment.timm.ops if not op.geometric]
    for seed in range(10):
        seed_all(seed)
        _, m = tf(image, mask)
        assert torch.equal(m[0], torch.from_numpy(mask).float())


# ------------------------------------------------------------------------------ flags

def test_data_flags_have_the_papers_defaults():
    cfg = data_args().parse_args([])
    assert (cfg.augmentations_to_use, cfg.image_size, cfg.crop_pct) == ("timm", 224, 1.0)
    assert (cfg.aa, cfg.train_interpolation, cfg.color_jitter) == ("rand-m9-mstd0.5-inc1", "bicubic", 0.4)
    assert (cfg.reprob, cfg.remode, cfg.recount, cfg.imagenet_default_mean_and_std) == (0.25, "pixel", 1, True)
    assert data_args().parse_args(["--imagenet_default_mean_and_std"]).imagenet_default_mean_and_std is False


def test_joint_op_wraps_every_op_once():
    tf = build_transform(True, 64, "timm")
    assert all(isinstance(op, JointOp) and not isinstance(op.op, JointOp) for op in tf.augment.ops)
    assert {op.name for op in tf.augment.ops if op.geometric} == {"Rotate", "ShearX", "ShearY", "TranslateXRel",
                                                                   "TranslateYRel"}
