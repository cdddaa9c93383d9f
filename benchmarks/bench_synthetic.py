"""Speed of the synthetic benchmark generator, single-threaded, written to a temporary folder.

    python benchmarks/bench_synthetic.py                 # 64 and 128 px, 10 classes x (24 + 6) images
    python benchmarks/bench_synthetic.py --sizes 64 --train-per-class 80 --test-per-class 20

Prints a Markdown table. `images` counts every rendered file set: train + test + Waterbirds copies
of the test images. Peak RSS is the process maximum so far (it never goes down between rows).
Timings vary several-fold when another heavy job shares the CPU: the load average is printed too.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # single-threaded numpy: must be set before numpy is imported

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bgmask.data.synthetic import generate_synthetic  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the synthetic birds generator.", add_help=add_help)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes in pixels")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=24)
    p.add_argument("--test-per-class", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="parent folder for the generated data (default: a temp dir)")
    return p


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def main(argv=None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    rss_imports = peak_rss_mib()  # importing bgmask.data pulls in torch via the package __init__
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for size in args.sizes:
            t0 = time.perf_counter()
            s = generate_synthetic(Path(tmp) / f"synthetic_{size}", num_classes=args.num_classes, image_size=size,
                                   train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                                   seed=args.seed, progress=False)
            seconds = time.perf_counter() - t0
            n = s.num_train + s.num_test + s.num_waterbirds
            rows.append(dict(image_size=size, images=n, seconds=seconds, images_per_s=n / seconds,
                             ms_per_image=1000 * seconds / n, peak_rss_mib=peak_rss_mib()))
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"synthetic generator, 1 thread, {args.num_classes} classes, load average {load}, "
          f"peak RSS after imports {rss_imports:.0f} MiB\n")
    print("| image_size | images | seconds | images/s | ms/image | peak RSS (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['image_size']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} "
              f"| {r['ms_per_image']:.2f} | {r['peak_rss_mib']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
