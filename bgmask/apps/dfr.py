"""`bgmask dfr`: Deep Feature Reweighting (Kirichenko et al., ICLR 2023) on a trained checkpoint.

    bgmask dfr --checkpoint runs/erm/last.pt --data_path ROOT [--out FOLDER] [--mask_source gt|DIR]
               [--dfr_c_grid 1 0.7 ...] [--dfr_retrains 10] [--dfr_seed 0] [--num_workers N] [--threads N]

The checkpoint must come from a run trained under --protocol waterbirds (DFR refits its last layer on the
group-balanced val split). Its model embeds the Waterbirds folder's val and test splits with the
checkpoint's strategy (masks: --mask_source, GT by default, as eval_waterbirds.py), DFR^Tr_Val is fitted
on val and scored on test (`bgmask.methods.posthoc.apply_dfr`). The run folder (default: the
checkpoint's folder/dfr) is laid out as a training run's, so that `bgmask report` reads it:

    config.yaml          the base run's flags with method: dfr, the DFR flags and the evaluation's settings
    final_metrics.json   test/acc, test/weighted_acc, test/mean_group_acc, test/worst_group_acc,
                         test/group_<k>_acc from DFR's predictions; dfr/C, dfr/tuning, base_checkpoint
    results.jsonl        the same record as one line
    command.txt, git_revision.txt, done, dfr_run.json (the inputs: settings, DFR flags, checkpoint SHA-256)

The command always computes DFR again (deterministic given --dfr_seed); the demo reads finished folders back.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from bgmask.methods.posthoc import dfr_args
from bgmask.errors import UserError

# the evaluation settings the command passes on (`bgmask.settings.run_settings` checks each one)
EVAL_KEYS = ("checkpoint", "data_path", "mask_source", "eval_batch_size", "num_workers", "device", "threads",
             "no_progress", "trust_checkpoint")


def main_dfr(ns: argparse.Namespace) -> int:
    from bgmask.errors import require_package
    from bgmask.eval import metrics_markdown
    from bgmask.io import is_empty_folder
    from bgmask.runfolder import hold_folder
    from bgmask.stages import dfr_command, dfr_flags, dfr_run

    require_package("sklearn", "bgmask dfr", "dfr")  # before any work
    if not Path(ns.checkpoint).is_file():
        raise UserError(f"--checkpoint {ns.checkpoint} is not a file (a best.pt / last.pt written by train.py)")
    out = Path(ns.out) if ns.out else Path(ns.checkpoint).parent / "dfr"
    defaults = dfr_args(argparse.ArgumentParser(add_help=False))
    overrides = {k: getattr(ns, k) for k in EVAL_KEYS if getattr(ns, k) != defaults.get_default(k)}
    dfr = dfr_flags(vars(ns))
    created = not out.exists()
    try:
        with hold_folder(out, "--out"):  # one writer per run folder
            record = dfr_run(overrides, dfr, out, command=dfr_command(overrides, dfr, out), fresh=True)
    except BaseException:
        if created and is_empty_folder(out):  # a refusal leaves no folder behind (only the lock made it)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    print(metrics_markdown(record, f"DFR on {ns.checkpoint} (C = {record['dfr/C']:g})"))
    print(f"wrote {out / 'final_metrics.json'}, {out / 'config.yaml'}, {out / 'results.jsonl'}")
    return 0
