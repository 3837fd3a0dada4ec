"""Where the tissue is: a mask at low resolution with its level-0 scale.

Each mask pixel stands for a ``scale_x`` x ``scale_y`` rectangle of level-0 pixels. The tissue is
exactly the union of its true pixels, so it has two exact views: an integral image (the tissue
area of any axis-aligned rectangle, with fractional pixels at its edges, in O(1)) and a shapely
geometry (the same pixels merged into polygons, for intersecting annotations with it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

THUMBNAIL_SIDE = 1024


@dataclass(eq=False)
class Tissue:
    mask: np.ndarray  # rows x cols bool
    scale_x: float  # level-0 pixels per mask pixel
    scale_y: float
    _integral: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, bool)
        if self.mask.ndim != 2 or self.mask.size == 0:
            raise ValueError("a tissue mask is a non-empty 2-D array")
        s = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.float64)
        s[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1)
        self._integral = s

    @classmethod
    def whole(cls, width: float, height: float) -> "Tissue":
        """Everything is tissue: the slide rectangle (the measure before tissue was found)."""
        return cls(np.ones((1, 1), bool), float(width), float(height))

    @property
    def area(self) -> float:
        return float(self._integral[-1, -1]) * self.scale_x * self.scale_y

    def _cumulative(self, u: np.ndarray, v: np.ndarray, grid: bool) -> np.ndarray:
        rows, cols = self.mask.shape
        u = np.clip(np.asarray(u, float) / self.scale_x, 0, cols)
        v = np.clip(np.asarray(v, float) / self.scale_y, 0, rows)
        j = np.minimum(np.floor(u).astype(np.int64), cols - 1)
        i = np.minimum(np.floor(v).astype(np.int64), rows - 1)
        fx, fy = u - j, v - i
        if grid:  # every (v, u) pair: broadcast rows against columns
            i, fy = i[:, None], fy[:, None]
        s = self._integral
        top = s[i, j] * (1 - fx) + s[i, j + 1] * fx
        bottom = s[i + 1, j] * (1 - fx) + s[i + 1, j + 1] * fx
        return (top * (1 - fy) + bottom * fy) * (self.scale_x * self.scale_y)

    def cumulative(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Tissue area of ``[0, x] x [0, y]`` for every (y in ``ys``, x in ``xs``): a
        len(ys) x len(xs) array. The integral of a pixel mask is bilinear inside each pixel,
        so interpolating it bilinearly is exact."""
        return self._cumulative(xs, ys, grid=True)

    def grid_areas(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Tissue area of each cell of the grid with edges ``xs`` and ``ys``."""
        c = self.cumulative(xs, ys)
        return np.diff(np.diff(c, axis=0), axis=1)

    def rect_areas(self, rects: np.ndarray) -> np.ndarray:
        """Tissue area of each level-0 ``(x, y, w, h)`` row."""
        r = np.asarray(rects, float).reshape(-1, 4)
        x0, y0, x1, y1 = r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]
        c = lambda x, y: self._cumulative(x, y, grid=False)  # noqa: E731
        return c(x1, y1) - c(x0, y1) - c(x1, y0) + c(x0, y0)

    @cached_property
    def geometry(self) -> BaseGeometry:
        """The mask as polygons in level-0 pixels: the boxes of each row's runs, merged."""
        m = self.mask
        padded = np.zeros((m.shape[0], m.shape[1] + 2), np.int8)
        padded[:, 1:-1] = m
        d = np.diff(padded, axis=1)
        r0, c0 = np.nonzero(d == 1)
        r1, c1 = np.nonzero(d == -1)  # same rows, same order: runs pair up
        if len(r0) == 0:
            return shapely.Polygon()
        sx, sy = self.scale_x, self.scale_y
        boxes = shapely.box(c0 * sx, r0 * sy, c1 * sx, (r0 + 1) * sy)
        return shapely.union_all(boxes)


def clean_mask(mask: np.ndarray, size: int = 5) -> np.ndarray:
    """A median filter drops specks of dust and fills pinholes, which would otherwise make
    the tissue's outline thousands of tiny rings."""
    from PIL import Image, ImageFilter

    img = Image.fromarray(np.asarray(mask, np.uint8) * 255).filter(ImageFilter.MedianFilter(size))
    return np.asarray(img) > 127


def tissue_of_slide(slide, max_side: int = THUMBNAIL_SIDE, check=None) -> Tissue:
    """The tissue of an open ``engines.slide.Slide`` from a ``max_side`` thumbnail."""
    from engines.sampling import tissue_mask  # torch comes with it; only needed here

    thumb = slide.thumbnail(min(max_side, max(slide.width, slide.height)), check)  # never upscale
    mask = clean_mask(tissue_mask(thumb))
    return Tissue(mask, slide.width / mask.shape[1], slide.height / mask.shape[0])
