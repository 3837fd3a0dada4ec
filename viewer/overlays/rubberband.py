"""A dashed rectangle the user draws (Shift+drag) to run a model on part of the slide."""
from __future__ import annotations

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPen

from viewer.camera import Camera
from viewer.overlays.base import Overlay, camera_transform


class RubberBandOverlay(Overlay):
    def __init__(self) -> None:
        super().__init__("region of interest")
        self.rect: tuple[float, float, float, float] | None = None

    def set_rect(self, rect: tuple[float, float, float, float] | None) -> None:
        self.rect = rect
        self.changed.emit()

    def paint(self, painter: QPainter, camera: Camera) -> None:
        if not self.rect:
            return
        painter.setTransform(camera_transform(camera))
        pen = QPen(QColor(0, 255, 200))
        pen.setCosmetic(True)
        pen.setWidthF(2.0)
        pen.setStyle(Qt.PenStyle.DashLine)
        painter.setPen(pen)
        painter.setBrush(QColor(0, 255, 200, 25))
        painter.drawRect(QRectF(*self.rect))

    def legend(self) -> list[tuple[str, QColor]]:
        return [("region of interest", QColor(0, 255, 200))] if self.rect else []
