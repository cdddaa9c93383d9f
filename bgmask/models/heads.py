"""ViT classification heads (registry `HEADS`) and the pooling rules shared by all backbone families.

A head is a Linear on pooled ViT tokens. Its `parts` name what it reads:
  "cls"  the CLS token after the final norm;
  "gap"  the mean of the patch tokens (CLS and register tokens excluded);
  "both" the concatenation [cls, gap] (Linear 2D -> K), the default for ViTs.
Adding a head = one registered subclass; the tests are parametrised over `HEADS`.

Mask convention: 1 = bird (foreground), 0 = background; soft values in between are weights.
"""

from __future__ import annotations

import torch
from torch import nn

from bgmask.errors import UserError

# Late-masking pooling rules over the final feature grid.
#   "mean":        mean over all cells, masked-out (zero) cells included (the paper's late masking);
#   "masked_mean": mean over bird cells only, i.e. sum(f * m) / sum(m); an empty mask gives 0, not NaN.
LATE_POOLS = ("mean", "masked_mean")
MASK_EPS = 1e-6

HEADS: dict[str, type[TokenHead]] = {}


def register_head(name: str):
    """Class decorator: `@register_head("gap")` adds a TokenHead subclass to HEADS under `name`."""

    def deco(cls: type[TokenHead]) -> type[TokenHead]:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered")
        cls.name = name
        HEADS[name] = cls
        return cls

    return deco


def get_head(name: str) -> type[TokenHead]:
    if name not in HEADS:
        raise UserError(f"unknown head {name!r}; expected one of {', '.join(HEADS)}")
    return HEADS[name]


class TokenHead(nn.Module):
    """Linear on the concatenation of the pooled token features named in `parts`.

    forward(cls (B, D) or None, gap (B, D) or None) -> logits (B, K)
    """

    name: str = ""
    parts: tuple[str, ...] = ()

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.linear = nn.Linear(len(self.parts) * embed_dim, num_classes)

    @property
    def uses_cls(self) -> bool:
        return "cls" in self.parts

    @property
    def uses_gap(self) -> bool:
        return "gap" in self.parts

    def forward(self, cls: torch.Tensor | None, gap: torch.Tensor | None) -> torch.Tensor:
        feats = {"cls": cls, "gap": gap}
        return self.linear(torch.cat([feats[p] for p in self.parts], dim=-1))  # (B, K)


@register_head("cls")
class ClsHead(TokenHead):
    parts = ("cls",)


@register_head("gap")
class GapHead(TokenHead):
    parts = ("gap",)


@register_head("both")
class BothHead(TokenHead):
    parts = ("cls", "gap")


def check_late_pool(late_pool: str) -> str:
    if late_pool not in LATE_POOLS:
        raise UserError(f"unknown late_pool {late_pool!r}; expected one of {', '.join(LATE_POOLS)}")
    return late_pool


def masked_mean(fm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean over bird cells of an already-masked map fm = f * m: sum(fm) / max(sum(m), eps) over the grid.
    fm (B, C, h, w), m (B, 1, h, w) -> (B, C)."""
    denom = m.float().sum(dim=(2, 3)).clamp_min(MASK_EPS).to(fm.dtype)  # (B, 1)
    return fm.sum(dim=(2, 3)) / denom


def pool_grid(fm: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Pool a feature grid (B, C, h, w) to (B, C). `fm` is already multiplied by the mask where one applies
    (never mask twice). m None: the mean over all cells ("mean"); m (B, 1, h, w): the mean over the bird
    cells ("masked_mean", weights m)."""
    if m is None:
        return fm.mean(dim=(2, 3))
    return masked_mean(fm, m)


def masked_mean_rescale(fm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Rescale a masked map fm = f * m (B, C, h, w) by h*w / max(sum(m), eps), so that a model's own
    global average pool of the result equals the masked mean sum(f * m) / sum(m)."""
    h, w = m.shape[-2:]
    scale = (h * w) / m.float().sum(dim=(2, 3), keepdim=True).clamp_min(MASK_EPS)  # (B, 1, 1, 1)
    return fm * scale.to(fm.dtype)
