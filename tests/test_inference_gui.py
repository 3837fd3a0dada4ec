"""Watching a model think, driven as a user drives it: the Models dock runs a model on the
engine thread, layers fill the canvas where the trace says, cancel is quick, a broken model
becomes a message, stepping and trail clicks move the camera."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QColor

from engines import registry
from tests.conftest import DEMO_SLIDE
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, open_and_wait, qsettings  # noqa: F401
from viewer.overlays import colormaps
from viewer.overlays.heatmap import HeatmapOverlay

RUN_TIMEOUT_MS = 120_000


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(registry.MODULES, "fake", "tests.fake_model")
    return importlib.import_module("tests.fake_model")


@pytest.fixture
def window(qtbot, qsettings, dialogs):  # noqa: F811
    w = make_window(qtbot, qsettings, size=(1200, 800))
    open_and_wait(qtbot, w, DEMO_SLIDE)
    yield w
    w.close()


def choose(window, model: str, preset: str = "tiny", scope: str = "Whole slide") -> None:
    panel = window.models_panel
    if panel.model_combo.findText(model) < 0:
        panel.model_combo.addItem(model)
    panel.model_combo.setCurrentText(model)
    panel.preset_combo.setCurrentText(preset)
    panel.checkpoint_combo.setCurrentIndex(0)  # initial weights
    panel.scope_combo.setCurrentText(scope)


def run_and_wait(qtbot, window):
    ctl = window.inference
    with qtbot.waitSignal(ctl.engine.done, timeout=RUN_TIMEOUT_MS):
        qtbot.mouseClick(window.models_panel.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: ctl.run_id is None, timeout=5000)
    return ctl.current


def wait_still(qtbot, canvas):
    qtbot.waitUntil(lambda: not canvas.is_animating(), timeout=5000)


def _rgb(img, x, y):
    c = QColor(img.pixel(int(x), int(y)))
    return np.array([c.red(), c.green(), c.blue()])


def _installed(name: str) -> bool:
    try:
        importlib.import_module(registry.MODULES[name])
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("name", registry.list_models())
def test_each_model_runs_from_the_dock_and_paints_its_layers(qtbot, window, name):
    if not _installed(name):
        pytest.skip(f"{name} is not available")
    choose(window, name)
    layers = run_and_wait(qtbot, window)
    trace = layers.trace
    assert trace.model == name and len(trace.probs) == 2 and abs(sum(trace.probs) - 1) < 1e-4
    assert window.models_panel.prediction.rowCount() == 2
    on_canvas = window.canvas.overlays()
    assert layers.overlays() and all(o in on_canvas for o in layers.overlays())
    names = [window.layers_panel.rows()[i].overlay.name for i in range(len(window.layers_panel.rows()))]
    assert any(name in n for n in names)  # listed in the Layers dock
    # Every visible map paints its own colours on its cells: probe a cell centre.
    shown = [o for o in layers.maps if o.visible][:2]
    for ov in shown:
        for other in window.canvas.overlays():
            other.visible = other is ov  # probe this map alone
        ov.opacity, ov.show_grid = 1.0, False
        rows, cols = ov.map.shape
        r, c = rows // 2, cols // 2
        x, y, w, h = ov.map.cell_rect(r, c)
        view = (x - w, y - h, 3 * w, 3 * h)  # the cell in the middle of the image
        img = window.canvas.render_image(90, 90, view)
        expect = colormaps.color(ov.colormap, float(ov.normalised()[r, c]))
        got = _rgb(img, 45, 45)
        assert np.abs(got - [expect.red(), expect.green(), expect.blue()]).max() <= 10, (ov.name, got)


def test_live_events_fill_layers_before_the_end(qtbot, window, fake):
    choose(window, "fake")
    seen = []
    window.inference.engine.event.connect(lambda rid, e: seen.append(type(e).__name__))
    layers = run_and_wait(qtbot, window)
    assert "Field" in seen and "TrailStep" in seen and "AttentionMap" in seen and "Progress" in seen
    assert len(layers.fields.fields) == 3 and len(layers.trail.steps) == 3 and len(layers.maps) == 1
    assert window.trail_plot.values()[0] == [1, 2, 3]
    assert window.trail_dock.isVisible()


def test_cancel_stops_within_a_second(qtbot, window, fake, monkeypatch):
    monkeypatch.setattr(fake, "PRESETS", {**fake.PRESETS, "tiny": fake.FakeConfig(seconds=60)})
    choose(window, "fake")
    ctl = window.inference
    with qtbot.waitSignal(ctl.engine.event, timeout=10_000):
        qtbot.mouseClick(window.models_panel.run_button, Qt.MouseButton.LeftButton)
    with qtbot.waitSignal(ctl.engine.cancelled, timeout=1000):
        qtbot.mouseClick(window.models_panel.cancel_button, Qt.MouseButton.LeftButton)
    assert window.models_panel.stage_label.text() == "Cancelled"
    assert window.models_panel.run_button.isEnabled()


def test_a_model_error_becomes_a_message_and_the_window_responds(qtbot, window, fake, monkeypatch):
    monkeypatch.setattr(fake, "PRESETS", {**fake.PRESETS, "tiny": fake.FakeConfig(fail=True)})
    choose(window, "fake")
    with qtbot.waitSignal(window.inference.engine.failed, timeout=10_000):
        qtbot.mouseClick(window.models_panel.run_button, Qt.MouseButton.LeftButton)
    assert "broke on purpose" in window.models_panel.error_label.text()
    assert window.models_panel.error_label.isVisible()
    before = window.canvas.camera.scale
    window.canvas.zoom_by(2.0, animate=False)
    qtbot.wait(50)
    assert window.canvas.camera.scale == pytest.approx(before * 2.0)


def test_stepping_moves_the_camera_along_the_path(qtbot, window, fake):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    canvas = window.canvas
    stops = layers.path()
    assert [s[2] for s in stops] == [0, 1, 1, 2]  # whole slide, two boxes, the child
    window.activateWindow()
    canvas.setFocus()
    for i in range(0, 4):
        qtbot.keyClick(canvas, Qt.Key.Key_BracketRight)
        wait_still(qtbot, canvas)
        x, y, w, h = stops[i][1][0]
        vx, vy, vw, vh = canvas.camera.view_rect()
        assert vx <= x and vy <= y and vx + vw >= x + w and vy + vh >= y + h  # it is in view
        assert canvas.camera.cx == pytest.approx(x + w / 2, abs=2) and canvas.camera.cy == pytest.approx(y + h / 2, abs=2)
        assert max(w / vw, h / vh) > 0.6  # and it fills the view
        assert layers.fields.focus_depth == (stops[i][2] or None)
    qtbot.keyClick(canvas, Qt.Key.Key_BracketLeft)
    wait_still(qtbot, canvas)
    assert window.inference.stop_index == 2


def test_clicking_a_trail_step_centres_on_its_patch(qtbot, window, fake):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    canvas = window.canvas
    canvas.fit_view(animate=False)
    step = layers.trace.trail[2]
    fx, fy, fw, fh = layers.trace.field_by_id(step.field_id).rect
    sx, sy = canvas.camera.to_screen(fx + fw / 2, fy + fh / 2)
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=QPoint(round(sx), round(sy)))
    wait_still(qtbot, canvas)
    assert canvas.camera.cx == pytest.approx(fx + fw / 2, abs=2)
    assert canvas.camera.cy == pytest.approx(fy + fh / 2, abs=2)
    assert layers.trail.highlight == step.index
    assert len(window.trail_plot.marker.data) == 1  # highlighted in the plot too
    # and clicking the plot point goes there as well
    window.trail_plot.step_clicked.emit(0)
    wait_still(qtbot, canvas)
    f0 = layers.trace.field_by_id(layers.trace.trail[0].field_id).rect
    assert canvas.camera.cx == pytest.approx(f0[0] + f0[2] / 2, abs=2)


def test_shift_drag_draws_a_region_and_runs_there(qtbot, window, fake):
    canvas = window.canvas
    canvas.fit_view(animate=False)
    a, b = QPoint(200, 150), QPoint(400, 330)
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ShiftModifier, a)
    qtbot.mouseMove(canvas, b)
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ShiftModifier, b)
    rect = window.inference.rubber.rect
    x0, y0 = canvas.camera.to_level0(a.x(), a.y())
    x1, y1 = canvas.camera.to_level0(b.x(), b.y())
    assert rect == pytest.approx((x0, y0, x1 - x0, y1 - y0), abs=1.0)
    assert window.models_panel.scope_combo.currentText() == "Drawn rectangle"
    window.models_panel.model_combo.addItem("fake")
    window.models_panel.model_combo.setCurrentText("fake")
    layers = run_and_wait(qtbot, window)
    assert layers.trace.roi == pytest.approx(rect)
    assert layers.trace.fields[0].rect == pytest.approx(rect)


def test_traces_are_kept_per_model_and_saved_and_reopened(qtbot, window, fake, tmp_path):
    choose(window, "fake")
    first = run_and_wait(qtbot, window)
    other = next(n for n in registry.list_models() if _installed(n))
    window.models_panel.model_combo.setCurrentText(other)
    assert not any(o in window.canvas.overlays() for o in first.overlays())  # toggled away
    window.models_panel.model_combo.setCurrentText("fake")
    assert all(o in window.canvas.overlays() for o in first.overlays())  # and back
    path = tmp_path / "t.json"
    window.inference.save_trace(path)
    window.inference.export_geojson(tmp_path / "t.geojson")
    assert window.export_figure(tmp_path / "fig.png", 400, 300)
    assert window.open_trace(path)
    again = window.inference.current
    assert again is not first and again.trace == first.trace
    assert isinstance(again.maps[0], HeatmapOverlay)
