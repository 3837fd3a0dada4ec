"""One owner for results: the open project with its runs' per-slide results, and the traces of
every slide, model and trace name. Views (Slides dock, canvas layers, Models dock, trail dock,
results view) read from here and follow its signals; nothing else keeps a second copy.

Traces of the project's runs are read from disk only when a slide is opened
(``load_project_traces``), never for the whole project at once.
"""
from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from engines.cohort import SlideResult
from engines.project import Project, ProjectRun
from engines.trace import Trace, TraceError

log = logging.getLogger(__name__)

TraceKey = tuple[str, str, str]  # (slide path as str, model, trace name)


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

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.project: Project | None = None
        self._traces: dict[TraceKey, Trace] = {}
        # (run name, slide key) already read from disk, so a slide opened twice is read once
        self._loaded: dict[tuple[str, str], TraceKey | None] = {}

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

    def load_project_traces(self, slide_path: str) -> list[TraceKey]:
        """The traces the project's runs wrote for the slide at ``slide_path``, each kept under
        (slide_path, run's model, run name). Each file is read once (lazily, on first ask); an
        unreadable one is logged and skipped."""
        project = self.project
        if project is None:
            return []
        slide_key = project.key_of(slide_path)
        if slide_key is None:
            return []
        keys: list[TraceKey] = []
        added = False
        for run in project.runs:
            if (run.name, slide_key) in self._loaded:
                tk = self._loaded[(run.name, slide_key)]
                if tk is not None and tk in self._traces:
                    keys.append(tk)
                continue
            path = run.trace_path(slide_key)
            tk = None
            if path is not None and path.is_file():
                try:
                    trace = Trace.load(path)
                except (TraceError, OSError, ValueError) as exc:
                    log.warning("cannot read %s: %s", path, exc)
                else:
                    tk = (str(slide_path), run.model, run.name)
                    self._traces[tk] = trace
                    keys.append(tk)
                    added = True
            self._loaded[(run.name, slide_key)] = tk
        slide = project.slide(slide_key)
        for saved in slide.traces:  # single runs on this slide kept with the project
            marker = (f"\0{saved.model}\0{saved.name}", slide_key)
            tk = (str(slide_path), saved.model, saved.name)
            if marker in self._loaded or tk in self._traces:
                if tk in self._traces:
                    keys.append(tk)
                continue
            self._loaded[marker] = None  # tried once, whatever came of it
            try:
                self._traces[tk] = Trace.load(saved.path)
            except (TraceError, OSError, ValueError) as exc:
                log.warning("cannot read %s: %s", saved.path, exc)
                continue
            keys.append(tk)
            added = True
        if added:
            self.traces_changed.emit(str(slide_path))
        return keys

    def is_run_trace(self, key: TraceKey) -> bool:
        """Whether ``key`` is a trace read from one of the project's runs."""
        return key in self._loaded.values()
