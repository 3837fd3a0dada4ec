"""Figures: the canvas view with its visible overlays and a legend, as one image."""
from __future__ import annotations

from typing import Union

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QImage, QLinearGradient, QPainter

from viewer.camera import Rect
from viewer.overlays import colormaps
from viewer.overlays.heatmap import HeatmapOverlay

PAD = 8
SWATCH = 12
BAR_W = 60  # a colormap's gradient bar in the legend
Swatch = Union[QColor, list[QColor]]  # one colour, or a gradient from low to high


def legend_entries(overlays) -> list[tuple[str, Swatch]]:
    """Legend lines of the visible overlays. Heatmaps share one gradient bar per colormap:
    a figure with a dozen maps would otherwise list two lines for each."""
    out: list[tuple[str, Swatch]] = []
    heat: dict[str, list[HeatmapOverlay]] = {}
    for ov in overlays:
        if not ov.visible:
            continue
        if isinstance(ov, HeatmapOverlay):
            heat.setdefault(ov.colormap, []).append(ov)
        else:
            out.extend(ov.legend())
    maps_first: list[tuple[str, Swatch]] = []
    for cmap, group in heat.items():
        ramp = [colormaps.color(cmap, i / 8) for i in range(9)]
        ranges = {o.value_range() for o in group}
        if len(group) == 1:
            lo, hi = group[0].value_range()
            text = f"{group[0].map.name}: {lo:.3g} – {hi:.3g}"
        elif len(ranges) == 1:
            lo, hi = ranges.pop()
            text = f"attention, {len(group)} maps: {lo:.3g} – {hi:.3g}"
        else:
            text = f"attention, {len(group)} maps: low – high (each its own range)"
        maps_first.append((text, ramp))
    return maps_first + out


def draw_legend(image: QImage, entries: list[tuple[str, Swatch]], title: str = "") -> None:
    """A legend box in the top-right corner of ``image``."""
    if not entries and not title:
        return
    painter = QPainter(image)
    try:
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        font = QFont()
        font.setPixelSize(max(12, min(18, image.height() // 70)))
        painter.setFont(font)
        fm = painter.fontMetrics()
        swatch_w = [BAR_W if isinstance(c, list) else SWATCH for _, c in entries]
        widths = [fm.horizontalAdvance(t) + w + PAD for (t, _), w in zip(entries, swatch_w)]
        if title:
            bold = QFont(font)
            bold.setBold(True)
            widths.append(painter.fontMetrics().horizontalAdvance(title) * 1.1)
        width = min(max(widths) + 2 * PAD, image.width() - 2 * PAD)
        line_h = max(fm.height(), SWATCH) + 4
        height = line_h * (len(entries) + (1 if title else 0)) + 2 * PAD
        x0 = image.width() - width - PAD
        y0 = PAD
        painter.setPen(QColor(60, 60, 60))
        painter.setBrush(QColor(255, 255, 255, 230))
        painter.drawRoundedRect(QRectF(x0, y0, width, height), 4, 4)
        y = y0 + PAD
        if title:
            painter.setFont(bold)
            painter.setPen(QColor(0, 0, 0))
            painter.drawText(QRectF(x0 + PAD, y, width - 2 * PAD, line_h), Qt.AlignmentFlag.AlignVCenter, title)
            painter.setFont(font)
            y += line_h
        for (text, color), sw in zip(entries, swatch_w):
            box = QRectF(x0 + PAD, y + (line_h - SWATCH) / 2, sw, SWATCH)
            painter.setPen(QColor(40, 40, 40))
            if isinstance(color, list):
                grad = QLinearGradient(QPointF(box.left(), 0), QPointF(box.right(), 0))
                for i, c in enumerate(color):
                    grad.setColorAt(i / max(len(color) - 1, 1), c)
                painter.setBrush(grad)
            else:
                painter.setBrush(color)
            painter.drawRect(box)
            painter.setPen(QColor(0, 0, 0))
            painter.drawText(QRectF(box.right() + PAD, y, width - sw - 3 * PAD, line_h),
                             Qt.AlignmentFlag.AlignVCenter, text)
            y += line_h
    finally:
        painter.end()


def render_figure(canvas, width: int, height: int, view_rect: Rect | None = None, title: str = "") -> QImage:
    """The canvas's view (or ``view_rect``) with visible overlays and their legend."""
    image = canvas.render_image(width, height, view_rect)
    draw_legend(image, legend_entries(canvas.overlays()), title)
    return image
