"""The probability trail: a recurrent model's belief after each patch, drawn as a numbered
polyline through the patches in the order the model saw them."""
from __future__ import annotations

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QBrush, QColor, QFont, QPainter, QPen

from engines.trace import Field, TrailStep
from viewer.camera import Camera
from viewer.overlays import colormaps
from viewer.overlays.base import Overlay, camera_transform

MARKER_RADIUS = 9.0  # screen pixels


class TrailOverlay(Overlay):
    """Each step is a numbered disc at its patch centre, coloured by the probability of
    ``positive`` (class index); consecutive steps are joined by a line."""

    def __init__(self, steps: list[TrailStep], fields: list[Field], positive: int = 1,
                 name: str = "probability trail") -> None:
        super().__init__(name)
        self.positive = positive
        self._fields = {f.id: f for f in fields}
        self.steps: list[TrailStep] = []
        self.highlight: int | None = None
        for s in steps:
            self.steps.append(s)

    def add(self, step: TrailStep, fields: dict[int, Field] | None = None) -> None:
        if fields:
            self._fields.update(fields)
        self.steps.append(step)
        self.changed.emit()

    def add_field(self, field: Field) -> None:
        self._fields[field.id] = field

    def set_highlight(self, index: int | None) -> None:
        self.highlight = index
        self.changed.emit()

    def centre(self, step: TrailStep) -> tuple[float, float] | None:
        f = self._fields.get(step.field_id) if step.field_id is not None else None
        if f is None:
            return None
        x, y, w, h = f.rect
        return x + w / 2.0, y + h / 2.0

    def probability(self, step: TrailStep) -> float:
        return float(step.probs[self.positive]) if len(step.probs) > self.positive else float("nan")

    def step_at(self, camera: Camera, sx: float, sy: float) -> TrailStep | None:
        """The step whose marker is under the screen point, if any."""
        best, best_d = None, (MARKER_RADIUS + 3) ** 2
        for s in self.steps:
            c = self.centre(s)
            if c is None:
                continue
            px, py = camera.to_screen(*c)
            d = (px - sx) ** 2 + (py - sy) ** 2
            if d <= best_d:
                best, best_d = s, d
        return best

    def paint(self, painter: QPainter, camera: Camera) -> None:
        pts = [(s, self.centre(s)) for s in self.steps]
        pts = [(s, c) for s, c in pts if c is not None]
        if not pts:
            return
        # Line in level-0 space with a cosmetic pen; markers and numbers in screen space so
        # they keep their size at every zoom.
        painter.setTransform(camera_transform(camera))
        pen = QPen(QColor(255, 255, 255, 220))
        pen.setCosmetic(True)
        pen.setWidthF(2.5)
        painter.setPen(pen)
        for (_, a), (_, b) in zip(pts, pts[1:]):
            painter.drawLine(QPointF(*a), QPointF(*b))
        painter.resetTransform()
        font = QFont()
        font.setPixelSize(11)
        font.setBold(True)
        painter.setFont(font)
        for s, c in pts:
            sx, sy = camera.to_screen(*c)
            r = MARKER_RADIUS * (1.4 if s.index == self.highlight else 1.0)
            fill = colormaps.color(colormaps.PROBABILITY, self.probability(s))
            outline = QPen(QColor(255, 255, 255) if s.index == self.highlight else QColor(20, 20, 20))
            outline.setWidthF(2.0 if s.index == self.highlight else 1.0)
            painter.setPen(outline)
            painter.setBrush(QBrush(fill))
            painter.drawEllipse(QPointF(sx, sy), r, r)
            painter.setPen(QColor(0, 0, 0) if fill.lightness() > 128 else QColor(255, 255, 255))
            painter.drawText(QRectF(sx - r, sy - r, 2 * r, 2 * r), Qt.AlignmentFlag.AlignCenter, str(s.index + 1))

    def legend(self) -> list[tuple[str, QColor]]:
        return [("P(positive) = 0", colormaps.color(colormaps.PROBABILITY, 0.0)),
                ("P(positive) = 0.5", colormaps.color(colormaps.PROBABILITY, 0.5)),
                ("P(positive) = 1", colormaps.color(colormaps.PROBABILITY, 1.0))]
