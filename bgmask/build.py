"""What a run is made of, built from its flags: datasets, the classifier, the mask source (files or an
online segmenter), the strategy, and the training model (DDP, torch.compile)."""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

from bgmask.data import CUBDataset, MaskSource, WaterbirdsDataset, build_transform
from bgmask.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bgmask.data.cub import WATERBIRDS_SUBDIR
from bgmask.data.waterbirds import CLASS_NAMES as WATERBIRDS_CLASSES
from bgmask.distributed import DistInfo
from bgmask.errors import UserError, require_dir
from bgmask.masking.strategies import STRATEGIES, Strategy, create_strategy
from bgmask.methods import build_method
from bgmask.optim import EpochScheduler, build_loss, build_mixup, build_optimizer

# ------------------------------------------------------------------------------------------ model


def head_type(flags: dict) -> str | None:
    if flags.get("class_token_only"):
        return "cls"
    if flags.get("patch_tokens_only"):
        return "gap"
    return None


def model_kwargs(flags: dict, num_classes: int) -> dict:
    """The keyword arguments of `create_classifier` that a run's flags ask for. A checkpoint stores them
    and rebuilds its model with `create_classifier(**model_kwargs)`. Only feature-level strategies mask a
    stage (the others' models are built with the plain "last")."""
    strategy = STRATEGIES.get(flags.get("strategy", "baseline"))
    stage = flags.get("late_mask_stage", "last") if strategy is not None and strategy.masks_features else "last"
    return dict(model_arch=flags["model_arch"], num_classes=num_classes, head=head_type(flags),
                pretrained=bool(flags.get("pretrained", False)), pretrained_file=flags.get("pretrained_file"),
                drop_path=float(flags.get("drop_path", 0.0)), image_size=flags.get("image_size"),
                freeze_backbone=bool(flags.get("freeze_backbone", False)),
                late_mask_stage=stage, late_pool=flags.get("late_pool", "mean"),
                late_drop_cls=bool(flags.get("late_drop_cls", False)), output_stride=int(flags.get("output_stride", 32)))


def build_model(kwargs: dict) -> nn.Module:
    from bgmask.models import create_classifier

    return create_classifier(**kwargs)


def compile_model(model, backend: str):
    """`torch.compile`, with a clear line when the backend is unknown."""
    try:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
    except Exception:  # listing is best effort; torch.compile itself is the judge
        known = None
    if known is not None and backend not in known:
        raise UserError(f"unknown --torchcompile backend {backend!r} (expected one of {', '.join(sorted(known))})")
    return torch.compile(model, backend=backend)


def training_model(model: nn.Module, cfg: Namespace, dist: DistInfo) -> nn.Module:
    """The module the training loop calls: DDP under torchrun, compiled with --torchcompile. Only the
    training model is compiled; checkpoints keep the plain module's keys (no `_orig_mod.`) and evaluation
    runs the plain module (compiling no-grad evaluation would be a second graph)."""
    if dist.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.torchcompile:
        model = compile_model(model, cfg.torchcompile)
    return model


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def data_config(model, cfg: Namespace) -> dict:
    """The normalisation and geometry a checkpoint records (evaluation reuses them)."""
    return {"mean": list(model.data_config["mean"]), "std": list(model.data_config["std"]),
            "image_size": cfg.image_size, "crop_pct": cfg.crop_pct}


def strategy_of(cfg: Namespace, data_cfg: dict) -> Strategy:
    return create_strategy(cfg.strategy, mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]),
                           mask_fill=cfg.mask_fill)


# ------------------------------------------------------------------------------------------- data


def train_transform(cfg: Namespace, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The training transform the flags name (built up front by bgmask.settings too, so a bad
    augmentation flag is refused before anything is written)."""
    return full_decode(cfg, build_transform(
        True, cfg.image_size, cfg.augmentations_to_use, mean, std, cfg.crop_pct,
        imagenet_default_mean_and_std=cfg.imagenet_default_mean_and_std, aa=cfg.aa,
        train_interpolation=cfg.train_interpolation, color_jitter=cfg.color_jitter, reprob=cfg.reprob,
        remode=cfg.remode, recount=cfg.recount))


def full_decode(cfg: Namespace, transform):
    """--decode_full: the transform asks for full-size JPEG decoding."""
    if getattr(cfg, "decode_full", False):
        transform.decode_min_side = None
    return transform


def build_datasets(cfg: Namespace, data_cfg: dict, train: bool = True, with_masks: bool = True) -> dict:
    """train (when `train`), val (when train_split < 1), test and waterbirds (when that folder exists); under
    --protocol waterbirds the Waterbirds folder's own train / val / test splits. Masks are read from disk
    when the strategy needs them and no online segmenter supplies them."""
    root = require_dir(cfg.data_path, "--data_path")
    mean, std = data_cfg["mean"], data_cfg["std"]
    needs_mask = create_strategy(cfg.strategy).needs_mask and with_masks
    masks = MaskSource(cfg.mask_source, cfg.mask_threshold) if needs_mask else None
    eval_tf = full_decode(cfg, build_transform(False, cfg.image_size, mean=mean, std=std, crop_pct=cfg.crop_pct))
    train_tf = train_transform(cfg, mean, std) if train else None
    if cfg.protocol == "waterbirds":
        return waterbirds_splits(cfg, root, masks, train_tf, eval_tf)
    common = dict(root=root, train_split=cfg.train_split, split_seed=cfg.split_seed)
    out = {}
    if train:
        out["train"] = CUBDataset(split="train", image_subdir=cfg.image_sub_path_train, masks=masks,
                                  transform=train_tf, **common)
    if train and cfg.eval_mode == "train":  # the training images with the evaluation transform
        out["train_eval"] = CUBDataset(split="train", image_subdir=cfg.image_sub_path_train, masks=masks,
                                       transform=eval_tf, **common)
    if cfg.train_split < 1.0:
        out["val"] = CUBDataset(split="val", image_subdir=cfg.image_sub_path_train, masks=masks,
                                transform=eval_tf, **common)
    out["test"] = CUBDataset(split="test", image_subdir=cfg.image_sub_path_train, masks=masks,
                             transform=eval_tf, **common)
    waterbirds = waterbirds_folder(cfg, root)
    if waterbirds is not None:
        out["waterbirds"] = CUBDataset(split="test", image_subdir=waterbirds, masks=masks, transform=eval_tf, **common)
    return out


def waterbirds_splits(cfg: Namespace, root: Path, masks, train_tf, eval_tf) -> dict:
    """--protocol waterbirds: the folder's split 0 (train, with `train_tf`; None: not built), 1 (val) and 2
    (test); the training images with the evaluation transform for --eval_mode train."""
    def split(name, transform):
        return WaterbirdsDataset(root, name, image_subdir=cfg.image_sub_path_test, masks=masks, transform=transform)

    out = {"train": split("train", train_tf)} if train_tf is not None else {}
    if train_tf is not None and cfg.eval_mode == "train":
        out["train_eval"] = split("train", eval_tf)
    return {**out, "val": split("val", eval_tf), "test": split("test", eval_tf)}


def classes_of(cfg: Namespace) -> tuple[int, list]:
    """(number of classes, their names) of the run's task: CUB's species, or waterbird / landbird."""
    if cfg.protocol == "waterbirds":
        return len(WATERBIRDS_CLASSES), list(WATERBIRDS_CLASSES)
    probe = CUBDataset(cfg.data_path, "test", check_files=False)
    return probe.num_classes, probe.class_names


def waterbirds_folder(cfg: Namespace, root: Path) -> str | None:
    """The image folder reported as Waterbirds, or None. The in-distribution folder never is: the paper's
    commands pass `--image_sub_path_test images` while training (their per-epoch test is CUB's), which
    bgmask reports as test/ and, when training on plain images, pairs with the real Waterbirds folder."""
    from bgmask.distributed import is_main_process

    sub = cfg.image_sub_path_test
    if sub not in ("images", cfg.image_sub_path_train):
        if not (root / sub).is_dir():
            if sub != WATERBIRDS_SUBDIR:
                raise UserError(f"--image_sub_path_test folder not found: {root / sub}")
            return None
        return sub
    plain = cfg.image_sub_path_train == "images" and (root / WATERBIRDS_SUBDIR).is_dir()
    if is_main_process():
        then = (f"Waterbirds accuracy comes from {WATERBIRDS_SUBDIR}" if plain else "no Waterbirds accuracy is "
                "reported (name a Waterbirds folder, e.g. NAME_waterbirds written by make-masked)")
        print(f"note: --image_sub_path_test {sub} is the in-distribution image folder (reported as test/); {then}",
              flush=True)
    return WATERBIRDS_SUBDIR if plain else None


def diagnostics_base(cfg: Namespace, data_cfg: dict):
    """The in-distribution test split with GT masks (diagnostics need the true bird); under --protocol
    waterbirds its test split."""
    root = Path(cfg.data_path)
    if not (root / "segmentations").is_dir():
        return None
    eval_tf = build_transform(False, cfg.image_size, mean=data_cfg["mean"], std=data_cfg["std"],
                              crop_pct=cfg.crop_pct)
    if cfg.protocol == "waterbirds":
        return WaterbirdsDataset(root, "test", image_subdir=cfg.image_sub_path_test,
                                 masks=MaskSource("gt", cfg.mask_threshold), transform=eval_tf)
    return CUBDataset(root, "test", image_subdir=cfg.image_sub_path_train, masks=MaskSource("gt", cfg.mask_threshold),
                      transform=eval_tf, train_split=cfg.train_split, split_seed=cfg.split_seed)


def online_segmenter(cfg: Namespace, dist: DistInfo, data_cfg: dict):
    """The mask function of --seg_model_config_path/--seg_model_checkpoint_path, or None."""
    if not cfg.seg_model_checkpoint_path:
        return None
    from bgmask.masking.segmenter import load_segmenter

    return load_segmenter(cfg.seg_model_config_path, cfg.seg_model_checkpoint_path, device=dist.device,
                          input_mean=tuple(data_cfg["mean"]), input_std=tuple(data_cfg["std"]),
                          batch_size=cfg.seg_batch_size, trust_full_checkpoint=cfg.trust_checkpoint,
                          trust_flag="--trust_checkpoint")


# ---------------------------------------------------------------------------------------- a run

@dataclass
class Parts:
    """Everything a training run is built from (see `build_parts`)."""

    model: torch.nn.Module
    model_kwargs: dict
    data_config: dict
    datasets: dict
    strategy: object
    mask_fn: object
    optimizer: torch.optim.Optimizer
    scheduler: EpochScheduler
    scaler: object
    method: object  # a registered bgmask.methods method: owns the loss
    mixup: object
    meta: dict


def build_parts(cfg: Namespace, dist: DistInfo, mask_fn=None) -> Parts:
    """The model (built right after seeding: its initial weights depend on the seed only), the data,
    the strategy and the optimisation."""
    num_classes, class_names = classes_of(cfg)
    kwargs = model_kwargs(vars(cfg), num_classes)
    model = build_model(kwargs)  # "auto" stages and memory formats are resolved already (bgmask.settings)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_cfg = data_config(model, cfg)
    mask_fn = mask_fn or online_segmenter(cfg, dist, data_cfg)
    datasets = build_datasets(cfg, data_cfg, with_masks=mask_fn is None)
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    mixup = build_mixup(cfg, num_classes)
    if mixup is not None and cfg.batch_size % 2:
        raise UserError(f"mixup/cutmix needs an even --batch_size, got {cfg.batch_size}")
    return Parts(model, kwargs, data_cfg, datasets, strategy_of(cfg, data_cfg), mask_fn, optimizer,
                 EpochScheduler(optimizer, cfg),
                 torch.amp.GradScaler("cuda") if cfg.use_amp and cfg.amp_dtype == "fp16" else None,
                 build_method(cfg, criterion=build_loss(cfg, cfg.turn_on_mixup_or_cutmix),
                              group_counts=group_counts_of(datasets["train"])), mixup,
                 {"num_classes": num_classes, "class_names": class_names, "data_config": data_cfg})


def train_group_counts(cfg: Namespace):
    """Samples per group of the Waterbirds folder's train split under --protocol waterbirds, else None."""
    if cfg.protocol != "waterbirds":
        return None
    return WaterbirdsDataset(cfg.data_path, "train", image_subdir=cfg.image_sub_path_test,
                             check_files=False).group_counts().tolist()


def group_counts_of(dataset):
    """The training split's samples per group under --protocol waterbirds (GroupDRO's adjustment), else None."""
    return dataset.group_counts() if isinstance(dataset, WaterbirdsDataset) else None


def train_sampler(parts: Parts, cfg: Namespace, dist: DistInfo):
    """The training order: the method's own sampler (GroupDRO's group-balanced draw), else a
    DistributedSampler seeded with --seed (each epoch reshuffled by `set_epoch`)."""
    train = parts.datasets["train"]
    groups = train.group_of if parts.method.needs_groups and isinstance(train, WaterbirdsDataset) else None
    sampler = parts.method.train_sampler(groups, dist.world_size, dist.rank, cfg.seed)
    if sampler is None:
        sampler = DistributedSampler(train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
    return sampler


def selection_metric(cfg: Namespace) -> str:
    """What best.pt is chosen on: val accuracy, or under --protocol waterbirds val worst-group accuracy."""
    return "val/worst_group_acc" if cfg.protocol == "waterbirds" else "val/acc"
