"""The paper's MMSegmentation command lines (mmsegmentation/README.md of
ananthu-aniraj/masking_strategies_bias_removal, and its tools/oar_sub_script.sh), replayed on bgmask's
mmsegmentation/ scripts with only the script path, the data paths and the sizes changed:

  1h  python -m torch.distributed.launch ... --use_env tools/train.py \\
          configs/mask2former/mask2former_swin-t_8xb2-160k_cub_binary_seg-512x512.py \\
          --work-dir work_dirs/mask2former_swint_train_init --launcher pytorch
  1j  the same with configs/segformer/segformer_mit-b1_8xb2-160k_cub_binary_seg-512x512.py
  1i  gen_masked_image_dataset.py --data_path D --config_file C --checkpoint_file iter_160000.pth --save_path S

Run as `python SCRIPT ...` (no launcher's environment) they are one process; the config's own
data_root is used; a bad value is one line, exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mmseg")

from test_segmentation import CONFIGS, NO_WORKERS, SMALL, WB  # noqa: E402

from bgmask.data.binary_seg import make_binary_seg  # noqa: E402
from bgmask.data.synthetic import generate_synthetic  # noqa: E402
from bgmask.seg.cli import gen_masked_main, train_main  # noqa: E402
from bgmask.seg.config import resolve_launcher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "mmsegmentation"
MASK2FORMER = CONFIGS / "mask2former" / "mask2former_swin-t_8xb2-160k_cub_binary_seg-512x512.py"
SEGFORMER_XS = CONFIGS / "segformer" / "segformer_mit-xs_1xb8-2k_cub_binary_seg-64x64.py"
ITERS = 30
NOTE = "note: --launcher pytorch without torchrun"


def shrink(iters: int) -> list[str]:
    """--cfg-options that make a shipped 64x64 config train `iters` iterations (warm-up, then decay)."""
    warm = max(1, iters // 5)
    return ["--cfg-options", f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
            f"param_scheduler.0.end={warm}", f"param_scheduler.1.begin={warm}", f"param_scheduler.1.end={iters}",
            f"default_hooks.checkpoint.interval={iters}", *NO_WORKERS]


def config_with_data_root(path: Path, base: Path, data_root: Path | str) -> Path:
    """A leaf config that sets its own data_root, as the paper's configs do."""
    path.write_text(f"_base_ = [{str(base)!r}]\ndata_root = {str(data_root)!r}\n")
    return path


def launcher_free_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """Tiny synthetic CUB -> binary-seg folder; then §1h as `python train.py CONFIG --work-dir W
    --launcher pytorch` without a launcher (the U-Net 64x64 config, ITERS iterations), the data root
    coming from the config."""
    base = tmp_path_factory.mktemp("paper_seg")
    cub, data = base / "synth", base / "binseg"
    generate_synthetic(cub, num_classes=2, image_size=64, train_per_class=12, test_per_class=4, seed=0,
                       progress=False)
    make_binary_seg(cub, data, 0.1, 0, progress=False)
    config = config_with_data_root(base / "unet_paper.py", SMALL, data)
    work = base / "work_dirs" / "unet_train_init"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = train_main([str(config), "--work-dir", str(work), "--launcher", "pytorch", *shrink(ITERS)])
    return dict(rc=rc, stdout=out.getvalue(), base=base, cub=cub, data=data, config=config, work=work)


def one_line_error(rc: int, err: str) -> str:
    err = err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (rc, err)
    return err


# ----------------------------------------------------------------------------- 1h / 1j: training

@pytest.mark.slow
def test_1h_train_without_launcher_env_is_one_process(paper_run):
    assert paper_run["rc"] == 0
    assert paper_run["stdout"].count(NOTE) == 1
    assert not torch.distributed.is_initialized()  # one process, no process group
    slim = paper_run["work"] / "segmenter_slim.pth"
    ckpt = torch.load(slim, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["iter"] == ITERS
    # no --data-root: the config's own data_root was used
    assert f"data_root='{paper_run['data']}'" in ckpt["meta"]["config"]
    assert (paper_run["work"] / f"iter_{ITERS}.pth").is_file()


def test_1h_mask2former_command_builds(tmp_path, monkeypatch, capsys):
    """The paper's training line with bgmask's path of the same config: parsed, config resolved, the
    Runner and the Mask2Former Swin-T model built; stopped before training (160k iterations at 512 px)."""
    from mmengine.runner import Runner

    class Built(Exception):
        pass

    def stop(runner):
        raise Built(runner)

    data = tmp_path / "binseg"
    for sub in ("images/train", "images/val", "annotations/train", "annotations/val"):
        (data / sub).mkdir(parents=True)
    monkeypatch.setattr(Runner, "train", stop)
    with pytest.raises(Built) as built:
        train_main([str(MASK2FORMER), "--work-dir", str(tmp_path / "work_dirs" / "mask2former_swint_train_init"),
                    "--launcher", "pytorch", "--data-root", str(data)])
    runner = built.value.args[0]
    assert (type(runner.model.backbone).__name__, type(runner.model.decode_head).__name__) == (
        "SwinTransformer", "Mask2FormerHead")
    assert runner.cfg.launcher == "none" and not runner.distributed
    assert runner.cfg.crop_size == (512, 512) and runner.cfg.train_cfg.max_iters == 160000
    assert runner.cfg.train_dataloader.dataset.data_root == str(data.resolve())
    assert capsys.readouterr().out.count(NOTE) == 1


@pytest.mark.slow
def test_1j_segformer_command_in_a_subprocess(paper_run, tmp_path):
    """§1j (oar_sub_script.sh) as `python mmsegmentation/train.py CONFIG --work-dir W --launcher pytorch`,
    with the 64x64 SegFormer in place of MiT-b1 at 512 and the config's own data_root."""
    config = config_with_data_root(tmp_path / "segformer_paper.py", SEGFORMER_XS, paper_run["data"])
    work = tmp_path / "work_dirs" / "segformer_m1_train_init"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "train.py"), str(config), "--work-dir", str(work),
                           "--launcher", "pytorch", *shrink(4)], capture_output=True, text=True, cwd=tmp_path,
                          env=launcher_free_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(NOTE) == 1 and proc.stdout.count("trained 4 iterations") == 1
    assert "Distributed training: False" in proc.stdout + proc.stderr
    meta = torch.load(work / "segmenter_slim.pth", weights_only=True)["meta"]
    assert f"data_root='{paper_run['data']}'" in meta["config"]
    assert "--launcher pytorch" in (work / "train_command.txt").read_text()


@pytest.mark.slow
def test_1h_launcher_line_runs_two_processes(paper_run, tmp_path):
    """The paper's launcher line itself (torch.distributed.launch --use_env, two CPU processes, gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path / "work_dirs" / "unet_ddp"
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nnodes=1", "--node_rank=0",
           "--master_addr=127.0.0.1", "--nproc_per_node=2", f"--master_port={port}", "--use_env",
           str(SCRIPTS / "train.py"), str(paper_run["config"]), "--work-dir", str(work), "--launcher", "pytorch",
           *shrink(2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=launcher_free_env(), timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-2000:]
    assert NOTE not in log and "Distributed training: True" in log and "'backend': 'gloo'" in log
    assert log.count("trained 2 iterations") == 1  # rank 0 writes
    assert (work / "segmenter_slim.pth").is_file()


def test_local_rank_flag_becomes_local_rank(monkeypatch, capsys):
    """torch.distributed.launch without --use_env passes --local-rank=N; it becomes LOCAL_RANK."""
    from bgmask.seg.cli import train_parser

    ns = train_parser().parse_args([str(SMALL), "--launcher", "pytorch", "--local-rank=3"])
    assert train_parser().parse_args([str(SMALL), "--local_rank", "3"]).local_rank == ns.local_rank == 3
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_launcher(ns.launcher, ns.local_rank, cuda=False) == "pytorch"
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("RANK")
    assert resolve_launcher("pytorch", 0, cuda=False) == "none"
    assert capsys.readouterr().out.count(NOTE) == 1


# ----------------------------------------------------------------------- data root from the config

def test_paper_shaped_config_data_root(tmp_path, capsys):
    """The paper's dataset config copies its hard-coded data_root into RepeatDataset-wrapped datasets:
    without --data-root that root is used (here: missing -> one line naming both); --data-root
    replaces it in every dataloader."""
    from bgmask.seg.cli import config_args
    from bgmask.seg.config import load_config, split_folder

    paper_root = "/user/aaniraj/home/Documents/Projects/data/cub_binary_segmentation"
    config = tmp_path / "paper_dataset.py"
    config.write_text(
        f"_base_ = [{str(SMALL)!r}]\ndata_root = {paper_root!r}\n"
        "def _wrap(img, ann):\n"
        "    return dict(_delete_=True, type='RepeatDataset', times=1, dataset=dict(type='CUBBinarySegDataset',"
        " data_root=data_root, data_prefix=dict(img_path=img, seg_map_path=ann), pipeline=[]))\n"
        "train_dataloader = dict(dataset=_wrap('images/train', 'annotations/train'))\n"
        "test_dataloader = dict(dataset=_wrap('images/waterbird_test', 'annotations/test'))\n")
    err = one_line_error(train_main([str(config)]), capsys.readouterr().err)
    assert paper_root in err and "--data-root" in err and "paper_dataset.py" in err
    cfg = load_config(config_args().parse_args([str(config), "--data-root", str(tmp_path)]))
    assert cfg.train_dataloader.dataset.dataset.data_root == str(tmp_path.resolve())
    assert split_folder(cfg, "test_dataloader") == tmp_path.resolve() / "images" / "waterbird_test"
    assert split_folder(cfg, "val_dataloader") == tmp_path.resolve() / "images" / "val"  # bgmask's placeholder


@pytest.mark.parametrize("argv, words", [
    ([str(SMALL)], ["no --data-root given", "sets no data_root"]),
    (["{missing}"], ["data root not found", "/nonexistent/cub_binary_segmentation", "no --data-root given"]),
    ([str(SMALL), "--data-root", "/nonexistent/x"], ["--data-root", "/nonexistent/x"]),
    ([str(SMALL), "--launcher", "slurm"], ["--launcher slurm", "needs GPUs"]),
    ([str(SMALL), "--launcher", "torchrun"], ["--launcher", "invalid choice"]),
], ids=["no-data-root", "config-root-missing", "flag-root-missing", "slurm-on-cpu", "unknown-launcher"])
def test_bad_training_values_are_one_line(argv, words, tmp_path, capsys):
    if "slurm" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    missing = config_with_data_root(tmp_path / "missing_root.py", SMALL, "/nonexistent/cub_binary_segmentation")
    argv = [str(missing) if a == "{missing}" else a for a in argv]
    err = one_line_error(train_main(argv), capsys.readouterr().err)
    assert all(w in err for w in words), err


# -------------------------------------------------------------------------- 1i: gen_masked_image_dataset

def _paper_gen_argv(run: dict, save: Path, checkpoint: Path, data_path: Path | None = None) -> list[str]:
    return ["--data_path", str(data_path or run["cub"] / "images"), "--config_file", str(run["config"]),
            "--checkpoint_file", str(checkpoint), "--save_path", str(save), "--no_progress"]


@pytest.mark.slow
def test_1i_gen_masked_with_the_papers_flags(paper_run, tmp_path, capsys):
    from bgmask.data.cub import load_rgb
    from bgmask.io import atomic_save_image
    from bgmask.masking.make_masked import masked_pixels
    from bgmask.seg.segmenter import load_segmenter

    full = paper_run["work"] / f"iter_{ITERS}.pth"  # what the paper passes (iter_160000.pth): a full checkpoint
    save = tmp_path / "CUB_200_2011" / "images_masked"
    err = one_line_error(gen_masked_main(_paper_gen_argv(paper_run, save, full)), capsys.readouterr().err)
    assert "--trust-full-checkpoint" in err
    assert gen_masked_main([*_paper_gen_argv(paper_run, save, full), "--trust_full_checkpoint"]) == 0
    src = paper_run["cub"] / "images"
    images = sorted(src.glob("*/*.jpg"))
    assert sorted(p.relative_to(save) for p in save.rglob("*.jpg")) == [p.relative_to(src) for p in images]
    seg = load_segmenter(paper_run["config"], paper_run["work"] / "segmenter_slim.pth")
    masks = seg.predict_images([load_rgb(p) for p in images])  # (h, w) {0, 1}, 1 = bird
    assert 0.02 < np.mean([m.mean() for m in masks]) < 0.98  # both classes predicted: the check means something
    for path, mask in zip(images, masks):
        image = load_rgb(path)
        expected = np.where(mask[..., None] == 1, np.asarray(image), 0)  # cv2.bitwise_and(img, img, mask)
        masked = masked_pixels(image, mask, "black")
        assert (np.asarray(masked) == expected).all()  # before JPEG: exactly the paper's pixels
        atomic_save_image(tmp_path / "expected.jpg", masked)
        assert (save / path.relative_to(src)).read_bytes() == (tmp_path / "expected.jpg").read_bytes()
        with Image.open(save / path.relative_to(src)) as out:
            assert out.format == "JPEG" and out.size == image.size
            written = np.asarray(out.convert("RGB")).astype(int)
        core_bg, core_fg = _eroded(mask == 0), _eroded(mask == 1)  # away from JPEG's ringing at the edges
        assert written[core_bg].mean() < 2 and written[core_bg].max() <= 32
        assert not core_fg.any() or np.abs(written[core_fg] - expected[core_fg]).mean() < 6
    info = json.loads((save / "masked_copy.json").read_text())
    assert info["fill"] == "black" and info["source_images"] == str(src.resolve())
    assert gen_masked_main([*_paper_gen_argv(paper_run, save, full), "--trust_full_checkpoint"]) == 0
    assert f"all {len(images)} masked images already in" in capsys.readouterr().out
    # another segmenter into the same folder: one line (--overwrite rewrites)
    other = paper_run["work"] / "segmenter_slim.pth"
    err = one_line_error(gen_masked_main(_paper_gen_argv(paper_run, save, other)), capsys.readouterr().err)
    assert "--overwrite" in err


def _eroded(region: np.ndarray, r: int = 2) -> np.ndarray:
    """region shrunk by r pixels (a pixel stays when its whole (2r+1)^2 neighbourhood is in the region)."""
    padded = np.pad(region, r, constant_values=False)
    h, w = region.shape
    out = np.ones_like(region)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


@pytest.mark.slow
def test_1i_waterbirds_folder_and_bgmask_flags(paper_run, tmp_path):
    """--data_path may be the Waterbirds folder; bgmask's own flags (--cub_root ...) keep working."""
    slim = paper_run["work"] / "segmenter_slim.pth"
    save = tmp_path / "wb_masked"
    assert gen_masked_main(_paper_gen_argv(paper_run, save, slim, paper_run["cub"] / WB)) == 0
    wb = sorted(p.relative_to(paper_run["cub"] / WB) for p in (paper_run["cub"] / WB).glob("*/*.jpg"))
    assert sorted(p.relative_to(save) for p in save.rglob("*.jpg")) == wb
    assert gen_masked_main(["--cub_root", str(paper_run["cub"]), "--config", str(paper_run["config"]),
                            "--checkpoint", str(slim), "--out_subdir", "images_pred", "--no_progress"]) == 0
    assert (paper_run["cub"] / "images_pred_waterbirds" / wb[0]).is_file()


@pytest.mark.parametrize("argv, words", [
    (["--data_path", "{cub}/images", "--cub_root", "{cub}", "--save_path", "{tmp}/o"], ["not allowed with"]),
    (["--data_path", "{cub}/images"], ["--save_path"]),
    (["--data_path", "{cub}/images", "--save_path", "{cub}/images"], ["overwrite the images"]),
    (["--data_path", "{cub}", "--save_path", "{tmp}/o"], ["no .jpg", "--data_path {cub}/images"]),
    (["--data_path", "{cub}/images", "--save_path", "{tmp}/o", "--out_subdir", "x"], ["--cub_root"]),
    (["--cub_root", "{cub}", "--save_path", "{tmp}/o"], ["--data_path"]),
    (["--save_path", "{tmp}/o"], ["one of the arguments --data_path"]),
], ids=["both-inputs", "no-save-path", "save-is-data", "cub-root-as-data-path", "out-subdir-with-data-path",
        "save-path-with-cub-root", "no-input"])
def test_gen_masked_flag_mixups_are_one_line(argv, words, tmp_path, capsys):
    cub = tmp_path / "CUB_200_2011"
    (cub / "images" / "001.A").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(cub / "images" / "001.A" / "a.jpg")
    fill = {"{cub}": str(cub), "{tmp}": str(tmp_path)}
    argv = [a.replace("{cub}", fill["{cub}"]).replace("{tmp}", fill["{tmp}"]) for a in argv]
    words = [w.replace("{cub}", str(cub)) for w in words]
    err = one_line_error(gen_masked_main([*argv, "--checkpoint_file", str(tmp_path / "none.pth")]),
                         capsys.readouterr().err)
    assert all(w in err for w in words), err
