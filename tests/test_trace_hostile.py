"""Hostile trace files are refused with one TraceError naming the file; NaN never enters a
trace a model makes, so every trace saved opens again; GeoJSON export writes only the cells
that carry attention, streamed, atomically, with progress and cancel."""
from __future__ import annotations

import json
import os
import random
import stat
import threading

import pytest

from engines import trace_check
from engines.trace import (
    AttentionMap,
    ExportCancelled,
    Field,
    SlideRef,
    Trace,
    TraceError,
    TrailStep,
)


def _good() -> dict:
    t = Trace(model="magnet", preset="tiny", checkpoint=None,
              slide=SlideRef("/x/slide.svs", 2220, 2967, 0.5), classes=["normal", "tumor"],
              probs=[0.4, 0.6], roi=None)
    t.add(Field(0, None, 0, (0, 0, 2220, 2967), 1.0, "view"))
    t.add(Field(1, 0, 1, (100, 200, 300, 300), 0.7, "zoom", 5.0))
    t.add(AttentionMap("m", "g", 2.5, (0.0, 0.0), (1110.0, 1483.5), [[0.1, 0.2], [0.3, 0.4]]))
    t.add(TrailStep(0, 1, [0.4, 0.6]))
    t.timings["total_s"] = 0.5
    return json.loads(t.to_json())


def _edit(change) -> str:
    d = _good()
    change(d)
    return json.dumps(d)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _set(path: str, value):
    def change(d):
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


HOSTILE: dict[str, tuple[str | bytes, str]] = {
    # JSON that Python reads but the format forbids
    "nan_in_json": (json.dumps(_good()).replace("0.7", "NaN", 1), "NaN"),
    "infinity_in_json": (json.dumps(_good()).replace("0.4, 0.6]", "Infinity, 0.6]", 1), "Infinity"),
    "overflowing_number": (json.dumps(_good()).replace("2.5", "1e999", 1), "finite"),
    # shapes
    "ragged_map": (_edit(_set("maps.0.values", [[0.1, 0.2], [0.3]])), "not rectangular"),
    "negative_cell": (_edit(_set("maps.0.cell", [-5.0, 10.0])), "positive"),
    "zero_cell": (_edit(_set("maps.0.cell", [0, 10.0])), "positive"),
    "three_number_rect": (_edit(_set("fields.1.rect", [1, 2, 3])), "4 numbers"),
    "text_in_rect": (_edit(_set("fields.1.rect", [1, 2, "3", 4])), "must be a number"),
    "negative_rect": (_edit(_set("fields.1.rect", [1, 2, -3, 4])), "negative size"),
    "map_value_text": (_edit(_set("maps.0.values", [["a", 0.2], [0.3, 0.4]])), "must be a number"),
    "values_not_list": (_edit(_set("maps.0.values", "abc")), "must be a list"),
    "probs_classes_mismatch": (_edit(_set("probs", [0.1, 0.2, 0.7])), "3 probabilities for 2 classes"),
    "trail_probs_mismatch": (_edit(_set("trail.0.probs", [1.0])), "1 probabilities for 2 classes"),
    "trail_missing_field": (_edit(_set("trail.0.field_id", 99)), "not the id of a field"),
    "parent_missing_field": (_edit(_set("fields.1.parent", 42)), "not the id of a field"),
    "duplicate_field_ids": (_edit(_set("fields.1.id", 0)), "share one id"),
    "bool_id": (_edit(_set("fields.1.id", True)), "whole number"),
    "model_not_text": (_edit(_set("model", 5)), "must be text"),
    "fields_object": (_edit(_set("fields", {"a": 1})), "must be a list"),
    "field_not_object": (_edit(_set("fields", [[1, 2]])), "has no 'id'"),
    "missing_slide": (_edit(lambda d: d.pop("slide")), "has no 'slide'"),
    "slide_extra_key_and_bad_mpp": (_edit(_set("slide.mpp", -1)), "positive"),
    "bad_roi": (_edit(_set("roi", [0, 0, 10])), "4 numbers"),
    "timings_text": (_edit(_set("timings", {"a": "slow"})), "must be a number"),
    "future_format": (_edit(_set("format", 99)), "newer MagLens"),
    # nesting and sizes
    "deep_nesting": (_deep(10_000), "not a MagLens trace"),
    "deep_nesting_inside": (json.dumps(_good()).replace('"kind": "zoom"', '"kind": ' + _deep(10_000)),
                            "not a MagLens trace"),
    "huge_slide_width": (_edit(_set("slide.width", 10**30)), "slide.width is a huge number"),
    "huge_int_digits": (json.dumps(_good()).replace("2220", "9" * 5000, 1), "not a MagLens trace"),
    "huge_cell": (_edit(_set("maps.0.cell", [1e300, 1e300])), "outside"),
    "map_beyond_any_slide": (_edit(_set("maps.0.cell", [9e8, 9e8])), "beyond any slide"),
    # not a trace at all
    "list_root": ("[1, 2, 3]", "top level is not an object"),
    "string_root": ('"trace"', "top level is not an object"),
    "binary_garbage": (b"\x89PNG\r\n\x1a\n" + random.Random(13).randbytes(4096), "not a MagLens trace"),
    "utf16": (json.dumps(_good()).encode("utf-16"), "not a MagLens trace"),
    "empty": ("", "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_trace_is_one_trace_error_naming_the_file(tmp_path, name):
    content, words = HOSTILE[name]
    path = tmp_path / f"{name}.trace.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(TraceError) as info:
        Trace.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path.name}: ") and words in msg, msg
    assert "\n" not in msg and len(msg) < 400


def test_the_good_trace_used_above_loads():
    assert Trace.from_json(json.dumps(_good())).classes == ["normal", "tumor"]


def test_a_folder_and_a_missing_file_are_trace_errors(tmp_path):
    for path, words in ((tmp_path, "not a regular file"), (tmp_path / "gone.json", "cannot be read")):
        with pytest.raises(TraceError, match=words):
            Trace.load(path)


def test_a_file_over_the_size_cap_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.trace.json"
    with open(path, "wb") as fh:  # sparse: costs no disk, and must not be read
        fh.truncate(trace_check.MAX_TRACE_BYTES + 1)
    with pytest.raises(TraceError, match="huge.trace.json: .* larger than a trace may be"):
        Trace.load(path)


@pytest.mark.parametrize("cap, grow", [
    ("MAX_FIELDS", lambda d: d["fields"].extend({**d["fields"][1], "id": 10 + i} for i in range(5))),
    ("MAX_CELLS", lambda d: d["maps"].append({**d["maps"][0], "values": [[0.5] * 4] * 4})),
    ("MAX_TRAIL", lambda d: d["trail"].extend([d["trail"][0]] * 5)),
    ("MAX_MAPS", lambda d: d["maps"].extend([d["maps"][0]] * 5)),
    ("MAX_CLASSES", lambda d: d["classes"].extend(["c"] * 5)),
])
def test_every_list_has_a_cap(tmp_path, monkeypatch, cap, grow):
    monkeypatch.setattr(trace_check, cap, 5)
    path = tmp_path / "big.json"
    path.write_text(_edit(grow))
    with pytest.raises(TraceError, match=r"big.json: .*(at most 5|entries)"):
        Trace.load(path)


# -- NaN never enters a trace a model makes -------------------------------------------------
def _blank() -> Trace:
    return Trace(model="fake", preset="tiny", checkpoint=None, slide=SlideRef("s.svs", 100, 100),
                 classes=["a", "b"])


@pytest.mark.parametrize("event", [
    AttentionMap("m", "g", None, (0.0, 0.0), (10.0, 10.0), [[0.1, float("nan")]]),
    AttentionMap("m", "g", None, (0.0, 0.0), (10.0, 10.0), [[0.1, 0.2], [0.3]]),
    AttentionMap("m", "g", None, (0.0, 0.0), (0.0, 10.0), [[0.1]]),
    TrailStep(0, None, [float("nan"), float("nan")]),
    TrailStep(0, None, [0.5, 0.4, 0.1]),
    Field(0, None, 0, (0.0, 0.0, float("inf"), 10.0)),
    Field(0, None, 0, (0.0, 0.0, 10.0, 10.0), float("nan")),
])
def test_a_model_event_that_could_not_be_saved_is_refused_clearly(event):
    t = _blank()
    with pytest.raises(TraceError, match="fake made an unusable result: .*weights or input may be broken"):
        t.add(event)
    assert not (t.fields or t.maps or t.trail)


def test_a_run_whose_model_makes_nan_stops_with_one_clear_error(monkeypatch):
    import importlib

    import torch

    from engines import infer, registry

    monkeypatch.setitem(registry.MODULES, "fake", "tests.fake_model")
    fake = importlib.import_module("tests.fake_model")
    real = fake.FakeModel.explain

    def explain(self, view, emit):
        def poisoned(event):
            if isinstance(event, AttentionMap):
                event = AttentionMap(event.name, event.group, None, event.origin, event.cell,
                                     [[float("nan")] * 2] * 2)
            emit(event)
        return real(self, view, poisoned)

    monkeypatch.setattr(fake.FakeModel, "explain", explain)
    torch.manual_seed(0)
    model = registry.create("fake", "tiny", classes=["a", "b"])
    from tests.conftest import DEMO_SLIDE

    with pytest.raises(TraceError, match=r"fake made an unusable result: attention map 'fake map'"
                                         r"\.values\[0\]\[0\] is nan"):
        infer.run(model, str(DEMO_SLIDE))


def test_numpy_numbers_from_a_model_save_and_reopen_identically(tmp_path):
    np = pytest.importorskip("numpy")
    t = _blank()
    t.add(Field(0, None, 0, (np.float32(1.5), 2, np.float64(30.25), 40), np.float32(0.5)))
    t.add(AttentionMap("m", "g", None, (0.0, 0.0), (10.0, 10.0), np.array([[0.25, 0.5]]).tolist()))
    t.add(TrailStep(0, 0, [np.float64(0.25), np.float64(0.75)]))
    t.probs = [0.25, 0.75]
    t.save(tmp_path / "t.json")
    back = Trace.load(tmp_path / "t.json")
    assert back == t
    back.save(tmp_path / "u.json")
    assert (tmp_path / "u.json").read_text() == (tmp_path / "t.json").read_text()


def test_saving_a_trace_that_could_not_be_reopened_is_refused_and_writes_nothing(tmp_path):
    t = _blank()
    t.probs = [float("nan"), 0.5]  # set directly, bypassing add
    with pytest.raises(TraceError, match="cannot be saved: probs\\[0\\] is nan"):
        t.save(tmp_path / "t.json")
    t.probs = [0.5, 0.5]
    t.trail.append(TrailStep(0, 7, [0.5, 0.5]))  # a step on a field the trace lacks
    with pytest.raises(TraceError, match="not the id of a field"):
        t.save(tmp_path / "t.json")
    assert list(tmp_path.iterdir()) == []


# -- GeoJSON --------------------------------------------------------------------------------
ROWS, COLS = 250, 300  # 75,000 cells, as a MagNet paper trace has


def _sparse_trace(fraction: float = 0.05) -> tuple[Trace, int]:
    rng = random.Random(3)
    values = [[0.0] * COLS for _ in range(ROWS)]
    cells = rng.sample(range(ROWS * COLS), int(ROWS * COLS * fraction))
    for i in cells:
        values[i // COLS][i % COLS] = rng.random() + 1e-3
    values[0][0] = 1e-12  # float noise beside the peak: carries no attention
    t = _blank()
    t.slide = SlideRef("s.svs", 60_000, 50_000, 0.25)
    t.add(Field(0, None, 0, (0.0, 0.0, 60_000.0, 50_000.0), 1.0, "view"))
    t.add(AttentionMap("attention", "layer 1", 20.0, (0.0, 0.0), (200.0, 200.0), values))
    return t, len([i for i in cells if i != 0])


def test_geojson_writes_only_cells_that_carry_attention(tmp_path):
    t, nonzero = _sparse_trace()
    out = tmp_path / "t.geojson"
    written = t.save_geojson(out)
    gj = json.loads(out.read_text())
    assert gj["type"] == "FeatureCollection"
    assert written == len(gj["features"]) == 1 + nonzero
    cells = [f for f in gj["features"] if f["properties"]["objectType"] == "tile"]
    assert all(f["properties"]["value"] > 1e-6 for f in cells)
    m = t.maps[0]
    for f in cells[:50]:
        p = f["properties"]
        assert set(p) == {"objectType", "name", "classification", "map", "group", "row", "col", "value"}
        assert p["value"] == m.values[p["row"]][p["col"]]
        x, y, w, h = m.cell_rect(p["row"], p["col"])
        assert f["geometry"] == {"type": "Polygon",
                                 "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]}
        assert p["classification"] == {"name": "fake: attention"}
    view = gj["features"][0]["properties"]
    assert view["objectType"] == "annotation" and view["kind"] == "view"
    assert t.to_geojson() == gj


def test_geojson_export_is_streamed_atomic_and_reports_progress(tmp_path, monkeypatch):
    t, _ = _sparse_trace()
    # Streaming: neither the whole document as a dict nor as one string is ever built.
    monkeypatch.setattr(Trace, "to_geojson", lambda self: pytest.fail("built the whole document"))
    real_dumps = json.dumps
    longest = []

    def dumps(obj, *a, **kw):
        text = real_dumps(obj, *a, **kw)
        longest.append(len(text))
        return text

    monkeypatch.setattr(json, "dumps", dumps)
    seen: list[tuple[int, int]] = []
    out = tmp_path / "t.geojson"
    t.save_geojson(out, progress=lambda done, total: seen.append((done, total)))
    assert max(longest) < 2000
    total = 1 + ROWS * COLS
    assert seen[0] == (0, total) and seen[-1] == (total, total) and len(seen) > 10
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["t.geojson"]


def test_a_cancelled_export_leaves_the_old_file_and_no_temporary_file(tmp_path):
    t, _ = _sparse_trace()
    out = tmp_path / "t.geojson"
    out.write_text("previous export")
    cancel = threading.Event()

    def progress(done, total):
        if done > total // 3:
            cancel.set()

    with pytest.raises(ExportCancelled):
        t.save_geojson(out, progress=progress, cancel=cancel)
    assert out.read_text() == "previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["t.geojson"]


def test_an_all_zero_map_writes_no_cell(tmp_path):
    t = _blank()
    t.add(AttentionMap("m", "g", None, (0.0, 0.0), (10.0, 10.0), [[0.0, 0.0], [0.0, 0.0]]))
    t.add(AttentionMap("signed", "g", None, (0.0, 0.0), (10.0, 10.0), [[-0.5, 0.0]]))
    assert t.save_geojson(tmp_path / "z.geojson") == 1
    (f,) = json.loads((tmp_path / "z.geojson").read_text())["features"]
    assert f["properties"]["map"] == "signed" and f["properties"]["value"] == -0.5


def test_a_non_finite_value_set_by_hand_is_not_written_into_geojson(tmp_path):
    t = _blank()
    t.fields.append(Field(0, None, 0, (0.0, 0.0, 10.0, 10.0), float("nan")))  # bypasses add()
    out = tmp_path / "t.geojson"
    with pytest.raises(TraceError, match="NaN or infinity"):
        t.save_geojson(out)
    assert list(tmp_path.iterdir()) == []
