"""Slim (weights_only-loadable) copy of a segmenter checkpoint, e.g. of an interrupted run:

    python mmsegmentation/convert_checkpoint.py WORK_DIR/iter_16000.pth WORK_DIR/segmenter_slim.pth \
        --trust-full-checkpoint
A full mmengine checkpoint unpickles Python objects: convert only checkpoints of your own runs.
"""

from bgmask.seg.cli import convert_main as main

if __name__ == "__main__":
    raise SystemExit(main())
