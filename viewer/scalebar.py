"""A scale bar in the canvas corner: a round length in um or mm, from the slide's mpp."""
from __future__ import annotations

import math

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QFont, QPainter, QPen

from viewer.camera import Camera
from viewer.overlays.base import Overlay

NO_SCALE_NOTE = "no scale: slide has no mpp"
NICE_STEPS = (1.0, 2.0, 5.0)


def nice_length(um_per_screen_px: float, max_px: float = 160.0) -> tuple[float, float, str]:
    """The longest 1/2/5 x 10^k micrometre length whose bar fits in ``max_px`` screen pixels:
    (micrometres, screen pixels, label)."""
    if not math.isfinite(um_per_screen_px) or um_per_screen_px <= 0:
        raise ValueError("micrometres per pixel must be a positive number")
    limit = um_per_screen_px * max_px
    exp = math.floor(math.log10(limit))
    best = 10.0 ** (exp - 1)
    for e in (exp - 1, exp):
        for step in NICE_STEPS:
            value = step * 10.0 ** e
            if value <= limit * (1 + 1e-9):
                best = max(best, value)
    return best, best / um_per_screen_px, format_length(best)


def format_length(um: float) -> str:
    if um >= 1000.0:
        mm = um / 1000.0
        return f"{mm:g} mm"
    if um >= 1.0:
        return f"{um:g} µm"
    return f"{um * 1000.0:g} nm"


class ScaleBar(Overlay):
    """Drawn by the canvas in screen space after the slide and the overlays."""

    def __init__(self) -> None:
        super().__init__("Scale bar")
        self.mpp: float | None = None
        self.text = NO_SCALE_NOTE  # what the last paint showed, for the UI and tests

    def paint(self, painter: QPainter, camera: Camera) -> None:
        painter.resetTransform()
        font = QFont(painter.font())
        font.setPointSizeF(9.0)
        painter.setFont(font)
        margin = 12.0
        if self.mpp is None or self.mpp <= 0:
            self.text = NO_SCALE_NOTE
            self._label(painter, camera, self.text, margin, 0.0)
            return
        _, px, self.text = nice_length(self.mpp / camera.scale)
        x0 = margin
        y = camera.height - margin
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        painter.fillRect(QRectF(x0 - 4, y - 24, px + 8, 28), QColor(255, 255, 255, 190))
        pen = QPen(QColor(20, 20, 20), 3)
        pen.setCapStyle(Qt.PenCapStyle.FlatCap)
        painter.setPen(pen)
        painter.drawLine(int(x0), int(y - 3), int(x0 + px), int(y - 3))
        painter.drawText(QRectF(x0, y - 24, max(px, 60.0), 18),
                         Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, self.text)

    @staticmethod
    def _label(painter: QPainter, camera: Camera, text: str, margin: float, _px: float) -> None:
        width = painter.fontMetrics().horizontalAdvance(text) + 10
        rect = QRectF(margin - 4, camera.height - margin - 20, width, 20)
        painter.fillRect(rect, QColor(255, 255, 255, 190))
        painter.setPen(QColor(90, 90, 90))
        painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, text)
