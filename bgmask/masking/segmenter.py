"""The online segmenter of late masking (and the source of predicted masks for early masking).

A mask function maps a batch of classifier images, normalised with the classifier's mean/std,
to a bird mask of the same size:

    mask_fn(images)   # images (B, 3, H, W) float, normalised -> masks (B, 1, H, W) float in {0, 1}, 1 = bird

`load_segmenter(config_path, checkpoint_path, device="cpu", input_mean=..., input_std=...,
batch_size=None)` builds one from an MMSeg config and the slim checkpoint written by
`mmsegmentation/train.py`; it converts the classifier's normalisation and size to the segmenter's,
runs without gradients on `device`, and returns masks on the images' device. MMSeg is imported only
when it is called (see `bgmask.seg.segmenter`).
"""

from bgmask.seg.segmenter import Segmenter, load_segmenter  # noqa: F401

__all__ = ["Segmenter", "load_segmenter"]
