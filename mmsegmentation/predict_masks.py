"""Predict bird masks for every CUB image and the Waterbirds test images, in the layout that
`bgmask make-masked --masks DIR` (early masking) and `--mask_dir DIR` (late masking) read:

    DIR/images/<relpath>.png, DIR/waterbird_complete95_forest2water2/<relpath>.png   (0 / 255, image size)

    python mmsegmentation/predict_masks.py --config CONFIG --checkpoint WORK_DIR/segmenter_slim.pth \
        --cub_root data/CUB_200_2011 --out_dir data/masks_segformer_b0 [--batch_size 16] [--device cuda]
Atomic per file; a rerun skips finished files. Warns when many masks are empty (undertrained segmenter).
"""

from bgmask.seg.cli import predict_main as main

if __name__ == "__main__":
    raise SystemExit(main())
