"""Datasets (CUB, Waterbirds, synthetic benchmark) and joint image/mask transforms.

Names are imported lazily, so that a module of the package that needs no torch (the synthetic generator:
numpy + PIL) imports without it.
"""

_EXPORTS = {
    "WATERBIRDS_SUBDIR": "bgmask.data.cub", "CUBDataset": "bgmask.data.cub", "CUBMetadata": "bgmask.data.cub",
    "MaskSource": "bgmask.data.cub", "read_cub_metadata": "bgmask.data.cub", "split_ids": "bgmask.data.cub",
    "build_transform": "bgmask.data.transforms", "WaterbirdsDataset": "bgmask.data.waterbirds",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bgmask.data' has no attribute {name!r}")
