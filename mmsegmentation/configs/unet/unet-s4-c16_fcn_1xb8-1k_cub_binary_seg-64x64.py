# The CPU config of the synthetic benchmark (`bgmask make-synthetic` at 64 px, then
# `bgmask make-binary-seg`): a small U-Net, 8 crops of 64x64 per iteration, 1k iterations
# (about 100 s on 2 CPU cores; see mmsegmentation/README.md). Not for real CUB: use the 512x512 configs.
_base_ = [
    '../_base_/models/fcn_unet-s4-c16.py', '../_base_/datasets/cub_binary_seg-64x64.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_1k.py'
]
crop_size = (64, 64)
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor)
