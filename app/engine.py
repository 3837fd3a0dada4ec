"""The engine thread: one worker thread that runs models and training jobs off the GUI thread.

A job is a callable ``job(emit, cancel) -> result``; it calls ``emit(event)`` for anything the
GUI should see and checks ``cancel`` (a ``threading.Event``). Events, results and errors come
back as Qt signals stamped with the run id, so the GUI can drop whatever belongs to a run it
cancelled or replaced.

The worker is a daemon thread of a ``viewer.workers.WorkerPool`` (not a QThread), so it shares
the shutdown discipline of every background owner: ``shutdown(timeout_ms)`` cancels, waits a
bounded time, and leaves a job that ignores cancel to finish on its own; the process waits for
it (bounded) when the application quits, and a window closed mid-run never aborts the process.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, Signal, Slot

from viewer.workers import WorkerPool

log = logging.getLogger(__name__)

Job = Callable[[Callable[[object], None], threading.Event], Any]
SHUTDOWN_WAIT_MS = 3000  # how long closing a window waits for a cancelled job


def engine_threads() -> int:
    """Torch threads for the engine: leave one core to the GUI and the tile loader."""
    return max(1, (os.cpu_count() or 2) - 1)


class _Worker(QObject):
    """Emits from the worker thread. It has no parent, and every queued job holds it, so it
    outlives a window that closes while a job still runs."""

    event = Signal(int, object)
    done = Signal(int, object)
    failed = Signal(int, str)
    cancelled = Signal(int)

    def __init__(self, torch_threads: int) -> None:
        super().__init__()
        self._torch_threads = torch_threads
        self._configured: set[int] = set()  # threads whose torch thread count is set

    def _configure(self) -> None:
        tid = threading.get_ident()
        if tid not in self._configured:
            import torch

            torch.set_num_threads(self._torch_threads)
            self._configured.add(tid)

    def _emit(self, signal, *args) -> None:
        try:
            signal.emit(*args)
        except RuntimeError:  # the receiving side is gone: nobody is listening any more
            pass

    def run(self, run_id: int, job: Job, cancel: threading.Event) -> None:
        if cancel.is_set():
            self._emit(self.cancelled, run_id)
            return
        try:
            self._configure()
            result = job(lambda e: self._emit(self.event, run_id, e), cancel)
        except BaseException as exc:  # noqa: BLE001 - nothing may escape the worker
            if cancel.is_set() or type(exc).__name__ == "Cancelled":
                self._emit(self.cancelled, run_id)
                return
            log.error("engine job %d failed:\n%s", run_id, traceback.format_exc())
            self._emit(self.failed, run_id, f"{type(exc).__name__}: {exc}".strip())
            return
        if cancel.is_set():
            self._emit(self.cancelled, run_id)
        else:
            self._emit(self.done, run_id, result)


class EngineThread(QObject):
    """Runs one job at a time; ``submit`` while busy queues behind the current job (cancel
    it first to replace it)."""

    event = Signal(int, object)
    done = Signal(int, object)
    failed = Signal(int, str)
    cancelled = Signal(int)
    busy_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None, torch_threads: int | None = None) -> None:
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._cancels: dict[int, threading.Event] = {}
        self._pool = WorkerPool("engine", 1)
        self._worker = _Worker(torch_threads or engine_threads())
        for sig, mine in ((self._worker.event, self.event), (self._worker.done, self.done),
                          (self._worker.failed, self.failed), (self._worker.cancelled, self.cancelled)):
            sig.connect(mine)
        for sig in (self._worker.done, self._worker.failed, self._worker.cancelled):
            sig.connect(self._finished)

    @property
    def busy(self) -> bool:
        return bool(self._cancels)

    @property
    def running(self) -> bool:
        """A job is running on the worker now (also after ``shutdown`` gave up waiting)."""
        return self._pool.active() > 0

    def submit(self, job: Job) -> int:
        run_id = next(self._ids)
        cancel = threading.Event()
        worker = self._worker
        if not self._pool.start(lambda: worker.run(run_id, job, cancel)):
            raise RuntimeError("the engine has been shut down")
        self._cancels[run_id] = cancel
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

    def wait(self, timeout_ms: int = 5000) -> bool:
        """Block until no job is queued or running (for scripts and tests)."""
        return self._pool.wait_idle(timeout_ms)

    def shutdown(self, timeout_ms: int = SHUTDOWN_WAIT_MS) -> bool:
        """Cancel everything, drop queued jobs and wait up to ``timeout_ms`` for the running
        one. True when it ended; otherwise it finishes on its own and the process waits for it
        (bounded) when the application quits. No job can be submitted afterwards."""
        self.cancel()
        return self._pool.shutdown(timeout_ms)
