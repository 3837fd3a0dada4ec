"""All the layers of one Trace on one canvas: fields, attention maps and the probability trail.

Built incrementally from streamed events (so a running model fills the canvas as it works) or
at once from a finished trace. Knows nothing of which model made the trace beyond its groups.
"""
from __future__ import annotations

from typing import NamedTuple

from PySide6.QtCore import QObject, Signal

from engines.trace import AttentionMap, Field, Rect, Trace, TrailStep
from viewer.overlays import colormaps
from viewer.overlays.fields import FieldsOverlay
from viewer.overlays.heatmap import HeatmapOverlay, shared_range
from viewer.overlays.trail import TrailOverlay

STACK_IOU = 0.8  # maps overlapping this much cover the same region and would hide each other
DEFAULT_MAP_OPACITY = 0.6


class Stop(NamedTuple):
    """One stop of the magnification path."""

    title: str
    rects: list[Rect]  # what the camera frames
    depth: int | None  # the field depth highlighted (0: the whole view), None for a map stop
    overlay: HeatmapOverlay | None  # the map a map stop shows
    field_id: int | None = None  # the field a field stop highlights
    maps: tuple[HeatmapOverlay, ...] = ()  # the attention shown at this stop


class TraceLayers(QObject):
    """Overlays for one trace. ``canvas`` needs ``add_overlay``/``remove_overlay``."""

    changed = Signal()

    def __init__(self, canvas, trace: Trace, colormap: str = colormaps.DEFAULT,
                 joint: bool = False, smooth: bool = False,
                 map_opacity: float = DEFAULT_MAP_OPACITY, label: str | None = None) -> None:
        super().__init__()
        self.canvas = canvas
        self.trace = trace
        self.colormap = colormap
        self.joint = joint
        self.smooth = smooth
        self.map_opacity = map_opacity
        # Names the layers in the Layers dock; a trace of part of a slide says which part.
        self.label = label or f"{trace.model}"
        self.fields = FieldsOverlay([], name=f"{self.label}: fields")
        positive = min(1, max(len(trace.classes) - 1, 0))
        self.trail = TrailOverlay([], [], positive=positive, name=f"{self.label}: probability trail",
                                  positive_label=trace.classes[positive] if trace.classes else "positive")
        self.maps: list[HeatmapOverlay] = []
        # Per map name: {"scaling": ..., "threshold": ...}; streamed maps take theirs on arrival.
        self.map_display: dict[str, dict] = {}
        self._shown = False
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

    def finish(self, trace: Trace) -> None:
        """Adopt the finished trace (it knows the class names, timings and probabilities)."""
        self.trace = trace
        if trace.classes:
            self.trail.positive = min(1, len(trace.classes) - 1)
            self.trail.positive_label = trace.classes[self.trail.positive]
            self.trail.changed.emit()  # its legend names the class now
        self.changed.emit()

    def _add_field(self, f: Field) -> None:
        self.trail.add_field(f)
        if f.depth > 0:
            self.fields.add(f)
            self._ensure(self.fields)

    def _add_map(self, m: AttentionMap) -> None:
        ov = HeatmapOverlay(m, colormap=self.colormap, opacity=self.map_opacity,
                            name=f"{self.label}: {m.name}")
        ov.smooth = self.smooth
        self._display_one(ov)
        ov.visible = self._default_visible(ov)
        self.maps.append(ov)
        if self.joint:
            self._apply_joint()
        self._ensure(ov)

    def _default_visible(self, ov: HeatmapOverlay) -> bool:
        # A model's first group is its overview (MagNet's layer 1, Zoom-In's stage 1, the
        # coarsest magnification, filter 0); later groups show when the path reaches them or
        # from the Layers dock. Of maps stacked on one region only the first shows: the
        # others would hide it, and the map chooser switches between them.
        if self.maps and ov.map.group != self.maps[0].map.group:
            return False
        return not any(o.visible and _iou(o.map.rect, ov.map.rect) > STACK_IOU for o in self.maps)

    def reset_maps(self) -> None:
        """Back to the default choice of visible maps."""
        for ov in self.maps:
            ov.visible = False
        shown: list[HeatmapOverlay] = []
        for ov in self.maps:
            if ov.map.group == self.maps[0].map.group and not any(
                    _iou(o.map.rect, ov.map.rect) > STACK_IOU for o in shown):
                shown.append(ov)
        for ov in shown:
            ov.visible = True

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

    @property
    def empty(self) -> bool:
        """Whether nothing has been drawn yet (no field inside the view, map or step)."""
        return not (self.fields.fields or self.maps or self.trail.steps)

    # -- map controls -----------------------------------------------------------------------
    def groups(self) -> dict[str, list[HeatmapOverlay]]:
        out: dict[str, list[HeatmapOverlay]] = {}
        for ov in self.maps:
            out.setdefault(ov.map.group, []).append(ov)
        return out

    def stack_of(self, overlay: HeatmapOverlay) -> list[HeatmapOverlay]:
        """The maps lying on (nearly) the same region as ``overlay``, itself included."""
        return [o for o in self.maps if o is overlay or _iou(o.map.rect, overlay.map.rect) > STACK_IOU]

    def choose_map(self, overlay: HeatmapOverlay) -> None:
        """Show ``overlay`` in place of the maps stacked on its region (e.g. one filter of
        64); maps elsewhere keep their state."""
        for o in self.stack_of(overlay):
            o.visible = o is overlay

    def show_only_map(self, overlay: HeatmapOverlay | None) -> None:
        """Show one map and hide all others."""
        self.show_only_maps([overlay] if overlay is not None else [])

    def show_only_maps(self, chosen) -> None:
        keep = {id(o) for o in chosen}
        for ov in self.maps:
            ov.visible = id(ov) in keep

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
        self.smooth = smooth
        for ov in self.maps:
            ov.smooth = smooth

    def set_map_display(self, display: dict[str, dict]) -> None:
        """Scaling and threshold per map name (names absent go back to linear, no threshold)."""
        self.map_display = {str(k): dict(v) for k, v in display.items()}
        for ov in self.maps:
            self._display_one(ov)

    def _display_one(self, ov: HeatmapOverlay) -> None:
        d = self.map_display.get(ov.map.name) or {}
        try:
            ov.set_display(str(d.get("scaling", "linear")), float(d.get("threshold", 0.0)))
        except (TypeError, ValueError):  # a hand-edited setting: fall back to the plain map
            ov.set_display("linear", 0.0)

    def set_map_opacity(self, opacity: float) -> None:
        self.map_opacity = min(max(float(opacity), 0.0), 1.0)
        for ov in self.maps:
            ov.opacity = self.map_opacity

    def apply_settings(self, colormap: str, joint: bool, smooth: bool, opacity: float) -> None:
        """Take the display settings of the Models dock (when this trace becomes current)."""
        if colormap != self.colormap:
            self.set_colormap(colormap)
        if joint != self.joint:
            self.set_joint(joint)
        self.set_smooth(smooth)
        self.set_map_opacity(opacity)

    def value_at(self, x: float, y: float) -> tuple[str, float] | None:
        """(map name, value) of the top visible map under a level-0 point."""
        for ov in reversed(self.maps):
            if ov.visible:
                v = ov.value_at(x, y)
                if v is not None:
                    return ov.map.name, v
        return None

    # -- the magnification path -------------------------------------------------------------
    @property
    def nested(self) -> bool:
        """Whether some field lies inside another field the model zoomed into (MagNet's boxes,
        Zoom-In's sub-tiles), rather than all being samples of the whole view."""
        by_id = {f.id: f for f in self.trace.fields}
        return any(f.depth > 0 and f.parent in by_id and by_id[f.parent].depth > 0
                   for f in self.trace.fields)

    def path(self) -> list[Stop]:
        """Stops for stepping.

        With nested fields: the whole view, then each field of depth 1, 2, ... in order, each
        with the attention that chose it. Without: one stop per attention map, ordered by
        magnification, with the fields read at that magnification highlighted."""
        root = self.trace.roi or (0.0, 0.0, float(self.trace.slide.width), float(self.trace.slide.height))
        fields = [f for f in self.trace.fields if f.depth > 0]
        if self.nested:
            stops = [Stop("whole slide" if self.trace.roi is None else "region", [root], 0, None)]
            for depth in sorted({f.depth for f in fields}):
                for f in sorted((f for f in fields if f.depth == depth), key=lambda f: f.id):
                    maps = tuple(self._attention_of(f))
                    stops.append(Stop(f"depth {depth}: {f.kind} {f.id}", [f.rect], depth,
                                      None, f.id, maps))
            return stops
        stops = []
        ordered = sorted(self.maps, key=lambda o: (o.map.magnification or 0.0, self.maps.index(o)))
        for ov in ordered:
            mag = ov.map.magnification
            label = f" ({mag:.3g}x)" if mag and f"{mag:.3g}x" not in ov.map.name else ""
            depths = {f.depth for f in fields if mag and f.magnification
                      and abs(f.magnification - mag) <= 0.01 * mag}
            depth = depths.pop() if len(depths) == 1 else None
            stops.append(Stop(f"{ov.map.name}{label}", [ov.map.rect], depth, ov, None, (ov,)))
        if not stops and fields:  # fields but no maps: walk them
            stops.append(Stop("whole slide", [root], 0, None))
            for f in sorted(fields, key=lambda f: (f.depth, f.id)):
                stops.append(Stop(f"depth {f.depth}: {f.kind} {f.id}", [f.rect], f.depth, None, f.id))
        return stops

    def _attention_of(self, f: Field) -> list[HeatmapOverlay]:
        """The map(s) laid over ``f``'s parent that chose ``f``: the n-th group of maps
        belongs to the n-th depth when a trace has as many groups as depths."""
        parent = self.trace.field_by_id(f.parent) if f.parent is not None else None
        if parent is None or not self.maps:
            return []
        groups = list(self.groups())
        depths = sorted({g.depth for g in self.trace.fields if g.depth > 0})
        over = [o for o in self.maps if _iou(o.map.rect, parent.rect) > STACK_IOU]
        if len(groups) == len(depths) and f.depth in depths:
            group = groups[depths.index(f.depth)]
            over = [o for o in over if o.map.group == group]
        return over[:1]

    def focus(self, stop: Stop | None) -> None:
        """Highlight one stop: its depth bold and the rest dimmed, its field marked, its
        attention shown; None (or the whole-view stop) goes back to the plain view."""
        if stop is None or (stop.depth == 0 and stop.overlay is None):
            self.fields.set_focus_depth(None)
            self.fields.set_highlight(None)
            self.reset_maps()
            return
        self.fields.set_focus_depth(stop.depth)
        self.fields.set_highlight(stop.field_id)
        if stop.maps:
            self.show_only_maps(stop.maps)
        else:
            self.reset_maps()


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
