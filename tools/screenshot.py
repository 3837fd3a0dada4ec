"""Screenshots for the README: the real main window on the demo slide, grabbed from the screen.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python tools/screenshot.py [--scene S]

Scenes: ``viewer`` (docs/screenshot.png: the slide at 10x), ``magnet`` (zoom boxes and the
probability trail), ``spatial_mag`` (a magnification's attention map with the Layers dock),
``grid_attention`` (one of its filters picked in the Models dock), or ``all``. Models are run
from the Models dock as a user would, with its default checkpoint (a bundled one when present,
else initial weights).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PySide6.QtCore import QEventLoop, QPoint, QSettings  # noqa: E402
from PySide6.QtGui import QPixmap  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from app.main_window import DEMO_SLIDE, MainWindow  # noqa: E402

# Where the demo slide is most interesting: the epidermis folding around the dermis.
DEMO_CENTRE = (1180.0, 1720.0)
DEMO_MAGNIFICATION = 10.0
SCENES = ("viewer", "magnet", "spatial_mag", "grid_attention", "zoom_in", "local_learning")
MAX_BYTES = 1_000_000


def wait_until(app: QApplication, done: Callable[[], bool], timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        if done():
            return True
        time.sleep(0.01)
    return done()


def settle(app: QApplication, seconds: float) -> None:
    wait_until(app, lambda: False, seconds)


def open_window(app: QApplication, settings: QSettings, slide: str, timeout: float) -> MainWindow:
    window = MainWindow(settings=settings)
    window.setGeometry(app.primaryScreen().availableGeometry())
    window.show()
    opened: list[str] = []
    failed: list[str] = []
    window.slide_opened.connect(opened.append)
    window.open_failed.connect(failed.append)
    window.open_slide(slide)
    if not wait_until(app, lambda: bool(opened or failed), timeout) or failed:
        raise RuntimeError(f"slide did not open: {failed or 'timed out'}")
    return window


def view_complete(canvas) -> bool:
    """Whether the canvas has painted its current view with final tiles (``frame_complete``
    fires once per view, possibly before anyone listens)."""
    cam = canvas.camera
    return getattr(canvas, "_completed_view", None) == (cam.cx, cam.cy, cam.scale, cam.width, cam.height)


def wait_painted(app: QApplication, window: MainWindow, timeout: float) -> bool:
    window.canvas.update()
    ok = wait_until(app, lambda: view_complete(window.canvas) and not window.associated_panel.loading
                    and not window.canvas.is_animating(), timeout)
    settle(app, 0.5)  # minimap thumbnail, late repaints
    return ok


def run_model(app: QApplication, window: MainWindow, model: str, preset: str, timeout: float) -> None:
    """Pick ``model`` in the Models dock and press Run, as a user does."""
    panel = window.models_panel
    window.models_dock.show()
    window.models_dock.raise_()
    panel.model_combo.setCurrentText(model)
    panel.preset_combo.setCurrentText(preset)
    ctl = window.inference
    finished: list[str] = []
    ctl.engine.done.connect(lambda *_: finished.append("done"))
    ctl.engine.failed.connect(lambda _rid, msg: finished.append(msg))
    panel.run_button.click()
    if not wait_until(app, lambda: bool(finished) and ctl.run_id is None, timeout):
        raise RuntimeError(f"{model} did not finish in {timeout:.0f} s")
    if finished[0] != "done":
        raise RuntimeError(f"{model} failed: {finished[0]}")
    settle(app, 0.5)  # docks shown or hidden for the trace have settled


def point_at(window: MainWindow, x: float, y: float) -> None:
    """Rest the pointer on a level-0 point so the status bar describes what is under it."""
    canvas = window.canvas
    sx, sy = canvas.camera.to_screen(x, y)
    QTest.mouseMove(canvas, QPoint(round(sx), round(sy)))


# Each scene sets the window up and returns the level-0 point to rest the pointer on (the
# status bar then describes it), or None.
def scene_viewer(app, window, args):
    scale = DEMO_MAGNIFICATION / (window.slide.objective_power or 20.0)
    window.canvas.center_on(*DEMO_CENTRE, scale=scale, animate=False)
    cam = window.canvas.camera
    return cam.to_level0(cam.width * 2 / 3, cam.height / 2)


def scene_magnet(app, window, args):
    run_model(app, window, "magnet", args.preset, args.timeout)
    panel = window.models_panel
    panel.map_opacity.setValue(35)  # the boxes and the trail are the subject here
    layers = window.inference.current
    window.canvas.fit_view(animate=False)
    wait_painted(app, window, args.timeout)
    step = layers.trace.trail[len(layers.trace.trail) // 2] if layers.trace.trail else None
    if step is None:
        return None
    window.inference.go_to_step(step.index)  # as a click on the plot does
    window.layers_dock.show()
    window.layers_dock.raise_()  # its legend names the depth colours
    settle(app, 0.3)
    # Frame the boxes of depth 1 (with a margin) rather than the whole slide.
    boxes = [f.rect for f in layers.trace.fields if f.depth == 1] or [layers.path()[0].rects[0]]
    x0, y0 = min(r[0] for r in boxes), min(r[1] for r in boxes)
    x1, y1 = max(r[0] + r[2] for r in boxes), max(r[1] + r[3] for r in boxes)
    m = 0.08 * max(x1 - x0, y1 - y0)
    window.canvas.show_rect((x0 - m, y0 - m, x1 - x0 + 2 * m, y1 - y0 + 2 * m), animate=False)
    f = layers.trace.field_by_id(step.field_id)
    return (f.rect[0] + f.rect[2] * 0.3, f.rect[1] + f.rect[3] * 0.3) if f is not None else None


def scene_spatial_mag(app, window, args):
    run_model(app, window, "spatial_mag", args.preset, args.timeout)
    window.layers_dock.show()
    window.layers_dock.raise_()
    # Step to the finest magnification's map, as `]` does.
    layers = window.inference.current
    for _ in range(len(layers.path())):
        window.inference.step(1)
    window.canvas.fit_view(animate=False)
    shown = [o for o in layers.maps if o.visible]
    x, y, w, h = shown[0].map.rect if shown else layers.path()[0].rects[0]
    return x + w * 0.55, y + h * 0.45


def show_one_map(app, window, args, model: str, pick: Callable[[int], int]):
    """Run ``model``, show the map ``pick(count)`` of its list at 70 %, point at the map."""
    run_model(app, window, model, args.preset, args.timeout)
    panel = window.models_panel
    index = pick(panel.map_combo.count())
    panel.map_combo.setCurrentIndex(index)
    panel.map_combo.activated.emit(index)  # as choosing it from the list does
    panel.map_opacity.setValue(70)
    window.canvas.fit_view(animate=False)
    layers = window.inference.current
    shown = [o for o in layers.maps if o.visible]
    x, y, w, h = shown[0].map.rect if shown else layers.path()[0].rects[0]
    return x + w * 0.5, y + h * 0.4


def scene_grid_attention(app, window, args):
    return show_one_map(app, window, args, "grid_attention", lambda n: min(5, n - 1))


def scene_zoom_in(app, window, args):
    run_model(app, window, "zoom_in", args.preset, args.timeout)
    window.models_panel.map_opacity.setValue(45)  # the stage-1 map under the sampled fields
    window.layers_dock.show()
    window.layers_dock.raise_()
    window.canvas.fit_view(animate=False)
    layers = window.inference.current
    # Point at the sub-tile with the most attention: the status bar names its score.
    subs = [f for f in layers.trace.fields if f.kind == "subtile"]
    if not subs:
        return None
    best = max(subs, key=lambda f: f.score)
    return best.rect[0] + best.rect[2] / 2, best.rect[1] + best.rect[3] / 2


def scene_local_learning(app, window, args):
    # The last map is the final module's head: the one that predicts.
    return show_one_map(app, window, args, "local_learning", lambda n: n - 1)


def save_png(pixmap: QPixmap, out: Path) -> int:
    """Write atomically; a screenshot over MAX_BYTES is re-encoded with a 256-colour palette
    (dithered), which keeps text and overlays sharp. Returns the size in bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        if not pixmap.save(tmp, "PNG"):
            raise OSError(f"cannot write {out}")
        if os.path.getsize(tmp) > MAX_BYTES:
            from PIL import Image

            with Image.open(tmp) as im:
                small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
            small.save(tmp, "PNG", optimize=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a picture for the docs is not
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", default=str(DEMO_SLIDE))
    parser.add_argument("--scene", default="viewer", choices=SCENES + ("all",))
    parser.add_argument("--preset", default="tiny", choices=("tiny", "paper"))
    parser.add_argument("--out", default=None, help="PNG path (one scene only); default docs/<scene>.png")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    scenes = SCENES if args.scene == "all" else (args.scene,)
    if args.out and len(scenes) > 1:
        parser.error("--out names one file: choose one --scene")

    app = QApplication.instance() or QApplication(sys.argv[:1])
    for scene in scenes:
        with tempfile.TemporaryDirectory() as tmp:
            # A throwaway settings file: the user's layout and recent files stay out of the picture.
            settings = QSettings(str(Path(tmp) / "maglens.ini"), QSettings.Format.IniFormat)
            try:
                window = open_window(app, settings, args.slide, args.timeout)
            except RuntimeError as exc:
                print(f"screenshot: {exc}", file=sys.stderr)
                return 1
            try:
                wait_painted(app, window, args.timeout)
                target = globals()[f"scene_{scene}"](app, window, args)
                if not wait_painted(app, window, args.timeout):
                    print(f"screenshot: {scene}: the view did not finish painting in time", file=sys.stderr)
                if target is not None:
                    point_at(window, *target)
                settle(app, 0.6)
                pixmap = app.primaryScreen().grabWindow(0)
                name = "screenshot" if scene == "viewer" else scene
                out = Path(args.out) if args.out else ROOT / "docs" / f"{name}.png"
                size = save_png(pixmap, out)
                print(f"screenshot: {out} {pixmap.width()}x{pixmap.height()} {size // 1024} KiB")
            except (RuntimeError, OSError) as exc:
                print(f"screenshot: {scene}: {exc}", file=sys.stderr)
                return 1
            finally:
                window.close()
                window.deleteLater()
                app.processEvents()
    return 0


if __name__ == "__main__":
    sys.exit(main())
