"""The probability-trail plot: the model's belief in the positive class after each step.

A second series (another trace's trail, when two models are compared) is drawn in its own
colour and symbol, and a legend then names both."""
from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QVBoxLayout, QWidget

from engines.trace import TrailStep
from viewer.overlays import colormaps


class _StepAxis(pg.AxisItem):
    """Steps are whole numbers: no ticks at 1.5."""

    def tickValues(self, minVal, maxVal, size):  # noqa: N802,N803 - pyqtgraph override
        return [(lvl, [v for v in vals if float(v).is_integer()])
                for lvl, vals in super().tickValues(minVal, maxVal, size)]

    def tickStrings(self, values, scale, spacing):  # noqa: N802 - pyqtgraph override
        return [str(int(round(v))) for v in values]


FIRST_PEN = (40, 40, 40)  # one trail: dark line, points coloured by probability
# Two trails: each its own colour (points too), told apart in the legend.
SERIES_COLORS = ((31, 119, 180), (230, 110, 0))


class TrailPlot(QWidget):
    step_clicked = Signal(int)  # TrailStep.index
    second_step_clicked = Signal(int)  # TrailStep.index of the second series

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        pg.setConfigOptions(antialias=True)
        self.plot = pg.PlotWidget(background="w", axisItems={"bottom": _StepAxis("bottom")})
        self.plot.setLabel("bottom", "step")
        self.plot.setYRange(0, 1, padding=0.02)
        self.plot.showGrid(x=True, y=True, alpha=0.3)
        self.plot.setMouseEnabled(x=True, y=False)
        self.plot.addItem(pg.InfiniteLine(0.5, angle=0, pen=pg.mkPen((150, 150, 150), style=Qt.PenStyle.DashLine)))
        self.curve = self.plot.plot([], [], pen=pg.mkPen((40, 40, 40), width=2))
        self.points = pg.ScatterPlotItem(size=11, pen=pg.mkPen("k"), hoverable=True)
        self.points.sigClicked.connect(self._clicked)
        self.plot.addItem(self.points)
        self.marker = pg.ScatterPlotItem(size=18, pen=pg.mkPen((255, 0, 0), width=2), brush=None)
        self.plot.addItem(self.marker)
        self.curve2 = self.plot.plot([], [], pen=pg.mkPen(SERIES_COLORS[1], width=2,
                                                          style=Qt.PenStyle.DashLine))
        self.points2 = pg.ScatterPlotItem(size=11, symbol="t", pen=pg.mkPen("k"), hoverable=True)
        self.points2.sigClicked.connect(self._clicked_second)
        self.plot.addItem(self.points2)
        self.legend = self.plot.addLegend(offset=(-10, 10))
        self.legend.setVisible(False)
        self.positive = 1
        self.positive_label = "positive"
        self.steps: list[TrailStep] = []
        self.second: list[TrailStep] | None = None  # None: one series only
        self.second_positive = 1
        self.names = ("", "")
        self.setMinimumHeight(120)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot)
        self._set_label()

    def _set_label(self) -> None:
        self.plot.setLabel("left", f"P({self.positive_label})")

    def set_steps(self, steps: list[TrailStep], positive: int = 1, label: str | None = None) -> None:
        self.steps = list(steps)
        self.positive = positive
        if label:
            self.positive_label = label
            self._set_label()
        self._redraw()

    def add_step(self, step: TrailStep) -> None:
        self.steps.append(step)
        self._redraw()

    def set_second(self, steps: list[TrailStep] | None, positive: int = 1,
                   names: tuple[str, str] = ("", "")) -> None:
        """Plot ``steps`` as a second series beside the first (None: back to one series);
        ``names`` label the first and the second series in the legend."""
        self.second = list(steps) if steps is not None else None
        self.second_positive = positive
        self.names = names
        self._redraw()

    def add_second_step(self, step: TrailStep) -> None:
        if self.second is None:
            self.second = []
        self.second.append(step)
        self._redraw()

    def clear(self) -> None:
        """No trace: no curve, no marker, and no class named on the axis."""
        self.second = None
        self.set_steps([], 1, "positive")
        self.highlight(None)

    def values(self) -> tuple[list[int], list[float]]:
        xs = [s.index + 1 for s in self.steps]
        ys = [float(s.probs[self.positive]) if len(s.probs) > self.positive else 0.0 for s in self.steps]
        return xs, ys

    def second_values(self) -> tuple[list[int], list[float]]:
        """The second series as (step numbers, probabilities); empty without one."""
        steps, p = self.second or [], self.second_positive
        return ([s.index + 1 for s in steps],
                [float(s.probs[p]) if len(s.probs) > p else 0.0 for s in steps])

    @property
    def comparing(self) -> bool:
        return self.second is not None

    def _redraw(self) -> None:
        xs, ys = self.values()
        xs2, ys2 = self.second_values()
        two = self.comparing
        self.curve.setData(xs, ys)
        self.curve.setPen(pg.mkPen(SERIES_COLORS[0] if two else FIRST_PEN, width=2))
        if two:
            brushes = [pg.mkBrush(SERIES_COLORS[0])] * len(ys)
        else:
            brushes = [pg.mkBrush(colormaps.color(colormaps.PROBABILITY, y)) for y in ys]
        self.points.setData(xs, ys, brush=brushes, data=[s.index for s in self.steps])
        self.curve2.setData(xs2, ys2)
        self.points2.setData(xs2, ys2, brush=[pg.mkBrush(SERIES_COLORS[1])] * len(ys2),
                             data=[s.index for s in self.second or []])
        self.legend.clear()
        if two:
            self.legend.addItem(self.curve, self.names[0] or "first")
            self.legend.addItem(self.curve2, self.names[1] or "second")
        self.legend.setVisible(two)
        xs = xs + xs2
        if xs:
            self.plot.setXRange(min(xs) - 0.5, max(xs) + 0.5, padding=0)
        else:
            self.plot.setXRange(0.5, 1.5, padding=0)  # no steps of an earlier trace's range

    def highlight(self, index: int | None) -> None:
        xs, ys = self.values()
        pts = [(x, y) for x, y, s in zip(xs, ys, self.steps) if s.index == index]
        self.marker.setData([p[0] for p in pts], [p[1] for p in pts])

    def _clicked(self, _item, points, *_args) -> None:
        if len(points):
            self.step_clicked.emit(int(points[0].data()))

    def _clicked_second(self, _item, points, *_args) -> None:
        if len(points):
            self.second_step_clicked.emit(int(points[0].data()))
