"""Late masking in `Classifier.forward(x, feature_mask)`: outputs against references computed independently
(by hand from the feature tensors, and by forward hooks on a baseline forward), gradients, all-ones masks.

Masks here are constant on 8 x 8-pixel blocks of a 64 px image, so their value on the 8 x 8 (or 16 x 16)
feature grid is unambiguous: the reference takes it by average pooling, the model by nearest-exact resizing.
Mask convention: 1 = bird, 0 = background.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import ResNet

from bgmask.errors import UserError
from bgmask.models import LATE_MASK_STAGES, LATE_POOLS, SMALL_MODELS, create_classifier, resize_mask

CASES = [(a, s, p) for a in SMALL_MODELS for s in LATE_MASK_STAGES for p in LATE_POOLS]
B, SIZE = 2, 64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # one torch thread comes from conftest


def block_mask(kind: str = "binary", seed: int = 0) -> torch.Tensor:
    """(B, 1, 64, 64) mask constant on 8 x 8 blocks. kind: binary | soft | empty | ones."""
    g = torch.Generator().manual_seed(seed)
    cells = (torch.rand(B, 1, 8, 8, generator=g) > 0.5).float()
    cells[:, :, 0, 0], cells[:, :, 0, 1] = 1.0, 0.0  # at least one bird and one background cell
    if kind == "soft":  # some exact 0s and 1s, the rest strictly between
        soft = 0.1 + 0.8 * torch.rand(B, 1, 8, 8, generator=g)
        cells = torch.where(torch.rand(B, 1, 8, 8, generator=g) < 0.5, soft, cells)
        cells[:, :, 0, 0], cells[:, :, 0, 1] = 1.0, 0.0
    elif kind == "empty":
        cells = torch.zeros_like(cells)
    elif kind == "ones":
        cells = torch.ones_like(cells)
    return cells.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def on_grid(mask: torch.Tensor, hw) -> torch.Tensor:
    return F.adaptive_avg_pool2d(mask, tuple(hw))  # exact for block-constant masks


def images():
    return torch.randn(B, 3, SIZE, SIZE)


# ------------------------------------------------------------------------------ reference by hooks


def is_vit(clf) -> bool:
    return clf.family.name == "vit"


# per family: the modules whose outputs late masking multiplies by the mask at stage ("last", "second_last")
MASKED_MODULES = {
    "vit": lambda net: (net.norm, net.blocks[-2]),  # "last": the tokens after the final norm
    "resnet": lambda net: (net.layer4, net.layer3),
    "convnext": lambda net: (net.stages[-1], net.stages[-2]),
}


def masked_module(clf, stage):
    """The module whose output late masking multiplies by the mask."""
    last, second_last = MASKED_MODULES[clf.family.name](clf.backbone)
    return last if stage == "last" else second_last


def grid_hw(clf, out):
    return clf.backbone.patch_embed.grid_size if is_vit(clf) else out.shape[-2:]


def mul_map(clf, out, m):
    """Multiply the spatial map by m (B, 1, h, w): a CNN map, or the patch tokens of a ViT (prefix kept)."""
    if not is_vit(clf):
        return out * m
    P = clf.backbone.num_prefix_tokens
    return torch.cat([out[:, :P], out[:, P:] * m.flatten(2).transpose(1, 2)], dim=1)


def mean_scale(m):
    """(B, 1, h, w) filled with h*w / sum(m): the mean of f*m*scale is the mean over bird cells."""
    return (m.shape[-2] * m.shape[-1] / m.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)).expand_as(m)


def cells(clf, like, cond):
    """Bool tensor shaped like a map / token tensor: True at the spatial positions where cond (B, 1, h, w)."""
    c = cond.float()
    if not is_vit(clf):
        return c.expand_as(like) > 0
    z = torch.zeros_like(like)
    z[:, clf.backbone.num_prefix_tokens:] = c.flatten(2).transpose(1, 2)
    return z > 0


def hooked_reference(clf, x, mask, stage, pool, leaf=False):
    """Baseline forward (no feature_mask) of the same weights, with forward hooks that do the masking.
    leaf=True: the masked map f * m becomes a leaf tensor, returned for gradient checks."""
    leaves, handles = [], []

    def mask_hook(mod, inp, out):
        m = on_grid(mask, grid_hw(clf, out))
        fm = mul_map(clf, out, m)
        if leaf:
            fm = fm.detach().requires_grad_()
            leaves.append(fm)
        if stage == "last" and pool == "masked_mean":
            fm = mul_map(clf, fm, mean_scale(m))
        return fm

    def pool_hook(mod, inp, out):  # second_last + masked_mean: the final map is pooled over bird cells
        m = on_grid(mask, grid_hw(clf, out))
        return mul_map(clf, out, m * mean_scale(m))

    handles.append(masked_module(clf, stage).register_forward_hook(mask_hook))
    if stage == "second_last" and pool == "masked_mean":
        handles.append(masked_module(clf, "last").register_forward_hook(pool_hook))
    try:
        out = clf(x)
    finally:
        for h in handles:
            h.remove()
    return (out, leaves[0]) if leaf else out


@pytest.mark.parametrize("arch,stage,pool", CASES)
@pytest.mark.parametrize("kind", ["binary", "soft", "empty"])
def test_late_masking_matches_hooked_reference(arch, stage, pool, kind):
    clf = create_classifier(arch, 3, late_mask_stage=stage, late_pool=pool).eval()
    x, mask = images(), block_mask(kind)
    out = clf(x, feature_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, hooked_reference(clf, x, mask, stage, pool), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ reference by hand


def cnn_logits(net, pooled):
    if isinstance(net, ResNet):
        return F.linear(pooled, net.fc.weight, net.fc.bias)
    head = net.head  # ConvNeXt: pool -> LayerNorm -> fc
    normed = F.layer_norm(pooled, pooled.shape[-1:], head.norm.weight, head.norm.bias, head.norm.eps)
    return F.linear(normed, head.fc.weight, head.fc.bias)


@pytest.mark.parametrize("arch", SMALL_MODELS)
@pytest.mark.parametrize("pool", LATE_POOLS)
@pytest.mark.parametrize("kind", ["binary", "empty"])
def test_last_stage_by_hand(arch, pool, kind):
    clf = create_classifier(arch, 3, late_pool=pool).eval()
    x, mask = images(), block_mask(kind)
    m = on_grid(mask, (8, 8))[:, 0]  # (B, 8, 8)
    with torch.no_grad():
        if is_vit(clf):
            tokens = clf.backbone.forward_features(x)  # (B, N, D)
            P = clf.backbone.num_prefix_tokens
            patches, w = tokens[:, P:], m.flatten(1)[..., None]  # (B, 64, D), (B, 64, 1), row-major cells
            if pool == "mean":
                gap = (patches * w).mean(1)
            else:
                gap = (patches * w).sum(1) / w.sum(1).clamp_min(1e-6)
            feats = torch.cat([tokens[:, 0], gap], dim=-1)  # default head "both"
            expected = F.linear(feats, clf.head.linear.weight, clf.head.linear.bias)
        else:
            f = clf.backbone.forward_features(x)  # (B, C, 8, 8)
            fm = f * m[:, None]
            pooled = fm.mean((2, 3)) if pool == "mean" else fm.sum((2, 3)) / m[:, None].sum((2, 3)).clamp_min(1e-6)
            expected = cnn_logits(clf.backbone, pooled)
        out = clf(x, feature_mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if kind == "empty" and pool == "mean" and not is_vit(clf):  # all cells zero: only the head's constants
        torch.testing.assert_close(out, cnn_logits(clf.backbone, torch.zeros_like(pooled)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("arch,stage,pool", CASES)
def test_gradient_is_upstream_times_mask(arch, stage, pool):
    """Soft mask: skipping the mask in the backward pass, or applying it twice, fails this test."""
    clf = create_classifier(arch, 3, late_mask_stage=stage, late_pool=pool).eval()
    x, mask = images(), block_mask("soft")
    w = torch.randn(B, 3)

    leaves = []

    def leaf_hook(mod, inp, out):  # the unmasked map becomes a leaf; the model masks it
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    h = masked_module(clf, stage).register_forward_hook(leaf_hook)
    try:
        out = clf(x, feature_mask=mask)
    finally:
        h.remove()
    (out * w).sum().backward()
    grad = leaves[0].grad

    ref_out, ref_leaf = hooked_reference(clf, x, mask, stage, pool, leaf=True)  # leaf = f * m
    (ref_out * w).sum().backward()
    upstream = ref_leaf.grad  # gradient w.r.t. the masked map

    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    m = on_grid(mask, grid_hw(clf, leaves[0]))
    torch.testing.assert_close(grad, mul_map(clf, upstream, m), rtol=1e-5, atol=1e-6)
    # background cells: exactly zero; bird cells: the gradient of the unmasked computation
    bg, bird = cells(clf, grad, m == 0), cells(clf, grad, m == 1)
    assert bg.any() and bird.any()
    assert (grad[bg] == 0).all()
    torch.testing.assert_close(grad[bird], upstream[bird], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grad, upstream, atol=1e-4)  # the soft mask did scale the gradient


@pytest.mark.parametrize("arch,stage,pool", CASES)
def test_all_ones_mask_reproduces_baseline_exactly(arch, stage, pool):
    clf = create_classifier(arch, 3, late_mask_stage=stage, late_pool=pool).train()
    x, y = images(), torch.tensor([0, 2])

    def run(mask):
        clf.zero_grad()
        out = clf(x, feature_mask=mask)
        F.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.clone() for n, p in clf.named_parameters()}

    base_out, base_grads = run(None)
    ones_out, ones_grads = run(block_mask("ones"))
    assert torch.equal(ones_out, base_out)
    assert all(torch.equal(ones_grads[n], g) for n, g in base_grads.items())


# ------------------------------------------------------------------------------ ViT specifics, inputs


@pytest.mark.parametrize("arch", [a for a in SMALL_MODELS if "vit" in a])
def test_cls_head_ignores_last_stage_mask_but_not_second_last(arch):
    x, mask = images(), block_mask("binary")
    last = create_classifier(arch, 3, head="cls").eval()
    assert torch.equal(last(x, feature_mask=mask), last(x))  # the CLS token is kept unchanged
    second = create_classifier(arch, 3, head="cls", late_mask_stage="second_last").eval()
    assert not torch.allclose(second(x, feature_mask=mask), second(x))


def test_late_drop_cls_uses_only_patch_tokens():
    clf = create_classifier("bgmask_vit_tiny", 3, late_drop_cls=True).eval()
    x, mask = images(), block_mask("binary")
    with torch.no_grad():
        tokens = clf.backbone.forward_features(x)
        w = on_grid(mask, (8, 8)).flatten(1)[..., None]
        expected = clf.head.linear((tokens[:, 1:] * w).mean(1))
        torch.testing.assert_close(clf(x, feature_mask=mask), expected, rtol=1e-5, atol=1e-5)


def test_mask_is_resized_nearest_exact():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 4, 4] = 1.0  # the sample point of cell (0, 0) for an 8 px cell: floor((0 + 0.5) * 8) = 4
    mask[..., 0, 8] = 1.0  # not a sample point: must not leak into cell (0, 1)
    m = resize_mask(mask, (8, 8), torch.float32)
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 0, 0] = 1.0
    assert torch.equal(m, expected)
    torch.testing.assert_close(resize_mask(mask, (8, 8), torch.float32),
                               F.interpolate(mask, size=(8, 8), mode="nearest-exact"))


def test_bool_and_other_resolution_masks_are_accepted():
    clf = create_classifier("bgmask_resnet_tiny", 3).eval()
    x, mask = images(), block_mask("binary")
    out = clf(x, feature_mask=mask)
    torch.testing.assert_close(clf(x, feature_mask=mask.bool()), out)
    torch.testing.assert_close(clf(x, feature_mask=mask[..., ::2, ::2]), out)  # 32 px mask, same cells


@pytest.mark.parametrize("shape", [(B, 64, 64), (B, 3, 64, 64), (B + 1, 1, 64, 64)])
def test_bad_mask_shape_is_a_user_error(shape):
    clf = create_classifier("bgmask_vit_tiny", 3)
    with pytest.raises(UserError, match=r"feature_mask must have shape \(B, 1, H, W\)"):
        clf(images(), feature_mask=torch.ones(shape))
