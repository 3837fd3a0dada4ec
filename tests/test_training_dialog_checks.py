"""The training dialog stays responsive and safe while it checks: the manifest check (which
opens every slide) and the torch import run off the GUI thread, a newer check supersedes an
older one, and an output folder in use by a running training run is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from PySide6.QtCore import QTimer

import app.training_dialog as td
from engines import registry
from engines.runlock import RunLock, lock_holder
from tests.conftest import ROOT
from tests.test_train import manifest  # noqa: F401 - the module-scoped manifest fixture
from tests.test_training_dialog import CHECK_TIMEOUT_MS, TRAIN_TIMEOUT_MS, check

BLOCK_S = 20  # a blocked check gives up after this long (only if the GUI thread is stuck)


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    monkeypatch.setitem(registry.MODULES, "fake", "tests.fake_model")


@pytest.fixture
def dlg(qtbot, tmp_path):
    d = td.TrainingDialog()
    qtbot.addWidget(d)
    d.out_edit.setText(str(tmp_path / "run"))
    d.show()
    yield d
    d.shutdown()


def test_a_slow_check_leaves_the_gui_running_and_its_result_arrives(qtbot, dlg, manifest, monkeypatch):  # noqa: F811
    release, started = threading.Event(), threading.Event()
    stuck = []
    real = td.read_manifest

    def slow(*args, **kwargs):
        started.set()
        if not release.wait(BLOCK_S):
            stuck.append(True)  # nobody released it: the GUI thread was not running
        return real(*args, **kwargs)

    monkeypatch.setattr(td, "read_manifest", slow)
    fired = []

    def tick():  # runs only if the GUI event loop runs while the check is busy
        fired.append(started.is_set())
        release.set()

    QTimer.singleShot(0, tick)
    dlg.manifest_edit.setText(str(manifest))
    with qtbot.waitSignal(dlg.manifest_checked, timeout=CHECK_TIMEOUT_MS + BLOCK_S * 1000) as blocker:
        dlg.load_manifest(str(manifest))
        assert dlg.checking and "Checking" in dlg.counts_label.text()
        assert not dlg.start_button.isEnabled()
    assert not stuck and fired
    assert blocker.args == [True]
    assert dlg.preview.rowCount() == 8 and "train: 3 normal, 3 tumor" in dlg.counts_label.text()
    assert dlg.start_button.isEnabled() and not dlg.checking


def test_a_newer_check_supersedes_an_older_one(qtbot, dlg, manifest, tmp_path, monkeypatch):  # noqa: F811
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\nmissing.png,tumor\n")
    release = threading.Event()
    real = td.read_manifest

    def slow_for_good(path, *args, **kwargs):
        if str(path) == str(manifest):
            release.wait(BLOCK_S)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(td, "read_manifest", slow_for_good)
    dlg.load_manifest(str(manifest))  # blocks on the worker until released
    results = []
    dlg.manifest_checked.connect(results.append)
    assert not check(qtbot, dlg, bad)  # the newer one answers while the older still runs
    release.set()
    qtbot.waitUntil(lambda: not dlg._checks.pending(), timeout=CHECK_TIMEOUT_MS)
    qtbot.wait(50)  # let a stale result (if any were delivered) reach the dialog
    assert results == [False]
    assert dlg.checked.path == str(bad) and "missing.png: file not found" in dlg.log.toPlainText()
    assert dlg.preview.rowCount() == 0 and not dlg.start_button.isEnabled()


def test_an_output_folder_in_use_by_a_running_run_is_refused(qtbot, dlg, manifest, tmp_path):  # noqa: F811
    assert check(qtbot, dlg, manifest)
    dlg.model_combo.addItem("fake")
    dlg.model_combo.setCurrentText("fake")
    dlg.epochs.setValue(1)
    out = tmp_path / "busy"
    with RunLock(out):
        dlg.out_edit.setText(str(out))
        assert not dlg.start_button.isEnabled()
        assert dlg.out_note.isVisible() and "in use by another training run" in dlg.out_note.text()
        assert f"pid {os.getpid()}" in dlg.out_note.text()
        assert dlg.start() is None and dlg.run_id is None
        assert not (out / "last.pt").exists()
    # Once the other run has ended the folder is free again (the dialog looks again by itself).
    qtbot.waitUntil(lambda: dlg.start_button.isEnabled(), timeout=td.LOCK_POLL_MS * 5)
    assert not dlg.out_note.isVisible()


def test_the_dialogs_own_run_holds_the_folder(qtbot, dlg, manifest, tmp_path, monkeypatch):  # noqa: F811
    held = []
    import engines.train as train_mod

    real = train_mod.train

    def spy(cfg, **kw):
        held.append(lock_holder(cfg.out))
        return real(cfg, **kw)

    monkeypatch.setattr(train_mod, "train", spy)
    assert check(qtbot, dlg, manifest)
    dlg.model_combo.addItem("fake")
    dlg.model_combo.setCurrentText("fake")
    dlg.epochs.setValue(1)
    with qtbot.waitSignal(dlg.engine.done, timeout=TRAIN_TIMEOUT_MS):
        assert dlg.start() is not None
    assert held and held[0] is not None  # another run into this folder would be refused
    assert lock_holder(tmp_path / "run") is None and dlg.start_button.isEnabled()


def test_torch_is_imported_off_the_gui_thread():
    script = r"""
import json, sys, threading, time
gui_imports = []

class Spy:  # records which thread first imports torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            gui_imports.append(threading.current_thread() is threading.main_thread())
        return None

sys.meta_path.insert(0, Spy())
from PySide6.QtWidgets import QApplication
app = QApplication([])
import app.training_dialog as td
at_import = "torch" in sys.modules
dlg = td.TrainingDialog()
deadline = time.monotonic() + 90
while not getattr(dlg, "prepared", False) and time.monotonic() < deadline:
    app.processEvents()
    time.sleep(0.02)  # sleeps without the GIL, so the worker can import
print(json.dumps({"at_import": at_import, "prepared": getattr(dlg, "prepared", None),
                  "gui_imports": gui_imports, "devices": dlg.device_combo.count()}))
dlg.shutdown()
"""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["at_import"] is False
    assert got["prepared"] is True and got["devices"] >= 2
    assert got["gui_imports"] == [False]  # imported once, by the check worker
