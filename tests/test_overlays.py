"""Trace overlays paint in level-0 coordinates: cells, boxes and trail steps land on the
right slide pixels at any zoom."""
from __future__ import annotations

import pytest
from PySide6.QtGui import QColor

from engines.slide import Slide
from engines.trace import AttentionMap, Field, TrailStep
from viewer.canvas import SlideCanvas
from viewer.overlays import colormaps
from viewer.overlays.fields import FieldsOverlay
from viewer.overlays.heatmap import HeatmapOverlay, shared_range
from viewer.overlays.trail import TrailOverlay
from tests.conftest import DEMO_SLIDE


@pytest.fixture
def canvas(qtbot):
    c = SlideCanvas()
    qtbot.addWidget(c)
    c.resize(400, 300)
    c.set_slide(Slide(DEMO_SLIDE))
    yield c
    c.shutdown()


def _rgb(img, x, y):
    q = QColor(img.pixel(int(x), int(y)))
    return q.red(), q.green(), q.blue()


def _close(a, b, tol=12):
    return all(abs(int(p) - int(q)) <= tol for p, q in zip(a, b))


@pytest.mark.parametrize("scale", [0.25, 1.0, 3.0])
def test_heatmap_cells_land_on_their_level0_pixels(canvas, scale):
    # 2x2 map over (1000, 1200)-(1200, 1360); values 0 and 1 on a checkerboard.
    amap = AttentionMap("m", "test", None, (1000.0, 1200.0), (100.0, 80.0), [[0.0, 1.0], [1.0, 0.0]])
    ov = HeatmapOverlay(amap, colormap="viridis", opacity=1.0)
    ov.show_grid = False
    canvas.add_overlay(ov)
    # Render a view in which one level-0 pixel is `scale` image pixels, corner cell at the centre.
    w, h = 400, 300
    cx, cy = 1100.0, 1280.0  # the corner shared by all four cells
    view = (cx - w / 2 / scale, cy - h / 2 / scale, w / scale, h / scale)
    img = canvas.render_image(w, h, view)
    low, high = colormaps.color("viridis", 0.0), colormaps.color("viridis", 1.0)
    lo, hi = (low.red(), low.green(), low.blue()), (high.red(), high.green(), high.blue())
    d = 2  # image pixels away from the corner, inside each cell
    assert _close(_rgb(img, w / 2 - d, h / 2 - d), lo)   # cell (0, 0)
    assert _close(_rgb(img, w / 2 + d, h / 2 - d), hi)   # cell (0, 1)
    assert _close(_rgb(img, w / 2 - d, h / 2 + d), hi)   # cell (1, 0)
    assert _close(_rgb(img, w / 2 + d, h / 2 + d), lo)   # cell (1, 1)
    # outside the map's right edge the slide shows, not the map
    right_edge_x = w / 2 + 100 * scale
    if right_edge_x + d < w:
        px = _rgb(img, right_edge_x + d, h / 2 - d)
        assert not _close(px, hi, tol=3)


def test_heatmap_value_lookup_and_joint_range():
    a = HeatmapOverlay(AttentionMap("a", "g", None, (0.0, 0.0), (10.0, 10.0), [[1.0, 2.0]]))
    b = HeatmapOverlay(AttentionMap("b", "g", None, (0.0, 0.0), (10.0, 10.0), [[0.0, 4.0]]))
    assert a.value_at(15, 5) == 2.0 and a.value_at(25, 5) is None and a.cell_at(-1, 5) is None
    assert a.value_range() == (1.0, 2.0)
    a.set_range(shared_range([a, b]))
    assert a.value_range() == (0.0, 4.0)
    assert a.normalised().tolist() == [[0.25, 0.5]]


def test_fields_draw_boxes_with_constant_screen_width(canvas):
    f = Field(1, 0, 1, (1000.0, 1000.0, 200.0, 200.0), 0.5, "zoom")
    ov = FieldsOverlay([Field(0, None, 0, (0, 0, 2220, 2967)), f], line_width=3)
    canvas.add_overlay(ov)
    color = colormaps.depth_color(1)
    target = (color.red(), color.green(), color.blue())
    for scale in (0.5, 2.0):
        img = canvas.render_image(400, 300, (1100 - 200 / scale, 1100 - 150 / scale, 400 / scale, 300 / scale))
        left = 200 - 100 * scale  # the box's left edge on screen
        assert _close(_rgb(img, left, 150), target, tol=40)
        # the line is a few screen pixels wide at every zoom: 6 px inside is slide again
        assert not _close(_rgb(img, left + 6, 150), target, tol=40)
    assert ov.field_at(1100, 1100).id == 1 and ov.field_at(10, 10) is None


def test_trail_markers_sit_on_patch_centres_and_are_clickable(canvas):
    fields = [Field(1, 0, 1, (500.0, 500.0, 100.0, 100.0)), Field(2, 0, 1, (1500.0, 2000.0, 100.0, 100.0))]
    steps = [TrailStep(0, 1, [0.9, 0.1]), TrailStep(1, 2, [0.1, 0.9])]
    ov = TrailOverlay(steps, fields)
    canvas.add_overlay(ov)
    cam = canvas.camera.copy()
    cam.width, cam.height, cam.cx, cam.cy, cam.scale = 400, 300, 1000.0, 1600.0, 0.2
    img = canvas.render_image(400, 300, cam.view_rect())
    sx, sy = cam.to_screen(1550.0, 2050.0)
    high = colormaps.color(colormaps.PROBABILITY, 0.9)
    assert _close(_rgb(img, sx + 5, sy + 5), (high.red(), high.green(), high.blue()), tol=30)
    assert ov.step_at(cam, sx + 2, sy - 2).index == 1
    assert ov.step_at(cam, 5, 5) is None


def test_a_child_covering_its_parent_is_dashed_so_both_colours_show(canvas):
    parent = Field(1, 0, 1, (1000.0, 1000.0, 300.0, 300.0), 0.5, "zoom")
    child = Field(2, 1, 2, (1000.0, 1000.0, 300.0, 300.0), 1.0, "zoom")
    inner = Field(3, 1, 2, (1100.0, 1100.0, 100.0, 100.0), 1.0, "zoom")
    ov = FieldsOverlay([parent, child, inner], line_width=2)
    canvas.add_overlay(ov)
    img = canvas.render_image(400, 300, (900.0, 1000.0, 400.0, 300.0))  # 1 px per level-0 px
    c1, c2 = colormaps.depth_color(1), colormaps.depth_color(2)
    edge = [_rgb(img, 100, y) for y in range(60, 120)]  # along the shared left edge
    assert any(_close(p, (c1.red(), c1.green(), c1.blue()), 40) for p in edge)
    assert any(_close(p, (c2.red(), c2.green(), c2.blue()), 40) for p in edge)
    # a child inside its parent is drawn solid in its depth's colour
    solid = [_rgb(img, 200, y) for y in range(160, 190)]
    assert all(_close(p, (c2.red(), c2.green(), c2.blue()), 40) for p in solid)


def test_cell_borders_show_on_large_cells_only(canvas):
    amap = AttentionMap("m", "g", None, (1000.0, 1000.0), (100.0, 100.0), [[0.0, 0.0], [0.0, 0.0]])
    ov = HeatmapOverlay(amap, colormap="viridis", opacity=1.0)
    canvas.add_overlay(ov)
    low = colormaps.color("viridis", 0.5)  # a flat map sits mid-range
    # 2 image px per level-0 px: cells are 200 px, the border between them is drawn
    img = canvas.render_image(400, 300, (1000.0, 1000.0, 200.0, 150.0))
    assert _close(_rgb(img, 100, 150), (low.red(), low.green(), low.blue()))
    assert not _close(_rgb(img, 200, 100), (low.red(), low.green(), low.blue()), tol=8)
    # 0.1 image px per level-0 px: 10 px cells, no borders, every pixel the cell colour
    img = canvas.render_image(400, 300, (0.0, 0.0, 4000.0, 3000.0))
    sx = (1100.0 - 0.0) / 10
    assert _close(_rgb(img, sx, 105), (low.red(), low.green(), low.blue()))
