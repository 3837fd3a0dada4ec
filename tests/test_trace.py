"""Traces round-trip through JSON exactly and export GeoJSON that QuPath reads."""
from __future__ import annotations

import json
import os
import stat

import pytest

from engines.trace import AttentionMap, Field, SlideRef, Trace, TraceError, TrailStep, write_atomic


def _trace() -> Trace:
    t = Trace(model="magnet", preset="tiny", checkpoint=None,
              slide=SlideRef("/x/slide.svs", 2220, 2967, 0.499), classes=["normal", "tumor"])
    t.add(Field(0, None, 0, (0, 0, 2220, 2967), 1.0, "view"))
    t.add(Field(1, 0, 1, (100.5, 200.25, 300.125, 300.125), 0.7, "zoom", 5.0))
    t.add(AttentionMap("mag 1", "magnification", 2.5, (0.0, 0.0), (1110.0, 1483.5), [[0.1, 0.2], [0.3, 0.4]]))
    t.add(TrailStep(0, 1, [0.4, 0.6]))
    t.probs = [0.4, 0.6]
    t.timings["total_s"] = 0.123
    return t


def test_json_round_trip_is_exact(tmp_path):
    t = _trace()
    t.save(tmp_path / "t.json")
    back = Trace.load(tmp_path / "t.json")
    assert back == t
    assert back.prediction == "tumor"


def test_geojson_rectangles_in_level0(tmp_path):
    gj = _trace().to_geojson()
    assert gj["type"] == "FeatureCollection"
    zoom = [f for f in gj["features"] if f["properties"].get("kind") == "zoom"][0]
    ring = zoom["geometry"]["coordinates"][0]
    assert ring[0] == [100.5, 200.25] and ring[2] == [400.625, 500.375] and ring[0] == ring[-1]
    cells = [f for f in gj["features"] if "value" in f["properties"]]
    assert len(cells) == 4
    cell = [c for c in cells if c["properties"]["row"] == 1 and c["properties"]["col"] == 1][0]
    assert cell["properties"]["value"] == 0.4
    assert cell["geometry"]["coordinates"][0][0] == [1110.0, 1483.5]
    _trace().save_geojson(tmp_path / "t.geojson")
    assert json.loads((tmp_path / "t.geojson").read_text())["features"]


@pytest.mark.parametrize("text", ["", "[1, 2]", "{\"model\": 1}", "not json"])
def test_bad_trace_files_raise_trace_error(tmp_path, text):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(TraceError):
        Trace.load(p)


def test_field_containment():
    parent = Field(0, None, 0, (0, 0, 100, 100))
    assert parent.contains(Field(1, 0, 1, (10, 10, 50, 50)))
    assert not parent.contains(Field(2, 0, 1, (60, 60, 50, 50)))


def test_atomic_writes_keep_ordinary_permissions(tmp_path):
    target = tmp_path / "out.json"
    write_atomic(target, "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left
