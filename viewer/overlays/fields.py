"""Fields a model looked at (zoom boxes, tiles, sub-tiles, sampled patches) as rectangles."""
from __future__ import annotations

from PySide6.QtCore import QRectF
from PySide6.QtGui import QColor, QPainter, QPen

from engines.trace import Field
from viewer.camera import Camera
from viewer.overlays import colormaps
from viewer.overlays.base import Overlay, camera_transform


class FieldsOverlay(Overlay):
    """Rectangles coloured by depth with a line width constant on screen. Fields of the
    ``focus_depth`` (when set) are drawn bold and the rest dimmed; ``highlight`` marks one."""

    def __init__(self, fields: list[Field], name: str = "fields", line_width: float = 2.0) -> None:
        super().__init__(name)
        self.fields = [f for f in fields if f.depth > 0]  # depth 0 is the whole view
        self.line_width = line_width
        self.focus_depth: int | None = None
        self.highlight: int | None = None

    def add(self, field: Field) -> None:
        if field.depth > 0:
            self.fields.append(field)
            self.changed.emit()

    def set_focus_depth(self, depth: int | None) -> None:
        self.focus_depth = depth
        self.changed.emit()

    def set_highlight(self, field_id: int | None) -> None:
        self.highlight = field_id
        self.changed.emit()

    @property
    def depths(self) -> list[int]:
        return sorted({f.depth for f in self.fields})

    def field_at(self, x: float, y: float) -> Field | None:
        """The deepest (then smallest) field containing the level-0 point."""
        hits = [f for f in self.fields
                if f.rect[0] <= x <= f.rect[0] + f.rect[2] and f.rect[1] <= y <= f.rect[1] + f.rect[3]]
        if not hits:
            return None
        return max(hits, key=lambda f: (f.depth, -f.rect[2] * f.rect[3]))

    def paint(self, painter: QPainter, camera: Camera) -> None:
        painter.setTransform(camera_transform(camera))
        painter.setBrush(QColor(0, 0, 0, 0))
        vx, vy, vw, vh = camera.view_rect()
        for f in sorted(self.fields, key=lambda f: f.depth):
            x, y, w, h = f.rect
            if x > vx + vw or y > vy + vh or x + w < vx or y + h < vy:
                continue
            color = colormaps.depth_color(f.depth)
            width = self.line_width
            if self.focus_depth is not None:
                if f.depth == self.focus_depth:
                    width *= 1.5
                else:
                    color.setAlpha(70)
            if f.id == self.highlight:
                color, width = QColor(255, 255, 255), width * 2
            pen = QPen(color)
            pen.setCosmetic(True)  # constant width on screen at every zoom
            pen.setWidthF(width)
            painter.setPen(pen)
            painter.drawRect(QRectF(x, y, w, h))

    def legend(self) -> list[tuple[str, QColor]]:
        kinds: dict[int, str] = {}
        for f in self.fields:
            kinds.setdefault(f.depth, f.kind)
        return [(f"depth {d}: {kinds[d]}", colormaps.depth_color(d)) for d in sorted(kinds)]
