"""A very small SlideModel for testing the runner and the trainer without the real models.
Registered under the name ``fake`` by the tests that use it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engines.models.base import SlideModel, StepOutput
import time

from engines.trace import AttentionMap, Field, Progress, TrailStep


@dataclass
class FakeConfig:
    side: int = 8
    dropout: float = 0.3
    accumulation: int = 1
    seconds: float = 0.0  # run this long, emitting progress, before answering
    fail: bool = False  # raise inside explain, as a broken model would


PRESETS = {"tiny": FakeConfig(), "paper": FakeConfig(side=16)}


class FakeModel(SlideModel):
    name = "fake"

    def __init__(self, config: FakeConfig, classes=None) -> None:
        super().__init__(config, classes)
        self.backbone = nn.Linear(3 * config.side * config.side, 8)
        self.head = nn.Linear(8, self.num_classes)

    def _logits(self, view) -> torch.Tensor:
        x = view.read_tensor([view.bounds], self.config.side, self.config.side).flatten(1).to(self.device)
        h = F.dropout(torch.relu(self.backbone(x)), self.config.dropout, self.training)
        return self.head(h)[0]

    def training_step(self, view, label, epoch=0):
        logits = self._logits(view)
        loss = F.cross_entropy(logits[None], torch.tensor([label], device=logits.device))
        return StepOutput(loss, logits, {"ce": float(loss.detach())})

    def explain(self, view, emit):
        x, y, w, h = view.bounds
        emit(Field(0, None, 0, view.bounds, 1.0, "view"))
        emit(Progress(0, 1, "fake"))
        end = time.monotonic() + self.config.seconds
        while time.monotonic() < end:
            time.sleep(0.02)
            emit(Progress(0, 1, "waiting"))
        if self.config.fail:
            raise RuntimeError("the fake model broke on purpose")
        # Two zoom boxes in the left and right halves, a child inside the first, a trail
        # through the three, and a 2 x 2 map over the view.
        emit(Field(1, 0, 1, (x + w * 0.1, y + h * 0.1, w * 0.3, h * 0.3), 0.6, "zoom"))
        emit(Field(2, 0, 1, (x + w * 0.6, y + h * 0.6, w * 0.3, h * 0.3), 0.4, "zoom"))
        emit(Field(3, 1, 2, (x + w * 0.15, y + h * 0.15, w * 0.1, h * 0.1), 0.9, "zoom"))
        for i, fid in enumerate((1, 3, 2)):
            emit(TrailStep(i, fid, [1 - 0.3 * i - 0.1, 0.3 * i + 0.1]))
        emit(AttentionMap("fake map", "fake", None, (x, y), (w / 2, h / 2), [[0.1, 0.2], [0.3, 0.4]]))
        probs = torch.softmax(self._logits(view), 0)
        return [float(p) for p in probs]

    def backbone_parameters(self):
        return list(self.backbone.parameters())


MODEL = FakeModel
