"""Synthetic birds-on-habitats benchmark, written in the exact CUB_200_2011 layout, plus a
Waterbirds-style test folder (the same test birds on a habitat that is not their home) or, with
`WaterbirdsSplits` (`make-synthetic --waterbirds_splits`), a complete Waterbirds folder with the
standard protocol's splits 0/1/2 (see `bgmask.data.synthetic_waterbirds`).

Each species has a home habitat (species k -> habitat k % num_habitats). A train or in-distribution
test image sits on its home habitat with probability `correlation`, otherwise on a uniformly random
other habitat; a classifier can therefore shortcut through the background. The Waterbirds folder
repeats every test image with the same bird pixels and the same mask on a habitat that is never
the home habitat, which exposes the shortcut.

Species differ only by fine-grained cues: a marking whose body position and colour depend on the
species, wing bars with a species-specific period and orientation, beak length, body aspect and tail
shape. Body colour, pose, scale and position are random per image (no class signal).

Everything is a pure function of the arguments: image (class c, split s, index i) draws from its own
generators `np.random.default_rng([seed, s, c, i, stream])`, so equal arguments give byte-identical
files, and a smaller `train_per_class` gives a prefix of a larger one.

Files written into `out_dir` (ids are 1-based, ordered by class then image, like CUB):
    synthetic_config.json                 generation arguments (written first; used to resume)
    images/<NNN.Name>/<Name>_<NNNN>_<id>.jpg          RGB, image_size x image_size, JPEG q95
    segmentations/<NNN.Name>/<Name>_<NNNN>_<id>.png   8-bit grey: 0 = background, 255 = bird,
                                                      soft anti-aliased values in between
    waterbird_complete95_forest2water2/<same relpath>.jpg, metadata.csv   (test images only, split 2;
        with WaterbirdsSplits every image: train images in split 0 or 1, test images in split 2)
    sample_grid.png
    habitats.txt (<habitat_id> <name> <place>), image_habitats.txt (<id> <habitat_id>)
    images.txt, classes.txt, image_class_labels.txt, train_test_split.txt, bounding_boxes.txt
        (CUB formats; written last, images.txt the very last)
Place groups as in Waterbirds: 1 = water-like (water, sky habitats), 0 = land-like.

Real-data quirks (`Quirks`, off by default; files without them are unchanged): `varied_sizes` gives each
image CUB's non-square shapes, 4:3 landscape or 3:4 portrait (like 500x375 / 375x500) with the long side
0.6-1.0 x image_size (the bird rendered at the long side, the short side cropped around it; the mask
cropped alike); `grayscale_fraction` / `cmyk_fraction` of the images (and their Waterbirds copies) are
saved as L / CMYK JPEGs. Each image draws its quirks from its own stream, so they do not change the
other draws and grayscale picks are the same with or without varied sizes.

This module holds the species roster (`make_species`), the real-data quirks, the dataset writer
(`generate_synthetic`) and the sample grid; the drawing lives in `bgmask.data.render` (the bird) and
`bgmask.data.habitats` (the backgrounds).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from bgmask.data.habitats import HABITATS, PLACE_OF_HABITAT, pick_habitat, render_habitat
from bgmask.data.render import MARKING_POSITIONS, Species, composite, render_bird
from bgmask.data.synthetic_waterbirds import WaterbirdsSplits, habitat_in_place
from bgmask.errors import UserError
from bgmask.io import atomic_save_image, atomic_write_text, is_empty_folder
from bgmask.io import Marker

__all__ = [
    "WATERBIRDS_DIRNAME",
    "SyntheticSummary",
    "WaterbirdsSplits",
    "generate_synthetic",
    "make_species",
]

GENERATOR_VERSION = 1
WATERBIRDS_DIRNAME = "waterbird_complete95_forest2water2"
CONFIG_NAME = "synthetic_config.json"

# Pairwise coprime list lengths (23, 19, 17): name k = (ADJ[k % 23], MID[k % 19], NOUN[k % 17])
# is unique for every k < 7429 (Chinese remainder theorem).
_ADJ = ["Azure", "Crimson", "Golden", "Dusky", "Ivory", "Scarlet", "Olive", "Slate", "Amber",
        "Rusty", "Cobalt", "Pale", "Sooty", "Tawny", "Violet", "Ashy", "Copper", "Emerald",
        "Saffron", "Umber", "Pearl", "Indigo", "Cinder"]
_MID = ["Crested", "Spotted", "Barred", "Masked", "Banded", "Throated", "Winged", "Billed",
        "Tailed", "Capped", "Breasted", "Necked", "Browed", "Bellied", "Rumped", "Collared",
        "Hooded", "Streaked", "Fronted"]
_NOUN = ["Tern", "Warbler", "Finch", "Heron", "Plover", "Sparrow", "Wren", "Kingfisher", "Grebe",
         "Thrush", "Gull", "Swallow", "Oriole", "Petrel", "Shrike", "Pipit", "Tanager"]

_SPLIT_CODE = {"train": 0, "test": 1}
# Per-image random streams: independent, so e.g. the bird does not depend on the habitat drawn.
_BIRD, _HAB_CHOICE, _HAB_RENDER, _WB_CHOICE, _WB_RENDER = range(5)
_QUIRKS = 5  # Quirks.draw: orientation, scale, JPEG mode


# ----------------------------------------------------------------------------------------------
# Species roster: names, home habitats and cues (the cues are drawn by bgmask.data.render)
# ----------------------------------------------------------------------------------------------
def class_name(k: int) -> str:
    return f"{_ADJ[k % len(_ADJ)]}_{_MID[k % len(_MID)]}_{_NOUN[k % len(_NOUN)]}"


def _frac(x: float) -> float:
    return x - math.floor(x)


def make_species(num_classes: int, seed: int = 0) -> list[Species]:
    """Species k depends only on (k, seed). Cues are spread with low-discrepancy sequences so that
    neighbouring species differ; species sharing a marking position (k, k+5, ...) have hues a
    golden-ratio step apart."""
    off = [float(o) for o in np.random.default_rng([seed, 7777]).random(8)]
    phi = (math.sqrt(5) - 1) / 2
    out = []
    for k in range(num_classes):
        fork_u = _frac(off[7] + k * 0.4142135)
        out.append(Species(
            index=k,
            name=class_name(k),
            home_habitat=k % len(HABITATS),
            marking_pos=MARKING_POSITIONS[k % len(MARKING_POSITIONS)],
            marking_hue=_frac(off[0] + (k // 5) * phi + (k % 5) * 0.13),
            bar_period=0.28 + 0.16 * _frac(off[1] + k * (math.sqrt(2) - 1)),
            bar_angle=math.pi * _frac(off[2] + k * (math.sqrt(3) - 1)),
            beak_len=0.15 + 0.45 * _frac(off[3] + k * (math.sqrt(5) - 2)),
            body_aspect=0.48 + 0.14 * _frac(off[4] + k * (math.pi - 3)),
            tail_len=0.40 + 0.45 * _frac(off[5] + k * (math.e - 2)),
            tail_width=0.22 + 0.30 * _frac(off[6] + k * 0.5698403),
            tail_fork=0.0 if fork_u < 0.4 else 0.25 + 0.6 * (fork_u - 0.4),
        ))
    return out


# ----------------------------------------------------------------------------------------------
# Real-data quirks
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quirks:
    """What makes real CUB awkward: non-square sizes and a few grayscale / CMYK JPEGs."""

    varied_sizes: bool = False
    grayscale_fraction: float = 0.0
    cmyk_fraction: float = 0.0

    def config(self) -> dict:
        """The non-default settings (an empty dict keeps an old dataset's config as it was)."""
        return {k: v for k, v in (("varied_sizes", self.varied_sizes), ("grayscale_fraction", self.grayscale_fraction),
                                  ("cmyk_fraction", self.cmyk_fraction)) if v}

    def validate(self) -> None:
        for name in ("grayscale_fraction", "cmyk_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 <= float(v) <= 1.0:
                raise UserError(f"{name} must be a number in [0, 1], got {v!r}")
        if self.grayscale_fraction + self.cmyk_fraction > 1.0:
            raise UserError(f"grayscale_fraction + cmyk_fraction must be <= 1, got "
                            f"{self.grayscale_fraction + self.cmyk_fraction:g}")

    def draw(self, rng: np.random.Generator, image_size: int) -> tuple[int, tuple[int, int] | None, str]:
        """One image's (render size, (width, height) to crop or None, JPEG mode). Always the same three
        draws, whatever is switched on."""
        portrait, scale, u = rng.random() < 0.5, rng.uniform(0.6, 1.0), rng.random()
        mode = "L" if u < self.grayscale_fraction else "CMYK" if u < self.grayscale_fraction + self.cmyk_fraction else "RGB"
        if not self.varied_sizes:
            return image_size, None, mode
        long_side = max(16, int(round(image_size * scale)))
        short_side = max(12, int(round(long_side * 0.75)))
        return long_side, ((short_side, long_side) if portrait else (long_side, short_side)), mode


def _bbox(mask_u8: np.ndarray) -> tuple[float, float, float, float]:
    """CUB bbox (x, y, w, h) of mask > 0; (0, 0, 0, 0) if empty."""
    on = mask_u8 > 0
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    return float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)


def _crop_box(mask_u8: np.ndarray, wh: tuple[int, int] | None) -> tuple[slice, slice]:
    """Rows and columns of a (w, h) window of the square render, centred on the bird (clamped)."""
    size = mask_u8.shape[0]
    if wh is None:
        return slice(0, size), slice(0, size)
    x, y, bw, bh = _bbox(mask_u8)
    cx, cy = (x + bw / 2, y + bh / 2) if bw else (size / 2, size / 2)
    x0 = int(np.clip(round(cx - wh[0] / 2), 0, size - wh[0]))
    y0 = int(np.clip(round(cy - wh[1] / 2), 0, size - wh[1]))
    return slice(y0, y0 + wh[1]), slice(x0, x0 + wh[0])


# ----------------------------------------------------------------------------------------------
# Dataset writer
# ----------------------------------------------------------------------------------------------
@dataclass
class SyntheticSummary:
    out_dir: Path
    num_classes: int
    num_habitats: int
    num_train: int
    num_test: int
    correlation: float
    seed: int
    sample_grid: Path
    seconds: float
    images_per_s: float  # images rendered per second (train + test + Waterbirds), this call
    num_waterbirds: int = 0
    num_resumed: int = 0  # images found complete on disk and skipped (resume)
    waterbirds_splits: WaterbirdsSplits | None = None
    waterbirds_split_sizes: tuple[int, int, int] | None = None  # images in splits 0, 1, 2 (complete folder)

    def to_text(self) -> str:
        lines = [
            f"synthetic birds: {self.num_classes} species, {self.num_habitats} habitats, "
            f"correlation {self.correlation:g}, seed {self.seed}",
            f"  {self.num_train} train + {self.num_test} test images (CUB_200_2011 layout) in {self.out_dir}",
            f"  {self.num_waterbirds} Waterbirds-style test images in {self.out_dir / WATERBIRDS_DIRNAME}"
            if self.waterbirds_split_sizes is None else
            f"  {self.num_waterbirds} Waterbirds images in {self.out_dir / WATERBIRDS_DIRNAME}: splits 0/1/2 = "
            f"{'/'.join(map(str, self.waterbirds_split_sizes))} (train/val/test), P(place == y) in train "
            f"{self.waterbirds_splits.correlation:g}",
            f"  sample grid: {self.sample_grid}",
            f"  {self.seconds:.1f} s, {self.images_per_s:.0f} images/s"
            + (f" ({self.num_resumed} images already on disk, resumed)" if self.num_resumed else ""),
        ]
        return "\n".join(lines)


def _validate(num_classes, image_size, train_per_class, test_per_class, correlation, seed):
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(num_classes) or not 2 <= num_classes <= 999:
        raise UserError(f"num_classes must be an integer in [2, 999], got {num_classes!r}")
    if not is_int(image_size) or image_size < 32:
        raise UserError(f"image_size must be an integer >= 32, got {image_size!r}")
    for name, v in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if not is_int(v) or v < 1:
            raise UserError(f"{name} must be an integer >= 1, got {v!r}")
    if train_per_class + test_per_class > 9999:
        raise UserError(f"train_per_class + test_per_class must be <= 9999, got {train_per_class + test_per_class}")
    if isinstance(correlation, bool) or not isinstance(correlation, (int, float, np.floating)) \
            or not 0.0 <= float(correlation) <= 1.0:
        raise UserError(f"correlation must be a number in [0, 1], got {correlation!r}")
    if not is_int(seed) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")


def _claim_out_dir(out: Path, config: dict, overwrite: bool) -> None:
    """Make `out` the home of the dataset of `config`, its config file written first: an empty folder, or
    one of the same config (resumed). With `overwrite`, a synthetic dataset of any config is replaced;
    a non-empty folder without a config file is never wiped."""
    marker = Marker(out / CONFIG_NAME, exact=True)  # a quirk left off is a missing key: compared too
    if overwrite and not is_empty_folder(out) and not marker.path.is_file():
        raise UserError(f"refusing to overwrite {out}: it is not empty and holds no {CONFIG_NAME}")
    marker.claim(out, config, overwrite,
                 lambda saved: f"output folder {out} exists and is not empty (pass --overwrite to replace it)",
                 text=json.dumps(config, indent=2, sort_keys=True) + "\n", fresh=overwrite)


def _save_jpeg(path: Path, rgb_u8: np.ndarray, mode: str = "RGB") -> None:
    img = Image.fromarray(rgb_u8)
    atomic_save_image(path, img if mode == "RGB" else img.convert(mode), quality=95)


def _save_pair(img_path: Path, mask_path: Path, rgb_u8: np.ndarray, mask_u8: np.ndarray, mode: str = "RGB") -> None:
    atomic_save_image(mask_path, Image.fromarray(mask_u8))
    _save_jpeg(img_path, rgb_u8, mode)


def generate_synthetic(out_dir, *, num_classes=10, image_size=64, train_per_class=400, test_per_class=100,
                       correlation=0.95, seed=0, overwrite=False, progress=True,
                       quirks: Quirks = Quirks(), waterbirds: WaterbirdsSplits | None = None) -> SyntheticSummary:
    """Write the synthetic benchmark into `out_dir` (see the module docstring); resumable. `waterbirds`
    makes the Waterbirds folder the complete protocol folder (None: the test-only folder)."""
    _validate(num_classes, image_size, train_per_class, test_per_class, correlation, seed)
    quirks.validate()
    if waterbirds is not None:
        waterbirds.validate(train_per_class)
    t0 = time.perf_counter()
    out = Path(out_dir)
    config = {
        "generator": "bgmask.data.synthetic", "version": GENERATOR_VERSION,
        "num_classes": int(num_classes), "image_size": int(image_size),
        "train_per_class": int(train_per_class), "test_per_class": int(test_per_class),
        "correlation": float(correlation), "seed": int(seed), **quirks.config(),
        **(waterbirds.config() if waterbirds is not None else {}),
    }
    _claim_out_dir(out, config, overwrite)

    species = make_species(num_classes, seed)
    plan = None if waterbirds is None else \
        waterbirds.plan([sp.home_habitat for sp in species], train_per_class, test_per_class, seed)
    per_class = train_per_class + test_per_class
    rows = []  # (id, relpath, class index, is_train, habitat, bbox, Waterbirds habitat and split or None)
    rendered = resumed = 0
    bar = tqdm(total=num_classes * per_class, desc="synthetic", unit="img", disable=not progress)
    for sp in species:
        for j in range(per_class):
            row, n_rendered = _make_image(out, sp, j, per_class, train_per_class, image_size, float(correlation), seed,
                                          quirks, plan)
            rows.append(row)
            rendered += n_rendered
            resumed += n_rendered == 0
            bar.update(1)
    bar.close()
    seconds_images = time.perf_counter() - t0

    grid_path = out / "sample_grid.png"
    atomic_save_image(grid_path, _sample_grid(out, species, rows))
    _write_metadata(out, species, rows)
    seconds = time.perf_counter() - t0
    num_train = sum(1 for r in rows if r[3])
    wb_splits = [r[7] for r in rows if r[7] is not None]
    return SyntheticSummary(
        out_dir=out, num_classes=num_classes, num_habitats=len(HABITATS), num_train=num_train,
        num_test=len(rows) - num_train, correlation=float(correlation), seed=int(seed),
        sample_grid=grid_path, seconds=seconds,
        images_per_s=rendered / seconds_images if seconds_images > 0 else 0.0,
        num_waterbirds=len(wb_splits), num_resumed=resumed, waterbirds_splits=waterbirds,
        waterbirds_split_sizes=None if waterbirds is None else tuple(wb_splits.count(s) for s in range(3)),
    )


def _make_image(out: Path, sp: Species, j: int, per_class: int, train_per_class: int, image_size: int,
                correlation: float, seed: int, quirks: Quirks = Quirks(),
                plan: dict | None = None) -> tuple[tuple, int]:
    """Image j of species `sp` with its mask (and, for a test image or any image of a `plan`, its
    Waterbirds version): rendered, or its mask read back when a previous run finished it. Returns
    (metadata row, images rendered; 0 = resumed)."""
    img_id = sp.index * per_class + j + 1
    is_train = j < train_per_class
    split, idx = ("train", j) if is_train else ("test", j - train_per_class)
    rel = f"{sp.folder}/{sp.name}_{j + 1:04d}_{img_id}.jpg"

    def rng(stream):
        return np.random.default_rng([seed, _SPLIT_CODE[split], sp.index, idx, stream])

    habitat = pick_habitat(rng(_HAB_CHOICE), sp.home_habitat, correlation)
    if plan is not None:  # the complete protocol folder: split and place planned per species
        wb_split, place = plan[sp.index, j]
        wb_habitat = habitat_in_place(rng(_WB_CHOICE), place)
    else:
        wb_split, wb_habitat = (None, None) if is_train else (2, pick_habitat(rng(_WB_CHOICE), sp.home_habitat, 0.0))
    img_path, mask_path = out / "images" / rel, out / "segmentations" / (rel[:-4] + ".png")
    wb_path = out / WATERBIRDS_DIRNAME / rel
    rendered = 0
    if img_path.is_file() and mask_path.is_file() and (wb_habitat is None or wb_path.is_file()):
        with Image.open(mask_path) as m:
            mask_u8 = np.asarray(m)
    else:
        size, wh, mode = quirks.draw(rng(_QUIRKS), image_size)
        bird, alpha = render_bird(sp, rng(_BIRD), size)
        mask_u8 = np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)
        box = _crop_box(mask_u8, wh)
        bird, mask_u8 = bird[box], mask_u8[box]
        bg = render_habitat(habitat, rng(_HAB_RENDER), size)[box]
        _save_pair(img_path, mask_path, composite(bird, mask_u8, bg), mask_u8, mode)
        rendered = 1
        if wb_habitat is not None:
            wb_bg = render_habitat(wb_habitat, rng(_WB_RENDER), size)[box]
            _save_jpeg(wb_path, composite(bird, mask_u8, wb_bg), mode)
            rendered = 2
    return (img_id, rel, sp.index, is_train, habitat, _bbox(mask_u8), wb_habitat, wb_split), rendered


def _write_metadata(out: Path, species: list[Species], rows) -> None:
    """CUB text files + habitat files + Waterbirds metadata.csv; images.txt last of all."""
    def lines(items):
        return "".join(f"{x}\n" for x in items)

    atomic_write_text(out / "habitats.txt", lines(f"{i + 1} {h} {PLACE_OF_HABITAT[i]}" for i, h in enumerate(HABITATS)))
    atomic_write_text(out / "image_habitats.txt", lines(f"{r[0]} {r[4] + 1}" for r in rows))
    atomic_write_text(out / "classes.txt", lines(f"{sp.index + 1} {sp.folder}" for sp in species))
    atomic_write_text(out / "image_class_labels.txt", lines(f"{r[0]} {r[2] + 1}" for r in rows))
    atomic_write_text(out / "train_test_split.txt", lines(f"{r[0]} {int(r[3])}" for r in rows))
    atomic_write_text(out / "bounding_boxes.txt",
                      lines(f"{r[0]} {b[0]:.1f} {b[1]:.1f} {b[2]:.1f} {b[3]:.1f}" for r in rows for b in [r[5]]))
    meta = ["img_id,img_filename,y,split,place,place_filename"]
    for img_id, rel, c, _, _, _, wb, wb_split in rows:
        if wb is not None:
            y = PLACE_OF_HABITAT[species[c].home_habitat]
            meta.append(f"{img_id},{rel},{y},{wb_split},{PLACE_OF_HABITAT[wb]},/{HABITATS[wb]}/{img_id}.jpg")
    atomic_write_text(out / WATERBIRDS_DIRNAME / "metadata.csv", lines(meta))
    atomic_write_text(out / "images.txt", lines(f"{r[0]} {r[1]}" for r in rows))


def _sample_grid(out: Path, species: list[Species], rows, max_rows=6, per_row=2, cell=96) -> Image.Image:
    """Rows = a few species; per sample three cells: image, mask, Waterbirds version."""
    k = min(max_rows, len(species))
    chosen = sorted({round(i * (len(species) - 1) / max(k - 1, 1)) for i in range(k)})
    test_rows = {c: [r for r in rows if r[2] == c and not r[3]][:per_row] for c in chosen}
    label_w, head_h, pad = 230, 22, 4
    ncols = 3 * per_row
    W = label_w + ncols * (cell + pad)
    H = head_h + len(chosen) * (cell + pad)
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=13)
    for j in range(ncols):
        draw.text((label_w + j * (cell + pad) + 4, 4), ["image", "mask", "Waterbirds"][j % 3], fill=(0, 0, 0), font=font)
    for i, c in enumerate(chosen):
        y0 = head_h + i * (cell + pad)
        sp = species[c]
        home = HABITATS[sp.home_habitat]
        draw.text((4, y0 + cell // 2 - 22), sp.folder, fill=(0, 0, 0), font=font)
        draw.text((4, y0 + cell // 2 - 4), f"home: {home} (y={PLACE_OF_HABITAT[sp.home_habitat]})",
                  fill=(60, 60, 60), font=font)
        draw.text((4, y0 + cell // 2 + 14), f"marking: {sp.marking_pos}", fill=(60, 60, 60), font=font)
        for s, r in enumerate(test_rows[c]):
            img_id, rel, _, _, hab, _, wb, _ = r
            paths = [out / "images" / rel, out / "segmentations" / (rel[:-4] + ".png"), out / WATERBIRDS_DIRNAME / rel]
            for t, p in enumerate(paths):
                with Image.open(p) as im:
                    tile = im.convert("RGB").resize((cell, cell), Image.NEAREST)
                grid.paste(tile, (label_w + (3 * s + t) * (cell + pad), y0))
            x_wb = label_w + (3 * s + 2) * (cell + pad)
            draw.text((x_wb + 2, y0 + cell - 15), HABITATS[wb], fill=(255, 255, 255), font=font,
                      stroke_width=2, stroke_fill=(0, 0, 0))
            draw.text((label_w + 3 * s * (cell + pad) + 2, y0 + cell - 15), HABITATS[hab], fill=(255, 255, 255),
                      font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return grid
