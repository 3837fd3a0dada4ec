"""Area annotations (a pathologist's outlines): read from QuPath GeoJSON and ASAP XML, written
back as GeoJSON that QuPath opens.

Every geometry is a shapely ``Polygon`` or ``MultiPolygon`` in level-0 slide pixels. Points and
lines carry no area, so readers leave them out and count them (``AnnotationSet.skipped``).
Invalid outlines (self-crossing, bow ties) are repaired with ``shapely.make_valid``. Anything a
reader cannot trust (broken JSON or XML, missing or non-finite coordinates, counts past the
caps below) is one ``AnnotationError`` whose message names the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping

from engines.trace import write_atomic

MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_ANNOTATIONS = 1_000_000
MAX_VERTICES = 20_000_000  # all rings of a file together
MAX_COORD = 1e9  # level-0 pixels; slides are at most a few 1e5 px a side
EXTENSIONS = (".geojson", ".json", ".xml")

Color = tuple[int, int, int]


class AnnotationError(ValueError):
    """An annotation file could not be read or written; the message is meant for the user."""


@dataclass
class Annotation:
    geometry: Polygon | MultiPolygon  # level-0 pixels
    classification: str | None = None
    color: Color | None = None
    name: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def area(self) -> float:
        return float(self.geometry.area)


@dataclass
class AnnotationSet:
    """The annotations of one file; iterates and measures like a list of them."""

    annotations: list[Annotation]
    skipped: int = 0  # points, lines and outlines without area that were left out
    source: str = ""

    def __iter__(self) -> Iterator[Annotation]:
        return iter(self.annotations)

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, i: int) -> Annotation:
        return self.annotations[i]

    def classes(self) -> list[str]:
        """The classifications present, in order of first appearance (unclassified left out)."""
        return list(dict.fromkeys(a.classification for a in self.annotations if a.classification))


def of_class(annotations: Iterable[Annotation], classification: str | None) -> list[Annotation]:
    """The annotations of ``classification`` (case-insensitive); all of them for None."""
    if classification is None:
        return list(annotations)
    want = classification.casefold()
    return [a for a in annotations if (a.classification or "").casefold() == want]


# ---------------------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------------------
class _Budget:
    """Counts vertices and annotations across a file so a huge one fails early and clearly."""

    def __init__(self, where: str):
        self.where, self.vertices, self.count = where, 0, 0

    def ring(self, coords: Any, what: str) -> np.ndarray:
        try:
            arr = np.asarray(coords, dtype=float)
        except (TypeError, ValueError):
            raise AnnotationError(f"{self.where}: {what} has coordinates that are not numbers") from None
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
            raise AnnotationError(f"{self.where}: {what} is not a list of [x, y] positions")
        arr = arr[:, :2]
        if not np.isfinite(arr).all():
            raise AnnotationError(f"{self.where}: {what} has a coordinate that is not finite")
        if np.abs(arr).max() > MAX_COORD:
            raise AnnotationError(f"{self.where}: {what} has a coordinate beyond {MAX_COORD:g} px")
        self.vertices += len(arr)
        if self.vertices > MAX_VERTICES:
            raise AnnotationError(f"{self.where}: more than {MAX_VERTICES:,} vertices")
        return arr

    def one_more(self) -> None:
        self.count += 1
        if self.count > MAX_ANNOTATIONS:
            raise AnnotationError(f"{self.where}: more than {MAX_ANNOTATIONS:,} annotations")


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise AnnotationError(f"{path}: {size / 2**20:.0f} MiB is more than the "
                                  f"{MAX_FILE_BYTES // 2**20} MiB an annotation file may be")
        return path.read_bytes()
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read ({e.strerror or e})") from None


def _polygon(shell: np.ndarray, holes: Sequence[np.ndarray]) -> Polygon | None:
    """A polygon from rings, or None when the shell cannot enclose area."""
    if len(shell) < 3:
        return None
    holes = [h for h in holes if len(h) >= 3]
    return Polygon(shell, holes)


def _assemble(geoms: list, meta: list[tuple], skipped: int, source: str) -> "AnnotationSet":
    """Annotations from outlines and their (class, colour, name, properties); outlines with
    no area left after repair count as skipped."""
    out = []
    for g, (cls, color, name, rest) in zip(_finish(geoms), meta):
        if g is None:
            skipped += 1
            continue
        out.append(Annotation(g, cls, color, name, rest))
    return AnnotationSet(out, skipped, source)


def _finish(polys: list[Polygon | MultiPolygon]) -> list[Polygon | MultiPolygon | None]:
    """Repair invalid outlines (vectorised validity test; ``make_valid`` only where needed)
    and keep the polygonal part; None where nothing with area is left."""
    if not polys:
        return []
    arr = np.array(polys, dtype=object)
    bad = ~shapely.is_valid(arr)
    if bad.any():
        arr[bad] = shapely.make_valid(arr[bad])
    out: list[Polygon | MultiPolygon | None] = []
    for g in arr:
        if not isinstance(g, (Polygon, MultiPolygon)):
            parts = [p for p in shapely.get_parts(g) if isinstance(p, (Polygon, MultiPolygon))]
            flat = [q for p in parts for q in (p.geoms if isinstance(p, MultiPolygon) else [p])]
            g = MultiPolygon(flat) if len(flat) > 1 else (flat[0] if flat else None)
        out.append(g if g is not None and not g.is_empty and g.area > 0 else None)
    return out


# ---------------------------------------------------------------------------------------
# QuPath GeoJSON
# ---------------------------------------------------------------------------------------
def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a number GeoJSON allows")


def _color_of(value: Any) -> Color | None:
    """QuPath writes ``[r, g, b]`` (v0.3+) or ``colorRGB`` as a packed (A)RGB int."""
    if isinstance(value, (list, tuple)) and len(value) >= 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value[:3]):
        return tuple(int(min(max(v, 0), 255)) for v in value[:3])  # type: ignore[return-value]
    if isinstance(value, int) and not isinstance(value, bool):
        v = value & 0xFFFFFF
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        try:
            v = int(value[1:], 16)
        except ValueError:
            return None
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    return None


def _classification(props: dict) -> tuple[str | None, Color | None]:
    cls = props.get("classification")
    if isinstance(cls, dict):
        name = cls.get("name")
        color = _color_of(cls.get("color", cls.get("colorRGB")))
        return (str(name) if name is not None else None), color
    if isinstance(cls, str):  # older exports: the class name alone
        return cls, None
    return None, None


def _geojson_polygons(geom: Any, budget: _Budget, what: str) -> tuple[list[Polygon], int]:
    """(polygons of an area geometry, number of non-area geometries left out)."""
    if not isinstance(geom, dict):
        raise AnnotationError(f"{budget.where}: {what} has no geometry object")
    kind = geom.get("type")
    if kind == "GeometryCollection":
        members = geom.get("geometries")
        if not isinstance(members, list):
            raise AnnotationError(f"{budget.where}: {what} is a GeometryCollection without geometries")
        polys, skipped = [], 0
        for j, g in enumerate(members):
            p, s = _geojson_polygons(g, budget, f"{what} member {j}")
            polys += p
            skipped += s
        return polys, skipped
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return [], 1
    if kind not in ("Polygon", "MultiPolygon"):
        raise AnnotationError(f"{budget.where}: {what} has geometry type {kind!r}")
    coords = geom.get("coordinates")
    if not isinstance(coords, list) or not coords:
        raise AnnotationError(f"{budget.where}: {what} has no coordinates")
    polygons = [coords] if kind == "Polygon" else coords
    out = []
    for rings in polygons:
        if not isinstance(rings, list) or not rings:
            raise AnnotationError(f"{budget.where}: {what} has a polygon without rings")
        arrs = [budget.ring(r, what) for r in rings]
        p = _polygon(arrs[0], arrs[1:])
        if p is not None:
            out.append(p)
    return out, (0 if out else 1)


def parse_geojson(data: Any, where: str = "GeoJSON") -> AnnotationSet:
    """Annotations from parsed GeoJSON: a FeatureCollection, a Feature, a list of Features
    (older QuPath exports) or a bare geometry."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise AnnotationError(f"{where}: FeatureCollection without a 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    elif isinstance(data, dict) and isinstance(data.get("type"), str) and "coordinates" in data \
            or isinstance(data, dict) and data.get("type") == "GeometryCollection":
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise AnnotationError(f"{where}: not GeoJSON (expected a FeatureCollection, Feature or geometry)")
    if len(features) > MAX_ANNOTATIONS:
        raise AnnotationError(f"{where}: more than {MAX_ANNOTATIONS:,} annotations")
    budget = _Budget(where)
    geoms: list[Polygon | MultiPolygon] = []
    meta: list[tuple[str | None, Color | None, str | None, dict]] = []
    skipped = 0
    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or feat.get("type", "Feature") != "Feature":
            raise AnnotationError(f"{where}: feature {i} is not a GeoJSON Feature")
        polys, s = _geojson_polygons(feat.get("geometry"), budget, f"feature {i}")
        skipped += s
        if not polys:
            continue
        budget.one_more()
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(f"{where}: feature {i} has properties that are not an object")
        name, color = _classification(props)
        if color is None:
            color = _color_of(props.get("color"))
        label = props.get("name")
        rest = {k: v for k, v in props.items() if k not in ("classification", "name", "objectType", "color")}
        geoms.append(polys[0] if len(polys) == 1 else MultiPolygon(polys))
        meta.append((name, color, str(label) if label is not None else None, rest))
    return _assemble(geoms, meta, skipped, where)


def read_geojson(path: str | os.PathLike) -> AnnotationSet:
    path = Path(path)
    raw = _read_bytes(path)
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise AnnotationError(f"{path}: nested too deeply to be GeoJSON") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    result = parse_geojson(data, str(path))
    return result


# ---------------------------------------------------------------------------------------
# ASAP XML
# ---------------------------------------------------------------------------------------
def _hex_color(value: str | None) -> Color | None:
    return _color_of(value.strip()) if value else None


def _xml_number(value: str | None, where: str) -> float:
    if value is None:
        raise AnnotationError(f"{where} has no X or Y")
    try:
        v = float(value.strip().replace(",", "."))  # some locales write a decimal comma
    except ValueError:
        raise AnnotationError(f"{where} has a coordinate that is not a number: {value!r}") from None
    return v


def read_asap_xml(path: str | os.PathLike) -> AnnotationSet:
    """ASAP's ``<ASAP_Annotations>``: each ``<Annotation Type="Polygon" PartOfGroup=...>``
    with its ``<Coordinate Order X Y>``; the group becomes the classification (its colour
    when the annotation has none). Dots and point sets have no area and are skipped."""
    path = Path(path)
    raw = _read_bytes(path)
    if b"<!ENTITY" in raw or b"<!DOCTYPE" in raw:  # no entity expansion, however small
        raise AnnotationError(f"{path}: XML with a DOCTYPE or entities is not accepted")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: not valid XML ({e})") from None
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{path}: not an ASAP annotation file (root <{root.tag}>)")
    group_colors: dict[str, Color | None] = {
        g.get("Name", ""): _hex_color(g.get("Color")) for g in root.iter("Group")}
    budget = _Budget(str(path))
    geoms, meta, skipped = [], [], 0
    for i, ann in enumerate(root.iter("Annotation")):
        kind = (ann.get("Type") or "Polygon").strip()
        if kind.lower() in ("dot", "pointset", "measurement"):
            skipped += 1
            continue
        where = f"{path}: annotation {i} ({ann.get('Name') or 'unnamed'})"
        coords = ann.find("Coordinates")
        points = [] if coords is None else coords.findall("Coordinate")
        if not points:
            raise AnnotationError(f"{where} has no coordinates")
        rows = []
        for c in points:
            order = c.get("Order")
            try:
                o = int(order) if order is not None else len(rows)
            except ValueError:
                raise AnnotationError(f"{where}: Order {order!r} is not a whole number") from None
            rows.append((o, _xml_number(c.get("X"), where), _xml_number(c.get("Y"), where)))
        rows.sort(key=lambda r: r[0])
        shell = budget.ring([(x, y) for _, x, y in rows], f"annotation {i}")
        poly = _polygon(shell, [])
        if poly is None:
            skipped += 1
            continue
        budget.one_more()
        group = ann.get("PartOfGroup")
        group = None if group in (None, "", "None") else group
        color = _hex_color(ann.get("Color")) or group_colors.get(group or "")
        geoms.append(poly)
        meta.append((group, color, ann.get("Name"), {"asap_type": kind} if kind != "Polygon" else {}))
    return _assemble(geoms, meta, skipped, str(path))


# ---------------------------------------------------------------------------------------
# Writing, and finding a slide's file
# ---------------------------------------------------------------------------------------
DEFAULT_COLORS = {"tumor": (200, 0, 0), "stroma": (150, 200, 150), "immune cells": (160, 90, 160),
                  "necrosis": (50, 50, 50), "other": (255, 200, 0), "region*": (0, 0, 180)}


def default_color(classification: str) -> Color:
    """QuPath's colour for its built-in classes; a stable colour from the name otherwise."""
    known = DEFAULT_COLORS.get(classification.casefold())
    if known:
        return known
    h = sum((i + 1) * ord(ch) for i, ch in enumerate(classification)) * 2654435761 & 0xFFFFFF
    return (h >> 16) & 255, (h >> 8) & 255, h & 255


def to_feature(a: Annotation) -> dict:
    props: dict[str, Any] = {**a.properties, "objectType": "annotation"}
    if a.name:
        props["name"] = a.name
    if a.classification:
        color = a.color or default_color(a.classification)
        props["classification"] = {"name": a.classification, "color": [int(c) for c in color]}
    elif a.color:
        props["color"] = [int(c) for c in a.color]
    return {"type": "Feature", "geometry": mapping(a.geometry), "properties": props}


def write_geojson(path: str | os.PathLike, annotations: Iterable[Annotation]) -> None:
    """A FeatureCollection QuPath imports (File > Import objects, or drag and drop), written
    to a temporary file and renamed."""
    features = [to_feature(a) for a in annotations]
    try:
        text = json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise AnnotationError(f"{path}: cannot write these annotations as GeoJSON ({e})") from None
    write_atomic(Path(path), text)


def load_annotations(path: str | os.PathLike) -> AnnotationSet:
    """Read by extension: ``.geojson``/``.json`` as GeoJSON, ``.xml`` as ASAP."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in (".geojson", ".json"):
        return read_geojson(path)
    if ext == ".xml":
        return read_asap_xml(path)
    raise AnnotationError(f"{path}: unknown annotation format (use .geojson, .json or .xml)")


def annotation_file_for(folder: str | os.PathLike, slide_path: str | os.PathLike) -> Path | None:
    """The file in ``folder`` named after the slide: ``<stem>.geojson``, ``.json`` or ``.xml``
    (also ``<full name>.geojson`` and so on, as some exports name them); None if there is none."""
    folder, slide = Path(folder), Path(slide_path)
    for base in dict.fromkeys((slide.stem, slide.name)):
        for ext in EXTENSIONS:
            candidate = folder / f"{base}{ext}"
            if candidate.is_file():
                return candidate
    return None


def annotations_for_slide(folder: str | os.PathLike, slide_path: str | os.PathLike) -> AnnotationSet | None:
    """The annotations of a slide from a folder of files named after the slides; None when
    the folder has no file for it."""
    found = annotation_file_for(folder, slide_path)
    return None if found is None else load_annotations(found)


def rect_annotation(rect: Sequence[float], classification: str | None = "Tumor",
                    name: str | None = None) -> Annotation:
    """An annotation for a level-0 ``(x, y, w, h)`` rectangle."""
    x, y, w, h = (float(v) for v in rect)
    return Annotation(shapely.box(x, y, x + w, y + h), classification,
                      default_color(classification) if classification else None, name)
