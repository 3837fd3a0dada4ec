"""A refused file prints exactly one line: what Pillow and libtiff say about damaged files
(Python warnings, and libtiff's messages written straight to file descriptor 2) never
reaches stderr."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import BAD_SLIDES, DATA, ROOT
from tests.hostile_files import png_header, write_tiff

SHARED_BAD = Path("/work/shared/slides/bad")
DEFLATE, LZW, JPEG = 8, 5, 7


def damaged_files(folder: Path) -> list[Path]:
    """Files that make Pillow warn or libtiff print before they are refused."""
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (120, 160, 3), np.uint8))
    files = [
        # libtiff decoders print to fd 2: "ZIPDecode: Decoding error", "JPEGLib: ...", LZW
        write_tiff(folder / "deflate-garbage.tif", 64, 64, compression=DEFLATE, data=b"garbage" * 9),
        write_tiff(folder / "lzw-garbage.tif", 64, 64, compression=LZW, data=b"garbage" * 9),
        write_tiff(folder / "jpeg-garbage.tif", 64, 64, compression=JPEG, data=b"\xff\xd8junk" * 9),
        # Pillow warns "Possibly corrupt EXIF data" / "Truncated File Read", then fails
        _cut(folder / "deflate-cut.tif", img, "TIFF", 0.5, compression="tiff_deflate"),
        _cut(folder / "lzw-cut.tif", img, "TIFF", 0.3, compression="tiff_lzw"),
        _flipped(folder / "flipped-levels.tiff", DATA / "boxes-levels.tiff"),
        # over Pillow's decompression-bomb warning limit, then truncated
        png_header(folder / "bomb-warning.png", 10_000, 10_000),
    ]
    return files


def _cut(path: Path, img: Image.Image, fmt: str, keep: float, **kw) -> Path:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    data = buf.getvalue()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _flipped(path: Path, source: Path) -> Path:
    data = bytearray(source.read_bytes())
    rng = np.random.default_rng(1)
    for i in rng.integers(len(data) // 4, len(data), 200):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def refused_files() -> list[Path]:
    shared = sorted(SHARED_BAD.iterdir()) if SHARED_BAD.is_dir() else []
    return [*BAD_SLIDES, *shared]


def one_line_refusal(path: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "app", *args[:1], str(path), *args[1:]],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=240)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (path.name, proc.returncode, proc.stderr[-800:])
    assert len(lines) == 1, (path.name, lines)
    assert lines[0].startswith(f"maglens {args[0]}: error: {path.name}"), lines


def test_damaged_files_are_refused_in_one_line(tmp_path):
    for path in damaged_files(tmp_path):
        one_line_refusal(path, "info")


@pytest.mark.parametrize("path", refused_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bad_slides_are_refused_in_one_line(path):
    one_line_refusal(path, "info")


def test_a_damaged_file_is_refused_in_one_line_by_infer(tmp_path):
    path = write_tiff(tmp_path / "deflate-garbage.tif", 64, 64, compression=DEFLATE, data=b"garbage" * 9)
    one_line_refusal(path, "infer", "--model", "spatial_mag")
