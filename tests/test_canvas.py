"""SlideCanvas as a user drives it (offscreen): interaction, tiles on screen, failures, export."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QColor, QImage, QPen, QWheelEvent
from PySide6.QtWidgets import QApplication

from engines.slide import Slide, pack_xrgb
from tests.conftest import DATA, DEMO_SLIDE, GOOD_SLIDES
from viewer.canvas import BACKGROUND, SlideCanvas
from viewer.minimap import Minimap
from viewer.overlays.base import Overlay
from viewer.scalebar import NO_SCALE_NOTE, nice_length

W, H = 640, 480


class GatedSlide:
    """A real slide whose reads of some levels wait at a gate; every read is recorded."""

    def __init__(self, slide: Slide, held_levels: set[int]) -> None:
        self._slide = slide
        self.held = held_levels
        self.gate = threading.Event()
        self.reads: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def read_region(self, level, x, y, w, h):
        with self._lock:
            self.reads.append((level, x, y))
        if level in self.held:
            self.gate.wait(10)
        return self._slide.read_region(level, x, y, w, h)

    def read_region_xrgb(self, level, x, y, w, h):  # the viewer's read, through ours
        return pack_xrgb(self.read_region(level, x, y, w, h))


@pytest.fixture
def canvas(qtbot):
    c = SlideCanvas(threads=2)
    c.animation_ms = 0
    c.scale_bar.visible = False  # exact pixel checks; the scale bar has its own test
    qtbot.addWidget(c)
    c.resize(W, H)
    c.show()
    qtbot.waitExposed(c)
    yield c
    c.shutdown()


def _open(qtbot, canvas: SlideCanvas, slide) -> None:
    with qtbot.waitSignal(canvas.frame_complete, timeout=10_000):
        canvas.set_slide(slide)
        canvas.fit_view(animate=False)


def _settle(qtbot, canvas: SlideCanvas) -> None:
    """Wait until the current view is fully painted."""
    canvas.update()
    qtbot.waitUntil(lambda: canvas._completed_view == (canvas.camera.cx, canvas.camera.cy,
                                                       canvas.camera.scale, W, H), timeout=10_000)


def _rgb(img: QImage, x: int, y: int) -> tuple[int, int, int]:
    c = img.pixelColor(x, y)
    return c.red(), c.green(), c.blue()


def _array(img: QImage) -> np.ndarray:
    img = img.convertToFormat(QImage.Format.Format_RGB888)
    ptr = img.constBits()
    arr = np.frombuffer(ptr, np.uint8, img.bytesPerLine() * img.height())
    return arr.reshape(img.height(), img.bytesPerLine())[:, : img.width() * 3].reshape(
        img.height(), img.width(), 3).copy()


def _wheel(widget, pos: QPointF, notches: float) -> None:
    ev = QWheelEvent(pos, widget.mapToGlobal(pos), QPoint(0, 0), QPoint(0, int(120 * notches)),
                     Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier,
                     Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget, ev)


# -- interaction -----------------------------------------------------------------------------
def test_wheel_keeps_point_under_cursor(qtbot, canvas):
    _open(qtbot, canvas, Slide(DEMO_SLIDE))
    for pos, notches in [(QPointF(150, 100), 2), (QPointF(500, 380), 3), (QPointF(320, 60), -1)]:
        before = canvas.camera.to_level0(pos.x(), pos.y())
        scale = canvas.camera.scale
        _wheel(canvas, pos, notches)
        assert canvas.camera.scale != pytest.approx(scale)
        assert canvas.camera.to_level0(pos.x(), pos.y()) == pytest.approx(before, abs=1e-6)


def test_animated_wheel_zoom_keeps_point_fixed_throughout(qtbot, canvas):
    _open(qtbot, canvas, Slide(DEMO_SLIDE))
    # Long enough that a loaded machine still paints frames between the ends.
    canvas.animation_ms = 400
    fit = canvas.camera.scale
    pos = QPointF(420, 150)
    anchor = canvas.camera.to_level0(pos.x(), pos.y())
    seen, scales = [], []

    def on_view(_rect) -> None:
        seen.append(canvas.camera.to_level0(pos.x(), pos.y()))
        scales.append(canvas.camera.scale)

    canvas.view_changed.connect(on_view)
    _wheel(canvas, pos, 1)
    _wheel(canvas, pos, 1)  # a second notch mid-animation compounds
    qtbot.waitUntil(lambda: not canvas.is_animating(), timeout=5000)
    assert canvas.camera.scale == pytest.approx(2 * fit)
    # It really animated: some frame lay strictly between the start and the end scale.
    assert any(fit * 1.01 < s < 2 * fit * 0.99 for s in scales), scales
    for point in seen:
        assert point == pytest.approx(anchor, abs=1e-6)


def test_drag_pans_by_the_drag(qtbot, canvas):
    _open(qtbot, canvas, Slide(DEMO_SLIDE))
    canvas.center_on(1100, 1500, scale=0.5, animate=False)
    anchor = canvas.camera.to_level0(300, 200)
    seen = []
    canvas.view_changed.connect(seen.append)
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, pos=QPoint(300, 200))
    qtbot.mouseMove(canvas, QPoint(340, 230))
    qtbot.mouseMove(canvas, QPoint(370, 260))
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=QPoint(370, 260))
    # The level-0 point grabbed at (300, 200) now sits under the release point.
    assert canvas.camera.to_screen(*anchor) == pytest.approx((370, 260), abs=1e-6)
    assert seen and seen[-1] == pytest.approx(canvas.camera.view_rect())


def test_keys_pan_zoom_fit_and_magnify(qtbot, canvas):
    slide = Slide(DEMO_SLIDE)
    _open(qtbot, canvas, slide)
    fit = canvas.camera.scale
    qtbot.keyClick(canvas, Qt.Key.Key_Plus)
    assert canvas.camera.scale == pytest.approx(2 * fit)
    cx = canvas.camera.cx
    qtbot.keyClick(canvas, Qt.Key.Key_Right)
    assert canvas.camera.cx == pytest.approx(cx + 0.2 * W / canvas.camera.scale)
    cy = canvas.camera.cy
    qtbot.keyClick(canvas, Qt.Key.Key_Up)
    assert canvas.camera.cy == pytest.approx(cy - 0.2 * H / canvas.camera.scale)
    qtbot.keyClick(canvas, Qt.Key.Key_Minus)
    assert canvas.camera.scale == pytest.approx(fit)
    for key, mag in [(Qt.Key.Key_3, 10.0), (Qt.Key.Key_4, 20.0), (Qt.Key.Key_2, 5.0),
                     (Qt.Key.Key_5, 40.0)]:
        qtbot.keyClick(canvas, key)
        assert canvas.current_magnification() == pytest.approx(mag)
        assert canvas.camera.scale == pytest.approx(mag / slide.objective_power)
    qtbot.keyClick(canvas, Qt.Key.Key_F)
    assert canvas.camera.scale == pytest.approx(fit)
    assert (canvas.camera.cx, canvas.camera.cy) == pytest.approx((slide.width / 2, slide.height / 2))


def test_animated_zoom_reaches_target_and_compounds(qtbot, canvas):
    _open(qtbot, canvas, Slide(DEMO_SLIDE))
    canvas.animation_ms = 60
    fit = canvas.camera.scale
    canvas.zoom_by(2.0)
    canvas.zoom_by(2.0)  # pressed again mid-animation: the target compounds
    assert canvas.is_animating()
    qtbot.waitUntil(lambda: not canvas.is_animating(), timeout=3000)
    assert canvas.camera.scale == pytest.approx(4 * fit)


def test_magnification_from_mpp_when_objective_is_missing(qtbot, canvas):
    slide = Slide(DATA / "wsi-jpeg.dcm")  # mpp but no objective power
    assert slide.objective_power is None and slide.mpp
    _open(qtbot, canvas, slide)
    # 10x is about 1 um per screen pixel, so 1x is 10 um per screen pixel.
    qtbot.keyClick(canvas, Qt.Key.Key_1)
    assert slide.mpp / canvas.camera.scale == pytest.approx(10.0)
    assert canvas.current_magnification() == pytest.approx(1.0)
    canvas.set_magnification(0.5)
    assert slide.mpp / canvas.camera.scale == pytest.approx(20.0)
    assert canvas.current_magnification() == pytest.approx(0.5)


def test_minimap_click_centres_canvas(qtbot, canvas):
    slide = Slide(DEMO_SLIDE)
    mini = Minimap(canvas)
    qtbot.addWidget(mini)
    mini.resize(200, 200)
    mini.show()
    _open(qtbot, canvas, slide)
    canvas.center_on(500, 500, scale=1.0, animate=False)
    qtbot.waitUntil(lambda: mini.thumbnail is not None, timeout=10_000)
    r = mini.image_rect()
    click = QPoint(int(r.x() + r.width() * 0.75), int(r.y() + r.height() * 0.25))
    qtbot.mouseClick(mini, Qt.MouseButton.LeftButton, pos=click)
    expect_x = (click.x() - r.x()) / r.width() * slide.width
    expect_y = (click.y() - r.y()) / r.height() * slide.height
    assert (canvas.camera.cx, canvas.camera.cy) == pytest.approx((expect_x, expect_y), abs=1e-6)
    assert canvas.camera.scale == pytest.approx(1.0)


# -- pixels on screen ------------------------------------------------------------------------
@pytest.mark.parametrize("path", GOOD_SLIDES, ids=lambda p: p.name)
def test_every_good_slide_shows_the_right_pixels(qtbot, canvas, path):
    slide = Slide(path)
    _open(qtbot, canvas, slide)
    grab = _array(canvas.grab().toImage())
    cam = canvas.camera
    block = 6
    diffs = []
    for fx, fy in [(0.3, 0.3), (0.5, 0.5), (0.7, 0.6), (0.45, 0.7)]:
        sx, sy = int(W * fx), int(H * fy)
        x0, y0 = cam.to_level0(sx, sy)
        x1, y1 = cam.to_level0(sx + block, sy + block)
        if not (0 <= x0 and x1 <= slide.width and 0 <= y0 and y1 <= slide.height):
            continue
        expected = slide.read_rect((x0, y0, x1 - x0, y1 - y0), block, block).astype(float)
        shown = grab[sy : sy + block, sx : sx + block].astype(float)
        diffs.append(np.abs(shown.mean((0, 1)) - expected.mean((0, 1))).max())
    assert diffs, "no probe landed on the slide"
    assert max(diffs) < 12, diffs


@pytest.mark.parametrize("name,level", [("CMU-1-Small-Region.svs", 0), ("test3-DAPI-2.ndpi", 1),
                                        ("test3-DAPI-2.ndpi", 3)])
def test_pixels_exact_at_level_resolution(qtbot, canvas, name, level):
    path = DEMO_SLIDE if name == DEMO_SLIDE.name else DATA / name
    slide = Slide(path)
    _open(qtbot, canvas, slide)
    ds = slide.levels[level].downsample
    lx, ly = slide.levels[level].width // 2, slide.levels[level].height // 2
    canvas.center_on(lx * ds, ly * ds, scale=1.0 / ds, animate=False)  # level pixel at centre
    _settle(qtbot, canvas)
    grab = _array(canvas.grab().toImage())
    # Widget pixel (W/2 + i) shows level pixel (lx + i).
    ref = slide.read_region(level, int((lx - 50) * ds), int((ly - 40) * ds), 100, 80)
    shown = grab[H // 2 - 40 : H // 2 + 40, W // 2 - 50 : W // 2 + 50]
    assert np.array_equal(shown, ref)


def test_coarse_tiles_stand_in_before_fine_ones_arrive(qtbot, canvas):
    real = Slide(DATA / "test3-DAPI-2.ndpi")
    coarsest = real.level_count - 1
    slide = GatedSlide(real, held_levels=set(range(coarsest)))
    try:
        canvas.set_slide(slide)
        # Only the coarsest level can load; wait until it is resident.
        qtbot.waitUntil(lambda: canvas.cache.resident_bytes > 0, timeout=10_000)
        canvas.center_on(2000, 2400, scale=1.0, animate=False)
        canvas.repaint()
        grab = _array(canvas.grab().toImage())
        bg = np.all(grab == np.array(BACKGROUND.getRgb()[:3]), axis=2)
        assert bg.mean() < 0.01  # the view lies inside the slide: no blank holes
        assert canvas._completed_view is None or canvas.loader.pending() > 0
        before = grab
    finally:
        slide.gate.set()
    _settle(qtbot, canvas)
    after = _array(canvas.grab().toImage())
    # The sharp tiles replaced the stand-in and match level 0 exactly.
    ref = real.read_region(0, 2000 - W // 2, 2400 - H // 2, W, H)
    assert np.array_equal(after[:, :], ref)
    assert not np.array_equal(before, after)


def test_stale_tiles_are_not_decoded_after_the_view_moves(qtbot, canvas):
    real = Slide(DATA / "test3-DAPI-2.ndpi")  # 3968x4864; only level 0 is held
    slide = GatedSlide(real, held_levels={0})
    try:
        canvas.set_slide(slide)
        canvas.center_on(300, 300, scale=1.0, animate=False)
        canvas.repaint()
        qtbot.waitUntil(lambda: len(slide.reads) >= 2, timeout=5000)
        qtbot.wait(30)
        held = list(slide.reads)
        canvas.center_on(3600, 4500, scale=1.0, animate=False)
        canvas.repaint()
    finally:
        slide.gate.set()
    _settle(qtbot, canvas)
    canvas.loader.wait_idle(5000)
    level0 = [(x, y) for level, x, y in slide.reads if level == 0]
    started = [(x, y) for level, x, y in held if level == 0]
    late = level0[len(started):]
    assert late, "the new view was never loaded"
    assert 1 <= len(started) <= canvas.loader.threads
    # After the move, no level-0 tile near the first view was read (ring included).
    assert all(x >= 1024 or y >= 1024 for x, y in late), late


def test_truncated_slide_shows_placeholders_and_reports(qtbot, canvas, truncated_slide):
    slide = Slide(truncated_slide)
    messages = []
    canvas.tile_failed.connect(messages.append)
    with qtbot.waitSignal(canvas.frame_complete, timeout=10_000):
        canvas.set_slide(slide)
    assert messages and "truncated.dcm" in messages[0]
    grab = _array(canvas.grab().toImage())
    cam = canvas.camera
    sx, sy = (int(v) for v in cam.to_screen(slide.width * 0.3, slide.height * 0.3))
    assert tuple(grab[sy, sx]) != tuple(BACKGROUND.getRgb()[:3])
    assert len(canvas.failed_tiles) > 0
    # Moving on keeps working and repaints placeholders without new reads of failed tiles.
    decodes = canvas.loader.decodes
    canvas.zoom_by(1.0, animate=False)
    canvas.repaint()
    qtbot.wait(50)
    assert canvas.loader.decodes == decodes


class FlatHugeSlide:
    """A 200000 px square slide with no pyramid at all: seen whole it would need 600000 tiles."""

    def __init__(self) -> None:
        from engines.slide import Level

        self.levels = [Level(200_000, 200_000, 1.0)]
        self.width = self.height = 200_000
        self.mpp = self.objective_power = None
        self.path = DATA / "flat-huge"
        self.reads = 0

    def best_level_for_downsample(self, downsample: float) -> int:
        return 0

    def read_region(self, level, x, y, w, h):
        self.reads += 1
        return np.full((h, w, 3), 200, np.uint8)

    def read_region_xrgb(self, level, x, y, w, h):  # the viewer's read, through ours
        return pack_xrgb(self.read_region(level, x, y, w, h))

    def thumbnail(self, side):
        raise RuntimeError("no thumbnail")


def test_slide_without_overview_levels_shows_note_not_a_hang(qtbot, canvas):
    slide = FlatHugeSlide()
    mini = Minimap(canvas)
    qtbot.addWidget(mini)
    with qtbot.waitSignal(canvas.frame_complete, timeout=5000):
        canvas.set_slide(slide)
    assert "no overview" in mini.error and mini.thumbnail is None
    qtbot.wait(50)
    assert slide.reads == 0 and canvas.paint_ms[-1] < 500
    with pytest.raises(ValueError, match="overview"):
        canvas.render_image(W, H)
    canvas.center_on(100_000, 100_000, scale=1.0, animate=False)
    _settle(qtbot, canvas)
    assert 0 < slide.reads < 200
    assert _rgb(canvas.grab().toImage(), W // 2, H // 2) == (200, 200, 200)


def test_render_image_matches_widget(qtbot, canvas):
    _open(qtbot, canvas, Slide(DATA / "test3-DAPI-2.ndpi"))
    canvas.center_on(1500, 2000, scale=0.37, animate=False)
    _settle(qtbot, canvas)
    grab = _array(canvas.grab().toImage())
    out = canvas.render_image(W, H)
    assert (out.width(), out.height()) == (W, H)
    assert np.array_equal(_array(out), grab)


def test_render_image_loads_uncached_tiles_and_checks_size(qtbot, canvas):
    slide = Slide(DEMO_SLIDE)
    _open(qtbot, canvas, slide)
    out = canvas.render_image(200, 100, view_rect=(1000, 1000, 200, 100))
    ref = slide.read_region(0, 1000, 1000, 200, 100)
    assert np.array_equal(_array(out)[30:70, 20:180], ref[30:70, 20:180])
    with pytest.raises(ValueError):
        canvas.render_image(0, 100)
    with pytest.raises(ValueError):
        canvas.show_rect((0, 0, 0, 10))


class _Box(Overlay):
    def __init__(self, rect):
        super().__init__("box")
        self.rect = rect

    def paint(self, painter, camera):
        pen = QPen(QColor(255, 0, 0))
        pen.setCosmetic(True)
        painter.setPen(pen)
        painter.fillRect(*self.rect, QColor(0, 255, 0))

    def legend(self):
        return [("box", QColor(0, 255, 0))]


def test_overlay_draws_in_level0_and_follows_visibility(qtbot, canvas):
    _open(qtbot, canvas, Slide(DEMO_SLIDE))
    canvas.center_on(1000, 1000, scale=0.5, animate=False)
    box = _Box((900, 900, 100, 60))
    with qtbot.waitSignal(canvas.overlays_changed):
        canvas.add_overlay(box)
    assert canvas.overlays() == [box]
    sx, sy = canvas.camera.to_screen(950, 930)
    img = canvas.grab().toImage()
    assert _rgb(img, int(sx), int(sy)) == (0, 255, 0)
    ox, oy = canvas.camera.to_screen(1100, 1100)
    assert _rgb(img, int(ox), int(oy)) != (0, 255, 0)
    box.opacity = 0.5
    half = _rgb(canvas.grab().toImage(), int(sx), int(sy))
    assert half != (0, 255, 0) and half[1] > 120
    box.visible = False
    assert _rgb(canvas.grab().toImage(), int(sx), int(sy)) != (0, 255, 0)
    canvas.remove_overlay(box)
    assert canvas.overlays() == []


def test_scale_bar_uses_mpp_or_says_it_has_none(qtbot, canvas):
    canvas.scale_bar.visible = True
    _open(qtbot, canvas, Slide(DEMO_SLIDE))
    canvas.grab()
    um, px, label = nice_length(0.499 / canvas.camera.scale)
    assert canvas.scale_bar.text == label and px <= 160 and str(int(um)) in label.replace(" mm", "000")
    _open(qtbot, canvas, Slide(DATA / "kidney-striped.tif"))
    canvas.grab()
    assert canvas.scale_bar.text == NO_SCALE_NOTE


def test_nice_lengths_are_round():
    for umpp in [0.05, 0.499, 3.7, 120.0]:
        um, px, label = nice_length(umpp, 160)
        mant = um / 10 ** np.floor(np.log10(um))
        assert round(mant, 6) in (1.0, 2.0, 5.0)
        assert 160 / 2.5 - 1e-6 <= px <= 160 + 1e-6
    assert nice_length(10.0, 150)[2] == "1 mm"
    with pytest.raises(ValueError):
        nice_length(0.0)


def test_no_slide_and_switching_slides(qtbot, canvas):
    canvas.set_slide(None)
    canvas.grab()
    assert canvas.current_magnification() is None
    canvas.fit_view()
    _open(qtbot, canvas, Slide(DATA / "small.svs"))
    assert canvas.camera.scale == pytest.approx(canvas.camera.max_scale)
    _open(qtbot, canvas, Slide(DATA / "boxes-levels.tiff"))
    assert canvas.slide.path.name == "boxes-levels.tiff"
    assert all(k.level < canvas.slide.level_count for k in canvas.cache.keys())
