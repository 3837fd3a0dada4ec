"""The demo-training script: the combined last-stage manifest never carries a test slide of
the target set, and every shipped checkpoint's record keeps to the 60-minute budget."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from engines import registry
from engines.data import read_manifest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "resources" / "checkpoints").glob("*.json"))


def _script():
    spec = importlib.util.spec_from_file_location("train_demos", ROOT / "benchmarks" / "train_demos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest(folder: Path, rows: list[tuple[str, str, str]]) -> None:
    folder.mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "label", "split"])
        for name, label, split in rows:
            (folder / name).write_bytes(b"")
            w.writerow([name, label, split])


def test_target_stage_manifest_joins_sets_without_test_slides(tmp_path):
    t = _script()
    data = tmp_path / "needles"
    _manifest(data, [("a.tiff", "tumor", "train"), ("b.tiff", "normal", "train"),
                     ("c.tiff", "tumor", "val"), ("d.tiff", "normal", "val"),
                     ("e.tiff", "tumor", "test"), ("f.tiff", "normal", "test")])
    _manifest(tmp_path / "needles-extra1", [("a.tiff", "tumor", "train"), ("b.tiff", "normal", "val"),
                                            ("c.tiff", "tumor", "test")])
    manifest = t.stage_manifest(data, "target", ("needles", "extra1"), size=64)
    # Not the stage's default sets (those add extra2): a manifest named after its sets.
    assert manifest == tmp_path / "needles-target-needles+extra1" / "manifest.csv"
    ds = read_manifest(manifest, check_slides=False)
    by_split = {}
    for s in ds.samples:
        by_split.setdefault(s.split, []).append(s.path)
    assert "test" not in by_split
    assert sorted(p.name for p in by_split["val"]) == ["c.tiff", "d.tiff"]
    assert all(p.parent == data for p in by_split["val"])  # validation only from the target set
    extra = [p for p in by_split["train"] if p.parent.name == "needles-extra1"]
    assert sorted(p.name for p in extra) == ["a.tiff", "b.tiff", "c.tiff"]  # all of it trains
    assert len(by_split["train"]) == 5
    assert all(p.is_absolute() for s in by_split.values() for p in s)


def test_validation_sets_validate_and_recipes_never_share_a_manifest(tmp_path):
    t = _script()
    data = tmp_path / "needles"
    _manifest(data, [("a.tiff", "tumor", "train"), ("b.tiff", "normal", "val"), ("c.tiff", "tumor", "test")])
    _manifest(tmp_path / "needles-extra1", [("a.tiff", "tumor", "train")])
    _manifest(tmp_path / "needles-val2", [("a.tiff", "tumor", "train"), ("b.tiff", "normal", "test")])
    recipe = {"target_sets": ("needles", "extra1"), "val_sets": ("val2",)}
    sets, val = t.stage_sets(recipe, "target", ("needles", "extra1", "extra2"))
    assert (sets, val) == (("needles", "extra1"), ("val2",))
    assert t.stage_sets(recipe, "huge", ("huge",)) == (("huge",), ())  # large needles: their own val
    assert t.stage_sets({}, "target", ("needles", "extra1")) == (("needles", "extra1"), ())
    manifest = t.stage_manifest(data, "target", sets, 64, val)
    assert manifest.parent.name == "needles-target-needles+extra1-val-val2"
    ds = read_manifest(manifest, check_slides=False)
    roles = {(s.path.parent.name, s.path.name): s.split for s in ds.samples}
    assert roles == {("needles", "a.tiff"): "train", ("needles", "b.tiff"): "val",
                     ("needles-extra1", "a.tiff"): "train",
                     ("needles-val2", "a.tiff"): "val", ("needles-val2", "b.tiff"): "val"}
    # The one-set stage of the same recipe gets a manifest of its own, with the extra val.
    one = t.stage_manifest(data, "needles", ("needles",), 64, val)
    assert one.parent.name == "needles-needles-needles-val-val2"
    assert len(read_manifest(one, check_slides=False).split("val")) == 3


def test_one_set_stage_uses_its_own_manifest(tmp_path):
    t = _script()
    data = tmp_path / "needles"
    _manifest(data, [("a.tiff", "tumor", "train"), ("b.tiff", "normal", "train")])
    assert t.stage_manifest(data, "needles", ("needles",), size=64) == data / "manifest.csv"


def test_every_recipe_names_known_stages_within_the_budget():
    t = _script()
    names = [stage for stage, _ in t.STAGES]
    for model, recipe in t.RECIPES.items():
        assert len(recipe["minutes"]) == len(names), model
        assert 0 < sum(recipe["minutes"]) and min(recipe["minutes"]) >= 0, model
        built = registry.create(model, "tiny", **recipe["overrides"])  # unknown keys raise
        for key, value in recipe["overrides"].items():
            got = getattr(built.config, key)
            assert (tuple(map(tuple, got)) if key == "grids" else got) == value, (model, key)
        for _, sets in t.STAGES:
            assert set(sets) <= set(t.DATASETS)


def test_a_curriculum_stops_at_the_sixty_minute_budget(tmp_path, monkeypatch):
    t = _script()
    calls = []

    def fake_stage(name, manifest, out, minutes, threads, init, lr, limit=None):
        # Each stage takes all the time it may: its minutes, or what is left when less.
        spent = min(minutes * 1.1, limit)
        calls.append({"minutes": minutes, "limit": limit, "init": init})
        out.mkdir(parents=True)
        (out / "best.pt").write_bytes(b"")
        return {"data": manifest.parent.name, "train_minutes": spent, "best_val_auroc": 0.5,
                "run": str(out), "history": []}

    monkeypatch.setattr(t, "train_stage", fake_stage)
    monkeypatch.setattr(t, "stage_manifest", lambda data, stage, sets, size, val_sets=(): tmp_path / stage / "m.csv")
    monkeypatch.setitem(t.RECIPES, "zoom_in", dict(t.RECIPES["zoom_in"], minutes=(30, 0, 20, 25, 10)))
    report = t.train_one("zoom_in", tmp_path / "needles", 512, tmp_path / "runs", 1.0, 1)
    # 33 + 22 minutes leave 5 for the 25-minute stage and nothing for the last one.
    assert [c["limit"] for c in calls] == pytest.approx([60, 27, 5])
    assert [s["train_minutes"] for s in report["stages"]] == pytest.approx([33, 22, 5])
    assert report["train_minutes"] == pytest.approx(60)
    assert calls[1]["init"] == tmp_path / "runs" / "zoom_in" / "huge" / "best.pt"
    assert report["run"].endswith("needles")
    # --scale shrinks the budget with the stages.
    calls.clear()
    t.train_one("zoom_in", tmp_path / "needles", 512, tmp_path / "quick", 0.1, 1)
    assert calls[0]["limit"] == pytest.approx(6) and calls[-1]["limit"] == pytest.approx(0.5)


@pytest.mark.skipif(not SHIPPED, reason="no checkpoint records shipped")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_records_keep_to_sixty_minutes(path):
    info = json.loads(path.read_text())
    assert info["model"] == path.stem
    assert info["train_minutes"] <= 60
    assert abs(info["train_minutes"] - sum(s["train_minutes"] for s in info["stages"])) < 0.05
    assert (path.with_suffix(".pt")).exists()


@pytest.mark.skipif(not SHIPPED, reason="no checkpoint records shipped")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_checkpoints_were_trained_with_todays_recipe(path):
    # A recipe changed without retraining would describe a checkpoint that does not exist.
    from engines.checkpoint import model_from_checkpoint

    recipe = _script().RECIPES[path.stem]
    info = json.loads(path.read_text())
    assert info["recipe"]["minutes"] == list(recipe["minutes"])
    config = model_from_checkpoint(path.with_suffix(".pt")).config
    for key, value in recipe["overrides"].items():
        got = getattr(config, key)
        assert (tuple(map(tuple, got)) if key == "grids" else got) == value, key
