"""What a model shows: the Trace of one run on one slide, and the events that stream it.

Every coordinate is in level-0 slide pixels, so overlays line up at every zoom. No torch, no
Qt: the viewer reads traces, the engines write them.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

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
        """Keep ``event``, checked by the rules a saved trace obeys (``engines.trace_check``).

        A non-finite number (NaN, infinity), a ragged map or a malformed rectangle from a model
        is a ``TraceError`` here, when the model makes it, rather than a trace that looks fine
        and then cannot be saved or reopened. It is refused, not repaired: a NaN score or
        probability means the model's weights or input are broken, and a silently patched
        value would show the user an answer the model never gave."""
        from engines import trace_check as tc

        try:
            if isinstance(event, Field):
                tc.check_field(event, f"field {getattr(event, 'id', '?')}")
                self.fields.append(event)
            elif isinstance(event, AttentionMap):
                tc.check_map(event, f"attention map {getattr(event, 'name', '?')!r}")
                self.maps.append(event)
            elif isinstance(event, TrailStep):
                tc.check_step(event, f"trail step {getattr(event, 'index', '?')}",
                              len(self.classes) if self.classes else None)
                self.trail.append(event)
        except TraceError as exc:
            raise TraceError(f"{self.model} made an unusable result: {exc}; its weights or "
                             "input may be broken") from None

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
    def from_dict(cls, d: Any) -> "Trace":
        """A Trace from JSON data, every value checked (``engines.trace_check``): anything
        that breaks a rule, of any kind, is a ``TraceError`` naming the value."""
        from engines.trace_check import parse_trace

        try:
            return parse_trace(d)
        except TraceError as exc:
            raise TraceError(f"not a usable MagLens trace: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
                RecursionError) as exc:
            raise TraceError(f"not a MagLens trace ({type(exc).__name__}: {_first_line(exc)})") from None

    def to_json(self) -> str:
        """The checked trace as JSON; ``TraceError`` for what a reader would refuse, so a
        saved trace always opens again."""
        from engines.trace_check import parse_trace

        try:
            checked = parse_trace(self)
        except TraceError as exc:
            raise TraceError(f"this trace cannot be saved: {exc}") from None
        return json.dumps(checked.to_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Trace":
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise TraceError(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except RecursionError:
            raise TraceError("not a MagLens trace (nested too deeply)") from None
        except (ValueError, MemoryError, UnicodeDecodeError, TypeError) as exc:
            # NaN/Infinity (refused by _no_constant), ints of too many digits
            detail = "a number with too many digits" if "digits" in str(exc) else _first_line(exc)
            raise TraceError(f"not a MagLens trace ({detail})") from None
        if not isinstance(data, dict):
            raise TraceError("not a MagLens trace (top level is not an object)")
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        """Read a trace file; every failure, of any kind, is one ``TraceError`` naming it."""
        from engines.trace_check import MAX_TRACE_BYTES

        name = Path(path).name or str(path)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise TraceError("not a regular file")
            if st.st_size > MAX_TRACE_BYTES:
                raise TraceError(f"{st.st_size / (1 << 20):.0f} MB is larger than a trace may be "
                                 f"({MAX_TRACE_BYTES >> 20} MB)")
            with open(path, "rb") as fh:
                raw = fh.read(MAX_TRACE_BYTES + 1)
            if len(raw) > MAX_TRACE_BYTES:
                raise TraceError(f"larger than a trace may be ({MAX_TRACE_BYTES >> 20} MB)")
            return cls.from_json(raw.decode("utf-8"))
        except TraceError as exc:
            raise TraceError(f"{name}: {exc}") from None
        except UnicodeDecodeError:
            raise TraceError(f"{name}: not a MagLens trace (not UTF-8 text)") from None
        except OSError as exc:
            raise TraceError(f"{name}: cannot be read ({exc.strerror or exc})") from None
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError,
                RecursionError, MemoryError) as exc:
            raise TraceError(f"{name}: not a MagLens trace ({type(exc).__name__}: "
                             f"{_first_line(exc)})") from None

    # -- GeoJSON (QuPath imports a FeatureCollection of polygons) -------------------------
    # Fields are written as annotations, attention cells as tiles carrying a ``value``. Only
    # the cells that carry attention are written: a cell whose magnitude is at most
    # ATTENTION_FLOOR times the largest magnitude of its map (zero, or float noise beside the
    # map's peak) says nothing and is left out, so a sparse 75,000-cell MagNet map becomes a
    # few thousand features instead of 40 MB of zeros. A map without any non-zero value
    # writes no cell.
    def to_geojson(self) -> dict[str, Any]:
        return {"type": "FeatureCollection",
                "features": [f for _, f in self._geojson_features() if f is not None]}

    def geojson_units(self) -> int:
        """What ``save_geojson``'s progress counts to: fields plus all cells examined."""
        return len(self.fields) + sum(r * c for r, c in (m.shape for m in self.maps))

    def save_geojson(self, path: str | os.PathLike,
                     progress: Callable[[int, int], None] | None = None,
                     cancel: threading.Event | None = None) -> int:
        """Write the GeoJSON to ``path``, one feature at a time, through a temporary file
        renamed over ``path`` at the end; returns the number of features written.

        ``progress(done, total)`` is called now and then from the calling thread (total is
        ``geojson_units()``); when ``cancel`` is set the export stops with ``ExportCancelled``
        and ``path`` is left as it was."""
        total = self.geojson_units()
        step = max(2000, total // 200)
        done = written = 0
        next_check = 0
        if progress is not None:
            progress(0, total)
        with atomic_writer(Path(path)) as fh:
            fh.write(b'{"type": "FeatureCollection", "features": [')
            for units, feature in self._geojson_features():
                done += units
                if feature is not None:
                    try:
                        text = json.dumps(feature, allow_nan=False)
                    except ValueError:  # only a trace filled in by hand, bypassing add()
                        raise TraceError(f"cannot export {feature['properties']['name']!r}: it holds "
                                         "NaN or infinity, which GeoJSON cannot store") from None
                    fh.write((b"\n" if not written else b",\n") + text.encode("utf-8"))
                    written += 1
                if done >= next_check:
                    next_check = done + step
                    if cancel is not None and cancel.is_set():
                        raise ExportCancelled("GeoJSON export cancelled")
                    if progress is not None:
                        progress(done, total)
            if cancel is not None and cancel.is_set():
                raise ExportCancelled("GeoJSON export cancelled")
            fh.write(b"\n]}\n")
        if progress is not None:
            progress(total, total)
        return written

    def _geojson_features(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(units of work, feature or None for a cell left out), in file order."""
        for f in self.fields:
            yield 1, _rect_feature(
                f.rect,
                name=f"{f.kind} {f.id} (depth {f.depth})",
                classification=f"{self.model}: {f.kind}",
                props={"id": f.id, "parent": f.parent, "depth": f.depth, "score": f.score,
                       "kind": f.kind},
            )
        for m in self.maps:
            peak = max((abs(v) for row in m.values for v in row), default=0.0)
            floor = ATTENTION_FLOOR * peak
            for r, row in enumerate(m.values):
                for c, v in enumerate(row):
                    if not abs(v) > floor:
                        yield 1, None
                        continue
                    yield 1, _rect_feature(
                        m.cell_rect(r, c),
                        name=f"{m.name} [{r},{c}]",
                        classification=f"{self.model}: {m.name}",
                        props={"map": m.name, "group": m.group, "row": r, "col": c, "value": v},
                        object_type="tile",
                    )


ATTENTION_FLOOR = 1e-6  # relative to a map's largest magnitude; see the GeoJSON notes above


class ExportCancelled(Exception):
    """An export was cancelled through its ``cancel`` event; nothing was written."""


class TraceError(Exception):
    """A trace file could not be read; the message is meant for the user."""


def _no_constant(name: str) -> float:
    raise ValueError(f"holds {name}, which is not a number JSON allows")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


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


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to stream into; on leaving the block it is synced and renamed over
    ``path``, and on any exception removed, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
            yield fh
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


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so a crash never
    leaves half a file."""
    with atomic_writer(path) as fh:
        fh.write(text.encode("utf-8") if isinstance(text, str) else text)
