"""Train a bird classifier with the baseline (plain images) or early masking (background removed).

One process:
    python early_masking_and_baseline/train.py --data_path data/synthetic_cub --model_arch bgmask_resnet_tiny \
        --strategy early --mask_source gt --image_size 64 --epochs 10 --snapshot_dir runs/early_cnn
Several processes (DDP; gloo on CPU, nccl on GPU):
    torchrun --nproc_per_node=2 early_masking_and_baseline/train.py <same flags>
Masked copies on disk instead of on-the-fly masking (the paper's workflow):
    bgmask make-masked --cub_root data/synthetic_cub --masks gt --out_subdir images_masked
    python early_masking_and_baseline/train.py --data_path data/synthetic_cub \
        --image_sub_path_train images_masked --image_sub_path_test images_masked_waterbirds ...
`--help` lists every flag; `--config FILE.yaml` supplies defaults.
"""

from bgmask.apps.scripts import train_early as main

if __name__ == "__main__":
    raise SystemExit(main())
