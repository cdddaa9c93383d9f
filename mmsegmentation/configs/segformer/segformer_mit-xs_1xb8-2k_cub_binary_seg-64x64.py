# A small SegFormer for the synthetic benchmark on a CPU: MiT with 16 channels, one block per stage and
# stride-2 patch embeddings (features at 1/2..1/16 of 64 px instead of 1/4..1/32), a 32-channel
# head; 8 crops of 64x64 per iteration, 2k iterations (about 2 minutes on 2 CPU cores). The U-Net
# config (unet/) reaches a higher mIoU in less time; this one exercises the paper's model family.
_base_ = [
    '../_base_/models/segformer_mit-b0.py', '../_base_/datasets/cub_binary_seg-64x64.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_1k.py'
]
crop_size = (64, 64)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        embed_dims=16,
        num_layers=[1, 1, 1, 1],
        patch_sizes=[3, 3, 3, 3],
        strides=[2, 2, 2, 2],
        sr_ratios=[8, 4, 2, 1],
        drop_path_rate=0.0),
    decode_head=dict(in_channels=[16, 32, 80, 128], channels=32, dropout_ratio=0.0))

max_iters = 2000
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=50, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(checkpoint=dict(interval=max_iters))
