"""The paths a GPU user's run takes, checked on CPU: every collective on the process group's device (a
recording stand-in for torch.distributed), the process group of a one-process torchrun, gradient
accumulation and activation checkpointing equal to the plain computation, the attribution's own batch,
optional packages found missing before training, the CUDA speed settings."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

import bgmask.distributed as D
from bgmask import engine
from bgmask.errors import UserError
from bgmask.masking import create_strategy
from bgmask.methods import ERM
from bgmask.models import create_classifier
from bgmask.optim import accumulation_groups
from bgmask.apps.scripts import eval_late, train_late

from conftest import write_tiny_cub

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return write_tiny_cub(tmp_path_factory.mktemp("gpu") / "CUB", num_classes=3, per_class=(8, 5), size=(40, 32))


def argv(cub, run, *more):
    return ["--data_path", str(cub), "--image_size", "32", "--batch_size", "8", "--num_workers", "0",
            "--snapshot_dir", str(run), "--no_progress", "--augmentations_to_use", "flip", "--threads", "1",
            "--model_arch", "bgmask_resnet_tiny", *more]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------- collectives and devices

class RecordingDist:
    """A one-rank stand-in for `torch.distributed` that records each collective and the device of every
    tensor it is handed. It offers tensor collectives only: nccl's object collectives pick whatever CUDA
    device is current, so bgmask must not call them."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self):
        self.calls, self.backend = [], None

    def is_available(self):
        return True

    def is_initialized(self):
        return self.backend is not None

    def init_process_group(self, backend, **kwargs):
        self.backend = backend
        self.calls.append(("init_process_group", backend, kwargs.get("device_id")))

    def destroy_process_group(self):
        self.backend = None

    def get_rank(self):
        return 0

    def get_world_size(self):
        return 1

    def get_backend(self):
        return self.backend

    def all_reduce(self, t, op=None):
        self.calls.append(("all_reduce", t.device))

    def all_gather(self, out, t):
        self.calls.append(("all_gather", t.device, *(o.device for o in out)))
        out[0].copy_(t)

    def barrier(self, device_ids=None):
        self.calls.append(("barrier", device_ids))


def test_one_process_torchrun_training_evaluation_and_attribution_collectives_on_the_group_device(
        cub, tmp_path, monkeypatch):
    """Under torchrun's environment with one process, the process group starts, and every collective of
    a training run (epoch statistics, per-epoch and final evaluation, attribution) and of an evaluation
    run receives tensors on DistInfo.device, through tensor collectives only."""
    fake = RecordingDist()
    monkeypatch.setattr(D, "dist", fake)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    infos = []
    real_init = engine.init_distributed
    monkeypatch.setattr(engine, "init_distributed", lambda device: infos.append(real_init(device)) or infos[-1])
    run = tmp_path / "run"
    assert train_late(argv(cub, run, "--epochs", "2", "--train_split", "0.75", "--attribution_images", "4")) == 0
    final = read_jsonl(run / "results.jsonl")[-1]
    assert final["split"] == "final" and final["test/attr_images"] == 4
    assert eval_late(["--checkpoint", str(run / "last.pt"), "--data_path", str(cub), "--num_workers", "0",
                      "--no_progress", "--threads", "1", "--attribution_images", "4"]) == 0
    assert [c[1] for c in fake.calls if c[0] == "init_process_group"] == ["gloo", "gloo"]
    assert all(info.device == torch.device("cpu") for info in infos) and len(infos) == 2
    tensor_calls = [c for c in fake.calls if c[0] in ("all_reduce", "all_gather")]
    kinds = [c[0] for c in tensor_calls]
    assert kinds.count("all_reduce") == 2  # one per epoch: the loss sum and the image count
    assert kinds.count("all_gather") >= 2 * (2 + 3 + 4 + 2)  # val x2, test/WB + 4 diagnostics, attribution
    for call in tensor_calls:
        assert all(device == infos[0].device for device in call[1:]), call
    assert fake.backend is None  # the group is torn down at the end of each run


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_process_group_under_torchrun_environment_is_real(monkeypatch):
    """torchrun --nproc_per_node=1 sets RANK=0, WORLD_SIZE=1: a real gloo group starts, and the helpers'
    collectives run through it (objects of any size, sums back on the caller's device)."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    info = D.init_distributed("cpu")
    try:
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        assert (info.rank, info.world_size, info.distributed) == (0, 1, False)  # one process: no DDP wrapper
        assert D.group_device() == torch.device("cpu")
        t = torch.tensor([1.5, 2.0], dtype=torch.float64)
        assert D.all_reduce_sum(t).tolist() == [1.5, 2.0]
        obj = {"rows": list(range(1000)), "name": "x" * 300}
        assert D.all_gather_objects(obj) == [obj]
        D.barrier()
    finally:
        D.cleanup()
    assert not torch.distributed.is_initialized()


def test_without_torchrun_no_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    info = D.init_distributed("cpu")
    assert not torch.distributed.is_initialized() and info.world_size == 1
    assert D.all_gather_objects(3) == [3]


@pytest.mark.slow
def test_torchrun_one_process_trains(cub, tmp_path):
    """The real launcher with one process (a one-GPU user's command, here with gloo): it trains, every
    collective runs through the group, and the results equal a plain `python` run of the same seed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    flags = ["--epochs", "2", "--train_split", "0.75", "--attribution_images", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
           str(REPO / "late_masking" / "train.py"), *argv(cub, tmp_path / "ddp", *flags)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert train_late(argv(cub, tmp_path / "plain", *flags)) == 0
    ddp, plain = read_jsonl(tmp_path / "ddp" / "results.jsonl"), read_jsonl(tmp_path / "plain" / "results.jsonl")
    keys = [k for k in plain[-1] if k.startswith(("test/", "waterbirds/", "diag/", "val/"))]
    assert len(keys) > 10
    assert {k: ddp[-1][k] for k in keys} == {k: plain[-1][k] for k in keys}
    assert [r["train/loss"] for r in ddp[:2]] == [r["train/loss"] for r in plain[:2]]


# ------------------------------------------------------------------------- gradient accumulation

class TinyNet(nn.Module):
    """BN-free (a batch statistic would differ between one big batch and its parts)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def loop_cfg(accum, **more):
    return Namespace(channels_last=False, use_amp=False, amp_dtype="bf16", grad_norm_clip=None,
                     max_steps_per_epoch=None, epochs=1, no_progress=True, log_interval=10, grad_accum_steps=accum,
                     **more)


def run_epoch(batches, accum, optimizer_cls, **cfg_more):
    torch.manual_seed(0)
    model = TinyNet().double()
    opt = optimizer_cls(model.parameters())
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # the batches as they are
    stats = engine.train_one_epoch(model, loader, create_strategy("baseline"), opt, ERM(nn.CrossEntropyLoss()),
                                   D.DistInfo(), loop_cfg(accum, **cfg_more), 0)
    return model, stats


def make_batches(n, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(size, 3, 6, 6, generator=g, dtype=torch.float64),
             "label": torch.randint(0, 3, (size,), generator=g)} for _ in range(n)]


def cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("optimizer_cls", [lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
                                           lambda p: torch.optim.AdamW(p, lr=0.01)], ids=["sgd", "adamw"])
def test_grad_accum_equals_one_larger_batch(optimizer_cls):
    """4 micro-batches of 3 with --grad_accum_steps 2 = 2 batches of 6; 5 micro-batches with 2 = batches
    of 6, 6 and 3 (the shorter last group is the mean over its own micro-batches)."""
    micro = make_batches(5, 3)
    accumulated, stats = run_epoch(micro[:4], 2, optimizer_cls)
    big, big_stats = run_epoch([cat(micro[0:2]), cat(micro[2:4])], 1, optimizer_cls)
    for a, b in zip(accumulated.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert stats["train/images"] == big_stats["train/images"] == 12
    assert stats["train/loss"] == pytest.approx(big_stats["train/loss"], rel=1e-6)  # float32 losses
    ragged, _ = run_epoch(micro, 2, optimizer_cls)
    big, _ = run_epoch([cat(micro[0:2]), cat(micro[2:4]), micro[4]], 1, optimizer_cls)
    for a, b in zip(ragged.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and it is not the plain loop: one update per micro-batch differs
    plain, _ = run_epoch(micro[:4], 1, optimizer_cls)
    assert not torch.allclose(plain.fc.weight, accumulated.fc.weight)


def test_grad_accum_groups_and_ddp_sync_once_per_group():
    assert accumulation_groups(5, 2) == [2, 2, 1]
    assert accumulation_groups(4, 4) == [4] and accumulation_groups(3, 1) == [1, 1, 1]

    class DDPLike(TinyNet):
        entered = 0

        def no_sync(self):
            from contextlib import contextmanager

            @contextmanager
            def ctx():
                DDPLike.entered += 1
                yield
            return ctx()

    torch.manual_seed(0)
    model = DDPLike().double()
    engine.train_one_epoch(model, torch.utils.data.DataLoader(make_batches(5, 2), batch_size=None),
                           create_strategy("baseline"),
                           torch.optim.SGD(model.parameters(), lr=0.1), ERM(nn.CrossEntropyLoss()), D.DistInfo(),
                           loop_cfg(2), 0)
    assert DDPLike.entered == 2  # micro-batches 1 and 3 skip the all-reduce; 2, 4 and 5 end their groups


def test_grad_accum_end_to_end_flag(cub, tmp_path):
    run = tmp_path / "run"
    assert train_late(argv(cub, run, "--epochs", "1", "--grad_accum_steps", "2", "--attribution_images", "0")) == 0
    rows = read_jsonl(run / "results.jsonl")
    assert rows[0]["train/images"] == 24 and (run / "last.pt").is_file()


# ------------------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("arch, stage", [("bgmask_resnet_tiny", "last"), ("bgmask_resnet_tiny", "second_last"),
                                         ("bgmask_convnext_tiny", "second_last"), ("bgmask_vit_tiny", "last"),
                                         ("bgmask_vit_tiny", "second_last")])
@pytest.mark.parametrize("late", [False, True], ids=["plain", "late"])
def test_grad_checkpointing_same_gradients_and_recomputes(arch, stage, late):
    """Same logits and parameter gradients with checkpointing on; and it is on: the blocks run again
    during the backward pass (a forward pre-hook counts them)."""
    torch.manual_seed(0)
    ref = create_classifier(arch, 5, image_size=64, late_mask_stage=stage).double().train()
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = (torch.rand(2, 1, 64, 64) > 0.4).double() if late else None
    block = {"bgmask_vit_tiny": lambda m: m.backbone.blocks[0],
             "bgmask_resnet_tiny": lambda m: m.backbone.layer1[0],
             "bgmask_convnext_tiny": lambda m: m.backbone.stages[0].blocks[0]}[arch](ckpt)
    runs = []
    block.register_forward_pre_hook(lambda *a: runs.append(1))  # (a recomputation stops early: no post-hook)
    outs = []
    for model in (ref, ckpt):
        model.zero_grad()
        logits = model(x, feature_mask=mask) if late else model(x)
        (logits * torch.arange(5, dtype=torch.float64)).sum().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys() and len(outs[0][1]) > 4
    for name in outs[0][1]:
        torch.testing.assert_close(outs[0][1][name], outs[1][1][name], msg=name)
    assert len(runs) == 2  # once forward, once recomputed in backward


def test_grad_checkpointing_flag_reaches_the_model_and_bad_combinations(cub, tmp_path, capsys, monkeypatch):
    from bgmask import build

    seen = []
    real = build.build_model
    monkeypatch.setattr(build, "build_model", lambda kw: seen.append(real(kw)) or seen[-1])
    assert train_late(argv(cub, tmp_path / "run", "--epochs", "1", "--grad_checkpointing",
                           "--attribution_images", "0", "--model_arch", "bgmask_vit_tiny", "--image_size", "64")) == 0
    assert seen[0].backbone.grad_checkpointing is True
    assert train_late(argv(cub, tmp_path / "frozen", "--grad_checkpointing", "--freeze_backbone")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grad_checkpointing" in err[0] and "--freeze_backbone" in err[0]


# ------------------------------------------------------------------------- attribution and optional packages

def test_attribution_batch_size_same_fractions_and_chunks(cub, monkeypatch):
    """The fractions do not depend on the attribution batch; passes are at most that many images."""
    import bgmask.attribution as attr
    from bgmask.data import CUBDataset, MaskSource, build_transform

    ds = CUBDataset(cub, "test", masks=MaskSource("gt"), transform=build_transform(False, 32))
    torch.manual_seed(0)
    model = create_classifier("bgmask_resnet_tiny", 3)
    strategy = create_strategy("late")
    sizes = []
    real = attr.attribute
    monkeypatch.setattr(attr, "attribute", lambda m, s, x, *a, **k: sizes.append(len(x)) or real(m, s, x, *a, **k))
    idx = attr.subset_indices(len(ds), 7, 0)
    one = attr.split_fractions(model, strategy, ds, ds, idx, D.DistInfo(), batch_size=1)
    three = attr.split_fractions(model, strategy, ds, ds, idx, D.DistInfo(), batch_size=3)
    assert sizes == [1] * 7 + [3, 3, 1]
    torch.testing.assert_close(torch.from_numpy(one), torch.from_numpy(three), rtol=1e-5, atol=1e-6)


def test_final_attribution_uses_its_own_batch_and_the_runs_autocast(cub, tmp_path, monkeypatch):
    import bgmask.attribution as attr

    calls = []
    real = attr.attribute
    monkeypatch.setattr(attr, "attribute",
                        lambda m, s, x, *a, **k: calls.append((len(x), k.get("amp"))) or real(m, s, x, *a, **k))
    run = tmp_path / "run"
    assert train_late(argv(cub, run, "--epochs", "1", "--attribution_images", "5", "--attribution_batch_size", "2",
                           "--use_amp")) == 0
    assert calls == [(2, True), (2, True), (1, True)] * 2  # test, then Waterbirds
    assert read_jsonl(run / "results.jsonl")[-1]["waterbirds/attr_images"] == 5


def test_missing_captum_is_one_line_before_training(cub, tmp_path, capsys, monkeypatch):
    """An explicit --attribution_images without captum stops before the first epoch; by default the
    attribution is skipped with a note, and the run's record has no attribution keys."""
    import bgmask.attribution as attr

    monkeypatch.setattr(attr, "has_package", lambda name: name != "captum")
    run = tmp_path / "explicit"
    assert train_late(argv(cub, run, "--epochs", "1", "--attribution_images", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "captum" in err[0] and "--attribution_images 4" in err[0]
    assert not (run / "last.pt").exists() and not (run / "results.jsonl").exists()
    run = tmp_path / "default"
    assert train_late(argv(cub, run, "--epochs", "1")) == 0
    assert "captum is not installed: the attribution fraction is skipped" in capsys.readouterr().out
    assert not any("attr" in k for k in read_jsonl(run / "results.jsonl")[-1])


def test_missing_wandb_is_one_line_before_anything(cub, tmp_path, capsys, monkeypatch):
    import bgmask.errors as errors

    monkeypatch.setattr(errors, "has_package", lambda name: name != "wandb")
    run = tmp_path / "run"
    assert train_late(argv(cub, run, "--epochs", "1", "--wandb")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--wandb needs the optional package wandb" in err[0]
    assert not run.exists()


# ------------------------------------------------------------------------- CUDA settings

def test_seg_batch_size_reaches_the_segmenter_and_needs_one(cub, tmp_path, capsys, monkeypatch):
    from bgmask import build

    assert train_late(argv(cub, tmp_path / "run", "--seg_batch_size", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seg_batch_size applies to the online segmenter" in err[0]
    seen = {}
    import bgmask.masking.segmenter as seg

    monkeypatch.setattr(seg, "load_segmenter", lambda *a, **k: seen.update(k) or "mask_fn")
    cfg = Namespace(seg_model_config_path="c.py", seg_model_checkpoint_path="c.pth", seg_batch_size=4,
                    trust_checkpoint=False)
    assert build.online_segmenter(cfg, D.DistInfo(), {"mean": [0.5] * 3, "std": [0.2] * 3}) == "mask_fn"
    assert seen["batch_size"] == 4


def test_tf32_allowed_on_cuda_unless_no_tf32(capsys):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        D.allow_tf32(D.DistInfo(device=torch.device("cuda", 0)), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert "--no_tf32" in capsys.readouterr().out
        D.allow_tf32(D.DistInfo(device=torch.device("cuda", 0)), False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        D.allow_tf32(D.DistInfo(), False)  # CPU: untouched
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_groupdro_reduces_its_group_statistics_on_the_group_device(tmp_path, monkeypatch):
    """GroupDRO's weights are the same on every rank: each step all-reduces its per-group loss sums and
    counts, on DistInfo.device like every other collective."""
    from bgmask.data.synthetic import generate_synthetic
    from bgmask.data.synthetic_waterbirds import WaterbirdsSplits

    root = tmp_path / "cub"
    generate_synthetic(root, num_classes=3, image_size=32, train_per_class=8, test_per_class=2, progress=False,
                       waterbirds=WaterbirdsSplits())
    fake = RecordingDist()
    monkeypatch.setattr(D, "dist", fake)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    assert train_late(argv(root, run, "--epochs", "1", "--protocol", "waterbirds", "--method", "groupdro",
                           "--strategy", "baseline", "--attribution_images", "0")) == 0
    steps = read_jsonl(run / "results.jsonl")[0]["train/images"] // 8
    reduces = [c for c in fake.calls if c[0] == "all_reduce"]
    assert len(reduces) == steps + 1  # one per step (GroupDRO), one for the epoch's loss statistics
    assert all(c[1] == torch.device("cpu") for c in reduces)
