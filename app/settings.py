"""Persistent viewer settings: recent files, the window layout and each slide's display
adjustment (QSettings)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

ORGANIZATION = "MagLens"
APPLICATION = "MagLens"
MAX_RECENT = 10

_RECENT_KEY = "recent/files"
_GEOMETRY_KEY = "window/geometry"
_STATE_KEY = "window/state"
_DISPLAY_GROUP = "display"  # + "/<hash of the slide's resolved path>"


def default_settings() -> QSettings:
    return QSettings(ORGANIZATION, APPLICATION)


class RecentPaths:
    """A most-recent-first list of paths under one settings key; paths that are gone are
    pruned (and forgotten) when read."""

    def __init__(self, qsettings: QSettings, key: str, exists=os.path.isfile) -> None:
        self.qsettings = qsettings
        self.key = key
        self.exists = exists

    def paths(self) -> list[str]:
        stored = as_str_list(self.qsettings.value(self.key, []))
        alive = [p for p in stored if self.exists(p)][:MAX_RECENT]
        if alive != stored:
            self._store(alive)
        return alive

    def add(self, path: str | os.PathLike) -> list[str]:
        full = str(Path(path).resolve())
        paths = ([full] + [p for p in self.paths() if p != full])[:MAX_RECENT]
        self._store(paths)
        return paths

    def clear(self) -> None:
        self._store([])

    def _store(self, paths: list[str]) -> None:
        self.qsettings.setValue(self.key, list(paths))
        self.qsettings.sync()


class AppSettings:
    """Typed access to the few values MagLens remembers between runs."""

    def __init__(self, qsettings: QSettings | None = None) -> None:
        self.qsettings = qsettings if qsettings is not None else default_settings()
        self.recent = RecentPaths(self.qsettings, _RECENT_KEY)

    # -- recent files --------------------------------------------------------------------
    def recent_files(self) -> list[str]:
        """Most recent first; files that no longer exist are pruned (and forgotten)."""
        return self.recent.paths()

    def add_recent(self, path: str | os.PathLike) -> list[str]:
        return self.recent.add(path)

    def clear_recent(self) -> None:
        self.recent.clear()

    # -- window layout -------------------------------------------------------------------
    def window_layout(self) -> tuple[QByteArray | None, QByteArray | None]:
        geometry = self.qsettings.value(_GEOMETRY_KEY)
        state = self.qsettings.value(_STATE_KEY)
        return (
            geometry if isinstance(geometry, QByteArray) else None,
            state if isinstance(state, QByteArray) else None,
        )

    def save_window_layout(self, geometry: QByteArray, state: QByteArray) -> None:
        self.qsettings.setValue(_GEOMETRY_KEY, geometry)
        self.qsettings.setValue(_STATE_KEY, state)
        self.qsettings.sync()

    # -- display adjustment, per slide ---------------------------------------------------
    def display_adjust(self, path: str | os.PathLike) -> dict | None:
        """The brightness/contrast/gamma stored for the slide at ``path`` (a plain dict), or
        None when it has none."""
        raw = self.qsettings.value(_display_key(path))
        if not isinstance(raw, str) or not raw:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def set_display_adjust(self, path: str | os.PathLike, values: dict | None) -> None:
        """Remember ``values`` for the slide at ``path``; None forgets them (the defaults)."""
        key = _display_key(path)
        if values is None:
            self.qsettings.remove(key)
        else:
            self.qsettings.setValue(key, json.dumps(values, sort_keys=True))
        self.qsettings.sync()


def _display_key(path: str | os.PathLike) -> str:
    # Paths hold '/' and characters INI keys mangle; a digest of the resolved path is stable.
    full = str(Path(path).resolve())
    return f"{_DISPLAY_GROUP}/{hashlib.sha1(full.encode('utf-8')).hexdigest()[:20]}"


def as_str_list(value) -> list[str]:
    # QSettings returns a bare str for a one-element list in INI files, None when unset.
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    try:
        return [str(v) for v in value if v]
    except TypeError:
        return []
