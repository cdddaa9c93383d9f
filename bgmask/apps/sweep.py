"""`bgmask mask-sweep`: how good must the masks be? Early and late masking trained and evaluated with
GT masks perturbed on a grid (perturbation x strength, `bgmask.masking.perturb`), accuracy against the
masks' mIoU.

    bgmask mask-sweep --data_path demo_output/data/synthetic_cub --out sweep --threads 1
    bgmask mask-sweep --preset tiny --out /tmp/sweep --threads 1          # generates its own data
    bgmask mask-sweep ... --perturbations erode:1,2,4 drop:0.25 --perturb_at test train both
    bgmask mask-sweep ... --pred_masks demo_output/predicted_masks        # the segmenter as marked points

--perturb_at (several may be given):
    test   each strategy x backbone trained once on GT masks, evaluated with the perturbed masks
    train  trained with the perturbed masks, evaluated with GT masks
    both   trained and evaluated with the perturbed masks (the training run's own final report)
"train" and "both" share one training run per point. The GT point (perturbation none, mIoU 100) is the
GT-trained run in every mode. Training recipe and data: the demo's preset (`bgmask.apps.demo`). Perturbed
masks draw from (--mask_seed, image id): every training seed sees the same masks.

--out holds:
    data/synthetic_cub        generated with the preset when --data_path is not given
    masks/<name>-<strength>/  perturbed --mask_source folders (perturbed_masks.json: inputs, mIoU)
    runs/<model>-<strategy>-<masks>-s<seed>/   one training run per trained point (bgmask.stages.train_run)
    runs/.../sweep_evals/<masks>.json / .md / .log   that run evaluated with other masks (eval_waterbirds)
    stages/                   markers of the data and mask stages
    sweep.json, sweep.csv, sweep.md, sweep.png
A rerun reads finished points back and resumes an interrupted training; delete --out to redo all. Runs
are matched by their command line, evaluations by it and their masks' inputs (the segmenter's folder by a
fingerprint of its files): data changed in place under the same --data_path needs a new --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from bgmask import args as A
from bgmask.errors import UserError, require_dir
from bgmask.runfolder import hold_folder
from bgmask.io import atomic_write_text, read_json
from bgmask.masking.perturb import PERTURBATIONS, check_perturbation, folder_miou, write_perturbed_masks
from bgmask.masking.strategies import STRATEGIES
from bgmask.io import Marker
from bgmask.stages import INITS, MODELS, PRESETS, Preset, Stages, classifier_settings, make_data, train_run

MODES = ("test", "train", "both")
MODE_TITLES = {"test": "trained on GT masks, tested on perturbed masks",
               "train": "trained on perturbed masks, tested on GT masks",
               "both": "trained and tested on perturbed masks"}
METRICS = ("test/acc", "waterbirds/acc", "waterbirds/worst_group_acc")
MASK_STRATEGIES = tuple(n for n, s in STRATEGIES.items() if s.needs_mask)
GRIDS = {"tiny": ("erode:2", "dilate:2")}  # other presets: every perturbation at its default strengths
DEFAULT_MODELS = ("cnn", "vit")  # the demo's CNN and its ViT with the GAP head


@dataclass
class MaskPoint:
    """One set of masks: GT, a perturbed folder or the segmenter's. `inputs` identifies its files."""

    key: str
    perturbation: str
    strength: float | None
    dir: Path | None
    miou: float
    miou_waterbirds: float | None = None
    inputs: dict = field(default_factory=dict)


GT = MaskPoint("gt", "none", 0, None, 1.0, 1.0, {"masks": "gt"})


@dataclass
class SweepConfig:
    """Everything a sweep needs (`config_from_args` builds it from the flags; the demo may build its own)."""

    out: Path
    preset: Preset
    grid: list
    perturb_at: tuple = ("test",)
    models: tuple = ("cnn", "vit")
    strategies: tuple = MASK_STRATEGIES
    seeds: tuple = (0,)
    data_path: Path | None = None
    pred_masks: Path | None = None
    threads: int | None = None
    workers: int = 1
    mask_seed: int = 0
    mask_threshold: int = 0
    init: str = "finetuned"
    progress: bool = True


def sweep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    names = ", ".join(f"{n} ({p.unit}, {p.range}, default {','.join(f'{s:g}' for s in p.defaults)})"
                      for n, p in PERTURBATIONS.items())
    A.add(parser, "--out", default="sweep_output", output="folder")
    A.add(parser, "--data_path", default=None,
          help="a CUB-layout root with GT masks (e.g. demo_output/data/synthetic_cub); default: generate one "
               "in OUT/data with the preset")
    A.add(parser, "--preset", default="default", choices=list(PRESETS),
          help="the demo's preset: data, epochs, batch size, learning rates (tiny also a 2-point grid for tests)")
    A.add(parser, "--perturbations", nargs="+", default=None, metavar="NAME[:S1,S2,...]",
          help=f"the grid: each perturbation with its strengths or its defaults; {names}")
    A.add(parser, "--perturb_at", nargs="+", default=["test"], choices=list(MODES),
          help="test: trained on GT, tested perturbed; train: trained perturbed, tested on GT; both")
    A.add(parser, "--models", nargs="+", default=None, choices=list(MODELS), help="backbones (the demo's)")
    A.add(parser, "--strategies", nargs="+", default=list(MASK_STRATEGIES), choices=list(MASK_STRATEGIES))
    A.add(parser, "--seeds", nargs="+", type=int, default=None, range="[0, 2147483647]", help="training seeds")
    A.add(parser, "--epochs", type=int, default=None, range="[1, 100000]", help="override the preset's epochs")
    A.add(parser, "--init", default="finetuned", choices=list(INITS),
          help="the backbones as the demo's rows start them: the shipped pretrained ones frozen or fine-tuned, or "
               "from scratch")
    A.add(parser, "--threads", type=int, default=None, range="[1, 1024]", help="torch CPU threads")
    A.add(parser, "--mask_seed", type=int, default=0, range="[0, 2147483647]", help="seed of the perturbations")
    A.add(parser, "--mask_threshold", type=int, default=0, range="[0, 254]",
          help="mask value > threshold = bird, for training, evaluation and mIoU alike")
    A.add(parser, "--pred_masks", default=None,
          help="a predicted-mask folder (DIR/<image folder>/<rel>.png): the segmenter's points")
    A.workers_arg(parser)
    return parser


def main_sweep(ns: argparse.Namespace) -> int:
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    cfg = config_from_args(ns)
    t0 = time.perf_counter()
    rows, paths = sweep_to_folder(cfg)
    print("\n" + paths["md"].read_text().split("\n![")[0].rstrip() + "\n")
    print(f"[sweep] {len(rows)} grid points in {time.perf_counter() - t0:.0f} s; wrote "
          + ", ".join(str(p) for p in paths.values()), flush=True)
    return 0


# ------------------------------------------------------------------------------------- config

def parse_grid(specs) -> list[tuple[str, float]]:
    """NAME or NAME:S1,S2,... -> [(name, strength)], in order, each point once; bad input is one line."""
    grid = []
    for spec in specs:
        name, _, values = spec.partition(":")
        if name not in PERTURBATIONS:
            raise UserError(f"--perturbations {spec!r}: unknown perturbation {name!r} (expected one of "
                            f"{', '.join(PERTURBATIONS)})")
        try:
            strengths = [_number(v) for v in values.split(",")] if values else list(PERTURBATIONS[name].defaults)
        except ValueError:
            raise UserError(f"--perturbations {spec!r}: expected NAME or NAME:S1,S2,... with numbers as "
                            "strengths") from None
        for s in strengths:
            try:
                point = (name, check_perturbation(name, s))
            except UserError as e:
                raise UserError(f"--perturbations {spec!r}: {e}") from None
            if point not in grid:
                grid.append(point)
    return grid


def _number(text: str) -> float:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else float(text)


def config_from_args(ns: argparse.Namespace) -> SweepConfig:
    p = copy.deepcopy(PRESETS[ns.preset])  # the demo's presets are shared objects
    if ns.epochs:
        p.epochs = {init: {k: ns.epochs for k in by_kind} for init, by_kind in p.epochs.items()}
    specs = ns.perturbations or GRIDS.get(ns.preset, tuple(PERTURBATIONS))
    data = require_dir(ns.data_path, "--data_path") if ns.data_path else None
    pred = require_dir(ns.pred_masks, "--pred_masks") if ns.pred_masks else None
    return SweepConfig(out=Path(ns.out), preset=p, grid=parse_grid(specs),
                       perturb_at=tuple(dict.fromkeys(ns.perturb_at)),
                       models=tuple(dict.fromkeys(ns.models or DEFAULT_MODELS)),
                       strategies=tuple(dict.fromkeys(ns.strategies)), seeds=tuple(ns.seeds or p.seeds),
                       data_path=data, pred_masks=pred, threads=ns.threads, workers=ns.workers,
                       mask_seed=ns.mask_seed, mask_threshold=ns.mask_threshold, init=ns.init)


# -------------------------------------------------------------------------------------- stages

def sweep_data(cfg: SweepConfig, stages: Stages) -> tuple[Path, dict]:
    """The CUB-layout root and what identifies its contents."""
    if cfg.data_path is not None:
        return cfg.data_path, {"data_path": str(cfg.data_path.resolve())}
    p = cfg.preset
    data_args = dict(num_classes=p.num_classes, image_size=p.image_size, train_per_class=p.train_per_class,
                     test_per_class=p.test_per_class, correlation=p.correlation, seed=0)
    data = make_data(stages, cfg.out, data_args)
    return data, {"generated": data_args}


def mask_points(cfg: SweepConfig, stages: Stages, data: Path, data_id: dict) -> list[MaskPoint]:
    """GT, every perturbed folder of the grid (written once, then read back) and the segmenter's masks."""
    points = [GT]
    for name, strength in cfg.grid:
        key = f"{name}-{strength:g}"
        folder = cfg.out / "masks" / key
        inputs = {"data": data_id, "perturbation": name, "strength": strength, "seed": cfg.mask_seed,
                  "threshold": cfg.mask_threshold}

        def write(name=name, strength=strength, folder=folder):
            return write_perturbed_masks(data, folder, name, strength, cfg.mask_seed, cfg.mask_threshold,
                                         cfg.workers, overwrite=True, progress=cfg.progress)

        summary = stages.run(f"masks_{key}", inputs, write,
                             lambda r: f"{r['masks']} masks, mIoU {100 * r['miou']:.1f}")
        points.append(MaskPoint(key, name, strength, folder, summary["miou"], summary["miou"], inputs))
    if cfg.pred_masks is not None:
        points.append(segmenter_point(cfg, stages, data, data_id))
    return points


def fingerprint(folder: Path) -> str:
    """A digest of the names, sizes and times of the folder's PNGs: masks predicted again into the same
    folder are scored and evaluated again (one stat per file, no pixel read)."""
    import hashlib

    h = hashlib.sha1()
    for p in sorted(folder.rglob("*.png")):
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def segmenter_point(cfg: SweepConfig, stages: Stages, data: Path, data_id: dict) -> MaskPoint:
    """The segmenter's masks: their mIoU against GT on the test split and on the Waterbirds copies."""
    from bgmask.data.cub import WATERBIRDS_SUBDIR

    inputs = {"data": data_id, "pred_masks": str(cfg.pred_masks.resolve()), "threshold": cfg.mask_threshold,
              "fingerprint": fingerprint(cfg.pred_masks)}

    def score():
        wb = (cfg.pred_masks / WATERBIRDS_SUBDIR).is_dir() and (data / WATERBIRDS_SUBDIR).is_dir()
        return {"miou": folder_miou(data, cfg.pred_masks, cfg.mask_threshold),
                "miou_waterbirds": folder_miou(data, cfg.pred_masks, cfg.mask_threshold, WATERBIRDS_SUBDIR)
                if wb else None}

    r = stages.run("masks_segmenter", inputs, score, lambda r: f"segmenter mIoU {100 * r['miou']:.1f}")
    return MaskPoint("segmenter", "segmenter", None, cfg.pred_masks, r["miou"], r["miou_waterbirds"], inputs)


# -------------------------------------------------------------------------------------- points

def train_point(cfg: SweepConfig, data: Path, masks: MaskPoint, model: str, strategy: str, seed: int):
    """The run trained with `masks` (bgmask.stages.train_run: read back when finished, resumed when
    interrupted): (run folder, its settings as overrides, its final record)."""
    run_dir = cfg.out / "runs" / f"{model}-{strategy}-{masks.key}-s{seed}"
    row = (model, strategy, "GT" if masks.dir is None else "predicted", cfg.init)
    overrides = {**classifier_settings(row, seed, cfg.preset, data, masks.dir, run_dir, cfg.threads),
                 "mask_threshold": cfg.mask_threshold}
    return run_dir, overrides, train_run(overrides, run_dir)


def evaluate_point(run_dir: Path, overrides: dict, masks: MaskPoint) -> dict:
    """The trained run evaluated with `masks` as eval_waterbirds.py evaluates it; its PREFIX.json/.md/.log in
    RUN_DIR/sweep_evals, read back when the same evaluation is done."""
    from bgmask.engine import run
    from bgmask.eval import write_evaluation
    from bgmask.runfolder import folder_lock
    from bgmask.settings import run_settings

    prefix = run_dir / "sweep_evals" / masks.key
    result = Path(f"{prefix}.json")
    ckpt = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    settings = {**overrides, "eval_only": True, "checkpoint": str(ckpt), "mask_source": str(masks.dir or "gt")}
    done = {"settings": settings, "masks": masks.inputs}
    marker = Marker(f"{prefix}.sweep.json")
    saved = read_json(result)  # an unreadable marker or result: the evaluation runs again
    if marker.holds(done) and isinstance(saved, dict):
        return saved
    marker.path.parent.mkdir(parents=True, exist_ok=True)
    evaluation = run_settings(settings, "mask-sweep evaluation")
    with open(f"{prefix}.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        with folder_lock(evaluation, True):  # the checkpoint's folder, as eval_waterbirds.py takes it
            record = run(evaluation)
            write_evaluation(record, evaluation, str(prefix))
    marker.write(done)
    return record


def measure(cfg: SweepConfig, data: Path, mode: str, masks: MaskPoint, model: str, strategy: str,
            seed: int) -> dict:
    """One point's metrics: trained with the perturbed masks for train/both, tested with them for test/both."""
    trained = masks if mode in ("train", "both") else GT
    tested = masks if mode in ("test", "both") else GT
    run_dir, overrides, final = train_point(cfg, data, trained, model, strategy, seed)
    record = final if tested.key == trained.key else evaluate_point(run_dir, overrides, tested)
    return {"perturb_at": mode, "masks": masks.key, "model": model, "strategy": strategy, "seed": seed,
            "run_dir": str(run_dir), **{k: record.get(k, float("nan")) for k in METRICS}}


def run_sweep(cfg: SweepConfig) -> list[dict]:
    """Every point (mode x masks x backbone x strategy x seed), one printed line each; returns the rows
    (`sweep_rows`): one per mode x masks, the metrics per backbone/strategy averaged over seeds."""
    from tqdm import tqdm

    cfg.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(cfg.out, fresh=False, tag="sweep")
    data, data_id = sweep_data(cfg, stages)
    masks = mask_points(cfg, stages, data, data_id)
    jobs = [(mode, m, model, strategy, seed) for mode in cfg.perturb_at for m in masks for model in cfg.models
            for strategy in cfg.strategies for seed in cfg.seeds]
    points = []
    for mode, m, model, strategy, seed in tqdm(jobs, desc="[sweep] points", unit="point", leave=False,
                                               disable=not cfg.progress):
        t0 = time.perf_counter()
        points.append(measure(cfg, data, mode, m, model, strategy, seed))
        r = points[-1]
        tqdm.write(f"[sweep] {mode} {m.key} (mIoU {100 * m.miou:.1f}) {model}/{strategy} s{seed}: in-dist "
                   f"{r['test/acc']:.3f}  Waterbirds {r['waterbirds/acc']:.3f}  worst group "
                   f"{r['waterbirds/worst_group_acc']:.3f}  ({time.perf_counter() - t0:.0f} s)")
    return sweep_rows(points, masks)


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def sweep_rows(points: list[dict], masks: list[MaskPoint]) -> list[dict]:
    """One row per (mode, masks): perturbation, strength, mIoU, and per `model/strategy` the mean (and
    sample std) over seeds of each metric, the seeds and the run folders."""
    by_key = {m.key: m for m in masks}
    rows: dict[tuple, dict] = {}
    for p in points:
        m = by_key[p["masks"]]
        row = rows.setdefault((p["perturb_at"], m.key), {
            "perturb_at": p["perturb_at"], "perturbation": m.perturbation, "strength": m.strength, "masks": m.key,
            "miou": m.miou, "miou_waterbirds": m.miou_waterbirds, "results": {}})
        cell = row["results"].setdefault(f"{p['model']}/{p['strategy']}", {"seeds": [], "runs": [], "_v": []})
        cell["seeds"].append(p["seed"])
        cell["runs"].append(p["run_dir"])
        cell["_v"].append([p[k] for k in METRICS])
    for row in rows.values():
        for cell in row["results"].values():
            for j, k in enumerate(METRICS):
                cell[k], cell[f"{k}_std"] = _stats([v[j] for v in cell["_v"]])
            del cell["_v"]
    return list(rows.values())


# -------------------------------------------------------------------------------------- output

def _percent(cell: dict, key: str) -> str:
    if len(cell["seeds"]) > 1:
        return f"{100 * cell[key]:.1f} ± {100 * cell[f'{key}_std']:.1f}"
    return f"{100 * cell[key]:.1f}"


def sweep_markdown(rows: list[dict]) -> str:
    """A table per mode: perturbation, strength, mIoU (%), then per backbone/strategy the in-distribution,
    Waterbirds and worst-group accuracy (%; mean ± std over seeds when there are several)."""
    out = ["# Mask-quality sweep\n"]
    for mode in dict.fromkeys(r["perturb_at"] for r in rows):
        sub = [r for r in rows if r["perturb_at"] == mode]
        combos = list(dict.fromkeys(c for r in sub for c in r["results"]))
        head = ["perturbation", "strength", "mIoU"] + [f"{c} {m}" for c in combos
                                                       for m in ("in-dist.", "Waterbirds", "worst group")]
        out += [f"\n## perturbed at {mode}: {MODE_TITLES[mode]}\n", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for r in sub:
            strength = "-" if r["strength"] is None else f"{r['strength']:g}"
            cells = [_percent(r["results"][c], k) if c in r["results"] else "" for c in combos for k in METRICS]
            out.append("| " + " | ".join([r["perturbation"], strength, f"{100 * r['miou']:.1f}", *cells]) + " |")
    out.append("\nAccuracies and mIoU in %. mIoU: MMSeg's rule (background and bird IoU, intersections and unions "
               "summed over the in-distribution test images, then averaged).\n")
    return "\n".join(out)


def sweep_csv(rows: list[dict]) -> str:
    """One line per row; per backbone/strategy the mean of each metric (and its std)."""
    combos = list(dict.fromkeys(c for r in rows for c in r["results"]))
    cols = ["perturb_at", "perturbation", "strength", "miou", "miou_waterbirds"]
    cols += [f"{c}/{k}{s}" for c in combos for k in METRICS for s in ("", "_std")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        line = {k: ("" if r[k] is None else r[k]) for k in cols[:5]}
        for c, cell in r["results"].items():
            line.update({f"{c}/{k}{s}": cell[f"{k}{s}"] for k in METRICS for s in ("", "_std")})
        w.writerow(line)
    return buf.getvalue()


def write_sweep(rows: list[dict], cfg: SweepConfig) -> dict[str, Path]:
    """OUT/sweep.json (the config and the rows), sweep.csv, sweep.md and sweep.png."""
    from bgmask.apps.sweep_plots import sweep_plot

    out = cfg.out
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items() if k != "preset"}
    config["preset"] = vars(cfg.preset)
    paths = {"json": out / "sweep.json", "csv": out / "sweep.csv", "md": out / "sweep.md", "png": out / "sweep.png"}
    atomic_write_text(paths["json"], json.dumps({"config": config, "rows": rows}, indent=2, default=str))
    atomic_write_text(paths["csv"], sweep_csv(rows))
    sweep_plot(rows, paths["png"])
    atomic_write_text(paths["md"], sweep_markdown(rows) + f"\n![sweep]({paths['png'].name})\n")
    return paths


def sweep_config(source: str, **overrides) -> SweepConfig:
    """mask-sweep's settings from keyword overrides of its flags' defaults (each checked as the command
    line's, `bgmask.errors.flag_value`; `source` names them in an error): how another application runs a
    sweep."""
    from bgmask.errors import ArgumentParser, settings_from_mapping

    parser = sweep_args(ArgumentParser(prog="bgmask mask-sweep"))
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    return config_from_args(argparse.Namespace(**{**defaults, **settings_from_mapping(parser, overrides, source)}))


def sweep_to_folder(cfg: SweepConfig) -> tuple[list[dict], dict[str, Path]]:
    """Run the sweep holding its --out folder: (its rows, its files: `write_sweep`)."""
    with hold_folder(cfg.out, "--out"):  # one sweep per folder: its points are this process's alone
        rows = run_sweep(cfg)
        return rows, write_sweep(rows, cfg)
