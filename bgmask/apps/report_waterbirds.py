"""`bgmask report --protocol waterbirds RUN_DIR...`: the table of runs under the standard Waterbirds protocol.

One row per (model, method, strategy, masks, data), the seeds of a row averaged (mean ± std, the
population std over seeds as `bgmask report`): worst-group, mean-group, test and weighted ("average")
accuracy on the Waterbirds folder's test split. `data` is the train split's P(place = y), counted from
the folder's metadata.csv (0.95 for the real Waterbirds and the shortcut folder, 0.5 for the control).
A DFR run folder (`bgmask dfr`) is one row of method DFR on its base run's strategy.

Writes STEM.md, STEM.csv, STEM.json and STEM.png (worst- and mean-group accuracy per row, std error bars).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bgmask.apps.report import Row, Unreadable, describe_run, read_finished, report_skipped, write_records
from bgmask.data.cub import WATERBIRDS_SUBDIR
from bgmask.errors import UserError
from bgmask.io import atomic_write_text

METRICS = (("test/worst_group_acc", "worst-group acc"), ("test/mean_group_acc", "mean-group acc"),
           ("test/acc", "test acc"), ("test/weighted_acc", "weighted acc"))
KEY_FIELDS = ("model", "method", "strategy", "masks", "data")
HEAD = {"data": "train P(place = y)"}


def train_correlation(cfg: dict, cache: dict) -> str:
    """The train split's share of images on the place of their label, from the Waterbirds folder's metadata."""
    from bgmask.data import WaterbirdsDataset

    where = (str(cfg.get("data_path")), str(cfg.get("image_sub_path_test", WATERBIRDS_SUBDIR)))
    if where not in cache:
        try:
            counts = WaterbirdsDataset(where[0], "train", image_subdir=where[1], check_files=False).group_counts()
        except UserError as e:
            raise Unreadable(f"{where[0]}/{where[1]}: {e}") from None
        cache[where] = f"{(counts[0] + counts[3]) / max(1, counts.sum()):.2f}"  # groups 2y + place: 0 and 3 on y's place
    return cache[where]


def protocol_key(cfg: dict, cache: dict) -> dict:
    """The row key of a protocol run: `describe_run`'s model, strategy and masks, the method's label and the data."""
    from bgmask.methods import METHODS

    if cfg.get("protocol") != "waterbirds":
        raise Unreadable(f"{cfg.get('snapshot_dir')} was not run under --protocol waterbirds")
    base = describe_run(cfg)
    method = str(cfg.get("method", "erm"))
    label = METHODS[method].label if method in METHODS else method
    return {"model": base["model"].removeprefix("bgmask_"), "method": label, "strategy": base["strategy"],
            "masks": base["masks"], "data": train_correlation(cfg, cache)}


def load_protocol_runs(run_dirs, skipped: list) -> list[Row]:
    """The rows of the readable protocol run folders, in the order first seen; the others in `skipped`."""
    rows: dict[tuple, Row] = {}
    cache: dict = {}
    for d in map(Path, run_dirs):
        try:
            cfg, metrics = read_finished(d)
            key = protocol_key({**cfg, "snapshot_dir": str(d)}, cache)
        except Unreadable as e:
            skipped.append((str(d), str(e)))
            continue
        row = rows.setdefault(tuple(key.values()), Row(key))
        row.runs.append(str(d))
        for metric, _ in METRICS:
            if isinstance(metrics.get(metric), (int, float)):
                row.values.setdefault(metric, []).append(float(metrics[metric]))
    if not rows:
        raise UserError("no Waterbirds-protocol run folder can be read" +
                        (": " + "; ".join(r for _, r in skipped) if skipped else " (none given)"))
    return list(rows.values())


def cell(row: Row, metric: str) -> str:
    stat = row.stat(metric)
    return "–" if stat is None else f"{100 * stat[0]:.1f} ± {100 * stat[1]:.1f}"


def protocol_table(rows: list[Row]) -> str:
    head = [HEAD.get(k, k) for k in KEY_FIELDS] + ["seeds"] + [name for _, name in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(KEY_FIELDS) + "---:|" * (1 + len(METRICS))]
    for r in rows:
        lines.append("| " + " | ".join([r.key[k] for k in KEY_FIELDS] + [str(len(r.runs))]
                                        + [cell(r, m) for m, _ in METRICS]) + " |")
    return ("\n".join(lines) + "\n\nAccuracies on the Waterbirds test split (%), mean ± std over seeds (population "
            "std). Weighted = per-group accuracies weighted by the train split's group sizes (the published "
            "'average'); train P(place = y) = the train split's share of birds on the background of their label.\n")


def records(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        rec = {**r.key, "seeds": len(r.runs), "runs": list(r.runs)}
        for m, _ in METRICS:
            stat = r.stat(m)
            rec[m], rec[m + "_std"] = (None, None) if stat is None else stat
        out.append(rec)
    return out


def protocol_bars(rows: list[Row], path: Path) -> None:
    """Worst-group and mean-group accuracy per row, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows)), 4.6))
    for off, (metric, name, colour) in zip((-0.2, 0.2), (("test/worst_group_acc", "worst group", "#C44E52"),
                                                         ("test/mean_group_acc", "mean over groups", "#4C72B0"))):
        stats = [r.stat(metric) or (np.nan, 0.0) for r in rows]
        ax.bar(x + off, [100 * s[0] for s in stats], 0.4, yerr=[100 * s[1] for s in stats], label=name,
               color=colour, capsize=3)
    labels = [f"{r.key['method']}\n{r.key['strategy']}{' [' + r.key['masks'] + ']' if r.key['masks'] != '-' else ''}"
              f"\nP(place=y) {r.key['data']}" for r in rows]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("Waterbirds test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.set_title("Waterbirds protocol: worst-group and mean-group accuracy (mean ± std over seeds)", pad=22,
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_waterbirds_report(run_dirs, out_dir: str | Path, title: str = "Waterbirds protocol",
                            stem: str = "waterbirds") -> dict[str, Path]:
    """OUT/STEM.md, .csv, .json and .png of the readable protocol runs (the others listed under "Skipped",
    with a note on stderr); none readable is one UserError."""
    out_dir = Path(out_dir)
    skipped: list[tuple[str, str]] = []
    rows = load_protocol_runs(run_dirs, skipped)
    skipped_md = report_skipped(skipped)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "json", "png")}
    md = f"# {title}\n\n" + protocol_table(rows) + f"\n![worst and mean group]({paths['png'].name})\n" + skipped_md
    atomic_write_text(paths["md"], md)
    write_records(records(rows), paths["csv"], paths["json"])
    protocol_bars(rows, paths["png"])
    return paths
