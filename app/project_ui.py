"""Projects in the window: File > Open Project…, Open Recent Project, Save Project, and the
Slides dock that lists the open project's slides.

A project opens on a worker (``engines.project.open_project`` reads a manifest or lists a
folder); the window's results store then holds it and every view follows the store's
signals. A project that cannot be opened leaves the open one in place and says why in one line.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QFileDialog, QMainWindow, QMenu

from app.recent_labels import distinguishing_labels
from engines.annotations import AnnotationError, annotation_file_for, load_annotations
from app.settings import RecentPaths
from app.slides_dock import SlidesNavigator, SlidesPanel

RECENT_PROJECTS_KEY = "recent/projects"
PROJECT_FILTER = "Projects (*.maglens.json *.csv);;Project files (*.maglens.json);;Manifests (*.csv);;All files (*)"
CLOSE_WAIT_MS = 2000
DOCK_WIDTH = 470


def one_line(exc: BaseException) -> str:
    """An error as one line: a manifest's list of problems is joined, capped at three."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    if len(lines) == 1:
        return lines[0]
    head, rest = lines[0].rstrip(":"), lines[1:]
    more = f" (and {len(rest) - 3} more)" if len(rest) > 3 else ""
    return f"{head}: {'; '.join(rest[:3])}{more}"


class ProjectsController(QObject):
    """Opens and saves projects for ``window``; the project itself lives in ``window.results``."""

    opened = Signal(object)  # the Project now open
    failed = Signal(str)  # the one-line message shown
    saved = Signal(str)  # path of the project file written
    annotations_imported = Signal(int, int)  # slides given annotations, files that could not be read

    def __init__(self, window: QMainWindow) -> None:
        super().__init__(window)
        self.window = window
        # Folders count too (a project may be one), hence exists rather than isfile.
        self.recent = RecentPaths(window.settings.qsettings, RECENT_PROJECTS_KEY, exists=os.path.exists)
        self._token = 0
        self.opening: str | None = None

    @property
    def project(self):
        return self.window.results.project

    # -- opening -------------------------------------------------------------------------
    def open_dialog(self) -> None:
        start = str(Path(self.project.source).parent) if self.project is not None else str(Path.home())
        path = QFileDialog.getOpenFileName(self.window, "Open project file or manifest", start,
                                           PROJECT_FILTER)[0]
        if path:
            self.open(path)

    def open_folder_dialog(self) -> None:
        start = str(Path(self.project.source).parent) if self.project is not None else str(Path.home())
        path = QFileDialog.getExistingDirectory(self.window, "Open a folder of slides as a project", start)
        if path:
            self.open(path)

    def open(self, path: str | os.PathLike) -> None:
        """Open ``path`` (a project file, a manifest or a folder) on a worker; ``opened`` or
        ``failed`` follows. The last request wins."""
        from engines.project import open_project

        self._token += 1
        token, text = self._token, str(path)
        self.opening = text
        self.window.statusBar().showMessage(f"Opening project {Path(text).name}…")
        submitted = self.window._jobs.submit(
            lambda: open_project(text),
            lambda project: self._on_opened(token, text, project),
            lambda exc: self._on_failed(token, text, exc),
        )
        if not submitted:
            self.opening = None

    def _on_opened(self, token: int, path: str, project) -> None:
        if token != self._token:
            return
        self.opening = None
        self.window.results.set_project(project)
        self.recent.add(project.path or project.source)
        self.window.statusBar().showMessage(
            f"Project {Path(path).name}: {len(project.slides):,} slides", 5000)
        self.opened.emit(project)

    def _on_failed(self, token: int, path: str, exc: BaseException) -> None:
        if token != self._token:
            return
        self.opening = None
        self.window.statusBar().clearMessage()
        message = one_line(exc)
        if Path(path).name not in message:
            message = f"{Path(path).name}: {message}"
        self.window.show_error("Cannot open project", message)
        self.failed.emit(message)

    # -- saving --------------------------------------------------------------------------
    def save_dialog(self) -> None:
        project = self.project
        if project is None:
            self.window.show_error("Nothing to save", "Open a project first.")
            return
        from engines.project import PROJECT_SUFFIX, default_project_file

        start = str(project.path or default_project_file(project.source))
        path, _ = QFileDialog.getSaveFileName(self.window, "Save project", start,
                                              f"Projects (*{PROJECT_SUFFIX})")
        if path:
            if not path.endswith(PROJECT_SUFFIX):
                path += PROJECT_SUFFIX
            self.save(path)

    def save(self, path: str | os.PathLike | None = None) -> bool:
        """Write the project (atomically) on a worker; ``saved`` follows. Without ``path``
        it goes to the project's own file, or to the default file beside its source."""
        project = self.project
        if project is None:
            self.window.show_error("Nothing to save", "Open a project first.")
            return False
        target = str(path) if path is not None else None
        # Results keep arriving on this thread while the worker writes: it writes a copy.
        snapshot = dataclasses.replace(
            project, slides=list(project.slides),
            runs=[dataclasses.replace(r, results=dict(r.results)) for r in project.runs],
            map_display={k: dict(v) for k, v in project.map_display.items()})

        def done(written) -> None:
            project.path = Path(written)
            self.recent.add(written)
            self.window.statusBar().showMessage(f"Saved {Path(written).name}", 5000)
            self.saved.emit(str(written))

        def failed(exc: BaseException) -> None:
            self.window.show_error("Cannot save project", one_line(exc))

        return self.window._jobs.submit(lambda: snapshot.save(target), done, failed)

    # -- annotations for every slide ---------------------------------------------------
    def import_annotations(self, folder: str | os.PathLike) -> bool:
        """Take each slide's annotations from the file named after it in ``folder``
        (``<stem>.geojson``, ``.json`` or ``.xml``; QuPath or ASAP), read on a worker to check
        them; the project then points at them and is saved. ``annotations_imported`` follows."""
        project = self.project
        if project is None:
            self.window.show_error("No project", "Open a project first.")
            return False
        slides = [(s.key, s.path) for s in project.slides]

        def work():
            found, bad = {}, []
            for key, path in slides:
                source = annotation_file_for(folder, path)
                if source is None:
                    continue
                try:
                    found[key] = (source, len(load_annotations(source)))
                except (AnnotationError, OSError) as exc:
                    bad.append(one_line(exc))
            return found, bad

        def done(result) -> None:
            found, bad = result
            if self.project is not project:
                return  # another project was opened meanwhile
            for key, (source, _n) in found.items():
                project.slide(key).annotations = Path(source)
            count = sum(n for _s, n in found.values())
            text = f"Annotations for {len(found)} of {len(slides)} slides ({count:,} in all)"
            if bad:
                text += f"; {len(bad)} file(s) not read, first: {bad[0]}"
            self.window.statusBar().showMessage(text, 10_000)
            if found:
                self.save()
                reload = getattr(getattr(self.window, "annotations", None), "reload", None)
                if reload is not None:
                    reload()
            self.annotations_imported.emit(len(found), len(bad))

        def failed(exc: BaseException) -> None:
            self.window.show_error("Cannot import annotations", one_line(exc))

        return self.window._jobs.submit(work, done, failed)

    def import_annotations_dialog(self) -> None:
        if self.project is None:
            return
        start = str(Path(self.project.source).parent)
        folder = QFileDialog.getExistingDirectory(self.window, "Folder of annotation files named after the slides", start)
        if folder:
            self.import_annotations(folder)

    # -- recent --------------------------------------------------------------------------
    def rebuild_recent_menu(self, menu: QMenu) -> None:
        menu.clear()
        paths = self.recent.paths()
        if not paths:
            menu.addAction("No recent projects").setEnabled(False)
            return
        for i, (path, name) in enumerate(zip(paths, distinguishing_labels(paths)), start=1):
            action = menu.addAction(f"&{i % 10}  {name}" if i <= 10 else name)
            action.setToolTip(path)
            action.setStatusTip(path)
            action.triggered.connect(lambda _checked=False, p=path: self.open(p))
        menu.addSeparator()
        menu.addAction("Clear Recent Projects").triggered.connect(self.recent.clear)


class ProjectsUi(QObject):
    """Everything ``install_projects`` adds, kept together: the controller, the Slides dock,
    its navigator and the menu actions."""

    def __init__(self, window: QMainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.controller = ProjectsController(window)
        self._sized = False
        store = window.results
        self.panel = SlidesPanel(store.result, store.runs, window)
        self.dock = window.add_dock("Slides", "slides_dock", self.panel,
                                    Qt.DockWidgetArea.LeftDockWidgetArea, beside=window.properties_dock)
        window.properties_dock.raise_()
        self.navigator = SlidesNavigator(window, self.panel)
        self._build_actions()
        store.project_changed.connect(self._on_project_changed)
        store.run_added.connect(self.panel.run_added)
        store.result_changed.connect(self.panel.result_changed)
        if store.project is not None:
            self._on_project_changed(store.project)
        window.installEventFilter(self)

    def _build_actions(self) -> None:
        w, c = self.window, self.controller
        self.open_action = self._action("Open &Project…", c.open_dialog, "Ctrl+Shift+O")
        self.open_folder_action = self._action("Open Folder as Project…", c.open_folder_dialog)
        self.recent_menu = QMenu("Open Recent Pro&ject", w)
        self.recent_menu.aboutToShow.connect(lambda: c.rebuild_recent_menu(self.recent_menu))
        c.rebuild_recent_menu(self.recent_menu)
        self.save_action = self._action("Sa&ve Project", self._save)
        self.save_as_action = self._action("Save Project &As…", c.save_dialog)
        self.import_annotations_action = self._action("Import Annotations for Project…",
                                                      c.import_annotations_dialog)
        file_menu = _menu_holding(w, w.open_action)
        if file_menu is not None:
            anchor = _action_after(file_menu, w.recent_menu.menuAction())
            file_menu.insertSeparator(anchor)
            for action in (self.open_action, self.open_folder_action):
                file_menu.insertAction(anchor, action)
            file_menu.insertMenu(anchor, self.recent_menu)
            for action in (self.save_action, self.save_as_action, self.import_annotations_action):
                file_menu.insertAction(anchor, action)
        # Window-wide, so they work from the canvas; "[" "]" step a trace, Esc cancels a run.
        self.next_action = self._action("&Next Slide in List", lambda: self.navigator.step(1))
        self.next_action.setShortcuts([QKeySequence(Qt.Key.Key_PageDown), QKeySequence("Ctrl+]")])
        self.previous_action = self._action("P&revious Slide in List", lambda: self.navigator.step(-1))
        self.previous_action.setShortcuts([QKeySequence(Qt.Key.Key_PageUp), QKeySequence("Ctrl+[")])
        view_menu = w.view_menu
        view_menu.addSeparator()
        view_menu.addAction(self.next_action)
        view_menu.addAction(self.previous_action)
        self._update_actions()

    def _action(self, text: str, slot, shortcut: str | None = None) -> QAction:
        action = QAction(text, self.window)
        if shortcut:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(lambda _checked=False: slot())
        self.window.addAction(action)
        return action

    def _save(self) -> None:
        project = self.controller.project
        if project is not None and project.path is None:
            self.controller.save_dialog()  # never saved: ask where, beside its source
        else:
            self.controller.save()

    def _on_project_changed(self, project) -> None:
        self.panel.set_project(project)
        self.navigator.project_changed()
        self._update_actions()
        # The open slide's annotations may now come from the project.
        reload = getattr(getattr(self.window, "annotations", None), "reload", None)
        if reload is not None and self.window.slide is not None:
            reload()
        if project is not None:
            self.dock.show()
            self.dock.raise_()
            if not self._sized:  # wide enough for a run's columns; the user's width is kept after
                self._sized = True
                QTimer.singleShot(0, lambda: self.window.resizeDocks(
                    [self.dock], [DOCK_WIDTH], Qt.Orientation.Horizontal))

    def _update_actions(self) -> None:
        has = self.window.results.project is not None
        for action in (self.save_action, self.save_as_action, self.import_annotations_action,
                       self.next_action, self.previous_action):
            action.setEnabled(has)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        if obj is self.window and event.type() == QEvent.Type.Close:
            self.panel.shutdown(CLOSE_WAIT_MS)
        return False


def _menu_holding(window: QMainWindow, action: QAction) -> QMenu | None:
    for top in window.menuBar().actions():
        menu = top.menu()
        if menu is not None and action in menu.actions():
            return menu
    return None


def _action_after(menu: QMenu, action: QAction) -> QAction | None:
    actions = menu.actions()
    i = actions.index(action) if action in actions else len(actions) - 1
    return actions[i + 1] if i + 1 < len(actions) else None


def install_projects(window: QMainWindow) -> ProjectsController:
    """Add projects to ``window``: File menu entries, the Slides dock and slide stepping.
    Sets ``window.projects`` (this controller), ``window.open_project`` (its ``open``),
    ``window.slides_panel`` and ``window.slides_dock``."""
    ui = ProjectsUi(window)
    controller = ui.controller
    controller.ui = ui
    window.projects = controller
    window.open_project = controller.open
    window.slides_panel = ui.panel
    window.slides_dock = ui.dock
    return controller
