"""Data-preparation speed with worker processes: make-binary-seg, make-masked and (with a segmenter)
predict_masks, each with 1 worker and with --workers N, on a copy of a CUB-layout dataset.

    python benchmarks/bench_prep.py --data_path DIR [--workers 2] [--seg_config CFG --seg_checkpoint CKPT]

Rows: images/s of each stage (imports and, for predict_masks, model loading not counted; best of
--repeats); the N-worker row is divided by the 1-worker row of the same stage (goal >= 1.7x with 2
workers for the two per-image loops). predict_masks' "1 worker" decodes in the main process.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import add_common_args, emit, machine_line, make_row

import bgmask  # noqa: F401  (before torch: the OpenMP wait policy default)
from bgmask.data.binary_seg import make_binary_seg
from bgmask.masking.make_masked import make_masked


def stages(a, cub: Path, tmp: Path) -> dict:
    """stage -> fn(workers, k) -> (images, seconds); each call writes into a fresh folder."""
    def binseg(w, k):
        t0 = time.perf_counter()
        summary = make_binary_seg(cub, tmp / f"seg{w}_{k}", progress=False, workers=w)
        return sum(summary.counts.values()), time.perf_counter() - t0

    def masked(w, k):
        t0 = time.perf_counter()
        counts = make_masked(cub, "gt", f"m{w}_{k}", progress=False, workers=w)
        return sum(counts.values()), time.perf_counter() - t0

    out = {"make-binary-seg": binseg, "make-masked": masked}
    if a.seg_checkpoint:
        from bgmask.seg.predict import predict_masks

        def predict(w, k):
            s = predict_masks(cub, tmp / f"pred{w}_{k}", a.seg_config, a.seg_checkpoint, device="cpu",
                              progress=False, workers=0 if w == 1 else w)
            return s["predicted"], s["seconds"]  # the prediction loop alone (model loaded before)

        out["predict_masks"] = predict
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="a CUB-layout dataset (e.g. `bgmask make-synthetic`)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per row")
    p.add_argument("--seg_config", default=None)
    p.add_argument("--seg_checkpoint", default=None, help="a slim segmenter checkpoint: adds predict_masks")
    add_common_args(p)
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cub = Path(tmp) / "cub"
        shutil.copytree(a.data_path, cub, ignore=shutil.ignore_patterns("images_masked*"))
        for stage, fn in stages(a, cub, Path(tmp)).items():
            for w in (1, a.workers):
                best = min((fn(w, k) for k in range(a.repeats)), key=lambda r: r[1] / max(r[0], 1))
                rows.append(make_row("data preparation", stage, f"{w} worker(s)", best[0], best[1], None,
                                     ref=None if w == 1 else "1 worker(s)", goal=None if w == 1 or
                                     stage == "predict_masks" else 1.7))
    return emit(rows, f"data preparation, {a.data_path}; {machine_line()}", a.json)


if __name__ == "__main__":
    main()
