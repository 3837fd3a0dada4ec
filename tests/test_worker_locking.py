"""Background reads must not deadlock the GUI thread.

A worker pool that starts a thread while holding its lock, or a read path that goes through
the import machinery (which PySide hooks with Python code) on every tile, let the GUI thread
block forever in ``WorkerPool.start`` while tile threads read.
"""
from __future__ import annotations

import builtins
import weakref
import threading
from pathlib import Path

import numpy as np
import pytest

from engines.slide import open_slide
from viewer import workers
from viewer.workers import WorkerPool

DATA = Path(__file__).parent / "data"


class _SpyThread(threading.Thread):
    """Records, at ``start()``, whether the starting thread holds the pool's lock."""

    pool: WorkerPool | None = None
    held: list[bool] = []

    def start(self) -> None:
        pool = type(self).pool
        assert pool is not None
        type(self).held.append(pool._cv._is_owned())
        super().start()


@pytest.fixture
def spy(monkeypatch):
    _SpyThread.held = []
    monkeypatch.setattr(workers.threading, "Thread", _SpyThread)
    yield _SpyThread
    _SpyThread.pool = None


def test_start_never_holds_the_pool_lock_while_starting_a_thread(spy):
    pool = WorkerPool("lock-test", threads=3)
    spy.pool = pool
    gate = threading.Event()
    ran: list[int] = []
    lock = threading.Lock()

    def job(i: int):
        def run() -> None:
            gate.wait()
            with lock:
                ran.append(i)
        return run

    for i in range(8):
        assert pool.start(job(i))
    gate.set()
    assert pool.wait_idle(30_000)
    assert pool.shutdown(30_000)
    assert sorted(ran) == list(range(8))
    # Three workers at most, and none was started with the lock held.
    assert 1 <= len(spy.held) <= 3
    assert not any(spy.held)


def test_a_thread_that_fails_to_start_is_not_counted(monkeypatch):
    pool = WorkerPool("start-fails", threads=1)

    class Broken(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(workers.threading, "Thread", Broken)
    with pytest.raises(RuntimeError):
        pool.start(lambda: None)
    monkeypatch.undo()
    done = threading.Event()
    assert pool.start(done.set)  # the next job starts a worker again
    assert pool.wait_idle(30_000) and done.is_set()
    assert pool.shutdown(30_000)


def test_submits_from_one_thread_while_workers_run_all_finish():
    pool = WorkerPool("hammer", threads=4)
    count = [0]
    lock = threading.Lock()

    def job() -> None:
        with lock:
            count[0] += 1

    for _ in range(2000):
        assert pool.start(job)
    assert pool.wait_idle(60_000)
    assert pool.shutdown(30_000)
    assert count[0] == 2000
    assert not [t for t in workers.running_workers() if t.name.startswith("maglens-hammer")]


def test_reading_a_tile_imports_nothing(monkeypatch):
    """The OpenSlide tile read runs on worker threads for every tile: it must not call the
    import machinery (PySide routes every import through Python code of its own)."""
    slide = open_slide(DATA / "test3-DAPI-2.ndpi")
    level = slide.levels[0]
    x, y = level.width // 2, level.height // 2
    slide.read_region_xrgb(0, x, y, 32, 32)  # warm: first-use imports are fine
    seen: list[str] = []
    real = builtins.__import__

    def counting(name, *args, **kwargs):
        seen.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", counting)
    argb = slide.read_region_xrgb(0, x, y, 64, 48)
    monkeypatch.undo()
    assert seen == []
    assert argb.shape == (48, 64) and argb.dtype == np.uint32
    # The same pixels as the RGB read.
    rgb = slide._backend.read(0, x, y, 64, 48)
    red = ((argb >> 16) & 0xFF).astype(np.int16)
    assert np.abs(red - rgb[..., 0].astype(np.int16)).max() <= 1


def test_reference_cycles_are_collected_on_the_gui_thread_never_in_a_worker(qtbot):
    """A worker that allocates must not run the cyclic collector: a cycle holding Qt objects
    would then be destroyed in that worker (which deadlocked against the GUI thread)."""
    pool = WorkerPool("gc-test", threads=1)  # a pool made with an application sets this up
    where: list[str] = []
    refs: list[weakref.ref] = []  # outside the cycle, so its callback runs

    class Node:
        pass

    def make_cycle() -> None:
        a, b = Node(), Node()
        a.other, b.other = b, a
        refs.append(weakref.ref(b, lambda _r: where.append(threading.current_thread().name)))

    make_cycle()

    def allocate() -> None:  # enough kept containers to run every generation
        keep = [[] for _ in range(200_000)]
        del keep

    assert pool.start(allocate)
    assert pool.wait_idle(60_000)
    assert where == [] or where == [threading.main_thread().name], where
    qtbot.waitUntil(lambda: where == [threading.main_thread().name], timeout=10_000)
    assert pool.shutdown(10_000)
