"""bgmask.models.families: every registered backbone family, on a tiny model of that family.

A new family needs an entry in EXAMPLES (a small timm model of it); the tests below then cover it.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from timm.models.resnet import BasicBlock, ResNet

from bgmask.errors import UserError
from bgmask.models import FAMILIES, LATE_MASK_STAGES, LATE_POOLS, CNNFamily, create_classifier, register_family
from bgmask.models.families import family_of

# family name -> (a small model of it built with pretrained=False, an image size giving a grid of >= 4 x 4)
EXAMPLES = {
    "vit": ("bgmask_vit_tiny", 64),
    "resnet": ("bgmask_resnet_tiny", 64),
    "convnext": ("bgmask_convnext_tiny", 64),
    "cnn": ("test_efficientnet", 128),  # the generic fallback: last stage only
}
NAMES = sorted(FAMILIES)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def example(name, **kwargs):
    arch, size = EXAMPLES[name]
    kw = {"image_size": size} if name == "vit" else {}
    return create_classifier(arch, 3, **kw, **kwargs).eval(), torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", NAMES)
def test_every_family_has_an_example_of_its_own(name):
    assert name in EXAMPLES, f"add a small model of family {name!r} to EXAMPLES"
    clf, x = example(name)
    assert clf.family is FAMILIES[name] and clf.family.name == name
    assert clf.feature_grid_size(x.shape[-1]) == clf.family.features(clf.backbone, x)[0].shape[-2:]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stage", LATE_MASK_STAGES)
@pytest.mark.parametrize("pool", LATE_POOLS)
def test_all_ones_mask_gives_the_baseline(name, stage, pool):
    if stage == "second_last" and not FAMILIES[name].supports_second_last:
        with pytest.raises(UserError, match=r"second_last.*not supported.*supported CNN families: ResNet, ConvNeXt"):
            example(name, late_mask_stage=stage, late_pool=pool)
        return
    clf, x = example(name, late_mask_stage=stage, late_pool=pool)
    with torch.no_grad():
        base = clf(x)
        assert torch.equal(clf(x, feature_mask=torch.ones(2, 1, *x.shape[-2:])), base)
        assert not torch.equal(clf(x, feature_mask=torch.zeros(2, 1, *x.shape[-2:])), base)


@pytest.mark.parametrize("name", NAMES)
def test_split_forward_equals_the_plain_forward(name):
    clf, x = example(name)
    fam, net = clf.family, clf.backbone
    with torch.no_grad():
        grid, aside = fam.features(net, x)  # (B, C, h, w)
        assert grid.ndim == 4 and grid.shape[1] == clf.num_features
        assert torch.equal(fam.classify(clf, grid, aside, None), clf(x))
        if not fam.supports_second_last:
            return
        f, f_aside = fam.to_second_last(net, x)  # (B, C', h', w')
        assert f.ndim == 4
        split_grid, split_aside = fam.after_second_last(net, f, f_aside)
    assert torch.equal(split_grid, grid)
    assert (split_aside is None and aside is None) or torch.equal(split_aside, aside)


@pytest.mark.parametrize("name", NAMES)
def test_head_module_is_the_head_in_the_state_dict(name):
    clf, _ = example(name)
    head = clf.family.head_module(clf)
    assert {id(p) for p in clf.head_parameters()} == {id(p) for p in head.parameters()}
    sd = clf.state_dict()
    assert clf.head_state_keys() and all(torch.equal(sd[k], v) for k, v in
                                         zip(clf.head_state_keys(), head.state_dict().values()))


@pytest.mark.parametrize("name", NAMES)
def test_copies_keep_the_registered_family(name):
    clf, _ = example(name)
    assert copy.deepcopy(clf).family is clf.family
    assert pickle.loads(pickle.dumps(clf.family)) is clf.family


# ------------------------------------------------------------------------------ registry


class _ResNetSub(ResNet):
    pass


def tiny_resnet(cls=ResNet):
    return cls(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), stem_width=8, num_classes=3)


def test_lookup_follows_the_mro():
    assert family_of(tiny_resnet(_ResNetSub)) is FAMILIES["resnet"]
    assert family_of(torch.nn.Conv2d(3, 3, 1)) is FAMILIES["cnn"]  # nn.Module: the generic fallback


def test_a_registered_family_is_picked_up(monkeypatch):
    monkeypatch.setattr("bgmask.models.families.FAMILIES", dict(FAMILIES))
    from bgmask.models import families

    @register_family("resnet_sub", _ResNetSub)
    class SubFamily(CNNFamily):  # masks the last stage only
        pass

    assert family_of(tiny_resnet(_ResNetSub)) is families.FAMILIES["resnet_sub"]
    assert family_of(tiny_resnet()) is families.FAMILIES["resnet"]
    assert "resnet_sub" not in FAMILIES  # the test's registry copy only


@pytest.mark.parametrize("name,model_cls", [("vit", _ResNetSub), ("another_resnet", ResNet)])
def test_duplicate_registration_is_refused(name, model_cls):
    with pytest.raises(ValueError, match="already"):
        register_family(name, model_cls)(CNNFamily)
