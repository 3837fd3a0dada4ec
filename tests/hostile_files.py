"""Small TIFF and PNG files written byte by byte, for slides no scanner makes: huge declared
sizes with almost no data, and large single-level slides made in milliseconds (every tile
entry points at the same compressed bytes, so a 60k x 60k px slide is a few hundred kB)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SHORT, LONG = 3, 4
DEFLATE, NONE = 8, 1


def pattern_tile(side: int, seed: int = 0) -> np.ndarray:
    """A side x side RGB tile with structure at every scale (gradients and noise), so a
    resampling or offset mistake changes pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    img = np.stack([xx * 255 // max(1, side - 1), yy * 255 // max(1, side - 1),
                    (xx ^ yy) & 0xFF], -1).astype(np.int16)
    img += rng.integers(-30, 30, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiff(path: Path, width: int, height: int, *, tile: int | None = None,
               rows_per_strip: int | None = None, compression: int = DEFLATE,
               data: bytes | None = None, extra_tags: list[tuple[int, int, list[int]]] = ()) -> Path:
    """A little-endian TIFF with one RGB 8-bit image. Every tile (or strip) entry points at
    the same ``data``; by default one compressed ``pattern_tile`` (tiled) or garbage."""
    if data is None:
        if tile is None:
            data = b"\x80" * 64
        else:
            raw = pattern_tile(tile).tobytes()
            data = zlib.compress(raw, 6) if compression == DEFLATE else raw
    if tile is not None:
        count = -(-width // tile) * -(-height // tile)
        layout = [(322, LONG, [tile]), (323, LONG, [tile]), (324, LONG, ["data"] * count),
                  (325, LONG, [len(data)] * count)]
    else:
        rps = rows_per_strip or height
        count = -(-height // rps)
        layout = [(273, LONG, ["data"] * count), (278, LONG, [rps]),
                  (279, LONG, [len(data)] * count)]
    tags = sorted([(256, LONG, [width]), (257, LONG, [height]), (258, SHORT, [8, 8, 8]),
                   (259, SHORT, [compression]), (262, SHORT, [2]), (277, SHORT, [3]),
                   (284, SHORT, [1]), *layout, *extra_tags])
    ifd_size = 2 + 12 * len(tags) + 4
    data_at = 8 + ifd_size
    tail = bytearray(data)
    entries = []
    for code, kind, values in tags:
        values = [data_at if v == "data" else v for v in values]
        raw = struct.pack(f"<{len(values)}{'H' if kind == SHORT else 'I'}", *values)
        if len(raw) <= 4:
            entries.append(struct.pack("<HHI", code, kind, len(values)) + raw.ljust(4, b"\0"))
        else:
            entries.append(struct.pack("<HHII", code, kind, len(values), data_at + len(tail)))
            tail += raw
    blob = b"II*\0" + struct.pack("<IH", 8, len(tags)) + b"".join(entries) + b"\0" * 4 + bytes(tail)
    path = Path(path)
    path.write_bytes(blob)
    return path


def tiled_slide(path: Path, side: int, tile: int = 512) -> Path:
    """A single-level side x side tiled TIFF (OpenSlide reads it as generic-tiff)."""
    return write_tiff(path, side, side, tile=tile)


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height, with a few bytes of image data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    return path
