"""Safe loading: a crafted malicious pickle (its `__reduce__` would create a marker file) saved as a
.pt/.pth is refused with one clear line, and not executed, wherever a file is loaded: a classifier
checkpoint (eval, resume), --pretrained_file, a segmenter checkpoint (predict_masks, test, online
segmenter, convert). Only an explicit --trust_checkpoint unpickles a classifier checkpoint in full.
Our own classifier and slim segmenter checkpoints load with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bgmask.checkpoint import load_checkpoint
from bgmask.apps.scripts import eval_early, eval_late, train_early

from conftest import write_tiny_cub

REPO = Path(__file__).resolve().parents[1]
SMALL_SEG = REPO / "mmsegmentation/configs/unet/unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py"


class Payload:
    """Unpickling this runs `exec`, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    cub = write_tiny_cub(root / "CUB", num_classes=3, per_class=(4, 2), size=(40, 32))
    run = root / "run"
    assert train_early(train_argv(cub, run, "--epochs", "1")) == 0
    return {"root": root, "cub": cub, "ckpt": run / "last.pt"}


def train_argv(cub, run, *more):
    return ["--data_path", str(cub), "--snapshot_dir", str(run), "--image_size", "32", "--batch_size", "4",
            "--num_workers", "0", "--threads", "1", "--no_progress", "--augmentations_to_use", "none", *more]


def one_line(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m


def evil_classifier(good, tmp_path, marker, legacy=False) -> Path:
    """A real checkpoint of ours with one extra entry that runs code when unpickled."""
    state = torch.load(good["ckpt"], weights_only=True)
    state["payload"] = Payload(marker)
    f = tmp_path / ("evil_legacy.pt" if legacy else "evil.pt")
    torch.save(state, f, _use_new_zipfile_serialization=not legacy)
    return f


def evil_plain(tmp_path, marker, name="evil.pth") -> Path:
    """Not even a torch file: a bare pickle."""
    f = tmp_path / name
    with open(f, "wb") as fh:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": Payload(marker)}, fh)
    return f


def test_the_payload_works(tmp_path, marker):
    """The control: unpickled without weights_only, the file does create the marker."""
    f = tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, f)
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_eval_script_refuses_a_malicious_checkpoint(good, tmp_path, marker):
    """The real entry point, as users run it."""
    f = evil_classifier(good, tmp_path, marker)
    p = subprocess.run([sys.executable, "early_masking_and_baseline/eval_waterbirds.py", "--checkpoint", str(f),
                        "--data_path", str(good["cub"]), "--num_workers", "0", "--no_progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("error: ") and str(f) in lines[0] and "--trust_checkpoint" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_classifier_checkpoint_needs_trust(good, tmp_path, marker, capsys, legacy):
    f = evil_classifier(good, tmp_path, marker, legacy)
    argv = ["--checkpoint", str(f), "--data_path", str(good["cub"]), "--num_workers", "0", "--no_progress",
            "--out", str(tmp_path / "ev")]
    err = one_line(capsys, eval_late(argv))
    assert "needs arbitrary unpickling" in err and "--trust_checkpoint" in err and str(f) in err
    assert not marker.exists() and not (tmp_path / "ev.json").exists()
    # --resume_training reads last.pt the same way
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(f, run / "last.pt")
    err = one_line(capsys, train_early(train_argv(good["cub"], run, "--epochs", "1", "--resume_training")))
    assert "--trust_checkpoint" in err and not marker.exists()
    # the documented opt-in: with --trust_checkpoint the file is unpickled in full (and here runs its code)
    assert eval_early(argv + ["--trust_checkpoint"]) == 0
    assert marker.exists() and (tmp_path / "ev.json").is_file()


def test_bare_pickle_is_not_a_checkpoint(tmp_path, marker, capsys, good, recwarn):
    f = evil_plain(tmp_path, marker, "evil.pt")
    for trust in ([], ["--trust_checkpoint"]):  # torch.save never wrote it: trust cannot make it one
        err = one_line(capsys, eval_early(["--checkpoint", str(f), "--data_path", str(good["cub"]), *trust]))
        assert str(f) in err and "not a torch checkpoint" in err and "--trust_checkpoint" not in err, err
        assert not marker.exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # it would be a second stderr line


JUNK = {"random": lambda: random.Random(7).randbytes(5000), "tiny": lambda: b"\x80\x02K",
        "index error": lambda: random.Random(2).randbytes(102), "key error": lambda: random.Random(20).randbytes(120),
        "zip without data.pkl": None}


@pytest.mark.parametrize("kind", sorted(JUNK))
@pytest.mark.parametrize("trust", [False, True], ids=["plain", "trust"])
def test_junk_is_one_line_with_or_without_trust(good, tmp_path, capsys, kind, trust):
    """Random bytes (which --trust_checkpoint used to hand to a full unpickler: a traceback) are one line
    that never suggests --trust_checkpoint, for evaluation and for --resume_training alike."""
    f = tmp_path / "junk.pt"
    if JUNK[kind] is None:
        with zipfile.ZipFile(f, "w") as z:
            z.writestr("archive/notes.txt", "not a checkpoint")
    else:
        f.write_bytes(JUNK[kind]())
    flag = ["--trust_checkpoint"] if trust else []
    err = one_line(capsys, eval_early(["--checkpoint", str(f), "--data_path", str(good["cub"]), "--no_progress",
                                       "--num_workers", "0", *flag]))
    assert str(f) in err and "not a torch checkpoint" in err and "--trust_checkpoint" not in err, err
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(f, run / "last.pt")
    err = one_line(capsys, train_early(train_argv(good["cub"], run, "--epochs", "1", "--resume_training", *flag)))
    assert "not a torch checkpoint" in err and "--trust_checkpoint" not in err, err


def test_trusted_but_broken_torch_file_is_one_line(good, tmp_path, capsys, marker):
    """A real torch pickle naming a class that does not exist: with --trust_checkpoint one line, no traceback."""
    f = evil_classifier(good, tmp_path, marker)
    with zipfile.ZipFile(f) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("/data.pkl"))
    entries[pkl] = entries[pkl].replace(b"__builtin__", b"no_such_mod")  # the payload's `exec` cannot be found
    with zipfile.ZipFile(f, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    err = one_line(capsys, eval_early(["--checkpoint", str(f), "--data_path", str(good["cub"]), "--no_progress",
                                       "--num_workers", "0", "--trust_checkpoint"]))
    assert str(f) in err and "--trust_checkpoint" in err and not marker.exists(), err


def test_is_torch_pickle(good, tmp_path, marker):
    from bgmask.io import is_torch_pickle

    (tmp_path / "junk").write_bytes(random.Random(1).randbytes(300))
    assert is_torch_pickle(good["ckpt"]) and is_torch_pickle(evil_classifier(good, tmp_path, marker, legacy=True))
    assert not is_torch_pickle(evil_plain(tmp_path, marker)) and not is_torch_pickle(tmp_path / "junk")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["torch", "bare pickle"])
def test_pretrained_file_is_refused(good, tmp_path, marker, capsys, recwarn, kind):
    if kind == "torch":
        from bgmask.models import create_classifier

        sd = dict(create_classifier("bgmask_resnet_tiny", 3).state_dict())
        sd["payload"] = Payload(marker)
        f = tmp_path / "evil.pth"
        torch.save(sd, f)
    else:
        f = evil_plain(tmp_path, marker)
    err = one_line(capsys, train_early(train_argv(good["cub"], tmp_path / "run", "--pretrained_file", str(f))))
    assert str(f) in err and not marker.exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
    if kind == "torch":
        assert "arbitrary unpickling" in err


# ---------------------------------------------------------------------------------------- segmenter

@pytest.fixture(scope="module")
def slim(good):
    pytest.importorskip("mmseg")
    from bgmask.seg.checkpoint import save_slim
    from bgmask.seg.segmenter import build_model, read_config

    cfg = read_config(SMALL_SEG)
    torch.manual_seed(0)
    return save_slim(good["root"] / "slim.pth", build_model(cfg).state_dict(),
                     {"classes": ["background", "bird"], "palette": [[0, 0, 0], [255, 255, 255]]}, cfg.pretty_text)


def evil_segmenter(slim, tmp_path, marker) -> Path:
    ckpt = torch.load(slim, weights_only=True)
    ckpt["meta"]["message_hub"] = Payload(marker)  # what a full mmengine checkpoint pickles
    f = tmp_path / "iter_100.pth"
    torch.save(ckpt, f)
    return f


def test_segmenter_checkpoint_needs_trust(slim, good, tmp_path, marker, capsys):
    from bgmask.seg.checkpoint import load_checkpoint_file
    from bgmask.seg.cli import convert_main, predict_main, test_main

    f = evil_segmenter(slim, tmp_path, marker)
    err = one_line(capsys, predict_main(["--config", str(SMALL_SEG), "--checkpoint", str(f), "--cub_root",
                                         str(good["cub"]), "--out_dir", str(tmp_path / "m"), "--no_progress"]))
    assert str(f) in err and "--trust-full-checkpoint" in err and not (tmp_path / "m").exists()
    err = one_line(capsys, test_main([str(SMALL_SEG), str(f), "--data-root", str(tmp_path)]))
    assert "--trust-full-checkpoint" in err
    err = one_line(capsys, convert_main([str(f), str(tmp_path / "slim.pth")]))
    assert "--trust-full-checkpoint" in err and not (tmp_path / "slim.pth").exists()
    # the online segmenter of the classifier scripts loads it the same way
    err = one_line(capsys, train_early(train_argv(good["cub"], tmp_path / "run", "--strategy", "early",
                                                  "--seg_model_config_path", str(SMALL_SEG),
                                                  "--seg_model_checkpoint_path", str(f))))
    assert "--trust_checkpoint" in err  # the flag of that script
    assert not marker.exists()
    load_checkpoint_file(f, trust_full=True)  # the explicit opt-in (convert_checkpoint.py --trust-full-checkpoint)
    assert marker.exists()


# -------------------------------------------------------------------------------- weights_only loads

def test_our_checkpoints_load_weights_only(good, slim, monkeypatch):
    """torch.load(weights_only=True) reads both formats as they are, and our loaders never ask for
    anything else on them."""
    from bgmask.seg.checkpoint import load_checkpoint_file
    from bgmask.seg.segmenter import load_segmenter

    state = torch.load(good["ckpt"], weights_only=True)
    assert state["format"] == "bgmask-classifier" and state["model"]
    seg = torch.load(slim, weights_only=True)
    assert seg["meta"]["format"] == "bgmask-seg-slim-v1" and seg["state_dict"]

    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(good["ckpt"])
    load_checkpoint_file(slim)
    load_segmenter(SMALL_SEG, slim)
    assert calls and all(w is True for w in calls), calls
