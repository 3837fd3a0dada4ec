"""Tiles of a slide pyramid: the grid, a byte-bounded cache, and a worker-thread loader.

The GUI thread never reads pixels: ``TileLoader`` decodes on worker threads (a
``viewer.workers.WorkerPool``, usually the region store's) and hands the images back through a
queued signal. Wanted tiles carry a priority (lower first, usually the
distance to the view centre); the wanted set is replaced on every view change, so a tile that
left the view is dropped before anyone decodes it.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from typing import Callable, NamedTuple

import numpy as np
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QImage

from engines.slide import Slide, SlideError
from viewer.workers import WorkerPool

TILE_SIZE = 256
DEFAULT_CACHE_BYTES = 512 * 2**20
Rect = tuple[float, float, float, float]


class TileKey(NamedTuple):
    level: int
    col: int
    row: int


def default_threads() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def array_to_qimage(arr: np.ndarray) -> QImage:
    """HxWx3 uint8 to an RGB32 QImage that owns its pixels (the array may be freed)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h, w = arr.shape[:2]
    view = QImage(arr.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    # RGB32 paints fastest on the raster engine; the conversion also copies the pixels.
    return view.convertToFormat(QImage.Format.Format_RGB32)


def xrgb_to_qimage(arr: np.ndarray) -> QImage:
    """HxW uint32 0xFFRRGGBB to an RGB32 QImage that owns its pixels (one copy)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint32)
    h, w = arr.shape
    return QImage(arr.data, w, h, 4 * w, QImage.Format.Format_RGB32).copy()


class TileGrid:
    """Fixed-size tiles over every pyramid level, addressed by ``TileKey``."""

    def __init__(self, slide: Slide, tile_size: int = TILE_SIZE) -> None:
        if tile_size < 16:
            raise ValueError("tile_size must be at least 16 pixels")
        self.slide = slide
        self.tile_size = int(tile_size)
        self.levels = [(lv.width, lv.height, lv.downsample) for lv in slide.levels]
        self.width, self.height = slide.width, slide.height
        # Display adjustment (viewer.display_adjust): maps each decoded HxW xrgb tile, in the
        # worker. The canvas sets it and drops tiles made with the previous one.
        self.adjust: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def coarsest(self) -> int:
        return len(self.levels) - 1

    def level_for_scale(self, scale: float) -> int:
        """The level just finer than the screen (OpenSlide's best level for 1/scale)."""
        return self.slide.best_level_for_downsample(1.0 / max(scale, 1e-12))

    def grid_size(self, level: int) -> tuple[int, int]:
        w, h, _ = self.levels[level]
        t = self.tile_size
        return max(1, math.ceil(w / t)), max(1, math.ceil(h / t))

    def tile_pixels(self, key: TileKey) -> tuple[int, int]:
        w, h, _ = self.levels[key.level]
        t = self.tile_size
        return max(1, min(t, w - key.col * t)), max(1, min(t, h - key.row * t))

    def tile_rect(self, key: TileKey) -> Rect:
        """The tile's rectangle in level-0 pixels."""
        ds = self.levels[key.level][2]
        t = self.tile_size
        pw, ph = self.tile_pixels(key)
        return (key.col * t * ds, key.row * t * ds, pw * ds, ph * ds)

    def _span(self, level: int, rect: Rect) -> tuple[int, int, int, int]:
        x, y, w, h = rect
        ds = self.levels[level][2]
        span = self.tile_size * ds
        cols, rows = self.grid_size(level)
        c0 = max(0, int(math.floor(x / span)))
        r0 = max(0, int(math.floor(y / span)))
        c1 = min(cols - 1, int(math.ceil((x + w) / span)) - 1)
        r1 = min(rows - 1, int(math.ceil((y + h) / span)) - 1)
        return c0, r0, c1, r1

    def count_in(self, level: int, rect: Rect) -> int:
        c0, r0, c1, r1 = self._span(level, rect)
        return max(0, c1 - c0 + 1) * max(0, r1 - r0 + 1)

    def tiles_in(self, level: int, rect: Rect) -> list[TileKey]:
        """Tiles of ``level`` that intersect the level-0 rectangle ``rect``."""
        c0, r0, c1, r1 = self._span(level, rect)
        return [TileKey(level, c, r) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]

    def level_bytes(self, level: int) -> int:
        w, h, _ = self.levels[level]
        return 4 * w * h

    def read(self, key: TileKey) -> QImage:
        """Decode one tile in the calling thread (workers and exports only)."""
        ds = self.levels[key.level][2]
        t = self.tile_size
        pw, ph = self.tile_pixels(key)
        x0 = int(round(key.col * t * ds))
        y0 = int(round(key.row * t * ds))
        pixels = self.slide.read_region_xrgb(key.level, x0, y0, pw, ph)
        adjust = self.adjust
        if adjust is not None:
            pixels = adjust(pixels)
        return xrgb_to_qimage(pixels)


def read_tile(grid: TileGrid, key: TileKey) -> QImage | str:
    """Decode one tile in the calling thread (a worker): the image, or an error message."""
    try:
        return grid.read(key)
    except SlideError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a bad tile must not kill the worker
        return f"tile {key.level}/{key.col}/{key.row}: {type(exc).__name__}: {exc}"


def image_bytes(image: QImage) -> int:
    return int(image.sizeInBytes())


class TileCache:
    """LRU of decoded tiles bounded by bytes. Resident tiles (the coarsest level) count toward
    ``bytes`` but are never evicted, so a coarse fallback always exists. Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self._max = int(max_bytes)
        self._lru: OrderedDict[TileKey, QImage] = OrderedDict()
        self._resident: dict[TileKey, QImage] = {}
        self._bytes = 0
        self._resident_bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def max_bytes(self) -> int:
        return self._max

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        with self._lock:
            self._max = max(0, int(value))
            self._evict()

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def __len__(self) -> int:
        return len(self._lru) + len(self._resident)

    def __contains__(self, key: object) -> bool:
        return key in self._resident or key in self._lru

    def get(self, key: TileKey) -> QImage | None:
        img = self._resident.get(key)
        if img is not None:
            return img
        with self._lock:
            img = self._lru.get(key)
            if img is not None:
                self._lru.move_to_end(key)
            return img

    def is_resident(self, key: TileKey) -> bool:
        return key in self._resident

    def put(self, key: TileKey, image: QImage, resident: bool = False) -> None:
        size = image_bytes(image)
        with self._lock:
            self._discard(key)
            if resident:
                self._resident[key] = image
                self._resident_bytes += size
            else:
                self._lru[key] = image
            self._bytes += size
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._resident.clear()
            self._bytes = self._resident_bytes = 0

    def keys(self) -> list[TileKey]:
        with self._lock:
            return list(self._resident) + list(self._lru)

    def _discard(self, key: TileKey) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._bytes -= image_bytes(old)
        old = self._resident.pop(key, None)
        if old is not None:
            size = image_bytes(old)
            self._bytes -= size
            self._resident_bytes -= size

    def _evict(self) -> None:
        while self._bytes > self._max and self._lru:
            _, img = self._lru.popitem(last=False)
            self._bytes -= image_bytes(img)
            self.evictions += 1


class TileLoader(QObject):
    """Decodes wanted tiles on a thread pool, nearest (lowest priority value) first.

    ``request`` replaces the whole wanted set; tiles not in it are never decoded. Results come
    back on the GUI thread as ``tile_ready(key, QImage)`` or ``tile_error(key, message)``.
    """

    tile_ready = Signal(object, object)
    tile_error = Signal(object, str)
    _decoded = Signal(int, object, object, object)

    def __init__(self, threads: int | None = None, parent: QObject | None = None,
                 background_from: float = math.inf, background_threads: int = 1,
                 pool: WorkerPool | None = None) -> None:
        super().__init__(parent)
        self.threads = max(1, int(threads or default_threads()))
        # Work at or above ``background_from`` (prefetch) runs on at most
        # ``background_threads`` workers, leaving a core for painting.
        self.background_from = background_from
        self.background_threads = max(1, background_threads)
        self._background = 0
        # A shared pool (the region store's) is stopped by its owner; a private one by us.
        self._owns_pool = pool is None
        self._pool = pool or WorkerPool("tiles", self.threads)
        self._lock = threading.Lock()
        self._wanted: dict[TileKey, float] = {}
        self._busy: set[TileKey] = set()  # decoding, or decoded and on the way to the GUI
        self._grid: TileGrid | None = None
        self._gen = 0
        self._running = 0
        self.decodes = 0  # tiles actually read, for tests and benchmarks
        self._decoded.connect(self._on_decoded)

    @property
    def grid(self) -> TileGrid | None:
        return self._grid

    def set_grid(self, grid: TileGrid | None) -> None:
        """Switch slides: everything pending for the old one is forgotten."""
        with self._lock:
            self._gen += 1
            self._wanted.clear()
            self._busy.clear()
            self._grid = grid

    def request(self, wanted: dict[TileKey, float]) -> None:
        """Replace the wanted set (key -> priority, lower first) and wake workers."""
        with self._lock:
            self._wanted = {k: p for k, p in wanted.items() if k not in self._busy}
            spare = min(self.threads - self._running, len(self._wanted))
            self._running += max(spare, 0)
        for _ in range(max(spare, 0)):
            if not self._pool.start(self._work):  # shut down: nothing will run
                with self._lock:
                    self._running -= 1

    def cancel(self) -> None:
        with self._lock:
            self._wanted.clear()

    def pending(self) -> int:
        with self._lock:
            return len(self._wanted) + len(self._busy)

    def is_busy(self, key: TileKey) -> bool:
        with self._lock:
            return key in self._busy

    def wait_idle(self, msecs: int = 5000) -> bool:
        return self._pool.wait_idle(msecs)

    def shutdown(self, msecs: int = 5000) -> bool:
        """Forget every request and stop (a shared pool is only waited for; its owner stops
        it). True when no read is still running."""
        self.set_grid(None)
        if self._owns_pool:
            return self._pool.shutdown(msecs)
        return self._pool.wait_idle(msecs)

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._wanted or self._grid is None:
                    self._running -= 1
                    return
                key = min(self._wanted, key=self._wanted.__getitem__)
                background = self._wanted[key] >= self.background_from
                if background and self._background >= self.background_threads:
                    self._running -= 1
                    return
                del self._wanted[key]
                self._busy.add(key)
                self._background += background
                grid, gen = self._grid, self._gen
            value = read_tile(grid, key)
            image, error = (value, None) if isinstance(value, QImage) else (None, value)
            with self._lock:
                self.decodes += 1
                self._background -= background
            try:
                self._decoded.emit(gen, key, image, error)
            except RuntimeError:  # the loader was deleted while this tile decoded
                return

    def _on_decoded(self, gen: int, key: TileKey, image: QImage | None, error: str | None) -> None:
        with self._lock:
            if gen != self._gen:
                return
            self._busy.discard(key)
        if image is not None:
            self.tile_ready.emit(key, image)
        else:
            self.tile_error.emit(key, error or "tile cannot be read")


ScaledKey = tuple[TileKey, int, int]  # tile, target width, target height


class TileScaler(QObject):
    """Smoothly resizes cached tiles to their on-screen size off the GUI thread, so painting
    at a steady zoom is a plain copy. Jobs belong to a generation (one zoom level); a new
    generation drops every job of the old one before it is scaled."""

    scaled = Signal(object, object)  # ScaledKey, QImage
    _done = Signal(int, object, object)

    def __init__(self, threads: int = 1, parent: QObject | None = None,
                 pool: WorkerPool | None = None) -> None:
        super().__init__(parent)
        self._owns_pool = pool is None
        self._pool = pool or WorkerPool("scale", max(1, threads))
        self._threads = max(1, threads)
        self._lock = threading.Lock()
        self._jobs: list[tuple[ScaledKey, QImage]] = []
        self._queued: set[ScaledKey] = set()
        self._gen = 0
        self._running = 0
        self._done.connect(self._on_done)

    @property
    def generation(self) -> int:
        return self._gen

    def new_generation(self) -> int:
        with self._lock:
            self._gen += 1
            self._jobs.clear()
            self._queued.clear()
            return self._gen

    def request(self, jobs: list[tuple[ScaledKey, QImage]]) -> None:
        """Queue jobs (nearest first); ones already queued are skipped."""
        with self._lock:
            fresh = [(k, img) for k, img in jobs if k not in self._queued]
            if not fresh:
                return
            self._queued.update(k for k, _ in fresh)
            # Newest requests first: they are what the view shows now.
            self._jobs = fresh + self._jobs
            spare = min(self._threads - self._running, len(self._jobs))
            self._running += max(spare, 0)
        for _ in range(max(spare, 0)):
            if not self._pool.start(self._work):
                with self._lock:
                    self._running -= 1

    def shutdown(self, msecs: int = 5000) -> bool:
        self.new_generation()
        if self._owns_pool:
            return self._pool.shutdown(msecs)
        return self._pool.wait_idle(msecs)

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running -= 1
                    return
                (key, w, h), img = self._jobs.pop(0)
                gen = self._gen
            out = img.scaled(w, h, Qt.AspectRatioMode.IgnoreAspectRatio,
                             Qt.TransformationMode.SmoothTransformation)
            try:
                self._done.emit(gen, (key, w, h), out)
            except RuntimeError:
                return

    def _on_done(self, gen: int, skey: ScaledKey, image: QImage) -> None:
        with self._lock:
            if gen != self._gen:
                return
            self._queued.discard(skey)
        self.scaled.emit(skey, image)
