"""The adapter from an MMSeg config + checkpoint to a bird-mask function.

    seg = load_segmenter("mmsegmentation/configs/segformer/....py", "work_dirs/x/segmenter_slim.pth", device="cuda")
    masks = seg(images)       # images (B, 3, H, W), normalised with input_mean / input_std
                              # masks  (B, 1, H, W) float in {0, 1}, 1 = bird, on the images' device
    arrays = seg.predict_images([pil_image, ...])   # [(h, w) uint8 in {0, 1}] at each image's size

Both paths handle the two differences between the classifier's input and the segmenter's:
- normalisation: the classifier's (input_mean, input_std) on [0, 1] RGB is undone and the segmenter's
  data_preprocessor mean/std (0-255 space, in the channel order its model expects) applied;
- size: each image is resized as the config's test pipeline resizes it (for the shipped configs: keep
  the aspect ratio and fit the crop size, `Resize(scale=crop_size, keep_ratio=True)`), padded
  bottom/right to the preprocessor's size_divisor, segmented, and the logits of the valid region are
  resized back to the image size before the argmax. Only images of one test-time size share a batch.
No gradient flows through the segmenter and autocast is off inside it.

Padding: the adapter crops the logits of the padded region before resizing them back. MMSeg 1.2.2's
own inference differs there for heads other than Mask2Former: `BaseDecodeHead.predict_by_feat` takes
the torch.Size `img_shape` that test-time padding sets as a slide-inference shape and resizes the
padded logits onto the unpadded size before the padding is cropped (a shift of up to size_divisor
pixels). Without padding (e.g. SegFormer configs, or sizes that are multiples of the divisor) the two
agree exactly.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bgmask.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bgmask.errors import UserError, require_file



def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{e.__class__.__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def read_config(config_path: str | Path | None, config_text: str | None = None):
    """mmengine Config from a file (or, with config_path None, from the text stored in a checkpoint);
    every failure is one UserError line."""
    from bgmask.seg import compat

    compat.install()
    from mmengine.config import Config

    if config_path is None:
        if not config_text:
            raise UserError("no segmenter config given and the checkpoint stores none (pass --config)")
        try:
            return Config.fromstring(config_text, ".py")
        except Exception as e:  # noqa: BLE001  (any parse error -> one line)
            raise UserError(f"cannot parse the config stored in the checkpoint: {_first_line(e)}") from None
    path = Path(config_path)
    if not path.is_file():
        raise UserError(f"segmenter config not found: {path} (expected an MMSeg config .py file, "
                        "e.g. mmsegmentation/configs/segformer/...py)")
    try:
        return Config.fromfile(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read segmenter config {path}: {_first_line(e)}") from None


def config_num_classes(cfg) -> int | None:
    head = cfg.model.get("decode_head")
    if isinstance(head, (list, tuple)):  # cascade: the last head predicts
        head = head[-1]
    return None if head is None else head.get("num_classes")


def check_binary(cfg, where: str) -> None:
    n = config_num_classes(cfg)
    if n != 2:
        raise UserError(f"{where}: decode_head.num_classes is {n}, expected 2 (background, bird)")


class ResizeRule:
    """The resize of the config's test pipeline (MMCV `Resize`), so that the adapter feeds the model what
    MMSeg's own evaluation does: keep_ratio -> `mmcv.rescale_size` (fit the image into `scale`,
    orientation-free); otherwise exactly `scale` = (w, h); `scale_factor` -> multiply; no Resize step
    -> the crop size, keeping the aspect ratio."""

    def __init__(self, cfg):
        pipeline = (cfg.get("test_dataloader") or {}).get("dataset", {}).get("pipeline") or cfg.get("test_pipeline") or []
        step = next((t for t in pipeline if isinstance(t, dict) and t.get("type") in ("Resize", "mmcv.Resize")), None)
        self.keep_ratio, self.scale, self.factor = True, None, None
        if step is not None and step.get("scale") is not None:
            scale = step["scale"]
            self.scale = (int(scale), int(scale)) if isinstance(scale, (int, float)) else (int(scale[0]), int(scale[1]))
            self.keep_ratio = bool(step.get("keep_ratio", False))
        elif step is not None and step.get("scale_factor") is not None:
            self.factor = float(step["scale_factor"])
        else:
            size = cfg.model.get("data_preprocessor", {}).get("size") or cfg.get("crop_size")
            if not size:
                raise UserError("segmenter config has no test-time Resize and no crop size "
                                "(model.data_preprocessor.size or crop_size): cannot tell its input size")
            self.scale = (int(size[1]), int(size[0])) if not isinstance(size, int) else (size, size)

    def __call__(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) of an image -> (h, w) it is segmented at."""
        if self.factor is not None:
            return int(h * self.factor + 0.5), int(w * self.factor + 0.5)
        if not self.keep_ratio:
            return self.scale[1], self.scale[0]
        f = min(max(self.scale) / max(h, w), min(self.scale) / min(h, w))
        return int(h * f + 0.5), int(w * f + 0.5)


class Segmenter:
    """Callable bird-mask function built from an MMSeg segmentor (see the module docstring)."""

    def __init__(self, model, cfg, device="cpu", input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD,
                 batch_size: int | None = None):
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.resize = ResizeRule(cfg)
        pre = cfg.model.get("data_preprocessor", {})
        mean = pre.get("mean") or (0.0, 0.0, 0.0)
        std = pre.get("std") or (1.0, 1.0, 1.0)
        # LoadImageFromFile reads BGR; the model sees RGB only when the preprocessor converts it.
        self.model_wants_bgr = not (pre.get("bgr_to_rgb", False) or pre.get("rgb_to_bgr", False))
        self.size_divisor = int((pre.get("test_cfg") or {}).get("size_divisor") or 1)
        classes = list((getattr(model, "dataset_meta", None) or {}).get("classes") or [])
        self.bird_index = classes.index("bird") if "bird" in classes else 1
        order = [2, 1, 0] if self.model_wants_bgr else [0, 1, 2]
        in_mean = torch.tensor(input_mean, dtype=torch.float32)[order]
        in_std = torch.tensor(input_std, dtype=torch.float32)[order]
        seg_mean = torch.tensor(mean, dtype=torch.float32)
        seg_std = torch.tensor(std, dtype=torch.float32)
        self._order = order
        # classifier-normalised x -> segmenter-normalised: x * scale + shift, per channel
        self._scale = (in_std * 255.0 / seg_std).view(1, 3, 1, 1).to(self.device)
        self._shift = ((in_mean * 255.0 - seg_mean) / seg_std).view(1, 3, 1, 1).to(self.device)
        self._mean255 = seg_mean.view(3, 1, 1).to(self.device)
        self._std255 = seg_std.view(3, 1, 1).to(self.device)

    # ------------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) classifier-normalised images -> (B, 1, H, W) {0, 1} masks, 1 = bird."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got {tuple(images.shape)}")
        out_device, out_dtype = images.device, (images.dtype if images.is_floating_point() else torch.float32)
        B, _, H, W = images.shape
        nh, nw = self.resize(H, W)
        step = self.batch_size or B
        masks = []
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for i in range(0, B, step):
                x = images[i:i + step].to(self.device, torch.float32)
                x = x[:, self._order] * self._scale + self._shift  # (b, 3, H, W) segmenter-normalised
                if (nh, nw) != (H, W):
                    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
                logits = self._logits(x)[:, :, :nh, :nw]  # (b, C, nh, nw)
                if (nh, nw) != (H, W):
                    logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
                masks.append((logits.argmax(dim=1, keepdim=True) == self.bird_index))
        return torch.cat(masks).to(out_device, out_dtype)  # (B, 1, H, W)

    def predict_images(self, images: Sequence) -> list[np.ndarray]:
        """PIL images or (h, w, 3) uint8 RGB arrays of any sizes -> [(h, w) uint8 {0, 1}], 1 = bird.

        Resizes with cv2 on uint8 like MMCV's Resize. Images are batched only with others of the same
        test-time size, so no image is padded for another one: each mask is independent of the batch
        (and equals `mmseg.apis.inference_model` on it). Pass images sorted by size to batch well."""
        import cv2

        arrays = [_rgb_array(im) for im in images]
        targets = [self.resize(*a.shape[:2]) for a in arrays]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(targets):
            groups.setdefault(t, []).append(i)
        step = self.batch_size or max(1, len(arrays))
        out: list[np.ndarray | None] = [None] * len(arrays)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for (nh, nw), members in groups.items():
                for start in range(0, len(members), step):
                    idx = members[start:start + step]
                    batch = []
                    for i in idx:
                        a = arrays[i]
                        if a.shape[:2] != (nh, nw):
                            a = cv2.resize(a, (nw, nh), interpolation=cv2.INTER_LINEAR)
                        t = torch.from_numpy(np.array(a)).to(self.device).permute(2, 0, 1).float()  # (3, nh, nw)
                        batch.append((t[self._order] - self._mean255) / self._std255)
                    logits = self._logits(torch.stack(batch))[:, :, :nh, :nw]  # (b, C, nh, nw)
                    for i, lg in zip(idx, logits):
                        h, w = arrays[i].shape[:2]
                        lg = F.interpolate(lg[None], size=(h, w), mode="bilinear", align_corners=False)
                        out[i] = (lg[0].argmax(dim=0) == self.bird_index).to(torch.uint8).cpu().numpy()
        return out

    # ------------------------------------------------------------------------------------------
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Segmenter-normalised (b, 3, h, w) -> logits (b, C, hp, wp), padded bottom/right with 0 (the
        mean) to the preprocessor's size_divisor as MMSeg pads at test time."""
        h, w = x.shape[-2:]
        d = self.size_divisor
        hp, wp = math.ceil(h / d) * d, math.ceil(w / d) * d
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, wp - w, 0, hp - h), value=0.0)
        metas = [dict(img_shape=(hp, wp), pad_shape=(hp, wp), ori_shape=(hp, wp))] * x.shape[0]
        return self.model.inference(x, metas)


def _rgb_array(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (h, w, 3) uint8 RGB array, got {image.dtype} {image.shape}")
        return image
    from bgmask.data.images import to_rgb  # the project's one mode rule (alpha dropped, 16-bit >> 8, ...)

    return np.asarray(to_rgb(image))


# ----------------------------------------------------------------------------------------------
def build_model(cfg, state_dict: dict | None = None, dataset_meta: dict | None = None, where: str = "config"):
    """An MMSeg segmentor in eval mode from a Config (no pretrained downloads), with weights if given."""
    from bgmask.seg import compat

    compat.install()
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    cfg = copy.deepcopy(cfg)
    check_binary(cfg, where)
    if cfg.model.get("backbone") is not None and "init_cfg" in cfg.model.backbone:
        cfg.model.backbone.init_cfg = None
    cfg.model.pretrained = None
    cfg.model.train_cfg = None
    init_default_scope(cfg.get("default_scope", "mmseg"))
    try:
        with warnings.catch_warnings():  # MMSeg's construction advice (out_channels=1, avg_non_ignore, ...)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mmseg\.")
            model = MODELS.build(cfg.model)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot build the segmenter of {where}: {_first_line(e)}") from None
    model.cfg = cfg
    if state_dict is not None:
        _load_weights(model, state_dict, where)
    from bgmask.seg.dataset import CLASSES, PALETTE

    model.dataset_meta = dict(dataset_meta or {"classes": list(CLASSES), "palette": PALETTE})
    return model.eval()


def _load_weights(model, state_dict: dict, where: str) -> None:
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise UserError(f"checkpoint does not fit {where}: {k} is {tuple(state_dict[k].shape)} in the checkpoint "
                        f"but {tuple(own[k].shape)} in the model ({len(mismatched)} tensors differ; "
                        "num_classes or architecture mismatch)")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        k = (missing or unexpected)[0]
        raise UserError(f"checkpoint does not fit {where}: {len(missing)} model tensors missing from it, "
                        f"{len(unexpected)} unexpected (first: {k}); was it trained with this config?")
    model.load_state_dict(state_dict, strict=True)


def load_segmenter(config_path: str | Path | None, checkpoint_path: str | Path, device: str | torch.device = "cpu",
                   input_mean: Sequence[float] = IMAGENET_MEAN, input_std: Sequence[float] = IMAGENET_STD,
                   batch_size: int | None = None, trust_full_checkpoint: bool = False,
                   trust_flag: str = "--trust-full-checkpoint") -> Segmenter:
    """Build the bird-mask function from an MMSeg config and a (slim) checkpoint.

    config_path None uses the config stored in a slim checkpoint. A full mmengine checkpoint is read
    only with `trust_full_checkpoint=True` (one of your own runs: it unpickles Python objects); the refusal
    names `trust_flag`, the calling command's flag for it.
    Raises UserError (one line) for a missing config or checkpoint, a config whose decode head does
    not have num_classes 2, or a checkpoint that does not fit the config."""
    from bgmask.seg.checkpoint import load_checkpoint_file, state_dict_and_meta

    if config_path is not None and not Path(config_path).is_file():
        read_config(config_path)  # raises the one-line error
    require_file(checkpoint_path, "segmenter checkpoint")
    state_dict, meta = state_dict_and_meta(load_checkpoint_file(checkpoint_path, trust_full=trust_full_checkpoint,
                                                                trust_flag=trust_flag),
                                           checkpoint_path)
    cfg = read_config(config_path, meta.get("config") or meta.get("cfg"))
    where = f"config {config_path}" if config_path is not None else "the config stored in the checkpoint"
    check_binary(cfg, where)
    dataset_meta = meta.get("dataset_meta") or None
    ckpt_classes = list((dataset_meta or {}).get("classes") or [])
    if ckpt_classes and len(ckpt_classes) != config_num_classes(cfg):
        raise UserError(f"checkpoint {checkpoint_path} was trained with {len(ckpt_classes)} classes "
                        f"({', '.join(map(str, ckpt_classes[:4]))}...) but {where} has num_classes "
                        f"{config_num_classes(cfg)}")
    model = build_model(cfg, state_dict, dataset_meta, where)
    return Segmenter(model, cfg, device=device, input_mean=tuple(input_mean), input_std=tuple(input_std),
                     batch_size=batch_size)
