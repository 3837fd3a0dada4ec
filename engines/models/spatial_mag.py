"""Joint spatial and magnification attention sampling (Zhang et al., "A Joint Spatial and
Magnification Based Attention Framework for Large Scale Histopathology Classification").

How the code maps to the paper:

* X^0, the thumbnail: the whole view resized to ``thumb_size`` (299x224 in the paper's BACH
  set-up), read in bounded pieces so a huge single-level image never costs memory
  proportional to its area.
* h: a CNN on the thumbnail (Inception V3 up to Mixed_7c in the ``paper`` preset).
* A: one adaptive average pool + one 1x1 convolution per magnification, giving m maps whose
  (rows, cols) are ``grids`` (2x2, 3x4 and 6x7 for the paper's 2x2, 4x3 and 7x6 written as
  width x height). Cell (r, c) of map j is the level-0 rectangle of the view split into
  rows_j x cols_j; a finer grid means smaller cells read at the same patch size, i.e. a higher
  magnification. All cells of all maps form one distribution P (sum_{i,j} P_i^j = 1).
* Sampling: k patches (i_s, j_s) drawn from P (Gumbel-top-k without replacement by default,
  ``replace=True`` for iid draws), each read from the slide as the level-0 rectangle of its
  cell resampled to ``patch_size`` x ``patch_size``.
* f: a second CNN of the same kind on the patches, globally average pooled.
* Aggregation (Eq. 2): the attention-sampling expectation estimator of
  ``engines.attention_sampling``, whose value and gradients are unbiased for sum P f(x).
* g: dropout + a fully connected layer. Loss (Eq. 5): cross entropy + alpha * sum P log P
  with alpha = 0.01 (Eq. 3-4), and attention dropout (Sec. 3.3) before sampling in training.
* Adam (the base class's optimiser), as in the paper.

Departures, and why:

* The paper turns the logits into probabilities with "a sigmoid"; a sigmoid alone does not
  make sum_{i,j} P_i^j = 1, which Sec. 3.2 requires, so the logits of every cell of every map
  go through one joint softmax.
* The paper does not give the attention-dropout rate nor the classifier dropout; both are
  settings (0.1 and 0.5 by default). Dropped cells are renormalised so that sampling and the
  estimator see a proper distribution; the entropy term uses the undropped P.
* Grids and thumbnail are given for landscape images; for a portrait view both are
  transposed, so cells stay close to square. Cells need not be square: a cell is stretched to
  the square patch, and its magnification is computed from its width.
* Views of any size are accepted: the grid always splits the whole view, so on a whole slide
  the "magnifications" are those the grid implies (the paper used 2048x1536 images).
* Inception V3 is built with PyTorch's default initialisation instead of torchvision's slow
  truncated-normal one; it only matters when no ImageNet weights are given.
* ``tiny`` replaces both Inception networks by a four-layer stride-16 CNN with GroupNorm
  (``backbones.conv_stages``) so it trains on a laptop CPU; its 128x96 thumbnail yields the
  same 8x6 feature grid as the paper's h.

Trace (``explain``): the view (id 0); one AttentionMap per magnification (group
"magnification", cells exactly on the view's level-0 rectangle); one Field per sampled patch
(kind "patch", parent 0, depth 1 + magnification index, score = its attention); a TrailStep
after each patch with the prediction from the patches so far. Geometry is in view
coordinates, which are level-0 slide pixels for the identity orientation inference uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engines import attention_sampling as ats
from engines.models import backbones
from engines.models.blocks import SmallCNN, entropy
from engines.models.base import Emit, SlideModel, StepOutput
from engines.sampling import SlideView, images_to_tensor
from engines.trace import AttentionMap, Field, Progress, TrailStep

Rect = tuple[float, float, float, float]

BACKBONES = ("small", "resnet18", "resnet34", "resnet50", "inception_v3")
MIN_INPUT = {"small": 16, "resnet18": 32, "resnet34": 32, "resnet50": 32, "inception_v3": 75}
# Largest source area (pixels at the chosen pyramid level) read in one piece.
MAX_READ_PIXELS = 4096 * 4096


INFERENCE_OPTIONS = ("k",)  # patches sampled per slide; not the weights

@dataclass(frozen=True)
class SpatialMagConfig:
    backbone: str = "inception_v3"  # h and f (two separate networks)
    backbone_weights: str | None = None  # local ImageNet weights file for both
    thumb_size: tuple[int, int] = (299, 224)  # (width, height) of X^0, landscape
    grids: tuple[tuple[int, int], ...] = ((2, 2), (3, 4), (6, 7))  # (rows, cols), coarse to fine
    patch_size: int = 299
    k: int = 5  # patches sampled per slide
    replace: bool = False  # iid draws instead of Gumbel-top-k
    entropy_weight: float = 0.01  # alpha
    attention_dropout: float = 0.1
    classifier_dropout: float = 0.5
    small_width: int = 16  # channels of the first layer of the "small" CNN

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"spatial_mag: backbone must be one of {', '.join(BACKBONES)}, not {self.backbone!r}")
        low = MIN_INPUT[self.backbone]
        tw, th = self.thumb_size
        if min(tw, th, self.patch_size) < low:
            raise ValueError(
                f"spatial_mag: thumb_size and patch_size must be at least {low} pixels for {self.backbone}"
            )
        if not self.grids or any(r < 1 or c < 1 for r, c in self.grids):
            raise ValueError("spatial_mag: grids must list at least one (rows, cols) with positive sizes")
        if self.k < 1:
            raise ValueError("spatial_mag: k (patches per slide) must be at least 1")
        if not 0.0 <= self.attention_dropout < 1.0 or not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError("spatial_mag: dropout rates must lie in [0, 1)")
        if self.entropy_weight < 0:
            raise ValueError("spatial_mag: entropy_weight must not be negative")
        if self.small_width < 1:
            raise ValueError("spatial_mag: small_width must be positive")


PRESETS = {
    "tiny": SpatialMagConfig(backbone="small", thumb_size=(128, 96), patch_size=64, k=4),
    "paper": SpatialMagConfig(),
}


# ---------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------
class FeatureMaps(nn.Module):
    """A backbone trunk giving spatial feature maps, with its own input normalisation."""

    def __init__(self, arch: str, small_width: int) -> None:
        super().__init__()
        self.arch = arch
        self.source: nn.Module | None = None  # the torchvision network the trunk shares layers with
        if arch == "small":
            self.trunk: nn.Module = SmallCNN(small_width)
            self.out_channels = self.trunk.out_channels
        elif arch == "inception_v3":
            net = backbones.build("inception_v3", init_weights=False)
            skip = {"avgpool", "dropout", "fc", "AuxLogits"}
            self.trunk = nn.Sequential(*[m for n, m in net.named_children() if n not in skip])
            self.out_channels = 2048
            object.__setattr__(self, "source", net)  # not a submodule: its layers are the trunk's
        else:
            self.trunk, net = backbones.resnet_trunk(arch)
            self.out_channels = 2048 if arch == "resnet50" else 512
            object.__setattr__(self, "source", net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inception's ImageNet weights expect [-1, 1] inputs; the others ImageNet statistics.
        x = x * 2.0 - 1.0 if self.arch == "inception_v3" else backbones.normalise(x)
        return self.trunk(x)


class MagnificationAttention(nn.Module):
    """A: per magnification an adaptive average pool to (rows, cols) and a 1x1 conv to one
    logit per cell. Returns the logits of all cells of all maps, row-major, map after map."""

    def __init__(self, channels: int, n_maps: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(channels, 1, 1) for _ in range(n_maps))

    def forward(self, feats: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        out = [head(F.adaptive_avg_pool2d(feats, g)).flatten() for head, g in zip(self.heads, grids)]
        return torch.cat(out)


@dataclass(frozen=True)
class _Cell:
    index: int  # position in the joint distribution
    mag: int  # magnification index (0: coarsest grid)
    rect: Rect


class _Layout:
    """The grids laid on one view: cell rectangles, per-map shapes and magnifications."""

    def __init__(self, view: SlideView, cfg: SpatialMagConfig) -> None:
        x, y, w, h = view.bounds
        tw, th = cfg.thumb_size
        grids = [tuple(g) for g in cfg.grids]
        if (h > w) != (th > tw) and h != w:  # portrait view, landscape set-up: transpose
            tw, th = th, tw
            grids = [(c, r) for r, c in grids]
        self.bounds: Rect = (x, y, w, h)
        self.thumb = (tw, th)
        self.grids: list[tuple[int, int]] = grids
        self.cells: list[_Cell] = []
        self.mags: list[float | None] = []
        for j, (rows, cols) in enumerate(grids):
            cw, ch = w / cols, h / rows
            self.mags.append(view.magnification_of(cw, cfg.patch_size))
            for r in range(rows):
                for c in range(cols):
                    self.cells.append(_Cell(len(self.cells), j, (x + c * cw, y + r * ch, cw, ch)))

    def split(self, values: list[float]) -> list[list[list[float]]]:
        """Flat per-cell values into one rows x cols list per map."""
        out, start = [], 0
        for rows, cols in self.grids:
            flat = values[start : start + rows * cols]
            out.append([flat[r * cols : (r + 1) * cols] for r in range(rows)])
            start += rows * cols
        return out


def read_bounded(view: SlideView, rect: Rect, out_w: int, out_h: int) -> np.ndarray:
    """``view.read`` in pieces small enough that no single read holds more than
    MAX_READ_PIXELS source pixels (a single-level giant image would otherwise be decoded
    whole for a thumbnail). Pieces sit on output-pixel boundaries, so they tile exactly."""
    view.check_budget(rect, out_w, out_h)  # the pieces together, not each one
    x, y, w, h = rect
    slide = view.slide
    ds = max(min(w / out_w, h / out_h), 1e-9)
    level_ds = slide.levels[slide.read_level_for(ds)].downsample
    source = (w / level_ds) * (h / level_ds)
    n = min(math.ceil(math.sqrt(source / MAX_READ_PIXELS)), out_w, out_h)
    if n <= 1:
        return view.read(rect, out_w, out_h)
    xs = [round(i * out_w / n) for i in range(n + 1)]
    ys = [round(i * out_h / n) for i in range(n + 1)]
    sx, sy = w / out_w, h / out_h
    out = np.empty((out_h, out_w, 3), np.uint8)
    for r in range(n):
        for c in range(n):
            pw, ph = xs[c + 1] - xs[c], ys[r + 1] - ys[r]
            piece = (x + xs[c] * sx, y + ys[r] * sy, pw * sx, ph * sy)
            out[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = view.read(piece, pw, ph)
    return out


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------
class SpatialMagNet(SlideModel):
    name = "spatial_mag"

    def __init__(self, config: SpatialMagConfig, classes: list[str] | None = None) -> None:
        super().__init__(config, classes)
        cfg = config
        if self.num_classes < 2:
            raise ValueError("spatial_mag: needs at least two classes")
        self.h = FeatureMaps(cfg.backbone, cfg.small_width)
        self.f = FeatureMaps(cfg.backbone, cfg.small_width)
        for maps in (self.h, self.f):
            if maps.source is not None:
                self.pretrained(cfg.backbone, maps.source, cfg.backbone_weights)
                object.__setattr__(maps, "source", None)  # the note keeps it until loaded
        self.attention = MagnificationAttention(self.h.out_channels, len(cfg.grids))
        self.classifier = nn.Sequential(
            nn.Dropout(cfg.classifier_dropout), nn.Linear(self.f.out_channels, self.num_classes)
        )

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.h.parameters()) + list(self.f.parameters())

    # -- pieces --------------------------------------------------------------------------
    def attend(self, view: SlideView) -> tuple[_Layout, torch.Tensor]:
        """The layout of the grids on ``view`` and the joint attention P over all cells."""
        layout = _Layout(view, self.config)
        tw, th = layout.thumb
        thumb = images_to_tensor([read_bounded(view, layout.bounds, tw, th)]).to(self.device)
        logits = self.attention(self.h(thumb), layout.grids)
        return layout, torch.softmax(logits, 0)

    def patch_features(self, view: SlideView, rects: list[Rect]) -> torch.Tensor:
        """(n, D): f on the cells read at the patch size, globally average pooled."""
        ps = self.config.patch_size
        x = images_to_tensor([read_bounded(view, r, ps, ps) for r in rects]).to(self.device)
        return self.f(x).mean(dim=(2, 3))

    def _sample(self, p: torch.Tensor) -> torch.Tensor:
        if self.config.replace:
            return ats.sample_with_replacement(p, self.config.k)
        return ats.sample_without_replacement(p, self.config.k)

    def _estimate(self, p: torch.Tensor, idx: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        if self.config.replace:
            return ats.expectation_with_replacement(p, idx, feats)
        return ats.expectation_without_replacement(p, idx, feats)

    def _drop(self, p: torch.Tensor) -> torch.Tensor:
        """Attention dropout: zero a random share of the cells and renormalise."""
        rate = self.config.attention_dropout
        if rate <= 0:
            return p
        keep = torch.rand(p.shape, device=p.device) >= rate
        if not bool(keep.any()):
            return p
        kept = p * keep
        return kept / kept.sum()

    # -- training ------------------------------------------------------------------------
    def training_step(self, view: SlideView, label: int, epoch: int = 0) -> StepOutput:
        self.check_label(label)
        layout, p = self.attend(view)
        q = self._drop(p) if self.training else p
        idx = self._sample(q)
        # Each distinct cell is read and embedded once, even when drawn twice.
        unique, inverse = torch.unique(idx, return_inverse=True)
        feats = self.patch_features(view, [layout.cells[int(i)].rect for i in unique])[inverse]
        logits = self.classifier(self._estimate(q, idx, feats))
        ce = F.cross_entropy(logits[None], torch.tensor([int(label)], device=logits.device))
        reg = -entropy(p)  # R = sum P log P: minimising it spreads the attention
        loss = ce + self.config.entropy_weight * reg
        parts = {"loss": float(loss.detach()), "ce": float(ce.detach()), "entropy": float(reg.detach())}
        for j, share in enumerate(self._shares(layout, p)):
            parts[f"attention_mag{j + 1}"] = share
        return StepOutput(loss=loss, logits=logits, parts=parts)

    @staticmethod
    def _shares(layout: _Layout, p: torch.Tensor) -> list[float]:
        """Attention mass per magnification (the paper's Tables 3 and 4)."""
        sizes = [r * c for r, c in layout.grids]
        return [float(s.sum()) for s in torch.split(p.detach(), sizes)]

    # -- inference -----------------------------------------------------------------------
    def explain(self, view: SlideView, emit: Emit) -> list[float]:
        cfg = self.config
        total = cfg.k + 1
        with torch.no_grad():
            bounds = tuple(map(float, view.bounds))
            emit(Field(id=0, parent=None, depth=0, rect=bounds, score=1.0, kind="view"))
            emit(Progress(0, total, stage="thumbnail and attention"))
            layout, p = self.attend(view)
            x, y, w, h = layout.bounds
            values = p.detach().cpu().tolist()
            for j, ((rows, cols), grid) in enumerate(zip(layout.grids, layout.split(values))):
                mag = layout.mags[j]
                label = f"{mag:.3g}x" if mag is not None else f"{rows}x{cols} grid"
                emit(AttentionMap(name=f"attention at {label}", group="magnification",
                                  magnification=mag, origin=(x, y), cell=(w / cols, h / rows),
                                  values=grid))
            idx = self._sample(p)
            cells = [layout.cells[int(i)] for i in idx]
            for s, cell in enumerate(cells):
                emit(Field(id=s + 1, parent=0, depth=1 + cell.mag, rect=cell.rect,
                           score=values[cell.index], kind="patch",
                           magnification=layout.mags[cell.mag]))
            feats: list[torch.Tensor] = []
            seen: dict[int, torch.Tensor] = {}
            probs: list[float] = []
            for s, cell in enumerate(cells):
                emit(Progress(1 + s, total, stage=f"patch {s + 1} / {len(cells)}"))
                if cell.index not in seen:
                    seen[cell.index] = self.patch_features(view, [cell.rect])[0]
                feats.append(seen[cell.index])
                est = self._estimate(p, idx[: s + 1], torch.stack(feats))
                probs = torch.softmax(self.classifier(est), 0).cpu().tolist()
                emit(TrailStep(index=s, field_id=s + 1, probs=probs))
            emit(Progress(total, total, stage="done"))
        return probs


MODEL = SpatialMagNet
