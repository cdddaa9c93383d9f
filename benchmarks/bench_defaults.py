"""bgmask's speed defaults against the plain way, stage by stage, in one run on a CUB-like tree.

    python benchmarks/bench_defaults.py --root /tmp/cub_scale/CUB_200_2011 [--model resnet18 --image_size 128]

"plain" is the paper's loop in every setting that changes speed, not results: every JPEG decoded at full
size (`--decode_full`) and the model in the contiguous NCHW format (`--no_channels_last`); "default" is
bgmask as it runs with no flag: a JPEG twice or more the size the first resize needs decoded at 1/2-1/8
scale by libjpeg (mask following), channels_last for CNNs. Each pair runs round-robin (`--repeats`), so
the machine's drift hits both alike; the ratio is default / plain. Stages:
- data: the evaluation pass (test split, masks) at --image_size and at 224 px; a training epoch of data
  with the paper's timm augmentation (its random crop reads full-resolution pixels: no reduction applies)
  and with `cub_original` (resize first: it does);
- model: training steps and the evaluation forward on preloaded tensors;
- engine: `train_one_epoch` over the real loader (timm set, early masking) and `bgmask.eval.predict` over
  the test split: what a run spends, with everything together.
"""

from __future__ import annotations

import argparse
import time
from argparse import Namespace

from common import add_common_args, emit, interleaved, machine_line, make_row

import bgmask  # noqa: F401  (before torch: the OpenMP wait policy default)
import torch
from torch.utils.data import DataLoader

from bgmask.data import CUBDataset, MaskSource, build_transform
from bgmask.distributed import DistInfo
from bgmask.engine import train_one_epoch
from bgmask.eval import predict
from bgmask.masking.strategies import create_strategy
from bgmask.models import create_classifier
from bgmask.methods import ERM
from bgmask.optim import build_loss, build_optimizer

VARIANTS = ("default", "plain")


def dataset(a, split: str, train: bool, size: int, augment: str, variant: str) -> CUBDataset:
    tf = build_transform(train, size, augment)
    if variant == "plain":
        tf.decode_min_side = None
    return CUBDataset(a.root, split, masks=MaskSource("gt"), transform=tf)


def loader(ds, a, shuffle=False, limit=None) -> DataLoader:
    if limit:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    return DataLoader(ds, batch_size=a.batch_size, shuffle=shuffle, num_workers=a.workers, drop_last=shuffle)


def data_pass(a, split, train, size, augment, variant):
    def fn():
        t0 = time.perf_counter()
        n = sum(len(b["label"]) for b in loader(dataset(a, split, train, size, augment, variant), a, limit=a.images))
        return n, time.perf_counter() - t0

    return fn


class Models:
    """The classifier in each memory format, built once (same initial weights)."""

    def __init__(self, a):
        torch.manual_seed(0)
        self.a = a
        base = create_classifier(a.model, a.num_classes, image_size=a.image_size)
        self.models = {"plain": base}
        self.models["default"] = create_classifier(a.model, a.num_classes, image_size=a.image_size)
        self.models["default"].load_state_dict(base.state_dict())
        self.cl = {"plain": False, "default": self.models["default"].family.prefers_channels_last}
        if self.cl["default"]:
            self.models["default"].to(memory_format=torch.channels_last)
        n = a.batch_size * a.steps
        self.x = torch.randn(n, 3, a.image_size, a.image_size)
        self.y = torch.randint(0, a.num_classes, (n,))

    def run_cfg(self, variant, steps):
        return Namespace(lr=1e-4, scratch_lr_factor=1.0, weight_decay=0.05, optimizer_type="adamw", betas1=0.9,
                         betas2=0.999, momentum=0.9, smoothing=0.1, use_amp=False, amp_dtype="bf16",
                         grad_norm_clip=None, channels_last=self.cl[variant], max_steps_per_epoch=steps, epochs=1,
                         no_progress=True, log_interval=10, grad_accum_steps=1)

    def train_steps(self, variant):
        model, cl = self.models[variant].train(), self.cl[variant]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def fn():
            t0 = time.perf_counter()
            for i in range(0, len(self.x), self.a.batch_size):
                x = self.x[i:i + self.a.batch_size]
                x = x.contiguous(memory_format=torch.channels_last) if cl else x
                loss = torch.nn.functional.cross_entropy(model(x), self.y[i:i + self.a.batch_size])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return len(self.x), time.perf_counter() - t0

        return fn

    def eval_forward(self, variant):
        model, cl = self.models[variant], self.cl[variant]

        @torch.no_grad()
        def fn():
            model.eval()
            t0 = time.perf_counter()
            for i in range(0, len(self.x), self.a.batch_size):
                x = self.x[i:i + self.a.batch_size]
                model(x.contiguous(memory_format=torch.channels_last) if cl else x).argmax(1)
            return len(self.x), time.perf_counter() - t0

        return fn

    def engine_epoch(self, variant):
        a, model = self.a, self.models[variant]
        cfg = self.run_cfg(variant, a.epoch_steps)
        opt, method, strategy = build_optimizer(model, cfg), ERM(build_loss(cfg, False)), create_strategy("early")
        ds = dataset(a, "train", True, a.image_size, "timm", variant)

        def fn():
            stats = train_one_epoch(model, loader(ds, a, shuffle=True), strategy, opt, method, DistInfo(), cfg, 0)
            return stats["train/images"], stats["train/seconds"]

        return fn

    def engine_eval(self, variant):
        a, model = self.a, self.models[variant]
        ds = dataset(a, "test", False, a.image_size, "none", variant)
        if a.images:
            ds = torch.utils.data.Subset(ds, range(min(a.images, len(ds))))

        def fn():
            t0 = time.perf_counter()
            predict(model, ds, create_strategy("early"), DistInfo(), batch_size=a.batch_size, num_workers=a.workers,
                    channels_last=self.cl[variant], progress=False)
            return len(ds), time.perf_counter() - t0

        return fn


def stages(a, models: Models) -> dict[tuple[str, str], dict]:
    """(section, stage) -> {variant: measurement}."""
    s = a.image_size
    return {
        ("data", f"eval pass, {s} px + masks"): {v: data_pass(a, "test", False, s, "none", v) for v in VARIANTS},
        ("data", "eval pass, 224 px + masks"): {v: data_pass(a, "test", False, 224, "none", v) for v in VARIANTS},
        ("data", f"train epoch, timm set, {s} px + masks"): {v: data_pass(a, "train", True, s, "timm", v)
                                                             for v in VARIANTS},
        ("data", f"train epoch, cub_original set, {s} px + masks"): {
            v: data_pass(a, "train", True, s, "cub_original", v) for v in VARIANTS},
        ("model", f"training steps, {s} px"): {v: models.train_steps(v) for v in VARIANTS},
        ("model", f"evaluation forward, {s} px"): {v: models.eval_forward(v) for v in VARIANTS},
        ("engine", f"train_one_epoch, timm set, early, {s} px"): {v: models.engine_epoch(v) for v in VARIANTS},
        ("engine", f"predict (test split), early, {s} px"): {v: models.engine_eval(v) for v in VARIANTS},
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="a CUB_200_2011-layout tree (bench_cub_scale.py generates one)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--num_classes", type=int, default=200)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="training steps of the model rows")
    p.add_argument("--epoch_steps", type=int, default=12, help="steps of the engine's training epoch row")
    p.add_argument("--images", type=int, default=640, help="images per data pass (0 = the whole split)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="+", default=None, choices=["data", "model", "engine"])
    add_common_args(p)
    a = p.parse_args(argv)
    models = Models(a)
    rows = []
    for (section, stage), pair in stages(a, models).items():
        if a.only and section not in a.only:
            continue
        measured = interleaved({f"{stage} — {v}": fn for v, fn in pair.items()}, a.repeats, "cpu")
        for v in VARIANTS:
            n, seconds, mem = measured[f"{stage} — {v}"]
            rows.append(make_row(section, a.model if section != "data" else "data", f"{stage} — {v}", n, seconds, mem,
                                 ref=f"{stage} — plain" if v == "default" else None))
            print(f"{section} {stage} {v}: {n} images in {seconds:.2f} s", flush=True)
    header = (f"bgmask defaults vs plain (full JPEG decode, NCHW), {a.root}; {a.model} at {a.image_size} px, "
              f"batch {a.batch_size}, {a.workers} workers, {torch.get_num_threads()} threads; {machine_line()}")
    return emit(rows, header, a.json)


if __name__ == "__main__":
    main()
