"""A training run survives being killed at any moment and resumes exactly: real
``python -m app train`` processes killed with SIGKILL at named points (the trainer's
``MAGLENS_TEST_KILL_AT`` fault-injection hook), then ``--resume``, end with the same
``best.pt``, ``last.pt`` and ``metrics.jsonl`` as an uninterrupted run of the same seed. The
run's settings live in its checkpoint: the printed resume command is complete, conflicting
settings are refused, a drawn split is recorded, and "best.pt from epoch N" names the epoch
best.pt really holds."""
from __future__ import annotations

import csv
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app import cli
from tests.conftest import ROOT

MODEL = "zoom_in"  # the tiny preset trains a step on a 1024 px slide in well under a second
KILL_ENV = "MAGLENS_TEST_KILL_AT"
SETTINGS = ["--seed", "5", "--threads", "1", "--accumulation", "2"]  # none of them the default


def app(*args, kill_at: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MAGLENS_DEBUG", None)
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "app", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from engines.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, slides=6, seed=1, cfg=SynthConfig(size=1024))  # 2 train, 2 val, 2 test
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted two-epoch run: (folder, process)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = app("train", data / "manifest.csv", "--model", MODEL, "--epochs", 2, "--out", run, *SETTINGS)
    assert proc.returncode == 0, proc.stderr
    return run, proc


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same(a, b, where: str = "ckpt") -> None:
    """Equal contents: every tensor bit for bit, every number and name."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def assert_same_run(run: Path, ref: Path) -> None:
    for name in ("best.pt", "last.pt"):
        assert_same(load(run / name), load(ref / name), name)
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    assert (run / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    left = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert not left, left  # no temporary files, no lock


def test_kill_9_at_any_point_then_resume_ends_as_an_uninterrupted_run(data, reference, tmp_path):
    ref, _ = reference
    run = tmp_path / "run"
    base = ["train", data / "manifest.csv", "--model", MODEL, "--epochs", 2, "--out", run]

    # Killed in the first step of the first epoch: last.pt already holds the starting state.
    proc = app(*base, *SETTINGS, kill_at="step@1.2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load(run / "last.pt")["train"]["epoch"] == 0
    # Killed between writing best.pt and last.pt; --resume alone (the run's settings come
    # from last.pt, not from the command line).
    proc = app(*base, "--resume", kill_at="after-best@1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load(run / "best.pt")["train"]["epoch"] == 1 and load(run / "last.pt")["train"]["epoch"] == 0
    # Killed between last.pt and metrics.jsonl of epoch 2, with a checkpoint write cut short
    # (what a kill inside write_atomic leaves behind).
    proc = app(*base, "--resume", kill_at="after-last@2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load(run / "last.pt")["train"]["epoch"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # one epoch behind
    (run / ".last.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04half a checkpoint")
    (run / ".metrics.jsonl.k1ll3d.tmp").write_text('{"epoch": 2.0, "train_lo')
    # All epochs are in last.pt: the resume only rebuilds metrics.jsonl and cleans up (and
    # takes over the lock the killed run left).
    proc = app(*base, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "nothing left to train" in proc.stderr
    assert_same_run(run, ref)


def test_resume_command_printed_on_stop_is_complete(data, reference, tmp_path):
    """Ctrl+C (a real SIGINT) stops the run; the command it prints, run as it is, finishes the
    same run, non-default seed, accumulation and threads included."""
    ref, _ = reference
    run = tmp_path / "run"
    proc = app("train", data / "manifest.csv", "--model", MODEL, "--epochs", 2, "--out", run, *SETTINGS,
               kill_at="step@1.1=INT")
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "Continue with: " in last
    command = shlex.split(last.split("Continue with: ", 1)[1])
    assert command[0] == "maglens" and "--resume" in command
    proc = app(*command[1:])
    assert proc.returncode == 0, proc.stderr
    assert_same_run(run, ref)


@pytest.mark.parametrize("extra,words", [
    (["--seed", "6"], "seed 6 differs from the run's 5"),
    (["--accumulation", "3"], "accumulation 3 differs from the run's 2"),
    (["--threads", "2"], "threads 2 differs from the run's 1"),
    (["--preset", "paper"], "preset paper differs from the run's tiny"),
])
def test_resume_refuses_settings_that_conflict_with_the_run(data, reference, tmp_path, capsys, extra, words):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc = cli.main([str(a) for a in ["train", data / "manifest.csv", "--model", MODEL, "--epochs", 3,
                                    "--out", run, "--resume", *extra]])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


def test_settings_are_stored_in_the_checkpoint(data, reference):
    run = load(reference[0] / "last.pt")["train"]["run"]
    assert (run["seed"], run["accumulation"], run["threads"], run["device"]) == (5, 2, 1, "cpu")
    assert len(run["manifest_sha256"]) == 64 and len(run["split_sha256"]) == 64


def test_best_epoch_message_names_the_epoch_best_pt_holds(reference):
    """The CLI's "best.pt from epoch N" follows the trainer's rule (AUROC, ties broken by the
    lower validation loss), so it names the epoch whose weights best.pt holds."""
    run, proc = reference
    held = load(run / "best.pt")["train"]["epoch"]
    marked = [int(m.group(1)) for m in re.finditer(r"^epoch (\d+)/2:.*\(best\)$", proc.stdout, re.M)]
    assert marked and marked[-1] == held
    said = re.search(r"best\.pt from epoch (\d+)", proc.stderr)
    assert said and int(said.group(1)) == held, proc.stderr

    from engines.train import best_epoch

    tied = [{"epoch": 1.0, "val_auroc": 1.0, "val_loss": 0.4}, {"epoch": 2.0, "val_auroc": 1.0, "val_loss": 0.1},
            {"epoch": 3.0, "val_auroc": 0.5, "val_loss": 0.01}]
    assert best_epoch(tied) == 2


def test_drawn_split_is_recorded_and_reused_on_resume(data, tmp_path, monkeypatch, capsys):
    """A manifest without a split column: the split drawn by seed goes to split.csv, and a
    resume trains on that split even if drawing it again would give another one."""
    rows = list(csv.DictReader(open(data / "manifest.csv")))
    manifest = tmp_path / "nosplit.csv"
    manifest.write_text("slide,label\n" + "".join(f"{data / r['slide']},{r['label']}\n" for r in rows))
    run = tmp_path / "run"
    args = ["train", manifest, "--model", MODEL, "--epochs", 2, "--out", run, "--threads", 1]
    from engines import train as train_mod

    def stop_after_first_epoch(self, event):
        emit(self, event)
        if isinstance(event, train_mod.EpochEvent):
            self.control.cancel()

    emit = train_mod.Trainer._emit
    monkeypatch.setattr(train_mod.Trainer, "_emit", stop_after_first_epoch)
    assert cli.main([str(a) for a in args]) == 1
    capsys.readouterr()
    recorded = {r["slide"]: r["split"] for r in csv.DictReader(open(run / "split.csv"))}
    drawn = {s.path.name: s.split for s in train_mod.read_manifest(manifest).samples}
    assert recorded == drawn and set(recorded.values()) >= {"train", "val"}
    split_hash = load(run / "last.pt")["train"]["run"]["split_sha256"]

    # Draw another split on resume (as another numpy might): the recorded one still rules.
    real = train_mod.read_manifest

    def swapped(path, seed=0, **kw):
        ds = real(path, seed=seed, **kw)
        flip = {"train": "val", "val": "train", "test": "test"}
        ds.samples = [train_mod.replace(s, split=flip[s.split]) for s in ds.samples]
        return ds

    monkeypatch.setattr(train_mod, "read_manifest", swapped)
    monkeypatch.setattr(train_mod.Trainer, "_emit", emit)
    rc = cli.main([str(a) for a in args + ["--resume"]])
    assert rc == 0, capsys.readouterr().err
    assert load(run / "last.pt")["train"]["run"]["split_sha256"] == split_hash
    n_train = sum(v == "train" for v in recorded.values())
    told = [ln for ln in (run / "train.log").read_text().splitlines() if " val slides;" in ln]
    assert len(told) == 2 and all(f": {n_train} train," in ln for ln in told)


def test_resume_refuses_a_changed_manifest(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    manifest = tmp_path / "manifest.csv"
    text = (data / "manifest.csv").read_text()
    manifest.write_text(text.replace(",train\n", ",val\n", 1))  # a training slide moved to val
    for name in os.listdir(data):
        if name.endswith(".tiff"):
            os.symlink(data / name, tmp_path / name)
    rc = cli.main([str(a) for a in ["train", manifest, "--model", MODEL, "--epochs", 3, "--out", run,
                                    "--resume"]])
    err = capsys.readouterr().err
    assert rc == 2 and "changed since the run" in err and len(err.strip().splitlines()) == 1, err
