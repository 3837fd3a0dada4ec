"""The rules a trace obeys, checked when a file is read, when a model adds an event and before
a trace is saved, so whatever is saved opens again and nothing read can hurt the viewer.

A trace read from a file may be anything. Every value is checked for its type, every number
for being finite (and in range), maps for being rectangular with positive cells, rectangles
for holding four numbers, probabilities for matching the classes, trail steps and parents for
pointing at fields that exist, and every list against a cap. The caps are generous for real
traces (a MagNet paper trace has ~75,000 cells; grid attention at most 250,000 tiles x 64
filters) and keep a hostile file from taking the memory of the machine.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

from engines.trace import (
    TRACE_FORMAT,
    AttentionMap,
    Field,
    SlideRef,
    Trace,
    TraceError,
    TrailStep,
)

MAX_TRACE_BYTES = 512 << 20
MAX_FIELDS = 1_000_000
MAX_MAPS = 20_000
MAX_CELLS = 1 << 24  # over all maps of a trace
MAX_TRAIL = 1_000_000
MAX_CLASSES = 10_000
MAX_TIMINGS = 1_000
MAX_TEXT = 4096  # characters of a name or path
MAX_COORD = 1e9  # level-0 pixels; the largest slides are ~2e5 pixels wide

_MISSING = object()
Get = Callable[[str], Any]


def _getter(obj: Any) -> Get:
    if isinstance(obj, Mapping):
        return lambda k: obj.get(k, _MISSING)
    return lambda k: getattr(obj, k, _MISSING)


def _fail(where: str, problem: str) -> TraceError:
    return TraceError(f"{where} {problem}")


# -- values -------------------------------------------------------------------------------
def _req(get: Get, key: str, where: str) -> Any:
    v = get(key)
    if v is _MISSING:
        raise _fail(where, f"has no {key!r}")
    return v


def _opt(get: Get, key: str, default: Any = None) -> Any:
    v = get(key)
    return default if v is _MISSING else v


def _text(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise _fail(where, f"must be text, not {_kind(v)}")
    if len(v) > MAX_TEXT:
        raise _fail(where, f"is {len(v)} characters long (at most {MAX_TEXT})")
    return v


def _int(v: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53:
            v = int(v)
        else:
            raise _fail(where, f"must be a whole number, not {_kind(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _fail(where, f"is {_show(v)}, outside {lo}..{hi}")
    return int(v)


def _num(v: Any, where: str, lo: float = -MAX_COORD, hi: float = MAX_COORD,
         positive: bool = False) -> float:
    if isinstance(v, bool) or not _is_real(v):
        raise _fail(where, f"must be a number, not {_kind(v)}")
    try:
        f = float(v)
    except (OverflowError, ValueError, TypeError):
        raise _fail(where, "is not a usable number") from None
    if not math.isfinite(f):
        raise _fail(where, f"is {f} (numbers must be finite)")
    if positive and not f > 0:
        raise _fail(where, f"is {f:g}, not a positive number")
    if not lo <= f <= hi:
        raise _fail(where, f"is {f:g}, outside {lo:g}..{hi:g}")
    return f


def _is_real(v: Any) -> bool:
    # Python numbers, and numpy / torch scalars a model may hand over.
    if isinstance(v, (int, float)):
        return True
    return hasattr(v, "__float__") and not isinstance(v, (str, bytes)) and getattr(v, "ndim", 0) == 0


def _opt_mag(v: Any, where: str) -> float | None:
    return None if v is None else _num(v, where, 0.0, 1e6, positive=True)


def _seq(v: Any, where: str, cap: int) -> list | tuple:
    if not isinstance(v, (list, tuple)):
        raise _fail(where, f"must be a list, not {_kind(v)}")
    if len(v) > cap:
        raise _fail(where, f"has {len(v)} entries (at most {cap})")
    return v


def _numbers(v: Any, where: str, n: int, positive_tail: int = 0) -> tuple[float, ...]:
    """Exactly ``n`` finite numbers; the last ``positive_tail`` of them (sizes) positive."""
    seq = _seq(v, where, n)
    if len(seq) != n:
        raise _fail(where, f"must hold {n} numbers, not {len(seq)}")
    out = []
    for i, x in enumerate(seq):
        size = i >= n - positive_tail
        out.append(_num(x, f"{where}[{i}]", 0.0 if size else -MAX_COORD, MAX_COORD, positive=size))
    return tuple(out)


def _rect(v: Any, where: str) -> tuple[float, float, float, float]:
    x, y, w, h = _numbers(v, where, 4)
    if w < 0 or h < 0:
        raise _fail(where, f"has a negative size {w:g} x {h:g}")
    return (x, y, w, h)


def _probs(v: Any, where: str, n_classes: int) -> list[float]:
    seq = _seq(v, where, MAX_CLASSES)
    if len(seq) != n_classes:
        raise _fail(where, f"holds {len(seq)} probabilities for {n_classes} classes")
    return [_num(p, f"{where}[{i}]", -1e6, 1e6) for i, p in enumerate(seq)]


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return _show(v)
    return {str: "text", list: "a list", tuple: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    text = str(v) if not isinstance(v, int) or abs(v) < 10**15 else "a huge number"
    return text[:40]


# -- parts ----------------------------------------------------------------------------------
def check_field(obj: Any, where: str = "field") -> Field:
    get = _getter(obj)
    parent = _opt(get, "parent")
    return Field(
        id=_int(_req(get, "id", where), f"{where}.id", -2**53, 2**53),
        parent=None if parent is None else _int(parent, f"{where}.parent", -2**53, 2**53),
        depth=_int(_req(get, "depth", where), f"{where}.depth", 0, 10_000),
        rect=_rect(_req(get, "rect", where), f"{where}.rect"),
        score=_num(_opt(get, "score", 1.0), f"{where}.score", -1e12, 1e12),
        kind=_text(_opt(get, "kind", "field"), f"{where}.kind"),
        magnification=_opt_mag(_opt(get, "magnification"), f"{where}.magnification"),
    )


def check_map(obj: Any, where: str = "map", cells_left: int = MAX_CELLS) -> AttentionMap:
    get = _getter(obj)
    values = _seq(_req(get, "values", where), f"{where}.values", cells_left)
    rows: list[list[float]] = []
    cols = None
    left = cells_left
    for r, row in enumerate(values):
        row = _seq(row, f"{where}.values[{r}]", max(left, 0))
        if cols is None:
            cols = len(row)
        elif len(row) != cols:
            raise _fail(f"{where}.values", f"is not rectangular: row {r} has {len(row)} values, row 0 has {cols}")
        left -= len(row)
        rows.append(_row(row, f"{where}.values[{r}]"))
    origin = _numbers(_req(get, "origin", where), f"{where}.origin", 2)
    cell = _numbers(_req(get, "cell", where), f"{where}.cell", 2, positive_tail=2)
    n_rows, n_cols = len(rows), cols or 0
    for axis, start, size, n in (("x", origin[0], cell[0], n_cols), ("y", origin[1], cell[1], n_rows)):
        if abs(start + size * n) > MAX_COORD:
            raise _fail(where, f"reaches {axis} = {start + size * n:g}, beyond any slide")
    return AttentionMap(
        name=_text(_req(get, "name", where), f"{where}.name"),
        group=_text(_req(get, "group", where), f"{where}.group"),
        magnification=_opt_mag(_opt(get, "magnification"), f"{where}.magnification"),
        origin=(origin[0], origin[1]),
        cell=(cell[0], cell[1]),
        values=rows,
    )


def check_step(obj: Any, where: str = "trail step", n_classes: int | None = None) -> TrailStep:
    get = _getter(obj)
    fid = _opt(get, "field_id")
    probs = _req(get, "probs", where)
    if n_classes is None:
        n_classes = len(_seq(probs, f"{where}.probs", MAX_CLASSES))
    return TrailStep(
        index=_int(_req(get, "index", where), f"{where}.index", 0, 2**53),
        field_id=None if fid is None else _int(fid, f"{where}.field_id", -2**53, 2**53),
        probs=_probs(probs, f"{where}.probs", n_classes),
    )


_PLAIN = {float, int}
MAX_VALUE = 1e30  # attention values have any sign and scale, but are finite


def _row(row: list | tuple, where: str) -> list[float]:
    # Fast path, at C speed, for the usual row of plain finite floats; anything else goes
    # value by value so the message names the value that breaks the rule.
    if row and set(map(type, row)) <= _PLAIN:
        try:
            if -MAX_VALUE <= min(row) and max(row) <= MAX_VALUE and math.isfinite(math.fsum(row)):
                return list(map(float, row))
        except (OverflowError, ValueError):
            pass
    return [_num(x, f"{where}[{c}]", -MAX_VALUE, MAX_VALUE) for c, x in enumerate(row)]


def check_slide(obj: Any, where: str = "slide") -> SlideRef:
    get = _getter(obj)
    mpp = _opt(get, "mpp")
    return SlideRef(
        path=_text(_req(get, "path", where), f"{where}.path"),
        width=_int(_req(get, "width", where), f"{where}.width", 1, int(MAX_COORD)),
        height=_int(_req(get, "height", where), f"{where}.height", 1, int(MAX_COORD)),
        mpp=None if mpp is None else _num(mpp, f"{where}.mpp", 0.0, 1e6, positive=True),
    )


# -- a whole trace --------------------------------------------------------------------------
def parse_trace(d: Any) -> Trace:
    """A checked ``Trace`` from JSON data (or from a Trace); ``TraceError`` naming the first
    value that breaks a rule. Keys a reader does not know are ignored."""
    if isinstance(d, Mapping):
        fmt = d.get("format", TRACE_FORMAT)
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
            raise TraceError(f"format {_kind(fmt)} is not a trace format")
        if fmt > TRACE_FORMAT:
            raise TraceError(f"trace format {fmt} was written by a newer MagLens (this one reads "
                             f"{TRACE_FORMAT})")
    elif not isinstance(d, Trace):
        raise TraceError(f"top level is {_kind(d)}, not an object")
    get = _getter(d)
    classes = [_text(c, f"classes[{i}]") for i, c in enumerate(_seq(_opt(get, "classes", []), "classes", MAX_CLASSES))]
    probs_raw = _opt(get, "probs", [])
    probs = [] if isinstance(probs_raw, (list, tuple)) and not probs_raw else _probs(probs_raw, "probs", len(classes))
    checkpoint = _opt(get, "checkpoint")
    fields = [check_field(f, f"fields[{i}]") for i, f in enumerate(_seq(_opt(get, "fields", []), "fields", MAX_FIELDS))]
    maps, left = [], MAX_CELLS
    for i, m in enumerate(_seq(_opt(get, "maps", []), "maps", MAX_MAPS)):
        maps.append(check_map(m, f"maps[{i}]", left))
        left -= sum(len(r) for r in maps[-1].values) + 1
    trail = [check_step(t, f"trail[{i}]", len(classes))
             for i, t in enumerate(_seq(_opt(get, "trail", []), "trail", MAX_TRAIL))]
    timings_raw = _opt(get, "timings", {})
    if not isinstance(timings_raw, Mapping) or len(timings_raw) > MAX_TIMINGS:
        raise TraceError(f"timings must be an object of at most {MAX_TIMINGS} numbers")
    roi = _opt(get, "roi")
    trace = Trace(
        model=_text(_req(get, "model", "trace"), "model"),
        preset=_text(_req(get, "preset", "trace"), "preset"),
        checkpoint=None if checkpoint is None else _text(checkpoint, "checkpoint"),
        slide=check_slide(_req(get, "slide", "trace")),
        classes=classes,
        probs=probs,
        fields=fields,
        maps=maps,
        trail=trail,
        timings={_text(k, "timings key"): _num(v, f"timings[{k!r}]", -1e12, 1e12)
                 for k, v in timings_raw.items()},
        roi=None if roi is None else _rect(roi, "roi"),
    )
    _check_links(trace)
    return trace


def _check_links(trace: Trace) -> None:
    ids = {f.id for f in trace.fields}
    if len(ids) != len(trace.fields):
        raise TraceError("fields: two fields share one id")
    for i, f in enumerate(trace.fields):
        if f.parent is not None and f.parent not in ids:
            raise TraceError(f"fields[{i}].parent {f.parent} is not the id of a field")
    for i, t in enumerate(trace.trail):
        if t.field_id is not None and t.field_id not in ids:
            raise TraceError(f"trail[{i}].field_id {t.field_id} is not the id of a field")
