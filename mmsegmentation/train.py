"""Train a background/bird segmenter from an MMSeg config; writes WORK_DIR/segmenter_slim.pth at the end.

One process (CPU or one GPU):
    python mmsegmentation/train.py mmsegmentation/configs/segformer/segformer_mit-b0_8xb2-160k_cub_binary_seg-512x512.py \
        --data-root data/cub_binary_segmentation --work-dir work_dirs/segformer_b0
Several GPUs (BN becomes SyncBN; nccl on GPUs, gloo on CPU):
    torchrun --nproc_per_node=4 mmsegmentation/train.py CONFIG --data-root DIR --launcher pytorch
The paper's launcher line also works (`python -m torch.distributed.launch --nproc_per_node=4 --use_env
mmsegmentation/train.py CONFIG --work-dir W --launcher pytorch`; without --use_env it passes
--local-rank, which becomes LOCAL_RANK), and `--launcher pytorch` without a launcher runs as one process.
Without --data-root the config's own data_root is used. Resume the latest checkpoint of the work dir:
add --resume. Override anything: --cfg-options key=value.
"""

from bgmask.seg.cli import train_main as main

if __name__ == "__main__":
    raise SystemExit(main())
