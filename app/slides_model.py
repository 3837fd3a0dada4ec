"""The Slides list's model: one row per project slide, columns for the slide and for each
shown model run, and the proxy that sorts and filters it.

Rows are read straight from the project and the results store on demand (nothing is copied
per row), so 2,000 slides cost only the thumbnails that have arrived. A result that arrives
updates its own cells only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
    QTimer,
)
from PySide6.QtGui import QBrush, QColor, QPixmap

SORT_ROLE = Qt.ItemDataRole.UserRole + 1  # a value of one type per column, for sorting
KEY_ROLE = Qt.ItemDataRole.UserRole + 2  # the slide's key in the project

RIGHT, WRONG = "✓", "✗"
MISSING_COLOUR = QColor(150, 150, 150)
RIGHT_COLOUR = QColor(30, 140, 60)
WRONG_COLOUR = QColor(200, 40, 40)
NO_VALUE = -1.0  # sorts below every probability and ratio
RESORT_DELAY_MS = 300

ResultLookup = Callable[[str, str], object]  # (run name, slide key) -> SlideResult | None
RunsLookup = Callable[[], list]  # -> the project's ProjectRuns


@dataclass(frozen=True)
class Column:
    kind: str  # thumb | name | label | split | predicted | prob | correct | ratio | dice
    run: str = ""  # the run's name, for the run columns

    def title(self, with_run: bool) -> str:
        base = {"thumb": "", "name": "Name", "label": "Label", "split": "Split",
                "predicted": "Predicted", "prob": "p", "correct": "✓/✗",
                "ratio": "Attention ratio", "dice": "Dice"}[self.kind]
        return f"{self.run}: {base}" if with_run and self.run else base


SLIDE_COLUMNS = (Column("thumb"), Column("name"), Column("label"), Column("split"))


def correct_of(result, label: str) -> bool | None:
    """Right or wrong by the slide's label; None when either is unknown or the run failed."""
    if result is None or getattr(result, "error", "") or not label or not getattr(result, "predicted", ""):
        return None
    return result.predicted == label


def prob_of(result) -> float | None:
    """Probability of the predicted class."""
    if result is None or getattr(result, "error", "") or not result.probs:
        return None
    try:
        return float(result.probs[result.classes.index(result.predicted)])
    except (ValueError, IndexError):
        return float(max(result.probs))


def ratio_of(result, name: str = "ratio") -> float | None:
    """The result's attention-in-annotation ``ratio`` (or ``dice``), when it has one."""
    value = getattr(result, name, None) if result is not None else None
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class SlidesModel(QAbstractTableModel):
    """Rows: ``project.slides``, in project order or sorted by a column (the model sorts
    itself: one key per row in Python, then one ``sorted``, instead of a comparison through
    Qt for every pair). ``lookup(run, key)`` gives a run's result, ``runs()`` the runs."""

    def __init__(self, lookup: ResultLookup, runs: RunsLookup, parent=None) -> None:
        super().__init__(parent)
        self.lookup = lookup
        self.runs = runs
        self.project = None
        self.slides: list = []
        self.columns: list[Column] = list(SLIDE_COLUMNS)
        self.runs_shown: list[str] = []
        self._row_of_key: dict[str, int] = {}
        self._rows_of_path: dict[str, list[int]] = {}
        self.missing: set[str] = set()  # keys of slides whose file is not there
        self.sort_column = -1  # -1: project order
        self.sort_order = Qt.SortOrder.AscendingOrder
        # Results arriving in the sorted column re-sort the rows, at most this often.
        self._resort = QTimer(self)
        self._resort.setSingleShot(True)
        self._resort.setInterval(RESORT_DELAY_MS)
        self._resort.timeout.connect(lambda: self.sort(self.sort_column, self.sort_order))
        self.thumbs: dict[str, QPixmap] = {}  # path -> thumbnail
        self.placeholder: QPixmap | None = None
        self.failed_thumbs: dict[str, str] = {}  # path -> why it could not be made
        self._ratio_runs: set[str] = set()  # shown runs with an attention ratio somewhere

    # -- content -------------------------------------------------------------------------
    def set_project(self, project) -> None:
        self.beginResetModel()
        self.project = project
        self.slides = list(project.slides) if project is not None else []
        self._index_rows()
        self.missing = set()
        self.thumbs = {}
        self.failed_thumbs = {}
        names = self.run_names()
        self.runs_shown = [r for r in self.runs_shown if r in names]
        self.columns = self._make_columns()
        self.endResetModel()
        self.sort(self.sort_column, self.sort_order)

    def _index_rows(self) -> None:
        self._row_of_key = {s.key: i for i, s in enumerate(self.slides)}
        self._rows_of_path = {}
        for i, s in enumerate(self.slides):
            self._rows_of_path.setdefault(str(s.path), []).append(i)

    def set_runs_shown(self, names: list[str]) -> None:
        self.runs_shown = list(names)
        self.refresh_columns(force=True)

    def refresh_columns(self, force: bool = False) -> None:
        """Rebuild the run columns when their set changed (a run added, a ratio arrived)."""
        columns = self._make_columns()
        if force or columns != self.columns:
            self.beginResetModel()
            self.columns = columns
            self.endResetModel()
            self.sort(self.sort_column, self.sort_order)

    def _make_columns(self, rescan: bool = True) -> list[Column]:
        if rescan:
            self._ratio_runs = {r for r in self.runs_shown if self._run_has_ratio(r)}
        cols = list(SLIDE_COLUMNS)
        for name in self.runs_shown:
            cols += [Column("predicted", name), Column("prob", name), Column("correct", name)]
            if name in self._ratio_runs:
                cols += [Column("ratio", name), Column("dice", name)]
        return cols

    def _run_has_ratio(self, name: str) -> bool:
        run = next((r for r in self.runs() if r.name == name), None) if self.project is not None else None
        if run is None:
            return False
        return any(ratio_of(r) is not None for r in run.results.values())

    def run_names(self) -> list[str]:
        return [r.name for r in self.runs()] if self.project is not None else []

    def row_of_key(self, key: str) -> int | None:
        return self._row_of_key.get(key)

    def rows_of_path(self, path: str) -> list[int]:
        return self._rows_of_path.get(path, [])

    def slide_at(self, row: int):
        return self.slides[row]

    def result(self, run: str, row: int):
        return self.lookup(run, self.slides[row].key)

    def set_missing(self, keys: set[str]) -> None:
        changed = keys ^ self.missing
        self.missing = set(keys)
        last = self.columnCount() - 1
        for key in changed:
            row = self.row_of_key(key)
            if row is not None:
                self.dataChanged.emit(self.index(row, 0), self.index(row, last))

    def set_thumbnail(self, path: str, pixmap: QPixmap | None, why: str = "") -> None:
        if pixmap is None:
            self.failed_thumbs[path] = why
        else:
            self.thumbs[path] = pixmap
        for row in self.rows_of_path(path):
            self.dataChanged.emit(self.index(row, 0), self.index(row, 0),
                                  [Qt.ItemDataRole.DecorationRole, Qt.ItemDataRole.ToolTipRole])

    def result_changed(self, run: str, key: str) -> None:
        """One slide's result for ``run`` arrived: its cells change, or new columns appear."""
        if run not in self.runs_shown:
            return
        row = self.row_of_key(key)
        if row is None:
            return
        if run not in self._ratio_runs and ratio_of(self.lookup(run, key)) is not None:
            self._ratio_runs.add(run)  # the first ratio of this run: its column appears
            self.beginResetModel()
            self.columns = self._make_columns(rescan=False)
            self.endResetModel()
            return
        cols = [i for i, c in enumerate(self.columns) if c.run == run]
        if cols:
            self.dataChanged.emit(self.index(row, cols[0]), self.index(row, cols[-1]))
        if 0 <= self.sort_column < len(self.columns) and self.columns[self.sort_column].run == run:
            self._resort.start()

    def sort(self, column: int, order=Qt.SortOrder.AscendingOrder) -> None:  # noqa: D102 - Qt override
        """Rows by ``column`` (stable; ties and -1 keep the project's order)."""
        self._resort.stop()
        column = column if 0 <= column < len(self.columns) else -1
        self.sort_column, self.sort_order = column, order
        if not self.slides:
            return
        self.layoutAboutToBeChanged.emit()
        persistent = self.persistentIndexList()
        held = [(self.slides[i.row()].key, i.column()) for i in persistent]
        slides = list(self.project.slides)
        if column >= 0:
            col = self.columns[column]
            values = {s.key: self._sort_value(s, self._row_of_key[s.key], col) for s in self.slides}
            slides.sort(key=lambda s: values[s.key], reverse=order == Qt.SortOrder.DescendingOrder)
        self.slides = slides
        self._index_rows()
        self.changePersistentIndexList(persistent, [self.index(self._row_of_key[k], c) for k, c in held])
        self.layoutChanged.emit()

    # -- Qt model ------------------------------------------------------------------------
    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.slides)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation != Qt.Orientation.Horizontal or not 0 <= section < len(self.columns):
            return None
        col = self.columns[section]
        if role == Qt.ItemDataRole.DisplayRole:
            return col.title(len(self.runs_shown) > 1)
        if role == Qt.ItemDataRole.ToolTipRole:
            tips = {"prob": "probability of the predicted class",
                    "correct": "prediction against the slide's label",
                    "ratio": "share of attention inside the annotation over its share of the "
                             "tissue (1 = chance)",
                    "dice": "overlap of the top-attention region (of the annotation's area) "
                            "with the annotation"}
            text = col.title(True)
            return f"{text}: {tips[col.kind]}" if col.kind in tips else text or "Thumbnail"
        return None

    def data(self, index: QModelIndex | QPersistentModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        row, col = index.row(), self.columns[index.column()]
        slide = self.slides[row]
        if role == Qt.ItemDataRole.DisplayRole:
            return self._text(slide, row, col)
        if role == SORT_ROLE:
            return self._sort_value(slide, row, col)
        if role == Qt.ItemDataRole.DecorationRole and col.kind == "thumb":
            path = str(slide.path)
            thumb = self.thumbs.get(path)
            if thumb is None and (path in self.failed_thumbs or slide.key in self.missing):
                return self.placeholder
            return thumb
        if role == Qt.ItemDataRole.ForegroundRole:
            return self._colour(slide, row, col)
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(slide, row, col)
        if role == KEY_ROLE:
            return slide.key
        if role == Qt.ItemDataRole.TextAlignmentRole and col.kind in ("prob", "ratio", "dice", "correct"):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter) if col.kind != "correct" \
                else int(Qt.AlignmentFlag.AlignCenter)
        return None

    def _text(self, slide, row: int, col: Column) -> str | None:
        kind = col.kind
        if kind == "name":
            return slide.name
        if kind == "label":
            return slide.label
        if kind == "split":
            return slide.split
        if kind == "thumb":
            return None
        result = self.result(col.run, row)
        if result is None:
            return ""
        if kind == "predicted":
            return "error" if result.error else result.predicted
        if kind == "prob":
            p = prob_of(result)
            return "" if p is None else f"{p:.3f}"
        if kind == "correct":
            ok = correct_of(result, slide.label)
            return "" if ok is None else (RIGHT if ok else WRONG)
        if kind in ("ratio", "dice"):
            r = ratio_of(result, kind)
            return "" if r is None else f"{r:.2f}"
        return None

    def _sort_value(self, slide, row: int, col: Column):
        kind = col.kind
        if kind in ("thumb", "name"):
            return slide.name.casefold()
        if kind == "label":
            return slide.label.casefold()
        if kind == "split":
            return slide.split
        result = self.result(col.run, row)
        if kind == "predicted":
            return "" if result is None else ("~error" if result.error else result.predicted.casefold())
        if kind == "prob":
            p = prob_of(result)
            return NO_VALUE if p is None else p
        if kind == "correct":
            ok = correct_of(result, slide.label)
            return NO_VALUE if ok is None else float(ok)
        r = ratio_of(result, kind)
        return NO_VALUE if r is None else r

    def _colour(self, slide, row: int, col: Column):
        if slide.key in self.missing:
            return QBrush(MISSING_COLOUR)
        if col.kind == "correct":
            ok = correct_of(self.result(col.run, row), slide.label)
            if ok is not None:
                return QBrush(RIGHT_COLOUR if ok else WRONG_COLOUR)
        return None

    def _tooltip(self, slide, row: int, col: Column) -> str | None:
        if slide.key in self.missing:
            return f"File not found: {slide.path}"
        if col.kind == "thumb" and str(slide.path) in self.failed_thumbs:
            return f"No thumbnail: {self.failed_thumbs[str(slide.path)]}"
        if col.kind in ("thumb", "name"):
            return str(slide.path)
        if col.run:
            result = self.result(col.run, row)
            if result is not None and result.error:
                return f"{col.run}: {result.error}"
        return None


@dataclass
class Filter:
    mode: str = "all"  # all | misclassified | label | split
    value: str = ""
    text: str = ""  # free text, matched without case
    keys: frozenset[str] | None = None  # only these slides (chosen in another view)


class SlidesProxy(QSortFilterProxyModel):
    """Keeps the rows that pass ``filter``, in the source model's order: sorting is passed on
    to ``SlidesModel.sort``. "Misclassified" means wrong in any of the shown runs."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.filter = Filter()
        self.setSortRole(SORT_ROLE)
        self.setDynamicSortFilter(True)

    def sort(self, column: int, order=Qt.SortOrder.AscendingOrder) -> None:  # noqa: D102 - Qt override
        self.sourceModel().sort(column, order)

    def set_filter(self, **changes) -> None:
        self.refilter(lambda: [setattr(self.filter, k, v) for k, v in changes.items()])

    def refilter(self, change=None) -> None:
        """Apply ``change()`` (what the filter depends on) and filter the rows again."""
        if hasattr(self, "beginFilterChange"):  # Qt 6.9+; invalidateFilter is deprecated there
            self.beginFilterChange()
            if change is not None:
                change()
            self.endFilterChange()
        else:
            if change is not None:
                change()
            self.invalidateFilter()

    def filterAcceptsRow(self, source_row: int, source_parent) -> bool:  # noqa: N802 - Qt override
        model: SlidesModel = self.sourceModel()
        f = self.filter
        slide = model.slide_at(source_row)
        if f.keys is not None and slide.key not in f.keys:
            return False
        if f.mode == "label" and slide.label != f.value:
            return False
        if f.mode == "split" and slide.split != f.value:
            return False
        if f.mode == "misclassified" and not any(
                correct_of(model.result(run, source_row), slide.label) is False for run in model.runs_shown):
            return False
        if f.text:
            words = [slide.name, slide.label, slide.split, slide.key]
            for run in model.runs_shown:
                r = model.result(run, source_row)
                if r is not None:
                    words.append("error" if r.error else r.predicted)
            return any(f.text in w.casefold() for w in words if w)
        return True
