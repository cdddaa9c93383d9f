"""`bgmask demo --protocol waterbirds`: the standard Waterbirds protocol (Sagawa et al. 2020) on the synthetic
benchmark: the group-robustness methods (GroupDRO, DFR) beside early and late masking, from the demo's
fine-tuned zoo CNN (`bgmask.stages.protocol_settings`).

Stages (a rerun skips each finished one; `--fresh` redoes all):
  1. data           the synthetic benchmark with the complete Waterbirds folder (splits 0/1/2), the train
                    split's P(place = y) = 0.95: the shortcut
  2. data_control   the same birds with P(place = y) = 0.5 in train: no shortcut, the control
  3. runs           for every seed, the rows of `protocol_rows`: every training method on plain images,
                    every masking strategy with ERM (GT masks), every post-hoc method on the ERM run of
                    plain images and of pixel-level masking (DFR on RUN/last.pt: the base model trained
                    to the end, as the DFR reference), and ERM on the control folder
  4. report         OUT/report/waterbirds.md / .csv / .json / .png (`bgmask report --protocol waterbirds`)

`--preset paper` prints the same grid on the real Waterbirds + CUB for a GPU (`paper_commands`).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

from bgmask.errors import UserError
from bgmask.masking.strategies import STRATEGIES
from bgmask.methods import DFR, ERM, METHODS
from bgmask.stages import Preset, Stages, dfr_run, make_data, protocol_settings, train_run

RUNNERS = {DFR.name: dfr_run}  # post-hoc method -> the stage that applies it to a checkpoint


def protocol_rows() -> list[tuple[str, str, str]]:
    """(method, strategy, data) of the grid, from the registries; data is "shortcut" or "control"."""
    plain = next(n for n, s in STRATEGIES.items() if not s.needs_mask)
    masking = [n for n, s in STRATEGIES.items() if s.needs_mask]
    trained = [n for n, m in METHODS.items() if not m.post_hoc]
    post_hoc = [n for n, m in METHODS.items() if m.post_hoc and n in RUNNERS]
    rows = [(m, plain, "shortcut") for m in trained + post_hoc]
    rows += [(ERM.name, s, "shortcut") for s in masking]
    rows += [(m, s, "shortcut") for m in post_hoc for s in masking if not STRATEGIES[s].masks_features]
    return rows + [(ERM.name, plain, "control")]


@dataclass
class ProtocolPreset:
    """The data and the fine-tuned CNN's recipe (`recipe`: sizes, epochs, batch size, lr as the demo's
    `Preset`, its `correlation` the shortcut's train P(place = y)), the control's P(place = y), the val
    share of CUB's train images, the rows and the seeds."""

    recipe: Preset
    control: float = 0.5
    val_fraction: float = 0.2
    rows: list = field(default_factory=protocol_rows)
    seeds: tuple = (0, 1, 2)

    def correlation(self, data: str) -> float:
        return self.control if data == "control" else self.recipe.correlation


PROTOCOL_PRESETS = {
    "default": ProtocolPreset(Preset(num_classes=10, image_size=64, train_per_class=100, test_per_class=40,
                                     epochs={"finetuned": {"cnn": 3}}, batch_size=64, lr={"cnn": 2e-3}, rows=[])),
    "tiny": ProtocolPreset(Preset(num_classes=4, image_size=32, train_per_class=20, test_per_class=4,
                                  epochs={"finetuned": {"cnn": 1}}, batch_size=16, lr={"cnn": 2e-3}, rows=[]),
                           seeds=(0,)),
}


def resolve_protocol_preset(ns: argparse.Namespace) -> ProtocolPreset:
    """The preset with --seeds / --epochs applied; flags of the CUB-protocol demo only are refused."""
    if ns.preset not in PROTOCOL_PRESETS:
        raise UserError(f"--preset {ns.preset} is a preset of the CUB-protocol demo; with --protocol waterbirds: "
                        f"{', '.join([*PROTOCOL_PRESETS, 'paper'])}")
    for flag in ("rows", "correlation_sweep", "mask_sweep"):
        if getattr(ns, flag) is not None:
            raise UserError(f"--{flag} belongs to the CUB-protocol demo (the Waterbirds protocol's grid is fixed: "
                            "methods x strategies, see `bgmask demo --help`)")
    p = copy.deepcopy(PROTOCOL_PRESETS[ns.preset])
    if ns.seeds:
        p.seeds = tuple(ns.seeds)
    if ns.epochs:
        p.recipe.epochs = {"finetuned": {"cnn": ns.epochs}}
    return p


def protocol_stages(ns: argparse.Namespace, p: ProtocolPreset, out: Path) -> int:
    from bgmask.apps.report_waterbirds import write_waterbirds_report

    stages = Stages(out, ns.fresh)
    t_start = time.perf_counter()
    r = p.recipe
    data_args = dict(num_classes=r.num_classes, image_size=r.image_size, train_per_class=r.train_per_class,
                     test_per_class=r.test_per_class, correlation=r.correlation, seed=0)
    datas = {}
    for data in dict.fromkeys(row[2] for row in p.rows):
        splits = {"val_fraction": p.val_fraction, "correlation": p.correlation(data)}
        name = "data" if data == "shortcut" else f"data_{data}"
        datas[data] = make_data(stages, out, data_args, name, f"waterbirds_{data}", waterbirds=splits)
    run_dirs = run_rows(out, p, datas, ns.threads)
    paths = write_waterbirds_report(run_dirs, out / "report", "bgmask demo: the Waterbirds protocol (synthetic)")
    print("\n" + paths["md"].read_text().split("\n![")[0].rstrip() + "\n")
    print(f"[demo] report: {paths['md']}, {paths['csv']}, {paths['json']}; picture: {paths['png']}")
    print(f"[demo] finished in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


def run_name(method: str, strategy: str, data: str, seed: int | str) -> str:
    return f"{method}-{strategy}-{data}-s{seed}"


def run_rows(out: Path, p: ProtocolPreset, datas: dict, threads) -> list[Path]:
    """Every row x seed, one line each; a finished run (or DFR folder) is read back, not redone."""
    from tqdm import tqdm

    run_dirs = []
    for seed, (method, strategy, data) in tqdm([(s, row) for s in p.seeds for row in p.rows], desc="[demo] runs",
                                                unit="run", leave=False):
        t0 = time.perf_counter()
        if METHODS[method].post_hoc:  # applied to the ERM run of the same strategy, data and seed
            base, _ = train(out, p, (ERM.name, strategy, data), seed, datas[data], threads)
            run_dir = base / method
            overrides = dict(checkpoint=str(base / "last.pt"), data_path=str(datas[data]), num_workers=1,
                             no_progress=True, **({"threads": threads} if threads else {}))
            final = RUNNERS[method](overrides, {"dfr_seed": seed}, run_dir)
            name = f"{method} on {base.name}"
        else:
            run_dir, final = train(out, p, (method, strategy, data), seed, datas[data], threads)
            name = run_dir.name
        tqdm.write(f"[demo] run {name}: worst group {final['test/worst_group_acc']:.3f}  mean group "
                   f"{final['test/mean_group_acc']:.3f}  test {final['test/acc']:.3f}  "
                   f"({time.perf_counter() - t0:.0f} s)")
        run_dirs.append(run_dir)
    return run_dirs


def train(out: Path, p: ProtocolPreset, row, seed: int, data: Path, threads) -> tuple[Path, dict]:
    """(run folder, final record) of (method, strategy, data) for `seed` (`bgmask.stages.train_run`: a
    finished run is read back)."""
    run_dir = out / "runs" / run_name(*row, seed)
    return run_dir, train_run(protocol_settings(row[:2], seed, p.recipe, data, run_dir, threads), run_dir)


# ------------------------------------------------------------------------------- the real-data commands

# The standard protocol's recipe (Sagawa et al. 2020, github.com/kohpangwei/group_DRO): ResNet-50 from
# torchvision's ImageNet weights, SGD with momentum 0.9, batch 128, 300 epochs at a constant lr, no
# augmentation (resize to 256, centre crop 224: bgmask's torchvision transform with crop_pct 0.875).
REAL_COMMON = ("--protocol waterbirds --model_arch resnet50.tv_in1k --pretrained --image_size 224 --crop_pct 0.875 "
               "--augmentations_to_use torchvision --optimizer_type sgd --momentum 0.9 --scheduler_type none "
               "--epochs 300 --batch_size 128 --smoothing 0 --num_workers 8")
# method -> its hyper-parameters: ERM's standard L2; GroupDRO with the paper's strong L2 (its best Waterbirds
# worst-group accuracy), the reference's step size and no generalisation adjustment
REAL_METHOD = {ERM.name: "--lr 1e-3 --weight_decay 1e-4",
               "groupdro": "--lr 1e-5 --weight_decay 1.0 --gdro_eta 0.01 --gdro_adj 0 --gdro_sampling balanced"}
CONTROL_FOLDER = "waterbird_complete50_forest2water2"


def real_row(row, root: str) -> str:
    """The command of one grid row for seed $SEED on the real data."""
    from bgmask.settings import train_script

    method, strategy, data = row
    masks = " --mask_source gt" if STRATEGIES[strategy].needs_mask else ""
    if METHODS[method].post_hoc:
        base = f"runs/wb/{run_name(ERM.name, strategy, data, '$SEED')}"
        return f"bgmask {method} --checkpoint {base}/last.pt --data_path {root} --dfr_seed $SEED --num_workers 8{masks}"
    control = f" --image_sub_path_test {CONTROL_FOLDER}" if data == "control" else ""
    return (f"python {train_script(strategy)} --data_path {root} {REAL_COMMON} --method {method} --strategy {strategy}"
            f"{masks}{control} {REAL_METHOD.get(method, REAL_METHOD[ERM.name])} --seed $SEED "
            f"--snapshot_dir runs/wb/{run_name(method, strategy, data, '$SEED')}")


def paper_commands(root: str) -> str:
    """The grid of `bgmask demo --protocol waterbirds` on the real Waterbirds + CUB, for a GPU."""
    lines = [real_row(row, root) for row in protocol_rows()]
    return f"""# The Waterbirds protocol on the real data (one GPU per command): the grid of `bgmask demo --protocol waterbirds`.
# ROOT={root}: the CUB_200_2011 root (images/, segmentations/: the GT masks of --mask_source gt) holding the
# Waterbirds folder (its img_filename are CUB's relpaths, so CUB's segmentations are its birds' masks):
#   wget https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz
#   tar xzf waterbird_complete95_forest2water2.tar.gz -C {root}     # or unpack it elsewhere and ln -s it into ROOT
# The control (train P(place = y) = 0.5) needs a folder made at that strength by the reference's
# dataset_scripts/generate_waterbirds.py (needs Places), placed as ROOT/{CONTROL_FOLDER}.
# Recipe (Sagawa et al. 2020 and their group_DRO repository): ResNet-50 (torchvision ImageNet weights), SGD momentum
# 0.9 (bgmask's SGD adds Nesterov), batch 128, 300 epochs, constant lr, no augmentation. ERM: lr 1e-3, weight decay
# 1e-4. GroupDRO: the paper's strong L2 (lr 1e-5, weight decay 1.0), eta 0.01, group-balanced sampling, adjustment 0
# (the paper tunes it in 0..5; the repository's README sample keeps ERM's lr and weight decay). The masking rows
# take ERM's recipe. These are starting points, not tuned here. best.pt is chosen on val worst-group accuracy; DFR
# (Kirichenko et al. 2023: its C grid, 10 retrains) is fitted on the ERM run's last.pt, the base model trained to
# the end as in the DFR reference. For ConvNeXt: --model_arch convnext_base.fb_in22k with the same flags.
for SEED in 0 1 2; do
{chr(10).join(lines)}
done
bgmask report --protocol waterbirds runs/wb/*-s? runs/wb/*/dfr --out report_wb
"""
