"""MagLens main window: the slide canvas, its docks, menus and status bar, and ``launch``."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from PySide6.QtCore import QMimeData, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressDialog,
    QScrollArea,
    QWidget,
)

from app.display_dialog import DisplayAdjustController
from app.docks import AssociatedImagesPanel, Background, LayersPanel, PropertiesPanel
from app.exports import ExportJob, png_bytes
from app.results_store import ResultsStore
from app.inference import InferenceController
from app.annotation_tools import install_annotations
from app.attention_score import install_attention_score
from app.compare_view import install_compare
from app.map_display import install_map_display
from app.topk_dock import install_topk
from app.project_ui import install_projects
from app.results_view import install_results_view
from app.help import install_help_menu
from app.map_files import install_map_files
from app.models_dock import ModelsPanel
from app.recent_labels import distinguishing_labels
from app.trail_dock import TrailPlot
from app.settings import APPLICATION, ORGANIZATION, AppSettings
from engines.resources import demo_slide, resource_path
from engines.slide import Slide, SlideError
from engines.trace import ExportCancelled, TraceError, write_atomic
from viewer.canvas import SlideCanvas
from viewer.figure import draw_legend, legend_entries
from viewer.minimap import Minimap

RESOURCES = resource_path()  # package data, so an installed MagLens finds it too
DEMO_SLIDE = demo_slide()
MAGNIFICATIONS = (1, 5, 10, 20, 40)
NO_MAGNIFICATION = ("No magnification: this slide records neither objective power nor pixel "
                    "size, so keys 1-5 cannot tell how far to zoom")
SLIDE_PATTERNS = (
    "*.svs *.tif *.tiff *.ndpi *.vms *.vmu *.scn *.mrxs *.svslide *.bif *.dcm *.qptiff "
    "*.png *.jpg *.jpeg *.bmp"
)
SLIDE_FILTER = f"Slides ({SLIDE_PATTERNS});;All files (*)"
TILE_ERROR_MS = 10_000
CLOSE_WAIT_MS = 2000  # how long closing waits for each kind of background work
PROGRESS_AFTER_MS = 300  # an export quicker than this shows no progress dialog


class MainWindow(QMainWindow):
    """The viewer window. Slides open in a worker; errors show a dialog and keep the old slide."""

    slide_opened = Signal(str)  # path of the slide now shown
    open_failed = Signal(str)  # message shown to the user
    view_exported = Signal(str)  # path of the PNG written

    def __init__(
        self,
        settings: QSettings | None = None,
        model: str | None = None,
        checkpoint: str | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        # Kept for the Models dock, which runs them on the open slide.
        self.model_name = model
        self.checkpoint = checkpoint
        self.settings = AppSettings(settings)
        self.last_error: str | None = None
        self._open_token = 0
        self._opening: str | None = None
        # Opening slides and exports; display reads belong to the canvas's region store and
        # models to the engine. All three stop the same way when the window closes.
        self._jobs = Background(self, threads=2)
        self.exports: list[ExportJob] = []  # exports still running

        self.setWindowTitle(APPLICATION)
        self.setAcceptDrops(True)
        self.setDockOptions(
            QMainWindow.DockOption.AnimatedDocks | QMainWindow.DockOption.AllowTabbedDocks
        )
        self.canvas = SlideCanvas(self)
        self.canvas.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setCentralWidget(self.canvas)
        self._build_docks()
        self._build_status_bar()
        self._build_menus()
        self._connect_canvas()
        # Features that add their own docks, menus and actions (one install line each).
        self.map_files = install_map_files(self)
        self.results_view = install_results_view(self)
        self.map_display = install_map_display(self)
        self.topk = install_topk(self)
        self.projects = install_projects(self)
        self.compare = install_compare(self)
        self.annotations = install_annotations(self)
        self.attention_score = install_attention_score(self)  # after inference and annotations
        self._restore_layout()
        self._update_actions()
        if model:
            self.models_panel.set_model(model)
        if checkpoint:
            self.models_panel.set_checkpoint(checkpoint)

    # -- building ------------------------------------------------------------------------
    def _build_docks(self) -> None:
        self.minimap = Minimap(self.canvas)
        self.properties_panel = PropertiesPanel()
        self.associated_panel = AssociatedImagesPanel(self.canvas.store)
        self.layers_panel = LayersPanel(self.canvas)
        self.models_panel = ModelsPanel(self.settings.qsettings)
        self.trail_plot = TrailPlot()
        self.results = ResultsStore(self)  # one owner of traces and run results
        self.inference = InferenceController(self, self.canvas, self.models_panel, self.trail_plot)
        self.inference.status.connect(lambda text: self.statusBar().showMessage(text, 8000))

        self.minimap_dock = self._dock("Minimap", "minimap_dock", self.minimap)
        self.properties_dock = self._dock("Properties", "properties_dock", self.properties_panel)
        self.associated_dock = self._dock("Associated images", "associated_dock", self.associated_panel)
        layers_scroll = QScrollArea()  # a trace can bring dozens of layers (64 filters)
        layers_scroll.setWidgetResizable(True)
        layers_scroll.setWidget(self.layers_panel)
        self.layers_dock = self._dock("Layers", "layers_dock", layers_scroll)
        models_scroll = QScrollArea()
        models_scroll.setWidgetResizable(True)
        models_scroll.setWidget(self.models_panel)
        self.models_dock = self._dock("Models", "models_dock", models_scroll)
        self.trail_dock = self._dock("Probability trail", "trail_dock", self.trail_plot)

        right = Qt.DockWidgetArea.RightDockWidgetArea
        left = Qt.DockWidgetArea.LeftDockWidgetArea
        # The side docks run full height; the trail plot sits under the canvas only.
        self.setCorner(Qt.Corner.BottomLeftCorner, left)
        self.setCorner(Qt.Corner.BottomRightCorner, right)
        self.addDockWidget(left, self.properties_dock)
        self.addDockWidget(left, self.layers_dock)
        self.tabifyDockWidget(self.properties_dock, self.layers_dock)
        self.properties_dock.raise_()
        self.addDockWidget(right, self.minimap_dock)
        self.addDockWidget(right, self.models_dock)
        self.addDockWidget(right, self.associated_dock)
        self.tabifyDockWidget(self.associated_dock, self.models_dock)
        self.models_dock.raise_()
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.trail_dock)
        self.trail_dock.hide()  # shown when a trace has a trail
        self.resizeDocks([self.properties_dock], [320], Qt.Orientation.Horizontal)
        self.resizeDocks([self.minimap_dock], [330], Qt.Orientation.Horizontal)
        self.resizeDocks([self.minimap_dock, self.associated_dock], [260, 640],
                         Qt.Orientation.Vertical)

    def _dock(self, title: str, name: str, widget: QWidget) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)  # saveState/restoreState find docks by name
        dock.setWidget(widget)
        return dock

    def add_dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea,
                 beside: QDockWidget | None = None) -> QDockWidget:
        """A feature's dock: in ``area``, tabbed with ``beside`` when given, and listed in View
        (features call this from their ``install_...``)."""
        dock = self._dock(title, name, widget)
        self.addDockWidget(area, dock)
        if beside is not None:
            self.tabifyDockWidget(beside, dock)
        self.view_menu.addAction(dock.toggleViewAction())
        return dock

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.magnification_label = QLabel("—")
        self.magnification_label.setToolTip("Magnification on screen")
        self.position_label = QLabel("")
        self.position_label.setToolTip("Cursor position in level-0 pixels and microns")
        bar.addPermanentWidget(self.position_label)
        bar.addPermanentWidget(self.magnification_label)

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self.open_action = self._action("&Open…", self.open_dialog, QKeySequence.StandardKey.Open)
        file_menu.addAction(self.open_action)
        self.recent_menu = file_menu.addMenu("Open &Recent")
        self.recent_menu.aboutToShow.connect(self._rebuild_recent_menu)
        self._rebuild_recent_menu()
        file_menu.addSeparator()
        self.export_action = self._action("&Export View as PNG…", self.export_dialog, "Ctrl+E")
        file_menu.addAction(self.export_action)
        file_menu.addSeparator()
        self.open_trace_action = self._action("Open &Trace…", self.open_trace_dialog)
        self.save_trace_action = self._action("&Save Trace…", self.save_trace_dialog, QKeySequence.StandardKey.Save)
        self.geojson_action = self._action("Export Trace as &GeoJSON…", self.geojson_dialog)
        self.figure_action = self._action("Export &Figure with Legend…", self.figure_dialog)
        for action in (self.open_trace_action, self.save_trace_action, self.geojson_action, self.figure_action):
            file_menu.addAction(action)
        file_menu.addSeparator()
        file_menu.addAction(self._action("&Quit", self.close, QKeySequence.StandardKey.Quit))

        view_menu = self.menuBar().addMenu("&View")
        self.fit_action = self._action("&Fit Slide", lambda: self.canvas.fit_view(), "F")
        self.zoom_in_action = self._action("Zoom &In", lambda: self.canvas.zoom_by(2.0), "+")
        self.zoom_in_action.setShortcuts([QKeySequence("+"), QKeySequence("="), QKeySequence.StandardKey.ZoomIn])
        self.zoom_out_action = self._action("Zoom &Out", lambda: self.canvas.zoom_by(0.5), "-")
        self.zoom_out_action.setShortcuts([QKeySequence("-"), QKeySequence.StandardKey.ZoomOut])
        for action in (self.fit_action, self.zoom_in_action, self.zoom_out_action):
            view_menu.addAction(action)
        view_menu.addSeparator()
        self.magnification_actions: list[QAction] = []
        for key, mag in enumerate(MAGNIFICATIONS, start=1):
            action = self._action(f"{mag}x", lambda m=mag: self.go_to_magnification(float(m)), str(key))
            self.magnification_actions.append(action)
            view_menu.addAction(action)
        view_menu.addSeparator()
        self.display_adjust = DisplayAdjustController(self.canvas, self.settings, self)
        self.display_action = self._action("Adjust &Display…", self.display_adjust.show_dialog,
                                           "Ctrl+Shift+D")
        view_menu.addAction(self.display_action)
        view_menu.addSeparator()
        self.view_menu = view_menu
        for dock in (self.minimap_dock, self.properties_dock, self.associated_dock, self.layers_dock,
                     self.models_dock, self.trail_dock):
            view_menu.addAction(dock.toggleViewAction())

        model_menu = self.menuBar().addMenu("&Model")
        self.run_action = self._action("&Run", lambda: self.models_panel.run_button.click(), "Ctrl+R")
        self.cancel_action = self._action("&Cancel Run", self.inference.cancel, "Esc")
        self.step_back_action = self._action("Step &Back", lambda: self.inference.step(-1), "[")
        self.step_next_action = self._action("Step &Forward", lambda: self.inference.step(1), "]")
        for action in (self.run_action, self.cancel_action, self.step_back_action, self.step_next_action):
            model_menu.addAction(action)
        model_menu.addSeparator()
        self.train_action = self._action("&Train or Fine-tune…", self.show_training_dialog, "Ctrl+T")
        model_menu.addAction(self.train_action)
        self.training_dialog = None
        self.help_menu = install_help_menu(self)

    def go_to_magnification(self, mag: float) -> None:
        """Keys 1-5; a slide with no scale says why nothing happens instead of ignoring them."""
        if self.slide is not None and self.canvas.scale_for_magnification(mag) is None:
            self.statusBar().showMessage(NO_MAGNIFICATION, 8000)
            return
        self.canvas.set_magnification(mag)

    def _action(self, text: str, slot, shortcut=None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(lambda _checked=False: slot())
        self.addAction(action)  # shortcuts work even while the menu bar is hidden
        return action

    def _connect_canvas(self) -> None:
        self.canvas.view_changed.connect(self._on_view_changed)
        self.canvas.cursor_moved.connect(self._on_cursor_moved)
        self.canvas.tile_failed.connect(self._on_tile_failed)
        self.inference.trace_changed.connect(self._on_trace_changed)
        # Moving the view yourself stops Play, and F always wins over it.
        for action in (self.fit_action, self.zoom_in_action, self.zoom_out_action, *self.magnification_actions):
            action.triggered.connect(self.inference.stop_playing)
        self.inference.watch_navigation(self.minimap)

    # -- opening slides ------------------------------------------------------------------
    @property
    def slide(self) -> Slide | None:
        return self.canvas.slide

    @property
    def is_opening(self) -> bool:
        return self._opening is not None

    def wait_for_workers(self, msecs: int = 10_000) -> bool:
        """Block until background jobs (opens, exports, associated images and the thumbnail)
        finish; their results still arrive through the event loop. For scripts and tests."""
        return self._jobs.wait(msecs) and self.canvas.store.wait_reads(msecs)

    def open_dialog(self) -> None:
        start = str(self.slide.path.parent) if self.slide is not None else str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self, "Open slide", start, SLIDE_FILTER)
        if path:
            self.open_slide(path)

    def open_slide(self, path: str | os.PathLike) -> None:
        """Open ``path`` in a worker; ``slide_opened`` or ``open_failed`` follows.

        The last request wins: a slide that finishes opening after a newer request is dropped.
        """
        self._open_token += 1
        token = self._open_token
        text = str(path)
        self._opening = text
        self.statusBar().showMessage(f"Opening {Path(text).name}…")
        self._jobs.submit(
            lambda: Slide(text),
            lambda slide: self._on_slide_ready(token, text, slide),
            lambda exc: self._on_slide_failed(token, text, exc),
        )

    def _on_slide_ready(self, token: int, path: str, slide: Slide) -> None:
        if token != self._open_token:
            slide.close()  # superseded by a newer request; nothing else holds it
            return
        self._opening = None
        self.statusBar().clearMessage()
        # The previous slide is not closed here: tile workers may still be reading it, and
        # it is released once the last of them lets go of it.
        self.canvas.set_slide(slide)  # shows it fitted
        self.position_label.setText("")  # the old slide's cursor (and its µm) is gone
        self.inference.slide_changed()
        self.properties_panel.set_slide(slide)
        self.associated_panel.set_slide(slide)
        self.setWindowTitle(f"{slide.path.name} — {APPLICATION}")
        self.setWindowFilePath(str(slide.path))
        self.last_error = None
        self.settings.add_recent(slide.path)
        self._rebuild_recent_menu()
        self._update_actions()
        self._on_view_changed(None)
        self.slide_opened.emit(str(slide.path))

    def _on_slide_failed(self, token: int, path: str, exc: BaseException) -> None:
        if token != self._open_token:
            return
        self._opening = None
        self.statusBar().clearMessage()
        if isinstance(exc, SlideError):
            message = str(exc)
        else:
            message = f"{Path(path).name}: cannot be opened ({type(exc).__name__}: {exc})"
        self.show_error("Cannot open slide", message)
        self.open_failed.emit(message)

    def show_error(self, title: str, message: str) -> None:
        self.last_error = message
        QMessageBox.critical(self, title, message)

    # -- recent files --------------------------------------------------------------------
    def _rebuild_recent_menu(self) -> None:
        menu = self.recent_menu
        menu.clear()
        files = self.settings.recent_files()
        if not files:
            empty = menu.addAction("No recent slides")
            empty.setEnabled(False)
            return
        for i, (path, name) in enumerate(zip(files, distinguishing_labels(files)), start=1):
            label = f"&{i % 10}  {name}" if i <= 10 else name
            action = menu.addAction(label)
            action.setToolTip(path)
            action.setStatusTip(path)
            action.triggered.connect(lambda _checked=False, p=path: self.open_slide(p))
        menu.addSeparator()
        clear = menu.addAction("Clear Recent")
        clear.triggered.connect(self._clear_recent)

    def _clear_recent(self) -> None:
        self.settings.clear_recent()
        self._rebuild_recent_menu()

    # -- drag and drop -------------------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 - Qt override
        if _first_local_file(event.mimeData()) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event) -> None:  # noqa: N802 - Qt override
        if _first_local_file(event.mimeData()) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802 - Qt override
        if self.open_mime(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def open_mime(self, mime: QMimeData) -> bool:
        """Open the first local file in dropped data; False when there is none."""
        path = _first_local_file(mime)
        if path is None:
            return False
        self.open_slide(path)
        return True

    # -- export --------------------------------------------------------------------------
    def export_dialog(self) -> None:
        if self.slide is None:
            self.show_error("Nothing to export", "Open a slide first.")
            return
        start = str(self.slide.path.with_name(self.slide.path.stem + "-view.png"))
        path, _ = QFileDialog.getSaveFileName(self, "Export view as PNG", start, "PNG image (*.png)")
        if path:
            self.start_export_view(path)

    def export_view(self, path: str | os.PathLike, width: int | None = None,
                    height: int | None = None) -> bool:
        """Render the current view (with visible overlays) to a PNG, atomically, and wait for
        it: for scripts and tests. The menu runs ``start_export_view`` instead."""
        return self._wait_export(self.start_export_view(path, width, height, show_progress=False))

    def start_export_view(self, path: str | os.PathLike, width: int | None = None,
                          height: int | None = None, show_progress: bool = True) -> ExportJob | None:
        """Export the view as PNG in a worker, with progress and Cancel; the job, or None when
        refused at once (the error is shown). ``view_exported`` follows success."""
        if self.slide is None:
            self.show_error("Nothing to export", "Open a slide first.")
            return None
        target = Path(path)
        if target.suffix.lower() != ".png":
            target = target.with_name(target.name + ".png")
        w = int(width or self.canvas.width())
        h = int(height or self.canvas.height())
        try:
            plan = self.canvas.plan_render(w, h)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, never a crash
            self.show_error("Export failed", f"{target}: {exc}")
            return None

        def work(cancel, progress) -> None:
            total = len(plan.missing) + 1
            image = plan.render(cancel, lambda done, _n: progress(done, total))
            _write_png(image, target, cancel)

        job = self._run_export(f"Exporting {target.name}…", target, work, show_progress,
                               lambda msg: self.show_error("Export failed", f"{target}: {msg}"))
        job.finished.connect(lambda _p: (
            self.statusBar().showMessage(f"Exported {target.name} ({w} × {h})", 5000),
            self.view_exported.emit(str(target))))
        return job

    def _run_export(self, label: str, target: Path, work, show_progress: bool,
                    on_error) -> ExportJob:
        """Start ``work`` on the job threads; a progress dialog with Cancel follows it."""
        job = ExportJob(label, target, work, self)
        self.exports.append(job)
        job.failed.connect(on_error)

        def ended(*_args) -> None:
            if job in self.exports:
                self.exports.remove(job)
            job.deleteLater()

        for sig in (job.finished, job.failed, job.cancelled):
            sig.connect(ended)
        job.cancelled.connect(lambda: self.statusBar().showMessage(f"{target.name}: export cancelled", 5000))
        if show_progress:
            self._progress_dialog(job, label)
        if not self._jobs.submit(job.run, job.deliver, job.deliver):
            job.abandon()  # the window is closing: report it as cancelled
            QTimer.singleShot(0, job.finish_now)
        return job

    def _progress_dialog(self, job: ExportJob, label: str) -> QProgressDialog:
        dialog = QProgressDialog(label, "Cancel", 0, 0, self)
        dialog.setWindowTitle("Export")
        dialog.setWindowModality(Qt.WindowModality.NonModal)
        dialog.setMinimumDuration(PROGRESS_AFTER_MS)
        dialog.setAutoClose(False)
        dialog.setAutoReset(False)
        dialog.setValue(0)  # starts the clock: the dialog shows once the export outlasts the minimum
        dialog.canceled.connect(job.cancel)

        def step(done: int, total: int) -> None:
            if total > 0 and dialog.maximum() != total:
                dialog.setMaximum(total)
            dialog.setValue(min(done, total) if total > 0 else 0)

        def close(*_args) -> None:
            dialog.canceled.disconnect(job.cancel)
            dialog.close()
            dialog.deleteLater()

        job.progress.connect(step)
        for sig in (job.finished, job.failed, job.cancelled):
            sig.connect(close)
        job.progress_dialog = dialog
        return dialog

    def _wait_export(self, job: ExportJob | None) -> bool:
        if job is None:
            return False
        job.wait()
        job.finish_now()
        return job.state == "done"

    def cancel_exports(self, close_dialogs: bool = False) -> None:
        for job in list(self.exports):
            job.cancel()
            if close_dialogs and job.progress_dialog is not None:
                job.progress_dialog.close()

    # -- training ------------------------------------------------------------------------
    def show_training_dialog(self):
        from app.training_dialog import TrainingDialog

        if self.training_dialog is None:
            self.training_dialog = TrainingDialog(self)
            self.training_dialog.open_checkpoint.connect(self._use_checkpoint)
        self.training_dialog.show()
        self.training_dialog.raise_()
        return self.training_dialog

    def _use_checkpoint(self, model: str, path: str) -> None:
        self.models_panel.set_model(model)
        self.models_panel.set_checkpoint(path)
        self.models_dock.show()
        self.models_dock.raise_()
        self.statusBar().showMessage(f"{model}: using {Path(path).name}", 8000)

    # -- traces --------------------------------------------------------------------------
    def _on_trace_changed(self, layers) -> None:
        if layers is None:
            return
        if layers.trace.trail or layers.trail.steps:
            if not self.trail_dock.isVisible():
                self.trail_dock.show()
                self.resizeDocks([self.trail_dock], [200], Qt.Orientation.Vertical)
        elif layers.trace.probs:  # a finished trace without a trail: nothing to plot
            self.trail_dock.hide()

    def _trace_path_dialog(self, title: str, suffix: str, filt: str, save: bool) -> str | None:
        start = ""
        if self.slide is not None:
            model = self.models_panel.model_combo.currentText()
            start = str(self.slide.path.with_name(f"{self.slide.path.stem}-{model}{suffix}"))
        if save:
            path, _ = QFileDialog.getSaveFileName(self, title, start, filt)
        else:
            path, _ = QFileDialog.getOpenFileName(self, title, str(Path(start).parent) if start else "", filt)
        return path or None

    def open_trace_dialog(self) -> None:
        path = self._trace_path_dialog("Open trace", ".trace.json", "Traces (*.json);;All files (*)", False)
        if path:
            self.open_trace(path)

    def open_trace(self, path: str | os.PathLike) -> bool:
        try:
            self.inference.open_trace(path)
        except TraceError as exc:
            self.show_error("Cannot open trace", str(exc))
            return False
        return True

    def save_trace_dialog(self) -> None:
        path = self._trace_path_dialog("Save trace", ".trace.json", "Traces (*.json)", True)
        if path:
            self.start_save_trace(path)

    def _current_trace(self, what: str):
        current = self.inference.current
        if current is None:
            raise TraceError(f"no trace to {what}: run a model first")
        return current.trace

    def start_save_trace(self, path: str | os.PathLike, show_progress: bool = True) -> ExportJob | None:
        """Save the trace on screen as JSON in a worker (atomic); None when there is none."""
        try:
            trace = self._current_trace("save")
        except TraceError as exc:
            self.show_error("Cannot save trace", str(exc))
            return None
        target = Path(path)

        def work(cancel, progress) -> None:
            progress(0, 0)
            text = trace.to_json()
            if cancel.is_set():
                raise ExportCancelled("save cancelled")
            write_atomic(target, text)

        return self._run_export(f"Saving {target.name}…", target, work, show_progress,
                                lambda msg: self.show_error("Cannot save trace", msg))

    def geojson_dialog(self) -> None:
        path = self._trace_path_dialog("Export GeoJSON", ".geojson", "GeoJSON (*.geojson *.json)", True)
        if path:
            self.start_export_geojson(path)

    def start_export_geojson(self, path: str | os.PathLike, show_progress: bool = True,
                             cells: bool = False) -> ExportJob | None:
        """Export the trace on screen as GeoJSON in a worker, streamed, with progress: its
        attention as iso-contours (``engines.map_export``), or one feature per cell with
        ``cells``."""
        try:
            trace = self._current_trace("export")
        except TraceError as exc:
            self.show_error("Cannot export GeoJSON", str(exc))
            return None
        target = Path(path)

        def work(cancel, progress) -> None:
            from engines import map_export

            if cells:
                trace.save_geojson(target, progress=progress, cancel=cancel)
            else:
                map_export.save_contours_geojson(trace, target, progress=progress, cancel=cancel)

        return self._run_export(f"Exporting {target.name}…", target, work, show_progress,
                                lambda msg: self.show_error("Cannot export GeoJSON", msg))

    def figure_dialog(self) -> None:
        path = self._trace_path_dialog("Export figure", "-figure.png", "PNG image (*.png)", True)
        if path:
            self.start_export_figure(path)

    def export_figure(self, path: str | os.PathLike, width: int | None = None, height: int | None = None) -> bool:
        """The view with overlays and a legend, as a PNG (atomic), waited for: for scripts and
        tests. The menu runs ``start_export_figure``."""
        return self._wait_export(self.start_export_figure(path, width, height, show_progress=False))

    def start_export_figure(self, path: str | os.PathLike, width: int | None = None,
                            height: int | None = None, show_progress: bool = True) -> ExportJob | None:
        if self.slide is None:
            self.show_error("Nothing to export", "Open a slide first.")
            return None
        w, h = int(width or self.canvas.width()), int(height or self.canvas.height())
        target = Path(path)
        try:
            plan = self.canvas.plan_render(w, h)
        except Exception as exc:  # noqa: BLE001 - reported to the user, never a crash
            self.show_error("Export failed", str(exc))
            return None
        entries = legend_entries(plan.overlays)
        title = ""
        current = self.inference.current
        if current is not None and current.trace.probs:
            t = current.trace
            title = f"{t.model}: {t.prediction} ({max(t.probs):.2f})"

        def work(cancel, progress) -> None:
            total = len(plan.missing) + 1
            image = plan.render(cancel, lambda done, _n: progress(done, total))
            draw_legend(image, entries, title)
            _write_png(image, target, cancel)

        return self._run_export(f"Exporting {target.name}…", target, work, show_progress,
                                lambda msg: self.show_error("Export failed", msg))

    def _guarded(self, title: str, fn) -> bool:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported to the user, never a crash
            self.show_error(title, str(exc))
            return False
        return True

    # -- status bar ----------------------------------------------------------------------
    def _on_view_changed(self, _rect) -> None:
        if self.slide is None:
            self.magnification_label.setText("—")
            return
        mag = self.canvas.current_magnification()
        if mag is not None:
            self.magnification_label.setText(f"{mag:.1f}x")
        else:
            self.magnification_label.setText(f"{self.canvas.camera.scale * 100:.0f}%")

    def _on_cursor_moved(self, x: float, y: float) -> None:
        self.position_label.setText(format_position(x, y, self.slide.mpp if self.slide else None))

    def _on_tile_failed(self, message: str) -> None:
        self.statusBar().showMessage(f"Tile error: {message}", TILE_ERROR_MS)

    def _update_actions(self) -> None:
        has_slide = self.slide is not None
        for action in [self.export_action, self.fit_action, self.zoom_in_action,
                       self.zoom_out_action, *self.magnification_actions]:
            action.setEnabled(has_slide)

    # -- layout persistence --------------------------------------------------------------
    def _restore_layout(self) -> None:
        geometry, state = self.settings.window_layout()
        if geometry is None or not self.restoreGeometry(geometry):
            self.resize(1400, 900)
        if state is not None:
            self.restoreState(state)

    def save_layout(self) -> None:
        self.settings.save_window_layout(self.saveGeometry(), self.saveState())

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt override
        """Cancel everything first, then stop each owner with a bounded wait. Work that ignores
        cancel (a long C call) is left to the process, which waits for it, bounded, when the
        application quits (``viewer.workers``): closing mid-run never aborts the process."""
        self.save_layout()
        self.cancel_exports(close_dialogs=True)
        self._jobs.clear()
        self.inference.cancel()
        self.inference.shutdown()  # the engine: cancel, wait up to its shutdown limit
        if self.training_dialog is not None:
            self.training_dialog.shutdown()
        self._jobs.shutdown(CLOSE_WAIT_MS)
        self.results.shutdown(CLOSE_WAIT_MS)  # project traces being read
        self.canvas.shutdown(CLOSE_WAIT_MS)  # the region store: tiles, thumbnail, images
        super().closeEvent(event)


def format_position(x: float, y: float, mpp: float | None) -> str:
    """Cursor text for the status bar: level-0 pixels, and microns when the scale is known."""
    text = f"x {x:,.0f}  y {y:,.0f} px"
    if mpp and math.isfinite(mpp) and mpp > 0:
        text += f"   ({x * mpp:,.1f}, {y * mpp:,.1f} µm)"
    return text


def _first_local_file(mime: QMimeData | None) -> str | None:
    if mime is None or not mime.hasUrls():
        return None
    for url in mime.urls():
        if url.isLocalFile() and url.toLocalFile():
            return url.toLocalFile()
    return None


def _save_png_atomic(image, target: Path) -> None:
    write_atomic(Path(target), png_bytes(image))


def _write_png(image, target: Path, cancel) -> None:
    """Encode, then write atomically unless cancelled first (no file, no temporary file)."""
    data = png_bytes(image)
    if cancel.is_set():
        raise ExportCancelled("export cancelled")
    write_atomic(Path(target), data)


def launch(slide_path: str | None = None, model: str | None = None,
           checkpoint: str | None = None, project: str | None = None) -> int:
    """Run the viewer on ``slide_path`` (the bundled demo slide when None and no ``project``,
    a project file, manifest or folder, is given); the exit code."""
    app = QApplication.instance()
    if app is None:
        app = QApplication(sys.argv[:1])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    window = MainWindow(model=model, checkpoint=checkpoint)
    window.show()
    # Open once the event loop runs, so the window appears before the first decode.
    with_project = project is not None and hasattr(window, "open_project")
    if with_project:
        QTimer.singleShot(0, lambda: window.open_project(project))
    if slide_path is not None or not with_project:
        QTimer.singleShot(0, lambda: window.open_slide(slide_path or DEMO_SLIDE))
    return app.exec()
