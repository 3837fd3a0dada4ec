"""The Models dock shows how much of the current trace's attention lies in the slide's
annotations (tissue-relative ratio and Dice), for a trace made by hand on a needle slide."""
from __future__ import annotations

import numpy as np
import pytest

from app.attention_score import scored_class
from engines.annotations import rect_annotation
from engines.synth import SynthConfig, generate
from engines.trace import AttentionMap, SlideRef, Trace
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, open_and_wait, qsettings  # noqa: F401

WAIT_MS = 60_000


@pytest.fixture(scope="module")
def needle_slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("needles")
    slides = generate(out, slides=2, seed=3, cfg=SynthConfig(size=1024, needle_area=(0.02, 0.04), needles=(1, 1)))
    positive = next(s for s in slides if s.needles)
    return out / positive.name, positive.needles[0]


def _trace(path, size, values) -> Trace:
    rows, cols = values.shape
    t = Trace(model="fake", preset="tiny", checkpoint=None, slide=SlideRef(str(path), size, size),
              classes=["normal", "tumor"], probs=[0.3, 0.7])
    t.add(AttentionMap("map", "maps", None, (0.0, 0.0), (size / cols, size / rows), values.tolist()))
    return t


def test_ratio_is_high_for_attention_on_the_needle_and_near_one_when_spread(qtbot, qsettings, dialogs, needle_slide):  # noqa: F811
    path, (x, y, w, h) = needle_slide
    window = make_window(qtbot, qsettings)
    open_and_wait(qtbot, window, path)
    qtbot.waitUntil(lambda: len(window.annotations.doc.items) == 1, timeout=WAIT_MS)  # its .geojson
    size, cells = 1024, 64
    focused = np.zeros((cells, cells))
    c = size / cells
    focused[int((y + h / 2) // c), int((x + w / 2) // c)] = 1.0
    window.inference.add_trace(_trace(path, size, focused), "focused.json")
    label = window.models_panel.attention_score
    qtbot.waitUntil(lambda: "ratio" in label.text(), timeout=WAIT_MS)
    assert label.isVisible() or not window.models_dock.isVisible()
    ratio = float(label.text().split("ratio ")[1].split()[0])
    assert ratio > 5 and "Attention in Tumor" in label.text()
    # Spread evenly over every cell: tissue-relative, so about 1 (glass does not count).
    window.inference.add_trace(_trace(path, size, np.ones((cells, cells))), "even.json")
    qtbot.waitUntil(lambda: "ratio" in label.text() and label.text().split("ratio ")[1].split()[0] != f"{ratio:.2f}",
                    timeout=WAIT_MS)
    even = float(label.text().split("ratio ")[1].split()[0])
    assert 0.6 < even < 1.6
    # No annotations: the line goes away.
    window.annotations.doc.reset([], str(path))
    window.annotations.doc.changed.emit()
    qtbot.waitUntil(lambda: label.text() == "", timeout=WAIT_MS)


def test_scored_class_prefers_the_class_being_drawn_then_tumour_then_the_largest():
    a = [rect_annotation((0, 0, 10, 10), "Stroma"), rect_annotation((0, 0, 100, 100), "Other"),
         rect_annotation((0, 0, 5, 5), "Tumor")]
    assert scored_class(a, "Stroma") == "Stroma"
    assert scored_class(a, "Necrosis") == "Tumor"
    assert scored_class(a[:2], None) == "Other"
    assert scored_class([], "Tumor") is None
