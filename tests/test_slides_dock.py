"""Projects in the window: File > Open Project and Recent Projects, and the Slides dock
(rows, thumbnails, sorting, filtering, live results, opening and stepping through slides)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import QPoint, Qt

from app.slides_model import MISSING_COLOUR, RIGHT, WRONG
from engines.cohort import SlideResult
from tests.conftest import DATA
from tests.test_main_window import _sandboxed_settings, dialogs, make_window, qsettings  # noqa: F401
from viewer.thumbnails import THUMB_SIZE, THUMBS_DIR

TIMEOUT_MS = 20_000
# name, label, split, colour
SLIDES = [("alpha.png", "tumor", "train", (200, 60, 60)), ("bravo.png", "normal", "train", (60, 200, 60)),
          ("charlie.png", "tumor", "test", (60, 60, 200)), ("delta.png", "normal", "val", (200, 200, 60))]


def _write_slides(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, _label, _split, colour) in enumerate(SLIDES):
        arr = np.full((160 + 20 * i, 240, 3), colour, np.uint8)
        arr[40:80, 60:120] = 255 - np.asarray(colour, np.uint8)
        Image.fromarray(arr).save(folder / name)
        paths.append(folder / name)
    return paths


def _write_manifest(folder: Path, extra: list[str] = ()) -> Path:
    _write_slides(folder)
    manifest = folder / "cohort.csv"
    rows = ["slide,label,split"] + [f"{n},{lab},{sp}" for n, lab, sp, _c in SLIDES] + list(extra)
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@pytest.fixture
def window(qtbot, qsettings, dialogs):  # noqa: F811
    return make_window(qtbot, qsettings, size=(1300, 900))


def open_project(qtbot, window, path: Path):
    with qtbot.waitSignal(window.projects.opened, timeout=TIMEOUT_MS):
        window.open_project(path)
    panel = window.slides_panel
    qtbot.waitUntil(lambda: panel.proxy.rowCount() == len(window.results.project.slides),
                    timeout=TIMEOUT_MS)
    return panel


def names(panel) -> list[str]:
    col = _column(panel, "name")
    return [panel.proxy.index(r, col).data() for r in range(panel.proxy.rowCount())]


def _column(panel, kind: str, run: str = "") -> int:
    for i, c in enumerate(panel.model.columns):
        if c.kind == kind and (not run or c.run == run):
            return i
    raise AssertionError(f"no {kind} column in {panel.model.columns}")


def _cell(panel, row_name: str, kind: str, run: str = "", role=Qt.ItemDataRole.DisplayRole):
    col = _column(panel, kind, run)
    for r in range(panel.proxy.rowCount()):
        if panel.proxy.index(r, _column(panel, "name")).data() == row_name:
            return panel.proxy.index(r, col).data(role)
    raise AssertionError(f"{row_name} not listed")


def _click_row(qtbot, panel, row: int) -> None:
    table = panel.table
    rect = table.visualRect(panel.proxy.index(row, _column(panel, "name")))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def _inject_run(window, name: str, predictions: dict[str, tuple[str, float]], ratio=None) -> None:
    from engines.project import ProjectRun

    store = window.results
    classes = ["normal", "tumor"]
    store.add_run(ProjectRun(name=name, model="magnet", preset="tiny", checkpoint=None,
                             out=Path("/nonexistent"), classes=classes, results={}))
    for slide in store.project.slides:
        if slide.name not in predictions:
            continue
        predicted, p = predictions[slide.name]
        probs = [1 - p, p] if predicted == "tumor" else [p, 1 - p]
        result = SlideResult(name=slide.name, key=slide.key, label=slide.label, split=slide.split,
                             run={}, file=None, classes=classes, probs=probs, predicted=predicted)
        if ratio is not None:
            result.ratio, result.dice = ratio, 0.25
        store.add_result(name, result)


def test_open_folder_lists_slides_and_thumbnails_arrive_and_are_cached(qtbot, window, tmp_path, dialogs):
    paths = _write_slides(tmp_path / "slides")
    panel = open_project(qtbot, window, tmp_path / "slides")
    assert names(panel) == [p.name for p in paths]
    assert window.slides_dock.isVisible()
    qtbot.waitUntil(lambda: len(panel.model.thumbs) == len(paths), timeout=TIMEOUT_MS)
    thumb = _cell(panel, "alpha.png", "thumb", role=Qt.ItemDataRole.DecorationRole)
    assert thumb is not None and max(thumb.width(), thumb.height()) == THUMB_SIZE
    assert len(list((tmp_path / "slides" / THUMBS_DIR).glob("*.png"))) == len(paths)
    # Opened again, the thumbnails come from the cache, not from the slides.
    from viewer import thumbnails

    made = []
    real = thumbnails.make_thumbnail
    thumbnails.make_thumbnail = lambda *a, **k: made.append(a) or real(*a, **k)
    try:
        panel = open_project(qtbot, window, tmp_path / "slides")
        qtbot.waitUntil(lambda: len(panel.model.thumbs) == len(paths), timeout=TIMEOUT_MS)
    finally:
        thumbnails.make_thumbnail = real
    assert made == []
    assert dialogs == []


def test_sort_by_label_and_filters(qtbot, window, tmp_path):
    panel = open_project(qtbot, window, _write_manifest(tmp_path / "cohort"))
    header = panel.table.horizontalHeader()
    label_col = _column(panel, "label")
    x = header.sectionViewportPosition(label_col) + header.sectionSize(label_col) // 2
    qtbot.mouseClick(header.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(x, header.height() // 2))
    labels = [panel.proxy.index(r, label_col).data() for r in range(4)]
    assert labels == sorted(labels) and labels != [s[1] for s in SLIDES]

    panel.set_filter_text("CHAR")
    assert names(panel) == ["charlie.png"]
    panel.set_filter_text("")
    assert panel.set_filter_mode("split", "train")
    assert sorted(names(panel)) == ["alpha.png", "bravo.png"]
    assert panel.set_filter_mode("label", "normal")
    assert sorted(names(panel)) == ["bravo.png", "delta.png"]
    assert not panel.set_filter_mode("label", "no such label")
    panel.set_filter_mode("all")
    assert len(names(panel)) == 4


def test_results_fill_in_live_and_misclassified_filter(qtbot, window, tmp_path):
    panel = open_project(qtbot, window, _write_manifest(tmp_path / "cohort"))
    assert panel.set_filter_mode("misclassified")
    assert names(panel) == []  # no run yet: nothing is wrong
    _inject_run(window, "magnet tiny", {"alpha.png": ("tumor", 0.9), "bravo.png": ("tumor", 0.7),
                                        "charlie.png": ("normal", 0.6)})
    assert sorted(names(panel)) == ["bravo.png", "charlie.png"]
    panel.set_filter_mode("all")
    assert _cell(panel, "alpha.png", "correct") == RIGHT
    assert _cell(panel, "bravo.png", "correct") == WRONG
    assert _cell(panel, "bravo.png", "prob") == "0.700"
    assert _cell(panel, "delta.png", "predicted") == ""  # not run yet
    panel.table.sortByColumn(_column(panel, "prob"), Qt.SortOrder.DescendingOrder)
    assert names(panel) == ["alpha.png", "bravo.png", "charlie.png", "delta.png"]
    panel.table.sortByColumn(_column(panel, "prob"), Qt.SortOrder.AscendingOrder)
    assert names(panel) == ["delta.png", "charlie.png", "bravo.png", "alpha.png"]

    # A result arriving later changes its own cells (and passes the filter).
    changed = []
    panel.model.dataChanged.connect(lambda a, b, *_r: changed.append((a.row(), b.row())))
    store = window.results
    slide = next(s for s in store.project.slides if s.name == "delta.png")
    store.add_result("magnet tiny", SlideResult(
        name=slide.name, key=slide.key, label=slide.label, split=slide.split, run={}, file=None,
        classes=["normal", "tumor"], probs=[0.2, 0.8], predicted="tumor"))
    assert changed and all(a == b == panel.model.row_of_key(slide.key) for a, b in changed)
    assert _cell(panel, "delta.png", "correct") == WRONG
    # Sorted by probability, the new result moves its row (once results pause).
    qtbot.waitUntil(lambda: names(panel) == ["charlie.png", "bravo.png", "delta.png", "alpha.png"],
                    timeout=TIMEOUT_MS)
    panel.set_filter_mode("misclassified")
    assert sorted(names(panel)) == ["bravo.png", "charlie.png", "delta.png"]

    # A second run with attention ratios: a chooser appears, and its ratio column.
    _inject_run(window, "zoom_in tiny", {n: ("tumor", 0.55) for n, *_r in SLIDES}, ratio=2.5)
    assert panel.run_combo.isVisibleTo(panel)
    panel.set_filter_mode("all")
    assert _cell(panel, "alpha.png", "ratio", "zoom_in tiny") == "2.50"
    assert _cell(panel, "alpha.png", "dice", "zoom_in tiny") == "0.25"
    panel.choose_run("magnet tiny")
    assert not any(c.kind == "ratio" for c in panel.model.columns)
    panel.set_filter_mode("misclassified")
    assert sorted(names(panel)) == ["bravo.png", "charlie.png", "delta.png"]


def test_click_opens_slide_and_page_keys_step_in_sorted_order(qtbot, window, tmp_path):
    panel = open_project(qtbot, window, _write_manifest(tmp_path / "cohort"))
    panel.table.sortByColumn(_column(panel, "name"), Qt.SortOrder.DescendingOrder)
    order = names(panel)
    assert order == sorted(order, reverse=True)
    with qtbot.waitSignal(window.slide_opened, timeout=TIMEOUT_MS) as opened:
        _click_row(qtbot, panel, 0)
    assert Path(opened.args[0]).name == order[0]

    window.canvas.setFocus()
    for key, expected in ((Qt.Key.Key_PageDown, order[1]), (Qt.Key.Key_PageDown, order[2]),
                          (Qt.Key.Key_PageUp, order[1])):
        with qtbot.waitSignal(window.slide_opened, timeout=TIMEOUT_MS) as opened:
            qtbot.keyClick(window.canvas, key)
        assert Path(opened.args[0]).name == expected
        selected = panel.table.selectionModel().selectedRows()
        assert [panel.proxy.index(i.row(), _column(panel, "name")).data() for i in selected] == [expected]
    with qtbot.waitSignal(window.slide_opened, timeout=TIMEOUT_MS) as opened:
        qtbot.keyClick(window.canvas, Qt.Key.Key_BracketRight, Qt.KeyboardModifier.ControlModifier)
    assert Path(opened.args[0]).name == order[2]
    with qtbot.waitSignal(window.slide_opened, timeout=TIMEOUT_MS) as opened:
        qtbot.keyClick(window.canvas, Qt.Key.Key_BracketLeft, Qt.KeyboardModifier.ControlModifier)
    assert Path(opened.args[0]).name == order[1]

    # Enter on a row opens it too; a slide opened elsewhere selects its row.
    panel.table.setFocus()
    panel.table.setCurrentIndex(panel.proxy.index(3, 0))
    with qtbot.waitSignal(window.slide_opened, timeout=TIMEOUT_MS) as opened:
        qtbot.keyClick(panel.table, Qt.Key.Key_Return)
    assert Path(opened.args[0]).name == order[3]
    with qtbot.waitSignal(window.slide_opened, timeout=TIMEOUT_MS):
        window.open_slide(tmp_path / "cohort" / order[2])
    rows = panel.table.selectionModel().selectedRows()
    assert [r.row() for r in rows] == [2]


def test_missing_and_unreadable_slides_are_greyed_or_placeholders(qtbot, window, tmp_path, dialogs):
    folder = tmp_path / "cohort"
    bad = sorted((DATA / "bad").iterdir())[0]
    manifest = _write_manifest(folder, extra=["gone.png,tumor,test", f"broken{bad.suffix},normal,test"])
    shutil.copy(bad, folder / f"broken{bad.suffix}")
    panel = open_project(qtbot, window, manifest)
    qtbot.waitUntil(lambda: panel.model.missing != set(), timeout=TIMEOUT_MS)
    brush = _cell(panel, "gone.png", "name", role=Qt.ItemDataRole.ForegroundRole)
    assert brush is not None and brush.color() == MISSING_COLOUR
    assert "not found" in _cell(panel, "gone.png", "name", role=Qt.ItemDataRole.ToolTipRole)
    assert _cell(panel, "alpha.png", "name", role=Qt.ItemDataRole.ForegroundRole) is None
    qtbot.waitUntil(lambda: f"{folder / ('broken' + bad.suffix)}" in panel.model.failed_thumbs,
                    timeout=TIMEOUT_MS)
    assert _cell(panel, f"broken{bad.suffix}", "thumb", role=Qt.ItemDataRole.DecorationRole) is not None
    assert _cell(panel, "gone.png", "thumb", role=Qt.ItemDataRole.DecorationRole) is not None
    assert dialogs == []


def test_filter_to_chosen_slides_shows_a_chip_that_clears_it(qtbot, window, tmp_path):
    panel = open_project(qtbot, window, _write_manifest(tmp_path / "cohort"))
    keys = [s.key for s in window.results.project.slides if s.name in ("alpha.png", "delta.png")]
    panel.set_filter_keys(keys, "ROC point 0.4")
    assert sorted(names(panel)) == ["alpha.png", "delta.png"]
    assert panel.chip.isVisibleTo(panel) and "ROC point 0.4" in panel.chip.text()
    qtbot.mouseClick(panel.chip, Qt.MouseButton.LeftButton)
    assert len(names(panel)) == 4 and not panel.chip.isVisibleTo(panel)


def test_recent_projects_reopen_and_a_bad_project_keeps_the_open_one(qtbot, window, tmp_path, dialogs):
    manifest = _write_manifest(tmp_path / "one")
    folder = tmp_path / "two"
    _write_slides(folder)
    open_project(qtbot, window, manifest)
    open_project(qtbot, window, folder)
    menu = window.projects.ui.recent_menu
    menu.aboutToShow.emit()
    entries = [a for a in menu.actions() if a.statusTip()]
    assert [Path(a.toolTip()) for a in entries] == [folder.resolve(), manifest.resolve()]
    assert "cohort.csv" in entries[1].text()
    with qtbot.waitSignal(window.projects.opened, timeout=TIMEOUT_MS):
        entries[1].trigger()
    assert Path(window.results.project.source).resolve() == manifest.resolve()

    with qtbot.waitSignal(window.projects.failed, timeout=TIMEOUT_MS) as failed:
        window.open_project(tmp_path / "nothing-here.csv")
    assert len(dialogs) == 1 and "\n" not in dialogs[0][1]
    assert dialogs[0][1] == failed.args[0]
    assert Path(window.results.project.source).resolve() == manifest.resolve()
    assert len(names(window.slides_panel)) == 4


def test_thumbnails_only_for_visible_rows_newest_request_first(qtbot, window, tmp_path):
    folder = tmp_path / "many"
    first = _write_slides(folder)[0]
    for i in range(60):
        shutil.copyfile(first, folder / f"copy-{i:02d}.png")
    panel = open_project(qtbot, window, folder)
    qtbot.waitUntil(lambda: len(panel.model.thumbs) > 0 and panel.thumbnails.pending() == 0,
                    timeout=TIMEOUT_MS)
    shown = len(panel.model.thumbs)
    assert 0 < shown < 64  # the rows on screen, not the whole list
    last = panel.model.slide_at(panel.proxy.mapToSource(panel.proxy.index(63, 0)).row())
    assert str(last.path) not in panel.model.thumbs
    panel.table.scrollToBottom()
    qtbot.waitUntil(lambda: str(last.path) in panel.model.thumbs, timeout=TIMEOUT_MS)


def test_thumbnail_loader_runs_newest_request_first_and_drops_unwanted(qtbot, tmp_path, monkeypatch):
    import threading

    from viewer import thumbnails

    paths = [str(p) for p in _write_slides(tmp_path / "s")]
    gate = threading.Event()
    real = thumbnails.make_thumbnail

    def slow_first(path, size, check=None):
        if path == paths[0]:
            gate.wait(10)
        return real(path, size, check)

    monkeypatch.setattr(thumbnails, "make_thumbnail", slow_first)
    loader = thumbnails.ThumbnailLoader()
    loader.reset(tmp_path / "s")
    arrived: list[str] = []
    loader.ready.connect(lambda path, _image: arrived.append(path))
    loader.request(paths[0])  # the worker is busy with this one until the gate opens
    qtbot.waitUntil(lambda: paths[0] in loader._inflight, timeout=TIMEOUT_MS)
    for p in paths[1:]:
        loader.request(p)
    loader.keep_only(paths[:3])  # the last was scrolled away before its turn
    gate.set()
    qtbot.waitUntil(lambda: len(arrived) == 3, timeout=TIMEOUT_MS)
    assert arrived == [paths[0], paths[2], paths[1]]
    assert loader.wait_idle(5000) and arrived == [paths[0], paths[2], paths[1]]
    loader.shutdown()


def test_save_project_writes_beside_the_manifest_and_reopens_with_its_runs(qtbot, window, tmp_path):
    manifest = _write_manifest(tmp_path / "cohort")
    open_project(qtbot, window, manifest)
    _inject_run(window, "magnet tiny", {"alpha.png": ("normal", 0.8)})
    with qtbot.waitSignal(window.projects.saved, timeout=TIMEOUT_MS) as saved:
        assert window.projects.save()
    written = Path(saved.args[0])
    assert written == tmp_path / "cohort" / "cohort.maglens.json" and written.is_file()
    assert window.results.project.path == written
    window.results.set_project(None)
    assert window.slides_panel.proxy.rowCount() == 0
    panel = open_project(qtbot, window, written)
    assert _cell(panel, "alpha.png", "correct") == WRONG
    assert Path(window.projects.recent.paths()[0]) == written.resolve()


def test_annotations_for_a_whole_project_come_from_a_folder_and_show_on_the_open_slide(qtbot, window, tmp_path):
    """File > Import Annotations for Project: each slide takes the file named after it; a
    broken file is reported, not fatal; the open slide shows its new annotations at once."""
    from engines.annotations import rect_annotation, write_geojson
    from engines.project import open_project as read_project
    from tests.test_main_window import open_and_wait

    _write_slides(tmp_path / "slides")
    open_project(qtbot, window, tmp_path / "slides")
    project = window.results.project
    first, second = project.slides[0], project.slides[1]
    open_and_wait(qtbot, window, first.path)
    assert window.annotations.doc.items == []
    marks = tmp_path / "marks"
    marks.mkdir()
    write_geojson(marks / f"{first.path.stem}.geojson", [rect_annotation((10, 10, 40, 40), "Tumor"),
                                                         rect_annotation((60, 60, 20, 20), "Stroma")])
    (marks / f"{second.path.stem}.geojson").write_text("{not json")
    with qtbot.waitSignal(window.projects.annotations_imported, timeout=TIMEOUT_MS) as got:
        window.projects.import_annotations(marks)
    assert got.args == [1, 1]
    assert project.slide(first.key).annotations == marks / f"{first.path.stem}.geojson"
    qtbot.waitUntil(lambda: len(window.annotations.doc.items) == 2, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: project.path is not None and project.path.is_file(), timeout=TIMEOUT_MS)
    again = read_project(project.path)
    assert again.slide(first.key).annotations.resolve() == (marks / f"{first.path.stem}.geojson").resolve()
