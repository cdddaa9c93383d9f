"""Command-line flags, defined once. Scripts combine these groups with `parents=[...]`.

Flags use the paper's underscore spelling (`--image_size`); each also accepts a dashed alias
(`--image-size`).
"""

from __future__ import annotations

import argparse
import functools

from bgmask.errors import ArgumentParser, Interval


def add(group, flag: str, *more, range: str | None = None, output: str | None = None,  # noqa: A002
        **kwargs):
    """add_argument with a dashed alias for an underscored flag. A numeric flag declares its allowed
    values here, `range="[0, 1]"` / `"(0, inf)"` (see bgmask.errors.Interval); ArgumentParser.parse_args
    checks every one of them (command line and --config values) before a script does anything. A flag
    naming what the command writes declares `output="folder"`, `"file"` or `"prefix"`: parse_args checks
    that it can be written (bgmask.errors.require_output), before any work."""
    names = [flag, *more]
    if flag.startswith("--") and "_" in flag:
        names.append(flag.replace("_", "-"))
    action = group.add_argument(*names, **kwargs)
    if range is not None:
        action.range = Interval(range)
    if output is not None:
        action.output = output
    return action


def make_synthetic_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add(parser, "--out", required=True, output="folder", help="output folder (CUB_200_2011 layout)")
    add(parser, "--num_classes", type=int, default=10, range="[2, 999]")
    add(parser, "--image_size", type=int, default=64, range="[32, 4096]")
    add(parser, "--train_per_class", type=int, default=400, range="[1, 9999]")
    add(parser, "--test_per_class", type=int, default=100, range="[1, 9999]")
    add(parser, "--correlation", type=float, default=0.95, range="[0, 1]",
        help="fraction of train / in-distribution test images on their species' home habitat")
    add(parser, "--seed", type=int, default=0, range="[0, inf)")
    add(parser, "--overwrite", action="store_true", help="replace a non-empty output folder")
    g = parser.add_argument_group("real-data quirks (off by default)")
    add(g, "--varied_sizes", action="store_true",
        help="CUB-like non-square sizes: 4:3 or 3:4 with the long side 0.6-1.0 x --image_size")
    add(g, "--grayscale_fraction", type=float, default=0.0, range="[0, 1]",
        help="fraction of images (and their Waterbirds copies) saved as grayscale (L) JPEGs")
    add(g, "--cmyk_fraction", type=float, default=0.0, range="[0, 1]",
        help="fraction of images (and their Waterbirds copies) saved as CMYK JPEGs")
    w = parser.add_argument_group("standard Waterbirds protocol (off by default; see bgmask/data/synthetic_waterbirds.py)")
    add(w, "--waterbirds_splits", action="store_true",
        help="write a complete waterbird_complete95_forest2water2: every image on a new background, binary y "
             "(waterbird), place of the background, metadata.csv splits 0 = train (correlated), 1 = val, 2 = test "
             "(val and test balanced between places within each class); default: the test images only, split 2")
    add(w, "--waterbirds_val_fraction", type=float, default=None, range="(0, 1)",
        help="with --waterbirds_splits: fraction of each species' train images in split 1 (val); default 0.2")
    add(w, "--waterbirds_correlation", type=float, default=None, range="[0, 1]",
        help="with --waterbirds_splits: P(place == y) in split 0 (train), exact per species; default 0.95 "
             "(0.5: a control folder without the shortcut)")
    return parser


def make_binary_seg_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add(parser, "--cub_root", required=True, help="CUB_200_2011 root (real or synthetic)")
    add(parser, "--out", required=True, output="folder", help="output folder (cub_binary_segmentation layout)")
    add(parser, "--val_fraction", type=float, default=0.1, range="[0, 1)",
        help="fraction of CUB train images held out as the segmentation val split")
    add(parser, "--seed", type=int, default=0, range="[0, inf)")
    add(parser, "--overwrite", action="store_true")
    workers_arg(parser)
    return parser


def workers_arg(parser) -> None:
    from bgmask.processes import default_workers

    add(parser, "--workers", type=int, default=default_workers(), range="[0, 256]",
        help="worker processes for the per-image loop (0 or 1: none); default min(CPU cores, 8)")


# ---------------------------------------------------------------- training / evaluation flag groups


def data_args(add_help: bool = False) -> argparse.ArgumentParser:
    from bgmask.data.transforms import AUGMENTATIONS, ERASE_MODES, INTERPOLATIONS

    p = ArgumentParser(add_help=add_help)
    g = p.add_argument_group("data")
    add(g, "--data_path", required=False, help="CUB_200_2011 root (real or `bgmask make-synthetic`)")
    add(g, "--image_sub_path_train", default="images",
        help="image folder for train/val and the in-distribution test (e.g. a masked copy)")
    add(g, "--image_sub_path_test", default="waterbird_complete95_forest2water2",
        help="image folder with the same test ids out of distribution (Waterbirds)")
    add(g, "--train_split", type=float, default=1.0, range="(0, 1]",
        help="fraction of CUB's train images used for training; the rest is the val split")
    add(g, "--split_seed", type=int, default=0, range="[0, inf)", help="seed of the train/val split")
    add(g, "--image_size", type=int, default=224, range="[1, 4096]", help="train crop and evaluation crop size")
    add(g, "--crop_pct", type=float, default=1.0, range="(0, 1]",
        help="evaluation: shorter side -> image_size / crop_pct, then the central image_size crop "
             "(1.0 = the paper's Resize + CenterCrop; 0.875 = timm's)")
    add(g, "--augmentations_to_use", default="timm", choices=AUGMENTATIONS,
        help="training set: timm (create_transform + RandAugment), cub_original (resize, flip, brightness, "
             "affine, random crop), torchvision (resize image_size*256/224 + centre crop, no randomness), flip, "
             "none; see bgmask/data/transforms.py")
    t = p.add_argument_group("timm augmentation set (--augmentations_to_use timm)")
    add(t, "--aa", default="rand-m9-mstd0.5-inc1",
        help="timm RandAugment / AutoAugment policy, e.g. rand-m9-mstd0.5-inc1, v0; 'none' turns it off")
    add(t, "--train_interpolation", default="bicubic", choices=INTERPOLATIONS,
        help="interpolation of the random resized crop and of RandAugment's geometric ops")
    add(t, "--color_jitter", type=float, default=0.4, range="[0, inf)",
        help="ColorJitter brightness/contrast/saturation; as in timm only without --aa (--aa none) or with a "
             "'3a' policy")
    add(t, "--reprob", type=float, default=0.25, range="[0, 1]", help="random-erasing probability")
    add(t, "--remode", default="pixel", choices=ERASE_MODES, help="random-erasing fill")
    add(t, "--recount", type=int, default=1, range="[1, inf)", help="random erasing: up to this many boxes per image")
    add(t, "--imagenet_default_mean_and_std", action="store_false",
        help="the paper's switch of the training transform alone to Inception mean/std; refused: bgmask "
             "normalises train and eval alike with the model's mean/std")
    add(g, "--batch_size", type=int, default=32, range="[1, inf)", help="per process")
    add(g, "--eval_batch_size", type=int, default=None, range="[1, inf)", help="default: 2 x batch_size")
    add(g, "--num_workers", type=int, default=2, range="[0, inf)")
    add(g, "--decode_full", action="store_true",
        help="decode every JPEG at full size (default: a JPEG twice or more the size the first resize needs is "
             "decoded at 1/2, 1/4 or 1/8 scale by libjpeg, its mask reduced alike; see bgmask/data/transforms.py)")
    return p


DINOV2_SHORTHANDS = ("vit_small", "vit_base", "vit_large", "vit_giant")  # the paper's names -> timm DINOv2


def model_args(add_help: bool = False) -> argparse.ArgumentParser:
    p = ArgumentParser(add_help=add_help)
    g = p.add_argument_group("model")
    add(g, "--model_arch", "--model_to_finetune", "--model-to-finetune", default="bgmask_resnet_tiny",
        help="any timm model name, or the paper's DINOv2 shorthands vit_small / vit_base / vit_large / vit_giant "
             "(= vit_*_patch14_dinov2.lvd142m with its pretrained weights, as the paper's DINOv2 scripts)")
    add(g, "--pretrained", action="store_true", help="timm hub weights (needs network or a local cache)")
    add(g, "--start_weights", default="", choices=["", "DEFAULT"], help="the paper's spelling: DEFAULT = --pretrained")
    add(g, "--use_orig_dinov2_model", action="store_true",
        help="the paper's torch.hub DINOv2: bgmask loads the same LVD-142M weights through timm (--pretrained)")
    add(g, "--pretrained_file", default=None, help="local .pth/.safetensors weights")
    add(g, "--freeze_backbone", action="store_true",
        help="linear probe: only the head trains (with --late_mask_stage second_last also the last stage / block "
             "and the final norm, as the paper's frozen second-last variants)")
    add(g, "--drop_path", type=float, default=0.0, range="[0, 1)")
    add(g, "--output_stride", type=int, default=32, choices=[8, 16, 32],
        help="CNNs: timm output_stride (dilated last stages below 32)")
    add(g, "--num_layers_linear_head", type=int, default=1, choices=[1, 4],
        help="the paper's flag: its code builds a one-layer (Linear) head whatever it says; 1 is accepted, 4 refused")
    heads = g.add_mutually_exclusive_group()
    add(heads, "--class_token_only", action="store_true", help="ViT head on the CLS token")
    add(heads, "--patch_tokens_only", action="store_true", help="ViT head on the mean of patch tokens (GAP)")
    return p


LATE_FLAG_DEFAULTS = {"late_mask_stage": "auto", "late_pool": "mean", "late_drop_cls": False,
                      "fm_second_last_block": False, "feature_masking_last_layer": False}


def masking_args(add_help: bool = False, strategies=None, default: str | None = None) -> argparse.ArgumentParser:
    """--strategy takes `strategies` (default: every registered one) and `default` (default: the first)."""
    from bgmask.masking.strategies import MASK_FILLS, STRATEGIES
    from bgmask.models import LATE_MASK_STAGES, LATE_POOLS

    strategies = list(strategies or STRATEGIES)
    p = ArgumentParser(add_help=add_help)
    g = p.add_argument_group("masking")
    add(g, "--strategy", default=default or strategies[0], choices=strategies)
    add(g, "--mask_source", default="gt",
        help="'gt' (ROOT/segmentations) or a predicted-mask folder laid out as DIR/<image folder>/<rel>.png")
    add(g, "--mask_dir", default=None, help="alias of --mask_source DIR (late-masking spelling)")
    add(g, "--mask_threshold", type=int, default=0, range="[0, 254]", help="mask pixel > threshold = bird")
    add(g, "--mask_fill", default="black", choices=MASK_FILLS, help="early masking background fill")
    add(g, "--seg_model_config_path", default=None,
        help="online segmenter: MMSeg config; masks are predicted on each (augmented) batch")
    add(g, "--seg_model_checkpoint_path", default=None, help="online segmenter: checkpoint (slim or full)")
    add(g, "--seg_batch_size", type=int, default=None, range="[1, inf)", metavar="N",
        help="online segmenter: segment at most N images at a time (default: the whole training or "
             "evaluation batch); lowers its peak memory, same masks")
    late = p.add_argument_group("late masking (--strategy late)")
    add(late, "--late_mask_stage", "--late_mask_block", default=LATE_FLAG_DEFAULTS["late_mask_stage"],
        choices=["auto", *LATE_MASK_STAGES],
        help="mask the last stage/block output, or the second-last and run the last on it; auto (the paper's "
             "defaults): second_last for ResNet / ConvNeXt, last for ViTs and other CNNs")
    add(late, "--fm_second_last_block", action="store_true", help="the paper's spelling of --late_mask_stage second_last (ViT)")
    add(late, "--feature_masking_last_layer", action="store_true",
        help="the paper's spelling of --late_mask_stage last (CNN)")
    add(late, "--late_pool", default=LATE_FLAG_DEFAULTS["late_pool"], choices=LATE_POOLS,
        help="mean over the whole grid (the paper) or over bird cells only")
    add(late, "--late_drop_cls", action="store_true", help="ViT: head on masked patch tokens only")
    return p


def schedule_flag(group, name: str, range: str, help: str) -> None:  # noqa: A002
    """The flag of a field of bgmask.optim.LRSchedule: its type and default are the field's."""
    from bgmask.optim import LRSchedule

    default = LRSchedule.__dataclass_fields__[name].default
    add(group, f"--{name}", type=type(default), default=default, range=range, help=help)


def optim_args(add_help: bool = False) -> argparse.ArgumentParser:
    from bgmask.eval import AMP_DTYPES
    from bgmask.optim import OPTIMIZERS, SCHEDULES

    p = ArgumentParser(add_help=add_help)
    g = p.add_argument_group("optimisation")
    add(g, "--epochs", type=int, default=10, range="[1, inf)")
    add(g, "--optimizer_type", default="adamw", choices=OPTIMIZERS)
    add(g, "--lr", type=float, default=1e-3, range="(0, inf)")
    add(g, "--weight_decay", type=float, default=1e-2, range="[0, inf)")
    add(g, "--momentum", type=float, default=0.9, range="[0, 1]")
    add(g, "--betas1", type=float, default=0.9, range="[0, 1)")
    add(g, "--betas2", type=float, default=0.999, range="[0, 1)")
    add(g, "--scratch_lr_factor", type=float, default=1.0, range="[0, inf)", help="head learning rate = lr x this")
    s = p.add_argument_group("learning-rate schedule (the paper's, per epoch; formulas in bgmask.optim.LRSchedule)")
    add(s, "--scheduler_type", default="cosine", choices=list(SCHEDULES))
    # Flags that only some --scheduler_type reads: their ranges refuse what no schedule takes (NaN, a negative
    # count); LRSchedule checks the stricter rule of the schedule in use, as one line too.
    schedule_flag(s, "scheduler_warmup_epochs", "[0, inf)", "cosine_with_warmup: linear warm-up epochs from lr 0 "
                  "(may exceed --epochs); cosine_warmup_restart: length of the first cycle")
    schedule_flag(s, "min_lr", "(-inf, inf)", "cosine schedules: lowest lr (absolute, every group)")
    schedule_flag(s, "scheduler_restart_factor", "[0, inf)",
                  "cosine_warmup_restart: cycle length multiplier after each restart")
    schedule_flag(s, "scheduler_step_size", "[0, inf)", "steplr: epochs between decays")
    schedule_flag(s, "scheduler_gamma", "(0, 1]", "steplr: decay factor")
    schedule_flag(s, "scheduler_start_factor", "[0, inf)", "linearlr: lr factor at epoch 0")
    schedule_flag(s, "scheduler_end_factor", "[0, inf)", "linearlr: factor reached after the last epoch")
    add(g, "--smoothing", type=float, default=0.1, range="[0, 1)", help="label smoothing (the paper: 0.1)")
    add(g, "--grad_norm_clip", type=float, default=None, range="(0, inf)")
    add(g, "--use_amp", action="store_true", help="mixed precision: bf16 autocast (fp16 + grad scaler with --amp_dtype fp16 on CUDA)")
    add(g, "--amp_dtype", default="bf16", choices=list(AMP_DTYPES))
    add(g, "--channels_last", action="store_const", const=True, default=None,
        help="channels_last memory format (default: on for CNN backbones, off for ViTs: see --no_channels_last)")
    add(g, "--no_channels_last", dest="channels_last", action="store_const", const=False,
        help="keep the contiguous (NCHW) memory format even for a CNN")
    add(g, "--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
        help="torch.compile the training model (default backend inductor; 'eager' checks the capture only)")
    add(g, "--grad_accum_steps", type=int, default=1, range="[1, inf)", metavar="N",
        help="optimiser step every N batches on their mean loss: the update of one N x --batch_size batch "
             "(BatchNorm still sees --batch_size); an epoch's last group may be shorter")
    add(g, "--grad_checkpointing", action="store_true",
        help="recompute the backbone's activations in the backward pass (timm's set_grad_checkpointing): "
             "less memory for a fine-tuned backbone, about one more forward of compute; same gradients")
    add(g, "--no_tf32", action="store_true",
        help="CUDA: keep float32 matmuls and convolutions in full float32 (default: TF32 allowed, as timm and "
             "DINOv2 train)")
    m = p.add_argument_group("mixup / cutmix")
    add(m, "--turn_on_mixup_or_cutmix", action="store_true")
    add(m, "--mixup", type=float, default=0.8, range="[0, inf)", help="mixup alpha")
    add(m, "--cutmix", type=float, default=1.0, range="[0, inf)", help="cutmix alpha")
    add(m, "--mixup_prob", type=float, default=1.0, range="[0, 1]")
    add(m, "--mixup_switch_prob", type=float, default=0.5, range="[0, 1]")
    add(m, "--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    add(m, "--cutmix_minmax", type=float, nargs=2, default=None, range="[0, 1]", metavar=("MIN", "MAX"),
        help="cutmix box area ratio bounds (timm; replaces the alpha-sampled box size)")
    return p


def run_args(add_help: bool = False) -> argparse.ArgumentParser:
    p = ArgumentParser(add_help=add_help)
    g = p.add_argument_group("run")
    add(g, "--config", default=None, help="YAML file of defaults; flags given on the command line win")
    add(g, "--snapshot_dir", default="runs/run", help="run folder: config, checkpoints, results.jsonl")
    add(g, "--save_every_n_epochs", type=int, default=0, range="[0, inf)", help="also keep epoch_<k>.pt every n epochs")
    add(g, "--eval_mode", default="val", choices=["val", "test", "train", "none"],
        help="split evaluated after each epoch (none: only the final evaluation); best.pt is picked on val only "
             "(never on test, unlike the paper)")
    add(g, "--dataset", default="cub", help="the paper's flag: CUB-200-2011 (and Waterbirds) is the only dataset")
    add(g, "--resplit", action="store_true", help="the paper's flag, unused there too: accepted, no effect")
    add(g, "--log_interval", type=int, default=10, range="[1, inf)",
        help="steps between updates of the progress bar's loss")
    add(g, "--eval_only", action="store_true", help="evaluate the checkpoint in --snapshot_dir (or --checkpoint)")
    add(g, "--checkpoint", default=None, help="checkpoint for --eval_only (default SNAPSHOT_DIR/best.pt or last.pt)")
    add(g, "--resume_training", action="store_true", help="continue from SNAPSHOT_DIR/last.pt")
    add(g, "--trust_checkpoint", action="store_true",
        help="allow loading a checkpoint that needs arbitrary unpickling (only for files you trust)")
    add(g, "--seed", type=int, default=0, range="[0, inf)")
    add(g, "--device", default="auto", choices=["auto", "cpu", "cuda"])
    add(g, "--threads", type=int, default=None, range="[1, inf)", help="torch CPU threads per process")
    add(g, "--max_steps_per_epoch", type=int, default=None, range="[1, inf)",
        help="cap on training steps per epoch (smoke tests)")
    add(g, "--no_progress", action="store_true", help="no tqdm bars")
    w = p.add_argument_group("wandb (optional; WANDB_MODE=offline works without network)")
    add(w, "--wandb", action="store_true")
    add(w, "--wandb_project", default="bgmask")
    add(w, "--group", default=None)
    add(w, "--job_type", default=None)
    add(w, "--wandb_resume_id", default=None, help="with --resume_training: continue this wandb run")
    return p


def train_parser(description: str, strategies=None, default: str | None = None) -> argparse.ArgumentParser:
    return ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[data_args(), model_args(), masking_args(strategies=strategies, default=default), optim_args(),
                 method_args(), run_args(), eval_args(ArgumentParser(add_help=False))],
    )


PROTOCOLS = ("cub", "waterbirds")


def method_args(add_help: bool = False, post_hoc: bool = False) -> argparse.ArgumentParser:
    """--protocol, and --method with the flags of each registered method (`bgmask.methods.METHODS`): the
    training methods, or with `post_hoc` those applied to a trained checkpoint."""
    from bgmask.methods import METHODS

    p = ArgumentParser(add_help=add_help)
    g = p.add_argument_group("protocol and method")
    add(g, "--protocol", default="cub", choices=list(PROTOCOLS),
        help="cub (the paper's): train on CUB's species, test the same species on Waterbirds; waterbirds (Sagawa et "
             "al. 2020): binary waterbird/landbird on the Waterbirds folder's splits 0/1/2 (--image_sub_path_test), "
             "best.pt chosen on val worst-group accuracy, per-group / mean / worst-group accuracy reported")
    names = [n for n, m in METHODS.items() if m.post_hoc == post_hoc]
    if not post_hoc:
        add(g, "--method", default="erm", choices=names,
            help="training method: " + "; ".join(f"{n}: {METHODS[n].label}" for n in names))
    for name in names:
        for flag in METHODS[name].flags:
            add(g, f"--{flag.dest}", **flag.kwargs())
    return p


def eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of the final evaluation (train.py's last step and eval_waterbirds.py) beyond the splits'."""
    g = parser.add_argument_group("attribution (where the model looks: bgmask.attribution)")
    add(g, "--attribution_images", type=int, default=None, range="[0, inf)", metavar="N",
        help="per split, N images (a fixed subset drawn with --seed) whose InputXGradient maps of the predicted "
             "class give <split>/attr_bg_fraction: the share of positive attribution on GT background; 0 = off; "
             "default 64 when ROOT/segmentations exists, else off (an explicit N needs it)")
    add(g, "--attribution_batch_size", type=int, default=8, range="[1, inf)", metavar="N",
        help="images per attribution pass (each keeps a backward graph; small, so the final evaluation of a "
             "large model fits where training did)")
    return parser


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse flags; `--config FILE.yaml` supplies defaults (unknown keys are an error). Each value of the
    file goes through the same per-flag conversion and check as the command line's
    (`bgmask.errors.flag_value`), with the file named in its error line."""
    from bgmask.errors import settings_from_mapping

    pre = ArgumentParser(add_help=False)
    add(pre, "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = known.config
        parser.set_defaults(**settings_from_mapping(parser, read_config(path), f"--config {path}"))
    return parser.parse_args(argv)


def read_config(path) -> dict:
    """The mapping in a --config YAML file; a missing, non-UTF-8 or malformed file is one line naming it."""
    import yaml

    from bgmask.errors import UserError, require_file

    path = require_file(path, "--config file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") \
            from None
    except OSError as e:
        raise UserError(f"cannot read --config {path}: {e.strerror or e}") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    return values


@functools.lru_cache(maxsize=1)
def train_flags() -> argparse.ArgumentParser:
    """train.py's parser with every strategy, built once: for reading settings (their checks, defaults and
    flags), never for parsing a command line (parse_with_config changes a parser's defaults)."""
    return train_parser("saved settings")  # every strategy: a checkpoint may come from either script


def checked_settings(values, source: str) -> dict:
    """A run's saved flags (a checkpoint's `config`), each through the command line's check
    (`bgmask.errors.flag_value`); a bad value is one line starting with `source`. Keys that are no flag of this
    bgmask (a checkpoint of another version) are kept as they are."""
    from bgmask.errors import UserError, settings_from_mapping

    if not isinstance(values, dict):
        raise UserError(f"{source}: its saved settings are not a mapping of flag names to values")
    return settings_from_mapping(train_flags(), values, source, unknown="keep")


def make_masked_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from bgmask.masking.strategies import MASK_FILLS

    add(parser, "--cub_root", required=True)
    add(parser, "--masks", default="gt", help="'gt' or a predicted-mask folder (DIR/<image folder>/<rel>.png)")
    add(parser, "--out_subdir", required=True, help="NAME: writes ROOT/NAME and ROOT/NAME_waterbirds")
    add(parser, "--mask_fill", default="black", choices=MASK_FILLS)
    add(parser, "--mask_threshold", type=int, default=0, range="[0, 254]")
    workers_arg(parser)
    return parser
