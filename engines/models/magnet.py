"""MagNet: magnifying networks (Dimitriou & Arandjelovic, "Magnifying Networks for Images with
Billions of Pixels").

How the code maps to the paper
------------------------------
* **Magnifying layers** (Sec. 3.1). ``layers`` layers; layer ``l`` turns each of its input fields
  into ``patches[l]`` zoom boxes. A field is read twice as the paper asks: ``I`` at
  ``input_px`` (56) for the convolutions and ``I'`` at ``source_px`` (112) for sampling; here
  ``I`` of the first layer is ``I'`` area-downsampled (same pixels, one read), and ``I`` of every
  later layer is the crop its parent sampled, so gradients reach every earlier zoom.
* **Convolutional layers**: every (field, patch) pair has its own stack of three conv layers, as
  in the paper's count (a 2-layer MagNet with two patches per layer has 2 + 4 stacks): two
  Inception-like layers (parallel ``kernel_sizes`` branches, concatenated, ReLU) and a 1x1 scoring
  conv. All stacks of a layer run as one grouped convolution.
* **Spatial sparsemax -> (s, tx, ty)**: sparsemax over the 56x56 scores gives a sparse mask
  ``m`` (sums to 1). From its mean ``mu`` and variances: ``s = box_sigmas * sqrt((var_x +
  var_y) / 2)``, ``s = max(s, min_scale)`` (Eq. 1, 0.05) and ``s <= 1``;
  ``t = clamp(mu, -(1 - s), 1 - s)`` (in place of Eq. 2-3, see below); then
  ``theta = [[s, 0, tx], [0, s, ty]]`` (Eq. 4).
* **Sampler**: linearised multi-sampling (``engines.lms``) by default, bilinear on request
  (``sampler``). The "heart" of the paper: each crop is sampled from ``I'`` (a sharper read of
  the field than the 56 px ``I`` the localiser saw), so every layer adds detail.
* **Frozen patch**: the first patch of layer ``frozen_layer`` (2) is fixed to the whole input.
* **Classification layer** (Sec. 3.2): the last layer samples its crops at ``final_px`` (224)
  from ``I'`` read at ``final_source_px`` (448, so a half-size box is not upsampled); a CNN
  (Inception-v3 in ``paper``, a small CNN in ``tiny``) embeds each final patch, a GRU reads them
  in tree order and an FC 512 -> 256 -> classes head gives a probability after every patch (the
  probability trail; the last one is the slide prediction).
* **Auxiliary classifiers** (Sec. 3.3): ResNet-18s (``paper``) on the images extracted by
  layers 1 and 3 (features averaged over the images, then a linear layer).
* **Losses** (Sec. 4.3): cross-entropy on the last GRU output and on both auxiliary outputs,
  plus the paradoxical term. The paper only cites Maksoud et al. for it and states its premise
  (layer-3 images should predict at least as well as layer-1 images); we use the hinge
  ``max(0, CE_deep - stopgrad(CE_shallow))``: zero when the deeper classifier already does as well,
  otherwise a push on the deeper classifier (and, through the sampler, on the zooms that chose its
  images). The shallow term is detached so the penalty can never be lowered by making the
  shallow classifier worse, which would defeat its purpose.

Where it departs from the paper, and why
----------------------------------------
* **No letterbox padding.** The paper resizes the input so its long side is 56 and pads with
  black. We read the view stretched to a square instead, so every zoom box lies inside the view
  (the trace contract) and no capacity goes to padding; zoom boxes keep the view's aspect ratio.
* **Translation kept inside the parent, without tanh.** Eq. 2-3 bound ``t`` to (-1, 1) with a
  tanh, which still lets a box of size ``s`` leave its field (``border`` padding then repeats
  edge pixels) and, applied to a centroid that already lies in (-1, 1), pulls every box toward
  the centre so that a box around an off-centre peak misses it. We centre the box on the mask's
  centroid and clamp it to ``|t| <= 1 - s``, which keeps every box inside its parent.
* **How (s, t) come from the mask** is in the paper's appendix, which we do not have; the
  centroid/spread reading above is ours. ``s`` is capped at 1 (a box never exceeds its parent).
* Sparsemax scores are divided by the side of the localiser's input so that an untrained
  localiser spreads its mask over a sizeable region rather than a handful of pixels (where
  ``s`` would sit at 0.05 with no gradient).
* GRU hidden size and Inception branch widths are not given in the paper (``paper`` preset:
  512 and 16 channels per branch). Auxiliary classifiers run in training only.
* The ``paper`` tree is 2-3-3 patches (18 final patches, as in the paper's Fig. 4 for 3 layers).
  How the auxiliary ResNets pool several images into one slide prediction is not stated; we
  average their features. ``tiny`` keeps 56/112 px and the 3-layer tree (2-2-2) with small
  GroupNorm CNNs (``backbones.conv_stages``) and 96 px final crops so it trains on a laptop CPU.
* Pixels come only through ``SlideView.read_tensor``; the grey filter of Sec. 4.2 is the view's
  ``grey_filter`` option, which the model turns on when its config asks (the paper preset does).

Trace
-----
Field 0 is the view; every zoom box is a Field (kind ``"zoom"``, depth = its layer, parent = the
field it was cut from, score = the share of its parent's sparsemax mask inside the box; the frozen
patch scores 1). Each learned mask is an AttentionMap of ``input_px`` x ``input_px`` cells laid
exactly over the field it scored. One TrailStep per final patch carries the GRU's probabilities
after that patch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engines.models import backbones
from engines.models.blocks import SmallCNN
from engines.models.base import Emit, SlideModel, StepOutput
from engines.sampling import Rect, SlideView, crop, theta_to_rect, zoom_theta
from engines.trace import AttentionMap, Field, Progress, TrailStep


@dataclass(frozen=True)
class MagNetConfig:
    layers: int = 3
    patches: tuple[int, ...] = (2, 3, 3)  # P_l per layer (paper: 18 final patches for 3 layers)
    input_px: int = 56  # I: what the localiser convolutions see
    source_px: int = 112  # I': what the crops are sampled from
    final_px: int = 224  # the last layer's crops (classifier input)
    final_source_px: int = 448  # I' of the last layer
    kernel_sizes: tuple[int, ...] = (1, 3, 5)
    branch_width: int = 16  # channels per Inception branch
    min_scale: float = 0.05
    box_sigmas: float = 1.0  # box half-width in standard deviations of the mask
    frozen_layer: int = 2  # its first patch always sees the whole input; 0: none
    sampler: str = "lms"  # "lms" or "bilinear"
    backbone: str = "inception_v3"  # "inception_v3" or "small"
    backbone_weights: str | None = None
    aux_backbone: str = "resnet18"  # "resnet18" or "small"
    aux_weights: str | None = None
    aux_layers: tuple[int, ...] = (1, 3)
    paradox_weight: float = 1.0
    small_width: int = 16  # width of the "small" CNN's first layer
    gru_hidden: int = 512
    fc_hidden: tuple[int, ...] = (512, 256)
    chunk: int = 4  # final patches embedded at once during inference (progress granularity)
    accumulation: int = 16  # slides per optimiser step (paper: batch 16 for 3 layers)
    grey_filter: bool = False  # Sec. 4.2: grey (glass, pen, scanner) pixels read as white

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ValueError("magnet: layers must be at least 1")
        if len(self.patches) != self.layers or any(p < 1 for p in self.patches):
            raise ValueError(
                f"magnet: patches needs one positive count per layer ({self.layers} layers, "
                f"got {tuple(self.patches)})"
            )
        if self.input_px < 8 or self.source_px < self.input_px:
            raise ValueError("magnet: input_px must be >= 8 and source_px >= input_px")
        if self.final_px < 32 or self.final_source_px < 8:
            raise ValueError("magnet: final_px must be >= 32 and final_source_px >= 8")
        if not 0 < self.min_scale <= 1:
            raise ValueError("magnet: min_scale must lie in (0, 1]")
        if self.sampler not in ("lms", "bilinear"):
            raise ValueError(f"magnet: unknown sampler {self.sampler!r} (lms or bilinear)")
        if self.backbone not in ("inception_v3", "small") or self.aux_backbone not in ("resnet18", "small"):
            raise ValueError("magnet: backbone is inception_v3 or small; aux_backbone resnet18 or small")
        if self.backbone == "inception_v3" and self.final_px < 75:
            raise ValueError("magnet: Inception-v3 needs final_px >= 75")
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError("magnet: kernel_sizes must be odd and positive")
        if self.branch_width < 1 or self.gru_hidden < 1 or self.small_width < 1 or self.chunk < 1:
            raise ValueError("magnet: widths, gru_hidden and chunk must be positive")

    @property
    def first_source(self) -> int:
        """I' of layer 1: the source side of the later layers, or the final one when it is the only layer."""
        return self.final_source_px if self.layers == 1 else self.source_px

    @property
    def total_patches(self) -> int:
        return math.prod(self.patches)


PRESETS = {
    "tiny": MagNetConfig(
        layers=3,
        patches=(2, 2, 2),
        final_px=96,
        final_source_px=192,
        branch_width=4,
        backbone="small",
        aux_backbone="small",
        small_width=8,
        gru_hidden=64,
        fc_hidden=(64, 32),
        accumulation=4,
    ),
    "paper": MagNetConfig(grey_filter=True),
}


# ---------------------------------------------------------------------------------------
# Spatial sparsemax and the zoom it implies
# ---------------------------------------------------------------------------------------
def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of ``z`` onto the probability simplex along ``dim`` (Martins &
    Astudillo 2016): ``max(z - tau, 0)`` with tau chosen so the result sums to 1."""
    z = z.transpose(dim, -1)
    zs, _ = torch.sort(z, dim=-1, descending=True)
    cums = zs.cumsum(-1)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    support = (1 + k * zs) > cums
    size = support.sum(-1, keepdim=True)  # >= 1: the largest entry always qualifies
    tau = (cums.gather(-1, size - 1) - 1) / size.to(z.dtype)
    return torch.clamp(z - tau, min=0).transpose(dim, -1)


def _pixel_centres(n: int, like: torch.Tensor) -> torch.Tensor:
    # Normalised [-1, 1] coordinates of pixel centres (align_corners=False convention).
    return (2 * torch.arange(n, dtype=like.dtype, device=like.device) + 1) / n - 1


def mask_to_zoom(mask: torch.Tensor, min_scale: float = 0.05, box_sigmas: float = 1.0):
    """(s, tx, ty), each (G,), from masks (G, H, W) that each sum to 1; |t| + s <= 1."""
    _, h, w = mask.shape
    xs, ys = _pixel_centres(w, mask), _pixel_centres(h, mask)
    px, py = mask.sum(1), mask.sum(2)  # marginals over x (G, W) and y (G, H)
    mx, my = (px * xs).sum(1), (py * ys).sum(1)
    vx = (px * (xs - mx[:, None]) ** 2).sum(1)
    vy = (py * (ys - my[:, None]) ** 2).sum(1)
    s = box_sigmas * torch.sqrt((vx + vy) / 2 + 1e-12)
    s = torch.clamp(s, min=min_scale, max=1.0)
    # Centre on the centroid, pushed inward just enough that the box stays in its parent.
    margin = 1 - s
    tx = torch.maximum(torch.minimum(mx, margin), -margin)
    ty = torch.maximum(torch.minimum(my, margin), -margin)
    return s, tx, ty


def box_mass(mask: torch.Tensor, s: float, tx: float, ty: float) -> float:
    """Share of a (H, W) mask inside the zoom box (s, tx, ty): the box's score."""
    h, w = mask.shape
    xs, ys = _pixel_centres(w, mask), _pixel_centres(h, mask)
    inx = ((xs >= tx - s) & (xs <= tx + s)).to(mask.dtype)
    iny = ((ys >= ty - s) & (ys <= ty + s)).to(mask.dtype)
    return float((mask * iny[:, None] * inx[None, :]).sum())


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------
class GroupedLocaliser(nn.Module):
    """``groups`` independent conv stacks (one per field x patch), run as grouped convs:
    two Inception-like layers (parallel kernels, concatenated, ReLU) then a 1x1 score conv."""

    def __init__(self, groups: int, kernel_sizes: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.groups = groups
        cat = width * len(kernel_sizes)
        self.layer1 = nn.ModuleList(
            nn.Conv2d(groups * 3, groups * width, k, padding=k // 2, groups=groups) for k in kernel_sizes
        )
        self.layer2 = nn.ModuleList(
            nn.Conv2d(groups * cat, groups * width, k, padding=k // 2, groups=groups) for k in kernel_sizes
        )
        # No bias: sparsemax ignores a constant shift.
        self.score = nn.Conv2d(groups * cat, groups, 1, groups=groups, bias=False)

    def _inception(self, branches: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        g, (h, w) = self.groups, x.shape[-2:]
        outs = [b(x).view(g, -1, h, w) for b in branches]  # keep each group's channels together
        return F.relu(torch.cat(outs, 1)).reshape(1, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(G, 3, H, W) images, one per stack -> (G, H, W) scores."""
        g, _, h, w = x.shape
        if g != self.groups:
            raise ValueError(f"localiser built for {self.groups} stacks got {g} images")
        y = self._inception(self.layer1, x.reshape(1, g * 3, h, w))
        y = self._inception(self.layer2, y)
        return self.score(y).view(g, h, w)


class PooledSmallCNN(nn.Module):
    """The shared small CNN and a global average: the ``tiny`` feature net."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = SmallCNN(width)
        self.out_features = self.body.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


def _feature_net(kind: str, small_width: int) -> tuple[nn.Module, int]:
    """A network mapping (B, 3, H, W) in [0, 1]-normalised form to (B, D) features."""
    if kind == "small":
        net = PooledSmallCNN(small_width)
        return net, net.out_features
    if kind == "inception_v3":
        # transform_input: the ImageNet weights expect inputs rescaled from ImageNet statistics.
        net = backbones.build("inception_v3", transform_input=True)
    else:
        net = backbones.build(kind)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class AuxClassifier(nn.Module):
    """Slide-level prediction from a set of images: mean of per-image features, then linear."""

    def __init__(self, kind: str, small_width: int, classes: int) -> None:
        super().__init__()
        self.net, dim = _feature_net(kind, small_width)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(backbones.normalise(images)).mean(0))


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------
@dataclass
class _Pass:
    """What one forward pass produced."""

    logits: torch.Tensor  # (T, C): one prediction per final patch, in GRU order
    aux: dict[int, torch.Tensor]  # layer -> (C,)


class MagNet(SlideModel):
    name = "magnet"

    def __init__(self, config: MagNetConfig, classes: list[str] | None = None) -> None:
        super().__init__(config, classes)
        cfg = config
        self.localisers = nn.ModuleDict()
        fields = 1
        for i, p in enumerate(cfg.patches):
            learned = p - (1 if self._frozen(i) else 0)
            if learned:
                self.localisers[str(i)] = GroupedLocaliser(fields * learned, tuple(cfg.kernel_sizes), cfg.branch_width)
            fields *= p
        self.backbone, dim = _feature_net(cfg.backbone, cfg.small_width)
        if cfg.backbone != "small":
            self.pretrained(cfg.backbone, self.backbone, cfg.backbone_weights)
        self.gru = nn.GRU(dim, cfg.gru_hidden, batch_first=True)
        head: list[nn.Module] = []
        width = cfg.gru_hidden
        for hidden in cfg.fc_hidden:
            head += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        head.append(nn.Linear(width, self.num_classes))
        self.head = nn.Sequential(*head)
        self.aux_layers = sorted({min(max(a, 1), cfg.layers) for a in cfg.aux_layers})
        self.aux = nn.ModuleDict({
            str(a): AuxClassifier(cfg.aux_backbone, cfg.small_width, self.num_classes)
            for a in self.aux_layers
        })
        if cfg.aux_backbone != "small":
            for aux in self.aux.values():
                self.pretrained(cfg.aux_backbone, aux.net, cfg.aux_weights)

    def _frozen(self, layer_index: int) -> bool:
        return self.config.frozen_layer == layer_index + 1

    # -- public API ----------------------------------------------------------------------
    def backbone_parameters(self) -> list[nn.Parameter]:
        params = list(self.backbone.parameters())
        for aux in self.aux.values():
            params += list(aux.net.parameters())
        return params

    def training_step(self, view: SlideView, label: int, epoch: int = 0) -> StepOutput:
        self.check_label(label)
        out = self._forward(view, emit=None, with_aux=True)
        target = torch.tensor([int(label)], device=self.device)
        ce = F.cross_entropy(out.logits[-1:], target)
        loss = ce
        parts = {"ce": float(ce.detach())}
        aux_ce = {a: F.cross_entropy(out.aux[a][None], target) for a in self.aux_layers}
        for a, v in aux_ce.items():
            loss = loss + v
            parts[f"ce_aux{a}"] = float(v.detach())
        if len(self.aux_layers) >= 2:
            shallow, deep = aux_ce[self.aux_layers[0]], aux_ce[self.aux_layers[-1]]
            paradox = F.relu(deep - shallow.detach())
            loss = loss + self.config.paradox_weight * paradox
            parts["paradox"] = float(paradox.detach())
        parts["loss"] = float(loss.detach())
        return StepOutput(loss=loss, logits=out.logits[-1], parts=parts)

    def explain(self, view: SlideView, emit: Emit) -> list[float]:
        with torch.no_grad():
            out = self._forward(view, emit=emit, with_aux=False)
            return [float(p) for p in torch.softmax(out.logits[-1], 0)]

    # -- the forward pass ------------------------------------------------------------------
    def _forward(self, view: SlideView, emit: Emit | None, with_aux: bool) -> _Pass:
        cfg = self.config
        if cfg.grey_filter:
            view.use_grey_filter(True)
        n_final = cfg.total_patches
        total = cfg.layers + n_final
        bounds: Rect = tuple(map(float, view.bounds))
        fields: list[Rect] = [bounds]
        ids: list[int] = [0]
        next_id = 1
        first_px = cfg.first_source
        if emit is not None:
            emit(Field(0, None, 0, bounds, 1.0, "view", view.magnification_of(bounds[2], first_px)))
            emit(Progress(0, total, "reading the slide"))
        dev = self.device
        src = view.read_tensor(fields, first_px, first_px).to(dev)  # I' of layer 1
        x = F.interpolate(src, size=(cfg.input_px, cfg.input_px), mode="area")  # I of layer 1
        aux_images: dict[int, torch.Tensor] = {}
        patches = x
        for i, p in enumerate(cfg.patches):
            layer, last = i + 1, i + 1 == cfg.layers
            s, tx, ty, masks = self._zoom(i, x)
            out_px = cfg.final_px if last else cfg.input_px
            patches = crop(src.repeat_interleave(p, 0), zoom_theta(s, tx, ty), out_px, out_px, cfg.sampler)
            if with_aux and layer in self.aux_layers:
                aux_images[layer] = patches
            sd, txd, tyd = s.detach().tolist(), tx.detach().tolist(), ty.detach().tolist()
            children = [theta_to_rect(sd[j], txd[j], tyd[j], fields[j // p]) for j in range(len(sd))]
            child_ids = list(range(next_id, next_id + len(children)))
            next_id += len(children)
            next_px = cfg.final_source_px if layer + 1 == cfg.layers else cfg.source_px
            if emit is not None:
                self._emit_layer(view, emit, layer, p, fields, ids, children, child_ids, (sd, txd, tyd), masks,
                                 cfg.final_px if last else next_px)
                emit(Progress(layer, total, f"layer {layer} of {cfg.layers}"))
            if not last:
                src = view.read_tensor(children, next_px, next_px).to(dev)
                x = patches
            fields, ids = children, child_ids
        logits = self._classify(patches, ids, emit, total)
        aux = {a: self.aux[str(a)](aux_images[a]) for a in aux_images}
        return _Pass(logits=logits, aux=aux)

    def _zoom(self, i: int, x: torch.Tensor):
        """Zoom parameters (each (N * P,)) for the N images ``x`` of layer ``i``, and the learned
        masks (N * learned, H, W) or None."""
        cfg = self.config
        n, p = x.shape[0], cfg.patches[i]
        frozen = self._frozen(i)
        learned = p - (1 if frozen else 0)
        masks = None
        parts = []
        if learned:
            scores = self.localisers[str(i)](backbones.normalise(x.repeat_interleave(learned, 0)))
            g, h, w = scores.shape
            masks = sparsemax(scores.reshape(g, h * w) / w).view(g, h, w)
            parts = [v.view(n, learned) for v in mask_to_zoom(masks, cfg.min_scale, cfg.box_sigmas)]
        else:
            parts = [x.new_zeros(n, 0)] * 3
        if frozen:
            whole = [x.new_ones(n, 1), x.new_zeros(n, 1), x.new_zeros(n, 1)]
            parts = [torch.cat([a, b], 1) for a, b in zip(whole, parts)]
        s, tx, ty = (v.reshape(-1) for v in parts)
        return s, tx, ty, masks

    def _emit_layer(self, view, emit: Emit, layer: int, p: int, fields, ids, children, child_ids, zoom,
                    masks, read_px: int) -> None:
        cfg = self.config
        sd, txd, tyd = zoom
        frozen = self._frozen(layer - 1)
        learned = p - (1 if frozen else 0)
        for j, rect in enumerate(children):
            parent, k = j // p, j % p
            fx, fy, fw, fh = fields[parent]
            score = 1.0
            if not (frozen and k == 0):
                m = masks[parent * learned + k - (1 if frozen else 0)]
                h, w = m.shape
                emit(AttentionMap(
                    name=f"layer {layer} patch {k + 1} of field {ids[parent]}",
                    group=f"layer {layer}",
                    magnification=view.magnification_of(fw, w),
                    origin=(fx, fy),
                    cell=(fw / w, fh / h),
                    values=m.tolist(),
                ))
                score = box_mass(m, sd[j], txd[j], tyd[j])
            # Detail is bounded by both the crop's own size and the parent's I' it comes from.
            mag = view.magnification_of(rect[2], read_px)
            if layer == cfg.layers and mag is not None:
                mag = min(mag, view.magnification_of(fw, cfg.final_source_px))
            emit(Field(child_ids[j], ids[parent], layer, rect, score, "zoom", mag))

    def _classify(self, patches: torch.Tensor, ids: list[int], emit: Emit | None, total: int) -> torch.Tensor:
        """GRU over the final patches in tree order -> (T, C) logits, one row per step."""
        cfg = self.config
        t_all = patches.shape[0]
        # Training embeds all patches at once (one batch, as BatchNorm in ``paper`` expects).
        chunk = cfg.chunk if emit is not None else t_all
        hidden = None
        logits = []
        for a in range(0, t_all, chunk):
            feats = self.backbone(backbones.normalise(patches[a : a + chunk]))
            seq, hidden = self.gru(feats[None], hidden)
            step_logits = self.head(seq[0])
            logits.append(step_logits)
            if emit is not None:
                probs = torch.softmax(step_logits, 1)
                for b in range(step_logits.shape[0]):
                    emit(TrailStep(a + b, ids[a + b], [float(v) for v in probs[b]]))
                done = min(a + chunk, t_all)
                emit(Progress(cfg.layers + done, total, f"patch {done} / {t_all}"))
        return torch.cat(logits, 0)


MODEL = MagNet
