# Runtime shared by every config (MMSeg's default_runtime plus what bgmask needs).
default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # train.py switches to gloo when no GPU is visible.
    dist_cfg=dict(backend='nccl'),
)
# BN in one process; under a launcher (torchrun ... --launcher pytorch) mmengine's Runner converts
# every BatchNorm to torch SyncBatchNorm.
sync_bn = 'torch'
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
randomness = dict(seed=0)
# Whole-model initial weights (e.g. an ADE20K checkpoint): none by default, nothing is downloaded.
# Override with --cfg-options load_from=PATH; backbone weights with --cfg-options model.pretrained=PATH.
load_from = None
resume = False
tta_model = dict(type='SegTTAModel')
