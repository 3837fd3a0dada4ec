"""Synthetic needle slides: readable pyramids with mpp, needles where the masks say, seeded."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from engines.sampling import tissue_mask
from engines.slide import Slide
from engines.data import stratified_split
from engines.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, slides=4, seed=3, cfg=SynthConfig(size=1024))
    return out


def test_manifest_and_needles(synth_dir):
    rows = list(csv.DictReader(open(synth_dir / "manifest.csv")))
    assert [r.keys() for r in rows][0] == {"slide", "label", "split"}
    assert {r["label"] for r in rows} == {"normal", "tumor"}
    needles = json.loads((synth_dir / "needles.json").read_text())
    assert set(needles) == {r["slide"] for r in rows}
    for r in rows:
        assert bool(needles[r["slide"]]) == (r["label"] == "tumor")


def test_slides_open_as_pyramids_with_mpp(synth_dir):
    for path in sorted(synth_dir.glob("synth_*.tiff")):
        s = Slide(path)
        assert s.dimensions == (1024, 1024)
        assert s.level_count >= 2
        assert s.mpp == pytest.approx(0.495, rel=1e-3)


def test_needles_are_tumour_inside_tissue_and_small(synth_dir):
    needles = json.loads((synth_dir / "needles.json").read_text())
    for name, rects in needles.items():
        mask = np.asarray(Image.open(synth_dir / name.replace(".tiff", "_mask.png"))) > 0
        img = Slide(synth_dir / name).read_region(0, 0, 0, 1024, 1024)
        tissue = tissue_mask(img)
        if not rects:
            assert not mask.any()
            continue
        share = mask.sum() / max(tissue.sum(), 1)
        assert 0.0005 < share < 0.02  # 0.1 % .. 1 % of tissue, with slack for the edge blur
        for x, y, w, h in rects:
            assert mask[y : y + h, x : x + w].any()
            # the rectangle is tight: its border rows and columns touch the needle
            assert mask[y, x : x + w].any() and mask[y + h - 1, x : x + w].any()
            assert tissue[y : y + h, x : x + w].mean() > 0.5  # needles sit inside tissue
        covered = np.zeros_like(mask)
        for x, y, w, h in rects:
            covered[y : y + h, x : x + w] = True
        assert not (mask & ~covered).any()


def test_same_seed_same_data(tmp_path, synth_dir):
    generate(tmp_path, slides=4, seed=3, cfg=SynthConfig(size=1024))
    assert (tmp_path / "needles.json").read_text() == (synth_dir / "needles.json").read_text()
    assert (tmp_path / "manifest.csv").read_text() == (synth_dir / "manifest.csv").read_text()
    a = Slide(tmp_path / "synth_000.tiff").read_region(0, 300, 300, 64, 64)
    b = Slide(synth_dir / "synth_000.tiff").read_region(0, 300, 300, 64, 64)
    np.testing.assert_array_equal(a, b)


def test_split_is_stratified():
    rng = np.random.default_rng(0)
    labels = ["tumor"] * 10 + ["normal"] * 10
    splits = stratified_split(labels, (0.6, 0.2, 0.2), rng)
    for lab in ("tumor", "normal"):
        mine = [s for s, l in zip(splits, labels) if l == lab]
        assert mine.count("train") == 6 and mine.count("val") == 2 and mine.count("test") == 2


@pytest.mark.parametrize("side", [181, 183, 272, 3072 // 8 + 2])
def test_quilt_covers_any_canvas_size(side):
    # Sides just past a multiple of the texture stride put the last textures over the edge.
    from engines.synth import load_textures, quilt

    tex = load_textures()["02_STROMA"]
    out = quilt(np.random.default_rng(0), side, side + 7, lambda y, x: tex)
    assert out.shape == (side, side + 7, 3)
    assert out.mean(-1).min() > 10 and out.std() > 1  # covered by texture everywhere, no black holes
