"""Annotation import and attention-in-annotation speed, as JSON.

    PYTHONPATH=. python benchmarks/annotation_bench.py [--polygons 10000] [--maps 64]

Writes a QuPath-style GeoJSON of ``--polygons`` irregular 24-vertex outlines (some with a hole)
over a 100,000 x 80,000 px slide, then times ``read_geojson`` on it, and the
attention-in-annotation ratio and Dice (``engines.evaluate.score_attention``) of a trace of
``--maps`` 64 x 48 attention maps against all of them, within a blob of tissue from a 1024 px
mask. The tissue outline is built once per slide and timed apart. Then the canvas's paint
times while panning and zooming over all the polygons (the synthetic 100,000 px slide of
``benchmarks/viewer_bench.py``). Targets: import < 2 s, ratio < 1 s, paint p95 < 16 ms.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from engines.annotations import read_geojson  # noqa: E402
from engines.evaluate import region_in_tissue, score_attention, score_region  # noqa: E402
from engines.synth import blob_mask  # noqa: E402
from engines.tissue import Tissue, clean_mask  # noqa: E402
from engines.trace import AttentionMap, Field, SlideRef, Trace  # noqa: E402

W, H = 100_000, 80_000


def polygons_geojson(n: int, rng: np.random.Generator, radius: tuple[float, float]) -> dict:
    features = []
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    for i in range(n):
        cx, cy = rng.uniform(2000, W - 2000), rng.uniform(2000, H - 2000)
        r = rng.uniform(*radius) * (1 + 0.25 * np.sin(3 * t + rng.uniform(0, 6)))
        shell = np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)]).round(1).tolist()
        rings = [shell + [shell[0]]]
        if i % 10 == 0:  # every tenth has a hole
            hole = np.column_stack([cx + 0.3 * r * np.cos(-t), cy + 0.3 * r * np.sin(-t)]).round(1).tolist()
            rings.append(hole + [hole[0]])
        features.append({"type": "Feature", "id": f"a{i}", "geometry": {"type": "Polygon", "coordinates": rings},
                         "properties": {"objectType": "annotation",
                                        "classification": {"name": "Tumor", "color": [200, 0, 0]}}})
    return {"type": "FeatureCollection", "features": features}


def trace_with_maps(n_maps: int, rng: np.random.Generator) -> Trace:
    rows, cols = 48, 64
    cell = (W / cols, H / rows)
    maps = [AttentionMap(f"filter {k}", "filter", None, (0.0, 0.0), cell, rng.random((rows, cols)).tolist())
            for k in range(n_maps)]
    return Trace(model="grid_attention", preset="tiny", checkpoint=None, slide=SlideRef("s.tiff", W, H),
                 classes=["normal", "tumor"], probs=[0.5, 0.5], fields=[Field(0, None, 0, (0, 0, W, H))],
                 maps=maps)


def paint_bench(annotations: list, steps: int) -> dict:
    """Paint times of the slide canvas with the annotations on it while panning and zooming,
    measured as ``benchmarks/viewer_bench.py`` measures them: once a step's tiles are in, one
    more repaint is timed (``paint_ms_*``); ``all_frames`` also holds the frames that first
    build the paths of newly visible polygons. ``overlay_ms_*`` times a full draw of the layer
alone (paths already made, no reused image)."""
    import os
    import random

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtWidgets import QApplication

    from benchmarks.viewer_bench import VIEW_H, VIEW_W, bench_canvas, make_synthetic, navigate, stats, wait_frame
    from engines.slide import Slide
    from viewer.overlays.annotations import AnnotationOverlay

    app = QApplication.instance() or QApplication([])
    canvas, watch = bench_canvas(app)
    slide = Slide(make_synthetic())  # 100,000 px a side: the polygons' 100,000 x 80,000 fit on it
    canvas.set_slide(slide)
    overlay = AnnotationOverlay(annotations)
    canvas.add_overlay(overlay)
    canvas.fit_view(animate=False)
    wait_frame(app, canvas, watch, 30)
    rng = random.Random(1)
    cam = canvas.camera
    canvas.center_on(W / 2, H / 2, scale=0.05, animate=False)
    wait_frame(app, canvas, watch, 10)
    canvas.paint_ms.clear()
    cached, layer, drawn = [], [], []
    image = QImage(VIEW_W, VIEW_H, QImage.Format.Format_ARGB32_Premultiplied)
    for i in range(steps):
        if navigate(canvas, rng, i):
            canvas.center_on(rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.9) * H,
                             scale=rng.uniform(cam.min_scale, 1.0), animate=False)
        wait_frame(app, canvas, watch, 5.0)
        n = len(canvas.paint_ms)
        canvas.repaint()
        if len(canvas.paint_ms) > n:
            cached.append(canvas.paint_ms[-1])
        painter = QPainter(image)
        overlay._raster = None  # time a full draw of the layer, not its reused image
        t0 = time.perf_counter()
        overlay.paint(painter, cam)
        layer.append((time.perf_counter() - t0) * 1000)
        painter.end()
        drawn.append(overlay.last_painted)
    every = list(canvas.paint_ms)
    canvas.shutdown()
    s, o = stats(cached), stats(layer)
    return {"paint_ms_p50": s["p50"], "paint_ms_p95": s["p95"], "paint_ms_max": s["max"], "steps": s["n"],
            "all_frames": stats(every), "overlay_ms_p50": o["p50"], "overlay_ms_p95": o["p95"],
            "overlay_ms_max": o["max"], "polygons_drawn_max": max(drawn, default=0),
            "polygons_drawn_median": sorted(drawn)[len(drawn) // 2] if drawn else 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--polygons", type=int, default=10_000)
    p.add_argument("--maps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paint-steps", type=int, default=200,
                   help="pans and zooms over the annotations on a 1600x1000 canvas (0: skip)")
    p.add_argument("--radius", default="60,250",
                   help="outline radii in px, min,max (100,600 makes them overlap heavily)")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    radius = tuple(float(v) for v in a.radius.split(","))
    out: dict = {"polygons": a.polygons, "maps": a.maps, "radius_px": list(radius)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "many.geojson"
        path.write_text(json.dumps(polygons_geojson(a.polygons, rng, radius)))
        out["file_mb"] = round(path.stat().st_size / 2**20, 1)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            anns = read_geojson(path)
            times.append(time.perf_counter() - t0)
        out["import_s"] = round(min(times), 3)
    mask = clean_mask(blob_mask(rng, 820, 1024, fill=0.7, roughness=7))
    tissue = Tissue(mask, W / mask.shape[1], H / mask.shape[0])
    t0 = time.perf_counter()
    tissue.geometry  # noqa: B018  (built once per slide, cached)
    out["tissue_outline_s"] = round(time.perf_counter() - t0, 3)
    trace = trace_with_maps(a.maps, rng)
    times, prep, scoring = [], [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        score = score_attention(trace, anns, tissue, "Tumor")
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        region = region_in_tissue(anns, tissue, "Tumor")
        t1 = time.perf_counter()
        score_region(trace, region)
        prep.append(t1 - t0)
        scoring.append(time.perf_counter() - t1)
    out["ratio_s"] = round(min(times), 3)
    out["ratio_parts_s"] = {"annotation_in_tissue": round(min(prep), 3), "score": round(min(scoring), 3)}
    out["score"] = {k: round(v, 4) for k, v in score.as_dict().items()} if score else None
    out["targets"] = {"import_s": 2.0, "ratio_s": 1.0, "paint_ms_p95": 16.0}
    if a.paint_steps > 0:
        out["paint"] = paint_bench(list(anns), a.paint_steps)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
