"""The first minutes in the viewer: Help > Keyboard Shortcuts and About, brightness / contrast /
gamma kept per slide, keys 1-5 on a slide without a scale, and the levels table's downsamples."""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QAction, QImage, QKeySequence

from engines.slide import Slide
from tests.conftest import DATA, DEMO_SLIDE
from tests.test_main_window import _sandboxed_settings, dialogs  # noqa: F401 - fixtures
from viewer.display_adjust import DisplayAdjust

OPEN_TIMEOUT_MS = 20_000
DIM_SLIDE = DATA / "test3-DAPI-2.ndpi"  # fluorescence: nearly black as read
UNSCALED_SLIDE = DATA / "kidney-striped.tif"  # neither objective power nor mpp


@pytest.fixture
def settings_file(tmp_path) -> Path:
    return tmp_path / "maglens.ini"


def make_window(qtbot, settings_file: Path):
    from app.main_window import MainWindow

    window = MainWindow(settings=QSettings(str(settings_file), QSettings.Format.IniFormat))
    qtbot.addWidget(window)
    window.resize(1100, 720)
    window.show()
    qtbot.waitExposed(window)
    return window


def open_and_wait(qtbot, window, path: Path) -> None:
    with qtbot.waitSignal(window.slide_opened, timeout=OPEN_TIMEOUT_MS):
        window.open_slide(path)


def to_array(image: QImage) -> np.ndarray:
    image = image.convertToFormat(QImage.Format.Format_RGB888)
    w, h, stride = image.width(), image.height(), image.bytesPerLine()
    buf = np.frombuffer(image.constBits(), np.uint8, count=stride * h)
    return buf.reshape(h, stride)[:, : w * 3].reshape(h, w, 3).copy()


def centre_mean(window) -> float:
    """Mean brightness of the middle of the slide, rendered as Export View renders it."""
    w, h = window.slide.dimensions
    image = window.canvas.render_image(200, 150, (w * 0.3, h * 0.3, w * 0.4, h * 0.4))
    return float(to_array(image).mean())


def on_screen_mean(window) -> float:
    """Mean brightness of the middle of the canvas as painted (the live tile path)."""
    arr = to_array(window.canvas.grab().toImage())
    h, w = arr.shape[:2]
    return float(arr[h * 2 // 5: h * 3 // 5, w * 2 // 5: w * 3 // 5].mean())


# -- levels table ---------------------------------------------------------------------------
def test_levels_table_shows_downsamples_in_full(qtbot):
    from app.docks import PropertiesPanel

    panel = PropertiesPanel()
    qtbot.addWidget(panel)
    panel.resize(272, 600)  # the Properties dock's width on a 1600 px screen
    panel.show()
    with Slide(UNSCALED_SLIDE) as slide:
        panel.set_slide(slide)
        true = [lv.downsample for lv in slide.levels]
    table = panel.levels_table
    shown = [table.item(r, 3).text() for r in range(table.rowCount())]
    # 2.00134 and 4.002681 used to read "2" and "4": the pyramid is not a clean power of two.
    assert shown == ["1.000", "2.00134", "4.002681", "8.026882"]
    for text, ds in zip(shown, true):
        assert abs(float(text) - ds) < 5e-7
    # The column is wide enough for the longest value and lies inside the table, so nothing
    # is elided or clipped at the dock's edge.
    qtbot.waitUntil(lambda: table.horizontalHeader().sectionSize(3) > 0)
    metrics = table.fontMetrics()
    header = table.horizontalHeader()
    assert header.sectionSize(3) >= max(metrics.horizontalAdvance(t) for t in shown) + 6
    assert header.sectionPosition(3) + header.sectionSize(3) <= table.viewport().width()
    assert PropertiesPanel.format_downsample(1024.0) == "1024.000"  # not "1.02e+03"
    assert PropertiesPanel.format_downsample(16.000323) == "16.000323"


# -- keys 1-5 -----------------------------------------------------------------------------------
def test_magnification_keys_say_why_on_a_slide_without_scale(qtbot, settings_file, dialogs):
    window = make_window(qtbot, settings_file)
    open_and_wait(qtbot, window, UNSCALED_SLIDE)
    assert window.slide.mpp is None and window.slide.objective_power is None
    window.canvas.setFocus()
    scale = window.canvas.camera.scale
    qtbot.keyClick(window.canvas, Qt.Key.Key_3)
    message = window.statusBar().currentMessage()
    assert message.startswith("No magnification")
    assert "objective power" in message and "pixel size" in message
    assert window.canvas.camera.scale == scale

    # A slide with a scale zooms, and says nothing of the kind.
    window.statusBar().clearMessage()
    open_and_wait(qtbot, window, DEMO_SLIDE)
    window.canvas.animation_ms = 0
    window.canvas.setFocus()
    qtbot.keyClick(window.canvas, Qt.Key.Key_3)
    assert window.canvas.current_magnification() == pytest.approx(10.0)
    assert not window.statusBar().currentMessage().startswith("No magnification")


# -- display adjustment --------------------------------------------------------------------------
def test_lookup_table_and_tile_filter():
    assert DisplayAdjust().is_identity and DisplayAdjust().xrgb_filter() is None
    lut = DisplayAdjust(gamma=2.5).lut()
    assert lut[0] == 0 and lut[255] == 255 and lut[20] > 60 and np.all(np.diff(lut.astype(int)) >= 0)
    tile = np.full((4, 5), 0xFF102030, dtype=np.uint32)
    out = DisplayAdjust(brightness=0.5).xrgb_filter()(tile)
    assert out.shape == tile.shape and out.dtype == np.uint32
    assert np.all(out >> 24 == 0xFF)  # opaque still
    r, g, b = (out >> 16) & 0xFF, (out >> 8) & 0xFF, out & 0xFF
    assert int(r[0, 0]) == 0x10 + 128 and int(g[0, 0]) == 0x20 + 128 and int(b[0, 0]) == 0x30 + 128
    # Stored settings that are garbage fall back to the defaults, out-of-range ones are clamped.
    assert DisplayAdjust.from_dict("nonsense").is_identity
    assert DisplayAdjust.from_dict({"brightness": "x", "gamma": float("nan")}).is_identity
    assert DisplayAdjust.from_dict({"contrast": 1e9}).contrast == 10.0


def test_brightness_lifts_a_dim_slide_and_is_kept_per_slide(qtbot, settings_file, dialogs, tmp_path):
    window = make_window(qtbot, settings_file)
    open_and_wait(qtbot, window, DIM_SLIDE)
    window.canvas.animation_ms = 0
    qtbot.waitUntil(lambda: window.canvas.loader.pending() == 0 and window.canvas.grid is not None,
                    timeout=OPEN_TIMEOUT_MS)
    dim = centre_mean(window)
    assert dim < 40  # the fault: a DAPI slide reads nearly black
    qtbot.waitUntil(lambda: abs(on_screen_mean(window) - dim) < 25, timeout=OPEN_TIMEOUT_MS)
    dim_screen = on_screen_mean(window)

    # View > Adjust Display..., as a user would: the dialog's controls.
    window.display_action.trigger()
    dialog = window.display_adjust.dialog
    assert dialog is not None and dialog.isVisible()
    assert dialog.slide_label.text() == DIM_SLIDE.name
    dialog.brightness.spin.setValue(0.3)
    dialog.gamma.spin.setValue(2.0)
    qtbot.waitUntil(lambda: window.canvas.display_adjust.brightness == pytest.approx(0.3)
                    and window.canvas.display_adjust.gamma == pytest.approx(2.0), timeout=5000)
    bright = centre_mean(window)
    assert bright > dim + 60
    # The painted canvas (tiles re-read by the workers through the table) follows.
    qtbot.waitUntil(lambda: on_screen_mean(window) > dim_screen + 60, timeout=OPEN_TIMEOUT_MS)
    # Export View writes what the screen shows.
    out = tmp_path / "view.png"
    assert window.export_view(out, 400, 300)
    exported = to_array(QImage(str(out)))
    assert exported[100:200, 130:270].mean() > dim + 60

    # Another slide opens with the defaults; the dialog shows them.
    open_and_wait(qtbot, window, DEMO_SLIDE)
    assert window.canvas.display_adjust.is_identity
    assert dialog.brightness.value() == 0.0 and dialog.gamma.value() == 1.0
    # Back to the dim slide: its setting returns.
    open_and_wait(qtbot, window, DIM_SLIDE)
    assert window.canvas.display_adjust == DisplayAdjust(0.3, 1.0, 2.0)
    assert dialog.brightness.value() == pytest.approx(0.3)
    assert centre_mean(window) == pytest.approx(bright, abs=1.0)

    # And in a new session (the same settings file).
    window.close()
    again = make_window(qtbot, settings_file)
    open_and_wait(qtbot, again, DIM_SLIDE)
    assert again.canvas.display_adjust == DisplayAdjust(0.3, 1.0, 2.0)
    assert centre_mean(again) > dim + 60

    # Reset puts the slide's own pixels back and forgets the setting.
    again.display_action.trigger()
    again.display_adjust.dialog.reset_button.click()
    qtbot.waitUntil(lambda: again.canvas.display_adjust.is_identity, timeout=5000)
    assert centre_mean(again) == pytest.approx(dim, abs=1.0)
    assert again.settings.display_adjust(DIM_SLIDE) is None


# -- Help menu ----------------------------------------------------------------------------------
def test_shortcuts_dialog_lists_every_shortcut_the_window_registers(qtbot, settings_file, dialogs):
    window = make_window(qtbot, settings_file)
    menus = [a.text().replace("&", "") for a in window.menuBar().actions()]
    assert menus[-1] == "Help"
    window.shortcuts_action.trigger()
    dialog = window.shortcuts_dialog
    assert dialog.isVisible()
    rows = dialog.rows()
    listed = {(command, keys) for _menu, command, keys in rows}
    registered = [a for a in window.findChildren(QAction) if not a.shortcut().isEmpty()]
    assert len(registered) >= 15
    for action in registered:
        keys = ", ".join(s.toString(QKeySequence.SequenceFormat.NativeText) for s in action.shortcuts())
        command = action.text().replace("&", "").rstrip("…")
        assert (command, keys) in listed, (command, keys)
    assert ("View", "Fit Slide", "F") in rows
    assert ("View", "Adjust Display", "Ctrl+Shift+D") in rows
    assert ("View", "10x", "3") in rows
    assert any(r[0] == "Canvas" and "Shift+drag" in r[2] for r in rows)

    # Generated from the live actions: one added later is listed the next time it opens.
    extra = QAction("Frobnicate", window)
    extra.setShortcut(QKeySequence("Ctrl+Alt+J"))
    window.addAction(extra)
    window.shortcuts_action.trigger()
    assert ("", "Frobnicate", QKeySequence("Ctrl+Alt+J").toString(QKeySequence.SequenceFormat.NativeText)) \
        in window.shortcuts_dialog.rows()


def test_about_names_versions_without_importing_torch(qtbot, settings_file, dialogs, monkeypatch):
    import openslide
    import PySide6
    from PySide6.QtCore import qVersion

    from app.help import about_html

    # Any "import torch" now fails: the About box must get torch's version some other way.
    monkeypatch.setitem(sys.modules, "torch", None)
    text = about_html()
    assert f"PyTorch</td><td>&nbsp;&nbsp;{importlib.metadata.version('torch')}" in text
    assert qVersion() in text and PySide6.__version__ in text
    assert openslide.__library_version__ in text
    assert importlib.metadata.version("maglens") in text

    window = make_window(qtbot, settings_file)
    window.about_action.trigger()
    box = window.about_box
    qtbot.waitUntil(box.isVisible, timeout=5000)
    assert "OpenSlide" in box.text() and "PyTorch" in box.text()
    box.accept()
