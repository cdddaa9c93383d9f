"""The `bgmask` command (also `python -m bgmask`)."""

from __future__ import annotations

import argparse

from bgmask import args as A
from bgmask.errors import ArgumentParser, UserError, run_cli


def waterbirds_splits_of(ns: argparse.Namespace):
    """The --waterbirds_* flags as a WaterbirdsSplits (None without --waterbirds_splits); a value for one
    of them without --waterbirds_splits is refused rather than ignored."""
    from bgmask.data.synthetic_waterbirds import WaterbirdsSplits

    given = [f"--{k}" for k in ("waterbirds_val_fraction", "waterbirds_correlation") if getattr(ns, k) is not None]
    if not ns.waterbirds_splits:
        if given:
            raise UserError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} used only with "
                            "--waterbirds_splits (expected that flag too, or none of them)")
        return None
    defaults = WaterbirdsSplits()
    return WaterbirdsSplits(
        defaults.val_fraction if ns.waterbirds_val_fraction is None else ns.waterbirds_val_fraction,
        defaults.correlation if ns.waterbirds_correlation is None else ns.waterbirds_correlation)


def cmd_make_synthetic(ns: argparse.Namespace) -> int:
    from bgmask.data.synthetic import Quirks, generate_synthetic

    summary = generate_synthetic(
        ns.out, num_classes=ns.num_classes, image_size=ns.image_size, train_per_class=ns.train_per_class,
        test_per_class=ns.test_per_class, correlation=ns.correlation, seed=ns.seed, overwrite=ns.overwrite,
        quirks=Quirks(ns.varied_sizes, ns.grayscale_fraction, ns.cmyk_fraction), waterbirds=waterbirds_splits_of(ns),
    )
    print(summary.to_text())
    return 0


def cmd_make_binary_seg(ns: argparse.Namespace) -> int:
    from bgmask.data.binary_seg import make_binary_seg

    print(make_binary_seg(ns.cub_root, ns.out, ns.val_fraction, ns.seed, ns.overwrite,
                          workers=ns.workers).to_text())
    return 0


def cmd_make_masked(ns: argparse.Namespace) -> int:
    from bgmask.masking.make_masked import make_masked

    counts = make_masked(ns.cub_root, ns.masks, ns.out_subdir, ns.mask_fill, ns.mask_threshold,
                         workers=ns.workers)
    for sub, n in counts.items():
        print(f"{n} masked images in {ns.cub_root}/{sub}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from bgmask.apps.report import write_report
    from bgmask.apps.report_waterbirds import write_waterbirds_report

    write = write_waterbirds_report if ns.protocol == "waterbirds" else write_report
    paths = write(ns.run_dirs, ns.out, ns.title)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from bgmask.apps.demo import main_demo

    return main_demo(ns)


def cmd_dfr(ns: argparse.Namespace) -> int:
    from bgmask.apps.dfr import main_dfr

    return main_dfr(ns)


def cmd_pretrain(ns: argparse.Namespace) -> int:
    from bgmask.apps.zoo import main_pretrain

    return main_pretrain(ns)


def cmd_mask_sweep(ns: argparse.Namespace) -> int:
    from bgmask.apps.sweep import main_sweep

    return main_sweep(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bgmask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-synthetic", help="generate the synthetic benchmark (CUB + Waterbirds layout)")
    A.make_synthetic_args(p).set_defaults(func=cmd_make_synthetic)
    p = sub.add_parser("make-binary-seg", help="write the cub_binary_segmentation dataset for MMSeg")
    A.make_binary_seg_args(p).set_defaults(func=cmd_make_binary_seg)
    p = sub.add_parser("make-masked", help="write early-masked copies of the images and the Waterbirds folder")
    A.make_masked_args(p).set_defaults(func=cmd_make_masked)
    p = sub.add_parser("report", help="aggregate run folders into results.md/csv/json and plots")
    p.add_argument("run_dirs", nargs="+", help="run folders written by train.py or the demo")
    A.add(p, "--out", default="report", output="folder")
    A.add(p, "--title", default="Results")
    A.add(p, "--protocol", default="cub", choices=list(A.PROTOCOLS),
          help="cub: the paper's tables (CUB test, Waterbirds); waterbirds: runs of --protocol waterbirds, one row "
               "per model x method x strategy x masks x data, worst-group / mean-group / test / weighted accuracy")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("demo", help="run the paper's comparison on the synthetic benchmark (make demo)")
    from bgmask.apps.demo import demo_args

    demo_args(p).set_defaults(func=cmd_demo)
    p = sub.add_parser("dfr", help="Deep Feature Reweighting on a checkpoint trained under --protocol waterbirds")
    from bgmask.apps.dfr import dfr_args

    dfr_args(p).set_defaults(func=cmd_dfr)
    p = sub.add_parser("pretrain", help="make a stand-in pretrained backbone of the model zoo (bgmask/zoo/)")
    from bgmask.apps.zoo import pretrain_args

    pretrain_args(p).set_defaults(func=cmd_pretrain)
    p = sub.add_parser("mask-sweep", help="accuracy against mask quality: perturbed GT masks, early and late masking")
    from bgmask.apps.sweep import sweep_args

    sweep_args(p).set_defaults(func=cmd_mask_sweep)
    return parser


@run_cli
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    raise SystemExit(main())
