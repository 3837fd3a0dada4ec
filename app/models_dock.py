"""The Models dock: choose a model, preset and checkpoint, run it, watch its progress and
prediction; and the controls to step through what it looked at."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QHeaderView, QLabel,
    QProgressBar, QPushButton, QSlider, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from app.checkpoint_info import CheckpointInfo, CheckpointInfoReader
from app.settings import as_str_list
from engines import registry
from engines.resources import resource_path
from viewer.overlays import colormaps

NO_PROJECT = "Open a project to run a model on all its slides"
PROJECT_READY = "Run the chosen model on every slide of the project"


class Scope(enum.Enum):
    """What part of the slide a run covers (the "Run on" list keeps these as item data)."""
    WHOLE = "whole"
    VIEW = "view"
    DRAWN = "drawn"


SCOPES = {Scope.WHOLE: "Whole slide", Scope.VIEW: "Current view", Scope.DRAWN: "Drawn rectangle"}
MAX_RECENT_CHECKPOINTS = 8
NO_CHECKPOINT = "(initial weights)"
WHOLE_SLIDE = "whole slide"  # the name of a trace that covers the slide
_RECENT_KEY = "models/checkpoints_of"  # + "/<model>": each model's recent checkpoints
_LEGACY_RECENT_KEY = "models/recent_checkpoints"  # one list for all models (older versions)
PRESET_TIP = "Model sizes: tiny trains on a laptop CPU, paper follows the paper"
RESOURCES = resource_path()  # package data: found in a checkout and in an installed wheel


def bundled_checkpoint(model: str) -> str | None:
    """The demo checkpoint shipped for ``model``, if any."""
    p = RESOURCES / "checkpoints" / f"{model}.pt"
    return str(p) if p.is_file() else None


@dataclass
class RunRequest:
    model: str
    preset: str
    checkpoint: str | None
    scope: Scope = Scope.WHOLE


@dataclass(frozen=True)
class MapSettings:
    """How the dock asks attention maps to be drawn."""
    colormap: str
    joint: bool
    smooth: bool
    opacity: float  # 0..1


@dataclass
class RunStatus:
    """What the dock says about the last run of one trace: shown again with that trace."""

    stage: str = "Ready"
    error: str = ""
    done: bool = False  # the progress bar full
    cancelled: bool = False


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
    compare_changed = Signal(str)  # a trace (as listed) shown alongside, "" for none
    trace_chosen = Signal(str)  # the name of one of this model's traces of the slide
    model_changed = Signal(str)  # the chosen model's registry name
    project_run_requested = Signal(object)  # RunRequest: run over every slide of the project
    project_cancel_requested = Signal()

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
        self.preset_combo.setToolTip(PRESET_TIP)
        self._user_preset = self.preset_combo.currentText()  # the preset chosen without a checkpoint
        self._syncing_preset = False
        self.preset_combo.currentTextChanged.connect(self._remember_preset)
        self._chosen: dict[str, str | None] = {}  # model -> checkpoint chosen for it
        self._unfiled: set[str] = set()  # recent checkpoints waiting to learn their model
        self._refreshing = False
        self.info_reader = CheckpointInfoReader.shared()
        self.info_reader.ready.connect(self._on_info)
        self.checkpoint_combo = QComboBox()
        self.checkpoint_combo.currentIndexChanged.connect(self._remember_checkpoint)
        self.checkpoint_combo.currentIndexChanged.connect(self._sync_preset)
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
        for scope, label in SCOPES.items():
            self.scope_combo.addItem(label, scope)
        self.scope_combo.setToolTip("Shift+drag on the slide draws the rectangle")

        # What the chosen checkpoint holds, or why it cannot be used with this model.
        self.checkpoint_note = QLabel("")
        self.checkpoint_note.setWordWrap(True)
        self.checkpoint_note.setStyleSheet("color: #555;")
        # This model's traces of the open slide, by name ("whole slide", "region ...").
        self.trace_combo = QComboBox()
        self.trace_combo.setToolTip("This model's traces of the open slide")
        self.trace_combo.setMinimumContentsLength(12)
        self.trace_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.trace_combo.activated.connect(lambda i: self.trace_chosen.emit(self.trace_combo.itemData(i) or ""))
        self.trace_combo.setEnabled(False)

        form = QFormLayout()
        form.addRow("Model", self.model_combo)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Checkpoint", ck_row)
        form.addRow("", self.checkpoint_note)
        form.addRow("Run on", self.scope_combo)
        form.addRow("Trace", self.trace_combo)

        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(self._request_run)
        self.cancel_button.clicked.connect(self.cancel_requested)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)

        # The chosen model over every slide of the open project.
        self.project_box = QGroupBox("Project")
        self.project_run_button = QPushButton("Run on project")
        self.project_run_button.setToolTip("Run the chosen model and checkpoint on every slide of the "
                                           "project; slides done before with the same checkpoint are reused")
        self.project_run_button.setEnabled(False)
        self.project_run_button.clicked.connect(lambda: self.project_run_requested.emit(self.request()))
        self.project_cancel_button = QPushButton("Cancel")
        self.project_cancel_button.setEnabled(False)
        self.project_cancel_button.clicked.connect(self.project_cancel_requested)
        self.project_progress = QProgressBar()
        self.project_progress.setRange(0, 1)
        self.project_progress.setValue(0)
        self.project_label = QLabel(NO_PROJECT)
        self.project_label.setWordWrap(True)
        prow_buttons = QHBoxLayout()
        prow_buttons.addWidget(self.project_run_button)
        prow_buttons.addWidget(self.project_cancel_button)
        project_layout = QVBoxLayout(self.project_box)
        project_layout.addLayout(prow_buttons)
        project_layout.addWidget(self.project_progress)
        project_layout.addWidget(self.project_label)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.stage_label = QLabel("Ready")
        self.stage_label.setWordWrap(True)
        # The one time figure: "Elapsed" while a run goes, then the stage says "Done in".
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
        # The trace's attention against the slide's annotations (app.attention_score).
        self.attention_score = QLabel("")
        self.attention_score.setWordWrap(True)
        self.attention_score.hide()

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
        layout.addWidget(self.attention_score)
        layout.addWidget(self.project_box)
        layout.addWidget(path_box)
        layout.addWidget(maps_box)
        layout.addStretch(1)

        self.model_combo.currentTextChanged.connect(self._refresh_checkpoints)
        self.model_combo.currentTextChanged.connect(lambda _t: self.model_changed.emit(self.model()))
        self._refresh_checkpoints()
        self._sync_preset()
        self._file_legacy_recent()

    # -- checkpoints -----------------------------------------------------------------------
    # Recent checkpoints are kept per model, so each model's list offers only its own.
    def _recent(self, model: str | None = None) -> list[str]:
        if self._settings is None:
            return []
        key = f"{_RECENT_KEY}/{model or self.model_combo.currentText()}"
        return [v for v in as_str_list(self._settings.value(key, [])) if Path(v).is_file()]

    def add_recent_checkpoint(self, path: str, model: str | None = None) -> None:
        """Remember ``path`` among ``model``'s checkpoints (its own model, read from the file,
        when not given)."""
        if self._settings is None:
            return
        path = str(path)
        if model is None:
            info = self.info_reader.cached(path)
            if info is None:
                self._unfiled.add(path)
                self.info_reader.request(path)  # filed when the file has been read
                return
            if info.model is None:
                return  # not a checkpoint: nothing to remember
            model = info.model
        items = [path] + [p for p in self._recent(model) if p != path]
        self._settings.setValue(f"{_RECENT_KEY}/{model}", items[:MAX_RECENT_CHECKPOINTS])

    def _file_legacy_recent(self) -> None:
        """Checkpoints remembered before lists were kept per model are read and filed."""
        if self._settings is None:
            return
        if not self._settings.contains(_LEGACY_RECENT_KEY):
            return
        legacy = [p for p in as_str_list(self._settings.value(_LEGACY_RECENT_KEY, [])) if Path(p).is_file()]
        self._settings.remove(_LEGACY_RECENT_KEY)
        for p in legacy:
            self.add_recent_checkpoint(p)

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
        self._sync_preset()

    def _fill_checkpoints(self) -> None:
        """The list for the current model: initial weights, its demo checkpoint, its recent
        files; selected: the model's last choice, else its demo checkpoint, else initial
        weights."""
        model = self.model_combo.currentText()
        self.checkpoint_combo.clear()
        self.checkpoint_combo.addItem(NO_CHECKPOINT, None)
        bundled = bundled_checkpoint(model)
        if bundled:
            self.checkpoint_combo.addItem(f"demo: {Path(bundled).name}", bundled)
        for p in self._recent(model):
            if p != bundled:
                self.checkpoint_combo.addItem(Path(p).name, p)
        want = self._chosen.get(model, bundled)
        if want and self.checkpoint_combo.findData(want) < 0 and Path(want).is_file():
            self.checkpoint_combo.addItem(Path(want).name, want)  # chosen on purpose, kept
        for i in range(self.checkpoint_combo.count()):
            self.checkpoint_combo.setItemData(i, self.checkpoint_combo.itemData(i) or "", Qt.ItemDataRole.ToolTipRole)
        idx = self.checkpoint_combo.findData(want) if want else 0
        self.checkpoint_combo.setCurrentIndex(max(idx, 0))

    def set_checkpoint(self, path: str | None) -> None:
        if path:
            self.add_recent_checkpoint(str(path))
            self._refresh_checkpoints()
            idx = self.checkpoint_combo.findData(str(path))
            if idx < 0:
                self.checkpoint_combo.addItem(Path(path).name, str(path))
                self.checkpoint_combo.setItemData(self.checkpoint_combo.count() - 1, str(path),
                                                  Qt.ItemDataRole.ToolTipRole)
                idx = self.checkpoint_combo.count() - 1
            self.checkpoint_combo.setCurrentIndex(idx)
        else:
            self.checkpoint_combo.setCurrentIndex(0)

    def checkpoint(self) -> str | None:
        data = self.checkpoint_combo.currentData()
        return str(data) if data else None

    def checkpoint_info(self) -> CheckpointInfo | None:
        """What the chosen checkpoint holds, once read (None: initial weights or not yet read)."""
        path = self.checkpoint()
        return self.info_reader.cached(path) if path else None

    def browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", "", "Checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.set_checkpoint(path)

    def set_model(self, name: str) -> None:
        idx = self.model_combo.findText(name)
        if idx >= 0:
            self.model_combo.setCurrentIndex(idx)

    # -- the preset follows the checkpoint ---------------------------------------------------
    def _remember_preset(self, text: str) -> None:
        if not self._syncing_preset:
            self._user_preset = text

    def _show_preset(self, preset: str) -> None:
        self._syncing_preset = True
        try:
            if self.preset_combo.findText(preset) < 0:
                self.preset_combo.addItem(preset)  # a preset this version does not list
            self.preset_combo.setCurrentText(preset)
        finally:
            self._syncing_preset = False

    def _sync_preset(self, *_: object) -> None:
        """With a checkpoint the preset box shows the checkpoint's preset and is locked (the
        checkpoint decides the sizes); with initial weights it is the user's choice."""
        if self._refreshing:
            return  # the list is being rebuilt: once, at its end
        path = self.checkpoint()
        if not path:
            self._show_preset(self._user_preset)
            self.preset_combo.setEnabled(True)
            self.preset_combo.setToolTip(PRESET_TIP)
            self._set_note("Initial weights: untrained, the prediction means nothing yet", error=False)
            return
        self.preset_combo.setEnabled(False)
        info = self.info_reader.request(path)
        if info is None:
            self.preset_combo.setToolTip(f"Reading {Path(path).name}…")
            self._set_note(f"Reading {Path(path).name}…", error=False)
            return
        self._apply_info(info)

    def _apply_info(self, info: CheckpointInfo) -> None:
        if info.error:
            self.preset_combo.setToolTip(f"{info.name} cannot be used: {info.error}")
            self._set_note(info.error, error=True)
            return
        self._show_preset(info.preset or "")
        self.preset_combo.setToolTip(
            f"Set by {info.name}: {info.describe()}. Choose {NO_CHECKPOINT} to pick a preset.")
        mismatch = info.mismatch(self.model_combo.currentText())
        self._set_note(mismatch or info.describe(), error=bool(mismatch))

    def _set_note(self, text: str, error: bool) -> None:
        self.checkpoint_note.setText(text)
        self.checkpoint_note.setStyleSheet("color: #b00020;" if error else "color: #555;")

    def _on_info(self, info: CheckpointInfo) -> None:
        if info.path in self._unfiled:
            self._unfiled.discard(info.path)
            if info.model:
                self.add_recent_checkpoint(info.path, info.model)
                if info.model == self.model_combo.currentText() and self.checkpoint_combo.findData(info.path) < 0:
                    self._refresh_checkpoints()
        if info.path == self.checkpoint():
            self._apply_info(info)

    # -- running ---------------------------------------------------------------------------
    def request(self) -> RunRequest:
        info = self.checkpoint_info()
        preset = info.preset if info is not None and info.preset else self.preset_combo.currentText()
        return RunRequest(self.model(), preset, self.checkpoint(), self.scope())

    def model(self) -> str:
        """The chosen model's registry name (the list shows the names themselves)."""
        return self.model_combo.currentText()

    def scope(self) -> Scope:
        data = self.scope_combo.currentData()
        return data if isinstance(data, Scope) else Scope.WHOLE

    def map_settings(self) -> MapSettings:
        return MapSettings(self.colormap_combo.currentText(), self.joint_check.isChecked(),
                           self.smooth_check.isChecked(), self.map_opacity.value() / 100.0)

    def set_path_text(self, text: str) -> None:
        """Where on the magnification path the trace shown is ("—": nowhere yet)."""
        self.path_label.setText(text)

    def release_play(self) -> None:
        """Show Play as stopped without asking for a stop (it has stopped already)."""
        if self.play_button.isChecked():
            self.play_button.blockSignals(True)
            self.play_button.setChecked(False)
            self.play_button.blockSignals(False)

    def set_cancel_enabled(self, enabled: bool) -> None:
        self.cancel_button.setEnabled(enabled)

    def set_scope(self, scope: Scope) -> None:
        idx = self.scope_combo.findData(scope)
        if idx >= 0:
            self.scope_combo.setCurrentIndex(idx)

    def _request_run(self) -> None:
        self.run_requested.emit(self.request())

    def set_running(self, running: bool, started: float | None = None) -> None:
        """Show a run going (its clock from ``started``, default now) or stopped."""
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self._started = time.monotonic() if started is None else started
            self.error_label.hide()
            self.progress.setRange(0, 0)  # busy until the first progress event
            self.stage_label.setText("Starting…")
            self._timer.start()
            self._tick()
        else:
            self._timer.stop()
            self.elapsed_label.setText("")

    def elapsed(self) -> float:
        """Seconds since the run shown began (the clock of "Elapsed" and "Done in")."""
        return time.monotonic() - self._started if self._started else 0.0

    def set_progress(self, done: int, total: int, stage: str) -> None:
        if total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(min(done, total))
        self.stage_label.setText(stage or f"{done} / {total}")

    def _tick(self) -> None:
        if self._timer.isActive():
            self.elapsed_label.setText(f"Elapsed {self.elapsed():.1f} s")

    def set_finished(self, classes: list[str], probs: list[float], note: str = "Done") -> None:
        self.set_running(False)
        self.show_status(RunStatus(note, done=True))
        self.show_prediction(classes, probs)

    def show_status(self, status: RunStatus | None, cancel_enabled: bool = False) -> None:
        """Show a finished, failed or cancelled run's status, or "Ready" (None) when the trace
        shown has no run behind it; the Run button is free."""
        status = status or RunStatus()
        self._timer.stop()
        self.elapsed_label.setText("")
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(cancel_enabled)
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if status.done else 0)
        self.stage_label.setText(status.stage)
        self.error_label.setText(status.error)
        self.error_label.setVisible(bool(status.error))

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

    def set_attention_score(self, text: str) -> None:
        self.attention_score.setText(text)
        self.attention_score.setVisible(bool(text))

    def set_cancelled(self) -> None:
        self.set_running(False)
        self.show_status(RunStatus("Cancelled", cancelled=True))

    def set_error(self, message: str) -> None:
        self.set_running(False)
        self.show_status(RunStatus("Failed", message))

    # -- the project run ---------------------------------------------------------------------
    def set_project_state(self, has_project: bool, running: bool, busy: bool = False) -> None:
        """"Run on project" needs a project and a free engine; Cancel needs a project run."""
        self.project_run_button.setEnabled(has_project and not running and not busy)
        self.project_cancel_button.setEnabled(running)
        if running:
            self.project_progress.setRange(0, 0)
        if not has_project and not running:
            self.project_label.setText(NO_PROJECT)
        elif has_project and self.project_label.text() == NO_PROJECT:
            self.project_label.setText(PROJECT_READY)  # a finished run's summary stays

    def set_project_progress(self, done: int, total: int, text: str) -> None:
        if total > 0:
            self.project_progress.setRange(0, total)
            self.project_progress.setValue(min(done, total))
        self.project_label.setText(text)

    # -- map chooser and comparison (filled by the inference controller) -------------------
    def set_maps(self, names: list[str], current: int = -1) -> None:
        self.map_combo.blockSignals(True)
        self.map_combo.clear()
        self.map_combo.addItems(names)
        self.map_combo.setCurrentIndex(current if 0 <= current < len(names) else (0 if names else -1))
        self.map_combo.setEnabled(bool(names))
        self.map_combo.blockSignals(False)

    def set_compare_choices(self, items: list, current: str = "") -> None:
        """``items``: names, or (label, id) pairs, of the traces that can be shown alongside."""
        self.compare_combo.blockSignals(True)
        self.compare_combo.clear()
        self.compare_combo.addItem("(none)", "")
        for item in items:
            label, ident = item if isinstance(item, tuple) else (item, item)
            self.compare_combo.addItem(label, ident)
        idx = self.compare_combo.findData(current) if current else 0
        self.compare_combo.setCurrentIndex(max(idx, 0))
        self.compare_combo.setEnabled(bool(items))
        self.compare_combo.blockSignals(False)

    def set_trace_choices(self, names: list[str], current: str = "") -> None:
        """This model's traces of the open slide, by name; ``current`` is the one shown."""
        self.trace_combo.blockSignals(True)
        self.trace_combo.clear()
        for name in names:
            self.trace_combo.addItem(name, name)
        if not names:
            self.trace_combo.addItem("(none yet)", "")
        idx = self.trace_combo.findData(current) if current else -1
        self.trace_combo.setCurrentIndex(max(idx, 0))
        self.trace_combo.setEnabled(bool(names))
        self.trace_combo.blockSignals(False)

