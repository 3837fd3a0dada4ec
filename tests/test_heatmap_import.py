"""Other tools' heatmaps (CLAM .h5, Slideflow .npz, CSV x,y,w,h,value) imported as traces with
one attention map, refused in one line when the file is bad, and shown, exported and scored
in the app like a model's trace."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PySide6.QtWidgets import QFileDialog, QInputDialog

from engines.heatmap_import import HeatmapImportError, ImportOptions, import_heatmap
from engines.map_export import read_map_tiff
from engines.trace import SlideRef, Trace
from tests.conftest import DEMO_SLIDE
from tests.test_main_window import (  # noqa: F401
    _sandboxed_settings,
    demo_window,
    dialogs,
    open_and_wait,
    qsettings,
)

SLIDE = SlideRef("slide.svs", 4000, 3000, 0.5)


def _clam(path, coords, scores, key="attention_scores", attrs=None):
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("coords", data=np.asarray(coords))
        for k, v in (attrs or {}).items():
            ds.attrs[k] = v
        fh.create_dataset(key, data=np.asarray(scores))
    return path


def test_clam_h5_becomes_a_grid_map_at_level0(tmp_path):
    # patches of 128 px read at level 1 (downsample 2): 256 level-0 px, a 3 x 4 grid, one missing
    coords = [(512 + 256 * c, 256 + 256 * r) for r in range(3) for c in range(4) if (r, c) != (1, 2)]
    scores = np.arange(len(coords), dtype=float) + 1
    path = _clam(tmp_path / "s1.h5", coords, scores,
                 attrs={"patch_size": 128, "patch_level": 1, "downsample": [2.0, 2.0]})
    trace = import_heatmap(path, SLIDE)
    assert trace.model == "s1.h5" and trace.preset == "clam" and len(trace.maps) == 1
    m = trace.maps[0]
    assert m.origin == (512.0, 256.0) and m.cell == (256.0, 256.0) and m.shape == (3, 4)
    v = np.array(m.values)
    assert v[1, 2] == 0.0  # no patch there
    for (x, y), s in zip(coords, scores):
        assert v[(y - 256) // 256, (x - 512) // 256] == s
    # a trace that saves and loads like a model's
    trace.save(tmp_path / "t.json")
    assert Trace.load(tmp_path / "t.json").maps[0].values == m.values


def test_clam_scores_of_n_by_1_without_a_recorded_size_need_one(tmp_path):
    coords = [(0, 0), (100, 0), (0, 100), (100, 100)]
    path = _clam(tmp_path / "a.h5", coords, [[-2.0], [0.0], [1.0], [2.0]], key="A")
    with pytest.raises(HeatmapImportError, match="patch size"):
        import_heatmap(path, SLIDE)
    m = import_heatmap(path, SLIDE, ImportOptions(patch_size=100)).maps[0]
    # raw attention logits are shifted so the lowest is 0
    assert m.values == [[0.0, 2.0], [3.0, 4.0]] and m.cell == (100.0, 100.0)


def test_overlapping_patches_average_over_the_cells_they_share(tmp_path):
    # 256 px patches every 128 px: cells of 128, the inner ones covered by four patches
    coords = [(128 * c, 128 * r) for r in range(3) for c in range(3)]
    scores = np.arange(9, dtype=float)
    m = import_heatmap(_clam(tmp_path / "o.h5", coords, scores, attrs={"patch_size": 256}),
                       SLIDE).maps[0]
    assert m.cell == (128.0, 128.0) and m.shape == (4, 4)
    v = np.array(m.values)
    assert v[1, 1] == pytest.approx(np.mean([0, 1, 3, 4]))
    assert v[0, 0] == 0.0 and v[3, 3] == 8.0


def test_slideflow_npz_grid_with_tile_size_and_masked_tiles(tmp_path):
    preds = np.full((3, 5, 2), -1.0, dtype=np.float32)
    preds[1, 2] = (0.2, 0.8)
    preds[2, 4] = (0.9, 0.1)
    unc = np.full((3, 5, 1), -1.0, dtype=np.float32)
    unc[1, 2, 0] = 0.3
    path = tmp_path / "s2.npz"
    np.savez(path, predictions=preds, uncertainty=unc)
    with pytest.raises(HeatmapImportError, match="tile size"):
        import_heatmap(path, SLIDE)
    # 256 µm tiles at 0.5 µm/px = 512 px, stride_div 2: cells of 256 px centred on the tiles
    t = import_heatmap(path, SLIDE, ImportOptions(tile_um=256))
    m = t.maps[0]
    assert t.preset == "slideflow" and m.name == "class 1"
    assert m.cell == (256.0, 256.0) and m.origin == (128.0, 128.0) and m.shape == (3, 5)
    v = np.array(m.values)
    assert v[1, 2] == pytest.approx(0.8) and v[2, 4] == pytest.approx(0.1) and v[0, 0] == 0.0
    m0 = import_heatmap(path, SLIDE, ImportOptions(patch_size=512, channel=0, stride_div=1)).maps[0]
    assert m0.cell == (512.0, 512.0) and m0.origin == (0.0, 0.0)
    assert np.array(m0.values)[2, 4] == pytest.approx(0.9)
    mu = import_heatmap(path, SLIDE, ImportOptions(tile_um=256, uncertainty=True)).maps[0]
    assert mu.name == "uncertainty" and np.array(mu.values)[1, 2] == pytest.approx(0.3)
    with pytest.raises(HeatmapImportError, match="no class 5"):
        import_heatmap(path, SLIDE, ImportOptions(tile_um=256, channel=5))


def test_csv_of_boxes(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("value,x,y,w,h,note\n0.5,1000,2000,500,500,a\n1.5,1500,2000,500,500,b\n\n"
                    "0.25,1000,2500,500,500,c\n")
    m = import_heatmap(path, SLIDE).maps[0]
    assert m.origin == (1000.0, 2000.0) and m.cell == (500.0, 500.0)
    assert m.values == [[0.5, 1.5], [0.25, 0.0]]


def _npz_with_object(path):
    np.savez(path, predictions=np.array([{"a": 1}], dtype=object))
    return path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


HOSTILE = {
    "empty.csv": lambda p: _write(p, b""),
    "header.csv": lambda p: _write(p, b"a,b,c\n1,2,3\n"),
    "letters.csv": lambda p: _write(p, b"x,y,w,h,value\n1,2,3,4,five\n"),
    "nan.csv": lambda p: _write(p, b"x,y,w,h,value\n1,2,3,4,nan\n"),
    "zero.csv": lambda p: _write(p, b"x,y,w,h,value\n1,2,0,4,1\n"),
    "binary.csv": lambda p: _write(p, bytes(range(256)) * 4),
    "offslide.csv": lambda p: _write(p, b"x,y,w,h,value\n90000,2,10,10,1\n"),
    "offgrid.csv": lambda p: _write(p, b"x,y,w,h,value\n0,0,100,100,1\n150,0,100,100,1\n"),
    "vast.csv": lambda p: _write(p, b"x,y,w,h,value\n0,0,1,1,1\n3999,2999,1,1,1\n"),
    "junk.h5": lambda p: _write(p, b"\x89HDF\r\n\x1a\n" + b"\0" * 100),
    "nocoords.h5": lambda p: _write_h5(p, {"A": [1.0]}),
    "noscores.h5": lambda p: _write_h5(p, {"coords": [[0, 0]]}),
    "mismatch.h5": lambda p: _clam(p, [[0, 0], [10, 0]], [1.0], attrs={"patch_size": 10}),
    "coords3.h5": lambda p: _clam(p, [[0, 0, 0]], [1.0], attrs={"patch_size": 10}),
    "strings.h5": lambda p: _clam(p, [[0, 0]], np.array([b"x"]), attrs={"patch_size": 10}),
    "badsize.h5": lambda p: _clam(p, [[0, 0]], [1.0], attrs={"patch_size": -4}),
    "notzip.npz": lambda p: _write(p, b"PK\x03\x04 not really"),
    "objects.npz": _npz_with_object,
    "nopreds.npz": lambda p: (np.savez(p, other=np.zeros(3)), p)[1],
    "flat.npz": lambda p: (np.savez(p, predictions=np.zeros(3)), p)[1],
    "nanpreds.npz": lambda p: (np.savez(p, predictions=np.full((2, 2), np.nan), tile_px=256.0), p)[1],
    "toolarge.npz": lambda p: (np.savez(p, predictions=np.zeros((40, 40)), tile_px=5000.0), p)[1],
    "heatmap.png": lambda p: _write(p, b"\x89PNG"),
}


def _write_h5(path, datasets):
    with h5py.File(path, "w") as fh:
        for k, v in datasets.items():
            fh.create_dataset(k, data=np.asarray(v))
    return path


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_are_refused_in_one_line(tmp_path, name):
    path = HOSTILE[name](tmp_path / name)
    with pytest.raises(HeatmapImportError) as info:
        import_heatmap(path, SLIDE)
    text = str(info.value)
    assert text.startswith(name) and "\n" not in text and len(text) <= 300


def test_a_folder_and_a_missing_file_are_refused(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    for p in (tmp_path / "dir.csv", tmp_path / "gone.h5"):
        with pytest.raises(HeatmapImportError):
            import_heatmap(p, SLIDE)


def test_an_imported_heatmap_scores_like_a_model(tmp_path):
    """The attention measure of engines.evaluate reads an imported map as it reads a model's:
    3/4 of the mass is in the left box."""
    from engines.evaluate import attention_inside

    path = tmp_path / "h.csv"
    path.write_text("x,y,w,h,value\n0,0,100,100,3\n100,0,100,100,1\n")
    trace = import_heatmap(path, SlideRef("s", 400, 300, 0.5))
    assert attention_inside(trace, [(0, 0, 100, 100)]) == pytest.approx(0.75)
    assert attention_inside(trace, [(100, 0, 100, 100)]) == pytest.approx(0.25)


# -- in the app ---------------------------------------------------------------------------------

DEMO_W, DEMO_H = 2220, 2967


@pytest.fixture
def window(qtbot, qsettings, dialogs):  # noqa: F811
    w = demo_window(qtbot, qsettings, size=(900, 640))
    yield w
    w.close()


def test_import_shows_a_trace_then_exports_contours_cells_and_tiff(qtbot, window, tmp_path,
                                                                    monkeypatch, dialogs):
    heat = tmp_path / "other_tool.csv"
    rows = ["x,y,w,h,value"] + [f"{256 * c},{256 * r},256,256,{(r * 8 + c) % 7}"
                                for r in range(11) for c in range(8)]
    heat.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(heat), ""))
    with qtbot.waitSignal(window.map_files.imported, timeout=30_000):
        window.map_files.import_action.trigger()
    current = window.inference.current
    assert current is not None and current.trace.model == "other_tool.csv"
    assert current.trace.maps[0].shape == (11, 8) and not dialogs
    keys = window.results.trace_keys(str(window.slide.path))
    assert any(k[1] == "other_tool.csv" for k in keys)
    # The Models dock names what is shown, not some model's empty list.
    combo = window.models_panel.trace_combo
    assert combo.currentText() == "other_tool.csv" and not combo.isEnabled()

    # File > Export Trace as GeoJSON… writes contours by default
    out = tmp_path / "contours.geojson"
    assert window._wait_export(window.start_export_geojson(out, show_progress=False))
    feats = json.loads(out.read_text())["features"]
    assert [f["properties"]["level"] for f in feats] == [0.01, 0.05, 0.1]
    cells = tmp_path / "cells.geojson"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(cells), ""))
    window.map_files.cells_action.trigger()
    qtbot.waitUntil(lambda: not window.exports and cells.exists(), timeout=30_000)
    assert len(json.loads(cells.read_text())["features"]) == sum(
        1 for r in range(11) for c in range(8) if (r * 8 + c) % 7)

    tif = tmp_path / "m.tif"
    assert window.map_files.export_tiff(tif)
    values, meta = read_map_tiff(tif)
    assert values.shape == (11, 8) and meta["um_per_pixel"][0] == pytest.approx(
        256 * window.slide.mpp)


def test_import_of_a_bad_file_or_another_slides_heatmap_is_one_message(qtbot, window, tmp_path, dialogs):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    with qtbot.waitSignal(window.map_files.import_failed, timeout=30_000):
        assert window.map_files.import_file(bad)  # read on a worker: the answer comes later
    far = tmp_path / "far.csv"
    far.write_text(f"x,y,w,h,value\n{DEMO_W + 10},0,100,100,1\n")
    with qtbot.waitSignal(window.map_files.import_failed, timeout=30_000):
        window.map_files.import_file(far)
    assert len(dialogs) == 2 and "another slide" in window.last_error
    assert window.inference.current is None or window.inference.current.trace.model != "far.csv"


def test_import_asks_for_the_tile_size_a_slideflow_file_does_not_record(qtbot, window, tmp_path,
                                                                       monkeypatch, dialogs):
    preds = np.zeros((4, 3, 2), dtype=np.float32)
    preds[1, 1] = (0.1, 0.9)
    path = tmp_path / "sf.npz"
    np.savez(path, predictions=preds)
    asked = []

    def answer(_parent, _title, label, *args):
        asked.append(label)
        return 300.0, True

    monkeypatch.setattr(QInputDialog, "getDouble", answer)
    with qtbot.waitSignal(window.map_files.imported, timeout=30_000) as got:
        window.map_files.import_file(path, ask=True)
    trace = got.args[0]
    assert len(asked) == 1 and "tile size" in asked[0] and not dialogs
    m = trace.maps[0]
    assert m.cell == (150.0, 150.0) and np.array(m.values)[1, 1] == pytest.approx(0.9)
    assert window.inference.current.trace is trace
