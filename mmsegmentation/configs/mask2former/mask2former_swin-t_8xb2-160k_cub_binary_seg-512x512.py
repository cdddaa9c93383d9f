# Mask2Former Swin-T, 512x512 crops, 160k iterations of 8 GPUs x 2 images: the paper's segmenter.
# No pretrained weights by default (nothing is downloaded); e.g.
#   --cfg-options model.pretrained=checkpoints/swin_tiny_patch4_window7_224_20220317-1cdeb081.pth
#   --cfg-options load_from=checkpoints/mask2former_swin-t_8xb2-160k_ade20k-512x512.pth
_base_ = [
    '../_base_/models/mask2former_swin-t.py', '../_base_/datasets/cub_binary_seg.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
custom_imports = dict(
    imports=['bgmask.seg.compat', 'bgmask.seg.dataset', 'mmdet.models'], allow_failed_imports=False)
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomChoiceResize',
        scales=[int(512 * x * 0.1) for x in range(5, 21)],
        resize_type='ResizeShortestEdge',
        max_size=2048),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

# AdamW; the backbone learns at 0.1x; no weight decay on norms and embeddings.
depths = [2, 2, 6, 2]
backbone_norm_multi = dict(lr_mult=0.1, decay_mult=0.0)
backbone_embed_multi = dict(lr_mult=0.1, decay_mult=0.0)
embed_multi = dict(lr_mult=1.0, decay_mult=0.0)
custom_keys = {
    'backbone': dict(lr_mult=0.1, decay_mult=1.0),
    'backbone.patch_embed.norm': backbone_norm_multi,
    'backbone.norm': backbone_norm_multi,
    'absolute_pos_embed': backbone_embed_multi,
    'relative_position_bias_table': backbone_embed_multi,
    'query_embed': embed_multi,
    'query_feat': embed_multi,
    'level_embed': embed_multi,
}
custom_keys.update({
    f'backbone.stages.{stage_id}.blocks.{block_id}.norm': backbone_norm_multi
    for stage_id, num_blocks in enumerate(depths) for block_id in range(num_blocks)
})
custom_keys.update({
    f'backbone.stages.{stage_id}.downsample.norm': backbone_norm_multi
    for stage_id in range(len(depths) - 1)
})
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.05, eps=1e-8, betas=(0.9, 0.999)),
    clip_grad=dict(max_norm=0.01, norm_type=2),
    paramwise_cfg=dict(custom_keys=custom_keys, norm_decay_mult=0.0))
param_scheduler = [
    dict(type='PolyLR', eta_min=0, power=0.9, begin=0, end=160000, by_epoch=False)
]
default_hooks = dict(checkpoint=dict(save_best='mIoU', rule='greater'))
auto_scale_lr = dict(enable=False, base_batch_size=16)
