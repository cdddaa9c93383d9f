"""bgmask.models: registry of tiny backbones, ViT heads, freezing, weights (pretrained / pretrained_file)."""

from __future__ import annotations

import argparse

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from bgmask.errors import UserError
from bgmask.models import FAMILIES, HEADS, SMALL_MODELS, create_classifier, weights

VITS = [a for a in SMALL_MODELS if "vit" in a]
CNNS = [a for a in SMALL_MODELS if "vit" not in a]
# (arch, head) pairs: every ViT with every registered head, CNNs with their own head
ARCH_HEADS = [(a, h) for a in VITS for h in HEADS] + [(a, None) for a in CNNS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # one torch thread comes from conftest


def images(b=2, size=64):
    return torch.randn(b, 3, size, size)


# ------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("arch", SMALL_MODELS)
def test_small_models_registered_with_fine_grid(arch):
    assert arch in timm.list_models("bgmask_*")
    model = timm.create_model(arch, num_classes=0 if "vit" in arch else 7)
    n = sum(p.numel() for p in model.parameters())
    assert 1e5 < n < 1.5e6, n
    clf = create_classifier(arch, 7)
    assert clf.feature_grid_size(64) == (8, 8)
    assert clf.model_arch == arch and clf.num_classes == 7
    assert (clf.family.name == "vit") == ("vit" in arch)
    assert clf.family is FAMILIES[arch.split("_")[1]]  # bgmask_<family>_tiny
    assert clf.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert clf.data_config["std"] == pytest.approx((0.229, 0.224, 0.225))


def test_reg4_model_has_register_tokens():
    assert create_classifier("bgmask_vit_tiny_reg4", 2).backbone.num_prefix_tokens == 5
    assert create_classifier("bgmask_vit_tiny", 2).backbone.num_prefix_tokens == 1


@pytest.mark.parametrize("arch,head", ARCH_HEADS)
def test_forward_shapes_and_parameter_split(arch, head):
    clf = create_classifier(arch, 5, head=head)
    assert clf(images()).shape == (2, 5)
    assert clf.head_type == (head if clf.family.name == "vit" else "timm")
    hp, bp = clf.head_parameters(), clf.backbone_parameters()
    ids_h, ids_b = {id(p) for p in hp}, {id(p) for p in bp}
    assert not ids_h & ids_b
    assert ids_h | ids_b == {id(p) for p in clf.parameters() if p.requires_grad}
    assert sum(p.numel() for p in hp) == 5 * (clf.num_features * (len(HEADS[head].parts) if head else 1) + 1)


def test_default_vit_head_is_both_and_drop_cls_gives_gap():
    assert create_classifier("bgmask_vit_tiny", 3).head_type == "both"
    assert create_classifier("bgmask_vit_tiny", 3, late_drop_cls=True).head_type == "gap"
    assert create_classifier("bgmask_vit_tiny", 3, head="both", late_drop_cls=True).head_type == "gap"


def test_image_size_and_drop_path():
    clf = create_classifier("bgmask_vit_tiny", 3, image_size=96, drop_path=0.1)
    assert clf.backbone.patch_embed.grid_size == (12, 12)
    assert clf.feature_grid_size(96) == (12, 12)
    assert clf.data_config["input_size"] == (3, 96, 96)
    assert clf.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert clf(images(1, 96)).shape == (1, 3)


def test_cnn_feature_grid_size_leaves_modes_and_stats_alone():
    clf = create_classifier("bgmask_resnet_tiny", 3).train()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    assert clf.feature_grid_size(96) == (12, 12)
    assert clf.training and clf.backbone.bn1.training
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------------- ViT heads


@pytest.mark.parametrize("arch", VITS)
@pytest.mark.parametrize("head", list(HEADS))
def test_vit_head_reads_the_right_tokens(arch, head, monkeypatch):
    clf = create_classifier(arch, 3, head=head).eval()
    vit = clf.backbone
    P, D = vit.num_prefix_tokens, vit.embed_dim
    tokens = torch.randn(2, P + 64, D)
    tokens[:, 1:P] += 100.0  # register tokens: must never reach the gap feature
    monkeypatch.setattr(vit, "forward_features", lambda x: tokens)
    cls, gap = tokens[:, 0], tokens[:, P:].mean(dim=1)
    feats = {"cls": cls, "gap": gap, "both": torch.cat([cls, gap], dim=-1)}[head]
    expected = F.linear(feats, clf.head.linear.weight, clf.head.linear.bias)
    torch.testing.assert_close(clf(images()), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("arch", ["bgmask_resnet_tiny", "bgmask_vit_tiny"])
def test_freeze_backbone_trains_only_the_head(arch):
    clf = create_classifier(arch, 4, freeze_backbone=True).train()
    assert clf.backbone.training is False
    assert all(not m.training for m in clf.backbone.modules())
    assert clf.backbone_parameters() == []
    head_keys = set(clf.head_state_keys())
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    opt = torch.optim.SGD([{"params": clf.backbone_parameters()}, {"params": clf.head_parameters()}], lr=0.5)
    loss = F.cross_entropy(clf(images(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    after = clf.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == {k for k in head_keys if k.endswith("weight") or k.endswith("bias")}
    # BatchNorm running statistics (ResNet) are among the unchanged tensors
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k or "num_batches" in k)
    clf.train(False)
    clf.train(True)
    assert not clf.backbone.training


# ------------------------------------------------------------------------------------------- flag errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(model_arch="bgmask_resnet_tny"), r"unknown model_arch 'bgmask_resnet_tny'.*bgmask_resnet_tiny"),
    (dict(model_arch="resnet18.nonexistent_tag"), r"resnet18\.nonexistent_tag"),
    (dict(model_arch="bgmask_resnet_tiny", head="cls"), r"ViT models only.*model_arch=bgmask_resnet_tiny"),
    (dict(model_arch="bgmask_convnext_tiny", late_drop_cls=True), r"ViT models only"),
    (dict(model_arch="bgmask_vit_tiny", head="token"), r"unknown head 'token'.*cls, gap, both"),
    (dict(model_arch="bgmask_vit_tiny", late_mask_stage="first"), r"late_mask_stage 'first'.*last, second_last"),
    (dict(model_arch="bgmask_vit_tiny", late_pool="max"), r"late_pool 'max'.*mean, masked_mean"),
    (dict(model_arch="bgmask_vit_tiny", head="cls", late_drop_cls=True), r"late_drop_cls"),
    (dict(model_arch="bgmask_vit_tiny", image_size=60), r"image_size=60.*multiple of the patch size 8"),
    (dict(model_arch="bgmask_vit_tiny", pretrained=True), r"no pretrained weights.*--pretrained_file"),
    (dict(model_arch="bgmask_vit_tiny", pretrained_file="/nonexistent/w.pth"), r"not found: /nonexistent/w.pth"),
])
def test_bad_arguments_raise_user_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        create_classifier(num_classes=3, **kwargs)


def test_second_last_needs_a_known_cnn_family():
    with pytest.raises(UserError, match=r"second_last.*efficientnet_b0.*ResNet, ConvNeXt"):
        create_classifier("efficientnet_b0", 3, late_mask_stage="second_last")


# ------------------------------------------------------------------------------------------- pretrained=True


def test_pretrained_offline_fails_at_once(monkeypatch):
    monkeypatch.setattr(weights, "cached_pretrained_file", lambda arch: None)
    monkeypatch.setattr(weights, "hub_problem", lambda *a, **k: "no network")
    with pytest.raises(UserError, match=r"cannot download pretrained weights for test_resnet: no network; "
                                        r"pass --pretrained_file PATH"):
        create_classifier("test_resnet", 3, pretrained=True)


def test_flag_errors_come_before_any_download(monkeypatch):
    monkeypatch.setattr(weights, "cached_pretrained_file", lambda arch: pytest.fail("weights looked up"))
    monkeypatch.setattr(weights, "hub_problem", lambda *a, **k: pytest.fail("network touched"))
    with pytest.raises(UserError, match="ViT models only"):
        create_classifier("test_resnet", 3, pretrained=True, head="gap")
    with pytest.raises(UserError, match="multiple of the patch size"):
        create_classifier("test_vit", 3, pretrained=True, image_size=100)


def test_pretrained_download_error_is_a_user_error(monkeypatch):
    monkeypatch.setattr(weights, "cached_pretrained_file", lambda arch: None)
    monkeypatch.setattr(weights, "hub_problem", lambda *a, **k: None)
    create = timm.create_model

    def fake_create(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("connection reset")
        return create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake_create)
    with pytest.raises(UserError, match="cannot download pretrained weights for test_resnet: connection reset"):
        create_classifier("test_resnet", 3, pretrained=True)


def test_hub_is_asked_through_huggingface_hub_once(monkeypatch):
    """Availability is huggingface_hub's own answer (its endpoint / proxies / offline switch), one request
    with a short timeout; HF_HUB_OFFLINE answers without any request."""
    import huggingface_hub

    calls = []

    def model_info(repo_id, revision=None, timeout=None):
        calls.append((repo_id, timeout))
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://mirror.example")
    problem = weights.hub_problem("test_resnet")
    assert problem == "https://mirror.example answered ConnectionError: Name or service not known", problem
    assert calls == [("timm/test_resnet.r160_in1k", weights.HUB_TIMEOUT_S)] and weights.HUB_TIMEOUT_S <= 5
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: None)
    assert weights.hub_problem("test_resnet") is None
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("network touched"))
    assert "HF_HUB_OFFLINE is set" in weights.hub_problem("test_resnet")


def test_pretrained_from_local_hf_cache_without_network(tmp_path, monkeypatch):
    """Weights in the Hugging Face cache load with no network access at all."""
    src = timm.create_model("test_resnet")  # 1000-class ImageNet layout, like the hub file
    repo = tmp_path / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    safetensors.torch.save_file(src.state_dict(), str(repo / "snapshots" / "0123abc" / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    def no_network(*a, **k):
        raise AssertionError("the network must not be touched when the weights are cached")

    monkeypatch.setattr(weights, "hub_problem", no_network)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    assert weights.cached_pretrained_file("test_resnet").endswith("model.safetensors")
    clf = create_classifier("test_resnet", 3, pretrained=True)
    loaded, ref = clf.backbone.state_dict(), src.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.items() if not k.startswith("fc."))
    assert clf.backbone.fc.weight.shape == (3, src.fc.in_features)


# ------------------------------------------------------------------------------------------- pretrained_file


def save(sd, path):
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return str(path)


def backbone_equal(a, b):
    return all(torch.equal(v, b.backbone.state_dict()[k]) for k, v in a.backbone.state_dict().items()
               if f"backbone.{k}" not in a.head_state_keys())


@pytest.mark.parametrize("arch", SMALL_MODELS)
def test_classifier_round_trip_into_another_class_count(arch, tmp_path):
    src = create_classifier(arch, 5).eval()
    pth = save(src.state_dict(), tmp_path / "w.pth")
    safe = save(src.state_dict(), tmp_path / "w.safetensors")
    assert backbone_equal(src, create_classifier(arch, 3, pretrained_file=pth))  # head re-initialised
    same = create_classifier(arch, 5, pretrained_file=safe).eval()  # same class count: the head loads too
    x = images()
    assert torch.equal(same(x), src(x))


@pytest.mark.parametrize("wrap", ["model", "state_dict", "model_state"])
def test_wrapped_ddp_checkpoint(wrap, tmp_path):
    src = create_classifier("bgmask_vit_tiny_reg4", 4)
    path = save({wrap: {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "c.pth")
    assert backbone_equal(src, create_classifier("bgmask_vit_tiny_reg4", 2, pretrained_file=path))


@pytest.mark.parametrize("arch", ["bgmask_resnet_tiny", "bgmask_vit_tiny"])
def test_timm_state_dict_and_backbone_prefix(arch, tmp_path):
    timm_model = timm.create_model(arch, num_classes=1000)  # an "ImageNet" checkpoint of the backbone
    plain = save(timm_model.state_dict(), tmp_path / "plain.pth")
    prefixed = save({f"backbone.{k}": v for k, v in timm_model.state_dict().items()}, tmp_path / "pre.pth")
    for path in (plain, prefixed):
        dst = create_classifier(arch, 3, pretrained_file=path)
        ref = timm_model.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in dst.backbone.state_dict().items()
                   if f"backbone.{k}" not in dst.head_state_keys())


@pytest.mark.parametrize("arch", VITS)
def test_pos_embed_resampled_to_another_image_size(arch, tmp_path):
    src = create_classifier(arch, 5)  # 64 px: 8 x 8 grid
    path = save(src.state_dict(), tmp_path / "w.safetensors")
    dst = create_classifier(arch, 5, image_size=96, pretrained_file=path)  # 12 x 12 grid
    prefix = 0 if src.backbone.no_embed_class else src.backbone.num_prefix_tokens
    expected = resample_abs_pos_embed(src.backbone.pos_embed.detach(), new_size=(12, 12), old_size=(8, 8),
                                      num_prefix_tokens=prefix)
    torch.testing.assert_close(dst.backbone.pos_embed.detach(), expected)
    assert torch.equal(dst.backbone.blocks[0].attn.qkv.weight, src.backbone.blocks[0].attn.qkv.weight)
    assert torch.equal(dst.head.linear.weight, src.head.linear.weight)
    assert dst(images(1, 96)).shape == (1, 5)


def test_wrong_architecture_is_rejected(tmp_path):
    path = save(create_classifier("bgmask_vit_tiny", 3).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(UserError, match=r"vit.pth does not look like a bgmask_resnet_tiny checkpoint "
                                        r"\(0 of \d+ tensors match\)"):
        create_classifier("bgmask_resnet_tiny", 3, pretrained_file=path)


def test_checkpoint_needing_unpickling_is_rejected(tmp_path):
    sd = create_classifier("bgmask_resnet_tiny", 3).state_dict()
    path = tmp_path / "full.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UserError, match=r"full.pth needs arbitrary unpickling \(Unsupported global: GLOBAL argparse"):
        create_classifier("bgmask_resnet_tiny", 3, pretrained_file=str(path))


@pytest.mark.parametrize("name,content,match", [
    ("w.npz", b"x", r"unknown suffix '.npz'"),
    ("w.pth", b"not a checkpoint", r"cannot read .*w.pth as a PyTorch checkpoint"),
    ("w.safetensors", b"garbage", r"cannot read .*w.safetensors as a .safetensors file"),
])
def test_unreadable_files(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=match):
        create_classifier("bgmask_resnet_tiny", 3, pretrained_file=str(tmp_path / name))


def test_file_without_state_dict(tmp_path):
    path = save({"epoch": 3, "best": 0.5}, tmp_path / "meta.pth")
    with pytest.raises(UserError, match=r"no state dict found in .*meta.pth"):
        create_classifier("bgmask_resnet_tiny", 3, pretrained_file=path)


def test_pretrained_file_wins_over_pretrained(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "hub_problem", lambda *a, **k: pytest.fail("network touched"))
    src = create_classifier("test_resnet", 3)
    path = save(src.state_dict(), tmp_path / "w.pth")
    assert backbone_equal(src, create_classifier("test_resnet", 3, pretrained=True, pretrained_file=path))
