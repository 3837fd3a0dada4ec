"""``maglens infer MANIFEST --annotations DIR``: attention-in-annotation ratio and Dice per slide
in ``predictions.csv``, their median, IQR and CI in ``summary.json``, and resume rules: a record
made without (or with other) annotations is rescored from its trace, never rerun."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest

from app import cli

MODEL = "grid_attention"  # attention maps over the whole tissue: some always falls in a needle


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """4 synthetic slides (2 with needles) with their ``<stem>.geojson`` needle annotations."""
    from engines.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("annotated")
    generate(root, slides=4, seed=1, cfg=SynthConfig(size=512))
    return root


def _infer(*args) -> tuple[int, str, str]:
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = cli.main(["infer", *(str(a) for a in args)])
    return rc, o.getvalue(), e.getvalue()


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _stamps(out: Path, suffix: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "traces").glob(f"*{suffix}")}


@pytest.fixture(scope="module")
def scored(synth, tmp_path_factory) -> Path:
    """A run with --annotations from the start."""
    out = tmp_path_factory.mktemp("scored") / "out"
    rc, _, err = _infer(synth / "manifest.csv", "--model", MODEL, "--out", out, "--annotations", synth)
    assert rc == 0, err
    return out


def test_ratio_and_dice_columns_and_summary(synth, scored):
    rows = _rows(scored)
    needled = {f"{p.stem}.tiff" for p in synth.glob("*.geojson") if json.loads(p.read_text())["features"]}
    assert len(needled) == 2 and set(rows) >= needled
    for name, r in rows.items():
        if name in needled:
            ratio, dice = float(r["attention_ratio"]), float(r["dice"])
            assert math.isfinite(ratio) and ratio > 0 and 0 <= dice <= 1, r
        else:  # a normal slide's annotation file is empty: no score, not an error
            assert r["attention_ratio"] == "" and r["dice"] == "" and r["error"] == ""
    s = _summary(scored)
    assert s["annotation_class"] == "Tumor" and s["n_annotated"] == 4
    for key in ("attention_ratio", "dice"):
        part = s[key]
        values = sorted(float(rows[n]["attention_ratio" if key == "attention_ratio" else "dice"])
                        for n in needled)
        assert part["n"] == 2 and part["median"] == pytest.approx(sum(values) / 2, abs=1e-3)
        lo, hi = part["iqr"]
        assert lo <= part["median"] <= hi
        clo, chi = part["ci95"]
        assert clo <= part["median"] <= chi


def test_a_run_without_annotations_is_rescored_not_rerun(synth, scored, tmp_path):
    out = tmp_path / "out"
    rc, _, err = _infer(synth / "manifest.csv", "--model", MODEL, "--out", out)
    assert rc == 0, err
    assert {r["attention_ratio"] for r in _rows(out).values()} == {""}
    assert _summary(out)["attention_ratio"] is None
    traces = _stamps(out, ".trace.json")

    rc, _, err = _infer(synth / "manifest.csv", "--model", MODEL, "--out", out, "--annotations", synth)
    assert rc == 0 and "ran 0 slide(s), reused 4" in err, err
    assert _stamps(out, ".trace.json") == traces  # the model did not run again
    def strip(rows: dict) -> dict:
        return {n: {k: v for k, v in r.items() if k != "seconds"} for n, r in rows.items()}

    assert strip(_rows(out)) == strip(_rows(scored))  # as if scored from the start
    assert _summary(out) == _summary(scored)

    # The same command again: nothing changes, not even a record.
    records = _stamps(out, ".result.json")
    rc, _, err = _infer(synth / "manifest.csv", "--model", MODEL, "--out", out, "--annotations", synth)
    assert rc == 0 and _stamps(out, ".result.json") == records

    # An edited annotation file rescores that slide alone.
    from engines.annotations import rect_annotation, write_geojson

    write_geojson(synth.parent / "edited.geojson", [rect_annotation((0, 0, 256, 256), "Tumor")])
    target = synth / "synth_000.geojson"
    original = target.read_bytes()
    try:
        target.write_bytes((synth.parent / "edited.geojson").read_bytes())
        rc, _, err = _infer(synth / "manifest.csv", "--model", MODEL, "--out", out, "--annotations", synth)
        changed = {n for n, t in _stamps(out, ".result.json").items() if records[n] != t}
        assert rc == 0 and changed == {"synth_000.result.json"}, err
        assert _rows(out)["synth_000.tiff"]["attention_ratio"] != ""
    finally:
        target.write_bytes(original)

    # Another class: no fallback to the Tumor outlines, so no scores.
    rc, _, err = _infer(synth / "manifest.csv", "--model", MODEL, "--out", out, "--annotations", synth,
                        "--annotation-class", "Stroma")
    assert rc == 0 and {r["attention_ratio"] for r in _rows(out).values()} == {""}
    assert _summary(out)["annotation_class"] == "Stroma" and _summary(out)["attention_ratio"]["n"] == 0
    # Without --annotations the scores go: outputs say what this command measured.
    rc, _, err = _infer(synth / "manifest.csv", "--model", MODEL, "--out", out)
    assert rc == 0 and _summary(out)["attention_ratio"] is None and "reused 4" in err


def test_unreadable_annotation_file_is_a_warning(synth, scored, tmp_path):
    folder = tmp_path / "ann"
    folder.mkdir()
    for p in synth.glob("*.geojson"):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "synth_001.geojson").write_text("{ not json")
    out = tmp_path / "out"
    rc, _, err = _infer(synth / "manifest.csv", "--model", MODEL, "--out", out, "--annotations", folder)
    rows = _rows(out)
    assert rc == 0 and "synth_001.tiff: annotations not scored" in err and "Traceback" not in err
    assert rows["synth_001.tiff"]["attention_ratio"] == "" and rows["synth_001.tiff"]["predicted"]
    assert rows["synth_000.tiff"]["attention_ratio"] == _rows(scored)["synth_000.tiff"]["attention_ratio"]


def test_a_project_run_scores_each_slide_against_its_own_annotations(synth, scored, tmp_path):
    """A project keeps each slide's annotation file; its cohort run scores against it with
    no folder given, the same numbers as the CLI."""
    import shutil

    from engines.cohort import ModelSpec, read_record, run_slides
    from engines.project import open_project

    out = tmp_path / "out"
    shutil.copytree(scored, out)
    cohort = open_project(synth / "manifest.csv").as_cohort()
    reused: list[bool] = []
    results = run_slides(cohort.slides, ModelSpec(MODEL, None, None), out, 1,
                         on_result=lambda r, was: reused.append(was))
    assert reused == [True] * 4  # same files, same class: nothing rescored
    assert [r.ratio for r in results] == [read_record(scored, s.key).ratio for s in cohort.slides]


@pytest.mark.parametrize("extra,words", [
    (["--annotations", "/nonexistent/folder"], "no such folder"),
    (["--annotation-class", "Tumor"], "needs --annotations"),
])
def test_bad_annotation_options_are_one_line(synth, tmp_path, extra, words):
    rc, _, err = _infer(synth / "manifest.csv", "--model", MODEL, "--out", tmp_path / "o", *extra)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_annotations_are_for_cohorts(synth, tmp_path):
    rc, _, err = _infer(synth / "synth_000.tiff", "--model", MODEL, "--annotations", synth)
    assert rc == 2 and "not one slide" in err
