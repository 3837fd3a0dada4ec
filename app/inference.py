"""What the GUI shows of model runs: live trace layers on the canvas, the trace shown per
slide and model, the magnification path and Play, the probability trail, hover text and trace
files.

Runs themselves (the engine thread, run ids, cancel, slide and project runs) belong to
``app.run_controller.RunController``; traces and project results live in
``app.results_store.ResultsStore``. This module keeps the view of them.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, QPointF, Qt, QTimer, Signal
from PySide6.QtGui import QMouseEvent

from app.engine import EngineThread
from app.checkpoint_info import read_checkpoint_info
from app.models_dock import WHOLE_SLIDE, ModelsPanel, RunRequest, RunStatus, Scope
from app.results_store import ResultsStore, TraceKey
from app.run_controller import RunController, keep_gui_responsive
from app.trail_dock import TrailPlot
from engines.project import SavedTrace, default_project_file
from engines.trace import AttentionMap, Field, Progress, SlideRef, Trace, TraceError, TrailStep
from viewer.figure import render_figure
from viewer.overlays.rubberband import RubberBandOverlay
from viewer.trace_layers import TraceLayers

log = logging.getLogger(__name__)

PLAY_INTERVAL_MS = 1400
CLICK_SLOP_PX = 4


Key = TraceKey  # (slide path, model, trace name): "whole slide", "region ..." or a project run's name


def _file_safe(text: str) -> str:
    """``text`` as part of a file name: letters, digits and a few marks; the rest become _."""
    return "".join(c if c.isalnum() or c in "-_.,() " else "_" for c in text)[:120].strip() or "_"


def scope_name(roi) -> str:
    """The name a trace is kept and listed under: what part of the slide it covers."""
    if roi is None:
        return WHOLE_SLIDE
    x, y, w, h = roi
    return f"region {w:.0f}x{h:.0f} at ({x:.0f}, {y:.0f})"


def trace_label(model: str, scope: str) -> str:
    """How a trace is named in the Compare list and the Layers dock."""
    return model if scope == WHOLE_SLIDE else f"{model} ({scope})"


# Key presses on the canvas that move the view: the user takes over and Play stops.
_NAV_KEYS = {Qt.Key.Key_Left, Qt.Key.Key_Right, Qt.Key.Key_Up, Qt.Key.Key_Down, Qt.Key.Key_Plus,
             Qt.Key.Key_Equal, Qt.Key.Key_Minus, Qt.Key.Key_Underscore, Qt.Key.Key_F, Qt.Key.Key_1,
             Qt.Key.Key_2, Qt.Key.Key_3, Qt.Key.Key_4, Qt.Key.Key_5}


class InferenceController(QObject):
    """Runs models on the open slide and shows their traces. What the Models dock, the trail
    plot and the canvas show always belongs to one trace key (slide, model, trace name): a
    new slide, another model or another trace replaces all of it, and each key's traces and
    run status come back with it."""

    status = Signal(str)
    trace_changed = Signal(object)  # the TraceLayers now shown, or None

    def __init__(self, window, canvas, panel: ModelsPanel, plot: TrailPlot,
                 engine: EngineThread | None = None, job_factory=None,
                 store: ResultsStore | None = None) -> None:
        super().__init__(window)
        keep_gui_responsive()
        self.window = window
        self.canvas = canvas
        self.panel = panel
        self.plot = plot
        if store is None:
            store = getattr(window, "results", None) or ResultsStore(self)
        self.store = store
        self.runs = RunController(store, engine or EngineThread(self), job_factory, parent=self)
        self.layers: dict[Key, TraceLayers] = {}  # the canvas layers of each trace, made when first shown
        self._last_scope: dict[tuple[str, str], str] = {}  # (slide, model) -> trace name shown last
        self._opened: str | None = None  # the slide whose project traces are awaited on opening
        self.current: TraceLayers | None = None
        self.compare: TraceLayers | None = None  # another trace shown alongside
        self.shown_key: Key | None = None  # whose trace and status the dock shows
        self._compare_ids: dict[str, Key] = {}
        self._hovering = False
        self._replaced: TraceLayers | None = None  # the trace a running run will replace
        self.last_error: str | None = None
        self.rubber = RubberBandOverlay()
        self._press: QPointF | None = None
        self._band_start: tuple[float, float] | None = None
        self._watched: set[int] = set()
        self._stop = -1
        self._play = QTimer(self)
        self._play.setInterval(PLAY_INTERVAL_MS)
        self._play.timeout.connect(self._play_tick)

        panel.run_requested.connect(self.run)
        panel.cancel_requested.connect(self.cancel)
        panel.step_requested.connect(self.step)
        panel.play_toggled.connect(self.set_playing)
        panel.colormap_changed.connect(lambda n: self._each_shown(lambda t: t.set_colormap(n)))
        panel.joint_changed.connect(lambda j: self._each_shown(lambda t: t.set_joint(j)))
        panel.smooth_changed.connect(lambda s: self._each_shown(lambda t: t.set_smooth(s)))
        panel.map_opacity_changed.connect(lambda o: self._each_shown(lambda t: t.set_map_opacity(o)))
        panel.map_chosen.connect(self.choose_map)
        panel.compare_changed.connect(self.set_compare)
        panel.trace_chosen.connect(self.choose_trace)
        panel.model_changed.connect(self._show_for_model)
        panel.project_run_requested.connect(self.run_project)
        panel.project_cancel_requested.connect(self.runs.cancel_project)
        plot.step_clicked.connect(self.go_to_step)
        runs = self.runs
        runs.slide_event.connect(self._on_event)
        runs.slide_done.connect(self._on_done)
        runs.slide_failed.connect(self._on_failed)
        runs.slide_cancelled.connect(self._on_cancelled)
        runs.project_progress.connect(lambda text, done, total: panel.set_project_progress(done, total, text))
        runs.project_finished.connect(self._on_project_finished)
        runs.busy_changed.connect(lambda _busy: self._update_project_controls())
        store.project_changed.connect(lambda _p: self._update_project_controls())
        store.traces_changed.connect(self._on_traces_changed)
        store.project_traces_ready.connect(self._on_project_traces)
        store.result_changed.connect(self._on_result_changed)
        self._update_project_controls()
        canvas.installEventFilter(self)
        canvas.cursor_moved.connect(self._on_cursor)
        self._show(None)  # nothing to show before a slide and a trace exist

    # -- the run controller's state, as the views read it ---------------------------------
    @property
    def engine(self) -> EngineThread:
        return self.runs.engine

    @property
    def job_factory(self):
        return self.runs.job_factory

    @job_factory.setter
    def job_factory(self, factory) -> None:
        self.runs.job_factory = factory

    @property
    def statuses(self) -> dict[Key, RunStatus]:
        return self.runs.statuses

    @property
    def run_id(self) -> int | None:
        """The slide run going, if any."""
        run = self.runs.slide_run()
        return run.id if run is not None else None

    @property
    def _run_key(self) -> Key | None:
        run = self.runs.slide_run()
        return run.key if run is not None else None

    # -- keys ------------------------------------------------------------------------------
    def _slide_key(self) -> str | None:
        s = self.canvas.slide
        return str(s.path) if s is not None else None

    def key_for_model(self, model: str) -> Key | None:
        """The trace of ``model`` the dock shows for the open slide: the one shown last."""
        slide = self._slide_key()
        if slide is None:
            return None
        name = self._last_scope.get((slide, model))
        if name is None:  # nothing chosen yet: the whole slide's trace, else the first listed
            names = self.traces_of(model)
            name = WHOLE_SLIDE if WHOLE_SLIDE in names or not names else names[0]
        return (slide, model, name)

    def traces_of(self, model: str) -> list[str]:
        """Names of ``model``'s traces (and failed runs) of the open slide."""
        slide = self._slide_key()
        keys = list(self.layers) + list(self.statuses)
        if slide is not None:
            keys += self.store.trace_keys(slide, model)
        names = {k[2] for k in keys if k[0] == slide and k[1] == model}
        return sorted(names, key=lambda n: (n != WHOLE_SLIDE, n))

    def _layers_for(self, key: Key | None) -> TraceLayers | None:
        """``key``'s canvas layers, made (hidden) from the store's trace when first needed."""
        if key is None:
            return None
        layers = self.layers.get(key)
        if layers is None:
            trace = self.store.trace(key)
            if trace is not None:
                layers = self.layers[key] = self._new_layers(trace, key[2])
        return layers

    def _on_traces_changed(self, slide: str) -> None:
        """Traces the store dropped (a project closed) leave the canvas; new ones are listed."""
        for key in [k for k in self.layers if k[0] == slide and k != self._run_key]:
            if self.store.trace(key) is None:
                layers = self.layers.pop(key)
                layers.hide()
                if layers is self.compare:
                    self.compare = None
                if layers is self.current:
                    self.current = None
                    self._show(self.key_for_model(self.panel.model()))
        if slide == self._slide_key():
            self._refresh_choosers()

    def slide_changed(self) -> None:
        """Show what belongs to the newly opened slide only: its traces (kept from before)
        or nothing; a run, Play and the drawn region of the old slide end."""
        self.cancel()
        self.status.emit("")  # nor is a message about the previous slide
        self.rubber.set_rect(None)
        self.canvas.remove_overlay(self.rubber)
        if self.panel.scope() is Scope.DRAWN:
            self.panel.set_scope(Scope.WHOLE)  # its rectangle is gone
        for layers in self.layers.values():
            layers.hide()
        self.current = None
        self.compare = None
        slide = self._slide_key()
        self._show(self.key_for_model(self.panel.model()))
        self._opened = slide  # its project traces, once read, may choose what is shown
        if slide is not None:
            self.store.load_project_traces(slide)  # read on a worker: _on_project_traces

    def _on_project_traces(self, slide: str, keys: list) -> None:
        """A project slide opens with what its runs found, once read: the current model's
        trace, or else the last run's model and its trace. Nothing changes under a run or
        for a slide no longer open."""
        if slide != self._opened or slide != self._slide_key():
            return  # read for another reason (a project run reached the slide): listed only
        self._opened = None
        if not keys or self.current is not None or self.runs.busy:
            return
        model = self.panel.model()
        if not self.traces_of(model):
            self.panel.set_model(keys[-1][1])  # shows it (the model changed)
            if self.panel.model() != model:
                return
        self._show(self.key_for_model(self.panel.model()))

    def _show_for_model(self, model: str) -> None:
        self.status.emit("")  # a message about the previous model's run is not about this one
        self._show(self.key_for_model(model))

    def choose_trace(self, name: str) -> None:
        """Show the current model's trace called ``name`` (from the dock's Trace list)."""
        slide = self._slide_key()
        if slide is None or not name:
            return
        model = self.panel.model()
        self._last_scope[(slide, model)] = name
        self._show((slide, model, name))

    def _show(self, key: Key | None) -> None:
        """Make ``key`` the trace on screen: its layers, prediction, trail, path position and
        run status; anything of another key goes."""
        self.stop_playing()
        layers = self._layers_for(key)
        if self.current is not None and self.current is not layers and self.current is not self.compare:
            self.current.hide()
        if layers is not None and layers is self.compare:
            self.compare = None  # it is the main trace now
        self.current = layers
        self.shown_key = key
        # A trace comes back where its path was left: the highlight and the label agree.
        self._stop, path_text = getattr(layers, "path_position", (-1, "—"))
        self.last_error = None
        self.panel.set_path_text(path_text)
        if layers is not None:
            self._apply_settings(layers)
            layers.show()
            self.plot.set_steps(layers.trace.trail or layers.trail.steps, layers.trail.positive,
                                layers.trail.positive_label)
            self.panel.show_prediction(layers.trace.classes, layers.trace.probs)
        else:
            self.plot.clear()
            self.panel.show_prediction([], [])
        run = self.runs.slide_run()
        if key is not None and run is not None and key == run.key:
            self.panel.set_running(True, run.started)
            if run.progress is not None:
                p = run.progress
                self.panel.set_progress(p.done, p.total, p.stage)
        else:
            status = self.statuses.get(key) if key is not None else None
            if status is None and key is not None and self.store.is_run_trace(key):
                status = RunStatus(f"From the project run {key[2]}", done=True)
            self.panel.show_status(status, cancel_enabled=self.run_id is not None)
            if status is not None and status.error:
                self.last_error = status.error
        self._refresh_choosers()
        self.trace_changed.emit(layers)

    def _shown(self, key: Key | None) -> bool:
        return key is not None and key == self.shown_key

    def _apply_settings(self, layers: TraceLayers) -> None:
        m = self.panel.map_settings()
        layers.apply_settings(m.colormap, m.joint, m.smooth, m.opacity)

    def _new_layers(self, trace: Trace, name: str | None = None) -> TraceLayers:
        m = self.panel.map_settings()
        scope = name or scope_name(trace.roi)
        return TraceLayers(self.canvas, trace, colormap=m.colormap, joint=m.joint, smooth=m.smooth,
                           map_opacity=m.opacity,
                           label=trace_label(trace.model, scope))

    def _each_shown(self, fn) -> None:
        for layers in (self.current, self.compare):
            if layers is not None:
                fn(layers)

    def _refresh_choosers(self) -> None:
        """The map chooser lists the current trace's maps; Trace lists this model's traces of
        the slide by name; Compare lists every other trace of this slide."""
        cur = self.current
        if cur is None:
            self.panel.set_maps([])
        else:
            visible = next((i for i, o in enumerate(cur.maps) if o.visible), -1)
            self.panel.set_maps([o.map.name for o in cur.maps], visible)
        slide = self._slide_key() or ""
        model = self.panel.model()
        if self.shown_key is not None and self.shown_key[1] != model:
            # A trace of no model of ours (an imported heatmap): name it, and nothing to choose.
            label = trace_label(self.shown_key[1], self.shown_key[2])
            self.panel.set_trace_choices([label], label)
            self.panel.trace_combo.setEnabled(False)
        else:
            self.panel.set_trace_choices(self.traces_of(model), self.shown_key[2] if self.shown_key else "")
        keys = [k for k in self.layers if k[0] == slide] + self.store.trace_keys(slide)
        self._compare_ids = {trace_label(k[1], k[2]): k for k in dict.fromkeys(keys)
                             if cur is None or self.layers.get(k) is not cur}
        items = [(label, label) for label in sorted(self._compare_ids)]
        current = next((label for label, k in self._compare_ids.items()
                        if self.compare is not None and self.layers.get(k) is self.compare), "")
        self.panel.set_compare_choices(items, current)

    def choose_map(self, index: int) -> None:
        """Show map ``index`` of the current trace in place of those stacked with it."""
        if self.current is not None and 0 <= index < len(self.current.maps):
            self.current.choose_map(self.current.maps[index])

    def set_compare(self, name: str) -> None:
        """Show the trace listed as ``name`` (a model, or "model (region ...)") alongside the
        current one ("" hides it)."""
        if self.compare is not None and self.compare is not self.current:
            self.compare.hide()
        key = self._compare_ids.get(name) if name else None
        layers = self._layers_for(key)
        self.compare = layers if layers is not self.current else None
        if self.compare is not None:
            self._apply_settings(self.compare)
            self.compare.show()
        self._refresh_choosers()

    # -- running ---------------------------------------------------------------------------
    def roi_for(self, scope: Scope):
        s = self.canvas.slide
        if scope is Scope.VIEW:
            x, y, w, h = self.canvas.camera.view_rect()
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(s.width)), min(y + h, float(s.height))
            return (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None
        if scope is Scope.DRAWN:
            return self.rubber.rect
        return None

    def check_request(self, request: RunRequest) -> str | None:
        """Why ``request`` cannot run (one line), or None: a checkpoint must be readable and
        of the chosen model. Uses the metadata the dock has read, else reads it quickly."""
        if not request.checkpoint:
            return None
        info = self.panel.info_reader.cached(request.checkpoint)
        if info is None:
            info = read_checkpoint_info(request.checkpoint, full=False)
        if info is None:
            return None  # an old file format: the engine checks it as it loads
        return info.error or info.mismatch(request.model)

    def run(self, request: RunRequest) -> int | None:
        self.stop_playing()
        slide = self.canvas.slide
        if slide is None:
            self._fail("Open a slide first.")
            return None
        refused = self.check_request(request)
        if refused:
            self._fail(refused)
            return None
        roi = self.roi_for(request.scope)
        if request.scope is Scope.DRAWN and roi is None:
            self._fail("Draw a rectangle first: Shift+drag on the slide.")
            return None
        if self.runs.project_run() is not None:
            self._fail("A project run is going: wait for it or cancel it first.")
            return None
        scope = scope_name(roi)
        key = (str(slide.path), request.model, scope)
        old = self.layers.pop(key, None)
        if old is not None:
            old.hide()
            if old is self.compare:
                self.compare = None
            if old is self.current:
                self.current = None
        self._replaced = old  # back on screen if this run ends with nothing to show
        trace = Trace(model=request.model, preset=request.preset, checkpoint=None,
                      slide=SlideRef(str(slide.path), slide.width, slide.height, slide.mpp), roi=roi)
        self.layers[key] = self._new_layers(trace)
        self._last_scope[(key[0], key[1])] = scope
        if request.checkpoint:
            self.panel.add_recent_checkpoint(request.checkpoint, request.model)
        run_id = self.runs.start_slide(request, slide, roi, key)
        self.store.put_trace(key, trace)  # the live trace: it fills as the run goes
        self._show(key)
        return run_id

    def cancel(self) -> None:
        """Esc: stop Play, and cancel the slide run in progress (a project run goes on: it
        has its own Cancel)."""
        self.stop_playing()
        self.runs.cancel_slide()

    def _mine(self, run_id: int) -> bool:
        return run_id == self.run_id

    # -- the project run -------------------------------------------------------------------
    def run_project(self, request: RunRequest) -> int | None:
        """"Run on project": the chosen model over every slide of the open project."""
        if self.store.project is None:
            self._fail("Open a project first.")
            return None
        refused = self.check_request(request)
        if refused:
            self._fail(refused)
            return None
        if self.runs.busy:
            self._fail("A run is going: wait for it or cancel it first.")
            return None
        if request.checkpoint:
            self.panel.add_recent_checkpoint(request.checkpoint, request.model)
        run_id = self.runs.start_project(request)
        self._update_project_controls()
        return run_id

    def _update_project_controls(self) -> None:
        running = self.runs.project_run() is not None
        self.panel.set_project_state(self.store.project is not None, running, self.runs.busy)

    def _on_project_finished(self, name: str, text: str) -> None:
        self._update_project_controls()
        self.status.emit(f"Project run {name}: {text}" if name else f"Project run: {text}")

    def _on_result_changed(self, run: str, key: str) -> None:
        """A project run finished the open slide: its trace joins the Trace list."""
        slide = self._slide_key()
        project = self.store.project
        if slide is not None and project is not None and project.key_of(slide) == key:
            self.store.load_project_traces(slide)  # listed when read (traces_changed)

    def _layers_of_run(self) -> TraceLayers | None:
        return self.layers.get(self._run_key) if self._run_key else None

    def _on_event(self, run_id: int, event: object) -> None:
        if not self._mine(run_id):
            return
        layers = self._layers_of_run()
        shown = self._shown(self._run_key)
        if isinstance(event, Progress):
            run = self.runs.slide_run()
            if run is not None:
                run.progress = event
            if shown:
                self.panel.set_progress(event.done, event.total, event.stage)
            return
        if layers is None:
            return
        layers.trace.add(event)
        layers.add_event(event)
        if isinstance(event, AttentionMap) and layers is self.current:
            self._refresh_choosers()
        if isinstance(event, TrailStep) and layers is self.current:
            self.plot.add_step(event)
            if len(layers.trail.steps) == 1:
                self.trace_changed.emit(layers)  # the first step: time to show the plot

    def _end_run(self, run, status: RunStatus) -> tuple[Key | None, bool]:
        """Record how ``run`` ended; a run that drew nothing gives the screen back to the
        trace it was to replace. Returns the run's key and whether it is on screen."""
        key = run.key
        if key is None:
            return None, False
        self.statuses[key] = status
        layers = self.layers.get(key)
        if (status.error or status.cancelled) and layers is not None and layers.empty:
            layers.hide()
            if layers is self.current:
                self.current = None
            if self._replaced is not None:
                self.layers[key] = self._replaced
                self.store.put_trace(key, self._replaced.trace)
            else:
                del self.layers[key]
                self.store.remove_trace(key)
        self._replaced = None
        return key, self._shown(key)

    def _on_done(self, run, trace: Trace) -> None:
        note = f"Done in {time.monotonic() - run.started:.1f} s"
        if trace.checkpoint is None:
            note += " — initial weights (no checkpoint)"
        layers = self.layers.get(run.key) if run.key else None
        key, shown = self._end_run(run, RunStatus(note, done=True))
        if layers is not None:
            layers.finish(trace)
        if key is not None:
            self.store.put_trace(key, trace)
            self._keep_with_project(key, trace)
        if shown:
            if layers is not None and layers is self.current:
                self.plot.set_steps(trace.trail, layers.trail.positive, layers.trail.positive_label)
                self.trace_changed.emit(layers)
            self.panel.set_finished(trace.classes, trace.probs, note)
        else:
            self.panel.set_cancel_enabled(False)
        self.status.emit(f"{trace.model}: {trace.prediction} ({max(trace.probs):.2f})" if trace.probs else note)

    def _keep_with_project(self, key: Key, trace: Trace) -> None:
        """A run on a slide of the open project is kept with it: the trace is written (on a
        worker) to ``<project folder>/traces/<slide key>/`` and listed in the project file, so
        reopening the project brings it back."""
        project = self.store.project
        slide_key = project.key_of(key[0]) if project is not None else None
        if slide_key is None:
            return
        folder = (project.path or default_project_file(project.source)).parent / "traces" / slide_key
        target = folder / f"{_file_safe(key[1])} {_file_safe(key[2])}.trace.json"

        def write() -> Path:
            folder.mkdir(parents=True, exist_ok=True)
            trace.save(target)
            return target

        def written(path: Path) -> None:
            if self.store.project is not project:
                return  # another project was opened meanwhile
            project.slide(slide_key).keep_trace(SavedTrace(key[1], key[2], path))
            save = getattr(getattr(self.window, "projects", None), "save", None)
            if save is not None:
                save()

        def failed(exc: BaseException) -> None:
            self.status.emit(f"The trace was not kept with the project: {exc}")

        self.window._jobs.submit(write, written, failed)

    def _on_failed(self, run, message: str) -> None:
        key, shown = self._end_run(run, RunStatus("Failed", message))
        if shown:
            self._show(key)
        else:
            self.panel.set_cancel_enabled(False)
        if key is not None and key[0] == self._slide_key():  # not over another slide
            self.status.emit(f"Model run failed: {message}")
        log.error("model run failed: %s", message)

    def _fail(self, message: str) -> None:
        """A run refused before it starts: said in the dock until something else is shown."""
        self.last_error = message
        self.panel.set_error(message)
        self.status.emit(f"Model run failed: {message}")
        log.error("model run failed: %s", message)

    def _on_cancelled(self, run) -> None:
        key, shown = self._end_run(run, RunStatus("Cancelled", cancelled=True))
        if shown:
            self._show(key)
        else:
            self.panel.set_cancel_enabled(False)
        if key is not None and key[0] == self._slide_key():
            self.status.emit("Model run cancelled")

    # -- the magnification path ------------------------------------------------------------
    def step(self, direction: int) -> str | None:
        """Move along the path of the current trace (the user's [ and ]: Play stops);
        returns the stop's title."""
        self.stop_playing()
        return self._advance(direction)

    def _advance(self, direction: int) -> str | None:
        if self.current is None:
            return None
        stops = self.current.path()
        if not stops:
            return None
        i = min(max(self._stop + direction, 0), len(stops) - 1)
        self._stop = i
        stop = stops[i]
        rects = stop.rects
        x0 = min(r[0] for r in rects)
        y0 = min(r[1] for r in rects)
        x1 = max(r[0] + r[2] for r in rects)
        y1 = max(r[1] + r[3] for r in rects)
        margin = 0.08 * max(x1 - x0, y1 - y0)
        self.canvas.show_rect((x0 - margin, y0 - margin, x1 - x0 + 2 * margin, y1 - y0 + 2 * margin))
        self.current.focus(stop)
        self._refresh_choosers()
        shown = f" — showing {stop.maps[0].map.name}" if stop.maps and stop.overlay is None else ""
        text = f"{i + 1} / {len(stops)}: {stop.title}{shown}"
        self.panel.set_path_text(text)
        self.current.path_position = (i, text)  # shown again when this trace comes back
        return stop.title

    def _path_length(self) -> int:
        return len(self.current.path()) if self.current is not None else 0

    def set_playing(self, on: bool) -> None:
        """Play walks the path once, a stop per tick, and stops at its end."""
        if not on:
            self._play.stop()
            return
        n = self._path_length()
        if n == 0:
            self.stop_playing()
            return
        if self._stop >= n - 1:
            self._stop = -1  # from the start again
        self._advance(1)
        if self._stop >= n - 1:
            self.stop_playing()
        else:
            self._play.start()

    def _play_tick(self) -> None:
        n = self._path_length()
        if n == 0 or self._stop >= n - 1:
            self.stop_playing()
            return
        self._advance(1)
        if self._stop >= n - 1:
            self.stop_playing()  # the last stop stays on screen

    def stop_playing(self) -> None:
        """Stop Play (at its end, on Esc, on the user's own pan or zoom, on a new slide,
        model, trace or run) and release the Play button."""
        self._play.stop()
        self.panel.release_play()

    @property
    def playing(self) -> bool:
        return self._play.isActive()

    @property
    def stop_index(self) -> int:
        return self._stop

    def watch_navigation(self, widget) -> None:
        """Stop Play when the user moves the view from ``widget`` too (e.g. the minimap)."""
        self._watched.add(id(widget))
        widget.installEventFilter(self)

    # -- the probability trail -------------------------------------------------------------
    def go_to_step(self, index: int) -> None:
        if self.current is None:
            return
        self.stop_playing()
        step = next((s for s in self.current.trace.trail if s.index == index), None)
        if step is None:
            return
        field = self.current.trace.field_by_id(step.field_id) if step.field_id is not None else None
        if field is not None:
            x, y, w, h = field.rect
            self.canvas.center_on(x + w / 2, y + h / 2)
        self.current.trail.set_highlight(index)
        self.plot.highlight(index)

    # -- canvas events: Shift+drag rectangle, click on a trail step ---------------------------
    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        if obj is self.canvas or id(obj) in self._watched:
            if self._play.isActive() and self._moves_view(obj, event):
                self.stop_playing()  # the user takes the view: Play must not take it back
        if obj is not self.canvas or not isinstance(event, QMouseEvent):
            return False
        et = event.type()
        pos = event.position()
        if et == QEvent.Type.MouseButtonPress and event.button() == Qt.MouseButton.LeftButton:
            self._press = pos
            if event.modifiers() & Qt.KeyboardModifier.ShiftModifier and self.canvas.slide is not None:
                self._band_start = self.canvas.camera.to_level0(pos.x(), pos.y())
                if self.rubber not in self.canvas.overlays():
                    self.canvas.add_overlay(self.rubber)
                self.rubber.set_rect(None)
                return True
        elif et == QEvent.Type.MouseMove and self._band_start is not None:
            self.rubber.set_rect(self._band_rect(pos))
            self.canvas.update()
            return True
        elif et == QEvent.Type.MouseButtonRelease and event.button() == Qt.MouseButton.LeftButton:
            if self._band_start is not None:
                rect = self._band_rect(pos)
                self._band_start = None
                ok = rect[2] > 1 and rect[3] > 1
                self.rubber.set_rect(rect if ok else None)
                if ok:
                    self.panel.set_scope(Scope.DRAWN)
                    self.status.emit(f"Region {rect[2]:.0f} x {rect[3]:.0f} px: press Run to analyse it")
                self.canvas.update()
                return True
            if self._press is not None and (pos - self._press).manhattanLength() <= CLICK_SLOP_PX:
                self._click(pos)
            self._press = None
        return False

    def _moves_view(self, obj, event) -> bool:
        """Whether ``event`` is the user panning, zooming or fitting the view."""
        et = event.type()
        if et in (QEvent.Type.Wheel, QEvent.Type.MouseButtonDblClick):
            return True
        if et == QEvent.Type.KeyPress:
            return obj is self.canvas and event.key() in _NAV_KEYS
        if et == QEvent.Type.MouseButtonPress:
            return obj is not self.canvas  # a click on the minimap moves the view there
        if et == QEvent.Type.MouseMove:
            return bool(event.buttons() & Qt.MouseButton.LeftButton) and self._band_start is None
        return False

    def _band_rect(self, pos: QPointF) -> tuple[float, float, float, float]:
        s = self.canvas.slide
        ax, ay = self._band_start
        bx, by = self.canvas.camera.to_level0(pos.x(), pos.y())
        x0, x1 = sorted((min(max(ax, 0), s.width), min(max(bx, 0), s.width)))
        y0, y1 = sorted((min(max(ay, 0), s.height), min(max(by, 0), s.height)))
        return (x0, y0, x1 - x0, y1 - y0)

    def _click(self, pos: QPointF) -> None:
        if self.current is None or not self.current.trail.visible:
            return
        step = self.current.trail.step_at(self.canvas.camera, pos.x(), pos.y())
        if step is not None:
            self.go_to_step(step.index)

    def _on_cursor(self, x: float, y: float) -> None:
        if self.current is None:
            return
        parts = []
        if self.current.fields.visible:
            f = self.current.fields.field_at(x, y)
            if f is not None:
                parts.append(self.describe_field(f))
        hit = self.current.value_at(x, y)
        if hit is not None:
            parts.append(f"{hit[0]} = {hit[1]:.4g}")
        if parts:
            self.status.emit("   ".join(parts))
            self._hovering = True
        elif self._hovering:  # the pointer left: do not leave a stale description up
            self.status.emit("")
            self._hovering = False

    def describe_field(self, f: Field) -> str:
        mpp = self.canvas.slide.mpp if self.canvas.slide else None
        size = f"{f.rect[2]:.0f} x {f.rect[3]:.0f} px"
        if mpp:
            size += f" ({f.rect[2] * mpp:.0f} x {f.rect[3] * mpp:.0f} µm)"
        return f"{f.kind} {f.id}: depth {f.depth}, score {f.score:.3g}, {size}"

    # -- files -----------------------------------------------------------------------------
    def save_trace(self, path: str | os.PathLike) -> None:
        if self.current is None:
            raise TraceError("no trace to save: run a model first")
        self.current.trace.save(path)

    def export_geojson(self, path: str | os.PathLike) -> None:
        if self.current is None:
            raise TraceError("no trace to export: run a model first")
        self.current.trace.save_geojson(path)

    def open_trace(self, path: str | os.PathLike) -> TraceLayers:
        """Load a saved trace onto the open slide (which must be the slide it was made on)."""
        return self.add_trace(Trace.load(path), Path(path).name)

    def add_trace(self, trace: Trace, name: str) -> TraceLayers:
        """Show ``trace`` (opened or imported from the file ``name``) on the open slide, as
        a trace of its model; it replaces one of the same model and scope."""
        path = Path(name)
        slide = self.canvas.slide
        if slide is None:
            raise TraceError("open the slide first, then the trace")
        if (trace.slide.width, trace.slide.height) != (slide.width, slide.height):
            raise TraceError(f"{Path(path).name} was made on {Path(trace.slide.path).name} "
                             f"({trace.slide.width}x{trace.slide.height}), not on this slide")
        key = (str(slide.path), trace.model, scope_name(trace.roi))
        old = self.layers.pop(key, None)
        if old is not None:
            old.hide()
            if old is self.compare:
                self.compare = None
            if old is self.current:
                self.current = None
        layers = self._new_layers(trace)
        self.layers[key] = layers
        self.store.put_trace(key, trace)
        self.statuses[key] = RunStatus(f"Opened {Path(path).name}", done=True)
        self._last_scope[(key[0], key[1])] = key[2]
        self.panel.set_model(trace.model)  # shows the model's trace chosen last: this one
        self._show(key)
        return layers

    def figure(self, width: int, height: int):
        title = ""
        if self.current is not None and self.current.trace.probs:
            t = self.current.trace
            title = f"{t.model}: {t.prediction} ({max(t.probs):.2f})"
        return render_figure(self.canvas, width, height, None, title)

    def shutdown(self) -> None:
        self._play.stop()
        self.runs.shutdown()
