"""Inference options: a trained model run with another sampling (Zoom-In's reference draws)
from the command line, for one slide and a cohort; anything else is refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engines import registry
from engines.checkpoint import model_from_checkpoint
from engines.resources import resource_path
from tests.conftest import DEMO_SLIDE

ZOOM_IN = resource_path("checkpoints", "zoom_in.pt")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "app", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_a_checkpoint_takes_inference_options_with_its_own_weights():
    plain = model_from_checkpoint(ZOOM_IN)
    ref = model_from_checkpoint(ZOOM_IN, options={"draws": "reference", "n_samples": 6})
    assert (ref.config.draws, ref.config.n_samples) == ("reference", 6) and plain.config.draws == "random"
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(registry.UnknownModelError, match="tile_size: not an inference option of 'zoom_in'"):
        model_from_checkpoint(ZOOM_IN, options={"tile_size": 64})


def test_cli_runs_the_reference_draws_and_refuses_other_settings(tmp_path):
    out = tmp_path / "ref.json"
    ok = _cli("infer", DEMO_SLIDE, "--checkpoint", ZOOM_IN, "--option", "draws=reference",
              "--option", "n_samples=6", "--roi", "600,900,512,512", "--out", out)
    assert ok.returncode == 0, ok.stderr
    trace = json.loads(out.read_text())
    tiles = [f for f in trace["fields"] if f["kind"] == "tile"]
    assert 1 <= len(tiles) <= 6
    bad = _cli("infer", DEMO_SLIDE, "--checkpoint", ZOOM_IN, "--option", "tile_size=64", "--out", tmp_path / "x.json")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not an inference option" in bad.stderr
    worse = _cli("infer", DEMO_SLIDE, "--model", "magnet", "--option", "draws")
    assert worse.returncode == 2 and "is not KEY=VALUE" in worse.stderr
