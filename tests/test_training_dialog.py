"""The training dialog as a user drives it: preview a manifest, train two epochs with live
curves, stop and resume, open the best checkpoint in the Models dock."""
from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from engines import registry
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, qsettings  # noqa: F401
from tests.test_train import manifest  # noqa: F401 - the module-scoped manifest fixture

TRAIN_TIMEOUT_MS = 120_000
CHECK_TIMEOUT_MS = 60_000  # the first check also imports torch


def check(qtbot, dlg, path) -> bool:
    """Load a manifest as the user does and wait for its background check."""
    with qtbot.waitSignal(dlg.manifest_checked, timeout=CHECK_TIMEOUT_MS) as blocker:
        dlg.manifest_edit.setText(str(path))
        dlg.load_manifest(str(path))
    return blocker.args[0]


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    monkeypatch.setitem(registry.MODULES, "fake", "tests.fake_model")


@pytest.fixture
def window(qtbot, qsettings, dialogs):  # noqa: F811
    w = make_window(qtbot, qsettings, size=(1000, 700))
    yield w
    w.close()


def setup_dialog(qtbot, window, manifest, out, epochs=2):  # noqa: F811
    dlg = window.show_training_dialog()
    assert check(qtbot, dlg, manifest)
    dlg.model_combo.addItem("fake")
    dlg.model_combo.setCurrentText("fake")
    dlg.epochs.setValue(epochs)
    dlg.lr.setValue(0.05)
    dlg.out_edit.setText(str(out))
    return dlg


def test_preview_shows_rows_and_counts_and_bad_manifests_are_listed(qtbot, window, manifest, tmp_path):  # noqa: F811
    dlg = setup_dialog(qtbot, window, manifest, tmp_path / "run")
    assert dlg.preview.rowCount() == 8
    assert "train: 3 normal, 3 tumor" in dlg.counts_label.text()
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\nmissing.png,tumor\n")
    assert not check(qtbot, dlg, bad)
    assert "missing.png: file not found" in dlg.log.toPlainText()
    assert not dlg.start_button.isEnabled()


def test_two_epochs_draw_curves_and_open_the_best_checkpoint(qtbot, window, manifest, tmp_path):  # noqa: F811
    dlg = setup_dialog(qtbot, window, manifest, tmp_path / "run")
    with qtbot.waitSignal(dlg.engine.done, timeout=TRAIN_TIMEOUT_MS):
        qtbot.mouseClick(dlg.start_button, Qt.MouseButton.LeftButton)
    assert dlg.status_label.text() == "Finished"
    xs, ys = dlg.train_curve.getData()
    assert list(xs) == [1.0, 2.0] and len(dlg.auc_curve.getData()[0]) == 2
    assert "epoch 2" in dlg.log.toPlainText()
    assert dlg.open_button.isEnabled()
    qtbot.mouseClick(dlg.open_button, Qt.MouseButton.LeftButton)
    assert window.models_panel.model_combo.currentText() == "fake"
    assert window.models_panel.checkpoint() == str(tmp_path / "run" / "best.pt")


def test_stop_keeps_a_resumable_checkpoint(qtbot, window, manifest, tmp_path, monkeypatch):  # noqa: F811
    import tests.fake_model as fm

    monkeypatch.setattr(fm, "PRESETS", {**fm.PRESETS, "tiny": fm.FakeConfig(seconds=0.0)})
    dlg = setup_dialog(qtbot, window, manifest, tmp_path / "run", epochs=50)
    qtbot.mouseClick(dlg.start_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(dlg._history) >= 1, timeout=TRAIN_TIMEOUT_MS)
    with qtbot.waitSignal(dlg.engine.done, timeout=TRAIN_TIMEOUT_MS):
        qtbot.mouseClick(dlg.stop_button, Qt.MouseButton.LeftButton)
    assert dlg.result.cancelled
    assert (tmp_path / "run" / "last.pt").exists()
    assert dlg.start_button.isEnabled()


def test_device_box_lists_auto_cpu_and_each_gpu_and_a_missing_gpu_is_reported(
        qtbot, window, manifest, tmp_path, monkeypatch):  # noqa: F811
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two GPUs seen: nothing moves there
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    dlg = setup_dialog(qtbot, window, manifest, tmp_path / "run")
    box = dlg.device_combo
    assert [box.itemData(i) for i in range(box.count())] == ["auto", "cpu", "cuda:0", "cuda:1"]
    assert box.itemText(0).startswith("Auto") and box.itemText(3) == "GPU 1 (cuda:1)"
    assert dlg.config().device == "auto"
    box.setCurrentIndex(1)
    assert dlg.config().device == "cpu"
    box.setCurrentIndex(3)
    assert dlg.config().device == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU went away
    assert dlg.start() is None
    assert "CUDA was asked for but torch sees no GPU" in dlg.log.toPlainText()
    assert "CUDA was asked for" in dlg.last_error and dlg.run_id is None
    assert dlg.start_button.isEnabled() and not (tmp_path / "run").exists()


def test_dialog_shows_the_presets_recipe_and_passes_only_what_the_user_changed(qtbot, window):
    dlg = window.show_training_dialog()
    dlg.model_combo.setCurrentText("magnet")
    dlg.preset_combo.setCurrentText("paper")
    assert dlg.lr.value() == pytest.approx(3e-5) and dlg.epochs.value() == 200
    assert dlg.scheduler.currentText() == "cosine" and dlg.accum.value() == 16
    assert "MagNet paper" in dlg.recipe_note.text()
    assert dlg.config().lr is None and dlg.config().epochs is None  # the recipe decides
    dlg.model_combo.setCurrentText("zoom_in")
    assert dlg.clip.value() == 5.0 and dlg.scheduler.currentText() == "step"
    dlg.lr.setValue(0.002)
    dlg.preset_combo.setCurrentText("tiny")  # the user's rate stays; the rest follow the preset
    assert dlg.lr.value() == pytest.approx(0.002) and dlg.clip.value() == 0.0
    assert dlg.config().lr == pytest.approx(0.002) and dlg.config().clip is None
    assert "Changed by you: lr" in dlg.recipe_note.text()
    dlg.recipe_reset.click()
    assert dlg.lr.value() == pytest.approx(1e-3) and dlg.config().lr is None
