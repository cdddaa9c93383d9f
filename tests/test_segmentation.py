"""The segmentation subproject (mmsegmentation/ + bgmask.seg): every shipped config builds and runs;
a short training of the CPU config beats the all-background mIoU; slim checkpoints load weights-only;
predict_masks.py writes the mask layout and resumes; the adapter matches MMSeg's own inference; user
errors are one line.

One small segmenter is trained once per module (about 20 s on one CPU thread) and shared."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mmseg")

from bgmask.data.binary_seg import make_binary_seg  # noqa: E402
from bgmask.data.synthetic import generate_synthetic  # noqa: E402
from bgmask.errors import UserError  # noqa: E402
from bgmask.seg.checkpoint import convert_to_slim, load_checkpoint_file, save_slim  # noqa: E402
from bgmask.seg import cli  # noqa: E402
from bgmask.seg.cli import predict_main, train_main  # noqa: E402
from bgmask.seg.segmenter import IMAGENET_MEAN, IMAGENET_STD, build_model, load_segmenter, read_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "mmsegmentation" / "configs"
LEAF_CONFIGS = sorted(p for p in CONFIGS.rglob("*.py") if "_base_" not in p.parts)
SMALL = CONFIGS / "unet" / "unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py"
WB = "waterbird_complete95_forest2water2"
ITERS = 150
NO_WORKERS = [f"{k}.num_workers=0" for k in ("train_dataloader", "val_dataloader", "test_dataloader",
                                              "waterbird_test_dataloader")]


def normalise(arr: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(h, w, 3) uint8 RGB -> (3, h, w) classifier-normalised."""
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic benchmark (2 species x 40 train / 10 test, 64 px) -> binary seg dataset -> the small
    config trained for ITERS iterations."""
    base = tmp_path_factory.mktemp("seg")
    cub = base / "synth"
    generate_synthetic(cub, num_classes=2, image_size=64, train_per_class=40, test_per_class=10, seed=0,
                       progress=False)
    data = base / "binseg"
    make_binary_seg(cub, data, 0.1, 0, progress=False)
    work = base / "work"
    rc = train_main([str(SMALL), "--data-root", str(data), "--work-dir", str(work), "--cfg-options",
                     f"train_cfg.max_iters={ITERS}", f"train_cfg.val_interval={ITERS}",
                     f"param_scheduler.1.end={ITERS}", f"default_hooks.checkpoint.interval={ITERS}", *NO_WORKERS])
    assert rc == 0
    return dict(cub=cub, data=data, work=work, slim=work / "segmenter_slim.pth")


# ------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("config", LEAF_CONFIGS, ids=lambda p: p.stem)
def test_every_config_builds_and_runs_forward(config):
    cfg = read_config(config)
    for split in ("train", "val", "test", "waterbird_test"):
        assert cfg.get(f"{split}_dataloader"), f"{config.name} has no {split}_dataloader"
    assert cfg.waterbird_test_dataloader.dataset.data_prefix == dict(
        img_path="images/waterbird_test", seg_map_path="annotations/test")
    assert cfg.data_root.startswith("<unset")  # never a hard-coded path
    assert cfg.get("load_from") is None
    model = build_model(cfg)
    with torch.no_grad():
        logits = model.inference(torch.randn(2, 3, 64, 64), [dict(img_shape=(64, 64), ori_shape=(64, 64),
                                                                    pad_shape=(64, 64))] * 2)
    assert logits.shape == (2, 2, 64, 64) and torch.isfinite(logits).all()


def test_data_root_comes_from_the_command_line(tmp_path, capsys):
    from bgmask.seg.cli import config_args
    from bgmask.seg.config import load_config, split_folder

    rc = train_main([str(SMALL), "--cfg-options", "train_cfg.max_iters=1"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--data-root" in err
    parser = config_args(add_help=True)
    cfg = load_config(parser.parse_args([str(SMALL), "--cfg-options", f"data_root={tmp_path}",
                                         "train_dataloader.num_workers=0"]))
    assert split_folder(cfg, "waterbird_test_dataloader") == tmp_path / "images" / "waterbird_test"
    assert split_folder(cfg, "train_dataloader") == tmp_path / "images" / "train"
    assert cfg.train_dataloader.persistent_workers is False


def test_compat_stand_in_ext():
    import importlib.util

    import mmcv._ext as ext
    import mmcv.ops.multi_scale_deform_attn as msda

    from bgmask.seg.compat import MissingCompiledOp, has_real_ext

    if has_real_ext():
        pytest.skip("full mmcv with compiled ops is installed")
    assert ext.__spec__ is not None and ext.__spec__.name == "mmcv._ext"
    # mmengine's environment report looks the module up (pkgutil.find_loader, which is find_spec and was
    # removed in Python 3.14); that needs a real spec, and loader None reads "no compiled ops"
    assert importlib.util.find_spec("mmcv._ext").loader is None
    with pytest.raises(MissingCompiledOp, match="'nms'"):
        ext.nms(None)
    assert isinstance(MissingCompiledOp("x"), UserError)
    assert msda.IS_CUDA_AVAILABLE is False  # MultiScaleDeformableAttention takes the PyTorch path


def test_classifier_side_does_not_import_mmseg():
    """Importing the adapter imports no MMSeg (only the stand-in `mmcv._ext` is registered), and MMSeg
    can be imported after it in the usual way."""
    code = ("import sys, bgmask.masking.segmenter, bgmask.masking, bgmask.data\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mmseg', 'mmengine', 'mmcv', 'mmdet')]\n"
            "assert bad in ([], ['mmcv._ext']), bad\n"
            "from mmseg.apis import inference_model\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------------ training

@pytest.mark.slow
def test_short_training_beats_all_background(trained, capsys):
    data, work = trained["data"], trained["work"]
    rc = cli.test_main([str(SMALL), str(trained["slim"]), "--data-root", str(data), "--work-dir", str(work),
                    "--cfg-options", *NO_WORKERS])
    assert rc == 0
    rec = json.loads((work / "test_metrics.json").read_text())
    assert "| waterbird_test |" in capsys.readouterr().out
    bg = np.mean([np.mean(np.asarray(Image.open(p)) == 0) for p in (data / "annotations" / "test").rglob("*.png")])
    all_background_miou = bg / 2  # background IoU = background fraction, bird IoU = 0
    for split in ("test", "waterbirds"):
        assert rec[f"{split}/num_images"] == 20
        assert rec[f"{split}/mIoU"] > all_background_miou + 0.2, rec
        assert rec[f"{split}/IoU.bird"] > 0.4, rec
        assert 0 < rec[f"{split}/mDice"] <= 1
    assert json.loads((work / "results.jsonl").read_text().splitlines()[-1])["test/mIoU"] == rec["test/mIoU"]
    last = json.loads((work / "results.jsonl").read_text().splitlines()[-1])
    assert last["split"] == "eval" and last["command"] == rec["command"] and last["git_revision"] == rec["git_revision"]
    for name in ("train_command.txt", "test_command.txt", "git_revision.txt"):
        assert (work / name).is_file(), name


@pytest.mark.slow
def test_slim_checkpoint_round_trip(trained, tmp_path, capsys):
    ckpt = torch.load(trained["slim"], map_location="cpu", weights_only=True)
    assert ckpt["meta"]["format"] == "bgmask-seg-slim-v1"
    assert ckpt["meta"]["dataset_meta"]["classes"] == ["background", "bird"]
    assert ckpt["meta"]["iter"] == ITERS
    seg = load_segmenter(None, trained["slim"])  # the config stored in the checkpoint
    for k, v in seg.model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k
    # the full mmengine checkpoint of the same run: refused unless trusted explicitly
    full = trained["work"] / f"iter_{ITERS}.pth"
    with pytest.raises(UserError, match="--trust-full-checkpoint"):
        load_checkpoint_file(full)
    converted = convert_to_slim(full, tmp_path / "conv.pth", trust_full=True)
    conv = torch.load(converted, weights_only=True)
    assert conv["state_dict"].keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(conv["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    # a slim file also loads through MMSeg's own API
    from mmseg.apis import init_model

    model = init_model(str(SMALL), str(trained["slim"]), device="cpu")
    assert model.dataset_meta["classes"] == ["background", "bird"]


# ------------------------------------------------------------------------------------- adapter

@pytest.mark.slow
def test_adapter_output_and_agreement_with_mmseg(trained):
    from mmseg.apis import inference_model

    seg = load_segmenter(SMALL, trained["slim"], device="cpu")
    paths = sorted((trained["cub"] / WB).rglob("*.jpg"))[:6]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    refs = [inference_model(seg.model, a[:, :, ::-1].copy()).pred_sem_seg.data[0].numpy() for a in arrays]

    batch = torch.stack([normalise(a) for a in arrays])  # (6, 3, 64, 64)
    masks = seg(batch)
    assert masks.shape == (6, 1, 64, 64) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert 0.02 < masks.mean() < 0.6  # a bird, not everything or nothing
    agreement = np.mean([(m[0].numpy() == r).mean() for m, r in zip(masks, refs)])
    assert agreement > 0.999, agreement
    # PIL path: exactly MMSeg's inference (same resize and normalisation), also for other sizes
    for m, r in zip(seg.predict_images([Image.fromarray(a) for a in arrays]), refs):
        assert m.dtype == np.uint8 and m.shape == r.shape and (m == r).all()
    # (sizes whose test-time size needs no padding: with padding MMSeg 1.2.2 resizes the padded logits
    # onto the unpadded size before cropping, a geometric shift the adapter does not copy)
    odd = [np.asarray(Image.fromarray(a).resize(size)) for a, size in zip(arrays, [(64, 48), (80, 40), (100, 100)])]
    for m, a in zip(seg.predict_images(odd), odd):
        r = inference_model(seg.model, a[:, :, ::-1].copy()).pred_sem_seg.data[0].numpy()
        assert m.shape == a.shape[:2] and (m == r).mean() > 0.999
    seg4 = load_segmenter(SMALL, trained["slim"], batch_size=4)
    mixed = seg4.predict_images([*odd, *arrays])  # batches of 4 over mixed sizes = one image at a time
    assert all((m == seg.predict_images([a])[0]).all() for m, a in zip(mixed, [*odd, *arrays]))
    # chunked batches, another classifier normalisation: the same masks
    seg2 = load_segmenter(SMALL, trained["slim"], input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5), batch_size=4)
    masks2 = seg2(torch.stack([normalise(a, (0.5,) * 3, (0.5,) * 3) for a in arrays]))
    assert (masks2 != masks).float().mean() < 1e-3
    # other sizes: resized to the segmenter's input and back
    big = torch.nn.functional.interpolate(batch, size=(96, 80), mode="bilinear", align_corners=False)
    out = seg(big)
    assert out.shape == (6, 1, 96, 80)
    small = torch.nn.functional.interpolate(out, size=(64, 64), mode="nearest")
    assert (small == masks).float().mean() > 0.9


# ------------------------------------------------------------------------------------- predict

@pytest.mark.slow
def test_predict_masks_layout_and_resume(trained, capsys):
    from bgmask.data.cub import read_cub_metadata

    cub, out = trained["cub"], trained["cub"].parent / "masks"
    argv = ["--config", str(SMALL), "--checkpoint", str(trained["slim"]), "--cub_root", str(cub),
            "--out_dir", str(out), "--batch_size", "8", "--no_progress"]
    assert predict_main(argv) == 0
    assert "images/s" in capsys.readouterr().out
    meta = read_cub_metadata(cub)
    expected = [("images", meta.relpaths[i]) for i in meta.ids]
    expected += [(WB, meta.relpaths[i]) for i in meta.ids if not meta.is_train[i]]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(f"{sub}/{Path(rel).with_suffix('.png').as_posix()}" for sub, rel in expected)
    for sub, rel in expected[::7]:
        with Image.open(cub / sub / rel) as img, Image.open(out / sub / Path(rel).with_suffix(".png")) as m:
            assert m.size == img.size and m.mode == "L"
            assert set(np.unique(np.asarray(m)).tolist()) <= {0, 255}
    # resume: a deleted file comes back, the others are not rewritten
    victim = out / WB / Path(expected[-1][1]).with_suffix(".png")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p != victim}
    victim_bytes = victim.read_bytes()
    victim.unlink()
    assert predict_main(argv) == 0
    assert "predicted 1 masks" in capsys.readouterr().out
    assert victim.read_bytes() == victim_bytes
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # the folder is what MaskSource reads
    from bgmask.data.cub import MaskSource, load_mask

    src = MaskSource(str(out))
    src.check(cub, WB)
    with Image.open(cub / WB / expected[-1][1]) as img:
        assert load_mask(src.path(cub, WB, expected[-1][1]), img.size).max() == 1
    # another segmenter into the same folder: refused
    other = trained["work"] / "other_slim.pth"
    ckpt = torch.load(trained["slim"], weights_only=True)
    save_slim(other, ckpt["state_dict"], ckpt["meta"]["dataset_meta"], ckpt["meta"]["config"], iter=0)
    assert predict_main(["--config", str(SMALL), "--checkpoint", str(other), *argv[4:]]) == 2
    assert "another segmenter" in capsys.readouterr().err


@pytest.mark.slow
def test_gen_masked_image_dataset(trained):
    from bgmask.seg.cli import gen_masked_main

    cub = trained["cub"]
    rc = gen_masked_main(["--checkpoint", str(trained["slim"]), "--cub_root", str(cub), "--out_dir",
                          str(cub.parent / "masks"), "--out_subdir", "images_pred", "--no_progress"])
    assert rc == 0
    rel = next((cub / WB).rglob("*.jpg")).relative_to(cub / WB)
    assert (cub / "images_pred" / rel).is_file() and (cub / "images_pred_waterbirds" / rel).is_file()


@pytest.mark.slow
def test_predict_warns_when_masks_are_empty(trained, tmp_path, capsys):
    """A segmenter that predicts all background (as a barely trained one does) must be flagged."""
    ckpt = torch.load(trained["slim"], weights_only=True)
    sd = dict(ckpt["state_dict"])
    sd["decode_head.conv_seg.weight"] = torch.zeros_like(sd["decode_head.conv_seg.weight"])
    sd["decode_head.conv_seg.bias"] = torch.tensor([5.0, -5.0])
    blind = save_slim(tmp_path / "blind.pth", sd, ckpt["meta"]["dataset_meta"], ckpt["meta"]["config"])
    rc = predict_main(["--checkpoint", str(blind), "--cub_root", str(trained["cub"]), "--out_dir",
                       str(tmp_path / "masks"), "--no_progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "no bird" in err


# ---------------------------------------------------------------------------------- user errors

def _one_line_error(capsys, argv) -> str:
    assert predict_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.slow
def test_user_errors_are_one_line(trained, tmp_path, capsys):
    common = ["--cub_root", str(trained["cub"]), "--out_dir", str(tmp_path / "m")]
    err = _one_line_error(capsys, ["--config", str(tmp_path / "nope.py"), "--checkpoint", str(trained["slim"]), *common])
    assert "config not found" in err and "nope.py" in err
    err = _one_line_error(capsys, ["--config", str(SMALL), "--checkpoint", str(tmp_path / "none.pth"), *common])
    assert "checkpoint not found" in err
    three = tmp_path / "three_classes.py"
    three.write_text(f"_base_ = [{str(SMALL)!r}]\nmodel = dict(decode_head=dict(num_classes=3))\n")
    err = _one_line_error(capsys, ["--config", str(three), "--checkpoint", str(trained["slim"]), *common])
    assert "num_classes is 3" in err
    # a checkpoint of a 3-class model against the 2-class config
    ckpt = torch.load(trained["slim"], weights_only=True)
    sd = dict(ckpt["state_dict"])
    sd["decode_head.conv_seg.weight"] = torch.zeros((3, *sd["decode_head.conv_seg.weight"].shape[1:]))
    sd["decode_head.conv_seg.bias"] = torch.zeros(3)
    wrong = save_slim(tmp_path / "wrong.pth", sd, {"classes": ["a", "b", "c"]}, ckpt["meta"]["config"])
    err = _one_line_error(capsys, ["--config", str(SMALL), "--checkpoint", str(wrong), *common])
    assert "3 classes" in err
    wrong_shape = save_slim(tmp_path / "wrong2.pth", sd, None, ckpt["meta"]["config"])
    err = _one_line_error(capsys, ["--config", str(SMALL), "--checkpoint", str(wrong_shape), *common])
    assert "conv_seg" in err and "does not fit" in err
    with pytest.raises(UserError):
        load_segmenter(three, trained["slim"])


# ------------------------------------------------------------------ the online segmenter in training

@pytest.mark.slow
def test_late_masking_with_online_segmenter(trained, tmp_path):
    """train.py with --seg_model_config_path/--seg_model_checkpoint_path: masks come from the
    segmenter on each batch (no mask folder is read), and evaluation uses it too."""
    import json

    from bgmask.apps.scripts import eval_late, train_late

    run = tmp_path / "run"
    argv = ["--data_path", str(trained["cub"]), "--model_arch", "bgmask_resnet_tiny", "--image_size", "64",
            "--epochs", "1", "--batch_size", "16", "--num_workers", "0", "--no_progress", "--threads", "1",
            "--seg_model_config_path", str(SMALL), "--seg_model_checkpoint_path", str(trained["slim"]),
            "--mask_source", str(tmp_path / "no_such_mask_folder")]  # must not be read
    assert train_late([*argv, "--snapshot_dir", str(run)]) == 0
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["test/num_samples"] == 20 and "waterbirds/acc" in final
    assert eval_late(["--checkpoint", str(run / "last.pt"), "--data_path", str(trained["cub"]), "--num_workers", "0",
                      "--no_progress", "--seg_model_config_path", str(SMALL), "--seg_model_checkpoint_path",
                      str(trained["slim"]), "--mask_source", str(tmp_path / "no_such_mask_folder"),
                      "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["test/acc"] == final["test/acc"]


@pytest.mark.slow
def test_online_segmenter_flag_errors(trained, tmp_path, capsys):
    from bgmask.apps.scripts import train_late

    base = ["--data_path", str(trained["cub"]), "--snapshot_dir", str(tmp_path / "r"), "--epochs", "1"]
    assert train_late([*base, "--seg_model_config_path", str(SMALL)]) == 2
    assert "needs --seg_model_checkpoint_path" in capsys.readouterr().err
    assert train_late([*base, "--strategy", "baseline", "--seg_model_checkpoint_path", str(trained["slim"])]) == 2
    assert "uses no masks" in capsys.readouterr().err


def test_segmenter_train_and_test_into_a_held_work_dir_are_refused(trained, tmp_path, capsys):
    """One process per work dir (bgmask.runfolder), before mmengine writes its logs there."""
    from bgmask.runfolder import LOCK_NAME
    from bgmask.seg.cli import test_main

    from test_folder_lock import Holder

    work = tmp_path / "w"
    h = Holder(work)
    try:
        rc = train_main([str(SMALL), "--data-root", str(trained["data"]), "--work-dir", str(work), "--cfg-options",
                         "train_cfg.max_iters=1", *NO_WORKERS])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and str(work) in err and f"process {h.pid}" in err, err
        assert sorted(p.name for p in work.iterdir()) == [LOCK_NAME]
        rc = test_main([str(SMALL), str(trained["slim"]), "--data-root", str(trained["data"]), "--work-dir",
                        str(work), "--cfg-options", *NO_WORKERS])
        err = capsys.readouterr().err
        assert rc == 2 and f"process {h.pid}" in err and sorted(p.name for p in work.iterdir()) == [LOCK_NAME]
    finally:
        h.kill()


def test_each_run_in_one_process_writes_only_its_own_folder(trained, tmp_path, capsys):
    """mmengine keeps its visualizer and logger as process-wide instances found by name, and the configs
    name the visualizer 'visualizer': a second training in the same process (the demo, the sweep, a
    notebook) wrote its config and scalars into the first run's folder, and failed once that was gone. A
    main called with an argv recorded this process's command line (the demo's) as the run's command."""
    import shutil

    from bgmask.seg.cli import test_main

    def argv(work):
        return [str(SMALL), "--data-root", str(trained["data"]), "--work-dir", str(work), "--cfg-options",
                "train_cfg.max_iters=2", "train_cfg.val_interval=2", "default_hooks.checkpoint.interval=2", *NO_WORKERS]

    def train(work):
        return train_main(argv(work))

    from mmengine.logging import MMLogger
    from mmengine.visualization import Visualizer

    def names():
        return MMLogger.get_current_instance().instance_name, Visualizer.get_current_instance().instance_name

    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train(first) == 0
    names_first = names()
    before = sorted(str(p.relative_to(first)) for p in first.rglob("*"))
    assert train(second) == 0
    assert all(a != b for a, b in zip(names_first, names()))  # even within one second
    # each records its own command (not this process's), runnable from the repository root
    recorded = shlex.split((second / "train_command.txt").read_text())
    assert recorded == [sys.executable, "mmsegmentation/train.py", *argv(second)]
    assert (REPO / recorded[1]).is_file()
    assert sorted(str(p.relative_to(first)) for p in first.rglob("*")) == before  # nothing added to the first
    configs = list(second.glob("*/vis_data/config.py"))
    assert len(configs) == 1 and str(second) in configs[0].read_text()  # its own config, in its own folder
    logs = list(second.glob("*/*.log"))
    assert len(logs) == 1 and "Saving checkpoint at 2 iterations" in logs[0].read_text()
    shutil.rmtree(first)
    shutil.rmtree(second)  # the earlier runs' folders are gone: a later run must not need them
    assert train(third) == 0 and len(list(third.glob("*/vis_data/config.py"))) == 1
    test_argv = [str(SMALL), str(trained["slim"]), "--data-root", str(trained["data"]), "--work-dir",
                 str(tmp_path / "t"), "--cfg-options", *NO_WORKERS]
    assert test_main(test_argv) == 0 and len(list((tmp_path / "t").glob("*/vis_data/config.py"))) == 1
    command = [sys.executable, "mmsegmentation/test.py", *test_argv]
    assert shlex.split((tmp_path / "t" / "test_command.txt").read_text()) == command
    assert json.loads((tmp_path / "t" / "test_metrics.json").read_text())["command"] == shlex.join(command)
    capsys.readouterr()
