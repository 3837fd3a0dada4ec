"""Minimap: the slide thumbnail with the viewport outlined; click or drag to move the canvas.

Joined to the canvas only through signals and public slots. The thumbnail is read by the
canvas's region store (its one-shot read lane), never on the GUI thread; a thumbnail still being
read when the slide changes is dropped by the store.
"""
from __future__ import annotations

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QImage, QMouseEvent, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from engines.slide import Slide
from viewer.region_store import RegionStore
from viewer.tiles import array_to_qimage

THUMB_SIDE = 512
# A thumbnail reads the whole of its source level; refuse levels larger than this.
MAX_THUMB_SOURCE_PIXELS = 64_000_000
VIEW_COLOR = QColor(220, 30, 30)


def _thumbnail_source_pixels(slide: Slide, side: int) -> int:
    try:
        level = slide.best_level_for_downsample(max(slide.width, slide.height) / side)
        lv = slide.levels[level]
        return int(lv.width) * int(lv.height)
    except Exception:  # noqa: BLE001 - an odd slide object: let the worker try and report
        return 0


class Minimap(QWidget):
    def __init__(self, canvas, parent: QWidget | None = None, store: RegionStore | None = None) -> None:
        super().__init__(parent)
        self._canvas = canvas
        # The canvas's store owns the read; a canvas without one gets a small private store.
        self._store = store or getattr(canvas, "store", None) or RegionStore(0, 1, self)
        self._slide: Slide | None = None
        self._thumb: QImage | None = None
        self._error = ""
        self._view: tuple[float, float, float, float] | None = None
        self._gen = 0
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        self.setMinimumSize(120, 90)
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        canvas.view_changed.connect(self.set_view_rect)
        slide_changed = getattr(canvas, "slide_changed", None)
        if slide_changed is not None:
            slide_changed.connect(self.set_slide)
        if getattr(canvas, "slide", None) is not None:
            self.set_slide(canvas.slide)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(240, 200)

    @property
    def thumbnail(self) -> QImage | None:
        return self._thumb

    @property
    def error(self) -> str:
        return self._error

    # -- slots -------------------------------------------------------------------------------
    def set_slide(self, slide: Slide | None) -> None:
        self._gen += 1
        self._slide = slide
        self._thumb = None
        self._error = ""
        self._view = None
        if slide is not None:
            if _thumbnail_source_pixels(slide, THUMB_SIDE) > MAX_THUMB_SOURCE_PIXELS:
                self._error = "slide has no overview level small enough"
            else:
                gen = self._gen
                self._store.submit(lambda: array_to_qimage(slide.thumbnail(THUMB_SIDE)),
                                   lambda image: self._on_thumbnail(gen, image, ""),
                                   lambda exc: self._on_thumbnail(gen, None, str(exc) or type(exc).__name__))
        self.update()

    def set_view_rect(self, rect) -> None:
        self._view = tuple(map(float, rect)) if rect is not None else None
        self.update()

    def _on_thumbnail(self, gen: int, image: QImage | None, error: str) -> None:
        if gen != self._gen:
            return
        self._thumb = image
        self._error = error
        self.update()

    # -- geometry ----------------------------------------------------------------------------
    def image_rect(self) -> QRectF:
        """Where the slide is drawn inside the widget (aspect kept, centred)."""
        s = self._slide
        if s is None:
            return QRectF()
        k = min(self.width() / s.width, self.height() / s.height)
        w, h = s.width * k, s.height * k
        return QRectF((self.width() - w) / 2.0, (self.height() - h) / 2.0, w, h)

    def to_level0(self, pos: QPointF) -> tuple[float, float] | None:
        s = self._slide
        r = self.image_rect()
        if s is None or r.width() <= 0:
            return None
        x = (pos.x() - r.x()) / r.width() * s.width
        y = (pos.y() - r.y()) / r.height() * s.height
        return min(max(x, 0.0), float(s.width)), min(max(y, 0.0), float(s.height))

    # -- events ------------------------------------------------------------------------------
    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt override
        p = QPainter(self)
        p.fillRect(self.rect(), self.palette().window())
        r = self.image_rect()
        if self._slide is None:
            p.end()
            return
        if self._thumb is not None:
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
            p.drawImage(r, self._thumb)
        else:
            p.fillRect(r, QColor(225, 225, 225))
            p.setPen(QColor(100, 100, 100))
            text = f"thumbnail unavailable: {self._error}" if self._error else "loading…"
            p.drawText(r, Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, text)
        if self._view is not None and r.width() > 0:
            k = r.width() / self._slide.width
            x, y, w, h = self._view
            view = QRectF(r.x() + x * k, r.y() + y * k, w * k, h * k).intersected(r)
            pen = QPen(VIEW_COLOR, 2)
            pen.setCosmetic(True)
            p.setPen(pen)
            p.setBrush(Qt.BrushStyle.NoBrush)
            p.drawRect(view.adjusted(0.5, 0.5, -0.5, -0.5) if view.width() > 2 else view)
        p.end()

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.MouseButton.LeftButton:
            self._move_canvas(event.position())

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.buttons() & Qt.MouseButton.LeftButton:
            self._move_canvas(event.position())

    def _move_canvas(self, pos: QPointF) -> None:
        target = self.to_level0(pos)
        if target is not None:
            self._canvas.center_on(target[0], target[1], animate=False)
