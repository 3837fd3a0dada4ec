"""The training dialog: pick a manifest and a model, train or fine-tune on the engine thread,
watch loss and AUROC curves, pause, stop, and open the best checkpoint in the viewer.

Checking a manifest opens every slide it lists, and the first check also imports torch (for
the Device box and the trainer): both run on a background worker, never on the GUI thread.
While a check runs the dialog says so and Start stays disabled; a newer check (another
manifest or seed) supersedes an older one. An output folder held by a running training run
(its ``.maglens-train.lock``) is refused before Start, and the dialog's own run holds that
lock so that no other run can write into its folder.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QDialog, QDoubleSpinBox, QFileDialog, QFormLayout, QGridLayout,
    QHBoxLayout, QHeaderView, QLabel, QLineEdit, QPlainTextEdit, QProgressBar, QPushButton,
    QSpinBox, QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from app.engine import EngineThread
from engines import registry
from engines.data import CheckCancelled, Dataset, ManifestError, read_manifest
from engines.recipes import SCHEDULERS, recipe_for
from engines.runlock import lock_holder
from viewer.workers import WorkerPool

BASE_DEVICES = [("Auto (GPU if available)", "auto"), ("CPU", "cpu")]
LOCK_POLL_MS = 2000  # how often a refused output folder is looked at again
CHECK_SHUTDOWN_MS = 2000  # how long closing waits for a manifest check between two slides


def device_choices() -> list[tuple[str, str]]:
    """(label, TrainConfig.device) for the Device box: Auto, CPU, then each GPU torch sees.
    Imports torch: call it off the GUI thread."""
    from engines.devices import cuda_device_choices

    return [*BASE_DEVICES, *cuda_device_choices()]


@dataclass
class ManifestCheck:
    """What a background check found: the dataset, or the problems that stop a run."""

    path: str
    dataset: Dataset | None = None
    problems: list[str] = field(default_factory=list)
    devices: list[tuple[str, str]] = field(default_factory=lambda: list(BASE_DEVICES))


def check_manifest(path: str, seed: int, cancel: threading.Event | None = None) -> ManifestCheck:
    """Runs on the check worker: imports torch and the trainer (so nothing on the GUI thread
    has to), lists the devices and reads the manifest, opening every slide."""
    result = ManifestCheck(path)
    try:
        result.devices = device_choices()
        import engines.train  # noqa: F401 - warm: Start and the run's events import it later
    except Exception as exc:  # noqa: BLE001 - a broken torch must not take the check down
        result.problems.append(f"torch cannot be loaded: {type(exc).__name__}: {exc}")
        return result
    if not path:
        return result
    try:
        result.dataset = read_manifest(path, seed=seed, cancel=cancel)
    except ManifestError as exc:
        result.problems = list(exc.problems)
    return result


class _CheckSignals(QObject):
    """Emits from the check worker. It has no parent and each queued check holds it, so a
    check that outlives the dialog emits into nothing instead of into a deleted object."""

    finished = Signal(int, object)  # token, ManifestCheck

    def deliver(self, token: int, result: ManifestCheck) -> None:
        try:
            self.finished.emit(token, result)
        except RuntimeError:  # the dialog is gone
            pass


def _run_check(signals: _CheckSignals, token: int, path: str, seed: int,
               cancel: threading.Event) -> None:
    try:
        result = check_manifest(path, seed, cancel)
    except CheckCancelled:
        return  # a newer check replaced this one
    except Exception as exc:  # noqa: BLE001 - reported in the dialog, never lost
        result = ManifestCheck(path, problems=[f"the manifest could not be checked: "
                                               f"{type(exc).__name__}: {exc}"])
    if not cancel.is_set():
        signals.deliver(token, result)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"ETA {h}:{m:02d}:{s:02d}" if h else f"ETA {m}:{s:02d}"


class TrainingDialog(QDialog):
    open_checkpoint = Signal(str, str)  # model name, checkpoint path
    manifest_checked = Signal(bool)  # the latest manifest check ended: usable or not

    def __init__(self, parent: QWidget | None = None, engine: EngineThread | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Train a model")
        self.resize(1000, 720)
        self.engine = engine or EngineThread(self)
        self.engine.event.connect(self._on_event)
        self.engine.done.connect(self._on_done)
        self.engine.failed.connect(self._on_failed)
        self.engine.cancelled.connect(self._on_done_cancelled)
        self.run_id: int | None = None
        self.control = None
        self.result = None
        self.last_error: str | None = None
        self._history: list[dict[str, float]] = []
        self._training = False
        # Manifest checks: the token names the check whose result counts. Two workers, so a
        # newer check need not wait for a superseded one stuck opening a slow slide.
        self._checks = WorkerPool("manifest-check", 2)
        self._check_signals = _CheckSignals()
        self._check_signals.finished.connect(self._on_checked, Qt.ConnectionType.QueuedConnection)
        self._check_token = 0
        self._requested: tuple[str, int] | None = None  # (path, seed) of the latest check
        self._check_cancel: threading.Event | None = None
        self.checking = False
        self.checked: ManifestCheck | None = None
        self.prepared = False  # torch imported and the Device box filled
        self.out_holder: str | None = None  # who holds the output folder, when another run does

        # -- settings ------------------------------------------------------------------------
        self.manifest_edit = QLineEdit()
        self.manifest_edit.setPlaceholderText("manifest.csv (slide,label[,split])")
        self.manifest_edit.editingFinished.connect(self._manifest_edited)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_manifest)
        mrow = QHBoxLayout()
        mrow.addWidget(self.manifest_edit, 1)
        mrow.addWidget(browse)
        self.model_combo = QComboBox()
        self.model_combo.addItems(registry.list_models())
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(["tiny", "paper"])
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 10000)
        self.epochs.setValue(10)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1e-3)
        self.accum = QSpinBox()
        self.accum.setRange(0, 256)
        self.accum.setSpecialValueText("model default")
        self.weight_decay = QDoubleSpinBox()
        self.weight_decay.setDecimals(7)
        self.weight_decay.setRange(0.0, 1.0)
        self.weight_decay.setSingleStep(1e-5)
        self.scheduler = QComboBox()
        self.scheduler.addItems(list(SCHEDULERS))
        self.clip = QDoubleSpinBox()
        self.clip.setRange(0.0, 1000.0)
        self.clip.setSpecialValueText("none")
        # The preset's recipe fills these; a value the user changes is theirs until they reset.
        self.recipe_note = QLabel()
        self.recipe_note.setWordWrap(True)
        self.recipe_reset = QPushButton("Use the preset's recipe")
        self.recipe_reset.clicked.connect(self.use_recipe)
        self._recipe_fields = {"epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                               "scheduler": self.scheduler, "clip": self.clip, "accumulation": self.accum}
        self.overridden: set[str] = set()
        self._filling = False
        for name, widget in self._recipe_fields.items():
            signal = widget.currentTextChanged if isinstance(widget, QComboBox) else widget.valueChanged
            signal.connect(lambda *_a, n=name: self._recipe_field_edited(n))
        self.model_combo.currentTextChanged.connect(lambda _t: self.use_recipe(keep_user=True))
        self.preset_combo.currentTextChanged.connect(lambda _t: self.use_recipe(keep_user=True))
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.valueChanged.connect(self._seed_changed)  # the split drawn depends on it
        self.out_edit = QLineEdit(str(Path.cwd() / "runs" / "train"))
        self.out_edit.textChanged.connect(self._check_out)
        self.out_note = QLabel()
        self.out_note.setWordWrap(True)
        self.out_note.setStyleSheet("color: #b00020")
        self.out_note.hide()
        self._lock_timer = QTimer(self)
        self._lock_timer.setInterval(LOCK_POLL_MS)
        self._lock_timer.timeout.connect(self._check_out)
        out_browse = QPushButton("…")
        out_browse.clicked.connect(self._browse_out)
        orow = QHBoxLayout()
        orow.addWidget(self.out_edit, 1)
        orow.addWidget(out_browse)
        self.init_edit = QLineEdit()
        self.init_edit.setPlaceholderText("optional checkpoint to fine-tune")
        init_browse = QPushButton("…")
        init_browse.clicked.connect(self._browse_init)
        irow = QHBoxLayout()
        irow.addWidget(self.init_edit, 1)
        irow.addWidget(init_browse)
        self.device_combo = QComboBox()
        self.device_combo.setToolTip("Auto trains on the GPU when torch sees one, else on the CPU")
        for label, spec in BASE_DEVICES:  # the GPUs join when the first check has loaded torch
            self.device_combo.addItem(label, spec)
        self.freeze = QCheckBox("Freeze backbone when fine-tuning")
        self.resume = QCheckBox("Resume the run in the output folder")

        form = QFormLayout()
        form.addRow("Manifest", mrow)
        form.addRow("Model", self.model_combo)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Epochs", self.epochs)
        form.addRow("Learning rate", self.lr)
        form.addRow("Accumulation", self.accum)
        form.addRow("Weight decay", self.weight_decay)
        form.addRow("LR schedule", self.scheduler)
        form.addRow("Gradient clip", self.clip)
        form.addRow(self.recipe_note)
        form.addRow(self.recipe_reset)
        self.use_recipe()
        form.addRow("Seed", self.seed)
        form.addRow("Device", self.device_combo)
        form.addRow("Output folder", orow)
        form.addRow(self.out_note)
        form.addRow("Fine-tune from", irow)
        form.addRow(self.freeze)
        form.addRow(self.resume)

        self.preview = QTableWidget(0, 3)
        self.preview.setHorizontalHeaderLabels(["Slide", "Label", "Split"])
        self.preview.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.preview.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.counts_label = QLabel("No manifest loaded")
        self.counts_label.setWordWrap(True)

        # -- running -------------------------------------------------------------------------
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.pause_button = QPushButton("Pause")
        self.pause_button.setCheckable(True)
        self.pause_button.setEnabled(False)
        self.pause_button.toggled.connect(self._pause)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.open_button = QPushButton("Open in viewer")
        self.open_button.setEnabled(False)
        self.open_button.clicked.connect(self._open_best)
        brow = QHBoxLayout()
        for b in (self.start_button, self.pause_button, self.stop_button, self.open_button):
            brow.addWidget(b)
        self.progress = QProgressBar()
        self.status_label = QLabel("Idle")
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)

        pg.setConfigOptions(antialias=True)
        self.loss_plot = pg.PlotWidget(background="w", title="Loss")
        self.loss_plot.addLegend()
        self.loss_plot.setLabel("bottom", "epoch")
        self.train_curve = self.loss_plot.plot([], [], pen=pg.mkPen((30, 90, 200), width=2), symbol="o",
                                               symbolSize=6, name="train")
        self.val_curve = self.loss_plot.plot([], [], pen=pg.mkPen((220, 90, 30), width=2), symbol="s",
                                             symbolSize=6, name="validation")
        self.auc_plot = pg.PlotWidget(background="w", title="Validation AUROC")
        self.auc_plot.setLabel("bottom", "epoch")
        self.auc_plot.setYRange(0, 1)
        self.auc_curve = self.auc_plot.plot([], [], pen=pg.mkPen((30, 150, 60), width=2), symbol="o", symbolSize=6)

        left = QWidget()
        ll = QVBoxLayout(left)
        ll.addLayout(form)
        ll.addWidget(self.counts_label)
        ll.addWidget(self.preview, 1)
        right = QWidget()
        rl = QGridLayout(right)
        rl.addWidget(self.loss_plot, 0, 0)
        rl.addWidget(self.auc_plot, 0, 1)
        rl.addWidget(self.log, 1, 0, 1, 2)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(right)
        split.setSizes([420, 580])
        layout = QVBoxLayout(self)
        layout.addWidget(split, 1)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addLayout(brow)
        self._check_out()
        self.load_manifest("")  # loads torch and lists the devices in the background

    # -- manifest ----------------------------------------------------------------------------
    def _browse_manifest(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a manifest", "", "CSV (*.csv);;All files (*)")
        if path:
            self.manifest_edit.setText(path)
            self.load_manifest(path)

    def _browse_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Output folder", self.out_edit.text())
        if path:
            self.out_edit.setText(path)

    def _browse_init(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint to fine-tune", "", "Checkpoints (*.pt *.pth)")
        if path:
            self.init_edit.setText(path)

    def load_manifest(self, path: str) -> int:
        """Check ``path`` in the background (it opens every slide); the preview and the Start
        button follow when ``manifest_checked`` fires. Returns the check's token; a later
        call supersedes this one."""
        self._check_token += 1
        token = self._check_token
        self._requested = (path, self.seed.value())
        if self._check_cancel is not None:
            self._check_cancel.set()  # the older check stops at its next slide
        self._checks.clear()
        cancel = threading.Event()
        self._check_cancel = cancel
        self.preview.setRowCount(0)
        self.checked = None
        self.checking = bool(path)
        if path:
            self.counts_label.setText("Checking the manifest… (opening every slide)")
        else:
            self.counts_label.setText("No manifest loaded")
        signals, seed = self._check_signals, self.seed.value()
        self._checks.start(lambda: _run_check(signals, token, path, seed, cancel))
        self._update_start()
        return token

    def _manifest_edited(self) -> None:
        # editingFinished also fires on every focus change: check only what changed.
        if (self.manifest_edit.text(), self.seed.value()) != self._requested:
            self.load_manifest(self.manifest_edit.text())

    def _seed_changed(self) -> None:
        if self.manifest_edit.text() and not self._training:
            self.load_manifest(self.manifest_edit.text())

    def _on_checked(self, token: int, result: ManifestCheck) -> None:
        self._set_devices(result.devices)
        if token != self._check_token:
            return  # superseded by a newer check
        self.checking = False
        self.checked = result
        if result.path:
            if result.dataset is None:
                self.counts_label.setText(f"{len(result.problems)} problem(s) in the manifest — see the log")
                for p in result.problems:
                    self._log(p)
            else:
                self._show_dataset(result.dataset)
        elif result.problems:  # torch itself failed to load
            for p in result.problems:
                self._log(f"Error: {p}")
        self._update_start()
        if result.path:
            self.manifest_checked.emit(result.dataset is not None)

    def _show_dataset(self, data: Dataset) -> None:
        self.preview.setRowCount(len(data.samples))
        for i, s in enumerate(data.samples):
            for j, v in enumerate((s.path.name, s.label, s.split)):
                self.preview.setItem(i, j, QTableWidgetItem(v))
        counts = data.counts()
        self.counts_label.setText("   ".join(
            f"{split}: " + ", ".join(f"{n} {c}" for c, n in per.items())
            for split, per in sorted(counts.items())))
        for w in data.warnings:
            self._log(f"warning: {w}")

    def _set_devices(self, devices: list[tuple[str, str]]) -> None:
        self.prepared = True
        box = self.device_combo
        if [(box.itemText(i), box.itemData(i)) for i in range(box.count())] == devices:
            return
        current = box.currentData()
        box.clear()
        for label, spec in devices:
            box.addItem(label, spec)
        box.setCurrentIndex(max(0, box.findData(current)))

    def manifest_ready(self) -> bool:
        """The manifest in the box has been checked and can be trained on."""
        c = self.checked
        return (not self.checking and c is not None and c.dataset is not None
                and c.path == self.manifest_edit.text())

    # -- output folder -----------------------------------------------------------------------
    def _check_out(self) -> None:
        """Refuse an output folder that a running training run holds (its lock file)."""
        if self._training:
            return  # this dialog's own run holds it
        out = self.out_edit.text().strip()
        holder = lock_holder(out) if out else None
        self.out_holder = holder
        if holder is None:
            self.out_note.hide()
            self._lock_timer.stop()
        else:
            self.out_note.setText(f"The output folder is in use by another training run ({holder}); "
                                  "wait for it to finish or choose another folder.")
            self.out_note.show()
            self._lock_timer.start()
        self._update_start()

    def _update_start(self) -> None:
        ok = not self._training and self.out_holder is None and self.manifest_ready()
        self.start_button.setEnabled(ok)

    # -- running -----------------------------------------------------------------------------
    def config(self):
        from engines.train import TrainConfig

        # Only values the user changed are given; the rest come from the preset's recipe (or,
        # on resume, from the run itself), so what the dialog shows is what trains.
        mine = {name: value for name, value in self.recipe_values().items() if name in self.overridden}
        return TrainConfig(
            manifest=self.manifest_edit.text(), model=self.model_combo.currentText(),
            preset=self.preset_combo.currentText(), out=self.out_edit.text(), seed=self.seed.value(),
            resume=self.resume.isChecked(), init=self.init_edit.text() or None,
            freeze_backbone=self.freeze.isChecked(), device=self.device_combo.currentData() or "auto",
            **mine)

    def recipe_values(self) -> dict:
        """The schedule settings as shown, in TrainConfig's names."""
        return {"epochs": self.epochs.value(), "lr": self.lr.value(),
                "weight_decay": self.weight_decay.value(), "scheduler": self.scheduler.currentText(),
                "clip": self.clip.value(), "accumulation": self.accum.value() or None}

    def use_recipe(self, keep_user: bool = False) -> None:
        """Show the chosen model preset's recipe; ``keep_user`` keeps values the user set."""
        recipe = recipe_for(self.model_combo.currentText(), self.preset_combo.currentText())
        if not keep_user:
            self.overridden.clear()
        values = {"epochs": recipe.epochs, "lr": recipe.lr, "weight_decay": recipe.weight_decay,
                  "scheduler": recipe.scheduler, "clip": recipe.clip or 0.0,
                  "accumulation": recipe.accumulation or 0}
        self._filling = True
        try:
            for name, value in values.items():
                if name in self.overridden:
                    continue
                widget = self._recipe_fields[name]
                if isinstance(widget, QComboBox):
                    widget.setCurrentText(value)
                else:
                    widget.setValue(value)
        finally:
            self._filling = False
        note = f"Recipe: {recipe.summary()} ({recipe.source})."
        if self.overridden:
            note += " Changed by you: " + ", ".join(sorted(self.overridden)) + "."
        self.recipe_note.setText(note)

    def _recipe_field_edited(self, name: str) -> None:
        if not self._filling:
            self.overridden.add(name)
            self.use_recipe(keep_user=True)  # refresh the note

    def start(self) -> int | None:
        from engines.devices import resolve_device
        from engines.runlock import RunLock
        from engines.train import TrainControl, train

        if not self.manifest_ready():
            self._log("Choose a valid manifest first (and wait for its check to finish).")
            return None
        self._check_out()
        if self.out_holder is not None:
            self._log(f"Error: {self.out_note.text()}")
            return None
        cfg = self.config()
        try:  # a GPU chosen but gone: say so now rather than fail on the engine thread
            resolve_device(cfg.device)
        except ValueError as exc:
            self.last_error = str(exc)
            self.status_label.setText("Cannot start: the chosen device is not available")
            self._log(f"Error: {exc}")
            return None
        control = TrainControl()
        self.control = control
        self._history = []
        self._set_curves()
        self.last_error = None

        def job(emit, cancel: threading.Event):
            # Stop and close go through `control`, which leaves a resumable checkpoint. The
            # lock keeps other runs (CLI or another dialog) out of the folder meanwhile.
            with RunLock(cfg.out):
                return train(cfg, on_event=emit, control=control)

        self.run_id = self.engine.submit(job)
        self._running(True)
        self._log(f"Training {cfg.model}/{cfg.preset} for {cfg.epochs or self.epochs.value()} epochs into {cfg.out} "
                  f"(device {cfg.device})")
        return self.run_id

    def stop(self) -> None:
        if self.control is not None:
            self.control.cancel()
            self.status_label.setText("Stopping at the next step…")

    def _pause(self, paused: bool) -> None:
        if self.control is None:
            return
        if paused:
            self.control.pause()
            self.pause_button.setText("Resume")
            self.status_label.setText("Paused")
        else:
            self.control.resume()
            self.pause_button.setText("Pause")

    def _running(self, on: bool) -> None:
        self._training = on
        if not on:
            self._check_out()  # this run's lock is gone; another run may hold the folder now
        self._update_start()
        self.pause_button.setEnabled(on)
        self.stop_button.setEnabled(on)
        if not on:
            self.pause_button.setChecked(False)

    def _on_event(self, run_id: int, event: object) -> None:
        from engines.train import EpochEvent, LogEvent, StepEvent

        if run_id != self.run_id:
            return
        if isinstance(event, StepEvent):
            self.progress.setRange(0, event.steps * event.epochs)
            self.progress.setValue((event.epoch - 1) * event.steps + event.step)
            losses = ", ".join(f"{k} {v:.3g}" for k, v in event.losses.items())
            self.status_label.setText(f"Epoch {event.epoch}/{event.epochs}, step {event.step}/{event.steps}: "
                                      f"{losses}   {_fmt_eta(event.eta_s)}")
        elif isinstance(event, EpochEvent):
            self._history.append(event.metrics)
            self._set_curves()
        elif isinstance(event, LogEvent):
            self._log(event.message)

    def _set_curves(self) -> None:
        h = self._history
        ep = [m["epoch"] for m in h]
        self.train_curve.setData(ep, [m["train_loss"] for m in h])
        val = [(m["epoch"], m["val_loss"]) for m in h if "val_loss" in m]
        self.val_curve.setData([v[0] for v in val], [v[1] for v in val])
        auc = [(m["epoch"], m["val_auroc"]) for m in h if not math.isnan(m.get("val_auroc", float("nan")))]
        self.auc_curve.setData([a[0] for a in auc], [a[1] for a in auc])

    def _on_done(self, run_id: int, result) -> None:
        if run_id != self.run_id:
            return
        self.result = result
        self._running(False)
        cancelled = getattr(result, "cancelled", False)
        self.status_label.setText("Stopped — resumable from last.pt" if cancelled else "Finished")
        self.open_button.setEnabled(self.best_checkpoint() is not None)

    def _on_done_cancelled(self, run_id: int) -> None:
        if run_id == self.run_id:
            self._running(False)
            self.status_label.setText("Stopped")

    def _on_failed(self, run_id: int, message: str) -> None:
        if run_id != self.run_id:
            return
        self.last_error = message
        self._running(False)
        self.status_label.setText("Failed")
        self._log(f"Error: {message}")

    def best_checkpoint(self) -> str | None:
        p = Path(self.out_edit.text()) / "best.pt"
        return str(p) if p.is_file() else None

    def _open_best(self) -> None:
        best = self.best_checkpoint()
        if best:
            self.open_checkpoint.emit(self.model_combo.currentText(), best)

    def _log(self, text: str) -> None:
        self.log.appendPlainText(text)

    def shutdown(self) -> None:
        if self.control is not None:
            self.control.cancel()
        if self._check_cancel is not None:
            self._check_cancel.set()
        self._lock_timer.stop()
        self._checks.shutdown(timeout_ms=CHECK_SHUTDOWN_MS)
        self.engine.shutdown(timeout_ms=30_000)
