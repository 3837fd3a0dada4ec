"""Where a model's attention falls against annotations, measured within the tissue.

One definition serves the viewer, ``maglens infer --annotations`` and the benchmarks:
``score_attention(trace, annotations, tissue, classification)`` returns

* ``inside_share``: the share of the trace's attention on the tissue that lies inside the
  annotation (both restricted to the tissue);
* ``annotation_share``: the annotation's share of the tissue area;
* ``ratio = inside_share / annotation_share``: 1 is chance for a model whose attention spreads
  evenly over the tissue; ``1 / annotation_share`` (tissue area / annotation area) is the best;
* ``dice``: the overlap of the top-attention region holding the annotation's area (within the
  tissue) with the annotation. Ties share the last place pro rata, so an even spread scores
  ``annotation_share``; a trace whose attention covers less tissue than the annotation has
  a region only as large as that cover.

Attention is a measure laid over the slide by rectangles of uniform density (``SOURCES``):

* attention maps (``grid_attention``: every map, averaged; ``local_learning``: the ``head``
  map): a cell holds ``max(value, 0)`` of mass spread evenly over the cell; each map is
  normalised to its mass on the tissue, then the maps are averaged;
* sampled fields (``magnet``, ``zoom_in``): the fields at the deepest depth the model sampled
  (depth 0, the view, excluded), each of density 1, so they weigh by their area;
* sampled patches (``spatial_mag``): its k patches are drawn across magnifications, not nested,
  so each patch holds mass 1 whatever its size.

The rectangles' edges split the plane into elementary cells of constant density; each cell's
tissue area comes from the tissue mask's integral image and its annotation area from shapely
intersections with the annotation clipped to the tissue, so both shares are exact for the mask.

A trace of a run on a region (``trace.roi``) is measured against the tissue and annotation
inside that region.

``localisation(trace, needles)`` is the earlier, slide-relative measure (the glass counts as
tissue), kept so old figures can be reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from engines.annotations import Annotation, of_class, rect_annotation
from engines.tissue import Tissue
from engines.trace import Trace

Rect = Sequence[float]

# model -> ("maps", group or None for all maps), ("fields", None) or ("patches", None)
SOURCES: dict[str, tuple[str, str | None]] = {
    "grid_attention": ("maps", None),
    "local_learning": ("maps", "head"),
    "magnet": ("fields", None),
    "zoom_in": ("fields", None),
    "spatial_mag": ("patches", None),
}

MAX_CELLS = 4_000_000  # elementary cells; past this the edges snap to a regular grid
_ROUND = 6  # edges closer than 1e-6 px are one edge


@dataclass(frozen=True)
class AttentionScore:
    """Where a trace's attention falls against an annotation (see the module's notes)."""

    ratio: float
    dice: float
    inside_share: float
    annotation_share: float
    tissue_area: float  # level-0 px^2
    annotation_area: float  # of the annotation within the tissue

    def as_dict(self) -> dict[str, float]:
        return {"ratio": self.ratio, "dice": self.dice, "inside_share": self.inside_share,
                "annotation_share": self.annotation_share}


@dataclass(eq=False)
class Region:
    """Annotations of one class clipped to the tissue, as disjoint polygons."""

    parts: np.ndarray  # object array of shapely Polygons
    area: float
    tissue: Tissue

    @property
    def share(self) -> float:
        return self.area / self.tissue.area if self.tissue.area > 0 else 0.0


def region_in_tissue(annotations: Iterable[Annotation | BaseGeometry], tissue: Tissue,
                     classification: str | None = None) -> Region:
    """The union of the annotations of ``classification`` (all for None) within ``tissue``.
    Prepare it once to score several traces of one slide."""
    items = list(annotations)
    anns = of_class([a for a in items if isinstance(a, Annotation)], classification)
    geoms = [a.geometry for a in anns] + [g for g in items if isinstance(g, BaseGeometry)]
    parts = shapely.get_parts(np.array(geoms, dtype=object)) if geoms else np.empty(0, object)
    parts = parts[shapely.area(parts) > 0] if len(parts) else parts
    if len(parts) > 1:
        i, j = shapely.STRtree(parts).query(parts, predicate="intersects")
        touching = np.zeros(len(parts), bool)
        touching[i[i != j]] = True
        if touching.any():  # overlapping outlines must count once: merge only those
            merged = shapely.get_parts(shapely.union_all(parts[touching]))
            parts = np.concatenate([parts[~touching], merged])
    if len(parts):
        tgeom = tissue.geometry
        shapely.prepare(tgeom)
        inside = shapely.covers(tgeom, parts)
        if not inside.all():
            # twice: a GeometryCollection may hold a MultiPolygon
            cut = shapely.get_parts(shapely.get_parts(shapely.intersection(parts[~inside], tgeom)))
            cut = cut[(shapely.get_type_id(cut) == 3) & (shapely.area(cut) > 0)] if len(cut) else cut
            parts = np.concatenate([parts[inside], cut])
    area = float(shapely.area(parts).sum()) if len(parts) else 0.0
    return Region(parts, area, tissue)


# ---------------------------------------------------------------------------------------
# Attention as rectangles of uniform density
# ---------------------------------------------------------------------------------------
def _map_rects(trace: Trace, group: str | None, tissue: Tissue) -> np.ndarray | None:
    maps = [m for m in trace.maps if group is None or m.group == group] or list(trace.maps)
    blocks = []
    for m in maps:
        values = np.clip(np.nan_to_num(np.asarray(m.values, float), nan=0.0, posinf=0.0), 0.0, None)
        if values.ndim != 2 or values.size == 0:
            continue
        rows, cols = values.shape
        cw, ch = float(m.cell[0]), float(m.cell[1])
        if cw <= 0 or ch <= 0:
            continue
        xs = float(m.origin[0]) + cw * np.arange(cols + 1)
        ys = float(m.origin[1]) + ch * np.arange(rows + 1)
        density = values / (cw * ch)
        mass = float((density * tissue.grid_areas(xs, ys)).sum())  # mass on the tissue
        if mass <= 0:
            continue
        r, c = np.nonzero(values > 0)
        blocks.append(np.column_stack([xs[c], ys[r], xs[c + 1], ys[r + 1], density[r, c] / mass]))
    if not blocks:
        return None
    out = np.concatenate(blocks)
    out[:, 4] /= len(blocks)
    return out


def _field_rects(trace: Trace, patches: bool, tissue: Tissue) -> np.ndarray | None:
    fields = [f for f in trace.fields if f.depth > 0]
    if not patches and fields:
        deepest = max(f.depth for f in fields)
        fields = [f for f in fields if f.depth == deepest]
    if not fields:
        return None
    r = np.array([f.rect for f in fields], float).reshape(-1, 4)
    r = r[(r[:, 2] > 0) & (r[:, 3] > 0)]
    if not len(r):
        return None
    area = r[:, 2] * r[:, 3]
    density = 1.0 / area if patches else np.ones(len(r))
    mass = float((density * tissue.rect_areas(r)).sum())
    if mass <= 0:
        return None
    return np.column_stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3], density / mass])


def attention_rects(trace: Trace, tissue: Tissue) -> np.ndarray | None:
    """Rows ``(x0, y0, x1, y1, density)`` whose densities add up to the trace's attention,
    with mass 1 on the tissue; None when there is nothing to measure."""
    what, group = SOURCES.get(trace.model, ("maps", None))
    if what == "maps":
        return _map_rects(trace, group, tissue)
    return _field_rects(trace, what == "patches", tissue)


def _arrangement(rects: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xs, ys, density per elementary cell) for rectangles of uniform density, summed where
    they overlap (a 2-D difference array)."""
    x0, y0, x1, y1, d = (np.round(rects[:, k], _ROUND) if k < 4 else rects[:, k] for k in range(5))
    xs = np.unique(np.concatenate([x0, x1]))
    ys = np.unique(np.concatenate([y0, y1]))
    if (len(xs) - 1) * (len(ys) - 1) > MAX_CELLS:
        # Too many distinct edges: snap them to a regular grid, keeping each rectangle's mass.
        side = int(np.sqrt(MAX_CELLS))
        xs = np.linspace(xs[0], xs[-1], side + 1)
        ys = np.linspace(ys[0], ys[-1], side + 1)
        ix0 = np.clip(np.rint((x0 - xs[0]) / (xs[1] - xs[0])).astype(int), 0, side - 1)
        iy0 = np.clip(np.rint((y0 - ys[0]) / (ys[1] - ys[0])).astype(int), 0, side - 1)
        ix1 = np.clip(np.rint((x1 - xs[0]) / (xs[1] - xs[0])).astype(int), ix0 + 1, side)
        iy1 = np.clip(np.rint((y1 - ys[0]) / (ys[1] - ys[0])).astype(int), iy0 + 1, side)
        d = d * (x1 - x0) * (y1 - y0) / ((xs[ix1] - xs[ix0]) * (ys[iy1] - ys[iy0]))
    else:
        ix0, ix1 = np.searchsorted(xs, x0), np.searchsorted(xs, x1)
        iy0, iy1 = np.searchsorted(ys, y0), np.searchsorted(ys, y1)
    diff = np.zeros((len(ys), len(xs)))
    np.add.at(diff, (iy0, ix0), d)
    np.add.at(diff, (iy0, ix1), -d)
    np.add.at(diff, (iy1, ix0), -d)
    np.add.at(diff, (iy1, ix1), d)
    density = np.cumsum(np.cumsum(diff, axis=0), axis=1)[:-1, :-1]
    return xs, ys, np.clip(density, 0.0, None)


def _region_areas(parts: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Area of the region in each elementary cell of the grid ``xs`` x ``ys``. Only cells
    under a part's bounds are visited; cells it covers take their full area and only the
    cells on its outline are intersected."""
    out = np.zeros((len(ys) - 1, len(xs) - 1))
    if not len(parts) or len(xs) < 2 or len(ys) < 2:
        return out
    b = shapely.bounds(parts)
    nx, ny = len(xs) - 1, len(ys) - 1
    cx0 = np.clip(np.searchsorted(xs, b[:, 0], side="right") - 1, 0, nx)
    cx1 = np.clip(np.searchsorted(xs, b[:, 2], side="left"), 0, nx)
    cy0 = np.clip(np.searchsorted(ys, b[:, 1], side="right") - 1, 0, ny)
    cy1 = np.clip(np.searchsorted(ys, b[:, 3], side="left"), 0, ny)
    wx, wy = np.maximum(cx1 - cx0, 0), np.maximum(cy1 - cy0, 0)
    count = wx * wy
    # A part inside one cell lies wholly in it when that cell holds its bounds.
    single = (count == 1) & (b[:, 0] >= xs[np.minimum(cx0, nx - 1)]) & (b[:, 2] <= xs[np.minimum(cx0 + 1, nx)]) \
        & (b[:, 1] >= ys[np.minimum(cy0, ny - 1)]) & (b[:, 3] <= ys[np.minimum(cy0 + 1, ny)])
    np.add.at(out, (cy0[single], cx0[single]), shapely.area(parts[single]))
    many = np.nonzero((count > 0) & ~single)[0]
    if not len(many):
        return out
    counts = count[many]
    owner = np.repeat(many, counts)
    k = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    ix = cx0[owner] + k % wx[owner]
    iy = cy0[owner] + k // wx[owner]
    boxes = shapely.box(xs[ix], ys[iy], xs[ix + 1], ys[iy + 1])
    geoms = parts[owner]
    shapely.prepare(parts[many])
    covered = shapely.covers(geoms, boxes)
    area = np.where(covered, (xs[ix + 1] - xs[ix]) * (ys[iy + 1] - ys[iy]), 0.0)
    edge = np.nonzero(~covered & shapely.intersects(geoms, boxes))[0]
    if len(edge):
        area[edge] = shapely.area(shapely.intersection(boxes[edge], geoms[edge]))
    np.add.at(out, (iy, ix), area)
    return out


def _top_overlap(density: np.ndarray, tissue_a: np.ndarray, region_a: np.ndarray,
                 target: float) -> tuple[float, float]:
    """(area of the top-density region holding ``target`` of tissue, its area inside the
    region); cells of equal density are taken pro rata."""
    keep = (density > 0) & (tissue_a > 0)
    d, t, a = density[keep], tissue_a[keep], region_a[keep]
    if not len(d) or target <= 0:
        return 0.0, 0.0
    key = np.round(d / d.max(), 9)  # equal densities from float sums tie
    levels, inverse = np.unique(-key, return_inverse=True)
    t_lvl = np.bincount(inverse, weights=t, minlength=len(levels))
    a_lvl = np.bincount(inverse, weights=a, minlength=len(levels))
    before = np.concatenate([[0.0], np.cumsum(t_lvl)[:-1]])
    take = np.clip((target - before) / np.where(t_lvl > 0, t_lvl, 1.0), 0.0, 1.0)
    return float((take * t_lvl).sum()), float((take * a_lvl).sum())


def score_region(trace: Trace, region: Region) -> AttentionScore | None:
    """``score_attention`` against a prepared ``Region``; None without annotation area in the
    tissue or without attention on the tissue."""
    tissue = region.tissue
    tissue_area, region_area = tissue.area, region.area
    if trace.roi is not None and region_area > 0:  # a run on a region: chance is its tissue
        x, y, w, h = (float(v) for v in trace.roi)
        tissue_area = float(tissue.rect_areas(np.array([[x, y, w, h]]))[0])
        region_area = float(shapely.area(shapely.clip_by_rect(region.parts, x, y, x + w, y + h)).sum())
    if region_area <= 0 or tissue_area <= 0:
        return None
    rects = attention_rects(trace, tissue)
    if rects is None or not len(rects):
        return None
    xs, ys, density = _arrangement(rects)
    tissue_a = tissue.grid_areas(xs, ys)
    region_a = np.minimum(_region_areas(region.parts, xs, ys), tissue_a)
    mass = float((density * tissue_a).sum())
    if mass <= 0:
        return None
    inside = float((density * region_a).sum()) / mass
    top, overlap = _top_overlap(density, tissue_a, region_a, region_area)
    dice = 2 * overlap / (top + region_area)
    share = region_area / tissue_area
    return AttentionScore(inside / share, dice, inside, share, tissue_area, region_area)


def score_attention(trace: Trace, annotations: Iterable[Annotation | BaseGeometry], tissue: Tissue,
                    classification: str | None = None) -> AttentionScore | None:
    """The attention-in-annotation ratio and Dice of ``trace`` against the annotations of
    ``classification`` (all for None) on its slide, within ``tissue``
    (``engines.tissue.tissue_of_slide``)."""
    return score_region(trace, region_in_tissue(annotations, tissue, classification))


# ---------------------------------------------------------------------------------------
# Needle rectangles, and the earlier slide-relative measure
# ---------------------------------------------------------------------------------------
def needle_annotations(needles: Sequence[Rect], classification: str = "Tumor") -> list[Annotation]:
    """Synthetic needles' level-0 ``(x, y, w, h)`` rectangles as annotations."""
    return [rect_annotation(r, classification, f"needle {i}") for i, r in enumerate(needles)]


def _needle_union(needles: Sequence[Rect]) -> BaseGeometry:
    boxes = [shapely.box(float(x), float(y), float(x) + float(w), float(y) + float(h))
             for x, y, w, h in needles]
    return shapely.union_all(boxes) if boxes else shapely.Polygon()


def covered_area(rects: np.ndarray, needles: Sequence[Rect]) -> np.ndarray:
    """For each row ``(x, y, w, h)`` of ``rects``, the area inside the union of ``needles``."""
    rects = np.asarray(rects, float).reshape(-1, 4)
    boxes = shapely.box(rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2], rects[:, 1] + rects[:, 3])
    return shapely.area(shapely.intersection(boxes, _needle_union(needles)))


def needle_share(needles: Sequence[Rect], width: float, height: float) -> float:
    """Share of a ``width`` x ``height`` slide covered by the union of ``needles``."""
    area = float(width) * float(height)
    return covered_area(np.array([[0.0, 0.0, width, height]]), needles)[0] / area if area > 0 else 0.0


def attention_inside(trace: Trace, needles: Sequence[Rect], tissue: Tissue | None = None) -> float | None:
    """Share of the trace's attention inside the needles (within ``tissue``, the whole slide
    by default); None when the trace has nothing to measure."""
    tissue = tissue or Tissue.whole(trace.slide.width, trace.slide.height)
    rects = attention_rects(trace, tissue)
    if rects is None:
        return None
    region = region_in_tissue([_needle_union(needles)] if needles else [], tissue)
    xs, ys, density = _arrangement(rects)
    tissue_a = tissue.grid_areas(xs, ys)
    mass = float((density * tissue_a).sum())
    if mass <= 0:
        return None
    region_a = np.minimum(_region_areas(region.parts, xs, ys), tissue_a)
    return float((density * region_a).sum()) / mass


def localisation(trace: Trace, needles: Sequence[Rect]) -> float | None:
    """The earlier slide-relative ratio: ``score_attention`` with the whole slide as tissue,
    so attention that merely avoids the glass scores above 1. None without needles or
    without anything to measure."""
    score = score_attention(trace, needle_annotations(needles),
                            Tissue.whole(trace.slide.width, trace.slide.height))
    return None if score is None else score.ratio


# ---------------------------------------------------------------------------------------
# Summaries over slides
# ---------------------------------------------------------------------------------------
def bootstrap_ci(values: Sequence[float], statistic=np.median, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic`` (seeded, so reruns agree); None for
    fewer than two values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    stats = statistic(v[idx], axis=1)
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def auroc_ci(scores: Sequence[float], labels: Sequence[int], n_boot: int = 2000, seed: int = 0,
             level: float = 0.95) -> tuple[float | None, tuple[float, float] | None]:
    """(AUROC, its percentile bootstrap interval over slides), by scikit-learn's
    ``roc_auc_score``; resamples holding one class only are drawn again by skipping them.
    (None, None) when the labels hold one class."""
    from sklearn.metrics import roc_auc_score

    s, y = np.asarray(scores, float), np.asarray(labels, int)
    if len(np.unique(y)) < 2:
        return None, None
    point = float(roc_auc_score(y, s))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            stats.append(roc_auc_score(y[idx], s[idx]))
    if len(stats) < 2:
        return point, None
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return point, (float(lo), float(hi))


def summarise(values: Sequence[float | None], seed: int = 0) -> dict:
    """``{"median", "iqr", "ci95", "n"}`` of the values that are not None: the interquartile
    range describes the slides, the bootstrap interval the median's uncertainty."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    ci = bootstrap_ci(v, seed=seed)
    q = np.percentile(v, [25, 75]) if v else None
    return {"median": round(float(np.median(v)), 3) if v else None,
            "iqr": [round(float(q[0]), 3), round(float(q[1]), 3)] if q is not None else None,
            "ci95": [round(ci[0], 3), round(ci[1], 3)] if ci else None, "n": len(v)}
