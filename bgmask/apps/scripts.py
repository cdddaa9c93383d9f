"""Bodies of the entry scripts in early_masking_and_baseline/ and late_masking/ (kept here once)."""

from __future__ import annotations

import argparse
import sys

from bgmask import args as A
from bgmask.errors import UserError, run_cli
from bgmask.eval import metrics_markdown, write_evaluation

def script_strategies(feature_level: bool) -> list[str]:
    """--strategy choices of a script: early_masking_and_baseline/ takes the strategies that work on
    pixels, late_masking/ every strategy, feature-level ones first (its default)."""
    from bgmask.masking.strategies import STRATEGIES

    pixel = [n for n, s in STRATEGIES.items() if not s.masks_features]
    features = [n for n, s in STRATEGIES.items() if s.masks_features]
    return features + pixel if feature_level else pixel


def train_main(argv, feature_level: bool, description: str) -> int:
    from bgmask.engine import run
    from bgmask.settings import from_argv

    cfg = from_argv(argv, A.train_parser(description, script_strategies(feature_level)))
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
    from bgmask.settings import parse_noting_given, resolve

    ns, given = parse_noting_given(eval_parser(description, feature_level), argv)
    if not ns.checkpoint:
        raise UserError("--checkpoint is required (a best.pt / last.pt written by train.py)")
    cfg = resolve(argparse.Namespace(**{**vars(ns), "eval_only": True}), given, [sys.executable, *sys.argv])
    with folder_lock(cfg, is_main_process()):  # the checkpoint's folder: its eval line and default files
        record = run(cfg)
        if is_main_process():
            write_evaluation(record, cfg, cfg.out)
    return 0


train_early = run_cli(lambda argv=None: train_main(argv, False, "Train a classifier: baseline or early masking."))
eval_early = run_cli(lambda argv=None: eval_main(argv, False,
                                                 "Evaluate a baseline / early-masking classifier on CUB and Waterbirds."))
train_late = run_cli(lambda argv=None: train_main(argv, True, "Train a classifier with late (feature-map) masking."))
eval_late = run_cli(lambda argv=None: eval_main(argv, True, "Evaluate a late-masking classifier on CUB and Waterbirds."))
