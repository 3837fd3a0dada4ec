"""The main window's dock panels: slide properties, associated images and overlay layers.

Also a small background-job runner (opening a slide parses its whole header, and nothing that
touches OpenSlide may run on the GUI thread); associated images are read by the canvas's region
store, which the window hands to the panel.
"""
from __future__ import annotations

import html
from typing import Any, Callable

import numpy as np
from PySide6.QtCore import QObject, QRectF, QSize, QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QColor, QIcon, QImage, QPainter, QPixmap, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QScrollArea,
    QSizePolicy,
    QSlider,
    QTableView,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engines.slide import Slide
from viewer.region_store import RegionStore
from viewer.workers import WorkerPool

# Associated images in the order a pathologist looks at them.
ASSOCIATED_ORDER = ("label", "macro", "thumbnail")


# ---------------------------------------------------------------------------------------
# Background jobs
# ---------------------------------------------------------------------------------------
class Background(QObject):
    """Runs callables on private worker threads; results come back on the GUI thread.

    ``submit(fn, on_done, on_error)``: ``fn()`` runs in a worker; then ``on_done(result)`` or
    ``on_error(exception)`` is called in the thread that owns this object. Workers follow
    ``viewer.workers``: ``shutdown(timeout_ms)`` drops queued jobs, waits a bounded time for
    running ones and leaves any still running to the process; results of jobs that end after
    shutdown are dropped.
    """

    _finished = Signal(object, object)  # callback, its argument

    def __init__(self, parent: QObject | None = None, threads: int = 1, name: str = "jobs") -> None:
        super().__init__(parent)
        self._pool = WorkerPool(name, max(1, threads))
        # Emitted from workers, received here: Qt queues it onto this object's thread.
        self._finished.connect(self._deliver)

    def submit(
        self,
        fn: Callable[[], Any],
        on_done: Callable[[Any], None],
        on_error: Callable[[BaseException], None],
    ) -> bool:
        """Queue ``fn``; False when this runner has been shut down (nothing runs then)."""
        pool = self._pool

        def job() -> None:
            try:
                value, callback = fn(), on_done
            except BaseException as exc:  # noqa: BLE001 - every failure goes to the caller
                value, callback = exc, on_error
            if pool.closed:
                return  # shut down while the job ran: nobody is waiting for the result
            try:
                self._finished.emit(callback, value)
            except RuntimeError:
                pass  # the window was destroyed while the job ran: nobody is listening

        return pool.start(job)

    def wait(self, msecs: int = 5000) -> bool:
        return self._pool.wait_idle(msecs)

    def clear(self) -> None:
        """Drop queued jobs that have not started."""
        self._pool.clear()

    def shutdown(self, msecs: int = 3000) -> bool:
        """Stop for good: True when no job is still running."""
        return self._pool.shutdown(msecs)

    def _deliver(self, callback: Callable[[Any], None], value: Any) -> None:
        callback(value)


def qimage_from_rgb(arr: np.ndarray) -> QImage:
    """An HxWx3 uint8 array as a QImage that owns its pixels (safe to use in any thread)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h, w = arr.shape[:2]
    return QImage(arr.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------
class PropertiesPanel(QWidget):
    """Summary of the open slide, its pyramid levels, and every property in a filterable table."""

    SUMMARY_FIELDS = ("file", "vendor", "dimensions", "mpp", "objective", "levels")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.summary: dict[str, QLabel] = {}
        for key in self.SUMMARY_FIELDS:
            label = QLabel("—")
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(True)
            self.summary[key] = label
            form.addRow(key.capitalize() + ":", label)

        self.levels_table = QTableWidget(0, 4)
        self.levels_table.setHorizontalHeaderLabels(["Level", "Width", "Height", "Downsample"])
        _compact_table(self.levels_table)
        levels_header = self.levels_table.horizontalHeader()
        # Sizes take what they need and the downsample the rest, so values like 4.002681
        # show whole instead of being elided or clipped at the dock's edge.
        levels_header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        levels_header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        levels_header.setMinimumSectionSize(30)
        self.levels_table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.levels_table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter properties…")
        self.filter_edit.setClearButtonEnabled(True)

        self.model = QStandardItemModel(0, 2, self)
        self.model.setHorizontalHeaderLabels(["Property", "Value"])
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)  # match keys and values
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        _compact_table(self.table)
        self.filter_edit.textChanged.connect(self.proxy.setFilterFixedString)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(form)
        layout.addWidget(self.levels_table)
        layout.addWidget(self.filter_edit)
        layout.addWidget(self.table, 1)
        self.set_slide(None)

    def set_slide(self, slide: Slide | None) -> None:
        self.model.removeRows(0, self.model.rowCount())
        self.levels_table.setRowCount(0)
        if slide is None:
            for label in self.summary.values():
                label.setText("—")
            self._fit_levels_height()
            return
        w, h = slide.dimensions
        self.summary["file"].setText(slide.path.name)
        self.summary["file"].setToolTip(str(slide.path))
        self.summary["vendor"].setText(slide.vendor)
        self.summary["dimensions"].setText(f"{w:,} × {h:,} px")
        if slide.mpp_xy is not None:
            mx, my = slide.mpp_xy
            self.summary["mpp"].setText(f"{mx:.4f} × {my:.4f} µm/px")
        else:
            self.summary["mpp"].setText("unknown (no scale)")
        power = slide.objective_power
        self.summary["objective"].setText(f"{power:g}x" if power else "unknown")
        self.summary["levels"].setText(str(slide.level_count))

        self.levels_table.setRowCount(slide.level_count)
        for i, lv in enumerate(slide.levels):
            cells = (str(i), f"{lv.width:,}", f"{lv.height:,}", self.format_downsample(lv.downsample))
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if col == 3:
                    item.setToolTip(repr(float(lv.downsample)))
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.levels_table.setItem(i, col, item)

        for key, value in slide.properties.items():
            k_item, v_item = QStandardItem(key), QStandardItem(value)
            v_item.setToolTip(value[:2000])
            for item in (k_item, v_item):
                item.setEditable(False)
            self.model.appendRow([k_item, v_item])
        self.table.resizeColumnToContents(0)
        # Long vendor keys would push the values out of a narrow dock.
        self.table.setColumnWidth(0, min(self.table.columnWidth(0), 220))
        self._fit_levels_height()

    @staticmethod
    def format_downsample(ds: float) -> str:
        """A downsample in full: 4.000, 2.00134, 16.000323 (never rounded to a misleading 2 or
        16, nor 1.02e+03). Six decimals, trailing zeros trimmed down to three."""
        text = f"{float(ds):.6f}"
        whole, frac = text.split(".")
        frac = frac.rstrip("0").ljust(3, "0")
        return f"{whole}.{frac}"

    def _fit_levels_height(self) -> None:
        """Show every level without a scroll bar (up to 8 rows), and no empty space."""
        table = self.levels_table
        rows = min(max(table.rowCount(), 1), 8)
        # sizeHint, not height(): the header has no geometry until the dock is first shown.
        header = table.horizontalHeader().sizeHint().height()
        height = header + rows * table.verticalHeader().defaultSectionSize()
        table.setFixedHeight(height + 2 * table.frameWidth() + 2)

    def visible_properties(self) -> list[tuple[str, str]]:
        """The (key, value) rows the filter lets through, in display order."""
        rows = []
        for r in range(self.proxy.rowCount()):
            key = self.proxy.index(r, 0).data()
            value = self.proxy.index(r, 1).data()
            rows.append((str(key), str(value)))
        return rows


def _compact_table(table: QAbstractItemView) -> None:
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setAlternatingRowColors(True)
    table.verticalHeader().setVisible(False)
    table.verticalHeader().setDefaultSectionSize(20)
    header = table.horizontalHeader()
    header.setStretchLastSection(True)
    header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)


# ---------------------------------------------------------------------------------------
# Associated images
# ---------------------------------------------------------------------------------------
class ScaledImage(QWidget):
    """Paints an image scaled to fit, keeping its aspect ratio."""

    def __init__(self, image: QImage, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image = image
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setMinimumHeight(60)

    def hasHeightForWidth(self) -> bool:  # noqa: N802 - Qt override
        return True

    def heightForWidth(self, width: int) -> int:  # noqa: N802 - Qt override
        if self.image.width() <= 0:
            return 60
        return max(60, min(260, round(width * self.image.height() / self.image.width())))

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(240, self.heightForWidth(240))

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt override
        if self.image.isNull():
            return
        iw, ih = self.image.width(), self.image.height()
        s = min(self.width() / iw, self.height() / ih)
        w, h = iw * s, ih * s
        target = QRectF((self.width() - w) / 2, (self.height() - h) / 2, w, h)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        painter.drawImage(target, self.image)
        painter.end()


class AssociatedImagesPanel(QWidget):
    """Label, macro and thumbnail of the slide, decoded in a worker and shown scaled."""

    image_loaded = Signal(str)  # name
    all_loaded = Signal()

    def __init__(self, jobs: Background | RegionStore, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._jobs = jobs  # the canvas's region store in the viewer: it owns slide reads
        self._token = 0
        self._pending = 0
        self.images: dict[str, QImage] = {}
        self.errors: dict[str, str] = {}

        self._content = QWidget()
        self._list = QVBoxLayout(self._content)
        self._list.setContentsMargins(6, 6, 6, 6)
        self._list.setSpacing(4)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self._content)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)
        self._reset("No slide open")

    @property
    def loading(self) -> bool:
        return self._pending > 0

    def set_slide(self, slide: Slide | None) -> None:
        self._token += 1
        self.images.clear()
        self.errors.clear()
        if slide is None:
            self._reset("No slide open")
            return
        names = _ordered(slide.associated_names)
        if not names:
            self._reset("This slide has no associated images")
            self._pending = 0
            self.all_loaded.emit()
            return
        self._reset("Loading…")
        self._pending = len(names)
        token = self._token
        for name in names:
            self._jobs.submit(
                lambda n=name: qimage_from_rgb(slide.associated_image(n)),
                lambda img, n=name: self._arrived(token, n, img, None),
                lambda exc, n=name: self._arrived(token, n, None, exc),
            )

    def _arrived(self, token: int, name: str, image: QImage | None, exc: BaseException | None) -> None:
        if token != self._token:
            return  # a newer slide replaced the one this image belongs to
        self._pending -= 1
        if image is not None:
            self.images[name] = image
        else:
            self.errors[name] = str(exc) or type(exc).__name__
        self._rebuild()
        if image is not None:
            self.image_loaded.emit(name)
        if self._pending == 0:
            self.all_loaded.emit()

    def _rebuild(self) -> None:
        _clear_layout(self._list)
        for name in _ordered(list(self.images) + list(self.errors)):
            caption = QLabel(f"<b>{html.escape(name.capitalize())}</b>")
            self._list.addWidget(caption)
            if name in self.images:
                img = self.images[name]
                view = ScaledImage(img)
                view.setToolTip(f"{name}: {img.width()} × {img.height()} px")
                self._list.addWidget(view)
            else:
                err = QLabel(f"cannot be read: {html.escape(self.errors[name])}")
                err.setWordWrap(True)
                self._list.addWidget(err)
        if self._pending:
            self._list.addWidget(QLabel("Loading…"))
        self._list.addStretch(1)

    def _reset(self, note: str) -> None:
        _clear_layout(self._list)
        self._note = QLabel(note)
        self._note.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self._note.setWordWrap(True)
        self._list.addWidget(self._note)
        self._list.addStretch(1)


def _ordered(names: list[str]) -> list[str]:
    known = [n for n in ASSOCIATED_ORDER if n in names]
    return known + sorted(n for n in set(names) if n not in ASSOCIATED_ORDER)


def _clear_layout(layout) -> None:
    while layout.count():
        item = layout.takeAt(0)
        widget = item.widget()
        if widget is not None:
            widget.deleteLater()


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------
class LayerRow(QWidget):
    """One overlay: a visibility checkbox, an opacity slider, and its legend."""

    def __init__(self, overlay: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.overlay = overlay
        self.checkbox = QCheckBox(str(getattr(overlay, "name", type(overlay).__name__)))
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 100)
        self.slider.setToolTip("Opacity")
        self.percent = QLabel()
        self.percent.setMinimumWidth(36)
        self.legend = QLabel()
        self.legend.setWordWrap(True)

        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(self.checkbox, 1)
        top.addWidget(self.slider, 1)
        top.addWidget(self.percent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 2, 4, 2)
        layout.setSpacing(1)
        layout.addLayout(top)
        layout.addWidget(self.legend)
        # Layers made of classes (annotations) get a toggle per class, with its colour.
        self.class_boxes: dict[str, QCheckBox] = {}
        self._class_list = QVBoxLayout()
        self._class_list.setContentsMargins(18, 0, 0, 0)
        self._class_list.setSpacing(0)
        layout.addLayout(self._class_list)

        self.sync()
        self.checkbox.toggled.connect(self._on_toggled)
        self.slider.valueChanged.connect(self._on_slider)

    def sync(self) -> None:
        """Show the overlay's current state without feeding it back."""
        for w in (self.checkbox, self.slider):
            w.blockSignals(True)
        self.checkbox.setText(str(getattr(self.overlay, "name", type(self.overlay).__name__)))
        self.checkbox.setChecked(bool(self.overlay.visible))
        self.slider.setValue(round(float(self.overlay.opacity) * 100))
        for w in (self.checkbox, self.slider):
            w.blockSignals(False)
        self.percent.setText(f"{self.slider.value()}%")
        self.slider.setEnabled(self.checkbox.isChecked())
        self._sync_classes()
        self.legend.setText("" if self.class_boxes else _legend_html(self.overlay))
        self.legend.setVisible(bool(self.legend.text()))

    def _sync_classes(self) -> None:
        """One checkbox per class of an overlay that has classes; rebuilt when they change."""
        classes = getattr(self.overlay, "classes", None)
        if not callable(classes) or not hasattr(self.overlay, "set_class_visible"):
            return
        entries = [(str(name), QColor(color)) for name, color in classes()]
        if [(n, c.name()) for n, c in entries] != [(n, b.property("swatch")) for n, b in self.class_boxes.items()]:
            _clear_layout(self._class_list)
            self.class_boxes = {}
            for name, color in entries:
                box = QCheckBox(name)
                box.setIcon(_swatch_icon(color))
                box.setProperty("swatch", color.name())
                box.toggled.connect(lambda on, n=name: self.overlay.set_class_visible(n, on))
                self._class_list.addWidget(box)
                self.class_boxes[name] = box
        for name, box in self.class_boxes.items():
            box.blockSignals(True)
            box.setChecked(bool(self.overlay.class_visible(name)))
            box.setEnabled(bool(self.overlay.visible))
            box.blockSignals(False)

    def _on_toggled(self, checked: bool) -> None:
        self.overlay.visible = checked
        self.slider.setEnabled(checked)

    def _on_slider(self, value: int) -> None:
        self.overlay.opacity = value / 100.0
        self.percent.setText(f"{value}%")


def _swatch_icon(color: QColor) -> QIcon:
    pix = QPixmap(12, 12)
    pix.fill(color)
    return QIcon(pix)


def _legend_html(overlay: Any) -> str:
    try:
        entries = list(overlay.legend())
    except Exception:  # noqa: BLE001 - a broken legend must not break the dock
        return ""
    parts = []
    for text, color in entries[:12]:
        c = QColor(color)
        parts.append(
            f'<span style="color:{c.name()}">■</span>&nbsp;{html.escape(str(text))}'
        )
    return "&nbsp;&nbsp; ".join(parts)


class LayersPanel(QWidget):
    """Lists ``canvas.overlays()``; follows ``canvas.overlays_changed``."""

    def __init__(self, canvas: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._canvas = canvas
        self._rows: list[LayerRow] = []
        self._links: list[tuple[Any, Callable[[], None]]] = []
        self._list = QVBoxLayout()
        self._list.setContentsMargins(0, 0, 0, 0)
        self._list.setSpacing(2)
        self._empty = QLabel("No layers yet.\nModel overlays appear here.")
        self._empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(self._list)
        layout.addWidget(self._empty)
        layout.addStretch(1)
        canvas.overlays_changed.connect(self.refresh)
        self.refresh()

    def rows(self) -> list[LayerRow]:
        return list(self._rows)

    def refresh(self) -> None:
        for overlay, slot in self._links:
            try:
                overlay.changed.disconnect(slot)
            except (RuntimeError, TypeError):
                pass
        self._links.clear()
        for row in self._rows:
            self._list.removeWidget(row)
            row.deleteLater()
        self._rows.clear()
        for overlay in self._canvas.overlays():
            row = LayerRow(overlay)
            self._rows.append(row)
            self._list.addWidget(row)
            changed = getattr(overlay, "changed", None)
            if changed is not None:
                changed.connect(row.sync)
                self._links.append((overlay, row.sync))
        self._empty.setVisible(not self._rows)
