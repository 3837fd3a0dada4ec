"""`make run` names the system libraries Qt's xcb plugin is missing, with the apt-get line that
installs them, before it starts anything; `make deps` runs that line."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "tools" / "check_qt_deps.py"


def load_checker():
    spec = importlib.util.spec_from_file_location("check_qt_deps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def display_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "MAGLENS_PRETEND_MISSING")}
    env.update(extra)
    return env


def test_missing_libraries_map_to_debian_packages():
    checker = load_checker()
    absent = {"libxcb-cursor.so.0", "libxkbcommon-x11.so.0", "libEGL.so.1"}
    packages = checker.missing_packages(lambda soname: soname not in absent)
    assert packages == ["libxcb-cursor0", "libxkbcommon-x11-0", "libegl1"]
    assert checker.missing_packages(lambda _s: True) == []
    assert checker.missing_packages(lambda _s: True, ["libdbus-1.so.3"]) == ["libdbus-1-3"]
    every = checker.missing_packages(lambda _s: False)
    for package in ("libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1", "libxcb-image0",
                    "libxcb-render-util0", "libxcb-xkb1", "libxkbcommon-x11-0", "libegl1", "libgl1",
                    "libfontconfig1", "libdbus-1-3"):
        assert package in every
    assert checker.install_command(["libxcb-cursor0"], root=True) == ["apt-get", "install", "-y", "libxcb-cursor0"]
    assert checker.install_command(["libxcb-cursor0"], root=False)[:2] == ["sudo", "apt-get"]
    # Only a display needs them.
    assert checker.needs_display_libraries({})
    assert checker.needs_display_libraries({"QT_QPA_PLATFORM": "xcb"})
    assert not checker.needs_display_libraries({"QT_QPA_PLATFORM": "offscreen"})
    assert not checker.needs_display_libraries({"QT_QPA_PLATFORM": "wayland"})


def test_ldconfig_cache_is_read():
    checker = load_checker()
    known = checker.ldconfig_libraries()
    if known is None:
        pytest.skip("no ldconfig here")
    assert "libc.so.6" in known


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_stops_with_the_apt_get_line_when_a_library_is_missing():
    env = display_env(MAGLENS_PRETEND_MISSING="libxcb-cursor.so.0 libxcb-xkb.so.1")
    proc = subprocess.run(["make", "-s", "check-deps"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "apt-get install -y libxcb-cursor0 libxcb-xkb1" in proc.stderr
    assert "make deps" in proc.stderr
    # `make run` checks first, before the virtual environment or the viewer.
    dry = subprocess.run(["make", "-n", "run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    lines = dry.stdout.splitlines()
    check = next(i for i, line in enumerate(lines) if "check_qt_deps.py" in line)
    launch = next(i for i, line in enumerate(lines) if "-m app" in line)
    assert check < launch
    # Offscreen needs no X libraries: nothing to say, and the run goes ahead.
    quiet = subprocess.run(["make", "-s", "check-deps"], cwd=ROOT, capture_output=True, text=True,
                           env={**env, "QT_QPA_PLATFORM": "offscreen"}, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_deps_installs_exactly_the_missing_packages():
    env = display_env(MAGLENS_PRETEND_MISSING="libxcb-cursor.so.0")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--install", "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=60)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        assert proc.returncode == 0
        assert proc.stdout.strip() == "apt-get install -y libxcb-cursor0"
    else:
        # Not root (or no apt): the sudo line to run, nothing installed.
        assert proc.returncode == 1
        assert "sudo apt-get install -y libxcb-cursor0" in proc.stderr or "apt-get" in proc.stderr
