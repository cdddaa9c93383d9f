"""Command-line flags, defined once. Scripts combine these groups with `parents=[...]`.

Flags use the paper's underscore spelling (`--image_size`); each also accepts a dashed alias
(`--image-size`).
"""

from __future__ import annotations

import argparse


def add(group, flag: str, *more, **kwargs):
    """add_argument with a dashed alias for an underscored flag."""
    names = [flag, *more]
    if flag.startswith("--") and "_" in flag:
        names.append(flag.replace("_", "-"))
    return group.add_argument(*names, **kwargs)


def make_synthetic_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add(parser, "--out", required=True, help="output folder (CUB_200_2011 layout)")
    add(parser, "--num_classes", type=int, default=10)
    add(parser, "--image_size", type=int, default=64)
    add(parser, "--train_per_class", type=int, default=400)
    add(parser, "--test_per_class", type=int, default=100)
    add(parser, "--correlation", type=float, default=0.95,
        help="fraction of train / in-distribution test images on their species' home habitat")
    add(parser, "--seed", type=int, default=0)
    add(parser, "--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def make_binary_seg_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add(parser, "--cub_root", required=True, help="CUB_200_2011 root (real or synthetic)")
    add(parser, "--out", required=True, help="output folder (cub_binary_segmentation layout)")
    add(parser, "--val_fraction", type=float, default=0.1,
        help="fraction of CUB train images held out as the segmentation val split")
    add(parser, "--seed", type=int, default=0)
    add(parser, "--overwrite", action="store_true")
    return parser
