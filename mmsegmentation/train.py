"""Train a background/bird segmenter from an MMSeg config; writes WORK_DIR/segmenter_slim.pth at the end.

One process (CPU or one GPU):
    python mmsegmentation/train.py mmsegmentation/configs/segformer/segformer_mit-b0_8xb2-160k_cub_binary_seg-512x512.py \
        --data-root data/cub_binary_segmentation --work-dir work_dirs/segformer_b0
Several GPUs (BN becomes SyncBN):
    torchrun --nproc_per_node=4 mmsegmentation/train.py CONFIG --data-root DIR --launcher pytorch
Resume the latest checkpoint of the work dir: add --resume. Override anything: --cfg-options key=value.
"""

from bgmask.seg.runner import train_main as main

if __name__ == "__main__":
    raise SystemExit(main())
