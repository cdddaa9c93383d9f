"""A catalogue of bad inputs across every command: each gives exit status 2 and exactly one stderr line,
starting with `error:`, that names the offending path or value; none leaves a half-written file (no
temporary file, no checkpoint, no output folder where none should be).

A representative handful runs the real entry points as subprocesses (what users see, warnings and
all); the rest calls each script's `main(argv)` in-process, which is what the subprocess runs too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from conftest import write_tiny_cub

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
SMALL_SEG = REPO / "mmsegmentation/configs/unet/unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py"
WB = "waterbird_complete95_forest2water2"

# command -> (what a user runs, the in-process main)
SCRIPTS = {
    "bgmask": ["-m", "bgmask"],
    "train": ["early_masking_and_baseline/train.py"],
    "train_late": ["late_masking/train.py"],
    "eval": ["early_masking_and_baseline/eval_waterbirds.py"],
    "eval_late": ["late_masking/eval_waterbirds.py"],
    "seg_train": ["mmsegmentation/train.py"],
    "seg_test": ["mmsegmentation/test.py"],
    "predict": ["mmsegmentation/predict_masks.py"],
    "gen_masked": ["mmsegmentation/gen_masked_image_dataset.py"],
    "convert": ["mmsegmentation/convert_checkpoint.py"],
}


SEG_COMMANDS = ("seg_train", "seg_test", "predict", "gen_masked", "convert")


def in_process_main(command: str):
    if command == "bgmask":
        from bgmask.apps.cli import main
        return main
    if command in ("train", "train_late", "eval", "eval_late"):
        from bgmask.apps import scripts
        return {"train": scripts.train_early, "train_late": scripts.train_late, "eval": scripts.eval_early,
                "eval_late": scripts.eval_late}[command]
    pytest.importorskip("mmseg")
    from bgmask.seg import cli
    return {"seg_train": cli.train_main, "seg_test": cli.test_main, "predict": cli.predict_main,
            "gen_masked": cli.gen_masked_main, "convert": cli.convert_main}[command]


# ------------------------------------------------------------------------------------ workspace

@dataclass
class WS:
    """Good inputs, built once: broken copies are made per case from them."""

    root: Path
    cub: Path = None
    ckpt: Path = None  # a trained bgmask_resnet_tiny classifier (3 classes)
    binseg: Path = None
    slim: Path | None = None  # a (randomly initialised) slim segmenter checkpoint


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> WS:
    from bgmask.data.binary_seg import make_binary_seg
    from bgmask.apps.scripts import train_early

    w = WS(tmp_path_factory.mktemp("bad_inputs"))
    w.cub = write_tiny_cub(w.root / "CUB", num_classes=3, per_class=(4, 2), size=(40, 32))
    run = w.root / "run"
    assert train_early(train_args(w.cub, run, "--epochs", "1")) == 0
    w.ckpt = run / "last.pt"
    w.binseg = w.root / "binseg"
    make_binary_seg(w.cub, w.binseg, 0.0, 0, progress=False)
    try:
        from bgmask.seg.checkpoint import save_slim
        from bgmask.seg.segmenter import build_model, read_config
    except ImportError:
        return w
    cfg = read_config(SMALL_SEG)
    torch.manual_seed(0)
    w.slim = save_slim(w.root / "slim.pth", build_model(cfg).state_dict(),
                       {"classes": ["background", "bird"], "palette": [[0, 0, 0], [255, 255, 255]]}, cfg.pretty_text)
    return w


def train_args(cub, run, *more) -> list[str]:
    return ["--data_path", str(cub), "--snapshot_dir", str(run), "--image_size", "32", "--batch_size", "4",
            "--num_workers", "0", "--threads", "1", "--no_progress", "--augmentations_to_use", "none", *more]


def eval_args(ckpt, cub, out, *more) -> list[str]:
    return ["--checkpoint", str(ckpt), "--data_path", str(cub), "--out", str(out), "--num_workers", "0",
            "--no_progress", "--threads", "1", *more]


def cub_copy(ws: WS, t: Path, name: str = "CUB") -> Path:
    dst = t / name
    shutil.copytree(ws.cub, dst)
    return dst


def first_image(cub: Path, split_train: bool = True) -> tuple[str, Path]:
    rows = dict(line.split() for line in (cub / "train_test_split.txt").read_text().splitlines())
    images = [line.split() for line in (cub / "images.txt").read_text().splitlines()]
    rel = next(r for i, r in images if (rows[i] == "1") == split_train)
    return rel, cub / "images" / rel


def corrupt_image(ws: WS, t: Path) -> tuple[Path, Path]:
    cub = cub_copy(ws, t)
    _, img = first_image(cub)
    img.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return cub, img


def small_mask(ws: WS, t: Path) -> tuple[Path, Path]:
    cub = cub_copy(ws, t)
    rel, _ = first_image(cub)
    mask = cub / "segmentations" / Path(rel).with_suffix(".png")
    Image.new("L", (20, 16), 255).save(mask)
    return cub, mask


def without(ws: WS, t: Path, name: str) -> Path:
    cub = cub_copy(ws, t)
    (cub / name).unlink()
    return cub


def nonempty(t: Path) -> Path:
    d = t / "occupied"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return d


def config_yaml(t: Path) -> Path:
    f = t / "cfg.yaml"
    f.write_text("lr: 0.01\nlearning_rate: 0.1\n")
    return f


def three_class_config(t: Path) -> Path:
    f = t / "three_classes.py"
    f.write_text(f"_base_ = [{str(SMALL_SEG)!r}]\nmodel = dict(decode_head=dict(num_classes=3))\n")
    return f


def vit_state_dict(t: Path) -> Path:
    from bgmask.models import create_classifier

    f = t / "vit_tiny.pth"
    torch.save(create_classifier("bgmask_vit_tiny", 3).state_dict(), f)
    return f


def mismatched_checkpoint(ws: WS, t: Path) -> Path:
    """Our format, config says bgmask_resnet_tiny, weights are a ViT's (e.g. hand-edited or renamed)."""
    from bgmask.models import create_classifier

    state = torch.load(ws.ckpt, weights_only=True)
    state["model"] = create_classifier("bgmask_vit_tiny", 3).state_dict()
    f = t / "mismatched.pt"
    torch.save(state, f)
    return f


def resume_other_arch(ws: WS, t: Path) -> Path:
    run = t / "run"
    run.mkdir()
    shutil.copy(ws.ckpt, run / "last.pt")
    return run


def plain_state_dict(t: Path) -> Path:
    f = t / "weights.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, f)
    return f


def truncated(ws: WS, t: Path) -> Path:
    f = t / "truncated.pt"
    data = ws.ckpt.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return f


def needs_slim(ws: WS) -> Path:
    if ws.slim is None:
        pytest.skip("MMSegmentation is not installed")
    return ws.slim


@dataclass
class Case:
    id: str
    command: str
    args: Callable[[WS, Path, dict], list]  # (workspace, case folder, scratch dict for expect/absent)
    expect: Callable[[WS, Path, dict], list[str]]  # what the line must name
    subprocess: bool = False
    absent: Callable[[WS, Path, dict], list[Path]] = field(default=lambda w, t, s: [])


def keep(s: dict, key: str, value):
    s[key] = value
    return value


CASES = [
    # ---- bgmask subcommands
    Case("make-synthetic into a non-empty folder", "bgmask",
         lambda w, t, s: ["make-synthetic", "--out", keep(s, "out", nonempty(t)), "--num_classes", "2",
                          "--train_per_class", "2", "--test_per_class", "1"],
         lambda w, t, s: [str(s["out"]), "not empty", "--overwrite"], subprocess=True),
    Case("make-synthetic --correlation 1.5", "bgmask",
         lambda w, t, s: ["make-synthetic", "--out", str(t / "synth"), "--correlation", "1.5"],
         lambda w, t, s: ["correlation", "1.5", "[0, 1]"], absent=lambda w, t, s: [t / "synth"]),
    Case("make-synthetic --num_classes 1", "bgmask",
         lambda w, t, s: ["make-synthetic", "--out", str(t / "synth"), "--num_classes", "1"],
         lambda w, t, s: ["num_classes", "1"], absent=lambda w, t, s: [t / "synth"]),
    Case("make-binary-seg from a wrong dataset root", "bgmask",
         lambda w, t, s: ["make-binary-seg", "--cub_root", str(t / "no_such_cub"), "--out", str(t / "seg")],
         lambda w, t, s: [str(t / "no_such_cub")], absent=lambda w, t, s: [t / "seg"]),
    Case("make-binary-seg into a non-empty folder", "bgmask",
         lambda w, t, s: ["make-binary-seg", "--cub_root", str(w.cub), "--out", str(keep(s, "out", nonempty(t))),
                          "--val_fraction", "0.5"],
         lambda w, t, s: [str(s["out"]), "not empty"]),
    Case("make-masked with images.txt missing", "bgmask",
         lambda w, t, s: ["make-masked", "--cub_root", str(keep(s, "cub", without(w, t, "images.txt"))),
                          "--out_subdir", "masked"],
         lambda w, t, s: [str(s["cub"] / "images.txt")], absent=lambda w, t, s: [s["cub"] / "masked"]),
    Case("make-masked over a corrupt image", "bgmask",
         lambda w, t, s: ["make-masked", "--cub_root", str(keep(s, "bad", corrupt_image(w, t))[0]), "--out_subdir", "masked"],
         lambda w, t, s: [str(s["bad"][1]), "corrupt"],
         absent=lambda w, t, s: [s["bad"][0] / "masked" / s["bad"][1].relative_to(s["bad"][0] / "images")]),
    Case("make-masked with a mask of the wrong size", "bgmask",
         lambda w, t, s: ["make-masked", "--cub_root", str(keep(s, "bad", small_mask(w, t))[0]), "--out_subdir", "masked"],
         lambda w, t, s: [str(s["bad"][1]), "20x16", "40x32"]),
    Case("make-masked with a mask folder that holds no masks", "bgmask",
         lambda w, t, s: ["make-masked", "--cub_root", str(w.cub), "--masks", str(keep(s, "m", nonempty(t))),
                          "--out_subdir", "masked_x"],
         lambda w, t, s: [str(s["m"] / "images")], absent=lambda w, t, s: [w.cub / "masked_x"]),
    Case("report on a folder that is not a run", "bgmask",
         lambda w, t, s: ["report", str(keep(s, "d", nonempty(t))), "--out", str(t / "report")],
         lambda w, t, s: [str(s["d"]), "final_metrics.json"], absent=lambda w, t, s: [t / "report"]),
    # ---- training
    Case("train.py with a wrong dataset root", "train",
         lambda w, t, s: train_args(t / "no_such_cub", t / "run"),
         lambda w, t, s: [str(t / "no_such_cub"), "--data_path"], subprocess=True, absent=lambda w, t, s: [t / "run"]),
    Case("train.py with classes.txt missing", "train",
         lambda w, t, s: train_args(keep(s, "cub", without(w, t, "classes.txt")), t / "run"),
         lambda w, t, s: [str(s["cub"] / "classes.txt")]),
    Case("train.py over a corrupt image (DataLoader worker)", "train",
         lambda w, t, s: train_args(keep(s, "bad", corrupt_image(w, t))[0], t / "run", "--num_workers", "1",
                                    "--epochs", "2"),
         lambda w, t, s: [str(s["bad"][1]), "corrupt"], subprocess=True),
    Case("train.py early masking with a mask of the wrong size", "train",
         lambda w, t, s: train_args(keep(s, "bad", small_mask(w, t))[0], t / "run", "--strategy", "early", "--epochs", "1"),
         lambda w, t, s: [str(s["bad"][1]), "20x16", "40x32"]),
    Case("train.py --model_arch unknown", "train",
         lambda w, t, s: train_args(w.cub, t / "run", "--model_arch", "resnet_does_not_exist"),
         lambda w, t, s: ["resnet_does_not_exist"]),
    Case("train.py --patch_tokens_only with a CNN", "train",
         lambda w, t, s: train_args(w.cub, t / "run", "--model_arch", "bgmask_resnet_tiny", "--patch_tokens_only"),
         lambda w, t, s: ["--patch_tokens_only", "bgmask_resnet_tiny"]),
    Case("train.py --config with an unknown key", "train",
         lambda w, t, s: train_args(w.cub, t / "run", "--config", str(keep(s, "cfg", config_yaml(t)))),
         lambda w, t, s: [str(s["cfg"]), "learning_rate"]),
    Case("train.py --epochs 0", "train",
         lambda w, t, s: train_args(w.cub, t / "run", "--epochs", "0"), lambda w, t, s: ["--epochs", "0"]),
    Case("train.py --train_split 1.5", "train",
         lambda w, t, s: train_args(w.cub, t / "run", "--train_split", "1.5"), lambda w, t, s: ["--train_split", "1.5"]),
    Case("train.py --pretrained_file of another architecture", "train",
         lambda w, t, s: train_args(w.cub, t / "run", "--pretrained_file", str(keep(s, "f", vit_state_dict(t)))),
         lambda w, t, s: [str(s["f"]), "bgmask_resnet_tiny"]),
    Case("train.py --resume_training from a checkpoint of another architecture", "train",
         lambda w, t, s: train_args(w.cub, keep(s, "run", resume_other_arch(w, t)), "--model_arch", "bgmask_vit_tiny",
                                    "--resume_training", "--epochs", "1"),
         lambda w, t, s: [str(s["run"] / "last.pt"), "bgmask_resnet_tiny", "bgmask_vit_tiny"]),
    Case("late_masking/train.py with a mask folder that holds no masks", "train_late",
         lambda w, t, s: train_args(w.cub, t / "run", "--mask_source", str(keep(s, "m", nonempty(t)))),
         lambda w, t, s: [str(s["m"] / "images")], subprocess=True),
    Case("late_masking/train.py --mask_dir that does not exist", "train_late",
         lambda w, t, s: train_args(w.cub, t / "run", "--mask_dir", str(t / "no_masks")),
         lambda w, t, s: [str(t / "no_masks")]),
    # ---- evaluation
    Case("eval_waterbirds.py with a checkpoint of another architecture", "eval",
         lambda w, t, s: eval_args(keep(s, "f", mismatched_checkpoint(w, t)), w.cub, t / "ev"),
         lambda w, t, s: [str(s["f"]), "does not fit model bgmask_resnet_tiny", "missing"], subprocess=True,
         absent=lambda w, t, s: [t / "ev.json"]),
    Case("eval_waterbirds.py with a checkpoint that is not ours", "eval",
         lambda w, t, s: eval_args(keep(s, "f", plain_state_dict(t)), w.cub, t / "ev"),
         lambda w, t, s: [str(s["f"]), "not a bgmask classifier checkpoint"], absent=lambda w, t, s: [t / "ev.json"]),
    Case("eval_waterbirds.py with a segmenter checkpoint", "eval",
         lambda w, t, s: eval_args(needs_slim(w), w.cub, t / "ev"),
         lambda w, t, s: [str(w.slim), "not a bgmask classifier checkpoint"]),
    Case("eval_waterbirds.py with a truncated checkpoint", "eval",
         lambda w, t, s: eval_args(keep(s, "f", truncated(w, t)), w.cub, t / "ev"),
         lambda w, t, s: [str(s["f"]), "truncated"]),
    Case("eval_waterbirds.py on a dataset with other classes", "eval",
         lambda w, t, s: eval_args(w.ckpt, keep(s, "c", write_tiny_cub(t / "CUB4", num_classes=4, per_class=(1, 1))), t / "ev"),
         lambda w, t, s: [str(s["c"]), "3 classes"], absent=lambda w, t, s: [t / "ev.json"]),
    Case("late_masking/eval_waterbirds.py without --checkpoint", "eval_late",
         lambda w, t, s: ["--data_path", str(w.cub)], lambda w, t, s: ["--checkpoint"]),
    Case("late_masking/eval_waterbirds.py with image_class_labels.txt missing", "eval_late",
         lambda w, t, s: eval_args(w.ckpt, keep(s, "c", without(w, t, "image_class_labels.txt")), t / "ev"),
         lambda w, t, s: [str(s["c"] / "image_class_labels.txt")], absent=lambda w, t, s: [t / "ev.json"]),
    # ---- segmentation scripts
    Case("mmsegmentation/train.py with a config of 3 classes", "seg_train",
         lambda w, t, s: [str(keep(s, "cfg", three_class_config(t))), "--data-root", str(w.binseg), "--work-dir", str(t / "work")],
         lambda w, t, s: [str(s["cfg"]), "num_classes is 3"], subprocess=True),
    Case("mmsegmentation/train.py with a wrong --data-root", "seg_train",
         lambda w, t, s: [str(SMALL_SEG), "--data-root", str(t / "no_data"), "--work-dir", str(t / "work")],
         lambda w, t, s: [str(t / "no_data")]),
    Case("mmsegmentation/test.py with a wrong --data-root", "seg_test",
         lambda w, t, s: [str(SMALL_SEG), str(needs_slim(w)), "--data-root", str(t / "no_data"), "--work-dir", str(t / "work")],
         lambda w, t, s: [str(t / "no_data")]),
    Case("predict_masks.py with a wrong --cub_root", "predict",
         lambda w, t, s: ["--checkpoint", str(needs_slim(w)), "--cub_root", str(t / "no_cub"), "--out_dir", str(t / "m")],
         lambda w, t, s: [str(t / "no_cub")], absent=lambda w, t, s: [t / "m"]),
    Case("predict_masks.py with a classifier checkpoint", "predict",
         lambda w, t, s: ["--checkpoint", str(w.ckpt), "--cub_root", str(w.cub), "--out_dir", str(t / "m")],
         lambda w, t, s: [str(w.ckpt), "classifier"], absent=lambda w, t, s: [t / "m"]),
    Case("predict_masks.py --device gpu", "predict",
         lambda w, t, s: ["--checkpoint", str(needs_slim(w)), "--cub_root", str(w.cub), "--out_dir", str(t / "m"),
                          "--device", "gpu"],
         lambda w, t, s: ["--device 'gpu'", "cuda:N"], absent=lambda w, t, s: [t / "m"]),
    Case("predict_masks.py with a config of 3 classes", "predict",
         lambda w, t, s: ["--config", str(keep(s, "cfg", three_class_config(t))), "--checkpoint", str(needs_slim(w)),
                          "--cub_root", str(w.cub), "--out_dir", str(t / "m")],
         lambda w, t, s: [str(s["cfg"]), "num_classes is 3"], absent=lambda w, t, s: [t / "m"]),
    Case("gen_masked_image_dataset.py --out_subdir images", "gen_masked",
         lambda w, t, s: ["--checkpoint", str(needs_slim(w)), "--cub_root", str(keep(s, "c", cub_copy(w, t))),
                          "--out_subdir", "images", "--out_dir", str(t / "m"), "--no_progress"],
         lambda w, t, s: ["--out_subdir", "'images'"], absent=lambda w, t, s: [t / "m"]),
    Case("convert_checkpoint.py with a missing source", "convert",
         lambda w, t, s: [str(t / "iter_100.pth"), str(t / "slim.pth")],
         lambda w, t, s: [str(t / "iter_100.pth")], absent=lambda w, t, s: [t / "slim.pth"]),
    # ---- flags and values that argparse refuses: one line too, not argparse's usage block
    Case("train.py with an unknown flag", "train",
         lambda w, t, s: train_args(w.cub, t / "run", "--bogus_flag", "3"),
         lambda w, t, s: ["unrecognized arguments: --bogus_flag 3", "--help"], subprocess=True,
         absent=lambda w, t, s: [t / "run"]),
    Case("train.py --epochs abc", "train",
         lambda w, t, s: train_args(w.cub, t / "run", "--epochs", "abc"),
         lambda w, t, s: ["--epochs", "'abc'", "expected an integer"], absent=lambda w, t, s: [t / "run"]),
    Case("train.py --strategy foo", "train",
         lambda w, t, s: train_args(w.cub, t / "run", "--strategy", "foo"),
         lambda w, t, s: ["--strategy", "'foo'", "'baseline', 'early'"], absent=lambda w, t, s: [t / "run"]),
    Case("late_masking/eval_waterbirds.py --batch_size 1.5", "eval_late",
         lambda w, t, s: eval_args(w.ckpt, w.cub, t / "ev", "--batch_size", "1.5"),
         lambda w, t, s: ["--batch_size", "'1.5'", "expected an integer"], absent=lambda w, t, s: [t / "ev.json"]),
    Case("bgmask make-binary-seg without --cub_root", "bgmask",
         lambda w, t, s: ["make-binary-seg", "--out", str(t / "seg")],
         lambda w, t, s: ["required", "--cub_root", "bgmask make-binary-seg --help"], absent=lambda w, t, s: [t / "seg"]),
    Case("bgmask make-masked with a misspelt flag", "bgmask",
         lambda w, t, s: ["make-masked", "--cub_root", str(w.cub), "--out_subdir", "masked_y", "--mask_treshold", "3"],
         lambda w, t, s: ["--mask_treshold", "did you mean --mask_threshold?", "bgmask make-masked --help"],
         absent=lambda w, t, s: [w.cub / "masked_y"]),
    Case("bgmask with an unknown subcommand", "bgmask",
         lambda w, t, s: ["make-synthtic", "--out", str(t / "synth")],
         lambda w, t, s: ["'make-synthtic'", "make-synthetic"], absent=lambda w, t, s: [t / "synth"]),
    Case("predict_masks.py with an unknown flag", "predict",
         lambda w, t, s: ["--checkpoint", str(t / "slim.pth"), "--cub_root", str(w.cub), "--out_dir", str(t / "m"),
                          "--batchsize", "4"],
         lambda w, t, s: ["--batchsize", "did you mean --batch_size?"], absent=lambda w, t, s: [t / "m"]),
    Case("mmsegmentation/test.py --splits train", "seg_test",
         lambda w, t, s: [str(SMALL_SEG), str(t / "slim.pth"), "--splits", "train"],
         lambda w, t, s: ["--splits", "'train'", "'val', 'test', 'waterbird_test'"]),
]


def is_progress_bar(line: str) -> bool:
    """A tqdm bar (make-masked shows one): progress, not a message."""
    return re.search(r": +\d+%\|.*\| \d+/\d+ \[", line) is not None


def run_case(case: Case, argv: list[str], capsys) -> tuple[int, str]:
    if case.subprocess:
        p = subprocess.run([sys.executable, *SCRIPTS[case.command], *argv], cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=300)
        return p.returncode, p.stderr
    capsys.readouterr()
    rc = in_process_main(case.command)(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("command, argv, shows", [
    ("train", ["--help"], ["usage: ", "--epochs", "--mask_source", "--resume_training"]),
    ("bgmask", ["--help"], ["usage: bgmask", "make-binary-seg"]),
    ("bgmask", ["make-binary-seg", "--help"], ["usage: bgmask make-binary-seg", "--cub_root", "--val_fraction"]),
    ("convert", ["--help"], ["usage: ", "--trust-full-checkpoint"]),
])
def test_help_is_argparse_help(command, argv, shows, capsys):
    """The one-line rule is for errors: --help still prints the whole help, exit status 0."""
    with pytest.raises(SystemExit) as exit_:
        in_process_main(command)(argv)
    out = capsys.readouterr()
    assert exit_.value.code == 0 and not out.err
    for what in shows:
        assert what in out.out


def test_the_catalogue_is_broad():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} == set(SCRIPTS)
    assert 4 <= sum(c.subprocess for c in CASES) <= 8


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case, ws, tmp_path, capsys):
    if case.command in SEG_COMMANDS and importlib.util.find_spec("mmseg") is None:
        pytest.skip("MMSegmentation is not installed")
    scratch: dict = {}
    argv = [str(a) for a in case.args(ws, tmp_path, scratch)]
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    rc, err = run_case(case, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip() and not is_progress_bar(line)]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for what in case.expect(ws, tmp_path, scratch):
        assert what in lines[0], f"{what!r} not named in: {lines[0]}"
    # nothing half-written: no temporary file, no checkpoint, none of the outputs that must not exist
    for root in (tmp_path, ws.root):
        assert not list(root.rglob(".*.tmp")), list(root.rglob(".*.tmp"))
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert not [p for p in written if p.suffix in (".pt", ".pth")], written
    for path in case.absent(ws, tmp_path, scratch):
        assert not path.exists(), f"{path} was written"


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EACCES", "ENOTDIR"])
def test_a_disk_error_outside_bgmask_io_is_one_line(code, capsys):
    """run_cli reports the errno values of bgmask.errors.DISK_ERRNOS (the one list bgmask.io uses too) as one
    line naming the file; any other OSError is a bug and keeps its traceback."""
    import errno

    from bgmask.errors import DISK_ERRNOS, run_cli

    number = getattr(errno, code)
    assert number in DISK_ERRNOS

    def fails(argv):
        raise OSError(number, os.strerror(number), "/some/file")

    assert run_cli(fails)([]) == 2
    assert capsys.readouterr().err == f"error: /some/file: {os.strerror(number)}\n"

    def bug(argv):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    with pytest.raises(OSError):
        run_cli(bug)([])
