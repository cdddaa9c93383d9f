"""Evaluate a trained classifier: CUB test accuracy, Waterbirds accuracy and drop, per-group and
worst-group accuracy, and the background-reliance diagnostics (FG-only, BG-only, mixed-same/rand).

    python early_masking_and_baseline/eval_waterbirds.py --checkpoint runs/early_cnn/best.pt \
        --data_path data/synthetic_cub [--mask_source gt|DIR]
    torchrun --nproc_per_node=2 early_masking_and_baseline/eval_waterbirds.py <same flags>
Writes <checkpoint folder>/waterbirds_eval.json and .md (or --out PREFIX).
"""

from bgmask.apps.scripts import eval_early as main

if __name__ == "__main__":
    raise SystemExit(main())
