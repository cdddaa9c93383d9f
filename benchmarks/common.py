"""What every benchmark script shares: the row format, ratios and goals, peak memory, the table.

A row is one measured figure: images/s over `seconds`, the peak memory while it ran, and (after
`resolve`) its ratio against the reference row of the same model measured in the same run.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

COLUMNS = ("section", "model", "row", "images_per_s", "seconds", "peak_mem_mib", "ratio", "vs", "goal", "met")


def make_row(section: str, model: str, name: str, images: int, seconds: float, peak_mem_mib: float | None,
             ref: str | None = None, goal: float | None = None, goal_kind: str = "ratio") -> dict:
    """`ref`: name of the row (same section and model, or `section:name`) this one is divided by.
    `goal`: the least acceptable ratio (goal_kind 'ratio') or images/s (goal_kind 'rate')."""
    return {"section": section, "model": model, "row": name, "images": int(images), "seconds": float(seconds),
            "images_per_s": images / seconds if seconds > 0 else float("nan"), "peak_mem_mib": peak_mem_mib,
            "ref": ref, "goal": goal, "goal_kind": goal_kind}


def resolve(rows: list[dict]) -> list[dict]:
    """Fill ratio / vs / met from each row's reference and goal."""
    by_key = {(r["section"], r["model"], r["row"]): r for r in rows}
    for r in rows:
        r["ratio"], r["vs"], r["met"] = None, None, None
        if r.get("ref"):
            section, name = r["ref"].split(":", 1) if ":" in r["ref"] else (r["section"], r["ref"])
            ref = by_key.get((section, r["model"], name))
            if ref is None:
                raise KeyError(f"row {r['row']!r} of {r['model']} refers to a missing row {r['ref']!r}")
            r["ratio"], r["vs"] = r["images_per_s"] / ref["images_per_s"], name
        if r.get("goal") is not None:
            value = r["ratio"] if r["goal_kind"] == "ratio" else r["images_per_s"]
            r["met"] = None if value is None else bool(value >= r["goal"])
    return rows


def goal_text(r: dict) -> str:
    if r.get("goal") is None:
        return ""
    return f">= {r['goal']:.2f}x" if r["goal_kind"] == "ratio" else f">= {r['goal']:.0f} img/s"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| section | model | row | images/s | seconds | peak mem (MiB) | ratio | vs | goal |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        mem = "" if r.get("peak_mem_mib") is None else f"{r['peak_mem_mib']:.0f}"
        goal = goal_text(r)
        if goal:
            goal += " met" if r["met"] else " **missed**"
        lines.append(f"| {r['section']} | {r['model']} | {r['row']} | {r['images_per_s']:.1f} | {r['seconds']:.2f} "
                     f"| {mem} | {ratio} | {r.get('vs') or ''} | {goal} |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], out: Path, header: str) -> None:
    """bench.json (rows + header), bench.csv, bench.md and bench.png (the ratios) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "bench.md").write_text(f"{header}\n\n{markdown_table(rows)}\n")
    plot_ratios(rows, out / "bench.png", header.split(";")[0])


def plot_ratios(rows: list[dict], path: Path, title: str) -> None:
    """One horizontal bar per row that has a reference: its ratio, the goal as a tick, red if missed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r.get("ratio") is not None]
    if not rs:
        return
    fig, ax = plt.subplots(figsize=(11, 0.3 * len(rs) + 1.4))
    y = list(range(len(rs)))[::-1]
    colours = ["tab:red" if r["met"] is False else "tab:green" if r["met"] else "tab:gray" for r in rs]
    ax.barh(y, [r["ratio"] for r in rs], color=colours, height=0.7)
    for yi, r in zip(y, rs):
        if r.get("goal") is not None and r["goal_kind"] == "ratio":
            ax.plot([r["goal"]] * 2, [yi - 0.4, yi + 0.4], color="black", lw=1.5)
        ax.text(r["ratio"] + 0.01, yi, f"{r['ratio']:.2f}  ({r['images_per_s']:.0f} img/s)", va="center", fontsize=7)
    ax.set_yticks(y)
    short = [r["model"] if len(r["model"]) <= 24 else r["model"][:22] + "…" for r in rs]
    ax.set_yticklabels([f"{m}: {r['row']}  ÷ {r['vs']}" for m, r in zip(short, rs)], fontsize=7)
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlim(0, max(1.25, max(r["ratio"] for r in rs) + 0.45))
    ax.set_xlabel("ratio to the reference row of the same run\n(black tick: goal; green: met, red: missed)", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.46, right=0.98, top=1 - 0.5 / fig.get_figheight(), bottom=0.9 / fig.get_figheight())
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_line(device: str = "cpu") -> str:
    import torch

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    where = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else \
        (platform.processor() or platform.machine())
    return (f"{time.strftime('%Y-%m-%d')}, {where}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"python {platform.python_version()}, load average {load}")


# ------------------------------------------------------------------------------------ peak memory

def reset_peak_memory(device) -> None:
    """Start a new peak: CUDA allocator peak, or the process's peak RSS (Linux: /proc clear_refs 5)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux: the figure stays the process maximum so far


def peak_memory_mib(device) -> float:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# ------------------------------------------------------------------------------------ measuring

def interleaved(measures: dict, repeats: int, device) -> dict:
    """Run each measurement function `repeats` times, round-robin (so slow drift of a shared machine
    hits every row alike); keep the median-rate run of each. A function returns (images, seconds).
    Returns {name: (images, seconds, peak_mem_mib)}."""
    runs = {name: [] for name in measures}
    for _ in range(repeats):
        for name, fn in measures.items():
            reset_peak_memory(device)
            images, seconds = fn()
            runs[name].append((images / seconds, images, seconds, peak_memory_mib(device)))
    out = {}
    for name, rs in runs.items():
        med = statistics.median_low([r[0] for r in rs])
        _, images, seconds, _ = next(r for r in rs if r[0] == med)
        out[name] = (images, seconds, max(r[3] for r in rs))
    return out


def add_common_args(p) -> None:
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (for run_all.py)")


def emit(rows: list[dict], header: str, json_path: str | None) -> list[dict]:
    """Print this script's table; write its rows for run_all.py when asked."""
    rows = resolve(rows)
    print(f"\n{header}\n\n{markdown_table(rows)}\n", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(rows))
    return rows
