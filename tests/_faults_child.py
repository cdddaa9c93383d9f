"""Child side of the fault tests (tests/test_faults.py): runs an entry point in a process that SIGKILLs
itself at a chosen point, or serves as a "zygote" that imports the heavy modules once and forks one
child per run (each child is a real process that a test can SIGKILL; forking saves the 3-5 s import
of torch + timm + MMSeg that every fresh `python script.py` pays).

    python tests/_faults_child.py --zygote MODULE[:FUNC]...   # then JSON requests on stdin, one a line:
        {"target": "early_masking_and_baseline/train.py" | "bgmask", "argv": [...], "log": PATH,
         "fault": null | {"at": "backward" | "eval_item" | "atomic_write" | "results_line", "n": N,
                          "modules": [...]}}
      answers {"pid": PID} at once and {"rc": EXIT_STATUS} when the child ends (-9 = SIGKILL).

Faults (the n-th event since the child started, counted from 1):
    backward      SIGKILL inside the n-th `loss.backward()` (mid training epoch, before the step);
    eval_item     SIGKILL while evaluation reads its n-th sample (`bgmask.engine.predict`);
    atomic_write  SIGKILL during the n-th atomic file write of the named modules' `atomic_path`
                  (bgmask.io: images and text; bgmask.checkpoint: checkpoints), after half of the
                  temporary file is on disk and before the rename: a write cut in the middle;
    results_line  SIGKILL right after the n-th whole line appended to a results.jsonl (`RunFolder.log`):
                  with n = 1, after epoch 1 is logged and before its last.pt is written.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import sys
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(fault: dict | None) -> None:
    if not fault:
        return
    at, n = fault["at"], int(fault["n"])
    count = [0]

    def tick() -> bool:
        count[0] += 1
        return count[0] == n

    if at == "backward":
        import torch

        original = torch.Tensor.backward

        def backward(self, *a, **k):
            if tick():
                _die()
            return original(self, *a, **k)

        torch.Tensor.backward = backward
    elif at == "eval_item":
        import bgmask.engine as engine

        original_predict = engine.predict

        class Tripwire:
            def __init__(self, dataset):
                self.dataset = dataset

            def __len__(self):
                return len(self.dataset)

            def __getitem__(self, i):
                if tick():
                    _die()
                return self.dataset[i]

        engine.predict = lambda model, dataset, *a, **k: original_predict(model, Tripwire(dataset), *a, **k)
    elif at == "atomic_write":
        for name in fault.get("modules", ["bgmask.io"]):
            module = importlib.import_module(name)
            original_path = module.atomic_path

            @contextlib.contextmanager
            def cut(path, _original=original_path):
                with _original(path) as tmp:
                    yield tmp
                    if tick():
                        size = Path(tmp).stat().st_size
                        os.truncate(tmp, size // 2)
                        _die()

            module.atomic_path = cut
    elif at == "results_line":
        from bgmask.runfolder import RunFolder

        original_log = RunFolder.log

        def log(self, *a, **k):
            original_log(self, *a, **k)
            if tick():
                _die()

        RunFolder.log = log
    else:
        raise ValueError(f"unknown fault {at!r}")


def run_target(target: str, argv: list[str]) -> int:
    """Run a script file or a module (`python -m`) as __main__; returns its exit status."""
    sys.argv = [target, *argv]
    try:
        if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        return 1
    return 0


def zygote(preload: list[str]) -> None:
    for name in preload:  # MODULE, or MODULE:FUNCTION to call once imported
        module, _, call = name.partition(":")
        obj = importlib.import_module(module)
        if call:
            for attr in call.split("."):
                obj = getattr(obj, attr)
            obj()
    import torch

    torch.set_num_threads(1)
    out = sys.stdout
    for line in iter(sys.stdin.readline, ""):
        req = json.loads(line)
        out.flush()
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_RDONLY)
            log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 1
            try:
                arm(req.get("fault"))
                code = run_target(req["target"], req["argv"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


def read_line(fd: int, timeout: float, buf: bytearray) -> str:
    """One line from a raw pipe, or TimeoutError (the parent side of the zygote protocol)."""
    import time

    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no answer from the zygote within {timeout} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise EOFError("the zygote exited")
        buf.extend(chunk)
    i = buf.index(b"\n")
    line = bytes(buf[:i]).decode()
    del buf[:i + 1]
    return line


if __name__ == "__main__":
    if sys.argv[1] == "--zygote":
        zygote(sys.argv[2:])
    else:  # python _faults_child.py FAULT_JSON TARGET ARGV...
        arm(json.loads(sys.argv[1]))
        raise SystemExit(run_target(sys.argv[2], sys.argv[3:]))
