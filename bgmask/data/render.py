"""Drawing on pixel grids for the synthetic benchmark: the raster helpers (pixel-centre grids, value
noise, smoothstep, colour mixing, signed distances to ellipses, circles and convex polygons), a species'
rendering cues (`Species`) and the bird drawn from them (`render_bird`), and the alpha composite of a
bird over a background.

Every function is a pure function of its arguments and random generator; arrays are float32 (S, S) or
(S, S, 3) in [0, 1]. Edges are anti-aliased from signed distances (about one pixel wide).
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MARKING_POSITIONS", "Species", "composite", "mix", "render_bird", "smoothstep", "unit_grid",
           "value_noise"]

MARKING_POSITIONS = ["crown", "throat", "breast", "belly", "tail"]


# ----------------------------------------------------------------------------------------------
# Species: the cues a bird is drawn from (`bgmask.data.synthetic.make_species` picks them)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Species:
    """One species: its class identity (index, name, home habitat) and the fine-grained cues its birds
    are drawn with."""

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
def unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
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


def value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1], (S, S) float32, with about `cells` blobs across."""
    g = rng.random((cells + 1, cells + 1), dtype=np.float32)
    m = _interp_matrix(size, cells)
    return m @ g @ m.T


def smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def mix(a: np.ndarray, b, t: np.ndarray) -> np.ndarray:
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
    col = mix(col, (0.05, 0.05, 0.05), 0.8 * outline)
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
    col = mix(col, mark, a_mark)
    # Beak and eye (random colours).
    beak_col = _hsv(rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.8), rng.uniform(0.1, 0.9))
    col = mix(col, beak_col, np.clip(0.5 - b.d_beak * L, 0.0, 1.0))
    er = max(0.08, 0.9 / L)
    return mix(col, (0.03, 0.03, 0.03), np.clip(0.5 - _sd_circle(u, v, b.hx + 0.15, b.hy - 0.08, er) * L, 0.0, 1.0))


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
# Bird over background
# ----------------------------------------------------------------------------------------------
def composite(bird: np.ndarray, mask_u8: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """`bird` over `bg` with the mask (0-255) as alpha: (H, W, 3) uint8."""
    a = (mask_u8.astype(np.float32) / 255.0)[..., None]
    out = bg + a * (bird - bg)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)

