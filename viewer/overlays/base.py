"""Base class for things drawn over the slide.

An overlay draws in level-0 slide coordinates: ``painter.setTransform(camera_transform(camera))``
maps them to the screen. Under that transform a pen's width would scale with the zoom, so use
cosmetic pens (``pen.setCosmetic(True)``, the default for width 0) to keep lines a constant
number of screen pixels wide. Text is best drawn after ``painter.resetTransform()`` at
``camera.to_screen(...)`` positions, so it does not scale either.
"""
from __future__ import annotations

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QColor, QPainter, QTransform

from viewer.camera import Camera


def camera_transform(camera: Camera) -> QTransform:
    """Level-0 pixels to widget pixels for ``camera``."""
    s = camera.scale
    return QTransform(s, 0.0, 0.0, s, camera.width / 2.0 - camera.cx * s,
                      camera.height / 2.0 - camera.cy * s)


class Overlay(QObject):
    """Override ``paint`` (and ``legend``). The canvas applies ``opacity`` and skips hidden
    overlays; it restores the painter state after each one."""

    changed = Signal()

    def __init__(self, name: str = "overlay", parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._name = str(name)
        self._visible = True
        self._opacity = 1.0

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        if str(value) != self._name:
            self._name = str(value)
            self.changed.emit()

    @property
    def visible(self) -> bool:
        return self._visible

    @visible.setter
    def visible(self, value: bool) -> None:
        if bool(value) != self._visible:
            self._visible = bool(value)
            self.changed.emit()

    @property
    def opacity(self) -> float:
        return self._opacity

    @opacity.setter
    def opacity(self, value: float) -> None:
        value = min(max(float(value), 0.0), 1.0)
        if value != self._opacity:
            self._opacity = value
            self.changed.emit()

    def paint(self, painter: QPainter, camera: Camera) -> None:
        """Draw in level-0 coordinates through ``camera``; the base draws nothing."""

    def legend(self) -> list[tuple[str, QColor]]:
        return []
