"""Mask perturbations: how good must the masks be? Each registered perturbation is a pure function of a
mask and a strength, seeded explicitly; strength 0 returns the mask unchanged.

Masks are uint8 (H, W), 0..255 with soft (anti-aliased) edges; after thresholding, value > threshold
= bird (1), as `bgmask.data.cub.load_mask` reads them. The geometric perturbations work on the
binarised mask and change only the pixels they move: a pixel that becomes bird is set to 255, one that
becomes background to 0, every other pixel keeps its value (soft edges included).

    erode k      bird pixels closer than or at k px (Euclidean) to the background removed
    dilate k     background pixels within k px of the bird added
    rim w        a band of background w px wide around the bird added with soft values (a linear ramp
                 from 255 at the bird to 0 at w + 1 px, so every band pixel is > 0): what thresholding a
                 soft edge at > 0 does. At threshold 0 it adds the pixels of dilate w; a higher threshold
                 keeps only its inner part
    drop f       a fraction f of the bird area removed as round blobs (radius sqrt(area) / 4)
    noise a      the boundary moved in or out by a smooth random field of amplitude a px (uniform
                 draws in [-a, a] every 2a px, bilinearly interpolated): a wavy, ragged edge
    threshold t  values <= t set to 0 (the mask thresholded at t): binarised at the loader's threshold
                 the bird is mask > max(t, threshold)

Distances are Euclidean between pixel centres; the image border is neither bird nor background (a bird
cut by the border is not eroded from the border, and dilation does not grow past it).

mIoU follows MMSegmentation's IoUMetric: for each class (background, bird) the intersections and the
unions are summed over all images, IoU_c = sum(intersection_c) / sum(union_c), and mIoU is the mean of
the classes' IoUs (a class absent from predictions and ground truth alike is left out).

Perturbed folders are written in the layout `--mask_source DIR` reads: DIR/images/<rel>.png and, for
the Waterbirds test images, DIR/waterbird_complete95_forest2water2/<rel>.png (the same bird, so the
same perturbed mask).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from bgmask.data.cub import WATERBIRDS_SUBDIR, MaskSource, mask_relpath, read_cub_metadata
from bgmask.errors import Interval, UserError
from bgmask.io import Marker, atomic_save_image
from bgmask.processes import run_each


@dataclass(frozen=True)
class Perturbation:
    """A registered perturbation: `fn(mask uint8 (H, W), strength, rng, threshold) -> uint8 (H, W)`;
    `unit` and `range` describe the strength, `defaults` the sweep's strengths."""

    name: str
    fn: Callable
    unit: str
    range: str
    integer: bool
    defaults: tuple


PERTURBATIONS: dict[str, Perturbation] = {}


def register_perturbation(name: str, unit: str, range: str, defaults: tuple, integer: bool = False):  # noqa: A002
    def wrap(fn):
        PERTURBATIONS[name] = Perturbation(name, fn, unit, range, integer, tuple(defaults))
        return fn

    return wrap


def check_perturbation(name: str, strength: float) -> float:
    """The strength as the perturbation takes it; an unknown name or a strength out of its range is one line."""
    if name not in PERTURBATIONS:
        raise UserError(f"unknown perturbation {name!r} (expected one of {', '.join(PERTURBATIONS)})")
    p = PERTURBATIONS[name]
    ok = isinstance(strength, numbers.Real) and not isinstance(strength, bool) and strength in Interval(p.range)
    ok = ok and not (p.integer and float(strength) != int(strength))
    if not ok:
        kind = "an integer" if p.integer else "a number"
        raise UserError(f"perturbation {name} strength {strength!r}: expected {kind} of {p.unit} in {p.range}")
    return int(strength) if p.integer else float(strength)


def perturb_mask(mask: np.ndarray, name: str, strength: float, seed=0, threshold: int = 0) -> np.ndarray:
    """The mask perturbed by `name` at `strength`, drawing from np.random.default_rng(seed) (an int or
    a sequence of ints, e.g. (sweep seed, image id)); strength 0 returns a copy of the mask."""
    strength = check_perturbation(name, strength)
    mask = np.asarray(mask)
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise UserError(f"a mask must be uint8 (H, W), got {mask.dtype} {mask.shape}")
    if strength == 0:
        return mask.copy()
    return PERTURBATIONS[name].fn(mask, strength, np.random.default_rng(seed), threshold)


# ----------------------------------------------------------------------------------- distances

def _row_distance(b: np.ndarray) -> np.ndarray:
    """Per row, the distance (px) from each pixel to the nearest True pixel of its row (large if none)."""
    h, w = b.shape
    big = h + w + 1
    x = np.arange(w)
    left = np.maximum.accumulate(np.where(b, x, -big), axis=1)
    right = np.minimum.accumulate(np.where(b, x, w + big)[:, ::-1], axis=1)[:, ::-1]
    return np.minimum(x - left, right - x)


def squared_distance(b: np.ndarray, radius: int) -> np.ndarray:
    """Squared Euclidean distance from each pixel to the nearest True pixel of `b`, exact up to `radius`
    (farther pixels get a value > radius**2). Per row first, then the rows within `radius`: O(radius * H * W)."""
    h, w = b.shape
    row = _row_distance(b).astype(np.int64) ** 2
    far = (radius + 1) ** 2
    out = np.minimum(row, far)
    for dy in range(1, min(radius, h - 1) + 1):
        shifted = np.minimum(row[dy:], far) + dy * dy
        out[:-dy] = np.minimum(out[:-dy], shifted)  # rows below
        out[dy:] = np.minimum(out[dy:], np.minimum(row[:-dy], far) + dy * dy)  # rows above
    return out


def dilate(b: np.ndarray, k: float) -> np.ndarray:
    """Pixels within k px of `b` (b included)."""
    return squared_distance(b, int(math.ceil(k))) <= k * k


def erode(b: np.ndarray, k: float) -> np.ndarray:
    """Pixels of `b` farther than k px from every pixel outside `b` (the image border does not count)."""
    return b & ~(squared_distance(~b, int(math.ceil(k))) <= k * k)


def _apply(mask: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The mask with pixels that became bird set to 255 and those that became background set to 0."""
    out = mask.copy()
    out[new & ~old] = 255
    out[old & ~new] = 0
    return out


# ------------------------------------------------------------------------------- perturbations

def binarise(mask: np.ndarray, threshold: int = 0) -> np.ndarray:
    """The bird (1) of a uint8 mask: value > threshold, as the loader reads it."""
    return np.asarray(mask) > threshold


@register_perturbation("erode", "px", "[0, 64]", (1, 2, 4), integer=True)
def _erode(mask, k, rng, threshold):
    b = binarise(mask, threshold)
    return _apply(mask, b, erode(b, k))


@register_perturbation("dilate", "px", "[0, 64]", (1, 2, 4), integer=True)
def _dilate(mask, k, rng, threshold):
    b = binarise(mask, threshold)
    return _apply(mask, b, dilate(b, k))


@register_perturbation("rim", "px", "[0, 64]", (1, 2, 4), integer=True)
def _rim(mask, w, rng, threshold):
    b = binarise(mask, threshold)
    d = np.sqrt(squared_distance(b, w))
    band = ~b & (d <= w)
    # A linear ramp from 255 at the bird to 0 at w + 1 px: every band pixel is >= 255 / (w + 1) >= 1.
    value = np.round(255 * (w + 1 - np.minimum(d, w + 1)) / (w + 1)).astype(np.uint8)
    out = mask.copy()
    out[band] = np.maximum(out[band], value[band])
    return out


@register_perturbation("drop", "fraction of the bird area", "[0, 1]", (0.1, 0.25, 0.5))
def _drop(mask, f, rng, threshold):
    """Blobs (discs of radius sqrt(area) / 4 around random bird pixels) removed until exactly
    round(f * area) bird pixels are gone (the last blob keeps its pixels farthest from its centre)."""
    b = binarise(mask, threshold)
    target = int(round(f * b.sum()))
    radius = max(1.0, math.sqrt(b.sum()) / 4)
    yy, xx = np.indices(b.shape)
    left = b.copy()
    while b.sum() - left.sum() < target:
        ys, xs = np.nonzero(left)
        c = rng.integers(len(ys))
        d2 = (yy - ys[c]) ** 2 + (xx - xs[c]) ** 2
        blob = left & (d2 <= radius * radius)
        need = target - (b.sum() - left.sum())
        if blob.sum() > need:  # the nearest `need` pixels of the last blob (stable order: a pure function)
            idx = np.flatnonzero(blob)
            idx = idx[np.argsort(d2.ravel()[idx], kind="stable")[:need]]
            blob = np.zeros_like(blob)
            blob.ravel()[idx] = True
        left &= ~blob
    return _apply(mask, b, left)


def smooth_field(shape: tuple[int, int], cell: float, rng) -> np.ndarray:
    """Values in [-1, 1]: uniform draws on a grid of `cell` px, bilinearly interpolated."""
    h, w = shape
    gh, gw = int(math.ceil(h / cell)) + 2, int(math.ceil(w / cell)) + 2
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw))
    y, x = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]

    def g(dy, dx):
        return grid[(y0 + dy)[:, None], (x0 + dx)[None, :]]

    return (g(0, 0) * (1 - fy) * (1 - fx) + g(0, 1) * (1 - fy) * fx + g(1, 0) * fy * (1 - fx)
            + g(1, 1) * fy * fx)


@register_perturbation("noise", "px", "[0, 32]", (1, 2, 4))
def _noise(mask, a, rng, threshold):
    """The boundary moved by a * field px (outwards where the field is > 0): a pixel is bird when its
    signed distance to the boundary (inside > 0, +-0.5 px at the boundary pixels) plus the shift is > 0."""
    b = binarise(mask, threshold)
    r = int(math.ceil(a)) + 1
    inside = np.sqrt(squared_distance(~b, r)) - 0.5  # bird pixels: distance to the background
    outside = np.sqrt(squared_distance(b, r)) - 0.5  # background pixels: distance to the bird
    signed = np.where(b, inside, -outside)
    shift = a * smooth_field(b.shape, max(2.0 * a, 2.0), rng)
    return _apply(mask, b, signed + shift > 0)


@register_perturbation("threshold", "mask value", "[0, 254]", (64, 128, 192), integer=True)
def _threshold(mask, t, rng, threshold):
    out = mask.copy()
    out[mask <= t] = 0
    return out


# ---------------------------------------------------------------------------------------- mIoU

class IoUCounts:
    """Per class (0 = background, 1 = bird), intersections and unions summed over images (MMSeg's rule)."""

    def __init__(self):
        self.intersect = np.zeros(2, np.int64)
        self.union = np.zeros(2, np.int64)
        self.images = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """One image's binary masks (H, W), True = bird."""
        if pred.shape != gt.shape:
            raise UserError(f"mask shapes differ: {pred.shape} vs ground truth {gt.shape}")
        for c, (p, g) in enumerate(((~pred, ~gt), (pred, gt))):
            self.intersect[c] += np.count_nonzero(p & g)
            self.union[c] += np.count_nonzero(p | g)
        self.images += 1

    def iou(self) -> np.ndarray:
        """IoU per class (NaN for a class in neither the predictions nor the ground truth)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.union > 0, self.intersect / np.maximum(self.union, 1), np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else float("nan")


def mask_miou(preds, gts, threshold: int = 0) -> float:
    """mIoU (fraction) of uint8 masks against ground-truth masks, both binarised by `threshold`."""
    counts = IoUCounts()
    for p, g in zip(preds, gts, strict=True):
        counts.add(binarise(p, threshold), binarise(g, threshold))
    return counts.miou()


def read_mask(path: Path) -> np.ndarray:
    """A mask file as uint8 (H, W), upright (`bgmask.data.images.decode_mask`); unreadable: one line."""
    from PIL import UnidentifiedImageError

    from bgmask.data.images import decode_mask

    try:
        return np.asarray(decode_mask(path), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"mask not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"cannot read mask {path}: corrupt or not an image ({e.__class__.__name__})") from None


def folder_miou(root: str | Path, masks: str | Path, threshold: int = 0, image_subdir: str = "images",
                split: str = "test") -> float:
    """mIoU of the masks of a `--mask_source` folder (DIR/<image_subdir>/<rel>.png) against ROOT's
    ground truth, over the split's images, both binarised by `threshold`."""
    from bgmask.data.cub import split_ids

    root = Path(root)
    meta = read_cub_metadata(root)
    source, gt = MaskSource(str(masks)), MaskSource("gt")
    source.check(root, image_subdir)
    counts = IoUCounts()
    for i in split_ids(meta, split):
        rel = meta.relpaths[i]
        pred, truth = read_mask(source.path(root, image_subdir, rel)), read_mask(gt.path(root, image_subdir, rel))
        if pred.shape != truth.shape:
            raise UserError(f"mask {source.path(root, image_subdir, rel)} is {pred.shape[1]}x{pred.shape[0]}, its "
                            f"ground truth {truth.shape[1]}x{truth.shape[0]} (expected the same size)")
        counts.add(binarise(pred, threshold), binarise(truth, threshold))
    return counts.miou()


# ----------------------------------------------------------------------------- perturbed folders

FOLDER_MARKER = "perturbed_masks.json"


def write_perturbed_masks(root: str | Path, out_dir: str | Path, name: str, strength: float, seed: int = 0,
                          threshold: int = 0, workers: int = 1, overwrite: bool = False,
                          progress: bool = True) -> dict:
    """Every GT mask of ROOT perturbed (image id i drawing from the seed (seed, i)) and written as
    OUT_DIR/images/<rel>.png, and for the Waterbirds test images OUT_DIR/<Waterbirds folder>/<rel>.png:
    a `--mask_source OUT_DIR` folder. A rerun with the same inputs writes only the missing files; a
    folder of other inputs is replaced with `overwrite`, else refused. Returns the inputs with the
    number of masks and the test split's mIoU against the GT (`folder_miou`)."""
    root, out_dir = Path(root), Path(out_dir)
    inputs = {"root": str(root.resolve()), "perturbation": name, "strength": check_perturbation(name, strength),
              "seed": seed, "threshold": threshold}
    meta = read_cub_metadata(root)
    MaskSource("gt").check(root, "images")
    marker = Marker(out_dir / FOLDER_MARKER, fields=tuple(inputs))  # finished, it also holds the summary
    marker.claim(out_dir, inputs, overwrite, functools.partial(_refusal, out_dir, marker))
    wb = (root / WATERBIRDS_SUBDIR).is_dir()
    jobs = []
    for i in meta.ids:
        rel = mask_relpath(meta.relpaths[i])
        dests = [out_dir / "images" / rel]
        if wb and not meta.is_train[i]:
            dests.append(out_dir / WATERBIRDS_SUBDIR / rel)
        if not all(d.is_file() for d in dests):
            jobs.append((root / "segmentations" / rel, dests, name, inputs["strength"], (seed, i), threshold))
    run_each(_write_perturbed, jobs, workers, f"masks {name} {strength:g}", progress)
    summary = {**inputs, "masks": len(meta.ids), "miou": folder_miou(root, out_dir, threshold)}
    marker.write({**summary, "complete": True})
    return summary


def _refusal(out_dir: Path, marker: Marker, saved: dict) -> str:
    """Why `out_dir` is not taken: masks of other inputs (an unreadable marker: of unknown inputs), or a
    folder that holds no masks."""
    if not marker.path.is_file():
        return f"{out_dir} is not empty and holds no {FOLDER_MARKER}; expected an empty or new folder"
    return (f"{out_dir} holds masks of other inputs ({saved.get('perturbation')} {saved.get('strength')}, "
            f"seed {saved.get('seed')}); expected an empty folder or the same inputs (or pass overwrite)")


def _write_perturbed(job: tuple) -> None:
    """One (GT mask, destinations, name, strength, seed, threshold) job, each file written atomically."""
    src, dests, name, strength, seed, threshold = job
    out = Image.fromarray(perturb_mask(read_mask(src), name, strength, seed, threshold), mode="L")
    for dest in dests:
        atomic_save_image(dest, out)
