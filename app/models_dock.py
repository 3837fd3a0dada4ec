"""The Models dock: choose a model, preset and checkpoint, run it, watch its progress and
prediction; and the controls to step through what it looked at."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QHeaderView, QLabel,
    QProgressBar, QPushButton, QSlider, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from engines import registry
from viewer.overlays import colormaps

SCOPES = ("Whole slide", "Current view", "Drawn rectangle")
MAX_RECENT_CHECKPOINTS = 8
NO_CHECKPOINT = "(initial weights)"
RESOURCES = Path(__file__).resolve().parents[1] / "resources"


def bundled_checkpoint(model: str) -> str | None:
    """The demo checkpoint shipped for ``model``, if any."""
    p = RESOURCES / "checkpoints" / f"{model}.pt"
    return str(p) if p.is_file() else None


@dataclass
class RunRequest:
    model: str
    preset: str
    checkpoint: str | None
    scope: str


class ModelsPanel(QWidget):
    run_requested = Signal(object)  # RunRequest
    cancel_requested = Signal()
    step_requested = Signal(int)  # -1 back, +1 forward
    play_toggled = Signal(bool)
    colormap_changed = Signal(str)
    joint_changed = Signal(bool)
    smooth_changed = Signal(bool)
    map_chosen = Signal(int)  # index into the current trace's maps
    map_opacity_changed = Signal(float)
    compare_changed = Signal(str)  # a model whose trace shows alongside, "" for none

    def __init__(self, settings: QSettings | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._settings = settings
        self._started = 0.0
        self._timer = QTimer(self)
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._tick)

        self.model_combo = QComboBox()
        self.model_combo.addItems(registry.list_models())
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(["tiny", "paper"])
        self._chosen: dict[str, str | None] = {}  # model -> checkpoint chosen for it
        self._refreshing = False
        self.checkpoint_combo = QComboBox()
        self.checkpoint_combo.currentIndexChanged.connect(self._remember_checkpoint)
        self.checkpoint_combo.setEditable(False)
        self.checkpoint_combo.setMinimumContentsLength(12)
        self.checkpoint_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        browse = QPushButton("…")
        browse.setToolTip("Choose a checkpoint file")
        browse.setFixedWidth(28)
        browse.clicked.connect(self.browse_checkpoint)
        ck_row = QHBoxLayout()
        ck_row.addWidget(self.checkpoint_combo, 1)
        ck_row.addWidget(browse)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.scope_combo.setToolTip("Shift+drag on the slide draws the rectangle")

        form = QFormLayout()
        form.addRow("Model", self.model_combo)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Checkpoint", ck_row)
        form.addRow("Run on", self.scope_combo)

        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(self._request_run)
        self.cancel_button.clicked.connect(self.cancel_requested)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.stage_label = QLabel("Ready")
        self.stage_label.setWordWrap(True)
        self.elapsed_label = QLabel("")
        self.error_label = QLabel("")
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #b00020;")
        self.error_label.hide()

        self.prediction = QTableWidget(0, 2)
        self.prediction.setHorizontalHeaderLabels(["Class", "Probability"])
        self.prediction.verticalHeader().hide()
        self.prediction.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.prediction.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.prediction.setMaximumHeight(90)

        # Stepping through the magnification path.
        path_box = QGroupBox("Magnification path")
        self.back_button = QPushButton("◀ [")
        self.play_button = QPushButton("Play")
        self.play_button.setCheckable(True)
        self.next_button = QPushButton("] ▶")
        self.back_button.clicked.connect(lambda: self.step_requested.emit(-1))
        self.next_button.clicked.connect(lambda: self.step_requested.emit(1))
        self.play_button.toggled.connect(self.play_toggled)
        self.path_label = QLabel("—")
        self.path_label.setWordWrap(True)
        prow = QHBoxLayout()
        for b in (self.back_button, self.play_button, self.next_button):
            prow.addWidget(b)
        pl = QVBoxLayout(path_box)
        pl.addLayout(prow)
        pl.addWidget(self.path_label)

        # Attention map display.
        maps_box = QGroupBox("Attention maps")
        self.colormap_combo = QComboBox()
        self.colormap_combo.addItems(colormaps.PERCEPTUAL)
        self.colormap_combo.currentTextChanged.connect(self.colormap_changed)
        self.joint_check = QCheckBox("Normalise jointly")
        self.joint_check.toggled.connect(self.joint_changed)
        self.smooth_check = QCheckBox("Smooth")
        self.smooth_check.toggled.connect(self.smooth_changed)
        # One map of those stacked on a region (e.g. one of grid attention's 64 filters).
        self.map_combo = QComboBox()
        self.map_combo.setMinimumContentsLength(10)
        self.map_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.map_combo.activated.connect(self.map_chosen)
        self.map_opacity = QSlider(Qt.Orientation.Horizontal)
        self.map_opacity.setRange(0, 100)
        self.map_opacity.setValue(60)
        self.map_opacity.setToolTip("Opacity of the attention maps")
        self.map_opacity.valueChanged.connect(lambda v: self.map_opacity_changed.emit(v / 100.0))
        ml = QFormLayout(maps_box)
        ml.addRow("Map", self.map_combo)
        ml.addRow("Colormap", self.colormap_combo)
        ml.addRow("Opacity", self.map_opacity)
        ml.addRow(self.joint_check)
        ml.addRow(self.smooth_check)
        self.compare_combo = QComboBox()
        self.compare_combo.setToolTip("Show another model's trace of this slide as well")
        self.compare_combo.addItem("(none)", "")
        self.compare_combo.activated.connect(lambda i: self.compare_changed.emit(self.compare_combo.itemData(i) or ""))
        ml.addRow("Compare with", self.compare_combo)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.stage_label)
        layout.addWidget(self.elapsed_label)
        layout.addWidget(self.error_label)
        layout.addWidget(QLabel("Prediction"))
        layout.addWidget(self.prediction)
        layout.addWidget(path_box)
        layout.addWidget(maps_box)
        layout.addStretch(1)

        self.model_combo.currentTextChanged.connect(self._refresh_checkpoints)
        self._refresh_checkpoints()

    # -- checkpoints -----------------------------------------------------------------------
    def _recent(self) -> list[str]:
        if self._settings is None:
            return []
        value = self._settings.value("models/recent_checkpoints", [])
        if isinstance(value, str):
            value = [value]
        return [v for v in (value or []) if Path(v).is_file()]

    def add_recent_checkpoint(self, path: str) -> None:
        if self._settings is None:
            return
        items = [path] + [p for p in self._recent() if p != path]
        self._settings.setValue("models/recent_checkpoints", items[:MAX_RECENT_CHECKPOINTS])

    def _remember_checkpoint(self, *_: object) -> None:
        # Any selection not made by the refresh itself is the user's (or a caller's) choice
        # for this model, kept when the model is switched away and back.
        if not self._refreshing:
            self._chosen[self.model_combo.currentText()] = self.checkpoint()

    def _refresh_checkpoints(self, *_: object) -> None:
        self._refreshing = True
        try:
            self._fill_checkpoints()
        finally:
            self._refreshing = False

    def _fill_checkpoints(self) -> None:
        """The list for the current model: initial weights, its demo checkpoint, recent files;
        selected: the model's last choice, else its demo checkpoint, else initial weights."""
        model = self.model_combo.currentText()
        self.checkpoint_combo.clear()
        self.checkpoint_combo.addItem(NO_CHECKPOINT, None)
        bundled = bundled_checkpoint(model)
        if bundled:
            self.checkpoint_combo.addItem(f"demo: {Path(bundled).name}", bundled)
        for p in self._recent():
            if p != bundled:
                self.checkpoint_combo.addItem(Path(p).name, p)
        for i in range(self.checkpoint_combo.count()):
            self.checkpoint_combo.setItemData(i, self.checkpoint_combo.itemData(i) or "", Qt.ItemDataRole.ToolTipRole)
        want = self._chosen.get(model, bundled)
        idx = self.checkpoint_combo.findData(want) if want else 0
        self.checkpoint_combo.setCurrentIndex(max(idx, 0))

    def set_checkpoint(self, path: str | None) -> None:
        if path:
            self.add_recent_checkpoint(str(path))
            self._refresh_checkpoints()
            idx = self.checkpoint_combo.findData(str(path))
            if idx < 0:
                self.checkpoint_combo.addItem(Path(path).name, str(path))
                idx = self.checkpoint_combo.count() - 1
            self.checkpoint_combo.setCurrentIndex(idx)
        else:
            self.checkpoint_combo.setCurrentIndex(0)

    def checkpoint(self) -> str | None:
        data = self.checkpoint_combo.currentData()
        return str(data) if data else None

    def browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", "", "Checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.set_checkpoint(path)

    def set_model(self, name: str) -> None:
        idx = self.model_combo.findText(name)
        if idx >= 0:
            self.model_combo.setCurrentIndex(idx)

    # -- running ---------------------------------------------------------------------------
    def request(self) -> RunRequest:
        return RunRequest(self.model_combo.currentText(), self.preset_combo.currentText(),
                          self.checkpoint(), self.scope_combo.currentText())

    def _request_run(self) -> None:
        self.run_requested.emit(self.request())

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self._started = time.monotonic()
            self.error_label.hide()
            self.progress.setRange(0, 0)  # busy until the first progress event
            self.stage_label.setText("Starting…")
            self._timer.start()
        else:
            self._timer.stop()
            self._tick()

    def set_progress(self, done: int, total: int, stage: str) -> None:
        if total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(min(done, total))
        self.stage_label.setText(stage or f"{done} / {total}")

    def _tick(self) -> None:
        if self._started:
            self.elapsed_label.setText(f"Elapsed {time.monotonic() - self._started:.1f} s")

    def set_finished(self, classes: list[str], probs: list[float], note: str = "Done") -> None:
        self.set_running(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.stage_label.setText(note)
        self.show_prediction(classes, probs)

    def show_prediction(self, classes: list[str], probs: list[float]) -> None:
        self.prediction.setRowCount(len(classes))
        best = max(range(len(probs)), key=probs.__getitem__) if probs else -1
        for i, (c, p) in enumerate(zip(classes, probs)):
            a, b = QTableWidgetItem(c), QTableWidgetItem(f"{p:.3f}")
            if i == best:
                f = a.font()
                f.setBold(True)
                a.setFont(f)
                b.setFont(f)
            self.prediction.setItem(i, 0, a)
            self.prediction.setItem(i, 1, b)

    def set_cancelled(self) -> None:
        self.set_running(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.stage_label.setText("Cancelled")

    def set_error(self, message: str) -> None:
        self.set_running(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.stage_label.setText("Failed")
        self.error_label.setText(message)
        self.error_label.show()

    # -- map chooser and comparison (filled by the inference controller) -------------------
    def set_maps(self, names: list[str], current: int = -1) -> None:
        self.map_combo.blockSignals(True)
        self.map_combo.clear()
        self.map_combo.addItems(names)
        self.map_combo.setCurrentIndex(current if 0 <= current < len(names) else (0 if names else -1))
        self.map_combo.setEnabled(bool(names))
        self.map_combo.blockSignals(False)

    def set_compare_choices(self, models: list[str], current: str = "") -> None:
        self.compare_combo.blockSignals(True)
        self.compare_combo.clear()
        self.compare_combo.addItem("(none)", "")
        for m in models:
            self.compare_combo.addItem(m, m)
        idx = self.compare_combo.findData(current) if current else 0
        self.compare_combo.setCurrentIndex(max(idx, 0))
        self.compare_combo.setEnabled(bool(models))
        self.compare_combo.blockSignals(False)
