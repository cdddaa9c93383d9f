"""Speed of the synthetic benchmark generator, single-threaded, written to a temporary folder.

    python benchmarks/bench_synthetic.py                 # 64 and 128 px, 10 classes x (24 + 6) images
    python benchmarks/bench_synthetic.py --sizes 64 --train-per-class 80 --test-per-class 20

Prints a Markdown table (the format of `run_all.py`). `images` counts every rendered file set:
train + test + Waterbirds copies of the test images. Peak memory is the process's peak RSS during the
row. Timings vary several-fold when another heavy job shares the CPU: the load average is printed.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # single-threaded numpy: must be set before numpy is imported

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from common import add_common_args, emit, machine_line, make_row, peak_memory_mib, reset_peak_memory  # noqa: E402

from bgmask.data.synthetic import generate_synthetic  # noqa: E402

GOAL_IMAGES_PER_S_64PX = 200  # the default demo's 3,000 images in well under a minute


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the synthetic birds generator.", add_help=add_help)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes in pixels")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=24)
    p.add_argument("--test-per-class", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="parent folder for the generated data (default: a temp dir)")
    add_common_args(p)
    return p


def main(argv=None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for size in args.sizes:
            reset_peak_memory("cpu")
            t0 = time.perf_counter()
            s = generate_synthetic(Path(tmp) / f"synthetic_{size}", num_classes=args.num_classes, image_size=size,
                                   train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                                   seed=args.seed, progress=False)
            seconds = time.perf_counter() - t0
            n = s.num_train + s.num_test + s.num_waterbirds
            rows.append(make_row("generation", "synthetic, 1 thread", f"{size} px, {args.num_classes} classes", n,
                                 seconds, peak_memory_mib("cpu"),
                                 goal=GOAL_IMAGES_PER_S_64PX if size == 64 else None, goal_kind="rate"))
    return emit(rows, f"synthetic generator; {machine_line()}", args.json)


if __name__ == "__main__":
    main()
