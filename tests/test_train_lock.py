"""One training run per run folder: ``engines.runlock`` and ``maglens train`` refusing a
folder that a live run holds, taking over the lock a killed run left, and ``--init`` with a
bad checkpoint leaving no file behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app import cli
from engines.runlock import LOCK_NAME, RunLock, RunLockedError, lock_holder
from tests.conftest import ROOT

HOLD = textwrap.dedent("""
    import sys, time
    from engines.runlock import RunLock
    with RunLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/'run': (folder, process)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from engines.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, slides=6, seed=1, cfg=SynthConfig(size=512))
    return out / "manifest.csv"


def test_lock_is_exclusive_names_its_holder_and_goes_away(tmp_path):
    run = tmp_path / "new" / "run"
    with RunLock(run):
        assert (run / LOCK_NAME).is_file()
        said = lock_holder(run)
        assert said is not None and said.startswith(f"pid {os.getpid()} on {socket.gethostname()}, since ")
        with pytest.raises(RunLockedError) as err:
            RunLock(run).acquire()
        assert str(run) in str(err.value) and f"pid {os.getpid()}" in str(err.value)
        assert isinstance(err.value, ValueError)
    assert lock_holder(run) is None
    assert not run.exists()  # made by the lock, left empty: removed again
    run.mkdir()
    (run / "keep.txt").write_text("x")
    with RunLock(run):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_lock_of_a_killed_process_is_taken_over(holder):
    run, proc = holder
    assert lock_holder(run) == lock_holder(run) and f"pid {proc.pid} " in lock_holder(run)
    with pytest.raises(RunLockedError):
        RunLock(run).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / LOCK_NAME).exists()  # left behind by the killed process...
    assert lock_holder(run) is None  # ...but nobody holds it
    with RunLock(run):
        assert f"pid {os.getpid()} " in lock_holder(run)


@pytest.mark.parametrize("resume", [False, True])
def test_second_train_into_a_held_folder_is_refused_at_once(holder, manifest, capsys, resume):
    run, proc = holder
    if resume:
        (run / "last.pt").write_bytes(b"a run's checkpoint")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc = cli.main([str(a) for a in ["train", manifest, "--model", "zoom_in", "--epochs", 1, "--out", run]
                   + (["--resume"] if resume else [])])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(run) in lines[0] and f"pid {proc.pid} " in lines[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def _bad_checkpoints(tmp_path: Path, manifest: Path) -> dict[str, Path]:
    import torch

    from engines import registry
    from engines.checkpoint import save_checkpoint

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    other = tmp_path / "other_model.pt"
    save_checkpoint(other, registry.create("grid_attention", "tiny", classes=["normal", "tumor"]))
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(3)}, bare)
    nan = tmp_path / "nan.pt"  # the right model, but a weight is NaN: it would train to NaN
    save_checkpoint(nan, registry.create("zoom_in", "tiny", classes=["normal", "tumor"]))
    ck = torch.load(nan, weights_only=True)
    next(iter(ck["state_dict"].values())).view(-1)[0] = float("nan")
    torch.save(ck, nan)
    return {"corrupt": corrupt, "other": other, "bare": bare, "nan": nan}


@pytest.mark.parametrize("kind", ["corrupt", "other", "bare", "nan"])
@pytest.mark.parametrize("out_exists", [False, True])
def test_train_init_with_a_bad_checkpoint_leaves_no_files(tmp_path, manifest, capsys, kind, out_exists):
    bad = _bad_checkpoints(tmp_path, manifest)[kind]
    run = tmp_path / "run"
    if out_exists:
        run.mkdir()
    rc = cli.main([str(a) for a in ["train", manifest, "--model", "zoom_in", "--epochs", 1, "--out", run,
                                    "--init", bad]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if out_exists:
        assert list(run.iterdir()) == []
    else:
        assert not run.exists()
