"""Projects in the GUI: a 2,000-slide project's open time, the canvas's paint times while the
Slides dock scrolls and sorts (with thumbnails arriving), and the dock's memory. Prints JSON;
not a test.

The project is a manifest of copies of one small pyramidal slide (copies, not links: each
gets its own thumbnail and cache entry). The canvas shows the demo slide in a 1600x1000
window and pans in a circle, one ``repaint()`` per frame, while the dock scrolls a few rows
per frame and sorts by another column every ``--sort-every`` frames.

    PYTHONPATH=. python benchmarks/project_bench.py [--slides 2000] [--frames 400]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PySide6.QtCore import QSettings, Qt  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.cohort import SlideResult  # noqa: E402

DEMO = ROOT / "resources" / "CMU-1-Small-Region.svs"
SMALL = ROOT / "tests" / "data" / "boxes-levels.tiff"
VIEW_W, VIEW_H = 1600, 1000
CLASSES = ["normal", "tumor"]


def pump_until(app: QApplication, cond, timeout_s: float) -> bool:
    end = time.perf_counter() + timeout_s
    while time.perf_counter() < end:
        app.processEvents()
        if cond():
            return True
        time.sleep(0.001)
    return cond()


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "max": round(float(a.max()), 2), "n": len(values)}


def make_project(folder: Path, n: int) -> Path:
    """``n`` copies of a small slide and a manifest with labels and splits."""
    rows = ["slide,label,split"]
    for i in range(n):
        name = f"case-{i:05d}.tiff"
        shutil.copyfile(SMALL, folder / name)
        rows.append(f"{name},{CLASSES[i % 2]},{('train', 'val', 'test')[i % 3]}")
    manifest = folder / "cohort.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def pan(canvas, t: int) -> None:
    slide = canvas.slide
    fit = canvas.camera.fit_scale
    angle = t / 25.0
    canvas.center_on(slide.width * (0.5 + 0.2 * math.cos(angle)), slide.height * (0.5 + 0.2 * math.sin(angle)),
                     scale=fit * 2 ** (1 + math.sin(t / 40.0)), animate=False)


def paint_frames(app, window, frames: int, each=None) -> tuple[list[float], list[float]]:
    """Pan the canvas ``frames`` times, calling ``each(i)`` first; paint and frame times."""
    canvas = window.canvas
    paints, frame_ms = [], []
    for i in range(frames):
        t0 = time.perf_counter()
        if each is not None:
            each(i)
        app.processEvents()
        pan(canvas, i)
        n = len(canvas.paint_ms)
        canvas.repaint()
        if len(canvas.paint_ms) > n:
            paints.append(canvas.paint_ms[-1])
        frame_ms.append((time.perf_counter() - t0) * 1000)
        time.sleep(max(0.0, 1 / 60 - (time.perf_counter() - t0)))
    return paints, frame_ms


def inject_run(window) -> float:
    """A finished run over every slide, delivered through the store as a cohort run would."""
    from engines.project import ProjectRun

    store = window.results
    store.add_run(ProjectRun(name="bench run", model="magnet", preset="tiny", checkpoint=None,
                             out=Path(tempfile.gettempdir()), classes=CLASSES, results={}))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for s in store.project.slides:
        p = float(rng.uniform(0.01, 0.99))
        result = SlideResult(name=s.name, key=s.key, label=s.label, split=s.split, run={}, file=None,
                             classes=CLASSES, probs=[1 - p, p], predicted=CLASSES[int(p > 0.5)])
        store.add_result("bench run", result)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--sort-every", type=int, default=40)
    args = ap.parse_args()

    app = QApplication.instance() or QApplication([])
    from app.main_window import MainWindow

    out: dict = {"slides": args.slides}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        folder = tmp_path / "project"
        folder.mkdir()
        manifest = make_project(folder, args.slides)
        window = MainWindow(settings=QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
        window.canvas.animation_ms = 0
        window.resize(VIEW_W + 800, VIEW_H)
        window.show()
        app.processEvents()
        opened = []
        window.slide_opened.connect(opened.append)
        window.open_slide(DEMO)
        pump_until(app, lambda: bool(opened), 30)
        window.wait_for_workers(30_000)
        pump_until(app, lambda: False, 1.0)  # the first tiles arrive

        # The canvas alone, for comparison.
        base_paint, base_frame = paint_frames(app, window, args.frames // 2)
        rss0 = rss_mb()

        # 1. Open the project until its rows are on screen.
        panel = window.slides_panel
        t0 = time.perf_counter()
        window.open_project(manifest)
        ok = pump_until(app, lambda: panel.proxy.rowCount() == args.slides, 30)
        panel.table.viewport().repaint()
        out["open_ms"] = round((time.perf_counter() - t0) * 1000, 1) if ok else None
        out["results_2000_ms"] = round(inject_run(window), 1)
        app.processEvents()

        # 2. Scroll and sort the dock while the canvas pans; thumbnails arrive meanwhile.
        bar = panel.table.verticalScrollBar()
        model = panel.model
        sort_columns = [i for i, c in enumerate(model.columns) if c.kind in ("name", "label", "prob", "correct", "predicted")]
        sort_ms: list[float] = []
        scroll_ms: list[float] = []

        def dock_step(i: int) -> None:
            t = time.perf_counter()
            if i % args.sort_every == args.sort_every - 1:
                col = sort_columns[(i // args.sort_every) % len(sort_columns)]
                order = Qt.SortOrder.DescendingOrder if (i // args.sort_every) % 2 else Qt.SortOrder.AscendingOrder
                panel.table.sortByColumn(col, order)
                panel.table.viewport().repaint()
                sort_ms.append((time.perf_counter() - t) * 1000)
            else:
                bar.setValue((bar.value() + 3 * bar.singleStep() + i % 7) % max(1, bar.maximum()))
                panel.table.viewport().repaint()
                scroll_ms.append((time.perf_counter() - t) * 1000)

        paints, frames = paint_frames(app, window, args.frames, dock_step)
        pump_until(app, lambda: panel.thumbnails.pending() == 0, 30)
        rss_scrolled = rss_mb()

        # 3. Every thumbnail made and held (the worst case for memory).
        panel._request_timer.stop()  # the dock would drop requests for rows not on screen
        t0 = time.perf_counter()
        for s in window.results.project.slides:
            panel.thumbnails.request(str(s.path))
        pump_until(app, lambda: len(model.thumbs) + len(model.failed_thumbs) >= args.slides, 120)
        all_thumbs_s = time.perf_counter() - t0
        out["thumbnails_made"] = len(model.thumbs) + len(model.failed_thumbs)
        rss_all = rss_mb()
        window.close()

    out.update({
        "canvas_alone": {"paint_ms": percentiles(base_paint), "frame_ms": percentiles(base_frame)},
        "canvas_while_dock_scrolls_and_sorts": {"paint_ms": percentiles(paints), "frame_ms": percentiles(frames)},
        "dock_scroll_ms": percentiles(scroll_ms),
        "dock_sort_ms": percentiles(sort_ms),
        "thumbnails_all_s": round(all_thumbs_s, 2),
        "thumbnails_per_s": round(args.slides / all_thumbs_s, 1) if all_thumbs_s > 0 else None,
        "rss_delta_mb_after_scroll": round(rss_scrolled - rss0, 1),
        "rss_delta_mb_all_thumbnails": round(rss_all - rss0, 1),
    })
    targets = {"open_under_1s": out["open_ms"] is not None and out["open_ms"] < 1000,
               "paint_p95_under_16ms": (percentiles(paints)["p95"] or 1e9) < 16,
               "memory_under_200mb": out["rss_delta_mb_all_thumbnails"] < 200}
    out["targets_met"] = targets
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
