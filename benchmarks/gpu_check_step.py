"""The Python half of `benchmarks/gpu_check.sh`: run one step, probe a batch size, print one result line.

    python benchmarks/gpu_check_step.py run --record R.json -- SCRIPT [ARGS...]   (or -- -m MODULE [ARGS...])
        runs SCRIPT (MODULE) as __main__ in this process (also as torchrun's worker) and writes R.json: exit status,
        seconds, and the process's peak CUDA memory (allocator peak over the whole run, the final
        evaluation and attribution included; the epoch figure `train/peak_mem_mib` covers training only).
    python benchmarks/gpu_check_step.py probe --model NAME --image_size S --batches 48 32 ... --record R.json
        the largest batch of the list whose training step (forward, backward, AdamW) fits on the device with
        --headroom to spare; prints it (0: none fitted).
    python benchmarks/gpu_check_step.py line NAME --rc RC --seconds S --log LOG [--record R] [--run DIR] ...
        prints the step's ONE result line and appends it as JSON to --results.

A result line: `ok|FAIL NAME  SECONDS s  peak MiB  key figures`; a failure ends with the log's last line.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cuda_peak_mib() -> float | None:
    torch = sys.modules.get("torch")  # a script that never imported torch has no CUDA peak (nor a reason to load it)
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def cmd_run(a) -> int:
    """The script in this process, so that the allocator's peak of its whole life can be read at the end."""
    if not a.script:
        print("error: run needs a script after --", file=sys.stderr)
        return 2
    module = a.script[0] == "-m"
    if module and len(a.script) < 2:
        print("error: run -m needs a module name", file=sys.stderr)
        return 2
    script, argv = (a.script[1], a.script[2:]) if module else (a.script[0], a.script[1:])
    t0, rc, oom = time.perf_counter(), 0, False
    sys.argv = [script, *argv]
    if not module:  # as `python SCRIPT`: its folder first on the path (a package's folder must not be)
        sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        if module:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # noqa: BLE001  (the record must be written whatever stopped the script)
        traceback.print_exc()
        oom, rc = type(e).__name__ == "OutOfMemoryError", 1  # torch.OutOfMemoryError, without importing torch
    record = {"rc": rc, "seconds": time.perf_counter() - t0, "peak_cuda_mib": cuda_peak_mib(), "oom": oom}
    if os.environ.get("RANK", "0") == "0":
        Path(a.record).write_text(json.dumps(record))
    return rc


def cmd_probe(a) -> int:
    """Largest batch of `--batches` (tried in order) whose fine-tuning step fits with `--headroom` of the
    device's memory to spare. Random data and a 200-class head; bgmask's classifier, fused AdamW and autocast,
    as train.py builds them. On the CPU (dry run) the first batch that runs is taken."""
    import bgmask  # noqa: F401  (before torch: the OpenMP wait policy default)
    import torch

    from bgmask.models import create_classifier

    device = torch.device(a.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    clf = create_classifier(a.model, 200, image_size=a.image_size).to(device)
    if a.grad_checkpointing:
        clf.backbone.set_grad_checkpointing(True)
    clf.train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-6, **fused)
    dtype = torch.bfloat16 if a.amp == "bf16" else None
    total = torch.cuda.get_device_properties(device).total_memory / 2**20 if device.type == "cuda" else None
    tried, chosen = {}, 0
    for b in a.batches:
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            x = torch.randn(b, 3, a.image_size, a.image_size, device=device)
            y = torch.randint(0, 200, (b,), device=device)
            for _ in range(2 if device.type == "cuda" else 1):  # the second step has AdamW's state allocated
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = torch.nn.functional.cross_entropy(clf(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            peak = cuda_peak_mib()
            tried[b] = peak
            if total is None or peak <= (1 - a.headroom) * total:
                chosen = b
                break
        except torch.OutOfMemoryError:
            tried[b] = "oom"
        finally:
            x = y = loss = None  # noqa: F841  (free the batch before the next, smaller one)
    record = {"batch": chosen, "tried": {str(k): v for k, v in tried.items()}, "total_mib": total,
              "headroom": a.headroom, "seconds": time.perf_counter() - t0, "peak_cuda_mib": tried.get(chosen)}
    Path(a.record).write_text(json.dumps(record))
    print(chosen)
    return 0 if chosen else 1


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill: the others still count
    return out


def run_figures(run: Path) -> list[str]:
    """Key figures of a training run folder: training speed and epoch peak, final accuracy, attribution."""
    records = read_jsonl(run / "results.jsonl")
    epochs = [r for r in records if "train/images_per_s" in r]
    final = next((r for r in reversed(records) if r.get("split") == "final"), None)
    out = []
    if epochs:
        e = epochs[-1]
        steps = e.get("train/steps")
        out.append(f"train {e['train/images_per_s']:.1f} img/s" + (f" ({steps} steps)" if steps else ""))
        peaks = [r["train/peak_mem_mib"] for r in epochs if r.get("train/peak_mem_mib") is not None]
        if peaks:
            out.append(f"train peak {max(peaks):.0f} MiB")
    if final is not None:
        if "dfr/C" in final:
            out.append(f"DFR C={final['dfr/C']:g}")
        if "test/acc" in final:
            out.append(f"test/acc {final['test/acc']:.3f}")
        if "test/worst_group_acc" in final:  # the Waterbirds protocol
            out.append(f"worst group {final['test/worst_group_acc']:.3f}")
        n = [final.get(f"{s}/attr_images") for s in ("test", "waterbirds") if final.get(f"{s}/attr_images") is not None]
        out.append(f"attribution {'+'.join(str(int(v)) for v in n)} images" if n else "attribution off")
    else:
        out.append("no final record")
    return out


def bench_figures(path: Path) -> list[str]:
    """Key figures of a benchmark JSON (bench_seg.py's rows, or run_all.py's bench.json)."""
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    out = [f"{r['row']}: {r['images_per_s']:.1f} img/s" + (f", {r['peak_mem_mib']:.0f} MiB" if r.get("peak_mem_mib")
                                                          else "") for r in rows[:3]]
    if len(rows) > 3:
        out.append(f"{len(rows)} rows")
    missed = [f"{r['model']} {r['row']}" for r in rows if r.get("met") is False]
    if missed:
        out.append(f"goals missed: {'; '.join(missed)}")
    return out


def nccl_figure(log: Path) -> str:
    """Which backend the process group used, read from the log (NCCL_DEBUG=INFO prints NCCL's init lines)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    if "NCCL INFO" in text:
        version = next((ln.split("NCCL version", 1)[1].split()[0] for ln in text.splitlines() if "NCCL version" in ln),
                       "?")
        return f"nccl {version} used"
    return "no NCCL line in the log"


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in (log.read_text(errors="replace").splitlines() if log.is_file() else []) if ln.strip()]
    return lines[-1][:300] if lines else "(empty log)"


def cmd_line(a) -> int:
    record = json.loads(Path(a.record).read_text()) if a.record and Path(a.record).is_file() else {}
    ok = a.rc == 0
    figures = list(a.note or [])
    try:
        if a.run:
            figures += run_figures(Path(a.run))
        if a.bench and Path(a.bench).is_file():
            figures += bench_figures(Path(a.bench))
        if a.nccl:
            figure = nccl_figure(Path(a.log))
            figures.append(figure)
            ok = ok and figure.startswith("nccl")
    except (OSError, KeyError, ValueError, TypeError) as e:  # a figure that cannot be read costs only itself
        figures.append(f"figures unreadable ({e.__class__.__name__})")
    peak = record.get("peak_cuda_mib")
    if not ok and a.expect_fail and a.expect_fail in last_line(Path(a.log)):
        ok, figures = True, [*figures, f"refused as expected: {last_line(Path(a.log))}"]
    status = "ok  " if ok else "FAIL"
    if a.rc in (124, 137) and not ok:
        figures.append(f"timed out (limit {a.limit} s)")
    elif record.get("oom"):
        figures.append("CUDA out of memory")
    if not ok and a.rc:
        figures.append(f"log: {last_line(Path(a.log))}")
    line = (f"{status} {a.name:<24} {a.seconds:>4} s  peak {'-' if peak is None else f'{peak:.0f}'} MiB  "
            f"{'; '.join(figures)}")
    print(line, flush=True)
    if a.results:
        with open(a.results, "a") as f:
            f.write(json.dumps({"step": a.name, "ok": ok, "rc": a.rc, "seconds": a.seconds, "peak_cuda_mib": peak,
                                "figures": figures, "record": record, "log": Path(a.log).name}) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a script (or -m a module) as __main__ and record its exit status, time and "
                                   "CUDA peak")
    r.add_argument("--record", required=True)
    r.add_argument("script", nargs=argparse.REMAINDER)
    q = sub.add_parser("probe", help="the largest batch of a list whose fine-tuning step fits")
    q.add_argument("--model", required=True)
    q.add_argument("--image_size", type=int, required=True)
    q.add_argument("--batches", type=int, nargs="+", required=True)
    q.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    q.add_argument("--grad_checkpointing", action="store_true")
    q.add_argument("--headroom", type=float, default=0.15,
                   help="fraction of the device's memory left free (the run adds data, evaluation and attribution)")
    q.add_argument("--device", default="cuda")
    q.add_argument("--record", required=True)
    s = sub.add_parser("line", help="print a step's one result line")
    s.add_argument("name")
    s.add_argument("--rc", type=int, required=True)
    s.add_argument("--seconds", type=int, required=True)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--log", required=True)
    s.add_argument("--record", default=None)
    s.add_argument("--run", default=None, help="a training run folder (results.jsonl)")
    s.add_argument("--bench", default=None, help="a benchmark JSON")
    s.add_argument("--nccl", action="store_true", help="report whether the log shows NCCL's initialisation")
    s.add_argument("--note", action="append", default=None)
    s.add_argument("--expect_fail", default=None, help="a failure whose last log line holds this text is ok")
    s.add_argument("--results", default=None, help="append the line as JSON here")
    a = p.parse_args(argv)
    if a.cmd == "run" and a.script and a.script[0] == "--":
        a.script = a.script[1:]
    return {"run": cmd_run, "probe": cmd_probe, "line": cmd_line}[a.cmd](a)


if __name__ == "__main__":
    raise SystemExit(main())
