"""Colour lookup tables for overlays, from pyqtgraph's bundled perceptual maps."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyqtgraph as pg
from PySide6.QtGui import QColor

PERCEPTUAL = ["inferno", "viridis", "magma", "plasma", "cividis", "turbo"]
DEFAULT = "inferno"
# Blue (low) to red (high) through white: for class probabilities around 0.5.
PROBABILITY = "CET-D1"


@lru_cache(maxsize=16)
def lut(name: str) -> np.ndarray:
    """(256, 3) uint8 table for colormap ``name``."""
    cmap = pg.colormap.get(name)
    return np.asarray(cmap.getLookupTable(nPts=256, alpha=False), np.uint8)[:, :3]


def color(name: str, value: float) -> QColor:
    """The colour of ``value`` in [0, 1]."""
    i = int(round(min(max(float(value), 0.0), 1.0) * 255))
    r, g, b = lut(name)[i]
    return QColor(int(r), int(g), int(b))


# Distinct colours for nesting depth (depth 0 is the whole view and is rarely drawn).
DEPTH_COLORS = [
    QColor(255, 255, 255),
    QColor(0, 190, 255),
    QColor(255, 200, 0),
    QColor(255, 60, 140),
    QColor(80, 230, 80),
    QColor(180, 120, 255),
]


def depth_color(depth: int) -> QColor:
    return QColor(DEPTH_COLORS[depth % len(DEPTH_COLORS)])
