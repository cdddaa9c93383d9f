"""The model zoo of stand-in pretrained backbones (being built)."""

from __future__ import annotations

import argparse


def pretrain_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return parser


def main_pretrain(ns: argparse.Namespace) -> int:
    raise NotImplementedError("bgmask pretrain is being built")
