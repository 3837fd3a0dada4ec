"""The Results dock: for one model run over the open project, the ROC curve with AUROC and a
bootstrap 95 % CI, the confusion matrix and the probability histogram by label, plus the
median and IQR of the attention-in-annotation ratio and Dice when the run has them.

Clicking a confusion cell, a histogram bar or a point on the ROC curve asks the Slides list
to show just those slides (``filter_requested``).

The numbers come from ``analyse(RunData)``, which takes plain data and no Qt, and reuses
``engines.cohort.summarize`` (the same AUROC, CI, accuracy and confusion matrix as
``summary.json``) and ``engines.evaluate.summarise``. The panel computes it on a worker, at
most once per ``THROTTLE_MS`` while results stream in, so a run of 1,000 slides does not
redraw 1,000 times and the bootstrap never blocks the GUI thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QMainWindow, QVBoxLayout, QWidget

from app.docks import Background

THROTTLE_MS = 300  # results arriving within this time are drawn together
BINS = 10  # probability histogram: bins of 0.1 over [0, 1]
RESAMPLES = 1000  # bootstrap resamples for the AUROC's CI (as summary.json)
SEED = 0
CLOSE_WAIT_MS = 2000
UNLABELLED = "unlabelled"
# Colour-blind-safe (Okabe-Ito) for classes and labels; grey for slides without a label.
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0),
           (86, 180, 233), (240, 228, 66), (0, 0, 0)]
GREY = (150, 150, 150)
MIN_PLOT_WIDTH = 120  # each plot may shrink to this, so the dock never widens the window


# ---------------------------------------------------------------------------------------
# The numbers (no Qt)
# ---------------------------------------------------------------------------------------
@dataclass
class RunData:
    """One run over a project's slides, as plain values: one entry per slide."""

    classes: list[str]
    keys: list[str]
    labels: list[str]  # "" when unknown
    probs: list[Sequence[float] | None]  # None: failed, or not run yet
    errors: list[str] = field(default_factory=list)  # "" unless the slide failed
    predicted: list[str] = field(default_factory=list)  # default: the most probable class
    ratios: list[float | None] = field(default_factory=list)
    dices: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.keys)
        self.errors = list(self.errors) or [""] * n
        self.predicted = list(self.predicted) or [""] * n
        self.ratios = list(self.ratios) or [None] * n
        self.dices = list(self.dices) or [None] * n
        if not all(len(x) == n for x in (self.labels, self.probs, self.errors, self.predicted,
                                          self.ratios, self.dices)):
            raise ValueError("every list of a run's data needs one entry per slide")


@dataclass
class RocCurve:
    cls: int  # the class taken as positive
    name: str
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auroc: float


@dataclass
class HistGroup:
    label: str
    counts: np.ndarray  # per bin
    keys: list[list[str]]  # per bin


@dataclass
class Analysis:
    classes: list[str]
    n_slides: int = 0
    n_scored: int = 0  # ran, with a label among the run's classes
    n_failed: int = 0
    n_unlabelled: int = 0  # ran, without a label among the run's classes
    n_pending: int = 0  # not run yet
    accuracy: float | None = None
    auroc: float | None = None  # binary: of the second class; more: macro one-vs-rest
    auroc_ci: tuple[float, float] | None = None
    auroc_note: str = ""  # why the AUROC is undefined
    curves: list[RocCurve] = field(default_factory=list)
    confusion: np.ndarray | None = None  # rows: label, columns: predicted
    cell_keys: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    hist_class: str = ""  # whose probability the histogram shows
    hist_edges: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 1.0, BINS + 1))
    hist: list[HistGroup] = field(default_factory=list)
    scored_keys: list[str] = field(default_factory=list)
    scored_probs: np.ndarray | None = None  # n_scored x classes
    ratio: dict | None = None  # engines.evaluate.summarise of the attention ratio
    dice: dict | None = None

    def keys_above(self, cls: int, threshold: float) -> list[str]:
        """Scored slides whose probability of class ``cls`` is at least ``threshold``: those
        a ROC point calls positive."""
        if self.scored_probs is None or not len(self.scored_keys):
            return []
        keep = self.scored_probs[:, cls] >= threshold
        return [k for k, ok in zip(self.scored_keys, keep) if ok]


def _predicted(classes: list[str], probs: np.ndarray, given: str) -> str:
    return given if given in classes else classes[int(np.argmax(probs))]


def analyse(data: RunData, resamples: int = RESAMPLES, seed: int = SEED) -> Analysis:
    """ROC curves, AUROC with its bootstrap CI, confusion matrix, histogram and the attention
    summaries of one run. Slides that failed, are not run yet or have probabilities that do
    not match the classes are counted, never scored."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from engines.cohort import Cohort, CohortSlide, SlideResult, summarize
    from engines.evaluate import summarise

    classes = list(data.classes)
    k = len(classes)
    out = Analysis(classes=classes, n_slides=len(data.keys))
    ran: list[int] = []  # slides with usable probabilities
    for i, p in enumerate(data.probs):
        if data.errors[i]:
            out.n_failed += 1
        elif p is None:
            out.n_pending += 1
        elif k < 2 or len(p) != k or not all(math.isfinite(float(v)) for v in p):
            out.n_failed += 1  # probabilities that do not fit the run's classes
        else:
            ran.append(i)
    scored = [i for i in ran if data.labels[i] in classes]
    out.n_scored = len(scored)
    out.n_unlabelled = len(ran) - len(scored)
    out.ratio = summarise([data.ratios[i] for i in ran], seed=seed) \
        if any(data.ratios[i] is not None for i in ran) else None
    out.dice = summarise([data.dices[i] for i in ran], seed=seed) \
        if any(data.dices[i] is not None for i in ran) else None
    if not ran:
        out.auroc_note = "no slide has a result yet" if out.n_failed == 0 else "no slide ran"
        return out

    probs = {i: np.asarray(data.probs[i], float) for i in ran}
    pred = {i: _predicted(classes, probs[i], data.predicted[i]) for i in ran}

    # Histogram: binary, the second class's probability; more classes, the predicted one's.
    positive = 1 if k == 2 else None
    out.hist_class = classes[1] if positive is not None else "predicted class"
    groups = [c for c in classes if any(data.labels[i] == c for i in scored)]
    if out.n_unlabelled:
        groups.append(UNLABELLED)
    for g in groups:
        members = [i for i in ran if (data.labels[i] if data.labels[i] in classes else UNLABELLED) == g]
        values = [probs[i][positive] if positive is not None else probs[i][classes.index(pred[i])]
                  for i in members]
        bins = np.clip(np.floor(np.asarray(values) * BINS).astype(int), 0, BINS - 1)
        keys: list[list[str]] = [[] for _ in range(BINS)]
        for i, b in zip(members, bins):
            keys[b].append(data.keys[i])
        out.hist.append(HistGroup(g, np.array([len(x) for x in keys]), keys))

    if not scored:
        out.auroc_note = "no slide with a known label has a result"
        return out
    out.scored_keys = [data.keys[i] for i in scored]
    out.scored_probs = np.array([probs[i] for i in scored])

    # Accuracy, confusion matrix, AUROC and its CI exactly as summary.json has them.
    cohort = Cohort(source=Path("."), labelled=True, slides=[
        CohortSlide(Path(data.keys[i]), data.keys[i], data.labels[i], "", data.keys[i]) for i in scored])
    records = [SlideResult(name=data.keys[i], key=data.keys[i], label=data.labels[i], split="", run={},
                           file=None, classes=classes, probs=[float(v) for v in probs[i]],
                           predicted=pred[i]) for i in scored]
    summary = summarize(cohort, records, classes, {}, resamples=resamples, seed=seed)
    out.accuracy = summary["accuracy"]
    out.confusion = np.asarray(summary["confusion"]["matrix"], int)
    for i in scored:
        cell = (classes.index(data.labels[i]), classes.index(pred[i]))
        out.cell_keys.setdefault(cell, []).append(data.keys[i])
    out.auroc = summary["auroc"]
    out.auroc_ci = tuple(summary["auroc_ci95"]) if summary["auroc_ci95"] else None
    present = sorted({data.labels[i] for i in scored})
    if out.auroc is None:
        missing = [c for c in classes if c not in present]
        out.auroc_note = (f"all scored slides are labelled {present[0]}" if len(present) == 1
                          else f"no scored slide is labelled {', '.join(missing)}")

    y = np.array([classes.index(data.labels[i]) for i in scored])
    for c in ([1] if k == 2 else range(k)):
        truth = (y == c).astype(int)
        if truth.min() == truth.max():
            continue  # a class with no slide, or every slide: no curve
        fpr, tpr, thr = roc_curve(truth, out.scored_probs[:, c])
        out.curves.append(RocCurve(c, classes[c], fpr, tpr, thr,
                                   float(roc_auc_score(truth, out.scored_probs[:, c]))))
    return out


def _result_value(result, name: str) -> float | None:
    value = getattr(result, name, None) if result is not None else None
    try:
        value = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and math.isfinite(value) else None


def run_data(project, run, result_of) -> RunData:
    """``RunData`` for ``run`` (an ``engines.project.ProjectRun``) over ``project``'s slides;
    ``result_of(run name, key)`` gives a slide's ``SlideResult`` or None."""
    classes = list(run.classes)
    keys, labels, probs, errors, predicted, ratios, dices = [], [], [], [], [], [], []
    for slide in project.slides:
        r = result_of(run.name, slide.key)
        if not classes and r is not None and r.classes:
            classes = list(r.classes)
        keys.append(slide.key)
        labels.append(slide.label or (r.label if r is not None else ""))
        errors.append(r.error if r is not None else "")
        probs.append(list(r.probs) if r is not None and not r.error and r.probs else None)
        predicted.append(r.predicted if r is not None else "")
        ratios.append(_result_value(r, "ratio"))
        dices.append(_result_value(r, "dice"))
    return RunData(classes, keys, labels, probs, errors, predicted, ratios, dices)


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------
def auroc_text(a: Analysis) -> str:
    if a.auroc is None:
        return f"AUROC undefined ({a.auroc_note})" if a.auroc_note else "AUROC undefined"
    ci = f" (95 % CI {a.auroc_ci[0]:.3f}–{a.auroc_ci[1]:.3f})" if a.auroc_ci else ""
    return f"AUROC {a.auroc:.3f}{ci}"


def counts_text(a: Analysis) -> str:
    parts = [f"{a.n_scored} scored", f"{a.n_failed} failed", f"{a.n_unlabelled} unlabelled"]
    if a.n_pending:
        parts.append(f"{a.n_pending} not run yet")
    if a.accuracy is not None:
        parts.insert(0, f"accuracy {a.accuracy:.3f}")
    return " · ".join(parts)


def spread_text(a: Analysis) -> str:
    """Median and IQR of the attention ratio and Dice over the slides that have them."""
    parts = []
    for name, s in (("attention ratio", a.ratio), ("Dice", a.dice)):
        if s and s.get("median") is not None:
            lo, hi = s["iqr"]
            parts.append(f"{name}: median {s['median']:.2f} (IQR {lo:.2f}–{hi:.2f}, n {s['n']})")
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------
# The plots
# ---------------------------------------------------------------------------------------
def _colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


class _CountAxis(pg.AxisItem):
    """Slide counts are whole numbers: no tick at 0.5 slides."""

    def tickValues(self, minVal, maxVal, size):  # noqa: N802,N803 - pyqtgraph override
        levels = super().tickValues(minVal, maxVal, size)
        whole = [(spacing, [v for v in values if float(v).is_integer()]) for spacing, values in levels
                 if spacing >= 1]
        return whole or [(1.0, [float(v) for v in range(int(math.ceil(minVal)), int(maxVal) + 1)])]


def _plot(title: str, counts: bool = False) -> pg.PlotWidget:
    plot = pg.PlotWidget(background="w", axisItems={"left": _CountAxis("left")} if counts else None)
    plot.setTitle(title, color=(40, 40, 40), size="10pt")
    plot.setMenuEnabled(False)
    plot.setMouseEnabled(x=False, y=False)
    plot.hideButtons()
    plot.setMinimumSize(200, 180)
    return plot


def _name(text: str, limit: int = 14) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ResultsPanel(QWidget):
    """The Results dock's widget, following a results store (``app.results_store``).

    ``filter_requested(keys, description)``: show only these slides in the Slides list.
    ``runs_appeared()``: the project now has a run (it had none).
    """

    filter_requested = Signal(object, str)
    runs_appeared = Signal()
    analysed = Signal()  # a new analysis is on screen

    def __init__(self, store, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        pg.setConfigOptions(antialias=True)
        self.store = store
        self.analysis: Analysis | None = None
        self.resamples = RESAMPLES
        self.redraws = 0  # analyses drawn: results arriving together are drawn once
        self._token = 0  # which request the worker's answer belongs to
        self._busy = False
        self._again = False  # results changed while the worker was busy
        self._had_runs = False
        self._jobs = Background(self, threads=1, name="results-view")

        self.run_combo = QComboBox()
        self.run_combo.setToolTip("Which run over the project to show")
        self.run_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.run_combo.currentIndexChanged.connect(lambda *_a: self._changed(now=True))
        self.auroc_label = QLabel("")
        self.auroc_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        font = self.auroc_label.font()
        font.setBold(True)
        self.auroc_label.setFont(font)
        self.counts_label = QLabel("")
        self.spread_label = QLabel("")
        self.spread_label.setToolTip("Over the slides with an annotation: the share of attention "
                                     "inside it over its share of the tissue (1 is chance), and the "
                                     "overlap of the top-attention region with it")
        self.hint_label = QLabel("Click a cell, a bar or a point on the curve to list those slides")
        self.hint_label.setStyleSheet("color: grey")

        self.roc = _plot("ROC")
        self.roc.setLabel("bottom", "false positive rate")
        self.roc.setLabel("left", "true positive rate")
        self.roc.setXRange(0, 1, padding=0.03)
        self.roc.setYRange(0, 1, padding=0.03)
        self.roc.setAspectLocked(False)
        self.roc.showGrid(x=True, y=True, alpha=0.2)
        self.roc_legend = self.roc.addLegend(offset=(-8, -8), labelTextSize="8pt",
                                             brush=pg.mkBrush(255, 255, 255, 220))
        self.confusion = _plot("Confusion matrix")
        self.confusion.setLabel("bottom", "predicted")
        self.confusion.setLabel("left", "label")
        self.confusion.getViewBox().invertY(True)
        self.confusion.scene().sigMouseClicked.connect(self._confusion_clicked)
        self.hist = _plot("Probability by label", counts=True)
        self.hist.setLabel("left", "slides")
        self.hist_legend = self.hist.addLegend(offset=(-8, 4), labelTextSize="8pt", colCount=2,
                                               brush=pg.mkBrush(255, 255, 255, 220))
        self.hist.scene().sigMouseClicked.connect(self._hist_clicked)

        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(self.run_combo)
        top.addWidget(self.auroc_label)
        top.addWidget(self.counts_label, 1)
        plots = QHBoxLayout()
        plots.setContentsMargins(0, 0, 0, 0)
        for p in (self.roc, self.confusion, self.hist):
            p.setMinimumWidth(MIN_PLOT_WIDTH)
            plots.addWidget(p, 1)
        bottom = QHBoxLayout()
        bottom.setContentsMargins(0, 0, 0, 0)
        bottom.addWidget(self.spread_label, 1)
        bottom.addWidget(self.hint_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 2, 4, 2)
        layout.addLayout(top)
        layout.addLayout(plots, 1)
        layout.addLayout(bottom)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(THROTTLE_MS)
        self._timer.timeout.connect(self._compute)
        store.project_changed.connect(lambda _p: self._rebuild_runs(select_newest=True))
        store.run_added.connect(lambda _name: self._rebuild_runs(select_newest=True))
        store.result_changed.connect(self._result_changed)
        self._rebuild_runs(select_newest=True)

    # -- following the store -------------------------------------------------------------
    def run_name(self) -> str | None:
        return self.run_combo.currentText() or None

    def choose_run(self, name: str) -> None:
        i = self.run_combo.findText(name)
        if i >= 0:
            self.run_combo.setCurrentIndex(i)

    def _rebuild_runs(self, select_newest: bool) -> None:
        names = [r.name for r in self.store.runs()] if self.store.project is not None else []
        current = self.run_name()
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        self.run_combo.addItems(names)
        if names:
            self.run_combo.setCurrentIndex(len(names) - 1 if select_newest or current not in names
                                           else names.index(current))
        self.run_combo.blockSignals(False)
        self.run_combo.setVisible(len(names) > 1)
        if names and not self._had_runs:
            self.runs_appeared.emit()
        self._had_runs = bool(names)
        self._changed(now=True)

    def _result_changed(self, run: str, _key: str) -> None:
        if run == self.run_name():
            self._changed(now=False)

    def _changed(self, now: bool) -> None:
        """Ask for a new analysis: at once for another run (an answer still coming for the
        one before is dropped), else within ``THROTTLE_MS`` of the first new result."""
        if now:
            self._token += 1
            self._timer.start(0)
        elif not self._timer.isActive():
            self._timer.start()  # not restarted: a steady stream still redraws now and then

    def _compute(self) -> None:
        if self._busy:
            self._again = True
            return
        project, name = self.store.project, self.run_name()
        run = next((r for r in self.store.runs() if r.name == name), None) if project and name else None
        if run is None:
            self.show_analysis(None)
            return
        data = run_data(project, run, self.store.result)  # reads only: cheap on this thread
        token, resamples = self._token, self.resamples
        self._busy = True
        submitted = self._jobs.submit(lambda: analyse(data, resamples),
                                      lambda a: self._done(token, a), lambda e: self._failed(token, e))
        if not submitted:
            self._busy = False

    def _done(self, token: int, analysis: Analysis) -> None:
        self._busy = False
        if token == self._token:
            self.show_analysis(analysis)
        if token != self._token:
            self._again = False
            self._timer.start(0)
        elif self._again:
            self._again = False
            if not self._timer.isActive():
                self._timer.start()

    def _failed(self, token: int, exc: BaseException) -> None:
        self._busy = False
        if token == self._token:
            self.show_analysis(None)
            self.auroc_label.setText(f"Results could not be computed: {exc}")
        self._again = False

    def wait(self, msecs: int = 5000) -> bool:
        return self._jobs.wait(msecs)

    def shutdown(self, msecs: int = 2000) -> None:
        self._timer.stop()
        self._jobs.shutdown(msecs)

    # -- drawing -------------------------------------------------------------------------
    def show_analysis(self, a: Analysis | None) -> None:
        """Draw ``a`` (None: nothing to show)."""
        self.analysis = a
        self.redraws += 1
        for p in (self.roc, self.confusion, self.hist):
            p.clear()
        if a is None:
            self.auroc_label.setText("No run over this project yet" if self.store.project is not None
                                     else "No project open")
            self.counts_label.setText("")
            self.spread_label.setText("")
            self.analysed.emit()
            return
        self.auroc_label.setText(auroc_text(a))
        self.counts_label.setText(counts_text(a))
        spread = spread_text(a)
        self.spread_label.setText(spread)
        self.spread_label.setVisible(bool(spread))
        self._draw_roc(a)
        self._draw_confusion(a)
        self._draw_hist(a)
        self.analysed.emit()

    def _draw_roc(self, a: Analysis) -> None:
        dash = pg.mkPen((170, 170, 170), style=Qt.PenStyle.DashLine)
        self.roc.addItem(pg.PlotCurveItem([0, 1], [0, 1], pen=dash))
        for curve in a.curves:
            colour = _colour(curve.cls)
            name = (f"{_name(curve.name)} {curve.auroc:.3f}" if len(a.classes) > 2
                    else f"AUROC {curve.auroc:.3f}")
            self.roc.addItem(pg.PlotCurveItem(curve.fpr, curve.tpr, pen=pg.mkPen(colour, width=2), name=name))
            finite = np.isfinite(curve.thresholds)  # the first point stands for "no slide positive"
            points = pg.ScatterPlotItem(
                curve.fpr[finite], curve.tpr[finite], size=7, pen=pg.mkPen(colour), hoverable=True,
                brush=pg.mkBrush(*colour, 160), hoverSize=11,
                data=[(curve.cls, float(t)) for t in curve.thresholds[finite]],
                tip=lambda x, y, data: f"P({a.classes[data[0]]}) ≥ {data[1]:.3f}\nFPR {x:.2f}, TPR {y:.2f}")
            points.sigClicked.connect(self._roc_clicked)
            self.roc.addItem(points)
        self.roc.setXRange(0, 1, padding=0.03)
        self.roc.setYRange(0, 1, padding=0.03)

    def _draw_confusion(self, a: Analysis) -> None:
        k = len(a.classes)
        names = [_name(c) for c in a.classes]
        ticks = [[(j + 0.5, names[j]) for j in range(k)]]
        self.confusion.getAxis("bottom").setTicks(ticks)
        self.confusion.getAxis("left").setTicks(ticks)
        if a.confusion is None or k == 0:
            return
        m = a.confusion
        rows = m.sum(axis=1, keepdims=True)
        share = np.divide(m, rows, out=np.zeros(m.shape, float), where=rows > 0)
        x0, y0, brushes = [], [], []
        for i in range(k):
            for j in range(k):
                x0.append(j)
                y0.append(i)
                # Right answers in blue, wrong ones in orange, deeper for a larger share of the row.
                base = np.array((0, 114, 178) if i == j else (213, 94, 0), float)
                rgb = 255 - (255 - base) * (0.12 + 0.88 * share[i, j])
                brushes.append(pg.mkBrush(QColor(*(int(v) for v in rgb))))
        self.confusion.addItem(pg.BarGraphItem(x0=x0, y0=y0, width=1, height=1, brushes=brushes,
                                               pen=pg.mkPen("w", width=2)))
        for i in range(k):
            for j in range(k):
                dark = share[i, j] > 0.55
                text = pg.TextItem(str(int(m[i, j])), color="w" if dark else (30, 30, 30), anchor=(0.5, 0.5))
                font = text.textItem.font()
                font.setPointSize(11 if k <= 4 else 8)
                font.setBold(True)
                text.setFont(font)
                text.setPos(j + 0.5, i + 0.5)
                self.confusion.addItem(text)
        self.confusion.setXRange(0, k, padding=0.02)
        self.confusion.setYRange(0, k, padding=0.02)

    def _draw_hist(self, a: Analysis) -> None:
        self.hist.setLabel("bottom", f"P({_name(a.hist_class, 24)})")
        edges = a.hist_edges
        n = max(1, len(a.hist))
        width = (edges[1] - edges[0]) / n
        top = 1
        for g, group in enumerate(a.hist):
            colour = GREY if group.label == UNLABELLED else _colour(
                a.classes.index(group.label) if group.label in a.classes else g)
            shown = group.counts > 0  # no flat bars along the axis for empty bins
            self.hist.addItem(pg.BarGraphItem(
                x0=(edges[:-1] + g * width)[shown], height=group.counts[shown], width=width * 0.92,
                brush=pg.mkBrush(*colour, 200), pen=pg.mkPen(colour), name=_name(group.label)))
            top = max(top, int(group.counts.max()))
        self.hist.setXRange(0, 1, padding=0.02)
        self.hist.setYRange(0, top * 1.3, padding=0.02)  # headroom for the legend

    # -- clicks ------------------------------------------------------------------------
    def _view_point(self, plot: pg.PlotWidget, ev) -> tuple[float, float] | None:
        if ev.button() != Qt.MouseButton.LeftButton:
            return None
        vb = plot.getViewBox()
        if not vb.sceneBoundingRect().contains(ev.scenePos()):
            return None
        p = vb.mapSceneToView(ev.scenePos())
        return p.x(), p.y()

    def _confusion_clicked(self, ev) -> None:
        pos = self._view_point(self.confusion, ev)
        if pos is not None:
            self.click_cell(int(math.floor(pos[1])), int(math.floor(pos[0])))

    def _hist_clicked(self, ev) -> None:
        pos = self._view_point(self.hist, ev)
        a = self.analysis
        if pos is None or a is None or not a.hist:
            return
        x, y = pos
        edges = a.hist_edges
        if not edges[0] <= x < edges[-1] or y < 0:
            return
        b = min(int((x - edges[0]) / (edges[1] - edges[0])), BINS - 1)
        g = min(int((x - edges[b]) / ((edges[1] - edges[0]) / len(a.hist))), len(a.hist) - 1)
        if y <= a.hist[g].counts[b]:
            self.click_bar(g, b)

    def _roc_clicked(self, _item, points, *_args) -> None:
        if len(points):
            cls, threshold = points[0].data()
            self.click_threshold(cls, threshold)

    def click_cell(self, row: int, col: int) -> bool:
        """Ask for the slides labelled ``classes[row]`` and predicted ``classes[col]``."""
        a = self.analysis
        if a is None or a.confusion is None or not (0 <= row < len(a.classes) and 0 <= col < len(a.classes)):
            return False
        keys = a.cell_keys.get((row, col), [])
        if not keys:
            return False
        self.filter_requested.emit(list(keys), f"label {a.classes[row]}, predicted {a.classes[col]}")
        return True

    def click_bar(self, group: int, bin_: int) -> bool:
        """Ask for the slides of histogram group ``group`` (a label) in bin ``bin_``."""
        a = self.analysis
        if a is None or not (0 <= group < len(a.hist) and 0 <= bin_ < BINS):
            return False
        keys = a.hist[group].keys[bin_]
        if not keys:
            return False
        lo, hi = a.hist_edges[bin_], a.hist_edges[bin_ + 1]
        label = a.hist[group].label
        who = "no label" if label == UNLABELLED else f"label {label}"
        self.filter_requested.emit(list(keys), f"{who}, P({a.hist_class}) {lo:.1f}–{hi:.1f}")
        return True

    def click_threshold(self, cls: int, threshold: float) -> bool:
        """Ask for the scored slides whose probability of class ``cls`` is at least ``threshold``."""
        a = self.analysis
        if a is None or not 0 <= cls < len(a.classes):
            return False
        keys = a.keys_above(cls, threshold)
        if not keys:
            return False
        self.filter_requested.emit(keys, f"P({a.classes[cls]}) ≥ {threshold:.3f}")
        return True


# ---------------------------------------------------------------------------------------
# The window
# ---------------------------------------------------------------------------------------
class ResultsView(QObject):
    """What ``install_results_view`` adds: the panel, its dock and the link to the Slides list."""

    def __init__(self, window: QMainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.panel = ResultsPanel(window.results, window)
        # Under the canvas, tabbed with the probability trail, so the canvas keeps its height.
        self.dock = window.add_dock("Results", "results_dock", self.panel,
                                    Qt.DockWidgetArea.BottomDockWidgetArea, beside=window.trail_dock)
        self.dock.hide()  # until the project has a run
        self.panel.runs_appeared.connect(self._show)
        self.panel.filter_requested.connect(self._filter_slides)
        # A saved layout may show the dock again; without a run it stays hidden.
        QTimer.singleShot(0, lambda: None if self.panel.run_name() else self.dock.hide())
        window.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        if obj is self.window and event.type() == QEvent.Type.Close:
            self.panel.shutdown(CLOSE_WAIT_MS)
        return False

    def _show(self) -> None:
        first = not self.dock.isVisible()
        self.dock.show()
        self.dock.raise_()
        if first:  # a third of the window: the canvas stays the main view
            self.window.resizeDocks([self.dock], [max(240, self.window.height() // 3)],
                                    Qt.Orientation.Vertical)

    def _filter_slides(self, keys: list[str], description: str) -> None:
        """The Slides list shows those slides, with this run's columns."""
        slides = getattr(self.window, "slides_panel", None)
        if slides is None or not hasattr(slides, "set_filter_keys"):
            return
        run = self.panel.run_name()
        if run and hasattr(slides, "choose_run"):
            slides.choose_run(run)
        slides.set_filter_keys(keys, description)
        dock = getattr(self.window, "slides_dock", None)
        if dock is not None:
            dock.show()
            dock.raise_()


def install_results_view(window: QMainWindow) -> ResultsView:
    """Add the Results dock to ``window`` (hidden until its project has a run) and its entry in
    View. Sets ``window.results_view`` (this controller)."""
    view = ResultsView(window)
    window.results_view = view
    return view
