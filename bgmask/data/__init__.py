"""Datasets (CUB, Waterbirds, synthetic benchmark) and joint image/mask transforms.

Names are imported lazily so that `bgmask make-synthetic` (numpy + PIL only) does not pay for torch.
"""

_EXPORTS = {
    "WATERBIRDS_SUBDIR": "bgmask.data.cub", "CUBDataset": "bgmask.data.cub", "CUBMetadata": "bgmask.data.cub",
    "MaskSource": "bgmask.data.cub", "read_cub_metadata": "bgmask.data.cub", "split_ids": "bgmask.data.cub",
    "build_transform": "bgmask.data.transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bgmask.data' has no attribute {name!r}")
