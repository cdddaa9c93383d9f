"""Evaluate a late-masking classifier on CUB test, Waterbirds and the background diagnostics.

    python late_masking/eval_waterbirds.py --checkpoint runs/late_cnn/best.pt --data_path data/synthetic_cub
    torchrun --nproc_per_node=2 late_masking/eval_waterbirds.py <same flags>
"""

from bgmask.apps.scripts import eval_late as main

if __name__ == "__main__":
    raise SystemExit(main())
