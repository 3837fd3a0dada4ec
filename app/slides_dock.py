"""The Slides dock: the open project's slides with thumbnails, labels and each run's verdict;
sorting, filtering, and stepping through the list on the canvas.

Model/view throughout (``app.slides_model``), so 2,000 rows cost no widgets. Thumbnails are
asked for the visible rows only, newest first (``viewer.thumbnails``); whether each slide's
file exists is checked on a worker too.
"""
from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QItemSelectionModel, QModelIndex, QObject, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QImage, QKeyEvent, QPainter, QPen, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QTableView,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.docks import Background
from app.slides_model import SlidesModel, SlidesProxy
from viewer.thumbnails import THUMB_SIZE, ThumbnailLoader

ALL_RUNS = "All runs"
THUMB_MARGIN = 4
VISIBLE_EXTRA_ROWS = 4  # thumbnails asked for just beyond the view, for a smooth scroll
REQUEST_DELAY_MS = 40  # thumbnails are asked for once scrolling pauses this long
COLUMN_WIDTHS = {"thumb": THUMB_SIZE + 2 * THUMB_MARGIN, "name": 140, "label": 64, "split": 48,
                 "predicted": 76, "prob": 50, "correct": 44, "ratio": 64, "dice": 50}


def placeholder_pixmap(size: int = THUMB_SIZE) -> QPixmap:
    """Grey square with a cross: a slide whose thumbnail cannot be made."""
    pix = QPixmap(size, size)
    pix.fill(QColor(225, 225, 225))
    p = QPainter(pix)
    p.setPen(QPen(QColor(160, 160, 160), 2))
    m = size // 4
    p.drawLine(m, m, size - m, size - m)
    p.drawLine(size - m, m, m, size - m)
    p.end()
    return pix


def project_folder(project) -> Path | None:
    """Where the project's thumbnail cache goes: beside its file, or its source."""
    if project is None:
        return None
    if project.path is not None:
        return Path(project.path).parent
    source = Path(project.source)
    return source if source.is_dir() else source.parent


class SlidesTable(QTableView):
    """Enter opens the current row, as a click does."""

    row_activated = Signal(QModelIndex)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and self.currentIndex().isValid():
            self.row_activated.emit(self.currentIndex())
            return
        super().keyPressEvent(event)


class SlidesPanel(QWidget):
    """The dock's widget. ``lookup(run, key)`` gives a result and ``runs()`` the runs (the
    results store's); ``open_requested(path)`` asks the window to open a slide."""

    open_requested = Signal(str)
    filter_changed = Signal()

    def __init__(self, lookup, runs, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.project = None
        self.model = SlidesModel(lookup, runs, self)
        self.model.placeholder = placeholder_pixmap()
        self.proxy = SlidesProxy(self)
        self.proxy.setSourceModel(self.model)
        self.thumbnails = ThumbnailLoader(self)
        self.thumbnails.ready.connect(self._on_thumbnail)
        self.thumbnails.failed.connect(lambda path, why: self.model.set_thumbnail(path, None, why))
        self._files = Background(self, threads=1, name="slide-files")
        self._files_token = 0

        self.run_combo = QComboBox()
        self.run_combo.setToolTip("Which run's columns to show")
        self.run_combo.currentIndexChanged.connect(self._on_run_chosen)
        self.filter_combo = QComboBox()
        self.filter_combo.setToolTip("Show only these slides")
        self.filter_combo.currentIndexChanged.connect(self._on_filter_chosen)
        self.text_edit = QLineEdit()
        self.text_edit.setPlaceholderText("Filter slides…")
        self.text_edit.setClearButtonEnabled(True)
        self.text_edit.textChanged.connect(
            lambda text: self._set_filter(text=text.strip().casefold()))
        self.chip = QToolButton()
        self.chip.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        self.chip.setToolTip("Show every slide again")
        self.chip.clicked.connect(self.clear_filter_keys)
        self.chip.hide()
        self.count_label = QLabel("")

        self.table = SlidesTable()
        self.table.setModel(self.proxy)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        self.table.setIconSize(QSize(THUMB_SIZE, THUMB_SIZE))
        vheader = self.table.verticalHeader()
        vheader.setVisible(False)
        vheader.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)  # no per-row size hints
        vheader.setDefaultSectionSize(THUMB_SIZE + THUMB_MARGIN)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        header.setSortIndicator(-1, Qt.SortOrder.AscendingOrder)  # project order until asked
        self.table.setSortingEnabled(True)
        self.table.clicked.connect(self._open_index)
        self.table.row_activated.connect(self._open_index)

        self._request_timer = QTimer(self)
        self._request_timer.setSingleShot(True)
        self._request_timer.setInterval(REQUEST_DELAY_MS)
        self._request_timer.timeout.connect(self.request_visible_thumbnails)
        self.table.verticalScrollBar().valueChanged.connect(self._schedule_thumbnails)
        for sig in (self.proxy.modelReset, self.proxy.layoutChanged, self.proxy.rowsInserted,
                    self.proxy.rowsRemoved):
            sig.connect(self._schedule_thumbnails)
            sig.connect(self._update_count)
        self.model.modelReset.connect(self._size_columns)

        bar = QHBoxLayout()
        bar.setContentsMargins(0, 0, 0, 0)
        bar.addWidget(self.run_combo)
        bar.addWidget(self.filter_combo)
        bar.addWidget(self.text_edit, 1)
        chips = QHBoxLayout()
        chips.setContentsMargins(0, 0, 0, 0)
        chips.addWidget(self.chip)
        chips.addStretch(1)
        chips.addWidget(self.count_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(bar)
        layout.addLayout(chips)
        layout.addWidget(self.table, 1)
        self._update_controls()

    # -- the project ---------------------------------------------------------------------
    def set_project(self, project) -> None:
        self.project = project
        self.thumbnails.reset(project_folder(project))
        self.proxy.filter.keys = None
        self.chip.hide()
        self.model.runs_shown = []
        self.model.set_project(project)
        self._rebuild_runs(select_newest=True)
        self._rebuild_filters()
        self._check_files()
        self._update_count()

    def run_added(self, _name: str) -> None:
        self._rebuild_runs(select_newest=True)

    def result_changed(self, run: str, key: str) -> None:
        self.model.result_changed(run, key)

    def _check_files(self) -> None:
        """Which slides' files are missing, found on a worker (a slow share never blocks)."""
        self._files_token += 1
        token = self._files_token
        paths = [str(s.path) for s in self.model.slides]
        keys = [s.key for s in self.model.slides]

        def work() -> set[str]:
            return {k for k, p in zip(keys, paths) if not os.path.isfile(p)}

        def done(missing: set[str]) -> None:
            if token == self._files_token:
                self.model.set_missing(missing)
                self._schedule_thumbnails()

        self._files.submit(work, done, lambda _exc: None)

    # -- runs and filters ----------------------------------------------------------------
    def _run_names(self) -> list[str]:
        return self.model.run_names()

    def _rebuild_runs(self, select_newest: bool) -> None:
        names = self._run_names()
        current = self.run_combo.currentText()
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        if len(names) > 1:
            self.run_combo.addItem(ALL_RUNS)
        self.run_combo.addItems(names)
        if names:
            keep = current if current in names or (current == ALL_RUNS and len(names) > 1) else None
            self.run_combo.setCurrentText(names[-1] if select_newest or keep is None else keep)
        self.run_combo.blockSignals(False)
        self._on_run_chosen()

    def _on_run_chosen(self, *_args) -> None:
        names = self._run_names()
        chosen = self.run_combo.currentText()
        shown = names if chosen == ALL_RUNS else [n for n in names if n == chosen]
        if shown != self.model.runs_shown:
            self.model.set_runs_shown(shown)
            self.proxy.refilter()
        self._update_controls()

    def choose_run(self, name: str) -> None:
        """Show ``name``'s columns (or ``ALL_RUNS``)."""
        self.run_combo.setCurrentText(name)

    def _rebuild_filters(self) -> None:
        self.filter_combo.blockSignals(True)
        self.filter_combo.clear()
        self.filter_combo.addItem("All slides", ("all", ""))
        self.filter_combo.addItem("Misclassified", ("misclassified", ""))
        if self.project is not None:
            for label in sorted({s.label for s in self.project.slides if s.label}):
                self.filter_combo.addItem(f"Label: {label}", ("label", label))
            for split in sorted({s.split for s in self.project.slides if s.split}):
                self.filter_combo.addItem(f"Split: {split}", ("split", split))
        self.filter_combo.blockSignals(False)
        self._on_filter_chosen()

    def _on_filter_chosen(self, *_args) -> None:
        mode, value = self.filter_combo.currentData() or ("all", "")
        self._set_filter(mode=mode, value=value)

    def set_filter_mode(self, mode: str, value: str = "") -> bool:
        """Choose a filter of the combo (``all``, ``misclassified``, ``label``, ``split``);
        False when the project has no such entry."""
        for i in range(self.filter_combo.count()):
            if self.filter_combo.itemData(i) == (mode, value):
                self.filter_combo.setCurrentIndex(i)
                return True
        return False

    def set_filter_text(self, text: str) -> None:
        self.text_edit.setText(text)

    def set_filter_keys(self, keys: list[str], description: str) -> None:
        """Show only these slides (chosen in another view), with a chip that clears it."""
        self.chip.setText(f"filtered: {description}  ✕")
        self.chip.show()
        self._set_filter(keys=frozenset(keys))

    def clear_filter_keys(self) -> None:
        self.chip.hide()
        self._set_filter(keys=None)

    def _set_filter(self, **changes) -> None:
        self.proxy.set_filter(**changes)
        self._update_count()
        self._schedule_thumbnails()
        self.filter_changed.emit()

    def _update_controls(self) -> None:
        self.run_combo.setVisible(self.run_combo.count() > 1)

    def _update_count(self, *_args) -> None:
        total, shown = self.model.rowCount(), self.proxy.rowCount()
        if self.project is None:
            self.count_label.setText("No project open")
        elif shown == total:
            self.count_label.setText(f"{total:,} slides")
        else:
            self.count_label.setText(f"{shown:,} of {total:,} slides")

    def _size_columns(self) -> None:
        for i, col in enumerate(self.model.columns):
            self.table.setColumnWidth(i, COLUMN_WIDTHS.get(col.kind, 80))

    # -- order, opening and the current slide --------------------------------------------
    def visible_keys(self) -> list[str]:
        """Slide keys in the list's current sorted and filtered order."""
        m = self.proxy
        return [self.model.slide_at(m.mapToSource(m.index(r, 0)).row()).key for r in range(m.rowCount())]

    def proxy_row_of_key(self, key: str | None) -> int | None:
        row = self.model.row_of_key(key) if key is not None else None
        if row is None:
            return None
        index = self.proxy.mapFromSource(self.model.index(row, 0))
        return index.row() if index.isValid() else None

    def key_at(self, proxy_row: int) -> str | None:
        if not 0 <= proxy_row < self.proxy.rowCount():
            return None
        return self.model.slide_at(self.proxy.mapToSource(self.proxy.index(proxy_row, 0)).row()).key

    def path_of_key(self, key: str) -> str:
        row = self.model.row_of_key(key)
        return str(self.model.slide_at(row).path)

    def neighbour(self, key: str | None, step: int) -> str | None:
        """The key ``step`` rows from ``key`` in the shown order; the first (last) row when
        ``key`` is not shown; None past either end."""
        n = self.proxy.rowCount()
        if n == 0:
            return None
        row = self.proxy_row_of_key(key)
        target = (0 if step > 0 else n - 1) if row is None else row + step
        return self.key_at(target)

    def select_key(self, key: str | None) -> None:
        """Select (without opening) the row of ``key``; nothing when it is not shown."""
        row = self.proxy_row_of_key(key)
        sel = self.table.selectionModel()
        if row is None:
            sel.clearSelection()
            return
        index = self.proxy.index(row, 0)
        sel.setCurrentIndex(index, QItemSelectionModel.SelectionFlag.ClearAndSelect
                            | QItemSelectionModel.SelectionFlag.Rows)
        self.table.scrollTo(index, QAbstractItemView.ScrollHint.EnsureVisible)

    def _open_index(self, index: QModelIndex) -> None:
        if index.isValid():
            source = self.proxy.mapToSource(index)
            self.open_requested.emit(str(self.model.slide_at(source.row()).path))

    # -- thumbnails ----------------------------------------------------------------------
    def _schedule_thumbnails(self, *_args) -> None:
        if self.model.rowCount():
            self._request_timer.start()

    def request_visible_thumbnails(self) -> None:
        """Ask for the thumbnails of the rows on screen (and a few beyond), the top row
        last so that it comes first; requests for rows scrolled away are dropped."""
        n = self.proxy.rowCount()
        if n == 0 or not self.table.isVisible():
            return
        viewport = self.table.viewport()
        top = self.table.rowAt(0)
        bottom = self.table.rowAt(viewport.height() - 1)
        top = 0 if top < 0 else top
        bottom = n - 1 if bottom < 0 else bottom
        rows = range(max(0, top - VISIBLE_EXTRA_ROWS), min(n, bottom + VISIBLE_EXTRA_ROWS + 1))
        model = self.model
        wanted: list[str] = []
        for r in rows:
            slide = model.slide_at(self.proxy.mapToSource(self.proxy.index(r, 0)).row())
            path = str(slide.path)
            if (slide.key in model.missing or path in model.thumbs or path in model.failed_thumbs
                    or path in wanted):
                continue
            wanted.append(path)
        self.thumbnails.keep_only(wanted)
        # Rows near the top of the view first: they are requested last.
        for path in reversed(wanted):
            self.thumbnails.request(path)

    def _on_thumbnail(self, path: str, image: QImage) -> None:
        if self.model.rows_of_path(path):
            self.model.set_thumbnail(path, QPixmap.fromImage(image))

    def showEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().showEvent(event)
        self._schedule_thumbnails()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._schedule_thumbnails()

    def shutdown(self, msecs: int = 2000) -> None:
        self._request_timer.stop()
        self.thumbnails.shutdown(msecs)
        self._files.shutdown(msecs)


class SlidesNavigator(QObject):
    """Ties the panel to the window: opens slides, follows the slide on the canvas, and
    steps through the list (PageDown/PageUp, Ctrl+]/Ctrl+[)."""

    def __init__(self, window, panel: SlidesPanel) -> None:
        super().__init__(window)
        self.window = window
        self.panel = panel
        self.current_key: str | None = None  # the slide on the canvas, when in the project
        self.target_key: str | None = None  # the slide asked for last (it may still be opening)
        panel.open_requested.connect(self.open_path)
        window.slide_opened.connect(self._on_slide_opened)
        panel.filter_changed.connect(lambda: panel.select_key(self.current_key))
        panel.proxy.layoutChanged.connect(lambda *_a: panel.select_key(self.current_key))

    def key_of(self, path: str) -> str | None:
        project = self.panel.project
        return project.key_of(path) if project is not None else None

    def open_path(self, path: str) -> None:
        key = self.key_of(path)
        canvas_path = str(self.window.slide.path) if self.window.slide is not None else None
        if key is not None and key == self.current_key and canvas_path is not None \
                and not self.window.is_opening:
            return  # already on the canvas
        self.target_key = key
        self.window.open_slide(path)

    def step(self, delta: int) -> bool:
        """Open the slide ``delta`` rows away in the list's order; False at either end."""
        start = self.target_key if self.window.is_opening and self.target_key else self.current_key
        key = self.panel.neighbour(start, delta)
        if key is None:
            self.window.statusBar().showMessage(
                "No slides listed" if self.panel.proxy.rowCount() == 0 else
                ("Last slide in the list" if delta > 0 else "First slide in the list"), 4000)
            return False
        self.target_key = key
        self.window.open_slide(self.panel.path_of_key(key))
        return True

    def _on_slide_opened(self, path: str) -> None:
        self.current_key = self.key_of(path)
        self.target_key = self.current_key
        self.panel.select_key(self.current_key)

    def project_changed(self) -> None:
        slide = self.window.slide
        self.current_key = self.key_of(str(slide.path)) if slide is not None else None
        self.target_key = self.current_key
        self.panel.select_key(self.current_key)
