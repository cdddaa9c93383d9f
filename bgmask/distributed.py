"""torch.distributed helpers, all in one place. The same script runs under `python` (one process)
and `torchrun` (DDP: gloo on CPU, nccl on GPU). Only rank 0 writes files."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from bgmask.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`--device` as a torch.device: auto = cuda if available, else cpu; a plain `cuda` is this process's
    GPU (local_rank under torchrun); `cuda:N`, `cpu` and other torch device names are taken as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA device is available (use --device cpu)")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group whenever torchrun launched this process (RANK and WORLD_SIZE set), one
    process included: a one-GPU `torchrun --nproc_per_node=1` then runs the same NCCL collectives as four
    GPUs do. Without torchrun: one process, no group. nccl on CUDA (bound to this process's GPU), gloo on
    CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=resolve_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if dev.type == "cuda":  # device_id binds the communicator to this GPU at once (no guessing later)
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank, world, local_rank, dev)


def is_main_process() -> bool:
    """Rank 0; before the process group exists, what torchrun's environment says (so a note printed
    while the flags are checked appears once)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def group_device() -> torch.device:
    """The device the process group's collectives take tensors on: this process's GPU under nccl (which
    refuses CPU tensors), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Every collective bgmask runs is one of the helpers below. Each moves its tensors to `group_device()`
# itself, so a caller cannot hand nccl a CPU tensor (the fault that ends a multi-GPU run after its first
# epoch), and each is a no-op without a process group.

def barrier() -> None:
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over ranks, on `t`'s device (t itself without a process group)."""
    if not dist.is_initialized():
        return t
    on_group = t.detach().to(group_device(), copy=True)
    dist.all_reduce(on_group, op=dist.ReduceOp.SUM)
    return on_group.to(t.device)


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (a one-element list without a process group).

    Pickled into a byte tensor on the group's device and gathered with two tensor collectives (the
    lengths, then the padded bytes), as torch's own all_gather_object does, but with the device stated
    rather than taken from whatever CUDA device happens to be current."""
    if not dist.is_initialized():
        return [obj]
    device, world = group_device(), dist.get_world_size()
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [pickle.loads(p[:int(s.item())].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes indices r, r + W, r + 2W, ... with no padding, so that every
    sample is seen exactly once across ranks (DistributedSampler pads by repeating samples)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
