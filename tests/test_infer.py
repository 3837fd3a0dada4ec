"""The inference runner: events into the trace and out to the caller, eval/no-grad, ROI,
cancellation, probability checks, and the real models' tiny presets on the demo slide."""
from __future__ import annotations

import importlib
import math
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from engines import infer, registry
from engines.models.base import SlideModel
from engines.slide import Slide
from engines.trace import AttentionMap, Field, Progress, Trace, TrailStep
from tests.conftest import DEMO_SLIDE


@dataclass
class EchoConfig:
    steps: int = 3
    bad_probs: str = ""  # "", "short", "nan" or "tensor"


class EchoModel(SlideModel):
    """Emits a view field, one child per step, a 2x2 map and a trail, with Progress between;
    records the mode it ran in."""

    name = "echo"

    def __init__(self, config: EchoConfig = EchoConfig(), classes=None) -> None:
        super().__init__(config, classes)
        self.lin = nn.Linear(2, self.num_classes)
        self.seen: dict[str, object] = {}

    def explain(self, view, emit):
        self.seen = {"training": self.training, "grad": torch.is_grad_enabled(),
                     "threads": torch.get_num_threads(), "bounds": view.bounds}
        x, y, w, h = view.bounds
        emit(Field(0, None, 0, view.bounds, 1.0, "view"))
        n = self.config.steps
        for i in range(n):
            emit(Progress(i, n, f"step {i}"))
            emit(Field(i + 1, 0, 1, (x + i * w / n, y, w / n, h / 2), 0.5, "patch"))
            emit(TrailStep(i, i + 1, [0.5, 0.5]))
        emit(AttentionMap("a", "g", None, (x, y), (w / 2, h / 2), [[0.1, 0.2], [0.3, 0.4]]))
        out = torch.softmax(self.lin(torch.ones(2)), 0)
        if self.config.bad_probs == "short":
            return [1.0]
        if self.config.bad_probs == "nan":
            return [math.nan, 0.5]
        if self.config.bad_probs == "tensor":
            return out
        return [float(p) for p in out]


class BusyModel(SlideModel):
    """Runs module forwards for up to ``seconds`` without emitting anything."""

    name = "busy"

    def __init__(self, seconds: float = 20.0) -> None:
        super().__init__(None)
        self.seconds = seconds
        self.lin = nn.Linear(4, 2)
        self.forwards = 0

    def explain(self, view, emit):
        emit(Progress(0, 1, "busy"))
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            self.lin(torch.zeros(1, 4))
            self.forwards += 1
            time.sleep(0.002)
        return [0.5, 0.5]


@pytest.fixture(scope="module")
def demo():
    with Slide(DEMO_SLIDE) as s:
        yield s


def test_events_reach_trace_and_caller_in_order(demo):
    model = EchoModel()
    model.preset = "tiny"
    model.train()
    seen = []
    trace = infer.run(model, demo, on_event=seen.append, checkpoint_id="abc123")
    # Every non-progress event the caller saw is in the trace, in the same order.
    shown = [e for e in seen if not isinstance(e, Progress)]
    assert shown[0] is trace.fields[0]
    assert [e for e in shown if isinstance(e, Field)] == trace.fields
    assert [e for e in shown if isinstance(e, TrailStep)] == trace.trail
    assert [e for e in shown if isinstance(e, AttentionMap)] == trace.maps
    assert len(trace.fields) == 4 and len(trace.trail) == 3 and len(trace.maps) == 1
    # The last event is the runner's own "done" with the model's last total.
    assert seen[-1] == Progress(3, 3, "done")
    assert model.seen["training"] is False and model.seen["grad"] is False
    assert model.training  # mode restored
    assert trace.model == "echo" and trace.preset == "tiny" and trace.checkpoint == "abc123"
    assert trace.classes == ["normal", "tumor"] and sum(trace.probs) == pytest.approx(1.0)
    assert trace.slide.width == demo.width and trace.slide.height == demo.height
    assert trace.slide.mpp == pytest.approx(demo.mpp)
    assert trace.roi is None and trace.fields[0].rect == (0.0, 0.0, demo.width, demo.height)
    assert trace.timings["total_s"] >= trace.timings["explain_s"] > 0
    assert 0 <= trace.timings["first_event_s"] <= trace.timings["total_s"]
    assert Trace.from_json(trace.to_json()) == trace


def test_path_input_and_roi(demo, tmp_path):
    model = EchoModel()
    roi = (100, 200, 640, 480)
    trace = infer.run(model, str(DEMO_SLIDE), roi=roi)
    assert trace.slide.path == str(DEMO_SLIDE)
    assert trace.roi == (100.0, 200.0, 640.0, 480.0)
    assert model.seen["bounds"] == trace.roi
    for f in trace.fields:
        assert trace.fields[0].contains(f)
    assert trace.preset == "custom" and trace.checkpoint is None


@pytest.mark.parametrize("roi", [(5000, 0, 10, 10), (0, 0, 0, 10), (0, 0, 10, -1),
                                 (0, 0, math.inf, 10), (1, 2, 3), ("a", 0, 1, 1)])
def test_bad_roi_is_refused(demo, roi):
    with pytest.raises(ValueError, match="region of interest"):
        infer.run(EchoModel(), demo, roi=roi)


def test_cancel_from_event_stops_the_run(demo):
    cancel = threading.Event()
    seen = []

    def on_event(e):
        seen.append(e)
        if isinstance(e, TrailStep):
            cancel.set()

    with pytest.raises(infer.Cancelled):
        infer.run(EchoModel(EchoConfig(steps=10)), demo, on_event=on_event, cancel=cancel)
    assert sum(isinstance(e, TrailStep) for e in seen) == 1  # nothing after the cancel


def test_cancel_callable_and_preset_cancel(demo):
    model = EchoModel()
    with pytest.raises(infer.Cancelled):
        infer.run(model, demo, cancel=lambda: True)
    assert model.seen == {}  # never started


def test_cancel_reaches_a_model_that_does_not_emit(demo):
    model = BusyModel(seconds=20.0)
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(infer.Cancelled):
            infer.run(model, demo, cancel=cancel)
    finally:
        timer.cancel()
    # Stopped by the forward hook long before the model's own 20 s loop ended.
    assert time.monotonic() - t0 < 5.0
    assert model.forwards > 0
    # Hooks are gone afterwards: the module runs normally.
    cancel.set()
    model.lin(torch.zeros(1, 4))


@pytest.mark.parametrize("bad,msg", [("short", "1 probabilities for 2 classes"), ("nan", "non-finite")])
def test_bad_probabilities_are_refused(demo, bad, msg):
    with pytest.raises(ValueError, match=msg):
        infer.run(EchoModel(EchoConfig(bad_probs=bad)), demo)


def test_tensor_probabilities_and_threads_restored(demo):
    before = torch.get_num_threads()
    model = EchoModel(EchoConfig(bad_probs="tensor"))
    trace = infer.run(model, demo, threads=before + 1)
    assert model.seen["threads"] == before + 1
    assert torch.get_num_threads() == before
    assert len(trace.probs) == 2 and all(isinstance(p, float) for p in trace.probs)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(registry.MODULES[name])
        return True
    except Exception:  # noqa: BLE001 - a model still being written counts as absent
        return False


@pytest.mark.parametrize("name", registry.list_models())
def test_real_tiny_models_report_level0_geometry_inside_the_roi(demo, name):
    if not _importable(name):
        pytest.skip(f"{name} is not available yet")
    torch.manual_seed(0)
    model = registry.create(name, "tiny")
    roi = (300.0, 400.0, 1400.0, 1800.0)
    seen = []
    trace = infer.run(model, demo, on_event=seen.append, roi=roi)
    assert trace.model == name and trace.preset == "tiny" and trace.roi == roi
    assert sum(trace.probs) == pytest.approx(1.0, abs=1e-4)
    assert trace.fields, "every model shows at least the field it looked at"
    rx, ry, rw, rh = roi
    tol = 0.02 * max(rw, rh)
    for f in trace.fields:
        x, y, w, h = f.rect
        assert x >= rx - tol and y >= ry - tol and x + w <= rx + rw + tol and y + h <= ry + rh + tol, f
    for m in trace.maps:
        x, y, w, h = m.rect
        assert x < rx + rw and y < ry + rh and x + w > rx and y + h > ry, m.name
    assert isinstance(seen[-1], Progress) and seen[-1].stage == "done"
    assert Trace.from_json(trace.to_json()).to_dict() == trace.to_dict()
