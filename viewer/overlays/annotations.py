"""Annotations drawn over the slide: outline and translucent fill by class, the selected one
highlighted with vertex handles, and the outline a drawing tool is making.

Ten thousand polygons must pan and zoom inside a frame, so painting touches only what is on
screen: an STRtree finds the polygons in the view; those under a pixel on screen are skipped
and those of a few pixels (more in a crowd) drawn as their bounding boxes; each polygon's
``QPainterPath``, simplified to half a screen pixel for its zoom octave, is made once and kept.
Paths are made in batches from shapely's coordinate arrays, serialised in ``QPainterPath``'s
``QDataStream`` form and parsed in C++, not point by point in Python.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import shapely
import shapely.affinity
from PySide6.QtCore import QByteArray, QDataStream, QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QImage, QPainter, QPainterPath, QPen

from engines.annotations import Annotation, default_color
from viewer.camera import Camera
from viewer.overlays.base import Overlay, camera_transform

UNCLASSIFIED = "Unclassified"
UNCLASSIFIED_COLOR = (255, 220, 0)
FILL_ALPHA = 56  # of 255: the tissue stays readable under a filled outline
SKIP_PX = 0.6  # polygons smaller than this on screen are not drawn at all
BOX_PX = 3.0  # polygons smaller than this on screen are drawn as their bounding box
TINY_ALPHA = 150  # polygons drawn as boxes are small: fill them more strongly
HANDLE_PX = 6.0
MAX_HANDLES = 2000  # a selected outline with more vertices shows no handles
CROWD = 2000  # more polygons than this on screen make a crowd
CROWD_BOX_PX = 8.0  # in a crowd, polygons smaller than this are drawn as boxes
SMOOTH_MAX = 400  # up to this many outlines on screen are antialiased
RASTER_MIN = 600  # this many polygons on screen are drawn through a reusable image
MAX_CACHED_OCTAVES = 3  # path-element caches kept for the zooms in use

# QPainterPath's QDataStream form: per element an int32 type (0 move, 1 line) and two doubles.
_ELEMENT = np.dtype([("type", ">i4"), ("x", ">f8"), ("y", ">f8")])
_WINDING = np.array([0, int(Qt.FillRule.WindingFill.value)], ">i4").tobytes()  # cStart, fill rule


def class_name(a: Annotation) -> str:
    return a.classification or UNCLASSIFIED


def annotation_color(a: Annotation) -> tuple[int, int, int]:
    """The annotation's own colour, else its class's, as QuPath does."""
    if a.color is not None:
        return tuple(int(c) for c in a.color)  # type: ignore[return-value]
    return default_color(a.classification) if a.classification else UNCLASSIFIED_COLOR


def polygon_path(geometry, offset: tuple[float, float] = (0.0, 0.0)) -> QPainterPath:
    """A (Multi)Polygon as one path, holes included, shifted by ``offset`` level-0 px."""
    if offset != (0.0, 0.0):
        geometry = shapely.affinity.translate(geometry, *offset)
    return joined_path(path_elements([geometry]))


def path_elements(geometries: Sequence, tolerance: float = 0.0) -> list[bytes]:
    """Each geometry's rings as serialised path elements, simplified to ``tolerance`` level-0
    px. Exteriors and holes are oriented oppositely, so a winding fill keeps the holes open
    while overlapping polygons of one colour join into one fill."""
    geoms = np.asarray(geometries, dtype=object)
    if tolerance > 0:
        simple = shapely.simplify(geoms, tolerance, preserve_topology=True)
        gone = shapely.is_empty(simple)
        geoms = np.where(gone, geoms, simple)
    geoms = shapely.orient_polygons(geoms)
    parts, part_of = shapely.get_parts(geoms, return_index=True)
    rings, ring_of = shapely.get_rings(parts, return_index=True)
    coords, coord_of = shapely.get_coordinates(rings, return_index=True)
    rec = np.empty(len(coords), _ELEMENT)
    rec["type"] = 1
    if len(coords):
        starts = np.flatnonzero(np.diff(coord_of, prepend=-1))
        rec["type"][starts] = 0
        rec["x"], rec["y"] = coords[:, 0], coords[:, 1]
    owner = part_of[ring_of[coord_of]] if len(coords) else np.zeros(0, np.intp)
    edges = np.searchsorted(owner, np.arange(len(geoms) + 1))
    return [rec[edges[i]:edges[i + 1]].tobytes() for i in range(len(geoms))]


def joined_path(chunks: list[bytes]) -> QPainterPath:
    """One winding-fill path from serialised elements (of one polygon or several)."""
    body = b"".join(chunks)
    count = len(body) // _ELEMENT.itemsize
    path = QPainterPath()
    if count:
        stream = QDataStream(QByteArray(np.array([count], ">i4").tobytes() + body + _WINDING))
        stream >> path
    return path


class AnnotationOverlay(Overlay):
    """Paints a list of annotations; ``refresh()`` after the list or a geometry changed
    (geometries are replaced, never changed in place)."""

    def __init__(self, annotations: Iterable[Annotation] = (), name: str = "Annotations") -> None:
        super().__init__(name)
        self._items: list[Annotation] = []
        self._tree: shapely.STRtree | None = None
        self._bounds = np.zeros((0, 4))
        self._class = np.zeros(0, np.intp)  # index into self._class_names, per annotation
        self._class_names: list[str] = []
        self._classes: list[tuple[str, QColor]] = []
        self._rgb = np.zeros(0, np.intp)  # index into self._palette, per annotation
        self._palette: list[tuple[int, int, int]] = []
        self._hidden: set[str] = set()
        self._version = 0  # bumped by every refresh: the crowd image is then out of date
        self._raster: tuple[tuple, QImage, int] | None = None
        # Per zoom octave: id(geometry) -> (geometry, its path); the geometry keeps the id unique.
        self._path_cache: dict[int, dict[int, tuple[object, QPainterPath]]] = {}
        self.selected: Annotation | None = None
        self.move_offset: tuple[float, float] = (0.0, 0.0)  # of the selected one, while dragged
        self.draft: QPainterPath | None = None  # the outline a tool is drawing
        self.draft_width: float = 0.0  # level-0 pen width of a brush stroke; 0 = thin outline
        self.draft_color = QColor(255, 255, 255)
        self.draft_erase = False
        self.last_painted = 0  # polygons drawn in the last paint (for benchmarks and tests)
        self.set_annotations(annotations)

    # -- contents ----------------------------------------------------------------------------
    @property
    def annotations(self) -> list[Annotation]:
        return list(self._items)

    def set_annotations(self, annotations: Iterable[Annotation]) -> None:
        self._items = list(annotations)
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the spatial index, classes and colours from the current list."""
        items = self._items
        if self.selected is not None and not any(a is self.selected for a in items):
            self.selected = None
        geoms = np.array([a.geometry for a in items], dtype=object)
        self._tree = shapely.STRtree(geoms) if len(items) else None
        self._bounds = shapely.bounds(geoms) if len(items) else np.zeros((0, 4))
        self._box_cache: list[QRectF] | None = None
        self._version += 1
        names: dict[str, int] = {}
        palette: dict[tuple[int, int, int], int] = {}
        self._class = np.array([names.setdefault(class_name(a), len(names)) for a in items], np.intp)
        first = {}
        for a in items:
            first.setdefault(class_name(a), a)
        self._classes = [(n, QColor(*annotation_color(a))) for n, a in first.items()]
        self._rgb = np.array([palette.setdefault(annotation_color(a), len(palette)) for a in items], np.intp)
        self._class_names, self._palette = list(names), list(palette)
        live = {id(a.geometry) for a in items}
        for cache in self._path_cache.values():
            for key in [k for k in cache if k not in live]:
                del cache[key]
        self.changed.emit()

    # -- classes and the legend --------------------------------------------------------------
    def classes(self) -> list[tuple[str, QColor]]:
        """Each class present, in order of first appearance, with the colour it is drawn in."""
        return [(n, QColor(c)) for n, c in self._classes]

    def class_visible(self, name: str) -> bool:
        return name not in self._hidden

    def set_class_visible(self, name: str, visible: bool) -> None:
        if visible == (name not in self._hidden):
            return
        if visible:
            self._hidden.discard(name)
        else:
            self._hidden.add(name)
        self.changed.emit()

    def legend(self) -> list[tuple[str, QColor]]:
        return [(n, c) for n, c in self.classes() if n not in self._hidden]

    # -- selection and hit tests -------------------------------------------------------------
    def set_selected(self, annotation: Annotation | None) -> None:
        if annotation is not self.selected:
            self.selected = annotation
            self.move_offset = (0.0, 0.0)
            self.changed.emit()

    def shown(self, a: Annotation) -> bool:
        return class_name(a) not in self._hidden

    def annotation_at(self, x: float, y: float, tolerance: float = 0.0) -> Annotation | None:
        """The topmost (last drawn) shown annotation covering level-0 (x, y); ``tolerance``
        in level-0 px lets a click just beside a thin outline still hit it."""
        if self._tree is None:
            return None
        probe = shapely.Point(x, y)
        if tolerance > 0:
            probe = probe.buffer(tolerance, quad_segs=2)
        for i in sorted(self._tree.query(probe, predicate="intersects").tolist(), reverse=True):
            a = self._items[i]
            if self.shown(a):
                return a
        return None

    def visible_indices(self, rect: Sequence[float]) -> np.ndarray:
        """Indices (drawing order) of the annotations whose bounding boxes meet level-0 ``rect``."""
        if self._tree is None:
            return np.zeros(0, dtype=np.intp)
        x, y, w, h = rect
        return np.sort(self._tree.query(shapely.box(x, y, x + w, y + h)))

    # -- painting ----------------------------------------------------------------------------
    def _paths(self, idx: np.ndarray, octave: int) -> list[QPainterPath]:
        """Paths of annotations ``idx`` at ``octave``, the missing ones made in one batch."""
        cache = self._path_cache.get(octave)
        if cache is None:
            if len(self._path_cache) >= MAX_CACHED_OCTAVES:
                del self._path_cache[max(self._path_cache, key=lambda o: abs(o - octave))]
            cache = self._path_cache[octave] = {}
        items = self._items
        missing = [i for i in idx.tolist() if id(items[i].geometry) not in cache]
        if missing:
            # Below 1:1, detail under half a screen pixel (at this octave's largest zoom) is invisible.
            tol = 0.5 / 2.0 ** (octave + 1) if octave < 0 else 0.0
            made = path_elements([items[i].geometry for i in missing], tol)
            for i, rec in zip(missing, made):
                cache[id(items[i].geometry)] = (items[i].geometry, joined_path([rec]))
        return [cache[id(items[i].geometry)][1] for i in idx.tolist()]

    def _rects(self) -> list[QRectF]:
        """Bounding boxes as QRectF, made once per change of the list."""
        if self._box_cache is None:
            self._box_cache = [QRectF(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in self._bounds.tolist()]
        return self._box_cache

    def paint(self, painter: QPainter, camera: Camera) -> None:
        painter.setTransform(camera_transform(camera))
        self.last_painted = 0
        idx = self._to_draw(camera)
        if idx.size >= RASTER_MIN:
            self._paint_raster(painter, camera, idx)
        elif idx.size:
            self._paint_items(painter, camera, idx)
        painter.setTransform(camera_transform(camera))
        self._paint_selected(painter, camera)
        self._paint_draft(painter, camera)

    def _paint_raster(self, painter: QPainter, camera: Camera, idx: np.ndarray) -> None:
        """A crowd, drawn once into an image that is reused while the view stays put (tiles
        arriving repaint the canvas many times over an unchanged view)."""
        dpr = painter.device().devicePixelRatioF() if painter.device() is not None else 1.0
        key = (camera.cx, camera.cy, camera.scale, camera.width, camera.height, dpr, self._version,
               frozenset(self._hidden), id(self.selected))
        cached = self._raster
        if cached is None or cached[0] != key:
            image = QImage(max(1, round(camera.width * dpr)), max(1, round(camera.height * dpr)),
                           QImage.Format.Format_ARGB32_Premultiplied)
            image.setDevicePixelRatio(dpr)
            image.fill(Qt.GlobalColor.transparent)
            inner = QPainter(image)
            inner.setTransform(camera_transform(camera))
            self._paint_items(inner, camera, idx)
            inner.end()
            cached = self._raster = (key, image, self.last_painted)
        painter.resetTransform()
        painter.drawImage(QPointF(0.0, 0.0), cached[1])
        self.last_painted = cached[2]

    def _to_draw(self, camera: Camera) -> np.ndarray:
        """Indices of the shown annotations in the view, the selected one left out."""
        idx = self.visible_indices(camera.view_rect())
        if self._hidden and idx.size:
            hidden = [k for k, n in enumerate(self._class_names) if n in self._hidden]
            idx = idx[~np.isin(self._class[idx], hidden)]
        if self.selected is not None and idx.size:
            sel = [i for i in idx.tolist() if self._items[i] is self.selected]
            if sel:
                idx = idx[idx != sel[0]]
        return idx

    def _paint_items(self, painter: QPainter, camera: Camera, idx: np.ndarray) -> None:
        scale = camera.scale
        b = self._bounds[idx]
        size = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) * scale
        keep = size >= SKIP_PX
        idx, b, size = idx[keep], b[keep], size[keep]
        octave = min(0, math.floor(math.log2(scale))) if scale > 0 else 0
        # Fills are translucent, so aliased edges do not show and cost little; outlines are
        # thin cosmetic lines, which Qt antialiases quickly (wider ones go through a slow
        # stroker). A crowd of outlines is drawn aliased as well.
        smooth = idx.size <= SMOOTH_MAX
        # In a crowd (a whole slide of them), outlines a few pixels wide read as dots anyway.
        box_px = BOX_PX if idx.size <= CROWD else CROWD_BOX_PX
        rgb = self._rgb[idx]
        for c in np.unique(rgb).tolist():
            mine = rgb == c
            tiny = mine & (size < box_px)
            full = idx[mine & ~tiny]
            color = self._palette[c]
            if full.size:
                paths = self._paths(full, octave)
                painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
                painter.setPen(Qt.PenStyle.NoPen)
                painter.setBrush(QColor(*color, FILL_ALPHA))
                for path in paths:
                    painter.drawPath(path)
                pen = QPen(QColor(*color), 1.0)
                pen.setCosmetic(True)
                painter.setRenderHint(QPainter.RenderHint.Antialiasing, smooth)
                painter.setPen(pen)
                painter.setBrush(Qt.BrushStyle.NoBrush)
                for path in paths:
                    painter.drawPath(path)
            if tiny.any():  # a dot of colour: an outline would not show at this size
                painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
                painter.setPen(Qt.PenStyle.NoPen)
                painter.setBrush(QColor(*color, TINY_ALPHA))
                rects = self._rects()
                painter.drawRects([rects[i] for i in idx[tiny].tolist()])
            self.last_painted += int(mine.sum())

    def _paint_selected(self, painter: QPainter, camera: Camera) -> None:
        a = self.selected
        if a is None or not self.shown(a):
            return
        path = polygon_path(a.geometry, self.move_offset)
        rgb = annotation_color(a)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        halo = QPen(QColor(255, 255, 255), 4.0)
        halo.setCosmetic(True)
        painter.setPen(halo)
        painter.setBrush(QColor(*rgb, min(255, FILL_ALPHA + 40)))
        painter.drawPath(path)
        pen = QPen(QColor(*rgb), 2.0)
        pen.setCosmetic(True)
        painter.setPen(pen)
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawPath(path)
        # Handles at the vertices, in screen space so they keep their size at any zoom.
        coords = shapely.get_coordinates(shapely.get_exterior_ring(shapely.get_parts(a.geometry)))
        if len(coords) > MAX_HANDLES:
            return
        dx, dy = self.move_offset
        painter.resetTransform()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        painter.setPen(QPen(QColor(0, 0, 0), 1.0))
        painter.setBrush(QColor(255, 255, 255))
        h = HANDLE_PX
        rects = []
        for x, y in coords.tolist():
            sx, sy = camera.to_screen(x + dx, y + dy)
            if -h <= sx <= camera.width + h and -h <= sy <= camera.height + h:
                rects.append(QRectF(sx - h / 2, sy - h / 2, h, h))
        if rects:
            painter.drawRects(rects)

    def _paint_draft(self, painter: QPainter, camera: Camera) -> None:
        if self.draft is None:
            return
        painter.setTransform(camera_transform(camera))  # the handles were drawn in screen space
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        color = QColor(255, 255, 255) if self.draft_erase else QColor(self.draft_color)
        if self.draft_width > 0:  # a brush stroke: a wide round pen in level-0 px
            color.setAlpha(120)
            painter.setPen(QPen(color, self.draft_width, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap,
                                Qt.PenJoinStyle.RoundJoin))
            painter.setBrush(Qt.BrushStyle.NoBrush)
        else:  # a dark line under the dashes keeps a pale class colour visible on tissue
            under = QPen(QColor(0, 0, 0, 160), 3.0)
            under.setCosmetic(True)
            painter.setPen(under)
            fill = QColor(color)
            fill.setAlpha(FILL_ALPHA)
            painter.setBrush(fill)
            painter.drawPath(self.draft)
            pen = QPen(color, 2.0, Qt.PenStyle.DashLine)
            pen.setCosmetic(True)
            painter.setPen(pen)
            painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawPath(self.draft)
