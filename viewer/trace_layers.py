"""All the layers of one Trace on one canvas: fields, attention maps and the probability trail.

Built incrementally from streamed events (so a running model fills the canvas as it works) or
at once from a finished trace. Knows nothing of which model made the trace beyond its groups.
"""
from __future__ import annotations

from PySide6.QtCore import QObject, Signal

from engines.trace import AttentionMap, Field, Trace, TrailStep
from viewer.overlays import colormaps
from viewer.overlays.fields import FieldsOverlay
from viewer.overlays.heatmap import HeatmapOverlay, shared_range
from viewer.overlays.trail import TrailOverlay



class TraceLayers(QObject):
    """Overlays for one trace. ``canvas`` needs ``add_overlay``/``remove_overlay``."""

    changed = Signal()

    def __init__(self, canvas, trace: Trace, colormap: str = colormaps.DEFAULT,
                 joint: bool = False) -> None:
        super().__init__()
        self.canvas = canvas
        self.trace = trace
        self.colormap = colormap
        self.joint = joint
        self.label = f"{trace.model}"
        self.fields = FieldsOverlay([], name=f"{self.label}: fields")
        self.trail = TrailOverlay([], [], positive=min(1, max(len(trace.classes) - 1, 0)),
                                  name=f"{self.label}: probability trail")
        self.maps: list[HeatmapOverlay] = []
        self._shown = False
        self._chosen: dict[str, int] = {}
        for f in trace.fields:
            self._add_field(f)
        for m in trace.maps:
            self._add_map(m)
        for s in trace.trail:
            self.trail.add(s)

    # -- building ---------------------------------------------------------------------------
    def add_event(self, event: object) -> None:
        """Add a streamed event (the Trace itself is filled by the runner)."""
        if isinstance(event, Field):
            self._add_field(event)
        elif isinstance(event, AttentionMap):
            self._add_map(event)
        elif isinstance(event, TrailStep):
            self.trail.add(event)
            self._ensure(self.trail)
        self.changed.emit()

    def _add_field(self, f: Field) -> None:
        self.trail.add_field(f)
        if f.depth > 0:
            self.fields.add(f)
            self._ensure(self.fields)

    def _add_map(self, m: AttentionMap) -> None:
        ov = HeatmapOverlay(m, colormap=self.colormap, name=f"{self.label}: {m.name}")
        # Maps stacked on the same region would hide each other: show the first, keep the
        # rest one click away in the Layers dock. Maps of separate regions (Zoom-In's
        # per-tile maps) all show.
        ov.visible = not any(o.visible and _iou(o.map.rect, m.rect) > 0.8 for o in self.maps)
        self.maps.append(ov)
        if self.joint:
            self._apply_joint()
        self._ensure(ov)

    def _ensure(self, overlay) -> None:
        if self._shown and overlay not in self.canvas.overlays():
            self.canvas.add_overlay(overlay)

    # -- showing ----------------------------------------------------------------------------
    def overlays(self) -> list:
        out: list = list(self.maps)
        if self.fields.fields:
            out.append(self.fields)
        if self.trail.steps:
            out.append(self.trail)
        return out

    def show(self) -> None:
        self._shown = True
        for ov in self.overlays():
            self._ensure(ov)

    def hide(self) -> None:
        self._shown = False
        for ov in self.overlays():
            if ov in self.canvas.overlays():
                self.canvas.remove_overlay(ov)

    @property
    def shown(self) -> bool:
        return self._shown

    # -- map controls -----------------------------------------------------------------------
    def groups(self) -> dict[str, list[HeatmapOverlay]]:
        out: dict[str, list[HeatmapOverlay]] = {}
        for ov in self.maps:
            out.setdefault(ov.map.group, []).append(ov)
        return out

    def show_only_map(self, overlay: HeatmapOverlay | None) -> None:
        """Show one map and hide the others (e.g. the chosen filter of 64)."""
        for ov in self.maps:
            ov.visible = ov is overlay

    def set_colormap(self, name: str) -> None:
        self.colormap = name
        for ov in self.maps:
            ov.colormap = name

    def set_joint(self, joint: bool) -> None:
        self.joint = joint
        if joint:
            self._apply_joint()
        else:
            for ov in self.maps:
                ov.set_range(None)

    def _apply_joint(self) -> None:
        rng = shared_range(self.maps)
        for ov in self.maps:
            ov.set_range(rng)

    def set_smooth(self, smooth: bool) -> None:
        for ov in self.maps:
            ov.smooth = smooth

    def value_at(self, x: float, y: float) -> tuple[str, float] | None:
        """(map name, value) of the top visible map under a level-0 point."""
        for ov in reversed(self.maps):
            if ov.visible:
                v = ov.value_at(x, y)
                if v is not None:
                    return ov.map.name, v
        return None

    # -- the magnification path -------------------------------------------------------------
    def path(self) -> list[tuple[str, list[tuple[float, float, float, float]], int | None, HeatmapOverlay | None]]:
        """Stops for stepping: (title, rectangles to frame, field depth, map to show).

        With nested fields: the whole view, then each field of depth 1, 2, ... in order.
        Without: one stop per attention map, ordered by magnification."""
        stops: list = []
        root = self.trace.roi or (0.0, 0.0, float(self.trace.slide.width), float(self.trace.slide.height))
        nested = [f for f in self.trace.fields if f.depth > 0]
        if nested:
            stops.append(("whole slide", [root], 0, None))
            for depth in sorted({f.depth for f in nested}):
                for f in sorted((f for f in nested if f.depth == depth), key=lambda f: f.id):
                    stops.append((f"depth {depth}: {f.kind} {f.id}", [f.rect], depth, None))
            return stops
        ordered = sorted(self.maps, key=lambda o: (o.map.magnification or 0.0, self.maps.index(o)))
        for ov in ordered:
            mag = f" ({ov.map.magnification:.3g}x)" if ov.map.magnification else ""
            stops.append((f"{ov.map.name}{mag}", [ov.map.rect], None, ov))
        return stops

    def focus(self, depth: int | None, field_id: int | None = None, overlay: HeatmapOverlay | None = None) -> None:
        """Highlight one depth (others dimmed) or one map."""
        self.fields.set_focus_depth(depth)
        self.fields.set_highlight(field_id)
        if overlay is not None:
            self.show_only_map(overlay)


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
