"""Building blocks several models share: the small CNN of the ``tiny`` presets and the
entropy of an attention distribution (the tile grid is ``engines.grid``). Each lives here once."""
from __future__ import annotations

import torch
from torch import nn

from engines.models import backbones


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
