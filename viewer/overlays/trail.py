"""The probability trail: a recurrent model's belief after each patch, drawn as a numbered
polyline through the patches in the order the model saw them."""
from __future__ import annotations

from functools import lru_cache

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QBrush, QColor, QFont, QImage, QPainter, QPen

from engines.trace import Field, TrailStep
from viewer.camera import Camera
from viewer.overlays import colormaps
from viewer.overlays.base import Overlay

MARKER_RADIUS = 9.0  # screen pixels


class TrailOverlay(Overlay):
    """Each step is a numbered disc at its patch centre, coloured by the probability of
    ``positive`` (class index); consecutive steps are joined by a line."""

    def __init__(self, steps: list[TrailStep], fields: list[Field], positive: int = 1,
                 name: str = "probability trail", positive_label: str = "positive") -> None:
        super().__init__(name)
        self.positive = positive
        self.positive_label = positive_label  # the class name shown in the legend
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

    def screen_points(self, camera: Camera) -> list[tuple[TrailStep, float, float]]:
        """Each step's marker position on screen. Steps on one patch (a model that refines
        its belief on the same view) sit side by side instead of on top of each other."""
        by_centre: dict[tuple[float, float], list[TrailStep]] = {}
        for s in self.steps:
            c = self.centre(s)
            if c is not None:
                by_centre.setdefault(c, []).append(s)
        out = []
        for c, group in by_centre.items():
            px, py = camera.to_screen(*c)
            for i, s in enumerate(group):
                out.append((s, px + (i - (len(group) - 1) / 2.0) * 2.3 * MARKER_RADIUS, py))
        order = {id(s): i for i, s in enumerate(self.steps)}
        out.sort(key=lambda t: order[id(t[0])])
        return out

    def step_at(self, camera: Camera, sx: float, sy: float) -> TrailStep | None:
        """The step whose marker is under the screen point, if any."""
        best, best_d = None, (MARKER_RADIUS + 3) ** 2
        for s, px, py in self.screen_points(camera):
            d = (px - sx) ** 2 + (py - sy) ** 2
            if d <= best_d:
                best, best_d = s, d
        return best

    def paint(self, painter: QPainter, camera: Camera) -> None:
        pts = self.screen_points(camera)
        if not pts:
            return
        # Markers and numbers in screen space so they keep their size at every zoom; the line
        # joins them in the order the model saw the patches.
        painter.resetTransform()
        pen = QPen(QColor(255, 255, 255, 230))
        pen.setWidthF(2.5)
        painter.setPen(pen)
        painter.drawPolyline([QPointF(x, y) for _, x, y in pts])
        for s, sx, sy in sorted(pts, key=lambda t: t[0].index == self.highlight):  # lit one on top
            img = _marker(s.index + 1, _rgb(colormaps.color(colormaps.PROBABILITY, self.probability(s))),
                          s.index == self.highlight)
            painter.drawImage(QPointF(sx - img.width() / 2.0, sy - img.height() / 2.0), img)

    def legend(self) -> list[tuple[str, QColor]]:
        # No-break spaces: a narrow Layers dock wraps between entries, not inside one.
        p = f"P({self.positive_label})\u00a0=\u00a0"
        return [(f"{p}0", colormaps.color(colormaps.PROBABILITY, 0.0)),
                (f"{p}0.5", colormaps.color(colormaps.PROBABILITY, 0.5)),
                (f"{p}1", colormaps.color(colormaps.PROBABILITY, 1.0))]


def _rgb(c: QColor) -> tuple[int, int, int]:
    return c.red(), c.green(), c.blue()


@lru_cache(maxsize=512)
def _marker(number: int, fill: tuple[int, int, int], lit: bool) -> QImage:
    """A numbered disc, drawn once: blitting it is far cheaper than laying out text per frame."""
    r = MARKER_RADIUS * (1.4 if lit else 1.0)
    side = int(2 * r + 6)
    img = QImage(side, side, QImage.Format.Format_ARGB32_Premultiplied)
    img.fill(Qt.GlobalColor.transparent)
    p = QPainter(img)
    try:
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        color = QColor(*fill)
        outline = QPen(QColor(255, 255, 255) if lit else QColor(20, 20, 20))
        outline.setWidthF(3.0 if lit else 1.0)
        p.setPen(outline)
        p.setBrush(QBrush(color))
        c = side / 2.0
        p.drawEllipse(QPointF(c, c), r, r)
        font = QFont()
        font.setPixelSize(11)
        font.setBold(True)
        p.setFont(font)
        p.setPen(QColor(0, 0, 0) if color.lightness() > 128 else QColor(255, 255, 255))
        p.drawText(QRectF(c - r, c - r, 2 * r, 2 * r), Qt.AlignmentFlag.AlignCenter, str(number))
    finally:
        p.end()
    return img
