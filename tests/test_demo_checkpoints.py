"""Demo checkpoints: the Models dock picks a model's shipped checkpoint by default, a run
records it, and every checkpoint shipped in resources/checkpoints loads and explains."""
from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from app import models_dock
from engines import infer, registry
from engines.checkpoint import checkpoint_sha256, model_from_checkpoint, save_checkpoint
from tests.conftest import DEMO_SLIDE
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, open_and_wait, qsettings  # noqa: F401

SHIPPED = sorted((Path(models_dock.RESOURCES) / "checkpoints").glob("*.pt"))


@pytest.fixture
def demo_resources(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "spatial_mag.pt"
    save_checkpoint(path, registry.create("spatial_mag", "tiny", classes=["normal", "tumor"]))
    monkeypatch.setattr(models_dock, "RESOURCES", tmp_path)
    return path


def test_dock_selects_the_demo_checkpoint_and_a_run_records_it(qtbot, qsettings, dialogs, demo_resources):  # noqa: F811
    w = make_window(qtbot, qsettings, size=(1200, 800))
    try:
        open_and_wait(qtbot, w, DEMO_SLIDE)
        panel = w.models_panel
        panel.model_combo.setCurrentText("magnet")  # nothing shipped for it
        assert panel.checkpoint() is None
        panel.model_combo.setCurrentText("spatial_mag")
        assert panel.checkpoint() == str(demo_resources)
        assert panel.checkpoint_combo.currentText().startswith("demo:")
        panel.preset_combo.setCurrentText("tiny")
        ctl = w.inference
        with qtbot.waitSignal(ctl.engine.done, timeout=120_000):
            qtbot.mouseClick(panel.run_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: ctl.run_id is None, timeout=5000)
        assert ctl.current.trace.checkpoint == checkpoint_sha256(demo_resources)
        assert ctl.current.trace.classes == ["normal", "tumor"]
    finally:
        w.close()


def test_a_chosen_checkpoint_wins_over_the_demo(qtbot, qsettings, dialogs, demo_resources, tmp_path):  # noqa: F811
    mine = tmp_path / "mine.pt"
    save_checkpoint(mine, registry.create("spatial_mag", "tiny", classes=["a", "b"]))
    w = make_window(qtbot, qsettings, size=(1000, 700))
    try:
        panel = w.models_panel
        panel.model_combo.setCurrentText("spatial_mag")
        panel.set_checkpoint(str(mine))
        assert panel.checkpoint() == str(mine)
        panel.model_combo.setCurrentText("magnet")
        assert panel.checkpoint() is None  # another model's file is never carried over
        panel.model_combo.setCurrentText("spatial_mag")
        assert panel.checkpoint() == str(mine)
        panel.checkpoint_combo.setCurrentIndex(0)  # initial weights, chosen on purpose
        panel.model_combo.setCurrentText("magnet")
        panel.model_combo.setCurrentText("spatial_mag")
        assert panel.checkpoint() is None
    finally:
        w.close()


@pytest.mark.skipif(not SHIPPED, reason="no checkpoints shipped in resources/checkpoints")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_checkpoint_loads_and_explains(path):
    model = model_from_checkpoint(path, expect_model=path.stem)
    assert model.preset == "tiny" and list(model.classes) == ["normal", "tumor"]
    assert path.stat().st_size < 20 * 1024 * 1024
    trace = infer.run(model, str(DEMO_SLIDE), checkpoint_id=model.checkpoint_sha256)
    assert trace.checkpoint == checkpoint_sha256(path)
    assert abs(sum(trace.probs) - 1) < 1e-4
    assert trace.fields or trace.maps
