"""Attention maps exported for other tools: iso-contour GeoJSON that QuPath reads (the default
GeoJSON export, in the CLI too) and a map as a pyramidal float TIFF."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import shapely
import tifffile
from shapely.geometry import shape

from engines import map_export as me
from engines.trace import AttentionMap, Field, SlideRef, Trace

ORIGIN, CELL = (100.0, 50.0), (64.0, 64.0)
HOT = {(2, 3): 2.6, (2, 4): 2.4, (3, 3): 1.8}  # the rest of the 10 x 10 map is 1 each


def _known_map() -> AttentionMap:
    v = np.ones((10, 10))
    for (r, c), value in HOT.items():
        v[r, c] = value
    return AttentionMap("att", "heads", None, ORIGIN, CELL, v.tolist())


def _cell_box(r: int, c: int):
    x, y = ORIGIN[0] + c * CELL[0], ORIGIN[1] + r * CELL[1]
    return shapely.box(x, y, x + CELL[0], y + CELL[1])


def _trace(*maps: AttentionMap, fields=()) -> Trace:
    return Trace(model="grid_attention", preset="tiny", checkpoint=None,
                 slide=SlideRef("s.svs", 40_000, 30_000, 0.25), maps=list(maps), fields=list(fields))


def test_contours_cover_exactly_the_cells_holding_each_share_of_the_mass():
    total = 97 + sum(HOT.values())  # 103.8: top 1 % is 1.04, top 5 % is 5.19
    top1, top5, top10 = me.contours([_known_map()])
    assert top1.geometry.equals(_cell_box(2, 3))
    expected5 = shapely.union_all([_cell_box(r, c) for r, c in HOT])
    assert top5.geometry.area == pytest.approx(3 * 64 * 64)
    assert top5.geometry.symmetric_difference(expected5).area == pytest.approx(0.0)
    assert top5.mass == pytest.approx(sum(HOT.values()) / total)
    assert top5.geometry.geom_type == "Polygon"  # the L of three cells is one polygon
    assert len(top5.geometry.exterior.coords) == 7  # straight edges carry no cell corners
    # 10 % needs background cells, which all tie: all of them are taken, the whole map
    assert top10.geometry.area == pytest.approx(100 * 64 * 64)
    assert top10.mass == pytest.approx(1.0)


def test_a_group_pools_its_maps_and_negative_or_empty_maps_hold_no_mass():
    a = _known_map()
    b = AttentionMap("att2", "heads", None, ORIGIN, CELL, _known_map().values)
    neg = AttentionMap("neg", "other", None, ORIGIN, CELL, (-np.ones((3, 3))).tolist())
    out = {(name, c.level): c for name, _g, c in me.trace_contours(_trace(a, b, neg), by_group=True)}
    assert out[("heads", 0.05)].geometry.symmetric_difference(
        me.contours([a])[1].geometry).area == pytest.approx(0.0)
    assert out[("other", 0.05)].geometry.is_empty


def test_contour_geojson_has_one_feature_per_level_with_qupath_classification(tmp_path):
    f = Field(0, None, 1, (0.0, 0.0, 500.0, 400.0))
    out = tmp_path / "c.geojson"
    seen = []
    n = me.save_contours_geojson(_trace(_known_map(), fields=[f]), out,
                                 progress=lambda d, t: seen.append((d, t)))
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and n == len(doc["features"]) == 4
    field, *levels = doc["features"]
    assert field["properties"]["kind"] == "field"
    assert [p["properties"]["level"] for p in levels] == [0.01, 0.05, 0.1]
    p5 = levels[1]["properties"]
    assert p5["map"] == "att" and p5["classification"]["name"] == "Attention top 5%"
    assert len(p5["classification"]["color"]) == 3
    assert levels[1]["geometry"]["type"] == "MultiPolygon"
    geom = shape(levels[1]["geometry"])
    assert geom.area == pytest.approx(3 * 64 * 64)  # level-0 px
    assert seen[-1][0] == seen[-1][1]
    assert not list(tmp_path.glob(".*tmp"))


def test_levels_are_configurable_and_checked():
    assert me.parse_levels("1,5,10") == (0.01, 0.05, 0.1)
    assert me.parse_levels("0.2, 0.5") == (0.2, 0.5)
    for bad in ("", "x", "0", "-5", "150%,1"):
        with pytest.raises(me.MapExportError):
            me.parse_levels(bad)
    (c,) = me.contours([_known_map()], levels=[0.5])
    assert c.level == 0.5 and c.label == "Attention top 50%"


def _magnet_sized_map() -> AttentionMap:
    """250 x 300 = 75,000 cells: a few smooth attention blobs over a faint background."""
    yy, xx = np.mgrid[0:250, 0:300].astype(float)
    v = np.full((250, 300), 1e-4)
    for cy, cx, s in ((60, 80, 12), (180, 220, 20), (120, 40, 6)):
        v += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return AttentionMap("attention", "magnet", None, (0.0, 0.0), (64.0, 64.0), v.tolist())


def test_a_75000_cell_map_exports_to_well_under_a_megabyte(tmp_path):
    trace = _trace(_magnet_sized_map())
    out = tmp_path / "big.geojson"
    me.save_contours_geojson(trace, out)
    assert out.stat().st_size < 200_000
    feats = json.loads(out.read_text())["features"]
    areas = [shape(f["geometry"]).area for f in feats]
    assert len(feats) == 3 and areas[0] < areas[1] < areas[2]  # nested levels grow
    cells = tmp_path / "cells.geojson"
    trace.save_geojson(cells)  # the per-cell export is kept, and is what contours replace
    assert cells.stat().st_size > 20 * out.stat().st_size


def test_cli_geojson_defaults_to_contours_and_checks_its_options(tmp_path):
    from tests.conftest import DEMO_SLIDE

    out = tmp_path / "x.geojson"
    proc = subprocess.run([sys.executable, "-m", "app.cli", "infer", str(DEMO_SLIDE), "--model",
                           "grid_attention", "--contour-levels", "nope", "--geojson", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "contour levels" in proc.stderr and not out.exists()
    proc = subprocess.run([sys.executable, "-m", "app.cli", "infer", str(DEMO_SLIDE), "--model",
                           "grid_attention", "--geojson-cells"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--geojson" in proc.stderr


def test_float_tiff_round_trip_keeps_values_resolution_and_origin(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.random((70, 90)) * 5
    amap = AttentionMap("head", "local", 20.0, (512.0, 256.0), (32.0, 48.0), values.tolist())
    out = tmp_path / "m.tif"
    assert me.save_map_tiff(amap, out, mpp=0.25, model="local_learning") == 3
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.dtype == np.float32 and page.shape == (70, 90)
        np.testing.assert_allclose(page.asarray(), values.astype(np.float32))
        # 0.25 µm/px x 32 px = 8 µm per pixel across, 12 µm down: 1250 and 833.3 px per cm
        xres, yres = page.tags["XResolution"].value, page.tags["YResolution"].value
        assert xres[0] / xres[1] == pytest.approx(1e4 / 8.0)
        assert yres[0] / yres[1] == pytest.approx(1e4 / 12.0)
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        subs = [p.shape for p in page.pages]
        assert subs == [(35, 45), (18, 23)]
        assert page.pages[0].asarray()[0, 0] == pytest.approx(values[:2, :2].mean(), rel=1e-5)
    got, meta = me.read_map_tiff(out)
    assert meta["origin"] == [512.0, 256.0] and meta["cell"] == [32.0, 48.0]
    assert meta["maglens_map"] == "head" and meta["mpp"] == 0.25


def test_float_tiff_refuses_unusable_maps(tmp_path):
    empty = AttentionMap("e", "g", None, (0.0, 0.0), (1.0, 1.0), [])
    nan = AttentionMap("n", "g", None, (0.0, 0.0), (1.0, 1.0), [[float("nan")]])
    huge = AttentionMap("h", "g", None, (0.0, 0.0), (1.0, 1.0), [[1e300]])
    for bad in (empty, nan, huge):
        with pytest.raises(me.MapExportError):
            me.save_map_tiff(bad, tmp_path / "x.tif", 0.5)
    assert not list(tmp_path.iterdir())
    # without an mpp the TIFF still opens, with no physical resolution claimed
    me.save_map_tiff(_known_map(), tmp_path / "k.tif", None)
    values, meta = me.read_map_tiff(tmp_path / "k.tif")
    assert values.shape == (10, 10) and meta["mpp"] is None


def test_contour_export_cancelled_leaves_nothing(tmp_path):
    import threading

    from engines.trace import ExportCancelled

    cancel = threading.Event()
    cancel.set()
    out = tmp_path / "c.geojson"
    with pytest.raises(ExportCancelled):
        me.save_contours_geojson(_trace(_known_map(), _known_map()), out, cancel=cancel)
    assert not list(tmp_path.iterdir())


# -- the CLI, in process with a small registered model that makes a map --------------------------
@dataclass
class _MapConfig:
    size: int = 8


def _map_model_module():
    import types

    import torch
    from torch import nn

    from engines.models.base import SlideModel

    class MapMaker(SlideModel):
        name = "mapmaker"

        def __init__(self, config, classes=None):
            super().__init__(config, classes)
            self.lin = nn.Linear(1, self.num_classes)

        def explain(self, view, emit):
            x, y, w, h = view.bounds
            v = np.zeros((8, 8))
            v[2, 3], v[2, 4] = 5.0, 4.0
            emit(AttentionMap("attention", "model", None, (x, y), (w / 8, h / 8), v.tolist()))
            return torch.softmax(self.lin(torch.ones(1)), 0).tolist()

    mod = types.ModuleType("maglens_test_mapmaker")
    mod.PRESETS = {"tiny": _MapConfig()}
    mod.MODEL = MapMaker
    return mod


def test_cli_infer_geojson_writes_contours_unless_cells_are_asked(tmp_path, monkeypatch, capsys):
    from app import cli
    from engines import registry
    from tests.conftest import DEMO_SLIDE

    mod = _map_model_module()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(registry.MODULES, "mapmaker", mod.__name__)
    out, cells = tmp_path / "c.geojson", tmp_path / "cells.geojson"
    assert cli.main(["infer", str(DEMO_SLIDE), "--model", "mapmaker", "--geojson", str(out),
                     "--contour-levels", "50"]) == 0, capsys.readouterr().err
    (feat,) = [f for f in json.loads(out.read_text())["features"] if "level" in f["properties"]]
    assert feat["properties"]["level"] == 0.5 and feat["properties"]["map"] == "attention"
    assert cli.main(["infer", str(DEMO_SLIDE), "--model", "mapmaker", "--geojson", str(cells),
                     "--geojson-cells"]) == 0
    tiles = [f for f in json.loads(cells.read_text())["features"] if "value" in f["properties"]]
    assert sorted(f["properties"]["value"] for f in tiles) == [4.0, 5.0]
