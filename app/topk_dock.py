"""The Top-k regions dock: the k highest-attention cells of the chosen map of the current
trace (or, for a sampling model without maps, its fields by score), each with a thumbnail,
its value and position; clicking one centres the view on it. Exports as CSV in level-0 px."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PySide6.QtCore import QObject, QSize, Qt, QTimer
from PySide6.QtGui import QIcon, QPainter, QPixmap
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.map_display import chosen_overlay
from engines.trace import AttentionMap, Rect, Trace, write_atomic
from viewer.tiles import array_to_qimage

DEFAULT_K = 12
MAX_K = 500
THUMB_PX = 72
FILL = 0.4  # a clicked region spans this share of the view's narrower side
REFRESH_MS = 250  # a streaming trace re-ranks at most this often
FIELDS = "fields"  # the source named in the CSV when regions are fields, not map cells
K_KEY = "topk/k"


@dataclass(frozen=True)
class Region:
    """One listed region: a level-0 rectangle and its attention (or score)."""

    rect: Rect
    value: float
    source: str  # the map's name, or FIELDS

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.rect
        return x + w / 2.0, y + h / 2.0


def top_cells(amap: AttentionMap, k: int) -> list[Region]:
    """The ``k`` cells of ``amap`` with the highest finite values, highest first; ties keep
    row-major order."""
    values = np.asarray(amap.values, np.float64)
    if values.ndim != 2 or values.size == 0 or k <= 0:
        return []
    flat = values.ravel()
    finite = np.flatnonzero(np.isfinite(flat))
    order = finite[np.argsort(-flat[finite], kind="stable")][:k]
    cols = values.shape[1]
    ox, oy = amap.origin
    cw, ch = amap.cell
    return [Region((ox + (i % cols) * cw, oy + (i // cols) * ch, cw, ch), float(flat[i]), amap.name)
            for i in order]


def top_fields(trace: Trace, k: int) -> list[Region]:
    """The ``k`` fields (below the whole view) with the highest finite scores."""
    fields = [f for f in trace.fields if f.depth > 0 and f.score is not None
              and math.isfinite(float(f.score)) and f.rect[2] > 0 and f.rect[3] > 0]
    fields.sort(key=lambda f: -float(f.score))  # stable: ties keep trace order
    return [Region(tuple(map(float, f.rect)), float(f.score), FIELDS) for f in fields[:max(k, 0)]]


def regions_csv(regions: list[Region]) -> str:
    """x,y,w,h (level-0 px), value, map: one row per region, highest first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["x", "y", "w", "h", "value", "map"])
    for r in regions:
        writer.writerow([*(_num(v) for v in r.rect), repr(float(r.value)), r.source])
    return out.getvalue()


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3f}"


class TopKPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, MAX_K)
        self.k_spin.setValue(DEFAULT_K)
        self.k_spin.setPrefix("k = ")
        self.k_spin.setToolTip("How many regions to list")
        self.export_button = QPushButton("Export CSV…")
        self.export_button.setToolTip("Save the listed regions as x,y,w,h (level-0 px), value, map")
        self.source_label = QLabel("No trace")
        self.source_label.setWordWrap(True)
        self.list = QListWidget()
        self.list.setIconSize(QSize(THUMB_PX, THUMB_PX))
        self.list.setUniformItemSizes(True)
        self.list.setToolTip("Click a region to centre the view on it")
        top = QHBoxLayout()
        top.addWidget(self.k_spin)
        top.addStretch(1)
        top.addWidget(self.export_button)
        box = QVBoxLayout(self)
        box.addLayout(top)
        box.addWidget(self.source_label)
        box.addWidget(self.list, 1)


class TopKController(QObject):
    def __init__(self, window) -> None:
        super().__init__(window)
        self.window = window
        self.canvas = window.canvas
        self.panel = TopKPanel()
        self.regions: list[Region] = []
        self.layers = None
        self.map_index: int | None = None  # the map chosen in the Models dock, for this trace
        self.animate = True
        self._token = 0  # thumbnails of an older listing are dropped
        self._requests: list = []
        self.thumbnails: dict[int, object] = {}  # row -> QImage, as they arrive
        self._refresh = QTimer(self)
        self._refresh.setSingleShot(True)
        self._refresh.setInterval(REFRESH_MS)
        self._refresh.timeout.connect(self.refresh)
        qs = window.settings.qsettings
        try:
            self.panel.k_spin.setValue(int(qs.value(K_KEY, DEFAULT_K)))
        except (TypeError, ValueError):
            pass
        self.panel.k_spin.valueChanged.connect(self._k_changed)
        self.panel.list.itemClicked.connect(lambda item: self.go_to(self.panel.list.row(item)))
        self.panel.list.itemActivated.connect(lambda item: self.go_to(self.panel.list.row(item)))
        self.panel.export_button.clicked.connect(self.export_dialog)
        window.inference.trace_changed.connect(self._on_trace)
        window.models_panel.map_chosen.connect(self._map_chosen)
        self.refresh()

    @property
    def k(self) -> int:
        return self.panel.k_spin.value()

    def _k_changed(self, k: int) -> None:
        self.window.settings.qsettings.setValue(K_KEY, int(k))
        self.refresh()

    def _map_chosen(self, index: int) -> None:
        self.map_index = index
        self.refresh()

    def _on_trace(self, layers) -> None:
        if layers is not self.layers:
            self.map_index = None
        if self.layers is not None and self.layers is not layers:
            try:
                self.layers.changed.disconnect(self._refresh.start)
            except (RuntimeError, TypeError):
                pass
        if layers is not None and layers is not self.layers:
            layers.changed.connect(self._refresh.start)  # a running model adds maps and fields
        self.layers = layers
        self.refresh()

    # -- listing ------------------------------------------------------------------------------
    def compute(self) -> list[Region]:
        layers = self.layers
        if layers is None:
            return []
        overlay = chosen_overlay(layers, self.map_index)
        if overlay is not None:
            return top_cells(overlay.map, self.k)
        return top_fields(layers.trace, self.k)

    def refresh(self) -> None:
        self._refresh.stop()
        self.regions = self.compute()
        self._token += 1
        for req in self._requests:
            req.cancel()
        self._requests = []
        self.thumbnails = {}
        lst = self.panel.list
        lst.clear()
        if self.layers is None:
            self.panel.source_label.setText("No trace: run a model or open a trace")
        elif not self.regions:
            self.panel.source_label.setText("This trace has no attention map or scored fields")
        else:
            src = self.regions[0].source
            what = "fields by score" if src == FIELDS else f"map \u201c{src}\u201d"
            self.panel.source_label.setText(f"Top {len(self.regions)} of {what}")
        mpp = self._mpp()
        blank = QPixmap(THUMB_PX, THUMB_PX)
        blank.fill(Qt.GlobalColor.lightGray)
        for i, r in enumerate(self.regions):
            item = QListWidgetItem(QIcon(blank), f"{i + 1}.  {r.value:.4g}\n{self._position(r, mpp)}")
            x, y, w, h = r.rect
            item.setToolTip(f"x {x:.0f}, y {y:.0f}, {w:.0f} \u00d7 {h:.0f} level-0 px")
            lst.addItem(item)
        self.panel.export_button.setEnabled(bool(self.regions))
        self._request_thumbnails()

    def _mpp(self) -> float | None:
        slide = self.canvas.slide
        mpp = getattr(slide, "mpp", None) if slide is not None else None
        if not mpp and self.layers is not None:
            mpp = self.layers.trace.slide.mpp
        return float(mpp) if mpp else None

    @staticmethod
    def _position(r: Region, mpp: float | None) -> str:
        cx, cy = r.centre
        if mpp:
            return f"{cx * mpp:,.0f}, {cy * mpp:,.0f} \u00b5m"
        return f"{cx:,.0f}, {cy:,.0f} px"

    def _request_thumbnails(self) -> None:
        slide = self.canvas.slide
        if slide is None or self.layers is None:
            return
        token = self._token
        for i, r in enumerate(self.regions):
            x, y, w, h = r.rect
            # Keep the region's shape; clip to the slide so edge cells still read.
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(slide.width), x + w), min(float(slide.height), y + h)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            side = max(x1 - x0, y1 - y0)
            tw = max(1, round(THUMB_PX * (x1 - x0) / side))
            th = max(1, round(THUMB_PX * (y1 - y0) / side))
            rect = (x0, y0, x1 - x0, y1 - y0)

            def read(rect=rect, tw=tw, th=th):  # on the store's read lane, not the GUI thread
                return array_to_qimage(slide.read_rect(rect, tw, th))

            req = self.canvas.store.submit(
                read, lambda img, i=i: self._thumb_done(token, i, img),
                lambda exc, i=i: self._thumb_failed(token, i, exc))
            if req is not None:
                self._requests.append(req)

    def _thumb_done(self, token: int, row: int, image) -> None:
        if token != self._token or row >= self.panel.list.count():
            return
        self.thumbnails[row] = image
        pix = QPixmap(THUMB_PX, THUMB_PX)
        pix.fill(Qt.GlobalColor.transparent)
        p = QPainter(pix)
        p.drawImage((THUMB_PX - image.width()) // 2, (THUMB_PX - image.height()) // 2, image)
        p.end()
        self.panel.list.item(row).setIcon(QIcon(pix))

    def _thumb_failed(self, token: int, row: int, exc: BaseException) -> None:
        if token == self._token and row < self.panel.list.count():
            self.panel.list.item(row).setToolTip(f"Thumbnail could not be read: {exc}")

    # -- actions ------------------------------------------------------------------------------
    def go_to(self, row: int) -> None:
        """Centre the view on region ``row``, zoomed so it spans a good part of the view."""
        if not 0 <= row < len(self.regions) or self.canvas.slide is None:
            return
        r = self.regions[row]
        cx, cy = r.centre
        _, _, w, h = r.rect
        cam = self.canvas.camera
        scale = FILL * min(cam.width / max(w, 1e-9), cam.height / max(h, 1e-9))
        self.canvas.center_on(cx, cy, scale, animate=self.animate)

    def export_csv(self, path: str | Path) -> Path:
        path = Path(path)
        write_atomic(path, regions_csv(self.regions))
        return path

    def default_csv_name(self) -> str:
        slide = self.canvas.slide
        stem = Path(str(slide.path)).stem if slide is not None else "regions"
        return f"{stem}_top{len(self.regions)}.csv"

    def export_dialog(self) -> None:
        if not self.regions:
            return
        path, _ = QFileDialog.getSaveFileName(self.window, "Export Top-k Regions",
                                              self.default_csv_name(), "CSV (*.csv)")
        if not path:
            return
        try:
            self.export_csv(path)
        except OSError as exc:
            self.window.statusBar().showMessage(f"Could not write {path}: {exc.strerror or exc}", 8000)
            return
        self.window.statusBar().showMessage(f"Wrote {len(self.regions)} regions to {path}", 8000)


def install_topk(window) -> TopKController:
    """The Top-k regions dock, beside the Models dock, and its View menu toggle."""
    controller = TopKController(window)
    dock = window.add_dock("Top-k regions", "topk_dock", controller.panel,
                           Qt.DockWidgetArea.RightDockWidgetArea, beside=window.models_dock)
    window.models_dock.raise_()
    controller.dock = dock
    return controller
