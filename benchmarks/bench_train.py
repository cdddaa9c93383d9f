"""Training throughput: the bgmask engine vs the bare timm model, measured in the same run.

    python benchmarks/bench_train.py                      # CPU, 64 px, small CNN + small ViT
    python benchmarks/bench_train.py --device cuda --image_size 224 --models convnext_tiny vit_small_patch14_dinov2 \
        --batch_size 64 --use_amp --channels_last

Rows:
- bare: `timm.create_model` forward + backward + optimizer step on preloaded tensors (the ceiling);
- engine/<strategy>: `bgmask.engine.train_one_epoch` (strategy, masks, autocast, loss, clipping,
  bookkeeping) on the same preloaded tensors and masks, served by an in-memory dataset;
- engine+data/<strategy>: the same with the real JPEG pipeline (CUBDataset + transforms + DataLoader
  workers) on a generated synthetic benchmark, when --data_path is given.
Ratios are against the bare row of the same model. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import resource
import time
from argparse import Namespace

import bgmask  # noqa: F401  (before torch: sets the OpenMP wait policy default)
import torch
from statistics import median

from torch.utils.data import DataLoader, Dataset

from bgmask.distributed import DistInfo
from bgmask.engine import build_loss, build_optimizer, train_one_epoch
from bgmask.masking import create_strategy
from bgmask.models import create_classifier


class TensorRecords(Dataset):
    def __init__(self, images, masks, labels):
        self.images, self.masks, self.labels = images, masks, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i], "label": self.labels[i], "index": i,
                "group": -1, "place": -1}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step_rate(arch, images, labels, steps, device, cfg) -> float:
    import timm

    model = timm.create_model(arch, num_classes=int(labels.max()) + 1, img_size=images.shape[-1]) \
        if "vit" in arch else timm.create_model(arch, num_classes=int(labels.max()) + 1)
    model.to(device).train()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    bs = cfg.batch_size
    n = len(labels) // bs

    def one(i):
        x = images[i * bs:(i + 1) * bs].to(device, non_blocking=True)
        y = labels[i * bs:(i + 1) * bs].to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.use_amp):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(min(cfg.warmup, n)):
        one(i)
    sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        one(s % n)
    sync(device)
    return steps * bs / (time.perf_counter() - t0)


def engine_rate(arch, strategy_name, loader_factory, steps, device, cfg, head=None, mask_fn=None) -> float:
    model = create_classifier(arch, cfg.num_classes, head=head, image_size=cfg.image_size).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    run_cfg = Namespace(lr=1e-4, scratch_lr_factor=1.0, weight_decay=0.05, optimizer_type="adamw", betas1=0.9,
                        betas2=0.999, momentum=0.9, smoothing=0.0, use_amp=cfg.use_amp, amp_dtype="bf16",
                        grad_norm_clip=None, channels_last=cfg.channels_last, max_steps_per_epoch=cfg.warmup,
                        epochs=1, no_progress=True)
    opt = build_optimizer(model, run_cfg)
    strategy = create_strategy(strategy_name)
    dist = DistInfo(device=device)
    loss_fn = build_loss(run_cfg, False)
    train_one_epoch(model, loader_factory(), strategy, opt, loss_fn, dist, run_cfg, 0, mask_fn=mask_fn)  # warm-up
    run_cfg.max_steps_per_epoch = steps
    sync(device)
    stats = train_one_epoch(model, loader_factory(), strategy, opt, loss_fn, dist, run_cfg, 0, mask_fn=mask_fn)
    sync(device)
    return stats["train/images"] / stats["train/seconds"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["bgmask_resnet_tiny", "bgmask_vit_tiny"])
    p.add_argument("--strategies", nargs="+", default=["baseline", "early", "late"])
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="median of this many measurements per row")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--use_amp", action="store_true")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--data_path", default=None, help="a synthetic benchmark for the engine+data rows")
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--seg_config", default=None, help="MMSeg config of an online segmenter (row late + segmenter)")
    p.add_argument("--seg_checkpoint", default=None, help="its checkpoint (e.g. WORK_DIR/segmenter_slim.pth)")
    cfg = p.parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    n = cfg.batch_size * max(cfg.steps, cfg.warmup)
    images = torch.randn(n, 3, cfg.image_size, cfg.image_size)
    masks = (torch.rand(n, 1, cfg.image_size, cfg.image_size) > 0.5).float()
    labels = torch.randint(0, cfg.num_classes, (n,))
    if device.type == "cuda":
        images, masks, labels = images.pin_memory(), masks.pin_memory(), labels.pin_memory()
    ds = TensorRecords(images, masks, labels)
    rows = []
    for arch in cfg.models:
        head = "gap" if "vit" in arch else None
        bare_step_rate(arch, images, labels, cfg.warmup, device, cfg)  # discarded: first-use kernel set-up
        bare = median(bare_step_rate(arch, images, labels, cfg.steps, device, cfg) for _ in range(cfg.repeats))
        rows.append((arch, "bare timm model", bare, 1.0))
        for strat in cfg.strategies:
            rate = median(engine_rate(arch, strat, lambda: DataLoader(ds, batch_size=cfg.batch_size, shuffle=False),
                                      cfg.steps, device, cfg, head) for _ in range(cfg.repeats))
            rows.append((arch, f"engine/{strat}", rate, rate / bare))
        if cfg.seg_checkpoint and "late" in cfg.strategies:
            from bgmask.masking.segmenter import load_segmenter

            seg = load_segmenter(cfg.seg_config, cfg.seg_checkpoint, device=device)
            late = next(r for r in rows if r[0] == arch and r[1] == "engine/late")[2]
            rate = median(engine_rate(arch, "late", lambda: DataLoader(ds, batch_size=cfg.batch_size, shuffle=False),
                                      cfg.steps, device, cfg, head, mask_fn=seg) for _ in range(cfg.repeats))
            rows.append((arch, f"engine/late + online segmenter ({rate / late:.2f}x late)", rate, rate / bare))
        if cfg.data_path:
            from bgmask.data import CUBDataset, MaskSource, build_transform

            tf = build_transform(True, cfg.image_size, "flip")
            for strat in cfg.strategies:
                real = CUBDataset(cfg.data_path, "train", masks=MaskSource("gt") if strat != "baseline" else None,
                                  transform=tf)
                rate = engine_rate(arch, strat, lambda: DataLoader(real, batch_size=cfg.batch_size, shuffle=True,
                                                                   num_workers=cfg.num_workers), cfg.steps, device,
                                   cfg, head)
                rows.append((arch, f"engine+data/{strat}", rate, rate / bare))
    print(f"\ndevice={device} image_size={cfg.image_size} batch={cfg.batch_size} steps={cfg.steps} repeats={cfg.repeats} "
          f"threads={torch.get_num_threads()} amp={cfg.use_amp} channels_last={cfg.channels_last}\n")
    print("| model | row | images/s | ratio vs bare |")
    print("|---|---|---|---|")
    for arch, row, rate, ratio in rows:
        print(f"| {arch} | {row} | {rate:.1f} | {ratio:.2f} |")
    print(f"\npeak RSS {peak_rss_mb():.0f} MB")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
