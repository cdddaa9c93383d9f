"""mIoU / mDice (and the bird class's IoU / Dice) on the CUB test split and on the Waterbirds images.

    python mmsegmentation/test.py CONFIG WORK_DIR/segmenter_slim.pth --data-root data/cub_binary_segmentation
    torchrun --nproc_per_node=4 mmsegmentation/test.py CONFIG CKPT --data-root DIR --launcher pytorch
Writes WORK_DIR/test_metrics.json (or --out) and appends it to WORK_DIR/results.jsonl.
A full mmengine checkpoint (iter_N.pth) needs --trust-full-checkpoint (only for your own runs).
"""

from bgmask.seg.cli import test_main as main

if __name__ == "__main__":
    raise SystemExit(main())
