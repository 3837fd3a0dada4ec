"""Locking the pan and zoom of several SlideCanvas: moving one moves the others.

Views are locked in level-0 slide pixels: every canvas shows the same centre at the same scale
(screen pixels per level-0 pixel), so one region of one slide lines up across canvases, and
two slides of the same size line up point for point. Whatever moves a canvas (drag, wheel,
keys, fit, an animation step) ends in its ``view_changed``; the link copies that camera to the
others without animating them. While it does, their own ``view_changed`` is ignored, so a move
never echoes back (each canvas still clamps its camera to its own slide).
"""
from __future__ import annotations

from PySide6.QtCore import QObject

from viewer.canvas import SlideCanvas


class ViewLink(QObject):
    """One pan/zoom for every canvas added."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._canvases: list[SlideCanvas] = []
        self._slots: dict[int, object] = {}
        self._syncing = False
        self.enabled = True

    @property
    def canvases(self) -> list[SlideCanvas]:
        return list(self._canvases)

    def add(self, canvas: SlideCanvas) -> None:
        if canvas in self._canvases:
            return
        self._canvases.append(canvas)
        slot = lambda _rect, c=canvas: self._moved(c)  # noqa: E731
        self._slots[id(canvas)] = slot
        canvas.view_changed.connect(slot)

    def remove(self, canvas: SlideCanvas) -> None:
        if canvas not in self._canvases:
            return
        self._canvases.remove(canvas)
        slot = self._slots.pop(id(canvas), None)
        try:
            canvas.view_changed.disconnect(slot)
        except (RuntimeError, TypeError):
            pass

    def align(self, canvas: SlideCanvas) -> None:
        """Bring ``canvas`` (say, with a slide just set) to the view of the others."""
        leader = next((c for c in self._canvases if c is not canvas and c.slide is not None), None)
        if leader is not None:
            self._copy(leader, [canvas])

    def _moved(self, source: SlideCanvas) -> None:
        if self._syncing or not self.enabled or source.slide is None:
            return
        self._copy(source, [c for c in self._canvases if c is not source])

    def _copy(self, source: SlideCanvas, targets: list[SlideCanvas]) -> None:
        cam = source.camera
        self._syncing = True
        try:
            for target in targets:
                if target.slide is not None:
                    target.center_on(cam.cx, cam.cy, cam.scale, animate=False)
        finally:
            self._syncing = False
