"""A very small SlideModel for testing the runner and the trainer without the real models.
Registered under the name ``fake`` by the tests that use it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engines.models.base import SlideModel, StepOutput
from engines.trace import Field, Progress


@dataclass
class FakeConfig:
    side: int = 8
    dropout: float = 0.3
    accumulation: int = 1


PRESETS = {"tiny": FakeConfig(), "paper": FakeConfig(side=16)}


class FakeModel(SlideModel):
    name = "fake"

    def __init__(self, config: FakeConfig, classes=None) -> None:
        super().__init__(config, classes)
        self.backbone = nn.Linear(3 * config.side * config.side, 8)
        self.head = nn.Linear(8, self.num_classes)

    def _logits(self, view) -> torch.Tensor:
        x = view.read_tensor([view.bounds], self.config.side, self.config.side).flatten(1)
        h = F.dropout(torch.relu(self.backbone(x)), self.config.dropout, self.training)
        return self.head(h)[0]

    def training_step(self, view, label, epoch=0):
        logits = self._logits(view)
        loss = F.cross_entropy(logits[None], torch.tensor([label]))
        return StepOutput(loss, logits, {"ce": float(loss.detach())})

    def explain(self, view, emit):
        emit(Field(0, None, 0, view.bounds, 1.0, "view"))
        emit(Progress(0, 1, "fake"))
        probs = torch.softmax(self._logits(view), 0)
        return [float(p) for p in probs]

    def backbone_parameters(self):
        return list(self.backbone.parameters())


MODEL = FakeModel
