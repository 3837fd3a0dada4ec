"""Exports run off the GUI thread with progress and Cancel, as a user meets them from the File
menu: the window keeps handling events while an export reads tiles or writes GeoJSON, and a
cancelled export leaves neither the file nor a temporary file behind."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QFileDialog, QProgressDialog, QPushButton

from engines.trace import AttentionMap, SlideRef, Trace
from tests.conftest import DEMO_SLIDE
from tests.test_main_window import (  # noqa: F401
    OPEN_TIMEOUT_MS,
    _sandboxed_settings,
    dialogs,
    make_window,
    open_and_wait,
    qsettings,
)

DEMO_W, DEMO_H = 2220, 2967
RELEASE_S = 8.0  # a held read lets go by itself after this (so a GUI-thread export cannot hang)


@pytest.fixture
def window(qtbot, qsettings, dialogs):  # noqa: F811
    w = make_window(qtbot, qsettings, size=(900, 640))
    open_and_wait(qtbot, w, DEMO_SLIDE)
    yield w
    w.close()


@pytest.fixture
def gate():
    """Reads held at a gate; released by the test or, at the latest, by a timer."""
    ev = threading.Event()
    timer = threading.Timer(RELEASE_S, ev.set)
    timer.start()
    yield ev
    ev.set()
    timer.cancel()


def _save_as(monkeypatch, target) -> None:
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))


def _ticks(qtbot, gate: threading.Event, n: int = 3) -> list[bool]:
    """Let a GUI timer fire ``n`` times; each tick records whether the gate was open yet."""
    seen: list[bool] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: seen.append(gate.is_set()))
    timer.start()
    try:
        qtbot.waitUntil(lambda: len(seen) >= n, timeout=30_000)
    finally:
        timer.stop()
    return seen


def _cancel_from_dialog(qtbot, window) -> None:
    qtbot.waitUntil(lambda: any(d.isVisible() for d in window.findChildren(QProgressDialog)),
                    timeout=10_000)
    dialog = next(d for d in window.findChildren(QProgressDialog) if d.isVisible())
    button = next(b for b in dialog.findChildren(QPushButton) if "Cancel" in b.text())
    button.click()


@pytest.mark.parametrize("action", ["export_action", "figure_action"])
def test_png_export_keeps_the_gui_running_and_cancel_leaves_nothing(qtbot, window, gate, tmp_path,
                                                                    monkeypatch, dialogs, action):
    canvas = window.canvas
    slide = canvas.grid.slide
    reading = threading.Event()
    read = slide.read_region_xrgb

    def held(*args, **kwargs):
        reading.set()
        gate.wait(30)
        return read(*args, **kwargs)

    monkeypatch.setattr(slide, "read_region_xrgb", held)
    # Zoomed in, with no tile in memory (the demo slide has one level, so the fitted view
    # may already have read every tile): every tile of the export must be read.
    canvas.center_on(DEMO_W * 0.7, DEMO_H * 0.6, scale=1.0, animate=False)
    canvas.cache.clear()
    out = tmp_path / "out"
    out.mkdir()
    _save_as(monkeypatch, out / "view.png")
    getattr(window, action).trigger()
    qtbot.waitUntil(reading.is_set, timeout=10_000)
    ticks = _ticks(qtbot, gate)
    assert not any(ticks), "the event loop stood still while the export read its tiles"
    assert len(window.exports) == 1 and window.exports[0].running
    _cancel_from_dialog(qtbot, window)
    gate.set()
    qtbot.waitUntil(lambda: not window.exports, timeout=30_000)
    assert sorted(p.name for p in out.iterdir()) == []  # no PNG, no temporary file
    assert "cancelled" in window.statusBar().currentMessage()
    assert not dialogs
    # Not cancelled, the same export finishes.
    getattr(window, action).trigger()
    qtbot.waitUntil(lambda: not window.exports, timeout=30_000)
    assert sorted(p.name for p in out.iterdir()) == ["view.png"]
    assert not dialogs


def _big_trace() -> Trace:
    rng = np.random.default_rng(0)
    maps = [AttentionMap(f"m{k}", "filter", 5.0, (0.0, 0.0), (DEMO_W / 60, DEMO_H / 60),
                         (rng.random((60, 60)) + 0.01).tolist()) for k in range(4)]
    return Trace(model="grid_attention", preset="tiny", checkpoint=None,
                 slide=SlideRef(str(DEMO_SLIDE), DEMO_W, DEMO_H, 0.499),
                 classes=["normal", "tumor"], probs=[0.3, 0.7], fields=[], maps=maps, trail=[])


def test_geojson_export_runs_in_a_worker_and_cancel_leaves_nothing(qtbot, window, gate, tmp_path,
                                                                   monkeypatch, dialogs):
    saved = tmp_path / "t.json"
    _big_trace().save(saved)
    assert window.open_trace(saved)
    on_gui: list[bool] = []
    writing = threading.Event()
    from engines import map_export

    save_geojson = map_export.save_contours_geojson  # the default export: iso-contours

    def held(self, path, progress=None, cancel=None):
        on_gui.append(threading.current_thread() is threading.main_thread())

        def report(done, total):
            writing.set()
            gate.wait(30)
            if progress is not None:
                progress(done, total)

        return save_geojson(self, path, progress=report, cancel=cancel)

    monkeypatch.setattr(map_export, "save_contours_geojson", held)
    out = tmp_path / "out"
    out.mkdir()
    _save_as(monkeypatch, out / "t.geojson")
    window.geojson_action.trigger()
    qtbot.waitUntil(writing.is_set, timeout=10_000)
    assert on_gui == [False]
    assert not any(_ticks(qtbot, gate))
    _cancel_from_dialog(qtbot, window)
    gate.set()
    qtbot.waitUntil(lambda: not window.exports, timeout=30_000)
    assert sorted(p.name for p in out.iterdir()) == []
    assert not dialogs


def test_save_trace_runs_in_a_worker(qtbot, window, tmp_path, monkeypatch, dialogs):
    saved = tmp_path / "t.json"
    _big_trace().save(saved)
    assert window.open_trace(saved)
    on_gui: list[bool] = []
    to_json = Trace.to_json

    def spy(self, *args, **kwargs):
        on_gui.append(threading.current_thread() is threading.main_thread())
        return to_json(self, *args, **kwargs)

    monkeypatch.setattr(Trace, "to_json", spy)
    target = tmp_path / "copy.trace.json"
    _save_as(monkeypatch, target)
    window.save_trace_action.trigger()
    qtbot.waitUntil(lambda: not window.exports and target.exists(), timeout=30_000)
    assert on_gui == [False]
    assert Trace.load(target).maps[0].values == Trace.load(saved).maps[0].values
    assert not dialogs
