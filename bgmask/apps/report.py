"""`bgmask report RUN_DIR...`: aggregate run folders into one table (mean ± std over seeds) and plots.

A run folder is what `train.py` writes: config.yaml + final_metrics.json. Rows are keyed by
(model, strategy, mask source, initialisation); several seeds of the same key are averaged. The
attribution columns (`OPTIONAL_COLUMNS`) appear when some run has them: from train.py's final metrics,
or from the run's latest evaluation line in results.jsonl (eval_waterbirds.py), which wins.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from bgmask.errors import UserError
from bgmask.io import atomic_write_text
from bgmask.masking.strategies import STRATEGIES, EarlyMasking

COLUMNS = [
    ("test/acc", "in-dist. acc"),
    ("waterbirds/acc", "Waterbirds acc"),
    ("waterbirds/drop", "drop"),
    ("waterbirds/worst_group_acc", "worst-group acc"),
    ("diag/bg_only_acc", "BG-only acc"),
    ("diag/bg_gap", "BG-gap"),
]
OPTIONAL_COLUMNS = [
    ("test/attr_bg_fraction", "BG attribution (test)"),
    ("waterbirds/attr_bg_fraction", "BG attribution (Waterbirds)"),
]
KEY_FIELDS = ("model", "strategy", "masks", "init")


def describe_run(cfg: dict) -> dict[str, str]:
    """The row key of a run, from its resolved config."""
    strategy = str(cfg.get("strategy", "baseline"))
    needs_mask = strategy in STRATEGIES and STRATEGIES[strategy].needs_mask
    masks = "-"
    root = Path(cfg.get("data_path") or ".")
    sub = cfg.get("image_sub_path_train", "images")
    provenance = root / sub / "masked_copy.json"
    if sub != "images" and provenance.is_file():
        info = read_mapping(provenance)
        strategy = strategy if needs_mask else f"{EarlyMasking.name} (copies)"  # masked on disk
        masks = "GT" if info.get("masks") == "gt" else "predicted"
    elif needs_mask:
        masks = "GT" if cfg.get("mask_source", "gt") == "gt" else "predicted"
    if cfg.get("pretrained_file") or cfg.get("pretrained"):
        init = "pretrained, frozen" if cfg.get("freeze_backbone") else "pretrained, fine-tuned"
    else:
        init = "scratch"
    model = str(cfg.get("model_arch", "?"))
    if cfg.get("class_token_only"):
        model += " (CLS)"
    elif cfg.get("patch_tokens_only"):
        model += " (GAP)"
    elif "vit" in model.lower():
        model += " (CLS+GAP)"  # a ViT with neither flag: the paper's default head on both
    return {"model": model, "strategy": strategy, "masks": masks, "init": init}


def with_method(key: dict, cfg: dict) -> dict:
    """The row key with a method other than ERM named after the strategy (`baseline + GroupDRO`), so that
    runs of different methods are never averaged into one row."""
    from bgmask.methods import ERM, METHODS

    method = str(cfg.get("method", ERM.name))
    if method == ERM.name:
        return key
    return {**key, "strategy": f"{key['strategy']} + {METHODS[method].label if method in METHODS else method}"}


@dataclass
class Row:
    key: dict
    runs: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    num_classes: set = field(default_factory=set)  # from final_metrics.json (absent in older runs)

    def stat(self, metric: str) -> tuple[float, float] | None:
        vals = self.values.get(metric)
        if not vals:
            return None
        return float(np.mean(vals)), float(np.std(vals)) if len(vals) > 1 else 0.0


class Unreadable(Exception):
    """A run folder that cannot be reported: the reason, naming the file."""


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise Unreadable(f"cannot read {path}: {e.strerror or e}") from None


def read_mapping(path: Path) -> dict:
    """The mapping in a YAML (config.yaml) or JSON file; anything else is Unreadable naming the file."""
    text = read_text(path)
    if path.suffix == ".json":
        try:
            value = json.loads(text)
        except ValueError as e:
            raise Unreadable(f"{path} is not valid JSON ({getattr(e, 'msg', e)} at line {getattr(e, 'lineno', '?')})") \
                from None
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise Unreadable(f"{path} is not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise Unreadable(f"{path} does not hold a mapping (got {type(value).__name__})")
    return value


def read_finished(d: Path) -> tuple[dict, dict]:
    """(config.yaml, final_metrics.json) of a finished run folder, or Unreadable naming what is missing."""
    cfg_file, metrics_file = d / "config.yaml", d / "final_metrics.json"
    if not cfg_file.is_file() or not metrics_file.is_file():
        raise Unreadable(f"{d} is not a finished run folder (expected config.yaml and final_metrics.json)")
    return read_mapping(cfg_file), read_mapping(metrics_file)


def read_run(d: Path) -> tuple[dict, dict]:
    """(row key, metrics) of one finished run folder, or Unreadable naming the file at fault."""
    cfg_file, metrics_file = d / "config.yaml", d / "final_metrics.json"
    cfg, final = read_finished(d)
    metrics = {**final, **latest_evaluation(d)}  # a later evaluation wins
    try:
        key = with_method(describe_run(cfg), cfg)
    except (TypeError, ValueError) as e:  # e.g. a list where the file should name a model
        raise Unreadable(f"{cfg_file} holds a value of the wrong type ({e})") from None
    for metric, _ in COLUMNS + OPTIONAL_COLUMNS + [("num_classes", "")]:
        value = metrics.get(metric)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise Unreadable(f"{metrics_file}: {metric} is {value!r}, not a number")
    return key, metrics


def load_runs(run_dirs, skipped: list | None = None) -> list[Row]:
    """The rows of the readable run folders. A folder that cannot be read is added to `skipped` as
    (folder, reason) when a list is given, else (or when none can be read) one UserError."""
    rows: dict[tuple, Row] = {}
    skipped = [] if skipped is None else skipped
    strict = skipped is None
    for d in run_dirs:
        d = Path(d)
        try:
            key, metrics = read_run(d)
        except Unreadable as e:
            skipped.append((str(d), str(e)))
            continue
        row = rows.setdefault(tuple(key.values()), Row(key))
        row.runs.append(str(d))
        if "num_classes" in metrics:
            row.num_classes.add(int(metrics["num_classes"]))
        for metric, _ in COLUMNS + OPTIONAL_COLUMNS:
            if metric in metrics:
                row.values.setdefault(metric, []).append(float(metrics[metric]))
    if not rows and skipped:
        raise UserError("no run folder can be read: " + "; ".join(reason for _, reason in skipped))
    if strict and skipped:
        raise UserError(skipped[0][1])
    if not rows:
        raise UserError("no run folders given")
    return list(rows.values())


def latest_evaluation(run_dir: Path) -> dict:
    """The attribution metrics of the run's last `split: "eval"` line in results.jsonl ({} if none)."""
    from bgmask.runfolder import EVAL_SPLIT, RESULTS

    found = {}
    path = run_dir / RESULTS
    try:
        text = path.read_bytes().decode("utf-8", errors="replace") if path.is_file() else ""
    except OSError as e:
        raise Unreadable(f"cannot read {path}: {e.strerror or e}") from None
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a torn line of a killed writer (or bytes that are no text)
            continue
        if isinstance(rec, dict) and rec.get("split") == EVAL_SPLIT:
            found = {k: rec[k] for k, _ in OPTIONAL_COLUMNS if isinstance(rec.get(k), (int, float))}
    return found


def shown_columns(rows: list[Row]) -> list[tuple[str, str]]:
    """COLUMNS, plus each optional column that some row has a value for."""
    return COLUMNS + [(m, name) for m, name in OPTIONAL_COLUMNS if any(r.values.get(m) for r in rows)]


def _fmt(stat, n) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def markdown_table(rows: list[Row]) -> str:
    columns = shown_columns(rows)
    head = ["model", "strategy", "masks", "init", "seeds"] + [name for _, name in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = len(r.runs)
        cells = [r.key[k] for k in KEY_FIELDS] + [str(n)] + [_fmt(r.stat(m), n) for m, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    note = "Accuracies in %; BG-gap = mixed-same − mixed-rand accuracy (points)."
    if len(columns) > len(COLUMNS):
        note += " BG attribution = share of the positive input × gradient attribution on GT background (%)."
    return "\n".join(lines) + "\n\n" + note + "\n"


def rows_as_records(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        rec = dict(r.key)
        rec["seeds"] = len(r.runs)
        rec["runs"] = r.runs
        for m, _ in shown_columns(rows):
            s = r.stat(m)
            rec[m] = None if s is None else s[0]
            rec[m + "_std"] = None if s is None else s[1]
        out.append(rec)
    return out


def chance_level(rows: list[Row]) -> float | None:
    """1 / num_classes when every row's runs have the same number of classes, else None."""
    classes = set().union(*(r.num_classes for r in rows))
    if len(classes) != 1 or not all(r.num_classes for r in rows):
        return None
    return 1.0 / classes.pop()


def bar_chart(rows: list[Row], path: Path) -> None:
    """In-distribution vs Waterbirds accuracy per row (error bars = std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.key['model'].removeprefix('bgmask_')}\n{r.key['strategy']} [{r.key['masks']}]\n{r.key['init']}"
              for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.8))
    for off, (metric, name, color) in zip((-0.2, 0.2), (("test/acc", "in distribution (CUB test)", "#4C72B0"),
                                                         ("waterbirds/acc", "out of distribution (Waterbirds)", "#DD8452"))):
        stats = [r.stat(metric) or (np.nan, 0.0) for r in rows]
        ax.bar(x + off, [100 * s[0] for s in stats], 0.4, yerr=[100 * s[1] for s in stats], label=name, color=color,
               capsize=3)
    ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    chance = chance_level(rows)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", lw=0.5, ls=":", label="chance")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    ax.set_title("Background bias: accuracy in and out of distribution", pad=22)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------ the paper's table layout

PAPER_METRICS = (("test/acc", "in-dist."), ("waterbirds/acc", "WB"), ("waterbirds/worst_group_acc", "worst"))


def strategy_label(key: dict) -> str:
    return key["strategy"] if key["masks"] == "-" else f"{key['strategy']} ({key['masks']})"


def paper_layout(rows: list[Row]) -> tuple[list[tuple[str, str]], list[str], dict]:
    """Rows = (backbone with head, init), columns = strategy (masks), as the paper's tables; cells -> Row."""
    lines, strategies, cells = [], [], {}
    for r in rows:
        line, col = (r.key["model"].removeprefix("bgmask_"), r.key["init"]), strategy_label(r.key)
        lines += [line] if line not in lines else []
        strategies += [col] if col not in strategies else []
        cells[line, col] = r
    order = {name: i for i, name in enumerate(STRATEGIES)}
    strategies.sort(key=lambda c: (order.get(c.split(" ")[0], len(order)), c))
    return lines, strategies, cells


def paper_table(rows: list[Row]) -> str:
    """The paper-style pivot: one line per backbone x head x init, strategy x (in-distribution, Waterbirds,
    worst group) across; the best value of each column in bold."""
    lines, strategies, cells = paper_layout(rows)
    cols = [(st, m, name) for st in strategies for m, name in PAPER_METRICS]
    best = {}
    for st, m, _ in cols:
        vals = [cells[ln, st].stat(m)[0] for ln in lines if (ln, st) in cells and cells[ln, st].stat(m)]
        best[st, m] = max(vals) if vals else None
    head = ["backbone", "init"] + [f"{st}: {name}" for st, _, name in cols]
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(cols)]
    for ln in lines:
        cells_txt = []
        for st, m, _ in cols:
            r = cells.get((ln, st))
            stat = r.stat(m) if r else None
            txt = _fmt(stat, len(r.runs)) if r else "–"
            bold = stat is not None and best[st, m] is not None and abs(stat[0] - best[st, m]) < 1e-12
            cells_txt.append(f"**{txt}**" if bold else txt)
        out.append("| " + " | ".join([ln[0], ln[1], *cells_txt]) + " |")
    return "\n".join(out) + "\n\nIn-dist. = CUB test, WB = Waterbirds, worst = Waterbirds worst group (%); best per column in bold.\n"


def paper_bars(rows: list[Row], path: Path) -> None:
    """Waterbirds and worst-group accuracy, grouped as the paper's table: one group per backbone x init,
    one bar per strategy (error bars = std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, strategies, cells = paper_layout(rows)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(lines) * 2), 4.6), sharey=True)
    width = 0.8 / max(1, len(strategies))
    x = np.arange(len(lines))
    colours = plt.get_cmap("tab10")
    for ax, (metric, title) in zip(axes, (("waterbirds/acc", "Waterbirds accuracy"),
                                          ("waterbirds/worst_group_acc", "Waterbirds worst-group accuracy"))):
        for k, st in enumerate(strategies):
            stats = [cells[ln, st].stat(metric) if (ln, st) in cells else None for ln in lines]
            ax.bar(x - 0.4 + width * (k + 0.5), [100 * s[0] if s else np.nan for s in stats], width,
                   yerr=[100 * s[1] if s else 0 for s in stats], label=st, color=colours(k), capsize=2)
        ax.set_xticks(x, [f"{m}\n{i}" for m, i in lines], fontsize=7, rotation=20, ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, frameon=False, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_skipped(skipped: list[tuple[str, str]]) -> str:
    """A note on stderr for each run folder left out, and the report's "Skipped" section ("" if none)."""
    for run, reason in skipped:
        print(f"note: skipped {run}: {reason}", file=sys.stderr)
    if not skipped:
        return ""
    return "\n## Skipped\n\n" + "".join(f"- `{run}`: {reason}\n" for run, reason in skipped)


def write_records(records: list[dict], csv_path: Path, json_path: Path) -> None:
    """The report's rows as CSV (a row's run folders joined by ';') and as JSON."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0].keys()))
    writer.writeheader()
    for rec in records:
        writer.writerow({**rec, "runs": ";".join(rec["runs"])})
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(json_path, json.dumps(records, indent=2))


def write_report(run_dirs, out_dir: str | Path, title: str = "Results") -> dict[str, Path]:
    """The report of the readable run folders; one that cannot be read is listed under "Skipped" with
    its reason (and a note on stderr), none readable is one UserError."""
    out_dir = Path(out_dir)
    skipped: list[tuple[str, str]] = []
    rows = load_runs(run_dirs, skipped)  # before anything is written: no readable run leaves no empty report
    skipped_md = report_skipped(skipped)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: tuple(r.key[k] for k in KEY_FIELDS))
    md = (f"# {title}\n\n## As the paper's tables\n\n" + paper_table(rows) + "\n![paper layout](paper_bars.png)\n\n"
          "## Every row\n\n" + markdown_table(rows) + "\n![accuracy](accuracy_bars.png)\n" + skipped_md)
    paths = {"md": out_dir / "results.md", "csv": out_dir / "results.csv", "json": out_dir / "results.json",
             "bars": out_dir / "accuracy_bars.png", "paper_bars": out_dir / "paper_bars.png"}
    atomic_write_text(paths["md"], md)
    write_records(rows_as_records(rows), paths["csv"], paths["json"])
    bar_chart(rows, paths["bars"])
    paper_bars(rows, paths["paper_bars"])
    return paths
