"""Figures: the canvas view with its visible overlays and a legend, as one image."""
from __future__ import annotations

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QFont, QImage, QPainter

from viewer.camera import Rect

PAD = 8
SWATCH = 12


def legend_entries(overlays) -> list[tuple[str, QColor]]:
    out: list[tuple[str, QColor]] = []
    for ov in overlays:
        if ov.visible:
            out.extend(ov.legend())
    return out


def draw_legend(image: QImage, entries: list[tuple[str, QColor]], title: str = "") -> None:
    """A legend box in the top-right corner of ``image``."""
    if not entries and not title:
        return
    painter = QPainter(image)
    try:
        font = QFont()
        font.setPixelSize(12)
        painter.setFont(font)
        fm = painter.fontMetrics()
        lines = ([title] if title else []) + [text for text, _ in entries]
        width = max(fm.horizontalAdvance(t) for t in lines) + SWATCH + 3 * PAD
        line_h = max(fm.height(), SWATCH) + 4
        height = line_h * len(lines) + 2 * PAD
        x0 = image.width() - width - PAD
        y0 = PAD
        painter.setPen(QColor(60, 60, 60))
        painter.setBrush(QColor(255, 255, 255, 225))
        painter.drawRoundedRect(QRectF(x0, y0, width, height), 4, 4)
        y = y0 + PAD
        if title:
            bold = QFont(font)
            bold.setBold(True)
            painter.setFont(bold)
            painter.setPen(QColor(0, 0, 0))
            painter.drawText(QRectF(x0 + PAD, y, width - 2 * PAD, line_h), Qt.AlignmentFlag.AlignVCenter, title)
            painter.setFont(font)
            y += line_h
        for text, color in entries:
            painter.setPen(QColor(40, 40, 40))
            painter.setBrush(color)
            painter.drawRect(QRectF(x0 + PAD, y + (line_h - SWATCH) / 2, SWATCH, SWATCH))
            painter.setPen(QColor(0, 0, 0))
            painter.drawText(QRectF(x0 + 2 * PAD + SWATCH, y, width, line_h), Qt.AlignmentFlag.AlignVCenter, text)
            y += line_h
    finally:
        painter.end()


def render_figure(canvas, width: int, height: int, view_rect: Rect | None = None, title: str = "") -> QImage:
    """The canvas's view (or ``view_rect``) with visible overlays and their legend."""
    image = canvas.render_image(width, height, view_rect)
    draw_legend(image, legend_entries(canvas.overlays()), title)
    return image
