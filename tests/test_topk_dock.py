"""The Top-k regions dock: the highest-attention cells (or fields) of the current trace with
thumbnails, value and position; a click centres the view on one; Export CSV."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFileDialog

from app.topk_dock import FIELDS, top_cells, top_fields
from engines.trace import AttentionMap, Field, SlideRef, Trace
from tests.conftest import DEMO_SLIDE
from tests.test_inference_gui import wait_still, window  # noqa: F401
from tests.test_main_window import _sandboxed_settings, dialogs, qsettings  # noqa: F401

DEMO_W, DEMO_H = 2220, 2967
MPP = 0.499  # the demo slide's own


def _values() -> np.ndarray:
    rng = np.random.default_rng(3)
    v = rng.random((6, 5)) * 0.1
    v[4, 1], v[0, 3], v[2, 2], v[5, 4] = 0.9, 0.8, 0.7, 0.6  # the top four, in this order
    return v


def _trace(tmp_path: Path, maps=True) -> Path:
    cell = (DEMO_W / 5, DEMO_H / 6)
    second = np.zeros((6, 5))
    second[1, 1] = 5.0
    amaps = [AttentionMap("stage 1", "stage 1", None, (0.0, 0.0), cell, _values().tolist()),
             AttentionMap("stage 2", "stage 2", None, (0.0, 0.0), cell, second.tolist())] if maps else []
    fields = [Field(0, None, 0, (0, 0, DEMO_W, DEMO_H), 1.0, "view"),
              Field(1, 0, 1, (100, 200, 64, 64), 0.2, "patch"),
              Field(2, 0, 1, (1000, 1500, 64, 64), 0.9, "patch"),
              Field(3, 0, 1, (1800, 300, 64, 64), 0.5, "patch")]
    trace = Trace(model="grid_attention" if maps else "spatial_mag", preset="tiny", checkpoint=None,
                  slide=SlideRef(str(DEMO_SLIDE), DEMO_W, DEMO_H, MPP), classes=["a", "b"],
                  probs=[0.5, 0.5], fields=fields, maps=amaps, trail=[])
    path = tmp_path / ("maps.trace.json" if maps else "fields.trace.json")
    trace.save(path)
    return path


def test_top_cells_are_the_highest_in_order_with_their_level0_rects():
    amap = AttentionMap("m", "g", None, (10.0, 20.0), (100.0, 50.0), _values().tolist())
    top = top_cells(amap, 4)
    assert [r.value for r in top] == [0.9, 0.8, 0.7, 0.6]
    assert [r.rect for r in top] == [(110.0, 220.0, 100.0, 50.0), (310.0, 20.0, 100.0, 50.0),
                                     (210.0, 120.0, 100.0, 50.0), (410.0, 270.0, 100.0, 50.0)]
    # NaN cells never rank; ties keep row-major order; k beyond the cells lists them all.
    amap = AttentionMap("m", "g", None, (0.0, 0.0), (1.0, 1.0), [[1.0, float("nan")], [2.0, 1.0]])
    assert [(r.rect[:2], r.value) for r in top_cells(amap, 10)] == [((0.0, 1.0), 2.0), ((0.0, 0.0), 1.0),
                                                                     ((1.0, 1.0), 1.0)]


def test_top_fields_rank_the_sampled_fields_by_score(tmp_path):
    trace = Trace.load(_trace(tmp_path, maps=False))
    top = top_fields(trace, 2)
    assert [(r.rect, r.value, r.source) for r in top] == [((1000.0, 1500.0, 64.0, 64.0), 0.9, FIELDS),
                                                          ((1800.0, 300.0, 64.0, 64.0), 0.5, FIELDS)]


def _dock(qtbot, window):
    c = window.topk
    c.dock.show()
    c.dock.raise_()
    qtbot.waitUntil(lambda: c.panel.list.isVisible(), timeout=5000)
    return c


def test_dock_lists_the_chosen_maps_top_cells_with_thumbnails(qtbot, window, tmp_path):  # noqa: F811
    c = _dock(qtbot, window)
    assert c.panel.list.count() == 0 and "No trace" in c.panel.source_label.text()
    assert window.open_trace(_trace(tmp_path))
    assert c.panel.list.count() == 12  # the default k
    assert [r.value for r in c.regions[:4]] == [0.9, 0.8, 0.7, 0.6]
    values = [r.value for r in c.regions]
    assert values == sorted(values, reverse=True)
    first = c.panel.list.item(0).text()
    cx, cy = (1 + 0.5) * DEMO_W / 5, (4 + 0.5) * DEMO_H / 6
    assert "0.9" in first and f"{cx * MPP:,.0f}, {cy * MPP:,.0f} \u00b5m" in first
    c.panel.k_spin.setValue(3)
    assert c.panel.list.count() == 3 and [r.value for r in c.regions] == [0.9, 0.8, 0.7]
    # Thumbnails are read off the GUI thread and arrive for every row, shaped like the cell.
    qtbot.waitUntil(lambda: len(c.thumbnails) == 3, timeout=10_000)
    img = c.thumbnails[0]
    cw, ch = DEMO_W / 5, DEMO_H / 6
    assert max(img.width(), img.height()) == 72
    assert img.width() / img.height() == pytest.approx(cw / ch, rel=0.05)
    assert len({img.pixel(x, y) for x in range(0, img.width(), 8) for y in range(0, img.height(), 8)}) > 3


def test_clicking_a_region_centres_the_view_on_it(qtbot, window, tmp_path):  # noqa: F811
    c = _dock(qtbot, window)
    assert window.open_trace(_trace(tmp_path))
    wait_still(qtbot, window.canvas)
    lst = c.panel.list
    rect = lst.visualItemRect(lst.item(2))
    qtbot.mouseClick(lst.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    wait_still(qtbot, window.canvas)
    cam = window.canvas.camera
    x, y, w, h = c.regions[2].rect
    assert (cam.cx, cam.cy) == pytest.approx((x + w / 2, y + h / 2))
    vx, vy, vw, vh = window.canvas.view_rect()
    # The region fills a good part of the view and lies wholly inside it.
    assert 0.25 <= max(w / vw, h / vh) <= 0.6
    assert vx <= x and vy <= y and x + w <= vx + vw and y + h <= vy + vh


def test_sampling_trace_without_maps_lists_fields_and_exports_csv(qtbot, window, tmp_path, monkeypatch):  # noqa: F811
    c = _dock(qtbot, window)
    assert window.open_trace(_trace(tmp_path, maps=False))
    assert [r.value for r in c.regions] == [0.9, 0.5, 0.2]
    assert "fields" in c.panel.source_label.text()
    out = tmp_path / "exports" / "top.csv"
    out.parent.mkdir()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), "CSV (*.csv)"))
    c.panel.export_button.click()
    rows = list(csv.DictReader(out.open()))
    assert [(r["x"], r["y"], r["w"], r["h"], float(r["value"]), r["map"]) for r in rows] == [
        ("1000", "1500", "64", "64", 0.9, "fields"), ("1800", "300", "64", "64", 0.5, "fields"),
        ("100", "200", "64", "64", 0.2, "fields")]
    assert [p.name for p in out.parent.iterdir()] == ["top.csv"]  # no temporary file left


def test_map_csv_has_level0_cells_in_rank_order(window, tmp_path):  # noqa: F811
    assert window.open_trace(_trace(tmp_path))
    c = window.topk
    c.panel.k_spin.setValue(2)
    path = c.export_csv(tmp_path / "cells.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "x,y,w,h,value,map"
    # Cells are 444 x 494.5 level-0 px: whole numbers stay whole.
    assert lines[1:] == ["444,1978,444,494.500,0.9,stage 1", "1332,0,444,494.500,0.8,stage 1"]


def test_the_map_chosen_in_the_models_dock_is_the_one_listed(window, tmp_path):  # noqa: F811
    assert window.open_trace(_trace(tmp_path))
    c = window.topk
    assert c.regions[0].source == "stage 1"
    window.models_panel.map_combo.setCurrentIndex(1)
    window.models_panel.map_combo.activated.emit(1)  # as a user's pick in the Map list
    assert c.regions[0].source == "stage 2" and c.regions[0].value == 5.0
    assert c.regions[0].rect[:2] == (444.0, 494.5)
    assert "stage 2" in c.panel.source_label.text()
    assert window.map_display.panel.map_label.text() == "stage 2"
