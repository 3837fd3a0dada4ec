"""The Map display dock: how the chosen attention map is scaled (linear, rank, log) and the
threshold below which its cells are transparent.

The choice is kept per map name: in the open project (``Project.map_display``, saved with it)
or, with no project, in QSettings. It applies to every trace shown with a map of that name.
"""
from __future__ import annotations

import json

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QSlider, QWidget

from engines.project import ProjectError
from viewer.overlays.heatmap import SCALINGS, HeatmapOverlay

SETTINGS_KEY = "map_display/by_map"  # one JSON object: map name -> display (names may hold "/")
SAVE_DELAY_MS = 600  # a dragged slider writes the project once it rests
DEFAULT = {"scaling": "linear", "threshold": 0.0}
SCALING_TIPS = {
    "linear": "Colour in proportion to the value, from the map's lowest to its highest",
    "rank": "Colour by percentile among the map's non-zero cells: a map whose mass sits in a "
            "few cells still shows the order of the rest",
    "log": "Colour by log10 of the value, over four decades below the map's maximum",
}


def chosen_overlay(layers, index: int | None = None) -> HeatmapOverlay | None:
    """The map a trace's controls act on: map ``index`` when the Models dock chose one, else
    the trace's first visible map, else its first."""
    if layers is None or not layers.maps:
        return None
    if index is not None and 0 <= index < len(layers.maps):
        return layers.maps[index]
    return next((o for o in layers.maps if o.visible), layers.maps[0])


def clean_display(raw) -> dict:
    """A stored display made safe to apply (unknown scaling or bad threshold: defaults)."""
    if not isinstance(raw, dict):
        return dict(DEFAULT)
    scaling = raw.get("scaling") if raw.get("scaling") in SCALINGS else "linear"
    try:
        threshold = min(max(float(raw.get("threshold", 0.0)), 0.0), 1.0)
    except (TypeError, ValueError):
        threshold = 0.0
    if threshold != threshold:  # NaN
        threshold = 0.0
    return {"scaling": scaling, "threshold": threshold}


class MapDisplayPanel(QWidget):
    """Scaling and threshold of one map."""

    changed = Signal(str, float)  # scaling, threshold (0-1)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.map_label = QLabel("—")
        self.map_label.setToolTip("The map these settings belong to (choose it in the Models dock)")
        self.scaling_combo = QComboBox()
        for i, name in enumerate(SCALINGS):
            self.scaling_combo.addItem(name)
            self.scaling_combo.setItemData(i, SCALING_TIPS[name], Qt.ItemDataRole.ToolTipRole)
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setToolTip("Cells scaled below this are transparent")
        self.threshold_label = QLabel("0.00")
        self.threshold_label.setMinimumWidth(32)
        row = QWidget()
        h = QHBoxLayout(row)
        h.setContentsMargins(0, 0, 0, 0)
        h.addWidget(self.threshold_slider, 1)
        h.addWidget(self.threshold_label)
        form = QFormLayout(self)
        form.addRow("Map", self.map_label)
        form.addRow("Scaling", self.scaling_combo)
        form.addRow("Threshold", row)
        self.scaling_combo.currentTextChanged.connect(lambda _t: self._emit())
        self.threshold_slider.valueChanged.connect(lambda _v: self._emit())
        self.show_map(None, DEFAULT)

    def threshold(self) -> float:
        return self.threshold_slider.value() / 100.0

    def _emit(self) -> None:
        self.threshold_label.setText(f"{self.threshold():.2f}")
        self.changed.emit(self.scaling_combo.currentText(), self.threshold())

    def show_map(self, name: str | None, display: dict) -> None:
        """Show ``name``'s settings without emitting ``changed``."""
        d = clean_display(display)
        for w in (self.scaling_combo, self.threshold_slider):
            w.blockSignals(True)
        self.scaling_combo.setCurrentText(d["scaling"])
        self.threshold_slider.setValue(round(d["threshold"] * 100))
        for w in (self.scaling_combo, self.threshold_slider):
            w.blockSignals(False)
        self.threshold_label.setText(f"{self.threshold():.2f}")
        self.map_label.setText(name or "— (no map)")
        self.setEnabled(name is not None)


class MapDisplayController(QObject):
    """Keeps the panel, the shown traces and the stored choices in step."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.window = window
        self.panel = MapDisplayPanel()
        self.chosen: HeatmapOverlay | None = None
        self._layers = None  # the trace whose maps the panel follows
        self._settings_display: dict[str, dict] = self._load_settings()
        self._save_timer = QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(SAVE_DELAY_MS)
        self._save_timer.timeout.connect(self.flush)
        self._connected_results = False
        self.last_error: str | None = None
        self.panel.changed.connect(self._on_panel)
        window.inference.trace_changed.connect(self._on_trace)
        window.models_panel.map_chosen.connect(lambda i: self._follow(window.inference.current, i))
        self._connect_results()
        QTimer.singleShot(0, self._connect_results)  # the results store may be installed later
        window.installEventFilter(self)  # a choice made just before closing is still written

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        if obj is self.window and event.type() == QEvent.Type.Close and self._save_timer.isActive():
            self.flush()
        return False

    # -- where the choices live -------------------------------------------------------------
    def _project(self):
        results = getattr(self.window, "results", None)
        return getattr(results, "project", None) if results is not None else None

    def _connect_results(self) -> None:
        results = getattr(self.window, "results", None)
        if results is None or self._connected_results or not hasattr(results, "project_changed"):
            return
        results.project_changed.connect(lambda _p: self.refresh())
        self._connected_results = True

    def _load_settings(self) -> dict[str, dict]:
        raw = self.window.settings.qsettings.value(SETTINGS_KEY, "")
        try:
            data = json.loads(raw) if isinstance(raw, str) and raw else {}
        except ValueError:
            data = {}
        return {str(k): clean_display(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def display(self) -> dict[str, dict]:
        """Per map name, the stored choice: the project's when one is open."""
        project = self._project()
        return project.map_display if project is not None else self._settings_display

    def display_of(self, name: str) -> dict:
        return clean_display(self.display().get(name, DEFAULT))

    # -- changes ------------------------------------------------------------------------------
    def set_display(self, name: str, scaling: str, threshold: float) -> None:
        """Store ``name``'s choice, apply it to the shown traces and save it soon."""
        d = clean_display({"scaling": scaling, "threshold": threshold})
        store = self.display()
        store[name] = {**store.get(name, {}), **d}
        self._apply()
        if self.chosen is not None and self.chosen.map.name == name:
            self.panel.show_map(name, d)
        self._save_timer.start()

    def _on_panel(self, scaling: str, threshold: float) -> None:
        if self.chosen is not None:
            self.set_display(self.chosen.map.name, scaling, threshold)

    def _on_trace(self, layers) -> None:
        self._connect_results()
        if self._layers is not None and self._layers is not layers:
            try:
                self._layers.changed.disconnect(self._on_layers_changed)
            except (RuntimeError, TypeError):
                pass
        if layers is not None and layers is not self._layers:
            layers.changed.connect(self._on_layers_changed)  # a running model adds maps
        self._layers = layers
        self._apply()
        self._follow(layers)

    def _on_layers_changed(self) -> None:
        layers = self._layers
        if layers is not None and (self.chosen is None or self.chosen not in layers.maps):
            self._follow(layers)

    def _follow(self, layers, index: int | None = None) -> None:
        self.chosen = chosen_overlay(layers, index)
        name = self.chosen.map.name if self.chosen is not None else None
        self.panel.show_map(name, self.display_of(name) if name else DEFAULT)

    def refresh(self) -> None:
        """Re-read the choices (a project opened or closed) and show them."""
        self._apply()
        layers = self.window.inference.current
        keep = layers.maps.index(self.chosen) if layers is not None and self.chosen in layers.maps else None
        self._follow(layers, keep)

    def _apply(self) -> None:
        display = {k: clean_display(v) for k, v in self.display().items()}
        inf = self.window.inference
        for layers in {id(x): x for x in (inf.current, inf.compare) if x is not None}.values():
            layers.set_map_display(display)

    def flush(self) -> None:
        """Write pending choices now: into the project file when it has one, else QSettings."""
        self._save_timer.stop()
        project = self._project()
        if project is None:
            self.window.settings.qsettings.setValue(SETTINGS_KEY, json.dumps(self._settings_display))
            return
        if getattr(project, "path", None) is None:
            return  # an unsaved project keeps them until it is saved
        try:
            project.save()
            self.last_error = None
        except ProjectError as exc:
            self.last_error = str(exc)
            self.window.statusBar().showMessage(f"Map display not saved: {exc}", 8000)


def install_map_display(window) -> MapDisplayController:
    """The Map display dock, tabified with Layers, and its View menu toggle."""
    controller = MapDisplayController(window)
    dock = window.add_dock("Map display", "map_display_dock", controller.panel,
                           Qt.DockWidgetArea.LeftDockWidgetArea, beside=window.layers_dock)
    controller.dock = dock
    return controller
