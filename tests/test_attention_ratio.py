"""The attention-in-annotation ratio and Dice, measured within the tissue: chance is 1 for
attention spread over the tissue, all attention inside scores tissue / annotation area, and
synthetic slides carry their needles as "Tumor" annotations."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engines.annotations import load_annotations, rect_annotation
from engines.evaluate import (auroc_ci, bootstrap_ci, localisation, region_in_tissue, score_attention,
                              summarise)
from engines.slide import Slide
from engines.synth import SynthConfig, generate
from engines.tissue import Tissue, tissue_of_slide
from engines.trace import AttentionMap, Field, SlideRef, Trace

W, H = 1000, 800


def make_trace(model: str, maps=(), fields=(), width=W, height=H) -> Trace:
    view = Field(0, None, 0, (0, 0, width, height), 1.0, "view")
    return Trace(model=model, preset="tiny", checkpoint=None, slide=SlideRef("s.tiff", width, height),
                 classes=["normal", "tumor"], probs=[0.5, 0.5], fields=[view, *fields], maps=list(maps))


def grid_map(values: np.ndarray, width=W, height=H, origin=(0.0, 0.0), cell=None) -> AttentionMap:
    rows, cols = values.shape
    cell = cell or (width / cols, height / rows)
    return AttentionMap("m", "filter", None, origin, cell, np.asarray(values, float).tolist())


# ---------------------------------------------------------------------------------------
# Hand-made tissue: the left half of a 1000 x 800 slide
# ---------------------------------------------------------------------------------------
HALF = Tissue(np.tile(np.array([[True] * 5 + [False] * 5]), (8, 1)), 100.0, 100.0)
# 100 x 100 inside the tissue, and 100 x 100 across its edge (half of it on glass)
ANNS = [rect_annotation((100, 100, 100, 100)), rect_annotation((450, 100, 100, 100)),
        rect_annotation((700, 600, 50, 50), "Stroma")]


def test_tissue_areas_are_exact_for_any_rectangle():
    t = Tissue(np.array([[1, 0], [0, 1]], bool), 10.0, 10.0)
    assert t.area == 200.0 and t.geometry.area == pytest.approx(200.0)
    # a rectangle taking a quarter of each pixel: two of them are tissue
    assert t.rect_areas(np.array([[5, 5, 10, 10], [0, 0, 20, 20], [-5, -5, 10, 10]])) == \
        pytest.approx([50.0, 200.0, 25.0])
    assert HALF.area == 400_000 and HALF.geometry.area == pytest.approx(400_000)


def test_annotations_count_only_within_the_tissue_and_only_of_the_class():
    region = region_in_tissue(ANNS, HALF, "Tumor")
    assert region.area == pytest.approx(10_000 + 5_000)
    assert region.share == pytest.approx(15_000 / 400_000)
    overlapping = ANNS + [rect_annotation((150, 150, 100, 100))]  # 50 x 50 of it already counted
    assert region_in_tissue(overlapping, HALF, "tumor").area == pytest.approx(15_000 + 7_500)


def test_uniform_attention_is_chance_and_its_dice_the_annotation_share():
    uniform = make_trace("grid_attention", maps=[grid_map(np.ones((8, 10)))])
    s = score_attention(uniform, ANNS, HALF, "Tumor")
    assert s.ratio == pytest.approx(1.0)
    assert s.annotation_share == pytest.approx(15_000 / 400_000)
    assert s.dice == pytest.approx(s.annotation_share)  # ties share the top region pro rata
    # the slide-relative measure agrees on uniform attention but not on tissue-only attention
    on_tissue = np.zeros((8, 10))
    on_tissue[:, :5] = 1.0
    tissue_only = make_trace("grid_attention", maps=[grid_map(on_tissue)])
    assert score_attention(tissue_only, ANNS, HALF, "Tumor").ratio == pytest.approx(1.0)
    assert localisation(tissue_only, [(100, 100, 100, 100), (450, 100, 100, 100)]) == pytest.approx(
        (15_000 / 400_000) / (20_000 / 800_000))  # glass in the denominator flatters it


def test_top_region_dice_and_ratio_on_known_cells():
    values = np.zeros((8, 10))
    values[1, 1] = 1.0  # (100, 100, 100, 100): the annotation inside the tissue
    values[3, 3] = 1.0  # (300, 300, 100, 100): tissue without annotation
    s = score_attention(make_trace("grid_attention", maps=[grid_map(values)]), ANNS, HALF, "Tumor")
    assert s.inside_share == pytest.approx(0.5)
    assert s.ratio == pytest.approx(0.5 / (15_000 / 400_000))
    # the top 15,000 px^2 are 3/4 of each tied cell: 7,500 of them inside
    assert s.dice == pytest.approx(2 * 7_500 / (15_000 + 15_000))


def test_all_attention_inside_scores_tissue_over_annotation_area_and_dice_one():
    fields = [Field(1, 0, 1, (100, 100, 100, 100), 1.0, "zoom"), Field(2, 0, 1, (450, 100, 100, 100), 1.0, "zoom")]
    s = score_attention(make_trace("magnet", fields=fields), ANNS, HALF, "Tumor")
    assert s.inside_share == pytest.approx(1.0)
    assert s.ratio == pytest.approx(400_000 / 15_000)
    assert s.dice == pytest.approx(1.0)


def test_patches_count_once_each_and_only_over_tissue():
    inside = Field(1, 0, 1, (100, 100, 100, 100), 1.0, "patch")
    on_glass = Field(2, 0, 2, (700, 100, 100, 100), 1.0, "patch")  # no tissue: no weight
    edge = Field(3, 0, 3, (450, 300, 100, 100), 1.0, "patch")  # half on glass: half its weight
    s = score_attention(make_trace("spatial_mag", fields=[inside, on_glass, edge]), ANNS, HALF, "Tumor")
    assert s.inside_share == pytest.approx(1 / 1.5)


def test_nothing_to_measure_is_none():
    glass_only = [rect_annotation((700, 100, 100, 100))]
    uniform = make_trace("grid_attention", maps=[grid_map(np.ones((8, 10)))])
    assert score_attention(uniform, glass_only, HALF, "Tumor") is None
    assert score_attention(uniform, ANNS, HALF, "Necrosis") is None
    values = np.zeros((8, 10))
    values[:, 7:] = 1.0  # all of it on glass
    assert score_attention(make_trace("grid_attention", maps=[grid_map(values)]), ANNS, HALF) is None
    assert score_attention(make_trace("magnet"), ANNS, HALF) is None  # nothing sampled


def test_many_maps_on_one_grid_and_overlapping_fields_add_up():
    rng = np.random.default_rng(0)
    maps = [grid_map(rng.random((16, 20))) for _ in range(5)]
    together = score_attention(make_trace("grid_attention", maps=maps), ANNS, HALF, "Tumor")
    each = [score_attention(make_trace("grid_attention", maps=[m]), ANNS, HALF, "Tumor") for m in maps]
    assert together.inside_share == pytest.approx(np.mean([e.inside_share for e in each]))
    # two fields over the same place weigh twice, as the sum of their areas says
    twice = [Field(1, 0, 1, (100, 100, 100, 100), 1.0, "zoom"), Field(2, 0, 1, (100, 100, 100, 100), 1.0, "zoom"),
             Field(3, 0, 1, (300, 300, 100, 100), 1.0, "zoom")]
    assert score_attention(make_trace("zoom_in", fields=twice), ANNS, HALF).inside_share == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------
# A synthetic slide with known needles
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def needle_slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("ratio")
    made = generate(out, slides=2, seed=11, cfg=SynthConfig(size=1024, needle_area=(0.01, 0.02)))
    positive = next(s for s in made if s.label == "tumor")
    with Slide(out / positive.name) as slide:
        tissue = tissue_of_slide(slide, max_side=512)
    return out, made, positive, tissue


def test_synth_writes_each_slides_needles_as_tumor_geojson(needle_slide):
    out, made, _, _ = needle_slide
    needles = json.loads((out / "needles.json").read_text())
    for s in made:
        anns = load_annotations(out / s.name.replace(".tiff", ".geojson"))
        assert {a.classification for a in anns} <= {"Tumor"}
        rects = sorted([round(v) for v in (x0, y0, x1 - x0, y1 - y0)]
                       for x0, y0, x1, y1 in (a.geometry.bounds for a in anns))
        assert rects == sorted(needles[s.name])
        assert bool(rects) == (s.label == "tumor")


def test_ratio_on_a_synthetic_slide_with_known_needles(needle_slide):
    out, _, positive, tissue = needle_slide
    anns = load_annotations(out / positive.name.replace(".tiff", ".geojson"))
    assert 0.3 * 1024**2 < tissue.area < 0.9 * 1024**2  # the glass is not tissue
    region = region_in_tissue(anns, tissue, "Tumor")
    assert region.area > 0
    side = 1024
    # spread evenly over the tissue: cell values follow the tissue in each 8 px cell (edge cells
    # keep only their tissue part, so this is a little above 1; a uniform map is exactly 1)
    xs = ys = np.arange(0, side + 1, 8.0)
    even = make_trace("grid_attention", maps=[grid_map(tissue.grid_areas(xs, ys), side, side)], width=side, height=side)
    s = score_attention(even, anns, tissue, "Tumor")
    assert s.ratio == pytest.approx(1.0, abs=0.06)
    assert score_attention(make_trace("grid_attention", maps=[grid_map(np.ones((64, 64)), side, side)],
                                      width=side, height=side), anns, tissue, "Tumor").ratio == pytest.approx(1.0)
    old = localisation(even, positive.needles)  # the slide-relative measure: glass counted
    assert old > 1.25 and old == pytest.approx(side * side / tissue.area, rel=0.1)
    # all of it on the needles: one map per needle, its one cell the needle's rectangle
    maps = [grid_map(np.ones((1, 1)), origin=(x, y), cell=(w, h)) for x, y, w, h in positive.needles]
    s = score_attention(make_trace("grid_attention", maps=maps, width=side, height=side), anns, tissue, "Tumor")
    assert s.inside_share == pytest.approx(1.0)
    assert s.ratio == pytest.approx(tissue.area / region.area)
    assert s.dice == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------
# Summaries over slides
# ---------------------------------------------------------------------------------------
def test_median_with_a_seeded_bootstrap_interval():
    values = [1.0, 2.0, 3.0, 50.0, 4.0, None]
    a, b = summarise(values, seed=1), summarise(values, seed=1)
    assert a == b and a["n"] == 5 and a["median"] == 3.0  # the outlier does not drag it
    assert a["ci95"][0] <= 3.0 <= a["ci95"][1] and a["iqr"] == [2.0, 4.0]
    assert bootstrap_ci([1.0]) is None


def test_auroc_with_a_bootstrap_interval():
    auc, ci = auroc_ci([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], n_boot=200)
    assert auc == 1.0 and ci == (1.0, 1.0)
    auc, ci = auroc_ci([0.1, 0.9, 0.2, 0.8, 0.6, 0.3], [0, 0, 1, 1, 1, 0], n_boot=200)
    assert 0 <= ci[0] < auc < ci[1] <= 1
    assert auroc_ci([0.1, 0.2], [1, 1]) == (None, None)


def test_too_many_distinct_edges_snap_to_a_grid_and_keep_the_mass(monkeypatch):
    import engines.evaluate as E

    rng = np.random.default_rng(3)
    maps = [grid_map(rng.random((7, 9)), origin=(rng.uniform(0, 30), rng.uniform(0, 30)),
                     cell=(rng.uniform(90, 110), rng.uniform(90, 110))) for _ in range(6)]
    trace = make_trace("grid_attention", maps=maps)
    exact = score_attention(trace, ANNS, HALF, "Tumor")
    monkeypatch.setattr(E, "MAX_CELLS", 2500)  # 50 x 50 cells instead of ~ 3000
    snapped = score_attention(trace, ANNS, HALF, "Tumor")
    assert snapped.inside_share == pytest.approx(exact.inside_share, rel=0.15)
    assert snapped.ratio != exact.ratio  # it did take the other path


def test_a_run_on_a_region_is_measured_against_the_tissue_inside_it():
    roi = (0, 0, 500, 400)  # 200,000 px^2 of tissue, all 15,000 of the annotation
    uniform = make_trace("grid_attention", maps=[grid_map(np.ones((4, 5)), cell=(100, 100))])
    uniform.roi = roi
    s = score_attention(uniform, ANNS, HALF, "Tumor")
    assert s.annotation_share == pytest.approx(15_000 / 200_000)
    assert s.ratio == pytest.approx(1.0)
