"""Models dock > Run on project: the chosen model over every project slide on the engine thread,
results reaching the store one by one, Cancel, resume, and a project slide opening with the
trace its run wrote."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import Qt

from engines import cohort as cohort_mod
from engines import infer
from engines.project import open_project
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, open_and_wait, qsettings  # noqa: F401

TIMEOUT_MS = 120_000
MODEL = "zoom_in"
RUN = f"{MODEL} tiny"


def _project_folder(root: Path) -> Path:
    """Three tiny image slides and, in the middle by name, a file that is not a slide."""
    root.mkdir(parents=True)
    for i, name in enumerate(("alpha", "charlie", "delta")):
        arr = np.full((200 + 20 * i, 260, 3), (200, 60 + 50 * i, 60), np.uint8)
        arr[40:90, 60:130] = 30
        Image.fromarray(arr).save(root / f"{name}.png")
    (root / "bravo.svs").write_text("this is not a slide\n")
    return root


@pytest.fixture
def window(qtbot, qsettings, dialogs):  # noqa: F811
    w = make_window(qtbot, qsettings, size=(1200, 800))
    panel = w.models_panel
    panel.set_model(MODEL)
    panel.preset_combo.setCurrentText("tiny")
    panel.checkpoint_combo.setCurrentIndex(0)  # initial weights
    yield w
    w.close()


@pytest.fixture
def project(window, tmp_path):
    project = open_project(_project_folder(tmp_path / "study"))
    window.results.set_project(project)
    return project


@pytest.fixture
def model_threads(monkeypatch):
    """The threads the model ran on (never the GUI thread)."""
    seen: list[threading.Thread] = []
    real = infer.run

    def run(*args, **kwargs):
        seen.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "run", run)
    return seen


def _run_on_project(qtbot, window) -> tuple[str, str]:
    with qtbot.waitSignal(window.inference.runs.project_finished, timeout=TIMEOUT_MS) as blocker:
        qtbot.mouseClick(window.models_panel.project_run_button, Qt.MouseButton.LeftButton)
    return tuple(blocker.args)


def _records(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "traces").glob("*.result.json"))


def test_run_on_project_needs_a_project(qtbot, window):
    panel = window.models_panel
    assert not panel.project_run_button.isEnabled()
    window.inference.run_project(panel.request())  # e.g. from a script: refused, in words
    assert "Open a project first" in panel.error_label.text()


def test_results_arrive_one_by_one_then_the_project_is_saved(qtbot, window, project, model_threads):
    panel, store = window.models_panel, window.results
    assert panel.project_run_button.isEnabled()
    assert panel.project_label.text() == "Run the chosen model on every slide of the project"
    arrivals = []  # (slide key, how many results the store held then)
    store.result_changed.connect(lambda run, key: arrivals.append((key, len(store.run(run).results))))
    progress = []
    window.inference.runs.project_progress.connect(lambda text, done, total: progress.append(text))
    name, text = _run_on_project(qtbot, window)

    assert name == RUN and text.startswith("Done: 4/4 slides, 1 failed")
    assert [n for _k, n in arrivals] == [1, 2, 3, 4]  # one at a time, as each slide ended
    assert sorted(k for k, _n in arrivals) == ["alpha", "bravo", "charlie", "delta"]
    assert [t for t in progress if t.startswith("1/4 slides, ETA ")] and progress[-1] == text
    assert panel.project_label.text() == text and panel.project_progress.value() == 4
    run = store.run(RUN)
    assert run.results["bravo"].error and not run.results["bravo"].probs  # the run went on
    for key in ("alpha", "charlie", "delta"):
        assert not run.results[key].error and len(run.results[key].probs) == 2
    assert run.out == project.source / "runs" / "zoom_in_tiny"
    assert (run.out / "predictions.csv").is_file() and (run.out / "summary.json").is_file()
    assert model_threads and threading.main_thread() not in model_threads
    # The project was saved with the run in it.
    saved = json.loads((project.source / "project.maglens.json").read_text())
    assert [r["name"] for r in saved["runs"]] == [RUN]
    assert sorted(saved["runs"][0]["results"]) == ["alpha", "bravo", "charlie", "delta"]
    assert panel.project_run_button.isEnabled() and not panel.project_cancel_button.isEnabled()

    # Again with the same checkpoint: every good record is reused and no model runs (the
    # unreadable slide is tried again, and fails again before any model).
    stamps = {p.name: p.stat().st_mtime_ns for p in (run.out / "traces").iterdir()}
    model_threads.clear()
    arrivals.clear()
    name, text = _run_on_project(qtbot, window)
    assert name == RUN and text.startswith("Done: 4/4 slides, 1 failed (3 reused)")
    assert model_threads == [] and len(arrivals) == 4
    assert {p.name: p.stat().st_mtime_ns for p in (run.out / "traces").glob("*.trace.json")} == {
        k: v for k, v in stamps.items() if k.endswith(".trace.json")}


def hold_third_slide(monkeypatch):
    """The third slide of a project run waits for Cancel (or the next project), so the stop
    always lands inside a slide; returns the real ``run_slide``."""
    real = cohort_mod.run_slide
    started: list[str] = []

    def run_slide(model, run, slide, out, device=None, cancel=None, **kwargs):
        started.append(slide.key)
        if len(started) == 3:
            assert cancel.wait(TIMEOUT_MS / 1000)
        return real(model, run, slide, out, device=device, cancel=cancel, **kwargs)

    monkeypatch.setattr(cohort_mod, "run_slide", run_slide)
    return real


def test_cancel_keeps_the_slides_done_and_writes_no_partial_record(qtbot, window, project, monkeypatch):
    """The third slide starts only once Cancel was pressed, so the cancel lands inside it."""
    real = hold_third_slide(monkeypatch)
    panel, store = window.models_panel, window.results
    qtbot.mouseClick(panel.project_run_button, Qt.MouseButton.LeftButton)
    assert panel.project_cancel_button.isEnabled() and not panel.project_run_button.isEnabled()
    qtbot.waitUntil(lambda: store.run(RUN) is not None and len(store.run(RUN).results) == 2,
                    timeout=TIMEOUT_MS)
    with qtbot.waitSignal(window.inference.runs.project_finished, timeout=TIMEOUT_MS) as blocker:
        qtbot.mouseClick(panel.project_cancel_button, Qt.MouseButton.LeftButton)
    assert blocker.args[1].startswith("Cancelled: 2/4 slides")
    run = store.run(RUN)
    assert sorted(run.results) == ["alpha", "bravo"]
    assert _records(run.out) == ["alpha.result.json", "bravo.result.json"]  # none for charlie
    assert not list(run.out.rglob("*.tmp"))
    saved = json.loads((project.source / "project.maglens.json").read_text())
    assert sorted(saved["runs"][0]["results"]) == ["alpha", "bravo"]
    assert panel.project_run_button.isEnabled() and not panel.project_cancel_button.isEnabled()

    # Run again: alpha's record is reused; bravo (unreadable) is tried again; the others run.
    monkeypatch.setattr(cohort_mod, "run_slide", real)
    name, text = _run_on_project(qtbot, window)
    assert text.startswith("Done: 4/4 slides, 1 failed (1 reused)")
    assert _records(run.out) == [f"{k}.result.json" for k in ("alpha", "bravo", "charlie", "delta")]


def test_a_project_slide_opens_with_the_trace_its_run_wrote(qtbot, window, project):
    _run_on_project(qtbot, window)
    panel, ctl = window.models_panel, window.inference
    panel.set_model("magnet")  # another model is chosen: the run's own model is shown
    slide = project.slide("charlie").path
    open_and_wait(qtbot, window, slide)
    qtbot.waitUntil(lambda: ctl.current is not None, timeout=10_000)
    assert panel.model() == MODEL
    assert ctl.shown_key == (str(slide), MODEL, RUN)
    names = [panel.trace_combo.itemText(i) for i in range(panel.trace_combo.count())]
    assert names == [RUN] and panel.trace_combo.isEnabled()
    expected = window.results.run(RUN).results["charlie"].probs
    assert ctl.current.trace.probs == pytest.approx(expected)
    assert panel.prediction.rowCount() == 2 and panel.stage_label.text() == f"From the project run {RUN}"
    # Closing the project takes its traces off the screen.
    window.results.set_project(None)
    assert ctl.current is None and panel.trace_combo.itemText(0) == "(none yet)"


def test_opening_another_project_stops_the_run_and_keeps_the_old_ones_results(qtbot, window, project,
                                                                              monkeypatch, tmp_path):
    hold_third_slide(monkeypatch)
    store = window.results
    qtbot.mouseClick(window.models_panel.project_run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: store.run(RUN) is not None and len(store.run(RUN).results) == 2,
                    timeout=TIMEOUT_MS)
    other = open_project(_project_folder(tmp_path / "other"))
    with qtbot.waitSignal(window.inference.runs.project_finished, timeout=TIMEOUT_MS) as blocker:
        store.set_project(other)
    assert blocker.args[1].startswith("Cancelled: 2/4 slides, 1 failed")
    assert other.runs == [] and store.runs() == []  # nothing of the old run in the new project
    saved = json.loads((project.source / "project.maglens.json").read_text())
    assert sorted(saved["runs"][0]["results"]) == ["alpha", "bravo"]
    assert window.models_panel.project_run_button.isEnabled()


def test_the_open_slides_trace_is_listed_when_the_run_reaches_it(qtbot, window, project):
    panel, ctl = window.models_panel, window.inference
    slide = project.slide("delta").path
    open_and_wait(qtbot, window, slide)
    assert panel.trace_combo.itemText(0) == "(none yet)" and ctl.current is None
    _run_on_project(qtbot, window)
    qtbot.waitUntil(lambda: [panel.trace_combo.itemText(i) for i in range(panel.trace_combo.count())] == [RUN])
    qtbot.wait(100)
    assert ctl.current is None  # listed, not pushed onto the screen
    panel.trace_combo.activated.emit(0)  # the user picks it
    assert ctl.shown_key == (str(slide), MODEL, RUN) and ctl.current is not None


def test_a_run_on_one_project_slide_is_kept_with_the_project(qtbot, qsettings, window, project):  # noqa: F811
    """Run on one slide of the project: the trace is written beside the project and listed in
    its file; the reopened project brings it back when the slide opens."""
    slide = project.slide("alpha").path
    open_and_wait(qtbot, window, slide)
    with qtbot.waitSignal(window.projects.saved, timeout=TIMEOUT_MS):
        with qtbot.waitSignal(window.inference.runs.slide_done, timeout=TIMEOUT_MS):
            qtbot.mouseClick(window.models_panel.run_button, Qt.MouseButton.LeftButton)
    kept = project.slide("alpha").traces
    assert [(t.model, t.name) for t in kept] == [(MODEL, "whole slide")]
    assert kept[0].path.parent == project.path.parent / "traces" / "alpha" and kept[0].path.is_file()
    saved = json.loads(project.path.read_text())
    assert saved["slides"][0]["traces"][0]["path"] == f"traces/alpha/{kept[0].path.name}"

    probs = window.results.trace((str(slide), MODEL, "whole slide")).probs
    fresh = make_window(qtbot, qsettings, size=(1200, 800))  # nothing in memory: from the file
    try:
        fresh.results.set_project(open_project(project.path))
        open_and_wait(qtbot, fresh, slide)
        qtbot.waitUntil(lambda: fresh.inference.current is not None, timeout=10_000)
        assert fresh.inference.shown_key == (str(slide), MODEL, "whole slide")
        assert fresh.inference.current.trace.probs == pytest.approx(probs)
    finally:
        fresh.close()
