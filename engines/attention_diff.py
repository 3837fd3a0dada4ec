"""Where two models agree and differ: the difference of their attention on one slide.

Each trace's attention is first made comparable:

1. **Which maps.** The trace's first map group, which is what the viewer shows first (MagNet's
   layer 1, Zoom-In's stage 1, grid attention's filters, one map per magnification). Maps of
   that group stacked on one region (overlap above ``STACK_IOU``, as the viewer decides) are
   averaged: grid attention's filters or the magnifications of one region count alike. Maps
   side by side (patches of one field) are pieced together with their own values.
2. **Traces without maps** (sampling models: only fields) are rasterised first: each field
   below the whole view (depth > 0) spreads its score evenly over its rectangle, overlapping
   fields add up, on a grid whose cell is the smallest field's width and height, aligned to the
   fields' top-left corner.
3. **Normalised over the tissue.** A map is a piecewise-constant density: cell (r, c) has
   ``values[r][c]`` everywhere inside it, nothing outside the map. Its mass in a region is
   the density times the *tissue* area of the region (``engines.tissue.Tissue``; the whole
   slide when no tissue is given), so background carries no attention, and a trace's mass is
   scaled to sum to 1 over the tissue. Negative values count as zero (attention is a weight).
4. **On the finer grid.** Both are resampled, area-weighted and mass-preserving in level-0
   pixels, onto the grid of the finer map (the smaller cell area; the first trace's on a tie),
   extended by whole cells to cover both traces' maps. A grid over ``max_cells`` cells is
   coarsened by a whole factor.

The difference is ``A - B`` per cell of that grid, in shares of each model's attention; the
agreement is the attention both put on the same cells (sum of the smaller share, 1 when equal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engines.grid import Grid
from engines.tissue import Tissue
from engines.trace import AttentionMap, Rect, Trace

STACK_IOU = 0.8  # the viewer's rule for maps that cover the same region
MAX_CELLS = 1_000_000  # a common grid larger than this is coarsened


class AttentionDiffError(ValueError):
    """Two traces that cannot be compared; the message says why in one line."""


@dataclass
class AttentionDiff:
    """Both traces' attention on one grid (each sums to 1 over the tissue) and ``A - B``."""

    a: AttentionMap
    b: AttentionMap
    diff: AttentionMap
    agreement: float  # sum over cells of min(a, b): 1 when both put attention alike
    grid: Grid


# -- choosing and rasterising a trace's attention ---------------------------------------------
def trace_stacks(trace: Trace, max_cells: int = MAX_CELLS) -> list[list[AttentionMap]]:
    """The maps standing for ``trace``'s attention, as stacks (maps on one region)."""
    if trace.maps:
        group = trace.maps[0].group
        maps = [m for m in trace.maps if m.group == group and m.shape[0] and m.shape[1]]
    else:
        fm = fields_map(trace, max_cells)
        maps = [fm] if fm is not None else []
    stacks: list[list[AttentionMap]] = []
    for m in maps:
        for stack in stacks:
            if _iou(stack[0].rect, m.rect) > STACK_IOU:
                stack.append(m)
                break
        else:
            stacks.append([m])
    return stacks


def fields_map(trace: Trace, max_cells: int = MAX_CELLS) -> AttentionMap | None:
    """The fields' scores as a density map (rule 2 of the module notes); None without fields."""
    fields = [f for f in trace.fields if f.depth > 0 and f.rect[2] > 0 and f.rect[3] > 0]
    if not fields:
        return None
    rects = np.array([f.rect for f in fields], np.float64)
    scores = np.clip(np.array([f.score for f in fields], np.float64), 0.0, None)
    x0, y0 = rects[:, 0].min(), rects[:, 1].min()
    x1, y1 = (rects[:, 0] + rects[:, 2]).max(), (rects[:, 1] + rects[:, 3]).max()
    cw, ch = rects[:, 2].min(), rects[:, 3].min()
    grid = _capped(Grid((x0, y0), (cw, ch), _cells(y1 - y0, ch), _cells(x1 - x0, cw)), max_cells)
    xs, ys = grid.xs, grid.ys
    density = np.zeros((grid.rows, grid.cols))
    for (fx, fy, fw, fh), s in zip(rects, scores):
        if s <= 0:
            continue
        ox = np.clip(np.minimum(xs[1:], fx + fw) - np.maximum(xs[:-1], fx), 0, None)
        oy = np.clip(np.minimum(ys[1:], fy + fh) - np.maximum(ys[:-1], fy), 0, None)
        density += np.outer(oy, ox) * (s / (fw * fh))  # the field's mass in each cell
    density /= grid.cell[0] * grid.cell[1]
    return grid.as_map(density, "field scores", "fields")


# -- resampling ---------------------------------------------------------------------------------
def mass_on(amap: AttentionMap, grid: Grid, tissue: Tissue | None = None) -> np.ndarray:
    """``amap``'s mass in each cell of ``grid``: its density times the tissue area where the
    map and the cell overlap (exact for the pixel tissue mask). rows x cols."""
    src = Grid.of_map(amap)
    out = np.zeros((grid.rows, grid.cols))
    ux = _overlay_edges(src.xs, grid.xs)
    uy = _overlay_edges(src.ys, grid.ys)
    if len(ux) < 2 or len(uy) < 2:
        return out
    if tissue is None:
        area = np.outer(np.diff(uy), np.diff(ux))
    else:
        area = tissue.grid_areas(ux, uy)
    mx, my = (ux[:-1] + ux[1:]) / 2.0, (uy[:-1] + uy[1:]) / 2.0
    values = np.clip(np.asarray(amap.values, np.float64), 0.0, None)
    sc = _index(mx, src.origin[0], src.cell[0], src.cols)
    sr = _index(my, src.origin[1], src.cell[1], src.rows)
    tc = _index(mx, grid.origin[0], grid.cell[0], grid.cols)
    tr = _index(my, grid.origin[1], grid.cell[1], grid.rows)
    mass = values[sr[:, None], sc[None, :]] * area
    flat = (tr[:, None] * grid.cols + tc[None, :]).ravel()
    out += np.bincount(flat, weights=mass.ravel(), minlength=grid.rows * grid.cols).reshape(out.shape)
    return out


def trace_mass(stacks: list[list[AttentionMap]], grid: Grid, tissue: Tissue | None = None,
               what: str = "trace") -> np.ndarray:
    """A trace's attention on ``grid``, summing to 1 over the tissue."""
    total = np.zeros((grid.rows, grid.cols))
    for stack in stacks:
        total += sum(mass_on(m, grid, tissue) for m in stack) / len(stack)
    s = float(total.sum())
    if not (s > 0 and math.isfinite(s)):
        raise AttentionDiffError(f"{what} puts no attention on the tissue")
    return total / s


def common_grid(stacks_a: list[list[AttentionMap]], stacks_b: list[list[AttentionMap]],
                max_cells: int = MAX_CELLS) -> Grid:
    """The finer of the two traces' grids, extended by whole cells over both traces' maps."""
    maps_a = [m for s in stacks_a for m in s]
    maps_b = [m for s in stacks_b for m in s]
    fine_a = min(maps_a, key=lambda m: m.cell[0] * m.cell[1])
    fine_b = min(maps_b, key=lambda m: m.cell[0] * m.cell[1])
    fine = fine_b if fine_b.cell[0] * fine_b.cell[1] < fine_a.cell[0] * fine_a.cell[1] else fine_a
    rects = np.array([m.rect for m in maps_a + maps_b], np.float64)
    x0, y0 = rects[:, 0].min(), rects[:, 1].min()
    x1, y1 = (rects[:, 0] + rects[:, 2]).max(), (rects[:, 1] + rects[:, 3]).max()
    (ox, oy), (cw, ch) = fine.origin, fine.cell
    c0, r0 = _floor((x0 - ox) / cw), _floor((y0 - oy) / ch)
    c1, r1 = _ceil((x1 - ox) / cw), _ceil((y1 - oy) / ch)
    grid = Grid((ox + c0 * cw, oy + r0 * ch), (float(cw), float(ch)), max(r1 - r0, 1), max(c1 - c0, 1))
    return _capped(grid, max_cells)


def attention_diff(trace_a: Trace, trace_b: Trace, tissue: Tissue | None = None,
                   max_cells: int = MAX_CELLS, names: tuple[str, str] | None = None) -> AttentionDiff:
    """``A - B`` of two traces of one slide (see the module notes for every rule)."""
    na, nb = names or (trace_a.model, trace_b.model)
    sa, sb = trace_stacks(trace_a, max_cells), trace_stacks(trace_b, max_cells)
    for stacks, name in ((sa, na), (sb, nb)):
        if not stacks:
            raise AttentionDiffError(f"{name} has neither attention maps nor fields to compare")
    return diff_of_stacks(sa, sb, tissue, max_cells, (na, nb))


def diff_of_stacks(stacks_a: list[list[AttentionMap]], stacks_b: list[list[AttentionMap]],
                   tissue: Tissue | None = None, max_cells: int = MAX_CELLS,
                   names: tuple[str, str] = ("A", "B")) -> AttentionDiff:
    grid = common_grid(stacks_a, stacks_b, max_cells)
    pa = trace_mass(stacks_a, grid, tissue, names[0])
    pb = trace_mass(stacks_b, grid, tissue, names[1])
    mag = min((m for s in stacks_a + stacks_b for m in s),
              key=lambda m: m.cell[0] * m.cell[1]).magnification
    return AttentionDiff(
        a=grid.as_map(pa, f"{names[0]} (share of attention)", "compare", mag),
        b=grid.as_map(pb, f"{names[1]} (share of attention)", "compare", mag),
        diff=grid.as_map(pa - pb, f"{names[0]} \u2212 {names[1]}", "difference", mag),
        agreement=float(np.minimum(pa, pb).sum()),
        grid=grid,
    )


# -- small helpers ------------------------------------------------------------------------------
def _overlay_edges(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Every edge of either grid inside the range both cover: each overlay cell then lies in
    one cell of each grid."""
    lo, hi = max(a[0], b[0]), min(a[-1], b[-1])
    if not hi > lo:
        return np.empty(0)
    edges = np.unique(np.concatenate([a, b, [lo, hi]]))
    return edges[(edges >= lo) & (edges <= hi)]


def _index(centres: np.ndarray, origin: float, cell: float, n: int) -> np.ndarray:
    return np.clip(np.floor((centres - origin) / cell).astype(np.int64), 0, n - 1)


def _cells(extent: float, cell: float) -> int:
    return max(_ceil(extent / cell), 1)


def _floor(v: float) -> int:
    # A bound within a millionth of a cell of a grid line is on it (no sliver cells).
    r = round(v)
    return int(r) if abs(v - r) < 1e-6 else math.floor(v)


def _ceil(v: float) -> int:
    r = round(v)
    return int(r) if abs(v - r) < 1e-6 else math.ceil(v)


def _capped(grid: Grid, max_cells: int) -> Grid:
    n = grid.rows * grid.cols
    if n <= max_cells:
        return grid
    k = math.ceil(math.sqrt(n / max(max_cells, 1)))
    return Grid(grid.origin, (grid.cell[0] * k, grid.cell[1] * k),
                max(math.ceil(grid.rows / k), 1), max(math.ceil(grid.cols / k), 1))


def _iou(a: Rect, b: Rect) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
