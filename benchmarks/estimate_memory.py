"""GPU memory of the paper's commands, estimated from activation memory measured on the CPU at small sizes.

    python benchmarks/estimate_memory.py                      # ViT-L/14 (DINOv2) and ConvNeXt-B, the table
    python benchmarks/estimate_memory.py --quick              # one size per model, to check the code paths
    python benchmarks/estimate_memory.py --json mem.json      # also the measurements and fits

What is measured. A training step of bgmask's classifier (random weights, 200 classes) runs on the CPU
under a dispatch mode that counts the bytes of every tensor storage an op creates and frees, so the peak
of live bytes beyond the weights and the gradients is the step's activation memory (what a CUDA
allocator would hold for it, less its rounding and workspaces). Gradients are allocated beforehand and
counted apart. Modes, each in fp32 and under bf16 autocast:
  frozen          the linear probe: the backbone without gradients in eval mode, the head trains;
  attribution     InputXGradient's graph: no parameter gradients, the input's gradient;
  finetune        every parameter trains;
  finetune_ckpt   the same with timm's set_grad_checkpointing (what --grad_checkpointing turns on).

How it is extrapolated. At one token count (image size) the peak is c + B * m(N): a constant c (e.g. the
bf16 copies of the weights that autocast caches) and m per image, from batches 1 and 2. m(N) = d + a * N
+ b * N^2 is solved through three sizes (N = tokens of a ViT, cells of a CNN's stride-32 grid, to which
all its activations are proportional; d: per-image tensors that do not grow with N, such as the head's).
The counts are exact bytes, not samples, so three sizes determine the three terms. With SDPA (timm's
fused attention: flash or memory-efficient kernels on CUDA, flash on the CPU) the N x N attention matrix
is never stored, so b comes out near 0 and memory grows linearly with N; the fit shows it rather than
assuming it.

bf16 on the CPU. bf16 kernels are slow on CPUs without bf16 instructions, so the ViT under bf16 autocast
is measured with its first 2 and 4 blocks at two small sizes (d + a N, the fp32 fit having shown b ~ 0),
and every term is extrapolated to the full depth: the blocks are identical, so each term is affine in
the number of blocks (frozen's transient peak lies inside one block and comes out constant). The CNN is
estimated in fp32 only: it has no uniform blocks to shorten, and its bf16 convolutions are the slowest
of those kernels.

The estimate for a card. Per GPU: weights (fp32) + gradients and AdamW's two moments (fp32) of the
trained parameters + c + B * m(N) at the paper's size, + a reserve for what the allocator does not hand
out (the CUDA context, cuBLAS / cuDNN workspaces, fragmentation): 1.5 GiB + 10 %. Training is followed
by the final evaluation (no-grad forward at 2 x batch) and the attribution (at --attribution_batch_size)
while the weights, gradients and optimiser state stay allocated; the larger of the two also has to fit.
These are estimates: a GPU measurement (`benchmarks/gpu_check.sh`) replaces them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import weakref
from pathlib import Path

import bgmask  # noqa: F401  (before torch: the OpenMP wait policy default)
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 2**30
CARDS_GB = (24, 40, 80)  # card sizes as sold (10^9 bytes)
RESERVE_BYTES, RESERVE_FRACTION = 1.5 * GiB, 0.10
MODES = ("frozen", "attribution", "finetune", "finetune_ckpt")


class LiveBytes(TorchDispatchMode):
    """Counts the storages that ops create (views of one storage count once) until they are freed; `peak`
    is the most bytes alive at once. Storages that exist before (weights, gradients, inputs) are left out."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self.known = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                key, n = s.data_ptr(), s.nbytes()
                if n and key not in self.known:
                    self.known.add(key)
                    self.live += n
                    weakref.finalize(s, self._freed, key, n)
        self.peak = max(self.peak, self.live)
        return out

    def _freed(self, key: int, n: int) -> None:
        self.known.discard(key)
        self.live -= n


def tokens(model_arch: str, image_size: int) -> int:
    """N: a ViT's tokens (patches + CLS + registers), a CNN's cells of its stride-32 output grid."""
    if "patch14" in model_arch:
        return (image_size // 14) ** 2 + 1 + (4 if "reg4" in model_arch else 0)
    return (image_size / 32) ** 2


def build(model_arch: str, image_size: int):
    from bgmask.models import create_classifier

    torch.manual_seed(0)
    return create_classifier(model_arch, 200, image_size=image_size)


def set_mode(clf, mode: str) -> list[torch.nn.Parameter]:
    """Parameters and modules as train.py / attribution leave them; returns the parameters that train."""
    clf.backbone.set_grad_checkpointing(mode == "finetune_ckpt")
    head = {id(p) for p in clf.head_parameters()}
    for p in clf.parameters():
        p.requires_grad_(mode in ("finetune", "finetune_ckpt") or (mode == "frozen" and id(p) in head))
        p.grad = None
    clf.train(mode != "attribution")
    if mode == "frozen":
        clf.backbone.eval()
    return [p for p in clf.parameters() if p.requires_grad]


def with_depth(clf, depth: int | None, full: list):
    """The ViT `clf` with its first `depth` blocks (all of them for None); `full` is the original list."""
    clf.backbone.blocks = torch.nn.Sequential(*(full if depth is None else full[:depth]))
    return clf


def measure(clf, mode: str, image_size: int, batch: int, amp: bool) -> int:
    """Peak activation bytes of one step (forward, loss, backward) in `mode`."""
    trained = set_mode(clf, mode)
    for p in trained:
        p.grad = torch.zeros_like(p)  # allocated before: counted as gradients, not activations
    x = torch.randn(batch, 3, image_size, image_size, requires_grad=mode == "attribution")
    y = torch.randint(0, 200, (batch,))
    existing = [*clf.parameters(), *clf.buffers(), *(p.grad for p in trained), x, y]
    with LiveBytes(existing) as lb:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = clf(x)
        if mode == "attribution":  # d logit[target] / d input, as InputXGradient
            logits.gather(1, y[:, None]).sum().backward()
        else:
            torch.nn.functional.cross_entropy(logits.float(), y).backward()
        del logits
    for p in clf.parameters():
        p.grad = None
    return lb.peak


def fit(points: dict) -> dict:
    """points {(N, B): bytes} -> c, d, a, b with bytes = c + B * (d + a N + b N^2); c from the two
    batches at the smallest N; (d, a, b) by least squares over the sizes (exact for three)."""
    import numpy as np

    ns = sorted({n for n, _ in points})
    n0 = ns[0]
    c = max(2 * points[(n0, 1)] - points[(n0, 2)], 0.0)  # bytes(B=1) - (bytes(B=2) - bytes(B=1))
    m = np.array([points[(n, 1)] - c for n in ns], dtype=np.float64)
    if len(ns) == 1:  # one size: proportional to N
        return {"c": c, "d": 0.0, "a": float(m[0] / ns[0]), "b": 0.0}
    design = np.array([[1.0, n, n * n][:min(len(ns), 3)] for n in ns])
    d, a, b = [*np.linalg.lstsq(design, m, rcond=None)[0], 0.0][:3]
    return {"c": c, "d": float(d), "a": float(a), "b": float(b)}


def to_depth(f_small: dict, f_large: dict, small: int, large: int, depth: int) -> dict:
    """Each term, affine in the number of blocks, from fits at `small` and `large` blocks to `depth`."""
    return {k: f_small[k] + (f_large[k] - f_small[k]) * (depth - small) / (large - small) for k in f_small}


def per_image(f: dict, n: float) -> float:
    return f["d"] + f["a"] * n + f["b"] * n * n


def activation_bytes(f: dict, n: float, batch: int) -> float:
    return f["c"] + batch * per_image(f, n)


def static_bytes(clf, mode: str) -> float:
    """Weights (fp32) + gradients + AdamW's exp_avg and exp_avg_sq (fp32) of what trains in `mode`."""
    trained = set_mode(clf, mode)
    all_p = sum(p.numel() for p in clf.parameters())
    return 4.0 * all_p + 12.0 * sum(p.numel() for p in trained)


def fits(total: float, card_gb: int) -> bool:
    return total + RESERVE_BYTES + RESERVE_FRACTION * total <= card_gb * 1e9


# the paper's commands: name, model, image size, per-GPU batch, mode, autocast
COMMANDS = [
    ("ViT-L/14 frozen (baseline / early, batch 48 / 64)", "vit_large_patch14_dinov2", 518, 64, "frozen", False),
    ("ViT-B/14 frozen (late, batch 16)", "vit_base_patch14_dinov2", 518, 16, "frozen", False),
    ("ViT-L/14 fine-tuned (late / baseline, batch 4 / 6)", "vit_large_patch14_dinov2", 518, 6, "finetune", False),
    ("ViT-L/14 fine-tuned, --use_amp (bf16)", "vit_large_patch14_dinov2", 518, 6, "finetune", True),
    ("ViT-L/14 fine-tuned, the paper's global batch (4 GPUs x 6) on one GPU", "vit_large_patch14_dinov2", 518, 24,
     "finetune", False),
    ("the same, --use_amp (bf16)", "vit_large_patch14_dinov2", 518, 24, "finetune", True),
    ("ConvNeXt-B fine-tuned, 448 px, batch 32 (fp32)", "convnext_base", 448, 32, "finetune", False),
    ("ConvNeXt-B fine-tuned, 224 px, batch 64 (fp32)", "convnext_base", 224, 64, "finetune", False),
]


def settings_for(f: dict, ckpt: dict | None, static: float, n: float, batch: int, card_gb: int) -> str:
    """The cheapest way to reach the command's batch on a card: the whole batch, else micro-batches with
    --grad_accum_steps, else also --grad_checkpointing; the text says which."""
    for fit_, flag in ((f, ""), (ckpt, " + ckpt")):
        if fit_ is None:
            continue
        for accum in (1, 2, 3, 4, 6, 8, 12, 16, 32, 64):
            if batch % accum:
                continue
            micro = batch // accum
            if fits(static + activation_bytes(fit_, n, micro), card_gb):
                acc = f" x accum {accum}" if accum > 1 else ""
                return f"{micro}{acc}{flag}"
    return "does not fit"


def largest_batch(f: dict, static: float, n: float, card_gb: int) -> int:
    per = per_image(f, n)
    room = (card_gb * 1e9 - RESERVE_BYTES) / (1 + RESERVE_FRACTION) - static - f["c"]
    return max(int(room // per), 0) if per > 0 else 0


def plan(a) -> list[tuple[str, list[int], tuple[str, ...], tuple[bool, ...]]]:
    """(model, image sizes, modes, bf16 autocast, None or the two ViT depths to extrapolate from)."""
    if a.quick:  # small stand-ins at small sizes: the code paths in seconds
        return [("vit_small_patch14_dinov2", [28, 42, 56], MODES, False, None),
                ("vit_small_patch14_dinov2", [28, 42], MODES, True, (2, 4)),
                ("resnet18", [64, 96, 128], MODES, False, None)]
    return [(a.vit, a.vit_sizes, MODES, False, None), (a.vit, a.vit_bf16_sizes, MODES, True, (2, 4)),
            ("vit_base_patch14_dinov2", a.vit_sizes, ("frozen", "attribution"), False, None),
            (a.cnn, a.cnn_sizes, MODES, False, None)]


def build_meta(model_arch: str, size: int):
    with torch.device("meta"):  # shapes only: nothing is allocated
        return build(model_arch, size)


def static_of(model_arch: str, size: int, mode: str) -> float:
    return static_bytes(build_meta(model_arch, size), mode)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit", default="vit_large_patch14_dinov2")
    p.add_argument("--vit_sizes", type=int, nargs="+", default=[112, 168, 224])
    p.add_argument("--cnn", default="convnext_base")
    p.add_argument("--cnn_sizes", type=int, nargs="+", default=[128, 192, 256])
    p.add_argument("--vit_bf16_sizes", type=int, nargs="+", default=[42, 70])
    p.add_argument("--quick", action="store_true", help="small stand-in models at one size (a check of the code paths)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the measurements, fits and table here")
    p.add_argument("--from_json", default=None, help="the table again from an earlier --json's measurements")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    stand_in = {"vit_large_patch14_dinov2": "vit_small_patch14_dinov2", "vit_base_patch14_dinov2":
                "vit_small_patch14_dinov2", "convnext_base": "resnet18"} if a.quick else {}
    t0 = time.perf_counter()
    fits_by, measured = {}, []
    earlier = {}
    if a.from_json:  # (model, size, batch, mode, amp, blocks) -> bytes, measured before
        earlier = {(r["model"], r["image_size"], r["batch"], r["mode"], r["amp"], r.get("blocks")): r["bytes"]
                   for r in json.loads(Path(a.from_json).read_text())["measured"]}
    for model_arch, sizes, modes, amp, depths in plan(a):
        points = {(m, dp): {} for m in modes for dp in (depths or (None,))}
        for size in sizes:
            clf = build(model_arch, size) if not earlier else None
            n = tokens(model_arch, size)
            full = list(clf.backbone.blocks) if depths and clf is not None else None
            for depth in depths or (None,):
                if depths and clf is not None:
                    with_depth(clf, depth, full)
                for mode in modes:
                    for batch in ((1, 2) if size == sizes[0] else (1,)):
                        key = (model_arch, size, batch, mode, amp, depth)
                        b = earlier[key] if earlier else measure(clf, mode, size, batch, amp)
                        points[(mode, depth)][(n, batch)] = b
                        measured.append({"model": model_arch, "image_size": size, "tokens": n, "batch": batch,
                                         "mode": mode, "amp": amp, "blocks": depth, "bytes": b})
                        print(f"measured {model_arch} {size} px (N={n:g}) batch {batch} {mode:<13} "
                              f"{'bf16' if amp else 'fp32'}{f' {depth} blocks' if depth else ''}: "
                              f"{b / 2**20:8.1f} MiB", flush=True)
            del clf
        for mode in modes:
            if depths:
                blocks = len(build_meta(model_arch, sizes[0]).backbone.blocks)
                fits_by[(model_arch, amp, mode)] = to_depth(fit(points[(mode, depths[0])]),
                                                            fit(points[(mode, depths[1])]), *depths, blocks)
            else:
                fits_by[(model_arch, amp, mode)] = fit(points[(mode, None)])
    print(f"\nmeasured in {time.perf_counter() - t0:.0f} s (torch {torch.__version__}, CPU)\n")
    print("| model | mode | precision | c (MiB) | d (MiB per image) | a (KiB per token) | b (bytes per token^2) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (model_arch, amp, mode), f in fits_by.items():
        print(f"| {model_arch} | {mode} | {'bf16' if amp else 'fp32'} | {f['c'] / 2**20:.1f} | {f['d'] / 2**20:.2f} "
              f"| {f['a'] / 1024:.1f} | {f['b']:.2f} |")
    print(f"\nEstimates per GPU (reserve {RESERVE_BYTES / GiB:.1f} GiB + {RESERVE_FRACTION:.0%}). Each card's cell: "
          "the setting that reaches the batch ('k x accum n' = --batch_size k --grad_accum_steps n, the same "
          "update; '+ ckpt' = --grad_checkpointing), then the largest batch that fits without / with "
          "checkpointing:\n")
    cards = " | ".join(f"{g} GB" for g in CARDS_GB)
    rows = [f"| command | batch | estimated GiB at that batch | {cards} |", "|---|---:|---:|" + "---|" * len(CARDS_GB)]
    table, evals = [], []
    for name, model_arch, size, batch, mode, amp in COMMANDS:
        model_arch = stand_in.get(model_arch, model_arch)
        f = fits_by.get((model_arch, amp, mode))
        if f is None:
            continue
        ckpt = fits_by.get((model_arch, amp, "finetune_ckpt")) if mode == "finetune" else None
        static = static_of(model_arch, size, mode)
        n = tokens(model_arch, size)
        total = static + activation_bytes(f, n, batch)
        with_reserve = total * (1 + RESERVE_FRACTION) + RESERVE_BYTES
        cells = []
        for g in CARDS_GB:
            most = [largest_batch(f, static, n, g)] + ([largest_batch(ckpt, static, n, g)] if ckpt else [])
            cap = "; max " + " / ".join(str(m) if m <= 1024 else "> 1024" for m in most)
            cells.append(settings_for(f, ckpt, static, n, batch, g) + cap)
        big = largest_batch(f, static, n, 80)
        table.append({"command": name, "model": model_arch, "image_size": size, "batch": batch, "mode": mode,
                      "amp": amp, "estimated_gib": with_reserve / GiB, "settings": dict(zip(map(str, CARDS_GB), cells)),
                      "largest_batch_80gb": big})
        rows.append(f"| {name} | {batch} | {with_reserve / GiB:.1f} | " + " | ".join(cells) + " |")
        att, ev = fits_by.get((model_arch, amp, "attribution")), fits_by.get((model_arch, amp, "frozen"))
        if att is not None and ev is not None:
            evals.append(f"- {name}: final evaluation (no-grad, batch {2 * batch}) "
                         f"~{(static + activation_bytes(ev, n, 2 * batch)) / GiB:.1f} GiB; attribution at "
                         f"--attribution_batch_size 8 ~{(static + activation_bytes(att, n, 8)) / GiB:.1f} GiB, at "
                         f"the training batch {batch} ~{(static + activation_bytes(att, n, batch)) / GiB:.1f} GiB "
                         "(before the reserve)")
    print("\n".join(rows))
    if evals:
        print("\nAfter training (weights, gradients and AdamW state still allocated):\n" + "\n".join(evals))
    if a.json:
        Path(a.json).write_text(json.dumps({"measured": measured, "fits": [
            {"model": k[0], "amp": k[1], "mode": k[2], **v} for k, v in fits_by.items()], "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
