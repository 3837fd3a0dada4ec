"""Make docs/screenshot.png: the real main window on the demo slide, grabbed from the screen.

Run under a virtual X server, e.g.
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python tools/screenshot.py
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
from PySide6.QtGui import QCursor  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from app.main_window import DEMO_SLIDE, MainWindow  # noqa: E402

# Where the demo slide is most interesting: the epidermis folding around the dermis.
DEMO_CENTRE = (1180.0, 1720.0)
DEMO_MAGNIFICATION = 10.0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", default=str(DEMO_SLIDE))
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    app = QApplication.instance() or QApplication(sys.argv[:1])
    with tempfile.TemporaryDirectory() as tmp:
        # A throwaway settings file: the user's layout and recent files stay out of the picture.
        settings = QSettings(str(Path(tmp) / "maglens.ini"), QSettings.Format.IniFormat)
        window = MainWindow(settings=settings)
        window.setGeometry(app.primaryScreen().availableGeometry())
        window.show()
        opened: list[str] = []
        failed: list[str] = []
        window.slide_opened.connect(opened.append)
        window.open_failed.connect(failed.append)
        window.open_slide(args.slide)
        if not wait_until(app, lambda: bool(opened or failed), args.timeout) or failed:
            print(f"screenshot: slide did not open: {failed or 'timed out'}", file=sys.stderr)
            return 1

        frames: list[bool] = []
        window.canvas.frame_complete.connect(lambda: frames.append(True))
        settle(app, 0.3)
        if Path(args.slide) == DEMO_SLIDE:
            scale = DEMO_MAGNIFICATION / (window.slide.objective_power or 20.0)
            window.canvas.center_on(*DEMO_CENTRE, scale=scale, animate=False)
        frames.clear()
        ok = wait_until(
            app, lambda: bool(frames) and not window.associated_panel.loading, args.timeout
        )
        # Rest the pointer on the tissue so the status bar shows a cursor position.
        canvas = window.canvas
        QCursor.setPos(canvas.mapToGlobal(QPoint(canvas.width() * 2 // 3, canvas.height() // 2)))
        settle(app, 1.0)  # minimap thumbnail, late repaints
        if not ok:
            print("screenshot: the view did not finish painting in time", file=sys.stderr)
        pixmap = app.primaryScreen().grabWindow(0)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_png = tempfile.mkstemp(prefix=".screenshot.", suffix=".png", dir=out.parent)
        os.close(fd)
        if not pixmap.save(tmp_png, "PNG"):
            os.unlink(tmp_png)
            print(f"screenshot: cannot write {out}", file=sys.stderr)
            return 1
        os.replace(tmp_png, out)
        print(f"screenshot: {out} {pixmap.width()}x{pixmap.height()}")
        window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
