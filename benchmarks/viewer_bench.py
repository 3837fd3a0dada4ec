"""Viewer benchmark: open, paint, jump and tile-throughput numbers for SlideCanvas, as JSON.

Runs offscreen at a 1600x1000 viewport on the demo slide and on a synthetic 100000x100000
JPEG pyramidal TIFF generated once into ``benchmarks/.cache/``. Not a test: it prints numbers.

    PYTHONPATH=. python benchmarks/viewer_bench.py [--quick] [--slides demo,synthetic]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PySide6.QtCore import QEventLoop, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.slide import Slide  # noqa: E402
from viewer.canvas import SlideCanvas  # noqa: E402
from viewer.tiles import TileKey  # noqa: E402

CACHE_DIR = ROOT / "benchmarks" / ".cache"
DEMO = ROOT / "resources" / "CMU-1-Small-Region.svs"
SYNTH = CACHE_DIR / "synthetic-100k.tiff"
VIEW_W, VIEW_H = 1600, 1000
SYNTH_SIDE = 100_000


# -- synthetic slide ---------------------------------------------------------------------------
def make_synthetic(path: Path = SYNTH, side: int = SYNTH_SIDE) -> Path:
    """A textured JPEG pyramid, built once (pyvips streams it; nothing is held whole)."""
    if path.exists() and path.stat().st_size > 0:
        return path
    import pyvips

    rng = np.random.default_rng(0)
    n = 1024
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    # Pink-purple stain-like texture: a few periodic blobs plus fine noise, tileable.
    field = np.zeros((n, n), np.float32)
    for _ in range(12):
        fx, fy = rng.integers(1, 9, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    field = (field - field.min()) / (field.max() - field.min())
    noise = rng.normal(0, 0.06, (n, n)).astype(np.float32)
    t = np.clip(field + noise, 0, 1)
    rgb = np.stack([235 - 90 * t, 200 - 150 * t, 225 - 70 * t], axis=2).clip(0, 255).astype(np.uint8)
    tile = pyvips.Image.new_from_memory(rgb.tobytes(), n, n, 3, "uchar")
    reps = -(-side // n)
    image = tile.replicate(reps, reps).crop(0, 0, side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.tiff")
    image.tiffsave(str(tmp), tile=True, pyramid=True, compression="jpeg", Q=80,
                   tile_width=256, tile_height=256, bigtiff=True)
    os.replace(tmp, path)
    return path


# -- helpers -----------------------------------------------------------------------------------
def pump_until(app: QApplication, cond, timeout_s: float) -> bool:
    """Run the event loop until ``cond()``; blocks between events like a real session does
    (a spinning loop would steal CPU and the GIL from the tile workers)."""
    end = time.perf_counter() + timeout_s
    tick = QTimer()
    tick.setInterval(2)  # wakes the blocking wait so cond() is checked often
    tick.start()
    try:
        while time.perf_counter() < end:
            if cond():
                return True
            app.processEvents(QEventLoop.ProcessEventsFlag.WaitForMoreEvents)
        return cond()
    finally:
        tick.stop()


class FrameWatch:
    def __init__(self, canvas: SlideCanvas) -> None:
        self.count = 0
        canvas.frame_complete.connect(self._on)

    def _on(self) -> None:
        self.count += 1


def stats(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p95": round(float(np.percentile(arr, 95)), 3),
            "max": round(float(arr.max()), 3), "n": len(values)}


def navigate(canvas, rng, i: int) -> bool:
    """Step ``i`` of a user's wandering: three pans, a zoom in, a zoom out. True when the
    view left the range from the whole slide to 2:1 (the caller brings it back)."""
    kind = i % 5
    if kind in (0, 1, 2):
        canvas.pan_by(rng.uniform(-300, 300), rng.uniform(-200, 200))
    elif kind == 3:
        canvas.zoom_at(rng.choice([1.25, 1.5, 2.0]), rng.uniform(200, 1400), rng.uniform(150, 850))
    else:
        canvas.zoom_at(rng.choice([0.8, 0.66, 0.5]), rng.uniform(200, 1400), rng.uniform(150, 850))
    cam = canvas.camera
    return cam.scale > 2.0 or cam.scale < cam.min_scale * 1.01


def wait_frame(app, canvas, watch, timeout_s=5.0) -> bool:
    start = watch.count
    canvas.update()
    return pump_until(app, lambda: watch.count > start or canvas._completed_view == (
        canvas.camera.cx, canvas.camera.cy, canvas.camera.scale, canvas.camera.width,
        canvas.camera.height), timeout_s)


# -- measurements ------------------------------------------------------------------------------
def bench_canvas(app: QApplication) -> tuple[SlideCanvas, "FrameWatch"]:
    """A shown canvas of the benchmark's size, without animation, and its frame watch."""
    canvas = SlideCanvas()
    canvas.animation_ms = 0
    canvas.resize(VIEW_W, VIEW_H)
    canvas.show()
    app.processEvents()
    return canvas, FrameWatch(canvas)


def bench_slide(app: QApplication, path: Path, quick: bool) -> dict:
    canvas, watch = bench_canvas(app)
    out: dict = {"threads": canvas.loader.threads}

    # 1. open to first complete frame
    t0 = time.perf_counter()
    slide = Slide(path)
    t_open = time.perf_counter()
    canvas.set_slide(slide)
    canvas.fit_view(animate=False)
    ok = pump_until(app, lambda: watch.count > 0, 30)
    out["first_frame_ms"] = round((time.perf_counter() - t0) * 1000, 1) if ok else None
    out["open_ms"] = round((t_open - t0) * 1000, 1)
    out["levels"] = slide.level_count

    # 2. scripted pans / zoom-ins / zoom-outs; paint time with the view's tiles cached
    rng = random.Random(1)
    cam = canvas.camera
    canvas.center_on(slide.width * 0.5, slide.height * 0.5, scale=max(cam.min_scale, 0.25),
                     animate=False)
    wait_frame(app, canvas, watch)
    canvas.paint_ms.clear()
    cached: list[float] = []
    steps = 60 if quick else 300
    for i in range(steps):
        if navigate(canvas, rng, i):
            canvas.center_on(cam.cx, cam.cy, scale=rng.uniform(0.1, 1.0), animate=False)
        wait_frame(app, canvas, watch, 5.0)
        n = len(canvas.paint_ms)
        canvas.repaint()
        if len(canvas.paint_ms) > n:
            cached.append(canvas.paint_ms[-1])
    every = list(canvas.paint_ms)
    s = stats(cached)
    out.update({"paint_ms_p50": s["p50"], "paint_ms_p95": s["p95"], "paint_ms_max": s["max"],
                "paint_steps": s["n"], "paint_all_frames": stats(every)})

    # 3. sharp after a jump to an uncached place
    jumps = []
    for _ in range(5 if quick else 12):
        x = rng.uniform(0.05, 0.95) * slide.width
        y = rng.uniform(0.05, 0.95) * slide.height
        scale = rng.choice([0.25, 0.5, 1.0])
        t = time.perf_counter()
        start = watch.count
        canvas.center_on(x, y, scale=scale, animate=False)
        canvas.repaint()
        pump_until(app, lambda: watch.count > start, 10)
        jumps.append((time.perf_counter() - t) * 1000)
    out["sharp_after_jump_ms"] = round(statistics.median(jumps), 1)
    out["sharp_after_jump_ms_max"] = round(max(jumps), 1)

    # 5. memory after random jumps
    proc = psutil.Process()
    n_jumps = 300 if quick else 2000
    for _ in range(n_jumps):
        canvas.center_on(rng.uniform(0, slide.width), rng.uniform(0, slide.height),
                         scale=rng.uniform(cam.min_scale, 1.5), animate=False)
        canvas.repaint()
        end = time.perf_counter() + 0.01
        pump_until(app, lambda: time.perf_counter() >= end, 1.0)
    canvas.loader.cancel()
    canvas.loader.wait_idle(10_000)
    app.processEvents()
    out["cache_mb"] = round(canvas.cache.bytes / 2**20, 1)
    out["cache_limit_mb"] = round(canvas.cache.max_bytes / 2**20, 1)
    out["rss_mb_after_jumps"] = round(proc.memory_info().rss / 2**20, 1)
    out["jumps"] = n_jumps
    out["decodes"] = canvas.loader.decodes

    # 4. tile throughput: our loader vs plain threads on raw OpenSlide, the same tiles
    out.update(throughput(app, canvas, slide, path, quick))
    canvas.shutdown()
    canvas.set_slide(None)
    canvas.deleteLater()
    app.processEvents()
    return out


def throughput(app, canvas: SlideCanvas, slide: Slide, path: Path, quick: bool) -> dict:
    import openslide

    grid = canvas.grid
    canvas.set_slide(None)  # the canvas stops asking; we drive the loader directly
    loader = canvas.loader
    loader.set_grid(grid)
    cols, rows = grid.grid_size(0)
    all_keys = [TileKey(0, c, r) for r in range(rows) for c in range(cols)]
    random.Random(2).shuffle(all_keys)
    n = min(len(all_keys) // 2, 120 if quick else 400)
    sets = [all_keys[:n], all_keys[n : 2 * n]]
    threads = loader.threads
    osr = openslide.OpenSlide(str(path))

    def ours(keys) -> float:
        got = []

        def on_ready(key, _image) -> None:
            got.append(key)

        loader.tile_ready.connect(on_ready)
        t = time.perf_counter()
        loader.request({k: float(i) for i, k in enumerate(keys)})
        pump_until(app, lambda: len(got) >= len(keys), 120)
        dt = time.perf_counter() - t
        loader.tile_ready.disconnect(on_ready)
        return len(keys) / dt

    def raw(keys) -> float:
        it = iter(keys)
        lock = threading.Lock()

        def work():
            while True:
                with lock:
                    k = next(it, None)
                if k is None:
                    return
                x, y, w, h = grid.tile_rect(k)
                pw, ph = grid.tile_pixels(k)
                osr.read_region((int(round(x)), int(round(y))), 0, (pw, ph))

        ts = [threading.Thread(target=work) for _ in range(threads)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        return len(keys) / (time.perf_counter() - t)

    # Each set is read twice, once each way, in opposite orders, so warm caches favour neither.
    a_ours, a_raw = ours(sets[0]), raw(sets[0])
    b_raw, b_ours = raw(sets[1]), ours(sets[1])
    ours_rate = (a_ours + b_ours) / 2
    raw_rate = (a_raw + b_raw) / 2
    osr.close()
    loader.set_grid(None)
    return {"tiles_per_s": round(ours_rate, 1), "raw_tiles_per_s": round(raw_rate, 1),
            "tile_throughput_ratio": round(ours_rate / raw_rate, 3), "throughput_tiles": 2 * n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
    ap.add_argument("--slides", default="demo,synthetic")
    args = ap.parse_args(argv)
    app = QApplication.instance() or QApplication([])
    result: dict = {"viewport": [VIEW_W, VIEW_H], "cpu_count": os.cpu_count(),
                    "load_avg_at_start": list(os.getloadavg()), "slides": {}}
    names = [s.strip() for s in args.slides.split(",") if s.strip()]
    for name in names:
        if name == "demo":
            path = DEMO
        elif name == "synthetic":
            t = time.perf_counter()
            existed = SYNTH.exists()
            path = make_synthetic()
            result["synthetic_build_s"] = None if existed else round(time.perf_counter() - t, 1)
        else:
            path = Path(name)
        result["slides"][path.name] = bench_slide(app, path, args.quick)
    result["load_avg_at_end"] = list(os.getloadavg())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
