"""Projects (``engines.project``): a saved project reopens after its folder moved, with its
results; missing slides still load; hostile project files are one ``ProjectError``; the
``maglens PROJECT`` and ``maglens view --project`` entry points."""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest

from app import cli
from engines.cohort import SlideResult, trace_path
from engines.project import PROJECT_SUFFIX, ProjectError, ProjectRun, default_project_file, open_project

SLIDE_BYTES = b"not opened: projects never read slides"


def _folder(root: Path, names=("a.svs", "b.svs", "c.tiff")) -> Path:
    root.mkdir(parents=True)
    for n in names:
        (root / n).write_bytes(SLIDE_BYTES)
    return root


def _manifest(root: Path) -> Path:
    """Slides in ``root/slides``, the manifest in ``root``, a Tumor annotation beside one."""
    _folder(root / "slides", ("s1.svs", "s2.svs", "s3.svs"))
    (root / "slides" / "s2.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with open(root / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "label", "split"])
        w.writerows([("slides/s1.svs", "tumor", "train"), ("slides/s2.svs", "normal", "val"),
                     ("slides/s3.svs", "tumor", "")])
    return root / "cohort.csv"


def _result(key: str, name: str, probs=(0.25, 0.75), ratio=None) -> SlideResult:
    return SlideResult(name=name, key=key, label="tumor", split="train", run={"model": "magnet"},
                       file={"size": 1, "mtime_ns": 2}, classes=["normal", "tumor"], probs=list(probs),
                       predicted="tumor", seconds=1.5, model_s=1.0, ratio=ratio,
                       dice=None if ratio is None else 0.5)


def test_manifest_project_round_trip_survives_moving_the_folder(tmp_path):
    manifest = _manifest(tmp_path / "study")
    project = open_project(manifest)
    assert project.path is None and project.source == manifest
    assert [(s.key, s.label, s.split) for s in project.slides] == [
        ("s1", "tumor", "train"), ("s2", "normal", "val"), ("s3", "tumor", "")]
    assert project.slide("s2").annotations == tmp_path / "study" / "slides" / "s2.geojson"
    assert project.slide("s1").annotations is None and project.labels() == ["normal", "tumor"]
    out = tmp_path / "study" / "runs" / "magnet"
    run = ProjectRun(name="magnet tiny", model="magnet", preset="tiny", checkpoint=None, out=out,
                     classes=["normal", "tumor"], results={"s1": _result("s1", "slides/s1.svs", ratio=2.5)})
    project.add_run(run)
    project.map_display["stage 1"] = {"scaling": "rank", "threshold": 0.2}
    saved = project.save()
    assert saved == default_project_file(manifest) == tmp_path / "study" / f"cohort{PROJECT_SUFFIX}"
    text = saved.read_text()
    assert str(tmp_path) not in text  # every path relative to the project file
    assert json.loads(text)["format"] == 1

    moved = tmp_path / "elsewhere" / "study-copy"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "study"), moved)
    (moved / "slides" / "s3.svs").unlink()  # a slide gone missing since
    again = open_project(moved / f"cohort{PROJECT_SUFFIX}")
    assert again.path == moved / f"cohort{PROJECT_SUFFIX}" and again.source == moved / "cohort.csv"
    assert [s.path for s in again.slides] == [moved / "slides" / f"s{i}.svs" for i in (1, 2, 3)]
    assert [s.exists for s in again.slides] == [True, True, False]
    assert again.slide("s2").annotations == moved / "slides" / "s2.geojson"
    back = again.run("magnet tiny")
    assert back is not None and back.out == moved / "runs" / "magnet" and back.checkpoint is None
    assert back.results["s1"] == run.results["s1"] and back.results["s1"].ratio == 2.5
    assert back.trace_path("s1") == trace_path(moved / "runs" / "magnet", "s1")
    assert back.trace_path("s2") is None  # no result yet
    assert again.map_display == {"stage 1": {"scaling": "rank", "threshold": 0.2}}
    # The manifest itself now opens its project file: the file wins.
    assert open_project(moved / "cohort.csv").run("magnet tiny") is not None


def test_folder_project_keys_lookup_runs_and_cohort(tmp_path):
    folder = _folder(tmp_path / "slides", ("x.svs", "y.svs", "notes.txt"))
    (folder / "x.geojson").write_text("{}")
    project = open_project(folder)
    assert [s.key for s in project.slides] == ["x", "y"] and project.labels() == []
    assert project.key_of(folder / "y.svs") == "y"
    assert project.key_of(os.path.relpath(folder / "x.svs")) == "x"
    link = tmp_path / "link.svs"
    link.symlink_to(folder / "y.svs")
    assert project.key_of(link) == "y" and project.key_of(tmp_path / "other.svs") is None
    with pytest.raises(KeyError):
        project.slide("nope")
    cohort = project.as_cohort()
    assert [(s.key, s.annotations) for s in cohort.slides] == [("x", folder / "x.geojson"), ("y", None)]
    assert not cohort.labelled
    first = ProjectRun("r", "magnet", "tiny", None, tmp_path / "o1", ["a", "b"])
    project.add_run(first)
    project.add_run(ProjectRun("other", "zoom_in", "tiny", None, tmp_path / "o2", ["a", "b"]))
    project.add_run(ProjectRun("r", "magnet", "tiny", tmp_path / "ck.pt", tmp_path / "o3", ["a", "b"]))
    assert [r.name for r in project.runs] == ["r", "other"] and project.run("r").out == tmp_path / "o3"
    saved = project.save()
    assert saved == folder / f"project{PROJECT_SUFFIX}"
    reopened = open_project(folder)  # the folder's project file wins
    assert reopened.path == saved and reopened.run("r").checkpoint == tmp_path / "ck.pt"
    assert reopened.key_of(folder / "x.svs") == "x"


def test_2000_slides_open_without_touching_a_slide(tmp_path, monkeypatch):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(2000):
        (folder / f"slide_{i:04d}.svs").write_bytes(b"")
    import engines.slide

    def never(*_a, **_k):
        raise AssertionError("a project opened a slide")

    monkeypatch.setattr(engines.slide.Slide, "__init__", never)
    project = open_project(folder)
    assert len(project.slides) == 2000
    project.save()
    assert len(open_project(folder).slides) == 2000


def _valid(tmp_path: Path) -> dict:
    _folder(tmp_path / "slides", ("a.svs",))
    p = open_project(tmp_path / "slides")
    p.add_run(ProjectRun("r", "magnet", "tiny", None, tmp_path / "out", ["normal", "tumor"],
                         {"a": _result("a", "a.svs")}))
    return p.to_dict(tmp_path)


def _set(path: str, value):
    def edit(d: dict) -> None:
        *head, last = path.split(".")
        node = d
        for part in head:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is KeyError:
            del node[last]
        else:
            node[last] = value
    return edit


HOSTILE_EDITS = {
    "format missing": (_set("format", KeyError), "not a MagLens project"),
    "format text": (_set("format", "1"), "format must be a whole number"),
    "format newer": (_set("format", 99), "newer MagLens"),
    "slides an object": (_set("slides", {"a": 1}), "slides must be a list"),
    "slides missing": (_set("slides", KeyError), "slides is missing"),
    "slide a number": (_set("slides.0", 7), "slide 1 must be an object"),
    "slide traces an object": (_set("slides.0.traces", {"a": 1}), "traces must be a list"),
    "slide trace without model": (_set("slides.0.traces", [{"name": "whole slide", "path": "t.json"}]),
                                  "trace 1: model is missing"),
    "key missing": (_set("slides.0.key", KeyError), "key is missing"),
    "key escapes": (_set("slides.0.key", "../../evil"), "cannot name a file"),
    "key dots": (_set("slides.0.key", ".."), "cannot name a file"),
    "path a number": (_set("slides.0.path", 12), "must be a path"),
    "path with NUL": (_set("slides.0.path", "a\x00.svs"), "not a usable path"),
    "huge name": (_set("slides.0.name", "n" * 100_000), "not usable text"),
    "unknown split": (_set("slides.0.split", "training"), "unknown split"),
    "runs an object": (_set("runs", {}), "runs must be a list"),
    "result for a stranger": (_set("runs.0.results", {"zz": {}}), "not a slide of the project"),
    "result wrong types": (_set("runs.0.results.a.probs", "0.5,0.5"), "unusable"),
    "result infinite": (_set("runs.0.results.a.seconds", 1e999), "unusable"),
    "result key mismatch": (_set("runs.0.results.a.key", "b"), "is for 'b'"),
    "out missing": (_set("runs.0.out", KeyError), "must be a path"),
    "bad scaling": (_set("map_display", {"m": {"scaling": "cubic"}}), "unknown scaling"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_EDITS))
def test_hostile_project_contents_are_one_line_errors(tmp_path, case):
    edit, words = HOSTILE_EDITS[case]
    data = _valid(tmp_path)
    edit(data)
    target = tmp_path / f"p{PROJECT_SUFFIX}"
    # json.dumps writes inf as Infinity; 1e999 is the number JSON allows that parses as inf.
    target.write_text(json.dumps(data).replace("Infinity", "1e999"))
    with pytest.raises(ProjectError) as err:
        open_project(target)
    message = str(err.value)
    assert words in message and str(target) in message and "\n" not in message


@pytest.mark.parametrize("content,words", [
    (b"", "not JSON"),
    (b"{\"format\": 1, \"slides\": [", "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    (b"[1, 2, 3]", "not a MagLens project"),
    (b"{\"format\": 1, \"slides\": [], \"x\": NaN}", "not JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "not JSON"),
    (b"{\"format\": 1" + b"0" * 10_000 + b", \"slides\": []}", "not JSON"),
    (b"{\"kind\": \"something-else\", \"format\": 1, \"slides\": []}", "not a MagLens project"),
])
def test_hostile_project_files_are_one_line_errors(tmp_path, content, words):
    target = tmp_path / f"p{PROJECT_SUFFIX}"
    target.write_bytes(content)
    with pytest.raises(ProjectError) as err:
        open_project(target)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_oversized_project_file_is_refused_before_reading(tmp_path, monkeypatch):
    import engines.project

    target = tmp_path / f"p{PROJECT_SUFFIX}"
    target.write_text(json.dumps(_valid(tmp_path)))
    monkeypatch.setattr(engines.project, "MAX_PROJECT_BYTES", 100)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a huge file"))
    with pytest.raises(ProjectError, match="more than a project file may hold"):
        open_project(target)


def test_paths_outside_the_project_folder_resolve_but_keys_never_leave_out(tmp_path):
    data = _valid(tmp_path)
    data["slides"][0]["path"] = "../../../elsewhere/a.svs"
    target = tmp_path / "deep" / f"p{PROJECT_SUFFIX}"
    target.parent.mkdir()
    target.write_text(json.dumps(data))
    project = open_project(target)
    slide = project.slides[0]
    assert slide.path == Path(os.path.normpath(tmp_path / "deep" / "../../../elsewhere/a.svs"))
    assert not slide.exists  # listed, shown as missing, never created
    run = project.runs[0]
    assert run.trace_path("a").parent == run.out / "traces"


def test_open_and_save_problems(tmp_path):
    with pytest.raises(ProjectError, match="no such file"):
        open_project(tmp_path / "missing.csv")
    with pytest.raises(ProjectError, match="no such file"):
        open_project(tmp_path / f"missing{PROJECT_SUFFIX}")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ProjectError, match="not a project file"):
        open_project(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProjectError, match="no slide files"):
        open_project(tmp_path / "empty")
    project = open_project(_folder(tmp_path / "slides"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ProjectError, match="cannot be written"):
        project.save(blocker / f"p{PROJECT_SUFFIX}")
    assert project.path is None


def test_old_records_without_scores_still_load():
    old = {"name": "a.svs", "key": "a", "label": "", "split": "", "run": {}, "file": None,
           "classes": ["x", "y"], "probs": [0.5, 0.5], "predicted": "x", "seconds": 1.0,
           "model_s": 0.5, "error": "", "format": 1}
    res = SlideResult.from_json(json.dumps(old))
    assert res.ratio is None and res.dice is None and res.scored is None


# -- the command line --------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    calls = []
    fake = types.ModuleType("app.main_window")
    fake.launch = lambda slide_path, model, checkpoint, project=None: calls.append(
        (slide_path, model, checkpoint, project)) or 0
    monkeypatch.setitem(sys.modules, "app.main_window", fake)
    return calls


def test_cli_opens_projects_in_the_viewer(launches, tmp_path, capsys):
    folder = _folder(tmp_path / "slides")
    saved = open_project(folder).save()
    assert cli.main([str(saved)]) == 0
    assert cli.main(["view", "--project", str(folder)]) == 0
    assert cli.main(["view", "--project", str(_manifest(tmp_path / "m"))]) == 0
    assert launches == [(None, None, None, str(saved)), (None, None, None, str(folder)),
                        (None, None, None, str(tmp_path / "m" / "cohort.csv"))]


def test_cli_bad_project_is_one_line_and_opens_no_window(launches, tmp_path, capsys):
    bad = tmp_path / f"bad{PROJECT_SUFFIX}"
    bad.write_text("{\"format\": \"x\"}")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken.csv"
    broken.write_text("slide,label\na.svs,x\na.svs,y\n")
    for args, words in (([str(bad)], "format must be"),
                        (["view", "--project", str(tmp_path / "none")], "no such file"),
                        (["view", "--project", str(tmp_path / "empty")], "no slide files"),
                        (["view", "--project", str(broken)], "same slide as row 1")):
        rc = cli.main(args)
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert launches == []
