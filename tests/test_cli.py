"""The maglens command line: info, infer, the default view command, and exit codes with one
clear stderr line for bad input. Subprocess runs cover the real entry point; in-process runs
(with a small registered model) cover the infer options quickly."""
from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from app import cli
from tests.conftest import BAD_SLIDES, DEMO_SLIDE, ROOT


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MAGLENS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "app", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def assert_one_line_error(proc: subprocess.CompletedProcess | tuple, code: int = 2) -> str:
    rc, err = (proc.returncode, proc.stderr) if hasattr(proc, "returncode") else proc
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- info (subprocess) -------------------------------------------------------------------
def test_info_on_the_demo_slide():
    proc = run_cli("info", DEMO_SLIDE)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert {"path", "vendor", "width", "height", "levels", "mpp", "objective_power",
            "associated_images", "properties"} <= set(info)
    assert (info["width"], info["height"]) == (2220, 2967)
    assert info["mpp"][0] == pytest.approx(0.499, abs=1e-3)
    assert info["levels"][0] == {"width": 2220, "height": 2967, "downsample": 1.0}


def _bad_slide_inputs(tmp: Path) -> list[Path]:
    empty = tmp / "empty.svs"
    empty.write_bytes(b"")
    text = tmp / "notes.svs"
    text.write_text("this is not a slide\n")
    return [*BAD_SLIDES, empty, text, tmp / "missing.svs", tmp]


def test_info_on_bad_input_exits_2_with_one_line(tmp_path):
    for path in _bad_slide_inputs(tmp_path):
        proc = run_cli("info", path)
        line = assert_one_line_error(proc)
        assert line.startswith("maglens info: error:") and proc.stdout == "", path


def test_bad_arguments_exit_2_with_one_line():
    line = assert_one_line_error(run_cli("infer", DEMO_SLIDE, "--model", "zoom_in", "--roi", "1,2,3"))
    assert "x,y,w,h" in line
    assert "unknown model" in assert_one_line_error(run_cli("infer", DEMO_SLIDE, "--model", "nope"))


# -- checkpoints through the real entry point ----------------------------------------------
def _model_available(name: str) -> bool:
    from engines import registry

    try:
        importlib.import_module(registry.MODULES[name])
        return True
    except Exception:  # noqa: BLE001 - a model still being written counts as absent
        return False


def test_infer_refuses_corrupt_and_malicious_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(200))
    marker = tmp_path / "pwned"
    malicious = tmp_path / "malicious.pt"
    # A pickle whose loading would call builtins.open(marker, "w").
    malicious.write_bytes(b"\x80\x02cbuiltins\nopen\nq\x00X" + len(str(marker)).to_bytes(4, "little")
                          + str(marker).encode() + b"X\x01\x00\x00\x00w\x86R.")
    for path, words in ((corrupt, "damaged"), (malicious, "refused")):
        line = assert_one_line_error(run_cli("infer", DEMO_SLIDE, "--model", "zoom_in", "--checkpoint", path))
        assert words in line and path.name in line
    assert not marker.exists()


def test_infer_with_a_tiny_real_model_then_a_wrong_model_checkpoint(tmp_path):
    if not (_model_available("zoom_in") and _model_available("grid_attention")):
        pytest.skip("zoom_in or grid_attention is not available yet")
    from engines import registry
    from engines.checkpoint import checkpoint_sha256, save_checkpoint
    from engines.trace import Trace

    ckpt = save_checkpoint(tmp_path / "zoom.pt", registry.create("zoom_in", "tiny"))
    out, geo = tmp_path / "trace.json", tmp_path / "trace.geojson"
    proc = run_cli("infer", DEMO_SLIDE, "--model", "zoom_in", "--checkpoint", ckpt, "--out", out,
                   "--geojson", geo, "--threads", "1", "--roi", "0,0,1200,1400")
    assert proc.returncode == 0, proc.stderr
    trace = Trace.load(out)
    assert trace.model == "zoom_in" and trace.checkpoint == checkpoint_sha256(ckpt)
    assert trace.roi == (0.0, 0.0, 1200.0, 1400.0) and trace.fields
    assert f"prediction: {trace.prediction}" in proc.stdout
    assert "progress:" in proc.stderr and "\r" not in proc.stderr  # not a terminal: plain lines
    assert "warning" not in proc.stderr
    assert json.loads(geo.read_text())["type"] == "FeatureCollection"

    line = assert_one_line_error(run_cli("infer", DEMO_SLIDE, "--model", "grid_attention",
                                         "--checkpoint", ckpt))
    assert "'zoom_in'" in line and "'grid_attention'" in line


# -- infer options, in process with a small registered model ------------------------------
@dataclass
class TinyConfig:
    fail: bool = False


def _tiny_module():
    import torch
    from torch import nn

    from engines.models.base import SlideModel
    from engines.trace import Field, Progress

    class Tiny(SlideModel):
        name = "tinycli"

        def __init__(self, config, classes=None):
            super().__init__(config, classes)
            self.lin = nn.Linear(3, self.num_classes)

        def explain(self, view, emit):
            emit(Progress(0, 2, "look"))
            emit(Field(0, None, 0, view.bounds, 1.0, "view"))
            if self.config.fail:
                raise RuntimeError("the model broke")
            emit(Progress(2, 2, "look"))
            mean = torch.from_numpy(view.thumbnail(32).reshape(-1, 3).mean(0)).float() / 255
            return torch.softmax(self.lin(mean), 0).tolist()

    mod = types.ModuleType("maglens_test_tinycli")
    mod.PRESETS = {"tiny": TinyConfig(), "broken": TinyConfig(fail=True)}
    mod.MODEL = Tiny
    return mod


@pytest.fixture
def tiny(monkeypatch):
    from engines import registry

    mod = _tiny_module()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(registry.MODULES, "tinycli", mod.__name__)
    return mod


def call(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_infer_without_checkpoint_warns_and_records_null(tiny, tmp_path, capsys):
    from engines.trace import Trace

    out = tmp_path / "t.json"
    rc, stdout, err = call(capsys, "infer", DEMO_SLIDE, "--model", "tinycli", "--out", out)
    assert rc == 0, err
    trace = Trace.load(out)
    assert trace.checkpoint is None and trace.model == "tinycli" and trace.preset == "tiny"
    assert "warning: no --checkpoint" in err and "checkpoint null" in err
    assert stdout.startswith(f"prediction: {trace.prediction}")


def test_infer_with_checkpoint_records_its_sha(tiny, tmp_path, capsys):
    from engines import registry
    from engines.checkpoint import checkpoint_sha256, save_checkpoint
    from engines.trace import Trace

    ck = save_checkpoint(tmp_path / "c.pt", registry.create("tinycli", "tiny", classes=["x", "y", "z"]))
    out = tmp_path / "t.json"
    # The checkpoint names its model, so --model may be left out.
    rc, _, err = call(capsys, "infer", DEMO_SLIDE, "--checkpoint", ck, "--out", out)
    assert rc == 0, err
    trace = Trace.load(out)
    assert trace.checkpoint == checkpoint_sha256(ck) and trace.classes == ["x", "y", "z"]
    assert "warning" not in err
    rc, _, err = call(capsys, "infer", DEMO_SLIDE, "--checkpoint", ck, "--preset", "broken")
    assert rc == 2 and "conflicts" in err


@pytest.mark.parametrize("args,words", [
    (["--model", "tinycli", "--preset", "huge"], "no preset 'huge'"),
    (["--model", "tinycli", "--roi", "5000,5000,10,10"], "outside"),
    (["--model", "tinycli", "--roi", "0,0,-5,10"], "positive"),
    (["--model", "tinycli", "--threads", "0"], "at least 1"),
    (["--model", "tinycli", "--out", "/no/such/folder/t.json"], "does not exist"),
    ([], "needs --model"),
])
def test_infer_bad_input(tiny, capsys, args, words):
    rc, stdout, err = call(capsys, "infer", DEMO_SLIDE, *args)
    assert_one_line_error((rc, err))
    assert words in err and stdout == ""


def test_model_failure_exits_1_with_one_line(tiny, capsys, monkeypatch):
    monkeypatch.delenv("MAGLENS_DEBUG", raising=False)
    rc, _, err = call(capsys, "infer", DEMO_SLIDE, "--model", "tinycli", "--preset", "broken")
    assert rc == 1 and "Traceback" not in err
    failures = [ln for ln in err.splitlines() if "failed" in ln]
    assert failures == [err.strip().splitlines()[-1]]
    assert failures[0].startswith("maglens infer: failed: RuntimeError: the model broke")


# -- view and the default command -----------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    calls = []
    fake = types.ModuleType("app.main_window")
    fake.launch = lambda slide_path, model, checkpoint: calls.append((slide_path, model, checkpoint)) or 0
    monkeypatch.setitem(sys.modules, "app.main_window", fake)
    return calls


def test_view_is_the_default_command(launches, tmp_path, capsys):
    ck = tmp_path / "c.pt"
    ck.write_bytes(b"x")
    assert call(capsys, DEMO_SLIDE)[0] == 0
    assert call(capsys)[0] == 0
    assert call(capsys, "view", DEMO_SLIDE, "--model", "zoom_in", "--checkpoint", ck)[0] == 0
    assert call(capsys, "--model", "magnet")[0] == 0
    assert launches == [(str(DEMO_SLIDE), None, None), (None, None, None),
                        (str(DEMO_SLIDE), "zoom_in", str(ck)), (None, "magnet", None)]


@pytest.mark.parametrize("args,words", [
    (["nosuchcommand"], "not a command"),
    (["missing.svs"], "no such file"),
    (["view", "--model", "nope"], "unknown model"),
    (["view", "--checkpoint", "missing.pt", "--model", "magnet"], "no such file"),
])
def test_view_bad_input_never_opens_a_window(launches, capsys, args, words):
    rc, _, err = call(capsys, *args)
    assert_one_line_error((rc, err))
    assert words in err and launches == []


def test_progress_printer_bar_and_plain_lines():
    tty = io.StringIO()
    bar = cli.ProgressPrinter(tty, tty=True)
    bar.update(5, 10, "tile 5 / 10")
    bar.update(10, 10, "done")
    bar.finish()
    assert tty.getvalue().count("\r") == 2 and " 50%" in tty.getvalue() and "100%" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    plain = io.StringIO()
    log = cli.ProgressPrinter(plain, tty=False, every_s=3600)
    for i in range(50):
        log.update(i, 100, f"tile {i} / 100")
    log.update(100, 100, "done")
    lines = plain.getvalue().splitlines()
    # One line when the stage starts, one at the end: not one per update.
    assert lines == ["progress: 0/100 tile 0 / 100", "progress: 100/100 done"]


def test_info_loads_neither_torch_nor_qt():
    code = ("import sys, contextlib, io\nfrom app.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    rc = main(['info', {str(DEMO_SLIDE)!r}])\n"
            "heavy = [m for m in ('torch', 'PySide6') if m in sys.modules]\n"
            "print(rc, heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.stdout.strip() == "0 []", proc.stderr


def test_infer_on_a_slide_whose_tiles_fail_exits_2(tiny, truncated_slide, capsys):
    rc, _, err = call(capsys, "infer", truncated_slide, "--model", "tinycli")
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("maglens infer: error: truncated.dcm")
