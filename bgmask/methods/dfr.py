"""Deep Feature Reweighting (Kirichenko, Izmailov and Wilson, ICLR 2023, "Last Layer Re-Training is
Sufficient for Robustness to Spurious Correlations"), the variant DFR^Tr_Val: the last layer of a
trained model is fitted again, on group-balanced validation embeddings (the features entering the last
linear layer: `bgmask.methods.features.embed`).

`dfr_fit(val_x, val_y, val_g)` follows the reference (`dfr_evaluate_spurious.py`):
  1. standardise: scikit-learn's StandardScaler fitted on all validation embeddings (the reference fits
     its final scaler on them; here the same scaler also serves the tuning step);
  2. tune C: the validation set is split in two halves, stratified by group (each group's samples in a
     seeded permutation; the first half of each gets the ceiling of half); for each C of the grid an
     L1-regularised logistic regression (liblinear, the reference's solver) is fitted on a group-balanced
     subset of the first half (every group subsampled without replacement to the size of the smallest)
     and scored by worst-group accuracy on the second half; the best C wins, ties to the first in the grid;
  3. final: `n_retrains` fits with that C, each on a fresh group-balanced subset of the whole validation
     set; their coef_ and intercept_ are averaged into one linear model.
Randomness comes from `seed` alone: the split from numpy's default_rng([seed, 0]), the tuning subset from
default_rng([seed, 1]), retrain r's subset from default_rng([seed, 2, r]), and liblinear's own shuffling
from random_state=seed. The L1 penalty is written `l1_ratio=1.0` (scikit-learn >= 1.8 deprecates
`penalty="l1"`; it is the same model). liblinear fits binary labels only, as the Waterbirds task is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bgmask.errors import UserError, require_package
from bgmask.eval import group_accuracies, split_metrics
from bgmask.methods.base import Flag, Method, register_method

C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # the reference's C_OPTIONS


@dataclass
class DFRModel:
    """The averaged last layer: standardisation (mean, scale) (D,), coef (1, D), intercept (1,), the
    class labels (2,), the chosen C and the tuning table (one row per C of the grid)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    C: float
    tuning: list[dict] = field(default_factory=list)

    def decision(self, x) -> np.ndarray:
        """Scores (N,) of the second class: (x - mean) / scale @ coef.T + intercept."""
        z = (_features(x, "DFR input") - self.mean) / self.scale
        if z.shape[1] != self.coef.shape[1]:
            raise UserError(f"DFR was fitted on {self.coef.shape[1]}-d embeddings, got {z.shape[1]}-d")
        return (z @ self.coef.T + self.intercept)[:, 0]

    def predict(self, x) -> np.ndarray:
        """Class labels (N,), as scikit-learn's binary LogisticRegression.predict: the second class where
        the score is positive."""
        return self.classes[(self.decision(x) > 0).astype(np.int64)]

    def to_dict(self) -> dict:
        return {"C": self.C, "coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "classes": self.classes.tolist(),
                "tuning": self.tuning}


def _features(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0 or not np.isfinite(x).all():
        raise UserError(f"{what}: embeddings must be a finite (N, D) array with N >= 1, got shape {x.shape}")
    return x


def check_split(x, y, g, n_groups: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x float64 (N, D), y (N,), g int64 (N,)); bad shapes, a sample without a group in [0, n_groups) or
    a group without samples are one UserError."""
    x, y, g = _features(x, what), np.asarray(y), np.asarray(g)
    if y.shape != (len(x),) or g.shape != (len(x),):
        raise UserError(f"{what}: {len(x)} embeddings but labels of shape {y.shape} and groups of shape {g.shape}")
    if not np.issubdtype(g.dtype, np.integer) or ((g < 0) | (g >= n_groups)).any():
        raise UserError(f"{what}: every sample needs a group id in [0, {n_groups}) (Waterbirds groups)")
    sizes = np.bincount(g, minlength=n_groups)
    if (sizes == 0).any():
        raise UserError(f"{what} has no sample of group(s) {np.flatnonzero(sizes == 0).tolist()}; DFR balances "
                        f"the {n_groups} groups and needs every one")
    return x, y, g.astype(np.int64)


def balanced_subset(g: np.ndarray, pool: np.ndarray, rng: np.random.Generator, n_groups: int) -> np.ndarray:
    """Indices from `pool` with every group subsampled without replacement to the smallest group's size
    in the pool, in group order: rng.choice(members of group k, size, replace=False) for k = 0, 1, ..."""
    members = [pool[g[pool] == k] for k in range(n_groups)]
    size = min(len(m) for m in members)
    return np.concatenate([rng.choice(m, size, replace=False) for m in members])


def tuning_halves(g: np.ndarray, seed: int, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit half, score half) of the indices, stratified by group: each group's indices in a permutation
    from default_rng([seed, 0]) (groups in order), the first ceil(n / 2) to the fit half."""
    rng = np.random.default_rng([seed, 0])
    fit, score = [], []
    for k in range(n_groups):
        perm = rng.permutation(np.flatnonzero(g == k))
        if len(perm) < 2:
            raise UserError(f"DFR's tuning splits the validation set in two halves; group {k} has {len(perm)} "
                            "sample(s), it needs 2 or more")
        cut = len(perm) - len(perm) // 2
        fit.append(perm[:cut])
        score.append(perm[cut:])
    return np.concatenate(fit), np.concatenate(score)


def check_options(c_grid, n_retrains: int, seed: int) -> None:
    """DFR's settings: a non-empty grid of C > 0, n_retrains >= 1 and seed >= 0, else one UserError."""
    if not c_grid or any(not (c > 0 and np.isfinite(c)) for c in c_grid) or n_retrains < 1 or seed < 0:
        raise UserError(f"DFR needs a non-empty --dfr_c_grid of values > 0, --dfr_retrains >= 1 and --dfr_seed "
                        f">= 0; got {list(c_grid)}, {n_retrains}, {seed}")


def logistic_regression(C: float, seed: int):
    """The reference's classifier: L1-regularised logistic regression, liblinear."""
    require_package("sklearn", "DFR (--method dfr)", "dfr")
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", random_state=seed)


def tune_c(z, y, g, c_grid, seed: int, n_groups: int) -> tuple[float, list[dict]]:
    """The C of the grid with the best worst-group accuracy on the score half (ties: the first), and the
    table of every C's scores."""
    fit, score = tuning_halves(g, seed, n_groups)
    sub = balanced_subset(g, fit, np.random.default_rng([seed, 1]), n_groups)
    table = []
    for C in c_grid:
        pred = logistic_regression(C, seed).fit(z[sub], y[sub]).predict(z[score])
        table.append({"C": float(C), "worst_group_acc": min(group_accuracies(pred, y[score], g[score]).values()),
                      "acc": float(np.mean(pred == y[score]))})
    best = int(np.argmax([row["worst_group_acc"] for row in table]))
    return float(c_grid[best]), table


def dfr_fit(val_x, val_y, val_g, *, c_grid=C_GRID, n_retrains: int = 10, seed: int = 0,
            n_groups: int = 4) -> DFRModel:
    """DFR^Tr_Val on validation embeddings (N, D), labels (N,) and groups (N,): see the module docstring."""
    require_package("sklearn", "DFR (--method dfr)", "dfr")
    from sklearn.preprocessing import StandardScaler

    check_options(c_grid, n_retrains, seed)
    x, y, g = check_split(val_x, val_y, val_g, n_groups, "the DFR validation set")
    if len(np.unique(y)) != 2:
        raise UserError(f"DFR fits binary labels (liblinear, as the reference); the validation set has "
                        f"{len(np.unique(y))} classes")
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    C, table = tune_c(z, y, g, c_grid, seed, n_groups)
    coefs, intercepts, classes = [], [], None
    for r in range(n_retrains):
        sub = balanced_subset(g, np.arange(len(g)), np.random.default_rng([seed, 2, r]), n_groups)
        clf = logistic_regression(C, seed).fit(z[sub], y[sub])
        coefs.append(clf.coef_)
        intercepts.append(clf.intercept_)
        classes = clf.classes_
    return DFRModel(scaler.mean_.copy(), scaler.scale_.copy(), np.mean(coefs, axis=0), np.mean(intercepts, axis=0),
                    np.asarray(classes), C, table)


def dfr_evaluate(model: DFRModel, x, y, g, prefix: str = "dfr_test") -> dict[str, float]:
    """Accuracy, per-group, mean-group and worst-group accuracy of the DFR model's predictions, keyed
    `prefix/acc`, `prefix/group_<g>_acc`, `prefix/worst_group_acc`, `prefix/mean_group_acc` (groups < 0
    are left out of the group metrics, as `bgmask.eval.split_metrics` does)."""
    x, y, g = _features(x, "the DFR evaluation set"), np.asarray(y), np.asarray(g)
    if y.shape != (len(x),) or g.shape != (len(x),):
        raise UserError(f"the DFR evaluation set: {len(x)} embeddings but labels of shape {y.shape} and groups "
                        f"of shape {g.shape}")
    return split_metrics({"pred": model.predict(x), "label": y, "group": g}, prefix)


@register_method("dfr")
class DFR(Method):
    """Post-hoc last-layer retraining on group-balanced validation embeddings (`dfr_fit`); it has no
    training loss: train the base model with ERM, then apply DFR to its checkpoint."""

    label = "DFR"
    needs_groups = True
    post_hoc = True
    flags = (
        Flag("dfr_c_grid", "c_grid", float, C_GRID, "DFR: the inverse L1 strengths C tried on the tuning half "
             "of the validation set (the reference's grid)", range="(0, inf)", nargs="+"),
        Flag("dfr_retrains", "n_retrains", int, 10, "DFR: logistic regressions fitted on fresh group-balanced "
             "validation subsets and averaged", range="[1, 1000]"),
        Flag("dfr_seed", "seed", int, 0, "DFR: seed of the validation split, the balanced subsets and "
             "liblinear", range="[0, 4294967295]"),
    )

    def __init__(self, c_grid=C_GRID, n_retrains: int = 10, seed: int = 0, n_groups: int = 4):
        check_options(c_grid, n_retrains, seed)
        self.c_grid, self.n_retrains, self.seed, self.n_groups = tuple(c_grid), n_retrains, seed, n_groups

    @classmethod
    def check(cls, cfg) -> None:
        require_package("sklearn", "--method dfr", "dfr")

    def fit(self, val_x, val_y, val_g) -> DFRModel:
        return dfr_fit(val_x, val_y, val_g, c_grid=self.c_grid, n_retrains=self.n_retrains, seed=self.seed,
                       n_groups=self.n_groups)

    def evaluate(self, model: DFRModel, x, y, g, prefix: str = "dfr_test") -> dict[str, float]:
        return dfr_evaluate(model, x, y, g, prefix)
