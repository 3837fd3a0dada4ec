"""Where the viewport looks: a level-0 centre and a scale (screen pixels per level-0 pixel).

Pure arithmetic, no Qt, so it is cheap to copy for offscreen renders and easy to test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

Rect = tuple[float, float, float, float]

MAX_SCALE = 8.0  # 8 screen pixels per level-0 pixel at the deepest zoom


@dataclass
class Camera:
    cx: float = 0.0
    cy: float = 0.0
    scale: float = 1.0
    width: int = 1
    height: int = 1
    slide_w: float = 0.0
    slide_h: float = 0.0
    max_scale: float = MAX_SCALE

    # -- limits ----------------------------------------------------------------------------
    @property
    def fit_scale(self) -> float:
        """The scale at which the whole slide fits the viewport."""
        if self.slide_w <= 0 or self.slide_h <= 0:
            return 1.0
        return min(max(self.width, 1) / self.slide_w, max(self.height, 1) / self.slide_h)

    @property
    def min_scale(self) -> float:
        # A tiny slide fits only when magnified beyond max_scale: the cap wins.
        return min(self.fit_scale, self.max_scale)

    def clamp(self) -> None:
        """Keep the scale within limits and the centre on the slide."""
        if not math.isfinite(self.scale) or self.scale <= 0:
            self.scale = self.min_scale
        self.scale = min(max(self.scale, self.min_scale), self.max_scale)
        if self.slide_w > 0 and self.slide_h > 0:
            self.cx = min(max(self.cx, 0.0), float(self.slide_w))
            self.cy = min(max(self.cy, 0.0), float(self.slide_h))

    # -- geometry --------------------------------------------------------------------------
    def view_rect(self) -> Rect:
        w = self.width / self.scale
        h = self.height / self.scale
        return (self.cx - w / 2.0, self.cy - h / 2.0, w, h)

    def to_screen(self, x: float, y: float) -> tuple[float, float]:
        return ((x - self.cx) * self.scale + self.width / 2.0,
                (y - self.cy) * self.scale + self.height / 2.0)

    def to_level0(self, sx: float, sy: float) -> tuple[float, float]:
        return (self.cx + (sx - self.width / 2.0) / self.scale,
                self.cy + (sy - self.height / 2.0) / self.scale)

    # -- moves -----------------------------------------------------------------------------
    def zoom_at(self, factor: float, sx: float, sy: float) -> None:
        """Multiply the scale by ``factor``, keeping the level-0 point under (sx, sy) fixed."""
        x, y = self.to_level0(sx, sy)
        self.scale = min(max(self.scale * factor, self.min_scale), self.max_scale)
        self.cx = x - (sx - self.width / 2.0) / self.scale
        self.cy = y - (sy - self.height / 2.0) / self.scale
        self.clamp()

    def pan_by_screen(self, dx: float, dy: float) -> None:
        """Move the slide content by (dx, dy) screen pixels, as a mouse drag does."""
        self.cx -= dx / self.scale
        self.cy -= dy / self.scale
        self.clamp()

    def fit(self, slide_w: float, slide_h: float) -> None:
        self.slide_w, self.slide_h = float(slide_w), float(slide_h)
        self.scale = self.min_scale
        self.cx, self.cy = self.slide_w / 2.0, self.slide_h / 2.0
        self.clamp()

    def scale_for_rect(self, rect: Rect) -> float:
        """The scale that fits a level-0 rectangle into the viewport."""
        _, _, w, h = rect
        return min(max(self.width, 1) / max(w, 1e-9), max(self.height, 1) / max(h, 1e-9))

    def resize(self, width: int, height: int) -> None:
        self.width, self.height = max(int(width), 1), max(int(height), 1)
        self.clamp()

    def copy(self) -> "Camera":
        return replace(self)
