"""The attention-in-annotation ratio and Dice of the trace on screen, against the open slide's
annotations, shown in the Models dock (``engines.evaluate.score_attention``: the same measure
as ``maglens infer --annotations`` and the benchmarks).

The tissue is found from a thumbnail and the score computed on a worker; results of a trace,
slide or annotation set that is no longer current are dropped.
"""
from __future__ import annotations

from PySide6.QtCore import QObject, QTimer

from app.docks import Background

DEBOUNCE_MS = 300  # annotation edits come in bursts (a brush stroke, an undo)
DEFAULT_CLASS = "Tumor"  # as ``maglens infer --annotation-class``


def scored_class(annotations, preferred: str | None) -> str | None:
    """Which class to score against: the class being drawn when the slide has it, else
    "Tumor" when present, else the class covering the largest area; None for no annotations."""
    area: dict[str, float] = {}
    for a in annotations:
        name = a.classification or ""
        area[name] = area.get(name, 0.0) + float(a.geometry.area)
    if not area:
        return None
    for name in (preferred, DEFAULT_CLASS):
        if name and name in area:
            return name
    return max(area, key=area.get)


def score_text(classification: str, score) -> str:
    if score is None:
        return f"Attention in {classification or 'annotations'}: no attention inside the tissue to score"
    return (f"Attention in {classification or 'annotations'}: ratio {score.ratio:.2f} "
            f"(1 = spread evenly over the tissue), Dice {score.dice:.2f}")


class AttentionScoreController(QObject):
    def __init__(self, window) -> None:
        super().__init__(window)
        self.window = window
        self.jobs = Background(self, threads=1, name="attention-score")
        self._tissue: dict[str, object] = {}  # slide path -> Tissue
        self._generation = 0
        self.text = ""
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.refresh)
        window.inference.trace_changed.connect(lambda _layers: self.schedule())
        window.annotations.doc.changed.connect(self.schedule)
        window.slide_opened.connect(lambda _path: self.schedule())
        window.destroyed.connect(lambda *_a: self.jobs.shutdown(0))

    def schedule(self) -> None:
        self._generation += 1  # whatever is computing now is already stale
        self._timer.start()

    def refresh(self) -> None:
        """Score the current trace now (on a worker); clears the line when there is nothing."""
        self._generation += 1
        generation = self._generation
        layers = self.window.inference.current
        slide = self.window.slide
        doc = self.window.annotations.doc
        trace = getattr(layers, "trace", None)
        if trace is None or slide is None or not doc.items or doc.slide != str(slide.path) \
                or str(trace.slide.path) != str(slide.path):
            self._show("")
            return
        annotations = list(doc.items)
        classification = scored_class(annotations, self.window.annotations.current_class)
        key = str(slide.path)
        tissue = self._tissue.get(key)

        def work():
            from engines.evaluate import score_attention
            from engines.tissue import tissue_of_slide

            t = tissue if tissue is not None else tissue_of_slide(slide)
            return t, score_attention(trace, annotations, t, classification)

        def done(result) -> None:
            t, score = result
            self._tissue[key] = t
            if generation == self._generation:
                self._show(score_text(classification, score))

        def failed(exc: BaseException) -> None:
            if generation == self._generation:
                self._show(f"Attention in annotations: not scored ({exc})")

        self.jobs.submit(work, done, failed)

    def _show(self, text: str) -> None:
        self.text = text
        self.window.models_panel.set_attention_score(text)

    def wait(self, msecs: int = 10_000) -> bool:
        return self.jobs.wait(msecs)


def install_attention_score(window) -> AttentionScoreController:
    """Needs the window's inference controller and annotations (install after them)."""
    return AttentionScoreController(window)
