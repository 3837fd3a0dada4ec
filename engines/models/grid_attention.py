"""Grid attention (Tomita et al., "Finding a Needle in the Haystack").

How the code maps to the paper
------------------------------
* Section 3.1, grid-based features. The view is cut into a grid of non-overlapping tiles; every
  tile is read at ``tile_px`` x ``tile_px`` pixels and turned into one N-d feature vector by a CNN
  trunk whose classifier is removed and whose global average pool is kept (that pool is what
  gives one vector per tile). The vectors form the feature grid ``U`` of shape N x H' x W'.
  The paper's "3D convolutions of shape 1 x 3 x 3" over a T x (H'W') x 3 x h x w tensor are just
  the 2D trunk applied to a batch of tiles, which is what we do, ``batch_size`` tiles at a time.
* Section 3.2, attention. A 3D filter of size N x d x d slid over the (N, H', W') volume with
  zero padding (0, 1, 1) has exactly one valid depth position, so it gives one H' x W' map per
  filter: m such filters are precisely ``Conv2d(N, m, 3, padding=1)`` over the feature grid
  seen as an N-channel image. Each of the m raw maps goes through a softmax over all grid cells
  (eq. 1); each map weights ``U`` into one N-d vector (eq. 2); the m vectors are concatenated,
  passed through dropout (p = 0.5) and a fully connected layer. Loss: cross-entropy only
  (``sharpen_weight`` can add the maps' entropy; 0 by default, as in the paper).
* Section 4.3. ``paper`` preset: ResNet-18 trunk, 492 px tiles at 20x resized to 224 px,
  m = 64 filters, dropout 0.5, every residual block but the last frozen, Adam (the base class's
  optimiser). He init for convolutions, unit/zero BatchNorm, Glorot for the classifier. Training
  draws a random scale factor in [0.8, 1.2] for the tile size (the paper's random scaling);
  rotations come from the trainer's view orientation.

Departures, and why
-------------------
* Backbone: torchvision's ResNet-18 (post-activation), not the pre-activation variant, because
  torchvision ships only the former and the ImageNet weights a user has match it. The ``tiny``
  preset uses a four-stage CNN of 3x3 stride-2 convolutions with GroupNorm (64-d features, 64 px
  tiles) so that it trains on a laptop CPU; it is trained from scratch, so its early stages are
  not frozen.
* Normalisation: ImageNet mean and std instead of statistics over the training tissue.
* Grid: the paper floors H/h and W/w and drops the margins. We use round() and stretch the cells
  to fill the view exactly, so no tissue is dropped, nothing is read outside the view and even a
  16 x 16 slide gives one cell. Once the view spans a tile, each cell side lies within 0.75x
  to 1.5x of the tile size (near 1x on large grids); cells are resized to the square tile_px.
* Background: tiles whose thumbnail pixels are less than ``min_tissue`` tissue (by
  ``engines.sampling.tissue_mask``) are skipped when ``skip_background`` is set: their feature
  vector is zero (they still take part in their neighbours' 3x3 windows) and their attention
  logits are masked out of the softmax, so they get weight exactly 0. If no tile has tissue,
  all tiles are used. The paper removed background by cropping tissue beforehand.
* Memory: the paper kept the whole slide's activations on the GPU. Here the forward pass runs
  the trunk batch by batch without storing activations; in training a custom autograd function
  re-reads and recomputes each batch in the backward pass and pushes the feature-grid gradient
  through it (``stream_backward``), so memory stays bounded by one batch plus the feature grid.
  The recompute restores BatchNorm running statistics so that they are updated once per step.

Trace: one ``Field`` for the view, one ``Field`` (kind "tile", score = tissue fraction) per
processed tile when there are at most ``max_tile_fields`` of them, ``Progress`` after every
batch ("tile 120 / 480"), then one ``AttentionMap`` per filter ("filter 7", group "filter")
whose cells are exactly the tiles' level-0 rectangles and whose values are the softmax weights.
``tiles_processed`` and ``last_grid`` describe the last run (for throughput benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engines.models import backbones
from engines.grid import Grid, make_grid
from engines.models.blocks import entropy
from engines.models.base import Emit, SlideModel, StepOutput
from engines.sampling import SlideView, tissue_mask
from engines.trace import AttentionMap, Field, Progress, Rect

BACKBONES = ("resnet18", "small")


@dataclass(frozen=True)
class GridAttentionConfig:
    backbone: str = "resnet18"  # "resnet18" (torchvision) or "small" (four-stage CNN)
    backbone_weights: str | None = None  # local ImageNet weights file for resnet18
    tile_size: float = 492.0  # tile side in pixels at ``magnification`` (level-0 when None)
    magnification: float | None = 20.0  # objective power tile_size refers to
    tile_px: int = 224  # side the tile is resized to for the trunk
    batch_size: int = 16  # tiles per trunk batch
    filters: int = 64  # m attention filters
    kernel: int = 3  # d: attention filter height and width
    dropout: float = 0.5
    freeze_early: bool = True  # freeze every trunk stage but the last
    skip_background: bool = True
    min_tissue: float = 0.05  # tissue fraction below which a tile is background
    scale_jitter: float = 0.2  # training tile size factor drawn from [1 - j, 1 + j]
    stream_backward: bool = True  # recompute tiles in backward instead of keeping activations
    max_tiles: int = 250_000  # refuse grids larger than this (bounded feature-grid memory)
    max_tile_fields: int = 2000  # emit tile Fields only up to this many tiles
    small_width: int = 64  # feature size of the "small" backbone
    # Weight of the mean normalised entropy of the m maps added to the loss (0: the paper's
    # CE only). A positive weight sharpens the maps, for needles of one or two tiles.
    sharpen_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"grid_attention: unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        for name in ("tile_px", "batch_size", "filters", "kernel", "max_tiles"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"grid_attention: {name} must be at least 1, got {getattr(self, name)}")
        if self.kernel % 2 == 0:
            raise ValueError(f"grid_attention: kernel must be odd so maps keep the grid's shape, got {self.kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"grid_attention: dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.scale_jitter < 1.0:
            raise ValueError(f"grid_attention: scale_jitter must be in [0, 1), got {self.scale_jitter}")
        if not self.sharpen_weight >= 0.0:
            raise ValueError(f"grid_attention: sharpen_weight must not be negative, got {self.sharpen_weight}")


PRESETS = {
    "tiny": GridAttentionConfig(
        backbone="small", tile_size=256.0, magnification=None, tile_px=64, batch_size=64,
        filters=8, freeze_early=False, small_width=64,
    ),
    "paper": GridAttentionConfig(),
}


def tissue_fractions(view: SlideView, grid: Grid) -> np.ndarray:
    """Per-tile fraction of tissue pixels, (rows * cols,), from one thumbnail of the view."""
    side = int(min(2048, max(64, 8 * max(grid.rows, grid.cols))))
    thumb = view.thumbnail(side)
    mask = tissue_mask(thumb)
    th, tw = mask.shape
    # Summed-area table: each tile's count in O(1), whatever the grid size.
    sat = np.zeros((th + 1, tw + 1), np.int64)
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    ys = np.linspace(0, th, grid.rows + 1)
    xs = np.linspace(0, tw, grid.cols + 1)
    y0 = np.floor(ys[:-1]).astype(int)
    y1 = np.maximum(np.ceil(ys[1:]).astype(int), y0 + 1).clip(max=th)
    x0 = np.floor(xs[:-1]).astype(int)
    x1 = np.maximum(np.ceil(xs[1:]).astype(int), x0 + 1).clip(max=tw)
    y0 = np.minimum(y0, y1 - 1)
    x0 = np.minimum(x0, x1 - 1)
    total = (sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]).astype(np.float64)
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return (total / area).reshape(-1)


def normalised_entropy(alpha: torch.Tensor, cells: int) -> torch.Tensor:
    """Mean entropy of the rows of ``alpha`` (maps over ``cells`` unmasked cells) divided by
    log(cells): 1 for a flat map, 0 for a map on one cell."""
    if cells < 2:
        return alpha.new_zeros(())
    return entropy(alpha, dim=1).mean() / float(np.log(cells))


# ---------------------------------------------------------------------------------------
# Trunks: (B, 3, tile_px, tile_px) -> (B, N); ``stem`` is what freezing keeps fixed.
# ---------------------------------------------------------------------------------------
class Trunk(nn.Module):
    def __init__(self, stem: nn.Module, tail: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.stem = stem
        self.tail = tail
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.stem(x)).mean(dim=(2, 3))


def _small_trunk(width: int) -> Trunk:
    def stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(*backbones.conv_stages([cin, cout]))

    w = max(4, int(width))
    stem = nn.Sequential(stage(3, w // 4), stage(w // 4, w // 2))
    tail = nn.Sequential(stage(w // 2, w), stage(w, w))
    return Trunk(stem, tail, w)


def _resnet18_trunk() -> tuple[Trunk, nn.Module]:
    seq, net = backbones.resnet_trunk("resnet18")
    return Trunk(nn.Sequential(*list(seq)[:-1]), seq[-1], 512), net


def _he_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------
# Feature grid with bounded memory
# ---------------------------------------------------------------------------------------
class _TileFeatures:
    """Reads tiles of one view and runs them through the trunk, batch by batch."""

    def __init__(self, model: "GridAttention", view: SlideView, grid: Grid,
                 indices: Sequence[int]) -> None:
        self.model = model
        self.view = view
        self.grid = grid
        self.indices = list(indices)
        bs = max(1, int(model.config.batch_size))
        self.batches = [self.indices[i:i + bs] for i in range(0, len(self.indices), bs)]

    def batch(self, idx: Sequence[int]) -> torch.Tensor:
        cfg = self.model.config
        x = self.view.read_tensor([self.grid.rect(i) for i in idx], cfg.tile_px, cfg.tile_px)
        x = backbones.normalise(x.to(self.model.device))
        trunk = self.model.trunk
        stem_grad = torch.is_grad_enabled() and any(p.requires_grad for p in trunk.stem.parameters())
        with torch.set_grad_enabled(stem_grad):
            h = trunk.stem(x)
        return trunk.tail(h).mean(dim=(2, 3))

    def grid_tensor(self, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """(N, rows * cols) features without keeping activations; zeros where skipped."""
        n = self.model.trunk.out_dim
        out = torch.zeros(self.grid.count, n, device=self.model.device)
        done = 0
        with torch.no_grad():
            for idx in self.batches:
                out[idx] = self.batch(idx)
                done += len(idx)
                self.model.tiles_processed += len(idx)
                if on_batch is not None:
                    on_batch(done)
        return out.t()

    def backward(self, grad: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
        """Gradients of ``params`` given the gradient of ``grid_tensor()``, one batch at a time."""
        grads: list[torch.Tensor | None] = [None] * len(params)
        g = grad.t()
        with _frozen_bn_stats(self.model.trunk), torch.enable_grad():
            for idx in self.batches:
                feats = self.batch(idx)
                parts = torch.autograd.grad(feats, params, g[idx], allow_unused=True)
                for k, part in enumerate(parts):
                    if part is not None:
                        grads[k] = part if grads[k] is None else grads[k] + part
        return grads


class _StreamedGrid(torch.autograd.Function):
    """The feature grid as a differentiable function of the trunk parameters whose backward
    pass recomputes each tile batch instead of storing the slide's activations."""

    @staticmethod
    def forward(ctx, tiles: _TileFeatures, *params: torch.Tensor) -> torch.Tensor:
        ctx.tiles = tiles
        ctx.params = params
        return tiles.grid_tensor()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = ctx.tiles.backward(grad, list(ctx.params))
        return (None, *grads)


class _frozen_bn_stats:
    """Keeps BatchNorm running statistics unchanged across a recompute pass."""

    def __init__(self, module: nn.Module) -> None:
        self.bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[tuple[torch.Tensor, ...]] = []

    def __enter__(self) -> None:
        self.saved = [tuple(b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                            if b is not None) for m in self.bns]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for m, saved in zip(self.bns, self.saved):
                bufs = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
                for b, s in zip(bufs, saved):
                    b.copy_(s)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------
class GridAttention(SlideModel):
    name = "grid_attention"

    def __init__(self, config: GridAttentionConfig, classes: list[str] | None = None) -> None:
        super().__init__(config, classes)
        if config.backbone == "small":
            self.trunk = _small_trunk(config.small_width)
            _he_init(self.trunk)
        else:
            self.trunk, net = _resnet18_trunk()
            self.pretrained("resnet18", net, config.backbone_weights)
        n = self.trunk.out_dim
        # The paper's N x d x d 3D filters with padding (0, 1, 1) over the (N, H', W') volume.
        self.attention = nn.Conv2d(n, config.filters, config.kernel, padding=config.kernel // 2)
        nn.init.kaiming_normal_(self.attention.weight, nonlinearity="relu")  # He, as the paper
        nn.init.zeros_(self.attention.bias)
        self.drop = nn.Dropout(config.dropout)
        self.fc = nn.Linear(config.filters * n, self.num_classes)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        if config.freeze_early:
            for p in self.trunk.stem.parameters():
                p.requires_grad_(False)
        self.tiles_processed = 0
        self.last_grid: Grid | None = None

    def train(self, mode: bool = True) -> "GridAttention":
        super().train(mode)
        if mode:
            self._fix_frozen_statistics()
        return self

    def _fix_frozen_statistics(self) -> None:
        # A frozen trunk part is a fixed feature extractor: its BatchNorm statistics stay too.
        # Checked again at every step because a fine-tune may freeze parameters after train().
        for part in (self.trunk.stem, self.trunk.tail):
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    # -- geometry ----------------------------------------------------------------------------
    def tile_side(self, view: SlideView) -> float:
        """Tile side in level-0 (view) pixels."""
        cfg = self.config
        if cfg.magnification:
            base = view.magnification_of(1.0, 1)
            if base:
                return float(cfg.tile_size) * base / float(cfg.magnification)
        return float(cfg.tile_size)

    def plan(self, view: SlideView, scale: float = 1.0) -> tuple[Grid, np.ndarray, list[int]]:
        """The grid, each tile's tissue fraction and the indices of the tiles to process."""
        grid = make_grid(view.bounds, self.tile_side(view) * scale)
        if grid.count > self.config.max_tiles:
            raise ValueError(
                f"this view needs {grid.rows} x {grid.cols} = {grid.count} tiles, more than "
                f"max_tiles={self.config.max_tiles}; choose a region or a larger tile size")
        frac = tissue_fractions(view, grid)
        keep = list(range(grid.count))
        if self.config.skip_background:
            tissue = [i for i in keep if frac[i] >= self.config.min_tissue]
            keep = tissue or keep
        return grid, frac, keep

    # -- forward -----------------------------------------------------------------------------
    def feature_grid(self, tiles: _TileFeatures,
                     on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """U as (N, rows, cols); differentiable w.r.t. trainable trunk parameters when grad
        is enabled."""
        g = tiles.grid
        params = [p for p in self.trunk.parameters() if p.requires_grad]
        if not (torch.is_grad_enabled() and params):
            u = tiles.grid_tensor(on_batch)
        elif self.config.stream_backward:
            u = _StreamedGrid.apply(tiles, *params)
        else:
            n = self.trunk.out_dim
            u = torch.zeros(g.count, n, device=self.device)
            for idx in tiles.batches:
                u = u.index_copy(0, torch.tensor(idx, device=self.device), tiles.batch(idx))
                self.tiles_processed += len(idx)
            u = u.t()
        return u.reshape(self.trunk.out_dim, g.rows, g.cols)

    def head(self, u: torch.Tensor, keep: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide logits (C,) and attention weights (m, rows, cols) from the feature grid."""
        n, rows, cols = u.shape
        v = self.attention(u[None])[0].reshape(self.config.filters, rows * cols)
        mask = torch.zeros(rows * cols, dtype=torch.bool, device=u.device)
        mask[list(keep)] = True
        v = v.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(v, dim=1)  # eq. 1, per filter over the grid
        z = alpha @ u.reshape(n, rows * cols).t()  # eq. 2: (m, N)
        logits = self.fc(self.drop(z.reshape(-1)))
        return logits, alpha.reshape(self.config.filters, rows, cols)

    # -- training ----------------------------------------------------------------------------
    def training_step(self, view: SlideView, label: int, epoch: int = 0) -> StepOutput:
        self.check_label(label)
        if self.training:
            self._fix_frozen_statistics()
        j = float(self.config.scale_jitter)
        # A Python number from the CPU generator, wherever the model runs.
        scale = 1.0 + j * (2.0 * float(torch.rand((), device="cpu")) - 1.0) if j > 0 else 1.0
        grid, _, keep = self.plan(view, scale)
        self.last_grid = grid
        self.tiles_processed = 0
        u = self.feature_grid(_TileFeatures(self, view, grid, keep))
        logits, alpha = self.head(u, keep)
        ce = F.cross_entropy(logits[None], torch.tensor([int(label)], device=logits.device))
        parts = {"ce": float(ce.detach())}
        loss = ce
        if self.config.sharpen_weight > 0:
            h = normalised_entropy(alpha.reshape(self.config.filters, -1), len(keep))
            loss = ce + self.config.sharpen_weight * h
            parts.update(loss=float(loss.detach()), entropy=float(h.detach()))
        return StepOutput(loss, logits, parts)

    # -- inference ---------------------------------------------------------------------------
    def explain(self, view: SlideView, emit: Emit) -> list[float]:
        cfg = self.config
        emit(Field(id=0, parent=None, depth=0, rect=view.bounds, score=1.0, kind="view"))
        emit(Progress(0, 1, "finding tissue"))
        with torch.no_grad():
            grid, frac, keep = self.plan(view)
            self.last_grid = grid
            self.tiles_processed = 0
            total = len(keep)
            mag = view.magnification_of(grid.cell[0], cfg.tile_px)
            emit(Progress(0, total, f"tile 0 / {total}"))
            tiles = _TileFeatures(self, view, grid, keep)
            with_fields = total <= cfg.max_tile_fields
            sent = 0

            def on_batch(done: int) -> None:
                nonlocal sent
                if with_fields:
                    for i in keep[sent:done]:
                        emit(Field(id=i + 1, parent=0, depth=1, rect=grid.rect(i),
                                   score=float(frac[i]), kind="tile", magnification=mag))
                sent = done
                emit(Progress(done, total, f"tile {done} / {total}"))

            u = self.feature_grid(tiles, on_batch)
            logits, alpha = self.head(u, keep)
            probs = torch.softmax(logits, 0)
            for k in range(cfg.filters):
                emit(AttentionMap(name=f"filter {k}", group="filter", magnification=mag,
                                  origin=grid.origin, cell=grid.cell,
                                  values=alpha[k].double().cpu().tolist()))
            emit(Progress(total, total, "attention maps"))
        return [float(p) for p in probs]


MODEL = GridAttention
