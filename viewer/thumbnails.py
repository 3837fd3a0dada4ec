"""Slide thumbnails for lists of many slides: made on worker threads, newest request first,
and cached on disk so a project opened again shows them at once.

A cached thumbnail is a PNG named by a digest of the slide's resolved path, the thumbnail size
and the file's size and mtime, so a slide that changes on disk gets a new one. The cache lives
in ``.maglens-thumbs/`` beside the project (the folder of slides, or the manifest's or project
file's folder) and falls back to the user's cache folder where that is not writable.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Iterable

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QObject, QStandardPaths, Qt, Signal
from PySide6.QtGui import QImage

from engines.slide import Slide
from engines.trace import write_atomic
from viewer.workers import WorkerPool

THUMBS_DIR = ".maglens-thumbs"
THUMB_SIZE = 48  # longest side in pixels


class Superseded(Exception):
    """The request was dropped (a new project, or shutdown) while its slide was read."""


def cache_key(path: str | os.PathLike, size: int) -> str | None:
    """File name of ``path``'s thumbnail of ``size``; None when the file cannot be read."""
    try:
        full = Path(path).resolve()
        st = full.stat()
    except OSError:
        return None
    text = f"{full}|{int(size)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest() + ".png"


def user_cache_folder() -> Path:
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericCacheLocation)
    return Path(base or Path.home() / ".cache") / "maglens" / "thumbs"


def writable_folder(preferred: Path | None) -> Path | None:
    """``preferred/.maglens-thumbs`` when it can be made and written, else the user's cache
    folder, else None (thumbnails are then made every time, never stored)."""
    candidates = ([preferred / THUMBS_DIR] if preferred is not None else []) + [user_cache_folder()]
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    return None


def make_thumbnail(path: str, size: int, check=None) -> QImage:
    """The slide fitted into ``size`` x ``size``; raises what opening or reading raises."""
    with Slide(path) as slide:
        arr = slide.thumbnail(size, check)
    h, w = arr.shape[:2]
    return QImage(arr.tobytes(), w, h, 3 * w, QImage.Format.Format_RGB888).copy()


def _png(image: QImage) -> bytes:
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buf, "PNG")
    buf.close()
    return bytes(data.data())


class ThumbnailCache:
    """Thumbnails on disk; every method is safe on any thread and never raises OSError."""

    def __init__(self, beside: Path | None, size: int = THUMB_SIZE) -> None:
        self.beside = beside
        self.size = size
        self._folder: Path | None = None
        self._resolved = False
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path | None:
        with self._lock:
            if not self._resolved:
                self._folder = writable_folder(self.beside)
                self._resolved = True
            return self._folder

    def load(self, path: str) -> QImage | None:
        key, folder = cache_key(path, self.size), self.folder
        if key is None or folder is None or not (folder / key).is_file():
            return None
        image = QImage(str(folder / key))
        return None if image.isNull() else image

    def store(self, path: str, image: QImage) -> None:
        key, folder = cache_key(path, self.size), self.folder
        if key is None or folder is None:
            return
        try:
            write_atomic(folder / key, _png(image))
        except OSError:
            pass  # a full disk costs only the cache, never the thumbnail

    def get(self, path: str, check=None) -> QImage:
        """From the cache, or made from the slide and stored."""
        image = self.load(path)
        if image is None:
            image = make_thumbnail(path, self.size, check)
            self.store(path, image)
        return image


class ThumbnailLoader(QObject):
    """Makes thumbnails on workers; ``ready(path, image)`` or ``failed(path, message)`` follow
    on the GUI thread. Pending requests run newest first, so the rows a user scrolled to
    come before those scrolled past; ``keep_only`` drops requests no longer wanted and
    ``reset`` drops everything (late results of the old generation are never delivered)."""

    ready = Signal(str, QImage)
    failed = Signal(str, str)
    _arrived = Signal(int, str, object)  # generation, path, QImage or message

    def __init__(self, parent: QObject | None = None, size: int = THUMB_SIZE, threads: int = 1) -> None:
        super().__init__(parent)
        self.size = size
        self._pool = WorkerPool("thumbnails", threads)
        self._lock = threading.Lock()
        self._pending: dict[str, None] = {}  # insertion order = request order
        self._inflight: set[str] = set()
        self._generation = 0
        self._cache = ThumbnailCache(None, size)
        self._arrived.connect(self._on_arrived, Qt.ConnectionType.QueuedConnection)

    def reset(self, beside: Path | None) -> None:
        """A new list: forget pending work and cache thumbnails beside ``beside``."""
        with self._lock:
            self._generation += 1
            self._pending.clear()
            self._inflight.clear()
            self._cache = ThumbnailCache(beside, self.size)
        self._pool.clear()

    @property
    def cache(self) -> ThumbnailCache:
        return self._cache

    def request(self, path: str) -> None:
        with self._lock:
            if path in self._inflight:
                return
            self._pending.pop(path, None)
            self._pending[path] = None
        self._pool.start(self._next)

    def keep_only(self, paths: Iterable[str]) -> None:
        wanted = set(paths)
        with self._lock:
            for p in [p for p in self._pending if p not in wanted]:
                del self._pending[p]

    def pending(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._inflight)

    def wait_idle(self, msecs: int = 5000) -> bool:
        return self._pool.wait_idle(msecs)

    def shutdown(self, msecs: int = 2000) -> bool:
        with self._lock:
            self._generation += 1
            self._pending.clear()
        return self._pool.shutdown(msecs)

    def _next(self) -> None:
        with self._lock:
            if not self._pending:
                return  # taken by an earlier job, or dropped
            path = next(reversed(self._pending))
            del self._pending[path]
            self._inflight.add(path)
            generation, cache = self._generation, self._cache

        def check() -> None:
            if self._generation != generation or self._pool.closed:
                raise Superseded(path)

        try:
            result: object = cache.get(path, check)
        except Superseded:
            return
        except Exception as exc:  # noqa: BLE001 - any unreadable slide gets a placeholder
            result = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if self._pool.closed:
            return
        try:
            self._arrived.emit(generation, path, result)
        except RuntimeError:
            pass  # the loader was destroyed while the slide was read

    def _on_arrived(self, generation: int, path: str, result: object) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._inflight.discard(path)
        if isinstance(result, QImage):
            self.ready.emit(path, result)
        else:
            self.failed.emit(path, str(result))
