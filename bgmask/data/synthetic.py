"""Synthetic birds-on-habitats benchmark, written in the exact CUB_200_2011 layout, plus a
Waterbirds-style test folder (the same test birds on a habitat that is not their home).

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
    waterbird_complete95_forest2water2/<same relpath>.jpg, metadata.csv   (test images only)
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
"""

from __future__ import annotations

import colorsys
import functools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from bgmask.errors import UserError
from bgmask.io import atomic_save_image, atomic_write_text, is_empty_folder, remove_stale_temp

__all__ = [
    "HABITATS",
    "HABITAT_FAMILIES",
    "PLACE_OF_HABITAT",
    "WATERBIRDS_DIRNAME",
    "Species",
    "SyntheticSummary",
    "generate_synthetic",
    "make_species",
    "render_bird",
    "render_habitat",
]

GENERATOR_VERSION = 1
WATERBIRDS_DIRNAME = "waterbird_complete95_forest2water2"
CONFIG_NAME = "synthetic_config.json"

# Habitat i = family i % 5 with palette i // 5 (so the first five are all different families).
HABITAT_FAMILIES = ["water", "forest", "sky", "dunes", "rock"]
_PALETTE_NAMES = {
    "water": ("ocean", "lake"),
    "forest": ("summer", "autumn"),
    "sky": ("day", "sunset"),
    "dunes": ("golden", "red"),
    "rock": ("granite", "basalt"),
}
HABITATS = [f"{fam}_{_PALETTE_NAMES[fam][p]}" for p in range(2) for fam in HABITAT_FAMILIES]
_FAMILY_PLACE = {"water": 1, "sky": 1, "forest": 0, "dunes": 0, "rock": 0}
# Place group of each habitat: 1 = water-like, 0 = land-like (Waterbirds' `place` / `y` convention).
PLACE_OF_HABITAT = [_FAMILY_PLACE[HABITAT_FAMILIES[i % 5]] for i in range(len(HABITATS))]

MARKING_POSITIONS = ["crown", "throat", "breast", "belly", "tail"]

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
# Species
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Species:
    index: int  # 0-based class index
    name: str  # e.g. "Azure_Crested_Tern"
    home_habitat: int  # index into HABITATS
    marking_pos: str  # one of MARKING_POSITIONS
    marking_hue: float  # HSV hue in [0, 1)
    bar_period: float  # wing-bar period, in units of the body half-length L
    bar_angle: float  # wing-bar orientation relative to the body axis (radians)
    beak_len: float  # in units of L
    body_aspect: float  # body semi-minor / semi-major axis
    tail_len: float  # in units of L
    tail_width: float  # half-width of the tail end, in units of L
    tail_fork: float  # depth of the fork as a fraction of tail_len (0 = square tail)

    @property
    def folder(self) -> str:
        return f"{self.index + 1:03d}.{self.name}"


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
# Vectorised rendering helpers (float32, H x W arrays of pixel centres)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs), each (S, S) float32, in pixels."""
    c = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(c, c, indexing="ij")
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [0, 1), each (S, S) float32."""
    ys, xs = _pixel_grid(size)
    return ys / size, xs / size


@functools.lru_cache(maxsize=32)
def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells + 1) smoothstep interpolation weights from a coarse lattice to pixels."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) / size * cells
    i0 = np.minimum(np.floor(pos).astype(int), cells - 1)
    f = pos - i0
    w = f * f * (3 - 2 * f)
    m = np.zeros((size, cells + 1), np.float32)
    m[np.arange(size), i0] = 1 - w
    m[np.arange(size), i0 + 1] = w
    return m


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1], (S, S) float32, with about `cells` blobs across."""
    g = rng.random((cells + 1, cells + 1), dtype=np.float32)
    m = _interp_matrix(size, cells)
    return m @ g @ m.T


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _mix(a: np.ndarray, b, t: np.ndarray) -> np.ndarray:
    """a + t * (b - a); a (S, S, 3) or colour, b colour or (S, S, 3), t (S, S)."""
    return a + t[..., None] * (np.asarray(b, np.float32) - a)


def _sd_ellipse(u, v, cx, cy, a, b, rot=0.0):
    """Approximate signed distance to an ellipse (first-order: (f - 1) / |grad f|)."""
    du, dv = u - cx, v - cy
    if rot:
        c, s = math.cos(rot), math.sin(rot)
        du, dv = du * c + dv * s, -du * s + dv * c
    qu, qv = du / a, dv / b
    f = np.sqrt(qu * qu + qv * qv)
    g = np.sqrt((qu / a) ** 2 + (qv / b) ** 2)
    return (f - 1.0) * f / np.maximum(g, 1e-6)


def _sd_circle(u, v, cx, cy, r):
    return np.sqrt((u - cx) ** 2 + (v - cy) ** 2) - r


def _sd_convex(u, v, pts):
    """Signed distance (exact inside, a lower bound outside) to a convex polygon."""
    pts = [(float(x), float(y)) for x, y in pts]  # python floats keep the arrays float32
    area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))
    sign = 1.0 if area2 > 0 else -1.0
    d = None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        ex, ey = x1 - x0, y1 - y0
        n = math.hypot(ex, ey)
        nx, ny = sign * ey / n, -sign * ex / n  # outward normal
        di = (u - x0) * nx + (v - y0) * ny
        d = di if d is None else np.maximum(d, di)
    return d


def _hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


# ----------------------------------------------------------------------------------------------
# Bird
# ----------------------------------------------------------------------------------------------
@dataclass
class _BirdShape:
    """One bird's geometry in its own frame (units of the body half-length L, u forward, v down)."""
    u: np.ndarray  # (S, S) bird-frame coordinates of the pixel centres
    v: np.ndarray
    L: float  # body half-length in pixels
    aspect: float  # body semi-minor / semi-major axis
    hx: float  # head centre and radius
    hy: float
    hr: float
    tl: float  # tail length
    tc: float  # cos / sin of the tail tilt
    ts: float
    tu0: float  # tail hinge
    tv0: float
    d_beak: np.ndarray  # (S, S) signed distances (units of L): beak, whole silhouette
    d_sil: np.ndarray


def render_bird(sp: Species, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one bird of species `sp`. Returns (rgb (S, S, 3) float32 in [0, 1], alpha (S, S)
    float32 in [0, 1], 1 = bird) with anti-aliased edges from signed distances."""
    px = size / 64.0
    u, v, L = _bird_pose(rng, size, px)
    b = _bird_silhouette(sp, rng, u, v, L)
    alpha = np.clip(0.5 - b.d_sil * L, 0.0, 1.0)
    col = _paint_bird(sp, rng, b, size)
    # Dark outline so that the bird stands out on any habitat.
    ow = 0.9 * px
    outline = np.clip(0.5 + (b.d_sil * L + ow), 0.0, 1.0)
    col = _mix(col, (0.05, 0.05, 0.05), 0.8 * outline)
    return col, alpha


def _bird_pose(rng: np.random.Generator, size: int, px: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Random size, tilt, facing and position: the bird frame (u, v) of every pixel and L in pixels."""
    ys, xs = _pixel_grid(size)
    L = rng.uniform(13.0, 18.0) * px  # body half-length in pixels
    ang = math.radians(rng.uniform(-25.0, 25.0))
    facing = 1.0 if rng.random() < 0.5 else -1.0
    cx = size * (0.5 + rng.uniform(-0.12, 0.12))
    cy = size * (0.5 + rng.uniform(-0.12, 0.12))
    c, s = math.cos(ang), math.sin(ang)
    dx, dy = xs - cx, ys - cy
    u = facing * (dx * c + dy * s) / L  # bird frame, units of L: u forward (to the head)
    v = (-dx * s + dy * c) / L  # v down
    return u, v, L


def _bird_silhouette(sp: Species, rng: np.random.Generator, u, v, L: float) -> _BirdShape:
    """Body, head, beak and (forked) tail as signed distances."""
    aspect = sp.body_aspect * rng.uniform(0.92, 1.08)
    hr = rng.uniform(0.38, 0.46)  # head radius
    hx, hy = 0.85, -0.42 * rng.uniform(0.85, 1.15)
    beak = sp.beak_len * rng.uniform(0.9, 1.1)
    tl = sp.tail_len * rng.uniform(0.9, 1.1)
    tw = sp.tail_width * rng.uniform(0.9, 1.1)
    t_ang = math.radians(rng.uniform(-15.0, 15.0))

    d_body = _sd_ellipse(u, v, 0.0, 0.0, 1.0, aspect)
    d_head = _sd_circle(u, v, hx, hy, hr)
    bx = hx + 0.85 * hr
    d_beak = _sd_convex(u, v, [(bx, hy - 0.12), (hx + hr + beak, hy + 0.04), (bx, hy + 0.12)])
    # Tail in its own frame, hinged at the back of the body and tilted by t_ang.
    tc, ts = math.cos(t_ang), math.sin(t_ang)
    tu0, tv0 = -0.7, 0.0
    tu = (u - tu0) * tc + (v - tv0) * ts
    tv = -(u - tu0) * ts + (v - tv0) * tc
    d_tail = _sd_convex(tu, tv, [(0.1, -0.18), (0.1, 0.18), (-tl, max(tw, 0.2)), (-tl, -max(tw, 0.2))])
    if sp.tail_fork > 0:
        notch = _sd_convex(tu, tv, [(-tl - 0.05, -0.8 * tw), (-tl + sp.tail_fork * tl, 0.0),
                                    (-tl - 0.05, 0.8 * tw)])
        d_tail = np.maximum(d_tail, -notch)
    d_sil = np.minimum(np.minimum(d_body, d_head), np.minimum(d_beak, d_tail))
    return _BirdShape(u, v, L, aspect, hx, hy, hr, tl, tc, ts, tu0, tv0, d_beak, d_sil)


def _paint_bird(sp: Species, rng: np.random.Generator, b: _BirdShape, size: int) -> np.ndarray:
    """Colours (S, S, 3) before the outline: body, barred wing, marking, beak, eye."""
    u, v, L = b.u, b.v, b.L
    # Colours: body random per image (no class signal).
    body = _hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.35, 0.9))
    col = np.broadcast_to(body, (size, size, 3)).astype(np.float32)
    # Wing with species-specific bars (in the bird frame, so they turn with the bird).
    d_wing = _sd_ellipse(u, v, -0.1, -0.1 * b.aspect / 0.55, 0.72, 0.6 * b.aspect, rot=math.radians(8))
    a_wing = np.clip(0.5 - d_wing * L, 0.0, 1.0)
    light = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.75, 1.0))
    period = sp.bar_period * rng.uniform(0.93, 1.07)
    ba = sp.bar_angle + math.radians(rng.uniform(-8, 8))
    t = (u * math.cos(ba) + v * math.sin(ba)) * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi)
    bars = np.clip(0.5 + np.sin(t) * (period * L / (2 * math.pi)), 0.0, 1.0)  # ~1 px soft edges
    wing = light * (1.0 - 0.85 * bars[..., None])
    col = col + a_wing[..., None] * (wing - col)
    # Marking: position and colour depend on the species.
    mr = 0.35 * rng.uniform(0.9, 1.1)
    mx, my = _marking_centre(sp.marking_pos, b)
    a_mark = np.clip(0.5 - _sd_circle(u, v, mx, my, mr) * L, 0.0, 1.0)
    mark = _hsv(sp.marking_hue + rng.uniform(-0.02, 0.02), rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
    col = _mix(col, mark, a_mark)
    # Beak and eye (random colours).
    beak_col = _hsv(rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.8), rng.uniform(0.1, 0.9))
    col = _mix(col, beak_col, np.clip(0.5 - b.d_beak * L, 0.0, 1.0))
    er = max(0.08, 0.9 / L)
    return _mix(col, (0.03, 0.03, 0.03), np.clip(0.5 - _sd_circle(u, v, b.hx + 0.15, b.hy - 0.08, er) * L, 0.0, 1.0))


def _marking_centre(pos: str, b: _BirdShape) -> tuple[float, float]:
    """(u, v) of the species' marking at body position `pos` (one of MARKING_POSITIONS)."""
    return {
        "crown": (b.hx - 0.05, b.hy - 0.30),
        "throat": (b.hx + 0.15, b.hy + 0.38),
        "breast": (0.62, 0.32 * b.aspect / 0.55),
        "belly": (-0.05, 0.50 * b.aspect / 0.55),
        "tail": (b.tu0 + (-0.55 * b.tl) * b.tc, b.tv0 + (-0.55 * b.tl) * b.ts),
    }[pos]


# ----------------------------------------------------------------------------------------------
# Habitats: five texture families x two palettes, per-image jitter of colours/frequencies/phases
# ----------------------------------------------------------------------------------------------
_PALETTES = {
    # water: deep, shallow, highlight
    "water": [((0.03, 0.18, 0.42), (0.12, 0.42, 0.72), (0.78, 0.92, 1.0)),
              ((0.04, 0.28, 0.22), (0.22, 0.52, 0.45), (0.80, 0.95, 0.85))],
    # forest: dark leaves, light leaves, accent, trunk
    "forest": [((0.07, 0.22, 0.07), (0.33, 0.58, 0.18), (0.60, 0.72, 0.25), (0.33, 0.21, 0.11)),
               ((0.45, 0.13, 0.05), (0.90, 0.52, 0.10), (0.96, 0.82, 0.25), (0.20, 0.13, 0.09))],
    # sky: top, horizon, cloud
    "sky": [((0.22, 0.42, 0.85), (0.70, 0.85, 0.98), (0.97, 0.97, 1.0)),
            ((0.30, 0.18, 0.48), (0.98, 0.60, 0.30), (1.0, 0.78, 0.72))],
    # dunes: light slope, shadow slope
    "dunes": [((0.93, 0.80, 0.55), (0.70, 0.50, 0.28)),
              ((0.86, 0.50, 0.33), (0.52, 0.25, 0.16))],
    # rock: stone, crack
    "rock": [((0.58, 0.58, 0.56), (0.15, 0.15, 0.15)),
             ((0.30, 0.30, 0.34), (0.06, 0.06, 0.08))],
}


def _jitter(rng, colour, sd=0.04) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.normal(0.0, sd, 3).astype(np.float32), 0.0, 1.0)


def _habitat_water(rng, size, pal):
    y, x = _unit_grid(size)
    deep, shallow, hi = (_jitter(rng, c) for c in pal)
    img = _mix(np.broadcast_to(shallow, (size, size, 3)).astype(np.float32), deep,
               np.clip(y * rng.uniform(0.6, 1.2), 0, 1))
    f = rng.uniform(5.0, 10.0)
    warp = rng.uniform(0.03, 0.08) * np.sin(2 * np.pi * (rng.uniform(0.8, 2.5) * x + rng.random()))
    w = np.sin(2 * np.pi * (f * (y + warp) + rng.random()))
    mod = _value_noise(rng, size, int(rng.integers(3, 7)))
    img = _mix(img, hi, _smoothstep(0.55, 0.95, w) * (0.35 + 0.65 * mod))
    img = _mix(img, deep * 0.7, _smoothstep(-0.6, -1.0, w) * 0.5)
    return img


def _habitat_forest(rng, size, pal):
    y, x = _unit_grid(size)
    dark, lightc, accent, trunk = (_jitter(rng, c) for c in pal)
    n1 = _value_noise(rng, size, int(rng.integers(4, 8)))
    n2 = _value_noise(rng, size, int(rng.integers(8, 13)))
    img = _mix(np.broadcast_to(dark, (size, size, 3)).astype(np.float32), lightc, _smoothstep(0.25, 0.75, n1))
    img = _mix(img, accent, _smoothstep(0.6, 0.8, n2))
    bark = 0.8 + 0.4 * _value_noise(rng, size, 16)
    for _ in range(int(rng.integers(2, 6))):
        x0, half_w = rng.uniform(0.0, 1.0), rng.uniform(0.015, 0.045)
        tilt = rng.uniform(-0.12, 0.12)
        dist = (np.abs(x - x0 - tilt * (y - 0.5)) - half_w) * size  # pixels
        a = np.clip(0.5 - dist, 0.0, 1.0)
        img = img + a[..., None] * (trunk * bark[..., None] - img)
    return img


def _habitat_sky(rng, size, pal):
    y, x = _unit_grid(size)
    top, horizon, cloud = (_jitter(rng, c) for c in pal)
    img = _mix(np.broadcast_to(top, (size, size, 3)).astype(np.float32), horizon,
               np.clip(y * rng.uniform(0.8, 1.3) + rng.uniform(-0.2, 0.1), 0, 1))
    n = _value_noise(rng, size, int(rng.integers(3, 6))) + 0.45 * _value_noise(rng, size, int(rng.integers(8, 12)))
    th = rng.uniform(0.6, 0.9)
    img = _mix(img, cloud, _smoothstep(th, th + 0.3, n))
    return img


def _habitat_dunes(rng, size, pal):
    y, x = _unit_grid(size)
    lightc, shadow = (_jitter(rng, c) for c in pal)
    h = y + rng.uniform(0.05, 0.12) * np.sin(2 * np.pi * (rng.uniform(0.6, 1.5) * x + rng.random()))
    h = h + rng.uniform(0.0, 0.05) * np.sin(2 * np.pi * (rng.uniform(2.0, 3.5) * x + rng.random()))
    shade = np.sin(2 * np.pi * (rng.uniform(2.0, 4.0) * h + rng.random()))
    img = _mix(np.broadcast_to(shadow, (size, size, 3)).astype(np.float32), lightc, _smoothstep(-0.4, 0.4, shade))
    ripple = np.sin(2 * np.pi * (rng.uniform(12.0, 20.0) * (h + 0.02 * x) + rng.random()))
    return img * (1.0 + rng.uniform(0.03, 0.08) * ripple)[..., None]


def _habitat_rock(rng, size, pal):
    y, x = _unit_grid(size)
    stone, crack = (_jitter(rng, c) for c in pal)
    n = int(rng.integers(8, 17))
    sx, sy = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    d2 = (x[None] - sx[:, None, None]) ** 2 + (y[None] - sy[:, None, None]) ** 2  # (n, S, S)
    part = np.partition(d2, 1, axis=0)
    d1, d2nd = np.sqrt(part[0]), np.sqrt(part[1])
    nearest = np.argmin(d2, axis=0)
    shade = (1.0 + rng.uniform(-0.25, 0.25, n).astype(np.float32))[nearest]
    tint = (rng.normal(0.0, 0.04, (n, 3)).astype(np.float32))[nearest]
    grain = 0.85 + 0.3 * _value_noise(rng, size, 12)
    img = np.clip(stone * (shade * grain)[..., None] + tint, 0.0, 1.0)
    edge = (d2nd - d1) * size  # pixels to the cell border (x2)
    return _mix(img, crack, 1.0 - _smoothstep(0.0, rng.uniform(1.0, 2.0), edge))


_FAMILY_FN = {"water": _habitat_water, "forest": _habitat_forest, "sky": _habitat_sky,
              "dunes": _habitat_dunes, "rock": _habitat_rock}


def render_habitat(habitat: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render habitat `habitat` (index into HABITATS): (S, S, 3) float32 in [0, 1]."""
    fam, pal = HABITAT_FAMILIES[habitat % 5], habitat // 5
    img = _FAMILY_FN[fam](rng, size, _PALETTES[fam][pal])
    img = img * rng.uniform(0.85, 1.15)
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.035), img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)


def _composite(bird: np.ndarray, mask_u8: np.ndarray, bg: np.ndarray) -> np.ndarray:
    a = (mask_u8.astype(np.float32) / 255.0)[..., None]
    out = bg + a * (bird - bg)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _pick_habitat(rng: np.random.Generator, home: int, p_home: float) -> int:
    """Home with probability p_home, else a uniformly random other habitat."""
    if rng.random() < p_home:
        return home
    other = int(rng.integers(0, len(HABITATS) - 1))
    return other + 1 if other >= home else other


def _bbox(mask_u8: np.ndarray) -> tuple[float, float, float, float]:
    """CUB bbox (x, y, w, h) of mask > 0; (0, 0, 0, 0) if empty."""
    on = mask_u8 > 0
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    return float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)


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

    def to_text(self) -> str:
        lines = [
            f"synthetic birds: {self.num_classes} species, {self.num_habitats} habitats, "
            f"correlation {self.correlation:g}, seed {self.seed}",
            f"  {self.num_train} train + {self.num_test} test images (CUB_200_2011 layout) in {self.out_dir}",
            f"  {self.num_waterbirds} Waterbirds-style test images in {self.out_dir / WATERBIRDS_DIRNAME}",
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


def _prepare_out_dir(out: Path, config: dict, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} exists and is not a folder")
    if is_empty_folder(out):
        remove_stale_temp(out)  # a run killed while writing its config leaves only its temporary file
        return
    if overwrite:
        if not (out / CONFIG_NAME).is_file():  # never wipe a folder that is not a synthetic dataset
            raise UserError(f"refusing to overwrite {out}: it is not empty and holds no {CONFIG_NAME}")
        shutil.rmtree(out)
        return
    try:
        previous = json.loads((out / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        previous = None
    if previous != config:
        raise UserError(f"output folder {out} exists and is not empty (pass --overwrite to replace it)")
    remove_stale_temp(out, recursive=True)  # half-written files of a killed run


def _save_jpeg(path: Path, rgb_u8: np.ndarray, mode: str = "RGB") -> None:
    img = Image.fromarray(rgb_u8)
    atomic_save_image(path, img if mode == "RGB" else img.convert(mode), quality=95)


def _save_pair(img_path: Path, mask_path: Path, rgb_u8: np.ndarray, mask_u8: np.ndarray, mode: str = "RGB") -> None:
    atomic_save_image(mask_path, Image.fromarray(mask_u8))
    _save_jpeg(img_path, rgb_u8, mode)


def generate_synthetic(out_dir, *, num_classes=10, image_size=64, train_per_class=400, test_per_class=100,
                       correlation=0.95, seed=0, overwrite=False, progress=True,
                       quirks: Quirks = Quirks()) -> SyntheticSummary:
    """Write the synthetic benchmark into `out_dir` (see the module docstring); resumable."""
    _validate(num_classes, image_size, train_per_class, test_per_class, correlation, seed)
    quirks.validate()
    t0 = time.perf_counter()
    out = Path(out_dir)
    config = {
        "generator": "bgmask.data.synthetic", "version": GENERATOR_VERSION,
        "num_classes": int(num_classes), "image_size": int(image_size),
        "train_per_class": int(train_per_class), "test_per_class": int(test_per_class),
        "correlation": float(correlation), "seed": int(seed), **quirks.config(),
    }
    _prepare_out_dir(out, config, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")

    species = make_species(num_classes, seed)
    per_class = train_per_class + test_per_class
    rows = []  # (id, relpath, class index, is_train, habitat, bbox, waterbirds habitat or None)
    rendered = resumed = 0
    bar = tqdm(total=num_classes * per_class, desc="synthetic", unit="img", disable=not progress)
    for sp in species:
        for j in range(per_class):
            row, n_rendered = _make_image(out, sp, j, per_class, train_per_class, image_size, float(correlation), seed,
                                          quirks)
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
    return SyntheticSummary(
        out_dir=out, num_classes=num_classes, num_habitats=len(HABITATS), num_train=num_train,
        num_test=len(rows) - num_train, correlation=float(correlation), seed=int(seed),
        sample_grid=grid_path, seconds=seconds,
        images_per_s=rendered / seconds_images if seconds_images > 0 else 0.0,
        num_waterbirds=len(rows) - num_train, num_resumed=resumed,
    )


def _make_image(out: Path, sp: Species, j: int, per_class: int, train_per_class: int, image_size: int,
                correlation: float, seed: int, quirks: Quirks = Quirks()) -> tuple[tuple, int]:
    """Image j of species `sp` with its mask (and, for a test image, its Waterbirds version): rendered,
    or its mask read back when a previous run finished it. Returns (metadata row, images rendered;
    0 = resumed)."""
    img_id = sp.index * per_class + j + 1
    is_train = j < train_per_class
    split, idx = ("train", j) if is_train else ("test", j - train_per_class)
    rel = f"{sp.folder}/{sp.name}_{j + 1:04d}_{img_id}.jpg"

    def rng(stream):
        return np.random.default_rng([seed, _SPLIT_CODE[split], sp.index, idx, stream])

    habitat = _pick_habitat(rng(_HAB_CHOICE), sp.home_habitat, correlation)
    wb_habitat = None if is_train else _pick_habitat(rng(_WB_CHOICE), sp.home_habitat, 0.0)
    img_path, mask_path = out / "images" / rel, out / "segmentations" / (rel[:-4] + ".png")
    wb_path = out / WATERBIRDS_DIRNAME / rel
    rendered = 0
    if img_path.is_file() and mask_path.is_file() and (is_train or wb_path.is_file()):
        with Image.open(mask_path) as m:
            mask_u8 = np.asarray(m)
    else:
        size, wh, mode = quirks.draw(rng(_QUIRKS), image_size)
        bird, alpha = render_bird(sp, rng(_BIRD), size)
        mask_u8 = np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)
        box = _crop_box(mask_u8, wh)
        bird, mask_u8 = bird[box], mask_u8[box]
        bg = render_habitat(habitat, rng(_HAB_RENDER), size)[box]
        _save_pair(img_path, mask_path, _composite(bird, mask_u8, bg), mask_u8, mode)
        rendered = 1
        if not is_train:
            wb_bg = render_habitat(wb_habitat, rng(_WB_RENDER), size)[box]
            _save_jpeg(wb_path, _composite(bird, mask_u8, wb_bg), mode)
            rendered = 2
    return (img_id, rel, sp.index, is_train, habitat, _bbox(mask_u8), wb_habitat), rendered


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
    for img_id, rel, c, is_train, _, _, wb in rows:
        if not is_train:
            y = PLACE_OF_HABITAT[species[c].home_habitat]
            meta.append(f"{img_id},{rel},{y},2,{PLACE_OF_HABITAT[wb]},/{HABITATS[wb]}/{img_id}.jpg")
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
            img_id, rel, _, _, hab, _, wb = r
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
