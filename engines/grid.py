"""A regular grid of cells in level-0 pixels: the tile grid models lay over a view and the
grid attention maps are compared on. Plain Python and numpy, so the viewer side can use it
without torch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engines.trace import AttentionMap, Rect


@dataclass(frozen=True)
class Grid:
    """``rows`` x ``cols`` cells of size ``cell`` from ``origin``: cell (r, c) is
    ``origin + (c * cw, r * ch)``, numbered row by row."""

    origin: tuple[float, float]
    cell: tuple[float, float]
    rows: int
    cols: int

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def rect(self, index: int) -> Rect:
        """The level-0 rectangle of cell ``index``."""
        r, c = divmod(index, self.cols)
        return (self.origin[0] + c * self.cell[0], self.origin[1] + r * self.cell[1],
                self.cell[0], self.cell[1])

    @property
    def bounds(self) -> Rect:
        """The rectangle the whole grid covers."""
        return (self.origin[0], self.origin[1], self.cols * self.cell[0], self.rows * self.cell[1])

    @property
    def xs(self) -> np.ndarray:
        """The cols + 1 cell edges along x."""
        return self.origin[0] + self.cell[0] * np.arange(self.cols + 1, dtype=np.float64)

    @property
    def ys(self) -> np.ndarray:
        return self.origin[1] + self.cell[1] * np.arange(self.rows + 1, dtype=np.float64)

    @classmethod
    def of_map(cls, amap: AttentionMap) -> "Grid":
        rows, cols = amap.shape
        return cls((float(amap.origin[0]), float(amap.origin[1])),
                   (float(amap.cell[0]), float(amap.cell[1])), rows, cols)

    def as_map(self, values: np.ndarray, name: str, group: str,
               magnification: float | None = None) -> AttentionMap:
        return AttentionMap(name, group, magnification, self.origin, self.cell,
                            np.asarray(values, np.float64).tolist())


def make_grid(bounds: Rect, side: float, fit: str = "round") -> Grid:
    """The grid of cells of about ``side`` pixels that fills ``bounds`` exactly: as many cells
    per side as ``side`` fits, rounded ("round": cells near ``side``) or rounded up ("ceil":
    cells never larger than ``side``)."""
    if not side > 0:
        raise ValueError(f"tile size must be positive, got {side}")
    count = {"round": round, "ceil": math.ceil}[fit]
    x, y, w, h = bounds
    rows = max(1, int(count(h / side)))
    cols = max(1, int(count(w / side)))
    return Grid((x, y), (w / cols, h / rows), rows, cols)
