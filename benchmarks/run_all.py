"""`make bench`: every benchmark, one table.

    python benchmarks/run_all.py                   # CPU: 64 px, tiny CNN + tiny ViT (about 5 minutes on 2 cores)
    python benchmarks/run_all.py --gpu             # CUDA: 224 px ConvNeXt-T + ViT-S/14, bf16, channels_last (CNN)
    python benchmarks/run_all.py --gpu --torchcompile
    python benchmarks/run_all.py --quick           # a smoke run of every row (seconds; the figures mean nothing)
    python benchmarks/run_all.py --gpu --device cpu --batch_size 2 --steps 1 --repeats 1   # dry run of --gpu

Runs, each in its own process (so peak memory is per script): synthetic generation
(bench_synthetic.py), data loading (bench_data.py), mask prediction (bench_seg.py, which also saves the
untrained segmenter used by the online-segmenter row) and training / evaluation (bench_train.py).
Prints one Markdown table and writes OUT/bench.{md,csv,json,png}: images/s, seconds, peak memory, and
each figure's ratio against its reference row of the same run, with the goal where there is one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import markdown_table, machine_line, resolve, write_outputs  # noqa: E402

SEG_CONFIGS = {
    "cpu": REPO / "mmsegmentation/configs/unet/unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py",
    "gpu": REPO / "mmsegmentation/configs/segformer/segformer_mit-b0_8xb2-160k_cub_binary_seg-512x512.py",
}

# preset -> settings; every figure of a preset is measured in the same run
PRESETS = {
    "cpu": dict(device="cpu", image_size=64, models=["bgmask_resnet_tiny", "bgmask_vit_tiny"], batch_size=64,
                steps=20, warmup=3, repeats=3, amp=False, gen_sizes=[64, 128], gen_per_class=(24, 6),
                data_per_class=(100, 10), data_batches=20, seg_steps=10, seg_batch=16, num_workers=1),
    "gpu": dict(device="cuda", image_size=224, models=["convnext_tiny", "vit_small_patch14_dinov2"], batch_size=64,
                steps=30, warmup=5, repeats=3, amp=True, gen_sizes=[64, 224], gen_per_class=(24, 6),
                data_per_class=(200, 10), data_batches=10, seg_steps=10, seg_batch=32, num_workers=8),
    "quick": dict(device="cpu", image_size=32, models=["bgmask_resnet_tiny", "bgmask_vit_tiny"], batch_size=8,
                  steps=2, warmup=1, repeats=1, amp=False, gen_sizes=[32], gen_per_class=(2, 1),
                  data_per_class=(4, 2), data_batches=2, seg_steps=1, seg_batch=4, num_workers=1),
}


def run_script(script: str, args: list[str], json_path: Path) -> list[dict]:
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(json_path)]
    print(f"\n## {script}\n$ {' '.join(cmd[1:])}", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc:
        print(f"error: {script} failed with exit status {rc}", file=sys.stderr)
        raise SystemExit(2)
    return json.loads(json_path.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="the CUDA preset (224 px ConvNeXt-T and ViT-S/14, bf16)")
    mode.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, 1 repeat")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training models")
    p.add_argument("--data_path", default=None, help="an existing synthetic benchmark at the preset's image size "
                   "(default: generate one in OUT/data)")
    p.add_argument("--out", type=Path, default=REPO / "bench_output", help="folder for bench.{md,csv,json}")
    p.add_argument("--only", nargs="+", default=None, choices=["generation", "data", "masks", "train"],
                   help="run only these parts")
    o = p.add_argument_group("overrides of the preset's settings (e.g. a CPU dry run of --gpu)")
    for key, typ in (("device", str), ("image_size", int), ("batch_size", int), ("steps", int), ("warmup", int),
                     ("repeats", int), ("seg_batch", int), ("data_batches", int), ("num_workers", int)):
        o.add_argument(f"--{key}", type=typ, default=None)
    o.add_argument("--models", nargs="+", default=None)
    a = p.parse_args(argv)
    preset = "gpu" if a.gpu else "quick" if a.quick else "cpu"
    s = dict(PRESETS[preset])
    s.update({k: v for k, v in vars(a).items() if k in s and v is not None})
    if s["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --gpu needs a CUDA device, and torch.cuda.is_available() is False", file=sys.stderr)
            return 2
    parts = set(a.only or ["generation", "data", "masks", "train"])
    try:
        import mmseg  # noqa: F401
    except ImportError:
        if "masks" in parts:
            print("note: mmsegmentation is not installed (pip install -e '.[seg]'): skipping the mask-prediction "
                  "and online-segmenter rows", file=sys.stderr)
        parts.discard("masks")
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    data = a.data_path
    if data is None and parts & {"data", "masks", "train"}:
        data = out / f"data_{s['image_size']}px"
        train_pc, test_pc = s["data_per_class"]
        if not (data / "images.txt").is_file():
            subprocess.run([sys.executable, "-m", "bgmask", "make-synthetic", "--out", str(data), "--image_size",
                            str(s["image_size"]), "--train_per_class", str(train_pc), "--test_per_class",
                            str(test_pc), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    rows = []
    if "generation" in parts:
        rows += run_script("bench_synthetic.py", ["--sizes", *map(str, s["gen_sizes"]), "--train-per-class",
                                                  str(s["gen_per_class"][0]), "--test-per-class",
                                                  str(s["gen_per_class"][1])], out / "generation.json")
    if "data" in parts:
        rows += run_script("bench_data.py", ["--data_path", str(data), "--image_size", str(s["image_size"]),
                                             "--batch_size", str(s["batch_size"]), "--max_batches",
                                             str(s["data_batches"]), "--num_workers", str(s["num_workers"])],
                           out / "data.json")
    seg_config, seg_ckpt = SEG_CONFIGS["gpu" if preset == "gpu" else "cpu"], out / "segmenter_untrained.pth"
    if "masks" in parts:
        rows += run_script("bench_seg.py", ["--data_path", str(data), "--config", str(seg_config), "--device",
                                            s["device"], "--batch_size", str(s["seg_batch"]), "--steps",
                                            str(s["seg_steps"]), "--repeats", str(s["repeats"]),
                                            "--save_checkpoint", str(seg_ckpt)], out / "masks.json")
    if "train" in parts:
        args = ["--device", s["device"], "--image_size", str(s["image_size"]), "--models", *s["models"],
                "--batch_size", str(s["batch_size"]), "--steps", str(s["steps"]), "--warmup", str(s["warmup"]),
                "--repeats", str(s["repeats"]), "--channels_last", "--data_path", str(data),
                "--num_workers", str(s["num_workers"])]
        if s["amp"]:
            args.append("--use_amp")
        if a.torchcompile:
            args += ["--torchcompile", a.torchcompile]
        if "masks" in parts and seg_ckpt.is_file():
            args += ["--seg_config", str(seg_config), "--seg_checkpoint", str(seg_ckpt)]
        rows += run_script("bench_train.py", args, out / "train.json")
    rows = resolve(rows)
    changed = {k: v for k, v in s.items() if PRESETS[preset][k] != v}
    header = (f"bgmask benchmark, preset {preset}{f', torchcompile={a.torchcompile}' if a.torchcompile else ''}"
              f"{f', overrides {changed}' if changed else ''}; "
              f"{machine_line(s['device'])}")
    write_outputs(rows, out, header)
    print(f"\n# All figures\n\n{header}\n\n{markdown_table(rows)}\n\nwritten to {out}/bench.{{md,csv,json,png}}")
    missed = [f"{r['model']} {r['row']}" for r in rows if r.get("met") is False]
    if missed:
        print(f"goals missed: {'; '.join(missed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
