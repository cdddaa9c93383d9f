"""The optimiser's parameter groups (backbone / head lr, timm's weight-decay rule) and the paper's
learning-rate schedules, checked against torch's own schedulers and the paper's warm-up recurrence."""

from __future__ import annotations

import io
import math
from dataclasses import fields

import pytest
import torch

from bgmask import args as A
from bgmask.errors import UserError
from bgmask.models import create_classifier
from bgmask.optim import EpochScheduler, LRSchedule, build_optimizer
from bgmask.settings import resolve

LR, FACTOR, MIN_LR = 0.5, 10.0, 0.01  # backbone lr, scratch_lr_factor (head lr 5.0), eta_min


def cfg_from(argv):
    return A.parse_with_config(A.train_parser("t"), argv)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def backbone_parameters(self):
        return list(self.body.parameters())

    def head_parameters(self):
        return list(self.head.parameters())


# ------------------------------------------------------------------------------- optimiser

@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD)])
def test_optimizers_and_head_lr(name, cls):
    cfg = cfg_from(["--optimizer_type", name, "--lr", "0.01", "--scratch_lr_factor", "10", "--weight_decay", "0.05"])
    opt = build_optimizer(_Tiny(), cfg)
    assert type(opt) is cls
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [0.01, pytest.approx(0.1)]
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}  # no decay on biases


def _group_of(opt) -> dict[int, dict]:
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = g
    return out


def test_weight_decay_follows_timm_on_a_vit():
    from timm.optim import param_groups_weight_decay

    clf = create_classifier("bgmask_vit_tiny", 3, image_size=32)
    assert clf.no_weight_decay() >= {"backbone.pos_embed", "backbone.cls_token"}
    cfg = cfg_from(["--lr", "0.01", "--scratch_lr_factor", "10", "--weight_decay", "0.05"])
    group = _group_of(build_optimizer(clf, cfg))
    named = dict(clf.named_parameters())
    assert set(group) == {id(p) for p in named.values()}
    no_decay = {n for n, p in named.items() if group[id(p)]["weight_decay"] == 0.0}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "backbone.norm.bias",
            "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias", "head.linear.bias"} <= no_decay
    decay = set(named) - no_decay
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.mlp.fc1.weight",
            "backbone.patch_embed.proj.weight", "head.linear.weight"} <= decay
    assert all(group[id(named[n])]["weight_decay"] == 0.05 for n in decay)
    timm_groups = param_groups_weight_decay(clf, 0.05, no_weight_decay_list=clf.no_weight_decay())
    timm_no_decay = {id(p) for g in timm_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert timm_no_decay == {id(named[n]) for n in no_decay}
    head = {id(p) for p in clf.head_parameters()}
    assert head == {id(named["head.linear.weight"]), id(named["head.linear.bias"])}
    for p in named.values():
        assert group[id(p)]["lr"] == pytest.approx(0.1 if id(p) in head else 0.01)


def test_no_weight_decay_of_other_backbones_and_frozen():
    cnn = create_classifier("bgmask_resnet_tiny", 3, image_size=32)
    assert cnn.no_weight_decay() == set(getattr(cnn.backbone, "no_weight_decay", set)())
    frozen = create_classifier("bgmask_vit_tiny", 3, image_size=32, freeze_backbone=True)
    opt = build_optimizer(frozen, cfg_from(["--lr", "0.01", "--scratch_lr_factor", "10"]))
    assert set(_group_of(opt)) == {id(p) for p in frozen.head_parameters()}
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1)] * 2


# ------------------------------------------------------------------------------- schedules

def _paper_warmup_cosine(base, warmup, epochs, eta_min):
    """The paper's LinearWarmupCosineAnnealingLR (warmup_start_lr=0), its chainable `get_lr` as
    `scheduler.step()` once per epoch runs it; lr during epochs 0..epochs-1."""
    out = []
    for e in range(epochs):
        if e == 0:
            lr = 0.0
        elif e < warmup:
            lr = lr + base / (warmup - 1)
        elif e == warmup:
            lr = base
        else:
            span = epochs - warmup
            lr = (1 + math.cos(math.pi * (e - warmup) / span)) / (1 + math.cos(math.pi * (e - warmup - 1) / span)) \
                * (lr - eta_min) + eta_min
        out.append(lr)
    return out


def _torch_reference(cfg, bases):
    """LR of each group during each epoch from the paper's scheduler, stepped once per epoch."""
    if cfg.scheduler_type == "cosine_with_warmup":
        curves = [_paper_warmup_cosine(b, cfg.scheduler_warmup_epochs, cfg.epochs, cfg.min_lr) for b in bases]
        return [list(lrs) for lrs in zip(*curves)]
    S = torch.optim.lr_scheduler
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": b} for b in bases])
    make = {
        "cosine": lambda: S.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.min_lr),
        "cosine_warmup_restart": lambda: S.CosineAnnealingWarmRestarts(
            opt, T_0=cfg.scheduler_warmup_epochs, T_mult=cfg.scheduler_restart_factor, eta_min=cfg.min_lr),
        "steplr": lambda: S.StepLR(opt, step_size=cfg.scheduler_step_size, gamma=cfg.scheduler_gamma),
        "linearlr": lambda: S.LinearLR(opt, start_factor=cfg.scheduler_start_factor,
                                       end_factor=cfg.scheduler_end_factor, total_iters=cfg.epochs),
        "none": lambda: S.LambdaLR(opt, lambda e: 1.0),
    }
    sched, out = make[cfg.scheduler_type](), []
    for _ in range(cfg.epochs):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def _closed_form(cfg, base, e):
    """The brief's formulas, written out again."""
    T, W, m = cfg.epochs, cfg.scheduler_warmup_epochs, cfg.min_lr
    if cfg.scheduler_type == "cosine":
        return m + (base - m) * (1 + math.cos(math.pi * e / T)) / 2
    if cfg.scheduler_type == "cosine_with_warmup" and e < W:
        return e * base / (W - 1) if W > 1 else 0.0
    if cfg.scheduler_type == "cosine_with_warmup":
        return m + (base - m) * (1 + math.cos(math.pi * (e - W) / (T - W))) / 2
    return None  # the torch reference covers the rest


def _run(cfg, epochs=None, sched=None, opt=None):
    """LR of each group during each epoch of bgmask's scheduler (backbone and head groups)."""
    if opt is None:
        opt = build_optimizer(_Tiny(), cfg)
        sched = EpochScheduler(opt, cfg)
    out = []
    for e in range(sched.epoch, cfg.epochs if epochs is None else epochs):
        out.append([g["lr"] for g in opt.param_groups])
        sched.step(e + 1)
    return out, opt, sched


CASES = [
    ("cosine", []),
    ("cosine", ["--epochs", "1"]),
    ("cosine_with_warmup", ["--scheduler_warmup_epochs", "3"]),
    ("cosine_with_warmup", ["--scheduler_warmup_epochs", "1"]),
    ("cosine_with_warmup", ["--scheduler_warmup_epochs", "2", "--epochs", "3"]),
    ("cosine_with_warmup", ["--scheduler_warmup_epochs", "12", "--epochs", "12"]),
    ("cosine_with_warmup", ["--scheduler_warmup_epochs", "20", "--epochs", "7"]),
    ("cosine_with_warmup", ["--scheduler_warmup_epochs", "20", "--epochs", "1"]),
    ("cosine_warmup_restart", ["--scheduler_warmup_epochs", "2", "--epochs", "40"]),
    ("cosine_warmup_restart", ["--scheduler_warmup_epochs", "3", "--scheduler_restart_factor", "1"]),
    ("cosine_warmup_restart", ["--scheduler_warmup_epochs", "1", "--scheduler_restart_factor", "3"]),
    ("steplr", ["--scheduler_step_size", "3", "--scheduler_gamma", "0.5"]),
    ("steplr", ["--epochs", "25"]),
    ("linearlr", []),
    ("linearlr", ["--scheduler_start_factor", "0.25", "--scheduler_end_factor", "0.75", "--epochs", "4"]),
    ("none", []),
]


def _cfg(kind, extra):
    return cfg_from(["--scheduler_type", kind, "--epochs", "15", "--lr", str(LR), "--scratch_lr_factor", str(FACTOR),
                     "--min_lr", str(MIN_LR), *extra])


@pytest.mark.parametrize("kind, extra", CASES)
def test_schedulers_build_what_they_name(kind, extra):
    cfg = _cfg(kind, extra)
    ours, opt, _ = _run(cfg)
    bases = [LR, LR * FACTOR]
    reference = _torch_reference(cfg, bases)
    assert len(ours) == len(reference) == cfg.epochs
    for e, (got, want) in enumerate(zip(ours, reference)):
        assert got == pytest.approx([want[0], want[0], want[1], want[1]], rel=1e-9, abs=1e-12), e
        closed = [_closed_form(cfg, b, e) for b in bases]
        if closed[0] is not None:
            assert want == pytest.approx(closed, rel=1e-9, abs=1e-12), e


def test_warmup_as_long_as_the_run_and_one_epoch_warmup():
    cfg = _cfg("cosine_with_warmup", ["--scheduler_warmup_epochs", "20", "--epochs", "3"])
    assert [lrs[0] for lrs in _run(cfg)[0]] == pytest.approx([0.0, LR / 19, 2 * LR / 19])
    assert _run(_cfg("cosine_with_warmup", ["--scheduler_warmup_epochs", "20", "--epochs", "1"]))[0] == [[0.0] * 4]
    one = [lrs[0] for lrs in _run(_cfg("cosine_with_warmup", ["--scheduler_warmup_epochs", "1", "--epochs", "3"]))[0]]
    assert one == pytest.approx([0.0, LR, MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi / 2)) / 2])


def _round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


@pytest.mark.parametrize("kind, extra", CASES)
def test_resume_continues_the_same_curve(kind, extra):
    cfg = _cfg(kind, extra)
    straight, _, _ = _run(cfg)
    stop = cfg.epochs // 2
    first, opt, sched = _run(cfg, epochs=stop)
    saved_opt, saved_sched = _round_trip(opt.state_dict()), _round_trip(sched.state_dict())
    opt2 = build_optimizer(_Tiny(), cfg)
    sched2 = EpochScheduler(opt2, cfg)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    rest, _, _ = _run(cfg, sched=sched2, opt=opt2)
    assert first + rest == straight  # exactly


def test_resume_refuses_another_curve_only():
    cfg = _cfg("cosine_with_warmup", ["--scheduler_warmup_epochs", "3"])
    state = _run(cfg, epochs=2)[2].state_dict()
    gamma = _cfg("cosine_with_warmup", ["--scheduler_warmup_epochs", "3", "--scheduler_gamma", "0.5"])
    EpochScheduler(build_optimizer(_Tiny(), gamma), gamma).load_state_dict(state)  # this curve uses no gamma
    longer = _cfg("cosine_with_warmup", ["--scheduler_warmup_epochs", "4"])
    longer = EpochScheduler(build_optimizer(_Tiny(), longer), longer)
    with pytest.raises(UserError, match="--scheduler_warmup_epochs 3 .now 4."):
        longer.load_state_dict(state)
    with pytest.raises(UserError, match="another bgmask version"):
        longer.load_state_dict({"base_lrs": [0.1], "t_initial": 10})  # e.g. an older timm scheduler's state


def test_flags_are_the_papers():
    parser = A.train_parser("t")
    defaults = {a.dest: a.default for a in parser._actions}
    assert {f.name for f in fields(LRSchedule)} <= set(defaults)  # LRSchedule.from_config reads them
    assert (defaults["scheduler_warmup_epochs"], defaults["scheduler_restart_factor"], defaults["scheduler_step_size"],
            defaults["scheduler_gamma"], defaults["scheduler_start_factor"], defaults["scheduler_end_factor"],
            defaults["min_lr"]) == (10, 2, 10, 0.1, 0.333, 1.0, 1e-6)
    for gone in ("--warmup_lr", "--scheduler_restart_epochs", "--linearlr_start_factor"):
        with pytest.raises(UserError, match="unrecognized"):
            cfg_from([gone, "1"])


@pytest.mark.parametrize("extra, pattern", [
    (["--scheduler_type", "cosine_with_warmup", "--scheduler_warmup_epochs", "0"],
     "--scheduler_type cosine_with_warmup needs --scheduler_warmup_epochs >= 1, got 0"),
    (["--scheduler_type", "cosine_warmup_restart", "--scheduler_warmup_epochs", "0"],
     "--scheduler_type cosine_warmup_restart needs --scheduler_warmup_epochs >= 1, got 0"),
    (["--scheduler_type", "cosine_warmup_restart", "--scheduler_restart_factor", "0"], "--scheduler_restart_factor"),
    (["--scheduler_type", "steplr", "--scheduler_step_size", "0"], "--scheduler_step_size must be >= 1"),
    (["--scheduler_type", "linearlr", "--scheduler_start_factor", "0"], "--scheduler_start_factor <= 1"),
    (["--scheduler_type", "linearlr", "--scheduler_end_factor", "1.5"], "--scheduler_end_factor <= 1"),
    (["--scheduler_type", "cosine", "--min_lr", "-1"], "--min_lr must be >= 0"),
])
def test_bad_schedule_values_one_clear_line(tmp_path, extra, pattern):
    cfg = cfg_from(["--data_path", str(tmp_path), *extra])
    with pytest.raises(UserError) as err:
        resolve(cfg)
    assert pattern in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=pattern.split(",")[0]):
        EpochScheduler(build_optimizer(_Tiny(), cfg), cfg)


def test_long_warmup_and_unused_flags_are_accepted(tmp_path):
    resolve(cfg_from(["--data_path", str(tmp_path), "--scheduler_type", "cosine_with_warmup",
                                "--scheduler_warmup_epochs", "20", "--epochs", "1"]))
    resolve(cfg_from(["--data_path", str(tmp_path), "--scheduler_type", "cosine",
                                "--scheduler_warmup_epochs", "0"]))


def test_every_optimizer_and_schedule_choice_is_built():
    """The --optimizer_type and --scheduler_type choices come from bgmask.optim (OPTIMIZERS, SCHEDULES): each
    one makes an optimiser and a schedule."""
    parser = A.train_parser("t")
    for flag, kind in (("optimizer_type", torch.optim.Optimizer), ("scheduler_type", EpochScheduler)):
        choices = next(a.choices for a in parser._actions if a.dest == flag)
        assert len(choices) > 1, flag
        for choice in choices:
            cfg = cfg_from([f"--{flag}", choice])
            opt = build_optimizer(_Tiny(), cfg)
            assert isinstance(opt if kind is torch.optim.Optimizer else EpochScheduler(opt, cfg), kind), choice
