"""Guard against reference-count bugs in some PySide6 builds (seen in 6.12.0).

There ``SignalInstance.emit`` returns ``True``, and void C++ methods (``setObjectName``,
``QPainter.drawImage``, ``QThreadPool.start``...) return ``None``, without taking a
reference. Every such call drops one reference to the singleton; on Python 3.11 (where
singletons are not immortal) a session then aborts with "deallocating None" or "deallocating
True or False". The probes below call each kind a few times and, only when the count really
drops, pin the singleton with a very large extra count, as Python 3.12+ does for all of them.
"""
from __future__ import annotations

import ctypes
import sys

from PySide6.QtCore import QObject, Signal

PIN = 1 << 40
PROBES = 16
_done = False


class _Probe(QObject):
    ping = Signal()


def _drops(singleton: object, call) -> bool:
    before = sys.getrefcount(singleton)
    for _ in range(PROBES):
        call()
    return before - sys.getrefcount(singleton) >= PROBES


def leaky_singletons() -> list[str]:
    """Names of the singletons this PySide6 build loses references to."""
    probe = _Probe()
    found = []
    if _drops(True, probe.ping.emit):
        found.append("True")
    if _drops(None, lambda: probe.setObjectName("probe")):
        found.append("None")
    return found


def guard_signal_refcounts() -> list[str]:
    """Pin the affected singletons once per process; returns the names pinned."""
    global _done
    if _done or sys.version_info >= (3, 12):
        return []
    _done = True
    pinned = leaky_singletons()
    for name in pinned:
        obj = {"True": True, "None": None}[name]
        ctypes.c_ssize_t.from_address(id(obj)).value += PIN
    if "True" in pinned:  # False comes from the same code paths; pin it as well
        ctypes.c_ssize_t.from_address(id(False)).value += PIN
    return pinned
