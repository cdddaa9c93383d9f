"""`bgmask pretrain`: the model zoo of stand-in pretrained backbones, shipped in bgmask/zoo_weights/.

Hub weights cannot be downloaded offline, and the demo's backbones (`bgmask.models.small`) have none, so
the project makes its own: each backbone is trained as a classifier (through the train parser and
`bgmask.engine.run`, like every other run) on a pretraining set of its own:

  data    `generate_synthetic` with many species (default 100) from another seed than the demo's (seed 0;
          --data_seed refuses it): a species' cues (marking hue, wing-bar period and angle, beak, body,
          tail) are offsets drawn from the seed, so these are other species, although species k carries
          the name `class_name(k)` whatever the seed. --correlation 0.95 (the default) gives each species
          a home habitat drawn at random, as natural images tie animals to scenes: with 100 species and
          10 habitats every habitat is home to ~10 species, so the habitat narrows the answer (a
          background-only classifier reaches ~10 %) but only the bird decides it. The backbone therefore
          encodes backgrounds as a real pretrained one does (ImageNet features carry scene context), and a
          probe on the demo's biased data can pick the habitat up: the bias the paper removes. From a
          backbone pretrained on independent habitats (0.1: p = 1/len(HABITATS)) masking had nothing to
          remove (the measured accuracies: README.md, the model zoo). Same 64 px images as the demo.
  recipe  each candidate recipe of the model (`--strategy baseline`) trains on the set's train split less a
          stratified val split (--val_fraction, i.e. --train_split 1 - f); the recipe with the best val
          accuracy (its best epoch, the engine's best.pt) is kept. Its held-out accuracy is measured on
          the set's own test split (its own species, never the demo's Waterbirds). The ViT's candidates
          start from one masked warm-up epoch (`--strategy early`, GT masks: see `masked_warmup`).
  output  OUT/NAME.safetensors: the backbone of that best.pt without its classifier head, in timm's key
          names, floats stored as fp16 when that keeps the val accuracy (--dtype auto: both are measured
          through the engine's evaluation); and the NAME entry of OUT/zoo.json (sha256, bytes, the command
          that remakes it, the data arguments, the recipe, every candidate's val accuracy, the chosen one's
          val / test accuracy in fp32 and fp16, seconds, versions).

The ViT pretrains with the "both" head (the Linear reads [CLS, mean of patch tokens], the ViT default, no
head flag): the loss then reaches the CLS token's own path and every patch token directly, so the
features suit all three downstream heads. With GAP alone the CLS token and its attention would never be
trained (a CLS probe would read an untrained token); with CLS alone the final patch tokens would only
serve as keys/values and carry no class evidence of their own, which GAP heads and late masking (a mask
over the patch tokens) read.

Load one with `--pretrained_file zoo:NAME` (bgmask.models.weights resolves it and checks its sha256).

    bgmask pretrain --model cnn --threads 1
    bgmask pretrain --model vit --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bgmask import args as A
from bgmask.errors import UserError
from bgmask.io import Marker, atomic_write_bytes, atomic_write_text, file_sha256, read_json_object
from bgmask.models.weights import ZOO_DIR, ZOO_INDEX, read_zoo_index
from bgmask.runfolder import hold_folder
from bgmask.settings import command_line

FP16_TOLERANCE = 0.005  # --dtype auto keeps fp16 when its val accuracy is at most this much lower
INDEX_FORMAT = "bgmask-zoo"


@dataclass(frozen=True)
class Recipe:
    """The training settings a candidate varies; the rest is fixed in `candidate_settings`."""
    name: str
    lr: float
    augment: str = "flip"  # --augmentations_to_use
    weight_decay: float = 0.05
    smoothing: float = 0.0  # label smoothing makes features transfer worse (Kornblith et al., 2021)
    grad_clip: float | None = None


@dataclass(frozen=True)
class ZooModel:
    arch: str
    epochs: int
    recipes: tuple[Recipe, ...]
    settings: tuple[tuple[str, object], ...] = ()  # fixed train.py settings of this model
    masked_warmup: int = 0  # default --masked_warmup_epochs


CNN_RECIPES = (Recipe("lr2e-3", 2e-3), Recipe("lr4e-3", 4e-3), Recipe("lr4e-3_affine", 4e-3, "cub_original"))
VIT_RECIPES = (Recipe("lr1e-3_clip1", 1e-3, grad_clip=1.0), Recipe("lr2e-3_clip1", 2e-3, grad_clip=1.0))
WARMUP_RECIPE = Recipe("masked_warmup", 1e-3, grad_clip=1.0)
ZOO_MODELS = {
    "cnn": ZooModel("bgmask_resnet_tiny", 4, CNN_RECIPES, (("channels_last", True),)),
    "vit": ZooModel("bgmask_vit_tiny", 3, VIT_RECIPES, masked_warmup=1),  # no head flag: the "both" head
    "vit_reg4": ZooModel("bgmask_vit_tiny_reg4", 3, VIT_RECIPES, masked_warmup=1),
}
# The flags that define a zoo file, in the order of its recorded command (not --out / --work: places).
COMMAND_FLAGS = ("model", "name", "recipes", "epochs", "masked_warmup_epochs", "num_classes", "correlation",
                 "train_per_class",
                 "test_per_class", "data_seed", "image_size", "val_fraction", "batch_size", "seed", "dtype", "threads",
                 "num_workers", "max_steps_per_epoch")


def pretrain_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    A.add(parser, "--model", required=True, choices=list(ZOO_MODELS),
          help=", ".join(f"{k} = {m.arch}" for k, m in ZOO_MODELS.items()))
    A.add(parser, "--name", default=None, help="zoo name (default: --model); load it with --pretrained_file zoo:NAME")
    A.add(parser, "--out", default=str(ZOO_DIR), output="folder", help="folder of NAME.safetensors and zoo.json")
    A.add(parser, "--work", default="runs/zoo", output="folder", help="pretraining data and candidate runs")
    A.add(parser, "--recipes", nargs="+", default=None, help="candidate recipes (default: all of the model's)")
    A.add(parser, "--epochs", type=int, default=None, range="[1, 1000]", help="default: the model's (cnn 4, vit 3)")
    A.add(parser, "--masked_warmup_epochs", type=int, default=None, range="[0, 1000]",
          help="epochs on early-masked images before every recipe (default: the model's, cnn 0, vit 1)")
    g = parser.add_argument_group("pretraining data (bgmask make-synthetic)")
    A.add(g, "--num_classes", type=int, default=100, range="[2, 999]")
    A.add(g, "--train_per_class", type=int, default=200, range="[2, 9999]")
    A.add(g, "--test_per_class", type=int, default=20, range="[1, 9999]")
    A.add(g, "--data_seed", type=int, default=1000, range="[1, inf)", help="species seed; 0 is the demo's")
    A.add(g, "--correlation", type=float, default=0.95, range="[0, 1]",
          help="fraction of a species' images on its (random) home habitat: 0.95 = backgrounds carry context, "
               "as in natural images; 0.1 = independent of the species (10 habitats)")
    A.add(g, "--image_size", type=int, default=64, range="[32, 4096]")
    A.add(g, "--val_fraction", type=float, default=0.1, range="(0, 0.5]",
          help="of each species' train images, the val split that picks the recipe")
    g = parser.add_argument_group("training")
    A.add(g, "--batch_size", type=int, default=64, range="[1, 4096]")
    A.add(g, "--seed", type=int, default=0, range="[0, inf)")
    A.add(g, "--dtype", default="auto", choices=["auto", "fp16", "fp32"],
          help=f"stored floats; auto: fp16 unless it costs more than {FP16_TOLERANCE:g} val accuracy")
    A.add(g, "--threads", type=int, default=None, range="[1, 1024]")
    A.add(g, "--num_workers", type=int, default=1, range="[0, 64]")
    A.add(g, "--max_steps_per_epoch", type=int, default=None, range="[1, inf)", help="smoke tests")
    return parser


def main_pretrain(ns: argparse.Namespace) -> int:
    import torch

    t0 = time.perf_counter()
    ns, spec = resolve_args(ns)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    with hold_folder(Path(ns.work) / ns.name, "--work"):  # one pretraining of NAME at a time
        return pretrain(ns, spec, t0)


def pretrain(ns: argparse.Namespace, spec: ZooModel, t0: float) -> int:
    data, data_args, data_seconds = make_pretrain_data(ns)
    work = Path(ns.work) / ns.name
    warmup = masked_warmup(ns, spec, data, work)
    start = {"pretrained_file": str(Path(warmup["run_dir"]) / "last.pt")} if warmup else {}
    candidates = [train_candidate({**candidate_settings(ns, spec, r, data, work / r.name), **start}, r, work / r.name)
                  for r in recipes_of(spec, ns.recipes)]
    chosen = max(candidates, key=lambda c: c["val_acc"])  # the first one on a tie
    print(f"[pretrain] chosen {chosen['recipe']['name']}: val {chosen['val_acc']:.4f}, "
          f"held-out test {chosen['test_acc']:.4f}", flush=True)
    backbone, fp16 = fp16_check(chosen, work)
    dtype = ns.dtype if ns.dtype != "auto" else (
        "fp16" if fp16["val_acc"] >= chosen["val_acc"] - FP16_TOLERANCE else "fp32")
    path = Path(ns.out) / f"{ns.name}.safetensors"
    # the zoo folder is shared by every name: its index is read, changed and written by one process at a time
    with hold_folder(ns.out, "--out", wait=True):
        write_weights(path, backbone, dtype, {"zoo_name": ns.name, "model_arch": spec.arch})
        # what making it took, the stages read back from an earlier run included
        seconds = time.perf_counter() - t0 + data_seconds + sum(
            c["seconds"] for c in [warmup or {}, *candidates] if c.get("reused"))
        entry = zoo_entry(ns, spec, data_args, dict(warmup=warmup, candidates=candidates, chosen=chosen), fp16,
                          dtype, path, seconds)
        write_index_entry(Path(ns.out), ns.name, entry)
    print(f"[pretrain] wrote {path} ({entry['bytes']} bytes, {dtype}, sha256 {entry['sha256'][:12]}...) and its "
          f"entry in {Path(ns.out) / ZOO_INDEX}; load it with --pretrained_file zoo:{ns.name}", flush=True)
    return 0


def resolve_args(ns: argparse.Namespace) -> tuple[argparse.Namespace, ZooModel]:
    """(the flags with the defaults that depend on --model filled in, so the recorded command names them;
    the model's spec). The rest is checked; `ns` is not changed."""
    spec = ZOO_MODELS[ns.model]
    ns = argparse.Namespace(**{
        **vars(ns), "name": ns.name or ns.model, "recipes": [r.name for r in recipes_of(spec, ns.recipes)],
        "epochs": ns.epochs or spec.epochs,
        "masked_warmup_epochs": spec.masked_warmup if ns.masked_warmup_epochs is None else ns.masked_warmup_epochs})
    if not ns.name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--name {ns.name!r}: expected letters, digits, '_' or '-' (it names NAME.safetensors)")
    if round(ns.train_per_class * ns.val_fraction) < 1:
        raise UserError(f"--val_fraction {ns.val_fraction:g} of --train_per_class {ns.train_per_class} leaves no "
                        "val image per species (raise either)")
    return ns, spec


def recipes_of(spec: ZooModel, names) -> list[Recipe]:
    known = {r.name: r for r in spec.recipes}
    for name in names or []:
        if name not in known:
            raise UserError(f"--recipes {name}: the {spec.arch} recipes are {', '.join(known)}")
    return [known[n] for n in names] if names else list(spec.recipes)


def make_pretrain_data(ns: argparse.Namespace) -> tuple[Path, dict, float]:
    """(the pretraining set in WORK/data/, its arguments, the seconds it took when it is reused: a complete
    set, with images.txt, is not made again)."""
    data_args = dict(num_classes=ns.num_classes, image_size=ns.image_size, train_per_class=ns.train_per_class,
                     test_per_class=ns.test_per_class, correlation=ns.correlation, seed=ns.data_seed)
    name = "synbirds_{num_classes}sp_s{seed}_{image_size}px_{train_per_class}+{test_per_class}_c{correlation:g}".format(
        **data_args)
    data = Path(ns.work) / "data" / name
    with hold_folder(data, "the pretraining data folder", wait=True):  # another model's pretraining may share it
        return pretrain_data(data, data_args)


def pretrain_data(data: Path, data_args: dict) -> tuple[Path, dict, float]:
    from bgmask.data.synthetic import CONFIG_NAME, generate_synthetic

    timing = data.parent / f"{data.name}.seconds.json"
    if (data / "images.txt").is_file() and Marker(data / CONFIG_NAME).holds(data_args):  # a complete set
        return data, data_args, read_json_object(timing).get("seconds", 0.0)
    t0 = time.perf_counter()
    s = generate_synthetic(data, overwrite=False, progress=False, **data_args)
    atomic_write_text(timing, json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
    print(f"[pretrain] data: {s.num_classes} species, {s.num_train} train + {s.num_test} test images in {data} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return data, data_args, 0.0


def masked_warmup(ns: argparse.Namespace, spec: ZooModel, data: Path, work: Path) -> dict | None:
    """The optional first stage: --masked_warmup_epochs on early-masked images (GT masks, black background),
    whose last.pt every recipe starts from. Why: from scratch on these 100 species the tiny ViT stays at
    chance, while on the bird alone it leaves chance and then keeps learning on plain images (the runs:
    README.md, the model zoo); the CNN needs no such start."""
    if not ns.masked_warmup_epochs:
        return None
    run_dir = work / WARMUP_RECIPE.name
    settings = {**candidate_settings(ns, spec, WARMUP_RECIPE, data, run_dir), "strategy": "early",
                "epochs": ns.masked_warmup_epochs, "mask_source": "gt", "mask_fill": "black"}
    return train_candidate(settings, WARMUP_RECIPE, run_dir)


def candidate_settings(ns: argparse.Namespace, spec: ZooModel, r: Recipe, data: Path, run_dir: Path) -> dict:
    """train.py settings of one candidate: the demo's fixed choices (64 px, no crop, cosine to 1e-5, AdamW)
    and the recipe's."""
    out = dict(data_path=str(data), model_arch=spec.arch, strategy="baseline", image_size=ns.image_size,
               crop_pct=1.0, augmentations_to_use=r.augment, epochs=ns.epochs, batch_size=ns.batch_size, lr=r.lr,
               weight_decay=r.weight_decay, smoothing=r.smoothing, scheduler_type="cosine", min_lr=1e-5,
               train_split=1.0 - ns.val_fraction, split_seed=0, eval_mode="val", seed=ns.seed,
               snapshot_dir=str(run_dir), num_workers=ns.num_workers, no_progress=True, **dict(spec.settings))
    if r.grad_clip:
        out["grad_norm_clip"] = r.grad_clip
    if ns.threads:
        out["threads"] = ns.threads
    if ns.max_steps_per_epoch:
        out["max_steps_per_epoch"] = ns.max_steps_per_epoch
    return out


def engine_run(settings: dict, log: Path) -> dict:
    """bgmask.engine.run on train.py's settings plus `settings`; what the run prints goes to `log`."""
    from bgmask.engine import run
    from bgmask.settings import run_settings

    cfg = run_settings(settings, "bgmask pretrain")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        return run(cfg)


def train_candidate(settings: dict, recipe: Recipe, run_dir: Path) -> dict:
    """Train one candidate (a finished run with the same settings is read back) -> its summary."""
    record = Marker(run_dir / "candidate.json", fields=("settings",))
    if (run_dir / "done").is_file() and record.holds({"settings": settings}):  # unreadable: trained again
        return {**record.saved(), "reused": True}
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    final = engine_run(settings, run_dir / "train.log")
    history = [r["val/acc"] for r in read_jsonl(run_dir / "results.jsonl") if r.get("split") == "val"]
    best = max(range(len(history)), key=lambda i: (history[i], -i))  # the engine's best.pt: the first max
    out = {"recipe": asdict(recipe), "settings": settings, "run_dir": str(run_dir), "val_acc": history[best],
           "best_epoch": best + 1, "val_acc_per_epoch": history, "test_acc": final["test/acc"],
           "seconds": round(time.perf_counter() - t0, 1)}
    record.write(out)
    print(f"[pretrain] {run_dir.parent.name} {recipe.name}: val {out['val_acc']:.4f} (epoch {best + 1} of "
          f"{len(history)}), {out['seconds']:.0f} s", flush=True)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fp16_check(chosen: dict, work: Path):
    """(backbone of the chosen best.pt in timm key names, fp32; val/test accuracy with the backbone rounded
    to fp16), the latter measured by the engine's evaluation of a copy of best.pt."""
    from bgmask.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    best = Path(chosen["run_dir"]) / "best.pt"
    state = load_checkpoint(best)
    clf = model_from_checkpoint(state, best)
    head = set(clf.head_state_keys())
    backbone = {k.removeprefix("backbone."): v.detach().contiguous()
                for k, v in clf.state_dict().items() if k not in head}
    rounded = {k: v.half().float() if v.is_floating_point() and k not in head else v for k, v in state["model"].items()}
    ckpt = work / "fp16_check" / "best.pt"
    shutil.rmtree(ckpt.parent, ignore_errors=True)
    save_checkpoint(ckpt, {**state, "model": rounded})
    record = engine_run({**chosen["settings"], "eval_only": True, "checkpoint": str(ckpt)}, ckpt.parent / "eval.log")
    fp16 = {"val_acc": record["val/acc"], "test_acc": record["test/acc"]}
    print(f"[pretrain] fp16 backbone: val {fp16['val_acc']:.4f}, test {fp16['test_acc']:.4f}", flush=True)
    return backbone, fp16


def write_weights(path: Path, backbone: dict, dtype: str, metadata: dict) -> None:
    import safetensors.torch

    tensors = {k: v.half() if dtype == "fp16" and v.is_floating_point() else v for k, v in backbone.items()}
    # One metadata key: safetensors writes several in a random order, and the file's sha256 must not vary.
    meta = {"bgmask_zoo": json.dumps(metadata, sort_keys=True)}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))


def reproduce_command(ns: argparse.Namespace) -> str:
    parts = ["bgmask", "pretrain"]
    for dest in COMMAND_FLAGS:
        value = getattr(ns, dest)
        if value is not None:
            parts += [f"--{dest}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return " ".join(parts)


def zoo_entry(ns, spec: ZooModel, data_args: dict, runs: dict, fp16: dict, dtype: str, path: Path,
              seconds: float) -> dict:
    """The zoo.json entry; `runs`: the warm-up (or None), the candidates and the chosen one."""
    import timm
    import torch

    from bgmask.runfolder import git_revision

    keep = ("recipe", "val_acc", "best_epoch", "val_acc_per_epoch", "seconds")
    chosen, warmup = runs["chosen"], runs["warmup"]
    return {
        "name": ns.name, "model_arch": spec.arch, "file": path.name, "sha256": file_sha256(path),
        "bytes": path.stat().st_size, "dtype": dtype, "command": reproduce_command(ns),
        "data": {"generator": "bgmask.data.synthetic.generate_synthetic", **data_args,
                 "val_fraction": ns.val_fraction, "split_seed": 0},
        "recipe": {**chosen["recipe"], "epochs": ns.epochs, "batch_size": ns.batch_size, "optimizer": "adamw",
                   "scheduler": "cosine", "min_lr": 1e-5, "seed": ns.seed,
                   "train_command": shlex.join(command_line(chosen["settings"]))},
        "masked_warmup": warmup and {"epochs": ns.masked_warmup_epochs, **{k: warmup[k] for k in keep}},
        "candidates": [{k: c[k] for k in keep} for c in runs["candidates"]],
        "chosen": chosen["recipe"]["name"],
        "val_acc": chosen["val_acc"], "test_acc": chosen["test_acc"],
        "fp32": {"val_acc": chosen["val_acc"], "test_acc": chosen["test_acc"]}, "fp16": fp16,
        "seconds": round(seconds, 1), "torch": torch.__version__, "timm": timm.__version__,
        "git_revision": git_revision(),
    }


def write_index_entry(out: Path, name: str, entry: dict) -> None:
    """Add or replace NAME in OUT/zoo.json (the other entries are kept)."""
    models = {**read_zoo_index(out), name: entry}
    index = {"format": INDEX_FORMAT, "version": 1, "models": dict(sorted(models.items()))}
    atomic_write_text(out / ZOO_INDEX, json.dumps(index, indent=2) + "\n")
