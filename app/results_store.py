"""One owner for results: the open project with its runs' per-slide results, and the traces of
every slide, model and trace name. Views (Slides dock, canvas layers, Models dock, trail dock,
results view) read from here and follow its signals; nothing else keeps a second copy.

Traces of the project's runs are read from disk, on a worker, only when a slide is opened
(``load_project_traces``), never for the whole project at once.
"""
from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.docks import Background
from engines.cohort import SlideResult
from engines.project import Project, ProjectRun
from engines.trace import Trace, TraceError

log = logging.getLogger(__name__)

TraceKey = tuple[str, str, str]  # (slide path as str, model, trace name)
SAVED = "\0"  # marks a single run's trace kept with the project, in ``_loaded``'s keys


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


class ResultsStore(QObject):
    """The window's results: one per MainWindow (``window.results``)."""

    project_changed = Signal(object)  # the Project now open, or None
    run_added = Signal(str)  # run name (a new or replaced ProjectRun)
    result_changed = Signal(str, str)  # run name, slide key: its SlideResult arrived or changed
    traces_changed = Signal(str)  # slide path whose traces changed
    project_traces_ready = Signal(str, list)  # slide path, keys of its project traces now held

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.project: Project | None = None
        self._traces: dict[TraceKey, Trace] = {}
        # (run name, slide key) already read from disk, so a slide opened twice is read once
        self._loaded: dict[tuple[str, str], TraceKey | None] = {}
        self._reading: set[tuple[str, str]] = set()  # markers a worker is reading now
        self._jobs = Background(self, threads=1, name="project-traces")

    # -- the project and its runs ----------------------------------------------------------
    def set_project(self, project: Project | None) -> None:
        """Make ``project`` the open one (None closes it). Traces read from the previous
        project's runs are forgotten; traces of single runs stay (they belong to slides)."""
        if project is self.project:
            return
        old_run_traces = {k for k in self._loaded.values() if k is not None}
        for key in old_run_traces:
            self._traces.pop(key, None)
        self._loaded.clear()
        self._reading.clear()
        self.project = project
        self.project_changed.emit(project)
        for slide in sorted({k[0] for k in old_run_traces}):
            self.traces_changed.emit(slide)

    def runs(self) -> list[ProjectRun]:
        return list(self.project.runs) if self.project is not None else []

    def run(self, name: str) -> ProjectRun | None:
        return self.project.run(name) if self.project is not None else None

    def result(self, run: str, key: str) -> SlideResult | None:
        r = self.run(run)
        return r.results.get(key) if r is not None else None

    def add_run(self, run: ProjectRun) -> None:
        """Add ``run`` to the open project (replacing one of the same name)."""
        if self.project is None:
            raise ValueError("no project is open")
        self.project.add_run(run)
        for (name, key) in [k for k in self._loaded if k[0] == run.name]:
            tk = self._loaded.pop((name, key))
            if tk is not None:
                self._traces.pop(tk, None)
        self.run_added.emit(run.name)

    def add_result(self, run: str, result: SlideResult) -> None:
        """Record one slide's result of ``run`` (as a slide of a cohort run finishes)."""
        r = self.run(run)
        if r is None:
            raise KeyError(f"no run called {run!r} in the project")
        r.results[result.key] = result
        # A re-run slide's trace on disk may be new: read it again when next asked.
        tk = self._loaded.pop((run, result.key), None)
        if tk is not None:
            self._traces.pop(tk, None)
        self.result_changed.emit(run, result.key)
        if tk is not None:
            self.traces_changed.emit(tk[0])

    # -- traces ----------------------------------------------------------------------------
    def put_trace(self, key: TraceKey, trace: Trace) -> None:
        self._traces[key] = trace
        self.traces_changed.emit(key[0])

    def remove_trace(self, key: TraceKey) -> None:
        if self._traces.pop(key, None) is not None:
            self.traces_changed.emit(key[0])

    def trace(self, key: TraceKey) -> Trace | None:
        return self._traces.get(key)

    def trace_keys(self, slide: str, model: str | None = None) -> list[TraceKey]:
        return [k for k in self._traces if k[0] == slide and (model is None or k[1] == model)]

    def load_project_traces(self, slide_path: str) -> None:
        """Read the traces the project's runs wrote for the slide at ``slide_path`` (and the
        single runs kept with the project) on a worker; ``project_traces_ready(slide_path,
        keys)`` follows on the GUI thread with every such trace now held, each under
        (slide_path, model, run or trace name). Each file is read once; an unreadable one is
        logged and skipped. Without a project, or for a slide outside it, nothing follows."""
        project = self.project
        if project is None:
            return
        slide_key = project.key_of(slide_path)
        if slide_key is None:
            return
        slide_path = str(slide_path)
        todo: list[tuple[tuple[str, str], TraceKey, Path]] = []  # (marker, key, file)
        for run in project.runs:
            marker = (run.name, slide_key)
            if marker not in self._loaded and marker not in self._reading:
                path = run.trace_path(slide_key)
                if path is not None and path.is_file():
                    todo.append((marker, (slide_path, run.model, run.name), path))
                else:
                    self._loaded[marker] = None
        for saved in project.slide(slide_key).traces:  # single runs kept with the project
            marker = (f"{SAVED}{saved.model}\0{saved.name}", slide_key)
            tk = (slide_path, saved.model, saved.name)
            if marker not in self._loaded and marker not in self._reading and tk not in self._traces:
                todo.append((marker, tk, Path(saved.path)))
        if not todo:
            self.project_traces_ready.emit(slide_path, self._project_keys(slide_path, slide_key))
            return
        self._reading.update(m for m, _, _ in todo)
        self._jobs.submit(lambda: _read_traces(todo),
                          lambda read: self._adopt(project, slide_path, slide_key, read),
                          lambda exc: self._read_failed(todo, exc))

    def _read_failed(self, todo: list[tuple[tuple[str, str], TraceKey, Path]], exc: BaseException) -> None:
        """A worker that failed outright: its files may be asked for again."""
        log.warning("cannot read the project's traces: %s", exc)
        self._reading.difference_update(m for m, _, _ in todo)

    def _adopt(self, project: Project, slide_path: str, slide_key: str,
               read: list[tuple[tuple[str, str], TraceKey, Trace | None]]) -> None:
        """Traces read on a worker join the store, unless their project has been closed."""
        for marker, _, _ in read:
            self._reading.discard(marker)
        if project is not self.project:
            return
        for marker, tk, trace in read:
            if marker in self._loaded:
                continue  # a run replaced meanwhile: this read is stale
            # Single runs' traces belong to their slide, not to the project: kept as None so
            # closing the project keeps them (``set_project``).
            self._loaded[marker] = tk if trace is not None and not marker[0].startswith(SAVED) else None
            if trace is not None:
                self._traces[tk] = trace
        if any(trace is not None for _, _, trace in read):
            self.traces_changed.emit(slide_path)
        self.project_traces_ready.emit(slide_path, self._project_keys(slide_path, slide_key))

    def _project_keys(self, slide_path: str, slide_key: str) -> list[TraceKey]:
        """Keys of the project's traces of the slide that are held: runs first, in run order."""
        keys = [self._loaded.get((run.name, slide_key)) for run in self.project.runs]
        keys += [(slide_path, t.model, t.name) for t in self.project.slide(slide_key).traces]
        return [k for k in keys if k is not None and k[0] == slide_path and k in self._traces]

    def shutdown(self, msecs: int = 1000) -> bool:
        return self._jobs.shutdown(msecs)

    def is_run_trace(self, key: TraceKey) -> bool:
        """Whether ``key`` is a trace read from one of the project's runs."""
        return key in self._loaded.values()


def _read_traces(todo: list[tuple[tuple[str, str], TraceKey, Path]]
                 ) -> list[tuple[tuple[str, str], TraceKey, Trace | None]]:
    """Each file of ``todo`` read (on a worker); None where it could not be."""
    out = []
    for marker, tk, path in todo:
        try:
            trace: Trace | None = Trace.load(path)
        except (TraceError, OSError, ValueError) as exc:
            log.warning("cannot read %s: %s", path, exc)
            trace = None
        out.append((marker, tk, trace))
    return out
