"""Faults: training killed with SIGKILL 10 times at seeded random points and resumed ends with the
weights and metrics of an uninterrupted run, and never leaves a truncated checkpoint; the synthetic
generator, `bgmask make-masked`, `bgmask make-binary-seg` and `mmsegmentation/predict_masks.py` killed
midway and rerun end with byte-identical outputs and no half-written file; Ctrl-C says how to resume; a read-only snapshot
folder or a full disk is one line, exit 2, with the previous checkpoint intact.

Kills come from outside (a SIGKILL after a random delay, or as soon as a checkpoint's temporary file
appears) and from inside (the child kills itself in a chosen `loss.backward()`, while evaluation reads
a chosen sample, or halfway through writing a chosen file; see tests/_faults_child.py). The killed
processes are forked from one "zygote" that has imported torch, timm and MMSeg once, so that ten
restarts do not cost ten imports.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from bgmask.checkpoint import load_checkpoint

from _faults_child import read_line
from conftest import write_tiny_cub

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("_faults_child.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
TRAIN = "early_masking_and_baseline/train.py"
PREDICT = "mmsegmentation/predict_masks.py"
SMALL_SEG = REPO / "mmsegmentation/configs/unet/unet-s4-c16_fcn_1xb8-1k_cub_binary_seg-64x64.py"
EPOCHS = 8
HAVE_MMSEG = importlib.util.find_spec("mmseg") is not None


# --------------------------------------------------------------------------------------- harness

class Zygote:
    """Parent side of `_faults_child.py --zygote`: start a target in a forked child, kill it, wait."""

    def __init__(self, preload: list[str]):
        self.proc = subprocess.Popen([sys.executable, str(CHILD), "--zygote", *preload], cwd=REPO, env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buf = bytearray()
        self.running = None  # pid of the child not yet reported finished

    def start(self, target: str, argv: list[str], log: Path, fault: dict | None = None) -> int:
        req = {"target": target, "argv": [str(a) for a in argv], "log": str(log), "fault": fault}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        self.running = json.loads(read_line(self.proc.stdout.fileno(), 180, self.buf))["pid"]
        return self.running

    def wait(self, timeout: float = 180) -> int:
        rc = json.loads(read_line(self.proc.stdout.fileno(), timeout, self.buf))["rc"]
        self.running = None
        return rc

    def run(self, target: str, argv: list[str], log: Path, fault: dict | None = None) -> int:
        self.start(target, argv, log, fault)
        return self.wait()

    def close(self) -> None:
        if self.running is not None:  # a test failed while its child ran
            sigkill(self.running)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def zygote():
    preload = ["bgmask.apps.scripts", "bgmask.engine", "bgmask.apps.cli", "bgmask.data.synthetic", "bgmask.masking.make_masked"]
    if HAVE_MMSEG:
        preload = ["bgmask.seg:compat.install", *preload, "bgmask.seg.cli", "bgmask.seg.segmenter", "mmseg.models",
                   "mmseg.apis", "mmengine.runner"]
    z = Zygote(preload)
    yield z
    z.close()


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_whole_images(root: Path) -> int:
    """Every image under root (temporary files aside) decodes completely."""
    n = 0
    for p in root.rglob("*"):
        if p.suffix in (".jpg", ".png") and not p.name.startswith("."):
            with Image.open(p) as img:
                img.load()
            n += 1
    return n


def count_files(root: Path, suffix: str) -> int:
    return sum(1 for p in root.rglob(f"*{suffix}") if not p.name.startswith(".")) if root.is_dir() else 0


def kill_when(proc_or_pid, ready, timeout: float = 60) -> None:
    """SIGKILL as soon as ready() is true (polled every millisecond)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if isinstance(proc_or_pid, subprocess.Popen) and proc_or_pid.poll() is not None:
            return
        if not isinstance(proc_or_pid, subprocess.Popen):
            try:
                os.kill(proc_or_pid, 0)
            except ProcessLookupError:  # ended (and reaped by the zygote)
                return
        if ready():
            break
        time.sleep(0.001)
    if isinstance(proc_or_pid, subprocess.Popen):
        proc_or_pid.kill()
        proc_or_pid.wait()
    else:
        sigkill(proc_or_pid)


# -------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    # 3 classes x (10 train, 5 test); --train_split 0.8: 24 train (3 steps of 8), 6 val, 15 test
    return write_tiny_cub(tmp_path_factory.mktemp("faults") / "CUB", num_classes=3, per_class=(10, 5), size=(40, 32))


def train_argv(cub: Path, run: Path, *more) -> list[str]:
    return ["--data_path", cub, "--snapshot_dir", run, "--image_size", "32", "--batch_size", "8",
            "--num_workers", "0", "--threads", "1", "--no_progress", "--epochs", str(EPOCHS),
            "--save_every_n_epochs", "1", "--train_split", "0.8", "--augmentations_to_use", "timm",
            "--drop_path", "0.1", "--seed", "3", *more]


def epoch_lines(log: Path) -> int:
    return sum(line.startswith("epoch ") for line in log.read_text().splitlines()) if log.is_file() else 0


def last_epoch(run: Path) -> int:
    return load_checkpoint(run / "last.pt")["epoch"] if (run / "last.pt").is_file() else 0


def records(run: Path) -> list[dict]:
    timing = ("train/seconds", "train/images_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "results.jsonl").read_text().splitlines()]


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a["epoch"] == b["epoch"] and a["best_val_acc"] == b["best_val_acc"], what
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{what}: model tensor {k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(v, sb[i][k]) if torch.is_tensor(v) else v == sb[i][k], f"{what}: optimizer {i}.{k}"


@pytest.mark.slow
def test_training_killed_ten_times_resumes_exactly(zygote, cub, tmp_path):
    """10 SIGKILLs at seeded random points (in an epoch, in evaluation, while a checkpoint is written,
    after random delays, as soon as a checkpoint's temporary file appears), each followed by a rerun with
    --resume_training (or from scratch when no epoch had finished): the final weights, optimizer state,
    every epoch_k.pt, best.pt, results.jsonl and final metrics equal those of an uninterrupted run, and
    every checkpoint on disk at every kill loads."""
    ref = tmp_path / "ref"
    zygote.start(TRAIN, train_argv(cub, ref), tmp_path / "ref.log")
    t0 = time.monotonic()
    assert zygote.wait() == 0, tail(tmp_path / "ref.log")
    epoch_s = (time.monotonic() - t0) / (EPOCHS + 2)  # start-up and final evaluation about one epoch each

    run, log = tmp_path / "run", tmp_path / "run.log"
    rng = random.Random(20240607)
    plan = ["backward"] * 2 + ["eval_item"] + ["ckpt_write"] * 2 + ["delay"] * 2 + ["tmpfile"]
    rng.shuffle(plan)
    plan = ["first_write", *plan, "final_eval"]  # epoch 1 logged but not saved (starts over); the end
    kills, restarts = [], 0
    for kind in plan:
        done = last_epoch(run)
        left = EPOCHS - done
        if kind != "final_eval" and (left == 0 or (kind == "delay" and left < 3)):
            kind = "eval_item"  # only evaluation is left to kill (or too little for a timed kill)
        w = min(3, left)  # the in-process kills land within the next w epochs (or the final evaluation)
        fault = {"backward": {"at": "backward", "n": rng.randint(1, 3 * w or 1)},
                 "eval_item": {"at": "eval_item", "n": rng.randint(1, 6 * w if w else 90)},
                 "final_eval": {"at": "eval_item", "n": 6 * left + rng.randint(1, 90)},
                 "ckpt_write": {"at": "atomic_write", "n": rng.randint(1, 2 * w or 1), "modules": ["bgmask.checkpoint"]},
                 "first_write": {"at": "atomic_write", "n": 1, "modules": ["bgmask.checkpoint"]},
                 }.get(kind)
        argv = train_argv(cub, run)
        if (run / "last.pt").is_file() or (run / "results.jsonl").is_file():
            # results lines but no last.pt (killed while writing epoch 1's checkpoint): the run starts over
            argv.append("--resume_training")
            restarts += not (run / "last.pt").is_file()
        pid = zygote.start(TRAIN, argv, log, fault)
        if kind == "delay":  # a random time, but before two more epochs end (at least 3 are left)
            deadline = time.monotonic() + rng.uniform(0.2, 2.5) * epoch_s
            epochs_before = epoch_lines(log)
            kill_when(pid, lambda: time.monotonic() >= deadline or epoch_lines(log) >= epochs_before + 2)
        elif kind == "tmpfile":
            stamp = (run / "last.pt").stat().st_mtime_ns if (run / "last.pt").is_file() else None
            stale = set(temp_files(run))  # left by an earlier kill; the run deletes them

            def checkpoint_moment():
                if any(".pt." in p.name and p not in stale for p in run.glob(".*.tmp")):
                    return True  # a checkpoint is being written right now
                now = (run / "last.pt").stat().st_mtime_ns if (run / "last.pt").is_file() else None
                return now != stamp  # missed the write: kill right after it
            kill_when(pid, checkpoint_moment)
        rc = zygote.wait()
        assert rc == -signal.SIGKILL, f"kill {len(kills) + 1} ({kind}) did not land: rc {rc}\n{tail(log)}"
        # at every kill: every checkpoint file present is whole and loads
        for ckpt in sorted(run.glob("*.pt")):
            load_checkpoint(ckpt)
        kills.append((kind, done, last_epoch(run), [p.name for p in temp_files(run)]))

    assert zygote.run(TRAIN, train_argv(cub, run, "--resume_training"), log) == 0, tail(log)
    print("\n".join(f"kill {i + 1}: {k} at epoch {a} -> last.pt {b}, temp files {t}" for i, (k, a, b, t) in enumerate(kills)))
    assert len(kills) == 10
    assert {"backward", "eval_item", "ckpt_write", "first_write", "final_eval"} <= {k for k, *_ in kills}
    assert restarts == 1 and "nothing to resume: it starts over from epoch 0" in log.read_text()
    assert any(t for *_, t in kills), "no kill cut a checkpoint write"
    assert kills[-1][2] == EPOCHS  # the last kill hit the final evaluation
    # nothing half-written is left, and everything equals the uninterrupted run
    assert temp_files(run) == []
    for name in ["last.pt", "best.pt", *(f"epoch_{k}.pt" for k in range(1, EPOCHS + 1))]:
        assert_same_state(load_checkpoint(run / name), load_checkpoint(ref / name), name)
    assert records(run) == records(ref)  # no epoch line twice, none missing
    assert [(r["epoch"], r["split"]) for r in records(run)] == [(e, "val") for e in range(1, EPOCHS + 1)] + [(EPOCHS, "final")]
    assert json.loads((run / "final_metrics.json").read_text()) == json.loads((ref / "final_metrics.json").read_text())
    assert (run / "done").is_file()


@pytest.mark.slow
def test_killed_between_the_first_results_line_and_the_first_checkpoint(zygote, cub, tmp_path):
    """SIGKILL right after epoch 1's results.jsonl line, before its last.pt: the folder holds results but
    no checkpoint. Rerun as it was, or with --resume_training, the run starts over from epoch 0 (the
    stale line dropped) and ends equal to an uninterrupted run."""
    log = tmp_path / "log"
    ref = tmp_path / "ref"
    assert zygote.run(TRAIN, train_argv(cub, ref, "--epochs", "2"), log) == 0, tail(log)
    for flag in ([], ["--resume_training"]):
        run = tmp_path / f"run{len(flag)}"
        argv = train_argv(cub, run, "--epochs", "2")
        rc = zygote.run(TRAIN, argv, log, {"at": "results_line", "n": 1})
        assert rc == -signal.SIGKILL, tail(log)
        assert [r["epoch"] for r in records(run)] == [1] and not list(run.glob("*.pt"))
        assert zygote.run(TRAIN, argv + flag, log) == 0, tail(log)
        assert "starts over from epoch 0" in tail(log, 2000)
        assert records(run) == records(ref)
        for name in ("last.pt", "best.pt", "epoch_1.pt", "epoch_2.pt"):
            assert_same_state(load_checkpoint(run / name), load_checkpoint(ref / name), f"{flag}: {name}")
        assert temp_files(run) == [] and (run / "done").is_file()


def test_resume_drops_log_lines_of_epochs_that_run_again(tmp_path):
    from bgmask.runfolder import RunFolder

    folder = RunFolder(tmp_path / "run", enabled=True)
    for rec in ({"epoch": 1, "split": "val"}, {"epoch": 2, "split": "val"}, {"epoch": 3, "split": "val"},
                {"epoch": 3, "split": "final"}):
        folder.log(rec)
    with open(tmp_path / "run" / "results.jsonl", "a") as f:
        f.write('{"epoch": 4, "spl')  # a torn line
    (tmp_path / "run" / ".last.pt.x1y2.tmp").write_bytes(b"half")
    folder.remove_stale_temp()
    folder.prepare_resume(2)
    assert [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()] == [
        {"epoch": 1, "split": "val"}, {"epoch": 2, "split": "val"}]
    assert temp_files(tmp_path / "run") == []


@pytest.mark.slow
def test_ctrl_c_during_training(cub, tmp_path):
    """SIGINT to the whole process group (what Ctrl-C does; DataLoader workers included): exit 130, a
    message naming --resume_training, no traceback, a whole last.pt and no temporary file."""
    run = tmp_path / "run"
    argv = [str(a) for a in train_argv(cub, run)]
    argv[argv.index("--epochs") + 1] = "500"
    argv[argv.index("--num_workers") + 1] = "1"
    proc = subprocess.Popen([sys.executable, TRAIN, *argv], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2/"):
                break
        time.sleep(random.Random(1).uniform(0.0, 0.3))
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seen = f"exit status {proc.returncode}; stderr:\n{err[-3000:]}\nstdout tail:\n{out[-1000:]}"  # for a rare flake
    assert proc.returncode == 130, seen
    assert "Traceback" not in err, seen
    message = [line for line in err.splitlines() if line.strip()]
    assert len(message) == 1 and "--resume_training" in message[0] and str(run) in message[0], seen
    assert load_checkpoint(run / "last.pt")["epoch"] >= 1
    assert temp_files(run) == []


def test_ctrl_c_in_the_middle_of_a_checkpoint_write(tmp_path, monkeypatch):
    """Ctrl-C while torch.save runs (torch would turn it into a RuntimeError from its zip writer): the
    checkpoint is finished and whole, then the usual KeyboardInterrupt arrives."""
    import bgmask.checkpoint as ck

    real_save = torch.save

    def save(obj, f, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands here
        real_save(obj, f, **kw)

    monkeypatch.setattr(ck.torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path / "last.pt", {"epoch": 3, "model": {"w": torch.ones(3)}})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("fault", ["read-only folder", "full disk", "full disk at the end"])
def test_unwritable_snapshot_folder_is_one_line_and_keeps_the_checkpoint(cub, tmp_path, capsys, monkeypatch, fault):
    """The folder turns read-only (or the disk fills) after epoch 1: one `error:` line naming the file,
    exit 2, last.pt of epoch 1 intact, no temporary file. As root, chmod does not stop writes, so the
    failure is injected where the OS would raise it (creating the temporary file, or fsync)."""
    import bgmask.io as bio
    import bgmask.checkpoint as resume
    import bgmask.runfolder as runfolder

    run = tmp_path / "run"
    real_save, real_write = resume.save_checkpoint, runfolder.atomic_write_text
    chmodded = []

    def break_disk():
        if fault == "read-only folder" and os.geteuid() != 0:
            run.chmod(0o555)  # the real thing where permissions apply
            chmodded.append(run)
        elif fault == "read-only folder":
            def mkstemp(*a, **k):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            monkeypatch.setattr(bio.tempfile, "mkstemp", mkstemp)
        else:
            def fsync(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(os, "fsync", fsync)

    def save_checkpoint(path, state):
        if state["epoch"] == 2 and fault != "full disk at the end":
            break_disk()
        real_save(path, state)

    def atomic_write_text(path, text):
        if Path(path).name == "final_metrics.json" and fault == "full disk at the end":
            break_disk()
        real_write(path, text)

    monkeypatch.setattr(resume, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(runfolder, "atomic_write_text", atomic_write_text)
    argv = [str(a) for a in train_argv(cub, run)]
    argv[argv.index("--epochs") + 1] = "2"
    argv[argv.index("--train_split") + 1] = "1.0"
    try:
        from bgmask.apps.scripts import train_early

        rc = train_early(argv)
    finally:
        for p in chmodded:
            p.chmod(0o755)
        monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    reason = "Read-only file system" if fault == "read-only folder" and not chmodded else None
    reason = reason or ("Permission denied" if chmodded else "No space left on device")
    assert reason in err, err
    if fault == "full disk at the end":
        assert str(run / "final_metrics.json") in err
        assert load_checkpoint(run / "last.pt")["epoch"] == 2
    else:
        assert str(run / "last.pt") in err and "previous checkpoint is kept" in err, err  # last.pt is written first
        assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert temp_files(run) == []


def test_snapshot_dir_under_a_file_is_one_line(cub, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    from bgmask.apps.scripts import train_early

    rc = train_early([str(a) for a in train_argv(cub, blocker / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: cannot write to --snapshot_dir") and "\n" not in err, err
    assert str(blocker / "run") in err


# ---------------------------------------------------------------------------- data-making tools

SYNTH = dict(num_classes=2, image_size=64, train_per_class=90, test_per_class=30, correlation=0.9, seed=5)


def synth_argv(out: Path) -> list[str]:
    return ["make-synthetic", "--out", out, "--num_classes", "2", "--image_size", "64", "--train_per_class", "90",
            "--test_per_class", "30", "--correlation", "0.9", "--seed", "5"]


@pytest.mark.slow
def test_synthetic_generator_killed_midway(zygote, tmp_path):
    """`bgmask make-synthetic` killed halfway through its first file (its config, so that the folder
    holds nothing but a temporary file), a real `python -m bgmask make-synthetic` killed from outside
    once a third of the images exist, then killed halfway through writing a file, then rerun: the same
    bytes as one uninterrupted run."""
    from bgmask.data.synthetic import generate_synthetic

    ref, out = tmp_path / "ref", tmp_path / "out"
    generate_synthetic(ref, **SYNTH, progress=False)
    n_images = count_files(ref / "images", ".jpg")
    log = tmp_path / "log"
    assert zygote.run("bgmask", synth_argv(out), log, {"at": "atomic_write", "n": 1}) == -signal.SIGKILL, tail(log)
    assert [p.name.endswith(".tmp") for p in out.iterdir()] == [True], list(out.iterdir())

    proc = subprocess.Popen([sys.executable, "-m", "bgmask", *map(str, synth_argv(out))], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: count_files(out / "images", ".jpg") >= n_images // 3)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < assert_whole_images(out)
    assert not (out / "images.txt").exists()  # written last: an unfinished dataset is not mistaken for one

    fault = {"at": "atomic_write", "n": n_images // 3, "modules": ["bgmask.io"]}
    assert zygote.run("bgmask", synth_argv(out), log, fault) == -signal.SIGKILL, tail(log)
    assert len(temp_files(out)) == 1  # the half-written file, never under its real name
    assert_whole_images(out)

    assert zygote.run("bgmask", synth_argv(out), log) == 0, tail(log)
    assert tree(out) == tree(ref)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from bgmask.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synth") / "cub"
    generate_synthetic(root, **SYNTH, progress=False)
    return root


@pytest.mark.slow
def test_make_masked_killed_midway(zygote, synth, tmp_path):
    """`bgmask make-masked` killed from outside, then halfway through a file, then rerun: the same bytes
    as an uninterrupted run, no half-written image."""
    from bgmask.masking.make_masked import make_masked

    make_masked(synth, "gt", "ref_masked", progress=False)
    argv = ["make-masked", "--cub_root", synth, "--masks", "gt", "--out_subdir", "images_masked"]
    n = count_files(synth / "images", ".jpg")
    proc = subprocess.Popen([sys.executable, "-m", "bgmask", *map(str, argv)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: count_files(synth / "images_masked", ".jpg") >= n // 3)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < assert_whole_images(synth / "images_masked")

    log = tmp_path / "log"
    fault = {"at": "atomic_write", "n": n // 3, "modules": ["bgmask.io"]}  # one process: the fault kills it
    assert zygote.run("bgmask", [*argv, "--workers", "1"], log, fault) == -signal.SIGKILL, tail(log)
    assert len(temp_files(synth / "images_masked")) == 1
    assert_whole_images(synth / "images_masked")

    assert zygote.run("bgmask", argv, log) == 0, tail(log)
    for sub in ("", "_waterbirds"):
        assert tree(synth / f"images_masked{sub}") == tree(synth / f"ref_masked{sub}")


@pytest.mark.slow
def test_make_binary_seg_killed_midway(zygote, synth, tmp_path):
    """`bgmask make-binary-seg` killed halfway through its first file (split_info.json, so that the
    folder holds nothing but a temporary file), from outside once a third of the images exist, then
    halfway through a file, then rerun: the same bytes as an uninterrupted run, no temporary file left."""
    from bgmask.data.binary_seg import make_binary_seg

    ref, out = tmp_path / "ref", tmp_path / "out"
    make_binary_seg(synth, ref, 0.1, 0, progress=False)
    n = count_files(ref / "images", ".jpg")
    argv = ["make-binary-seg", "--cub_root", synth, "--out", out, "--val_fraction", "0.1", "--seed", "0"]
    log = tmp_path / "log"
    # images (bgmask.data.images.write_upright) and annotations both go through bgmask.io's atomic_path
    fault = {"at": "atomic_write", "n": 1, "modules": ["bgmask.io"]}  # one process (--workers 1): the fault kills it
    assert zygote.run("bgmask", [*argv, "--workers", "1"], log, fault) == -signal.SIGKILL, tail(log)
    assert [p.name.endswith(".tmp") for p in out.iterdir()] == [True], list(out.iterdir())

    with open(log, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "bgmask", *map(str, argv)], cwd=REPO, env=ENV,
                                stdout=log_file, stderr=log_file)
        kill_when(proc, lambda: count_files(out / "images", ".jpg") >= n // 3)
    assert proc.returncode == -signal.SIGKILL, tail(log)
    assert 0 < count_files(out / "images", ".jpg") < n
    assert_whole_images(out)

    fault = {"at": "atomic_write", "n": n // 3, "modules": ["bgmask.io"]}
    assert zygote.run("bgmask", [*argv, "--workers", "1"], log, fault) == -signal.SIGKILL, tail(log)
    assert len(temp_files(out)) == 1  # the half-written file, never under its real name
    assert_whole_images(out)

    assert zygote.run("bgmask", argv, log) == 0, tail(log)
    assert tree(out) == tree(ref)


SLIM_SCRIPT = """
import sys
import torch
from bgmask.seg.checkpoint import save_slim
from bgmask.seg.segmenter import build_model, read_config
cfg = read_config(sys.argv[1])
torch.manual_seed(0)
model = build_model(cfg)
save_slim(sys.argv[2], model.state_dict(), {"classes": ["background", "bird"], "palette": [[0, 0, 0], [255, 255, 255]]},
          cfg.pretty_text)
"""


@pytest.mark.slow
def test_predict_masks_killed_midway(zygote, synth, tmp_path):
    """mmsegmentation/predict_masks.py (a randomly initialised small U-Net: only the files matter)
    killed halfway through a file, then from outside, then rerun: the same bytes as one uninterrupted
    run, no half-written mask."""
    if not HAVE_MMSEG:
        pytest.skip("MMSegmentation is not installed")
    log = tmp_path / "log"
    (tmp_path / "make_slim.py").write_text(SLIM_SCRIPT)
    slim = tmp_path / "slim.pth"
    assert zygote.run(str(tmp_path / "make_slim.py"), [SMALL_SEG, slim], log) == 0, tail(log)

    def argv(out):
        return ["--config", SMALL_SEG, "--checkpoint", slim, "--cub_root", synth, "--out_dir", out,
                "--batch_size", "4", "--device", "cpu", "--no_progress"]

    ref, out = tmp_path / "ref", tmp_path / "out"
    assert zygote.run(PREDICT, argv(ref), log) == 0, tail(log)
    n = count_files(ref, ".png")
    assert n == count_files(synth / "images", ".jpg") + count_files(synth / "waterbird_complete95_forest2water2", ".jpg")

    fault = {"at": "atomic_write", "n": n // 3, "modules": ["bgmask.io"]}
    assert zygote.run(PREDICT, argv(out), log, fault) == -signal.SIGKILL, tail(log)
    assert len(temp_files(out)) == 1
    assert 0 < assert_whole_images(out)

    pid = zygote.start(PREDICT, argv(out), log)
    kill_when(pid, lambda: count_files(out, ".png") >= 2 * n // 3)
    assert zygote.wait() == -signal.SIGKILL, tail(log)
    assert_whole_images(out)
    assert no_process_writes(log), "a decoding worker outlived its killed parent"

    assert zygote.run(PREDICT, argv(out), log) == 0, tail(log)
    assert tree(out) == tree(ref)


def no_process_writes(path: Path, timeout: float = 15) -> bool:
    """True once no process holds `path` open (the log a killed run's worker processes inherited)."""
    deadline = time.monotonic() + timeout
    while True:
        holders = []
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            try:
                holders += [fd for fd in fd_dir.iterdir() if os.readlink(fd) == str(path)]
            except OSError:  # the process ended meanwhile, or is not ours to read
                continue
        if not holders or time.monotonic() > deadline:
            return not holders
        time.sleep(0.5)


def test_ctrl_c_while_the_dataloader_starts_its_workers(monkeypatch):
    """A Ctrl-C already received (Python's flag set) when `iter(loader)` starts used to surface inside the
    multi-process iterator's __init__, before it had `_workers`; its __del__ then printed an "Exception
    ignored ... AttributeError" traceback (a flake of test_ctrl_c_during_training). loader_iter defers
    it: the iterator is built whole, then the KeyboardInterrupt arrives, and nothing is printed."""
    import _thread
    import gc

    from torch.utils.data import DataLoader

    from bgmask.processes import loader_iter

    class InterruptingBatches:
        def __iter__(self):
            _thread.interrupt_main()  # what a SIGINT does first: set the flag Python checks between bytecodes
            return iter([[0, 1], [2, 3]])

        def __len__(self):
            return 2

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u))
    loader = DataLoader(list(range(4)), batch_sampler=InterruptingBatches(), num_workers=1)
    with pytest.raises(KeyboardInterrupt):
        loader_iter(loader)
    gc.collect()
    assert unraisable == [], [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable]
