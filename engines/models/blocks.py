"""Building blocks several models share: the tile grid, the small CNN of the ``tiny`` presets
and the entropy of an attention distribution. Each lives here once."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engines.models import backbones
from engines.slide import Rect


@dataclass(frozen=True)
class Grid:
    """Tiles covering a view rectangle exactly: cell (r, c) is ``origin + (c * cw, r * ch)``."""

    origin: tuple[float, float]
    cell: tuple[float, float]
    rows: int
    cols: int

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def rect(self, index: int) -> Rect:
        r, c = divmod(index, self.cols)
        return (self.origin[0] + c * self.cell[0], self.origin[1] + r * self.cell[1],
                self.cell[0], self.cell[1])


def make_grid(bounds: Rect, side: float, fit: str = "round") -> Grid:
    """The grid of cells of about ``side`` pixels that fills ``bounds`` exactly: as many cells
    per side as ``side`` fits, rounded ("round": cells near ``side``) or rounded up ("ceil":
    cells never larger than ``side``)."""
    if not side > 0:
        raise ValueError(f"tile size must be positive, got {side}")
    count = {"round": round, "ceil": math.ceil}[fit]
    x, y, w, h = bounds
    rows = max(1, int(count(h / side)))
    cols = max(1, int(count(w / side)))
    return Grid((x, y), (w / cols, h / rows), rows, cols)


class SmallCNN(nn.Sequential):
    """Four stride-2 conv-GN-ReLU layers: (B,3,H,W) -> (B, 8*width, H/16, W/16), the feature
    net of the ``tiny`` presets."""

    def __init__(self, width: int) -> None:
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        super().__init__(*backbones.conv_stages(chans))
        self.out_channels = chans[-1]


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """-sum p log p along ``dim`` (0 log 0 taken as 0)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=dim)
