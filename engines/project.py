"""Projects: a list of slides (from a folder, a manifest or a project file) with their labels,
splits, annotation files and the results of model runs over them, saved as one JSON file.

A project file (``*.maglens.json``) stores every path relative to its own folder, so a folder
moved or copied elsewhere with its project file still opens; a path that cannot be made
relative (another drive) is stored absolute. Slides missing on disk still load
(``ProjectSlide.exists`` says so). Each run keeps its slides' results (the cohort records as
dicts), so a project reopens with its predictions and scores without reading a record file.

Opening a folder or a manifest whose default project file (``default_project_file``) exists
opens that file instead: the project file wins, and slides added to the folder or manifest
since are not merged in (open the folder after moving the project file away to start anew).

Opening reads no slide and stats no slide file: 2,000 slides open in a few tens of ms.
Everything read from a project file is checked (types, sizes, keys usable as file names); any
problem is one ``ProjectError`` whose message names the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engines.cohort import (CohortError, Cohort, CohortSlide, SlideResult, read_cohort,
                            trace_path as cohort_trace_path)
from engines.trace import write_atomic

PROJECT_SUFFIX = ".maglens.json"
DEFAULT_PROJECT_NAME = "project" + PROJECT_SUFFIX
PROJECT_FORMAT = 1
PROJECT_KIND = "maglens-project"
MAX_PROJECT_BYTES = 256 * 1024 * 1024
MAX_SLIDES = 1_000_000
MAX_RUNS = 1_000
MAX_TRACES = 1000  # single-run traces kept per slide
MAX_TEXT = 4_096  # a name, label, path or key
SPLITS = ("", "train", "val", "test")
SCALINGS = ("linear", "rank", "log")
ANNOTATION_EXTENSIONS = (".geojson", ".json", ".xml")  # as engines.annotations.EXTENSIONS


class ProjectError(ValueError):
    """A project cannot be opened or saved; the message is one line for the user."""


@dataclass(frozen=True)
class SavedTrace:
    """A trace of one slide kept with the project (a run on that slide alone): listed under
    ``model`` and ``name`` ("whole slide", "region ..."), read from ``path``."""
    model: str
    name: str
    path: Path


@dataclass
class ProjectSlide:
    key: str  # unique, stable id in the project; also the file stem of its run outputs
    path: Path  # absolute at run time; relative to the project file on disk
    name: str  # as listed (manifest text or file name)
    label: str = ""  # "" = unknown
    split: str = ""  # "train" | "val" | "test" | ""
    annotations: Path | None = None  # this slide's annotation file (absolute at run time)
    traces: list[SavedTrace] = field(default_factory=list)  # single runs kept with the project

    def keep_trace(self, saved: SavedTrace) -> None:
        """Remember ``saved``, replacing one listed under the same model and name."""
        self.traces = [t for t in self.traces if (t.model, t.name) != (saved.model, saved.name)] + [saved]

    @property
    def exists(self) -> bool:
        """Whether the slide file is there now (one stat; not cached, files come and go)."""
        return self.path.is_file()


@dataclass
class ProjectRun:
    """One model run over the project (a cohort run)."""
    name: str  # unique in the project
    model: str
    preset: str
    checkpoint: Path | None
    out: Path  # the cohort output folder (traces/, predictions.csv, summary.json)
    classes: list[str]
    results: dict[str, SlideResult] = field(default_factory=dict)  # slide key -> result

    def trace_path(self, key: str) -> Path | None:
        """``out/traces/<key>.trace.json`` when the slide ran without error, else None."""
        res = self.results.get(key)
        if res is None or res.error:
            return None
        return cohort_trace_path(self.out, key)


@dataclass
class Project:
    source: Path  # the folder, manifest or project file it was opened from
    slides: list[ProjectSlide]
    runs: list[ProjectRun] = field(default_factory=list)
    map_display: dict[str, dict] = field(default_factory=dict)  # map name -> scaling, threshold
    path: Path | None = None  # the project file; None until saved
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)
    _by_path: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)
    _by_real: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    # -- slides -----------------------------------------------------------------------------
    def slide(self, key: str) -> ProjectSlide:
        """The slide with ``key``; KeyError when the project has none."""
        i = self._index.get(key) if self._index is not None else None
        if i is None or i >= len(self.slides) or self.slides[i].key != key:
            self._index = {s.key: i for i, s in enumerate(self.slides)}  # new, or the list changed
            i = self._index.get(key)
            if i is None:
                raise KeyError(key)
        return self.slides[i]

    def key_of(self, path: str | os.PathLike) -> str | None:
        """The key of the slide at ``path`` (any spelling of it: relative, links), or None."""
        if self._by_path is None or self._by_path.get("\0n") != str(len(self.slides)):
            self._by_path = {_norm(s.path): s.key for s in self.slides}
            self._by_path["\0n"] = str(len(self.slides))  # no path holds a NUL
            self._by_real = None
        key = self._by_path.get(_norm(path))
        if key is not None:
            return key
        # Another spelling of the same file: compare real paths, built once, on first miss.
        if self._by_real is None:
            self._by_real = {_real(s.path): s.key for s in self.slides}
        return self._by_real.get(_real(path))

    def labels(self) -> list[str]:
        return sorted({s.label for s in self.slides if s.label})

    # -- runs -------------------------------------------------------------------------------
    def run(self, name: str) -> ProjectRun | None:
        return next((r for r in self.runs if r.name == name), None)

    def add_run(self, run: ProjectRun) -> None:
        """Add ``run``; one of the same name is replaced in place."""
        for i, r in enumerate(self.runs):
            if r.name == run.name:
                self.runs[i] = run
                return
        self.runs.append(run)

    def as_cohort(self) -> Cohort:
        """The slides as an ``engines.cohort.Cohort`` for the cohort runners (a slide's own
        annotation file travels with it, so runs score attention against it)."""
        slides = [CohortSlide(s.path, s.name, s.label, s.split, s.key, s.annotations)
                  for s in self.slides]
        return Cohort(self.path or self.source, slides,
                      labelled=bool(slides) and all(s.label for s in slides))

    # -- saving -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the project atomically to ``path`` (default: its own file, else the default
        file beside its source) with paths relative to that file; returns where it went."""
        target = Path(path) if path is not None else (self.path or default_project_file(self.source))
        target = Path(os.path.abspath(target))
        try:
            text = json.dumps(self.to_dict(target.parent), indent=1, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ProjectError(f"{target}: the project cannot be written ({exc})") from None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, text + "\n")
        except OSError as exc:
            raise ProjectError(f"{target}: cannot be written ({exc.strerror or exc})") from None
        self.path = target
        return target

    def to_dict(self, base: Path) -> dict:
        """The JSON object of the project file, paths relative to ``base``. Lists and dicts
        are copied first (each copy is one step under the GIL), so a save on a worker thread
        can run while the GUI thread adds results."""
        runs = [(r, dict(r.results)) for r in list(self.runs)]
        return {
            "format": PROJECT_FORMAT,
            "kind": PROJECT_KIND,
            "source": _rel(self.source, base),
            "slides": [{"key": s.key, "path": _rel(s.path, base), "name": s.name, "label": s.label,
                        "split": s.split,
                        "annotations": None if s.annotations is None else _rel(s.annotations, base),
                        "traces": [{"model": t.model, "name": t.name, "path": _rel(t.path, base)}
                                   for t in list(s.traces)]}
                       for s in list(self.slides)],
            "runs": [{"name": r.name, "model": r.model, "preset": r.preset,
                      "checkpoint": None if r.checkpoint is None else _rel(r.checkpoint, base),
                      "out": _rel(r.out, base), "classes": list(r.classes),
                      "results": {k: asdict(v) for k, v in results.items()}}
                     for r, results in runs],
            "map_display": {k: dict(v) for k, v in dict(self.map_display).items()},
        }


# ---------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------
def default_project_file(source: str | os.PathLike) -> Path:
    """Where a source's project is saved: ``folder/project.maglens.json`` for a folder,
    ``x.maglens.json`` beside ``x.csv`` for a manifest; a project file is its own."""
    p = Path(source)
    if is_project_file(p):
        return p
    if p.is_dir():
        return p / DEFAULT_PROJECT_NAME
    return p.with_name(p.stem + PROJECT_SUFFIX)


def is_project_file(path: str | os.PathLike) -> bool:
    return Path(path).name.casefold().endswith(PROJECT_SUFFIX)


def open_project(path: str | os.PathLike) -> Project:
    """A project from a project file, a manifest CSV or a folder of slides. A folder or
    manifest with a project file beside it (``default_project_file``) opens that file.
    Raises ``ProjectError`` (one line) or ``engines.data.ManifestError`` (every row problem)."""
    p = Path(os.path.abspath(path))
    if is_project_file(p):
        return load_project_file(p)
    if not p.exists():
        raise ProjectError(f"{p}: no such file or folder")
    if not p.is_dir() and p.suffix.lower() != ".csv":
        raise ProjectError(f"{p}: not a project file ({PROJECT_SUFFIX}), a manifest (.csv) "
                           "or a folder of slides")
    saved = default_project_file(p)
    if saved.is_file():
        return load_project_file(saved)
    try:
        cohort = read_cohort(p)
    except CohortError as exc:
        raise ProjectError(str(exc)) from None
    annotations = _annotation_files([s.path for s in cohort.slides])
    slides = [ProjectSlide(s.key, Path(os.path.abspath(s.path)), s.name, s.label, s.split,
                           annotations.get(i)) for i, s in enumerate(cohort.slides)]
    return Project(source=p, slides=slides)


def _annotation_files(paths: list[Path]) -> dict[int, Path]:
    """Each slide's annotation file lying beside it (``<stem>.geojson`` and the names
    ``engines.annotations.annotation_file_for`` accepts), from one listing per folder."""
    listing: dict[Path, set[str]] = {}
    found: dict[int, Path] = {}
    for i, path in enumerate(paths):
        folder = path.parent
        names = listing.get(folder)
        if names is None:
            try:
                names = set(os.listdir(folder))
            except OSError:
                names = set()
            listing[folder] = names
        for base in dict.fromkeys((path.stem, path.name)):
            hit = next((base + ext for ext in ANNOTATION_EXTENSIONS if base + ext in names), None)
            if hit is not None and not hit.endswith(PROJECT_SUFFIX):
                found[i] = Path(os.path.abspath(folder / hit))
                break
    return found


def load_project_file(path: str | os.PathLike) -> Project:
    """Read and check a project file; ``ProjectError`` with one line on any problem."""
    path = Path(os.path.abspath(path))
    try:
        size = path.stat().st_size
        if size > MAX_PROJECT_BYTES:
            raise ProjectError(f"{path}: {size:,} bytes, more than a project file may hold "
                               f"({MAX_PROJECT_BYTES:,})")
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise ProjectError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ProjectError(f"{path}: is a folder, not a project file") from None
    except OSError as exc:
        raise ProjectError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, ProjectError):
            raise
        raise ProjectError(f"{path}: not a MagLens project file (not JSON: {_short(exc)})") from None
    try:
        return _project_from(data, path)
    except _Bad as exc:
        raise ProjectError(f"{path}: {exc}") from None


class _Bad(Exception):
    """One problem in a project file's contents (the caller adds the file name)."""


def _project_from(data: Any, path: Path) -> Project:
    base = path.parent
    if not isinstance(data, dict) or data.get("kind", PROJECT_KIND) != PROJECT_KIND or "format" not in data:
        raise _Bad("not a MagLens project file")
    fmt = data["format"]
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise _Bad(f"format must be a whole number, not {_type(fmt)}")
    if fmt > PROJECT_FORMAT:
        raise _Bad(f"written by a newer MagLens (project format {fmt}; this one reads {PROJECT_FORMAT})")
    if fmt < 1:
        raise _Bad(f"unknown project format {fmt}")
    slides_raw = _get(data, "slides", list)
    if len(slides_raw) > MAX_SLIDES:
        raise _Bad(f"{len(slides_raw):,} slides, more than {MAX_SLIDES:,}")
    slides = [_slide_from(s, i, base) for i, s in enumerate(slides_raw)]
    keys: set[str] = set()
    for s in slides:
        if s.key in keys:
            raise _Bad(f"slide key {s.key!r} appears twice")
        keys.add(s.key)
    runs_raw = _get(data, "runs", list, [])
    if len(runs_raw) > MAX_RUNS:
        raise _Bad(f"{len(runs_raw):,} runs, more than {MAX_RUNS:,}")
    runs = [_run_from(r, i, base, keys) for i, r in enumerate(runs_raw)]
    if len({r.name for r in runs}) != len(runs):
        raise _Bad("two runs have the same name")
    source_text = data.get("source")
    source = _path(source_text, base, "source") if source_text is not None else path
    display = _map_display(data.get("map_display", {}))
    return Project(source=source, slides=slides, runs=runs, map_display=display, path=path)


def _slide_from(raw: Any, i: int, base: Path) -> ProjectSlide:
    where = f"slide {i + 1}"
    if not isinstance(raw, dict):
        raise _Bad(f"{where} must be an object, not {_type(raw)}")
    key = check_key(_text(raw, "key", where))
    name = _text(raw, "name", where, required=False) or key
    split = _text(raw, "split", where, required=False)
    if split not in SPLITS:
        raise _Bad(f"{where} ({name}): unknown split {split!r} (use train, val or test)")
    ann = raw.get("annotations")
    traces_raw = _get(raw, "traces", list, [], where)
    if len(traces_raw) > MAX_TRACES:
        raise _Bad(f"{where} ({name}): {len(traces_raw):,} traces, more than {MAX_TRACES:,}")
    traces = []
    for j, t in enumerate(traces_raw):
        here = f"{where} ({name}) trace {j + 1}"
        if not isinstance(t, dict):
            raise _Bad(f"{here} must be an object, not {_type(t)}")
        traces.append(SavedTrace(_text(t, "model", here), _text(t, "name", here), _path(t.get("path"), base, here)))
    return ProjectSlide(key=key, path=_path(raw.get("path"), base, f"{where} ({name}) path"),
                        name=name, label=_text(raw, "label", where, required=False), split=split,
                        annotations=None if ann is None else _path(ann, base, f"{where} annotations"),
                        traces=traces)


def _run_from(raw: Any, i: int, base: Path, keys: set[str]) -> ProjectRun:
    where = f"run {i + 1}"
    if not isinstance(raw, dict):
        raise _Bad(f"{where} must be an object, not {_type(raw)}")
    name = _text(raw, "name", where)
    where = f"run {name!r}"
    classes = _get(raw, "classes", list, [], where)
    if not all(isinstance(c, str) and len(c) <= MAX_TEXT for c in classes):
        raise _Bad(f"{where}: classes must be a list of names")
    results_raw = _get(raw, "results", dict, {}, where)
    results: dict[str, SlideResult] = {}
    for key, value in results_raw.items():
        if key not in keys:
            raise _Bad(f"{where}: a result for {key!r}, which is not a slide of the project")
        try:
            res = SlideResult.from_dict(value)
        except (ValueError, TypeError) as exc:
            raise _Bad(f"{where}: the result of {key!r} is unusable ({_short(exc)})") from None
        if res.key != key:
            raise _Bad(f"{where}: the result filed under {key!r} is for {res.key!r}")
        results[key] = res
    ck = raw.get("checkpoint")
    return ProjectRun(name=name, model=_text(raw, "model", where, required=False),
                      preset=_text(raw, "preset", where, required=False),
                      checkpoint=None if ck is None else _path(ck, base, f"{where} checkpoint"),
                      out=_path(raw.get("out"), base, f"{where} out"), classes=list(classes),
                      results=results)


def _map_display(raw: Any) -> dict[str, dict]:
    if not isinstance(raw, dict):
        raise _Bad(f"map_display must be an object, not {_type(raw)}")
    out: dict[str, dict] = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise _Bad(f"map_display {name!r} must be an object, not {_type(value)}")
        scaling = value.get("scaling", "linear")
        threshold = value.get("threshold", 0.0)
        if scaling not in SCALINGS:
            raise _Bad(f"map_display {name!r}: unknown scaling {scaling!r} (use {', '.join(SCALINGS)})")
        if (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                or not math.isfinite(threshold)):
            raise _Bad(f"map_display {name!r}: threshold must be a number")
        out[name] = {**value, "scaling": scaling, "threshold": float(threshold)}
    return out


# ---------------------------------------------------------------------------------------
# Small checks
# ---------------------------------------------------------------------------------------
def check_key(key: str) -> str:
    """A key names files (``traces/<key>.trace.json``), so it must be a plain file stem:
    no folder separators, no ``..``, no leading dot, no control characters."""
    bad = (not key or len(key) > 255 or key.startswith(".") or "/" in key or "\\" in key
           or any(ord(c) < 32 for c in key) or key in (".", ".."))
    if bad:
        raise _Bad(f"slide key {key!r} cannot name a file (no folders, no leading dot)")
    return key


def _get(raw: dict, name: str, kind: type, default: Any = ..., where: str = "") -> Any:
    if name not in raw:
        if default is ...:
            raise _Bad(f"{where + ': ' if where else ''}{name} is missing")
        return default
    value = raw[name]
    if not isinstance(value, kind):
        raise _Bad(f"{where + ': ' if where else ''}{name} must be "
                   f"{'a list' if kind is list else 'an object'}, not {_type(value)}")
    return value


def _text(raw: dict, name: str, where: str, required: bool = True) -> str:
    value = raw.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"must be text, not {_type(value)}"
        raise _Bad(f"{where}: {name} {problem}")
    if len(value) > MAX_TEXT or "\x00" in value:
        raise _Bad(f"{where}: {name} is not usable text ({len(value):,} characters)")
    if required and not value:
        raise _Bad(f"{where}: {name} is empty")
    return value


def _path(value: Any, base: Path, where: str) -> Path:
    """A stored path made absolute against the project file's folder (no stat)."""
    if not isinstance(value, str) or not value:
        raise _Bad(f"{where} must be a path, not {_type(value) if value != '' else 'empty text'}")
    if len(value) > MAX_TEXT or "\x00" in value:
        raise _Bad(f"{where} is not a usable path")
    return Path(os.path.normpath(os.path.join(base, value)))


def _rel(path: Path | str, base: Path) -> str:
    """``path`` relative to ``base`` in forward slashes; absolute when it cannot be."""
    try:
        return Path(os.path.relpath(os.path.abspath(path), base)).as_posix()
    except ValueError:  # another drive
        return Path(os.path.abspath(path)).as_posix()


def _norm(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.abspath(path))


def _real(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.realpath(path))


def _type(value: Any) -> str:
    named = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null",
             int: "a number", float: "a number"}
    return named.get(type(value), type(value).__name__)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
