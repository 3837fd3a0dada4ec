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
SCALINGS = ("linear", "rank", "log")
LOG_FLOOR = 1e-4  # log scaling shows four decades below the map's maximum


def scale_values(values: np.ndarray, scaling: str = "linear",
                 lo_hi: tuple[float, float] | None = None) -> np.ndarray:
    """``values`` mapped into [0, 1] for colouring and thresholding; NaN where not finite.

    linear: (v - lo) / (hi - lo), by ``lo_hi`` or the map's own range.
    rank: the percentile of v among the map's non-zero cells, (rank - 1) / (count - 1) with
    tied cells sharing their average rank: the lowest is 0, the highest 1, so a few large
    cells no longer leave the rest uniformly cold; zero cells are 0.
    log: log10(v) over four decades under the maximum (``hi`` of ``lo_hi`` when given), so
    cells down to 1e-4 of the peak stay distinguishable."""
    v = np.asarray(values, np.float64)
    finite = np.isfinite(v)
    out = np.full(v.shape, np.nan)
    if not finite.any():
        return out
    if scaling == "linear":
        lo, hi = lo_hi if lo_hi is not None else (float(v[finite].min()), float(v[finite].max()))
        out[finite] = np.clip((v[finite] - lo) / (hi - lo), 0, 1) if hi > lo else 0.5
    elif scaling == "rank":
        nz = finite & (v != 0)
        out[finite] = 0.0
        if nz.any():
            ranked = np.sort(v[nz])
            below = np.searchsorted(ranked, v[nz], side="left")
            upto = np.searchsorted(ranked, v[nz], side="right")
            mean_rank = (below + upto - 1) / 2.0  # 0-based, ties averaged
            out[nz] = mean_rank / (ranked.size - 1) if ranked.size > 1 else 1.0
    elif scaling == "log":
        top = lo_hi[1] if lo_hi is not None else float(v[finite].max())
        out[finite] = 0.0
        if top > 0:
            floor = top * LOG_FLOOR
            logs = np.log10(np.maximum(v[finite], floor) / floor) / -np.log10(LOG_FLOOR)
            out[finite] = np.clip(logs, 0, 1)
    else:
        raise ValueError(f"unknown scaling {scaling!r} (use {', '.join(SCALINGS)})")
    return out


class HeatmapOverlay(Overlay):
    """One ``AttentionMap``. Values are normalised to [0, 1] by the map's own range, or by a
    range shared with other maps (``set_range``) so several maps compare on one scale; or by
    rank or log scaling (``set_display``), with cells scaled below ``threshold`` transparent.
    Hover read-outs (``value_at``) always give the raw value."""

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
        self._scaling = "linear"
        self._threshold = 0.0
        self._scaled: np.ndarray | None = None  # cached per change, never per paint
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
        self._scaled = None
        self._invalidate()

    @property
    def scaling(self) -> str:
        return self._scaling

    @property
    def threshold(self) -> float:
        return self._threshold

    def set_display(self, scaling: str = "linear", threshold: float = 0.0) -> None:
        """Scale by ``scaling`` (one of ``SCALINGS``); cells scaled below ``threshold`` (0-1)
        are transparent. Recomputes the image once, and only when something changed."""
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r} (use {', '.join(SCALINGS)})")
        threshold = min(max(float(threshold), 0.0), 1.0) if math.isfinite(float(threshold)) else 0.0
        if (scaling, threshold) == (self._scaling, self._threshold):
            return
        if scaling != self._scaling:
            self._scaled = None
        self._scaling, self._threshold = scaling, threshold
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
        """Values in [0, 1] under the current scaling (NaN where a value is not finite)."""
        if self._scaled is None:
            self._scaled = scale_values(self._values, self._scaling, self._range)
        return self._scaled

    def shown_mask(self) -> np.ndarray:
        """Cells drawn (not below the threshold, finite)."""
        scaled = self.normalised()
        with np.errstate(invalid="ignore"):
            return np.isfinite(scaled) & (scaled >= self._threshold)

    # -- drawing --------------------------------------------------------------------------
    def image(self) -> QImage:
        """rows x cols ARGB image, one pixel per cell (cached until settings change)."""
        if self._image is None:
            scaled = self.normalised()
            shown = self.shown_mask()
            idx = np.round(np.nan_to_num(scaled, nan=0.0) * 255).astype(np.uint8)
            rgb = colormaps.lut(self._colormap)[idx]
            rows, cols = idx.shape
            argb = np.zeros((rows, cols, 4), np.uint8)
            # Cells below the threshold are fully transparent; the rest opaque.
            for i, ch in enumerate((2, 1, 0)):
                argb[..., i] = np.where(shown, rgb[..., ch], 0)
            argb[..., 3] = np.where(shown, 255, 0)
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
        if self._scaling == "rank":
            low, high = "low\u00a0rank", "high\u00a0rank"
        elif self._scaling == "log":
            low, high = f"\u2264{hi * LOG_FLOOR:.2g}\u00a0(log)", f"high\u00a0{hi:.3g}"
        else:
            low, high = f"low\u00a0{lo:.3g}", f"high\u00a0{hi:.3g}"
        if self._threshold > 0:
            low += f", clear\u00a0<\u00a0{self._threshold:.2f}"
        return [(low, colormaps.color(self._colormap, 0.0)), (high, colormaps.color(self._colormap, 1.0))]


def shared_range(overlays: list[HeatmapOverlay]) -> tuple[float, float]:
    """One range over several maps, for joint normalisation."""
    vals = [o._values for o in overlays if o._values.size]
    if not vals:
        return (0.0, 1.0)
    return float(min(v.min() for v in vals)), float(max(v.max() for v in vals))

