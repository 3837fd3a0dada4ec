"""The engine thread: one QThread that runs models and training jobs off the GUI thread.

A job is a callable ``job(emit, cancel) -> result``; it calls ``emit(event)`` for anything the
GUI should see and checks ``cancel`` (a ``threading.Event``). Events, results and errors come
back as Qt signals stamped with the run id, so the GUI can drop whatever belongs to a run it
cancelled or replaced.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Signal, Slot

log = logging.getLogger(__name__)

Job = Callable[[Callable[[object], None], threading.Event], Any]


def engine_threads() -> int:
    """Torch threads for the engine: leave one core to the GUI and the tile loader."""
    return max(1, (os.cpu_count() or 2) - 1)


class _Worker(QObject):
    event = Signal(int, object)
    done = Signal(int, object)
    failed = Signal(int, str)
    cancelled = Signal(int)

    def __init__(self, torch_threads: int) -> None:
        super().__init__()
        self._torch_threads = torch_threads
        self._configured = False

    @Slot(int, object, object)
    def run(self, run_id: int, job: Job, cancel: threading.Event) -> None:
        if not self._configured:
            import torch

            torch.set_num_threads(self._torch_threads)
            self._configured = True
        if cancel.is_set():
            self.cancelled.emit(run_id)
            return
        try:
            result = job(lambda e: self.event.emit(run_id, e), cancel)
        except BaseException as exc:  # noqa: BLE001 - nothing may escape into Qt's loop
            if cancel.is_set() or type(exc).__name__ == "Cancelled":
                self.cancelled.emit(run_id)
                return
            log.error("engine job %d failed:\n%s", run_id, traceback.format_exc())
            self.failed.emit(run_id, f"{type(exc).__name__}: {exc}".strip())
            return
        if cancel.is_set():
            self.cancelled.emit(run_id)
        else:
            self.done.emit(run_id, result)


class EngineThread(QObject):
    """Runs one job at a time; ``submit`` while busy queues behind the current job (cancel
    it first to replace it)."""

    event = Signal(int, object)
    done = Signal(int, object)
    failed = Signal(int, str)
    cancelled = Signal(int)
    busy_changed = Signal(bool)
    _start = Signal(int, object, object)

    def __init__(self, parent: QObject | None = None, torch_threads: int | None = None) -> None:
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._cancels: dict[int, threading.Event] = {}
        self._thread = QThread()
        self._thread.setObjectName("maglens-engine")
        self._worker = _Worker(torch_threads or engine_threads())
        self._worker.moveToThread(self._thread)
        self._start.connect(self._worker.run)
        for sig, mine in ((self._worker.event, self.event), (self._worker.done, self.done),
                          (self._worker.failed, self.failed), (self._worker.cancelled, self.cancelled)):
            sig.connect(mine)
        for sig in (self._worker.done, self._worker.failed, self._worker.cancelled):
            sig.connect(self._finished)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self._cancels)

    def submit(self, job: Job) -> int:
        run_id = next(self._ids)
        cancel = threading.Event()
        self._cancels[run_id] = cancel
        self._start.emit(run_id, job, cancel)
        if len(self._cancels) == 1:
            self.busy_changed.emit(True)
        return run_id

    def cancel(self, run_id: int | None = None) -> None:
        """Cancel one run, or every queued and running one."""
        for rid, ev in list(self._cancels.items()):
            if run_id is None or rid == run_id:
                ev.set()

    def cancel_event(self, run_id: int) -> threading.Event | None:
        return self._cancels.get(run_id)

    @Slot(int)
    def _finished(self, run_id: int, *_: object) -> None:
        self._cancels.pop(run_id, None)
        if not self._cancels:
            self.busy_changed.emit(False)

    def shutdown(self, timeout_ms: int = 5000) -> None:
        self.cancel()
        self._thread.quit()
        self._thread.wait(timeout_ms)
