"""Train a bird classifier with late masking: the backbone's last feature map (or ViT patch-token
grid) is multiplied by the bird mask, resized to the grid, before pooling.

One process:
    python late_masking/train.py --data_path data/synthetic_cub --model_arch bgmask_resnet_tiny \
        --mask_source gt --image_size 64 --epochs 10 --snapshot_dir runs/late_cnn
    python late_masking/train.py ... --model_arch bgmask_vit_tiny --patch_tokens_only --late_pool masked_mean
    python late_masking/train.py ... --mask_dir predicted_masks     # cached predicted masks
Several processes:
    torchrun --nproc_per_node=2 late_masking/train.py <same flags>
"""

from bgmask.apps.scripts import train_late as main

if __name__ == "__main__":
    raise SystemExit(main())
