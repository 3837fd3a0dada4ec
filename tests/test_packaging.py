"""An installed MagLens is whole: the wheel carries the demo slide, demo checkpoints and the
synthetic-slide textures, and the installed code finds them through importlib.resources,
from any working directory and without the source tree."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

SOURCES = ("pyproject.toml", "README.md", "app", "viewer", "engines", "resources")
MODELS = ("grid_attention", "local_learning", "magnet", "spatial_mag", "zoom_in")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the tree, so the build leaves nothing in the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(work / "dist"), str(src)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = (work / "dist").glob("maglens-*.whl")
    return built


def test_wheel_holds_demo_slide_checkpoints_and_textures(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "resources/__init__.py" in names
    assert "resources/CMU-1-Small-Region.svs" in names
    for model in MODELS:
        assert f"resources/checkpoints/{model}.pt" in names
    textures = [n for n in names if n.startswith("resources/textures/") and n.endswith(".png")]
    folders = {n.split("/")[2] for n in textures}
    assert folders == {"01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS",
                       "06_MUCOSA", "07_ADIPOSE"}
    assert len(textures) == len(list((ROOT / "resources" / "textures").glob("*/*.png")))


def test_installed_wheel_finds_its_files_and_synth_runs(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing may be found through cwd
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "QT_QPA_PLATFORM": "offscreen"}
    probe = (
        "import sys\n"
        "from engines.resources import resource_path\n"
        "from engines import synth\n"
        "from engines.slide import Slide\n"
        "from app import main_window, models_dock\n"
        f"for model in {MODELS!r}:\n"
        "    print(models_dock.bundled_checkpoint(model))\n"
        "print(main_window.DEMO_SLIDE)\n"
        "print(synth.TEXTURE_ROOT)\n"
        "print(resource_path('CMU-1-Small-Region.svs'))\n"
        "with Slide(main_window.DEMO_SLIDE) as s:\n"
        "    assert s.width > 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = [Path(line) for line in proc.stdout.split("\n") if line.strip()]
    assert len(paths) == len(MODELS) + 3
    for path in paths:
        assert path.exists(), path
        assert path.resolve().is_relative_to(site.resolve()), f"{path} is not the installed copy"

    # The console script, as a user runs it after pip install: synthetic slides need the textures.
    out = tmp_path / "synth"
    proc = subprocess.run([str(site / "bin" / "maglens"), "synth", str(out), "--slides", "2",
                           "--size", "1024"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "manifest.csv").is_file()
    assert len(list(out.glob("synth_*.tiff"))) == 2
