"""Annotations: QuPath GeoJSON and ASAP XML in, GeoJSON that QuPath opens out, and one clear
error for files that cannot be trusted."""
from __future__ import annotations

import json

import pytest
import shapely

from engines import annotations as A
from engines.annotations import (Annotation, AnnotationError, annotations_for_slide, load_annotations,
                                 read_asap_xml, read_geojson, write_geojson)

# Written the way QuPath 0.4 exports "Export objects > GeoJSON" (pretty-printed FeatureCollection,
# uuid ids, objectType, classification with name and [r, g, b] colour), plus the older forms.
QUPATH_GEOJSON = """{
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "id": "5e0a7a34-1d3b-4bc3-9c7e-8a58f0f0c001",
      "geometry": {
        "type": "Polygon",
        "coordinates": [
          [[1000, 1000], [3000, 1000], [3000, 3000], [1000, 3000], [1000, 1000]],
          [[1500, 1500], [1500, 2000], [2000, 2000], [2000, 1500], [1500, 1500]]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "name": "tumour core",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "isLocked": false
      }
    },
    {
      "type": "Feature",
      "id": "5e0a7a34-1d3b-4bc3-9c7e-8a58f0f0c002",
      "geometry": {
        "type": "MultiPolygon",
        "coordinates": [
          [[[5000, 5000], [5400, 5000], [5400, 5300], [5000, 5300], [5000, 5000]]],
          [[[6000, 5000], [6100, 5000], [6100, 5100], [6000, 5100], [6000, 5000]]]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "classification": {"name": "Stroma", "color": [150, 200, 150]}
      }
    },
    {
      "type": "Feature",
      "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]},
      "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "colorRGB": -3670016}}
    },
    {
      "type": "Feature",
      "geometry": {"type": "Polygon", "coordinates": [[[20, 0], [30, 0], [30, 10], [20, 10], [20, 0]]]},
      "properties": {"classification": "Immune cells"}
    },
    {
      "type": "Feature",
      "geometry": {"type": "Point", "coordinates": [50, 50]},
      "properties": {"objectType": "annotation"}
    },
    {
      "type": "Feature",
      "geometry": {"type": "LineString", "coordinates": [[0, 0], [100, 100]]},
      "properties": {"objectType": "annotation"}
    }
  ]
}
"""

ASAP_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="200" Y="200" />
        <Coordinate Order="0" X="100" Y="100" />
        <Coordinate Order="1" X="200" Y="100" />
        <Coordinate Order="3" X="100" Y="200" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="">
      <Coordinates>
        <Coordinate Order="0" X="1000,5" Y="1000" />
        <Coordinate Order="1" X="1100,5" Y="1000" />
        <Coordinate Order="2" X="1100,5" Y="1050" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="Dot" PartOfGroup="None" Color="#000000">
      <Coordinates><Coordinate Order="0" X="5" Y="5" /></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="Tumor" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
    <Group Name="_2" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def test_qupath_geojson_reads_holes_multipolygons_classes_and_colours(tmp_path):
    path = tmp_path / "slide.geojson"
    path.write_text(QUPATH_GEOJSON)
    got = read_geojson(path)
    assert len(got) == 4 and got.skipped == 2  # the point and the line have no area
    core, stroma, old_rgb, old_name = got
    assert core.classification == "Tumor" and core.color == (200, 0, 0) and core.name == "tumour core"
    assert core.area == pytest.approx(2000 * 2000 - 500 * 500)  # the hole is cut out
    assert core.properties == {"isLocked": False}
    assert stroma.geometry.geom_type == "MultiPolygon" and stroma.color == (150, 200, 150)
    assert stroma.area == pytest.approx(400 * 300 + 100 * 100)
    assert old_rgb.color == (200, 0, 0)  # packed ARGB of QuPath 0.2
    assert old_name.classification == "Immune cells" and old_name.color is None
    assert got.classes() == ["Tumor", "Stroma", "Immune cells"]
    assert [a.area for a in A.of_class(got, "tumor")] == [core.area, 100.0]


def test_geojson_round_trip_is_what_qupath_imports(tmp_path):
    src = tmp_path / "in.geojson"
    src.write_text(QUPATH_GEOJSON)
    first = read_geojson(src)
    out = tmp_path / "out" / "export.geojson"
    write_geojson(out, first)
    data = json.loads(out.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 4
    for feat in data["features"]:
        assert feat["type"] == "Feature" and feat["properties"]["objectType"] == "annotation"
        cls = feat["properties"]["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3
    assert data["features"][0]["geometry"]["type"] == "Polygon"
    assert len(data["features"][0]["geometry"]["coordinates"]) == 2  # shell and hole
    again = read_geojson(out)
    assert len(again) == len(first) and again.skipped == 0
    for a, b in zip(first, again):
        assert a.geometry.equals(b.geometry)
        assert (a.classification, a.name) == (b.classification, b.name)
    # a class without a colour gets one QuPath can show, and keeps it from then on
    assert again[3].color is not None and again[0].color == (200, 0, 0)
    assert not list(out.parent.glob(".*tmp"))  # written through a temporary file


def test_asap_xml_groups_become_classes_in_coordinate_order(tmp_path):
    path = tmp_path / "slide.xml"
    path.write_text(ASAP_XML)
    got = read_asap_xml(path)
    assert len(got) == 2 and got.skipped == 1  # the dot
    square, tri = got
    assert square.classification == "Tumor" and square.color == (0xF4, 0xFA, 0x58)
    assert square.geometry.is_valid and square.area == pytest.approx(100 * 100)  # ordered, not a bow tie
    assert tri.classification == "_2" and tri.color == (0x64, 0xFE, 0x2E)  # the group's colour
    assert tri.area == pytest.approx(100 * 50 / 2)  # decimal commas read as points
    assert tri.geometry.bounds[0] == pytest.approx(1000.5)
    assert load_annotations(path)[0].geometry.equals(square.geometry)


def test_self_crossing_outline_is_repaired(tmp_path):
    bow = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    path = tmp_path / "bow.json"
    path.write_text(json.dumps(bow))  # a bare geometry
    (ann,) = read_geojson(path)
    assert ann.geometry.is_valid and ann.area == pytest.approx(50.0)


def test_annotations_are_found_by_slide_name(tmp_path):
    (tmp_path / "case1.geojson").write_text(QUPATH_GEOJSON)
    (tmp_path / "case2.xml").write_text(ASAP_XML)
    (tmp_path / "case3.svs.geojson").write_text(QUPATH_GEOJSON)
    assert len(annotations_for_slide(tmp_path, "/slides/case1.svs")) == 4
    assert annotations_for_slide(tmp_path, "elsewhere/case2.ndpi")[0].classification == "Tumor"
    assert len(annotations_for_slide(tmp_path, "case3.svs")) == 4
    assert annotations_for_slide(tmp_path, "case4.svs") is None


def _square(coords) -> str:
    return json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
                       "properties": {}})


HOSTILE_JSON = {
    "truncated": QUPATH_GEOJSON[:300],
    "not_json": "\x00\x01garbage",
    "nan": '{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 0], [1, 1], [0, 0]]]}',
    "infinity": '{"type": "Polygon", "coordinates": [[[0, 0], [1e999, 0], [1, 1], [0, 0]]]}',
    "no_coordinates": '{"type": "Feature", "geometry": {"type": "Polygon"}, "properties": {}}',
    "empty_coordinates": _square([]),
    "string_coordinates": _square([[["a", "b"], ["c", "d"], ["e", "f"]]]),
    "ragged": _square([[[0, 0], [1], [1, 1, 1, 1, 1], [0, 0]]]),
    "far_away": _square([[[0, 0], [1e12, 0], [1, 1], [0, 0]]]),
    "unknown_type": '{"type": "Circle", "coordinates": [1, 2, 3]}',
    "features_not_list": '{"type": "FeatureCollection", "features": 7}',
    "feature_not_object": '{"type": "FeatureCollection", "features": [7]}',
    "properties_not_object": '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
                             '[[[0, 0], [1, 0], [1, 1], [0, 0]]]}, "properties": [1]}',
    "deep": "[" * 200_000 + "]" * 200_000,
    "plain_number": "42",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON))
def test_hostile_geojson_is_one_clear_error(tmp_path, name):
    path = tmp_path / f"{name}.geojson"
    path.write_text(HOSTILE_JSON[name])
    with pytest.raises(AnnotationError) as err:
        load_annotations(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_huge_counts_are_refused_before_they_are_built(tmp_path, monkeypatch):
    ring = [[0, 0], [1, 0], [1, 1], [0, 0]]
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}} for _ in range(50)]
    path = tmp_path / "many.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    monkeypatch.setattr(A, "MAX_ANNOTATIONS", 20)
    with pytest.raises(AnnotationError, match="more than 20 annotations"):
        read_geojson(path)
    monkeypatch.setattr(A, "MAX_ANNOTATIONS", 1000)
    monkeypatch.setattr(A, "MAX_VERTICES", 100)
    with pytest.raises(AnnotationError, match="more than 100 vertices"):
        read_geojson(path)
    monkeypatch.setattr(A, "MAX_FILE_BYTES", 100)
    with pytest.raises(AnnotationError, match="MiB"):
        read_geojson(path)


HOSTILE_XML = {
    "broken": ASAP_XML[:200],
    "wrong_root": "<Annotations><Annotation/></Annotations>",
    "no_coordinates": '<ASAP_Annotations><Annotations><Annotation Type="Polygon"/></Annotations></ASAP_Annotations>',
    "bad_number": '<ASAP_Annotations><Annotations><Annotation Type="Polygon"><Coordinates>'
                  '<Coordinate Order="0" X="one" Y="2"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
    "missing_y": '<ASAP_Annotations><Annotations><Annotation Type="Polygon"><Coordinates>'
                 '<Coordinate Order="0" X="1"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
    "nan": '<ASAP_Annotations><Annotations><Annotation Type="Polygon"><Coordinates>'
           '<Coordinate Order="0" X="nan" Y="2"/><Coordinate Order="1" X="3" Y="2"/>'
           '<Coordinate Order="2" X="3" Y="5"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
    "bad_order": '<ASAP_Annotations><Annotations><Annotation Type="Polygon"><Coordinates>'
                 '<Coordinate Order="x" X="1" Y="2"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
    "entities": '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
                '<ASAP_Annotations>&lol2;</ASAP_Annotations>',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_XML))
def test_hostile_asap_xml_is_one_clear_error(tmp_path, name):
    path = tmp_path / f"{name}.xml"
    path.write_text(HOSTILE_XML[name])
    with pytest.raises(AnnotationError) as err:
        load_annotations(path)
    assert str(path) in str(err.value)


def test_unreadable_or_unknown_files_are_one_clear_error(tmp_path):
    with pytest.raises(AnnotationError, match="cannot read"):
        load_annotations(tmp_path / "missing.geojson")
    (tmp_path / "folder.geojson").mkdir()
    with pytest.raises(AnnotationError, match="cannot read"):
        load_annotations(tmp_path / "folder.geojson")
    (tmp_path / "a.txt").write_text("{}")
    with pytest.raises(AnnotationError, match="unknown annotation format"):
        load_annotations(tmp_path / "a.txt")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_written_geometry_must_be_finite(tmp_path):
    bad = Annotation(shapely.Polygon([(0, 0), (float("nan"), 0), (1, 1)]), "Tumor")
    with pytest.raises(AnnotationError):
        write_geojson(tmp_path / "bad.geojson", [bad])
    assert not (tmp_path / "bad.geojson").exists()
