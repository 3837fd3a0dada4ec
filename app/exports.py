"""Exports that run off the GUI thread: PNG views and figures, GeoJSON, trace files.

An ``ExportJob`` runs its work on the window's job threads and reports progress, then exactly
one of ``finished(path)``, ``failed(message)`` or ``cancelled()`` on the GUI thread. Work writes
its file atomically and checks the cancel event, so a cancelled export leaves neither the file
nor a temporary file. Scripts and tests use ``wait()`` + ``finish_now()`` to block instead.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QObject, Signal
from PySide6.QtGui import QImage

from engines.trace import ExportCancelled

ProgressFn = Callable[[int, int], None]
Work = Callable[[threading.Event, ProgressFn], None]


class ExportJob(QObject):
    progress = Signal(int, int)  # done, total (total 0: not known yet)
    finished = Signal(str)  # the path written
    failed = Signal(str)  # one message for the user
    cancelled = Signal()

    def __init__(self, title: str, target: Path, work: Work, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self.target = Path(target)
        self.state = "queued"  # then running, done, failed or cancelled
        self.error: str | None = None
        self._work = work
        self._cancel = threading.Event()
        self._ended = threading.Event()
        self._outcome: tuple[str, str | None] | None = None
        self._delivered = False
        self.progress_dialog = None  # the window's QProgressDialog for it, if any

    # -- control -------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        return not self._delivered

    def wait(self, timeout_ms: int | None = None) -> bool:
        """Block until the work has ended (its signals may still be queued)."""
        return self._ended.wait(None if timeout_ms is None else timeout_ms / 1000.0)

    def finish_now(self) -> None:
        """Deliver the outcome at once (after ``wait``), for callers that block."""
        if self._outcome is not None:
            self.deliver()

    # -- the worker side -----------------------------------------------------------------
    def run(self) -> None:
        """The work, in a worker thread."""
        self.state = "running"
        try:
            if self._cancel.is_set():
                raise ExportCancelled("export cancelled")
            self._work(self._cancel, self._report)
            outcome: tuple[str, str | None] = ("done", None)  # written, even if cancel came late
        except BaseException as exc:  # noqa: BLE001 - reported to the user, never a crash
            if self._cancel.is_set() or isinstance(exc, ExportCancelled):
                outcome = ("cancelled", None)
            else:
                outcome = ("failed", str(exc) or type(exc).__name__)
        self._outcome = outcome
        self._ended.set()

    def _report(self, done: int, total: int) -> None:
        try:
            self.progress.emit(int(done), int(total))
        except RuntimeError:  # the window went away while the export ran
            pass

    def abandon(self) -> None:
        """The work will never run (its threads are gone): end as cancelled."""
        self._outcome = ("cancelled", None)
        self._ended.set()

    def deliver(self, _value: object = None) -> None:
        """On the GUI thread, once: the signal matching the outcome."""
        if self._delivered or self._outcome is None:
            return
        self._delivered = True
        self.state, self.error = self._outcome
        if self.state == "done":
            self.finished.emit(str(self.target))
        elif self.state == "cancelled":
            self.cancelled.emit()
        else:
            self.failed.emit(self.error or "export failed")


def png_bytes(image: QImage) -> bytes:
    """``image`` encoded as PNG (any thread)."""
    if image is None or image.isNull():
        raise RuntimeError("the view could not be rendered")
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.save(buf, "PNG"):
        raise OSError("the PNG could not be written")
    return bytes(data)
