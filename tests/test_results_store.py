"""The results store (``app.results_store``): traces by slide, model and name; a project's runs
and their per-slide results with signals; traces a project's runs wrote, read lazily per slide."""
from __future__ import annotations

from pathlib import Path

import pytest

from app.results_store import ResultsStore
from engines.cohort import SlideResult, trace_path
from engines.project import ProjectRun, open_project
from engines.trace import SlideRef, Trace

SLIDE_BYTES = b"not opened: the store never reads slides"


def _trace(model: str, slide: str, probs=(0.3, 0.7)) -> Trace:
    return Trace(model=model, preset="tiny", checkpoint=None, slide=SlideRef(slide, 100, 80, 0.5),
                 classes=["normal", "tumor"], probs=list(probs))


def _result(key: str, error: str = "") -> SlideResult:
    return SlideResult(name=f"{key}.svs", key=key, label="tumor", split="", run={"model": "zoom_in"},
                       file=None, classes=["normal", "tumor"], probs=[] if error else [0.3, 0.7],
                       predicted="" if error else "tumor", error=error)


@pytest.fixture
def project(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    for n in ("a", "b", "c"):
        (folder / f"{n}.svs").write_bytes(SLIDE_BYTES)
    return open_project(folder)


def _run(project, name="zoom_in tiny", results=None) -> ProjectRun:
    out = Path(project.source) / "runs" / name.replace(" ", "_")
    return ProjectRun(name, "zoom_in", "tiny", None, out, ["normal", "tumor"], dict(results or {}))


def test_traces_are_kept_by_slide_model_and_name(qtbot):
    store = ResultsStore()
    a, b = "/x/a.svs", "/x/b.svs"
    with qtbot.waitSignal(store.traces_changed) as blocker:
        store.put_trace((a, "zoom_in", "whole slide"), _trace("zoom_in", a))
    assert blocker.args == [a]
    store.put_trace((a, "magnet", "whole slide"), _trace("magnet", a))
    store.put_trace((a, "zoom_in", "region 5x5 at (0, 0)"), _trace("zoom_in", a))
    store.put_trace((b, "zoom_in", "whole slide"), _trace("zoom_in", b))
    assert sorted(store.trace_keys(a)) == [(a, "magnet", "whole slide"), (a, "zoom_in", "region 5x5 at (0, 0)"),
                                           (a, "zoom_in", "whole slide")]
    assert sorted(k[2] for k in store.trace_keys(a, "zoom_in")) == ["region 5x5 at (0, 0)", "whole slide"]
    assert store.trace((b, "zoom_in", "whole slide")).slide.path == b
    assert store.trace((b, "magnet", "whole slide")) is None
    store.remove_trace((a, "magnet", "whole slide"))
    assert store.trace_keys(a, "magnet") == []


def test_runs_and_results_arrive_with_signals(qtbot, project):
    store = ResultsStore()
    with qtbot.waitSignal(store.project_changed) as blocker:
        store.set_project(project)
    assert blocker.args == [project] and store.project is project
    assert store.runs() == [] and store.result("zoom_in tiny", "a") is None
    with qtbot.waitSignal(store.run_added) as blocker:
        store.add_run(_run(project))
    assert blocker.args == ["zoom_in tiny"] and [r.name for r in store.runs()] == ["zoom_in tiny"]
    seen = []
    store.result_changed.connect(lambda run, key: seen.append((run, key, store.result(run, key))))
    store.add_result("zoom_in tiny", _result("b"))
    store.add_result("zoom_in tiny", _result("a", error="cannot be read"))
    assert [(r, k) for r, k, _ in seen] == [("zoom_in tiny", "b"), ("zoom_in tiny", "a")]
    assert seen[0][2].predicted == "tumor" and seen[1][2].error == "cannot be read"
    assert project.run("zoom_in tiny").results.keys() == {"a", "b"}  # the project holds them
    with pytest.raises(KeyError):
        store.add_result("no such run", _result("c"))
    with qtbot.waitSignal(store.project_changed) as blocker:
        store.set_project(None)
    assert blocker.args == [None] and store.runs() == []


def test_add_run_without_a_project_is_refused(qtbot, project):
    with pytest.raises(ValueError, match="no project"):
        ResultsStore().add_run(_run(project))


def test_a_slides_run_traces_load_when_asked_and_leave_with_the_project(qtbot, project):
    store = ResultsStore()
    store.set_project(project)
    run = _run(project, results={"a": _result("a"), "b": _result("b"), "c": _result("c", error="broken")})
    store.add_run(run)
    other = _run(project, "magnet tiny", results={"a": _result("a")})
    other.model = "magnet"
    store.add_run(other)
    slide_a = str(project.slide("a").path)
    slide_b = str(project.slide("b").path)
    _trace("zoom_in", slide_a, (0.1, 0.9)).save(trace_path(run.out, "a"))
    _trace("magnet", slide_a, (0.6, 0.4)).save(trace_path(other.out, "a"))
    trace_path(run.out, "b").write_text("{ not a trace")  # damaged: skipped, no crash
    single = (slide_a, "zoom_in", "whole slide")
    store.put_trace(single, _trace("zoom_in", slide_a))

    assert store.trace_keys(slide_a) == [single]  # nothing read before the slide is asked for

    def load(slide: str) -> list:
        with qtbot.waitSignal(store.project_traces_ready, timeout=5000) as ready:
            store.load_project_traces(slide)
        assert ready.args[0] == slide
        return ready.args[1]

    with qtbot.waitSignal(store.traces_changed) as blocker:
        keys = load(slide_a)  # read on a worker; the window stays free meanwhile
    assert blocker.args == [slide_a]
    assert keys == [(slide_a, "zoom_in", "zoom_in tiny"), (slide_a, "magnet", "magnet tiny")]
    assert store.trace(keys[0]).probs == [0.1, 0.9] and store.trace(keys[1]).probs == [0.6, 0.4]
    with qtbot.assertNotEmitted(store.traces_changed):
        assert load(slide_a) == keys  # read once, kept
    assert load(slide_b) == []  # its file is damaged
    assert load(str(project.slide("c").path)) == []  # it failed: no trace
    with qtbot.assertNotEmitted(store.project_traces_ready, wait=100):
        store.load_project_traces("/elsewhere/not-in-project.svs")

    # A re-run slide's new trace is read again when next asked.
    _trace("zoom_in", slide_a, (0.8, 0.2)).save(trace_path(run.out, "a"))
    store.add_result("zoom_in tiny", _result("a"))
    assert store.trace(keys[0]) is None
    assert store.trace(load(slide_a)[0]).probs == [0.8, 0.2]

    # Traces still being read when their project closes are dropped.
    _trace("magnet", slide_b, (0.3, 0.7)).save(trace_path(other.out, "b"))
    store.load_project_traces(slide_b)
    store.set_project(None)
    qtbot.wait(200)
    assert store.trace_keys(slide_b) == []
    store.set_project(project)

    store.set_project(None)  # the runs' traces go with their project, a single run's stay
    assert store.trace_keys(slide_a) == [single]
