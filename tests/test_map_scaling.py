"""Map display: rank and log scaling, a threshold below which cells are transparent, and the
choice kept per map name in the project (or QSettings without one)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QSettings
from PySide6.QtGui import QColor, QImage, QPainter

from app.map_display import SETTINGS_KEY
from engines.project import open_project
from engines.trace import AttentionMap, Field, SlideRef, Trace
from tests.conftest import DEMO_SLIDE
from tests.test_inference_gui import window  # noqa: F401
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, open_and_wait, qsettings  # noqa: F401
from viewer.camera import Camera
from viewer.overlays.heatmap import HeatmapOverlay, scale_values

DEMO_W, DEMO_H = 2220, 2967


def _map(values, name="attention", cell=10.0) -> AttentionMap:
    return AttentionMap(name, "layer 1", None, (0.0, 0.0), (cell, cell), np.asarray(values, float).tolist())


# -- the numbers ---------------------------------------------------------------------------------
def test_rank_is_the_percentile_among_non_zero_cells():
    v = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 100.0, 0.0, 2.0]])
    got = scale_values(v, "rank")
    # Non-zero cells sorted: 1, 2, 2, 3, 4, 100 (ranks 0..5 of 5); the two 2s share rank 1.5;
    # zeros are 0.
    np.testing.assert_allclose(got, [[0.0, 0.0, 0.3, 0.6], [0.8, 1.0, 0.0, 0.3]])
    np.testing.assert_allclose(scale_values(np.array([[0.0, 7.0]]), "rank"), [[0.0, 1.0]])
    np.testing.assert_allclose(scale_values(np.full((2, 2), 3.0), "rank"), np.full((2, 2), 0.5))


def test_rank_spreads_a_peaked_map_that_linear_leaves_cold():
    v = np.full((10, 10), 1e-3)
    v.flat[:90] = np.linspace(1e-3, 2e-3, 90)
    v[9, 9] = 1.0  # the mass sits in one cell
    lin, rank = scale_values(v, "linear"), scale_values(v, "rank")
    assert (lin < 0.01).mean() > 0.95  # linear: nearly every cell is at the cold end
    assert np.median(rank) == pytest.approx(0.5, abs=0.05)  # rank: half the cells above the middle
    assert rank[9, 9] == 1.0


def test_log_covers_four_decades_below_the_maximum():
    v = np.array([[100.0, 10.0, 1.0, 0.01], [1e-3, 0.0, -5.0, np.nan]])
    got = scale_values(v, "log")
    assert got[0].tolist() == pytest.approx([1.0, 0.75, 0.5, 0.0])
    assert got[1, :3].tolist() == pytest.approx([0.0, 0.0, 0.0])  # at or under the floor
    assert np.isnan(got[1, 3])
    # With a shared range, the top of the range is the maximum.
    np.testing.assert_allclose(scale_values(np.array([[10.0]]), "log", (0.0, 100.0)), [[0.75]])


def test_linear_keeps_the_shared_range_and_rejects_unknown_scalings():
    v = np.array([[1.0, 3.0]])
    np.testing.assert_allclose(scale_values(v, "linear", (1.0, 5.0)), [[0.0, 0.5]])
    with pytest.raises(ValueError, match="unknown scaling"):
        scale_values(v, "sqrt")


# -- drawing -------------------------------------------------------------------------------------
def _paint(ov: HeatmapOverlay, size=(40, 20)) -> QImage:
    """The overlay painted over a green background, one cell = 10 screen px."""
    img = QImage(size[0], size[1], QImage.Format.Format_RGB32)
    img.fill(QColor(0, 255, 0))
    cam = Camera(width=size[0], height=size[1], slide_w=size[0], slide_h=size[1])
    cam.scale, cam.cx, cam.cy = 1.0, size[0] / 2, size[1] / 2
    p = QPainter(img)
    ov.paint(p, cam)
    p.end()
    return img


def test_threshold_makes_the_low_cells_transparent_in_the_painted_image():
    ov = HeatmapOverlay(_map([[1.0, 2.0, 3.0, 100.0], [0.0, 5.0, 6.0, 7.0]]), opacity=1.0)
    ov.show_grid = False
    green = QColor(0, 255, 0).rgb()
    before = _paint(ov)
    assert all(before.pixel(5 + 10 * c, 5) != green for c in range(4))  # every cell coloured
    ov.set_display("rank", 0.5)
    after = _paint(ov)
    shown = [[after.pixel(5 + 10 * c, 5 + 10 * r) != green for c in range(4)] for r in range(2)]
    # Ranks of the seven non-zero cells: 1->0, 2->1/6, 3->2/6, 5->3/6, 6->4/6, 7->5/6, 100->1.
    assert shown == [[False, False, False, True], [False, True, True, True]]
    # The hover read-out stays the raw value, hidden or not.
    assert ov.value_at(5, 5) == 1.0 and ov.value_at(35, 5) == 100.0
    # The top cell is drawn at the hot end of the colormap, like the top of a linear map.
    assert QColor(after.pixel(35, 5)) == QColor(_paint(HeatmapOverlay(_map([[0.0, 1.0]]), opacity=1.0),
                                                       (20, 10)).pixel(15, 5))


def test_scaled_image_is_made_once_per_change_not_per_paint():
    ov = HeatmapOverlay(_map(np.arange(12.0).reshape(3, 4)), opacity=1.0)
    ov.set_display("log", 0.2)
    first = ov.image()
    _paint(ov)
    assert ov.image() is first
    ov.set_display("log", 0.2)  # no change: nothing recomputed
    assert ov.image() is first
    ov.set_display("log", 0.3)
    assert ov.image() is not first


# -- the dock, the project and QSettings ---------------------------------------------------------
def _trace(tmp_path: Path) -> Path:
    vals = np.ones((4, 6))
    vals[0, 0] = 50.0
    maps = [AttentionMap("stage 1", "stage 1", None, (0.0, 0.0), (DEMO_W / 6, DEMO_H / 4), vals.tolist()),
            AttentionMap("stage 2", "stage 2", None, (0.0, 0.0), (DEMO_W / 6, DEMO_H / 4), vals.tolist())]
    trace = Trace(model="zoom_in", preset="tiny", checkpoint=None,
                  slide=SlideRef(str(DEMO_SLIDE), DEMO_W, DEMO_H, 0.5), classes=["a", "b"],
                  probs=[0.5, 0.5], fields=[Field(0, None, 0, (0, 0, DEMO_W, DEMO_H), 1.0, "view")],
                  maps=maps, trail=[])
    path = tmp_path / "t.trace.json"
    trace.save(path)
    return path


def _stage(window, name):
    return next(o for o in window.inference.current.maps if o.map.name == name)


def test_panel_sets_the_chosen_map_and_saves_it_in_the_project(qtbot, window, tmp_path):  # noqa: F811
    folder = tmp_path / "slides"
    folder.mkdir()
    os.symlink(DEMO_SLIDE, folder / DEMO_SLIDE.name)
    project = open_project(folder)
    project_file = project.save(tmp_path / "study.maglens.json")
    window.results.set_project(project)
    assert window.open_trace(_trace(tmp_path))
    md = window.map_display
    assert md.chosen is _stage(window, "stage 1")
    assert md.panel.map_label.text() == "stage 1"
    md.panel.scaling_combo.setCurrentText("rank")
    md.panel.threshold_slider.setValue(50)
    ov = _stage(window, "stage 1")
    assert (ov.scaling, ov.threshold) == ("rank", pytest.approx(0.5))
    assert (_stage(window, "stage 2").scaling, _stage(window, "stage 2").threshold) == ("linear", 0.0)
    # The 23 equal cells share rank 11 of 23 (0.478) and go transparent; the peak stays.
    assert ov.shown_mask().sum() == 1
    assert project.map_display["stage 1"] == {"scaling": "rank", "threshold": pytest.approx(0.5)}
    # Saved (debounced) into the project file, and nothing into QSettings.
    qtbot.waitUntil(lambda: "map_display" in project_file.read_text()
                    and json.loads(project_file.read_text())["map_display"].get("stage 1") is not None,
                    timeout=5000)
    assert json.loads(project_file.read_text())["map_display"]["stage 1"]["scaling"] == "rank"
    assert not window.settings.qsettings.value(SETTINGS_KEY, "")

    # Reopened: the map takes its saved display as soon as its trace is shown.
    window.results.set_project(None)
    assert (_stage(window, "stage 1").scaling, _stage(window, "stage 1").threshold) == ("linear", 0.0)
    window.results.set_project(open_project(project_file))
    assert (_stage(window, "stage 1").scaling, _stage(window, "stage 1").threshold) == ("rank", pytest.approx(0.5))
    assert md.panel.scaling_combo.currentText() == "rank" and md.panel.threshold_slider.value() == 50

    # Choosing the other map in the Models dock shows its own (default) settings.
    window.models_panel.map_chosen.emit(1)
    assert md.panel.map_label.text() == "stage 2"
    assert md.panel.scaling_combo.currentText() == "linear" and md.panel.threshold_slider.value() == 0


def test_without_a_project_the_choice_lives_in_qsettings(qtbot, qsettings, dialogs, tmp_path):  # noqa: F811
    trace = _trace(tmp_path)
    w1 = make_window(qtbot, qsettings)
    open_and_wait(qtbot, w1, DEMO_SLIDE)
    assert w1.open_trace(trace)
    w1.map_display.panel.scaling_combo.setCurrentText("log")
    w1.map_display.panel.threshold_slider.setValue(25)
    w1.close()  # a pending choice is written on close
    stored = json.loads(QSettings(qsettings.fileName(), QSettings.Format.IniFormat).value(SETTINGS_KEY))
    assert stored["stage 1"] == {"scaling": "log", "threshold": 0.25}

    w2 = make_window(qtbot, QSettings(qsettings.fileName(), QSettings.Format.IniFormat))
    open_and_wait(qtbot, w2, DEMO_SLIDE)
    assert w2.open_trace(trace)
    ov = _stage(w2, "stage 1")
    assert (ov.scaling, ov.threshold) == ("log", pytest.approx(0.25))
    assert w2.map_display.panel.scaling_combo.currentText() == "log"
    w2.close()


def test_maps_streamed_into_a_trace_take_their_names_display():
    from viewer.trace_layers import TraceLayers

    trace = Trace(model="zoom_in", preset="tiny", checkpoint=None, slide=SlideRef("s.svs", 100, 100, None),
                  classes=["a", "b"], probs=[], fields=[], maps=[], trail=[])
    layers = TraceLayers(None, trace)  # never shown: no canvas needed
    layers.set_map_display({"stage 1": {"scaling": "log", "threshold": 0.2},
                            "stage 2": {"scaling": "cubic", "threshold": 0.5}})  # hand-edited nonsense
    layers.add_event(_map([[1.0, 2.0]], name="stage 1"))
    layers.add_event(_map([[1.0, 2.0]], name="stage 2"))
    layers.add_event(_map([[1.0, 2.0]], name="stage 3"))
    assert [(o.scaling, o.threshold) for o in layers.maps] == [("log", 0.2), ("linear", 0.0), ("linear", 0.0)]
