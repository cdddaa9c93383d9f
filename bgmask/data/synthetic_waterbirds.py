"""The standard Waterbirds protocol folder of the synthetic benchmark (`make-synthetic --waterbirds_splits`).

Sagawa et al. (2020) train, select and test on the Waterbirds folder's own splits (metadata.csv's
`split`: 0 = train, 1 = val, 2 = test), with a binary label `y` (1 = waterbird) and the background's
`place` (1 = water); the train split is correlated (P(place == y) = 0.95 in the real dataset), val and
test are balanced between places within each class, and results are reported per group 2 * y + place.

With the option on, the synthetic `waterbird_complete95_forest2water2` holds every CUB image, each with
the bird pixels and mask of its CUB image on a new background: CUB train images in split 0 or 1, CUB
test images in split 2. `y` is the place group of the species' home habitat (as in the test-only
folder), `place` the place group of the habitat the bird is pasted on. The CUB images themselves do not
change. The placement is exact, not sampled (`WaterbirdsSplits.plan`):

  * val: per species, n_val = floor(val_fraction * train_per_class + 1/2) of its train images go to
    split 1, the others to split 0;
  * split 0: of a species' n0 split-0 images, floor(correlation * n0 + 1/2) are on place == y, the
    others on place != y;
  * splits 1 and 2: per species n // 2 images on each place; when n is odd, the extra image goes to
    place 0 for the 1st, 3rd, ... odd-sized species of its class y (in species order) and to place 1
    for the 2nd, 4th, ..., so that each (split, y) is balanced between places up to one image;
  * which images get which split and place: permutations drawn per species from
    `np.random.default_rng([seed, 22, species, purpose])`; the habitat: uniform among the habitats of
    the place group, drawn from the image's own Waterbirds-choice stream (`bgmask.data.synthetic`).

`--waterbirds_correlation 0.5` gives the control folder without the shortcut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bgmask.data.habitats import HABITATS, PLACE_OF_HABITAT
from bgmask.errors import UserError

__all__ = ["WaterbirdsSplits", "habitat_in_place"]

TRAIN, VAL, TEST = 0, 1, 2
_PLAN_KEY = 22  # the plan's generators: [seed, _PLAN_KEY, species, purpose]; image streams have 5 entries
_VAL_DRAW = 3  # purpose of the val draw; the places of split s are drawn with purpose s


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)


@dataclass(frozen=True)
class WaterbirdsSplits:
    """The complete Waterbirds folder: the fraction of each species' train images in val (split 1) and
    P(place == y) in train (split 0)."""

    val_fraction: float = 0.2
    correlation: float = 0.95

    def config(self) -> dict:
        """Keys added to synthetic_config.json (only when the option is on)."""
        return {"waterbirds_splits": True, "waterbirds_val_fraction": float(self.val_fraction),
                "waterbirds_correlation": float(self.correlation)}

    def num_val(self, train_per_class: int) -> int:
        return _round_half_up(float(self.val_fraction) * train_per_class)

    def validate(self, train_per_class: int) -> None:
        if not _is_number(self.val_fraction) or not 0.0 < float(self.val_fraction) < 1.0:
            raise UserError(f"waterbirds_val_fraction must be a number in (0, 1), got {self.val_fraction!r}")
        if not _is_number(self.correlation) or not 0.0 <= float(self.correlation) <= 1.0:
            raise UserError(f"waterbirds_correlation must be a number in [0, 1], got {self.correlation!r}")
        n_val = self.num_val(train_per_class)
        if not 1 <= n_val < train_per_class:
            raise UserError(f"waterbirds_val_fraction {self.val_fraction:g} of train_per_class {train_per_class} "
                            f"gives {n_val} val images per species (expected at least 1 val and 1 train image per "
                            "species: change --waterbirds_val_fraction or raise --train_per_class)")

    def plan(self, homes: list[int], train_per_class: int, test_per_class: int,
             seed: int) -> dict[tuple[int, int], tuple[int, int]]:
        """(species index, image index j) -> (split, place) of every image; `homes` are the species'
        home habitats (image j < train_per_class is a CUB train image). The rule: module docstring."""
        out: dict[tuple[int, int], tuple[int, int]] = {}
        odd_seen = {(split, y): 0 for split in (VAL, TEST) for y in (0, 1)}
        n_val = self.num_val(train_per_class)
        for k, home in enumerate(homes):
            y = PLACE_OF_HABITAT[home]

            def rng(purpose, k=k):
                return np.random.default_rng([seed, _PLAN_KEY, k, purpose])

            order = rng(_VAL_DRAW).permutation(train_per_class)
            members = {TRAIN: sorted(order[n_val:].tolist()), VAL: sorted(order[:n_val].tolist()),
                       TEST: list(range(train_per_class, train_per_class + test_per_class))}
            n_same = _round_half_up(float(self.correlation) * len(members[TRAIN]))
            for split in (TRAIN, VAL, TEST):
                js = members[split]
                if split == TRAIN:
                    first, n_first = y, n_same  # place == y for n_same images, the others on 1 - y
                else:
                    first, n_first = 0, len(js) // 2
                    if len(js) % 2:
                        extra_place = odd_seen[split, y] % 2
                        odd_seen[split, y] += 1
                        n_first += extra_place == 0
                picked = rng(split).permutation(len(js))
                for rank, pos in enumerate(picked):
                    out[k, js[pos]] = split, first if rank < n_first else 1 - first
        return out


def habitat_in_place(rng: np.random.Generator, place: int) -> int:
    """A habitat drawn uniformly among those of place group `place`."""
    choices = [h for h in range(len(HABITATS)) if PLACE_OF_HABITAT[h] == place]
    return choices[int(rng.integers(0, len(choices)))]
