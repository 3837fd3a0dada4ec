"""``maglens synth``, ``train`` (also under torchrun) and ``snapshot``, driven through
``app.cli.main`` as a user types them, on a few small synthetic slides and a tiny real model."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import cli
from tests.conftest import ROOT, skip_without_localhost_ddp

MODEL = "zoom_in"  # tiny preset: a training step on a 1024 px slide takes well under a second
SLIDES = 6  # 2 train, 2 val, 2 test with the synthetic split


def call(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def quiet_call(*args) -> tuple[int, str, str]:
    """``call`` for module fixtures, which cannot use capsys."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    rc, stdout, err = quiet_call("synth", out, "--slides", SLIDES, "--size", 1024, "--seed", 1)
    assert rc == 0, err
    return out, stdout, err


@pytest.fixture(scope="module")
def run2(synth, tmp_path_factory):
    """A finished two-epoch run: (run folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    rc, stdout, err = quiet_call("train", synth[0] / "manifest.csv", "--model", MODEL, "--epochs", 2,
                                 "--out", out, "--threads", 1, "--seed", 3)
    assert rc == 0, err
    return out, stdout, err


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def state(run: Path, name: str = "last.pt") -> dict:
    import torch

    return torch.load(run / name, weights_only=True)


# -- synth ---------------------------------------------------------------------------------
def test_synth_writes_slides_manifest_and_needles(synth):
    from engines.slide import Slide

    out, stdout, err = synth
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == SLIDES and {r["label"] for r in rows} == {"normal", "tumor"}
    needles = json.loads((out / "needles.json").read_text())
    assert set(needles) == {r["slide"] for r in rows}
    for r in rows:
        with Slide(out / r["slide"]) as s:
            assert s.dimensions == (1024, 1024)
        assert bool(needles[r["slide"]]) == (r["label"] == "tumor")
    assert f"manifest: {out / 'manifest.csv'}" in stdout and f"needles: {out / 'needles.json'}" in stdout
    assert "progress:" in err and f"{SLIDES}/{SLIDES}" in err


def test_synth_needle_area_sets_the_needles_share_of_the_tissue(tmp_path):
    """Small needles on large slides (the 8192 px set keeps the 3072 px set's needle sizes):
    the same seed with a tenth of the area gives needles of about a tenth of the area."""
    areas = {}
    for name, extra in (("default", []), ("small", ["--needle-area", "0.01,0.1"])):
        out = tmp_path / name
        rc, _stdout, err = quiet_call("synth", out, "--slides", 4, "--size", 1024, "--seed", 2, *extra)
        assert rc == 0, err
        needles = json.loads((out / "needles.json").read_text())
        areas[name] = sum(w * h for rects in needles.values() for _x, _y, w, h in rects)
    assert 0.03 < areas["small"] / areas["default"] < 0.3


@pytest.mark.parametrize("args,words", [
    (["--slides", "1"], "at least 2"),
    (["--size", "10"], "--size must be"),
    (["--slides", "x"], "not a whole number"),
    (["--needle-area", "2,1"], "need 0 < LO <= HI"),
    (["--needle-area", "a"], "not LO,HI"),
])
def test_synth_bad_input(tmp_path, capsys, args, words):
    rc, _, err = call(capsys, "synth", tmp_path / "out", *args)
    assert words in one_line_error(rc, err)
    assert not (tmp_path / "out").exists()


# -- train ---------------------------------------------------------------------------------
def test_train_writes_checkpoints_and_metrics_then_resume_continues(synth, run2, tmp_path, capsys):
    run, stdout, err = run2
    assert {p.name for p in run.iterdir()} == {"last.pt", "best.pt", "config.json", "metrics.jsonl", "train.log"}
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert {"train_loss", "val_loss", "val_accuracy", "val_auroc"} <= set(rows[0])
    epoch_lines = [ln for ln in stdout.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("val_loss" in ln and "val_auroc" in ln for ln in epoch_lines)
    assert "progress:" in err and "ETA" in err and "loss" in err  # not a terminal: plain lines
    ck = state(run, "best.pt")
    assert ck["model"] == MODEL and ck["classes"] == ["normal", "tumor"]

    # Continue the same run for a third epoch; a second run folder gets the copy.
    import shutil

    again = tmp_path / "again"
    shutil.copytree(run, again)
    manifest = synth[0] / "manifest.csv"
    rc, stdout, err = call(capsys, "train", manifest, "--model", MODEL, "--epochs", 3, "--out", again,
                           "--threads", 1, "--seed", 3, "--resume")
    assert rc == 0, err
    assert [r["epoch"] for r in metrics(again)] == [1.0, 2.0, 3.0]
    assert [ln.split(":")[0] for ln in stdout.splitlines() if ln.startswith("epoch ")] == ["epoch 3/3"]
    assert len(state(again)["train"]["history"]) == 3

    # Without --resume the finished run is not overwritten.
    before = (again / "last.pt").read_bytes()
    rc, _, err = call(capsys, "train", manifest, "--model", MODEL, "--out", again)
    assert "--resume" in one_line_error(rc, err)
    assert (again / "last.pt").read_bytes() == before


def test_ctrl_c_stops_at_the_next_step_and_resume_finishes_the_same_run(synth, run2, tmp_path, capsys,
                                                                        monkeypatch):
    """A real SIGINT during the first step: the run stops before the second one, keeps a
    resumable last.pt, and --resume ends where the uninterrupted run ended."""
    import torch

    from engines import train as train_mod

    emit = train_mod.Trainer._emit
    sent = []

    def emit_and_interrupt(self, event):
        emit(self, event)
        if isinstance(event, train_mod.StepEvent) and not sent:
            sent.append(event.step)
            signal.raise_signal(signal.SIGINT)  # as Ctrl+C in the terminal

    monkeypatch.setattr(train_mod.Trainer, "_emit", emit_and_interrupt)
    handler_before = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    args = ["train", synth[0] / "manifest.csv", "--model", MODEL, "--epochs", 2, "--out", run,
            "--threads", 1, "--seed", 3]
    rc, _, err = call(capsys, *args)
    assert rc == 1 and "Traceback" not in err
    assert "--resume" in err.strip().splitlines()[-1]
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler put back
    tr = state(run)["train"]
    assert (tr["epoch"], tr["step"]) == (0, 1) and not (run / "metrics.jsonl").exists()

    monkeypatch.setattr(train_mod.Trainer, "_emit", emit)
    rc, _, err = call(capsys, *args, "--resume")
    assert rc == 0, err
    assert [r["train_loss"] for r in metrics(run)] == pytest.approx([r["train_loss"] for r in metrics(run2[0])])
    a, b = state(run)["state_dict"], state(run2[0])["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_bad_manifest_exits_2_listing_each_bad_row(synth, tmp_path, capsys):
    src = synth[0]
    bad = tmp_path / "bad.csv"
    (tmp_path / "notes.tiff").write_text("not a slide")
    rows = ["slide,label,split", f"{src / 'synth_000.tiff'},normal,train", "missing.tiff,tumor,train",
            f"{src / 'synth_001.tiff'},tumor,holdout", "notes.tiff,normal,train", ",tumor,train"]
    bad.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    rc, stdout, err = call(capsys, "train", bad, "--model", MODEL, "--out", out)
    assert rc == 2 and stdout == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("maglens train: error:") and "4 problem" in lines[0]
    problems = [ln.strip() for ln in lines[1:]]
    assert len(problems) == 4
    assert problems[0] == "row 2: missing.tiff: file not found"
    assert problems[1].startswith("row 3:") and "holdout" in problems[1]
    assert problems[2].startswith("row 4:") and "notes.tiff" in problems[2]
    assert problems[3] == "row 5: empty slide path"
    assert not out.exists()  # nothing left behind


@pytest.mark.parametrize("args,words", [
    (["--resume"], "nothing to resume"),
    (["--init", "missing.pt"], "no such file"),
    (["--epochs", "0"], "at least 1"),
    (["--lr", "-1"], "positive"),
    (["--model", "nope"], "unknown model"),
    (["--preset", "huge"], "no preset 'huge'"),
])
def test_train_bad_arguments(synth, tmp_path, capsys, args, words):
    base = ["train", synth[0] / "manifest.csv", "--model", MODEL, "--out", tmp_path / "run"]
    rc, _, err = call(capsys, *base, *args)
    assert words in one_line_error(rc, err)
    assert not (tmp_path / "run").exists()




def test_train_under_torchrun_with_two_processes(synth, tmp_path):
    skip_without_localhost_ddp()
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MAGLENS_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "app", "train", str(synth[0] / "manifest.csv"), "--model", MODEL, "--epochs", "2",
         "--out", str(run), "--threads", "1", "--seed", "3"],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Rank 0 alone prints and writes: one line per epoch, one set of checkpoints and metrics.
    epoch_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    assert {p.name for p in run.iterdir()} == {"last.pt", "best.pt", "config.json", "metrics.jsonl", "train.log"}
    assert [r["epoch"] for r in metrics(run)] == [1.0, 2.0]
    assert "ranks 2" in (run / "train.log").read_text()
    assert proc.stderr.count("epoch(s) done") == 1 and "maglens train [rank" not in proc.stderr
    assert len(state(run)["train"]["history"]) == 2


# -- snapshot ------------------------------------------------------------------------------
def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_snapshot_draws_the_requested_layers(synth, run2, tmp_path, capsys):
    src = synth[0]
    tumor = next(r["slide"] for r in csv.DictReader(open(src / "manifest.csv")) if r["label"] == "tumor")
    slide = src / tumor
    shots = {}
    for layers in ("boxes,maps,trail", "none", "boxes", "maps", "trail"):
        out = tmp_path / f"{layers.replace(',', '_')}.png"
        rc, stdout, err = call(capsys, "snapshot", slide, "--model", MODEL, "--out", out,
                               "--size", "900x600", "--layers", layers, "--threads", 1)
        assert rc == 0, err
        assert stdout.startswith("prediction:") and "warning: no --checkpoint" in err
        shots[layers] = _png(out)
    bare = shots["none"]
    assert bare.shape == (600, 900, 3)
    assert bare.std() > 20  # the slide itself, not a blank image
    # Compare away from the legend (top right): what differs there is the overlays themselves.
    region = (slice(300, 600), slice(0, 500))
    for layers in ("boxes,maps,trail", "boxes", "maps", "trail"):
        changed = np.abs(shots[layers][region] - bare[region]).sum(axis=2) > 30
        assert changed.mean() > 0.002, layers
    everything = np.abs(shots["boxes,maps,trail"][region] - bare[region]).sum(axis=2) > 30
    boxes_only = np.abs(shots["boxes"][region] - bare[region]).sum(axis=2) > 30
    assert everything.sum() > boxes_only.sum()

    # A trained checkpoint names its model; --view frames a part of the slide.
    out = tmp_path / "trained.png"
    rc, _, err = call(capsys, "snapshot", slide, "--checkpoint", run2[0] / "best.pt", "--out", out,
                      "--size", "320x200", "--view", "0,0,512,512")
    assert rc == 0, err
    assert "warning" not in err and _png(out).shape == (200, 320, 3)


@pytest.mark.parametrize("args,words", [
    (["--size", "12x"], "1600x1000"),
    (["--size", "0x10"], "1..16384"),
    (["--size", "99999x10"], "1..16384"),
    (["--layers", "boxes,glow"], "unknown: glow"),
    (["--view", "5000,5000,10,10"], "outside"),
    (["--view", "1,2,3"], "x,y,w,h"),
    (["--checkpoint", "missing.pt"], "no such file"),
])
def test_snapshot_bad_input_exits_2(synth, tmp_path, capsys, args, words):
    out = tmp_path / "f.png"
    rc, stdout, err = call(capsys, "snapshot", synth[0] / "synth_000.tiff", "--model", MODEL,
                           "--out", out, *args)
    assert words in one_line_error(rc, err)
    assert stdout == "" and not out.exists()


def test_snapshot_of_a_bad_slide_or_checkpoint_exits_2(synth, tmp_path, capsys):
    bad_ck = tmp_path / "c.pt"
    bad_ck.write_bytes(b"not a checkpoint")
    rc, _, err = call(capsys, "snapshot", tmp_path / "missing.svs", "--model", MODEL, "--out", tmp_path / "f.png")
    assert "missing.svs" in one_line_error(rc, err)
    rc, _, err = call(capsys, "snapshot", synth[0] / "synth_000.tiff", "--checkpoint", bad_ck,
                      "--out", tmp_path / "f.png")
    assert "c.pt" in one_line_error(rc, err)
    assert not (tmp_path / "f.png").exists()
