"""The habitats (backgrounds) of the synthetic benchmark: their names and Waterbirds place groups
(`HABITATS`, `PLACE_OF_HABITAT`), the drawing of one habitat image (`render_habitat`: five texture
families x two palettes, per-image jitter of colours, frequencies and phases) and the choice of an
image's habitat (`pick_habitat`: the species' home with a given probability, else another).
"""

from __future__ import annotations

import numpy as np

from bgmask.data.render import mix, smoothstep, unit_grid, value_noise

__all__ = ["HABITATS", "HABITAT_FAMILIES", "PLACE_OF_HABITAT", "pick_habitat", "render_habitat"]

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


# ----------------------------------------------------------------------------------------------
# Drawing: five texture families x two palettes, per-image jitter of colours/frequencies/phases
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
    y, x = unit_grid(size)
    deep, shallow, hi = (_jitter(rng, c) for c in pal)
    img = mix(np.broadcast_to(shallow, (size, size, 3)).astype(np.float32), deep,
               np.clip(y * rng.uniform(0.6, 1.2), 0, 1))
    f = rng.uniform(5.0, 10.0)
    warp = rng.uniform(0.03, 0.08) * np.sin(2 * np.pi * (rng.uniform(0.8, 2.5) * x + rng.random()))
    w = np.sin(2 * np.pi * (f * (y + warp) + rng.random()))
    mod = value_noise(rng, size, int(rng.integers(3, 7)))
    img = mix(img, hi, smoothstep(0.55, 0.95, w) * (0.35 + 0.65 * mod))
    img = mix(img, deep * 0.7, smoothstep(-0.6, -1.0, w) * 0.5)
    return img


def _habitat_forest(rng, size, pal):
    y, x = unit_grid(size)
    dark, lightc, accent, trunk = (_jitter(rng, c) for c in pal)
    n1 = value_noise(rng, size, int(rng.integers(4, 8)))
    n2 = value_noise(rng, size, int(rng.integers(8, 13)))
    img = mix(np.broadcast_to(dark, (size, size, 3)).astype(np.float32), lightc, smoothstep(0.25, 0.75, n1))
    img = mix(img, accent, smoothstep(0.6, 0.8, n2))
    bark = 0.8 + 0.4 * value_noise(rng, size, 16)
    for _ in range(int(rng.integers(2, 6))):
        x0, half_w = rng.uniform(0.0, 1.0), rng.uniform(0.015, 0.045)
        tilt = rng.uniform(-0.12, 0.12)
        dist = (np.abs(x - x0 - tilt * (y - 0.5)) - half_w) * size  # pixels
        a = np.clip(0.5 - dist, 0.0, 1.0)
        img = img + a[..., None] * (trunk * bark[..., None] - img)
    return img


def _habitat_sky(rng, size, pal):
    y, x = unit_grid(size)
    top, horizon, cloud = (_jitter(rng, c) for c in pal)
    img = mix(np.broadcast_to(top, (size, size, 3)).astype(np.float32), horizon,
               np.clip(y * rng.uniform(0.8, 1.3) + rng.uniform(-0.2, 0.1), 0, 1))
    n = value_noise(rng, size, int(rng.integers(3, 6))) + 0.45 * value_noise(rng, size, int(rng.integers(8, 12)))
    th = rng.uniform(0.6, 0.9)
    img = mix(img, cloud, smoothstep(th, th + 0.3, n))
    return img


def _habitat_dunes(rng, size, pal):
    y, x = unit_grid(size)
    lightc, shadow = (_jitter(rng, c) for c in pal)
    h = y + rng.uniform(0.05, 0.12) * np.sin(2 * np.pi * (rng.uniform(0.6, 1.5) * x + rng.random()))
    h = h + rng.uniform(0.0, 0.05) * np.sin(2 * np.pi * (rng.uniform(2.0, 3.5) * x + rng.random()))
    shade = np.sin(2 * np.pi * (rng.uniform(2.0, 4.0) * h + rng.random()))
    img = mix(np.broadcast_to(shadow, (size, size, 3)).astype(np.float32), lightc, smoothstep(-0.4, 0.4, shade))
    ripple = np.sin(2 * np.pi * (rng.uniform(12.0, 20.0) * (h + 0.02 * x) + rng.random()))
    return img * (1.0 + rng.uniform(0.03, 0.08) * ripple)[..., None]


def _habitat_rock(rng, size, pal):
    y, x = unit_grid(size)
    stone, crack = (_jitter(rng, c) for c in pal)
    n = int(rng.integers(8, 17))
    sx, sy = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    d2 = (x[None] - sx[:, None, None]) ** 2 + (y[None] - sy[:, None, None]) ** 2  # (n, S, S)
    part = np.partition(d2, 1, axis=0)
    d1, d2nd = np.sqrt(part[0]), np.sqrt(part[1])
    nearest = np.argmin(d2, axis=0)
    shade = (1.0 + rng.uniform(-0.25, 0.25, n).astype(np.float32))[nearest]
    tint = (rng.normal(0.0, 0.04, (n, 3)).astype(np.float32))[nearest]
    grain = 0.85 + 0.3 * value_noise(rng, size, 12)
    img = np.clip(stone * (shade * grain)[..., None] + tint, 0.0, 1.0)
    edge = (d2nd - d1) * size  # pixels to the cell border (x2)
    return mix(img, crack, 1.0 - smoothstep(0.0, rng.uniform(1.0, 2.0), edge))


_FAMILY_FN = {"water": _habitat_water, "forest": _habitat_forest, "sky": _habitat_sky,
              "dunes": _habitat_dunes, "rock": _habitat_rock}


def render_habitat(habitat: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render habitat `habitat` (index into HABITATS): (S, S, 3) float32 in [0, 1]."""
    fam, pal = HABITAT_FAMILIES[habitat % 5], habitat // 5
    img = _FAMILY_FN[fam](rng, size, _PALETTES[fam][pal])
    img = img * rng.uniform(0.85, 1.15)
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.035), img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)


def pick_habitat(rng: np.random.Generator, home: int, p_home: float) -> int:
    """Home with probability p_home, else a uniformly random other habitat."""
    if rng.random() < p_home:
        return home
    other = int(rng.integers(0, len(HABITATS) - 1))
    return other + 1 if other >= home else other

