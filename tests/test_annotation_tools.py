"""Drawing, selecting, moving, deleting and undoing annotations with the mouse and keys, and
the files they come from and go to, as a user does them in the window."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import shapely
from PySide6.QtCore import QEvent, QPoint, QPointF, Qt
from PySide6.QtGui import QMouseEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QFileDialog

from engines.annotations import read_geojson
from tests.conftest import DEMO_SLIDE
from viewer.overlays.annotations import annotation_color
from tests.test_annotations import QUPATH_GEOJSON
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, open_and_wait, qsettings  # noqa: F401

SCALE = 0.5  # screen px per level-0 px in these tests
NONE = Qt.KeyboardModifier.NoModifier
LEFT = Qt.MouseButton.LeftButton


@pytest.fixture
def window(qtbot, qsettings, dialogs):  # noqa: F811
    w = make_window(qtbot, qsettings)
    open_and_wait(qtbot, w, DEMO_SLIDE)
    w.canvas.center_on(1000, 1000, scale=SCALE, animate=False)
    w.annotations.ask_unsaved = lambda: "discard"  # closing at teardown must not wait on a dialog
    return w


def move(canvas, pos: QPoint, buttons=LEFT, modifiers=NONE) -> None:
    """A mouse move with buttons held (QTest.mouseMove does not carry them everywhere)."""
    p = QPointF(pos)
    QApplication.sendEvent(canvas, QMouseEvent(QEvent.Type.MouseMove, p, canvas.mapToGlobal(p),
                                               Qt.MouseButton.NoButton, buttons, modifiers))


def drag(canvas, a: QPoint, b: QPoint, button=LEFT, modifiers=NONE, steps: int = 4) -> None:
    QTest.mousePress(canvas, button, modifiers, a)
    for k in range(1, steps + 1):
        move(canvas, a + (b - a) * (k / steps), button, modifiers)
    QTest.mouseRelease(canvas, button, modifiers, b)


def level0(window, p: QPoint) -> tuple[float, float]:
    return window.canvas.camera.to_level0(p.x(), p.y())


def draw_rect(window, a=QPoint(100, 100), b=QPoint(300, 220)):
    window.annotations.set_tool("rectangle")
    drag(window.canvas, a, b)


def test_rectangle_drawn_with_the_mouse_gets_the_chosen_class_and_undoes(qtbot, window):
    ctl, canvas = window.annotations, window.canvas
    QTest.keyClick(canvas, Qt.Key.Key_R)  # QuPath's key for the rectangle tool
    assert ctl.tool == "rectangle"
    ctl.set_class("Stroma")
    cx, cy = canvas.camera.cx, canvas.camera.cy
    (x0, y0), (x1, y1) = level0(window, QPoint(100, 100)), level0(window, QPoint(300, 220))
    drag(canvas, QPoint(100, 100), QPoint(300, 220))
    assert (canvas.camera.cx, canvas.camera.cy) == (cx, cy)  # drawing did not pan
    assert len(ctl.doc.items) == 1
    a = ctl.doc.items[0]
    assert a.classification == "Stroma"
    assert a.geometry.bounds == pytest.approx((x0, y0, x1, y1))
    assert ctl.overlay in canvas.overlays()
    QTest.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert ctl.doc.items == []
    QTest.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert len(ctl.doc.items) == 1 and ctl.doc.items[0].geometry.bounds == pytest.approx((x0, y0, x1, y1))


def test_polygon_by_clicks_and_double_click_and_escape_cancels(qtbot, window):
    ctl, canvas = window.annotations, window.canvas
    QTest.keyClick(canvas, Qt.Key.Key_P)
    assert ctl.tool == "polygon"
    pts = [QPoint(100, 100), QPoint(300, 110), QPoint(280, 260)]
    for p in pts:
        QTest.mouseClick(canvas, LEFT, NONE, p)
    QTest.mouseDClick(canvas, LEFT, NONE, QPoint(120, 240))
    assert len(ctl.doc.items) == 1
    corners = shapely.get_coordinates(ctl.doc.items[0].geometry.exterior)[:-1]
    want = [level0(window, p) for p in pts + [QPoint(120, 240)]]
    assert len(corners) == 4
    assert sorted(map(tuple, corners.round(3).tolist())) == sorted((round(x, 3), round(y, 3)) for x, y in want)
    # Two corners, then Esc: nothing is added and the draft is gone; Esc again ends the tool.
    QTest.mouseClick(canvas, LEFT, NONE, QPoint(400, 100))
    QTest.mouseClick(canvas, LEFT, NONE, QPoint(450, 200))
    assert ctl.overlay.draft is not None
    QTest.keyClick(canvas, Qt.Key.Key_Escape)
    assert ctl.overlay.draft is None and len(ctl.doc.items) == 1
    QTest.keyClick(canvas, Qt.Key.Key_Escape)
    assert ctl.tool == "move"
    ctl.undo_action.trigger()
    assert ctl.doc.items == []


def test_brush_paints_a_stroke_and_alt_erases_it(qtbot, window):
    ctl, canvas = window.annotations, window.canvas
    QTest.keyClick(canvas, Qt.Key.Key_B)
    ctl.brush_px = 40  # 80 level-0 px wide at 0.5
    drag(canvas, QPoint(100, 200), QPoint(400, 200), steps=10)
    assert len(ctl.doc.items) == 1
    stroke = ctl.doc.items[0]
    r = 40 / 2 / SCALE
    length = 300 / SCALE
    assert stroke.geometry.area == pytest.approx(2 * r * length + 3.14159 * r * r, rel=0.03)
    painted = stroke.geometry.area
    # A second stroke across the selected one joins it.
    drag(canvas, QPoint(250, 120), QPoint(250, 300), steps=6)
    assert len(ctl.doc.items) == 1 and ctl.doc.items[0].geometry.area > painted
    joined = ctl.doc.items[0].geometry.area
    # Alt+drag erases a band out of it.
    drag(canvas, QPoint(330, 120), QPoint(330, 300), modifiers=Qt.KeyboardModifier.AltModifier, steps=6)
    assert len(ctl.doc.items) == 1 and ctl.doc.items[0].geometry.area < joined - 0.5 * 2 * r * 2 * r
    assert not ctl.doc.items[0].geometry.contains(shapely.Point(*level0(window, QPoint(330, 200))))
    ctl.undo_action.trigger()
    assert ctl.doc.items[0].geometry.area == pytest.approx(joined)
    ctl.undo_action.trigger()
    assert ctl.doc.items[0].geometry.area == pytest.approx(painted)


def test_select_move_delete_and_undo_each(qtbot, window):
    ctl, canvas = window.annotations, window.canvas
    draw_rect(window)
    before = ctl.doc.items[0].geometry.bounds
    QTest.keyClick(canvas, Qt.Key.Key_V)
    assert ctl.tool == "move"
    ctl.doc.select(None)
    QTest.mouseClick(canvas, LEFT, NONE, QPoint(400, 400))  # empty: nothing selected
    assert ctl.doc.selected is None
    QTest.mouseClick(canvas, LEFT, NONE, QPoint(200, 150))  # inside: selected
    assert ctl.doc.selected is ctl.doc.items[0]
    cx = canvas.camera.cx
    drag(canvas, QPoint(200, 150), QPoint(240, 180))  # 40, 30 screen px = 80, 60 level-0 px
    assert canvas.camera.cx == cx  # moved the annotation, not the view
    after = ctl.doc.items[0].geometry.bounds
    assert [a - b for a, b in zip(after, before)] == pytest.approx([40 / SCALE, 30 / SCALE] * 2)
    # A drag outside the selection pans the view as before.
    drag(canvas, QPoint(450, 450), QPoint(400, 450))
    assert canvas.camera.cx == pytest.approx(cx + 50 / SCALE)
    ctl.undo_action.trigger()
    assert ctl.doc.items[0].geometry.bounds == pytest.approx(before)
    ctl.redo_action.trigger()
    ctl.doc.select(ctl.doc.items[0])
    QTest.keyClick(canvas, Qt.Key.Key_Delete)
    assert ctl.doc.items == []
    ctl.undo_action.trigger()
    assert len(ctl.doc.items) == 1 and ctl.doc.items[0].geometry.bounds == pytest.approx(after)


def test_right_drag_and_space_drag_pan_while_a_tool_is_active(qtbot, window):
    ctl, canvas = window.annotations, window.canvas
    ctl.set_tool("rectangle")
    cx = canvas.camera.cx
    drag(canvas, QPoint(300, 300), QPoint(200, 300), button=Qt.MouseButton.RightButton)
    assert canvas.camera.cx == pytest.approx(cx + 100 / SCALE)
    QTest.keyPress(canvas, Qt.Key.Key_Space)
    drag(canvas, QPoint(300, 300), QPoint(250, 300))
    QTest.keyRelease(canvas, Qt.Key.Key_Space)
    assert canvas.camera.cx == pytest.approx(cx + 150 / SCALE)
    assert ctl.doc.items == [] and ctl.tool == "rectangle"
    QTest.mouseDClick(canvas, LEFT, NONE, QPoint(300, 300))  # no fit-to-window while drawing
    assert canvas.camera.scale == pytest.approx(SCALE)


def test_import_the_qupath_fixture_and_export_round_trips(qtbot, window, tmp_path):
    ctl = window.annotations
    src = tmp_path / "qupath.geojson"
    src.write_text(QUPATH_GEOJSON)
    ctl.import_file(src)
    qtbot.waitUntil(lambda: len(ctl.doc.items) == 4, timeout=5000)  # the point and the line are left out
    assert ctl.doc.classes() == ["Tumor", "Stroma", "Immune cells"]
    assert ctl.overlay in window.canvas.overlays()
    out = tmp_path / "out.geojson"
    ctl.export_geojson(out)
    again = read_geojson(out)
    assert len(again) == 4
    for a, b in zip(ctl.doc.items, again):
        assert shapely.equals(a.geometry, b.geometry)
        assert a.classification == b.classification
        assert annotation_color(a) == annotation_color(b)  # the class's colour is written out
    ctl.undo_action.trigger()  # the import is one step
    assert ctl.doc.items == []
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    ctl.import_file(bad)
    qtbot.waitUntil(lambda: "not valid JSON" in ctl.last_message, timeout=5000)
    assert ctl.doc.items == []


def test_opening_a_slide_loads_the_geojson_beside_it(qtbot, window, tmp_path):
    slide = tmp_path / "beside.svs"
    shutil.copy(DEMO_SLIDE, slide)
    (tmp_path / "beside.geojson").write_text(QUPATH_GEOJSON)
    open_and_wait(qtbot, window, slide)
    ctl = window.annotations
    qtbot.waitUntil(lambda: len(ctl.doc.items) == 4, timeout=5000)
    assert not ctl.doc.dirty and ctl.doc.source == tmp_path / "beside.geojson"


def test_unsaved_edits_without_a_project_are_asked_about(qtbot, window, tmp_path, monkeypatch):
    ctl = window.annotations
    draw_rect(window)
    assert ctl.doc.dirty
    other = tmp_path / "other.svs"
    shutil.copy(DEMO_SLIDE, other)
    asked = []
    ctl.ask_unsaved = lambda: asked.append(1) or "cancel"
    window.open_slide(other)
    assert asked and Path(window.slide.path) == DEMO_SLIDE and len(ctl.doc.items) == 1
    ctl.ask_unsaved = lambda: "discard"
    open_and_wait(qtbot, window, other)
    assert ctl.doc.items == [] and not ctl.doc.dirty
    draw_rect(window)
    ctl.ask_unsaved = lambda: "cancel"
    assert not window.close() and window.isVisible()  # closing waits for the answer
    saved = tmp_path / "kept.geojson"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(saved), ""))
    ctl.ask_unsaved = lambda: "save"
    assert window.close()
    assert len(read_geojson(saved)) == 1


def test_edits_are_saved_into_the_open_project(qtbot, window, tmp_path, monkeypatch):
    entry = SimpleNamespace(key="demo-1", annotations=None)
    saves = []
    project = SimpleNamespace(path=tmp_path / "p.maglens.json", source=tmp_path,
                              key_of=lambda p: "demo-1" if Path(p) == DEMO_SLIDE else None,
                              slide=lambda k: entry, save=lambda path=None: saves.append(1))
    monkeypatch.setattr(window.results, "project", project)  # what the annotations read
    ctl = window.annotations
    draw_rect(window)
    target = tmp_path / "annotations" / "demo-1.geojson"
    qtbot.waitUntil(lambda: target.is_file() and bool(saves), timeout=5000)  # debounced
    assert entry.annotations == target and not ctl.doc.dirty
    assert len(read_geojson(target)) == 1
    assert ctl.annotation_file(str(DEMO_SLIDE)) == target
