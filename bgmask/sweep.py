"""The mask-quality sweep (being built)."""

from __future__ import annotations

import argparse


def sweep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return parser


def main_sweep(ns: argparse.Namespace) -> int:
    raise NotImplementedError("bgmask mask-sweep is being built")
