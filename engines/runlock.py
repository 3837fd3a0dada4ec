"""One training run per run folder at a time.

``RunLock(out_dir)`` holds ``<out_dir>/.maglens-train.lock`` for as long as a run writes
there: a second ``maglens train`` (or the training dialog) pointed at the same folder is
refused at once with ``RunLockedError`` naming the folder and the holder, instead of both
overwriting each other's ``last.pt``. Callers hold the lock around ``engines.train.train``;
the trainer itself does not take it (it would refuse its own caller).

Where ``fcntl`` exists the file carries an ``flock``, which the kernel drops when the holder
dies, so a lock left by a killed run is taken over without guessing from pids. Elsewhere the
file is created with ``O_CREAT|O_EXCL`` and a lock whose pid no longer runs on this host is
stale and taken over. The file's one line says who holds it (pid, host, start time).
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".maglens-train.lock"


class RunLockedError(ValueError):
    """The run folder is in use by a live training process."""


def _lock_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / LOCK_NAME


def _describe(text: str) -> str:
    """'pid 1234 on host, since 2026-01-01 12:00:00' from the lock file's line."""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    pid, host, since = fields.get("pid", "?"), fields.get("host", "?"), fields.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since))) if _is_number(since) else "?"
    return f"pid {pid} on {host}, since {when}"


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _stale_by_pid(text: str) -> bool:
    """Without flock: the holder ran on this host and its pid is gone."""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if fields.get("host") != socket.gethostname():
        return False  # another machine's process: cannot tell, so it is live
    try:
        return not _pid_alive(int(fields.get("pid", "")))
    except ValueError:
        return True  # unreadable content: a half-written lock of a process that died


def lock_holder(out_dir: str | os.PathLike) -> str | None:
    """One line describing the live process holding ``out_dir``'s run lock, or None."""
    path = _lock_path(out_dir)
    if not path.is_file():
        return None
    if fcntl is None:
        text = _read(path)
        return None if _stale_by_pid(text) else _describe(text)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _describe(_read(path))  # held exclusively by a live process
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """``with RunLock(out_dir):`` holds the run folder; creates it when missing and, on exit,
    removes the lock file and the folder again if this lock created it and it stayed empty."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out = Path(out_dir)
        self.path = _lock_path(out_dir)
        self._fd: int | None = None
        self._made_dir = False

    def _line(self) -> bytes:
        return f"pid={os.getpid()} host={socket.gethostname()} since={time.time():.0f}\n".encode()

    def _refuse(self, holder: str) -> RunLockedError:
        return RunLockedError(f"run folder {self.out} is in use by another training run ({holder}); "
                              "wait for it to finish or choose another --out")

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RuntimeError("RunLock is not re-entrant")
        if not self.out.exists():
            try:
                self.out.mkdir(parents=True)
                self._made_dir = True
            except FileExistsError:  # made by someone else meanwhile
                pass
        try:
            self._fd = self._acquire_flock() if fcntl is not None else self._acquire_excl()
        except BaseException:
            self._remove_dir()
            raise
        return self

    def _acquire_flock(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._refuse(_describe(_read(self.path))) from None
            # The previous holder may have removed the file between our open and flock: then
            # this lock is on a dead inode, and the next opener would not see it. Retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self._line())
            return fd

    def _acquire_excl(self) -> int:  # pragma: no cover - platforms without fcntl
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text = _read(self.path)
                if not _stale_by_pid(text):
                    raise self._refuse(_describe(text)) from None
                try:
                    os.unlink(self.path)  # a dead run's lock: take it over
                except FileNotFoundError:
                    pass
                continue
            os.write(fd, self._line())
            return fd
        raise self._refuse(_describe(_read(self.path)))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiter then retries on a fresh file
        except OSError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self._made_dir:
            try:
                self.out.rmdir()  # only when empty: a run that wrote nothing leaves no folder
            except OSError:
                pass
            self._made_dir = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
