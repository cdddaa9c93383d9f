"""The training-method registry (`METHODS`) and ERM, the plain criterion.

A method is one registered class that owns its update: the loop hands it a batch's logits, targets and
groups and gets the loss to backpropagate; it never asks which method it runs (DomainBed's algorithms,
timm's task objects). Adding one is one decorated class in this package; the tests are parametrised
over `METHODS`.

    method = build_method(cfg, criterion=build_loss(cfg, mixup_on), group_counts=counts)
    loss = method.loss(logits.float(), targets, groups)      # (B, K), (B,) or (B, K) soft, (B,) -> ()
    state = method.state_dict(); method.load_state_dict(state)  # exact resume

A post-hoc method (`post_hoc = True`, e.g. DFR) has no training loss: it is applied to a trained
checkpoint. `flags` lists the settings a method reads (`Flag`), so the parser can add them in one loop
and `from_config` reads them back without naming them elsewhere.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass

import torch

from bgmask.errors import UserError

METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: `@register_method("erm")` adds a Method subclass to METHODS under `name`. A
    method names itself in tables (`label`), and a training method has its own loss."""

    def deco(cls: type[Method]) -> type[Method]:
        problem = ("is already registered" if name in METHODS
                   else "has no label" if cls.label == Method.label
                   else "trains (post_hoc is False) but defines no loss" if not cls.post_hoc and cls.loss is Method.loss
                   else None)
        if problem:
            raise ValueError(f"method {name!r} {problem}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def method_class(name: str) -> type[Method]:
    """The registered method `name`; an unknown name is one UserError listing the registered ones."""
    if name not in METHODS:
        raise UserError(f"unknown --method {name!r} (expected one of {', '.join(sorted(METHODS))})")
    return METHODS[name]


def create_method(name: str, **kwargs) -> Method:
    """An instance of the registered method `name` built from its constructor's keyword arguments."""
    return method_class(name)(**kwargs)


def build_method(cfg: Namespace, *, criterion=None, group_counts=None) -> Method:
    """The method `cfg.method` names, built from the settings it reads (`Method.from_config`):
    `criterion` is what `bgmask.optim.build_loss` returns (ERM uses it), `group_counts` the training
    split's samples per group (GroupDRO's generalisation adjustment uses them)."""
    return method_class(getattr(cfg, "method", "erm")).from_config(cfg, criterion=criterion,
                                                                   group_counts=group_counts)


@dataclass(frozen=True)
class Flag:
    """One setting a method reads: the flag `--{dest}`, the constructor keyword `kwarg` it fills, and
    what `bgmask.args.add` needs to define it (`kwargs()`)."""

    dest: str
    kwarg: str
    type: type
    default: object
    help: str
    range: str | None = None
    choices: tuple | None = None
    nargs: str | None = None

    def kwargs(self) -> dict:
        """Keyword arguments for `bgmask.args.add(group, f"--{flag.dest}", **flag.kwargs())`."""
        out = {"type": self.type, "default": list(self.default) if self.nargs else self.default, "help": self.help}
        for key in ("range", "choices", "nargs"):
            if getattr(self, key) is not None:
                out[key] = list(getattr(self, key)) if key == "choices" else getattr(self, key)
        return out


class Method:
    """A registered method. `needs_groups`: its loss (or fit) reads each sample's group; `post_hoc`: it
    is applied to a trained checkpoint and has no training loss; `flags`: the settings it reads."""

    name = "base"
    label = "base"  # the name in tables, plots and --help (the registry key names it on the command line)
    needs_groups = False
    post_hoc = False
    flags: tuple[Flag, ...] = ()

    @classmethod
    def check(cls, cfg: Namespace) -> None:
        """Refuse settings this method cannot run with, as one UserError line (before any work)."""

    @classmethod
    def flag_values(cls, cfg: Namespace) -> dict:
        """Constructor keywords from the settings in `flags` (a setting missing from cfg keeps its default)."""
        return {f.kwarg: getattr(cfg, f.dest, f.default) for f in cls.flags}

    @classmethod
    def from_config(cls, cfg: Namespace, *, criterion=None, group_counts=None) -> Method:
        cls.check(cfg)
        return cls(**cls.flag_values(cfg))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar loss of one batch: logits (B, K) float, targets (B,) class ids or (B, K) soft
        targets, groups (B,) group ids or None."""
        raise UserError(f"--method {self.name} is post-hoc: it has no training loss (train with --method erm, "
                        f"then apply {self.name} to the checkpoint)")

    def train_sampler(self, groups, num_replicas: int, rank: int, seed: int):
        """The training sampler this method asks for, or None for the loop's own (a DistributedSampler).
        `groups`: the training split's group per sample (None where the method does not need groups)."""
        return None

    def summary(self) -> dict[str, float]:
        """Values worth logging after an epoch (e.g. GroupDRO's group weights); empty by default."""
        return {}

    def state_dict(self) -> dict:
        """What an exact resume needs, as tensors and plain values (safe to save in a checkpoint)."""
        return {"method": self.name}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, {"method"})

    def _check_state(self, state: dict, keys: set[str]) -> None:
        if not isinstance(state, dict) or state.get("method") != self.name or set(state) != keys:
            found = state.get("method") if isinstance(state, dict) else None
            raise UserError(f"--resume_training: the checkpoint's method state is {found!r}'s, not "
                            f"{self.name!r}'s (resume with the same --method)")


@register_method("erm")
class ERM(Method):
    """Empirical risk minimisation: the plain criterion (`bgmask.optim.build_loss`: cross-entropy, with
    label smoothing, or the soft-target loss under mixup); groups are not read."""

    label = "ERM"

    def __init__(self, criterion=None):
        self.criterion = criterion if criterion is not None else torch.nn.CrossEntropyLoss()

    @classmethod
    def from_config(cls, cfg: Namespace, *, criterion=None, group_counts=None) -> ERM:
        cls.check(cfg)
        return cls(criterion)

    def loss(self, logits, targets, groups=None):
        return self.criterion(logits, targets)
