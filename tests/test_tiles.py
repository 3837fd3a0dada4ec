"""Tile grid, the byte-bounded cache and the loader's priorities and stale-request dropping."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PySide6.QtGui import QImage

from engines.slide import Slide, pack_xrgb
from tests.conftest import DATA, DEMO_SLIDE
from viewer.tiles import TileCache, TileGrid, TileKey, TileLoader, array_to_qimage, xrgb_to_qimage


def _img(side: int = 64) -> QImage:
    return array_to_qimage(np.zeros((side, side, 3), np.uint8))


class CountingSlide:
    """A real slide whose reads are counted and can be held at a gate."""

    def __init__(self, slide: Slide, gate: threading.Event | None = None) -> None:
        self._slide = slide
        self.gate = gate
        self.reads: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def read_region(self, level, x, y, w, h):
        with self._lock:
            self.reads.append((level, x, y))
        if self.gate is not None:
            self.gate.wait(10)
        return self._slide.read_region(level, x, y, w, h)

    def read_region_xrgb(self, level, x, y, w, h):  # the viewer's read, through ours
        return pack_xrgb(self.read_region(level, x, y, w, h))


def test_array_to_qimage_owns_pixels():
    arr = np.zeros((5, 7, 3), np.uint8)
    arr[2, 3] = (10, 200, 30)
    img = array_to_qimage(arr)
    arr[:] = 255  # the image must not alias the array
    del arr
    c = img.pixelColor(3, 2)
    assert (c.red(), c.green(), c.blue()) == (10, 200, 30)
    assert (img.width(), img.height()) == (7, 5)


def test_xrgb_to_qimage_owns_pixels_and_keeps_colours():
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[2, 3] = (10, 200, 30)
    arr = pack_xrgb(rgb)
    img = xrgb_to_qimage(arr)
    arr[:] = 0xFFFFFFFF
    del arr
    c = img.pixelColor(3, 2)
    assert (c.red(), c.green(), c.blue()) == (10, 200, 30)
    assert img.pixelColor(0, 0).red() == 0 and (img.width(), img.height()) == (7, 5)


def test_cache_respects_byte_bound_in_lru_order():
    one = _img().sizeInBytes()
    cache = TileCache(max_bytes=one * 3)
    keys = [TileKey(0, i, 0) for i in range(5)]
    for k in keys[:3]:
        cache.put(k, _img())
    cache.get(keys[0])  # touch: now most recently used
    cache.put(keys[3], _img())
    cache.put(keys[4], _img())
    assert cache.bytes <= cache.max_bytes
    assert keys[0] in cache and keys[1] not in cache and keys[2] not in cache
    assert keys[4] in cache and len(cache) == 3


def test_cache_never_evicts_resident_tiles():
    one = _img().sizeInBytes()
    cache = TileCache(max_bytes=one * 2)
    resident = [TileKey(3, i, 0) for i in range(2)]
    for k in resident:
        cache.put(k, _img(), resident=True)
    for i in range(10):
        cache.put(TileKey(0, i, 0), _img())
    assert all(k in cache for k in resident)
    assert cache.resident_bytes == 2 * one
    # Resident tiles fill the bound: no ordinary tile may stay.
    assert len(cache) == 2 and cache.bytes == 2 * one
    cache.max_bytes = one * 3
    cache.put(TileKey(0, 99, 0), _img())
    assert TileKey(0, 99, 0) in cache and cache.bytes <= cache.max_bytes


def test_cache_rejects_negative_bound():
    with pytest.raises(ValueError):
        TileCache(-1)


def test_grid_covers_levels_and_reads_right_pixels():
    slide = Slide(DATA / "test3-DAPI-2.ndpi")
    grid = TileGrid(slide, 256)
    for level, (w, h, ds) in enumerate(grid.levels):
        cols, rows = grid.grid_size(level)
        assert (cols - 1) * 256 < w <= cols * 256 and (rows - 1) * 256 < h <= rows * 256
        last = grid.tile_rect(TileKey(level, cols - 1, rows - 1))
        assert last[0] + last[2] == pytest.approx(w * ds)
    key = TileKey(1, 2, 3)
    img = grid.read(key)
    ref = slide.read_region(1, 2 * 256 * 2, 3 * 256 * 2, 256, 256)
    for px, py in [(0, 0), (100, 37), (255, 255)]:
        c = img.pixelColor(px, py)
        assert (c.red(), c.green(), c.blue()) == tuple(int(v) for v in ref[py, px])
    # Tiles in a level-0 rectangle are exactly those that intersect it.
    keys = grid.tiles_in(0, (300, 10, 300, 10))
    assert keys == [TileKey(0, 1, 0), TileKey(0, 2, 0)]
    assert grid.level_for_scale(1.0) == 0 and grid.level_for_scale(0.26) == 1
    assert grid.level_for_scale(0.24) == 2


def test_loader_decodes_nearest_first_and_drops_stale(qtbot):
    gate = threading.Event()
    slide = CountingSlide(Slide(DEMO_SLIDE), gate)
    grid = TileGrid(slide, 256)
    loader = TileLoader(threads=2)
    got: list[TileKey] = []
    loader.tile_ready.connect(lambda k, img: got.append(k))
    loader.set_grid(grid)
    try:
        old = {TileKey(0, c, r): float(c + r) for c in range(4) for r in range(4)}
        loader.request(old)
        qtbot.waitUntil(lambda: len(slide.reads) == 2, timeout=5000)
        time.sleep(0.05)
        assert len(slide.reads) == 2  # both workers held at the gate, nothing else started
        # The view moves away: the old tiles not yet started must never be decoded.
        new = {TileKey(0, 7, r): float(r) for r in range(3)}
        loader.request(new)
        gate.set()
        qtbot.waitUntil(lambda: len(got) == 5, timeout=5000)
        loader.wait_idle(5000)
        qtbot.wait(20)
        started = [TileKey(level, x // 256, y // 256) for level, x, y in slide.reads]
        assert loader.decodes == len(started) == 5
        stale = [k for k in started if k not in new]
        # Only the two reads already held at the gate ran; they were the nearest ones.
        assert len(stale) == 2 and TileKey(0, 0, 0) in stale
        assert set(stale) <= {TileKey(0, 0, 0), TileKey(0, 1, 0), TileKey(0, 0, 1)}
        assert set(new) <= set(got)
    finally:
        gate.set()
        loader.shutdown()


def test_loader_reports_errors_and_forgets_old_slide(qtbot, truncated_slide):
    slide = Slide(truncated_slide)
    loader = TileLoader(threads=2)
    errors: list[str] = []
    loader.tile_error.connect(lambda k, msg: errors.append(msg))
    loader.set_grid(TileGrid(slide, 256))
    try:
        loader.request({TileKey(0, 0, 0): 0.0, TileKey(0, 1, 0): 1.0})
        qtbot.waitUntil(lambda: len(errors) == 2, timeout=5000)
        assert all("truncated.dcm" in m for m in errors)
    finally:
        loader.shutdown()


def test_store_reads_tiles_without_event_loop():
    from viewer.region_store import RegionStore

    slide = Slide(DEMO_SLIDE)
    grid = TileGrid(slide, 256)
    store = RegionStore(threads=2)
    try:
        keys = [TileKey(0, 0, 0), TileKey(0, 3, 2)]
        out = store.read_tiles(grid, keys)
        assert set(out) == set(keys)
        assert all(isinstance(v, QImage) and v.width() == 256 for v in out.values())
    finally:
        assert store.shutdown(5000)


def test_prefetch_work_uses_one_worker(qtbot):
    gate = threading.Event()
    slide = CountingSlide(Slide(DEMO_SLIDE), gate)
    loader = TileLoader(threads=2, background_from=100.0)
    got: list[TileKey] = []
    loader.tile_ready.connect(lambda k, img: got.append(k))
    loader.set_grid(TileGrid(slide, 256))
    try:
        loader.request({TileKey(0, c, 0): 100.0 + c for c in range(4)})
        qtbot.waitUntil(lambda: len(slide.reads) == 1, timeout=5000)
        qtbot.wait(50)
        assert len(slide.reads) == 1  # the second worker stays free for visible tiles
        # A visible tile still gets the free worker at once.
        loader.request({TileKey(0, 5, 5): 1.0, **{TileKey(0, c, 0): 100.0 + c for c in range(1, 4)}})
        qtbot.waitUntil(lambda: len(slide.reads) == 2, timeout=5000)
        assert slide.reads[1][1:] == (5 * 256, 5 * 256)
        gate.set()
        qtbot.waitUntil(lambda: len(got) == 5, timeout=5000)
    finally:
        gate.set()
        loader.shutdown()
