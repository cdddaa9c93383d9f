"""`bgmask demo` / `make demo`: the paper's whole comparison, offline, on the synthetic benchmark.

Stages (each skipped on a rerun when its outputs exist for the same inputs; `--fresh` redoes all):
  1. data        synthetic CUB + Waterbirds benchmark
  2. segmenter   cub_binary_segmentation -> small MMSeg segmenter -> mIoU / mDice on test and Waterbirds
  3. masks       predicted masks for every image (cached folder) + early-masked copies
  4. runs        the paper's grid: {baseline, early, late} x {CNN, ViT} x {frozen, fine-tuned}, from the
                 shipped stand-in pretrained backbones (`bgmask pretrain`, bgmask/zoo_weights/: hub weights
                 cannot be downloaded here), predicted masks; `--preset full` adds the ViT's CLS and
                 CLS+GAP heads, GT-mask rows and 3 seeds; `--preset scratch` is the from-scratch control
  5. report      results.md/csv/json as the paper's tables, paper_bars.png, accuracy_bars.png,
                 examples.png (+ correlation_sweep.png)

`--protocol waterbirds` runs the standard Waterbirds protocol's grid instead (ERM, GroupDRO and DFR beside
early and late masking, 3 seeds, a control without the shortcut): bgmask/apps/demo_waterbirds.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

from bgmask import args as A
from bgmask.errors import UserError
from bgmask.runfolder import hold_folder
from bgmask.io import atomic_write_text
from bgmask.masking.strategies import STRATEGIES
from bgmask.stages import (INITS, MASKS, MODELS, PRESETS, Preset, Stages, classifier_settings, make_data,
                           train_run)

def demo_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    A.add(parser, "--out", default="demo_output", output="folder")
    A.add(parser, "--preset", default="default", choices=[*PRESETS, "paper"],
          help="default: the paper's grid on the shipped pretrained backbones (minutes on a CPU); full = all three "
               "ViT heads, GT-mask rows, 3 seeds; scratch = the from-scratch control; paper = print the real-data "
               "commands")
    A.add(parser, "--rows", nargs="+", default=None,
          help="rows as model:strategy:masks:init, e.g. cnn:late:GT:scratch vit:early:predicted:frozen")
    A.add(parser, "--seeds", nargs="+", type=int, default=None, range="[0, 2147483647]")
    A.add(parser, "--epochs", type=int, default=None, range="[1, 100000]",
          help="override the preset's epochs for every model")
    A.add(parser, "--correlation_sweep", nargs="+", type=float, default=None, range="[0, 1]",
          help="also train the CNN baseline at these training correlations and plot accuracy against them")
    A.add(parser, "--mask_sweep", nargs="*", default=None, metavar="NAME[:S1,S2,...]",
          help="also run `bgmask mask-sweep` on the demo's data (its fine-tuned CNN and ViT, early and late, "
               "perturbed at test, the segmenter's masks as points) and put sweep.png in the report; the "
               "perturbations as mask-sweep's --perturbations (none given: erode:1,2,4 dilate:1,2,4 drop:0.25,0.5)")
    A.add(parser, "--fresh", action="store_true", help="redo every stage")
    A.add(parser, "--threads", type=int, default=None, range="[1, 1024]")
    A.add(parser, "--data_path", default=None, help="--preset paper: the real CUB_200_2011 root")
    A.add(parser, "--protocol", default="cub", choices=list(A.PROTOCOLS),
          help="cub: the paper's comparison (above); waterbirds: the standard Waterbirds protocol, ERM / GroupDRO / "
               "DFR beside early and late masking, 3 seeds, with a control at train P(place = y) = 0.5 (presets "
               "default, tiny, paper; bgmask/apps/demo_waterbirds.py)")
    return parser


def parse_rows(specs) -> list[tuple]:
    rows = []
    for spec in specs:
        parts = spec.split(":")
        if (len(parts) != 4 or parts[0] not in MODELS or parts[1] not in STRATEGIES or parts[2] not in MASKS
                or parts[3] not in INITS):
            raise UserError(f"--rows {spec!r}: expected model:strategy:masks:init with model in {'|'.join(MODELS)}, "
                            f"strategy in {'|'.join(STRATEGIES)}, masks in {'|'.join(MASKS)}, init in {'|'.join(INITS)}")
        if STRATEGIES[parts[1]].needs_mask == (parts[2] == "-"):
            without = [n for n, s in STRATEGIES.items() if not s.needs_mask]
            raise UserError(f"--rows {spec!r}: {'/'.join(without)} takes masks '-', "
                            f"{'/'.join(n for n in STRATEGIES if n not in without)} take GT or predicted")
        rows.append(tuple(parts))
    return rows


def run_name(row, seed) -> str:
    model, strategy, masks, init = row
    return f"{model}-{strategy}-{masks.replace('-', 'none')}-{init}-s{seed}".lower()


# --------------------------------------------------------------------------------------- main

def main_demo(ns: argparse.Namespace) -> int:
    """The demo of --protocol cub (the paper's grid) or waterbirds (`bgmask.apps.demo_waterbirds`): with
    --preset paper its real-data commands, else its stages in the --out folder, held by this process."""
    if getattr(ns, "protocol", "cub") == "waterbirds":
        from bgmask.apps import demo_waterbirds as chosen
        commands, preset_of, stages_of = chosen.paper_commands, chosen.resolve_protocol_preset, chosen.protocol_stages
    else:
        commands, preset_of, stages_of = paper_commands, resolve_preset, demo_stages
    if ns.preset == "paper":
        print(commands(ns.data_path or "/path/to/CUB_200_2011"))
        return 0
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    p = preset_of(ns)
    with hold_folder(Path(ns.out), "--out"):  # one demo per folder: its stages and runs are this process's alone
        return stages_of(ns, p, Path(ns.out))


def demo_stages(ns: argparse.Namespace, p: Preset, out: Path) -> int:
    stages = Stages(out, ns.fresh)
    t_start = time.perf_counter()
    data_args = dict(num_classes=p.num_classes, image_size=p.image_size, train_per_class=p.train_per_class,
                     test_per_class=p.test_per_class, correlation=p.correlation, seed=0)
    data = make_data(stages, out, data_args)
    pred_masks, seg_result = make_masks(stages, out, data, data_args, p)
    run_dirs = train_rows(out, p, data, pred_masks, ns.threads)
    sweep = correlation_sweep(out, p, ns.correlation_sweep, ns.threads) if ns.correlation_sweep else None
    masks_png = mask_sweep(out, ns, data, pred_masks) if ns.mask_sweep is not None else None
    write_demo_report(out, run_dirs, data, pred_masks, seg_result, sweep, masks_png)
    print(f"[demo] finished in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


def resolve_preset(ns: argparse.Namespace) -> Preset:
    p = copy.deepcopy(PRESETS[ns.preset])  # the presets are shared: flags change this run's copy only
    if ns.rows:
        p.rows = parse_rows(ns.rows)
    if ns.seeds:
        p.seeds = tuple(ns.seeds)
    if ns.epochs:
        p.epochs = {init: {k: ns.epochs for k in by_kind} for init, by_kind in p.epochs.items()}
    return p


def make_masks(stages: Stages, out: Path, data: Path, data_args: dict, p: Preset):
    """Stages 2 and 3 (only when a row uses predicted masks): the segmenter, then its masks and copies."""
    if not any(r[2] == "predicted" for r in p.rows):
        return None, None
    from bgmask.apps import demo_seg

    pred_masks, seg_dir = out / "predicted_masks", out / "segmentation"
    seg_inputs = {"data": data_args, "iters": p.seg_iters, "image_size": p.image_size}
    seg_result = stages.run("segmenter", seg_inputs, lambda: demo_seg.train_and_test_segmenter(data, seg_dir, p),
                            demo_seg.describe_segmenter)
    stages.run("masks", seg_inputs, lambda: demo_seg.predict_and_copy(data, seg_dir, pred_masks, p),
               demo_seg.describe_masks)
    return pred_masks, seg_result


def train_rows(out: Path, p: Preset, data: Path, pred_masks, threads) -> list[Path]:
    """Stage 5: every row x seed, one line each (a finished run is read back, not retrained)."""
    from tqdm import tqdm

    jobs = [(seed, row) for seed in p.seeds for row in p.rows]
    run_dirs = []
    for seed, row in tqdm(jobs, desc="[demo] runs", unit="run", leave=False):
        run_dir = out / "runs" / run_name(row, seed)
        t0 = time.perf_counter()
        final = train_run(classifier_settings(row, seed, p, data, pred_masks, run_dir, threads), run_dir)
        tqdm.write(f"[demo] run {run_dir.name}: in-dist {final['test/acc']:.3f}  Waterbirds "
                   f"{final.get('waterbirds/acc', float('nan')):.3f}  ({time.perf_counter() - t0:.0f} s)")
        run_dirs.append(run_dir)
    return run_dirs


def write_demo_report(out: Path, run_dirs, data: Path, pred_masks, seg_result, sweep, masks_png=None) -> None:
    """Stage 5: results.md/csv/json (the paper layout first), the bar charts, the example grid, the
    attribution grid of the fine-tuned runs (+ the correlation sweep)."""
    from bgmask.apps.demo_plots import attribution_examples, example_grid, sweep_plot
    from bgmask.apps.report import write_report

    report = out / "report"
    paths = write_report(run_dirs, report, title="bgmask demo: synthetic CUB / Waterbirds")
    extra = [segmenter_section(seg_result)] if seg_result else []
    grid = example_grid(run_dirs, data, pred_masks, report / "examples.png")
    extra.append(f"\n![examples]({grid.name})\n")
    pictures = [paths["bars"], grid]
    looked = [d for d in run_dirs if "-finetuned-s" in Path(d).name] or list(run_dirs)
    attribution = attribution_examples(looked[:8], data, pred_masks, report / "attribution.png")
    if attribution is not None:
        pictures.append(attribution)
        extra.append("\n## Where the models look\n\nInputXGradient of the predicted class on Waterbirds images "
                     "(`bgmask.attribution`; inferno colours, bright = strong positive evidence), through each run's strategy; the tables' "
                     f"BG attribution columns give its share on the background.\n\n![attribution]({attribution.name})\n")
    if sweep:
        pictures.append(sweep_plot(sweep, report / "correlation_sweep.png"))
        extra.append(f"\n![correlation sweep]({pictures[-1].name})\n")
    if masks_png:
        pictures.append(Path(shutil.copyfile(masks_png, report / "mask_sweep.png")))
        extra.append("\n## Accuracy against mask quality\n\n`bgmask mask-sweep` (tables in "
                     f"{masks_png.parent / 'sweep.md'}).\n\n![mask sweep](mask_sweep.png)\n")
    with open(paths["md"], "a", encoding="utf-8") as f:
        f.write("".join(extra))
    print("\n" + paths["md"].read_text().split("\n![")[0].rstrip() + "\n")  # the table; the pictures are files
    print(f"[demo] report: {paths['md']}; pictures: {', '.join(map(str, pictures))}")


def segmenter_section(seg: dict) -> str:
    lines = ["\n## Segmenter\n", "| split | mIoU | mDice |", "|---|---|---|"]
    for split in ("test", "waterbird_test"):
        if split in seg:
            lines.append(f"| {split} | {seg[split]['mIoU']:.1f} | {seg[split]['mDice']:.1f} |")
    if "seconds" in seg:
        lines.append(f"\nTrained in {seg['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def correlation_sweep(out: Path, p: Preset, values, threads) -> list[dict]:
    from bgmask.data.synthetic import generate_synthetic

    points = []
    for corr in values:
        data = out / "data" / f"sweep_corr{corr:g}"
        if not (data / "images.txt").is_file():
            generate_synthetic(data, num_classes=p.num_classes, image_size=p.image_size,
                               train_per_class=p.train_per_class, test_per_class=p.test_per_class,
                               correlation=corr, seed=0, overwrite=True, progress=False)
        for strategy, masks in (("baseline", "-"), ("early", "GT")):
            run_dir = out / "sweep" / f"corr{corr:g}-{strategy}"
            final = train_run(classifier_settings(("cnn", strategy, masks, "scratch"), 0, p, data, None, run_dir,
                                                  threads), run_dir)
            points.append({"correlation": corr, "strategy": strategy, "test/acc": final["test/acc"],
                           "waterbirds/acc": final["waterbirds/acc"]})
    atomic_write_text(out / "report" / "correlation_sweep.json", json.dumps(points, indent=2))
    return points


def mask_sweep(out: Path, ns: argparse.Namespace, data: Path, pred_masks) -> Path:
    """--mask_sweep: `bgmask mask-sweep` on the demo's data with the demo's preset; returns its sweep.png."""
    from bgmask.apps.sweep import sweep_config, sweep_to_folder

    cfg = sweep_config("bgmask demo --mask_sweep", data_path=str(data), out=str(out / "mask_sweep"),
                       perturb_at=["test"], preset=ns.preset if ns.preset in PRESETS else "default",
                       perturbations=ns.mask_sweep or ["erode:1,2,4", "dilate:1,2,4", "drop:0.25,0.5"],
                       pred_masks=str(pred_masks) if pred_masks else None, threads=ns.threads)
    return sweep_to_folder(cfg)[1]["png"]


def paper_commands(root: str) -> str:
    """The real-data runs with the paper's hyper-parameters."""
    frozen = ("--epochs 90 --optimizer_type adamw --lr 1e-3 --weight_decay 1e-2 --scheduler_type cosine "
              "--smoothing 0.1 --freeze_backbone --image_size 518 --batch_size 32 --use_amp")
    ft = ("--epochs 300 --optimizer_type adamw --lr 4e-6 --scratch_lr_factor 1000 --min_lr 1e-8 --weight_decay 5e-2 "
          "--scheduler_type cosine_with_warmup --scheduler_warmup_epochs 20 --drop_path 0.1 --turn_on_mixup_or_cutmix "
          "--smoothing 0.1 --image_size 518 --batch_size 16 --use_amp")
    seg = "mmsegmentation/configs/mask2former/mask2former_swin-t_8xb2-160k_cub_binary_seg-512x512.py"
    return f"""# The paper's runs on the real CUB_200_2011 + Waterbirds (GPU). ROOT={root}
# 1. segmenter (Mask2Former Swin-T) and predicted masks
bgmask make-binary-seg --cub_root {root} --out data/cub_binary_segmentation
python mmsegmentation/train.py {seg} --data-root data/cub_binary_segmentation --work-dir work_dirs/m2f
python mmsegmentation/predict_masks.py --config {seg} --checkpoint work_dirs/m2f/segmenter_slim.pth --cub_root {root} --out_dir masks_m2f
bgmask make-masked --cub_root {root} --masks masks_m2f --out_subdir images_masked_m2f
# 2. frozen backbones (linear probe), one GPU; DINOv2 ViT-B with CLS+GAP head; ConvNeXt-B
python early_masking_and_baseline/train.py --data_path {root} --model_arch vit_base_patch14_dinov2.lvd142m --pretrained --strategy baseline {frozen} --snapshot_dir runs/vitb_frozen_baseline
python early_masking_and_baseline/train.py --data_path {root} --model_arch vit_base_patch14_dinov2.lvd142m --pretrained --image_sub_path_train images_masked_m2f --image_sub_path_test images_masked_m2f_waterbirds {frozen} --snapshot_dir runs/vitb_frozen_early
python late_masking/train.py --data_path {root} --model_arch vit_base_patch14_dinov2.lvd142m --pretrained --patch_tokens_only --mask_dir masks_m2f {frozen} --snapshot_dir runs/vitb_frozen_late
python early_masking_and_baseline/train.py --data_path {root} --model_arch convnext_base.fb_in22k --pretrained --strategy baseline {frozen} --snapshot_dir runs/convnextb_frozen_baseline
# 3. fine-tuned, 4 GPUs with torchrun (same flags on one GPU without torchrun)
torchrun --nproc_per_node=4 early_masking_and_baseline/train.py --data_path {root} --model_arch convnext_base.fb_in22k --pretrained --strategy early --mask_source masks_m2f {ft} --snapshot_dir runs/convnextb_ft_early
torchrun --nproc_per_node=4 late_masking/train.py --data_path {root} --model_arch vit_large_patch14_dinov2.lvd142m --pretrained --mask_dir masks_m2f {ft} --snapshot_dir runs/vitl_ft_late
# 4. evaluation and the table
python early_masking_and_baseline/eval_waterbirds.py --checkpoint runs/vitb_frozen_early/last.pt --data_path {root}
bgmask report runs/* --out report
"""
