"""Large reads are decoded in pieces (same pixels), stop between pieces when asked, and are
refused over the pixel budget; files declaring absurd sizes are refused at once, in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engines.slide as slide_mod
from engines.slide import ReadBudgetError, Slide, SlideError
from tests.conftest import GOOD_SLIDES, ROOT
from tests.hostile_files import png_header, tiled_slide, write_tiff


class Stop(Exception):
    pass


def count_reads(slide: Slide) -> list[int]:
    """Wrap the backend's reads; returns the list of decoded pixel counts, one per read."""
    pixels: list[int] = []
    inner = slide._backend.read

    def read(level, x, y, w, h):
        pixels.append(w * h)
        return inner(level, x, y, w, h)

    slide._backend.read = read
    return pixels


def random_rects(slide: Slide, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        w, h = rng.uniform(0.2, 1.0) * slide.width, rng.uniform(0.2, 1.0) * slide.height
        x, y = rng.uniform(-0.1, 0.9) * slide.width, rng.uniform(-0.1, 0.9) * slide.height
        yield (x, y, w, h), int(rng.integers(16, 600)), int(rng.integers(16, 600))


@pytest.fixture(scope="module")
def single_level(tmp_path_factory) -> Path:
    return tiled_slide(tmp_path_factory.mktemp("single") / "single-3000.tif", 3000, tile=256)


def test_reads_in_pieces_give_the_same_pixels(monkeypatch, single_level):
    for path in [*GOOD_SLIDES, single_level]:
        with Slide(path) as s:
            cases = list(random_rects(s, 5))
            whole = []
            for rect, ow, oh in cases:
                s._proxy = None
                whole.append(s.read_rect(rect, ow, oh))
            monkeypatch.setattr(slide_mod, "READ_PIECE", 37)
            reads = count_reads(s)
            for (rect, ow, oh), expected in zip(cases, whole):
                s._proxy = None
                np.testing.assert_array_equal(s.read_rect(rect, ow, oh), expected, err_msg=str(path))
            monkeypatch.setattr(slide_mod, "READ_PIECE", 2048)
            if path == single_level:  # level 0: every read is split
                assert max(reads) <= 37 * 37 and len(reads) > 10 * len(cases)


def test_regions_too_large_to_hold_are_resampled_in_bands(monkeypatch, single_level):
    with Slide(single_level) as s:
        monkeypatch.setattr(slide_mod, "MAX_PROXY_PIXELS", 1000)  # as for a huge slide
        rect, out = (13.5, 20.25, 2900.0, 2950.0), (300, 290)
        expected = s.read_rect(rect, *out)
        monkeypatch.setattr(slide_mod, "MAX_WHOLE_READ_PIXELS", 200_000)
        reads = count_reads(s)
        banded = s.read_rect(rect, *out)
        assert max(reads) <= 2048 * 2048 and sum(reads) >= 2900 * 2900
        # Same resampling, up to rounding of the filter weights at band edges.
        assert np.abs(banded.astype(int) - expected).max() <= 1
        assert (banded == expected).all(axis=2).mean() > 0.99


def test_a_whole_slide_read_stops_between_pieces(tmp_path):
    path = tiled_slide(tmp_path / "single-16k.tif", 16384)
    with Slide(path) as s:
        assert s.level_count == 1
        reads = count_reads(s)

        def check():
            if len(reads) >= 3:
                raise Stop

        with pytest.raises(Stop):
            s.thumbnail(512, check=check)
        assert 3 <= len(reads) and sum(reads) < s.width * s.height // 10


def test_a_read_over_the_budget_is_refused_before_decoding(monkeypatch, single_level):
    with Slide(single_level) as s:
        reads = count_reads(s)
        monkeypatch.setattr(slide_mod, "MAX_READ_PIXELS", 1_000_000)
        with pytest.raises(ReadBudgetError, match="MAGLENS_MAX_READ_PIXELS"):
            s.thumbnail(256)
        with pytest.raises(ReadBudgetError):
            s.read_region(0, 0, 0, 2000, 1000)
        assert reads == []
        assert s.read_rect((0, 0, 900, 900), 600, 600).shape == (600, 600, 3)  # under it
        assert issubclass(ReadBudgetError, SlideError)


def test_a_model_overview_over_the_budget_is_refused_at_once(monkeypatch, single_level):
    pytest.importorskip("torch")
    from engines import infer, registry

    with Slide(single_level) as s:
        reads = count_reads(s)
        monkeypatch.setattr(slide_mod, "MAX_READ_PIXELS", 1_000_000)
        monkeypatch.setattr(slide_mod, "MAX_PROXY_PIXELS", 1000)  # as for a huge slide
        for name in ("spatial_mag", "zoom_in", "grid_attention", "local_learning"):
            model = registry.create(name, "tiny")
            with pytest.raises(ReadBudgetError):
                infer.run(model, s)
        assert reads == []


def test_the_budget_comes_from_the_environment():
    code = "import engines.slide as s; print(s.MAX_READ_PIXELS, s.read_budget())"
    env = {**os.environ, "MAGLENS_MAX_READ_PIXELS": "2.5e6"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["2500000", "2500000"]
    env["MAGLENS_MAX_READ_PIXELS"] = "lots"  # unusable: the default, not "no limit"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(slide_mod.DEFAULT_MAX_READ_PIXELS)] * 2


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *map(str, args)], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=240)


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def hostile_giants(folder: Path) -> list[Path]:
    """Files of a few kB declaring a million pixels a side, in the layouts readers take."""
    return [
        write_tiff(folder / "giant-tiles.tif", 1_000_000, 1_000_000, tile=65536, data=b"\0" * 64),
        write_tiff(folder / "giant-many-tiles.tif", 1_000_000, 1_000_000, tile=4096, data=b"\0" * 64),
        write_tiff(folder / "giant-strip.tif", 1_000_000, 1_000_000),
        png_header(folder / "giant.png", 1_000_000, 1_000_000),
    ]


@pytest.mark.parametrize("command", ["info", "infer", "snapshot"])
def test_files_declaring_a_million_pixels_a_side_are_refused_in_one_line(tmp_path, command):
    extra = {"info": [], "infer": ["--model", "spatial_mag"],
             "snapshot": ["--model", "spatial_mag", "--out", str(tmp_path / "fig.png")]}[command]
    for path in hostile_giants(tmp_path):
        assert path.stat().st_size < 600_000
        proc = run_cli(command, path, *extra)
        assert proc.returncode == 2, (path.name, proc.returncode, proc.stderr[-500:])
        lines = stderr_lines(proc)
        assert len(lines) == 1 and path.name in lines[0], (path.name, lines)
        assert "Traceback" not in proc.stderr


def test_the_cli_refuses_a_slide_over_the_budget_in_one_line(single_level, tmp_path):
    env = {"MAGLENS_MAX_READ_PIXELS": "1e6"}
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((1100, 1000, 3), np.uint8)).save(plain)  # decoded whole at open
    for args in (["info", single_level], ["info", plain],
                 ["infer", single_level, "--model", "spatial_mag"],
                 ["snapshot", single_level, "--model", "zoom_in", "--out", tmp_path / "f.png"]):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 2, (args, proc.stderr[-500:])
        lines = stderr_lines(proc)
        assert len(lines) == 1 and "MAGLENS_MAX_READ_PIXELS" in lines[0], lines
    assert run_cli("info", single_level).returncode == 0  # the default budget takes it
