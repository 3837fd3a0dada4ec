"""Locally supervised learning on the whole slide (Zhang et al., MICCAI 2022).

How the code maps to the paper
------------------------------
* Section 2. The network ``F = H o F_K o ... o F_1`` is a ResNet-34 trunk whose residual
  blocks are grouped into K consecutive modules (``num_modules``). The whole view is the input
  ``x``, read at ``magnification`` (5x in the paper). Module ``F_i`` maps ``x_{i-1}`` to
  ``x_i``; module 1 also holds the stem.
* Gradient isolation. ``F_{i+1}`` reads ``x_i.detach()``, so no gradient crosses a module
  boundary. Each module's local loss is back-propagated (or differentiated) as soon as it is
  computed and its graph is freed before the next module runs; that is where the memory
  saving of the paper comes from (Table 2; ``benchmarks/engine_bench.py`` measures it
  against end-to-end training, the stem trained too, as the paper does).
* Section 2.1, auxiliary model ``G_i = (A_i, U_i)`` for i < K. ``A_i`` (``GatedMILHead``): a
  convolution with kernel = stride, GroupNorm over each cell's channels, ReLU, gated attention pooling (Ilse et al.)
  over the cells, and a two-layer MLP. ``U_i`` (``RandomFeatureReconstruction``): 10 random
  crops of ``x_i``, upsampled to the resolution of ``x_{i-1}``, two 3x3 convolutions back to
  the channels of ``x_{i-1}``, L1 against the aligned crop of ``x_{i-1}`` (for module 1 that is
  the normalised input image; the crop is ``rfr_crop`` = 128 input pixels).
* Section 2.2. ``L_i = CE(A_i(x_i), y) + alpha * L1`` with alpha = ``rfr_weight`` = 1 for
  i < K, and ``L_K = CE(H(x_K), y)`` where ``H`` is the same gated-attention head over the
  final feature grid (kernel 1). K = 1 is plain end-to-end training.
* Section 3.2. ImageNet ResNet-34 with conv1 stride 3; the stem (conv1, bn1, relu, maxpool) is
  frozen; every BatchNorm stays in eval mode with frozen affine parameters; AdamW with weight
  decay 1e-6 and the backbone at half the learning rate of the new heads (1e-5 vs 2e-5);
  batch 1 with 8 slides of gradient accumulation (``accumulation``, read by the trainer).
  Block grouping follows the reference code: K = 8 is [layer1.0], [layer1.1], [layer1.2],
  [layer2.0-1], [layer2.2-3], [layer3.0-2], [layer3.3-5], [layer4], and K = 1, 2 or 4 join 8 / K
  consecutive of those units (K = 4: [layer1.0-1], [layer1.2, layer2.0-1], [layer2.2-3,
  layer3.0-2], [layer3.3-5, layer4]); any other K, or another trunk, splits the block list
  into K nearly equal consecutive runs.

Departures, and why
-------------------
* Auxiliary kernel. The reference uses kernel = stride = 9 or 7. Here the kernel is
  ``trunk stride / module stride`` (8, 4, 2 for outputs at stride 6, 12, 24), so every
  auxiliary cell covers the same 48 x 48 input pixels as a cell of the final grid. The final
  head is the reference's in the ``paper`` preset (kernel = stride = 5 over the final grid,
  512-d: a head cell is 240 input pixels); ``tiny`` keeps kernel 1. With an input size rounded
  to a whole number of head cells, every attention map tiles the view exactly (no partial
  cells, nothing outside the view) and strip inference crops on cell boundaries.
* Input size. The view is resampled to the nearest multiple of a head cell (``unit``: 240
  input pixels in ``paper``, 48 in ``tiny``) on each side, never finer than level 0, and
  capped at ``max_side``.
* RFR crop of later modules: the paper says only that it "depends on the feature map"; we keep
  the cell count of module 1's crop (128 / 6 = 21 cells), clipped to the map.
* Inference runs the trunk in overlapping horizontal strips (``strip_rows`` final-grid rows
  each, plus a margin of the trunk's receptive-field radius rounded up to the stride) so memory
  stays bounded by the strip and the width; results equal the whole-image forward (tested).
  The paper ran the whole slide at once on a 48 GB GPU.
* ``training_step`` cannot know the factor the trainer multiplies its loss by (class weight /
  accumulation). It therefore computes each module's local gradients with
  ``torch.autograd.grad`` (one module graph alive at a time) and returns a loss whose backward
  adds ``factor * gradient`` to every parameter: same gradients, bounded memory.
* ``tiny`` preset: the same architecture with widths 8-64 and two blocks per stage, trained from
  scratch (stem not frozen), at 2.5x, input capped at 768 px.

Trace: ``Field`` 0 for the view, one ``Field`` (kind "strip") per inference strip, ``Progress``
before the stem and every residual block of every strip ("strip 2 / 5, module 3 / 4"), then per auxiliary module an
``AttentionMap`` (group "module", name "module i") and a ``TrailStep`` with its prediction, and
last the head's map (group "head", name "head") and its ``TrailStep``. Every map's cells are the
final grid's cells: ``48 * level-0 pixels per input pixel`` on a side, origin at the view's corner.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from engines.models import backbones
from engines.models.base import Emit, SlideModel, StepOutput
from engines.sampling import SlideView
from engines.trace import AttentionMap, Field, Progress, TrailStep

Reader = Callable[[int, int], torch.Tensor]  # (first input row, end row) -> (1, 3, rows, W)
RESNET34_BLOCKS = (3, 4, 6, 3)
# Reference grouping of ResNet-34 blocks into 8 modules: (stage, first block, end block).
RESNET34_K8 = [
    [(0, 0, 1)], [(0, 1, 2)], [(0, 2, 3)], [(1, 0, 2)], [(1, 2, 4)], [(2, 0, 3)], [(2, 3, 6)], [(3, 0, 3)],
]


@dataclass(frozen=True)
class LocalLearningConfig:
    backbone: str = "resnet34"  # "resnet34" (torchvision) or "small" (same layout, own widths)
    backbone_weights: str | None = None  # local ImageNet weights file for resnet34
    widths: tuple[int, ...] = (64, 128, 256, 512)  # "small" only
    blocks: tuple[int, ...] = RESNET34_BLOCKS  # "small" only
    stem_stride: int = 3  # conv1 stride (2 in ImageNet ResNets)
    trunk_norm: str = "batch"  # "small" only: "batch" (frozen with freeze_bn) or "channel"
    num_modules: int = 4  # K
    magnification: float | None = 5.0  # objective power of the input; None: fallback_downsample
    fallback_downsample: float = 8.0  # used when the slide states neither power nor mpp
    max_side: int = 24576  # input pixels on the longer side, at most
    head_dim: int = 256  # channels after the head / auxiliary convolution
    head_kernel: int = 1  # kernel = stride of the final head's convolution, in final-grid cells
    attn_dim: int = 128  # gated attention hidden size
    gn_groups: int = 32
    rfr_crops: int = 10
    rfr_crop: int = 128  # RFR crop side for module 1, in input pixels
    rfr_weight: float = 1.0  # alpha
    freeze_stem: bool = True
    freeze_bn: bool = True
    strip_rows: int = 8  # final-grid rows per inference strip
    backbone_lr_ratio: float = 0.5  # backbone lr / head lr (1e-5 vs 2e-5)
    weight_decay: float = 1e-6  # AdamW, used when the trainer passes 0
    accumulation: int = 8

    def __post_init__(self) -> None:
        if self.backbone not in ("resnet34", "small"):
            raise ValueError(f"local_learning: unknown backbone {self.backbone!r} (resnet34 or small)")
        if self.backbone == "small" and (len(self.widths) != 4 or len(self.blocks) != 4
                                         or min(self.blocks) < 1 or min(self.widths) < 1):
            raise ValueError("local_learning: the small backbone needs four positive widths and four "
                             "positive block counts")
        if self.stem_stride < 1:
            raise ValueError("local_learning: stem_stride must be a positive integer")
        if min(self.strip_rows, self.rfr_crops, self.max_side, self.rfr_crop, self.head_dim, self.attn_dim) < 1:
            raise ValueError("local_learning: strip_rows, rfr_crops, rfr_crop, max_side, head_dim and attn_dim "
                             "must be positive")
        if self.head_kernel < 1 or self.strip_rows % self.head_kernel:
            raise ValueError("local_learning: head_kernel must be positive and divide strip_rows "
                             "(a strip holds whole head cells)")
        blocks = RESNET34_BLOCKS if self.backbone == "resnet34" else tuple(self.blocks)
        if not 1 <= self.num_modules <= sum(blocks):
            raise ValueError(f"local_learning: num_modules must be between 1 and {sum(blocks)} "
                             f"(the number of residual blocks), not {self.num_modules}")


PRESETS = {
    "tiny": LocalLearningConfig(
        backbone="small", widths=(8, 16, 32, 64), blocks=(2, 2, 2, 2), num_modules=4,
        magnification=2.5, fallback_downsample=8.0, max_side=768, head_dim=32, attn_dim=16,
        gn_groups=8, rfr_crop=48, freeze_stem=False, strip_rows=16, accumulation=1,
    ),
    # The reference code's final head: kernel = stride = 5 over the final grid, 512-d.
    "paper": LocalLearningConfig(head_kernel=5, head_dim=512, strip_rows=10),
}


# ---------------------------------------------------------------------------------------
# Trunk
# ---------------------------------------------------------------------------------------
class Trunk(nn.Module):
    """A ResNet as a stem plus its stages of residual blocks, with each block's output stride
    and channels (blocks are addressed as (stage, block))."""

    def __init__(self, stem: nn.Sequential, stages: list[nn.Sequential]) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        stem_conv = stem[0]
        s = stem_conv.stride[0] * 2  # conv1 then the 2x max pool
        self.stem_stride = s
        self.block_stride: dict[tuple[int, int], int] = {}
        self.block_channels: dict[tuple[int, int], int] = {}
        for si, stage in enumerate(stages):
            for bi, block in enumerate(stage):
                s *= block.conv1.stride[0]
                self.block_stride[(si, bi)] = s
                self.block_channels[(si, bi)] = block.conv2.out_channels
        self.stride = s

    def receptive_radius(self) -> int:
        """Input pixels an output cell sees on each side of its corner (main path only)."""
        radius, jump = 0.0, 1
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
                k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
                s = m.stride if isinstance(m.stride, int) else m.stride[0]
                if k == 1:  # 1x1 shortcut projections add nothing and repeat the stride
                    continue
                radius += (k - 1) / 2 * jump
                jump *= s
        return math.ceil(radius)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel on its own (as in ConvNeXt), written out:
    torch's fused layer_norm on the channels-last view of a whole-slide map crashed in its
    backward pass on this CPU build."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(1, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(1, keepdim=True) + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


def _norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """BatchNorm as in ResNet, or ``ChannelNorm``. A small trunk trained from scratch on one
    slide per step has no useful BatchNorm statistics: frozen at their initial values
    (``freeze_bn``) they leave it unnormalised. A norm over the whole map (GroupNorm) would
    make strip inference differ from the whole-image forward; a per-pixel norm is as local
    as a convolution, so strips stay exact."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "channel":
        return ChannelNorm
    raise ValueError(f"unknown trunk_norm {kind!r} (batch or channel)")


def _small_trunk(widths: tuple[int, ...], blocks: tuple[int, ...], stem_stride: int,
                 norm: str = "batch") -> Trunk:
    w0 = widths[0]
    norm_layer = _norm_layer(norm)
    stem = nn.Sequential(
        nn.Conv2d(3, w0, 7, stem_stride, 3, bias=False), norm_layer(w0), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )
    stages, cin = [], w0
    for i, (w, n) in enumerate(zip(widths, blocks)):
        stride = 1 if i == 0 else 2
        layer = []
        for b in range(n):
            s = stride if b == 0 else 1
            down = None
            if s != 1 or cin != w:
                down = nn.Sequential(nn.Conv2d(cin, w, 1, s, bias=False), norm_layer(w))
            layer.append(BasicBlock(cin, w, s, down, norm_layer=norm_layer))
            cin = w
        stages.append(nn.Sequential(*layer))
    trunk = Trunk(stem, stages)
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return trunk


def _resnet34_trunk(stem_stride: int) -> tuple[Trunk, nn.Module]:
    net = backbones.build("resnet34")
    net.conv1.stride = (stem_stride, stem_stride)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return Trunk(stem, [net.layer1, net.layer2, net.layer3, net.layer4]), net


def module_groups(blocks: tuple[int, ...], k: int) -> list[list[tuple[int, int]]]:
    """The (stage, block) indices of each of the ``k`` modules, in order."""
    flat = [(s, b) for s, n in enumerate(blocks) for b in range(n)]
    if not 1 <= k <= len(flat):
        raise ValueError(f"num_modules must be between 1 and {len(flat)} (the number of residual blocks), not {k}")
    if tuple(blocks) == RESNET34_BLOCKS and len(RESNET34_K8) % k == 0:
        # The reference code's rule: K modules each take 8 / K consecutive units of its K = 8 split.
        units = [[(s, b) for s, b0, b1 in g for b in range(b0, b1)] for g in RESNET34_K8]
        per = len(units) // k
        return [[blk for u in units[i * per:(i + 1) * per] for blk in u] for i in range(k)]
    if k == len(blocks):
        return [[(s, b) for b in range(n)] for s, n in enumerate(blocks)]
    bounds = [round(i * len(flat) / k) for i in range(k + 1)]
    return [flat[bounds[i]:bounds[i + 1]] for i in range(k)]


# ---------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------
class GatedMILHead(nn.Module):
    """Conv (kernel = stride) -> GroupNorm per cell -> ReLU -> gated attention pooling -> MLP.

    The norm acts on each cell's channel vector alone: normalising over the whole map (a
    GroupNorm over H x W) makes the mean of the instances the same for every slide, so a
    small tumour region barely moves the uniformly pooled feature a fresh head starts from.
    ``proj`` is local (it can run strip by strip); ``pool`` needs the whole projected map
    because the softmax is over all cells."""

    def __init__(self, in_ch: int, kernel: int, dim: int, attn_dim: int, groups: int, classes: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel, kernel)
        self.norm = nn.GroupNorm(math.gcd(groups, dim), dim)
        self.attn_v = nn.Linear(dim, attn_dim)
        self.attn_u = nn.Linear(dim, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, classes))

    def pool(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, dim, h, w) projected map -> logits (C,), attention (h, w) summing to 1."""
        h, w = z.shape[-2:]
        inst = F.relu(self.norm(z.flatten(2)[0].t()[:, :, None]))[:, :, 0]  # (h*w, dim)
        gate = torch.tanh(self.attn_v(inst)) * torch.sigmoid(self.attn_u(inst))
        a = torch.softmax(self.attn_w(gate).squeeze(1), 0)
        return self.mlp(a @ inst), a.view(h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool(self.proj(x))


class RandomFeatureReconstruction(nn.Module):
    """U_i: reconstruct random crops of x_{i-1} from the aligned crops of x_i (L1)."""

    def __init__(self, in_ch: int, out_ch: int, factor: int, crops: int, cells: int) -> None:
        super().__init__()
        self.factor, self.crops, self.cells = factor, crops, cells
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, in_ch, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out_ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        f = self.factor
        h, w = x.shape[-2:]
        ch, cw = min(self.cells, h, prev.shape[-2] // f), min(self.cells, w, prev.shape[-1] // f)
        # Crop corners are Python ints (slicing), drawn from the CPU generator wherever x is.
        tops = torch.randint(0, h - ch + 1, (self.crops,), device="cpu").tolist()
        lefts = torch.randint(0, w - cw + 1, (self.crops,), device="cpu").tolist()
        src = torch.cat([x[:, :, t:t + ch, l:l + cw] for t, l in zip(tops, lefts)])
        tgt = torch.cat([prev[:, :, t * f:(t + ch) * f, l * f:(l + cw) * f] for t, l in zip(tops, lefts)])
        if f > 1:
            src = F.interpolate(src, scale_factor=f, mode="bilinear", align_corners=False)
        return F.l1_loss(self.net(src), tgt)


@dataclass
class ModuleLoss:
    """The local loss of one module while its graph is alive."""

    index: int
    loss: torch.Tensor
    logits: torch.Tensor
    parts: dict[str, float]


class _InjectGrads(torch.autograd.Function):
    """Returns ``value``; its backward adds ``grad_output * g`` to each parameter."""

    @staticmethod
    def forward(ctx, value, grads, *params):  # noqa: ANN001 - autograd signature
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        return (None, None, *[None if g is None else g * grad_out for g in ctx.grads])


class _RowReader:
    """Reads input rows of a view resampled to ``w_in`` x ``h_in``, normalised. Strips move
    down and overlap, so rows already read for the previous strip are reused, not re-read."""

    def __init__(self, view: SlideView, w_in: int, h_in: int, device: torch.device | None = None) -> None:
        self.view, self.w_in = view, w_in
        self.device = device
        self.sy = view.bounds[3] / h_in
        view.check_budget(view.bounds, w_in, h_in)  # the strips together read the whole view
        self.start, self.rows = 0, None  # cached rows [start, start + rows.shape[2])

    def _read(self, r0: int, r1: int) -> torch.Tensor:
        bx, by, bw, _ = self.view.bounds
        img = self.view.read((bx, by + r0 * self.sy, bw, (r1 - r0) * self.sy), self.w_in, r1 - r0)
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None]
        if self.device is not None:
            x = x.to(self.device)  # uint8 crosses to the GPU: a quarter of the float32 bytes
        return backbones.normalise(x.float() / 255.0).contiguous(memory_format=torch.channels_last)

    def __call__(self, r0: int, r1: int) -> torch.Tensor:
        if self.rows is not None and self.start <= r0 <= self.start + self.rows.shape[2] <= r1:
            end = self.start + self.rows.shape[2]
            kept = self.rows[:, :, r0 - self.start:]
            x = torch.cat([kept, self._read(end, r1)], 2) if r1 > end else kept
        else:
            x = self._read(r0, r1)
        self.start, self.rows = r0, x
        return x


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
class LocalLearning(SlideModel):
    name = "local_learning"

    def __init__(self, config: LocalLearningConfig, classes: list[str] | None = None) -> None:
        super().__init__(config, classes)
        c = config
        if c.backbone == "resnet34":
            self.trunk, net = _resnet34_trunk(c.stem_stride)
            self.pretrained("resnet34", net, c.backbone_weights)
            blocks = RESNET34_BLOCKS
        else:
            self.trunk = _small_trunk(tuple(c.widths), tuple(c.blocks), c.stem_stride, c.trunk_norm)
            blocks = tuple(c.blocks)
        self.groups = module_groups(blocks, c.num_modules)
        self.stride = self.trunk.stride
        self.margin = math.ceil(self.trunk.receptive_radius() / self.stride) * self.stride
        self.out_stride = [self.trunk.block_stride[g[-1]] for g in self.groups]
        out_ch = [self.trunk.block_channels[g[-1]] for g in self.groups]
        in_ch = [3] + out_ch[:-1]
        in_stride = [1] + self.out_stride[:-1]
        cells = max(1, c.rfr_crop // self.out_stride[0])
        k = len(self.groups)
        self.aux = nn.ModuleList(
            GatedMILHead(out_ch[i], self.stride // self.out_stride[i], c.head_dim, c.attn_dim, c.gn_groups,
                         self.num_classes)
            for i in range(k - 1)
        )
        self.rfr = nn.ModuleList(
            RandomFeatureReconstruction(out_ch[i], in_ch[i], self.out_stride[i] // in_stride[i], c.rfr_crops, cells)
            for i in range(k - 1)
        )
        self.head = GatedMILHead(out_ch[-1], c.head_kernel, c.head_dim, c.attn_dim, c.gn_groups, self.num_classes)
        # The input is a whole number of head cells, so every map tiles the view exactly.
        self.unit = self.stride * c.head_kernel
        if c.freeze_stem:
            for p in self.trunk.stem.parameters():
                p.requires_grad_(False)
        if c.freeze_bn:
            for m in self.trunk.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)
        # Channels-last weights and inputs: the CPU convolutions then work on the tensors as
        # they are, where NCHW ones are copied to a blocked layout and back in every forward
        # and backward (a training step's peak fell by a seventh, and it ran a fifth faster).
        self.to(memory_format=torch.channels_last)

    # -- structure ---------------------------------------------------------------------------
    @property
    def num_modules(self) -> int:
        return len(self.groups)

    def train(self, mode: bool = True) -> "LocalLearning":
        super().train(mode)
        if self.config.freeze_bn:  # whole-slide batches of one: keep running statistics
            for m in self.trunk.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def run_module(self, i: int, x: torch.Tensor, tick: Callable[[], None] | None = None) -> torch.Tensor:
        """F_i: module ``i`` (0-based) of the trunk; module 0 starts with the stem. ``tick`` is
        called before the stem and before every block (progress on slow machines)."""
        if i == 0:
            if tick is not None:
                tick()
            x = self.trunk.stem(x)
        for s, b in self.groups[i]:
            if tick is not None:
                tick()
            x = self.trunk.stages[s][b](x)
        return x

    def module_head(self, i: int) -> GatedMILHead:
        return self.head if i == self.num_modules - 1 else self.aux[i]

    def module_parameters(self, i: int) -> list[nn.Parameter]:
        """Everything module ``i``'s local loss trains: its blocks and its auxiliary model."""
        mods: list[nn.Module] = [self.trunk.stages[s][b] for s, b in self.groups[i]]
        if i == 0:
            mods.append(self.trunk.stem)
        if i < self.num_modules - 1:
            mods += [self.aux[i], self.rfr[i]]
        else:
            mods.append(self.head)
        return [p for m in mods for p in m.parameters()]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def make_optimizer(self, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        wd = weight_decay or self.config.weight_decay
        own = {id(p) for p in self.trunk.parameters()}
        backbone = [p for p in self.trunk.parameters() if p.requires_grad]
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        groups = [{"params": rest, "lr": lr}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * self.config.backbone_lr_ratio})
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)

    # -- input -------------------------------------------------------------------------------
    def input_size(self, view: SlideView) -> tuple[int, int]:
        """(width, height) of the input image: the view at ``magnification``, each side a
        multiple of a head cell (``unit``), never finer than level 0, the longer side capped."""
        _, _, w, h = view.bounds
        ds = self.config.fallback_downsample
        if self.config.magnification:
            base = view.objective_power or (10.0 / view.mpp if view.mpp else None)
            if base:
                ds = base / self.config.magnification
        ds = max(ds, 1.0, max(w, h) / self.config.max_side)
        s = self.unit
        return max(1, round(w / ds / s)) * s, max(1, round(h / ds / s)) * s

    def _reader(self, view: SlideView, w_in: int, h_in: int) -> Reader:
        return _RowReader(view, w_in, h_in, self.device)

    # -- training ----------------------------------------------------------------------------
    def local_losses(self, x: torch.Tensor, label: int) -> Iterator[ModuleLoss]:
        """Each module's local loss in turn, on a normalised (1, 3, H, W) input whose sides
        are multiples of ``stride``. The caller back-propagates each one before asking for the
        next: the next module then reads the detached output and the graph can be freed."""
        y = torch.tensor([int(label)], device=x.device)
        prev = x
        for i in range(self.num_modules):
            out = self.run_module(i, prev)
            if i == self.num_modules - 1:
                logits, _ = self.head(out)
                ce = F.cross_entropy(logits[None], y)
                yield ModuleLoss(i, ce, logits, {"head_ce": float(ce.detach())})
            else:
                logits, _ = self.aux[i](out)
                ce = F.cross_entropy(logits[None], y)
                rec = self.rfr[i](out, prev)
                loss = ce + self.config.rfr_weight * rec
                parts = {f"m{i + 1}_ce": float(ce.detach()), f"m{i + 1}_rfr": float(rec.detach())}
                yield ModuleLoss(i, loss, logits, parts)
            prev = out.detach()
            del out

    def training_step(self, view: SlideView, label: int, epoch: int = 0) -> StepOutput:
        w_in, h_in = self.input_size(view)
        return self.local_step(self._reader(view, w_in, h_in)(0, h_in), label)

    def local_step(self, x: torch.Tensor, label: int) -> StepOutput:
        """The training step on a normalised (1, 3, H, W) input whose sides are multiples of
        ``stride`` (what ``training_step`` reads from its view)."""
        self.check_label(label)
        x = x.contiguous(memory_format=torch.channels_last)  # as the weights (see __init__)
        params = [p for p in self.parameters() if p.requires_grad]
        index = {id(p): j for j, p in enumerate(params)}
        grads: list[torch.Tensor | None] = [None] * len(params)
        total = torch.zeros((), device=x.device)
        parts: dict[str, float] = {}
        logits = torch.zeros(self.num_classes, device=x.device)
        for ml in self.local_losses(x, label):
            mine = [p for p in self.module_parameters(ml.index) if p.requires_grad]
            if torch.is_grad_enabled() and mine and ml.loss.requires_grad:
                for p, g in zip(mine, torch.autograd.grad(ml.loss, mine, allow_unused=True)):
                    grads[index[id(p)]] = g
            total = total + ml.loss.detach()
            parts.update(ml.parts)
            logits = ml.logits.detach()
        parts["loss"] = float(total)
        if not torch.is_grad_enabled() or not params:
            return StepOutput(total, logits, parts)
        return StepOutput(_InjectGrads.apply(total, grads, *params), logits, parts)

    # -- inference ---------------------------------------------------------------------------
    def project_whole(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every module's head projection (1, dim, H/48, W/48) from one whole-image pass."""
        out = []
        for i in range(self.num_modules):
            x = self.run_module(i, x)
            out.append(self.module_head(i).proj(x))
        return out

    def project_strips(self, read: Reader, h_in: int,
                       on_step: Callable[[int, int, int, int], None] | None = None) -> list[torch.Tensor]:
        """``project_whole`` computed in horizontal strips of ``strip_rows`` grid rows. Each
        strip reads ``margin`` extra input rows on both sides (the receptive-field radius,
        rounded up to the stride) and keeps only the rows its margins make exact."""
        s, m = self.stride, self.margin
        rows = h_in // s
        n = math.ceil(rows / self.config.strip_rows)
        pieces: list[list[torch.Tensor]] = [[] for _ in range(self.num_modules)]
        for j in range(n):
            a = j * self.config.strip_rows
            b = min(rows, a + self.config.strip_rows)
            r0, r1 = max(0, a * s - m), min(h_in, b * s + m)
            x = read(r0, r1)
            for i in range(self.num_modules):
                tick = None if on_step is None else (lambda j=j, i=i, a=a: on_step(j, n, i, a))
                x = self.run_module(i, x, tick)
                st = self.out_stride[i]
                keep = x[:, :, (a * s - r0) // st:(b * s - r0) // st]
                pieces[i].append(self.module_head(i).proj(keep))
            del x
        return [torch.cat(p, 2) for p in pieces]

    def explain(self, view: SlideView, emit: Emit) -> list[float]:
        bx, by, bw, bh = view.bounds
        emit(Field(id=0, parent=None, depth=0, rect=view.bounds, score=1.0, kind="view"))
        w_in, h_in = self.input_size(view)
        s = self.stride
        sx, sy = bw / w_in, bh / h_in
        mag = view.magnification_of(bw, w_in)
        steps = self.num_modules
        per_strip = 1 + sum(len(g) for g in self.groups)  # the stem and every block
        rows = h_in // s
        n = math.ceil(rows / self.config.strip_rows)
        total = n * per_strip + 1
        done = [0]

        def on_step(j: int, n: int, i: int, a: int) -> None:
            if done[0] == j * per_strip:  # first block of a new strip
                height = min(self.config.strip_rows, rows - a)
                emit(Field(id=j + 1, parent=0, depth=1, rect=(bx, by + a * s * sy, bw, height * s * sy),
                           score=1.0, kind="strip", magnification=mag))
            emit(Progress(done[0], total, f"strip {j + 1} / {n}, module {i + 1} / {steps}"))
            done[0] += 1

        with torch.no_grad():
            projs = self.project_strips(self._reader(view, w_in, h_in), h_in, on_step)
            probs: list[float] = []
            for i, z in enumerate(projs):
                logits, attn = self.module_head(i).pool(z)
                probs = torch.softmax(logits, 0).tolist()
                last = i == steps - 1
                c = s * (self.config.head_kernel if last else 1)  # a map cell, in input pixels
                emit(AttentionMap(
                    name="head" if last else f"module {i + 1}", group="head" if last else "module",
                    magnification=mag, origin=(bx, by), cell=(c * sx, c * sy),
                    values=[[float(v) for v in row] for row in attn.tolist()],
                ))
                emit(TrailStep(index=i, field_id=0, probs=probs))
        emit(Progress(total, total, "done"))
        return probs


MODEL = LocalLearning
