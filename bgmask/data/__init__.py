"""Datasets (CUB, Waterbirds, synthetic benchmark) and joint image/mask transforms."""

from bgmask.data.cub import (  # noqa: F401
    WATERBIRDS_SUBDIR,
    CUBDataset,
    CUBMetadata,
    MaskSource,
    read_cub_metadata,
    split_ids,
)
from bgmask.data.transforms import build_transform  # noqa: F401
