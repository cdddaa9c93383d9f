# SegFormer MiT-b0, 512x512 crops, 160k iterations of 8 GPUs x 2 images, binary CUB segmentation.
# No pretrained weights by default (nothing is downloaded); e.g.
#   --cfg-options model.pretrained=checkpoints/mit_b0_20220624-7e0fe6dd.pth   (ImageNet backbone)
#   --cfg-options load_from=checkpoints/segformer_mit-b0_512x512_160k_ade20k.pth   (whole model)
_base_ = [
    '../_base_/models/segformer_mit-b0.py', '../_base_/datasets/cub_binary_seg.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor)

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'pos_block': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            'head': dict(lr_mult=10.)
        }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
