"""Snapshots written by the paper's code (ananthu-aniraj/masking_strategies_bias_removal) load into bgmask
classifiers with the same logits.

Each fake snapshot is built the way the paper's scripts build their models: its wrapper modules are
re-created below (forwards copied from `early_masking_and_baseline/layers/linear_head_vit*.py`,
`feature_masking/layers/linear_head_vit.py` and `feature_masking/layers/fm_*.py`, the segmentation model
replaced by a given mask), the snapshot is saved as `_save_snapshot` does and read back with
`torch.load(weights_only=False)`. `HubDinoV2` has the parameter names and the token / position-embedding
handling of torch.hub's DinoVisionTransformer (block_chunks=0); its blocks are timm's, whose parameter
layout the hub's blocks share.
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from bgmask.errors import UserError
from bgmask.models import HEADS, create_classifier
from bgmask.models.paper import (convert_paper_state, hub_pos_embed, is_paper_snapshot, load_paper_snapshot,
                                 paper_kind, read_paper_snapshot)

K = 7
FLAGS = {"cls": dict(class_token_only=True), "gap": dict(patch_tokens_only=True), "both": {}}


# ---------------------------------------------------------------------------- the paper's modules


def paper_linear(embed_dim: int, patch_tokens_only=False, class_token_only=False) -> nn.Linear:
    """linear_head_vit_dino*: Linear(D, K) for one token feature, Linear(2D, K) for both."""
    return nn.Linear(embed_dim if (patch_tokens_only or class_token_only) else 2 * embed_dim, K)


def pick(cls_token, patch_mean, patch_tokens_only=False, class_token_only=False):
    if patch_tokens_only:
        return patch_mean
    if class_token_only:
        return cls_token
    return torch.cat([cls_token, patch_mean], dim=1)


class LinearClassifierViTHub(nn.Module):
    """early_masking_and_baseline/layers/linear_head_vit.py::_LinearClassifierViT (fine_tune_dinov2.py)."""

    def __init__(self, *, backbone, linear_head, **flags):
        super().__init__()
        self.backbone, self.linear_head, self.flags = backbone, linear_head, flags

    def forward(self, x):
        x = self.backbone.forward_features(x)
        return self.linear_head(pick(x["x_norm_clstoken"], x["x_norm_patchtokens"].mean(dim=1), **self.flags))


class LinearHeadViTTimm(LinearClassifierViTHub):
    """early_masking_and_baseline/layers/linear_head_vit_timm.py (fine_tune_dinov2_timm.py)."""

    def forward(self, x):
        x = self.backbone.forward_features(x)
        return self.linear_head(pick(x[:, 0, :], x[:, 1:, :].mean(dim=1), **self.flags))


class FMLinearClassifierViT(nn.Module):
    """feature_masking/layers/linear_head_vit.py::_LinearClassifierViT: takes the token tensor."""

    def __init__(self, *, linear_head, **flags):
        super().__init__()
        self.linear_head, self.flags = linear_head, flags

    def forward(self, x):
        return self.linear_head(pick(x[:, 0, :], x[:, 1:, :].mean(dim=1), **self.flags))


class HubPatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class HubDinoV2(nn.Module):
    """torch.hub DINOv2 (dinov2/models/vision_transformer.py, block_chunks=0): names and token handling."""

    def __init__(self, img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, init_values=None):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = HubPatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True,
                                           init_values=init_values, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    def interpolate_pos_encoding(self, x, w, h):  # verbatim logic of the hub's method
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size + 0.1, h // self.patch_size + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(float(w0 / math.sqrt(N)), float(h0 / math.sqrt(N))), mode="bicubic")
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def forward_features(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": x}


def fm_vit_base(arch="bgmask_vit_tiny", image_size=64, second_last=False, **flags) -> nn.Module:
    """fine_tune_vit_feature_masking.py's model_base: a timm ViT with its head replaced."""
    base = timm.create_model(arch)
    base.head = FMLinearClassifierViT(linear_head=paper_linear(base.embed_dim, **flags), **flags)
    grid = image_size // base.patch_embed.patch_size[0]
    base.unflatten = nn.Unflatten(1, (grid, grid))
    base.flatten_back = nn.Flatten(start_dim=1, end_dim=2)
    if second_last:
        base.norm_sl = nn.LayerNorm(base.embed_dim, eps=1e-6)
    return base


def fm_vit_forward(base, x, mask, hub=False):
    """FeatureMaskingNetDinoV2(.Orig).forward_feat, with `mask` (B, 1, H, W) in place of the segmenter."""
    fm = base.forward_features(x)
    cls_token, patch_tokens = (fm["x_norm_clstoken"], fm["x_norm_patchtokens"]) if hub else (fm[:, 0], fm[:, 1:])
    fmap = base.unflatten(patch_tokens).permute(0, 3, 1, 2)
    with torch.no_grad():
        down = F.interpolate(mask.float(), size=fmap.shape[-2:], mode="nearest-exact")
        fmap.mul_(down)
    tokens = torch.cat([cls_token.unsqueeze(1), base.flatten_back(fmap.permute(0, 2, 3, 1))], dim=1)
    if hub:
        return base.head(tokens)
    return base.head(base.head_drop(base.fc_norm(tokens)))


def fm_cnn_forward(base, x, mask, second_last=False):
    """FeatureMaskingNet (last stage) / FeatureMaskingNetSecondLastStage.forward_feat with a given mask."""
    if second_last:
        fmap = base.stem(x)
        for stage in base.stages[:-1]:
            fmap = stage(fmap)
    else:
        fmap = base.forward_features(x)
    with torch.no_grad():
        fmap.mul_(F.interpolate(mask.float(), size=fmap.shape[-2:], mode="nearest-exact"))
    if second_last:
        fmap = base.norm_pre(base.stages[-1](fmap))
    return base.forward_head(fmap)


# ---------------------------------------------------------------------------- helpers


def randomize(model: nn.Module, seed=0) -> nn.Module:
    """Non-trivial values everywhere (LayerScale gammas, norms, tokens, BN statistics), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.1
                t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else t + noise)
    return model.eval()


def save_and_load(tmp_path, model_state, name="snapshot_best.pt"):
    """engine/distributed_training.py::_save_snapshot, then torch.load as the paper's loader does."""
    path = tmp_path / name
    torch.save({"model_state": model_state, "optimizer_state": {}, "finished_epoch": 3,
                "epoch_test_accuracies": [0.5]}, path)
    return path, torch.load(path, map_location="cpu", weights_only=False)


def inputs(size=64, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    return x, mask


def head_of(name):
    return None if name == "both" else name


def converted(tmp_path, paper_model, arch, **kwargs):
    path, raw = save_and_load(tmp_path, paper_model.state_dict())
    clf = create_classifier(arch, K, **kwargs)
    clf.load_state_dict(convert_paper_state(raw["model_state"], clf, source=str(path)))
    return clf.eval()


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- logits equal


def test_bgmask_both_head_is_the_paper_concat_order():
    assert HEADS["both"].parts == ("cls", "gap")


@pytest.mark.parametrize("arch", ["bgmask_resnet_tiny", "bgmask_convnext_tiny"])
def test_cnn_fine_tune_cnn(tmp_path, arch):
    paper = randomize(timm.create_model(arch, num_classes=K))
    clf = converted(tmp_path, paper, arch)
    x, _ = inputs()
    with torch.no_grad():
        close(clf(x), paper(x))


@pytest.mark.parametrize("arch,stage", [("bgmask_convnext_tiny", "second_last"), ("bgmask_convnext_tiny", "last"),
                                        ("bgmask_resnet_tiny", "last")])
def test_cnn_feature_masking(tmp_path, arch, stage):
    paper = randomize(timm.create_model(arch, num_classes=K))
    clf = converted(tmp_path, paper, arch, late_mask_stage=stage)
    x, mask = inputs()
    with torch.no_grad():
        close(clf(x, feature_mask=mask), fm_cnn_forward(paper, x, mask, second_last=stage == "second_last"))


@pytest.mark.parametrize("head", ["cls", "gap", "both"])
def test_vit_fine_tune_dinov2_timm(tmp_path, head):
    backbone = timm.create_model("bgmask_vit_tiny", num_classes=0)
    paper = randomize(LinearHeadViTTimm(backbone=backbone, linear_head=paper_linear(128, **FLAGS[head]),
                                        **FLAGS[head]))
    assert set(paper.state_dict()) >= {"backbone.cls_token", "linear_head.weight", "linear_head.bias"}
    clf = converted(tmp_path, paper, "bgmask_vit_tiny", head=head_of(head))
    x, _ = inputs()
    with torch.no_grad():
        close(clf(x), paper(x))


@pytest.mark.parametrize("head", ["cls", "gap", "both"])
@pytest.mark.parametrize("image_size", [64, 48])
def test_vit_fine_tune_dinov2_hub(tmp_path, head, image_size):
    """Hub names (mask_token), and the hub's run-time position-embedding interpolation (64 -> 48 px)."""
    paper = randomize(LinearClassifierViTHub(backbone=HubDinoV2(img_size=64), linear_head=paper_linear(
        128, **FLAGS[head]), **FLAGS[head]))
    assert "backbone.mask_token" in paper.state_dict()
    clf = converted(tmp_path, paper, "bgmask_vit_tiny", head=head_of(head), image_size=image_size)
    x, _ = inputs(image_size)
    with torch.no_grad():
        close(clf(x), paper(x))


def test_vit_fine_tune_dinov2_hub_layer_scale(tmp_path):
    """A hub ViT-S/14 (LayerScale gammas, 37 x 37 position embedding) run at 28 px, as timm's DINOv2."""
    hub = HubDinoV2(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1.0)
    paper = randomize(LinearClassifierViTHub(backbone=hub, linear_head=paper_linear(384)))
    assert "backbone.blocks.0.ls1.gamma" in paper.state_dict()
    clf = converted(tmp_path, paper, "vit_small_patch14_dinov2", image_size=28)
    x, _ = inputs(28)
    with torch.no_grad():
        close(clf(x), paper(x))


@pytest.mark.parametrize("head", ["cls", "gap", "both"])
def test_vit_feature_masking_last_block(tmp_path, head):
    paper = randomize(fm_vit_base(**FLAGS[head]))
    assert "head.linear_head.weight" in paper.state_dict()
    clf = converted(tmp_path, paper, "bgmask_vit_tiny", head=head_of(head), late_mask_stage="last")
    x, mask = inputs()
    with torch.no_grad():
        close(clf(x, feature_mask=mask), fm_vit_forward(paper, x, mask))
        close(clf(x), fm_vit_forward(paper, x, torch.ones_like(mask)))


def test_vit_feature_masking_orig_dinov2(tmp_path):
    """--use_orig_dinov2_model: the hub model with its head replaced (FeatureMaskingNetDinoV2Orig)."""
    base = HubDinoV2(img_size=64)
    base.head = FMLinearClassifierViT(linear_head=paper_linear(128))
    base.unflatten, base.flatten_back = nn.Unflatten(1, (8, 8)), nn.Flatten(start_dim=1, end_dim=2)
    paper = randomize(base)
    clf = converted(tmp_path, paper, "bgmask_vit_tiny")
    x, mask = inputs()
    with torch.no_grad():
        close(clf(x, feature_mask=mask), fm_vit_forward(paper, x, mask, hub=True))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    paper = randomize(fm_vit_base())
    _, raw = save_and_load(tmp_path, {prefix + k: v for k, v in paper.state_dict().items()})
    clf = create_classifier("bgmask_vit_tiny", K)
    clf.load_state_dict(convert_paper_state(raw, clf))  # the whole snapshot is accepted too
    x, mask = inputs()
    with torch.no_grad():
        close(clf.eval()(x, feature_mask=mask), fm_vit_forward(paper, x, mask))


def test_load_paper_snapshot(tmp_path):
    paper = randomize(timm.create_model("bgmask_convnext_tiny", num_classes=K))
    path, _ = save_and_load(tmp_path, paper.state_dict())
    clf = create_classifier("bgmask_convnext_tiny", K)
    record = load_paper_snapshot(path, clf)
    assert record == {"finished_epoch": 3, "epoch_test_accuracies": [0.5]}
    x, _ = inputs()
    with torch.no_grad():
        close(clf.eval()(x), paper(x))


def test_hub_pos_embed_unchanged_on_its_own_grid():
    pe = torch.randn(1, 1 + 37 * 37, 4)
    assert hub_pos_embed(pe, (37, 37)) is pe
    assert hub_pos_embed(pe, (16, 16)).shape == (1, 1 + 256, 4)


def test_is_paper_snapshot():
    sd = {"a": torch.zeros(1)}
    assert is_paper_snapshot({"model_state": sd, "optimizer_state": {}, "finished_epoch": 1,
                              "epoch_test_accuracies": []})
    assert is_paper_snapshot({"model_state": sd, "finished_epoch": 1})
    assert not is_paper_snapshot({"model_state": sd})
    assert not is_paper_snapshot({"format": "bgmask-classifier", "model": sd, "epoch": 1})
    assert not is_paper_snapshot(sd)
    assert not is_paper_snapshot([1])


def test_paper_kind():
    assert paper_kind({"backbone.cls_token": 0, "linear_head.weight": 0}) == "linear_head"
    assert paper_kind({"cls_token": 0, "head.linear_head.weight": 0}) == "fm_vit"
    assert paper_kind({"conv1.weight": 0, "fc.weight": 0}) == "cnn"


# ---------------------------------------------------------------------------- errors


def convert_error(tmp_path, model_state, arch, **kwargs) -> str:
    path, raw = save_and_load(tmp_path, model_state)
    clf = create_classifier(arch, K, **kwargs)
    with pytest.raises(UserError) as e:
        convert_paper_state(raw["model_state"], clf, source=str(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_error_second_last_block(tmp_path):
    msg = convert_error(tmp_path, fm_vit_base(second_last=True).state_dict(), "bgmask_vit_tiny",
                        late_mask_stage="second_last")
    assert "--fm_second_last_block" in msg and "norm_sl" in msg and "snapshot_best.pt" in msg


def test_error_both_head_into_single_head(tmp_path):
    msg = convert_error(tmp_path, fm_vit_base().state_dict(), "bgmask_vit_tiny", head="cls")
    assert "without --class_token_only / --patch_tokens_only" in msg


def test_error_single_head_into_both_head(tmp_path):
    msg = convert_error(tmp_path, fm_vit_base(class_token_only=True).state_dict(), "bgmask_vit_tiny")
    assert "pass --class_token_only or --patch_tokens_only" in msg


def test_error_num_classes(tmp_path):
    paper = LinearHeadViTTimm(backbone=timm.create_model("bgmask_vit_tiny", num_classes=0),
                              linear_head=nn.Linear(256, K + 1))
    assert f"num_classes={K + 1}" in convert_error(tmp_path, paper.state_dict(), "bgmask_vit_tiny")
    cnn = timm.create_model("bgmask_resnet_tiny", num_classes=K + 1)
    msg = convert_error(tmp_path, cnn.state_dict(), "bgmask_resnet_tiny")
    assert "'fc.weight'" in msg and "another shape" in msg


def test_error_unmapped_key(tmp_path):
    paper = LinearHeadViTTimm(backbone=timm.create_model("bgmask_vit_tiny", num_classes=0),
                              linear_head=nn.Linear(256, K))
    msg = convert_error(tmp_path, {**paper.state_dict(), "extra.weight": torch.zeros(2)}, "bgmask_vit_tiny")
    assert "'extra.weight'" in msg and "snapshot_best.pt" in msg
    msg = convert_error(tmp_path, {**paper.state_dict(), "backbone.extra": torch.zeros(2)}, "bgmask_vit_tiny")
    assert "'backbone.extra'" in msg and "snapshot_best.pt" in msg


def test_error_other_architecture(tmp_path):
    cnn = timm.create_model("bgmask_resnet_tiny", num_classes=K).state_dict()
    msg = convert_error(tmp_path, cnn, "bgmask_convnext_tiny")
    assert "does not fit model_arch=bgmask_convnext_tiny" in msg and "snapshot_best.pt" in msg
    assert "is a ViT" in convert_error(tmp_path, cnn, "bgmask_vit_tiny")
    assert "is not a ViT" in convert_error(tmp_path, fm_vit_base().state_dict(), "bgmask_resnet_tiny")


def test_error_timm_vit_image_size(tmp_path):
    msg = convert_error(tmp_path, fm_vit_base().state_dict(), "bgmask_vit_tiny", image_size=48)
    assert "--image_size 64" in msg


def test_error_register_tokens(tmp_path):
    paper = LinearHeadViTTimm(backbone=timm.create_model("bgmask_vit_tiny_reg4", num_classes=0),
                              linear_head=nn.Linear(256, K))
    assert "register tokens" in convert_error(tmp_path, paper.state_dict(), "bgmask_vit_tiny_reg4")


def test_error_not_a_paper_snapshot(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"format": "bgmask-classifier", "model": {}}, path)
    with pytest.raises(UserError, match="not a snapshot of the paper's code"):
        read_paper_snapshot(path)
    with pytest.raises(UserError, match="not found"):
        read_paper_snapshot(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="bad.pt"):
        read_paper_snapshot(tmp_path / "bad.pt")


def test_hub_chunked_blocks(tmp_path):
    """A hub model built with block_chunks > 0 names its blocks blocks.<chunk>.<index>."""
    paper = randomize(LinearClassifierViTHub(backbone=HubDinoV2(img_size=64), linear_head=paper_linear(128)))
    chunked = {k.replace("backbone.blocks.", "backbone.blocks.0."): v for k, v in paper.state_dict().items()}
    _, raw = save_and_load(tmp_path, chunked)
    clf = create_classifier("bgmask_vit_tiny", K)
    clf.load_state_dict(convert_paper_state(raw, clf))
    x, _ = inputs()
    with torch.no_grad():
        close(clf.eval()(x), paper(x))


def test_snapshot_needing_unpickling(tmp_path):
    paper = timm.create_model("bgmask_resnet_tiny", num_classes=K)
    path = tmp_path / "snapshot_best.pt"
    torch.save({"model_state": paper.state_dict(), "finished_epoch": 1, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(UserError, match="unsafe"):
        read_paper_snapshot(path)
    assert load_paper_snapshot(path, create_classifier("bgmask_resnet_tiny", K), trust=True)["finished_epoch"] == 1
