"""Engine, strategies, metrics, schedulers and the entry scripts, end to end on tiny generated data."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bgmask import args as A
from bgmask.checkpoint import load_checkpoint
from bgmask.distributed import ShardSampler
from bgmask.optim import mix_batch
from bgmask.errors import UserError
from bgmask.eval import diagnostic_metrics
from bgmask.masking import STRATEGIES, apply_early_mask, create_strategy
from bgmask.eval import group_summary
from bgmask.apps.scripts import eval_early, eval_late, train_early, train_late

from conftest import write_tiny_cub

REPO = Path(__file__).resolve().parents[1]


def cfg_from(argv):
    return A.parse_with_config(A.train_parser("t"), argv)


# ------------------------------------------------------------------------------------ unit tests

def test_group_metrics_by_hand():
    preds = np.array([0, 1, 1, 0, 1, 1])
    labels = np.array([0, 1, 0, 0, 1, 0])
    groups = np.array([0, 0, 1, 1, 3, 3])
    m = group_summary(preds, labels, groups, "wb")
    assert m["wb/group_0_acc"] == 1.0 and m["wb/group_1_acc"] == 0.5 and m["wb/group_3_acc"] == 0.5
    assert m["wb/worst_group_acc"] == 0.5 and m["wb/mean_group_acc"] == pytest.approx(2 / 3)
    d = diagnostic_metrics({"mixed_same": {"pred": np.array([1, 1]), "label": np.array([1, 0])},
                            "mixed_rand": {"pred": np.array([0, 0]), "label": np.array([1, 1])}})
    assert d["diag/bg_gap"] == 0.5


def test_early_mask_zeroes_exactly_the_background():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = torch.rand(2, 3, 4, 5)
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    masks = (torch.rand(2, 1, 4, 5) > 0.5).float()
    out = apply_early_mask(images, masks, "black", mean, std)
    back = out * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    bg = masks.expand_as(back) == 0
    assert torch.allclose(back[bg], torch.zeros_like(back[bg]), atol=1e-6)
    assert torch.equal(out[~bg], images[~bg])
    assert torch.equal(apply_early_mask(images, masks, "mean", mean, std)[bg], torch.zeros_like(back[bg]))
    with pytest.raises(UserError, match="does not match"):
        apply_early_mask(images, masks[:, :, :2], "black", mean, std)
    strat = create_strategy("early", mean=mean, std=std)
    with pytest.raises(UserError, match="needs masks"):
        strat.preprocess(images, None)
    with pytest.raises(UserError, match="unknown --strategy 'nope'"):
        create_strategy("nope")


def test_shard_sampler_counts_every_sample_once():
    for n in (0, 1, 7, 10):
        for w in (1, 2, 3):
            seen = sorted(i for r in range(w) for i in ShardSampler(n, r, w))
            assert seen == list(range(n))


def test_mixup_mixes_masks_like_images():
    from timm.data import Mixup

    torch.manual_seed(0)
    masks = (torch.rand(4, 1, 8, 8) > 0.5).float()
    images = masks.repeat(1, 3, 1, 1).clone()
    for cut in (True, False):
        mixup = Mixup(mixup_alpha=0.0 if cut else 1.0, cutmix_alpha=1.0 if cut else 0.0, num_classes=3)
        im, mk, targets = mix_batch(mixup, images.clone(), masks.clone(), torch.tensor([0, 1, 2, 0]))
        assert torch.equal(im[:, :1], mk) and targets.shape == (4, 3)


def test_yaml_config_defaults_and_override(tmp_path):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("lr: 0.5\nepochs: 7\n")
    cfg = cfg_from(["--config", str(cfgfile), "--epochs", "3"])
    assert cfg.lr == 0.5 and cfg.epochs == 3
    cfgfile.write_text("learning_rate: 0.5\n")
    with pytest.raises(UserError, match="unknown keys learning_rate"):
        cfg_from(["--config", str(cfgfile)])


def test_a_runs_config_yaml_reruns_with_the_script_of_its_strategy(cub, tmp_path, capsys):
    """config.yaml of a run made by the all-strategies parser (as `bgmask demo` does) is a valid --config
    of early_masking_and_baseline/train.py; a late-masking key set away from its default with a
    pixel-level strategy, or a strategy the script does not train, is one clear line."""
    import yaml

    first = tmp_path / "first"
    cfg = A.parse_with_config(A.train_parser("all"), base_argv(cub, first, "--epochs", "1", "--strategy", "early"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(vars(cfg)))
    again = tmp_path / "again"
    assert train_early(["--config", str(tmp_path / "c.yaml"), "--snapshot_dir", str(again), "--mask_threshold",
                        "127"]) == 0
    rerun = yaml.safe_load((again / "config.yaml").read_text())
    assert rerun["strategy"] == "early" and rerun["mask_threshold"] == 127 and rerun["late_pool"] == "mean"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**vars(cfg), "late_pool": "masked_mean"}))
    capsys.readouterr()
    assert train_early(["--config", str(tmp_path / "c.yaml"), "--snapshot_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --late_pool masked_mean applies to feature-level masking (--strategy late), not "
                   "--strategy early"), err
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**vars(cfg), "strategy": "late"}))
    assert train_early(["--config", str(tmp_path / "c.yaml"), "--snapshot_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --config {tmp_path / 'c.yaml'}: --strategy must be one of baseline, early, got the "
                   "string 'late'"), err


def test_resolve_device():
    """One --device resolver for the classifier scripts and the segmenter scripts (bgmask.distributed)."""
    from bgmask.distributed import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"--device 'gpu' is not a device \(expected auto, cpu, cuda or cuda:N\)"):
        resolve_device("gpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
    else:
        for name in ("cuda", "cuda:1"):
            with pytest.raises(UserError, match=f"--device {name} was asked for but no CUDA device is available"):
                resolve_device(name)


# ------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    # 3 classes x (8 train, 5 test): 15 test images, odd, for the distributed test
    return write_tiny_cub(tmp_path_factory.mktemp("e2e") / "CUB", num_classes=3, per_class=(8, 5), size=(40, 32))


def base_argv(cub, run, *more):
    return ["--data_path", str(cub), "--image_size", "32", "--batch_size", "8", "--num_workers", "0",
            "--snapshot_dir", str(run), "--no_progress", "--augmentations_to_use", "flip", "--threads", "1", *more]


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("arch, script, extra", [
    ("bgmask_resnet_tiny", train_early, ["--strategy", "baseline"]),
    ("bgmask_resnet_tiny", train_early, ["--strategy", "early", "--mask_fill", "blur", "--use_amp"]),
    ("bgmask_vit_tiny", train_early, ["--strategy", "early", "--class_token_only"]),
    ("bgmask_vit_tiny", train_late, ["--patch_tokens_only", "--turn_on_mixup_or_cutmix", "--smoothing", "0.1"]),
    ("bgmask_resnet_tiny", train_late, ["--late_pool", "masked_mean", "--train_split", "0.75"]),
])
def test_train_writes_results(cub, tmp_path, arch, script, extra):
    run = tmp_path / "run"
    assert script(base_argv(cub, run, "--model_arch", arch, "--epochs", "2", *extra)) == 0
    rows = read_jsonl(run / "results.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 2] and rows[-1]["split"] == "final"
    final = rows[-1]
    for key in ("test/acc", "waterbirds/acc", "waterbirds/drop", "waterbirds/worst_group_acc",
                "diag/bg_only_acc", "diag/bg_gap"):
        assert key in final
    assert final["test/num_samples"] == 15 and final["waterbirds/num_samples"] == 15 and final["num_classes"] == 3
    for f in ("config.yaml", "command.txt", "git_revision.txt", "last.pt", "final_metrics.json", "done"):
        assert (run / f).is_file(), f
    if "--train_split" in extra:
        assert (run / "best.pt").is_file() and rows[0]["split"] == "val" and final["checkpoint"] == "best"
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["config"]["model_arch"] == arch


@pytest.mark.parametrize("arch", ["bgmask_resnet_tiny", "bgmask_vit_tiny"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_trains_and_evaluates(cub, tmp_path, name, arch):
    """Every registered strategy, through the script that trains it and the evaluation script: results,
    checkpoints, and an evaluation equal to the run's final record, logged in its results.jsonl."""
    train, evaluate = (train_late, eval_late) if STRATEGIES[name].masks_features else (train_early, eval_early)
    run = tmp_path / "run"
    assert train(base_argv(cub, run, "--model_arch", arch, "--epochs", "1", "--strategy", name)) == 0
    assert load_checkpoint(run / "last.pt")["config"]["strategy"] == name
    assert evaluate(["--checkpoint", str(run / "last.pt"), "--data_path", str(cub), "--num_workers", "0",
                     "--no_progress", "--threads", "1"]) == 0
    *_, final, ev = read_jsonl(run / "results.jsonl")
    assert (final["split"], ev["split"]) == ("final", "eval")
    for key in ("test/acc", "waterbirds/acc", "waterbirds/worst_group_acc", "diag/bg_gap"):
        assert ev[key] == final[key], key


class Recorder(torch.nn.Module):
    """A stand-in classifier (and segmenter) that records what it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images, feature_mask=None):
        self.seen.append((images.detach().clone(), images.is_contiguous(memory_format=torch.channels_last),
                          None if feature_mask is None else feature_mask.detach().clone()))
        return images.mean((2, 3))[:, :2]


@pytest.mark.parametrize("name", ["baseline", "early", "late"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_training_and_evaluation_prepare_a_batch_alike(name, channels_last):
    """The two paths share bgmask.eval.prepare_batch: the online segmenter sees the contiguous batch as
    loaded, and the model gets the same images and masks, in the --channels_last layout, in both."""
    from argparse import Namespace

    from bgmask.distributed import DistInfo
    from bgmask.engine import train_step
    from bgmask.eval import predict

    torch.manual_seed(0)
    records = [{"image": torch.randn(3, 16, 16), "mask": torch.zeros(1, 16, 16), "label": i % 2, "index": i,
                "group": 0, "place": 0} for i in range(4)]
    segmenter = Recorder()

    def mask_fn(images):
        segmenter(images)
        return (images[:, :1] > 0).float()

    strategy, dist = create_strategy(name), DistInfo()
    train_model, eval_model = Recorder(), Recorder()
    cfg = Namespace(channels_last=channels_last, use_amp=False, amp_dtype="bf16")
    train_step(train_model, torch.utils.data.default_collate(records), strategy, dist, cfg, mask_fn=mask_fn)
    predict(eval_model, records, strategy, dist, batch_size=4, mask_fn=mask_fn, channels_last=channels_last,
            progress=False)
    assert len(segmenter.seen) == 2 and all(not cl and images.is_contiguous() for images, cl, _ in segmenter.seen)
    assert torch.equal(segmenter.seen[0][0], segmenter.seen[1][0])
    (train_images, train_cl, train_mask), = train_model.seen
    (eval_images, eval_cl, eval_mask), = eval_model.seen
    assert train_cl == eval_cl == channels_last
    assert torch.equal(train_images, eval_images)
    assert (train_mask is None) == (eval_mask is None) == (name != "late")
    assert train_mask is None or torch.equal(train_mask, eval_mask)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_with_a_full_mask_is_the_baseline(name):
    """Masking nothing changes nothing: with an all-ones mask every strategy gives the baseline's logits;
    a strategy that needs masks refuses a batch without them."""
    from bgmask.models import create_classifier

    torch.manual_seed(0)
    for arch in ("bgmask_resnet_tiny", "bgmask_vit_tiny"):
        model = create_classifier(arch, 3, image_size=32).eval()
        images, ones = torch.randn(2, 3, 32, 32), torch.ones(2, 1, 32, 32)
        strategy, base = create_strategy(name), create_strategy("baseline")
        with torch.no_grad():
            got = strategy.forward(model, strategy.preprocess(images, ones), ones)
            assert torch.allclose(got, base.forward(model, images, None), atol=1e-6), arch
        if strategy.needs_mask:
            with pytest.raises(UserError, match=f"strategy '{name}' needs masks"):
                strategy.forward(model, strategy.preprocess(images, None), None)


def test_freeze_backbone_trains_head_only(cub, tmp_path):
    from bgmask.models import create_classifier

    run = tmp_path / "run"
    torch.manual_seed(0)
    init = create_classifier("bgmask_resnet_tiny", 3)
    init_file = tmp_path / "init.pth"
    torch.save(init.state_dict(), init_file)
    assert train_early(base_argv(cub, run, "--epochs", "1", "--freeze_backbone", "--pretrained_file",
                                 str(init_file), "--lr", "0.05")) == 0
    trained = load_checkpoint(run / "last.pt")["model"]
    head_keys = set(init.head_state_keys())
    changed = {k for k, v in init.state_dict().items() if not torch.equal(v, trained[k])}
    assert changed and changed <= head_keys


def test_resume_is_exact(cub, tmp_path):
    """Stop after epoch 2 of 3 (the epoch_2 checkpoint), resume: same weights and metrics as straight."""
    straight = tmp_path / "straight"
    argv = ["--epochs", "3", "--save_every_n_epochs", "1", "--augmentations_to_use", "timm", "--num_workers", "1",
            "--drop_path", "0.1", "--scheduler_type", "cosine_with_warmup", "--scheduler_warmup_epochs", "1"]
    assert train_early(base_argv(cub, straight, *argv)) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "epoch_2.pt", resumed / "last.pt")
    assert train_early(base_argv(cub, resumed, *argv, "--resume_training")) == 0
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    fa, fb = read_jsonl(straight / "results.jsonl")[-1], read_jsonl(resumed / "results.jsonl")[-1]
    for k in fa:
        if not k.startswith("train/") and "seconds" not in k:
            assert fa[k] == fb[k], k


def test_eval_only_script_writes_json_and_table(cub, tmp_path):
    run = tmp_path / "run"
    assert train_early(base_argv(cub, run, "--epochs", "1", "--strategy", "early")) == 0
    assert eval_early(["--checkpoint", str(run / "last.pt"), "--data_path", str(cub), "--num_workers", "0",
                       "--no_progress", "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    *_, final, logged = read_jsonl(run / "results.jsonl")
    assert final["split"] == "final" and logged == ev and ev["split"] == "eval"  # tagged line in the run's log
    assert ev["test/acc"] == final["test/acc"] and ev["waterbirds/acc"] == final["waterbirds/acc"]
    assert "| CUB test accuracy" in (tmp_path / "ev.md").read_text()
    # --eval_only through train.py logs the same way
    assert train_early(base_argv(cub, run, "--eval_only")) == 0
    assert [r["split"] for r in read_jsonl(run / "results.jsonl")][-3:] == ["final", "eval", "eval"]


def test_model_from_checkpoint(cub, tmp_path):
    """The one builder of a saved classifier (eval_waterbirds.py and the demo's pictures): the checkpoint
    holds the exact `create_classifier` keyword arguments and is rebuilt from them (no hub or file
    weights, nothing frozen, no drop path), the weights load exactly, other weights are one UserError;
    a checkpoint written before `model_kwargs` were stored rebuilds the same model from its flags."""
    from bgmask.build import model_kwargs
    from bgmask.checkpoint import model_from_checkpoint
    from bgmask.models import create_classifier

    run = tmp_path / "run"
    assert train_early(base_argv(cub, run, "--epochs", "1", "--strategy", "early", "--drop_path", "0.1")) == 0
    state = load_checkpoint(run / "last.pt")
    assert state["model_kwargs"] == model_kwargs(state["config"], 3)
    assert state["model_kwargs"] == dict(model_arch="bgmask_resnet_tiny", num_classes=3, head=None, pretrained=False,
                                         pretrained_file=None, drop_path=0.1, image_size=32, freeze_backbone=False,
                                         late_mask_stage="last", late_pool="mean", late_drop_cls=False,
                                         output_stride=32)
    for saved in (state, {k: v for k, v in state.items() if k != "model_kwargs"}):  # today's and older files
        model = model_from_checkpoint(saved, run / "last.pt")
        assert model.model_arch == "bgmask_resnet_tiny" and all(p.requires_grad for p in model.parameters())
        assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in model.modules())
        for k, v in model.state_dict().items():
            assert torch.equal(v, state["model"][k]), k
    state["model"] = create_classifier("bgmask_vit_tiny", 3).state_dict()
    with pytest.raises(UserError, match=re.escape(f"checkpoint {run / 'other.pt'} does not fit model bgmask_resnet_tiny")):
        model_from_checkpoint(state, run / "other.pt")


@pytest.mark.slow
def test_torchrun_two_processes_counts_every_sample_once(cub, tmp_path, capsys):
    """2-process gloo on sizes that do not divide by 2 (train 21, val 3, test 15, Waterbirds 15): every
    evaluation (per-epoch val, final test / Waterbirds / groups / diagnostics) equals the one-process
    evaluation of the same checkpoint exactly; then the run, stopped after epoch 1, resumes with one
    process under the documented rule (same global permutation per epoch, ranks take strided shares)."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    flags = ["--epochs", "2", "--train_split", "0.85", "--save_every_n_epochs", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(REPO / "early_masking_and_baseline" / "train.py"), *base_argv(cub, run, *flags)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(run / "results.jsonl")
    assert [(r["epoch"], r["split"]) for r in rows] == [(1, "val"), (2, "val"), (2, "final")]
    ddp = rows[-1]
    assert ddp["test/num_samples"] == 15 and ddp["waterbirds/num_samples"] == 15 and ddp["checkpoint"] == "best"

    def single(ckpt, name):
        assert eval_early(["--checkpoint", str(ckpt), "--data_path", str(cub), "--num_workers", "0",
                           "--train_split", "0.85", "--no_progress", "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / f"{name}.json").read_text())

    for epoch, row in enumerate(rows[:2], 1):
        one = single(run / f"epoch_{epoch}.pt", f"epoch_{epoch}")
        assert row["val/num_samples"] == one["val/num_samples"] == 3
        assert row["val/acc"] == one["val/acc"]
    one = single(run / "best.pt", "best")
    metrics = [k for k in ddp if "/" in k]
    assert len(metrics) >= 10 and "diag/bg_gap" in metrics and "waterbirds/worst_group_acc" in metrics
    assert {k: one[k] for k in metrics} == {k: ddp[k] for k in metrics}

    # resume with 1 process from the checkpoint that 2 processes wrote after epoch 1
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(run / "epoch_1.pt", resumed / "last.pt")
    capsys.readouterr()
    assert train_early(base_argv(cub, resumed, *flags, "--resume_training")) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "written by 2 process(es), resuming with 1" in out
    rows = read_jsonl(resumed / "results.jsonl")
    assert [(r["epoch"], r["split"]) for r in rows] == [(2, "val"), (2, "final")]
    assert rows[0]["train/images"] == 16  # 21 images, one process: 2 full batches of 8 (drop_last)
    assert load_checkpoint(resumed / "last.pt")["world_size"] == 1
    # the rule itself: per epoch one global permutation; rank r of W takes its strided share
    from torch.utils.data import DistributedSampler

    data = list(range(21))
    for epoch in (0, 1):
        def order(rank, world):
            s = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
            s.set_epoch(epoch)
            return list(s)
        perm = order(0, 1)
        padded = perm + perm[:1]  # DistributedSampler pads 21 to 22 for two ranks
        assert order(0, 2) == padded[0::2] and order(1, 2) == padded[1::2]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_resume_one_process_run_with_two_processes(cub, tmp_path, capsys):
    """A run stopped after epoch 1 of 2 with one process resumes under torchrun with two (gloo), by the
    rule of the README: the epoch's global permutation is the same, each rank takes a strided share
    (DistributedSampler pads 21 train images to 22: 11 per rank) and --batch_size stays per process
    (drop_last), so epoch 2 trains 2 x (11 // 4) x 4 = 16 images where one process trained 20."""
    flags = ["--epochs", "2", "--train_split", "0.85", "--save_every_n_epochs", "1", "--batch_size", "4"]
    run = tmp_path / "run"
    assert train_early(base_argv(cub, run, *flags)) == 0
    rows = read_jsonl(run / "results.jsonl")
    n_train, batch = 21, 4
    assert rows[0]["train/images"] == n_train // batch * batch == 20
    # stopped after epoch 1: its checkpoint is last.pt, its line the only one in results.jsonl
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(run / "epoch_1.pt", resumed / "last.pt")
    (resumed / "results.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert load_checkpoint(resumed / "last.pt")["world_size"] == 1

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "early_masking_and_baseline" / "train.py"), *base_argv(cub, resumed, *flags, "--resume_training")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "written by 1 process(es), resuming with 2" in p.stdout, p.stdout[-3000:]
    assert p.stdout.count("resumed from") == 1  # rank 0 alone prints
    rows = read_jsonl(resumed / "results.jsonl")
    assert [(r["epoch"], r["split"]) for r in rows] == [(1, "val"), (2, "val"), (2, "final")]
    world = 2
    per_rank = -(-n_train // world)  # the sampler pads to a multiple of the world size
    assert rows[1]["train/images"] == world * (per_rank // batch) * batch == 16
    assert rows[2]["test/num_samples"] == 15 and rows[2]["waterbirds/num_samples"] == 15
    state = load_checkpoint(resumed / "last.pt")
    assert state["world_size"] == 2 and state["epoch"] == 2


@pytest.mark.parametrize("extra, pattern", [
    (["--model_arch", "bgmask_resnet_tiny", "--patch_tokens_only"], "apply to ViT models only"),
    (["--model_arch", "resnet_does_not_exist"], "resnet_does_not_exist"),
    (["--scheduler_type", "cosine_with_warmup", "--scheduler_warmup_epochs", "0"], "needs --scheduler_warmup_epochs"),
    (["--freeze_backbone", "--drop_path", "0.1"], "--drop_path has no effect"),
    (["--resume_training"], "no checkpoint at"),
    (["--mask_source", "/nonexistent_masks", "--strategy", "early"], "mask folder not found: /nonexistent_masks"),
    (["--pretrained_file", "/nonexistent.pth"], "/nonexistent.pth"),
])
def test_bad_flags_one_clear_line(cub, tmp_path, capsys, extra, pattern):
    rc = train_early(base_argv(cub, tmp_path / "run", "--epochs", "1", *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    import re
    assert re.search(pattern, err), err


def test_bad_paths_and_checkpoints(cub, tmp_path, capsys):
    assert train_early(["--data_path", str(tmp_path / "nowhere"), "--snapshot_dir", str(tmp_path / "r")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert train_early(["--snapshot_dir", str(tmp_path / "r")]) == 2
    assert "--data_path is required" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    assert eval_early(["--checkpoint", str(bogus), "--data_path", str(cub)]) == 2
    assert "not a bgmask classifier checkpoint" in capsys.readouterr().err
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(b"PK\x03\x04garbage")
    assert eval_early(["--checkpoint", str(truncated), "--data_path", str(cub)]) == 2
    assert "truncated or not a torch file" in capsys.readouterr().err
    run = tmp_path / "run"
    assert train_early(base_argv(cub, run, "--epochs", "1")) == 0
    capsys.readouterr()
    assert train_early(base_argv(cub, run, "--epochs", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err
    other = write_tiny_cub(tmp_path / "CUB4", num_classes=4, per_class=(2, 1), size=(40, 32))
    assert eval_early(["--checkpoint", str(run / "last.pt"), "--data_path", str(other), "--no_progress",
                       "--num_workers", "0"]) == 2
    assert "has 3 classes but" in capsys.readouterr().err


def test_wandb_offline_logs_without_network(cub, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert train_early(base_argv(cub, run, "--epochs", "1", "--wandb", "--wandb_project", "p", "--group", "g",
                                 "--job_type", "j")) == 0
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_torchcompile_trains_like_the_plain_model(cub, tmp_path, capsys):
    """`--torchcompile eager` captures the training forward with dynamo (the late-masked CNN, whose mask
    enters `forward` as a keyword): the weights equal the uncompiled run's, and the checkpoint keeps
    the plain module's keys."""
    argv = ["--epochs", "1", "--max_steps_per_epoch", "2"]
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    assert train_late(base_argv(cub, plain, *argv)) == 0
    assert train_late(base_argv(cub, compiled, *argv, "--torchcompile", "eager")) == 0
    a, b = load_checkpoint(plain / "last.pt")["model"], load_checkpoint(compiled / "last.pt")["model"]
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert train_late(base_argv(cub, tmp_path / "bad", *argv, "--torchcompile", "nosuchbackend")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown --torchcompile backend 'nosuchbackend'" in err, err


def test_diverging_loss_stops_with_one_line(cub, tmp_path, capsys):
    run = tmp_path / "run"
    rc = train_early(base_argv(cub, run, "--epochs", "2", "--lr", "1e30"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert re.match(r"error: loss is (nan|inf) at epoch 1, step \d+: lower --lr or use --grad_norm_clip$", err), err
    assert not (run / "last.pt").exists() and not list(run.glob("*.tmp*"))


def test_resume_restores_best_and_epoch_checkpoints_of_a_kill_between_writes(cub, tmp_path, capsys):
    """last.pt is written first; a kill before best.pt / epoch_k.pt of the same epoch leaves them missing
    (or best.pt from an earlier epoch): the resume writes them from last.pt, and the final report then
    evaluates the right best.pt."""
    flags = ["--epochs", "1", "--train_split", "0.75", "--save_every_n_epochs", "1"]
    straight = tmp_path / "straight"
    assert train_early(base_argv(cub, straight, *flags)) == 0
    want = read_jsonl(straight / "results.jsonl")[-1]
    state = load_checkpoint(straight / "last.pt")
    assert state["best_epoch"] == 1 and want["checkpoint"] == "best"
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(straight / "last.pt", killed / "last.pt")
    shutil.copy(straight / "results.jsonl", killed / "results.jsonl")
    capsys.readouterr()
    assert train_early(base_argv(cub, killed, *flags, "--resume_training")) == 0
    assert capsys.readouterr().out.count("restored ") == 2
    for name in ("best.pt", "epoch_1.pt"):
        assert (killed / name).read_bytes() == (straight / "last.pt").read_bytes(), name
    got = read_jsonl(killed / "results.jsonl")[-1]
    assert {k: v for k, v in got.items() if "seconds" not in k} == {k: v for k, v in want.items() if "seconds" not in k}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_fp16_autocast_needs_cuda(cub, tmp_path, capsys, device):
    """fp16 needs the CUDA grad scaler; --device auto on a machine without CUDA is the CPU too (it used to
    pass the check and fail later inside torch)."""
    assert train_early(base_argv(cub, tmp_path / "run", "--use_amp", "--amp_dtype", "fp16", "--device", device)) == 2
    assert capsys.readouterr().err.strip() == "error: --amp_dtype fp16 needs CUDA; use the default bf16 on CPU"


def test_eval_mode_none_skips_the_per_epoch_evaluation_only(cub, tmp_path, capsys):
    """--eval_mode none: no evaluation after each epoch, the same weights and final metrics as a run that
    evaluates after each epoch (evaluation consumes no training randomness)."""
    finals = {}
    for mode in ("test", "none"):
        run = tmp_path / mode
        assert train_early(base_argv(cub, run, "--epochs", "2", "--eval_mode", mode, "--strategy", "early")) == 0
        rows = read_jsonl(run / "results.jsonl")
        assert [r["split"] for r in rows] == ([mode, mode, "final"] if mode == "test" else ["train", "train", "final"])
        assert ("test/acc" in rows[0]) == (mode == "test") and "train/loss" in rows[0]
        finals[mode] = {k: v for k, v in rows[-1].items() if "/acc" in k or k.startswith("diag/")}
        weights = load_checkpoint(run / "last.pt")["model"]
        finals[mode]["weights"] = torch.cat([w.flatten().float() for w in weights.values()])
    assert torch.equal(finals["test"].pop("weights"), finals["none"].pop("weights"))
    assert finals["test"] == finals["none"]
    assert "epoch 1/2 loss" in capsys.readouterr().out
