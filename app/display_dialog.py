"""View > Adjust Display: brightness, contrast and gamma of the view, remembered per slide.

``DisplayAdjustController`` owns the dialog, follows the canvas's slide (restoring what was
set for it, or the defaults) and stores each change in the settings under the slide's path.
The pixels are adjusted in the canvas's tile workers (``SlideCanvas.set_display_adjust``).
"""
from __future__ import annotations

import math

from PySide6.QtCore import QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from app.settings import AppSettings
from viewer.canvas import SlideCanvas
from viewer.display_adjust import BRIGHTNESS_RANGE, CONTRAST_RANGE, GAMMA_RANGE, DisplayAdjust

APPLY_DELAY_MS = 120  # dragging a slider re-reads tiles once it pauses, not on every step
SLIDER_STEPS = 1000


class _Control(QWidget):
    """A slider and a spin box over one value; the slider is logarithmic for ratios."""

    changed = Signal(float)

    def __init__(self, lo: float, hi: float, decimals: int, log: bool, tip: str) -> None:
        super().__init__()
        self.lo, self.hi, self.log = lo, hi, log
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, SLIDER_STEPS)
        self.spin = QDoubleSpinBox()
        self.spin.setRange(lo, hi)
        self.spin.setDecimals(decimals)
        self.spin.setSingleStep(10 ** -decimals * (5 if decimals > 1 else 1))
        self.spin.setKeyboardTracking(False)
        for w in (self.slider, self.spin):
            w.setToolTip(tip)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.slider, 1)
        layout.addWidget(self.spin)
        self.slider.valueChanged.connect(self._from_slider)
        self.spin.valueChanged.connect(self._from_spin)

    def value(self) -> float:
        return float(self.spin.value())

    def set_value(self, v: float) -> None:
        """Show ``v`` without emitting ``changed``."""
        for w in (self.slider, self.spin):
            w.blockSignals(True)
        self.spin.setValue(v)
        self.slider.setValue(self._to_position(v))
        for w in (self.slider, self.spin):
            w.blockSignals(False)

    def _to_position(self, v: float) -> int:
        if self.log:
            t = math.log(v / self.lo) / math.log(self.hi / self.lo)
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return int(round(min(max(t, 0.0), 1.0) * SLIDER_STEPS))

    def _from_slider(self, pos: int) -> None:
        t = pos / SLIDER_STEPS
        v = self.lo * (self.hi / self.lo) ** t if self.log else self.lo + t * (self.hi - self.lo)
        self.spin.blockSignals(True)
        self.spin.setValue(v)
        self.spin.blockSignals(False)
        self.changed.emit(self.value())

    def _from_spin(self, v: float) -> None:
        self.slider.blockSignals(True)
        self.slider.setValue(self._to_position(v))
        self.slider.blockSignals(False)
        self.changed.emit(float(v))


class DisplayAdjustDialog(QDialog):
    """Brightness, contrast, gamma and Reset; emits ``adjust_changed`` as the user edits."""

    adjust_changed = Signal(object)  # DisplayAdjust

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Adjust Display")
        self.setObjectName("display_adjust_dialog")
        self.slide_label = QLabel("No slide")
        self.slide_label.setWordWrap(True)
        self.brightness = _Control(*BRIGHTNESS_RANGE, 2, False,
                                   "Added to every pixel: -1 black, 0 unchanged, +1 white")
        self.contrast = _Control(*CONTRAST_RANGE, 2, True, "Stretch about mid-grey; 1 unchanged")
        self.gamma = _Control(*GAMMA_RANGE, 2, True,
                              "Above 1 lifts dark and mid tones (dim fluorescence); 1 unchanged")
        form = QFormLayout()
        form.addRow("Brightness", self.brightness)
        form.addRow("Contrast", self.contrast)
        form.addRow("Gamma", self.gamma)
        self.reset_button = QPushButton("&Reset")
        self.reset_button.setToolTip("Back to the slide's own pixels")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.addButton(self.reset_button, QDialogButtonBox.ButtonRole.ResetRole)
        buttons.rejected.connect(self.close)
        self.reset_button.clicked.connect(self.reset)
        note = QLabel("Kept for this slide; models always see the original pixels.")
        note.setStyleSheet("color: palette(mid);")
        layout = QVBoxLayout(self)
        layout.addWidget(self.slide_label)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(buttons)
        self.setMinimumWidth(420)
        for control in (self.brightness, self.contrast, self.gamma):
            control.changed.connect(self._on_edit)
        self.set_adjust(DisplayAdjust())

    def adjust(self) -> DisplayAdjust:
        return DisplayAdjust(self.brightness.value(), self.contrast.value(), self.gamma.value())

    def set_adjust(self, adjust: DisplayAdjust) -> None:
        """Show ``adjust`` without emitting ``adjust_changed``."""
        self.brightness.set_value(adjust.brightness)
        self.contrast.set_value(adjust.contrast)
        self.gamma.set_value(adjust.gamma)

    def reset(self) -> None:
        self.set_adjust(DisplayAdjust())
        self.adjust_changed.emit(DisplayAdjust())

    def _on_edit(self, _value: float) -> None:
        self.adjust_changed.emit(self.adjust())


class DisplayAdjustController(QObject):
    """Keeps the canvas, the dialog and the per-slide settings in step."""

    def __init__(self, canvas: SlideCanvas, settings: AppSettings, parent: QWidget) -> None:
        super().__init__(parent)
        self.canvas = canvas
        self.settings = settings
        self._parent = parent
        self.dialog: DisplayAdjustDialog | None = None
        self._pending: DisplayAdjust | None = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(APPLY_DELAY_MS)
        self._timer.timeout.connect(self.flush)
        canvas.slide_changed.connect(self._on_slide_changed)

    def show_dialog(self) -> DisplayAdjustDialog:
        if self.dialog is None:
            self.dialog = DisplayAdjustDialog(self._parent)
            self.dialog.adjust_changed.connect(self._on_dialog_changed)
        self._sync_dialog()
        self.dialog.show()
        self.dialog.raise_()
        return self.dialog

    def set_adjust(self, adjust: DisplayAdjust) -> None:
        """Apply ``adjust`` to the open slide now and remember it for that slide."""
        self._timer.stop()
        self._pending = None
        self.canvas.set_display_adjust(adjust)
        slide = self.canvas.slide
        if slide is not None:
            self.settings.set_display_adjust(slide.path, None if adjust.is_identity else adjust.to_dict())
        if self.dialog is not None and self.dialog.adjust() != adjust:
            self.dialog.set_adjust(adjust)

    def flush(self) -> None:
        """Apply an edit still waiting for the slider to pause."""
        if self._pending is not None:
            self.set_adjust(self._pending)

    def _on_dialog_changed(self, adjust: DisplayAdjust) -> None:
        self._pending = adjust
        self._timer.start()

    def _on_slide_changed(self, slide) -> None:
        self._timer.stop()
        self._pending = None
        stored = self.settings.display_adjust(slide.path) if slide is not None else None
        self.canvas.set_display_adjust(DisplayAdjust.from_dict(stored))
        self._sync_dialog()

    def _sync_dialog(self) -> None:
        if self.dialog is None:
            return
        slide = self.canvas.slide
        self.dialog.slide_label.setText(slide.path.name if slide is not None else "No slide")
        self.dialog.setEnabled(slide is not None)
        self.dialog.set_adjust(self.canvas.display_adjust)
