"""Annotations in the window: the Annotations layer, drawing tools, import/export, and saving.

Tools follow QuPath's keys: V move/select (navigation; also Esc), R rectangle, P polygon
(click the vertices, double-click or Enter to close, Esc to cancel), B brush (Alt erases),
Delete, Ctrl+Z / Ctrl+Shift+Z. While a drawing tool is active a left drag draws instead of
panning; right- or middle-drag, or Space+drag, still pan.

A slide's annotations come from the open project's file for it, else from a ``<stem>.geojson``
beside the slide. With a project, edits are written (debounced, atomically) to
``<project folder>/annotations/<slide key>.geojson`` and the project saved; without one they
stay in memory and the user is asked before they would be lost.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import shapely
import shapely.affinity
from PySide6.QtCore import QEvent, QObject, QPointF, Qt, QTimer
from PySide6.QtGui import QAction, QActionGroup, QColor, QKeySequence, QMouseEvent, QPainterPath
from PySide6.QtWidgets import QComboBox, QFileDialog, QLabel, QMainWindow, QMenu, QMessageBox, QSpinBox, QToolBar

from app.annotation_doc import AnnotationDocument
from app.docks import Background
from engines.annotations import (Annotation, AnnotationError, AnnotationSet, default_color, load_annotations,
                                 write_geojson)
from viewer.overlays.annotations import AnnotationOverlay, annotation_color

MOVE, RECTANGLE, POLYGON, BRUSH = "move", "rectangle", "polygon", "brush"
TOOL_KEYS = {MOVE: "V", RECTANGLE: "R", POLYGON: "P", BRUSH: "B"}
TOOL_TEXT = {MOVE: "&Move / Select", RECTANGLE: "&Rectangle", POLYGON: "&Polygon", BRUSH: "&Brush"}
TOOL_HINT = {
    MOVE: "",
    RECTANGLE: "Rectangle: drag to draw. Right-drag or Space+drag pans; Esc ends.",
    POLYGON: "Polygon: click the corners, double-click or Enter to close; Esc cancels.",
    BRUSH: "Brush: drag to paint, Alt+drag to erase. Right-drag or Space+drag pans; Esc ends.",
}
DEFAULT_CLASSES = ("Tumor", "Stroma", "Other")
CLICK_SLOP_PX = 4  # a press and release closer than this is a click
MIN_SHAPE_PX = 3  # rectangles smaller than this on screen are taken for slips
HIT_PX = 4  # clicks this close to an outline still hit it
SAVE_DELAY_MS = 800  # edits are written to the project this long after the last one
ANNOTATION_FILTER = "Annotations (*.geojson *.json *.xml);;GeoJSON (*.geojson *.json);;ASAP XML (*.xml);;All files (*)"
PAN_BUTTONS = Qt.MouseButton.RightButton | Qt.MouseButton.MiddleButton


def polygonal(geometry) -> shapely.Polygon | shapely.MultiPolygon | None:
    """The area part of a shapely result (valid, polygons only); None when nothing is left."""
    if geometry is None or geometry.is_empty:
        return None
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    parts = [p for p in shapely.get_parts(geometry) if isinstance(p, shapely.Polygon) and p.area > 0]
    if not parts:
        parts = [q for p in shapely.get_parts(geometry) if isinstance(p, shapely.MultiPolygon)
                 for q in p.geoms if q.area > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


class AnnotationsController(QObject):
    """Owns the open slide's annotation document, its overlay, the tools and the files."""

    def __init__(self, window: QMainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.canvas = window.canvas
        self.doc = AnnotationDocument(self)
        self.overlay = AnnotationOverlay()
        self.tool = MOVE
        self.brush_px = 30  # brush diameter on screen
        self.jobs = Background(self, threads=1, name="annotations")
        # Save / Discard / Cancel for unsaved edits without a project; tests replace it.
        self.ask_unsaved: Callable[[], str] = self._ask_unsaved
        self.last_message = ""
        self._load_token = 0
        self._space = False
        self._pan_from: QPointF | None = None
        self._press: QPointF | None = None  # left press in the move tool (a click selects)
        self._move_from: tuple[float, float] | None = None  # level-0 start of a move drag
        self._rect_from: tuple[float, float] | None = None
        self._vertices: list[tuple[float, float]] = []
        self._stroke: list[tuple[float, float]] = []
        self._erase = False
        self._save_timer = QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(SAVE_DELAY_MS)
        self._save_timer.timeout.connect(lambda: self.save_to_project(wait=False))
        self._build_actions()
        self.doc.changed.connect(self._on_doc_changed)
        self.doc.selection_changed.connect(self._on_selection)
        window.slide_opened.connect(self._on_slide_opened)
        self.canvas.installEventFilter(self)
        window.installEventFilter(self)
        # Ask about unsaved edits before another slide replaces this one.
        self._open_slide = window.open_slide
        window.open_slide = self.open_slide_guarded

    # -- actions, menus and toolbar ------------------------------------------------------
    def _action(self, text: str, slot, shortcut=None, checkable: bool = False) -> QAction:
        action = QAction(text, self.window)
        if shortcut is not None:
            keys = shortcut if isinstance(shortcut, list) else [shortcut]
            action.setShortcuts([QKeySequence(k) for k in keys])
        action.setCheckable(checkable)
        action.triggered.connect(lambda _checked=False: slot())
        self.window.addAction(action)  # shortcuts work while menus and toolbar are hidden
        return action

    def _build_actions(self) -> None:
        w = self.window
        group = QActionGroup(self)
        group.setExclusive(True)
        self.tool_actions: dict[str, QAction] = {}
        for tool in (MOVE, RECTANGLE, POLYGON, BRUSH):
            a = self._action(TOOL_TEXT[tool], lambda t=tool: self.set_tool(t), TOOL_KEYS[tool], checkable=True)
            group.addAction(a)
            self.tool_actions[tool] = a
        self.tool_actions[MOVE].setChecked(True)
        self.delete_action = self._action("&Delete Annotation", self.delete_selected,
                                          [QKeySequence.StandardKey.Delete, "Backspace"])
        self.undo_action = self._action("&Undo", self.doc.undo.undo, "Ctrl+Z")
        self.redo_action = self._action("&Redo", self.doc.undo.redo, ["Ctrl+Shift+Z", "Ctrl+Y"])
        self.import_action = self._action("Import &Annotations…", self.import_dialog)
        self.export_action = self._action("Export Annotations as GeoJSON…", self.export_dialog)
        self.doc.undo.canUndoChanged.connect(self.undo_action.setEnabled)
        self.doc.undo.canRedoChanged.connect(self.redo_action.setEnabled)
        self.undo_action.setEnabled(False)
        self.redo_action.setEnabled(False)

        self.class_combo = QComboBox()
        self.class_combo.setEditable(True)  # a new class can be typed
        self.class_combo.setToolTip("Class of new annotations")
        self.class_combo.setMinimumContentsLength(10)
        self._fill_classes()
        self.brush_spin = QSpinBox()
        self.brush_spin.setRange(4, 400)
        self.brush_spin.setValue(self.brush_px)
        self.brush_spin.setSuffix(" px")
        self.brush_spin.setToolTip("Brush diameter on screen")
        self.brush_spin.valueChanged.connect(lambda v: setattr(self, "brush_px", int(v)))

        menu = QMenu("&Annotations", w)
        for tool in (MOVE, RECTANGLE, POLYGON, BRUSH):
            menu.addAction(self.tool_actions[tool])
        menu.addSeparator()
        for a in (self.delete_action, self.undo_action, self.redo_action):
            menu.addAction(a)
        menu.addSeparator()
        menu.addAction(self.import_action)
        menu.addAction(self.export_action)
        bar = w.menuBar()
        help_menu = next((a for a in bar.actions() if a.menu() is getattr(w, "help_menu", None)), None)
        bar.insertMenu(help_menu, menu) if help_menu is not None else bar.addMenu(menu)
        self.menu = menu
        self._add_to_file_menu()

        self.toolbar = QToolBar("Annotation tools", w)
        self.toolbar.setObjectName("annotation_toolbar")
        for tool in (MOVE, RECTANGLE, POLYGON, BRUSH):
            self.toolbar.addAction(self.tool_actions[tool])
        self.toolbar.addSeparator()
        self.toolbar.addWidget(QLabel(" Class "))
        self.toolbar.addWidget(self.class_combo)
        self.toolbar.addWidget(QLabel(" Brush "))
        self.toolbar.addWidget(self.brush_spin)
        self.toolbar.addSeparator()
        self.toolbar.addAction(self.delete_action)
        self.toolbar.addAction(self.undo_action)
        self.toolbar.addAction(self.redo_action)
        w.addToolBar(Qt.ToolBarArea.TopToolBarArea, self.toolbar)
        view_menu = getattr(w, "view_menu", None)
        if isinstance(view_menu, QMenu):
            view_menu.addAction(self.toolbar.toggleViewAction())
        self._update_enabled()

    def _add_to_file_menu(self) -> None:
        """Import and export sit in File, above its last separator (before Quit)."""
        bar = self.window.menuBar()
        file_menu = next((a.menu() for a in bar.actions() if a.menu() is not None
                          and a.menu().title().replace("&", "") == "File"), None)
        if file_menu is None:
            return
        separators = [a for a in file_menu.actions() if a.isSeparator()]
        before = separators[-1] if separators else None
        for a in (self.import_action, self.export_action):
            file_menu.insertAction(before, a)
        file_menu.insertSeparator(self.import_action)

    def _fill_classes(self) -> None:
        current = self.class_combo.currentText() or DEFAULT_CLASSES[0]
        names = list(dict.fromkeys(self.doc.classes() + list(DEFAULT_CLASSES)))
        seen: set[str] = set()
        unique = [n for n in names if not (n.casefold() in seen or seen.add(n.casefold()))]
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        for name in unique:
            self.class_combo.addItem(_swatch(self.class_color(name)), name)
        self.class_combo.blockSignals(False)
        self.set_class(current)

    def _update_enabled(self) -> None:
        has_slide = self.canvas.slide is not None
        for a in list(self.tool_actions.values()) + [self.import_action]:
            a.setEnabled(has_slide)
        self.export_action.setEnabled(has_slide and bool(self.doc.items))
        self.delete_action.setEnabled(self.doc.selected is not None)

    # -- tools -----------------------------------------------------------------------------
    @property
    def current_class(self) -> str:
        return self.class_combo.currentText().strip() or DEFAULT_CLASSES[0]

    def set_class(self, name: str) -> None:
        at = self.class_combo.findText(name, Qt.MatchFlag.MatchFixedString)  # case-insensitive
        if at >= 0:
            self.class_combo.setCurrentIndex(at)
        else:
            self.class_combo.setEditText(name)

    def class_color(self, name: str) -> tuple[int, int, int]:
        """The colour the class already has on this slide, else its default."""
        for a in self.doc.items:
            if a.classification and a.classification.casefold() == name.casefold():
                return annotation_color(a)
        return default_color(name)

    def set_tool(self, tool: str) -> None:
        if tool not in TOOL_KEYS:
            raise ValueError(f"unknown annotation tool {tool!r}")
        self._cancel_draft()
        self.tool = tool
        self.tool_actions[tool].setChecked(True)
        if tool == MOVE:
            self.canvas.unsetCursor()
        else:
            self.canvas.setCursor(Qt.CursorShape.CrossCursor)
            self._show_overlay(True)
            self.overlay.visible = True  # drawing on a hidden layer would draw blind
        self._status(TOOL_HINT[tool])

    def delete_selected(self) -> None:
        if self.doc.selected is not None:
            self.doc.remove(self.doc.selected)

    def _cancel_draft(self) -> None:
        self._rect_from = None
        self._press = None
        self._vertices = []
        self._stroke = []
        self._move_from = None
        self.overlay.draft = None
        self.overlay.draft_width = 0.0
        self.overlay.move_offset = (0.0, 0.0)
        self.overlay.changed.emit()

    # -- the document on the canvas --------------------------------------------------------
    def _show_overlay(self, wanted: bool) -> None:
        on = self.overlay in self.canvas.overlays()
        if wanted and not on:
            self.canvas.add_overlay(self.overlay)
        elif not wanted and on:
            self.canvas.remove_overlay(self.overlay)

    def _on_doc_changed(self) -> None:
        self.overlay.set_annotations(self.doc.items)
        self.overlay.set_selected(self.doc.selected)
        self._show_overlay(bool(self.doc.items) or self.tool != MOVE)
        self._fill_classes()
        self._update_enabled()
        if self.doc.dirty and self._project_slide() is not None:
            self._save_timer.start()

    def _on_selection(self, annotation) -> None:
        self.overlay.set_selected(annotation)
        self.delete_action.setEnabled(annotation is not None)
        if annotation is not None and annotation.classification:
            self.set_class(annotation.classification)

    # -- mouse and keys --------------------------------------------------------------------
    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        et = event.type()
        if obj is self.window:
            if et == QEvent.Type.Close and not self._may_close():
                event.ignore()
                return True
            return False
        if obj is not self.canvas:
            return False
        if et == QEvent.Type.ShortcutOverride and event.key() == Qt.Key.Key_Escape and self._drawing():
            event.accept()  # Esc ends the drawing here, before the window's Esc (cancel a run)
            return True
        if et in (QEvent.Type.KeyPress, QEvent.Type.KeyRelease):
            return self._key(event)
        if not isinstance(event, QMouseEvent) or self.canvas.slide is None:
            return False
        return self._mouse(event)

    def _key(self, event) -> bool:
        key = event.key()
        if key == Qt.Key.Key_Space and not event.isAutoRepeat():
            self._space = event.type() == QEvent.Type.KeyPress
            return self.tool != MOVE
        if event.type() != QEvent.Type.KeyPress:
            return False
        if key == Qt.Key.Key_Escape:
            if not self._drawing():
                return False
            if self._vertices or self._rect_from or self._stroke or self._move_from:
                self._cancel_draft()
            elif self.tool != MOVE:
                self.set_tool(MOVE)
            else:
                self.doc.select(None)
            return True
        if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and self.tool == POLYGON and self._vertices:
            self._finish_polygon()
            return True
        return False

    def _drawing(self) -> bool:
        """Whether Esc has something here to end: a draft, a drawing tool or a selection."""
        return bool(self._vertices or self._rect_from or self._stroke or self._move_from
                    or self.tool != MOVE or self.doc.selected is not None)

    def _level0(self, pos: QPointF) -> tuple[float, float]:
        return self.canvas.camera.to_level0(pos.x(), pos.y())

    def _mouse(self, event: QMouseEvent) -> bool:
        et, pos = event.type(), event.position()
        # Right or middle drag pans while a drawing tool holds the left button.
        if self.tool != MOVE:
            if et == QEvent.Type.MouseButtonPress and event.button() & PAN_BUTTONS:
                self._pan_from = pos
                return True
            if et == QEvent.Type.MouseMove and self._pan_from is not None and event.buttons() & PAN_BUTTONS:
                delta = pos - self._pan_from
                self._pan_from = pos
                self.canvas.pan_by(delta.x(), delta.y())
                return True
            if et == QEvent.Type.MouseButtonRelease and event.button() & PAN_BUTTONS:
                self._pan_from = None
                return True
        left = event.button() == Qt.MouseButton.LeftButton
        passes = self._space or bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier)
        if self.tool == MOVE:
            return self._mouse_move_tool(event, et, pos, left)
        if passes and not (self._rect_from or self._stroke):
            return False  # Space+drag pans; Shift+drag marks a region for the models
        if et == QEvent.Type.MouseButtonDblClick:
            if self.tool == POLYGON and left:
                self._add_vertex(pos)
                self._finish_polygon()
            return True  # never the canvas's fit-on-double-click while drawing
        if self.tool == RECTANGLE:
            return self._mouse_rectangle(event, et, pos, left)
        if self.tool == POLYGON:
            return self._mouse_polygon(event, et, pos, left)
        return self._mouse_brush(event, et, pos, left)

    def _mouse_move_tool(self, event, et, pos, left) -> bool:
        if et == QEvent.Type.MouseButtonPress and left:
            self._press = pos
            sel = self.doc.selected
            if sel is not None and self.overlay.visible and self.overlay.shown(sel) and not self._space:
                x, y = self._level0(pos)
                tol = HIT_PX / self.canvas.camera.scale
                if sel.geometry.intersects(shapely.Point(x, y).buffer(tol, quad_segs=2)):
                    self._move_from = (x, y)
                    return True
            return False
        if et == QEvent.Type.MouseMove and self._move_from is not None:
            x, y = self._level0(pos)
            self.overlay.move_offset = (x - self._move_from[0], y - self._move_from[1])
            self.overlay.changed.emit()
            return True
        if et == QEvent.Type.MouseButtonRelease and left:
            press, self._press = self._press, None
            if self._move_from is not None:
                x, y = self._level0(pos)
                dx, dy = x - self._move_from[0], y - self._move_from[1]
                self._move_from = None
                self.overlay.move_offset = (0.0, 0.0)
                sel = self.doc.selected
                moved = press is not None and (pos - press).manhattanLength() > 0
                if sel is not None and moved and (dx or dy):
                    self.doc.replace_geometry(sel, shapely.affinity.translate(sel.geometry, dx, dy),
                                              "Move annotation")
                else:
                    self.overlay.changed.emit()
                return True
            if press is not None and (pos - press).manhattanLength() <= CLICK_SLOP_PX:
                self._click_select(pos)
        return False

    def _click_select(self, pos: QPointF) -> None:
        if not self.overlay.visible or self.overlay not in self.canvas.overlays():
            return
        x, y = self._level0(pos)
        self.doc.select(self.overlay.annotation_at(x, y, HIT_PX / self.canvas.camera.scale))

    def _mouse_rectangle(self, event, et, pos, left) -> bool:
        if et == QEvent.Type.MouseButtonPress and left:
            self._rect_from = self._level0(pos)
        elif et == QEvent.Type.MouseMove and self._rect_from is not None:
            self._set_draft(self._rect_geometry(pos))
        elif et == QEvent.Type.MouseButtonRelease and left and self._rect_from is not None:
            geom = self._rect_geometry(pos)
            self._cancel_draft()
            x0, y0, x1, y1 = geom.bounds if geom is not None else (0, 0, 0, 0)
            s = self.canvas.camera.scale
            if geom is not None and min(x1 - x0, y1 - y0) * s >= MIN_SHAPE_PX:
                self._add(geom, "Draw rectangle")
        return True

    def _rect_geometry(self, pos: QPointF):
        (ax, ay), (bx, by) = self._rect_from, self._level0(pos)
        return self._clip(shapely.box(min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))

    def _mouse_polygon(self, event, et, pos, left) -> bool:
        if et == QEvent.Type.MouseButtonPress and left:
            self._press = pos
        elif et == QEvent.Type.MouseButtonRelease and left and self._press is not None:
            self._press = None
            self._add_vertex(pos)
        elif et == QEvent.Type.MouseMove and self._vertices:
            self._draft_polygon(pos)
        return True

    def _add_vertex(self, pos: QPointF) -> None:
        if self._vertices:
            sx, sy = self.canvas.camera.to_screen(*self._vertices[-1])
            if abs(sx - pos.x()) + abs(sy - pos.y()) <= 1:
                return  # the second click of a double-click: no repeated corner
        self._vertices.append(self._level0(pos))
        self._draft_polygon(pos)

    def _draft_polygon(self, pos: QPointF | None) -> None:
        path = QPainterPath()
        pts = list(self._vertices) + ([self._level0(pos)] if pos is not None else [])
        path.moveTo(*pts[0])
        for x, y in pts[1:]:
            path.lineTo(x, y)
        self.overlay.draft = path
        self.overlay.draft_width = 0.0
        self.overlay.draft_color = QColor(*self.class_color(self.current_class))
        self.overlay.changed.emit()

    def _finish_polygon(self) -> None:
        pts = list(dict.fromkeys(self._vertices))
        self._cancel_draft()
        if len(pts) < 3:
            self._status("A polygon needs at least three corners.")
            return
        geom = self._clip(polygonal(shapely.Polygon(pts)))
        if geom is not None:
            self._add(geom, "Draw polygon")

    def _mouse_brush(self, event, et, pos, left) -> bool:
        if et == QEvent.Type.MouseButtonPress and left:
            self._erase = bool(event.modifiers() & Qt.KeyboardModifier.AltModifier)
            self._stroke = [self._level0(pos)]
            self._draft_stroke()
        elif et == QEvent.Type.MouseMove and self._stroke and event.buttons() & Qt.MouseButton.LeftButton:
            self._stroke.append(self._level0(pos))
            self._draft_stroke()
        elif et == QEvent.Type.MouseButtonRelease and left and self._stroke:
            self._stroke.append(self._level0(pos))
            stroke, erase = self._stroke, self._erase
            self._cancel_draft()
            self._apply_stroke(stroke, erase)
        return True

    def _brush_radius(self) -> float:
        return self.brush_px / 2.0 / self.canvas.camera.scale

    def _draft_stroke(self) -> None:
        path = QPainterPath()
        path.moveTo(*self._stroke[0])
        for x, y in self._stroke[1:] or self._stroke[:1]:
            path.lineTo(x, y)
        self.overlay.draft = path
        self.overlay.draft_width = 2 * self._brush_radius()
        self.overlay.draft_erase = self._erase
        self.overlay.draft_color = QColor(*self.class_color(self.current_class))
        self.overlay.changed.emit()

    def _apply_stroke(self, points: list[tuple[float, float]], erase: bool) -> None:
        pts = list(dict.fromkeys(points))
        line = shapely.Point(pts[0]) if len(pts) == 1 else shapely.LineString(pts)
        stroke = self._clip(polygonal(line.buffer(self._brush_radius(), quad_segs=8)))
        if stroke is None:
            return
        sel = self.doc.selected
        if erase:
            target = sel if sel is not None and sel.geometry.intersects(stroke) else \
                self.overlay.annotation_at(*pts[0])
            if target is None or not target.geometry.intersects(stroke):
                return
            left = polygonal(target.geometry.difference(stroke))
            if left is None:
                self.doc.remove(target, "Erase annotation")
            else:
                self.doc.replace_geometry(target, left, "Erase")
            return
        same = sel is not None and (sel.classification or "").casefold() == self.current_class.casefold()
        if same and sel.geometry.intersects(stroke):
            merged = polygonal(shapely.union(sel.geometry, stroke))
            if merged is not None:
                self.doc.replace_geometry(sel, merged, "Brush")
            return
        self._add(stroke, "Brush")

    def _set_draft(self, geometry) -> None:
        from viewer.overlays.annotations import polygon_path

        self.overlay.draft = polygon_path(geometry) if geometry is not None else None
        self.overlay.draft_width = 0.0
        self.overlay.draft_color = QColor(*self.class_color(self.current_class))
        self.overlay.changed.emit()

    def _clip(self, geometry):
        """Keep shapes on the slide."""
        s = self.canvas.slide
        if geometry is None or s is None:
            return geometry
        return polygonal(shapely.intersection(geometry, shapely.box(0, 0, s.width, s.height)))

    def _add(self, geometry, text: str) -> None:
        name = self.current_class
        self.overlay.set_class_visible(name, True)
        self.doc.add(Annotation(geometry, name, self.class_color(name)), text)

    # -- slides and files ------------------------------------------------------------------
    def _project(self):
        results = getattr(self.window, "results", None)
        return getattr(results, "project", None)

    def _project_slide(self, slide: str | None = None):
        """The open project's entry for ``slide`` (the document's by default), or None."""
        project, slide = self._project(), slide or self.doc.slide
        if project is None or slide is None:
            return None
        try:
            key = project.key_of(slide)
            return project.slide(key) if key is not None else None
        except (KeyError, ValueError, OSError):
            return None

    def annotation_file(self, slide_path: str) -> Path | None:
        """Where a slide's annotations are read from: the project's file, else a GeoJSON
        named after the slide beside it."""
        entry = self._project_slide(slide_path)
        saved = getattr(entry, "annotations", None)
        if saved is not None and Path(saved).is_file():
            return Path(saved)
        slide = Path(slide_path)
        for base in dict.fromkeys((slide.stem, slide.name)):
            beside = slide.with_name(f"{base}.geojson")
            if beside.is_file():
                return beside
        return None

    def reload(self) -> None:
        """Read the open slide's annotations again: the project's files for it changed (a
        project opened after the slide, a whole folder imported). Unsaved edits are asked about."""
        path = self.doc.slide
        if path is None or (self.doc.dirty and not self._may_leave()):
            return
        self.doc.slide = None  # so the slide counts as newly opened
        self._on_slide_opened(path)

    def open_slide_guarded(self, path: str | os.PathLike) -> None:
        """The window's ``open_slide``, after unsaved edits are saved, dropped or kept."""
        if str(path) != self.doc.slide and not self._may_leave():
            return
        self._open_slide(path)

    def _on_slide_opened(self, path: str) -> None:
        self._cancel_draft()
        if path == self.doc.slide:
            self._update_enabled()
            return
        if self.doc.dirty and self._project_slide() is not None:
            self.save_to_project()  # opened some other way than open_slide: still keep the edits
        self._load_token += 1
        token = self._load_token
        self.doc.reset([], path)
        source = self.annotation_file(path)
        if source is not None:
            self.jobs.submit(lambda: load_annotations(source),
                             lambda result: self._loaded(token, path, source, result),
                             lambda exc: self._load_failed(token, source, exc))

    def _loaded(self, token: int, path: str, source: Path, result: AnnotationSet) -> None:
        if token != self._load_token or path != self.doc.slide:
            return  # another slide is open now
        if self.doc.items:  # drawn while reading: keep both, the file's underneath
            self.doc.items[:0] = list(result)
            self.doc.changed.emit()
        else:
            self.doc.reset(list(result), path, source)
        self._status(f"{len(result)} annotations from {source.name}")

    def _load_failed(self, token: int, source: Path, exc: BaseException) -> None:
        if token == self._load_token:
            self._status(_one_line(exc, source))

    def import_file(self, path: str | os.PathLike) -> None:
        """Add the annotations of a GeoJSON or ASAP XML file to the slide (one undo step)."""
        slide, source = self.doc.slide, Path(path)
        self.jobs.submit(lambda: load_annotations(source),
                         lambda result: self._imported(slide, source, result),
                         lambda exc: self._import_failed(source, exc))

    def _imported(self, slide: str | None, source: Path, result: AnnotationSet) -> None:
        if slide != self.doc.slide:
            return
        items = list(result)
        if items:
            self.doc.add(items, f"Import {source.name}")
        skipped = f" ({result.skipped} without area left out)" if result.skipped else ""
        self._status(f"Imported {len(items)} annotations from {source.name}{skipped}")

    def _import_failed(self, source: Path, exc: BaseException) -> None:
        message = _one_line(exc, source)
        self._status(message)
        if self.window.isVisible():
            QMessageBox.warning(self.window, "Cannot import annotations", message)

    def import_dialog(self) -> None:
        if self.canvas.slide is None:
            return
        start = str(self.canvas.slide.path.parent)
        path, _ = QFileDialog.getOpenFileName(self.window, "Import annotations", start, ANNOTATION_FILTER)
        if path:
            self.import_file(path)

    def export_geojson(self, path: str | os.PathLike) -> Path:
        """Write the slide's annotations as a GeoJSON FeatureCollection QuPath opens."""
        target = Path(path)
        write_geojson(target, self.doc.items)
        self._status(f"Wrote {len(self.doc.items)} annotations to {target.name}")
        return target

    def export_dialog(self) -> bool:
        """Ask where to export; True when written."""
        if self.doc.slide is None:
            return False
        slide = Path(self.doc.slide)
        start = str(slide.with_name(f"{slide.stem}.geojson"))
        path, _ = QFileDialog.getSaveFileName(self.window, "Export annotations as GeoJSON", start,
                                              "GeoJSON (*.geojson);;All files (*)")
        if not path:
            return False
        try:
            self.export_geojson(path)
        except (AnnotationError, OSError) as exc:
            QMessageBox.critical(self.window, "Cannot export annotations", _one_line(exc, Path(path)))
            return False
        if self._project_slide() is None:
            self.doc.mark_saved()
        return True

    # -- saving ----------------------------------------------------------------------------
    def project_path(self) -> Path:
        """The project's file: where it was saved, else where it will be saved by default."""
        project = self._project()
        if getattr(project, "path", None) is not None:
            return Path(project.path)
        from engines.project import default_project_file

        return Path(default_project_file(project.source))

    def project_file_for(self, key: str) -> Path:
        """``<project folder>/annotations/<key>.geojson``."""
        return self.project_path().parent / "annotations" / f"{key}.geojson"

    def save_to_project(self, wait: bool = True) -> bool:
        """Write the slide's annotations into the project; False when the slide has no
        project entry or writing failed (the message goes to the status bar). ``wait=False``
        (the debounced save) writes on a worker and updates the project when it is done."""
        self._save_timer.stop()
        entry = self._project_slide()
        if entry is None or not self.doc.dirty:
            return entry is not None
        index, slide = self.doc.undo.index(), self.doc.slide
        try:
            target = self.project_file_for(entry.key)
        except (OSError, ValueError) as exc:
            self._status(f"Annotations not saved: {_one_line(exc, None)}")
            return False
        # A copy: edits on the GUI thread replace geometries while the worker writes.
        snapshot = [Annotation(a.geometry, a.classification, a.color, a.name, dict(a.properties))
                    for a in self.doc.items]

        def write() -> Path:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_geojson(target, snapshot)
            return target

        def done(_target: Path) -> bool:
            try:
                entry.annotations = target
                self._project().save(self.project_path())
            except (OSError, ValueError) as exc:
                return failed(exc)
            if self.doc.slide == slide and self.doc.undo.index() == index:
                self.doc.mark_saved()
            self._status(f"Annotations saved to {target.name}")
            return True

        def failed(exc: BaseException) -> bool:
            self._status(f"Annotations not saved: {_one_line(exc, None)}")
            return False

        if not wait:
            return self.jobs.submit(write, done, failed)
        try:
            write()
        except (AnnotationError, OSError) as exc:
            return failed(exc)
        return done(target)

    def _may_leave(self) -> bool:
        """Whether the slide's annotations may be left: saved, or the user said so."""
        if not self.doc.dirty:
            return True
        if self._project_slide() is not None:
            return self.save_to_project() or self.ask_unsaved() != "cancel"
        answer = self.ask_unsaved()
        if answer == "save":
            return self.export_dialog()
        return answer == "discard"

    def _may_close(self) -> bool:
        if not self._may_leave():
            return False
        self.doc.mark_saved()  # asked once: a second close event must not ask again
        self.jobs.shutdown(2000)
        return True

    def _ask_unsaved(self) -> str:
        name = Path(self.doc.slide).name if self.doc.slide else "this slide"
        buttons = (QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard
                   | QMessageBox.StandardButton.Cancel)
        answer = QMessageBox.question(self.window, "Unsaved annotations",
                                      f"The annotations of {name} have unsaved changes.", buttons,
                                      QMessageBox.StandardButton.Save)
        return {QMessageBox.StandardButton.Save: "save",
                QMessageBox.StandardButton.Discard: "discard"}.get(answer, "cancel")

    def _status(self, text: str) -> None:
        self.last_message = text
        bar = self.window.statusBar()
        if text:
            bar.showMessage(text, 8000)


def _swatch(rgb: tuple[int, int, int]):
    from PySide6.QtGui import QIcon, QPixmap

    pix = QPixmap(12, 12)
    pix.fill(QColor(*rgb))
    return QIcon(pix)


def _one_line(exc: BaseException, source: Path | None) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (AnnotationError, ValueError)) or source is None:
        return text
    return f"{source.name}: {text}"


def install_annotations(window: QMainWindow) -> AnnotationsController:
    """Add the Annotations layer, tools, menu and file actions to ``window``."""
    controller = AnnotationsController(window)
    window.annotations = controller
    return controller
