"""The trace controls a user works with: hovering, the map chooser, opacity, colormaps,
normalisation, smoothing, stepping by magnification, Play, the trail plot, comparing models,
traces kept per slide, stale runs, figures and the status of a run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QColor

from app.models_dock import Scope
from engines.trace import AttentionMap, Field, Progress, SlideRef, Trace, TrailStep
from tests.conftest import DATA, DEMO_SLIDE
from tests.test_inference_gui import choose, fake, run_and_wait, wait_still, window  # noqa: F401
from tests.test_main_window import _sandboxed_settings, dialogs, open_and_wait, qsettings  # noqa: F401
from viewer.overlays import colormaps
from viewer.overlays.heatmap import HeatmapOverlay

DEMO_W, DEMO_H = 2220, 2967


def _rgb(img, x, y):
    c = QColor(img.pixel(int(x), int(y)))
    return np.array([c.red(), c.green(), c.blue()])


def _near(got, color: QColor, tol: int = 10) -> bool:
    return int(np.abs(got - [color.red(), color.green(), color.blue()]).max()) <= tol


def _trace(model: str, maps=(), fields=(), trail=()) -> Trace:
    return Trace(model=model, preset="tiny", checkpoint=None,
                 slide=SlideRef(str(DEMO_SLIDE), DEMO_W, DEMO_H, 0.499),
                 classes=["normal", "tumor"], probs=[0.3, 0.7], fields=list(fields),
                 maps=list(maps), trail=list(trail))


def _filters(n: int) -> list[AttentionMap]:
    """``n`` maps stacked on the whole slide, like grid attention's filters."""
    rng = np.random.default_rng(0)
    return [AttentionMap(f"filter {k}", "filter", 5.0, (0.0, 0.0), (DEMO_W / 4, DEMO_H / 4),
                         rng.random((4, 4)).tolist()) for k in range(n)]


def _open(window, tmp_path, trace: Trace, name: str = "t.json"):
    path = tmp_path / name
    trace.save(path)
    assert window.open_trace(path)
    return window.inference.current


def _screen(canvas, x, y) -> QPoint:
    sx, sy = canvas.camera.to_screen(x, y)
    return QPoint(round(sx), round(sy))


def _hover(qtbot, canvas, x, y) -> None:
    """Move the pointer onto level-0 (x, y); the first synthetic move only enters the widget."""
    qtbot.wait(20)  # pending layout (a dock just shown) resizes the canvas first
    p = _screen(canvas, x, y)
    qtbot.mouseMove(canvas, p + QPoint(1, 1))
    qtbot.mouseMove(canvas, p)


# -- hovering ---------------------------------------------------------------------------------
def test_hovering_a_box_shows_depth_score_and_size_in_microns(qtbot, window, fake):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    canvas = window.canvas
    canvas.fit_view(animate=False)
    child = next(f for f in layers.trace.fields if f.depth == 2)
    _hover(qtbot, canvas, child.rect[0] + 3, child.rect[1] + 3)
    qtbot.waitUntil(lambda: "depth 2" in window.statusBar().currentMessage(), timeout=2000)
    text = window.statusBar().currentMessage()
    w_um = child.rect[2] * window.slide.mpp
    assert f"score {child.score:.3g}" in text and f"{w_um:.0f} x" in text and "µm" in text
    # the map under the same point reports its cell value too
    amap = layers.maps[0]
    assert f"= {amap.value_at(child.rect[0] + 3, child.rect[1] + 3):.4g}" in text
    # off the boxes (still on the map) the box description goes
    _hover(qtbot, canvas, DEMO_W * 0.95, DEMO_H * 0.05)
    qtbot.waitUntil(lambda: "depth" not in window.statusBar().currentMessage(), timeout=2000)
    assert "fake map = " in window.statusBar().currentMessage()
    # and with nothing under the pointer the message clears
    for o in layers.maps:
        o.visible = False
    _hover(qtbot, canvas, DEMO_W * 0.95, DEMO_H * 0.06)
    qtbot.waitUntil(lambda: window.statusBar().currentMessage() == "", timeout=2000)


def test_value_under_the_cursor_follows_the_cell(qtbot, window, tmp_path):
    amap = AttentionMap("m", "g", None, (400.0, 600.0), (500.0, 500.0), [[1.5, 2.5], [3.5, 4.5]])
    _open(window, tmp_path, _trace("fake", maps=[amap]))
    canvas = window.canvas
    canvas.fit_view(animate=False)
    for (r, c), value in np.ndenumerate(np.array(amap.values)):
        x, y, w, h = amap.cell_rect(r, c)
        _hover(qtbot, canvas, x + w / 2, y + h / 2)
        qtbot.waitUntil(lambda v=value: f"m = {v:.4g}" in window.statusBar().currentMessage(), timeout=2000)


# -- the map chooser and the map display controls ---------------------------------------------
def test_the_map_chooser_offers_all_64_filters_and_shows_the_chosen_one(qtbot, window, tmp_path):
    layers = _open(window, tmp_path, _trace("grid_attention", maps=_filters(64)))
    combo = window.models_panel.map_combo
    assert combo.count() == 64 and combo.itemText(63) == "filter 63"
    assert [o.visible for o in layers.maps].count(True) == 1 and layers.maps[0].visible
    combo.setCurrentIndex(41)
    combo.activated.emit(41)  # the user picks "filter 41" from the list
    assert [i for i, o in enumerate(layers.maps) if o.visible] == [41]
    # and the canvas paints filter 41's colours, not filter 0's
    ov = layers.maps[41]
    ov.opacity, ov.show_grid = 1.0, False
    assert _near(_probe(window, ov, 1, 2), colormaps.color(ov.colormap, float(ov.normalised()[1, 2])))


def test_a_real_grid_attention_run_lists_every_filter(qtbot, window):
    choose(window, "grid_attention")
    layers = run_and_wait(qtbot, window)
    filters = [m for m in layers.trace.maps if m.group == "filter"]
    assert len(filters) > 1
    assert window.models_panel.map_combo.count() == len(layers.maps)
    assert [o for o in layers.maps if o.visible] == [layers.maps[0]]


def _probe(window, ov: HeatmapOverlay, r: int = 0, c: int = 0):
    """The colour painted at the centre of cell (r, c); the image is large enough that the
    scale bar (bottom left) stays clear of its centre."""
    x, y, w, h = ov.map.cell_rect(r, c)
    img = window.canvas.render_image(200, 200, (x + w / 2 - 20, y + h / 2 - 20, 40, 40))
    return _rgb(img, 100, 100)


def test_opacity_slider_colormap_and_joint_normalisation(qtbot, window, tmp_path):
    a = AttentionMap("a", "g", None, (0.0, 0.0), (300.0, 300.0), [[0.0, 1.0]])
    b = AttentionMap("b", "g", None, (1200.0, 1500.0), (300.0, 300.0), [[0.0, 4.0]])
    layers = _open(window, tmp_path, _trace("fake", maps=[a, b]))
    for o in window.canvas.overlays():
        o.visible = o in layers.maps
    panel = window.models_panel
    ov_a, ov_b = layers.maps
    slide_px = _probe(window, ov_a, 0, 1)
    panel.map_opacity.setValue(100)
    assert ov_a.opacity == ov_b.opacity == 1.0
    opaque = _probe(window, ov_a, 0, 1)
    assert _near(opaque, colormaps.color(colormaps.DEFAULT, 1.0))
    panel.map_opacity.setValue(30)
    faint = _probe(window, ov_a, 0, 1)
    assert np.abs(faint - slide_px).sum() < np.abs(opaque - slide_px).sum()
    panel.map_opacity.setValue(100)
    # the colormap choice repaints the cells
    panel.colormap_combo.setCurrentText("viridis")
    assert _near(_probe(window, ov_a, 0, 1), colormaps.color("viridis", 1.0))
    # per map: a's 1.0 is its maximum; jointly with b (up to 4.0) it sits a quarter up
    panel.joint_check.click()
    assert panel.joint_check.isChecked()
    assert ov_a.value_range() == ov_b.value_range() == (0.0, 4.0)
    assert _near(_probe(window, ov_a, 0, 1), colormaps.color("viridis", 0.25))
    panel.joint_check.click()
    assert ov_a.value_range() == (0.0, 1.0)


def test_true_cells_by_default_and_a_smoothed_view_on_request(qtbot, window, tmp_path):
    amap = AttentionMap("m", "g", None, (600.0, 800.0), (400.0, 400.0), [[0.0, 1.0]])
    layers = _open(window, tmp_path, _trace("fake", maps=[amap]))
    ov = layers.maps[0]
    ov.opacity = 1.0
    for o in window.canvas.overlays():
        o.visible = o is ov
    # the edge between the two cells (level-0 x = 1000) in the middle of a 400 x 200 image
    view = (900.0, 950.0, 200.0, 100.0)

    def row():
        img = window.canvas.render_image(400, 200, view)
        return [_rgb(img, x, 40) for x in (100, 190, 210, 300)]

    lo, hi = colormaps.color(ov.colormap, 0.0), colormaps.color(ov.colormap, 1.0)
    sharp = row()
    assert _near(sharp[0], lo) and _near(sharp[1], lo) and _near(sharp[2], hi) and _near(sharp[3], hi)
    assert ov.show_grid and not ov.smooth
    window.models_panel.smooth_check.click()
    assert ov.smooth
    smooth = row()
    # smoothed, the colours blend across the edge, and step by step from low to high
    assert not _near(smooth[1], lo, tol=20) and not _near(smooth[2], hi, tol=20)
    dist = [float(np.abs(p - [lo.red(), lo.green(), lo.blue()]).sum()) for p in smooth]
    assert dist == sorted(dist)


# -- stepping -------------------------------------------------------------------------------
def test_without_nested_fields_stepping_walks_the_maps_by_magnification(qtbot, window, tmp_path):
    maps = [AttentionMap(f"attention at {m}x", "magnification", m, (0.0, 0.0),
                         (DEMO_W / n, DEMO_H / n), np.full((n, n), float(n)).tolist())
            for m, n in ((3.0, 6), (1.0, 2), (2.0, 4))]
    patches = [Field(0, None, 0, (0.0, 0.0, DEMO_W, DEMO_H), 1.0, "view"),
               Field(1, 0, 2, (100.0, 100.0, 300.0, 300.0), 0.5, "patch", 2.0),
               Field(2, 0, 3, (900.0, 900.0, 200.0, 200.0), 0.5, "patch", 3.0)]
    layers = _open(window, tmp_path, _trace("spatial_mag", maps=maps, fields=patches))
    assert not layers.nested
    canvas = window.canvas
    canvas.setFocus()
    seen = []
    for _ in range(3):
        qtbot.keyClick(canvas, Qt.Key.Key_BracketRight)
        wait_still(qtbot, canvas)
        shown = [o for o in layers.maps if o.visible]
        assert len(shown) == 1
        seen.append(shown[0].map.magnification)
        # the patches read at that magnification are the highlighted depth
        want = {2.0: 2, 3.0: 3}.get(shown[0].map.magnification)
        assert layers.fields.focus_depth == want
    assert seen == [1.0, 2.0, 3.0]
    assert "attention at 3.0x" in window.models_panel.path_label.text()
    assert window.models_panel.map_combo.currentText() == "attention at 3.0x"


def test_nested_stops_show_the_attention_that_chose_the_box(qtbot, window):
    choose(window, "magnet")
    layers = run_and_wait(qtbot, window)
    assert layers.nested
    stops = layers.path()
    deep = next(s for s in stops if s.depth == 2)
    field = layers.trace.field_by_id(deep.field_id)
    parent = layers.trace.field_by_id(field.parent)
    window.inference._stop = stops.index(deep) - 1
    window.inference.step(1)
    shown = [o for o in layers.maps if o.visible]
    assert shown and all(o.map.group == "layer 2" for o in shown)
    assert all(np.allclose(o.map.rect, parent.rect, atol=parent.rect[2] * 0.1) for o in shown)
    assert layers.fields.highlight == field.id and layers.fields.focus_depth == 2
    window.inference._stop = 1
    window.inference.step(-1)  # back to the whole slide: the overview map again
    assert [o.map.group for o in layers.maps if o.visible] == ["layer 1"]
    assert layers.fields.focus_depth is None


def test_play_walks_the_path_by_itself(qtbot, window, fake):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    ctl = window.inference
    ctl._play.setInterval(50)
    qtbot.mouseClick(window.models_panel.play_button, Qt.MouseButton.LeftButton)
    n = len(layers.path())
    qtbot.waitUntil(lambda: ctl.stop_index == n - 1, timeout=5000)
    # it stops at the end of the path and lets go of the button
    qtbot.waitUntil(lambda: not window.models_panel.play_button.isChecked(), timeout=5000)
    qtbot.wait(200)
    assert ctl.stop_index == n - 1 and not ctl.playing
    # pressed again it walks the path from the start, and a second press stops it
    qtbot.mouseClick(window.models_panel.play_button, Qt.MouseButton.LeftButton)
    assert ctl.stop_index == 0
    qtbot.mouseClick(window.models_panel.play_button, Qt.MouseButton.LeftButton)
    stopped = ctl.stop_index
    qtbot.wait(200)
    assert ctl.stop_index == stopped


# -- the probability trail --------------------------------------------------------------------
def test_clicking_a_point_in_the_plot_centres_the_view_on_its_patch(qtbot, window, fake):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    canvas = window.canvas
    plot = window.trail_plot
    qtbot.waitUntil(lambda: plot.isVisible() and plot.plot.width() > 100, timeout=3000)
    step = layers.trace.trail[1]
    xs, ys = plot.values()
    vb = plot.plot.getPlotItem().getViewBox()
    scene_pt = vb.mapViewToScene(QPointF(xs[1], ys[1]))
    pos = plot.plot.mapFromScene(scene_pt)
    qtbot.mouseClick(plot.plot.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    wait_still(qtbot, canvas)
    fx, fy, fw, fh = layers.trace.field_by_id(step.field_id).rect
    assert canvas.camera.cx == pytest.approx(fx + fw / 2, abs=2)
    assert canvas.camera.cy == pytest.approx(fy + fh / 2, abs=2)
    assert layers.trail.highlight == step.index
    assert list(plot.marker.data["x"]) == [xs[1]]
    assert plot.plot.getAxis("left").labelText == f"P({layers.trace.classes[1]})"


def test_steps_on_one_patch_sit_side_by_side_and_each_is_clickable(qtbot, window, tmp_path):
    view = Field(0, None, 0, (0.0, 0.0, DEMO_W, DEMO_H), 1.0, "view")
    strip = Field(1, 0, 1, (0.0, 0.0, DEMO_W, DEMO_H), 1.0, "strip")
    steps = [TrailStep(i, 1, [1 - p, p]) for i, p in enumerate((0.2, 0.4, 0.6, 0.8))]
    layers = _open(window, tmp_path, _trace("local_learning", fields=[view, strip], trail=steps))
    cam = window.canvas.camera
    pts = layers.trail.screen_points(cam)
    assert len({(round(x), round(y)) for _, x, y in pts}) == 4  # not on top of each other
    for s, x, y in pts:
        assert layers.trail.step_at(cam, x, y) is s


def test_a_trace_without_a_trail_hides_the_trail_dock(qtbot, window, fake, tmp_path):
    choose(window, "fake")
    run_and_wait(qtbot, window)
    assert window.trail_dock.isVisible()
    _open(window, tmp_path, _trace("grid_attention", maps=_filters(2)))
    assert not window.trail_dock.isVisible()


# -- traces per slide and model, comparing ----------------------------------------------------
def test_traces_are_kept_per_slide(qtbot, window, fake):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    open_and_wait(qtbot, window, DATA / "small.svs")
    assert window.inference.current is None
    assert not any(o in window.canvas.overlays() for o in layers.overlays())
    open_and_wait(qtbot, window, DEMO_SLIDE)
    assert window.inference.current is layers
    assert all(o in window.canvas.overlays() for o in layers.overlays())


def test_compare_two_models_on_one_slide(qtbot, window, fake, tmp_path):
    choose(window, "fake")
    first = run_and_wait(qtbot, window)
    other = _open(window, tmp_path, _trace("grid_attention", maps=_filters(3)))
    panel = window.models_panel
    assert panel.model_combo.currentText() == "grid_attention"
    assert not any(o in window.canvas.overlays() for o in first.overlays())
    i = panel.compare_combo.findData("fake")
    assert i > 0
    panel.compare_combo.setCurrentIndex(i)
    panel.compare_combo.activated.emit(i)
    on_canvas = window.canvas.overlays()
    assert all(o in on_canvas for o in first.overlays() + other.overlays())
    names = [r.overlay.name for r in window.layers_panel.rows()]
    assert any(n.startswith("fake:") for n in names) and any(n.startswith("grid_attention:") for n in names)
    panel.colormap_combo.setCurrentText("magma")  # display settings reach both
    assert first.maps[0].colormap == other.maps[0].colormap == "magma"
    panel.compare_combo.setCurrentIndex(0)
    panel.compare_combo.activated.emit(0)
    assert not any(o in window.canvas.overlays() for o in first.overlays())
    assert all(o in window.canvas.overlays() for o in other.overlays())


# -- runs ---------------------------------------------------------------------------------------
def test_a_superseded_run_leaves_nothing_behind(qtbot, window, fake, monkeypatch):
    monkeypatch.setattr(fake, "PRESETS", {**fake.PRESETS, "tiny": fake.FakeConfig(seconds=30)})
    choose(window, "fake")
    ctl = window.inference
    panel = window.models_panel
    with qtbot.waitSignal(ctl.engine.event, timeout=10_000):
        qtbot.mouseClick(panel.run_button, Qt.MouseButton.LeftButton)
    first = ctl.run_id
    # A late event of the old run, already queued when it was replaced, must be dropped.
    monkeypatch.setattr(fake, "PRESETS", {**fake.PRESETS, "tiny": fake.FakeConfig()})
    panel.scope_combo.setCurrentText("Current view")
    window.canvas.center_on(800, 900, scale=window.canvas.camera.scale * 3, animate=False)
    roi = ctl.roi_for(Scope.VIEW)
    with qtbot.waitSignal(ctl.engine.done, timeout=30_000):
        second = ctl.run(panel.request())
    assert second != first
    stale = Field(99, 0, 1, (0.0, 0.0, 10.0, 10.0), 1.0, "zoom")
    ctl.engine.event.emit(first, stale)
    ctl.engine.done.emit(first, _trace("fake"))
    layers = ctl.current
    assert all(f.id != 99 for f in layers.trace.fields + layers.fields.fields)
    assert layers.trace.roi == pytest.approx(roi)
    assert layers.trace.fields[0].rect == pytest.approx(roi)  # the current view's run, not the first
    assert panel.run_button.isEnabled()


def test_the_dock_shows_the_stage_and_the_time_while_a_model_runs(qtbot, window, fake, monkeypatch):
    monkeypatch.setattr(fake, "PRESETS", {**fake.PRESETS, "tiny": fake.FakeConfig(seconds=0.6)})
    choose(window, "fake")
    panel = window.models_panel
    stages = []
    panel.stage_label.setText("")
    window.inference.engine.event.connect(
        lambda _r, e: isinstance(e, Progress) and stages.append(panel.stage_label.text()))
    qtbot.mouseClick(panel.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "Elapsed" in panel.elapsed_label.text(), timeout=5000)
    qtbot.waitUntil(lambda: window.inference.run_id is None, timeout=30_000)
    assert "waiting" in stages or "fake" in stages
    assert panel.stage_label.text().startswith("Done")


# -- files --------------------------------------------------------------------------------------
def test_figure_has_a_legend_and_geojson_has_every_field_and_cell(qtbot, window, fake, tmp_path):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    out = tmp_path / "fig.png"
    assert window.export_figure(out, 800, 600)
    from PySide6.QtGui import QImage

    img = QImage(str(out))
    assert (img.width(), img.height()) == (800, 600)
    # the legend box (white, top right) with the map's gradient bar at its first line
    assert _rgb(img, 790, 14).min() > 200
    from viewer.figure import legend_entries

    entries = legend_entries(window.canvas.overlays())
    assert isinstance(entries[0][1], list)  # heatmaps share a gradient bar
    texts = [t.replace("\u00a0", " ") for t, _ in entries]
    assert any("depth 2" in t for t in texts) and f"P({layers.trace.classes[1]}) = 1" in texts
    window.inference.export_geojson(tmp_path / "t.geojson")
    gj = json.loads((tmp_path / "t.geojson").read_text())
    n_cells = sum(r * c for r, c in (m.shape for m in layers.trace.maps))
    assert len(gj["features"]) == len(layers.trace.fields) + n_cells
    cell = next(f for f in gj["features"] if f["properties"].get("map"))
    m = layers.trace.maps[0]
    r, c = cell["properties"]["row"], cell["properties"]["col"]
    assert cell["properties"]["value"] == m.values[r][c]
    x, y, w, h = m.cell_rect(r, c)
    assert cell["geometry"]["coordinates"][0][0] == [x, y] and cell["geometry"]["coordinates"][0][2] == [x + w, y + h]


def test_dozens_of_layers_do_not_stretch_the_window(qtbot, window, tmp_path):
    _open(window, tmp_path, _trace("grid_attention", maps=_filters(64)))
    window.layers_dock.show()
    window.layers_dock.raise_()
    qtbot.wait(50)
    assert len(window.layers_panel.rows()) == 64
    assert window.minimumSizeHint().height() < 900
