"""Slides that fail to read during training: under torchrun every rank skips the step
together (none is left waiting at an all-reduce), and in one process a skipped slide still
closes its accumulation group."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines import registry
from tests.conftest import ROOT, skip_without_localhost_ddp


def unreadable_copy(src: Path, dst: Path) -> Path:
    """A copy of a tiled TIFF whose tiles are zeroed: it opens (the manifest check passes)
    and every pixel read fails."""
    import tifffile

    shutil.copyfile(src, dst)
    with tifffile.TiffFile(dst) as tif:
        spans = [(o, n) for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts)]
    with open(dst, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(b"\0" * count)
    return dst


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """(folder, [(name, label)]) of eight small synthetic slides."""
    from engines.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    made = generate(out, slides=8, seed=2, cfg=SynthConfig(size=1024))
    return out, [(s.name, s.label) for s in made]


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "label", "split"])
        w.writerows(rows)
    return path




def manifest_with_unreadable_second_row(slides, tmp_path):
    """(manifest, unreadable file): four training rows and two validation rows; the second
    training slide cannot be read. Training rows are sharded round robin, so under two ranks
    it goes to rank 1 alone."""
    src, made = slides
    normal = [n for n, l in made if l == "normal"]
    tumor = [n for n, l in made if l == "tumor"]
    bad = unreadable_copy(src / tumor[0], tmp_path / "unreadable.tiff")
    rows = [(str(src / normal[0]), "normal", "train"), (str(bad), "tumor", "train"),
            (str(src / normal[1]), "normal", "train"), (str(src / tumor[1]), "tumor", "train"),
            (str(src / normal[2]), "normal", "val"), (str(src / tumor[2]), "tumor", "val")]
    return write_manifest(tmp_path / "m.csv", rows), bad


def test_a_slide_failing_on_one_rank_is_skipped_by_every_rank(slides, tmp_path):
    skip_without_localhost_ddp()
    manifest, bad = manifest_with_unreadable_second_row(slides, tmp_path)
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MAGLENS_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "app", "train", str(manifest), "--model", "zoom_in", "--epochs", "2",
         "--out", str(run), "--threads", "1", "--seed", "1", "--accumulation", "1"],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (run / "train.log").read_text()
    skips = [ln for ln in log.splitlines() if "skipped a step on every rank" in ln]
    assert len(skips) == 2 and all("rank 1: unreadable.tiff" in ln and "rank 0" not in ln for ln in skips), log
    assert [ln.split(":")[0] for ln in proc.stdout.splitlines() if ln.startswith("epoch ")] == \
        ["epoch 1/2", "epoch 2/2"]
    ck = torch.load(run / "last.pt", weights_only=True)
    # Two steps per rank and epoch, one of them skipped by both ranks: 2 optimiser steps.
    steps = {int(s["step"]) for s in ck["optimizer"]["state"].values()}
    assert steps == {2}


def test_a_skipped_slide_does_not_merge_two_accumulation_groups(slides, tmp_path, monkeypatch):
    """Four training slides, two per optimiser step, the last of the epoch unreadable: two
    optimiser steps, the second on the one slide that was read."""
    from engines.data import read_manifest
    from engines.train import TrainConfig, _epoch_plan, train

    monkeypatch.setitem(registry.MODULES, "fake", "tests.fake_model")
    manifest, bad = manifest_with_unreadable_second_row(slides, tmp_path)
    train_set = read_manifest(manifest).split("train")
    # A seed whose first epoch reads the unreadable slide second (it ends the first group).
    seed = next(s for s in range(100) if _epoch_plan(train_set, s, 0, True)[0][1].path == bad)
    res = train(TrainConfig(manifest=str(manifest), model="fake", out=str(tmp_path / "run"), epochs=1,
                            seed=seed, accumulation=2, lr=0.01))
    assert res.epochs_done == 1
    assert "skipped unreadable.tiff" in (tmp_path / "run" / "train.log").read_text()
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert {int(s["step"]) for s in ck["optimizer"]["state"].values()} == {2}
