"""``maglens infer`` over a cohort (a manifest or a folder): an unreadable slide in the middle,
metrics checked against scikit-learn, resume after SIGKILL, and 2 torchrun processes equal 1."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app import cli
from tests.conftest import ROOT, skip_without_localhost_ddp

MODEL = "zoom_in"


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MAGLENS_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """6 small synthetic slides and a manifest with an unreadable slide as row 4."""
    root = tmp_path_factory.mktemp("cohort")
    from engines.synth import SynthConfig, generate

    made = generate(root, slides=6, seed=1, cfg=SynthConfig(size=512))
    (root / "broken.svs").write_text("this is not a slide\n")
    rows = [(s.name, s.label) for s in made]
    rows.insert(3, ("broken.svs", made[0].label))
    with open(root / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "label", "split"])
        w.writerows((name, label, "test") for name, label in rows)  # no train split: fine here
    return root


def _rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _without_seconds(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(out)]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _run_in_process(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    o, e = capsys.readouterr()
    return rc, o, e


@pytest.fixture(scope="module")
def one_run(cohort) -> tuple[Path, int, str, str]:
    """The manifest with the broken slide, run in this process: (out, code, stdout, stderr)."""
    import contextlib
    import io

    out = cohort / "one"
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = cli.main(["infer", str(cohort / "cohort.csv"), "--model", MODEL, "--out", str(out)])
    return out, rc, o.getvalue(), e.getvalue()


def test_a_bad_slide_in_the_middle_gets_an_error_row_and_metrics_match_sklearn(one_run):
    from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

    out, rc, stdout, err = one_run
    assert rc == 1, err  # documented: 1 when any slide failed, after every output is written
    rows = _rows(out)
    assert [r["slide"] for r in rows][3] == "broken.svs" and len(rows) == 7
    assert rows[3]["error"] and rows[3]["p_tumor"] == "" and rows[3]["predicted"] == ""
    assert "broken.svs" in err and "Traceback" not in err
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and all((out / r["trace"]).is_file() for r in good)
    assert stdout.startswith("7 slide(s): 6 predicted, 1 failed")
    # The summary against scikit-learn, computed here from the written predictions.
    s = _summary(out)
    classes = s["classes"]
    y = [classes.index(r["label"]) for r in good]
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in good])
    pred = [classes.index(r["predicted"]) for r in good]
    assert pred == list(p.argmax(1))
    assert s["n"] == 7 and s["n_failed"] == 1 and s["n_scored"] == 6
    assert s["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert s["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert s["confusion"]["matrix"] == confusion_matrix(y, pred).tolist()
    lo, hi = s["auroc_ci95"]
    assert 0 <= lo <= s["auroc"] <= hi <= 1 and s["bootstrap"]["resamples"] == 1000
    assert not list(out.rglob(".*.tmp"))


def test_a_folder_of_slides_runs_without_labels(cohort, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("synth_000.tiff", "synth_001.tiff", "synth_002.tiff"):
        shutil.copy(cohort / name, folder / name)
    (folder / "notes.txt").write_text("not a slide, not listed")
    out = tmp_path / "run"
    rc, _, err = _run_in_process(capsys, "infer", folder, "--model", MODEL, "--out", out)
    assert rc == 0, err
    rows = _rows(out)
    assert [r["slide"] for r in rows] == ["synth_000.tiff", "synth_001.tiff", "synth_002.tiff"]
    assert all(r["label"] == "" and r["predicted"] for r in rows)
    s = _summary(out)
    assert s["n_predicted"] == 3 and s["accuracy"] is None and s["auroc"] is None
    assert sorted(p.name for p in (out / "traces").glob("*.trace.json")) == [
        "synth_000.trace.json", "synth_001.trace.json", "synth_002.trace.json"]


def test_cohort_bad_input_is_one_line(cohort, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\nsynth_000.tiff,tumor\nsynth_000.tiff,normal\n")
    shutil.copy(cohort / "synth_000.tiff", tmp_path / "synth_000.tiff")
    for args, words in (
        ([bad, "--model", MODEL, "--out", tmp_path / "o"], "same slide as row 1"),
        ([cohort / "cohort.csv", "--model", MODEL], "needs --out DIR"),
        ([cohort / "cohort.csv", "--model", MODEL, "--out", tmp_path / "o", "--roi", "0,0,5,5"], "for one slide"),
        ([tmp_path / "o" / "missing.csv", "--model", MODEL, "--out", tmp_path / "o"], "no such file"),
    ):
        rc, stdout, err = _run_in_process(capsys, "infer", *args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and words in lines[0], err


def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(cohort, one_run, tmp_path):
    ref = one_run[0]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "app", "infer", str(cohort / "cohort.csv"), "--model", MODEL, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "traces").glob("*.result.json"))) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = list((out / "traces").glob("*.result.json"))
    assert 2 <= len(records) < 7 and not (out / "predictions.csv").exists()
    # Slides that failed are tried again; the ones done are kept.
    before = {p.name: p.stat().st_mtime_ns for p in records if not json.loads(p.read_text())["error"]}
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr  # the broken slide fails again
    # The slides done before the kill were not run again: their records stand untouched.
    assert f"ran {7 - len(before)} slide(s), reused {len(before)}" in done.stderr
    assert {n: (out / "traces" / n).stat().st_mtime_ns for n in before} == before
    assert _without_seconds(out) == _without_seconds(ref)
    assert _summary(out) == _summary(ref)
    assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in ref.rglob("*"))




def test_two_torchrun_processes_give_the_outputs_of_one(cohort, one_run, tmp_path):
    skip_without_localhost_ddp()
    one = one_run[0]
    two = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "app", "infer", str(cohort / "cohort.csv"), "--model", MODEL, "--out", str(two)],
        capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert proc.returncode != 0  # the broken slide fails the job as it fails one process
    assert proc.stdout.count("slide(s):") == 1  # rank 0 alone reports and writes
    assert _without_seconds(two) == _without_seconds(one)
    assert _summary(two) == _summary(one)
    assert sorted(p.name for p in two.rglob("*")) == sorted(p.name for p in one.rglob("*"))


# -- cancel (the GUI's "Run on project" stops a cohort run) -------------------------------
def _good_slides(cohort: Path):
    from engines.cohort import read_cohort

    return [s for s in read_cohort(cohort / "cohort.csv").slides if s.name != "broken.svs"]


def _records(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "traces").glob("*.result.json"))


def _cancelled_after_first_result(slides, out: Path, workers: int) -> list[str]:
    """Run ``slides`` and cancel as the first result arrives; the keys that arrived."""
    import threading

    from engines.cohort import ModelSpec, run_slides
    from engines.infer import Cancelled

    cancel = threading.Event()
    seen: list[str] = []

    def stop(res, reused):
        seen.append(res.key)
        cancel.set()

    with pytest.raises(Cancelled):
        run_slides(slides, ModelSpec(MODEL, "tiny", None), out, workers, on_result=stop, cancel=cancel)
    return seen


def test_cancel_between_slides_keeps_the_slides_done_and_resumes(cohort, tmp_path):
    import threading

    from engines.cohort import ModelSpec, run_slides

    slides = _good_slides(cohort)[:3]
    out = tmp_path / "out"
    seen = _cancelled_after_first_result(slides, out, 1)
    assert seen == [slides[0].key] and _records(out) == [f"{slides[0].key}.result.json"]
    reused: list[bool] = []
    results = run_slides(slides, ModelSpec(MODEL, "tiny", None), out, 1,
                         on_result=lambda res, r: reused.append(r), cancel=threading.Event())
    assert reused == [True, False, False] and all(r.predicted for r in results)


def test_cancel_inside_a_slide_writes_no_record(cohort, tmp_path):
    from engines.cohort import ModelSpec, run_slides
    from engines.infer import Cancelled

    slides = _good_slides(cohort)[:2]
    calls = [0]

    def cancel() -> bool:  # false at the check before the slide, true once the model runs
        calls[0] += 1
        return calls[0] > 3

    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        run_slides(slides, ModelSpec(MODEL, "tiny", None), out, 1, cancel=cancel)
    assert calls[0] >= 4  # stopped at a check of the model's, inside the first slide
    assert _records(out) == [] and not list((out / "traces").glob("*.trace.json"))


def test_cancel_reaches_worker_processes(cohort, tmp_path):
    slides = _good_slides(cohort)
    out = tmp_path / "out"
    done = _cancelled_after_first_result(slides, out, 2)
    records = _records(out)  # the queue was dropped: not every slide ran
    assert 1 <= len(records) < len(slides) and done[0] + ".result.json" in records
    assert all(json.loads((out / "traces" / r).read_text())["predicted"] for r in records)
