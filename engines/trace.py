"""What a model shows: the Trace of one run on one slide, and the events that stream it.

Every coordinate is in level-0 slide pixels, so overlays line up at every zoom. No torch, no
Qt: the viewer reads traces, the engines write them.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

Rect = tuple[float, float, float, float]
TRACE_FORMAT = 1


@dataclass
class Field:
    """A region the model looked at or sampled. depth 0 is the whole slide (or the ROI)."""

    id: int
    parent: int | None
    depth: int
    rect: Rect
    score: float = 1.0
    kind: str = "field"
    magnification: float | None = None  # objective power it was read at, when known

    def contains(self, other: "Field", tol: float = 1.0) -> bool:
        x, y, w, h = self.rect
        ox, oy, ow, oh = other.rect
        return ox >= x - tol and oy >= y - tol and ox + ow <= x + w + tol and oy + oh <= y + h + tol


@dataclass
class AttentionMap:
    """A grid of values laid over the slide: cell (r, c) covers
    ``origin + (c * cell_w, r * cell_h)`` with size ``cell``."""

    name: str
    group: str
    magnification: float | None
    origin: tuple[float, float]
    cell: tuple[float, float]
    values: list[list[float]]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.values), (len(self.values[0]) if self.values else 0)

    @property
    def rect(self) -> Rect:
        rows, cols = self.shape
        return (self.origin[0], self.origin[1], cols * self.cell[0], rows * self.cell[1])

    def cell_rect(self, row: int, col: int) -> Rect:
        return (
            self.origin[0] + col * self.cell[0],
            self.origin[1] + row * self.cell[1],
            self.cell[0],
            self.cell[1],
        )


@dataclass
class TrailStep:
    """The prediction after one step of a recurrent model or one sampled patch."""

    index: int
    field_id: int | None
    probs: list[float]


@dataclass
class Progress:
    done: int
    total: int
    stage: str = ""


@dataclass
class SlideRef:
    path: str
    width: int
    height: int
    mpp: float | None = None


Event = Union[Field, AttentionMap, TrailStep, Progress]


@dataclass
class Trace:
    model: str
    preset: str
    checkpoint: str | None
    slide: SlideRef
    classes: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    fields: list[Field] = field(default_factory=list)
    maps: list[AttentionMap] = field(default_factory=list)
    trail: list[TrailStep] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    roi: Rect | None = None  # the level-0 rectangle the model ran on; None: whole slide

    # -- building ------------------------------------------------------------------------
    def add(self, event: Event) -> None:
        if isinstance(event, Field):
            self.fields.append(event)
        elif isinstance(event, AttentionMap):
            self.maps.append(event)
        elif isinstance(event, TrailStep):
            self.trail.append(event)

    def field_by_id(self, fid: int) -> Field | None:
        for f in self.fields:
            if f.id == fid:
                return f
        return None

    @property
    def prediction(self) -> str | None:
        if not self.probs:
            return None
        return self.classes[max(range(len(self.probs)), key=self.probs.__getitem__)]

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = TRACE_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trace":
        try:
            return cls(
                model=str(d["model"]),
                preset=str(d["preset"]),
                checkpoint=d.get("checkpoint"),
                slide=SlideRef(**d["slide"]),
                classes=list(d.get("classes", [])),
                probs=[float(p) for p in d.get("probs", [])],
                fields=[
                    Field(**{**f, "rect": tuple(f["rect"])}) for f in d.get("fields", [])
                ],
                maps=[
                    AttentionMap(
                        name=m["name"],
                        group=m["group"],
                        magnification=m.get("magnification"),
                        origin=tuple(m["origin"]),
                        cell=tuple(m["cell"]),
                        values=[list(map(float, row)) for row in m["values"]],
                    )
                    for m in d.get("maps", [])
                ],
                trail=[TrailStep(**t) for t in d.get("trail", [])],
                timings={str(k): float(v) for k, v in d.get("timings", {}).items()},
                roi=tuple(d["roi"]) if d.get("roi") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"not a MagLens trace ({type(exc).__name__}: {exc})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "Trace":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise TraceError("not a MagLens trace (top level is not an object)")
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}: cannot be read ({exc})") from None
        return cls.from_json(text)

    # -- GeoJSON (QuPath imports a FeatureCollection of polygons) -------------------------
    def to_geojson(self) -> dict[str, Any]:
        features: list[dict[str, Any]] = []
        for f in self.fields:
            features.append(
                _rect_feature(
                    f.rect,
                    name=f"{f.kind} {f.id} (depth {f.depth})",
                    classification=f"{self.model}: {f.kind}",
                    props={"id": f.id, "parent": f.parent, "depth": f.depth, "score": f.score,
                           "kind": f.kind},
                )
            )
        for m in self.maps:
            for r, row in enumerate(m.values):
                for c, v in enumerate(row):
                    features.append(
                        _rect_feature(
                            m.cell_rect(r, c),
                            name=f"{m.name} [{r},{c}]",
                            classification=f"{self.model}: {m.name}",
                            props={"map": m.name, "group": m.group, "row": r, "col": c,
                                   "value": v},
                            object_type="tile",
                        )
                    )
        return {"type": "FeatureCollection", "features": features}

    def save_geojson(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), json.dumps(self.to_geojson()))


class TraceError(Exception):
    """A trace file could not be read; the message is meant for the user."""


def _rect_feature(rect: Rect, *, name: str, classification: str, props: dict[str, Any],
                  object_type: str = "annotation") -> dict[str, Any]:
    x, y, w, h = rect
    ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    properties = {"objectType": object_type, "name": name,
                  "classification": {"name": classification}, **props}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": properties}


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so a crash never
    leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8") if isinstance(text, str) else text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open()
        # would, so exports and checkpoints stay readable to whoever could read them before.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
