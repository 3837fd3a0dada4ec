"""View > Compare Side by Side: two traces on canvases locked in pan and zoom, the difference
of their attention, both trails in one plot, and closing that stops every read."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QPoint, Qt

from app.compare_view import DIVERGING, TraceSource
from engines.trace import AttentionMap, Field, SlideRef, Trace, TrailStep
from tests.conftest import DATA, DEMO_SLIDE, ROOT
from tests.test_inference_gui import choose, fake, run_and_wait, wait_still, window  # noqa: F401
from tests.test_main_window import _sandboxed_settings, dialogs, qsettings  # noqa: F401
from viewer.trace_layers import TraceLayers

DEMO_W, DEMO_H = 2220, 2967
WHOLE = "whole slide"


def _trace(model: str, values, trail_probs, slide=DEMO_SLIDE, size=(DEMO_W, DEMO_H)) -> Trace:
    w, h = size
    rows, cols = np.asarray(values).shape
    fields = [Field(0, None, 0, (0, 0, w, h), 1.0, "view")]
    fields += [Field(i + 1, 0, 1, (w * 0.1 * (i + 1), h * 0.1 * (i + 1), w * 0.1, h * 0.1), 0.5, "zoom")
               for i in range(len(trail_probs))]
    trail = [TrailStep(i, i + 1, [1 - p, p]) for i, p in enumerate(trail_probs)]
    amap = AttentionMap(f"{model} map", "layer 1", None, (0.0, 0.0), (w / cols, h / rows),
                        np.asarray(values, float).tolist())
    return Trace(model=model, preset="tiny", checkpoint=None, slide=SlideRef(str(slide), w, h, 0.5),
                 classes=["normal", "tumor"], probs=[0.4, 0.6], fields=fields, maps=[amap], trail=trail)


def _put(window, key, trace: Trace) -> None:
    """Keep ``trace`` where the window keeps traces (the results store, else the controller)."""
    store = getattr(window, "results", None)
    if store is not None and hasattr(store, "put_trace"):
        store.put_trace(key, trace)
    else:
        window.inference.layers[key] = TraceLayers(window.canvas, trace, label=key[1])


@pytest.fixture
def two(window):  # noqa: F811
    slide = str(DEMO_SLIDE)
    a = (slide, "alpha", WHOLE)
    b = (slide, "beta", WHOLE)
    _put(window, a, _trace("alpha", [[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]], [0.2, 0.5, 0.9]))
    _put(window, b, _trace("beta", [[4, 1], [1, 4]], [0.6, 0.3]))
    return window, a, b


def _open(qtbot, window, a, b):
    view = window.compare.open(a, b)
    qtbot.addWidget(view)
    view.resize(1500, 700)
    for pane in (view.pane_a, view.pane_b, view.pane_diff):
        qtbot.waitUntil(lambda p=pane: p.canvas.slide is not None, timeout=10_000)
    qtbot.wait(50)  # layout: the canvases take their sizes
    return view


def _same_view(c1, c2) -> bool:
    return (c1.camera.cx, c1.camera.cy, c1.camera.scale) == pytest.approx(
        (c2.camera.cx, c2.camera.cy, c2.camera.scale))


def test_view_menu_lists_compare_and_the_source_sees_the_traces(two):
    window, a, b = two
    assert window.compare.action in window.view_menu.actions()
    keys = TraceSource(window).keys()
    assert a in keys and b in keys
    assert window.compare.default_keys()[0] in (a, b) and len(set(window.compare.default_keys())) == 2


def test_without_a_results_store_the_source_reads_the_run_controller():
    from types import SimpleNamespace

    t = _trace("alpha", [[1.0]], [0.5])
    key = (str(DEMO_SLIDE), "alpha", WHOLE)
    w = SimpleNamespace(slide=None, inference=SimpleNamespace(layers={key: SimpleNamespace(trace=t)}))
    source = TraceSource(w)
    assert source.keys() == [key] and source.trace(key) is t and source.trace(("x", "y", "z")) is None


def test_a_model_run_from_the_dock_can_be_compared(qtbot, two, fake):
    window, a, _b = two
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    key = (str(DEMO_SLIDE), "fake", WHOLE)
    assert key in window.compare.source.keys()
    view = window.compare.open()  # the trace on the main canvas, and another model's
    qtbot.addWidget(view)
    assert view.pane_a.shown.key == key and view.pane_b.shown.key[1] in ("alpha", "beta")
    assert view.pane_a.shown.trace is layers.trace
    assert view.trail_plot.values()[0] == [1, 2, 3]
    with qtbot.waitSignal(view.diff_ready, timeout=60_000) as blocker:
        pass
    assert blocker.args[0] is not None and np.isfinite(blocker.args[0].agreement)


def test_each_canvas_shows_its_trace_and_panning_one_moves_the_others(qtbot, two):
    window, a, b = two
    view = _open(qtbot, window, a, b)
    ca, cb, cd = view.pane_a.canvas, view.pane_b.canvas, view.pane_diff.canvas
    assert view.pane_a.shown.key == a and view.pane_b.shown.key == b
    assert view.pane_a.current_key() == a and view.pane_b.current_key() == b
    assert any(getattr(o, "map", None) is not None and o.map.name == "alpha map" for o in ca.overlays())
    assert any(getattr(o, "map", None) is not None and o.map.name == "beta map" for o in cb.overlays())
    assert not any(o in window.canvas.overlays() for o in ca.overlays() + cb.overlays())
    # Zoom in on A with its key, then drag A: B and the difference follow, exactly.
    ca.animation_ms = cb.animation_ms = cd.animation_ms = 0
    ca.setFocus()
    qtbot.keyClick(ca, Qt.Key.Key_Plus)
    assert _same_view(ca, cb) and _same_view(ca, cd)
    moves = {"b": 0, "d": 0}
    cb.view_changed.connect(lambda _r: moves.__setitem__("b", moves["b"] + 1))
    cd.view_changed.connect(lambda _r: moves.__setitem__("d", moves["d"] + 1))
    before = ca.camera.cx, ca.camera.cy
    centre = QPoint(ca.width() // 2, ca.height() // 2)
    qtbot.mousePress(ca, Qt.MouseButton.LeftButton, pos=centre)
    qtbot.mouseMove(ca, centre + QPoint(-120, -80))
    qtbot.mouseRelease(ca, Qt.MouseButton.LeftButton, pos=centre + QPoint(-120, -80))
    assert (ca.camera.cx, ca.camera.cy) != pytest.approx(before)
    assert _same_view(ca, cb) and _same_view(ca, cd)
    assert moves["b"] == moves["d"] and 1 <= moves["b"] <= 2  # one move each per drag step: no echo
    # Zooming and fitting from B lead as well.
    cb.setFocus()
    qtbot.keyClick(cb, Qt.Key.Key_Plus)
    assert ca.camera.scale == pytest.approx(cb.camera.scale) and _same_view(ca, cb)
    qtbot.keyClick(cb, Qt.Key.Key_F)
    assert _same_view(ca, cb) and _same_view(cd, cb)
    assert ca.camera.scale == pytest.approx(ca.camera.min_scale)


def test_animated_keys_on_one_canvas_end_with_all_locked(qtbot, two):
    window, a, b = two
    view = _open(qtbot, window, a, b)
    ca, cb = view.pane_a.canvas, view.pane_b.canvas
    cb.setFocus()
    qtbot.keyClick(cb, Qt.Key.Key_Plus)
    wait_still(qtbot, cb)
    qtbot.keyClick(cb, Qt.Key.Key_Right)
    wait_still(qtbot, cb)
    assert _same_view(ca, cb) and cb.camera.scale > cb.camera.min_scale * 1.5


def test_the_trail_plot_shows_both_trails_with_a_legend(qtbot, two):
    window, a, b = two
    view = _open(qtbot, window, a, b)
    plot = view.trail_plot
    assert plot.values() == ([1, 2, 3], pytest.approx([0.2, 0.5, 0.9]))
    assert plot.second_values() == ([1, 2], pytest.approx([0.6, 0.3]))
    assert view.trail_dock.isVisible() and plot.legend.isVisible()
    labels = [label.text for _sample, label in plot.legend.items]
    assert any("alpha" in t for t in labels) and any("beta" in t for t in labels)
    # Choosing another trace for B replaces the second series.
    view.pane_b.combo.setCurrentIndex(next(i for i in range(view.pane_b.combo.count())
                                           if tuple(view.pane_b.combo.itemData(i)) == a))
    assert view.pane_b.shown.key == a and plot.second_values()[1] == pytest.approx([0.2, 0.5, 0.9])


def test_the_difference_view_shows_a_minus_b_over_the_tissue(qtbot, two):
    window, a, b = two
    view = window.compare.open(a, b)  # the difference is worked out on a worker
    qtbot.addWidget(view)
    with qtbot.waitSignal(view.diff_ready, timeout=60_000) as blocker:
        pass  # delivered through the event loop, so it cannot have come already
    diff = blocker.args[0]
    assert diff is not None and view.diff is diff
    assert np.sum(diff.a.values) == pytest.approx(1.0) and np.sum(diff.b.values) == pytest.approx(1.0)
    assert np.allclose(diff.diff.values, np.asarray(diff.a.values) - np.asarray(diff.b.values))
    assert diff.grid.cell == pytest.approx((DEMO_W / 4, DEMO_H / 3))  # alpha's finer grid
    # The same numbers as the engine gives with the slide's tissue.
    from engines.attention_diff import attention_diff
    from engines.tissue import tissue_of_slide

    want = attention_diff(view.pane_a.shown.trace, view.pane_b.shown.trace, tissue_of_slide(window.slide))
    assert np.allclose(diff.diff.values, want.diff.values)
    overlay = view.diff_overlay
    assert overlay in view.pane_diff.canvas.overlays() and overlay.colormap == DIVERGING
    lo, hi = overlay.value_range()
    assert lo == pytest.approx(-hi) and hi == pytest.approx(np.abs(want.diff.values).max())
    assert "agreement" in view.pane_diff.note.text()
    # Hovering any canvas reads out both maps and their difference at that point.
    # Offscreen, the pointer goes to the first window at its position: move off the main one.
    view.move(window.geometry().right() + 20, 0)
    canvas = view.pane_b.canvas
    qtbot.wait(20)  # the layout gives the canvas its size first
    x, y = DEMO_W * 0.1, DEMO_H * 0.1
    sx, sy = canvas.camera.to_screen(x, y)
    qtbot.mouseMove(canvas, QPoint(round(sx) + 1, round(sy) + 1))
    qtbot.mouseMove(canvas, QPoint(round(sx), round(sy)))
    qtbot.waitUntil(lambda: "A \u2212 B" in view.statusBar().currentMessage(), timeout=2000)
    text = view.statusBar().currentMessage()
    assert "A: alpha map = 1" in text and "B: beta map = 4" in text
    assert f"{overlay.value_at(x, y):+.3g}" in text


def test_one_model_on_two_slides(qtbot, two):
    window, a, _b = two
    other = DATA / "small.svs"
    from engines.slide import Slide

    s = Slide(other)
    key = (str(other), "alpha", WHOLE)
    _put(window, key, _trace("alpha", [[1, 2], [3, 4]], [0.7], slide=other, size=(s.width, s.height)))
    view = window.compare.open(a, key)
    qtbot.addWidget(view)
    qtbot.waitUntil(lambda: view.pane_b.canvas.slide is not None, timeout=10_000)
    assert Path(view.pane_b.canvas.slide.path) == other and Path(view.pane_a.canvas.slide.path) == DEMO_SLIDE
    assert "same slide" in view.pane_diff.note.text() and view.diff is None
    labels = [view.pane_a.combo.itemText(i) for i in range(view.pane_a.combo.count())]
    assert any(other.name in t for t in labels)  # traces of two slides: named with their slide
    # A slide still opening for an earlier choice does not replace a later one.
    third = DATA / "boxes-levels.tiff"
    t3 = Slide(third)
    key3 = (str(third), "gamma", WHOLE)
    _put(window, key3, _trace("gamma", [[1.0]], [0.5], slide=third, size=(t3.width, t3.height)))
    view.show_trace(view.pane_a, key3)  # opens on pane A's read lane
    assert view.pane_a.canvas.slide is not None and Path(view.pane_a.canvas.slide.path) == DEMO_SLIDE
    view.show_trace(view.pane_a, a)
    assert view.pane_a.canvas.store.wait_reads(10_000)
    qtbot.wait(50)  # a late slide would be delivered through the event loop
    assert Path(view.pane_a.canvas.slide.path) == DEMO_SLIDE and view.pane_a.shown.key == a


def test_closing_stops_every_read_of_the_compare_canvases(qtbot, two):
    window, a, b = two
    view = _open(qtbot, window, a, b)
    canvases = [p.canvas for p in (view.pane_a, view.pane_b, view.pane_diff)]
    pools = [pool for c in canvases for pool in (c.store._tile_pool, c.store._read_pool, c.store._scale_pool)]
    for c in canvases:
        c.zoom_by(4.0, animate=False)  # new tiles to read
    view.close()
    assert window.compare.view is None
    assert all(c.store.closed for c in canvases)
    qtbot.waitUntil(lambda: not any(t.is_alive() for p in pools for t in list(p._workers)), timeout=5000)
    assert window.canvas.slide is not None and not window.canvas.store.closed  # the main view lives on
    view2 = window.compare.open(a, b)  # opening again gives a fresh window
    qtbot.addWidget(view2)
    assert view2 is not view and view2.pane_a.shown.key == a
    stores = [p.canvas.store for p in (view2.pane_a, view2.pane_b, view2.pane_diff)]
    window.close()  # the main window takes the compare window with it
    qtbot.waitUntil(lambda: window.compare.view is None, timeout=5000)
    assert all(s.closed for s in stores)


SCRIPT = textwrap.dedent("""
    import sys
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication
    sys.path.insert(0, {root!r})
    from app.main_window import MainWindow
    from tests.test_compare_view import _trace, _put

    app = QApplication([])
    w = MainWindow(QSettings({ini!r}, QSettings.Format.IniFormat))
    w.show()
    slide = {slide!r}

    def opened(_path):
        a, b = (slide, "alpha", "whole slide"), (slide, "beta", "whole slide")
        _put(w, a, _trace("alpha", [[1, 2], [3, 4]], [0.3]))
        _put(w, b, _trace("beta", [[4, 3], [2, 1]], [0.6]))
        view = w.compare.open(a, b)
        for c in (view.pane_a.canvas, view.pane_b.canvas):
            c.zoom_by(8.0, animate=False)
        print("closing mid-compare", flush=True)
        QTimer.singleShot(30, w.close)

    w.slide_opened.connect(opened)
    w.open_slide(slide)
    print("event loop ended", app.exec(), flush=True)
""")


def test_closing_the_app_mid_compare_exits_0(tmp_path):
    script = tmp_path / "compare_close.py"
    script.write_text(SCRIPT.format(root=str(ROOT), ini=str(tmp_path / "m.ini"), slide=str(DEMO_SLIDE)))
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                          env=env, cwd=str(tmp_path))
    assert "closing mid-compare" in proc.stdout, proc.stderr[-2000:]
    assert "event loop ended 0" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr, proc.stderr[-2000:]
