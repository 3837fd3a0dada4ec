"""Closing the window while a model runs and slide reads are in flight never takes the process
down: it cancels, waits a bounded time, hands what is still running to the process, and exits 0.
Each case runs a real viewer in its own process (tests/close_during_work.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA

SCRIPT = Path(__file__).resolve().parent / "close_during_work.py"


def _close_mid_run(tmp_path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "maglens.ini"), str(DATA / "small.svs"), mode],
        capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))


@pytest.mark.parametrize("mode", ["stubborn", "cooperative", "project"])
def test_closing_mid_run_exits_cleanly(tmp_path, mode):
    proc = _close_mid_run(tmp_path, mode)
    assert "closing mid-run" in proc.stdout, proc.stderr[-2000:]
    assert "QThread: Destroyed" not in proc.stderr, proc.stderr[-2000:]
    assert "Aborted" not in proc.stderr and "Segmentation" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "event loop ended 0" in proc.stdout
