"""Paint times while a model runs: does the canvas stay smooth during inference?

Opens the demo slide in a 1600x1000 offscreen SlideCanvas, runs each model (tiny and paper
presets) on the app's engine thread (``app.engine.EngineThread`` with the job the Models dock
submits, ``app.run_controller.make_inference_job``), streams its events into live trace layers as
the GUI does, and meanwhile pans and zooms with ``repaint()``. A model is run again until
enough frames are painted, so short runs still give a p95. ``idle`` is the same motion with
the engine idle, for comparison. Prints JSON; not a test.

    PYTHONPATH=. python benchmarks/inference_paint_bench.py [--models a,b] [--presets tiny,paper]
        [--frames N] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
from PySide6.QtCore import QEventLoop  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine import EngineThread, engine_threads  # noqa: E402
from app.run_controller import ENGINE_NICE, keep_gui_responsive, make_inference_job  # noqa: E402
from app.models_dock import RunRequest  # noqa: E402
from engines import registry  # noqa: E402
from engines.slide import Slide  # noqa: E402
from engines.trace import Progress, SlideRef, Trace  # noqa: E402
from viewer.canvas import SlideCanvas  # noqa: E402
from viewer.trace_layers import TraceLayers  # noqa: E402

DEMO = ROOT / "resources" / "CMU-1-Small-Region.svs"
VIEW_W, VIEW_H = 1600, 1000
FRAME_S = 1 / 60  # the motion's pace: one pan/zoom step per 60 Hz frame


def stats(ms: list[float], frame_ms: list[float], cpu_ms: list[float] | None = None) -> dict:
    """Paint times (inside paintEvent) and frame times (move + paint + the events that queued
    meanwhile: what a dragging user waits for between two frames)."""
    if not ms:
        return {"paint_ms_p50": None, "paint_ms_p95": None, "paint_ms_max": None, "frames": 0}
    a, f = np.asarray(ms), np.asarray(frame_ms)
    return {"paint_ms_p50": round(float(np.percentile(a, 50)), 2),
            "paint_ms_p95": round(float(np.percentile(a, 95)), 2),
            "paint_ms_max": round(float(a.max()), 2), "frames": len(ms),
            "frame_ms_p95": round(float(np.percentile(f, 95)), 2),
            "frame_ms_max": round(float(f.max()), 2),
            # CPU the GUI thread spent painting: far below the paint time means it waited
            # (for the GIL or for a core), not that painting itself is slow
            **({"paint_cpu_ms_p95": round(float(np.percentile(np.asarray(cpu_ms), 95)), 2)} if cpu_ms else {})}


class Motion:
    """Pans in a circle and zooms in and out between fit and 4x fit: new tiles keep coming."""

    def __init__(self, canvas: SlideCanvas) -> None:
        self.canvas = canvas
        self.t = 0

    def step(self) -> None:
        c = self.canvas
        cam = c.camera
        self.t += 1
        fit = cam.fit_scale
        zoom = fit * 2 ** (1 + math.sin(self.t / 40.0))  # fit x 1 .. 4
        angle = self.t / 25.0
        cx = c.slide.width * (0.5 + 0.25 * math.cos(angle))
        cy = c.slide.height * (0.5 + 0.25 * math.sin(angle))
        c.center_on(cx, cy, scale=zoom, animate=False)


def paint_frame(app: QApplication, canvas: SlideCanvas, motion: Motion, times: list[float],
                frames: list[float], cpu: list[float]) -> None:
    """One frame as a user's drag produces it: move, paint now, then serve the events that
    queued meanwhile (engine events, arrived tiles) without waiting for more."""
    t0 = time.perf_counter()
    motion.step()
    n = len(canvas.paint_ms)
    c0 = time.thread_time()
    canvas.repaint()
    cpu.append((time.thread_time() - c0) * 1000.0)
    times.extend(list(canvas.paint_ms)[n:])
    app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 5)
    frames.append((time.perf_counter() - t0) * 1000.0)
    rest = FRAME_S - (time.perf_counter() - t0)
    if rest > 0:
        time.sleep(rest)


def bench_idle(app, canvas, frames: int) -> dict:
    motion, times, frame_ms, cpu = Motion(canvas), [], [], []
    for _ in range(frames):
        paint_frame(app, canvas, motion, times, frame_ms, cpu)
    return stats(times, frame_ms, cpu)


def bench_model(app, canvas: SlideCanvas, slide: Slide, engine: EngineThread, name: str,
                preset: str, frames: int, max_runs: int, timeout_s: float, nice: int) -> dict:
    motion, times, frame_ms, cpu = Motion(canvas), [], [], []
    runs: list[float] = []
    errors: list[str] = []
    state: dict = {"id": None, "layers": None, "done": False, "events": 0}

    def on_event(run_id, event):
        if run_id != state["id"] or isinstance(event, Progress):
            return
        state["events"] += 1
        layers = state["layers"]
        layers.trace.add(event)
        layers.add_event(event)

    def on_done(run_id, trace):
        if run_id == state["id"]:
            runs.append(float(trace.timings.get("total_s", 0.0)))
            state["done"] = True

    def on_failed(run_id, message):
        if run_id == state["id"]:
            errors.append(message)
            state["done"] = True

    engine.event.connect(on_event)
    engine.done.connect(on_done)
    engine.failed.connect(on_failed)
    request = RunRequest(name, preset, None, "Whole slide")
    wall: list[float] = []
    try:
        end = time.perf_counter() + timeout_s
        while len(times) < frames and len(runs) < max_runs and not errors and time.perf_counter() < end:
            if state["layers"] is not None:
                state["layers"].hide()
            trace = Trace(model=name, preset=preset, checkpoint=None,
                          slide=SlideRef(str(slide.path), slide.width, slide.height, slide.mpp))
            state["layers"] = TraceLayers(canvas, trace)
            state["layers"].show()
            state["done"] = False
            t0 = time.perf_counter()
            state["id"] = engine.submit(make_inference_job(request, slide, None, nice=nice))
            while not state["done"] and time.perf_counter() < end:
                paint_frame(app, canvas, motion, times, frame_ms, cpu)
            wall.append(time.perf_counter() - t0)
        # The same motion over the finished trace with the engine idle: what the overlays
        # cost by themselves.
        after, after_frames, after_cpu = [], [], []
        for _ in range(min(frames, 120)):
            paint_frame(app, canvas, motion, after, after_frames, after_cpu)
    finally:
        for sig, slot in ((engine.event, on_event), (engine.done, on_done), (engine.failed, on_failed)):
            sig.disconnect(slot)
        if state["layers"] is not None:
            state["layers"].hide()
    out = stats(times, frame_ms, cpu)
    out["idle_with_trace"] = {k: v for k, v in stats(after, after_frames, after_cpu).items()
                              if k in ("paint_ms_p50", "paint_ms_p95", "paint_cpu_ms_p95")}
    out["infer_s"] = round(float(np.mean(runs)), 3) if runs else None
    out["runs"] = len(runs)
    out["run_wall_s"] = round(float(np.mean(wall)), 3) if wall else None
    out["events"] = state["events"]
    if errors:
        out["error"] = errors[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(registry.list_models()))
    ap.add_argument("--presets", default="tiny,paper")
    ap.add_argument("--frames", type=int, default=240, help="frames to paint per model and preset")
    ap.add_argument("--max-runs", type=int, default=40, help="stop repeating a model after this many runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the engine (default: the app's)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per model and preset")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in seconds (default: the app's)")
    ap.add_argument("--nice", type=int, default=ENGINE_NICE, help="the engine thread's nice value (default: the app's)")
    args = ap.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    else:
        keep_gui_responsive()  # as the app's inference controller does

    app = QApplication.instance() or QApplication([])
    slide = Slide(DEMO)
    canvas = SlideCanvas()
    canvas.animation_ms = 0
    canvas.resize(VIEW_W, VIEW_H)
    canvas.show()
    canvas.set_slide(slide)
    complete: list[bool] = []
    canvas.frame_complete.connect(lambda: complete.append(True))
    end = time.perf_counter() + 10
    while not complete and time.perf_counter() < end:  # the fitted slide, before timing
        canvas.update()
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
        time.sleep(0.01)
    threads = args.threads or engine_threads()
    engine = EngineThread(torch_threads=threads)
    result: dict = {"viewport": [VIEW_W, VIEW_H], "slide": DEMO.name, "cpu_count": os.cpu_count(),
                    "engine_torch_threads": threads, "engine_nice": args.nice,
                    "switch_interval_s": sys.getswitchinterval(),
                    "load_avg_at_start": list(os.getloadavg())}
    try:
        result["idle"] = bench_idle(app, canvas, args.frames)
        models: dict = {}
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
                models.setdefault(name, {})[preset] = bench_model(
                    app, canvas, slide, engine, name, preset, args.frames, args.max_runs, args.timeout,
                    args.nice)
                print(f"{name}/{preset}: {models[name][preset]}", file=sys.stderr)
        result["models"] = models
    finally:
        engine.shutdown()
        canvas.shutdown()
    result["load_avg_at_end"] = list(os.getloadavg())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
