"""The open slide's annotations as an editable document: every edit is an undo command.

Edits replace whole ``Annotation`` objects' geometries (shapely geometries are immutable), so
the overlay's path caches, keyed by geometry, stay correct. ``changed`` follows every edit,
undo and redo; ``dirty`` is whether the list differs from the last load or save.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from PySide6.QtCore import QObject, Signal, Slot
from PySide6.QtGui import QUndoCommand, QUndoStack

from engines.annotations import Annotation


class AnnotationDocument(QObject):
    changed = Signal()
    selection_changed = Signal(object)  # the selected Annotation, or None

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.items: list[Annotation] = []
        self.slide: str | None = None  # path of the slide they belong to
        self.source: Path | None = None  # the file they were read from, if any
        self.selected: Annotation | None = None
        self.undo = QUndoStack(self)
        self.undo.indexChanged.connect(self._index_changed)

    @Slot(int)
    def _index_changed(self, _index: int) -> None:
        self.changed.emit()

    # -- whole list ------------------------------------------------------------------------
    def reset(self, annotations: Iterable[Annotation], slide: str | None, source: Path | None = None) -> None:
        """A new slide's annotations: nothing to undo, nothing unsaved."""
        self.items = list(annotations)
        self.slide, self.source = slide, source
        self.undo.clear()
        self.undo.setClean()
        self.select(None)
        self.changed.emit()

    @property
    def dirty(self) -> bool:
        return not self.undo.isClean()

    def mark_saved(self) -> None:
        self.undo.setClean()

    def classes(self) -> list[str]:
        return list(dict.fromkeys(a.classification for a in self.items if a.classification))

    # -- selection -------------------------------------------------------------------------
    def select(self, annotation: Annotation | None) -> None:
        if annotation is not None and not any(a is annotation for a in self.items):
            annotation = None
        if annotation is not self.selected:
            self.selected = annotation
            self.selection_changed.emit(annotation)

    def _index(self, annotation: Annotation) -> int:
        for i, a in enumerate(self.items):
            if a is annotation:
                return i
        raise ValueError("annotation is not in this document")

    # -- edits (each one undoable) ---------------------------------------------------------
    def add(self, annotations: Annotation | list[Annotation], text: str = "Add annotation") -> None:
        batch = annotations if isinstance(annotations, list) else [annotations]
        self.undo.push(_Add(self, batch, text))

    def remove(self, annotation: Annotation, text: str = "Delete annotation") -> None:
        self.undo.push(_Remove(self, annotation, text))

    def replace_geometry(self, annotation: Annotation, geometry, text: str = "Edit annotation") -> None:
        self.undo.push(_Reshape(self, annotation, geometry, text))


class _Add(QUndoCommand):
    def __init__(self, doc: AnnotationDocument, batch: list[Annotation], text: str) -> None:
        super().__init__(text)
        self.doc, self.batch = doc, batch

    def redo(self) -> None:
        self.doc.items.extend(self.batch)
        self.doc.select(self.batch[-1] if len(self.batch) == 1 else None)

    def undo(self) -> None:
        ids = {id(a) for a in self.batch}
        self.doc.items = [a for a in self.doc.items if id(a) not in ids]
        self.doc.select(None)


class _Remove(QUndoCommand):
    def __init__(self, doc: AnnotationDocument, annotation: Annotation, text: str) -> None:
        super().__init__(text)
        self.doc, self.annotation = doc, annotation
        self.at = doc._index(annotation)

    def redo(self) -> None:
        self.doc.items.pop(self.doc._index(self.annotation))
        self.doc.select(None)

    def undo(self) -> None:
        self.doc.items.insert(min(self.at, len(self.doc.items)), self.annotation)
        self.doc.select(self.annotation)


class _Reshape(QUndoCommand):
    def __init__(self, doc: AnnotationDocument, annotation: Annotation, geometry, text: str) -> None:
        super().__init__(text)
        self.doc, self.annotation = doc, annotation
        self.before, self.after = annotation.geometry, geometry

    def redo(self) -> None:
        self.annotation.geometry = self.after
        self.doc.select(self.annotation)

    def undo(self) -> None:
        self.annotation.geometry = self.before
        self.doc.select(self.annotation)
