"""The Results dock: ROC with AUROC and its CI, confusion matrix and probability histogram for a
run over a project; clicks that filter the Slides list; live, throttled updates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QObject, QPointF, Qt, Signal
from sklearn.metrics import roc_auc_score

from app.results_view import BINS, UNLABELLED, ResultsPanel, RunData, analyse, auroc_text
from engines.cohort import SlideResult
from engines.project import Project, ProjectRun, ProjectSlide
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, qsettings  # noqa: F401
from tests.test_slides_dock import _write_manifest, open_project

TIMEOUT_MS = 20_000
CLASSES = ["Normal", "Tumor"]
# key, label, P(Tumor): a mix of right and wrong, with ties and a slide at exactly 1.0
SLIDES = [("a", "Tumor", 0.95), ("b", "Tumor", 0.80), ("c", "Tumor", 0.40), ("d", "Tumor", 0.62),
          ("e", "Normal", 0.10), ("f", "Normal", 0.65), ("g", "Normal", 0.30), ("h", "Normal", 0.05),
          ("i", "Tumor", 1.00), ("j", "Normal", 0.62)]


class FakeStore(QObject):
    """The results store's contract (``app.results_store.ResultsStore``), nothing more."""

    project_changed = Signal(object)
    run_added = Signal(str)
    result_changed = Signal(str, str)

    def __init__(self) -> None:
        super().__init__()
        self.project = None

    def set_project(self, project) -> None:
        self.project = project
        self.project_changed.emit(project)

    def runs(self):
        return list(self.project.runs) if self.project is not None else []

    def result(self, run: str, key: str):
        r = self.project.run(run) if self.project is not None else None
        return r.results.get(key) if r is not None else None

    def add_run(self, run) -> None:
        self.project.add_run(run)
        self.run_added.emit(run.name)

    def add_result(self, run: str, result) -> None:
        self.project.run(run).results[result.key] = result
        self.result_changed.emit(run, result.key)


def result(key: str, label: str, probs, classes=CLASSES, error: str = "", **extra) -> SlideResult:
    r = SlideResult(name=key, key=key, label=label, split="", run={}, file=None,
                    classes=list(classes) if not error else [], probs=list(probs) if not error else [],
                    predicted=classes[int(np.argmax(probs))] if not error else "", error=error)
    for name, value in extra.items():
        setattr(r, name, value)
    return r


def project(slides=SLIDES, extra_keys=()) -> Project:
    rows = [ProjectSlide(key=k, path=Path(f"/nowhere/{k}.svs"), name=f"{k}.svs", label=lab)
            for k, lab, _p in slides]
    rows += [ProjectSlide(key=k, path=Path(f"/nowhere/{k}.svs"), name=f"{k}.svs", label=lab)
             for k, lab in extra_keys]
    return Project(source=Path("/nowhere"), slides=rows)


def new_run(name: str = "magnet tiny", classes=CLASSES) -> ProjectRun:
    return ProjectRun(name=name, model="magnet", preset="tiny", checkpoint=None, out=Path("/nowhere"),
                      classes=list(classes))


def fill(store, run: str, slides=SLIDES) -> None:
    for k, lab, p in slides:
        store.add_result(run, result(k, lab, [1 - p, p]))


@pytest.fixture
def store():
    return FakeStore()


@pytest.fixture
def panel(qtbot, store):
    w = ResultsPanel(store)
    w.resamples = 200  # the CI's width is not under test here; keep it quick
    qtbot.addWidget(w)
    w.resize(1200, 380)
    w.show()
    qtbot.waitExposed(w)
    yield w
    w.shutdown()


def wait_drawn(qtbot, panel, check) -> None:
    qtbot.waitUntil(lambda: panel.analysis is not None and check(panel.analysis), timeout=TIMEOUT_MS)


def click_at(qtbot, plot, x: float, y: float) -> None:
    """A real left click on ``plot`` at view coordinates (x, y)."""
    scene = plot.getViewBox().mapViewToScene(QPointF(x, y))
    qtbot.mouseClick(plot.viewport(), Qt.MouseButton.LeftButton, pos=plot.mapFromScene(scene))


def with_run(qtbot, panel, store, slides=SLIDES):
    store.set_project(project(slides))
    store.add_run(new_run())
    fill(store, "magnet tiny", slides)
    wait_drawn(qtbot, panel, lambda a: a.n_scored == len(slides))
    return panel.analysis


# ---------------------------------------------------------------------------------------
def test_auroc_and_counts_match_scikit_learn(qtbot, panel, store):
    store.set_project(project(SLIDES, extra_keys=[("x", "Tumor"), ("y", ""), ("z", "Normal")]))
    store.add_run(new_run())
    fill(store, "magnet tiny")
    store.add_result("magnet tiny", result("x", "Tumor", [0, 0], error="cannot read slide"))
    store.add_result("magnet tiny", result("y", "", [0.3, 0.7]))  # ran, no label
    wait_drawn(qtbot, panel, lambda a: a.n_unlabelled == 1)
    expected = roc_auc_score([lab == "Tumor" for _k, lab, _p in SLIDES], [p for *_r, p in SLIDES])
    a = panel.analysis
    assert a.auroc == pytest.approx(expected)
    assert panel.auroc_label.text().startswith(f"AUROC {expected:.3f} (95 % CI ")
    lo, hi = a.auroc_ci
    assert lo < expected < hi <= 1.0
    assert (a.n_scored, a.n_failed, a.n_unlabelled, a.n_pending) == (10, 1, 1, 1)
    assert "10 scored · 1 failed · 1 unlabelled · 1 not run yet" in panel.counts_label.text()
    # One ROC curve for the second class, through sklearn's points.
    assert len(a.curves) == 1 and a.curves[0].name == "Tumor"
    assert a.curves[0].auroc == pytest.approx(expected)
    # Confusion: rows label, columns predicted (argmax), in the run's class order.
    assert a.confusion.tolist() == [[3, 2], [1, 4]]


def test_clicking_a_confusion_cell_lists_exactly_its_slides(qtbot, panel, store):
    with_run(qtbot, panel, store)
    got = []
    panel.filter_requested.connect(lambda keys, text: got.append((sorted(keys), text)))
    click_at(qtbot, panel.confusion, 1.5, 0.5)  # row Normal, column Tumor: the false positives
    assert got == [(["f", "j"], "label Normal, predicted Tumor")]
    click_at(qtbot, panel.confusion, 0.5, 1.5)  # label Tumor, predicted Normal
    assert got[-1] == (["c"], "label Tumor, predicted Normal")
    click_at(qtbot, panel.confusion, 1.5, 1.5)
    assert got[-1][0] == ["a", "b", "d", "i"]
    n = len(got)
    click_at(qtbot, panel.confusion, 2.5, 0.5)  # outside the matrix: nothing
    assert len(got) == n


def test_clicking_a_histogram_bar_lists_its_slides(qtbot, panel, store):
    a = with_run(qtbot, panel, store)
    assert [g.label for g in a.hist] == ["Normal", "Tumor"]
    # P(Tumor) 0.6-0.7: Normal f (0.65), j (0.62); Tumor d (0.62). 1.0 falls in the last bin.
    assert a.hist[0].keys[6] == ["f", "j"] and a.hist[1].keys[6] == ["d"]
    assert a.hist[1].keys[BINS - 1] == ["a", "i"]
    got = []
    panel.filter_requested.connect(lambda keys, text: got.append((sorted(keys), text)))
    width = 0.1 / len(a.hist)
    click_at(qtbot, panel.hist, 0.6 + 0.5 * width, 1.0)  # the Normal bar of bin 6 (height 2)
    assert got == [(["f", "j"], "label Normal, P(Tumor) 0.6–0.7")]
    click_at(qtbot, panel.hist, 0.6 + 1.5 * width, 0.5)  # the Tumor bar beside it
    assert got[-1] == (["d"], "label Tumor, P(Tumor) 0.6–0.7")
    click_at(qtbot, panel.hist, 0.6 + 1.5 * width, 1.6)  # above that bar (height 1): nothing
    click_at(qtbot, panel.hist, 0.2 + 0.5 * width, 0.5)  # an empty bin: nothing
    assert len(got) == 2


def test_clicking_a_roc_point_lists_slides_above_its_threshold(qtbot, panel, store):
    a = with_run(qtbot, panel, store)
    curve = a.curves[0]
    i = int(np.nonzero(np.isclose(curve.thresholds, 0.62))[0][0])
    got = []
    panel.filter_requested.connect(lambda keys, text: got.append((sorted(keys), text)))
    click_at(qtbot, panel.roc, curve.fpr[i], curve.tpr[i])
    assert got == [(["a", "b", "d", "f", "i", "j"], "P(Tumor) ≥ 0.620")]


def test_results_arriving_update_live_and_a_burst_is_drawn_once(qtbot, panel, store):
    store.set_project(project(SLIDES))
    store.add_run(new_run())
    wait_drawn(qtbot, panel, lambda a: a.n_pending == len(SLIDES))
    assert "undefined" in panel.auroc_label.text()
    fill(store, "magnet tiny", SLIDES[:3])
    wait_drawn(qtbot, panel, lambda a: a.n_scored == 3)
    fill(store, "magnet tiny", SLIDES[3:])
    wait_drawn(qtbot, panel, lambda a: a.n_scored == len(SLIDES))
    assert panel.auroc_label.text().startswith("AUROC 0.")

    # 1,000 results arriving in one go are drawn once or twice, not 1,000 times.
    rng = np.random.default_rng(3)
    many = [(f"s{i}", CLASSES[i % 2], float(rng.uniform(0.3, 1) if i % 2 else rng.uniform(0, 0.7)))
            for i in range(1000)]
    store.set_project(project(many))
    store.add_run(new_run("second"))
    wait_drawn(qtbot, panel, lambda a: a.n_pending == 1000)
    before = panel.redraws
    fill(store, "second", many)
    wait_drawn(qtbot, panel, lambda a: a.n_scored == 1000)
    assert panel.redraws - before <= 2
    expected = roc_auc_score([lab == "Tumor" for _k, lab, _p in many], [p for *_r, p in many])
    assert panel.analysis.auroc == pytest.approx(expected)


def test_one_class_only_says_auroc_undefined(qtbot, panel, store):
    only_tumour = [(k, "Tumor", p) for k, _lab, p in SLIDES]
    a = with_run(qtbot, panel, store, only_tumour)
    assert a.auroc is None and a.auroc_ci is None and a.curves == []
    assert panel.auroc_label.text() == "AUROC undefined (all scored slides are labelled Tumor)"
    assert a.confusion.tolist() == [[0, 0], [4, 6]]
    got = []
    panel.filter_requested.connect(lambda keys, text: got.append(sorted(keys)))
    click_at(qtbot, panel.confusion, 0.5, 1.5)
    assert got == [["c", "e", "g", "h"]]
    # No labels at all: nothing scored, the histogram still shows them.
    a = analyse(RunData(CLASSES, ["p", "q"], ["", ""], [[0.2, 0.8], [0.9, 0.1]]))
    assert a.auroc is None and a.n_unlabelled == 2 and [g.label for g in a.hist] == [UNLABELLED]
    assert auroc_text(a) == "AUROC undefined (no slide with a known label has a result)"


def test_more_classes_give_one_curve_each_and_the_macro_auroc():
    classes = ["A", "B", "C"]
    rng = np.random.default_rng(5)
    labels = [classes[i % 3] for i in range(30)]
    probs = []
    for lab in labels:
        p = rng.dirichlet([1, 1, 1])
        p[classes.index(lab)] += 0.6
        probs.append(list(p / p.sum()))
    a = analyse(RunData(classes, [f"s{i}" for i in range(30)], labels, probs), resamples=100)
    y = np.array([classes.index(lab) for lab in labels])
    assert a.auroc == pytest.approx(roc_auc_score(y, np.array(probs), multi_class="ovr", average="macro"))
    assert [c.name for c in a.curves] == classes
    for c in a.curves:
        assert c.auroc == pytest.approx(roc_auc_score(y == c.cls, np.array(probs)[:, c.cls]))
    assert a.hist_class == "predicted class"


def test_attention_ratio_and_dice_show_median_and_iqr(qtbot, panel, store):
    store.set_project(project(SLIDES))
    store.add_run(new_run())
    ratios = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    for (k, lab, p), r in zip(SLIDES, ratios):
        store.add_result("magnet tiny", result(k, lab, [1 - p, p], ratio=r, dice=r / 10))
    wait_drawn(qtbot, panel, lambda a: a.n_scored == len(SLIDES))
    assert panel.spread_label.text() == ("attention ratio: median 2.75 (IQR 1.62–3.88, n 10) · "
                                         "Dice: median 0.28 (IQR 0.16–0.39, n 10)")
    assert panel.analysis.ratio["iqr"] == [pytest.approx(np.percentile(ratios, 25), abs=1e-3),
                                           pytest.approx(np.percentile(ratios, 75), abs=1e-3)]


# ---------------------------------------------------------------------------------------
def test_window_dock_appears_with_a_run_and_filters_the_slides_list(qtbot, tmp_path, qsettings, dialogs):  # noqa: F811
    window = make_window(qtbot, qsettings, size=(1400, 900))
    view = window.results_view
    assert view.dock.isHidden()  # no project, no run
    panel = open_project(qtbot, window, _write_manifest(tmp_path / "cohort"))
    assert view.dock.isHidden()  # a project without a run
    store = window.results
    store.add_run(new_run("zoom_in tiny", classes=["normal", "tumor"]))
    assert view.dock.isVisible()
    predictions = {"alpha.png": 0.9, "bravo.png": 0.7, "charlie.png": 0.3, "delta.png": 0.2}
    for slide in store.project.slides:
        p = predictions[slide.name]
        store.add_result("zoom_in tiny", result(slide.key, slide.label, [1 - p, p],
                                                classes=["normal", "tumor"]))
    view.panel.resamples = 100
    wait_drawn(qtbot, view.panel, lambda a: a.n_scored == 4)
    bravo = next(s.key for s in store.project.slides if s.name == "bravo.png")
    click_at(qtbot, view.panel.confusion, 1.5, 0.5)  # label normal, predicted tumor
    assert panel.proxy.rowCount() == 1
    assert panel.key_at(0) == bravo
    assert "label normal, predicted tumor" in panel.chip.text()
    window.save_layout()
    window.close()
    # A layout saved with the dock shown does not bring it back before a run exists.
    again = make_window(qtbot, qsettings, size=(1400, 900))
    qtbot.waitUntil(lambda: again.results_view.dock.isHidden(), timeout=TIMEOUT_MS)
    again.close()


def test_probabilities_that_do_not_fit_are_counted_as_failed_not_scored():
    data = RunData(CLASSES, ["a", "b", "c", "d", "e"], ["Tumor", "Normal", "Tumor", "Normal", "Tumor"],
                   [[0.2, 0.8], [0.9, 0.1], [float("nan"), 0.5], [0.1, 0.2, 0.7], None],
                   errors=["", "", "", "", "slide cannot be read"])
    a = analyse(data, resamples=50)
    assert (a.n_scored, a.n_failed, a.n_pending) == (2, 3, 0)
    assert a.auroc == 1.0 and a.scored_keys == ["a", "b"]
    with pytest.raises(ValueError):
        RunData(CLASSES, ["a", "b"], ["Tumor"], [None, None])
