"""The mask-quality sweep's picture: Waterbirds and worst-group accuracy against the masks' mIoU."""

from __future__ import annotations

from pathlib import Path

MARKERS = ("s", "^", "v", "D", "P", "X", "<", ">", "h")  # "o" is the GT point
PANELS = (("waterbirds/acc", "Waterbirds accuracy (%)"), ("waterbirds/worst_group_acc", "worst-group accuracy (%)"))


def _curves(rows: list[dict], combo: str) -> dict[str, list[tuple[float, dict]]]:
    """Per perturbation, its points (mIoU %, cell) from the GT point on, in order of strength."""
    gt = [(100 * r["miou"], r["results"][combo]) for r in rows if r["perturbation"] == "none" and combo in r["results"]]
    out: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r["strength"] or 0):
        if r["perturbation"] not in ("none", "segmenter") and combo in r["results"]:
            out.setdefault(r["perturbation"], list(gt)).append((100 * r["miou"], r["results"][combo]))
    return out


def _panel(ax, rows: list[dict], key: str, colors: dict, markers: dict) -> None:
    for combo, color in colors.items():
        for name, pts in _curves(rows, combo).items():
            ax.plot([x for x, _ in pts], [100 * c[key] for _, c in pts], "-", marker=markers[name], color=color,
                    lw=1.2, ms=4.5, alpha=0.85)
        for r in rows:
            if r["perturbation"] in ("none", "segmenter") and combo in r["results"]:
                star = r["perturbation"] == "segmenter"
                ax.plot(100 * r["miou"], 100 * r["results"][combo][key], "*" if star else "o", color=color,
                        ms=15 if star else 6, mec="black", mew=0.8, zorder=5)
    ax.set_xlabel("mask mIoU vs GT (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)


def sweep_plot(rows: list[dict], path: Path) -> Path:
    """One row of two panels (Waterbirds accuracy, worst-group accuracy against mIoU) per mode. Colour:
    backbone/strategy; marker: perturbation, each a line from the GT point (black-edged circle at mIoU
    100) through its strengths; black-edged stars: the segmenter's masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    modes = list(dict.fromkeys(r["perturb_at"] for r in rows))
    combos = list(dict.fromkeys(c for r in rows for c in r["results"]))
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(combos)}
    names = list(dict.fromkeys(r["perturbation"] for r in rows if r["perturbation"] not in ("none", "segmenter")))
    markers = {n: MARKERS[i % len(MARKERS)] for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.9 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        sub = [r for r in rows if r["perturb_at"] == mode]
        for j, (key, label) in enumerate(PANELS):
            _panel(axes[i, j], sub, key, colors, markers)
            axes[i, j].set_ylabel(label)
            axes[i, j].set_title(f"perturbed at {mode}", fontsize=9)
    handles = [Line2D([], [], color=c, lw=2, label=combo) for combo, c in colors.items()]
    handles += [Line2D([], [], color="grey", marker=markers[n], ls="-", label=n) for n in names]
    if any(r["perturbation"] == "segmenter" for r in rows):
        handles.append(Line2D([], [], color="grey", marker="*", ms=12, mec="black", ls="", label="segmenter"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle("Accuracy against mask quality (perturbed GT masks)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) > 6), 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
