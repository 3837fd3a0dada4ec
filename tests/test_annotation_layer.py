"""The Annotations layer: fill and outline by class with holes left open, culling and hit
tests, and its toggles (layer, per class, opacity) in the Layers dock."""
from __future__ import annotations

import numpy as np
import pytest
import shapely
from PySide6.QtGui import QColor, QImage, QPainter, QPainterPath

from engines.annotations import Annotation
from tests.conftest import DEMO_SLIDE
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, open_and_wait, qsettings  # noqa: F401
from viewer.camera import Camera
from viewer.overlays.annotations import AnnotationOverlay

RED, GREEN = (200, 0, 0), (0, 160, 0)


def _camera(scale: float = 1.0, w: int = 400, h: int = 300, cx: float = 200, cy: float = 150) -> Camera:
    cam = Camera(width=w, height=h)
    cam.slide_w, cam.slide_h = 100_000, 100_000
    cam.cx, cam.cy, cam.scale = cx, cy, scale
    return cam


def _paint(overlay: AnnotationOverlay, cam: Camera) -> np.ndarray:
    img = QImage(cam.width, cam.height, QImage.Format.Format_RGB888)
    img.fill(QColor(255, 255, 255))
    p = QPainter(img)
    overlay.paint(p, cam)
    p.end()
    buf = np.frombuffer(img.constBits(), np.uint8, count=img.bytesPerLine() * img.height())
    rows = buf.reshape(img.height(), img.bytesPerLine())[:, : img.width() * 3]
    return rows.reshape(img.height(), img.width(), 3).astype(int)


def test_fill_by_class_with_holes_open_and_culling(qtbot):
    donut = shapely.Polygon([(20, 20), (180, 20), (180, 180), (20, 180)],
                            [[(60, 60), (140, 60), (140, 140), (60, 140)]])
    overlay = AnnotationOverlay([Annotation(donut, "Tumor", RED),
                                 Annotation(shapely.box(220, 20, 380, 180), "Stroma", GREEN),
                                 Annotation(shapely.box(5000, 5000, 5100, 5100), "Tumor", RED)])
    cam = _camera()
    px = _paint(overlay, cam)
    ring, hole, stroma = px[40, 40].astype(int), px[100, 100].astype(int), px[100, 300].astype(int)
    assert ring[0] > ring[1] + 20 and ring[0] > ring[2] + 20  # tinted red
    assert stroma[1] > stroma[0] + 20  # tinted green
    assert tuple(hole) == (255, 255, 255)  # the hole stays open
    assert overlay.last_painted == 2  # the one far outside the view is not drawn
    assert overlay.visible_indices(cam.view_rect()).tolist() == [0, 1]
    assert [n for n, _ in overlay.legend()] == ["Tumor", "Stroma"]
    # Hit tests: the topmost containing annotation; a click in the hole hits nothing.
    assert overlay.annotation_at(30, 30) is overlay.annotations[0]
    assert overlay.annotation_at(100, 100) is None
    overlay.set_class_visible("Tumor", False)
    assert overlay.annotation_at(30, 30) is None
    px = _paint(overlay, cam)
    assert tuple(px[40, 40]) == (255, 255, 255) and px[100, 300][1] > px[100, 300][0] + 20


def test_zoomed_out_small_polygons_are_boxes_or_skipped(qtbot):
    tiny = [Annotation(shapely.box(x, 100, x + 1, 101), "Tumor", RED) for x in range(0, 4000, 40)]
    small = [Annotation(shapely.Point(x, 3000).buffer(60), "Tumor", RED) for x in range(0, 4000, 400)]
    overlay = AnnotationOverlay(tiny + small)
    cam = _camera(scale=0.05, cx=2000, cy=1500)  # 1 px outlines are 0.05 px here; 120 px discs are 6 px
    px = _paint(overlay, cam)
    assert overlay.last_painted == len(small)
    sx, sy = cam.to_screen(2000, 3000)
    assert px[int(sy), int(sx)][0] > px[int(sy), int(sx)][1] + 20


@pytest.fixture
def window(qtbot, qsettings, dialogs):  # noqa: F811
    w = make_window(qtbot, qsettings)
    open_and_wait(qtbot, w, DEMO_SLIDE)
    w.canvas.center_on(1000, 1000, scale=0.5, animate=False)
    return w


def _pixel(window, x: float, y: float) -> np.ndarray:
    canvas = window.canvas
    img = canvas.render_image(canvas.width(), canvas.height()).convertToFormat(QImage.Format.Format_RGB888)
    sx, sy = canvas.camera.to_screen(x, y)
    c = img.pixelColor(int(sx), int(sy))
    return np.array([c.red(), c.green(), c.blue()])


def test_layers_dock_toggles_the_layer_each_class_and_opacity(qtbot, window):
    ctl = window.annotations
    tumor = Annotation(shapely.box(800, 800, 1000, 1000), "Tumor", (255, 0, 0))
    stroma = Annotation(shapely.box(1100, 800, 1300, 1000), "Stroma", (0, 0, 255))
    base_t, base_s = _pixel(window, 900, 900), _pixel(window, 1200, 900)
    ctl.doc.reset([tumor, stroma], ctl.doc.slide)
    rows = [r for r in window.layers_panel.rows() if r.overlay is ctl.overlay]
    assert len(rows) == 1
    row = rows[0]
    assert row.checkbox.text() == "Annotations" and list(row.class_boxes) == ["Tumor", "Stroma"]
    assert row.class_boxes["Tumor"].property("swatch") == QColor(255, 0, 0).name()
    on_t, on_s = _pixel(window, 900, 900), _pixel(window, 1200, 900)
    assert on_t[0] - on_t[2] > base_t[0] - base_t[2] + 10  # redder
    assert on_s[2] - on_s[0] > base_s[2] - base_s[0] + 10  # bluer
    row.class_boxes["Tumor"].click()
    assert not ctl.overlay.class_visible("Tumor")
    assert np.abs(_pixel(window, 900, 900) - base_t).max() <= 2
    assert np.abs(_pixel(window, 1200, 900) - on_s).max() <= 2
    row.class_boxes["Tumor"].click()
    row.checkbox.click()  # the whole layer
    assert not ctl.overlay.visible
    assert np.abs(_pixel(window, 1200, 900) - base_s).max() <= 2
    row.checkbox.click()
    row.slider.setValue(0)
    assert ctl.overlay.opacity == 0.0
    assert np.abs(_pixel(window, 900, 900) - base_t).max() <= 2
    # A slide without annotations takes the layer away again.
    ctl.doc.reset([], ctl.doc.slide)
    assert ctl.overlay not in window.canvas.overlays()


def test_selection_handles_and_the_draft_are_drawn_where_they_belong(qtbot):
    box = Annotation(shapely.box(20, 20, 180, 180), "Tumor", RED)
    overlay = AnnotationOverlay([box])
    overlay.set_selected(box)
    path = QPainterPath()
    path.moveTo(250, 250)
    path.lineTo(390, 250)
    overlay.draft = path  # a polygon being drawn, after the selection's screen-space handles
    overlay.draft_color = QColor(0, 0, 255)
    cam = _camera(cx=300)  # level-0 x lands 100 px further left on screen
    px = _paint(overlay, cam)
    assert (px[14:27, 74:87].max(axis=2) < 60).any()  # the black rim of the handle at (180, 20)
    band = px[247:254, 160:240]  # level-0 x 260..340
    assert (band[..., 2] > band[..., 0] + 40).any()  # the (dashed) draft line, in level-0 place
    overlay.move_offset = (100.0, 0.0)  # dragged: drawn where it will land
    px = _paint(overlay, cam)
    assert px[100, 150][0] > px[100, 150][1] + 20


def test_a_crowd_drawn_through_an_image_follows_every_change(qtbot):
    crowd = [Annotation(shapely.box(x, y, x + 8, y + 8), "Tumor", RED)
             for x in range(0, 400, 10) for y in range(0, 300, 10)]  # 1,200 on screen
    overlay = AnnotationOverlay(crowd)
    cam = _camera()
    px = _paint(overlay, cam)
    assert overlay.last_painted == len(crowd) and px[4, 4][0] > px[4, 4][1] + 20
    assert overlay._raster is not None  # the crowd went through the image
    again = _paint(overlay, cam)  # same view: the image again, the same pixels
    assert (again == px).all()
    overlay.set_class_visible("Tumor", False)
    assert tuple(_paint(overlay, cam)[4, 4]) == (255, 255, 255)
    overlay.set_class_visible("Tumor", True)
    overlay.set_annotations(crowd[1:])  # the one at the origin is gone
    px = _paint(overlay, cam)
    assert tuple(px[4, 4]) == (255, 255, 255) and px[14, 4][0] > px[14, 4][1] + 20
