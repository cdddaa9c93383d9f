"""One process per run folder (`bgmask.runfolder`): a second process is refused with one line naming
the folder and the holder's pid, before it writes anything; SIGKILL frees the folder; clean-up of
temporary files leaves another live process's files alone; two trainings started at once into one folder
leave exactly one run (issue 20: they both ran and interleaved results.jsonl)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bgmask.runfolder import LOCK_NAME, acquire, hold_folder, holds, release
from bgmask.io import remove_stale_temp
from bgmask.apps.scripts import eval_early, train_early

from conftest import write_tiny_cub

ROOT = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from bgmask.runfolder import acquire; acquire(sys.argv[1]); print('held', flush=True); " \
       "time.sleep(600)"


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return write_tiny_cub(tmp_path_factory.mktemp("lock") / "CUB", num_classes=3, per_class=(6, 2), size=(40, 32))


def argv(cub, run, *more):
    return ["--data_path", str(cub), "--snapshot_dir", str(run), "--image_size", "32", "--batch_size", "4",
            "--num_workers", "0", "--threads", "1", "--no_progress", "--augmentations_to_use", "flip",
            "--train_split", "0.75", "--epochs", "2", "--seed", "5", *more]


class Holder:
    """Another process holding FOLDER's lock until killed."""

    def __init__(self, folder: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                                     env=env)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def holder():
    made = []

    def make(folder):
        made.append(Holder(folder))
        return made[-1]

    yield make
    for h in made:
        h.kill()


def refused(capsys, folder: Path, pid: int) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert str(folder) in err and f"process {pid}" in err and "in use" in err, err


def test_training_into_a_held_folder_is_refused_then_sigkill_frees_it(cub, tmp_path, capsys, holder):
    run = tmp_path / "run"
    h = holder(run)
    assert train_early(argv(cub, run)) == 2
    refused(capsys, run, h.pid)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written
    h.kill()  # SIGKILL: the OS drops the lock; its lock file stays behind
    assert (run / LOCK_NAME).exists()
    assert train_early(argv(cub, run)) == 0
    assert (run / "done").is_file() and not (run / LOCK_NAME).exists()


def test_resume_after_sigkill_of_a_training(cub, tmp_path, capsys):
    """A training SIGKILLed while it holds its folder: --resume_training takes the folder and finishes."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "early_masking_and_baseline" / "train.py"),
                             *argv(cub, run, "--epochs", "6")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # killed after epoch 2 has ended: epoch 1's checkpoint is written
        if line.startswith("epoch 2/"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "last.pt").is_file() and not (run / "done").exists()
    assert train_early(argv(cub, run, "--epochs", "6", "--resume_training")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (run / "done").is_file() and not (run / LOCK_NAME).exists()


def test_two_trainings_into_one_folder_leave_one_run(cub, tmp_path):
    """Started at once: exactly one runs, the other is refused with one line, and the folder equals a
    single run's (before: both exited 0, results.jsonl held epochs 1, 1, 2, 2 and two final records)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train_early(argv(cub, ref, "--epochs", "3")) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "early_masking_and_baseline" / "train.py"), *argv(cub, run, "--epochs", "3")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    err = next(e for (_, e), p in zip(outs, procs) if p.returncode == 2)
    assert err.count("\n") == 1 and str(run) in err and ("in use by process" in err or "already holds a run" in err)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in ref.iterdir())

    def records(folder):
        timing = ("train/seconds", "train/images_per_s")
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (folder / "results.jsonl").read_text().splitlines()]

    assert records(run) == records(ref)


def test_evaluation_into_a_held_run_folder_is_refused(cub, tmp_path, capsys, holder):
    run = tmp_path / "run"
    assert train_early(argv(cub, run, "--epochs", "1")) == 0
    before = (run / "results.jsonl").read_text()
    h = holder(run)
    rc = eval_early(["--checkpoint", str(run / "last.pt"), "--data_path", str(cub), "--num_workers", "0",
                     "--no_progress", "--threads", "1"])
    assert rc == 2
    refused(capsys, run, h.pid)
    assert (run / "results.jsonl").read_text() == before and not (run / "waterbirds_eval.json").exists()


@pytest.mark.parametrize("sub", ["mask-sweep", "demo", "pretrain"])
def test_subcommand_into_a_held_folder_is_refused_before_any_work(tmp_path, capsys, holder, sub):
    """Two mask sweeps (demos, pretrainings of one name) on one folder collided as two trainings do."""
    from bgmask.apps.cli import main

    out = tmp_path / "out"
    argv = {"mask-sweep": ["mask-sweep", "--preset", "tiny", "--out", str(out), "--threads", "1"],
            "demo": ["demo", "--preset", "tiny", "--out", str(out), "--threads", "1"],
            "pretrain": ["pretrain", "--model", "cnn", "--work", str(tmp_path), "--name", "out",
                         "--out", str(tmp_path / "zoo"), "--threads", "1"]}[sub]
    h = holder(out)
    assert main(argv) == 2
    refused(capsys, out, h.pid)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "data").exists()


def test_stale_temp_cleanup_leaves_a_live_writers_files(tmp_path, holder):
    """Only files of dead writers (or of this process) are stale: a live process's file being written is
    kept (before: one run's clean-up deleted the other's checkpoint while it was written)."""
    live = holder(tmp_path / "elsewhere").pid
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    names = [f".last.pt.{live}-abc123.tmp", f".last.pt.{dead}-def456.tmp", f".best.pt.{os.getpid()}-x.tmp",
             ".last.pt.k1ll3d.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"half")
    assert remove_stale_temp(tmp_path, spare_live=True) == 3  # as a run folder's clean-up calls it
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [names[0]]


def test_lock_is_reentrant_in_one_process_and_waits_when_asked(tmp_path, holder):
    folder = tmp_path / "f"
    with hold_folder(folder):
        with hold_folder(folder):  # a stage of this process writing its own folder again
            assert holds(folder)
        assert holds(folder) and (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not holds(folder) and not (folder / LOCK_NAME).exists()
    h = holder(folder)
    t0 = time.monotonic()
    subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {h.pid}"])
    acquire(folder, wait=True)  # a short critical section (the zoo's index): waits for the holder
    try:
        assert time.monotonic() - t0 >= 0.5 and holds(folder)
    finally:
        release(folder)
