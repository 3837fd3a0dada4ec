"""SlideCanvas: a raster QWidget that pans and zooms a slide pyramid.

Painting never waits: every visible tile of the wanted level is drawn from the cache, or else
the best cached neighbour level stands in (scaled) while the loader fetches it. The coarsest
level is loaded first and kept resident, so that stand-in always exists once a slide shows.

Smooth shrinking costs far more than a copy on the raster engine, so tiles shown smaller
than their pixels are first drawn nearest-pixel and replaced by smooth copies that a worker
makes at their exact screen size; at a steady zoom, painting is then plain copies. The
translation is snapped to whole pixels so those sizes do not change while panning.
``frame_complete`` fires once every visible tile is final (sharp level, smooth copy).
"""
from __future__ import annotations

import math
import sys
import time
from collections import deque
from typing import Callable

from PySide6.QtCore import (
    QEasingCurve,
    QPointF,
    QRect,
    QRectF,
    Qt,
    QTimer,
    QVariantAnimation,
    Signal,
)
from PySide6.QtGui import (
    QBrush,
    QColor,
    QImage,
    QKeyEvent,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QPen,
    QResizeEvent,
    QWheelEvent,
)
from PySide6.QtWidgets import QWidget

from engines.slide import Slide
from engines.trace import ExportCancelled
from viewer.camera import Camera, Rect
from viewer.region_store import RegionStore
from viewer.display_adjust import DisplayAdjust
from viewer.overlays.base import Overlay, camera_transform
from viewer.scalebar import ScaleBar
from viewer.tiles import DEFAULT_CACHE_BYTES, TILE_SIZE, TileGrid, TileKey

BACKGROUND = QColor(232, 232, 232)
PLACEHOLDER = QColor(190, 190, 190)
PLACEHOLDER_MARK = QColor(150, 60, 60)
MAGNIFICATION_KEYS = {
    Qt.Key.Key_1: 1.0,
    Qt.Key.Key_2: 5.0,
    Qt.Key.Key_3: 10.0,
    Qt.Key.Key_4: 20.0,
    Qt.Key.Key_5: 40.0,
}
PAN_FRACTION = 0.2  # an arrow key moves a fifth of the viewport
WHEEL_NOTCH_FACTOR = math.sqrt(2.0)
# A slide without coarse levels seen whole would need thousands of full-resolution tiles a
# frame; beyond this many the canvas shows a note instead of trying.
MAX_VISIBLE_TILES = 1500
NO_OVERVIEW_NOTE = "This slide has no overview levels: zoom in to see it"
MAX_EXPORT_SIDE = 32768
MAX_EXPORT_PIXELS = 400_000_000  # 1.6 GB as RGB32: refuse rather than exhaust memory
# The coarsest level is kept whole in memory only when it is small enough to be a fallback.
MAX_RESIDENT_BYTES = 128 * 2**20
ARRIVAL_REPAINT_MS = 30
SCALED_MAX_BYTES = 96 * 2**20  # smooth copies for the current zoom (a few viewports' worth)
PRIORITY_RESIDENT = -1e15
PRIORITY_RING = 1e12
PRIORITY_NEIGHBOUR_LEVEL = 2e12

Lookup = Callable[[TileKey], "QImage | None"]


class SlideCanvas(QWidget):
    view_changed = Signal(object)  # level-0 (x, y, w, h) now visible
    cursor_moved = Signal(float, float)  # level-0 position under the mouse
    tile_failed = Signal(str)
    frame_complete = Signal()
    overlays_changed = Signal()
    slide_changed = Signal(object)  # the new Slide, or None

    def __init__(self, parent: QWidget | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 tile_size: int = TILE_SIZE, threads: int | None = None) -> None:
        super().__init__(parent)
        self.camera = Camera(width=max(self.width(), 1), height=max(self.height(), 1))
        # Every display read of the slide (tiles, smooth copies, the minimap's thumbnail, the
        # associated images, export tiles) goes through the store and its threads.
        self.store = RegionStore(cache_bytes, threads, self, background_from=PRIORITY_RING)
        self.cache = self.store.cache
        self.loader = self.store.loader
        self.loader.tile_ready.connect(self._on_tile_ready)
        self.loader.tile_error.connect(self._on_tile_error)
        # Smoothly shrunk copies of visible tiles for the current zoom, made off the GUI thread.
        self.scaler = self.store.scaler
        self.scaler.scaled.connect(self._on_scaled)
        self._scaled: dict[tuple, QImage] = {}
        self._scaled_bytes = 0
        self._scaled_for: tuple[int, float] | None = None
        self._scale_jobs: list = []
        self.tile_size = int(tile_size)
        self.scale_bar = ScaleBar()
        self.scale_bar.changed.connect(self.update)
        self.animation_ms = 160
        self.paint_ms: deque[float] = deque(maxlen=10_000)  # paintEvent durations
        self._slide: Slide | None = None
        self._grid: TileGrid | None = None
        self.display_adjust = DisplayAdjust()  # brightness/contrast/gamma, applied per tile
        self._failed: dict[TileKey, str] = {}
        self._overlays: list[Overlay] = []
        self._resident: set[TileKey] = set()
        self._requested: frozenset[TileKey] = frozenset()
        self._completed_view: tuple | None = None
        self._fitted = False
        self._drag_from: QPointF | None = None
        self._overlay_errors: set[int] = set()
        self._anim = QVariantAnimation(self)
        self._anim.setStartValue(0.0)
        self._anim.setEndValue(1.0)
        self._anim.setEasingCurve(QEasingCurve.Type.OutCubic)
        self._anim.valueChanged.connect(self._on_anim_step)
        self._anim_from = self.camera.copy()
        self._anim_to = self.camera.copy()
        self._anchor: tuple[float, float, float, float] | None = None
        # Tiles arrive in bursts: repaint for them at most this often, leaving CPU to decoding.
        self._arrivals = QTimer(self)
        self._arrivals.setSingleShot(True)
        self._arrivals.setInterval(ARRIVAL_REPAINT_MS)
        self._arrivals.timeout.connect(self.update)
        self.setMouseTracking(True)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent, True)
        self.setMinimumSize(64, 64)

    # -- slide -------------------------------------------------------------------------------
    @property
    def slide(self) -> Slide | None:
        return self._slide

    @property
    def grid(self) -> TileGrid | None:
        return self._grid

    @property
    def failed_tiles(self) -> dict[TileKey, str]:
        return dict(self._failed)

    def set_slide(self, slide: Slide | None) -> None:
        """Show ``slide`` fitted to the view (None: show nothing). The coarsest level loads
        first; the old slide is not closed here (its last worker may still hold it)."""
        self._anim.stop()
        # A new generation: reads queued for the old slide are dropped, late ones discarded.
        self.store.set_grid(None)
        self._failed.clear()
        self._resident = set()
        self._requested = frozenset()
        self._completed_view = None
        self._reset_scaled(None)
        self._slide = slide
        self._grid = None
        self.scale_bar.mpp = None
        if slide is not None:
            grid = TileGrid(slide, self.tile_size)
            grid.adjust = self.display_adjust.xrgb_filter()
            self._grid = grid
            self.store.set_grid(grid)
            coarsest = grid.coarsest
            if grid.level_bytes(coarsest) <= min(MAX_RESIDENT_BYTES, self.cache.max_bytes // 2):
                cols, rows = grid.grid_size(coarsest)
                self._resident = {TileKey(coarsest, c, r) for r in range(rows) for c in range(cols)}
            self.scale_bar.mpp = slide.mpp
            self.camera.fit(slide.width, slide.height)
            self._fitted = True
            level = self._wanted_level()
            view = self._visible_rect(self.camera)
            if grid.count_in(level, view) <= MAX_VISIBLE_TILES:
                self._update_requests(level, grid.tiles_in(level, view))
        else:
            self.camera.slide_w = self.camera.slide_h = 0.0
        self.slide_changed.emit(slide)
        self._camera_changed(keep_fit=True)

    def set_display_adjust(self, adjust: DisplayAdjust) -> None:
        """Show the slide through ``adjust``: cached tiles are dropped and re-read through
        its lookup table in the tile workers; exports use it too."""
        if adjust == self.display_adjust:
            return
        self.display_adjust = adjust
        grid = self._grid
        if grid is None:
            return
        grid.adjust = adjust.xrgb_filter()
        self.store.set_grid(grid)  # a new generation: tiles decoded with the old table are dropped
        self._failed.clear()
        self._requested = frozenset()
        self._completed_view = None
        self._reset_scaled(None)
        self.update()

    def shutdown(self, timeout_ms: int = 2000) -> bool:
        """Stop the region store's threads, waiting at most ``timeout_ms`` for reads in flight
        (one stuck in a C call is left to finish on its own); call before dropping the canvas.
        True when none was left running."""
        self._anim.stop()
        return self.store.shutdown(timeout_ms)

    # -- view control ------------------------------------------------------------------------
    def fit_view(self, animate: bool = True) -> None:
        if self._slide is None:
            return
        target = self.camera.copy()
        target.fit(self._slide.width, self._slide.height)
        self._go(target, animate)
        self._fitted = True

    def zoom_by(self, factor: float, animate: bool = True) -> None:
        """Zoom by ``factor`` around the viewport centre; quick presses compound."""
        if self._slide is None or not (factor > 0 and math.isfinite(factor)):
            return
        base = self._anim_to if self._anim.state() == QVariantAnimation.State.Running else self.camera
        target = base.copy()
        target.scale = base.scale * factor
        target.clamp()
        self._go(target, animate)

    def zoom_at(self, factor: float, sx: float, sy: float, animate: bool = False) -> None:
        """Zoom keeping the slide point under widget pixel (sx, sy) fixed, at every step of
        the animation too; quick repeats (wheel notches) compound."""
        if self._slide is None or not (factor > 0 and math.isfinite(factor)):
            return
        if not animate or self.animation_ms <= 0 or not self.isVisible():
            self._anim.stop()
            self.camera.zoom_at(factor, sx, sy)
            self._camera_changed()
            return
        running = self._anim.state() == QVariantAnimation.State.Running
        target_scale = (self._anim_to.scale if running else self.camera.scale) * factor
        x, y = self.camera.to_level0(sx, sy)
        target = self.camera.copy()
        target.zoom_at(target_scale / self.camera.scale, sx, sy)
        self._go(target, True, anchor=(sx, sy, x, y))

    def pan_by(self, dx: float, dy: float) -> None:
        """Move the content by (dx, dy) widget pixels."""
        if self._slide is None:
            return
        self._anim.stop()
        self.camera.pan_by_screen(dx, dy)
        self._camera_changed()

    def center_on(self, x: float, y: float, scale: float | None = None, animate: bool = True) -> None:
        if self._slide is None:
            return
        target = self.camera.copy()
        target.cx, target.cy = float(x), float(y)
        if scale is not None and scale > 0 and math.isfinite(scale):
            target.scale = float(scale)
        target.clamp()
        self._go(target, animate)

    def show_rect(self, rect_level0: Rect, animate: bool = True) -> None:
        """Fit a level-0 rectangle (with a small margin) into the view."""
        if self._slide is None:
            return
        x, y, w, h = map(float, rect_level0)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise ValueError(f"show_rect needs a rectangle with a positive size, got {rect_level0}")
        self.center_on(x + w / 2.0, y + h / 2.0, self.camera.scale_for_rect((x, y, w, h)) * 0.95,
                       animate)

    def scale_for_magnification(self, mag: float) -> float | None:
        """Screen scale showing ``mag`` x: from objective power, else 10x ~ 1 um per screen pixel."""
        s = self._slide
        if s is None or not (mag > 0 and math.isfinite(mag)):
            return None
        if s.objective_power:
            return mag / s.objective_power
        if s.mpp:
            return mag * s.mpp / 10.0
        return None

    def set_magnification(self, mag: float) -> None:
        scale = self.scale_for_magnification(float(mag))
        if scale is None:
            return
        self.center_on(self.camera.cx, self.camera.cy, scale)

    def current_magnification(self) -> float | None:
        s = self._slide
        if s is None:
            return None
        if s.objective_power:
            return s.objective_power * self.camera.scale
        if s.mpp:
            return 10.0 * self.camera.scale / s.mpp
        return None

    def view_rect(self) -> Rect:
        return self.camera.view_rect()

    # -- overlays ----------------------------------------------------------------------------
    def add_overlay(self, overlay: Overlay) -> None:
        if overlay in self._overlays:
            return
        self._overlays.append(overlay)
        overlay.changed.connect(self.update)
        self.overlays_changed.emit()
        self.update()

    def remove_overlay(self, overlay: Overlay) -> None:
        if overlay not in self._overlays:
            return
        self._overlays.remove(overlay)
        try:
            overlay.changed.disconnect(self.update)
        except (RuntimeError, TypeError):
            pass
        self.overlays_changed.emit()
        self.update()

    def overlays(self) -> list[Overlay]:
        return list(self._overlays)

    # -- export ------------------------------------------------------------------------------
    def render_image(self, width: int, height: int, view_rect: Rect | None = None) -> QImage:
        """The view (or ``view_rect``) painted offscreen at width x height with overlays.

        Missing tiles are read by the region store's workers and waited for, so this works
        without an event loop. Exports call ``plan_render`` on the GUI thread and render the
        plan in a worker instead."""
        return self.plan_render(width, height, view_rect).render()

    def plan_render(self, width: int, height: int, view_rect: Rect | None = None) -> "ViewRender":
        """Capture what an export of the view (or ``view_rect``) at width x height needs:
        camera, tiles already cached, failed tiles, overlays. Call on the GUI thread; the
        plan's ``render`` may run in any thread. Bad sizes raise ``ValueError`` here."""
        width, height = int(width), int(height)
        if not (0 < width <= MAX_EXPORT_SIDE and 0 < height <= MAX_EXPORT_SIDE):
            raise ValueError(f"image size must be 1..{MAX_EXPORT_SIDE} pixels a side, got {width}x{height}")
        if width * height > MAX_EXPORT_PIXELS:
            raise ValueError(f"{width}x{height} is too large to export; at most "
                             f"{MAX_EXPORT_PIXELS // 1_000_000} million pixels")
        cam = self.camera.copy()
        old_w, old_h = cam.width, cam.height
        cam.width, cam.height = width, height
        if view_rect is not None:
            x, y, w, h = map(float, view_rect)
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                raise ValueError(f"view_rect needs a positive size, got {view_rect}")
            cam.cx, cam.cy = x + w / 2.0, y + h / 2.0
            cam.scale = cam.scale_for_rect((x, y, w, h))
        else:
            cam.scale = self.camera.scale * min(width / old_w, height / old_h)
        grid = self._grid
        failed = dict(self._failed)
        tiles: dict[TileKey, QImage] = {}
        missing: list[TileKey] = []
        if grid is not None:
            level = grid.level_for_scale(cam.scale)
            view = self._visible_rect(cam)
            if grid.count_in(level, view) > max(MAX_VISIBLE_TILES, 4 * width * height // 65536):
                raise ValueError(f"{NO_OVERVIEW_NOTE} (or export a smaller region)")
            for key in grid.tiles_in(level, view):
                img = self.cache.get(key)
                if img is not None:
                    tiles[key] = img  # implicitly shared: no pixels are copied
                elif key not in failed:
                    missing.append(key)
        return ViewRender(self, cam, grid, tiles, missing, failed, list(self._overlays))

    # -- painting ----------------------------------------------------------------------------
    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt override
        t0 = time.perf_counter()
        painter = QPainter(self)
        try:
            missing, complete = self._paint_view(painter, self.camera, self._grid, self.cache.get,
                                                 self._failed, live=True)
        finally:
            painter.end()
        self.paint_ms.append((time.perf_counter() - t0) * 1000.0)
        if self._grid is None:
            return
        self._update_requests(self._wanted_level(), missing)
        if self._scale_jobs:
            complete = False
            self.scaler.request(self._scale_jobs)
            self._scale_jobs = []
        state = (self.camera.cx, self.camera.cy, self.camera.scale, self.camera.width,
                 self.camera.height)
        if complete and state != self._completed_view:
            self._completed_view = state
            self.frame_complete.emit()

    def _visible_rect(self, cam: Camera) -> Rect:
        x, y, w, h = cam.view_rect()
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, cam.slide_w), min(y + h, cam.slide_h)
        return (x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0))

    def _paint_view(self, painter: QPainter, cam: Camera, grid: TileGrid | None, lookup: Lookup,
                    failed: dict[TileKey, str], live: bool,
                    overlays: list[Overlay] | None = None) -> tuple[list[TileKey], bool]:
        """Paint slide, overlays and scale bar; (visible tiles not yet cached, all painted?).

        Shrunk tiles are drawn from smooth copies at their exact screen size. ``live`` (the
        widget) takes them from the scaler and meanwhile draws a quick nearest-pixel version;
        an export (not live) makes them on the spot, so both end with the same pixels."""
        missing: list[TileKey] = []
        if grid is None:
            painter.fillRect(QRect(0, 0, cam.width, cam.height), BACKGROUND)
            return missing, False
        level = grid.level_for_scale(cam.scale)
        lw, lh, ds = grid.levels[level]
        shrink = cam.scale * ds < 0.999
        if live and self._scaled_for != (level, cam.scale):
            self._reset_scaled((level, cam.scale))
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, False)
        ox, oy = _origin(cam)
        slide_rect = _screen_rect(cam, (0.0, 0.0, cam.slide_w, cam.slide_h), ox, oy)
        if grid.count_in(level, self._visible_rect(cam)) > MAX_VISIBLE_TILES:
            painter.fillRect(QRect(0, 0, cam.width, cam.height), BACKGROUND)
            painter.fillRect(slide_rect, PLACEHOLDER)
            painter.setPen(QColor(60, 60, 60))
            painter.drawText(QRect(0, 0, cam.width, cam.height), Qt.AlignmentFlag.AlignCenter,
                             NO_OVERVIEW_NOTE)
            self._paint_overlays(painter, cam, overlays)
            return missing, True
        _fill_margins(painter, cam, slide_rect)
        t = grid.tile_size
        step = t * ds * cam.scale  # one tile in screen pixels
        scaled = self._scaled
        for key in grid.tiles_in(level, self._visible_rect(cam)):
            # Inline of _screen_rect(grid.tile_rect(key)): this loop runs for every tile.
            c, r = key.col, key.row
            x0 = math.floor(c * step + 0.5)
            y0 = math.floor(r * step + 0.5)
            x1 = math.floor((c * t + min(t, lw - c * t)) * ds * cam.scale + 0.5)
            y1 = math.floor((r * t + min(t, lh - r * t)) * ds * cam.scale + 0.5)
            tw, th = max(x1 - x0, 1), max(y1 - y0, 1)
            target = QRect(x0 - ox, y0 - oy, tw, th)
            img = lookup(key)
            if img is None:
                if key in failed:
                    _paint_placeholder(painter, target)
                else:
                    missing.append(key)
                    if not self._paint_stand_in(painter, cam, grid, key, lookup):
                        painter.fillRect(target, BACKGROUND)
                continue
            if not shrink or (img.width() == tw and img.height() == th):
                painter.drawImage(target, img)
                continue
            skey = (key, tw, th)
            if not live:
                painter.drawImage(target.topLeft(), _smooth(img, tw, th))
                continue
            small = scaled.get(skey)
            if small is not None:
                painter.drawImage(target.topLeft(), small)
            else:
                painter.drawImage(target, img)
                self._scale_jobs.append((skey, img))
        self._paint_overlays(painter, cam, overlays)
        return missing, not missing

    def _paint_stand_in(self, painter: QPainter, cam: Camera, grid: TileGrid, key: TileKey,
                        lookup: Lookup) -> bool:
        """Fill a missing tile from the next finer level (zooming out) or the nearest coarser
        level that is cached; the resident coarsest level is the last resort."""
        rect = grid.tile_rect(key)
        candidates = []
        if key.level > 0:
            candidates.append(key.level - 1)
        candidates.extend(range(key.level + 1, grid.coarsest + 1))
        for lv in candidates:
            keys = grid.tiles_in(lv, rect)
            if not keys or (lv < key.level and len(keys) > 9):
                continue
            images = [lookup(k) for k in keys]
            if any(img is None for img in images):
                continue
            ds = grid.levels[lv][2]
            for k, img in zip(keys, images):
                cx, cy, cw, ch = grid.tile_rect(k)
                ix0, iy0 = max(cx, rect[0]), max(cy, rect[1])
                ix1, iy1 = min(cx + cw, rect[0] + rect[2]), min(cy + ch, rect[1] + rect[3])
                if ix1 <= ix0 or iy1 <= iy0:
                    continue
                sx0, sy0 = cam.to_screen(ix0, iy0)
                sx1, sy1 = cam.to_screen(ix1, iy1)
                source = QRectF((ix0 - cx) / ds, (iy0 - cy) / ds, (ix1 - ix0) / ds, (iy1 - iy0) / ds)
                painter.drawImage(QRectF(sx0, sy0, sx1 - sx0, sy1 - sy0), img, source)
            return True
        return False

    def _paint_overlays(self, painter: QPainter, cam: Camera, overlays: list[Overlay] | None = None) -> None:
        for overlay in self._overlays if overlays is None else overlays:
            if not overlay.visible:
                continue
            painter.save()
            try:
                painter.setOpacity(overlay.opacity)
                painter.setTransform(camera_transform(cam))
                overlay.paint(painter, cam)
            except Exception as exc:  # noqa: BLE001 - one broken layer must not stop painting
                if id(overlay) not in self._overlay_errors:
                    self._overlay_errors.add(id(overlay))
                    print(f"overlay {overlay.name!r} failed to paint: {exc}", file=sys.stderr)
            finally:
                painter.restore()
        if self.scale_bar.visible:
            painter.save()
            self.scale_bar.paint(painter, cam)
            painter.restore()

    # -- tile requests -----------------------------------------------------------------------
    def _wanted_level(self) -> int:
        return self._grid.level_for_scale(self.camera.scale) if self._grid else 0

    def _update_requests(self, level: int, missing: list[TileKey]) -> None:
        """Ask for the resident level, then visible tiles nearest the centre first, then (when
        those are done) a ring around the view and the next coarser level for zooming out."""
        grid = self._grid
        if grid is None:
            return
        cam = self.camera
        wanted: dict[TileKey, float] = {}
        for i, key in enumerate(sorted(self._resident)):
            if key not in self.cache and key not in self._failed:
                wanted[key] = PRIORITY_RESIDENT + i
        for key in missing:
            wanted[key] = self._distance(grid, key)
        too_many = grid.count_in(level, self._visible_rect(cam)) > MAX_VISIBLE_TILES
        if not missing and not too_many:
            span = grid.tile_size * grid.levels[level][2]
            x, y, w, h = self._visible_rect(cam)
            ring = grid.tiles_in(level, (x - span, y - span, w + 2 * span, h + 2 * span))
            extras = [(k, PRIORITY_RING) for k in ring]
            if level < grid.coarsest:
                extras += [(k, PRIORITY_NEIGHBOUR_LEVEL)
                           for k in grid.tiles_in(level + 1, (x, y, w, h))]
            for key, base in extras:
                if key not in self.cache and key not in self._failed and key not in wanted:
                    wanted[key] = base + self._distance(grid, key)
        keys = frozenset(wanted)
        if keys != self._requested:
            self._requested = keys
            self.loader.request(wanted)

    def _distance(self, grid: TileGrid, key: TileKey) -> float:
        x, y, w, h = grid.tile_rect(key)
        dx = (x + w / 2.0 - self.camera.cx) * self.camera.scale
        dy = (y + h / 2.0 - self.camera.cy) * self.camera.scale
        return dx * dx + dy * dy

    def _on_tile_ready(self, key: TileKey, image: QImage) -> None:
        if self._grid is None:
            return
        self.cache.put(key, image, resident=key in self._resident)
        if _intersects(self._grid.tile_rect(key), self.camera.view_rect()):
            self._repaint_soon()
        elif key in self._requested:
            self._requested = self._requested - {key}

    def _repaint_soon(self) -> None:
        if not self._arrivals.isActive():
            self._arrivals.start()

    def _reset_scaled(self, state: tuple[int, float] | None) -> None:
        self._scaled.clear()
        self._scaled_bytes = 0
        self._scale_jobs = []
        self._scaled_for = state
        self.scaler.new_generation()

    def _on_scaled(self, skey: tuple, image: QImage) -> None:
        if self._grid is None:
            return
        self._scaled_bytes += image.sizeInBytes()
        if self._scaled_bytes > SCALED_MAX_BYTES:  # long pans at one zoom: drop the oldest half
            for old in list(self._scaled)[: len(self._scaled) // 2]:
                self._scaled_bytes -= self._scaled.pop(old).sizeInBytes()
        self._scaled[skey] = image
        self._repaint_soon()

    def _on_tile_error(self, key: TileKey, message: str) -> None:
        if self._grid is None:
            return
        first = not self._failed
        self._failed[key] = message
        self.update()
        if first or len(self._failed) % 50 == 0:
            self.tile_failed.emit(message)

    # -- camera plumbing ---------------------------------------------------------------------
    def _go(self, target: Camera, animate: bool,
            anchor: tuple[float, float, float, float] | None = None) -> None:
        """Move to ``target``; an ``anchor`` (sx, sy, x, y) keeps level-0 (x, y) under widget
        pixel (sx, sy) throughout the animation instead of gliding the centre."""
        self._fitted = False
        self._anchor = anchor
        if not animate or self.animation_ms <= 0 or not self.isVisible():
            self._anim.stop()
            self.camera.cx, self.camera.cy, self.camera.scale = target.cx, target.cy, target.scale
            self.camera.clamp()
            self._camera_changed()
            return
        self._anim.stop()
        self._anim_from = self.camera.copy()
        self._anim_to = target.copy()
        self._anim.setDuration(int(self.animation_ms))
        self._anim.start()

    def _on_anim_step(self, value: object) -> None:
        t = float(value)
        a, b = self._anim_from, self._anim_to
        self.camera.scale = a.scale * (b.scale / a.scale) ** t
        if self._anchor is not None and t < 1.0:
            sx, sy, x, y = self._anchor
            self.camera.cx = x - (sx - self.camera.width / 2.0) / self.camera.scale
            self.camera.cy = y - (sy - self.camera.height / 2.0) / self.camera.scale
        else:
            self.camera.cx = a.cx + (b.cx - a.cx) * t
            self.camera.cy = a.cy + (b.cy - a.cy) * t
        self.camera.clamp()
        self._camera_changed(keep_fit=True)

    def _camera_changed(self, keep_fit: bool = False) -> None:
        if not keep_fit:
            self._fitted = False
        self.view_changed.emit(self.camera.view_rect())
        self.update()

    def is_animating(self) -> bool:
        return self._anim.state() == QVariantAnimation.State.Running

    # -- Qt events ---------------------------------------------------------------------------
    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802 - Qt override
        fitted = self._fitted
        self.camera.resize(event.size().width(), event.size().height())
        if fitted and self._slide is not None:
            self.camera.fit(self._slide.width, self._slide.height)
        self._camera_changed(keep_fit=True)
        super().resizeEvent(event)

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802 - Qt override
        steps = event.angleDelta().y() / 120.0
        if steps == 0:
            event.ignore()
            return
        pos = event.position()
        self.zoom_at(WHEEL_NOTCH_FACTOR ** steps, pos.x(), pos.y(), animate=True)
        event.accept()

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.MouseButton.LeftButton:
            self._anim.stop()
            self._drag_from = event.position()
            self.setCursor(Qt.CursorShape.ClosedHandCursor)
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        pos = event.position()
        if self._drag_from is not None and event.buttons() & Qt.MouseButton.LeftButton:
            delta = pos - self._drag_from
            self._drag_from = pos
            self.pan_by(delta.x(), delta.y())
        if self._slide is not None:
            x, y = self.camera.to_level0(pos.x(), pos.y())
            self.cursor_moved.emit(x, y)
        super().mouseMoveEvent(event)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.MouseButton.LeftButton and self._drag_from is not None:
            delta = event.position() - self._drag_from
            self._drag_from = None
            self.unsetCursor()
            if delta.x() or delta.y():
                self.pan_by(delta.x(), delta.y())
        super().mouseReleaseEvent(event)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.MouseButton.LeftButton:
            self.fit_view()
        super().mouseDoubleClickEvent(event)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        key = event.key()
        step_x, step_y = self.camera.width * PAN_FRACTION, self.camera.height * PAN_FRACTION
        moves = {
            Qt.Key.Key_Left: (step_x, 0.0),
            Qt.Key.Key_Right: (-step_x, 0.0),
            Qt.Key.Key_Up: (0.0, step_y),
            Qt.Key.Key_Down: (0.0, -step_y),
        }
        if key in moves:
            self.pan_by(*moves[key])
        elif key in (Qt.Key.Key_Plus, Qt.Key.Key_Equal):
            self.zoom_by(2.0)
        elif key in (Qt.Key.Key_Minus, Qt.Key.Key_Underscore):
            self.zoom_by(0.5)
        elif key == Qt.Key.Key_F:
            self.fit_view()
        elif key in MAGNIFICATION_KEYS:
            self.set_magnification(MAGNIFICATION_KEYS[key])
        else:
            super().keyPressEvent(event)
            return
        event.accept()


def _origin(cam: Camera) -> tuple[int, int]:
    """The camera's translation snapped to whole pixels: tiles then keep one on-screen size
    while panning, so their smooth copies stay valid."""
    s = cam.scale
    return math.floor(cam.cx * s - cam.width / 2.0 + 0.5), math.floor(cam.cy * s - cam.height / 2.0 + 0.5)


def _screen_rect(cam: Camera, rect: Rect, ox: int, oy: int) -> QRect:
    """Integer widget rectangle for a level-0 rectangle; neighbours share edges exactly."""
    x, y, w, h = rect
    s = cam.scale
    x0, y0 = math.floor(x * s + 0.5), math.floor(y * s + 0.5)
    x1, y1 = math.floor((x + w) * s + 0.5), math.floor((y + h) * s + 0.5)
    return QRect(x0 - ox, y0 - oy, max(x1 - x0, 1), max(y1 - y0, 1))


def _fill_margins(painter: QPainter, cam: Camera, slide_rect: QRect) -> None:
    """Paint the background only where the slide is not (tiles cover the rest)."""
    full = QRect(0, 0, cam.width, cam.height)
    inner = slide_rect.intersected(full)
    if inner.isEmpty():
        painter.fillRect(full, BACKGROUND)
        return
    if inner.top() > 0:
        painter.fillRect(QRect(0, 0, cam.width, inner.top()), BACKGROUND)
    if inner.bottom() < cam.height - 1:
        painter.fillRect(QRect(0, inner.bottom() + 1, cam.width, cam.height - inner.bottom() - 1),
                         BACKGROUND)
    if inner.left() > 0:
        painter.fillRect(QRect(0, inner.top(), inner.left(), inner.height()), BACKGROUND)
    if inner.right() < cam.width - 1:
        painter.fillRect(QRect(inner.right() + 1, inner.top(), cam.width - inner.right() - 1,
                               inner.height()), BACKGROUND)


def _smooth(img: QImage, w: int, h: int) -> QImage:
    return img.scaled(w, h, Qt.AspectRatioMode.IgnoreAspectRatio,
                      Qt.TransformationMode.SmoothTransformation)


def _paint_placeholder(painter: QPainter, target: QRect) -> None:
    """A tile that cannot be read: hatched grey with a cross, unmistakably not tissue."""
    painter.fillRect(target, PLACEHOLDER)
    painter.fillRect(target, QBrush(PLACEHOLDER_MARK.lighter(150), Qt.BrushStyle.BDiagPattern))
    pen = QPen(PLACEHOLDER_MARK, 1)
    painter.setPen(pen)
    painter.drawLine(target.topLeft(), target.bottomRight())
    painter.drawLine(target.topRight(), target.bottomLeft())
    painter.drawRect(target.adjusted(0, 0, -1, -1))


def _intersects(a: Rect, b: Rect) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


class ViewRender:
    """An export of the canvas view, planned on the GUI thread by ``SlideCanvas.plan_render``.
    ``render`` reads the missing tiles through the region store (checking ``cancel`` between
    tiles) and paints into a QImage; it runs in any thread (no QPixmap is involved)."""

    def __init__(self, canvas: SlideCanvas, camera: Camera, grid: TileGrid | None,
                 tiles: dict[TileKey, QImage], missing: list[TileKey], failed: dict[TileKey, str],
                 overlays: list[Overlay]) -> None:
        self._canvas = canvas
        self._store = canvas.store
        self.camera = camera
        self.grid = grid
        self.tiles = tiles
        self.missing = missing
        self.failed = failed
        self.overlays = overlays

    @property
    def size(self) -> tuple[int, int]:
        return self.camera.width, self.camera.height

    def render(self, cancel=None, progress=None) -> QImage:
        """The image; ``progress(done, total)`` counts tiles read. Raises ``ExportCancelled`` when
        ``cancel`` (a ``threading.Event``) is set before the image is complete."""
        tiles, failed = dict(self.tiles), dict(self.failed)
        if self.grid is not None and self.missing:
            got = self._store.read_tiles(self.grid, self.missing, cancel, progress)
            for key, value in got.items():
                if isinstance(value, QImage):
                    tiles[key] = value
                else:
                    failed[key] = value
        if cancel is not None and cancel.is_set():
            raise ExportCancelled("export cancelled")
        image = QImage(self.camera.width, self.camera.height, QImage.Format.Format_RGB32)
        painter = QPainter(image)
        try:
            self._canvas._paint_view(painter, self.camera, self.grid, tiles.get, failed, live=False,
                                     overlays=self.overlays)
        finally:
            painter.end()
        if cancel is not None and cancel.is_set():
            raise ExportCancelled("export cancelled")
        return image
