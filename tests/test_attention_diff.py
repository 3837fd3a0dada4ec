"""The difference of two models' attention: normalised over the tissue, on the finer grid."""
from __future__ import annotations

import numpy as np
import pytest

from engines.attention_diff import (
    AttentionDiffError,
    Grid,
    attention_diff,
    fields_map,
    mass_on,
    trace_stacks,
)
from engines.tissue import Tissue
from engines.trace import AttentionMap, Field, SlideRef, Trace


def _trace(maps=(), fields=(), model="m", w=200, h=200) -> Trace:
    return Trace(model=model, preset="tiny", checkpoint=None, slide=SlideRef("s.svs", w, h),
                 classes=["a", "b"], probs=[0.5, 0.5], maps=list(maps), fields=list(fields))


def _map(values, origin=(0.0, 0.0), cell=(100.0, 100.0), group="g", name="m") -> AttentionMap:
    return AttentionMap(name, group, None, origin, cell, np.asarray(values, float).tolist())


def test_equal_maps_differ_nowhere_and_agree_fully():
    m = _map([[0.1, 0.5], [0.3, 0.1]])
    d = attention_diff(_trace([m]), _trace([m], model="n"))
    assert np.allclose(d.diff.values, 0.0)
    assert d.agreement == pytest.approx(1.0)
    assert np.sum(d.a.values) == pytest.approx(1.0)


def test_a_coarse_map_is_spread_over_the_finer_grid_by_area():
    coarse = _map([[1.0, 3.0]], cell=(100.0, 200.0))  # two tall cells over 200 x 200
    fine = _map(np.ones((4, 4)), cell=(50.0, 50.0))  # uniform
    d = attention_diff(_trace([coarse]), _trace([fine]))
    assert (d.grid.rows, d.grid.cols, d.grid.cell) == (4, 4, (50.0, 50.0))  # the finer grid
    a = np.asarray(d.a.values)
    assert np.allclose(a[:, :2], 1 / 32) and np.allclose(a[:, 2:], 3 / 32)
    assert np.allclose(d.diff.values, a - 1 / 16)
    assert d.agreement == pytest.approx(8 / 32 + 8 / 16)
    # either order picks the same (finer) grid, and the difference changes sign
    r = attention_diff(_trace([fine]), _trace([coarse]))
    assert r.grid == d.grid and np.allclose(r.diff.values, -np.asarray(d.diff.values))


def test_attention_on_background_does_not_count():
    # Tissue only in the left half: there both models spread their attention evenly.
    tissue = Tissue(np.array([[True, False]]), 100.0, 200.0)
    a = _map([[1.0, 50.0], [1.0, 50.0]])
    b = _map(np.ones((4, 4)), cell=(50.0, 50.0))
    d = attention_diff(_trace([a]), _trace([b]), tissue)
    pa = np.asarray(d.a.values)
    assert np.allclose(pa[:, :2], 1 / 8) and np.allclose(pa[:, 2:], 0.0)
    assert np.allclose(d.diff.values, 0.0)
    # without the tissue mask the same maps differ strongly
    assert np.abs(attention_diff(_trace([a]), _trace([b])).diff.values).max() > 0.05


def _brute(amap: AttentionMap, mask: np.ndarray, grid: Grid) -> np.ndarray:
    """Per level-0 pixel: density inside the map and the tissue, summed into grid cells."""
    h, w = mask.shape
    dens = np.zeros((h, w))
    v = np.asarray(amap.values)
    (ox, oy), (cw, ch) = amap.origin, amap.cell
    for y in range(h):
        for x in range(w):
            c, r = int((x + 0.5 - ox) // cw), int((y + 0.5 - oy) // ch)
            if 0 <= r < v.shape[0] and 0 <= c < v.shape[1]:
                dens[y, x] = v[r, c]
    dens *= mask
    out = np.zeros((grid.rows, grid.cols))
    for y in range(h):
        for x in range(w):
            c = int((x + 0.5 - grid.origin[0]) // grid.cell[0])
            r = int((y + 0.5 - grid.origin[1]) // grid.cell[1])
            if 0 <= r < grid.rows and 0 <= c < grid.cols:
                out[r, c] += dens[y, x]
    return out


def test_unaligned_grids_and_a_pixel_tissue_mask_match_counting_pixels():
    rng = np.random.default_rng(1)
    mask = rng.random((60, 72)) > 0.4  # one mask pixel per level-0 pixel
    tissue = Tissue(mask, 1.0, 1.0)
    a = _map(rng.random((4, 5)), origin=(3.0, 2.0), cell=(13.0, 11.0))
    b = _map(rng.random((7, 9)), origin=(0.0, 5.0), cell=(8.0, 7.0))
    d = attention_diff(_trace([a]), _trace([b]), tissue)
    assert d.grid.cell == (8.0, 7.0)  # b's cells are smaller
    want_a = _brute(a, mask, d.grid)
    want_b = _brute(b, mask, d.grid)
    assert np.allclose(d.a.values, want_a / want_a.sum())
    assert np.allclose(d.b.values, want_b / want_b.sum())
    assert np.allclose(d.diff.values, want_a / want_a.sum() - want_b / want_b.sum())
    # the grid covers both maps with whole cells of the finer one, aligned to it
    gx, gy, gw, gh = d.grid.bounds
    assert gx <= 3.0 and gy <= 2.0 and gx + gw >= 72.0 and gy + gh >= 54.0
    assert (gx - 0.0) % 8.0 == 0 and (gy - 5.0) % 7.0 == 0


def test_mass_is_kept_when_resampling():
    m = _map([[2.0, 1.0, 4.0]], origin=(10.0, 10.0), cell=(30.0, 40.0))
    grid = Grid((0.0, 0.0), (7.0, 9.0), 8, 16)
    assert mass_on(m, grid).sum() == pytest.approx(40 * 30 * 7.0)


def test_the_first_group_stands_for_the_trace_and_stacked_maps_are_averaged():
    f0 = _map([[1.0, 0.0], [0.0, 0.0]], group="filter", name="filter 0")
    f1 = _map([[0.0, 0.0], [0.0, 1.0]], group="filter", name="filter 1")
    later = _map([[0.0, 9.0], [0.0, 0.0]], group="stage 2")
    stacks = trace_stacks(_trace([f0, f1, later]))
    assert [[m.name for m in s] for s in stacks] == [["filter 0", "filter 1"]]
    d = attention_diff(_trace([f0, f1, later]), _trace([_map([[0.5, 0], [0, 0.5]])]))
    assert np.allclose(d.diff.values, 0.0)


def test_patches_side_by_side_are_pieced_together():
    left = _map([[1.0]], origin=(0.0, 0.0), cell=(100.0, 200.0), name="patch 1")
    right = _map([[3.0]], origin=(100.0, 0.0), cell=(100.0, 200.0), name="patch 2")
    whole = _map([[1.0, 3.0]], cell=(100.0, 200.0))
    d = attention_diff(_trace([left, right]), _trace([whole]))
    assert np.allclose(d.diff.values, 0.0) and np.allclose(d.a.values, [[0.25, 0.75]])


def test_fields_without_maps_are_rasterised_by_score():
    view = Field(0, None, 0, (0, 0, 200, 200), 1.0, "view")
    p1 = Field(1, 0, 1, (0, 0, 50, 50), 3.0, "patch")
    p2 = Field(2, 0, 1, (100, 100, 100, 100), 1.0, "patch")  # four cells of 50: its score spread
    fm = fields_map(_trace(fields=[view, p1, p2]))
    assert fm.cell == (50.0, 50.0) and fm.origin == (0.0, 0.0) and fm.shape == (4, 4)
    mass = np.asarray(fm.values) * 50 * 50
    assert mass[0, 0] == pytest.approx(3.0) and np.allclose(mass[2:, 2:], 0.25)
    assert mass.sum() == pytest.approx(4.0)
    # compared with a map that says the same: no difference
    same = _map(mass / 2500, cell=(50.0, 50.0))
    d = attention_diff(_trace(fields=[view, p1, p2]), _trace([same]))
    assert np.allclose(d.diff.values, 0.0)


def test_traces_with_nothing_to_compare_say_so():
    with pytest.raises(AttentionDiffError, match="neither attention maps nor fields"):
        attention_diff(_trace([]), _trace([_map([[1.0]])]))
    tissue = Tissue(np.array([[True, False]]), 100.0, 200.0)
    right_only = _map([[0.0, 1.0]], cell=(100.0, 200.0))
    with pytest.raises(AttentionDiffError, match="no attention on the tissue"):
        attention_diff(_trace([right_only]), _trace([_map([[1.0]])]), tissue)


def test_a_huge_common_grid_is_coarsened():
    fine = _map(np.ones((1000, 1000)), cell=(1.0, 1.0))
    d = attention_diff(_trace([fine]), _trace([_map([[1.0]], cell=(1000.0, 1000.0))]), max_cells=10_000)
    assert d.grid.rows * d.grid.cols <= 10_000 and d.grid.cell == (10.0, 10.0)
    assert np.allclose(d.diff.values, 0.0)
