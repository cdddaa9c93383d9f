"""Mask prediction speed: the segmenter's forward pass, and `predict_masks.py` end to end.

    python benchmarks/bench_seg.py --data_path DIR [--config CFG] [--checkpoint CKPT] [--device cpu]

Without --checkpoint the config's model is saved untrained as a slim checkpoint first (speed does
not depend on the weights), so the script needs no trained segmenter. Rows (section `masks`):
- segmenter forward (preloaded): `Segmenter.__call__` on a preloaded batch at the data's image size;
- predict_masks.py: JPEG in, forward, PNG out, for every image of the dataset and its Waterbirds
  copies, divided by the forward row.
`--save_checkpoint PATH` keeps the checkpoint (run_all.py passes it on to the online-segmenter row).
Prints a Markdown table (see run_all.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import add_common_args, emit, interleaved, machine_line, make_row, peak_memory_mib, reset_peak_memory

import bgmask  # noqa: F401  (before torch: the OpenMP wait policy default)
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "mmsegmentation/configs/unet/unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py"


def untrained_checkpoint(config: Path, dst: Path, seed: int = 0) -> Path:
    """The config's segmenter with its initial weights, as a slim checkpoint."""
    from bgmask.seg.checkpoint import save_slim
    from bgmask.seg.segmenter import build_model, read_config

    torch.manual_seed(seed)
    cfg = read_config(config)
    model = build_model(cfg, where=f"config {config}")
    model.init_weights()
    return save_slim(dst, model.state_dict(), model.dataset_meta, cfg.pretty_text, note="untrained (benchmark)")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="a CUB-layout dataset (e.g. `bgmask make-synthetic`)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the config's untrained weights")
    p.add_argument("--save_checkpoint", type=Path, default=None, help="where to keep the untrained checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="batches for the forward row")
    p.add_argument("--repeats", type=int, default=3)
    add_common_args(p)
    a = p.parse_args(argv)
    from PIL import Image

    from bgmask.data.cub import read_cub_metadata
    from bgmask.seg.predict import predict_masks
    from bgmask.seg.segmenter import load_segmenter

    device = torch.device(a.device)
    meta = read_cub_metadata(a.data_path)
    with Image.open(Path(a.data_path) / "images" / meta.relpaths[meta.ids[0]]) as im:
        w, h = im.size
    name = a.config.stem
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint or untrained_checkpoint(a.config, a.save_checkpoint or Path(tmp) / "untrained.pth")
        seg = load_segmenter(a.config, ckpt, device=device, batch_size=a.batch_size)
        x = torch.randn(a.batch_size, 3, h, w, device=device)
        seg(x)  # warm-up

        def forward():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                seg(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return a.steps * a.batch_size, time.perf_counter() - t0

        images, seconds, mem = interleaved({"fwd": forward}, a.repeats, device)["fwd"]
        rows.append(make_row("masks", name, f"segmenter forward (preloaded, {h}x{w})", images, seconds, mem))
        reset_peak_memory(device)
        s = predict_masks(a.data_path, Path(tmp) / "pred", str(a.config), ckpt, batch_size=a.batch_size,
                          device=a.device, empty_warn_fraction=1.0, progress=False)
        rows.append(make_row("masks", name, "predict_masks.py (JPEG in, PNG out)", s["predicted"], s["seconds"],
                             peak_memory_mib(device), ref=f"segmenter forward (preloaded, {h}x{w})"))
    return emit(rows, f"mask prediction; device={device} batch={a.batch_size}; untrained weights: "
                      f"{a.checkpoint is None}; {machine_line(a.device)}", a.json)


if __name__ == "__main__":
    main()
