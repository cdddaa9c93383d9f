"""benchmarks/gpu_check.sh (the GPU check), its Python half gpu_check_step.py, prepare_wheels.sh and the
memory estimator, checked on the CPU: syntax, the one result line per step, the recorder of a step's exit
status, the batch probe, the dry-run plumbing of one step end to end, the live-bytes counter and its fit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check_step  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("script", ["gpu_check.sh", "prepare_wheels.sh"])
def test_scripts_parse(script):
    p = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def write_run(folder: Path, final: bool = True) -> None:
    folder.mkdir(parents=True)
    lines = [{"epoch": 1, "split": "train", "train/images_per_s": 100.0, "train/peak_mem_mib": 1000.0},
             {"epoch": 2, "split": "train", "train/images_per_s": 120.5, "train/peak_mem_mib": 1200.0}]
    if final:
        lines.append({"epoch": 2, "split": "final", "test/acc": 0.5, "test/attr_images": 8, "waterbirds/attr_images": 8})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"cut by a ki')


def line(capsys, *argv) -> str:
    assert gpu_check_step.main(["line", *argv]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # ONE result line per step
    return out[0]


def test_result_line_of_a_training_step(tmp_path, capsys):
    write_run(tmp_path / "run")
    (tmp_path / "r.json").write_text(json.dumps({"rc": 0, "seconds": 12.0, "peak_cuda_mib": 2345.6, "oom": False}))
    (tmp_path / "s.log").write_text("NCCL INFO cudaDriverVersion\nNCCL INFO NCCL version 2.27.7+cuda13.0\n")
    results = tmp_path / "results.jsonl"
    out = line(capsys, "vitl", "--rc", "0", "--seconds", "12", "--log", str(tmp_path / "s.log"), "--record",
               str(tmp_path / "r.json"), "--run", str(tmp_path / "run"), "--nccl", "--note", "batch 64",
               "--results", str(results))
    assert out.startswith("ok   vitl") and "12 s  peak 2346 MiB" in out
    for figure in ("batch 64", "train 120.5 img/s", "train peak 1200 MiB", "test/acc 0.500", "attribution 8+8 images",
                   "nccl 2.27.7+cuda13.0 used"):
        assert figure in out, figure
    record = json.loads(results.read_text())
    assert record["ok"] and record["step"] == "vitl" and record["peak_cuda_mib"] == 2345.6


def test_result_line_of_failures(tmp_path, capsys):
    log = tmp_path / "s.log"
    log.write_text("Traceback ...\nerror: --amp_dtype fp16 needs CUDA; use the default bf16 on CPU\n")
    out = line(capsys, "fp16", "--rc", "2", "--seconds", "3", "--log", str(log))
    assert out.startswith("FAIL fp16") and out.endswith("log: error: --amp_dtype fp16 needs CUDA; use the default "
                                                       "bf16 on CPU")
    out = line(capsys, "fp16", "--rc", "2", "--seconds", "3", "--log", str(log), "--expect_fail", "needs CUDA")
    assert out.startswith("ok   fp16") and "refused as expected" in out
    out = line(capsys, "slow", "--rc", "124", "--seconds", "90", "--limit", "90", "--log", str(log))
    assert out.startswith("FAIL slow") and "timed out (limit 90 s)" in out
    write_run(tmp_path / "run", final=False)
    (tmp_path / "plain.log").write_text("epoch 2/2 loss 1.0\n")
    out = line(capsys, "torchrun", "--rc", "0", "--seconds", "9", "--log", str(tmp_path / "plain.log"), "--nccl",
               "--run", str(tmp_path / "run"))
    assert out.startswith("FAIL torchrun") and "no NCCL line in the log" in out and "no final record" in out
    (tmp_path / "oom.json").write_text(json.dumps({"rc": 1, "seconds": 5, "peak_cuda_mib": 80000.0, "oom": True}))
    out = line(capsys, "big", "--rc", "1", "--seconds", "5", "--log", str(log), "--record", str(tmp_path / "oom.json"))
    assert "CUDA out of memory" in out and "peak 80000 MiB" in out


def test_recorder_keeps_exit_status_and_tracebacks(tmp_path):
    script = tmp_path / "s.py"
    for body, rc in (("print('hi')", 0), ("raise SystemExit(3)", 3), ("raise ValueError('boom')", 1),
                     ("import sys; sys.exit('error: one line')", 1)):
        script.write_text(body + "\n")
        record = tmp_path / "r.json"
        p = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check_step.py"), "run", "--record", str(record),
                            "--", str(script), "--flag"], capture_output=True, text=True, env=ENV, timeout=120)
        assert p.returncode == rc, p.stderr
        r = json.loads(record.read_text())
        assert r["rc"] == rc and r["peak_cuda_mib"] is None and r["oom"] is False and r["seconds"] >= 0
    assert "ValueError: boom" not in p.stderr and "error: one line" in p.stderr


def test_recorder_runs_a_module_as_python_m_does(tmp_path):
    """`run -- -m MODULE ARGS` (the DFR step runs `-m bgmask dfr`): the package's __main__ runs with
    sys.argv[1:] = ARGS, its exit status recorded; a package's folder is not put first on the path (bgmask
    has an io.py that would shadow the standard library's)."""
    pkg = tmp_path / "probepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "io.py").write_text("raise SystemExit('the package folder was put on the path')\n")
    (pkg / "__main__.py").write_text("import sys, io\nprint('argv', sys.argv[1:])\nraise SystemExit(int(sys.argv[2]))\n")
    env = {**ENV, "PYTHONPATH": f"{REPO}:{tmp_path}"}
    for code in (0, 3):
        record = tmp_path / "r.json"
        p = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check_step.py"), "run", "--record", str(record),
                            "--", "-m", "probepkg", "sub", str(code)], capture_output=True, text=True, env=env,
                           timeout=120, cwd=tmp_path)
        assert p.returncode == code and f"argv ['sub', '{code}']" in p.stdout, p.stdout + p.stderr
        assert json.loads(record.read_text())["rc"] == code
    p = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check_step.py"), "run", "--record",
                        str(tmp_path / "x.json"), "--", "-m"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "error: run -m needs a module name"


def test_result_line_of_a_protocol_run_and_its_dfr(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    final = {"epoch": 1, "split": "final", "method": "dfr", "dfr/C": 0.7, "test/acc": 0.9,
             "test/worst_group_acc": 0.8125}
    (run / "results.jsonl").write_text(json.dumps(final) + "\n")
    (tmp_path / "s.log").write_text("done\n")
    out = line(capsys, "wb_dfr", "--rc", "0", "--seconds", "4", "--log", str(tmp_path / "s.log"), "--run", str(run))
    assert out.startswith("ok   wb_dfr") and "DFR C=0.7; test/acc 0.900; worst group 0.812; attribution off" in out


def test_probe_takes_the_first_batch_that_runs_on_cpu(tmp_path, capsys):
    record = tmp_path / "probe.json"
    assert gpu_check_step.main(["probe", "--model", "bgmask_vit_tiny", "--image_size", "32", "--batches", "3", "2",
                                "--device", "cpu", "--record", str(record)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "3"
    r = json.loads(record.read_text())
    assert r["batch"] == 3 and list(r["tried"]) == ["3"] and r["total_mib"] is None


@pytest.mark.slow
def test_dry_run_of_one_step_end_to_end(tmp_path):
    """The whole script on the CPU with ONLY= one step: set-up (versions, both data sets), the step's line,
    the summary, and an OUT_DIR of few files (a device slot returns at most 8) with the logs packed."""
    out = tmp_path / "out"
    wheels = tmp_path / "no_wheels"  # this Python's own packages (a checkout's .whl/ may hold another Python's)
    wheels.mkdir()
    env = {**ENV, "SMOKE_DEVICE": "cpu", "PYTHON": sys.executable, "ONLY": "fp16_scaler",
           "GPU_CHECK_WHEELS": str(wheels)}
    p = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), str(out)], capture_output=True, text=True,
                       env=env, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^ok   fp16_scaler .*refused as expected: error: --amp_dtype fp16 needs CUDA", summary, re.M), summary
    assert "1 ok, 0 failed, 0 skipped" in summary  # ONLY= leaves the other steps out silently
    assert summary.startswith("note: no wheels in")
    assert sorted(f.name for f in out.iterdir()) == ["logs.tgz", "results.jsonl", "summary.txt", "versions.txt"]
    assert "torch" in (out / "versions.txt").read_text()
    with tarfile.open(out / "logs.tgz") as t:
        names = t.getnames()
    assert "./logs/fp16_scaler.log" in names and "./fp16_scaler/results.jsonl" not in names  # refused before training
    assert not any(n.endswith(".pt") for n in names)


def test_wheel_versions_follow_the_pins():
    """prepare_wheels.sh fetches one version of each package, and where pyproject.toml or a lock /
    constraints file of the repo pins a package, the same version."""
    text = (REPO / "benchmarks/prepare_wheels.sh").read_text()
    wheels = dict(re.findall(r"^\s+([A-Za-z0-9_.-]+)==([^\s#]+)", text, re.M))
    assert {"captum", "mmengine", "mmcv-lite", "mmsegmentation", "mmdet", "ftfy"} <= set(wheels)
    assert "wandb" not in wheels
    norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731
    pins = {}
    for f in [REPO / "pyproject.toml", *REPO.glob("*constraints*.txt"), *REPO.glob("*lock*.txt")]:
        if f.is_file():
            for name, version in re.findall(r"^\s*\"?([A-Za-z0-9_.-]+)==([0-9][^\s\",;]*)", f.read_text(), re.M):
                pins[norm(name)] = version
    for name, version in wheels.items():
        if norm(name) in pins:
            assert pins[norm(name)] == version, name


def test_live_bytes_and_the_fit():
    """The estimator's counter sees what autograd keeps (a linear layer's input, for the weight's gradient)
    and frees, and its fit recovers c + B (d + a N + b N^2)."""
    import torch

    import estimate_memory as em

    lin = torch.nn.Linear(256, 256)
    x = torch.randn(64, 256)
    act = 64 * 256 * 4
    with em.LiveBytes([lin.weight, lin.bias, x]) as lb:
        y = torch.relu(lin(x))  # the linear output lives until relu's result (kept for backward) exists
        assert lb.live == act and lb.peak == 2 * act
        y.sum().backward()
        del y
    assert lb.live == (256 * 256 + 256) * 4  # what stays: the gradients
    c, d, a, b = 1000.0, 300.0, 50.0, 0.5
    points = {(n, bs): c + bs * (d + a * n + b * n * n) for n in (65, 145, 257) for bs in (1, 2)}
    f = em.fit(points)
    assert [f[k] for k in "cdab"] == pytest.approx([c, d, a, b])
    assert em.activation_bytes(f, 1370, 4) == pytest.approx(c + 4 * (d + a * 1370 + b * 1370**2))
    assert em.tokens("vit_large_patch14_dinov2", 518) == 37 * 37 + 1
