"""Camera arithmetic: the mapping between level-0 and screen pixels, and its limits."""
from __future__ import annotations

import math

import pytest

from viewer.camera import MAX_SCALE, Camera


def _cam(scale: float = 0.5) -> Camera:
    cam = Camera(width=800, height=600)
    cam.fit(10_000, 8_000)
    cam.scale = scale
    cam.cx, cam.cy = 4_000.0, 3_000.0
    return cam


def test_round_trip_between_screen_and_level0():
    cam = _cam(0.37)
    for sx, sy in [(0, 0), (799, 599), (123.5, 456.25)]:
        x, y = cam.to_level0(sx, sy)
        assert cam.to_screen(x, y) == pytest.approx((sx, sy))
    # The centre of the viewport is the camera centre.
    assert cam.to_level0(400, 300) == pytest.approx((4_000, 3_000))


def test_view_rect_matches_corners():
    cam = _cam(0.25)
    x, y, w, h = cam.view_rect()
    assert (x, y) == pytest.approx(cam.to_level0(0, 0))
    assert (x + w, y + h) == pytest.approx(cam.to_level0(800, 600))
    assert w == pytest.approx(800 / 0.25)


@pytest.mark.parametrize("factor", [1.7, 0.6, 3.0])
@pytest.mark.parametrize("point", [(100, 80), (400, 300), (700, 550)])
def test_zoom_at_keeps_point_under_cursor(factor, point):
    cam = _cam(0.5)
    before = cam.to_level0(*point)
    cam.zoom_at(factor, *point)
    assert cam.scale == pytest.approx(0.5 * factor)
    assert cam.to_level0(*point) == pytest.approx(before)


def test_scale_limits_are_fit_and_max():
    cam = _cam(0.5)
    fit = min(800 / 10_000, 600 / 8_000)
    assert cam.min_scale == pytest.approx(fit)
    for _ in range(40):
        cam.zoom_at(2.0, 400, 300)
    assert cam.scale == pytest.approx(MAX_SCALE)
    for _ in range(40):
        cam.zoom_at(0.5, 400, 300)
    assert cam.scale == pytest.approx(fit)


def test_fit_centres_and_shows_whole_slide():
    cam = Camera(width=800, height=600)
    cam.fit(10_000, 8_000)
    x, y, w, h = cam.view_rect()
    assert x <= 0 and y <= 0 and x + w >= 10_000 and y + h >= 8_000
    assert (cam.cx, cam.cy) == (5_000, 4_000)


def test_tiny_slide_is_capped_at_max_scale():
    cam = Camera(width=800, height=600)
    cam.fit(16, 16)
    assert cam.scale == pytest.approx(MAX_SCALE)


def test_pan_moves_content_with_the_drag_and_stays_on_slide():
    cam = _cam(0.5)
    sx, sy = cam.to_screen(5_000, 3_500)
    cam.pan_by_screen(30, -20)
    assert cam.to_screen(5_000, 3_500) == pytest.approx((sx + 30, sy - 20))
    cam.pan_by_screen(1e9, 1e9)
    assert 0 <= cam.cx <= 10_000 and 0 <= cam.cy <= 8_000


def test_bad_scale_is_repaired():
    cam = _cam(0.5)
    cam.scale = math.nan
    cam.clamp()
    assert cam.scale == pytest.approx(cam.min_scale)
