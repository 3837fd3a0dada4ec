"""The region store: the one owner of slide reads for display.

It owns the decoded-tile cache and every thread that reads the open slide for display: the tile
readers (``TileLoader``, nearest tile first), the smooth scaler, and a lane for one-shot reads
(the minimap thumbnail, associated images). Exports read their tiles through ``read_tiles``.

One cancellation story: every request belongs to a generation. ``set_grid`` starts a new one
for the tiles (a new slide, or the same slide read differently, as with a display adjustment)
and, when the slide changes, for the one-shot reads too: queued work of an old generation is
dropped before it runs, and results of reads already running are discarded, never delivered.
A single one-shot request can also be cancelled through its handle. ``shutdown(timeout_ms)``
cancels everything and stops all the store's threads with one deadline; a read stuck in a C call
is left to finish on its own (``viewer.workers``), so closing never blocks for long nor aborts.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Iterable

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QImage

from viewer.tiles import (
    DEFAULT_CACHE_BYTES,
    TileCache,
    TileGrid,
    TileKey,
    TileLoader,
    TileScaler,
    default_threads,
    read_tile,
)
from viewer.workers import WorkerPool

ProgressFn = Callable[[int, int], None]


class RegionRequest:
    """A one-shot read handed out by ``RegionStore.submit``."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Not started: it never runs. Running: its result is dropped."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class RegionStore(QObject):
    """Display reads of one slide at a time: tile cache, tile readers, scaler, one-shot reads.

    ``cache``, ``loader`` and ``scaler`` are the store's; the canvas drives them. Results reach
    the GUI thread through queued signals; callbacks of ``submit`` run on the store's thread.
    """

    _delivered = Signal(object, object, object)  # RegionRequest, callback, argument

    def __init__(self, cache_bytes: int = DEFAULT_CACHE_BYTES, threads: int | None = None,
                 parent: QObject | None = None, background_from: float = math.inf) -> None:
        super().__init__(parent)
        self.threads = max(1, int(threads or default_threads()))
        self.cache = TileCache(cache_bytes)
        self._tile_pool = WorkerPool("tiles", self.threads)
        self._scale_pool = WorkerPool("scale", 1)
        self._read_pool = WorkerPool("reads", 1)
        self.loader = TileLoader(self.threads, self, background_from=background_from, pool=self._tile_pool)
        self.scaler = TileScaler(1, self, pool=self._scale_pool)
        self._lock = threading.Lock()
        self._gen = 0
        self._grid: TileGrid | None = None
        self._closed = False
        self._delivered.connect(self._deliver)

    # -- state ---------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._gen

    @property
    def grid(self) -> TileGrid | None:
        return self._grid

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        """Reads queued or running in the store, of any kind."""
        return self.loader.pending() + self._read_pool.pending()

    # -- generations ---------------------------------------------------------------------
    def set_grid(self, grid: TileGrid | None) -> int:
        """Show ``grid``: the cache is emptied and tiles queued or decoding for the old grid
        are dropped. For another slide (or none) that is a new generation: one-shot reads of
        the old slide are dropped too. The same slide read differently (a new display
        adjustment) keeps its one-shot reads. Returns the generation."""
        with self._lock:
            old = self._grid
            grid = grid if not self._closed else None
            same_slide = grid is not None and old is not None and grid.slide is old.slide
            if not same_slide:
                self._gen += 1
            self._grid = grid
            gen = self._gen
        if not same_slide:
            self._read_pool.clear()
        self.cache.clear()
        self.loader.set_grid(self._grid)
        self.scaler.new_generation()
        return gen

    # -- requests ------------------------------------------------------------------------
    def request_tiles(self, wanted: dict[TileKey, float]) -> None:
        """Replace the wanted tiles (key -> priority, lower first); see ``TileLoader``."""
        self.loader.request(wanted)

    def submit(self, fn: Callable[[], Any], on_done: Callable[[Any], None],
               on_error: Callable[[BaseException], None]) -> RegionRequest | None:
        """Run the read ``fn()`` on the store's read lane, then ``on_done(result)`` or
        ``on_error(exc)`` on the GUI thread; unless the generation changed or the request was
        cancelled first, in which case neither is called. None once the store is shut down."""
        req = RegionRequest(self._gen)

        def job() -> None:
            if not self._current(req):
                return
            try:
                value, callback = fn(), on_done
            except BaseException as exc:  # noqa: BLE001 - every failure goes to the caller
                value, callback = exc, on_error
            if not self._current(req):
                return
            try:
                self._delivered.emit(req, callback, value)
            except RuntimeError:  # the store was deleted while the read ran
                pass

        if self._closed or not self._read_pool.start(job):
            return None
        return req

    def read_tiles(self, grid: TileGrid, keys: Iterable[TileKey], cancel: threading.Event | None = None,
                   progress: ProgressFn | None = None) -> dict[TileKey, QImage | str]:
        """Decode ``keys`` of ``grid`` and wait for them: for exports, from a worker thread (it
        reads along) or, in scripts, the GUI thread (it only waits). Values are images or error
        messages. Stops early, returning what it has, when ``cancel`` is set or the store shuts
        down; ``progress(done, total)`` is called from reading threads."""
        keys = list(dict.fromkeys(keys))
        total = len(keys)
        out: dict[TileKey, QImage | str] = {}
        if not keys:
            return out
        cond = threading.Condition()
        it = iter(keys)
        state = {"active": 0, "exhausted": False}

        def stopped() -> bool:
            return self._closed or (cancel is not None and cancel.is_set())

        def drain(helper: bool) -> None:
            with cond:
                if state["exhausted"] or stopped():
                    return
                if helper:
                    state["active"] += 1
            try:
                while not stopped():
                    with cond:
                        key = next(it, None)
                        if key is None:
                            state["exhausted"] = True
                            return
                    value = read_tile(grid, key)
                    with cond:
                        out[key] = value
                        done = len(out)
                    if progress is not None:
                        progress(done, total)
            finally:
                if helper:
                    with cond:
                        state["active"] -= 1
                        cond.notify_all()

        on_gui = threading.current_thread() is threading.main_thread()
        helpers = min(self.threads, total) - (0 if on_gui else 1)
        started = sum(bool(self._tile_pool.start(lambda: drain(True))) for _ in range(max(helpers, 0)))
        if not on_gui or not started:
            drain(False)  # read along; the GUI thread reads only if no worker can
        with cond:
            while state["active"] > 0 or not (state["exhausted"] or stopped()):
                cond.wait(0.05)
        return out

    def wait_reads(self, timeout_ms: int = 5000) -> bool:
        """Block until no one-shot read is queued or running (for scripts and tests)."""
        return self._read_pool.wait_idle(timeout_ms)

    # -- stopping ------------------------------------------------------------------------
    def shutdown(self, timeout_ms: int = 2000) -> bool:
        """Cancel everything and stop every thread of the store, waiting at most
        ``timeout_ms`` in all. True when none is still running; the rest end on their own."""
        with self._lock:
            self._closed = True
            self._gen += 1
            self._grid = None
        self.loader.set_grid(None)
        self.scaler.new_generation()
        deadline = time.monotonic() + max(0, timeout_ms) / 1000.0
        ok = True
        for pool in (self._read_pool, self._scale_pool, self._tile_pool):
            ok = pool.shutdown(int(max(0.0, deadline - time.monotonic()) * 1000)) and ok
        return ok

    def _current(self, req: RegionRequest) -> bool:
        return not self._closed and not req.cancelled and req.generation == self._gen

    def _deliver(self, req: RegionRequest, callback: Callable[[Any], None], value: Any) -> None:
        if self._current(req):
            callback(value)
