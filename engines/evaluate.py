"""How well a model's attention finds known regions (the needles of synthetic slides).

``localisation(trace, needles)`` is an enrichment ratio: the share of the model's attention
that falls inside the needle rectangles, divided by the needles' share of the slide area
(the union of the rectangles over ``trace.slide`` width x height). 1 is chance (uniform
attention); ``1 / needle_share`` is the best possible.

What "attention" means per model (``SOURCES``):

* attention maps (``grid_attention``: every map, averaged; ``local_learning``: the ``head``
  map): each cell holds ``max(value, 0)`` of mass and contributes ``mass * (area of the cell
  inside the union of needles) / cell area``; the share inside is that sum over the map's mass.
* sampled fields (``magnet``, ``zoom_in``): the fields at the deepest depth the model sampled
  (depth 0, the view, excluded), weighted by their area; the share inside is the area of
  those fields inside the union of needles over their total area.
* sampled patches (``spatial_mag``): its k patches are drawn across magnifications, not nested
  (depth there is the magnification), so each patch counts once, whatever its size: the share
  inside is the mean over the patches of the share of each patch inside the needles.

All rectangles are level-0 ``(x, y, w, h)``. The slide area includes white glass, so attention
that merely avoids the background scores a little above 1.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from engines.trace import AttentionMap, Trace

Rect = Sequence[float]

# model -> ("maps", group or None for all maps), ("fields", None) or ("patches", None)
SOURCES: dict[str, tuple[str, str | None]] = {
    "grid_attention": ("maps", None),
    "local_learning": ("maps", "head"),
    "magnet": ("fields", None),
    "zoom_in": ("fields", None),
    "spatial_mag": ("patches", None),
}


def _union_in(rect: Rect, needles: Sequence[Rect]) -> float:
    """Area of ``rect`` covered by the union of ``needles`` (exact: the plane is split at
    every needle edge, so overlapping needles count once)."""
    x0, y0 = float(rect[0]), float(rect[1])
    x1, y1 = x0 + float(rect[2]), y0 + float(rect[3])
    clipped = []
    for n in needles:
        a, b = max(x0, float(n[0])), max(y0, float(n[1]))
        c, d = min(x1, float(n[0]) + float(n[2])), min(y1, float(n[1]) + float(n[3]))
        if c > a and d > b:
            clipped.append((a, b, c, d))
    if len(clipped) <= 1:
        return sum((c - a) * (d - b) for a, b, c, d in clipped)
    xs = sorted({v for r in clipped for v in (r[0], r[2])})
    ys = sorted({v for r in clipped for v in (r[1], r[3])})
    total = 0.0
    for i in range(len(xs) - 1):
        cx = (xs[i] + xs[i + 1]) / 2
        for j in range(len(ys) - 1):
            cy = (ys[j] + ys[j + 1]) / 2
            if any(a <= cx < c and b <= cy < d for a, b, c, d in clipped):
                total += (xs[i + 1] - xs[i]) * (ys[j + 1] - ys[j])
    return total


def covered_area(rects: np.ndarray, needles: Sequence[Rect]) -> np.ndarray:
    """For each row ``(x, y, w, h)`` of ``rects``, the area inside the union of ``needles``."""
    rects = np.asarray(rects, float).reshape(-1, 4)
    return np.array([_union_in(r, needles) for r in rects], float)


def needle_share(needles: Sequence[Rect], width: float, height: float) -> float:
    """Share of a ``width`` x ``height`` slide covered by the union of ``needles``."""
    area = float(width) * float(height)
    return _union_in((0.0, 0.0, width, height), needles) / area if area > 0 else 0.0


def _map_inside(amap: AttentionMap, needles: Sequence[Rect]) -> float | None:
    values = np.clip(np.nan_to_num(np.asarray(amap.values, float)), 0.0, None)
    total = float(values.sum()) if values.size else 0.0
    if total <= 0:
        return None
    rows, cols = values.shape
    cw, ch = float(amap.cell[0]), float(amap.cell[1])
    touched: set[tuple[int, int]] = set()  # only cells that touch a needle can hold mass inside
    for n in needles:
        c0 = max(0, math.floor((n[0] - amap.origin[0]) / cw))
        c1 = min(cols, math.ceil((n[0] + n[2] - amap.origin[0]) / cw))
        r0 = max(0, math.floor((n[1] - amap.origin[1]) / ch))
        r1 = min(rows, math.ceil((n[1] + n[3] - amap.origin[1]) / ch))
        touched.update((r, c) for r in range(r0, r1) for c in range(c0, c1))
    inside = sum(values[r, c] * _union_in(amap.cell_rect(r, c), needles) / (cw * ch)
                 for r, c in touched if values[r, c] > 0)
    return float(inside) / total


def attention_inside(trace: Trace, needles: Sequence[Rect]) -> float | None:
    """Share of the trace's attention (see ``SOURCES``) inside the needles; None when the
    trace has nothing to measure (no maps of the group, no sampled fields, no mass)."""
    what, group = SOURCES.get(trace.model, ("maps", None))
    if what == "maps":
        maps = [m for m in trace.maps if group is None or m.group == group] or list(trace.maps)
        shares = [s for s in (_map_inside(m, needles) for m in maps) if s is not None]
        return float(np.mean(shares)) if shares else None
    fields = [f for f in trace.fields if f.depth > 0]
    if not fields:
        return None
    if what == "patches":
        rects = np.array([f.rect for f in fields], float)
        areas = rects[:, 2] * rects[:, 3]
        ok = areas > 0
        return float(np.mean(covered_area(rects[ok], needles) / areas[ok])) if ok.any() else None
    deepest = max(f.depth for f in fields)
    rects = np.array([f.rect for f in fields if f.depth == deepest], float)
    area = float((rects[:, 2] * rects[:, 3]).sum())
    return float(covered_area(rects, needles).sum()) / area if area > 0 else None


def localisation(trace: Trace, needles: Sequence[Rect]) -> float | None:
    """``attention_inside / needle_share``: 1 is chance. None without needles on the slide
    or without anything to measure."""
    share = needle_share(needles, trace.slide.width, trace.slide.height)
    if share <= 0:
        return None
    inside = attention_inside(trace, needles)
    return None if inside is None else inside / share
