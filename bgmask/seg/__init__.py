"""The MMSegmentation adapter: the only package outside `mmsegmentation/` that imports mmseg, mmengine
or mmcv, and only inside its modules' functions (or in `compat`/`dataset`, which MMSeg configs import).

    compat      stand-in `mmcv._ext` for mmcv-lite (pure-PyTorch paths; compiled ops fail clearly);
                the one setter of private mmengine state (use_test_split)
    dataset     CUBBinarySegDataset, BinarySegMetric (registered in MMSeg on import)
    checkpoint  slim weights-only checkpoints; trusted loading of full ones (own runs only)
    segmenter   load_segmenter(config, checkpoint) -> Segmenter: (B, 3, H, W) normalised -> (B, 1, H, W) {0, 1}
    config      the MMSeg config a command runs with: --cfg-options, --data-root, the launcher
    predict     masks (and masked image copies) for a folder of images, resumable
    cli         bodies and flags of mmsegmentation/train.py, test.py, predict_masks.py, ...

Importing this package registers the stand-in `mmcv._ext` (a sys.modules entry; nothing of mmcv is
imported), so MMSeg can be imported after it in any order.
"""

from bgmask.seg import compat as _compat  # noqa: F401  (registers the stand-in on import)
