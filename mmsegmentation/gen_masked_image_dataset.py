"""The paper's one step: segmenter config + checkpoint -> masked image copies.

    python mmsegmentation/gen_masked_image_dataset.py --config CONFIG --checkpoint WORK_DIR/segmenter_slim.pth \
        --cub_root data/CUB_200_2011 --out_subdir images_masked_pred
Predicts masks into --out_dir (default CUB_ROOT/<out_subdir>_masks, as predict_masks.py), then writes
CUB_ROOT/<out_subdir>/<rel> and CUB_ROOT/<out_subdir>_waterbirds/<rel> (as `bgmask make-masked`).
Train on them with --image_sub_path_train NAME --image_sub_path_test NAME_waterbirds.
"""

from bgmask.seg.runner import gen_masked_main as main

if __name__ == "__main__":
    raise SystemExit(main())
