"""``maglens snapshot``: run a model and render the view with its overlays and legend to PNG,
offscreen, with the canvas's own renderer (what it draws is what the user sees)."""
from __future__ import annotations

import os
from pathlib import Path

from engines.slide import Slide
from engines.trace import Trace

LAYER_NAMES = ("boxes", "maps", "trail")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 1600x1000, got {text!r}") from None
    if not (0 < w <= 16384 and 0 < h <= 16384):
        raise ValueError(f"--size must be 1..16384 pixels a side, got {text!r}")
    return w, h


def parse_layers(text: str | None) -> set[str]:
    """``boxes,maps,trail`` (any of them), ``none`` for the bare slide; all when empty."""
    if not text:
        return set(LAYER_NAMES)
    if text.strip().lower() == "none":
        return set()
    chosen = {t.strip() for t in text.split(",") if t.strip()}
    bad = chosen - set(LAYER_NAMES)
    if bad:
        raise ValueError(f"--layers takes {', '.join(LAYER_NAMES)} or none; unknown: {', '.join(sorted(bad))}")
    return chosen


def render_trace(slide: Slide, trace: Trace, out: str | os.PathLike, size: tuple[int, int],
                 view: tuple[float, float, float, float] | None = None,
                 layers: set[str] | None = None) -> Path:
    """Draw ``trace`` over ``slide`` and save a PNG atomically; returns the path.
    ``layers`` None draws all; an empty set draws the slide alone."""
    # Offscreen even where a display exists: nothing is shown, and a stale DISPLAY (ssh)
    # must not fail a headless command. An app already running keeps its own platform.
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    from app.main_window import _save_png_atomic
    from viewer.canvas import SlideCanvas
    from viewer.figure import render_figure
    from viewer.trace_layers import TraceLayers

    app = QApplication.instance() or QApplication([])
    layers = set(LAYER_NAMES) if layers is None else layers
    canvas = SlideCanvas()
    try:
        canvas.resize(*size)
        canvas.set_slide(slide)
        tl = TraceLayers(canvas, trace)
        tl.show()
        tl.fields.visible = "boxes" in layers and bool(tl.fields.fields)
        tl.trail.visible = "trail" in layers and bool(tl.trail.steps)
        if "maps" not in layers:
            for ov in tl.maps:
                ov.visible = False
        title = f"{trace.model}: {trace.prediction} ({max(trace.probs):.2f})" if trace.probs else trace.model
        if trace.checkpoint is None:
            title += " — initial weights"
        rect = view or trace.roi or (0.0, 0.0, float(slide.width), float(slide.height))
        image = render_figure(canvas, size[0], size[1], rect, title)
        target = Path(out)
        _save_png_atomic(image, target)
        app.processEvents()
        return target
    finally:
        canvas.shutdown()
        canvas.deleteLater()
