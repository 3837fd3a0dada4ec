"""Every model run the window starts, on its one engine thread: a run on the open slide (or a
region of it) and a run over the whole project (a cohort run into the project's ``runs/``).

One run at a time. Each run has an id; events of a cancelled or superseded run are dropped
here, so the views only ever hear about the run that is going. A project run's results go to
the results store as each slide ends; the GUI thread never runs the model.
"""
from __future__ import annotations

import enum
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.engine import EngineThread, engine_threads
from app.models_dock import RunRequest, RunStatus
from app.results_store import ResultsStore, TraceKey
from engines.slide import Slide
from engines.trace import Trace

log = logging.getLogger(__name__)

RUNS_FOLDER = "runs"  # project runs write into <project folder>/runs/<run name>/


ENGINE_NICE = 0  # how much lower than the GUI the engine thread is scheduled (0: not lowered)
# How long a thread may hold the GIL while another waits (Python's default is 5 ms). The
# model's Python code between torch calls would otherwise stall a paint by up to that much.
GUI_SWITCH_INTERVAL_S = 0.001


def keep_gui_responsive(enabled: bool = False) -> None:
    """Shorten the GIL switch interval for a process whose GUI shares it with an engine.
    Off by default: a full test run once deadlocked the GUI and engine threads with it and
    the lowered engine priority both in place; it stays available for measurement."""
    if enabled:
        sys.setswitchinterval(min(sys.getswitchinterval(), GUI_SWITCH_INTERVAL_S))


def lower_thread_priority(nice: int = ENGINE_NICE) -> None:
    """Let the calling thread yield the CPU to the GUI thread. On Linux the nice value is per
    thread (and threads it starts, such as torch's workers, inherit it); elsewhere, or
    without permission, nothing changes."""
    if nice <= 0 or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError:
        pass


def inference_device() -> str:
    """Where the viewer runs models: ``MAGLENS_DEVICE`` when set (auto, cpu, cuda, cuda:N),
    else "auto" (this machine's first GPU when torch sees one, the CPU otherwise)."""
    return os.environ.get("MAGLENS_DEVICE", "").strip() or "auto"


def make_inference_job(request: RunRequest, slide: Slide, roi, nice: int = ENGINE_NICE,
                       device: str | None = None):
    """The callable the engine thread runs for one Run press. The model is built, moved to
    ``device`` (default ``inference_device()``) and run on the engine thread, never on the
    GUI thread."""
    device = device or inference_device()

    def job(emit, cancel: threading.Event) -> Trace:
        # Painting must win over the model when both want a core: the canvas stays smooth
        # and the model only runs a little longer.
        lower_thread_priority(nice)
        from engines import infer, registry
        from engines.checkpoint import checkpoint_sha256, model_from_checkpoint

        if request.checkpoint:
            model = model_from_checkpoint(request.checkpoint, expect_model=request.model)
            sha = checkpoint_sha256(request.checkpoint)
        else:
            model = registry.create(request.model, request.preset)
            sha = None
        return infer.run(model, slide, on_event=emit, cancel=cancel, roi=roi, checkpoint_id=sha, device=device)

    return job



class RunKind(enum.Enum):
    SLIDE = "slide"
    PROJECT = "project"


@dataclass
class ActiveRun:
    id: int
    kind: RunKind
    started: float
    key: TraceKey | None = None  # a slide run: the trace it fills
    name: str = ""  # a project run: its name
    project: object = None  # ... and the project it runs over
    progress: object = None  # a slide run's last Progress event
    total: int = 0  # a project run: slides in all
    finished: int = 0  # ... and ended so far (run or reused)
    ran: int = 0  # ... of them actually run (the ETA's rate)
    reused: int = 0
    ran_seconds: float = 0.0  # when the last slide that ran ended (since ``started``)


@dataclass
class ProjectStarted:
    """A project run's model is loaded: its name, output folder and classes are known."""
    name: str
    model: str
    preset: str
    checkpoint: str | None
    out: Path
    classes: list[str]
    total: int


@dataclass
class ProjectSlideDone:
    result: object  # engines.cohort.SlideResult
    reused: bool


@dataclass
class ProjectEnded:
    summary: dict = field(default_factory=dict)


def run_folder_name(name: str) -> str:
    """A run name as a folder name: the same on every system."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def project_folder(project) -> Path:
    from engines.project import default_project_file

    return Path(project.path or default_project_file(project.source)).parent


def format_eta(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def make_project_job(request: RunRequest, project, device: str | None = None):
    """The callable the engine thread runs for "Run on project": load the model once, then
    ``engines.cohort.run_slides`` over every project slide (reusing records of the same
    checkpoint), announcing each result as it ends."""

    cohort = project.as_cohort()
    folder = project_folder(project)
    device = device or inference_device()

    def job(emit, cancel: threading.Event):
        lower_thread_priority()
        from engines import cohort as cohort_mod

        # As many torch threads as single runs get: run_slides sets them for this thread.
        spec = cohort_mod.ModelSpec(request.model, None if request.checkpoint else request.preset,
                                    request.checkpoint, device=device, threads=engine_threads())
        model, sha = spec.load()
        if cancel.is_set():
            return None
        if sha:
            name = f"{request.model} ckpt {sha[:8]}"
        else:
            name = f"{request.model} {model.preset}"
        out = folder / RUNS_FOLDER / run_folder_name(name)
        emit(ProjectStarted(name, request.model, model.preset, request.checkpoint, out,
                            list(model.classes), len(cohort.slides)))
        cohort_mod.run_slides(cohort.slides, spec, out, workers=1, model=model, sha=sha,
                              on_result=lambda res, reused: emit(ProjectSlideDone(res, reused)),
                              cancel=cancel)
        run = cohort_mod.run_identity(spec, model, sha)
        summary = cohort_mod.write_outputs(cohort, out, list(model.classes), run)
        return ProjectEnded(summary)

    return job


class RunController(QObject):
    """Owns the engine thread and the run in progress (one slide's, or the project's)."""

    # A slide run (run id first): its trace events, and how it ended.
    slide_event = Signal(int, object)
    # How it ended: the ActiveRun that ended first (it is no longer ``active``).
    slide_done = Signal(object, object)  # ActiveRun, the finished Trace
    slide_failed = Signal(object, str)  # ActiveRun, one-line message
    slide_cancelled = Signal(object)  # ActiveRun
    # A project run.
    project_progress = Signal(str, int, int)  # "12/40 slides, ETA 1m20s", slides ended, in all
    project_finished = Signal(str, str)  # run name ("" if it never began), outcome text
    busy_changed = Signal(bool)  # a run began or ended

    def __init__(self, store: ResultsStore, engine: EngineThread | None = None,
                 job_factory=None, project_job_factory=make_project_job,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)

        self.store = store
        self.engine = engine or EngineThread(self)
        self.job_factory = job_factory or make_inference_job
        self.project_job_factory = project_job_factory
        self.active: ActiveRun | None = None
        self.statuses: dict[TraceKey, RunStatus] = {}  # how each trace's last run ended
        self.engine.event.connect(self._on_event)
        self.engine.done.connect(self._on_done)
        self.engine.failed.connect(self._on_failed)
        self.engine.cancelled.connect(self._on_cancelled)
        # Another project (or none) opened: a run over the old one stops; what it finished
        # stays in its output folder and is reused when that project runs again.
        store.project_changed.connect(lambda _p: self.cancel_project())

    # -- state -----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.active is not None

    def slide_run(self) -> ActiveRun | None:
        a = self.active
        return a if a is not None and a.kind is RunKind.SLIDE else None

    def project_run(self) -> ActiveRun | None:
        a = self.active
        return a if a is not None and a.kind is RunKind.PROJECT else None

    # -- starting and stopping -------------------------------------------------------------
    def start_slide(self, request: RunRequest, slide, roi, key: TraceKey) -> int:
        """Run ``request`` on ``slide`` (``roi``: a region, or None) filling trace ``key``;
        a slide run still going is cancelled first (its late events are dropped)."""
        if self.project_run() is not None:
            raise RuntimeError("a project run is going: cancel it first")
        if self.active is not None:
            self.engine.cancel(self.active.id)
        self.statuses.pop(key, None)
        run_id = self.engine.submit(self.job_factory(request, slide, roi))
        self._set_active(ActiveRun(run_id, RunKind.SLIDE, time.monotonic(), key=key))
        return run_id

    def start_project(self, request: RunRequest) -> int:
        """Run ``request`` over every slide of the store's project (see ``make_project_job``)."""
        project = self.store.project
        if project is None:
            raise RuntimeError("open a project first")
        if self.active is not None:
            raise RuntimeError("a run is going: cancel it first")
        run_id = self.engine.submit(self.project_job_factory(request, project))
        self._set_active(ActiveRun(run_id, RunKind.PROJECT, time.monotonic(), total=len(project.slides),
                                   project=project))
        self.project_progress.emit(f"0/{len(project.slides)} slides: loading the model…", 0,
                                   len(project.slides))
        return run_id

    def cancel_slide(self) -> None:
        run = self.slide_run()
        if run is not None:
            self.engine.cancel(run.id)

    def cancel_project(self) -> None:
        run = self.project_run()
        if run is not None:
            self.engine.cancel(run.id)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _set_active(self, run: ActiveRun | None) -> None:
        was = self.active is not None
        self.active = run
        if was != (run is not None):
            self.busy_changed.emit(run is not None)

    def _mine(self, run_id: int) -> ActiveRun | None:
        a = self.active
        return a if a is not None and a.id == run_id else None

    # -- engine signals --------------------------------------------------------------------
    def _on_event(self, run_id: int, event: object) -> None:
        run = self._mine(run_id)
        if run is None:
            return
        if run.kind is RunKind.SLIDE:
            self.slide_event.emit(run_id, event)
        elif isinstance(event, ProjectStarted):
            self._project_started(run, event)
        elif isinstance(event, ProjectSlideDone):
            self._project_result(run, event)

    def _project_started(self, run: ActiveRun, ev: ProjectStarted) -> None:
        from engines.project import ProjectRun

        if self.store.project is not run.project:
            return  # its project was closed; the cancel is on its way
        run.name = ev.name
        run.total = ev.total
        old = self.store.run(ev.name)
        same = old is not None and old.out == ev.out and old.classes == ev.classes
        project_run = ProjectRun(ev.name, ev.model, ev.preset,
                                 Path(ev.checkpoint) if ev.checkpoint else None, ev.out,
                                 list(ev.classes), dict(old.results) if same else {})
        self.store.add_run(project_run)
        self._report(run)

    def _project_result(self, run: ActiveRun, ev: ProjectSlideDone) -> None:
        run.finished += 1
        if ev.reused:
            run.reused += 1
        else:
            run.ran += 1
            run.ran_seconds = time.monotonic() - run.started
        if run.name and self.store.project is run.project:
            self.store.add_result(run.name, ev.result)
        self._report(run)

    def _report(self, run: ActiveRun) -> None:
        text = f"{run.finished}/{run.total} slides"
        left = run.total - run.finished
        if run.ran and left:
            text += f", ETA {format_eta(run.ran_seconds / run.ran * left)}"
        if run.reused:
            text += f" ({run.reused} reused)"
        self.project_progress.emit(text, run.finished, run.total)

    def _on_done(self, run_id: int, result: object) -> None:
        run = self._mine(run_id)
        if run is None:
            return
        self._set_active(None)
        if run.kind is RunKind.SLIDE:
            self.slide_done.emit(run, result)
        else:
            self._end_project(run, "" if result is not None else "Cancelled")

    def _on_failed(self, run_id: int, message: str) -> None:
        run = self._mine(run_id)
        if run is None:
            return
        self._set_active(None)
        if run.kind is RunKind.SLIDE:
            self.slide_failed.emit(run, message)
        else:
            self._end_project(run, f"Failed: {message}")

    def _on_cancelled(self, run_id: int) -> None:
        run = self._mine(run_id)
        if run is None:
            return
        self._set_active(None)
        if run.kind is RunKind.SLIDE:
            self.slide_cancelled.emit(run)
        else:
            self._end_project(run, "Cancelled")

    def _end_project(self, run: ActiveRun, outcome: str) -> None:
        """The run stays in the project with the slides that ended; the project is saved."""
        errors = 0
        project = run.project
        project_run = project.run(run.name) if run.name and project is not None else None
        if project_run is not None:
            errors = sum(1 for r in project_run.results.values() if r.error)
        text = f"{run.finished}/{run.total} slides"
        if errors:
            text += f", {errors} failed"
        if run.reused:
            text += f" ({run.reused} reused)"
        text = f"{outcome}: {text}" if outcome else f"Done: {text} in {format_eta(time.monotonic() - run.started)}"
        if project_run is not None:  # saved even when another project was opened since
            from engines.project import ProjectError

            try:
                project.save()
            except ProjectError as exc:
                text += f"; the project was not saved: {exc}"
        self.project_progress.emit(text, run.finished, run.total)
        self.project_finished.emit(run.name, text)
