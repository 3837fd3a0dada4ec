"""Worker threads with one shutdown discipline, shared by every background owner in MagLens
(the region store's readers, the engine, the window's jobs).

Workers are daemon Python threads, never QThreads: a QThread object destroyed while its thread
runs aborts the process, and a QThreadPool's destructor blocks until its work ends. A pool here
is stopped only by ``shutdown(timeout_ms)``: queued work is dropped, running work is waited for
until the deadline, and whatever is still running (a read stuck in a C call) is left to the
process. The process waits a bounded time for such stragglers when the application quits
(``aboutToQuit``); at interpreter exit every pool is shut down with one bounded wait, and the
process then exits normally even if a worker is still stuck.

A pool's lock guards its queue and counters only: no thread is started, and no job runs,
while it is held, so a GUI thread queuing work never waits on anything a worker is doing.
"""
from __future__ import annotations

import atexit
import gc
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

IDLE_EXPIRY_S = 30.0  # an idle worker ends after this long; the next job starts a new one
EXIT_WAIT_S = 30.0  # how long the process waits at exit for work still running

_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()
_pools_lock = threading.Lock()
_ids = itertools.count(1)


class WorkerPool:
    """Up to ``threads`` daemon workers running callables first in, first out.

    ``start(fn)`` queues ``fn``; ``clear()`` drops what has not started; ``wait_idle`` blocks
    until nothing is queued or running; ``shutdown`` stops the pool for good.
    """

    def __init__(self, name: str, threads: int = 1) -> None:
        self.name = name
        self.threads = max(1, int(threads))
        self._cv = threading.Condition()
        self._queue: deque[Callable[[], None]] = deque()
        self._workers: set[threading.Thread] = set()
        self._idle = 0
        self._active = 0
        self._starting = 0  # threads asked to start that have not registered in _workers yet
        self._closed = False
        with _pools_lock:
            _pools.add(self)
        _hook_application_quit()

    # -- state ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def active(self) -> int:
        """Jobs running now."""
        with self._cv:
            return self._active

    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cv:
            return len(self._queue) + self._active

    def owns_current_thread(self) -> bool:
        with self._cv:
            return threading.current_thread() in self._workers

    # -- work ----------------------------------------------------------------------------
    def start(self, fn: Callable[[], None]) -> bool:
        """Queue ``fn``; False (and nothing queued) once the pool is shut down."""
        with self._cv:
            if self._closed:
                return False
            self._queue.append(fn)
            if self._idle > 0:
                self._cv.notify()
            # Idle workers (and those starting) take one job each; start another for the rest.
            spawn = (len(self._queue) > self._idle + self._starting
                     and len(self._workers) + self._starting < self.threads)
            if spawn:
                self._starting += 1
        if spawn:
            # Never under the lock: Thread.start blocks until the new thread runs, and while
            # it waits every worker finishing a job waits too, for this lock.
            self._spawn()
        return True

    def _spawn(self) -> None:
        t = threading.Thread(target=self._run, name=f"maglens-{self.name}-{next(_ids)}",
                             daemon=True)
        try:
            t.start()
        except BaseException:  # no thread (the OS refused one): the job waits for the next
            with self._cv:
                self._starting -= 1
                self._cv.notify_all()
            raise

    def clear(self) -> int:
        """Drop queued jobs that have not started; how many were dropped."""
        with self._cv:
            n = len(self._queue)
            self._queue.clear()
            self._cv.notify_all()
            return n

    def wait_idle(self, timeout_ms: int = 5000) -> bool:
        deadline = time.monotonic() + max(0, timeout_ms) / 1000.0
        with self._cv:
            while self._queue or self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        """Drop queued work, refuse new work, and wait up to ``timeout_ms`` for running work.
        True when every worker has ended; otherwise the rest end on their own (daemon)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        deadline = time.monotonic() + max(0, timeout_ms) / 1000.0
        me = threading.current_thread()
        for t in list(self._workers):
            if t is me:
                continue
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cv:
            # Idle workers are already on their way out; only a job still running counts.
            busy = self._active - (1 if me in self._workers else 0)
        if busy > 0:
            log.warning("%s: %d job(s) still running after shutdown; left to finish on their own",
                        self.name, busy)
        return busy <= 0

    def _run(self) -> None:
        me = threading.current_thread()
        with self._cv:
            self._starting -= 1
            self._workers.add(me)
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._idle += 1
                    woke = self._cv.wait(IDLE_EXPIRY_S)
                    self._idle -= 1
                    if not woke and not self._queue:
                        break
                if not self._queue:  # closed, or idle too long
                    self._workers.discard(me)
                    self._cv.notify_all()
                    return
                fn = self._queue.popleft()
                self._active += 1
            try:
                fn()
            except BaseException:  # noqa: BLE001 - a job's failure must not kill the worker
                log.exception("%s: background job failed", self.name)
            finally:
                # The job may hold the last reference to a window or another Qt object; it
                # must die on the GUI thread, never here.
                release_on_gui_thread(fn)
                fn = None
                with self._cv:
                    self._active -= 1
                    self._cv.notify_all()


_carrier = None  # a QObject living on the GUI thread, made once a Qt application exists


def release_on_gui_thread(obj: object) -> None:
    """Drop ``obj`` on the GUI thread: a worker that drops the last reference to a QWidget (a
    job's callback bound to a closed window) would destroy it in the wrong thread, which
    deadlocks or aborts. Without a Qt application the reference is simply dropped here."""
    carrier = _carrier
    if carrier is None or threading.current_thread() is threading.main_thread():
        return
    try:
        carrier.carry.emit(obj)  # queued: the event holds ``obj`` until the GUI thread runs it
    except RuntimeError:  # the application is gone: nothing left to protect
        pass


def _make_carrier() -> None:
    global _carrier
    if _carrier is not None:
        return
    from PySide6.QtCore import QCoreApplication, QObject, Signal, Slot

    app = QCoreApplication.instance()
    if app is None:
        return

    class Carrier(QObject):
        carry = Signal(object)

        @Slot(object)
        def drop(self, _obj: object) -> None:
            pass  # the queued event, and with it the reference, ends on this (the GUI) thread

    carrier = Carrier()
    carrier.moveToThread(app.thread())
    carrier.carry.connect(carrier.drop)
    _carrier = carrier


def _alive(closed_only: bool) -> list[threading.Thread]:
    with _pools_lock:
        pools = list(_pools)
    out: list[threading.Thread] = []
    for pool in pools:
        with pool._cv:
            if pool._closed or not closed_only:
                out.extend(t for t in pool._workers if t.is_alive())
    return out


def running_workers() -> list[threading.Thread]:
    """Workers of every pool that are still alive (shut down or not)."""
    return _alive(False)


def wait_for_stragglers(timeout_s: float = EXIT_WAIT_S) -> bool:
    """Wait, at most ``timeout_s``, for work still running in pools already shut down (a
    window that closed mid-run handed it here). True when none is left."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    for t in _alive(True):
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
    return not [t for t in _alive(True) if t is not threading.current_thread()]


def stop_all(timeout_s: float = EXIT_WAIT_S) -> bool:
    """Shut every pool down and wait, at most ``timeout_s`` in all, for running work: what the
    process does at exit. True when nothing is left running."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    with _pools_lock:
        pools = list(_pools)
    ok = True
    for pool in pools:
        left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        ok = pool.shutdown(left_ms) and ok
    return ok


_gc_timer = None  # the GUI-thread timer that runs the cyclic garbage collector
GC_INTERVAL_MS = 200


def _collect_garbage_on_gui_thread() -> None:
    """Run Python's cyclic garbage collector on the GUI thread only. Left automatic, it runs
    in whichever thread happens to allocate: a worker then destroys Qt objects that were part
    of a reference cycle. Such a destructor takes Qt's connection lock with the interpreter
    lock released, then waits for the interpreter lock, while the GUI thread holds that and
    waits for Qt's lock (to connect a signal): both hang for good. So automatic collection is
    switched off and a timer on the GUI thread collects with the interpreter's own thresholds."""
    global _gc_timer
    carrier = _carrier
    if _gc_timer is not None or carrier is None or carrier.thread() is not _current_qthread():
        return
    from PySide6.QtCore import QTimer

    timer = QTimer(carrier)
    timer.setInterval(GC_INTERVAL_MS)
    timer.timeout.connect(collect_garbage)
    timer.start()
    _gc_timer = timer
    gc.disable()


def _current_qthread():
    from PySide6.QtCore import QThread

    return QThread.currentThread()


def collect_garbage() -> int:
    """One collection step on the GUI thread: the youngest generation whenever anything was
    allocated, older ones as their thresholds say (as the interpreter would). Returns how many
    objects were collected."""
    counts, limits = gc.get_count(), gc.get_threshold()
    if counts[0] <= 0:
        return 0
    generation = 2 if counts[2] > limits[2] else 1 if counts[1] > limits[1] else 0
    return gc.collect(generation)


_hooked_app: "weakref.ref | None" = None


def _hook_application_quit() -> None:
    """When the Qt application quits, wait (bounded) for work handed over by closed windows.
    The exit handler is registered after the application exists, so it runs before Qt's own
    clean-up (exit handlers run last registered first)."""
    global _hooked_app
    try:
        from PySide6.QtCore import QCoreApplication
    except ImportError:  # pragma: no cover - PySide6 is a dependency of the viewer
        return
    app = QCoreApplication.instance()
    if app is None:
        return
    _make_carrier()
    _collect_garbage_on_gui_thread()  # until a pool is made on the GUI thread
    if _hooked_app is not None and _hooked_app() is app:
        return
    _hooked_app = weakref.ref(app)
    app.aboutToQuit.connect(lambda: wait_for_stragglers())
    atexit.register(stop_all)


atexit.register(stop_all)
