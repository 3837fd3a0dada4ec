"""Fields a model looked at (zoom boxes, tiles, sub-tiles, sampled patches) as rectangles."""
from __future__ import annotations

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPen

from engines.trace import Field
from viewer.camera import Camera
from viewer.overlays import colormaps
from viewer.overlays.base import Overlay


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
        # Drawn in screen space, one drawRects call per style: with hundreds of tiles the
        # per-call cost (and the GIL handed back and forth on every call) dominates.
        painter.resetTransform()
        painter.setBrush(Qt.BrushStyle.NoBrush)
        vx, vy, vw, vh = camera.view_rect()
        s = camera.scale
        ox, oy = camera.to_screen(0.0, 0.0)
        by_id = {f.id: f for f in self.fields}
        batches: dict[tuple, list[QRectF]] = {}
        for f in self.fields:
            x, y, w, h = f.rect
            if x > vx + vw or y > vy + vh or x + w < vx or y + h < vy:
                continue
            lit = f.id == self.highlight
            alpha, width = 255, self.line_width
            if self.focus_depth is not None:
                if f.depth == self.focus_depth:
                    width *= 1.5
                else:
                    alpha = 70
            parent = by_id.get(f.parent) if f.parent is not None else None
            # A child covering its whole parent (MagNet keeps the full view as one of its
            # patches) would hide it: dashes let both colours show.
            dashed = parent is not None and _same_rect(parent.rect, f.rect)
            key = (lit, f.depth, alpha, width * (2 if lit else 1), dashed)
            batches.setdefault(key, []).append(QRectF(ox + x * s, oy + y * s, w * s, h * s))
        # Shallow first so children show inside their parents; the highlight on top.
        for (lit, depth, alpha, width, dashed), rects in sorted(batches.items(), key=lambda kv: kv[0][:2]):
            color = QColor(255, 255, 255) if lit else colormaps.depth_color(depth)
            if not lit:
                color.setAlpha(alpha)
            pen = QPen(color)
            pen.setWidthF(width)  # screen pixels: constant at every zoom
            if dashed:
                pen.setDashPattern([3.0, 3.0])
            painter.setPen(pen)
            painter.drawRects(rects)

    def legend(self) -> list[tuple[str, QColor]]:
        kinds: dict[int, str] = {}
        for f in self.fields:
            kinds.setdefault(f.depth, f.kind)
        return [(f"depth\u00a0{d}:\u00a0{kinds[d]}", colormaps.depth_color(d)) for d in sorted(kinds)]


def _same_rect(a, b, tol: float = 1.0) -> bool:
    return all(abs(p - q) <= tol for p, q in zip(a, b))
