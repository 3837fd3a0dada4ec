"""Attention maps in forms other tools read: iso-contour GeoJSON (QuPath) and float TIFF.

Iso-contours: for a map, or a group of maps, the region holding the top ``level`` share of the
attention mass (1 %, 5 %, 10 % by default). Mass follows ``engines.evaluate``: a cell holds
``max(value, 0)``; the maps of a group are each normalised to mass 1 and averaged. Cells are
taken in order of density (mass per level-0 px^2) until their cumulative mass reaches the
level; cells tied with the last one taken are all kept, so the region never depends on the
order of equal cells. The chosen cells are merged into polygons with shapely (row runs first,
then one union) and written as one MultiPolygon feature per level, so a 75,000-cell map is a
few kB instead of one feature per cell.

Float TIFF: a map at its cell resolution (one pixel per cell), float32, with halved levels as
SubIFDs; the resolution is the slide's mpp times the cell size, and the map's level-0 origin,
cell size and name are in the ImageDescription as JSON.
"""
from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from engines.trace import AttentionMap, ExportCancelled, Trace, TraceError, atomic_writer

DEFAULT_LEVELS: tuple[float, ...] = (0.01, 0.05, 0.10)
# QuPath colours per level, hottest first; levels beyond the table take its last colour.
LEVEL_COLORS: tuple[tuple[int, int, int], ...] = ((220, 20, 20), (255, 140, 0), (240, 220, 0),
                                                  (120, 200, 80), (60, 140, 220))
TIFF_MIN_SIDE = 16  # halved levels stop once a side would drop below this


class MapExportError(ValueError):
    """A map cannot be exported as asked; the message is meant for the user."""


@dataclass
class Contour:
    """The region holding the top ``level`` share of attention of ``name`` (a map or group)."""

    name: str
    level: float
    threshold: float  # the density of the last cell taken (mass per level-0 px^2)
    mass: float  # share of the attention mass inside (>= level, more when cells tie)
    geometry: BaseGeometry  # Polygon / MultiPolygon in level-0 px; empty without attention

    @property
    def label(self) -> str:
        return f"Attention top {_percent(self.level)}"


def check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    out = []
    for level in levels:
        try:
            value = float(level)
        except (TypeError, ValueError):
            raise MapExportError(f"contour level {level!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise MapExportError(f"contour level {level!r} must lie in (0, 1], e.g. 0.05 for top 5 %")
        out.append(value)
    if not out:
        raise MapExportError("give at least one contour level")
    return tuple(sorted(set(out)))


def parse_levels(text: str) -> tuple[float, ...]:
    """``"1,5,10"`` or ``"0.01,0.05"`` (percent when any is above 1) -> sorted fractions."""
    parts = [p.strip().rstrip("%") for p in text.split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise MapExportError(f"contour levels {text!r}: give numbers such as 1,5,10") from None
    if any(v > 1 for v in values):
        values = [v / 100.0 for v in values]
    return check_levels(values)


# -- contours ----------------------------------------------------------------------------------
def _cells(maps: Sequence[AttentionMap]) -> tuple[np.ndarray, np.ndarray]:
    """(boxes x0,y0,x1,y1 per cell with mass, mass per cell), the maps normalised and averaged."""
    boxes, masses = [], []
    for m in maps:
        values = np.maximum(np.asarray(m.values, dtype=np.float64).reshape(m.shape), 0.0)
        if not np.isfinite(values).all():
            raise MapExportError(f"map {m.name!r} holds NaN or infinity")
        total = float(values.sum())
        if total <= 0:
            continue
        r, c = np.nonzero(values > 0)
        x0 = m.origin[0] + c * m.cell[0]
        y0 = m.origin[1] + r * m.cell[1]
        boxes.append(np.column_stack([x0, y0, x0 + m.cell[0], y0 + m.cell[1]]))
        masses.append(values[r, c] / total)
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0)
    return np.concatenate(boxes), np.concatenate(masses) / len(boxes)


def _merge_runs(boxes: np.ndarray) -> np.ndarray:
    """Cells side by side in a row (same y0/y1, touching x) as one box: far fewer polygons
    for the union, which is where the time goes."""
    if len(boxes) < 2:
        return boxes
    order = np.lexsort((boxes[:, 0], boxes[:, 3], boxes[:, 1]))
    b = boxes[order]
    joins = (b[1:, 1] == b[:-1, 1]) & (b[1:, 3] == b[:-1, 3]) & np.isclose(b[1:, 0], b[:-1, 2])
    starts = np.flatnonzero(np.concatenate([[True], ~joins]))
    ends = np.concatenate([starts[1:], [len(b)]]) - 1
    return np.column_stack([b[starts, 0], b[starts, 1], b[ends, 2], b[starts, 3]])


def contours(maps: Sequence[AttentionMap], levels: Sequence[float] = DEFAULT_LEVELS,
             name: str | None = None, simplify: float = 0.0) -> list[Contour]:
    """One Contour per level for ``maps`` (one map, or the maps of a group, pooled).

    ``simplify`` is a tolerance in level-0 px (0 only drops the vertices that union leaves on
    straight edges, keeping the region exact)."""
    levels = check_levels(levels)
    label = name if name is not None else (maps[0].name if len(maps) == 1 else "maps")
    boxes, mass = _cells(maps)
    out = []
    if not len(mass):
        return [Contour(label, lv, 0.0, 0.0, shapely.MultiPolygon()) for lv in levels]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    density = mass / area
    order = np.argsort(-density, kind="stable")
    cum = np.cumsum(mass[order])
    total = cum[-1]
    for level in levels:
        # first place where the cumulative mass reaches the level (float slack for level 1)
        k = int(min(np.searchsorted(cum, level * total * (1 - 1e-12)), len(cum) - 1))
        threshold = float(density[order[k]])
        chosen = density >= threshold * (1 - 1e-12)
        merged = _merge_runs(boxes[chosen])
        geom = shapely.union_all(shapely.box(merged[:, 0], merged[:, 1], merged[:, 2], merged[:, 3]))
        geom = shapely.simplify(geom, simplify) if simplify > 0 else shapely.normalize(
            shapely.simplify(geom, 0.0))
        out.append(Contour(label, level, threshold, float(mass[chosen].sum() / total), geom))
    return out


def trace_contours(trace: Trace, levels: Sequence[float] = DEFAULT_LEVELS, by_group: bool = False,
                   simplify: float = 0.0) -> Iterator[tuple[str, str, Contour]]:
    """(map or group name, group, Contour) for each map of the trace, or each group."""
    if by_group:
        groups: dict[str, list[AttentionMap]] = {}
        for m in trace.maps:
            groups.setdefault(m.group, []).append(m)
        for group, maps in groups.items():
            for c in contours(maps, levels, group, simplify):
                yield group, group, c
    else:
        for m in trace.maps:
            for c in contours([m], levels, m.name, simplify):
                yield m.name, m.group, c


def _percent(level: float) -> str:
    return f"{level * 100:.4g}%"


def _color(index: int) -> list[int]:
    return list(LEVEL_COLORS[min(index, len(LEVEL_COLORS) - 1)])


def contour_feature(contour: Contour, group: str, model: str, color: list[int]) -> dict[str, Any]:
    geom = contour.geometry
    if isinstance(geom, shapely.Polygon):
        geom = shapely.MultiPolygon([geom])
    return {"type": "Feature",
            "geometry": shapely.geometry.mapping(geom) if not geom.is_empty else
            {"type": "MultiPolygon", "coordinates": []},
            "properties": {"objectType": "annotation",
                           "name": f"{contour.name} top {_percent(contour.level)}",
                           "level": contour.level, "map": contour.name, "group": group,
                           "model": model, "mass": round(contour.mass, 6),
                           "threshold": contour.threshold,
                           "classification": {"name": contour.label, "color": color}}}


def _field_feature(trace: Trace, f) -> dict[str, Any]:
    x, y, w, h = f.rect
    return {"type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {"objectType": "annotation", "name": f"{f.kind} {f.id} (depth {f.depth})",
                           "classification": {"name": f"{trace.model}: {f.kind}"},
                           "id": f.id, "parent": f.parent, "depth": f.depth, "score": f.score,
                           "kind": f.kind}}


def save_contours_geojson(trace: Trace, path: str | os.PathLike,
                          levels: Sequence[float] = DEFAULT_LEVELS, by_group: bool = False,
                          simplify: float = 0.0, fields: bool = True,
                          progress: Callable[[int, int], None] | None = None,
                          cancel: threading.Event | None = None) -> int:
    """The trace's fields (when ``fields``) and its maps' iso-contours as a GeoJSON
    FeatureCollection QuPath opens, streamed into a file renamed over ``path`` at the end;
    returns the number of features. Same progress/cancel contract as ``Trace.save_geojson``
    (units: fields plus maps)."""
    levels = check_levels(levels)
    n_fields = len(trace.fields) if fields else 0
    total = n_fields + max(1, len(trace.maps))
    done = written = 0
    if progress is not None:
        progress(0, total)

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise ExportCancelled("GeoJSON export cancelled")

    with atomic_writer(Path(path)) as fh:
        fh.write(b'{"type": "FeatureCollection", "features": [')

        def put(feature: dict[str, Any]) -> None:
            nonlocal written
            try:
                text = json.dumps(feature, allow_nan=False)
            except ValueError:
                raise TraceError(f"cannot export {feature['properties']['name']!r}: it holds NaN "
                                 "or infinity, which GeoJSON cannot store") from None
            fh.write((b"\n" if not written else b",\n") + text.encode("utf-8"))
            written += 1

        if fields:
            for i, f in enumerate(trace.fields):
                put(_field_feature(trace, f))
                if i % 2000 == 0:
                    check()
            done = n_fields
        last = None
        for name, group, contour in trace_contours(trace, levels, by_group, simplify):
            check()
            if not contour.geometry.is_empty:
                put(contour_feature(contour, group, trace.model, _color(levels.index(contour.level))))
            if name != last:
                last = name
                done += 1
                if progress is not None:
                    progress(min(done, total), total)
        check()
        fh.write(b"\n]}\n")
    if progress is not None:
        progress(total, total)
    return written


# -- float TIFF --------------------------------------------------------------------------------
def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 mean, an odd last row/column averaged with itself."""
    if a.shape[0] % 2:
        a = np.vstack([a, a[-1:]])
    if a.shape[1] % 2:
        a = np.hstack([a, a[:, -1:]])
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) * 0.25


def map_pyramid(values: np.ndarray, min_side: int = TIFF_MIN_SIDE) -> list[np.ndarray]:
    levels = [values]
    while min(levels[-1].shape) // 2 >= min_side:
        levels.append(_halve(levels[-1]).astype(np.float32))
    return levels


def save_map_tiff(amap: AttentionMap, path: str | os.PathLike, mpp: float | None,
                  model: str = "") -> int:
    """``amap`` as a pyramidal float32 TIFF (full resolution first, halved levels as SubIFDs),
    written atomically; returns the number of levels. ``mpp`` is the slide's µm per level-0
    pixel (None: no physical resolution is recorded)."""
    import tifffile

    rows, cols = amap.shape
    if rows == 0 or cols == 0:
        raise MapExportError(f"map {amap.name!r} is empty")
    values = np.asarray(amap.values, dtype=np.float64).reshape(rows, cols)
    if not np.isfinite(values).all():
        raise MapExportError(f"map {amap.name!r} holds NaN or infinity")
    if np.abs(values).max(initial=0.0) > np.finfo(np.float32).max:
        raise MapExportError(f"map {amap.name!r} holds values too large for float32")
    levels = map_pyramid(values.astype(np.float32))
    um = (mpp * amap.cell[0], mpp * amap.cell[1]) if mpp and mpp > 0 else None
    meta = {"maglens_map": amap.name, "group": amap.group, "model": model,
            "origin": list(amap.origin), "cell": list(amap.cell), "shape": [rows, cols],
            "mpp": mpp, "um_per_pixel": list(um) if um else None,
            "magnification": amap.magnification}
    kw: dict[str, Any] = {}
    if um:
        kw = {"resolution": (1e4 / um[0], 1e4 / um[1]), "resolutionunit": "CENTIMETER"}
    buf = io.BytesIO()  # tifffile wants a named file or a buffer; maps are small
    with tifffile.TiffWriter(buf, bigtiff=rows * cols * 4 > 2**31) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, description=json.dumps(meta),
                  photometric="minisblack", metadata=None, **kw)
        for i, level in enumerate(levels[1:], 1):
            sub_kw = {}
            if um:
                f = 2 ** i
                sub_kw = {"resolution": (1e4 / (um[0] * f), 1e4 / (um[1] * f)),
                          "resolutionunit": "CENTIMETER"}
            tif.write(level, subfiletype=1, photometric="minisblack", metadata=None, **sub_kw)
    with atomic_writer(Path(path)) as fh:
        fh.write(buf.getbuffer())
    return len(levels)


def read_map_tiff(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """(full-resolution values, the JSON metadata) of a TIFF written by ``save_map_tiff``."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        values = page.asarray()
        try:
            meta = json.loads(page.description)
        except (TypeError, ValueError):
            meta = {}
    return values, meta
