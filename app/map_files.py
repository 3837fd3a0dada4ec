"""File menu actions for attention maps that travel: the per-cell GeoJSON export (the contour
export is File > Export Trace as GeoJSON…), a map as a float TIFF, and other tools' heatmaps
imported as traces (``engines.heatmap_import``)."""
from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QFileDialog, QInputDialog

from engines.heatmap_import import HeatmapImportError, ImportOptions, import_heatmap
from engines.trace import SlideRef, Trace, TraceError

IMPORT_FILTER = ("Heatmaps (*.h5 *.hdf5 *.npz *.csv);;CLAM patches (*.h5 *.hdf5);;"
                 "Slideflow heatmap (*.npz);;CSV x,y,w,h,value (*.csv);;All files (*)")


class MapFilesController(QObject):
    imported = Signal(object)  # the Trace an import made
    import_failed = Signal(str)  # why an import did not happen

    def __init__(self, window) -> None:
        super().__init__(window)
        self.window = window
        self.cells_action = QAction("Export Attention &Cells as GeoJSON…", window)
        self.cells_action.setToolTip("One GeoJSON feature per attention cell (large); the "
                                     "GeoJSON export writes iso-contours")
        self.cells_action.triggered.connect(self.cells_dialog)
        self.tiff_action = QAction("Export &Map as Float TIFF…", window)
        self.tiff_action.triggered.connect(self.tiff_dialog)
        self.import_action = QAction("&Import Heatmap…", window)
        self.import_action.setToolTip("A CLAM .h5, Slideflow .npz or CSV x,y,w,h,value heatmap "
                                      "of the open slide, shown as a trace")
        self.import_action.triggered.connect(self.import_dialog)
        self._add_to_file_menu()

    def _add_to_file_menu(self) -> None:
        w = self.window
        menu = next((a.menu() for a in w.menuBar().actions() if a.menu() is not None
                     and a.text().replace("&", "") == "File"), None)
        if menu is None:
            menu = w.menuBar().addMenu("&File")
        actions = menu.actions()
        anchor = getattr(w, "figure_action", None)
        before = None
        if anchor in actions and actions.index(anchor) + 1 < len(actions):
            before = actions[actions.index(anchor) + 1]
        for action in (self.cells_action, self.tiff_action, self.import_action):
            if before is None:
                menu.addAction(action)
            else:
                menu.insertAction(before, action)

    # -- helpers -------------------------------------------------------------------------------
    def _trace(self) -> Trace | None:
        current = self.window.inference.current
        return None if current is None else current.trace

    def _save_path(self, title: str, suffix: str, filt: str) -> str | None:
        start = ""
        slide = self.window.slide
        trace = self._trace()
        if slide is not None:
            tag = f"-{trace.model}" if trace is not None else ""
            start = str(slide.path.with_name(f"{slide.path.stem}{tag}{suffix}"))
        path, _ = QFileDialog.getSaveFileName(self.window, title, start, filt)
        return path or None

    # -- per-cell GeoJSON ----------------------------------------------------------------------
    def cells_dialog(self) -> None:
        path = self._save_path("Export attention cells", "-cells.geojson",
                               "GeoJSON (*.geojson *.json)")
        if path:
            self.window.start_export_geojson(path, cells=True)

    # -- float TIFF ----------------------------------------------------------------------------
    def tiff_dialog(self) -> None:
        trace = self._trace()
        if trace is None or not trace.maps:
            self.window.show_error("Cannot export map", "the trace on screen has no attention "
                                   "map: run a model with maps, or import a heatmap")
            return
        name = trace.maps[0].name
        if len(trace.maps) > 1:
            names = [m.name for m in trace.maps]
            name, ok = QInputDialog.getItem(self.window, "Export map", "Map:", names, 0, False)
            if not ok:
                return
        path = self._save_path("Export map as float TIFF", f"-{name}.tif", "TIFF (*.tif *.tiff)")
        if path:
            self.start_export_tiff(path, name)

    def start_export_tiff(self, path: str | os.PathLike, map_name: str | None = None,
                          show_progress: bool = True):
        """Write a map of the trace on screen (the first when ``map_name`` is None) as a
        pyramidal float TIFF in a worker; the ExportJob, or None when there is no map."""
        from engines.map_export import save_map_tiff

        w = self.window
        trace = self._trace()
        maps = [m for m in (trace.maps if trace else []) if map_name in (None, m.name)]
        if not maps:
            w.show_error("Cannot export map", "the trace on screen has no such attention map")
            return None
        amap, target = maps[0], Path(path)
        mpp = trace.slide.mpp if trace.slide.mpp else (w.slide.mpp if w.slide is not None else None)

        def work(_cancel, progress) -> None:
            progress(0, 0)
            save_map_tiff(amap, target, mpp, model=trace.model)

        return w._run_export(f"Exporting {target.name}…", target, work, show_progress,
                             lambda msg: w.show_error("Cannot export map", msg))

    def export_tiff(self, path: str | os.PathLike, map_name: str | None = None) -> bool:
        """``start_export_tiff`` waited for: for scripts and tests."""
        return self.window._wait_export(self.start_export_tiff(path, map_name, show_progress=False))

    # -- import --------------------------------------------------------------------------------
    def import_dialog(self) -> None:
        slide = self.window.slide
        start = str(slide.path.parent) if slide is not None else ""
        path, _ = QFileDialog.getOpenFileName(self.window, "Import heatmap", start, IMPORT_FILTER)
        if path:
            self.import_file(path, ask=True)

    def import_file(self, path: str | os.PathLike, options: ImportOptions | None = None,
                    ask: bool = False) -> bool:
        """Import ``path`` as a trace of the open slide and show it like a model's. The file is
        read on a worker; ``imported`` (the Trace) or ``import_failed`` (the message, also shown)
        follows. With ``ask``, a file that does not record its patch or tile size asks for it
        and is read again. False when there is no slide to import onto."""
        w = self.window
        slide = w.slide
        if slide is None:
            self._fail("open the slide the heatmap was made on first")
            return False
        ref = SlideRef(path=str(slide.path), width=slide.width, height=slide.height, mpp=slide.mpp)
        options = options or ImportOptions()
        name = Path(path).name
        w.statusBar().showMessage(f"Reading {name}…")

        def failed(exc: BaseException) -> None:
            if w.slide is None or str(w.slide.path) != ref.path:
                return  # another slide is open now
            if isinstance(exc, HeatmapImportError) and ask and "size" in str(exc) and options.patch_size is None:
                size, ok = QInputDialog.getDouble(
                    w, "Import heatmap", f"{exc}\n\nPatch/tile width in level-0 pixels:", 256.0, 1.0, 1e6, 1)
                if ok:
                    options.patch_size = size
                    w._jobs.submit(lambda: import_heatmap(path, ref, options), done, failed)
                return
            self._fail(str(exc) if isinstance(exc, (HeatmapImportError, TraceError)) else f"{name}: {exc}")

        def done(trace: Trace) -> None:
            if w.slide is None or str(w.slide.path) != ref.path:
                return
            try:
                w.inference.add_trace(trace, name)
            except TraceError as exc:
                self._fail(str(exc))
                return
            w.statusBar().showMessage(f"Imported {name} as a trace", 8000)
            self.imported.emit(trace)

        return w._jobs.submit(lambda: import_heatmap(path, ref, options), done, failed)

    def _fail(self, message: str) -> None:
        self.window.show_error("Cannot import heatmap", message)
        self.import_failed.emit(message)


def install_map_files(window) -> MapFilesController:
    return MapFilesController(window)
