"""Weights trained by the paper's code (`ananthu-aniraj/masking_strategies_bias_removal`) as a bgmask
`Classifier` state_dict.

    raw = torch.load("snapshot_best.pt", map_location="cpu", weights_only=True)
    clf = create_classifier("vit_large_patch14_dinov2", 200, head=None, image_size=518)
    clf.load_state_dict(convert_paper_state(raw["model_state"], clf, source="snapshot_best.pt"))
    # or, in one step: load_paper_snapshot("snapshot_best.pt", clf)

The paper's trainers save `{"model_state", "optimizer_state", "finished_epoch", "epoch_test_accuracies"}`
(`snapshot_best.pt`, `snapshot_final.pt`, `snapshot_{epoch}.pt`), `model_state` being the state_dict of the
un-wrapped model (DDP's `module.` already removed; stripped here anyway, with `_orig_mod.`). What each of
its five scripts writes, and where it goes:

  script (kind)                          model_state keys                          bgmask keys
  fine_tune_cnn.py (A), cnn              timm keys: conv1.*, ..., fc.* (ResNet) /  backbone.<same>
  fine_tune_cnn_feature_masking.py (E)   stem.*, stages.*, head.norm.*, head.fc.*
                                         (ConvNeXt)
  fine_tune_dinov2.py (B), linear_head   backbone.<torch.hub DINOv2 keys> (with     backbone.<timm keys>,
                                         mask_token), linear_head.weight/bias       head.linear.weight/bias
  fine_tune_dinov2_timm.py (C)           backbone.<timm ViT keys>, linear_head.*   same
  fine_tune_vit_feature_masking.py (D),  <timm ViT keys> (hub keys with            same
  fm_vit                                 --use_orig_dinov2_model), head.linear_head.*

torch.hub DINOv2 keys are timm's except `mask_token` (unused at inference; dropped by timm's own
`vision_transformer.checkpoint_filter_fn`, which also renames the giant's SwiGLU `w12`/`w3`). The hub model
interpolates its 37 x 37 position embedding to the input's grid at every forward (bicubic, scale factor
(g + 0.1) / 37); bgmask's timm ViT has a fixed one, so the same interpolation is done once here for the
classifier's grid (fine_tune_dinov2.py ran at --image_size 224 by default). timm ViTs (C, D) are built
for a fixed input size, so their position embedding must already fit the classifier's grid.

The paper's ViT head is Linear(D or 2D, K) on the CLS token (--class_token_only), the mean of all patch
tokens (--patch_tokens_only) or concat(cls, mean) (neither), all after the final norm: bgmask's
`TokenHead` "cls" / "gap" / "both" ("both" = [cls, gap], the same order; the weight's column blocks are
arranged in the classifier head's `parts` order in any case). A 2D-wide head says "both"; a D-wide one is
"cls" or "gap", which the weights cannot tell: the caller's flag decides.

Not representable (one UserError each): --fm_second_last_block (D), whose extra LayerNorm `norm_sl` runs
on all tokens between the last two blocks, before the mask; ViTs with register tokens (none of the
paper's models has them, and its head's mean over x[:, 1:] would include them). What the weights cannot
say and the caller must match: the head flag above, the image size (B, C, D), and for late masking the
stage -- D masks after the last block, E after the second-last ConvNeXt stage unless it was run with
--feature_masking_last_layer (bgmask: --late_mask_stage second_last / last), both pooling over all cells
("mean").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter_fn

from bgmask.errors import UserError
from bgmask.io import read_torch_file
from bgmask.models.heads import TokenHead

PAPER_KINDS = ("cnn", "linear_head", "fm_vit")
WRAPPER_PREFIX = re.compile(r"^(?:(?:module|_orig_mod)\.)+")
CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # hub DINOv2 built with block_chunks > 0
HUB_POS_OFFSET = 0.1  # DinoVisionTransformer.interpolate_offset
PAPER_HEAD_PARTS = ("cls", "gap")  # torch.cat([cls_token, patch_tokens.mean(1)], dim=1)
REGISTER_KEYS = ("reg_token", "register_tokens")


def is_paper_snapshot(raw) -> bool:
    """True for a dict written by the paper's trainers: `model_state` beside `finished_epoch` and/or
    `epoch_test_accuracies` (bgmask's own checkpoints have neither)."""
    return (isinstance(raw, Mapping) and isinstance(raw.get("model_state"), Mapping)
            and ("finished_epoch" in raw or "epoch_test_accuracies" in raw))


def strip_wrappers(model_state: Mapping) -> dict[str, torch.Tensor]:
    """Keys without DDP's `module.` / torch.compile's `_orig_mod.` prefixes. A state_dict of a whole
    FeatureMaskingNet* (`base_model.module.*` beside `seg_model.*`) keeps only its `base_model`, as the
    paper's own loader does."""
    sd = dict(model_state)
    if any(k.startswith("base_model.") for k in sd):
        sd = {k[len("base_model."):]: v for k, v in sd.items() if k.startswith("base_model.")}
    return {WRAPPER_PREFIX.sub("", k): v for k, v in sd.items()}


def paper_kind(sd: Mapping) -> str:
    """Which of `PAPER_KINDS` a (stripped) model_state is: a ViT wrapped as backbone + linear_head (B, C),
    a feature-masking ViT with head.linear_head (D), else a timm CNN with its own classifier (A, E)."""
    if "linear_head.weight" in sd:
        return "linear_head"
    if "head.linear_head.weight" in sd:
        return "fm_vit"
    return "cnn"


def convert_paper_state(model_state: Mapping, classifier, source: str = "paper snapshot") -> dict:
    """The paper's `model_state` (or the whole snapshot) as a state_dict that loads strictly into
    `classifier` (a bgmask Classifier of the same architecture). Any key that does not map, or a tensor
    of another shape, is one UserError naming `source` and an example key."""
    if is_paper_snapshot(model_state):
        model_state = model_state["model_state"]
    sd = strip_wrappers(model_state)
    kind = paper_kind(sd)
    is_vit = isinstance(getattr(classifier, "head", None), TokenHead)
    arch = classifier.model_arch
    if kind != "cnn" and not is_vit:
        raise UserError(f"{source} holds a ViT with the paper's linear head (fine_tune_dinov2*.py / "
                        f"fine_tune_vit_feature_masking.py), but model_arch={arch} is not a ViT")
    if kind == "cnn" and is_vit:
        raise UserError(f"{source} holds a CNN with its own classifier (fine_tune_cnn*.py; no linear_head "
                        f"keys, e.g. {next(iter(sd), None)!r}), but model_arch={arch} is a ViT")
    if kind == "cnn":
        out, origin = {f"backbone.{k}": v for k, v in sd.items()}, {f"backbone.{k}": k for k in sd}
    else:
        backbone, head, origin = _split_vit(sd, kind, source)
        backbone = _vit_backbone(backbone, classifier, source)
        out = {**{f"backbone.{k}": v for k, v in backbone.items()}, **_head_state(head, classifier, source)}
    _check_fits(out, origin, classifier, source)
    return out


def _split_vit(sd: dict, kind: str, source: str) -> tuple[dict, dict, dict]:
    """-> (backbone state in timm or hub names, {"weight", "bias"} of the paper's Linear head,
    bgmask key -> snapshot key). Keys outside the backbone and the head are one UserError."""
    if kind == "linear_head":  # fine_tune_dinov2.py / fine_tune_dinov2_timm.py
        body, head_prefix = "backbone.", "linear_head."
        backbone = {k[len(body):]: v for k, v in sd.items() if k.startswith(body)}
    else:  # fine_tune_vit_feature_masking.py: the timm / hub ViT itself, its `head` replaced
        body, head_prefix = "", "head.linear_head."
        if "norm_sl.weight" in sd:
            raise UserError(
                f"{source} was trained with --fm_second_last_block: its extra LayerNorm 'norm_sl' (on all "
                "tokens between the last two blocks, before the mask) has no counterpart in bgmask's ViT, "
                "so this variant cannot be evaluated here (only last-block feature masking can)")
        backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
    head = {k[len(head_prefix):]: v for k, v in sd.items() if k.startswith(head_prefix)}
    taken = {f"{body}{k}" for k in backbone} | {f"{head_prefix}{k}" for k in ("weight", "bias") if k in head}
    stray = [k for k in sd if k not in taken]
    if "bias" not in head:
        raise UserError(f"{source}: its head {head_prefix}weight has no {head_prefix}bias "
                        "(not one of the paper's models?)")
    if stray:
        raise UserError(f"{source}: {len(stray)} tensors that map to nothing in a bgmask classifier, "
                        f"e.g. {stray[0]!r} (not one of the paper's models?)")
    origin = {f"backbone.{k}": f"{body}{k}" for k in backbone}
    origin.update({f"head.linear.{k}": f"{head_prefix}{k}" for k in head})
    return backbone, head, origin


def _vit_backbone(sd: dict, classifier, source: str) -> dict:
    """ViT backbone tensors in timm names, position embedding for the classifier's grid."""
    vit = classifier.backbone
    if any(k in sd for k in REGISTER_KEYS):
        raise UserError(f"{source} holds a ViT with register tokens, which none of the paper's scripts "
                        "builds (its head's mean over x[:, 1:] would include them); not supported")
    grid = tuple(vit.patch_embed.grid_size)
    if "mask_token" in sd:  # torch.hub DINOv2: fine_tune_dinov2.py, or --use_orig_dinov2_model
        sd = {CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in sd.items()}
        patch = sd.get("patch_embed.proj.weight")
        if patch is not None and tuple(patch.shape) != tuple(vit.patch_embed.proj.weight.shape):
            raise UserError(f"{source}: patch embedding {tuple(patch.shape)} does not fit "
                            f"model_arch={classifier.model_arch} {tuple(vit.patch_embed.proj.weight.shape)} "
                            "(another patch size or width)")
        pos = hub_pos_embed(sd["pos_embed"], grid, source) if "pos_embed" in sd else None
        sd = vit_filter_fn(dict(sd, pos_embed=pos) if pos is not None else dict(sd), vit)
        if pos is not None:  # drops mask_token, renames the giant's w12/w3; keep our pos_embed as it is
            sd["pos_embed"] = pos
        return sd
    pos = sd.get("pos_embed")
    if pos is not None and vit.pos_embed is not None and tuple(pos.shape) != tuple(vit.pos_embed.shape):
        n = pos.shape[1] - (0 if vit.no_embed_class else vit.num_prefix_tokens)
        side = math.isqrt(max(n, 0))
        size = f"a {side} x {side} grid, i.e. --image_size {side * vit.patch_embed.patch_size[0]}" \
            if side * side == n else f"{n} patches"
        raise UserError(f"{source}: its position embedding covers {size} (the paper's timm ViT has a fixed "
                        f"input size), but the classifier was built for a {grid[0]} x {grid[1]} grid; build it "
                        "with the image size the snapshot was trained at")
    return sd


def hub_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], source: str = "snapshot") -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + gh*gw, D): what torch.hub DINOv2's `interpolate_pos_encoding` feeds its
    blocks for a (gh, gw) patch grid (unchanged for M x M; else bicubic with scale factor (g + 0.1) / M,
    no antialias, in float32)."""
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise UserError(f"{source}: hub DINOv2 position embedding with {n} patch positions is not square")
    gh, gw = grid
    if (gh, gw) == (m, m):
        return pos_embed
    pe = pos_embed.float()
    patch = pe[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
    patch = F.interpolate(patch, scale_factor=((gh + HUB_POS_OFFSET) / m, (gw + HUB_POS_OFFSET) / m),
                          mode="bicubic", antialias=False)  # (1, D, gh, gw)
    if tuple(patch.shape[-2:]) != (gh, gw):
        raise UserError(f"{source}: cannot interpolate the {m} x {m} position embedding to {gh} x {gw}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    return torch.cat([pe[:, :1], patch], dim=1).to(pos_embed.dtype)


def _head_state(head: dict, classifier, source: str) -> dict:
    """The paper's Linear(D or 2D, K) as the classifier's TokenHead, columns in the head's `parts` order."""
    weight, bias = head["weight"], head["bias"]
    k, width = weight.shape
    d = classifier.backbone.embed_dim
    ours = classifier.head
    if width == 2 * d:
        if sorted(ours.parts) != sorted(PAPER_HEAD_PARTS):
            raise UserError(f"{source}: its head reads concat(CLS token, mean of patch tokens) (Linear({width}, "
                            f"{k})), but the classifier's head is {classifier.head_type!r}: evaluate without "
                            "--class_token_only / --patch_tokens_only / --late_drop_cls")
        blocks = dict(zip(PAPER_HEAD_PARTS, weight.split(d, dim=1)))
        weight = torch.cat([blocks[p] for p in ours.parts], dim=1)
    elif width == d:
        if len(ours.parts) != 1:
            raise UserError(f"{source}: its head reads one {d}-wide feature (Linear({width}, {k}): the CLS token "
                            "or the mean of patch tokens; the weights cannot tell which), but the classifier's "
                            f"head is {classifier.head_type!r}: pass --class_token_only or --patch_tokens_only, "
                            "as the paper's run did")
    else:
        raise UserError(f"{source}: its head Linear({width}, {k}) fits neither {d} nor {2 * d} features of "
                        f"model_arch={classifier.model_arch} (another ViT width?)")
    if k != classifier.num_classes:
        raise UserError(f"{source}: its head has {k} classes, the classifier {classifier.num_classes} "
                        f"(build it with num_classes={k})")
    return {"head.linear.weight": weight, "head.linear.bias": bias}


def _check_fits(out: dict, origin: dict, classifier, source: str) -> None:
    """One UserError naming `source` and an example key when `out` does not load strictly."""
    target = classifier.state_dict()
    unexpected = [k for k in out if k not in target]
    shape = [k for k in out if k in target and tuple(out[k].shape) != tuple(target[k].shape)]
    missing = [k for k in target if k not in out]
    if not (unexpected or shape or missing):
        return
    key = (unexpected or shape or missing)[0]
    named = f"{origin[key]!r} (bgmask {key!r})" if key in origin and origin[key] != key else repr(key)
    what = ("another shape: " + f"{tuple(out[key].shape)} vs {tuple(target[key].shape)}" if key in shape
            else "not in the classifier" if key in unexpected else "not in the snapshot")
    raise UserError(f"{source} does not fit model_arch={classifier.model_arch} ({len(unexpected)} tensors "
                    f"unexpected, {len(missing)} missing, {len(shape)} of another shape; e.g. {named}: {what})")


def read_paper_snapshot(path: str | Path, trust: bool = False) -> dict:
    """A paper snapshot file as a dict (torch.load with weights_only=True; `trust` allows arbitrary
    unpickling). Not a paper snapshot, unreadable or unsafe: one UserError naming `path`."""
    raw = read_torch_file(path, "paper snapshot", trust)
    if not is_paper_snapshot(raw):
        found = ", ".join(map(str, list(raw)[:6])) if isinstance(raw, Mapping) else type(raw).__name__
        raise UserError(f"{path} is not a snapshot of the paper's code (expected model_state with "
                        f"finished_epoch / epoch_test_accuracies; found {found})")
    return raw


def load_paper_snapshot(path: str | Path, classifier, trust: bool = False) -> dict:
    """Read a paper snapshot, convert it and load it strictly into `classifier`. Returns the snapshot's
    training record: {"finished_epoch", "epoch_test_accuracies"} (None where absent)."""
    raw = read_paper_snapshot(path, trust)
    classifier.load_state_dict(convert_paper_state(raw["model_state"], classifier, source=str(path)))
    return {"finished_epoch": raw.get("finished_epoch"), "epoch_test_accuracies": raw.get("epoch_test_accuracies")}
