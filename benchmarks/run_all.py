"""`make bench`: run every benchmark script in turn and print their tables.

    python benchmarks/run_all.py [--data_path DIR]   # DIR: a synthetic benchmark for the data rows
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=None, help="synthetic benchmark for the engine+data rows "
                   "(default: generate a small one in /tmp)")
    ns = p.parse_args()
    data = ns.data_path
    if data is None:
        data = "/tmp/bgmask_bench_data"
        if not (Path(data) / "images.txt").is_file():
            subprocess.run([sys.executable, "-m", "bgmask", "make-synthetic", "--out", data, "--train_per_class", "100",
                            "--test_per_class", "10", "--overwrite"], check=True)
    for cmd in ([HERE / "bench_synthetic.py"],
                [HERE / "bench_train.py", "--data_path", data, "--channels_last"]):
        print(f"\n## {Path(cmd[0]).name}\n", flush=True)
        rc = subprocess.run([sys.executable, *map(str, cmd)]).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
