"""View > Compare Side by Side: two traces on two canvases locked in pan and zoom, a third
canvas with the difference of their attention, and both probability trails in one plot.

Each canvas has its own region store, so every read of the compare window (tiles, the tissue
thumbnail of the difference, slides opened for it) runs on that canvas's threads and stops
when the window closes. The traces come from ``TraceSource``, the one place that knows where
the window keeps them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QDockWidget,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QSizePolicy,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.trail_dock import TrailPlot
from engines.attention_diff import AttentionDiff, AttentionDiffError, attention_diff
from engines.slide import Slide, SlideError
from engines.trace import Trace
from viewer.canvas import SlideCanvas
from viewer.linked_views import ViewLink
from viewer.overlays.heatmap import HeatmapOverlay
from viewer.trace_layers import TraceLayers

log = logging.getLogger(__name__)

TraceKey = tuple[str, str, str]  # (slide path, model, trace name)
WHOLE_SLIDE = "whole slide"
DIVERGING = "CET-D1"  # blue - white - red: zero difference is white
DIFF_OPACITY = 0.75
CLOSE_WAIT_MS = 2000  # how long closing waits for each canvas's reads
TRAIL_HEIGHT = 190
# Three canvases beside the main one: each gets a smaller share of memory and readers.
PANE_CACHE_BYTES = 192 * 2**20
PANE_THREADS = 2


class TraceSource:
    """The traces the window knows, by (slide, model, name): from ``window.results`` (the
    results store) when it has one, else from the inference controller's layers."""

    def __init__(self, window) -> None:
        self.window = window
        # The store lists traces by slide: remember every slide it announced traces for.
        self._slides: dict[str, None] = {}
        store = self._store()
        if store is not None and hasattr(store, "traces_changed"):
            store.traces_changed.connect(lambda slide: self._slides.setdefault(str(slide)))

    def _store(self):
        store = getattr(self.window, "results", None)
        return store if store is not None and hasattr(store, "trace_keys") else None

    def keys(self) -> list[TraceKey]:
        store = self._store()
        if store is not None:
            slides: list[str] = []
            if getattr(self.window, "slide", None) is not None:
                slides.append(str(self.window.slide.path))
            slides += list(self._slides)
            project = getattr(store, "project", None)
            for s in getattr(project, "slides", None) or []:
                slides.append(str(s.path))
            keys: list[TraceKey] = []
            for slide in dict.fromkeys(slides):
                keys += [tuple(k) for k in store.trace_keys(slide)]
            return list(dict.fromkeys(keys))
        layers = getattr(getattr(self.window, "inference", None), "layers", None) or {}
        return list(layers)

    def trace(self, key: TraceKey) -> Trace | None:
        store = self._store()
        if store is not None:
            return store.trace(key)
        layers = getattr(getattr(self.window, "inference", None), "layers", None) or {}
        got = layers.get(key)
        return got.trace if got is not None else None

    def changed_signals(self) -> list:
        """Signals after which the list of traces may differ."""
        out = []
        store = self._store()
        if store is not None and hasattr(store, "traces_changed"):
            out.append(store.traces_changed)
        inference = getattr(self.window, "inference", None)
        if inference is not None and hasattr(inference, "trace_changed"):
            out.append(inference.trace_changed)
        if hasattr(self.window, "slide_opened"):
            out.append(self.window.slide_opened)
        return out


def key_label(key: TraceKey, with_slide: bool) -> str:
    slide, model, name = key
    text = model if name == WHOLE_SLIDE else f"{model} ({name})"
    return f"{Path(slide).name}: {text}" if with_slide else text


@dataclass
class Shown:
    key: TraceKey
    trace: Trace
    layers: TraceLayers


class ComparePane(QWidget):
    """A trace chooser above a canvas that shows the chosen trace on its slide."""

    chosen = Signal(object)  # TraceKey or None

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setMinimumContentsLength(18)
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.currentIndexChanged.connect(self._on_index)
        self.caption = QLabel(title)
        self.caption.setStyleSheet("font-weight: bold")
        self.note = QLabel("")
        # One line whatever it says: a wrapped note would make this canvas shorter than the
        # others, and locked canvases must share one size.
        self.note.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.canvas = SlideCanvas(self, cache_bytes=PANE_CACHE_BYTES, threads=PANE_THREADS)
        top = QHBoxLayout()
        top.addWidget(self.caption)
        top.addWidget(self.combo, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(top)
        layout.addWidget(self.note)
        layout.addWidget(self.canvas, 1)
        self.shown: Shown | None = None
        self._filling = False

    def set_keys(self, keys: list[TraceKey], current: TraceKey | None, with_slide: bool) -> None:
        """List ``keys``; keep ``current`` chosen when it is listed (no signal for that)."""
        self._filling = True
        try:
            self.combo.clear()
            for k in keys:
                self.combo.addItem(key_label(k, with_slide), k)
            i = keys.index(current) if current in keys else -1
            self.combo.setCurrentIndex(i)
        finally:
            self._filling = False

    def select(self, key: TraceKey) -> None:
        """Show ``key`` as chosen (listing it if it is not yet), without a signal."""
        self._filling = True
        try:
            i = next((j for j in range(self.combo.count())
                      if tuple(self.combo.itemData(j)) == tuple(key)), -1)
            if i < 0:
                self.combo.addItem(key_label(key, True), key)
                i = self.combo.count() - 1
            self.combo.setCurrentIndex(i)
        finally:
            self._filling = False

    def current_key(self) -> TraceKey | None:
        data = self.combo.currentData()
        return tuple(data) if data is not None else None

    def _on_index(self, _i: int) -> None:
        if not self._filling:
            self.chosen.emit(self.current_key())


class CompareWindow(QMainWindow):
    """Two traces side by side, locked in pan and zoom, and where their attention differs."""

    closed = Signal()
    diff_ready = Signal(object)  # the AttentionDiff shown, or None when there is none

    def __init__(self, source: TraceSource, main_window=None) -> None:
        super().__init__(main_window, Qt.WindowType.Window)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        self.setWindowTitle("Compare side by side")
        self.source = source
        self.main_window = main_window
        self.pane_a = ComparePane("A")
        self.pane_b = ComparePane("B")
        self.pane_diff = ComparePane("A \u2212 B")
        # Same layout in every pane, so the canvases have one size and one fit scale.
        policy = self.pane_diff.combo.sizePolicy()
        policy.setRetainSizeWhenHidden(True)
        self.pane_diff.combo.setSizePolicy(policy)
        self.pane_diff.combo.hide()
        self.panes = (self.pane_a, self.pane_b)
        self.link = ViewLink(self)
        for pane in (self.pane_a, self.pane_b, self.pane_diff):
            self.link.add(pane.canvas)
            pane.canvas.cursor_moved.connect(self._on_cursor)
        self.pane_a.chosen.connect(lambda k: self.show_trace(self.pane_a, k))
        self.pane_b.chosen.connect(lambda k: self.show_trace(self.pane_b, k))
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.setChildrenCollapsible(False)
        for pane in (self.pane_a, self.pane_b, self.pane_diff):
            splitter.addWidget(pane)
            splitter.setStretchFactor(splitter.count() - 1, 1)
        splitter.setSizes([500, 500, 500])  # equal shares: one fit scale for all three
        self.splitter = splitter
        self.setCentralWidget(splitter)
        self.trail_plot = TrailPlot()
        self.trail_plot.step_clicked.connect(lambda i: self._go_to_step(self.pane_a, i))
        self.trail_plot.second_step_clicked.connect(lambda i: self._go_to_step(self.pane_b, i))
        self.trail_dock = QDockWidget("Probability trail", self)
        self.trail_dock.setObjectName("compare_trail_dock")
        self.trail_dock.setWidget(self.trail_plot)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.trail_dock)
        self.diff: AttentionDiff | None = None
        self.diff_overlay: HeatmapOverlay | None = None
        self._diff_request = None
        self._diff_for: tuple | None = None
        self._tissues: dict[str, object] = {}  # slide path -> Tissue, found once per window
        self._slides: dict[str, Slide] = {}
        self._wanted: dict[int, str] = {}  # id(canvas) -> path of the slide it should show
        self._closing = False
        self.show_diff_action = QAction("Show &Difference", self)
        self.show_diff_action.setCheckable(True)
        self.show_diff_action.setChecked(True)
        self.show_diff_action.setShortcut(QKeySequence("D"))
        self.show_diff_action.toggled.connect(self._set_diff_visible)
        view = self.menuBar().addMenu("&View")
        view.addAction(self.show_diff_action)
        view.addAction(self.trail_dock.toggleViewAction())
        close = QAction("&Close", self)
        close.setShortcut(QKeySequence.StandardKey.Close)
        close.triggered.connect(self.close)
        view.addAction(close)
        self.addAction(close)
        self.statusBar()
        self.resize(1500, 800)
        # The canvases are what this window is for: the plot keeps a strip below them.
        self.resizeDocks([self.trail_dock], [TRAIL_HEIGHT], Qt.Orientation.Vertical)

    # -- choosing ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """List the traces known now in both choosers, keeping what each shows."""
        keys = self.source.keys()
        with_slide = len({k[0] for k in keys}) > 1
        for pane in self.panes:
            pane.set_keys(keys, pane.shown.key if pane.shown else None, with_slide)

    def choose(self, key_a: TraceKey | None, key_b: TraceKey | None) -> None:
        self.refresh()
        self.show_trace(self.pane_a, key_a)
        self.show_trace(self.pane_b, key_b)

    def show_trace(self, pane: ComparePane, key: TraceKey | None) -> None:
        """Show trace ``key`` on ``pane`` (opening its slide there when it is another one)."""
        if pane.shown is not None:
            pane.shown.layers.hide()
            pane.shown = None
        trace = self.source.trace(key) if key is not None else None
        if trace is None:
            pane.note.setText("No trace chosen" if key is None else "That trace is no longer there")
            self._update_trails()
            self._update_diff()
            return
        if pane.current_key() != key:
            pane.select(key)
        layers = TraceLayers(pane.canvas, trace, label=key_label(key, False))
        pane.shown = Shown(key, trace, layers)
        pane.note.setText(_prediction_text(trace))
        self._with_slide(pane.canvas, key[0], lambda: self._show_layers(pane))
        self._update_trails()
        self._update_diff()

    def _show_layers(self, pane: ComparePane) -> None:
        if pane.shown is not None:
            pane.shown.layers.show()

    def _with_slide(self, canvas: SlideCanvas, path: str, then) -> None:
        """Put the slide at ``path`` on ``canvas`` (opened on the canvas's read lane unless
        the window or another canvas has it open), then call ``then``."""
        self._wanted[id(canvas)] = path  # a slide still opening for an older choice must not land
        current = canvas.slide
        if current is not None and str(current.path) == path:
            then()
            return
        slide = self._known_slide(path)
        if slide is not None:
            self._set_slide(canvas, slide)
            then()
            return

        def opened(s: Slide) -> None:
            self._slides[path] = s
            if self._wanted.get(id(canvas)) == path:
                self._set_slide(canvas, s)
                then()

        def failed(exc: BaseException) -> None:
            self.statusBar().showMessage(f"Cannot open {Path(path).name}: {exc}", 10_000)

        canvas.store.submit(lambda: Slide(path), opened, failed)

    def _known_slide(self, path: str) -> Slide | None:
        main = getattr(self.main_window, "slide", None)
        if main is not None and str(main.path) == path:
            return main
        for pane in (self.pane_a, self.pane_b, self.pane_diff):
            s = pane.canvas.slide
            if s is not None and str(s.path) == path:
                return s
        return self._slides.get(path)

    def _set_slide(self, canvas: SlideCanvas, slide: Slide) -> None:
        if self._closing:
            return
        canvas.set_slide(slide)
        self.link.align(canvas)

    # -- the trails ---------------------------------------------------------------------------
    def _update_trails(self) -> None:
        a, b = self.pane_a.shown, self.pane_b.shown
        plot = self.trail_plot
        if a is not None:
            plot.set_steps(a.trace.trail, a.layers.trail.positive, a.layers.trail.positive_label)
        else:
            plot.set_steps([], 1, "positive")
        names = (f"A: {a.layers.label}" if a else "A", f"B: {b.layers.label}" if b else "B")
        plot.set_second(b.trace.trail if b is not None else [],
                        b.layers.trail.positive if b is not None else 1, names)
        self.trail_dock.setVisible(bool((a and a.trace.trail) or (b and b.trace.trail)))

    def _go_to_step(self, pane: ComparePane, index: int) -> None:
        shown = pane.shown
        if shown is None:
            return
        step = next((s for s in shown.trace.trail if s.index == index), None)
        field = shown.trace.field_by_id(step.field_id) if step and step.field_id is not None else None
        if field is not None:
            x, y, w, h = field.rect
            pane.canvas.center_on(x + w / 2, y + h / 2)
            shown.layers.trail.set_highlight(index)

    # -- the difference ------------------------------------------------------------------------
    def _set_diff_visible(self, on: bool) -> None:
        self.pane_diff.setVisible(on)
        if on:
            self._update_diff()

    def _clear_diff(self, note: str) -> None:
        if self._diff_request is not None:
            self._diff_request.cancel()
            self._diff_request = None
        if self.diff_overlay is not None:
            self.pane_diff.canvas.remove_overlay(self.diff_overlay)
            self.diff_overlay = None
        self.diff = None
        self._diff_for = None
        self.pane_diff.note.setText(note)

    def _update_diff(self) -> None:
        a, b = self.pane_a.shown, self.pane_b.shown
        if self._closing:
            return
        if a is None or b is None:
            self._clear_diff("Choose a trace on each side")
            self.diff_ready.emit(None)
            return
        if a.key[0] != b.key[0]:
            self._clear_diff("The difference needs two traces of the same slide")
            self.diff_ready.emit(None)
            return
        wanted = (a.key, b.key, id(a.trace), id(b.trace))
        if wanted == self._diff_for or not self.show_diff_action.isChecked():
            return
        self._clear_diff("Comparing\u2026")
        self._diff_for = wanted
        path = a.key[0]
        names = (f"A: {a.layers.label}", f"B: {b.layers.label}")
        self._with_slide(self.pane_diff.canvas, path,
                         lambda: self._start_diff(path, a.trace, b.trace, names, wanted))

    def _start_diff(self, path: str, ta: Trace, tb: Trace, names, wanted) -> None:
        canvas = self.pane_diff.canvas
        slide = canvas.slide
        if slide is None or wanted != self._diff_for:
            return
        tissues = self._tissues
        holder: dict = {}

        def check() -> None:
            req = holder.get("req")
            if req is not None and req.cancelled:
                raise AttentionDiffError("cancelled")

        def work():
            # On the diff canvas's read lane: the thumbnail read and the resampling.
            from engines.tissue import tissue_of_slide

            tissue = tissues.get(path)
            if tissue is None:
                tissue = tissue_of_slide(slide, check=check)
            return tissue, attention_diff(ta, tb, tissue, names=names)

        def done(result) -> None:
            tissue, diff = result
            tissues[path] = tissue
            if wanted == self._diff_for:
                self._diff_request = None
                self._show_diff(diff)

        def failed(exc: BaseException) -> None:
            if wanted == self._diff_for:
                self._diff_request = None
                text = str(exc) if isinstance(exc, (AttentionDiffError, SlideError)) else f"Cannot compare: {exc}"
                self.pane_diff.note.setText(text)
                self.diff_ready.emit(None)

        holder["req"] = self._diff_request = canvas.store.submit(work, done, failed)

    def _show_diff(self, diff: AttentionDiff) -> None:
        self.diff = diff
        overlay = HeatmapOverlay(diff.diff, colormap=DIVERGING, opacity=DIFF_OPACITY,
                                 name=diff.diff.name)
        m = max(abs(overlay.value_range()[0]), abs(overlay.value_range()[1])) or 1.0
        overlay.set_range((-m, m))  # symmetric: white is "both alike"
        self.diff_overlay = overlay
        self.pane_diff.canvas.add_overlay(overlay)
        self.pane_diff.note.setText(f"red: A looks more, blue: B does; agreement {diff.agreement:.2f}")
        self.pane_diff.note.setToolTip(
            "Each model's attention as its share over the tissue, on the finer grid; red cells "
            "hold more of A's attention than of B's, blue the reverse, white alike. Agreement is "
            "the attention both put on the same cells (1: the same map).")
        self.diff_ready.emit(diff)

    # -- hover ----------------------------------------------------------------------------------
    def _on_cursor(self, x: float, y: float) -> None:
        parts = []
        for name, pane in (("A", self.pane_a), ("B", self.pane_b)):
            hit = pane.shown.layers.value_at(x, y) if pane.shown is not None else None
            if hit is not None:
                parts.append(f"{name}: {hit[0]} = {hit[1]:.4g}")
        if self.diff_overlay is not None:
            v = self.diff_overlay.value_at(x, y)
            if v is not None:
                parts.append(f"A \u2212 B = {v:+.3g}")
        self.statusBar().showMessage("   ".join(parts))

    # -- closing -------------------------------------------------------------------------------
    def shutdown(self, timeout_ms: int = CLOSE_WAIT_MS) -> bool:
        """Stop every read of the window's canvases; True when none was left running."""
        if self._closing:
            return True
        self._closing = True
        if self._diff_request is not None:
            self._diff_request.cancel()
        ok = True
        for pane in (self.pane_a, self.pane_b, self.pane_diff):
            if pane.shown is not None:
                pane.shown.layers.hide()
            self.link.remove(pane.canvas)
            ok = pane.canvas.shutdown(timeout_ms) and ok
        return ok

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        self.closed.emit()
        super().closeEvent(event)


def _prediction_text(trace: Trace) -> str:
    if not trace.probs or not trace.classes:
        return f"{trace.model}: running or no prediction"
    i = max(range(len(trace.probs)), key=trace.probs.__getitem__)
    return f"{trace.model}: {trace.classes[i]} ({trace.probs[i]:.2f})"


class CompareController(QObject):
    """View > Compare Side by Side for one main window."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.window = window
        self.source = TraceSource(window)
        self.view: CompareWindow | None = None
        self.action = QAction("Compare Side by &Side", window)
        self.action.setShortcut(QKeySequence("Ctrl+Shift+C"))
        self.action.setToolTip("Two traces on two canvases locked together, and their difference")
        self.action.triggered.connect(lambda _checked=False: self.open())
        window.addAction(self.action)
        menu = getattr(window, "view_menu", None)
        if menu is not None:
            menu.addSeparator()
            menu.addAction(self.action)
        for signal in self.source.changed_signals():
            signal.connect(self._refresh_soon)
        self._refresh = QTimer(self)
        self._refresh.setSingleShot(True)
        self._refresh.setInterval(0)
        self._refresh.timeout.connect(self._do_refresh)
        window.installEventFilter(self)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.close)

    def default_keys(self) -> tuple[TraceKey | None, TraceKey | None]:
        """The trace on the main canvas and another of the same slide (another model first)."""
        keys = self.source.keys()
        slide = str(self.window.slide.path) if getattr(self.window, "slide", None) is not None else None
        shown = getattr(getattr(self.window, "inference", None), "shown_key", None)
        here = [k for k in keys if k[0] == slide] or keys
        a = tuple(shown) if shown is not None and tuple(shown) in keys else (here[0] if here else None)
        others = [k for k in here if k != a]
        b = next((k for k in others if a is None or k[1] != a[1]), others[0] if others else None)
        return a, b

    def open(self, key_a: TraceKey | None = None, key_b: TraceKey | None = None) -> CompareWindow:
        """Show the compare window with ``key_a`` and ``key_b`` (defaults: see default_keys)."""
        if key_a is None and key_b is None:
            key_a, key_b = self.default_keys()
        if self.view is None:
            self.view = CompareWindow(self.source, self.window)
            self.view.closed.connect(self._on_closed)
        self.view.choose(key_a, key_b)
        self.view.show()
        self.view.raise_()
        if key_a is None or key_b is None:
            self.view.statusBar().showMessage("Run two models (or open two traces) to compare them", 10_000)
        return self.view

    def close(self) -> None:
        if self.view is not None:
            self.view.close()

    def _on_closed(self) -> None:
        self.view = None

    def _refresh_soon(self, *_args) -> None:
        if self.view is not None:
            self._refresh.start()

    def _do_refresh(self) -> None:
        if self.view is not None:
            self.view.refresh()

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        # The main window closing (and staying closed) takes the compare window with it.
        if obj is self.window and event.type() == QEvent.Type.Close:
            QTimer.singleShot(0, self._close_if_main_closed)
        return False

    def _close_if_main_closed(self) -> None:
        try:
            if not self.window.isVisible():
                self.close()
        except RuntimeError:  # the main window is gone already
            pass


def install_compare(window) -> CompareController:
    """Add View > Compare Side by Side to ``window``."""
    return CompareController(window)
