"""An attention map drawn as a heatmap whose cells sit exactly on the level-0 pixels they score."""
from __future__ import annotations

import math

import numpy as np
from PySide6.QtCore import QRect, QRectF
from PySide6.QtGui import QColor, QImage, QPainter

from engines.trace import AttentionMap
from viewer.camera import Camera
from viewer.overlays import colormaps
from viewer.overlays.base import Overlay, camera_transform

GRID_MIN_PX = 16  # cell borders are drawn once cells are at least this wide on screen


class HeatmapOverlay(Overlay):
    """One ``AttentionMap``. Values are normalised to [0, 1] by the map's own range, or by a
    range shared with other maps (``set_range``) so several maps compare on one scale."""

    def __init__(self, amap: AttentionMap, colormap: str = colormaps.DEFAULT, opacity: float = 0.6,
                 name: str | None = None) -> None:
        super().__init__(name or amap.name)
        self.map = amap
        self._values = np.asarray(amap.values, np.float64)
        self._colormap = colormap
        self._range: tuple[float, float] | None = None
        self._smooth = False
        self._grid = True
        self._image: QImage | None = None
        self.opacity = opacity

    # -- settings -------------------------------------------------------------------------
    @property
    def colormap(self) -> str:
        return self._colormap

    @colormap.setter
    def colormap(self, name: str) -> None:
        colormaps.lut(name)  # fails early on an unknown name
        self._colormap = name
        self._invalidate()

    @property
    def smooth(self) -> bool:
        return self._smooth

    @smooth.setter
    def smooth(self, on: bool) -> None:
        self._smooth = bool(on)
        self.changed.emit()

    @property
    def show_grid(self) -> bool:
        return self._grid

    @show_grid.setter
    def show_grid(self, on: bool) -> None:
        self._grid = bool(on)
        self.changed.emit()

    def value_range(self) -> tuple[float, float]:
        """The range mapped onto the colormap: shared if set, else the map's own."""
        if self._range is not None:
            return self._range
        if self._values.size == 0:
            return (0.0, 1.0)
        return float(self._values.min()), float(self._values.max())

    def set_range(self, lo_hi: tuple[float, float] | None) -> None:
        self._range = lo_hi
        self._invalidate()

    def _invalidate(self) -> None:
        self._image = None
        self.changed.emit()

    # -- queries --------------------------------------------------------------------------
    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        ox, oy = self.map.origin
        cw, ch = self.map.cell
        rows, cols = self._values.shape if self._values.ndim == 2 else (0, 0)
        c, r = int(np.floor((x - ox) / cw)), int(np.floor((y - oy) / ch))
        if 0 <= r < rows and 0 <= c < cols:
            return r, c
        return None

    def value_at(self, x: float, y: float) -> float | None:
        cell = self.cell_at(x, y)
        return None if cell is None else float(self._values[cell])

    def normalised(self) -> np.ndarray:
        lo, hi = self.value_range()
        return np.clip((self._values - lo) / (hi - lo), 0, 1) if hi > lo else np.full_like(self._values, 0.5)

    # -- drawing --------------------------------------------------------------------------
    def image(self) -> QImage:
        """rows x cols ARGB image, one pixel per cell (cached until settings change)."""
        if self._image is None:
            idx = np.round(self.normalised() * 255).astype(np.uint8)
            rgb = colormaps.lut(self._colormap)[idx]
            rows, cols = idx.shape
            argb = np.empty((rows, cols, 4), np.uint8)
            argb[..., 0], argb[..., 1], argb[..., 2], argb[..., 3] = rgb[..., 2], rgb[..., 1], rgb[..., 0], 255
            self._buffer = np.ascontiguousarray(argb)
            self._image = QImage(self._buffer.data, cols, rows, cols * 4, QImage.Format.Format_ARGB32).copy()
        return self._image

    def paint(self, painter: QPainter, camera: Camera) -> None:
        if self._values.size == 0:
            return
        x, y, w, h = self.map.rect
        painter.setTransform(camera_transform(camera))
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self._smooth)
        painter.drawImage(QRectF(x, y, w, h), self.image())
        if self._grid and not self._smooth and min(self.map.cell) * camera.scale >= GRID_MIN_PX:
            self._paint_grid(painter, camera)

    def _paint_grid(self, painter: QPainter, camera: Camera) -> None:
        """Cell borders, one screen pixel wide, as filled rectangles in screen space: far
        cheaper than stroking lines through the level-0 transform. Only when cells are large
        on screen; closer lines only add noise and paint time."""
        x, y, w, h = self.map.rect
        rows, cols = self._values.shape
        cw, ch = self.map.cell
        sx0, sy0 = camera.to_screen(x, y)
        sx1, sy1 = camera.to_screen(x + w, y + h)
        top, bottom = max(sy0, 0.0), min(sy1, float(camera.height))
        left, right = max(sx0, 0.0), min(sx1, float(camera.width))
        if bottom <= top or right <= left:
            return
        painter.resetTransform()
        color = QColor(255, 255, 255, 70)
        s = camera.scale
        c0 = max(0, int((left - sx0) / (cw * s)))
        c1 = min(cols, int((right - sx0) / (cw * s)) + 1)
        for c in range(c0, c1 + 1):
            px = math.floor(sx0 + c * cw * s)
            painter.fillRect(QRect(px, math.floor(top), 1, math.ceil(bottom - top)), color)
        r0 = max(0, int((top - sy0) / (ch * s)))
        r1 = min(rows, int((bottom - sy0) / (ch * s)) + 1)
        for r in range(r0, r1 + 1):
            py = math.floor(sy0 + r * ch * s)
            painter.fillRect(QRect(math.floor(left), py, math.ceil(right - left), 1), color)

    def legend(self) -> list[tuple[str, QColor]]:
        lo, hi = self.value_range()
        return [(f"low\u00a0{lo:.3g}", colormaps.color(self._colormap, 0.0)),
                (f"high\u00a0{hi:.3g}", colormaps.color(self._colormap, 1.0))]


def shared_range(overlays: list[HeatmapOverlay]) -> tuple[float, float]:
    """One range over several maps, for joint normalisation."""
    vals = [o._values for o in overlays if o._values.size]
    if not vals:
        return (0.0, 1.0)
    return float(min(v.min() for v in vals)), float(max(v.max() for v in vals))

