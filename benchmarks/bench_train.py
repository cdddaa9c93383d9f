"""Training and evaluation throughput: the bgmask engine against the bare timm model, in the same run.

    python benchmarks/bench_train.py                      # CPU, 64 px, small CNN + small ViT
    python benchmarks/bench_train.py --device cuda --image_size 224 --models convnext_tiny vit_small_patch14_dinov2 \
        --batch_size 64 --use_amp --channels_last [--torchcompile]

Rows per model (section `train`):
- bare timm model: `timm.create_model` forward + backward + AdamW step on preloaded tensors, served by
  the same in-memory DataLoader as the engine rows (the ceiling);
- engine/<strategy>: `bgmask.engine.train_one_epoch` (strategy, masks, autocast, loss, bookkeeping) on
  the same tensors and random masks; baseline is divided by bare (goal >= 0.90), early and late by
  engine/baseline (goals >= 0.90 and >= 0.85: what masking itself costs);
- engine/late + online segmenter (with --seg_config/--seg_checkpoint): masks from the segmenter on
  every batch instead of cached ones, divided by engine/late; and the segmenter's forward alone on the
  same batches, whose time added to engine/late's is the row "sum of both": the online row divided by it
  has the goal >= 0.95 (the online path costs no more than its two parts);
- engine+data/<strategy> (with --data_path): the real JPEG pipeline (CUBDataset, joint transforms,
  DataLoader workers), divided by engine/<strategy>.
Section `eval`: the bare model's no-grad forward, and `bgmask.eval.predict` per strategy (goal >= 0.90).
Measurements run round-robin, `--repeats` times; each row keeps its median run. `--channels_last`
applies to CNNs only (it slows ViTs down). Prints a Markdown table (see run_all.py).
"""

from __future__ import annotations

import argparse
import time
from argparse import Namespace

from common import add_common_args, emit, interleaved, machine_line, make_row

import bgmask  # noqa: F401  (before torch: sets the OpenMP wait policy default)
import torch
from torch.utils.data import DataLoader, Dataset

from bgmask.distributed import DistInfo
from bgmask.build import compile_model
from bgmask.engine import train_one_epoch
from bgmask.methods import ERM
from bgmask.optim import build_loss, build_optimizer
from bgmask.eval import autocast_context, predict
from bgmask.masking import STRATEGIES, create_strategy
from bgmask.models import create_classifier

ONLINE, SEG_ALONE, LATE_PLUS_SEG = ("engine/late + online segmenter", "segmenter forward alone",
                                   "engine/late + segmenter forward (sum of both)")
GOALS = {"engine/baseline": 0.90, "engine/early": 0.90, "engine/late": 0.85,
         "eval/baseline": 0.90, "eval/early": 0.90, "eval/late": 0.85,
         ONLINE: 0.95}  # the online path costs no more than its two parts (5 % for timing noise)


class TensorRecords(Dataset):
    """Preloaded images, masks and labels in the record format of CUBDataset."""

    def __init__(self, images, masks, labels):
        self.images, self.masks, self.labels = images, masks, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i], "label": self.labels[i], "index": i,
                "group": -1, "place": -1}


def is_vit(arch: str) -> bool:
    return "vit" in arch or "deit" in arch or "eva" in arch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    def __init__(self, cfg, device, images, masks, labels):
        self.cfg, self.device = cfg, device
        self.images, self.masks, self.labels = images, masks, labels
        self.ds = TensorRecords(images, masks, labels)
        self._built = {}

    def built(self, key, factory):
        """Models (and optimizers) are built once per row and reused by its repeats, so that
        --torchcompile compiles once per row, not once per measurement."""
        if key not in self._built:
            self._built[key] = factory()
        return self._built[key]

    def clear(self):
        self._built.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def channels_last(self, arch):
        return self.cfg.channels_last and not is_vit(arch)

    # --------------------------------------------------------------------------- bare timm model
    def bare_model(self, arch):
        import timm

        kw = {"img_size": self.cfg.image_size} if is_vit(arch) else {}
        model = timm.create_model(arch, num_classes=self.cfg.num_classes, **kw).to(self.device)
        if self.channels_last(arch):
            model.to(memory_format=torch.channels_last)
        return model

    def batches(self, steps):
        """The in-memory loader every row reads from: bare and engine rows pay the same collation."""
        while True:
            for batch in DataLoader(self.ds, batch_size=self.cfg.batch_size):
                if steps == 0:
                    return
                steps -= 1
                yield batch

    def timed(self, step, steps):
        """`step(batch)` over warm-up batches, then `steps` timed ones: (images, seconds)."""
        for batch in self.batches(self.cfg.warmup):
            step(batch)
        sync(self.device)
        t0 = time.perf_counter()
        for batch in self.batches(steps):
            step(batch)
        sync(self.device)
        return steps * self.cfg.batch_size, time.perf_counter() - t0

    def bare_train(self, arch, steps):
        cfg, device = self.cfg, self.device

        def build():
            model = self.bare_model(arch).train()
            run = compile_model(model, cfg.torchcompile) if cfg.torchcompile else model
            return run, torch.optim.AdamW(model.parameters(), lr=1e-4)

        run, opt = self.built(("bare train", arch), build)
        loss_fn = torch.nn.CrossEntropyLoss()

        def one(batch):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            if self.channels_last(arch):
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.use_amp):
                loss = loss_fn(run(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return self.timed(one, steps)

    @torch.no_grad()
    def bare_eval(self, arch, steps):
        cfg, device = self.cfg, self.device
        model = self.built(("bare eval", arch), lambda: self.bare_model(arch).eval())

        def one(batch):
            x = batch["image"].to(device, non_blocking=True)
            if self.channels_last(arch):
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, cfg.use_amp):
                model(x).argmax(1).cpu()  # predict() also brings the predictions to the host

        return self.timed(one, steps)

    # --------------------------------------------------------------------------- the bgmask engine
    def classifier(self, arch):
        model = create_classifier(arch, self.cfg.num_classes, head="gap" if is_vit(arch) else None,
                                  image_size=self.cfg.image_size).to(self.device)
        if self.channels_last(arch):
            model.to(memory_format=torch.channels_last)
        return model

    def run_cfg(self, arch, steps):
        cfg = self.cfg
        return Namespace(lr=1e-4, scratch_lr_factor=1.0, weight_decay=0.05, optimizer_type="adamw", betas1=0.9,
                         betas2=0.999, momentum=0.9, smoothing=0.0, use_amp=cfg.use_amp, amp_dtype="bf16",
                         grad_norm_clip=None, channels_last=self.channels_last(arch), max_steps_per_epoch=steps,
                         epochs=1, no_progress=True, log_interval=10, grad_accum_steps=1)

    def engine_train(self, arch, strategy_name, steps, loader_factory=None, mask_fn=None):
        run_cfg = self.run_cfg(arch, self.cfg.warmup)

        def build():
            model = self.classifier(arch)
            opt = build_optimizer(model, run_cfg)
            return (compile_model(model, self.cfg.torchcompile) if self.cfg.torchcompile else model), opt

        run, opt = self.built(("engine train", arch, strategy_name, mask_fn is not None), build)
        strategy = create_strategy(strategy_name)
        dist = DistInfo(device=self.device)
        method = ERM(build_loss(run_cfg, False))  # the loop's loss: plain cross-entropy
        loader_factory = loader_factory or (lambda: DataLoader(self.ds, batch_size=self.cfg.batch_size))
        train_one_epoch(run, loader_factory(), strategy, opt, method, dist, run_cfg, 0, mask_fn=mask_fn)  # warm-up
        run_cfg.max_steps_per_epoch = steps
        sync(self.device)
        stats = train_one_epoch(run, loader_factory(), strategy, opt, method, dist, run_cfg, 0, mask_fn=mask_fn)
        sync(self.device)
        return stats["train/images"], stats["train/seconds"]

    def engine_eval(self, arch, strategy_name, steps):
        model = self.built(("engine eval", arch), lambda: self.classifier(arch))
        strategy = create_strategy(strategy_name)
        dist = DistInfo(device=self.device)
        warm = torch.utils.data.Subset(self.ds, range(self.cfg.warmup * self.cfg.batch_size))
        timed = torch.utils.data.Subset(self.ds, range(steps * self.cfg.batch_size))
        kw = dict(batch_size=self.cfg.batch_size, amp=self.cfg.use_amp, channels_last=self.channels_last(arch),
                  progress=False)
        predict(model, warm, strategy, dist, **kw)
        sync(self.device)
        t0 = time.perf_counter()
        predict(model, timed, strategy, dist, **kw)
        sync(self.device)
        return len(timed), time.perf_counter() - t0


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["bgmask_resnet_tiny", "bgmask_vit_tiny"])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                   help="default: every registered strategy")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="median of this many measurements per row")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--use_amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels_last", action="store_true", help="channels_last for the CNNs")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training models (bare and engine alike)")
    p.add_argument("--data_path", default=None, help="a synthetic benchmark for the engine+data rows")
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--seg_config", default=None, help="MMSeg config of an online segmenter (row late + segmenter)")
    p.add_argument("--seg_checkpoint", default=None, help="its checkpoint (e.g. WORK_DIR/segmenter_slim.pth)")
    p.add_argument("--no_eval", action="store_true", help="skip the evaluation rows")
    add_common_args(p)
    cfg = p.parse_args(argv)
    if "baseline" not in cfg.strategies:
        p.error("--strategies must include baseline (the reference of early and late)")
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
    bench = Bench(cfg, device, images, masks, labels)
    seg = None
    if cfg.seg_checkpoint and "late" in cfg.strategies:  # the online segmenter row is late masking's
        from bgmask.masking.segmenter import load_segmenter

        seg = load_segmenter(cfg.seg_config, cfg.seg_checkpoint, device=device)
    rows = []
    for arch in cfg.models:
        bench.clear()  # the previous model's rows are done: free their models
        bench.bare_train(arch, cfg.warmup)  # discarded: first-use kernel set-up (and compilation)
        # name -> the row it is divided by (what each ratio isolates: the engine, masking, the segmenter,
        # the JPEG pipeline)
        refs = {"bare timm model": None}
        measures = {"bare timm model": lambda a=arch: bench.bare_train(a, cfg.steps)}
        for strat in cfg.strategies:
            refs[f"engine/{strat}"] = "bare timm model" if strat == "baseline" else "engine/baseline"
            measures[f"engine/{strat}"] = lambda a=arch, s=strat: bench.engine_train(a, s, cfg.steps)
        if seg is not None:
            refs[ONLINE], refs[SEG_ALONE] = LATE_PLUS_SEG, "engine/late"
            measures[ONLINE] = lambda a=arch: bench.engine_train(a, "late", cfg.steps, mask_fn=seg)
            measures[SEG_ALONE] = lambda: bench.timed(lambda b: seg(b["image"].to(device)), cfg.steps)
        results = interleaved(measures, cfg.repeats, device)
        if seg is not None:  # the two parts' times added: what the online path may cost
            (n, late_s, mem), (_, seg_s, _) = results["engine/late"], results[SEG_ALONE]
            results[LATE_PLUS_SEG] = (n, late_s + seg_s, mem)
            refs[LATE_PLUS_SEG] = "engine/late"
        if cfg.data_path:  # one run each: the JPEG pipeline is slow enough to average itself out
            from bgmask.data import CUBDataset, MaskSource, build_transform

            tf = build_transform(True, cfg.image_size, "flip")
            for strat in cfg.strategies:
                real = CUBDataset(cfg.data_path, "train", masks=MaskSource("gt") if STRATEGIES[strat].needs_mask
                                  else None, transform=tf)
                factory = lambda r=real: DataLoader(r, batch_size=cfg.batch_size, shuffle=True,  # noqa: E731
                                                    num_workers=cfg.num_workers, drop_last=True,
                                                    pin_memory=device.type == "cuda")
                refs[f"engine+data/{strat}"] = f"engine/{strat}"
                results.update(interleaved({f"engine+data/{strat}": lambda a=arch, s=strat, f=factory:
                                            bench.engine_train(a, s, cfg.steps, loader_factory=f)}, 1, device))
        for name, (count, seconds, mem) in results.items():
            rows.append(make_row("train", arch, name, count, seconds, mem, ref=refs[name], goal=GOALS.get(name)))
        if not cfg.no_eval:
            refs = {"bare forward, no grad": None}
            measures = {"bare forward, no grad": lambda a=arch: bench.bare_eval(a, cfg.steps)}
            for strat in cfg.strategies:
                refs[f"eval/{strat}"] = "bare forward, no grad" if strat == "baseline" else "eval/baseline"
                measures[f"eval/{strat}"] = lambda a=arch, s=strat: bench.engine_eval(a, s, cfg.steps)
            for name, (count, seconds, mem) in interleaved(measures, cfg.repeats, device).items():
                rows.append(make_row("eval", arch, name, count, seconds, mem, ref=refs[name], goal=GOALS.get(name)))
    header = (f"training / evaluation; device={device} image_size={cfg.image_size} batch={cfg.batch_size} "
              f"steps={cfg.steps} repeats={cfg.repeats} threads={torch.get_num_threads()} amp={cfg.use_amp} "
              f"channels_last(CNN)={cfg.channels_last} torchcompile={cfg.torchcompile}; "
              f"peak memory = {'CUDA allocator' if device.type == 'cuda' else 'process RSS'}; "
              f"{machine_line(cfg.device)}")
    return emit(rows, header, cfg.json)


if __name__ == "__main__":
    main()
