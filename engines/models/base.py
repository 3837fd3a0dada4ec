"""What every slide model offers the inference runner and the trainer."""
from __future__ import annotations

import numbers

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from engines.sampling import SlideView
from engines.trace import Event

Emit = Callable[[Event], None]
DEFAULT_CLASSES = ["normal", "tumor"]


@dataclass
class StepOutput:
    """One training step on one slide: the total loss to back-propagate, the slide logits
    (shape (C,)) and each loss term as a float for logging."""

    loss: torch.Tensor
    logits: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class SlideModel(nn.Module):
    """Base class. A model reads a ``SlideView`` itself, so it decides where to look.

    * ``training_step(view, label, epoch)`` runs the paper's training forward and losses.
    * ``explain(view, emit)`` runs inference, calls ``emit`` with every Field, AttentionMap,
      TrailStep and Progress as soon as it exists (level-0 coordinates), and returns the
      final class probabilities. ``emit`` raises ``Cancelled`` when the user cancels, so
      models emit Progress at least every few hundred milliseconds of work.

    Both run wherever the model's weights are (``device``); what they emit and return are
    Python numbers, whatever the device.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: Any, classes: list[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.classes = list(classes or DEFAULT_CLASSES)

    def pretrained(self, arch: str, net: nn.Module, weights_path: str | None) -> None:
        """Note that ``net`` (a torchvision ``arch`` this model is built from, or shares its
        layers with) takes ImageNet weights from ``weights_path``. Constructors only note it;
        ``load_pretrained`` opens the files."""
        # Kept outside nn.Module's registry: ``net`` is not a submodule of its own.
        self.__dict__.setdefault("_pretrained", []).append((arch, net, weights_path))

    def load_pretrained(self) -> None:
        """Load every noted weights file (each at most once); ``engines.registry.create``
        calls this after the constructor, as timm's builders do."""
        from engines.models import backbones

        for arch, net, path in self.__dict__.pop("_pretrained", []):
            backbones.load_weights(net, arch, path)

    def check_label(self, label: int) -> None:
        """Every model refuses a label that is not one of its class indices the same way."""
        if (isinstance(label, bool) or not isinstance(label, numbers.Integral)
                or not 0 <= int(label) < self.num_classes):
            raise ValueError(f"{self.name}: label {label!r} is not a class index (0..{self.num_classes - 1})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (its first parameter's, else first buffer's device;
        the CPU for a model with neither). Models put the pixels they read and every tensor
        they make here, so ``model.to(device)`` is all it takes to run on a GPU."""
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def training_step(self, view: SlideView, label: int, epoch: int = 0) -> StepOutput:
        raise NotImplementedError

    def explain(self, view: SlideView, emit: Emit) -> list[float]:
        raise NotImplementedError

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters a fine-tune may freeze (the pretrained feature extractor)."""
        return []

    def make_optimizer(self, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
