# The `bgmask make-binary-seg` folder:
#   DATA_ROOT/images/{train,val,test,waterbird_test}/<CUB relpath>.jpg
#   DATA_ROOT/annotations/{train,val,test}/<CUB relpath>.png   0 = background, 1 = bird
# waterbird_test = the Waterbirds copies of the test images, scored against annotations/test.
#
# DATA_ROOT is not stored here: pass `--data-root DIR` to mmsegmentation/train.py / test.py, or
# `--cfg-options data_root=DIR`; the scripts fill every dataloader still holding this placeholder.
custom_imports = dict(
    imports=['bgmask.seg.compat', 'bgmask.seg.dataset'], allow_failed_imports=False)
dataset_type = 'CUBBinarySegDataset'
data_root = '<unset: pass --data-root DIR or --cfg-options data_root=DIR>'
crop_size = (512, 512)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
# The longer side fits the crop (as bgmask.seg.segmenter letterboxes), so evaluation, predict_masks.py
# and the online segmenter see the bird at the same scale.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    # annotations after Resize: metrics are computed at the original size
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]


def _split(img_dir, ann_dir, pipeline):
    return dict(type=dataset_type, data_root=data_root,
                data_prefix=dict(img_path=img_dir, seg_map_path=ann_dir), pipeline=pipeline)


train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=_split('images/train', 'annotations/train', train_pipeline))


# MMSeg batches only images of one size at test time: batch_size 1 for CUB's varied sizes.
def _eval_loader(img_dir, ann_dir):
    return dict(
        batch_size=1,
        num_workers=2,
        persistent_workers=True,
        sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=_split(img_dir, ann_dir, test_pipeline))


val_dataloader = _eval_loader('images/val', 'annotations/val')
test_dataloader = _eval_loader('images/test', 'annotations/test')
waterbird_test_dataloader = _eval_loader('images/waterbird_test', 'annotations/test')
val_evaluator = dict(type='BinarySegMetric', iou_metrics=['mIoU', 'mDice'])  # + IoU.bird, Dice.bird
test_evaluator = val_evaluator
waterbird_test_evaluator = val_evaluator
