"""The stages the applications share, each skipped when its marker holds the same inputs (the stage
cache, `bgmask.io.Marker`: one implementation for every resumable step of bgmask). `Stages` names the
stages of one output folder and prints one line for each.

The shared stages (the demo, the mask sweep and the zoo build on them): the synthetic benchmark
(`make_data`), the demo's training recipe on it (`Preset`, `classifier_settings`; under the Waterbirds
protocol `protocol_settings`) and a classifier run from its settings, read back when finished and resumed
when interrupted (`train_run`); DFR applied to a checkpoint as a run folder of its own (`dfr_run`: the
`bgmask dfr` command and the protocol demo).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bgmask.errors import UserError
from bgmask.io import LOCK_NAME, Marker, atomic_write_text, file_sha256, is_empty_folder, read_json
from bgmask.masking.strategies import STRATEGIES
from bgmask.runfolder import RunFolder


def say(prefix: str, name: str, seconds: float | None, what: str = "") -> None:
    """The one line a stage prints: `[demo] data: up to date, skipped` (seconds None: `Marker.run` skipped
    it) or `[demo] data: WHAT, done in 3 s`."""
    if seconds is None:
        print(f"[{prefix}] {name}: up to date, skipped", flush=True)
    else:
        print(f"[{prefix}] {name}: {what + ', ' if what else ''}done in {seconds:.0f} s", flush=True)


class Stages:
    """The named stages of one output folder: markers in OUT/stages/NAME.json, one line each, tagged
    `[tag]`; `fresh` redoes every stage."""

    def __init__(self, out: Path, fresh: bool = False, tag: str = "demo"):
        self.out, self.fresh, self.tag = Path(out), fresh, tag

    def run(self, name: str, inputs: dict, fn, describe=None):
        """fn() unless the stage's marker holds the same inputs; `describe(result)` says what came out."""
        result, seconds = Marker(self.out / "stages" / f"{name}.json").run(inputs, fn, self.fresh)
        say(self.tag, name, seconds, describe(result) if describe and seconds is not None else "")
        return result


# ----------------------------------------------------------------- the demo's recipe on the benchmark

# model key -> (timm name, head flags, zoo backbone); "vit" is the GAP head, the paper's most robust ViT
MODELS = {"cnn": "bgmask_resnet_tiny", "vit": "bgmask_vit_tiny", "vit_cls": "bgmask_vit_tiny",
          "vit_both": "bgmask_vit_tiny"}
HEAD_SETTINGS = {"vit": {"patch_tokens_only": True}, "vit_cls": {"class_token_only": True}, "vit_both": {}}
ZOO = {"cnn": "zoo:cnn", "vit": "zoo:vit", "vit_cls": "zoo:vit", "vit_both": "zoo:vit"}
INITS = ("frozen", "finetuned", "scratch")
PRETRAINED = ("frozen", "finetuned")
MASKS = ("-", "GT", "predicted")


def kind(model: str) -> str:
    """'cnn' or 'vit': the key of the per-model recipe (epochs, lr)."""
    return "vit" if model.startswith("vit") else "cnn"


def strategy_rows(model: str, init: str, gt: bool) -> list[tuple]:
    """(model, strategy, masks, init) for every registered strategy: masks '-' without masks, else
    predicted (and GT too when `gt`)."""
    rows = [(model, name, "predicted" if s.needs_mask else "-", init) for name, s in STRATEGIES.items()]
    return rows + [(model, name, "GT", init) for name, s in STRATEGIES.items() if gt and s.needs_mask]


# (model key, strategy, masks, init)
ROWS_DEFAULT = [row for init in PRETRAINED for m in ("cnn", "vit") for row in strategy_rows(m, init, gt=False)]
ROWS_FULL = [row for init in PRETRAINED for m in MODELS for row in strategy_rows(m, init, gt=m in ("cnn", "vit"))]
ROWS_SCRATCH = strategy_rows("cnn", "scratch", gt=True) + strategy_rows("vit", "scratch", gt=False)  # the control


@dataclass
class Preset:
    num_classes: int = 10
    image_size: int = 64
    train_per_class: int = 200
    test_per_class: int = 50
    correlation: float = 0.95
    # init -> model kind -> epochs; the pretrained backbones need fewer than training from scratch
    epochs: dict = field(default_factory=lambda: {"scratch": {"cnn": 8, "vit": 6}, "frozen": {"cnn": 3, "vit": 2},
                                                  "finetuned": {"cnn": 3, "vit": 2}})
    batch_size: int = 64
    lr: dict = field(default_factory=lambda: {"cnn": 2e-3, "vit": 1e-3})
    seg_iters: int = 400
    rows: list = field(default_factory=lambda: list(ROWS_DEFAULT))
    seeds: tuple = (0,)


PRESETS = {
    "default": Preset(),
    "full": Preset(rows=list(ROWS_FULL), seeds=(0, 1, 2)),
    "scratch": Preset(rows=list(ROWS_SCRATCH), seg_iters=600),  # the recipe of the control table in the README
    "tiny": Preset(num_classes=3, image_size=32, train_per_class=12, test_per_class=5,
                   epochs={init: {"cnn": 1, "vit": 1} for init in INITS}, batch_size=12, seg_iters=20,
                   rows=[("cnn", "baseline", "-", "scratch"), ("cnn", "early", "predicted", "scratch"),
                         ("cnn", "late", "GT", "scratch"), ("vit", "late", "predicted", "frozen"),
                         ("cnn", "baseline", "-", "finetuned")]),
}


def classifier_settings(row, seed, p: Preset, data: Path, pred_masks: Path | None, run_dir: Path, threads) -> dict:
    """The train.py settings of one demo row (model, strategy, masks, init) as keyword overrides."""
    model, strategy, masks, init = row
    k = kind(model)
    out = dict(data_path=str(data), model_arch=MODELS[model], strategy=strategy, image_size=p.image_size,
               crop_pct=1.0, augmentations_to_use="flip", epochs=p.epochs[init][k], batch_size=p.batch_size,
               lr=p.lr[k], weight_decay=0.05, scheduler_type="cosine", min_lr=1e-5, seed=seed,
               snapshot_dir=str(run_dir), num_workers=1, no_progress=True,
               smoothing=0.0, eval_mode="none")  # the demo's recipe: only the final evaluation counts
    if STRATEGIES[strategy].masks_features:
        out["late_mask_stage"] = "last"  # the mask on the final map, for the CNN too
    out.update(HEAD_SETTINGS.get(model, {}))
    if threads:
        out["threads"] = threads
    if masks == "predicted":
        out["mask_source"] = str(pred_masks)
    if init in PRETRAINED:
        out["pretrained_file"] = ZOO[model]
    if init == "frozen":  # a linear probe: only the head trains
        out.update(freeze_backbone=True, lr=1e-2)
    if init == "finetuned":  # the backbone at a quarter of the from-scratch lr, the new head at 10x that
        out.update(lr=p.lr[k] / 4, scratch_lr_factor=10.0)
    return out


def train_run(overrides: dict, run_dir: Path) -> dict:
    """One training run (train.py's settings plus `overrides`, `bgmask.settings.run_settings`) in this
    process: a finished run with the same settings is read back, an interrupted one resumed, any other
    replaced. What the run prints goes to RUN_DIR/train.log; its command.txt holds the equivalent train.py
    command line."""
    from bgmask.engine import run
    from bgmask.settings import run_settings

    settings = run_settings(overrides, f"run {run_dir}")  # checked before anything is touched
    marker = Marker(run_dir / "run_settings.json")
    if run_dir.exists():
        same = marker.holds(overrides, key="inputs")  # an unreadable marker or final record: made again
        final = read_json(run_dir / "final_metrics.json")
        if same and (run_dir / "done").is_file() and isinstance(final, dict):
            return final
        if same and (run_dir / "last.pt").is_file():
            settings = run_settings({**overrides, "resume_training": True}, f"run {run_dir}")
        else:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write({"inputs": overrides})  # the run's own settings: a resumed run matches them again
    with open(run_dir / "train.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        return run(settings)


def make_data(stages: Stages, out: Path, data_args: dict, name: str = "data", folder: str = "synthetic_cub",
              waterbirds: dict | None = None) -> Path:
    """Stage `name`: the synthetic benchmark in OUT/data/FOLDER (its summary in DATA/summary.txt);
    `waterbirds` ({val_fraction, correlation}) makes its Waterbirds folder the complete protocol folder."""
    data = out / "data" / folder

    def make():
        from bgmask.data.synthetic import WaterbirdsSplits, generate_synthetic

        splits = WaterbirdsSplits(**waterbirds) if waterbirds is not None else None
        s = generate_synthetic(data, overwrite=True, progress=False, waterbirds=splits, **data_args)
        atomic_write_text(data / "summary.txt", s.to_text() + "\n")
        return {"sample_grid": str(s.sample_grid)}

    inputs = data_args if waterbirds is None else {**data_args, "waterbirds": waterbirds}
    stages.run(name, inputs, make, lambda r: f"{data} (summary.txt, {Path(r['sample_grid']).name})")
    return data


# ------------------------------------------------------------------- the Waterbirds protocol (Sagawa et al.)

def protocol_settings(row, seed, p: Preset, data: Path, run_dir: Path, threads) -> dict:
    """The train.py settings of one Waterbirds-protocol row (method, strategy) as keyword overrides: the
    demo's fine-tuned CNN recipe (`classifier_settings`, the zoo backbone) on the protocol's splits, GT
    masks for a masking strategy, best.pt chosen on val worst-group accuracy (evaluated each epoch). The
    attribution maps are left out: the protocol's tables do not report them."""
    method, strategy = row
    masks = "GT" if STRATEGIES[strategy].needs_mask else "-"
    out = classifier_settings(("cnn", strategy, masks, "finetuned"), seed, p, data, None, run_dir, threads)
    out.update(protocol="waterbirds", method=method, eval_mode="val", attribution_images=0)
    return out


# ------------------------------------------------------------------- DFR on a checkpoint, as a run folder

DFR_MARKER = "dfr_run.json"  # a DFR run folder's marker: its inputs, written before its first file


def dfr_flags(values: dict) -> dict:
    """The DFR method's settings ({dest: value} for each of `DFR.flags`, defaults filled in, lists as lists)."""
    from bgmask.methods import DFR

    out = {f.dest: values.get(f.dest, f.default) for f in DFR.flags}
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in out.items()}


def dfr_command(overrides: dict, dfr: dict, run_dir: Path) -> list[str]:
    """`bgmask dfr ...` giving these evaluation settings and DFR flags (`settings.command_line` with the
    command's own flags: each once, defaults left out)."""
    from bgmask.errors import ArgumentParser
    from bgmask.methods.posthoc import dfr_args
    from bgmask.settings import command_line

    return command_line({**overrides, **dfr, "out": str(run_dir)}, dfr_args(ArgumentParser(add_help=False)),
                        program=["bgmask", "dfr"])


def dfr_run(overrides: dict, dfr: dict, run_dir: Path, command: list[str] | None = None,
            fresh: bool = False) -> dict:
    """DFR (`bgmask.methods.posthoc.apply_dfr`) on the checkpoint of the evaluation settings `overrides`
    (checkpoint, data_path, masks, workers ...; eval_only and protocol waterbirds are added) with the DFR
    flags `dfr` ({dest: value} of `DFR.flags`), written to RUN_DIR as a training run's folder is:
    config.yaml (the base run's flags with method dfr, the DFR flags and the evaluation's settings),
    results.jsonl, final_metrics.json, done, command.txt (`command`, default `dfr_command`). A folder that
    holds the same DFR of the same checkpoint file (its SHA-256) is read back unless `fresh`; one holding
    another DFR run is replaced; a non-empty folder without a DFR run's marker is refused."""
    from bgmask.methods import DFR
    from bgmask.methods.posthoc import apply_dfr, base_model
    from bgmask.settings import Settings, run_settings

    dfr = dfr_flags(dfr)
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}
    settings = run_settings({**overrides, "eval_only": True, "protocol": "waterbirds"}, f"DFR run {run_dir}")
    method = DFR(**DFR.flag_values(argparse.Namespace(**dfr)))
    base = base_model(settings)  # every refusal before the folder is touched
    inputs = {"settings": overrides, "dfr": dfr, "checkpoint_sha256": file_sha256(base.path)}
    marker = Marker(run_dir / DFR_MARKER)
    if not is_empty_folder(run_dir) and not marker.path.is_file():
        raise UserError(f"{run_dir} holds files but no DFR run ({DFR_MARKER}): give DFR an empty or new folder "
                        "(default: the checkpoint's folder/dfr)")
    final = read_json(run_dir / "final_metrics.json")
    if not fresh and marker.holds(inputs) and (run_dir / "done").is_file() and isinstance(final, dict):
        return final
    record = apply_dfr(settings, method, base=base)  # the folder is untouched until DFR has its result
    clear_folder(run_dir)
    marker.write(inputs)  # before the first file: a folder of a killed DFR run is this function's to replace
    config = {**base.config, **{k: getattr(settings, k) for k in overrides}, **dfr, "method": DFR.name,
              "snapshot_dir": str(run_dir)}
    folder = RunFolder(run_dir, flag="--out")
    folder.write_config(Settings(config, command=command or dfr_command(overrides, dfr, run_dir)))
    folder.finish(record)
    return record


def clear_folder(folder: Path) -> None:
    """Everything in `folder` but its lock file (the holder keeps it); the folder itself made if missing."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.name != LOCK_NAME:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
