"""What the window shows always belongs to what is on screen, driven as a user would: a new
slide or another model brings its own state (or none), Play never fights the user, the Preset
box follows the checkpoint, region runs keep the whole-slide trace, and Open Recent tells
files of the same name apart."""
from __future__ import annotations

import shutil

import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtWidgets import QFileDialog

from engines import registry
from tests.conftest import DATA, DEMO_SLIDE
from tests.test_inference_gui import choose, fake, run_and_wait, wait_still, window  # noqa: F401
from tests.test_main_window import _sandboxed_settings, dialogs, open_and_wait, qsettings  # noqa: F401

NO_MPP_SLIDE = DATA / "kidney-striped.tif"  # a plain TIFF: no microns per pixel
CHECKPOINTS = DEMO_SLIDE.parent / "checkpoints"


def _hover(qtbot, canvas, fx: float = 0.4, fy: float = 0.3) -> None:
    p = QPoint(int(canvas.width() * fx), int(canvas.height() * fy))
    qtbot.mouseMove(canvas, p + QPoint(2, 2))
    qtbot.mouseMove(canvas, p)


def _draw_region(qtbot, canvas, a=QPoint(200, 150), b=QPoint(420, 330)) -> None:
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ShiftModifier, a)
    qtbot.mouseMove(canvas, b)
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ShiftModifier, b)


def _panel_text(panel) -> str:
    """Everything the Models dock says about a run."""
    return " | ".join([panel.stage_label.text(), panel.elapsed_label.text(),
                       panel.error_label.text() if panel.error_label.isVisible() else "",
                       panel.path_label.text()])


def _assert_blank(window) -> None:
    panel = window.models_panel
    assert panel.prediction.rowCount() == 0
    assert window.trail_plot.values() == ([], [])
    assert panel.stage_label.text() == "Ready" and panel.elapsed_label.text() == ""
    assert not panel.error_label.isVisible()
    assert panel.progress.value() == 0 and panel.path_label.text() == "—"
    assert window.inference.current is None


def _failing(fake, monkeypatch):
    monkeypatch.setattr(fake, "PRESETS", {**fake.PRESETS, "tiny": fake.FakeConfig(fail=True)})


# -- 1. a new slide, another model ------------------------------------------------------------
def test_opening_another_slide_shows_none_of_the_previous_slides_state(qtbot, window, fake):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    canvas, panel = window.canvas, window.models_panel
    qtbot.keyClick(canvas, Qt.Key.Key_BracketRight)  # a stop of the path
    _draw_region(qtbot, canvas)
    _hover(qtbot, canvas)
    assert window.inference.rubber.rect is not None and "µm" in window.position_label.text()
    assert panel.prediction.rowCount() == 2 and panel.stage_label.text().startswith("Done in")

    open_and_wait(qtbot, window, NO_MPP_SLIDE)
    _assert_blank(window)
    assert window.inference.rubber.rect is None
    assert window.inference.rubber not in canvas.overlays()
    assert panel.scope_combo.currentText() == "Whole slide"  # the drawn rectangle went with its slide
    assert not any(o in canvas.overlays() for o in layers.overlays())
    assert "µm" not in window.position_label.text()  # before the pointer moves again
    _hover(qtbot, canvas, 0.5, 0.5)
    assert "px" in window.position_label.text() and "µm" not in window.position_label.text()

    # back on the first slide its own trace and run status return
    open_and_wait(qtbot, window, DEMO_SLIDE)
    assert window.inference.current is layers
    assert panel.prediction.rowCount() == 2 and panel.stage_label.text().startswith("Done in")
    assert window.trail_plot.values()[0] == [1, 2, 3]


def test_an_error_stays_with_its_slide(qtbot, window, fake, monkeypatch):
    _failing(fake, monkeypatch)
    choose(window, "fake")
    with qtbot.waitSignal(window.inference.engine.failed, timeout=10_000):
        qtbot.mouseClick(window.models_panel.run_button, Qt.MouseButton.LeftButton)
    assert window.models_panel.error_label.isVisible()
    open_and_wait(qtbot, window, DATA / "small.svs")
    _assert_blank(window)
    assert "broke on purpose" not in _panel_text(window.models_panel)
    open_and_wait(qtbot, window, DEMO_SLIDE)
    assert "broke on purpose" in window.models_panel.error_label.text()


def test_switching_model_shows_only_that_models_state(qtbot, window, fake, monkeypatch):
    choose(window, "fake")
    run_and_wait(qtbot, window)
    panel = window.models_panel
    qtbot.keyClick(window.canvas, Qt.Key.Key_BracketRight)
    assert panel.path_label.text().startswith("1 / ")
    panel.model_combo.setCurrentText("magnet")  # nothing run with it on this slide
    _assert_blank(window)
    assert "Done" not in _panel_text(panel)
    qtbot.waitUntil(lambda: "magnet" in panel.checkpoint_note.text(), timeout=30_000)
    assert "fake" not in panel.checkpoint_note.text()
    panel.model_combo.setCurrentText("fake")
    assert panel.stage_label.text().startswith("Done in") and panel.prediction.rowCount() == 2

    _failing(fake, monkeypatch)
    with qtbot.waitSignal(window.inference.engine.failed, timeout=10_000):
        qtbot.mouseClick(panel.run_button, Qt.MouseButton.LeftButton)
    assert panel.error_label.isVisible()
    panel.model_combo.setCurrentText("magnet")
    _assert_blank(window)
    assert "broke on purpose" not in _panel_text(panel)
    panel.model_combo.setCurrentText("fake")
    assert "broke on purpose" in panel.error_label.text() and panel.error_label.isVisible()


def test_a_run_of_one_model_does_not_write_into_anothers_dock(qtbot, window, fake, monkeypatch):
    monkeypatch.setattr(fake, "PRESETS", {**fake.PRESETS, "tiny": fake.FakeConfig(seconds=0.4)})
    choose(window, "fake")
    panel, ctl = window.models_panel, window.inference
    with qtbot.waitSignal(ctl.engine.event, timeout=10_000):
        qtbot.mouseClick(panel.run_button, Qt.MouseButton.LeftButton)
    panel.model_combo.setCurrentText("magnet")
    with qtbot.waitSignal(ctl.engine.done, timeout=30_000):
        pass
    _assert_blank(window)
    assert panel.run_button.isEnabled()
    panel.model_combo.setCurrentText("fake")
    assert panel.stage_label.text().startswith("Done in") and panel.prediction.rowCount() == 2


# -- 2. Play ----------------------------------------------------------------------------------
@pytest.fixture
def playing(qtbot, window, fake):
    """A fake trace on screen and Play pressed (ticks far apart: only the first step)."""
    choose(window, "fake")
    run_and_wait(qtbot, window)
    ctl = window.inference
    ctl._play.setInterval(60_000)
    window.canvas.setFocus()
    qtbot.mouseClick(window.models_panel.play_button, Qt.MouseButton.LeftButton)
    assert ctl._play.isActive() and window.models_panel.play_button.isChecked()
    wait_still(qtbot, window.canvas)
    return window


def _wheel(canvas) -> None:
    from PySide6.QtGui import QWheelEvent
    from PySide6.QtWidgets import QApplication

    pos = QPointF(canvas.width() / 2, canvas.height() / 2)
    ev = QWheelEvent(pos, canvas.mapToGlobal(pos), QPoint(), QPoint(0, 120), Qt.MouseButton.NoButton,
                     Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(canvas, ev)


USER_MOVES = {
    "Esc": lambda qtbot, w: qtbot.keyClick(w.canvas, Qt.Key.Key_Escape),
    "wheel": lambda qtbot, w: _wheel(w.canvas),
    "drag": lambda qtbot, w: (qtbot.mousePress(w.canvas, Qt.MouseButton.LeftButton, pos=QPoint(300, 300)),
                              qtbot.mouseMove(w.canvas, QPoint(340, 330)),
                              qtbot.mouseRelease(w.canvas, Qt.MouseButton.LeftButton, pos=QPoint(340, 330))),
    "zoom key": lambda qtbot, w: qtbot.keyClick(w.canvas, Qt.Key.Key_Minus),
    "magnification key": lambda qtbot, w: qtbot.keyClick(w.canvas, Qt.Key.Key_2),
    "arrow key": lambda qtbot, w: qtbot.keyClick(w.canvas, Qt.Key.Key_Left),
    "minimap": lambda qtbot, w: qtbot.mouseClick(w.minimap, Qt.MouseButton.LeftButton,
                                                 pos=QPoint(w.minimap.width() // 2, w.minimap.height() // 2)),
    "step key": lambda qtbot, w: qtbot.keyClick(w.canvas, Qt.Key.Key_BracketLeft),
    "model": lambda qtbot, w: w.models_panel.model_combo.setCurrentText("magnet"),
    "slide": lambda qtbot, w: open_and_wait(qtbot, w, DATA / "small.svs"),
    "run": lambda qtbot, w: qtbot.mouseClick(w.models_panel.run_button, Qt.MouseButton.LeftButton),
}


@pytest.mark.parametrize("move", list(USER_MOVES))
def test_play_stops_when_the_user_takes_over(qtbot, playing, move):
    window = playing
    USER_MOVES[move](qtbot, window)
    assert not window.inference._play.isActive()
    assert not window.models_panel.play_button.isChecked()
    window.inference.engine.cancel()


def test_f_always_wins_over_play(qtbot, window, fake):
    choose(window, "fake")
    run_and_wait(qtbot, window)
    ctl, canvas = window.inference, window.canvas
    ctl._play.setInterval(40)
    canvas.setFocus()
    qtbot.mouseClick(window.models_panel.play_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: ctl.stop_index >= 1, timeout=5000)
    qtbot.keyClick(canvas, Qt.Key.Key_F)
    wait_still(qtbot, canvas)
    fitted = canvas.camera.copy()
    fitted.fit(window.slide.width, window.slide.height)
    qtbot.wait(300)  # several Play intervals: none may move the view
    wait_still(qtbot, canvas)
    assert not ctl._play.isActive() and not window.models_panel.play_button.isChecked()
    assert canvas.camera.scale == pytest.approx(fitted.scale)
    assert (canvas.camera.cx, canvas.camera.cy) == pytest.approx((fitted.cx, fitted.cy))


def test_play_stops_at_the_end_of_the_path(qtbot, window, fake):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    ctl = window.inference
    ctl._play.setInterval(30)
    qtbot.mouseClick(window.models_panel.play_button, Qt.MouseButton.LeftButton)
    last = len(layers.path()) - 1
    qtbot.waitUntil(lambda: not window.models_panel.play_button.isChecked(), timeout=5000)
    assert ctl.stop_index == last
    qtbot.wait(200)
    assert ctl.stop_index == last and not ctl._play.isActive()


# -- 3. the Preset box and the checkpoint ------------------------------------------------------
def _browse(monkeypatch, panel, path) -> None:
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(path), ""))
    panel.browse_checkpoint()


def test_the_preset_box_follows_the_checkpoint(qtbot, window, fake, tmp_path, monkeypatch):
    from engines.checkpoint import save_checkpoint

    path = tmp_path / "wide.pt"
    save_checkpoint(path, registry.create("fake", "paper", classes=["a", "b"], dropout=0.1))
    choose(window, "fake", preset="tiny")
    panel = window.models_panel
    _browse(monkeypatch, panel, path)
    qtbot.waitUntil(lambda: panel.preset_combo.currentText() == "paper", timeout=30_000)
    assert not panel.preset_combo.isEnabled()
    tip = panel.preset_combo.toolTip()
    assert "wide.pt" in tip and "paper" in tip and "dropout=0.1" in tip
    assert "dropout=0.1" in panel.checkpoint_note.text()
    assert panel.request().preset == "paper"
    panel.checkpoint_combo.setCurrentIndex(0)  # initial weights: the user's preset again
    assert panel.preset_combo.isEnabled() and panel.preset_combo.currentText() == "tiny"
    assert panel.request().preset == "tiny"


def test_the_checkpoint_list_offers_only_the_models_own(qtbot, window, tmp_path):
    mine = tmp_path / "grid_attention.pt"
    shutil.copy(CHECKPOINTS / "grid_attention.pt", mine)
    panel = window.models_panel
    panel.set_model("grid_attention")
    panel.set_checkpoint(str(mine))  # as the training dialog's "use it" does
    qtbot.waitUntil(lambda: panel.preset_combo.toolTip().startswith("Set by grid_attention.pt"), timeout=30_000)
    for model in ("magnet", "spatial_mag", "grid_attention", "magnet"):
        panel.set_model(model)
        listed = [panel.checkpoint_combo.itemData(i) for i in range(panel.checkpoint_combo.count())]
        assert (str(mine) in listed) == (model == "grid_attention"), model
        assert all(p is None or model in p for p in listed)


def test_another_models_checkpoint_is_refused_before_the_run(qtbot, window, tmp_path, monkeypatch):
    mine = tmp_path / "grid_attention.pt"
    shutil.copy(CHECKPOINTS / "grid_attention.pt", mine)
    choose(window, "magnet")
    panel, ctl = window.models_panel, window.inference
    _browse(monkeypatch, panel, mine)
    submitted = []
    monkeypatch.setattr(ctl.engine, "submit", lambda job: submitted.append(job) or 1)
    qtbot.mouseClick(panel.run_button, Qt.MouseButton.LeftButton)  # at once, read or not
    line = "grid_attention.pt is a grid_attention checkpoint, not magnet"
    assert submitted == [] and ctl.run_id is None
    assert panel.error_label.isVisible() and panel.error_label.text() == line
    qtbot.waitUntil(lambda: panel.checkpoint_note.text() == line, timeout=30_000)


def test_elapsed_and_done_are_one_figure_on_one_clock(qtbot, window, fake, monkeypatch):
    monkeypatch.setattr(fake, "PRESETS", {**fake.PRESETS, "tiny": fake.FakeConfig(seconds=0.5)})
    choose(window, "fake")
    panel = window.models_panel
    qtbot.mouseClick(panel.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.elapsed_label.text().startswith("Elapsed"), timeout=5000)
    assert "Done" not in panel.stage_label.text()
    seen = []
    panel._timer.timeout.connect(lambda: seen.append(panel.elapsed_label.text()))
    qtbot.waitUntil(lambda: window.inference.run_id is None, timeout=30_000)
    texts = [panel.stage_label.text(), panel.elapsed_label.text()]
    assert sum("Done in" in t for t in texts) == 1 and not any("Elapsed" in t for t in texts)
    done = float(panel.stage_label.text().split("Done in ")[1].split(" s")[0])
    last = max([float(t.split()[1]) for t in seen if t.startswith("Elapsed")] or [0.0])
    assert done >= last  # the same clock, read later


# -- 4. region runs and Open Recent ------------------------------------------------------------
def test_a_region_run_keeps_the_whole_slide_trace(qtbot, window, fake):
    choose(window, "fake")
    whole = run_and_wait(qtbot, window)
    canvas, panel, ctl = window.canvas, window.models_panel, window.inference
    canvas.fit_view(animate=False)
    _draw_region(qtbot, canvas)
    x, y, w, h = ctl.rubber.rect
    region = run_and_wait(qtbot, window)
    assert region is not whole and region.trace.roi == pytest.approx((x, y, w, h))
    name = f"region {w:.0f}x{h:.0f} at ({x:.0f}, {y:.0f})"
    compare = [panel.compare_combo.itemText(i) for i in range(panel.compare_combo.count())]
    assert "fake" in compare  # the whole-slide trace is kept, and offered by name
    names = [panel.trace_combo.itemText(i) for i in range(panel.trace_combo.count())]
    assert names == ["whole slide", name] and panel.trace_combo.currentText() == name
    assert any(n.startswith(f"fake ({name}):") for n in (o.name for o in region.overlays()))
    # choose the whole-slide trace again from the list
    i = panel.trace_combo.findText("whole slide")
    panel.trace_combo.setCurrentIndex(i)
    panel.trace_combo.activated.emit(i)
    assert ctl.current is whole and whole.trace.roi is None
    assert all(o in canvas.overlays() for o in whole.overlays())
    assert not any(o in canvas.overlays() for o in region.overlays())
    # the model switch comes back to the trace chosen last
    panel.model_combo.setCurrentText("magnet")
    panel.model_combo.setCurrentText("fake")
    assert ctl.current is whole


def test_open_recent_tells_files_of_the_same_name_apart(qtbot, window, tmp_path):
    a, b = tmp_path / "2021" / "case" / "slide.svs", tmp_path / "2022" / "case" / "slide.svs"
    for p in (a, b):
        p.parent.mkdir(parents=True)
        shutil.copy(DATA / "small.svs", p)
        open_and_wait(qtbot, window, p)
    window.recent_menu.aboutToShow.emit()
    actions = {a_.toolTip(): a_.text() for a_ in window.recent_menu.actions()}
    la, lb = actions[str(a.resolve())], actions[str(b.resolve())]
    assert la != lb and "slide.svs" in la and "2021/case" in la and "2022/case" in lb
    assert DEMO_SLIDE.name in actions[str(DEMO_SLIDE.resolve())]


def test_distinguishing_labels():
    from app.recent_labels import distinguishing_labels

    got = distinguishing_labels(["/d/2021/x/s.svs", "/d/2022/x/s.svs", "/e/t.svs", "/f/x/t.tif"])
    assert got == ["s.svs — 2021/x", "s.svs — 2022/x", "t.svs — e", "t.tif — x"]
    same = distinguishing_labels(["/a/s.svs", "/b/a/s.svs"])
    assert len(set(same)) == 2


def test_recent_checkpoints_of_older_versions_are_filed_by_model(qtbot, qsettings, dialogs, tmp_path):  # noqa: F811
    from tests.test_main_window import make_window

    mine = tmp_path / "mine.pt"
    shutil.copy(CHECKPOINTS / "zoom_in.pt", mine)
    qsettings.setValue("models/recent_checkpoints", [str(mine)])  # one list for every model
    w = make_window(qtbot, qsettings)
    try:
        panel = w.models_panel

        def listed(model):
            panel.set_model(model)
            return str(mine) in [panel.checkpoint_combo.itemData(i) for i in range(panel.checkpoint_combo.count())]

        qtbot.waitUntil(lambda: listed("zoom_in"), timeout=30_000)
        assert not listed("magnet") and not listed("grid_attention")
    finally:
        w.close()


def test_a_trace_comes_back_where_its_path_was_left(qtbot, window, fake):
    choose(window, "fake")
    layers = run_and_wait(qtbot, window)
    panel = window.models_panel
    qtbot.keyClick(window.canvas, Qt.Key.Key_BracketRight)
    qtbot.keyClick(window.canvas, Qt.Key.Key_BracketRight)
    label, depth = panel.path_label.text(), layers.fields.focus_depth
    assert label.startswith("2 / ") and depth is not None
    panel.model_combo.setCurrentText("magnet")
    assert panel.path_label.text() == "—"
    panel.model_combo.setCurrentText("fake")
    # The highlighted stop and the label agree, and ] goes on from there.
    assert panel.path_label.text() == label and layers.fields.focus_depth == depth
    qtbot.keyClick(window.canvas, Qt.Key.Key_BracketRight)
    assert panel.path_label.text().startswith("3 / ")


def test_the_status_bar_drops_the_previous_models_and_slides_message(qtbot, window, fake):
    choose(window, "fake")
    run_and_wait(qtbot, window)
    bar = window.statusBar()
    assert bar.currentMessage().startswith("fake:")  # the run's result
    window.models_panel.model_combo.setCurrentText("magnet")
    assert bar.currentMessage() == ""
    window.models_panel.model_combo.setCurrentText("fake")
    window.inference.status.emit("fake: tumor (0.9)")
    open_and_wait(qtbot, window, NO_MPP_SLIDE)
    assert "fake" not in bar.currentMessage()
