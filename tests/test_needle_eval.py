"""benchmarks/needle_eval.py on a small synthetic set: which rows it scores, and its JSON."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

from engines import registry
from engines.checkpoint import save_checkpoint
from engines.data import read_manifest
from engines.synth import SynthConfig, generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import needle_eval  # noqa: E402


@pytest.fixture(scope="module")
def needle_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("needles")
    generate(out, slides=6, seed=5, cfg=SynthConfig(size=512))
    ckpts = out / "ckpts"
    ckpts.mkdir()
    model = registry.create("grid_attention", "tiny", classes=read_manifest(out / "manifest.csv").classes)
    save_checkpoint(ckpts / "grid_attention.pt", model)
    return out, ckpts


def run_eval(*args: str) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert needle_eval.main(list(args)) == 0
    return json.loads(buf.getvalue())


@pytest.mark.parametrize("split", ["test", "all"])
def test_scores_the_rows_of_the_split_asked_for(needle_set, split):
    data, ckpts = needle_set
    rows = read_manifest(data / "manifest.csv").samples
    expected = [s for s in rows if split == "all" or s.split == split]
    out = run_eval("--data", str(data), "--checkpoints", str(ckpts), "--models",
                   "grid_attention,magnet", "--threads", "1", "--split", split)
    assert out["split"] == split
    got = out["models"]["grid_attention"]
    assert got["slides"] == len(expected)
    assert got["positives"] == sum(s.label == "tumor" for s in expected)
    assert 0.0 <= got["accuracy"] <= 1.0
    # the tissue-relative ratio and Dice against the slides' Tumor annotations: median, IQR, CI
    for key in ("ratio", "dice"):
        assert set(got[key]) == {"median", "iqr", "ci95", "n"}
        assert got[key]["n"] == got["positives"]
    assert got["auroc_ci95"] is None or got["auroc_ci95"][0] <= got["auroc"] <= got["auroc_ci95"][1]
    assert "no checkpoint" in out["models"]["magnet"]["error"]
