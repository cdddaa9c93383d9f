"""Segmenter config + checkpoint -> masked image copies. Two ways to call it (see --help):

The paper's flags: every DATA_PATH/<class folder>/<file>.jpg -> SAVE_PATH/<class folder>/<file>.jpg,
background (predicted class 0) black, JPEG:
    python mmsegmentation/gen_masked_image_dataset.py --data_path data/CUB_200_2011/images \
        --config_file CONFIG --checkpoint_file WORK_DIR/segmenter_slim.pth --save_path data/CUB_200_2011/images_masked
  (the paper's iter_160000.pth is a full mmengine checkpoint: add --trust_full_checkpoint, only for a
  file you trust; run it a second time with the Waterbirds folder as --data_path.)

bgmask's flags: masks into --out_dir (default CUB_ROOT/<out_subdir>_masks, as predict_masks.py), then
CUB_ROOT/<out_subdir>/<rel> and CUB_ROOT/<out_subdir>_waterbirds/<rel> (as `bgmask make-masked`):
    python mmsegmentation/gen_masked_image_dataset.py --config CONFIG --checkpoint WORK_DIR/segmenter_slim.pth \
        --cub_root data/CUB_200_2011 --out_subdir images_masked_pred
Train on them with --image_sub_path_train NAME --image_sub_path_test NAME_waterbirds.
"""

from bgmask.seg.cli import gen_masked_main as main

if __name__ == "__main__":
    raise SystemExit(main())
