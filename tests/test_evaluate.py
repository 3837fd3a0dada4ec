"""The localisation ratio on hand-made traces: chance is 1, attention on the needle is
1 / (needle share), and overlapping needles count their union once."""
from __future__ import annotations

import numpy as np
import pytest

from engines.evaluate import attention_inside, covered_area, localisation, needle_share
from engines.trace import AttentionMap, Field, SlideRef, Trace

W, H = 1000, 800
NEEDLE = [200, 100, 100, 80]  # 1 % of the slide


def trace(model: str, maps=(), fields=()) -> Trace:
    view = Field(0, None, 0, (0, 0, W, H), 1.0, "view")
    return Trace(model=model, preset="tiny", checkpoint=None, slide=SlideRef("s.tiff", W, H),
                 classes=["normal", "tumor"], probs=[0.5, 0.5], fields=[view, *fields], maps=list(maps))


def grid_map(values: np.ndarray, group: str = "filter") -> AttentionMap:
    rows, cols = values.shape
    return AttentionMap("m", group, None, (0, 0), (W / cols, H / rows), values.tolist())


def test_uniform_attention_is_chance():
    m = grid_map(np.full((8, 10), 1 / 80))
    assert localisation(trace("grid_attention", maps=[m]), [NEEDLE]) == pytest.approx(1.0)


def test_all_mass_on_the_needle_cell_gives_one_over_its_share():
    values = np.zeros((8, 10))
    values[1, 2] = 1.0  # the cell (200, 100, 100, 100) holds the needle's 100 x 80 pixels
    got = localisation(trace("grid_attention", maps=[grid_map(values)]), [NEEDLE])
    assert got == pytest.approx((8000 / 10000) / 0.01)


def test_head_maps_are_preferred_and_maps_are_averaged():
    on = np.zeros((8, 10))
    on[1, 2] = 1.0
    off = np.zeros((8, 10))
    off[7, 9] = 1.0
    head = localisation(trace("local_learning", maps=[grid_map(off, "module"), grid_map(on, "head")]), [NEEDLE])
    assert head == pytest.approx(80.0)
    mean = localisation(trace("grid_attention", maps=[grid_map(off), grid_map(on)]), [NEEDLE])
    assert mean == pytest.approx(40.0)


def test_deepest_sampled_fields_count_by_area():
    parent = Field(1, 0, 1, (0, 0, 500, 400), 1.0, "zoom")
    inside = Field(2, 1, 2, (200, 100, 50, 40), 1.0, "zoom")
    outside = Field(3, 1, 2, (600, 600, 50, 40), 1.0, "zoom")
    t = trace("magnet", fields=[parent, inside, outside])
    assert attention_inside(t, [NEEDLE]) == pytest.approx(0.5)
    assert localisation(t, [NEEDLE]) == pytest.approx(50.0)


def test_spatial_mag_patches_count_once_each_at_any_magnification():
    coarse = Field(1, 0, 1, (0, 0, 500, 400), 0.5, "patch")  # holds the whole needle: 4 % of it
    fine = Field(2, 0, 3, (600, 600, 50, 40), 0.5, "patch")  # no needle
    t = trace("spatial_mag", fields=[coarse, fine])
    assert attention_inside(t, [NEEDLE]) == pytest.approx((8000 / 200000 + 0.0) / 2)
    # Only the deepest level would have counted the fine patch alone and missed the needle.
    assert attention_inside(trace("magnet", fields=[coarse, fine]), [NEEDLE]) == 0.0


def test_overlapping_needles_count_their_union_once():
    a, b = [0, 0, 100, 100], [50, 50, 100, 100]
    assert needle_share([a, b], W, H) == pytest.approx((10000 + 10000 - 2500) / (W * H))
    assert covered_area(np.array([[0, 0, 200, 200]]), [a, b, b])[0] == pytest.approx(17500)


def test_no_needles_or_nothing_to_measure_is_none():
    assert localisation(trace("magnet"), []) is None
    assert localisation(trace("magnet"), [NEEDLE]) is None  # no sampled fields
