"""Zoom-In network (Kong & Henao, CVPR 2022): two-stage hierarchical attention sampling.

How the code maps to the paper
* Stage 1 (eq. 1): the attention net ``a`` (conv 3->8->8->1, 3x3, the reference sizes) runs on
  the view read at scale ``s1``; its per-pixel logits are averaged over each tile's pixels, so
  there is one score per tile, and a softmax over tiles gives alpha. ``n_samples`` tiles are
  drawn *with* replacement from alpha.
* Stage 2 (eq. 4): each drawn tile is read at scale ``s2``; the attention net ``b`` (same stack)
  gives a softmax over the tile's positions (beta). A tile drawn m times yields m sub-tiles drawn
  *without* replacement (Gumbel-top-m). Each position owns a sub-tile of ``subtile_size``
  level-0 pixels around it (see below), read at ``subtile_pixels``.
* Inference draws (``draws``): "random" draws as training does; "reference" follows the
  authors' evaluation code (``reference_tile_weights`` for the tiles, the top-k sub-tiles of
  each drawn tile), which puts the draws on the highest-attention regions.
* Features: LeNet-like conv(3->36,5) pool conv(36->48,5) pool, global average, L2-normalised
  48-d (``feature_channels`` sets the two widths); classifier: one linear layer.
* Aggregation (eqs. 5-9, ``engines.attention_sampling``): inside a tile the estimator without
  replacement uses the *exclusive* cumulative sum of the sampled betas; across tiles the
  estimator with replacement averages the per-draw tile estimates. Both give the attention
  the unbiased gradient of attention sampling, so the two-stage estimate and its gradients
  are unbiased for eq. (5).
* Losses: cross-entropy - ``entropy_weight`` (1e-5, paper) x entropy of alpha and of every
  computed beta (the attention-sampling entropy regulariser with the reference code's sign:
  spread-out attention lowers the loss, so sampling keeps exploring) + the in-sample contrastive term (sec. 2.3): on positive slides (class 1), after
  ``contrastive_warmup`` epochs (10 in the paper), tiles are drawn from 1 - alpha and sub-tiles
  from 1 - beta (each renormalised) and the prediction is pushed to class 0 (-log(1 - p)),
  with the same entropy term on that pass. As in the reference code, the contrastive
  estimators are weighted by alpha and beta themselves, not by the complements the draws came
  from (``contrastive_weighting="attention"``): the gradient of pushing a low-attention draw
  towards class 0 then flows into the attention of the regions drawn (scaled by 1 / alpha,
  1 / beta), not into the complement. The ``tiny`` preset weights them by the complements,
  without the second entropy term: its demo recipe did better so (see ``PRESETS``).

Trace: the stage-1 map (alpha over the tile grid, group "stage 1"), then per drawn tile a
"tile" field (score alpha_c), its stage-2 map (beta laid exactly over the tile, group
"stage 2"), its "subtile" fields (score alpha_c * beta_c', the attention relative to the
whole view) and a TrailStep with the prediction from the draws processed so far.

Where it departs, and why
* Tiles are the cells of a grid laid exactly over the view (the tile side ``tile_size`` is
  stretched a little so a whole number of tiles covers the view) instead of tiles centred on
  every low-resolution pixel with zero padding: every tile then lies inside the slide and each
  stage-1 map cell is exactly the tile it scores. The paper does not give h1 for Camelyon16.
* Stage-2 positions map linearly onto sub-tile corners spread across the tile (the paper's
  location map, but without the zero padding around the tile), so sub-tiles nest in their
  tiles and each covers its own stage-2 cell; on slides smaller than a sub-tile, the sub-tile
  shrinks to the tile.
* Scales ``s1``/``s2`` are relative to level-0 pixels of the slide.
* Stage 1 is computed in bands of tile rows (with a 3-pixel halo for the three 3x3 convs), so
  memory stays bounded on gigapixel slides at inference; training keeps every band's graph, as
  the paper's O(s1^2 HW) stage-1 cost implies.
* Only the LeNet variant: the paper's "Zoom-In (Res)" ResNet16 variant is not built, so no
  pretrained backbone is used and the config has no ``backbone_weights``.
* Pixel-level annotation training (the paper's SM extension) is not implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engines.attention_sampling import (
    expectation_with_replacement,
    expectation_without_replacement,
    sample_with_replacement,
    sample_without_replacement,
)
from engines.models.base import Emit, SlideModel, StepOutput
from engines.grid import Grid, make_grid
from engines.models.blocks import entropy
from engines.sampling import SlideView
from engines.trace import AttentionMap, Field, Progress, TrailStep

Rect = tuple[float, float, float, float]
DRAWS = ("random", "reference")
CONTRASTIVE_WEIGHTINGS = ("attention", "complement")
INFERENCE_OPTIONS = ("draws", "n_samples")  # how a trained model samples; not its weights
REFERENCE_FLOOR_QUANTILE = 0.3  # the reference's inference drops tiles below this quantile
POSITIVE = 1  # the class whose slides get contrastive samples
REFERENCE = 0  # the label the contrastive samples are pushed towards


@dataclass(frozen=True)
class ZoomInConfig:
    s1: float = 1 / 32  # stage-1 view scale (level-0 = 1)
    s2: float = 1 / 8  # stage-2 tile scale
    tile_size: int = 256  # nominal tile side in level-0 pixels
    subtile_size: int = 64  # sub-tile side in level-0 pixels
    subtile_pixels: int = 32  # sub-tile side as fed to the feature net
    n_samples: int = 8  # N: tiles drawn with replacement (= sub-tiles used)
    attention_channels: int = 8
    # The paper's LeNet: two 5x5 convs, each followed by a 2x2 max pool.
    feature_channels: tuple[int, int] = (36, 48)
    contrastive_warmup: int = 10  # epochs before the contrastive term starts
    contrastive_weight: float = 1.0
    # What weights the contrastive pass's estimators: "attention" (the reference code: alpha and
    # beta, with the pass's own entropy term) or "complement" (the distributions the draws came
    # from, 1 - alpha and 1 - beta renormalised; the demo checkpoint's, see the tiny preset).
    contrastive_weighting: str = "attention"
    entropy_weight: float = 1e-5
    # How inference draws: "random" as in training (tiles from alpha, sub-tiles by
    # Gumbel-top-k), or "reference" as the authors' evaluation code: tiles drawn from alpha
    # rescaled to [0, 1] with its lowest 30 % set to zero, and each tile's top-k sub-tiles.
    draws: str = "random"
    stage1_band_pixels: int = 1 << 16  # bound on stage-1 pixels processed at once
    stage1_read_pixels: int = 1 << 19  # bound on slide pixels decoded per stage-1 band

    def __post_init__(self) -> None:
        if not (0 < self.s1 <= 1 and 0 < self.s2 <= 1):
            raise ValueError("zoom_in: s1 and s2 must lie in (0, 1]")
        if self.tile_size < 1 or self.subtile_size < 1:
            raise ValueError("zoom_in: tile_size and subtile_size must be positive")
        if self.subtile_pixels < 16:
            raise ValueError("zoom_in: subtile_pixels must be at least 16 (two 5x5 convs and pools)")
        if self.n_samples < 1:
            raise ValueError("zoom_in: n_samples must be at least 1")
        if len(self.feature_channels) != 2 or min(self.feature_channels) < 1:
            raise ValueError("zoom_in: feature_channels needs two positive widths")
        if self.contrastive_weighting not in CONTRASTIVE_WEIGHTINGS:
            raise ValueError(f"zoom_in: contrastive_weighting must be one of {', '.join(CONTRASTIVE_WEIGHTINGS)}, "
                             f"not {self.contrastive_weighting!r}")
        if self.draws not in DRAWS:
            raise ValueError(f"zoom_in: draws must be one of {', '.join(DRAWS)}, not {self.draws!r}")
        if self.stage1_band_pixels < 1 or self.stage1_read_pixels < 1:
            raise ValueError("zoom_in: stage1_band_pixels and stage1_read_pixels must be positive")

    @property
    def tile_pixels_1(self) -> int:
        return max(1, round(self.tile_size * self.s1))

    @property
    def tile_pixels_2(self) -> int:
        return max(1, round(self.tile_size * self.s2))


PRESETS = {
    # Trains on a 2-core CPU in minutes: ~100 tiles on the demo slide, 8 sub-tiles of 32 px.
    # Its contrastive estimators are weighted by the complements: retrained with the
    # reference's weighting (and its gradient clip of 5), the demo recipe scored AUROC 0.87
    # [0.79-0.93] on 96 unseen validation slides against 0.98 [0.93-1.00] (README).
    "tiny": ZoomInConfig(contrastive_weighting="complement"),
    # Camelyon16 settings of the paper: s1 = 1/32, s2 = 1/8, N = 100, h2 = w2 = 50 at full
    # resolution; tile side 512 (not given in the paper).
    "paper": ZoomInConfig(
        s1=1 / 32, s2=1 / 8, tile_size=512, subtile_size=50, subtile_pixels=50, n_samples=100
    ),
}


# ---------------------------------------------------------------------------------------
# Losses and the two-stage estimator
# ---------------------------------------------------------------------------------------
def two_stage_expectation(alpha: torch.Tensor, draws: torch.Tensor,
                          tile_estimates: dict[int, torch.Tensor]) -> torch.Tensor:
    """Eq. (9): the with-replacement estimator over the stage-1 ``draws``, each draw
    contributing its tile's within-tile estimate (from draws without replacement)."""
    feats = torch.stack([tile_estimates[int(d)] for d in draws])
    return expectation_with_replacement(alpha, draws, feats)


def reference_tile_weights(alpha: torch.Tensor) -> torch.Tensor:
    """The reference code's inference weights for stage 1: alpha shifted to 0 at its minimum
    and divided by its maximum, cells below its 30 % quantile set to 0, renormalised to sum 1."""
    w = (alpha - alpha.min()) / alpha.max().clamp_min(1e-12)
    floor = torch.quantile(w.double(), REFERENCE_FLOOR_QUANTILE, interpolation="lower").to(w.dtype)
    w = torch.where(w < floor, torch.zeros_like(w), w)
    total = w.sum()
    if float(total) <= 0:  # a flat map: every tile stays possible
        return torch.full_like(alpha, 1.0 / alpha.numel())
    return w / total


def _spread(alpha: torch.Tensor, betas: list[torch.Tensor]) -> torch.Tensor:
    """The entropy regulariser's argument: entropy of alpha plus the mean entropy of a pass's betas."""
    return entropy(alpha) + torch.stack([entropy(b) for b in betas]).mean()


def _complement(p: torch.Tensor) -> torch.Tensor:
    """The contrastive distribution: 1 - p renormalised (uniform when p is one-hot)."""
    q = 1.0 - p
    total = q.sum()
    if float(total.detach()) <= 1e-8:
        return torch.full_like(p, 1.0 / p.numel())
    return q / total


# ---------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------
class AttentionNet(nn.Module):
    """conv(3->c,3) relu conv(c->c,3) relu conv(c->1,3): one logit per pixel, size kept."""

    halo = 3  # pixels of context each output needs on every side

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2.0 - 1.0)[:, 0]


class FeatureNet(nn.Module):
    """LeNet-like: conv 5x5, pool, conv 5x5, pool, global average, L2-normalised."""

    def __init__(self, channels: tuple[int, int]) -> None:
        super().__init__()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.dim = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x * 2.0 - 1.0).mean(dim=(2, 3))
        return F.normalize(z, dim=1)


@dataclass
class _TileResult:
    index: int  # tile index in the stage-1 grid
    count: int  # how many of the N draws chose it
    rect: Rect
    beta: torch.Tensor  # (p2 * p2,) stage-2 attention
    subtiles: list[tuple[int, Rect]]  # (position index, level-0 rect) in draw order
    estimate: torch.Tensor  # (D,) estimate of sum_c' beta_c' f_c'


class ZoomInNet(SlideModel):
    name = "zoom_in"

    def __init__(self, config: ZoomInConfig, classes: list[str] | None = None) -> None:
        super().__init__(config, classes)
        self.attention1 = AttentionNet(config.attention_channels)
        self.attention2 = AttentionNet(config.attention_channels)
        self.features = FeatureNet(config.feature_channels)
        self.classifier = nn.Linear(self.features.dim, self.num_classes)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.features.parameters())

    # -- geometry ----------------------------------------------------------------------------
    def _grid(self, view: SlideView) -> Grid:
        return make_grid(view.bounds, self.config.tile_size, fit="ceil")

    def _subtile_rect(self, tile: Rect, position: int) -> Rect:
        p2 = self.config.tile_pixels_2
        tx, ty, tw, th = tile
        r, c = divmod(position, p2)
        sw, sh = min(self.config.subtile_size, tw), min(self.config.subtile_size, th)
        # Positions map linearly onto the tile's top-left corners (paper: T maps c to
        # 1 + (i - 1)(W - 1)/(w - 1)), so every sub-tile lies inside its tile and covers its
        # own stage-2 cell whenever it is at least one cell wide.
        step = 1.0 / (p2 - 1) if p2 > 1 else 0.0
        return (tx + c * step * (tw - sw), ty + r * step * (th - sh), sw, sh)

    # -- stage 1 -------------------------------------------------------------------------------
    def _stage1(self, view: SlideView, grid: Grid, emit: Emit | None = None) -> torch.Tensor:
        """Tile logits (rows, cols), computed in bands of tile rows."""
        p1 = self.config.tile_pixels_1
        halo = AttentionNet.halo
        # Bands bound both the network's input and the pixels decoded from the pyramid level
        # the read will use, so progress comes often even on single-level slides.
        # The bands together read the whole grid: refused up front when over the read budget.
        view.check_budget((*grid.origin, grid.cols * grid.cell[0], grid.rows * grid.cell[1]),
                          grid.cols * p1, grid.rows * p1)
        slide = view.slide
        level = slide.read_level_for(grid.cell[0] / p1)
        ds = slide.levels[level].downsample
        row_source = grid.cols * grid.cell[0] * grid.cell[1] / (ds * ds)
        band_rows = max(1, min(self.config.stage1_band_pixels // (grid.cols * p1 * p1),
                               int(self.config.stage1_read_pixels // max(row_source, 1.0))))
        bands = math.ceil(grid.rows / band_rows)
        if emit is not None:
            emit(Progress(0, bands, stage=f"stage 1: band 0 of {bands}"))
        px_h = grid.cell[1] / p1  # level-0 height of one stage-1 pixel
        out = []
        for b, r0 in enumerate(range(0, grid.rows, band_rows)):
            r1 = min(grid.rows, r0 + band_rows)
            top = halo if r0 > 0 else 0
            bottom = halo if r1 < grid.rows else 0
            height = (r1 - r0) * p1 + top + bottom
            y = grid.origin[1] + r0 * grid.cell[1] - top * px_h
            rect = (grid.origin[0], y, grid.cols * grid.cell[0], height * px_h)
            image = view.read_tensor([rect], grid.cols * p1, height).to(self.device)
            logits = self.attention1(image)[:, top: top + (r1 - r0) * p1]
            out.append(F.avg_pool2d(logits[:, None], p1)[0, 0])
            if emit is not None:
                emit(Progress(b + 1, bands, stage=f"stage 1: band {b + 1} of {bands}"))
        return torch.cat(out, 0)

    # -- stage 2 and features ---------------------------------------------------------------
    def _tile(self, view: SlideView, grid: Grid, index: int, count: int,
              contrastive: bool = False, top: bool = False) -> _TileResult:
        p2, sp = self.config.tile_pixels_2, self.config.subtile_pixels
        rect = grid.rect(index)
        image = view.read_tensor([rect], p2, p2).to(self.device)
        beta = torch.softmax(self.attention2(image).reshape(-1), 0)
        dist = _complement(beta) if contrastive else beta
        # top: the count highest positions, in order (the reference's inference), else draws
        positions = (torch.topk(dist, min(count, dist.numel())).indices if top
                     else sample_without_replacement(dist, count))
        subs = [(int(p), self._subtile_rect(rect, int(p))) for p in positions]
        patches = view.read_tensor([r for _, r in subs], sp, sp).to(image.device)
        feats = self.features(patches)
        # The reference draws contrastive sub-tiles from 1 - beta but weights their estimator
        # by beta itself: its gradient then pushes beta down where the draws look positive.
        weights = beta if contrastive and self.config.contrastive_weighting == "attention" else dist
        estimate = expectation_without_replacement(weights, positions, feats)
        return _TileResult(index, count, rect, beta, subs, estimate)

    @staticmethod
    def _aggregate(alpha: torch.Tensor, draws: torch.Tensor,
                   tiles: dict[int, _TileResult]) -> torch.Tensor:
        return two_stage_expectation(alpha, draws, {i: t.estimate for i, t in tiles.items()})

    def _pass(self, view: SlideView, grid: Grid, alpha: torch.Tensor,
              contrastive: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One sampled forward: slide logits and the betas it computed."""
        dist = _complement(alpha) if contrastive else alpha
        draws = sample_with_replacement(dist, self.config.n_samples)
        unique, counts = torch.unique(draws, return_counts=True)
        tiles = {int(i): self._tile(view, grid, int(i), int(n), contrastive)
                 for i, n in zip(unique, counts)}
        weights = alpha if self.config.contrastive_weighting == "attention" else dist  # see _tile
        z = self._aggregate(weights, draws, tiles)
        return self.classifier(z), [t.beta for t in tiles.values()]

    # -- the contract ------------------------------------------------------------------------
    def training_step(self, view: SlideView, label: int, epoch: int = 0) -> StepOutput:
        self.check_label(label)
        grid = self._grid(view)
        alpha = torch.softmax(self._stage1(view, grid).reshape(-1), 0)
        logits, betas = self._pass(view, grid, alpha, contrastive=False)
        target = torch.tensor([int(label)], device=logits.device)
        ce = F.cross_entropy(logits[None], target)
        spread = _spread(alpha, betas)
        # As in attention sampling and the reference code (strength x sum p log p): spread-out
        # attention lowers the loss, so the sampler keeps exploring while it learns.
        loss = ce - self.config.entropy_weight * spread
        parts = {"ce": ce.item(), "entropy": spread.item()}
        if (int(label) == POSITIVE and self.num_classes > POSITIVE
                and epoch >= self.config.contrastive_warmup):
            con_logits, con_betas = self._pass(view, grid, alpha, contrastive=True)
            con = F.cross_entropy(con_logits[None], torch.tensor([REFERENCE], device=con_logits.device))
            con_loss = con
            parts["contrastive"] = con.item()
            if self.config.contrastive_weighting == "attention":
                # The reference's contrastive pass carries its own entropy term.
                con_spread = _spread(alpha, con_betas)
                con_loss = con - self.config.entropy_weight * con_spread
                parts["contrastive_entropy"] = con_spread.item()
            loss = loss + self.config.contrastive_weight * con_loss
        parts["loss"] = loss.item()
        return StepOutput(loss=loss, logits=logits, parts=parts)

    @torch.no_grad()
    def explain(self, view: SlideView, emit: Emit) -> list[float]:
        cfg = self.config
        grid = self._grid(view)
        emit(Field(id=0, parent=None, depth=0, rect=tuple(view.bounds), score=1.0, kind="view"))
        logits1 = self._stage1(view, grid, emit)
        alpha = torch.softmax(logits1.reshape(-1), 0)
        emit(AttentionMap(
            name="stage 1 attention", group="stage 1",
            magnification=view.magnification_of(grid.cell[0], cfg.tile_pixels_1),
            origin=grid.origin, cell=grid.cell,
            values=alpha.reshape(grid.rows, grid.cols).tolist(),
        ))
        reference = cfg.draws == "reference"
        draws = sample_with_replacement(reference_tile_weights(alpha) if reference else alpha, cfg.n_samples)
        unique, counts = torch.unique(draws, return_counts=True)
        total = len(unique)
        tiles: dict[int, _TileResult] = {}
        next_id = 1
        sum_z = torch.zeros(self.features.dim, device=alpha.device)
        used = 0
        for step, (i, n) in enumerate(zip(unique.tolist(), counts.tolist())):
            rect = grid.rect(i)
            a = float(alpha[i])
            tile_id = next_id
            next_id += 1
            emit(Field(id=tile_id, parent=0, depth=1, rect=rect, score=a, kind="tile",
                       magnification=view.magnification_of(rect[2], cfg.tile_pixels_2)))
            t = self._tile(view, grid, i, n, top=reference)
            tiles[i] = t
            p2 = cfg.tile_pixels_2
            emit(AttentionMap(
                name=f"stage 2 attention, tile {tile_id}", group="stage 2",
                magnification=view.magnification_of(rect[2], p2),
                origin=(rect[0], rect[1]), cell=(rect[2] / p2, rect[3] / p2),
                values=t.beta.reshape(p2, p2).tolist(),
            ))
            for pos, sub in t.subtiles:
                emit(Field(id=next_id, parent=tile_id, depth=2, rect=sub,
                           score=a * float(t.beta[pos]), kind="subtile",
                           magnification=view.magnification_of(sub[2], cfg.subtile_pixels)))
                next_id += 1
            # Running prediction from the draws processed so far.
            sum_z += n * t.estimate
            used += n
            probs = torch.softmax(self.classifier(sum_z / used), 0)
            emit(TrailStep(index=step, field_id=tile_id, probs=probs.tolist()))
            emit(Progress(step + 1, total, stage=f"stage 2: tile {step + 1} of {total}"))
        probs = torch.softmax(self.classifier(self._aggregate(alpha, draws, tiles)), 0)
        return [float(p) for p in probs]


MODEL = ZoomInNet
