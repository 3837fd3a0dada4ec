"""Run by tests/test_close_during_work.py in its own process: open the viewer, start a model run
(on the slide, or over a project of copies of it) and slow slide reads, close the window
mid-way and quit. The process must end with code 0.

    python tests/close_during_work.py SETTINGS_INI SLIDE cooperative|stubborn|project
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PySide6.QtCore import QSettings, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from engines.slide import Slide  # noqa: E402

STUBBORN_S = 8.0  # a job (or read) that ignores cancel this long, like a long C call


def main() -> int:
    ini, slide_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    stubborn = mode == "stubborn"
    run_started = threading.Event()
    reads_started = threading.Event()

    def slow(original):
        def read(self, *args, **kwargs):
            reads_started.set()
            if stubborn:
                time.sleep(STUBBORN_S)
            return original(self, *args, **kwargs)
        return read

    # Slide reads that are still running when the window closes: the minimap's thumbnail
    # and the associated images.
    Slide.thumbnail = slow(Slide.thumbnail)
    Slide.associated_image = slow(Slide.associated_image)

    def job(emit, cancel):
        run_started.set()
        if stubborn:
            end = time.monotonic() + STUBBORN_S
            while time.monotonic() < end:  # does not look at cancel
                time.sleep(0.05)
        while not cancel.is_set():
            time.sleep(0.01)
        raise RuntimeError("cancelled")

    if mode == "project":  # every slide of the run waits for the cancel the close sends
        from engines import cohort
        from engines.infer import Cancelled, is_cancelled

        def run_slide(*_args, cancel=None, **_kwargs):
            run_started.set()
            while not is_cancelled(cancel):
                time.sleep(0.01)
            raise Cancelled("cancelled")

        cohort.run_slide = run_slide
        folder = Path("project")
        folder.mkdir(exist_ok=True)
        for name in ("a", "b", "c"):
            link = folder / f"{name}{Path(slide_path).suffix}"
            if not link.exists():
                link.symlink_to(Path(slide_path).resolve())

    app = QApplication([])
    from app.main_window import MainWindow

    window = MainWindow(settings=QSettings(ini, QSettings.Format.IniFormat))
    window.inference.job_factory = lambda *_args, **_kwargs: job
    if mode == "project":
        window.open_project(str(folder))
    window.resize(900, 600)
    window.show()
    state = {"opened": False}
    window.slide_opened.connect(lambda _p: state.update(opened=True))
    window.open_failed.connect(lambda msg: (print("open failed:", msg, file=sys.stderr), app.exit(3)))
    window.open_slide(slide_path)

    def wait_open() -> None:
        if not state["opened"] or (mode == "project" and window.results.project is None):
            QTimer.singleShot(20, wait_open)
            return
        button = window.models_panel.project_run_button if mode == "project" else window.models_panel.run_button
        button.click()
        QTimer.singleShot(20, wait_busy)

    def wait_busy() -> None:
        if not (run_started.is_set() and reads_started.is_set()):
            QTimer.singleShot(20, wait_busy)
            return
        print("closing mid-run", flush=True)
        window.close()
        QTimer.singleShot(0, app.quit)

    QTimer.singleShot(0, wait_open)
    code = app.exec()
    print("event loop ended", code, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
