"""The region store owns every display read: one set of threads, generations that drop what
belongs to a slide no longer shown, cancel by handle, and a shutdown that never hangs."""
from __future__ import annotations

import threading

from PySide6.QtGui import QImage

from engines.slide import Slide
from tests.conftest import DATA, DEMO_SLIDE
from tests.test_main_window import (  # noqa: F401
    _sandboxed_settings,
    dialogs,
    make_window,
    open_and_wait,
    qsettings,
)
from viewer.region_store import RegionStore
from viewer.tiles import TileGrid, TileKey

STORE_THREADS = ("maglens-tiles", "maglens-reads", "maglens-scale")


def _held(gate: threading.Event, started: threading.Event, value):
    def read():
        started.set()
        gate.wait(10)
        return value
    return read


def test_results_of_an_old_slide_are_never_delivered(qtbot):
    store = RegionStore(threads=1)
    a, b = Slide(DEMO_SLIDE), Slide(DATA / "small.svs")
    gate, started = threading.Event(), threading.Event()
    got: list[str] = []
    try:
        store.set_grid(TileGrid(a))
        store.submit(_held(gate, started, "a, in flight"), got.append, got.append)
        store.submit(lambda: "a, queued", got.append, got.append)
        assert started.wait(5)
        store.set_grid(TileGrid(b))  # the user opens another slide meanwhile
        store.submit(lambda: "b", got.append, got.append)
        gate.set()
        qtbot.waitUntil(lambda: got == ["b"], timeout=5000)
        assert store.wait_reads(5000)
        qtbot.wait(20)
        assert got == ["b"]
        # The same slide read differently (a display adjustment) keeps its one-shot reads.
        store.submit(lambda: "b again", got.append, got.append)
        store.set_grid(TileGrid(b))
        qtbot.waitUntil(lambda: got == ["b", "b again"], timeout=5000)
    finally:
        gate.set()
        assert store.shutdown(5000)


def test_a_cancelled_request_is_not_delivered_and_errors_are(qtbot):
    store = RegionStore(threads=1)
    got: list[object] = []
    gate, started = threading.Event(), threading.Event()
    try:
        first = store.submit(_held(gate, started, "first"), got.append, got.append)
        second = store.submit(lambda: "second", got.append, got.append)
        assert started.wait(5)
        first.cancel()
        second.cancel()
        store.submit(lambda: 1 / 0, got.append, got.append)
        gate.set()
        qtbot.waitUntil(lambda: len(got) == 1, timeout=5000)
        assert isinstance(got[0], ZeroDivisionError)
    finally:
        gate.set()
        store.shutdown(5000)


def test_shutdown_is_bounded_and_refuses_new_work(qtbot):
    store = RegionStore(threads=2)
    gate, started = threading.Event(), threading.Event()
    got: list[object] = []
    try:
        store.submit(_held(gate, started, "late"), got.append, got.append)
        assert started.wait(5)
        assert store.shutdown(100) is False  # a read stuck in a C call: left to finish alone
        assert store.submit(lambda: "after", got.append, got.append) is None
        gate.set()
        assert store._read_pool.wait_idle(5000)
        qtbot.wait(20)
        assert got == []
    finally:
        gate.set()


def test_export_reads_stop_when_cancelled(qtbot):
    slide = Slide(DEMO_SLIDE)
    gate, started = threading.Event(), threading.Event()
    read = slide.read_region_xrgb
    count = []

    def held(*args, **kwargs):
        count.append(1)
        started.set()
        gate.wait(10)
        return read(*args, **kwargs)

    slide.read_region_xrgb = held
    grid = TileGrid(slide)
    store = RegionStore(threads=2)
    cancel = threading.Event()
    keys = [TileKey(0, c, r) for c in range(6) for r in range(6)]
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(store.read_tiles(grid, keys, cancel)))
    try:
        worker.start()
        assert started.wait(5)
        cancel.set()
        gate.set()
        worker.join(10)
        assert not worker.is_alive()
        assert 0 < len(out) < len(keys) and len(count) < len(keys)
        assert all(isinstance(v, QImage) for v in out.values())
    finally:
        gate.set()
        store.shutdown(5000)


def test_display_reads_run_on_the_region_store_threads(qtbot, qsettings, dialogs, monkeypatch):  # noqa: F811
    seen: list[tuple[str, str]] = []
    opening = threading.local()

    def spy(name: str) -> None:
        original = getattr(Slide, name)

        def wrapped(self, *args, **kwargs):
            if not getattr(opening, "on", False):
                seen.append((name, threading.current_thread().name))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Slide, name, wrapped)

    init = Slide.__init__

    def init_spy(self, *args, **kwargs):  # reads made while a slide opens are not display reads
        opening.on = True
        try:
            init(self, *args, **kwargs)
        finally:
            opening.on = False

    monkeypatch.setattr(Slide, "__init__", init_spy)
    for name in ("read_region", "read_region_xrgb", "thumbnail", "associated_image"):
        spy(name)
    window = make_window(qtbot, qsettings)
    try:
        open_and_wait(qtbot, window, DATA / "test3-DAPI-2.ndpi")
        qtbot.waitUntil(lambda: window.minimap.thumbnail is not None
                        and not window.associated_panel.loading, timeout=20_000)
        window.canvas.set_magnification(5.0)
        qtbot.waitUntil(lambda: any(n == "read_region_xrgb" for n, _ in seen), timeout=20_000)
        assert window.wait_for_workers()
        kinds = {n for n, _ in seen}
        assert {"thumbnail", "read_region_xrgb"} <= kinds
        if window.slide.associated_names:
            assert "associated_image" in kinds
        strays = sorted({t for _, t in seen if not t.startswith(STORE_THREADS)})
        assert not strays, f"display reads outside the region store: {strays}"
        assert window.minimap._store is window.canvas.store
    finally:
        window.close()


def test_pool_runs_queued_jobs_side_by_side():
    from viewer.workers import WorkerPool

    pool = WorkerPool("test", 2)
    try:
        assert pool.start(lambda: None) and pool.wait_idle(5000)  # one idle worker now
        barrier = threading.Barrier(2, timeout=5)
        met: list[bool] = []

        def job() -> None:
            try:
                barrier.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)

        pool.start(job)
        pool.start(job)  # must get a second worker, not wait behind the first
        assert pool.wait_idle(10_000)
        assert met == [True, True]
    finally:
        assert pool.shutdown(5000)
        assert not pool.start(lambda: None)


def test_a_job_holding_the_last_reference_lets_it_go_on_the_gui_thread(qtbot):
    """A callback bound to a closed window may be the last reference to it; dropping it in a
    worker would destroy Qt widgets off the GUI thread (a deadlock or an abort at exit)."""
    from viewer.workers import WorkerPool

    where: list[bool] = []

    class Held:
        def __del__(self) -> None:
            where.append(threading.current_thread() is threading.main_thread())

    pool = WorkerPool("test", 1)
    gate = threading.Event()
    try:
        held = Held()
        pool.start(lambda held=held: gate.wait(5))
        del held  # the job now holds the only reference
        gate.set()
        assert pool.wait_idle(5000)
        qtbot.waitUntil(lambda: bool(where), timeout=5000)
        assert where == [True]
    finally:
        gate.set()
        pool.shutdown(5000)
