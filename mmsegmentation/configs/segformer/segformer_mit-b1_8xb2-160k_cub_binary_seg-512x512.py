# SegFormer MiT-b1: MiT-b0's recipe with the wider b1 encoder.
#   --cfg-options model.pretrained=checkpoints/mit_b1_20220624-02e5a6a1.pth   (ImageNet backbone)
_base_ = ['./segformer_mit-b0_8xb2-160k_cub_binary_seg-512x512.py']
model = dict(
    backbone=dict(embed_dims=64, num_heads=[1, 2, 5, 8], num_layers=[2, 2, 2, 2]),
    decode_head=dict(in_channels=[64, 128, 320, 512]))
