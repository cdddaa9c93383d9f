"""The paper's README command lines (ananthu-aniraj/masking_strategies_bias_removal), copied as published,
run on bgmask's scripts with only the script path, data paths, model size, epochs, batch size, image
size and worker count changed; and what each flag then means."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from bgmask import args as A
from bgmask.apps.scripts import eval_early, eval_late, script_strategies, train_early, train_late
from bgmask.settings import paper_flags

from conftest import write_tiny_cub

# feature_masking/README.md: late masking, frozen and fine-tuned (fine_tune_vit_feature_masking.py)
LATE_FROZEN = """--model_arch vit_base_patch14_dinov2.lvd142m --start_weights DEFAULT --data_path DATA --wandb --batch_size 16
--epochs 90 --dataset cub --save_every_n_epochs 40 --num_workers 2 --image_sub_path_train images
--image_sub_path_test images --train_split 1 --eval_mode test --wandb_project feature_masking
--job_type fine_tune_dinov2 --group vit_base --snapshot_dir SNAP --lr 1e-3 --optimizer_type adamw
--weight_decay 1e-2 --scheduler_type cosine --scratch_lr_factor 1 --smoothing 0.1 --augmentations_to_use timm
--seg_model_config_path SEGCFG --seg_model_checkpoint_path SEGCKPT --image_size 518 --freeze_backbone"""
LATE_FINETUNED = """--model_arch vit_large_patch14_dinov2.lvd142m --start_weights DEFAULT --data_path DATA --wandb --batch_size 4
--epochs 300 --dataset cub --save_every_n_epochs 20 --num_workers 2 --image_sub_path_train images
--image_sub_path_test images --train_split 1 --eval_mode test --wandb_project feature_masking
--job_type fine_tune_dinov2 --group vit_large --snapshot_dir SNAP --lr 4e-6 --min_lr 1e-8 --optimizer_type adamw
--weight_decay 5e-2 --scheduler_type cosine_with_warmup --scheduler_warmup_epochs 20 --scratch_lr_factor 1000
--drop_path 0.1 --smoothing 0.1 --augmentations_to_use timm --seg_model_config_path SEGCFG
--seg_model_checkpoint_path SEGCKPT --turn_on_mixup_or_cutmix --image_size 518"""
# early_masking_and_baseline/README.md: baseline frozen, early masking frozen (fine_tune_dinov2.py),
# baseline fine-tuned (fine_tune_dinov2_timm.py)
BASELINE_FROZEN = """--model_to_finetune vit_large --data_path DATA --wandb --batch_size 48 --epochs 90 --dataset cub
--save_every_n_epochs 20 --num_workers 2 --num_layers_linear_head 1 --image_sub_path_train images
--image_sub_path_test images --train_split 1 --eval_mode test --wandb_project cub_vit_cnn --job_type fine_tune_dinov2
--group vit_large --snapshot_dir SNAP --lr 1e-3 --optimizer_type adamw --weight_decay 1e-2 --scheduler_type cosine
--scratch_lr_factor 1 --smoothing 0.1 --augmentations_to_use timm --freeze_backbone --image_size 518"""
EARLY_FROZEN = """--model_to_finetune vit_large --data_path DATA --wandb --batch_size 64 --epochs 90 --dataset cub
--save_every_n_epochs 20 --num_workers 2 --num_layers_linear_head 1 --image_sub_path_train images
--image_sub_path_test images --train_split 1 --eval_mode test --wandb_project 2-stage-decoupled-classifier
--job_type fine_tune_dinov2 --group vit_large --snapshot_dir SNAP --lr 1e-3 --optimizer_type adamw
--weight_decay 1e-2 --scheduler_type cosine --scratch_lr_factor 1 --smoothing 0.1 --augmentations_to_use timm
--freeze_backbone --image_size 518"""
BASELINE_FINETUNED = """--model_to_finetune vit_large --data_path DATA --batch_size 6 --wandb --epochs 300 --dataset cub
--save_every_n_epochs 80 --num_workers 4 --num_layers_linear_head 1 --image_sub_path_train images
--image_sub_path_test images --train_split 1 --eval_mode test --wandb_project 2-stage-decoupled-classifier
--job_type fine_tune_dinov2 --group vit_large --snapshot_dir SNAP --lr 4e-6 --min_lr 1e-8 --optimizer_type adamw
--weight_decay 5e-2 --scheduler_type cosine_with_warmup --scheduler_warmup_epochs 20 --scratch_lr_factor 1000
--drop_path 0.1 --smoothing 0.1 --augmentations_to_use timm --image_size 518 --turn_on_mixup_or_cutmix"""
COMMANDS = {  # name -> (bgmask script: feature-level?, command)
    "late frozen": (True, LATE_FROZEN), "late fine-tuned": (True, LATE_FINETUNED),
    "baseline frozen": (False, BASELINE_FROZEN), "early frozen": (False, EARLY_FROZEN),
    "baseline fine-tuned": (False, BASELINE_FINETUNED),
}


def resolved(feature_level: bool, command: str, **paths) -> A.argparse.Namespace:
    """The command's config as bgmask runs it (parsed, the paper's spellings resolved)."""
    argv = [paths.get(a, a) for a in shlex.split(command)]
    cfg = A.parse_with_config(A.train_parser("t", script_strategies(feature_level)), argv)
    return A.argparse.Namespace(**{**vars(cfg), **paper_flags(vars(cfg))})


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_paper_command_parses_with_the_papers_meaning(name, capsys):
    feature_level, command = COMMANDS[name]
    cfg = resolved(feature_level, command)
    assert cfg.pretrained  # --start_weights DEFAULT, or a DINOv2 shorthand: always pretrained in the paper
    assert cfg.model_arch.endswith("_patch14_dinov2.lvd142m") and timm.is_model(cfg.model_arch)
    assert cfg.strategy == ("late" if feature_level else "baseline") and cfg.smoothing == 0.1
    assert cfg.late_mask_stage == "auto"  # the family decides: the last block for a ViT (the paper's default)
    assert "--eval_mode test" in capsys.readouterr().out  # said once: no checkpoint is chosen on test


def test_paper_spellings_map_onto_bgmask_flags():
    cfg = resolved(True, LATE_FROZEN + " --fm_second_last_block")
    assert cfg.late_mask_stage == "second_last"
    cfg = resolved(True, LATE_FROZEN.replace("vit_base_patch14_dinov2.lvd142m", "convnext_tiny")
                   + " --feature_masking_last_layer --output_stride 16")
    assert cfg.late_mask_stage == "last" and cfg.output_stride == 16
    cfg = resolved(False, BASELINE_FROZEN.replace("--model_to_finetune vit_large", "--model_arch resnet50"))
    assert cfg.model_arch == "resnet50" and not cfg.pretrained  # fine_tune_cnn.py: pretrained only when asked
    cfg = resolved(False, BASELINE_FROZEN + " --use_orig_dinov2_model")
    assert cfg.pretrained and cfg.model_arch == "vit_large_patch14_dinov2.lvd142m"


@pytest.mark.parametrize("extra, message", [
    ("--num_layers_linear_head 4", "--num_layers_linear_head 4: only a one-layer (Linear) head exists"),
    ("--dataset imagenet", "--dataset imagenet: CUB-200-2011 (with its Waterbirds folder) is the only dataset"),
    ("--fm_second_last_block --feature_masking_last_layer", "exclude each other"),
    ("--fm_second_last_block --late_mask_stage last", "--fm_second_last_block means --late_mask_stage second_last"),
    ("--imagenet_default_mean_and_std", "--imagenet_default_mean_and_std is not supported"),
    ("--start_weights yes", "argument --start_weights/--start-weights: invalid choice: 'yes'"),
    ("--eval_mode all", "argument --eval_mode/--eval-mode: invalid choice: 'all'"),
    ("--aa rand-m9-foo", "--aa"),
])
def test_paper_flag_values_without_paper_behaviour_are_one_line(extra, message, tmp_path, capsys):
    data = write_tiny_cub(tmp_path / "CUB")
    argv = shlex.split(LATE_FROZEN + " " + extra)
    argv = [{"DATA": str(data), "SNAP": str(tmp_path / "s"), "SEGCFG": "c.py", "SEGCKPT": "c.pth"}.get(a, a) for a in argv]
    assert train_late(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "s").exists()  # refused before anything is written


FROZEN_TRAINS = {  # arch -> (trained beside the head when frozen, the same with a second-last mask)
    "bgmask_convnext_tiny": (("head.norm.",), ("head.norm.", "stages.3.", "norm_pre.")),
    "bgmask_resnet_tiny": ((), ("layer4.",)),
    "bgmask_vit_tiny": ((), ("blocks.3.", "norm.")),
}


@pytest.mark.parametrize("arch", sorted(FROZEN_TRAINS))
@pytest.mark.parametrize("stage", ["last", "second_last"])
def test_what_a_frozen_backbone_still_trains(arch, stage):
    """As the paper's freezing loops: beside the new head, a frozen ConvNeXt trains its head norm, and the
    second-last variants (--fm_second_last_block, the CNN default) the last stage / block and final norm,
    all at the head's learning rate (its `scratch` group), in train mode; nothing else trains."""
    from bgmask.models import create_classifier

    clf = create_classifier(arch, 3, image_size=32, freeze_backbone=True, late_mask_stage=stage).train()
    prefixes = FROZEN_TRAINS[arch][stage == "second_last"]
    head = set(clf.head_state_keys())
    tuned = {n for n, _ in clf.named_parameters() if n.removeprefix("backbone.").startswith(prefixes)} - head
    assert bool(tuned) == bool(prefixes)
    assert {n for n, p in clf.named_parameters() if p.requires_grad} == head | tuned
    assert {id(p) for p in clf.head_parameters()} == {id(p) for n, p in clf.named_parameters() if n in head | tuned}
    assert clf.backbone_parameters() == []
    modes = {n: m.training for n, m in clf.backbone.named_modules() if n}
    assert all(modes[p.rstrip(".")] for p in prefixes) and not modes["blocks.0" if "vit" in arch else
                                                                    ("layer1" if "resnet" in arch else "stages.0")]


# ----------------------------------------------------------------------------------- the runs themselves

SMALL = {"--epochs": "1", "--batch_size": "4", "--image_size": "28", "--num_workers": "0"}  # size: 14 px patches
SMALLER_MODEL = {"vit_large": "vit_small", "vit_base_patch14_dinov2.lvd142m": "vit_small_patch14_dinov2.lvd142m",
                 "vit_large_patch14_dinov2.lvd142m": "vit_small_patch14_dinov2.lvd142m"}


def shrink(command: str, **paths) -> list[str]:
    """The command with only paths, model size, epochs, batch size, image size and workers changed."""
    argv = shlex.split(command)
    for i, a in enumerate(argv[:-1]):
        if a in SMALL:
            argv[i + 1] = SMALL[a]
    argv = [SMALLER_MODEL.get(a, paths.get(a, a)) for a in argv]
    return argv + ["--no_progress", "--threads", "1"]  # bgmask's own: quiet, one thread


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny CUB + Waterbirds, DINOv2 ViT-S/14 "pretrained" weights in a local file (served where timm
    would download them), and a small untrained segmenter for the online masks."""
    root = tmp_path_factory.mktemp("paper")
    w = {"DATA": str(write_tiny_cub(root / "CUB", num_classes=3, per_class=(4, 2), size=(40, 32)))}
    torch.manual_seed(0)
    hub = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False)  # the hub file's layout
    w["weights"] = root / "dinov2_vits14.safetensors"
    safetensors.torch.save_file(hub.state_dict(), str(w["weights"]))
    try:
        from bgmask.seg.checkpoint import save_slim
        from bgmask.seg.segmenter import build_model, read_config
    except ImportError:
        pytest.skip("MMSegmentation (the seg extra) is not installed")
    w["SEGCFG"] = str(Path(__file__).resolve().parents[1] / "mmsegmentation/configs/unet/"
                      "unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py")
    cfg = read_config(w["SEGCFG"])
    w["SEGCKPT"] = str(save_slim(root / "seg_slim.pth", build_model(cfg).state_dict(),
                                 {"classes": ["background", "bird"], "palette": [[0, 0, 0], [255, 255, 255]]},
                                 cfg.pretty_text))
    return w


@pytest.fixture(autouse=True)
def _fresh_wandb():
    """The commands pass --wandb (WANDB_MODE=disabled in tests): wandb's process-wide session would keep
    that mode for later tests, so it is torn down after each."""
    yield
    import wandb

    wandb.teardown()


@pytest.fixture
def hub_weights(world, monkeypatch):
    """Pretrained DINOv2 weights come from the local file through timm's own loading (no network)."""
    from bgmask.models import weights

    asked = []

    def cached(arch):
        asked.append(arch)
        return str(world["weights"]) if "dinov2" in arch else None

    monkeypatch.setattr(weights, "cached_pretrained_file", cached)
    return asked


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_paper_command_runs(name, world, hub_weights, tmp_path, capsys):
    feature_level, command = COMMANDS[name]
    snap = tmp_path / "snap"
    argv = shrink(command, DATA=world["DATA"], SNAP=str(snap), SEGCFG=world["SEGCFG"], SEGCKPT=world["SEGCKPT"])
    train = train_late if feature_level else train_early
    assert train(argv) == 0, capsys.readouterr().err
    assert hub_weights == ["vit_small_patch14_dinov2.lvd142m"]  # pretrained, as in the paper
    state = torch.load(snap / "last.pt", weights_only=True)
    trained, loaded = state["model"], safetensors.torch.load_file(str(world["weights"]))
    assert torch.equal(trained["backbone.blocks.0.attn.qkv.weight"], loaded["blocks.0.attn.qkv.weight"])  # frozen,
    # or fine-tuned at the paper's warm-up from lr 0 (its first epoch does not move the weights)
    optimised = len(state["optimizer"]["state"])  # parameters the optimiser stepped
    if "--freeze_backbone" in command:
        assert optimised == 2  # the head's weight and bias
    else:
        assert optimised == sum(p.numel() > 0 for k, p in trained.items()), optimised  # every parameter
    config = state["config"]
    assert config["model_arch"] == "vit_small_patch14_dinov2.lvd142m" and config["pretrained"]
    final = json.loads((snap / "final_metrics.json").read_text())
    assert final["checkpoint"] == "last" and "waterbirds/acc" in final  # the real Waterbirds folder
    out = capsys.readouterr().out
    assert "--image_sub_path_test images is the in-distribution image folder" in out
    if feature_level:
        assert config["late_mask_stage"] == "last" and config["seg_model_checkpoint_path"] == world["SEGCKPT"]
    evaluate = eval_late if feature_level else eval_early
    assert evaluate(shrink(command, DATA=world["DATA"], SNAP=str(snap), SEGCFG=world["SEGCFG"],
                           SEGCKPT=world["SEGCKPT"]) + ["--checkpoint", str(snap / "last.pt")]) == 0


def test_wandb_resume_id_continues_that_run(world, tmp_path, monkeypatch, capsys):
    import wandb

    calls = []

    class Run:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or Run())
    base = ["--data_path", world["DATA"], "--snapshot_dir", str(tmp_path / "r"), "--image_size", "32", "--batch_size",
            "4", "--num_workers", "0", "--no_progress", "--threads", "1", "--wandb"]
    assert train_early(base + ["--epochs", "1"]) == 0
    assert train_early(base + ["--epochs", "2", "--resume_training", "--wandb_resume_id", "abc123"]) == 2
    assert "was made with epochs=1" in capsys.readouterr().err  # (the same run: only the id is new)
    assert train_early(base + ["--epochs", "1", "--wandb_resume_id", "abc123"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --wandb_resume_id continues a wandb run: it needs --wandb and "
                                               "--resume_training")
    (tmp_path / "r" / "done").unlink()
    assert train_early(base + ["--epochs", "1", "--resume_training", "--wandb_resume_id", "abc123"]) == 0
    assert calls[0].get("id") is None and (calls[-1]["id"], calls[-1]["resume"]) == ("abc123", "must")


def test_eval_script_evaluates_a_snapshot_of_the_papers_code(world, tmp_path):
    """snapshot_best.pt of fine_tune_dinov2_timm.py (DINOv2 wrapped as backbone + linear_head, GAP head):
    the architecture comes from the flags, as in the paper's evaluation; its logits are the paper model's."""
    from test_paper_checkpoints import LinearHeadViTTimm, randomize

    from bgmask.models import create_classifier

    torch.manual_seed(0)
    backbone = timm.create_model("bgmask_vit_tiny", num_classes=0, img_size=32)
    paper = randomize(LinearHeadViTTimm(backbone=backbone, linear_head=torch.nn.Linear(backbone.embed_dim, 3),
                                        patch_tokens_only=True))
    snapshot = tmp_path / "snapshot_best.pt"
    torch.save({"model_state": paper.state_dict(), "optimizer_state": {}, "finished_epoch": 7,
                "epoch_test_accuracies": [0.4]}, snapshot)
    argv = ["--checkpoint", str(snapshot), "--data_path", world["DATA"], "--model_arch", "bgmask_vit_tiny",
            "--patch_tokens_only", "--image_size", "32", "--num_workers", "0", "--no_progress", "--threads", "1",
            "--out", str(tmp_path / "ev")]
    assert eval_early(argv) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["epoch"] == 7 and ev["split"] == "eval" and "waterbirds/worst_group_acc" in ev
    # the same numbers as the paper's model on the same images
    from bgmask.data import CUBDataset, build_transform

    ds = CUBDataset(world["DATA"], "test", transform=build_transform(False, 32))
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        ours = create_classifier("bgmask_vit_tiny", 3, head="gap", image_size=32)
        from bgmask.models.paper import convert_paper_state

        ours.load_state_dict(convert_paper_state(paper.state_dict(), ours))
        acc = float((paper(x).argmax(1) == torch.tensor(ds.labels())).float().mean())
        assert torch.allclose(ours.eval()(x), paper(x), atol=1e-5)
    assert ev["test/acc"] == pytest.approx(acc)
    assert eval_early(argv[:-2] + ["--class_token_only", "--out", str(tmp_path / "x")]) == 2  # flags decide


def test_eval_mode_train_and_cutmix_minmax(world, tmp_path):
    """The paper's remaining choices: per-epoch accuracy on the training images, cutmix box bounds."""
    run = tmp_path / "r"
    assert train_early(["--data_path", world["DATA"], "--snapshot_dir", str(run), "--image_size", "32",
                        "--batch_size", "4", "--num_workers", "0", "--no_progress", "--threads", "1", "--epochs", "1",
                        "--eval_mode", "train", "--turn_on_mixup_or_cutmix", "--cutmix_minmax", "0.2", "0.8"]) == 0
    first = json.loads((run / "results.jsonl").read_text().splitlines()[0])
    assert first["split"] == "train_eval" and first["train_eval/num_samples"] == 12
    from bgmask.optim import build_mixup

    cfg = A.parse_with_config(A.train_parser("t"), ["--turn_on_mixup_or_cutmix", "--cutmix_minmax", "0.2", "0.8"])
    assert build_mixup(cfg, 3).cutmix_minmax == (0.2, 0.8)
