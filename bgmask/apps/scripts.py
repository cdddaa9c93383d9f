"""Bodies of the entry scripts in early_masking_and_baseline/ and late_masking/ (kept here once)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bgmask import args as A
from bgmask.errors import UserError, run_cli
from bgmask.io import atomic_write_text

METRIC_ROWS = [
    ("test/acc", "CUB test accuracy (in distribution)"),
    ("waterbirds/acc", "Waterbirds accuracy (out of distribution)"),
    ("waterbirds/drop", "drop (test - Waterbirds)"),
    ("waterbirds/mean_group_acc", "Waterbirds mean group accuracy"),
    ("waterbirds/worst_group_acc", "Waterbirds worst-group accuracy"),
    ("diag/fg_only_acc", "FG-only (background removed)"),
    ("diag/bg_only_acc", "BG-only (bird removed)"),
    ("diag/mixed_same_acc", "mixed-same"),
    ("diag/mixed_rand_acc", "mixed-rand"),
    ("diag/bg_gap", "BG-gap (mixed-same - mixed-rand)"),
    ("test/attr_bg_fraction", "attribution on the background, CUB test (share)"),
    ("waterbirds/attr_bg_fraction", "attribution on the background, Waterbirds (share)"),
]


def metrics_markdown(record: dict, title: str) -> str:
    lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
    for key, name in METRIC_ROWS:
        if key in record:
            lines.append(f"| {name} | {record[key]:.4f} |")
    groups = sorted(k for k in record if k.startswith("waterbirds/group_"))
    for k in groups:
        g = int(k.split("_")[1])
        lines.append(f"| Waterbirds group {g} (y={g // 2}, place={g % 2}) | {record[k]:.4f} |")
    return "\n".join(lines) + "\n"


def script_strategies(feature_level: bool) -> list[str]:
    """--strategy choices of a script: early_masking_and_baseline/ takes the strategies that work on
    pixels, late_masking/ every strategy, feature-level ones first (its default)."""
    from bgmask.masking.strategies import STRATEGIES

    pixel = [n for n, s in STRATEGIES.items() if not s.masks_features]
    features = [n for n, s in STRATEGIES.items() if s.masks_features]
    return features + pixel if feature_level else pixel


def parse_noting_arch(parser, argv):
    """parse_with_config, noting on the config whether --model_arch was given (on the command line or in
    --config) rather than left at its default: `model_arch_given`, for the evaluation's check that it
    names the checkpoint's architecture (`bgmask.checkpoint.saved_classifier`)."""
    default = parser.get_default("model_arch")
    parser.set_defaults(model_arch=None)
    cfg = A.parse_with_config(parser, argv)
    cfg.model_arch_given = cfg.model_arch is not None
    cfg.model_arch = default if cfg.model_arch is None else cfg.model_arch
    return cfg


def train_main(argv, feature_level: bool, description: str) -> int:
    from bgmask.engine import run

    cfg = parse_noting_arch(A.train_parser(description, script_strategies(feature_level)), argv)
    if not cfg.eval_only:
        del cfg.model_arch_given  # training builds its model from the flag: nothing to check (nor to save)
    try:
        record = run(cfg)
    except KeyboardInterrupt:
        # Checkpoints are only ever replaced by an atomic rename, so the last one is whole.
        print(f"\ninterrupted; resume with the same command plus --resume_training "
              f"(from {cfg.snapshot_dir}/last.pt if an epoch finished)", file=sys.stderr)
        return 130
    from bgmask.distributed import is_main_process

    if is_main_process():
        print(metrics_markdown(record, f"{cfg.model_arch} / {cfg.strategy} ({cfg.snapshot_dir})"))
    return 0


def output_paths(out: str | None, checkpoint: str) -> tuple[Path, Path]:
    """--out PREFIX: PREFIX.json and PREFIX.md exactly, whatever dots PREFIX holds (`run.eval_1` ->
    `run.eval_1.json`); default: waterbirds_eval.json / .md beside the checkpoint."""
    prefix = out if out else str(Path(checkpoint).parent / "waterbirds_eval")
    return Path(prefix + ".json"), Path(prefix + ".md")


def eval_parser(description: str, feature_level: bool):
    """train.py's flags plus --out, the output prefix."""
    parser = A.train_parser(description, script_strategies(feature_level))
    A.add(parser, "--out", default=None, output="prefix", help="output prefix: writes PREFIX.json and PREFIX.md, "
                                                              "PREFIX kept whole (default: beside the checkpoint, "
                                                              "waterbirds_eval)")
    return parser


def eval_main(argv, feature_level: bool, description: str) -> int:
    from bgmask.distributed import is_main_process
    from bgmask.engine import run
    from bgmask.runfolder import folder_lock

    cfg = parse_noting_arch(eval_parser(description, feature_level), argv)
    if not cfg.checkpoint:
        raise UserError("--checkpoint is required (a best.pt / last.pt written by train.py)")
    cfg.eval_only = True
    with folder_lock(cfg, is_main_process()):  # the checkpoint's folder: its eval line and default files
        record = run(cfg)
        if is_main_process():
            json_path, md_path = output_paths(cfg.out, cfg.checkpoint)
            md = metrics_markdown(record, f"{cfg.model_arch} / {cfg.strategy} ({cfg.checkpoint})")
            atomic_write_text(json_path, json.dumps(record, indent=2, sort_keys=True))
            atomic_write_text(md_path, md)
            print(md)
            print(f"wrote {json_path} and {md_path}")
    return 0


train_early = run_cli(lambda argv=None: train_main(argv, False, "Train a classifier: baseline or early masking."))
eval_early = run_cli(lambda argv=None: eval_main(argv, False,
                                                 "Evaluate a baseline / early-masking classifier on CUB and Waterbirds."))
train_late = run_cli(lambda argv=None: train_main(argv, True, "Train a classifier with late (feature-map) masking."))
eval_late = run_cli(lambda argv=None: eval_main(argv, True, "Evaluate a late-masking classifier on CUB and Waterbirds."))
