"""One pixel source for every slide MagLens opens.

Pyramidal vendor formats go through OpenSlide; plain images (PNG, JPEG, striped TIFF) that
OpenSlide does not recognise are decoded once with Pillow and kept as an in-memory pyramid.
Imports neither Qt nor torch, so the viewer and headless engines share it.

Coordinates: ``read_region(level, x, y, w, h)`` follows OpenSlide: ``x, y`` are the top-left
corner in level-0 pixels, ``w, h`` the size in pixels of the requested level. Areas outside
the slide come back as the background colour.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

Rect = tuple[float, float, float, float]
# Called between the pieces of a large read; whatever it raises (e.g. a cancelled run's
# exception) stops the read and propagates unchanged.
ReadCheck = Callable[[], None]

log = logging.getLogger(__name__)
_U32_PTR = ctypes.POINTER(ctypes.c_uint32)

BACKGROUND = (255, 255, 255)
# Plain images are decoded whole; refuse ones that would not fit comfortably in memory.
MAX_PLAIN_PIXELS = 1_000_000_000
# Slides whose pyramid lacks coarse levels (e.g. one-level SVS crops) get an in-memory
# pyramid on first coarse read, when level 0 is at most this many pixels.
MAX_PROXY_PIXELS = 100_000_000
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
READ_LEVEL_SLACK = 1.02  # see Slide.read_level_for
DEFAULT_MAX_READ_PIXELS = 4_000_000_000


def _pixels_from_env(name: str, default: int) -> int:
    """A pixel count from the environment ("4e9" and "4000000000" both work); a missing or
    unusable value gives the default, so a typo cannot switch the limit off."""
    text = os.environ.get(name, "").strip()
    try:
        value = float(text)
    except ValueError:
        return default
    return int(value) if math.isfinite(value) and value >= 1 else default


# The most pixels one read may decode (counted at the level it reads, level 0 on slides
# without a pyramid). A model's overview of a huge single-level slide would otherwise decode
# for hours; the read is refused with ReadBudgetError instead. Settable here or through
# MAGLENS_MAX_READ_PIXELS.
MAX_READ_PIXELS: int = _pixels_from_env("MAGLENS_MAX_READ_PIXELS", DEFAULT_MAX_READ_PIXELS)
# Large reads are decoded in pieces of at most READ_PIECE x READ_PIECE level pixels, with
# the caller's check between pieces, so a cancel stops a read within one piece's decode.
READ_PIECE = 2048
OFF_GRID_PIECE_PIXELS = 4096 * 4096  # see Slide.read_region
# Above this many level pixels read_rect no longer holds the whole region: it resamples it
# band by band, so memory stays bounded on 16k-60k px single-level slides and no single
# resize outlasts a cancel. Just above (4 x 2048)^2: a 2048 px read from a pyramid whose
# levels are 4x apart stays one exact read.
MAX_WHOLE_READ_PIXELS = 70_000_000
# OpenSlide allocates one whole tile per decode; a file declaring 65536 px tiles made it
# abort the process on a failed 16 GiB allocation. Tiles above this are refused at open.
MAX_TILE_PIXELS = 8192 * 8192

# Pillow warns through Python's warnings about damaged or huge files (corrupt EXIF,
# truncated reads, decompression bombs); the SlideError that follows is the one message a
# user needs, so these never reach stderr.
warnings.filterwarnings("ignore", module=r"PIL\.")


class SlideError(Exception):
    """A slide could not be opened or read; the message is meant for the user."""


class ReadBudgetError(SlideError):
    """A read (or a slide whose smallest overview) would decode more than MAX_READ_PIXELS."""


def read_budget() -> int:
    """The pixel budget of one read (``MAX_READ_PIXELS``, looked up at call time)."""
    return int(MAX_READ_PIXELS)


def _check_budget(name: str, pixels: float, what: str) -> None:
    budget = read_budget()
    if pixels > budget:
        raise ReadBudgetError(
            f"{name}: reading {what} would decode {_gigapixels(pixels)}, over the "
            f"{_gigapixels(budget)} limit (MAGLENS_MAX_READ_PIXELS raises it)")


def _gigapixels(n: float) -> str:
    return f"{n / 1e9:,.4g} gigapixels" if n >= 1e8 else f"{n / 1e6:,.4g} megapixels"


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float


class Slide:
    """A whole-slide image (or a plain image posing as one-level-or-more pyramid)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._backend = _open_backend(self.path)
        try:
            _check_declared_sizes(self.path, self._backend)
        except SlideError:
            self._backend.close()
            raise
        self.levels: list[Level] = self._backend.levels
        self.properties: dict[str, str] = self._backend.properties
        self.vendor: str = self._backend.vendor
        self.mpp_xy: tuple[float, float] | None = _mpp_from_properties(self.properties)
        self.objective_power: float | None = _objective_from_properties(self.properties)
        self._proxy: list[np.ndarray] | None = None  # halvings of level 0, built on demand
        self._proxy_lock = threading.Lock()

    # -- basic facts -------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def mpp(self) -> float | None:
        """Mean microns per level-0 pixel, or None when the file does not say."""
        if self.mpp_xy is None:
            return None
        return (self.mpp_xy[0] + self.mpp_xy[1]) / 2.0

    @property
    def associated_names(self) -> list[str]:
        return list(self._backend.associated_names)

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail) as HxWx3 uint8."""
        if name not in self._backend.associated_names:
            raise SlideError(f"{self.path.name} has no associated image named {name!r}")
        return _guarded(self.path, lambda: _rgb(self._backend.associated(name)))

    def info(self) -> dict:
        """Plain-data description, as printed by ``maglens info``."""
        return {
            "path": str(self.path),
            "vendor": self.vendor,
            "width": self.width,
            "height": self.height,
            "levels": [
                {"width": lv.width, "height": lv.height, "downsample": lv.downsample}
                for lv in self.levels
            ],
            "mpp": list(self.mpp_xy) if self.mpp_xy else None,
            "objective_power": self.objective_power,
            "associated_images": self.associated_names,
            "properties": dict(self.properties),
        }

    # -- geometry helpers ----------------------------------------------------------------
    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (just finer)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * 1.0001:
                best = i
        return best

    def read_level_for(self, downsample: float) -> int:
        """The level ``read_rect`` decodes for ``downsample``: just finer, but a level up to
        ``READ_LEVEL_SLACK`` coarser is taken. Grids stretched to fit a slide ask for e.g.
        31.97x; enlarging a 32x level by 0.1 % loses nothing, decoding 16x costs 4x the pixels."""
        return self.best_level_for_downsample(max(downsample, 1e-9) * READ_LEVEL_SLACK)

    # -- pixels --------------------------------------------------------------------------
    def read_region(self, level: int, x: int, y: int, w: int, h: int,
                    check: ReadCheck | None = None) -> np.ndarray:
        """HxWx3 uint8 of level ``level``; ``x, y`` in level-0 pixels, ``w, h`` at the level.

        A large region is decoded in pieces with ``check()`` called before each one (it
        raises to stop); more than ``MAX_READ_PIXELS`` is refused with ``ReadBudgetError``."""
        if not 0 <= level < len(self.levels):
            raise SlideError(f"{self.path.name}: level {level} does not exist")
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), BACKGROUND, np.uint8)
        x, y, w, h = int(x), int(y), int(w), int(h)
        self.check_read_budget(w * h, f"a {w}x{h} px region of level {level}")
        if check is not None:
            check()
        ds = self.levels[level].downsample
        piece = READ_PIECE
        # Pieces give the very pixels of one read where the read starts on the level's pixel
        # grid (level-0 offsets a multiple of an integer downsample). Off the grid OpenSlide
        # interpolates, and pieces (read with a margin) differ slightly at the slide's edge:
        # only regions too large to decode at once are split there. In-memory backends copy.
        k = int(ds) if float(ds).is_integer() else 0
        on_grid = k > 0 and x % k == 0 and y % k == 0
        if (w <= piece and h <= piece) or not getattr(self._backend, "decodes", True) or k == 0 \
                or (not on_grid and w * h <= OFF_GRID_PIECE_PIXELS):
            return _guarded(self.path, lambda: self._backend.read(level, x, y, w, h))
        out = np.empty((h, w, 3), np.uint8)
        m = 0 if on_grid else 2
        for py in range(0, h, piece):
            for px in range(0, w, piece):
                if check is not None:
                    check()
                pw, ph = min(piece, w - px), min(piece, h - py)
                mx0, my0 = min(m, px), min(m, py)
                mx1, my1 = min(m, w - px - pw), min(m, h - py - ph)
                ox, oy = x + (px - mx0) * k, y + (py - my0) * k
                got = _guarded(self.path, lambda: self._backend.read(
                    level, ox, oy, pw + mx0 + mx1, ph + my0 + my1))
                out[py:py + ph, px:px + pw] = got[my0:my0 + ph, mx0:mx0 + pw]
        return out

    def check_read_budget(self, pixels: float, what: str) -> None:
        """``ReadBudgetError`` naming ``what`` when ``pixels`` exceeds ``read_budget()``."""
        _check_budget(self.path.name, pixels, what)

    def read_cost(self, rect: Rect, out_w: int, out_h: int) -> int:
        """Pixels ``read_rect(rect, out_w, out_h)`` decodes (at the level it reads; a slide
        without coarse levels may be read once, whole, into an in-memory pyramid)."""
        x, y, w, h = rect
        if w <= 0 or h <= 0 or out_w <= 0 or out_h <= 0:
            return 0
        downsample = min(w / out_w, h / out_h)
        level = self.read_level_for(downsample)
        ds = self.levels[level].downsample
        if downsample >= 2 * ds and self.width * self.height <= MAX_PROXY_PIXELS:
            return 0 if self._proxy is not None else self.width * self.height
        lw = math.ceil((math.ceil(x + w) - math.floor(x)) / ds)
        lh = math.ceil((math.ceil(y + h) - math.floor(y)) / ds)
        return max(1, lw) * max(1, lh)

    def overview_cost(self) -> int:
        """Pixels the cheapest view of the whole slide decodes (see ``_overview_cost``)."""
        return _overview_cost(self.levels)

    def read_rect(self, rect: Rect, out_w: int, out_h: int,
                  check: ReadCheck | None = None) -> np.ndarray:
        """The level-0 rectangle ``rect`` resampled to ``out_w`` x ``out_h`` pixels.

        ``check()`` runs between the pieces of a large read and may raise to stop it; a
        read decoding more than ``MAX_READ_PIXELS`` is refused with ``ReadBudgetError``."""
        x, y, w, h = rect
        if w <= 0 or h <= 0:
            raise SlideError("read_rect needs a rectangle with a positive size")
        out_w, out_h = int(out_w), int(out_h)
        self.check_read_budget(self.read_cost(rect, out_w, out_h),
                               f"{w:.0f}x{h:.0f} level-0 px at {out_w}x{out_h}")
        downsample = min(w / out_w, h / out_h)
        level = self.read_level_for(downsample)
        ds = self.levels[level].downsample
        x0, y0 = math.floor(x), math.floor(y)
        x1, y1 = math.ceil(x + w), math.ceil(y + h)
        proxy = self._proxy_for(downsample, check) if downsample >= 2 * ds else None
        if proxy is not None:
            region, ds, ox, oy = _crop_array(proxy, self.width / proxy.shape[1], x0, y0, x1, y1)
        else:
            lw = max(1, math.ceil((x1 - x0) / ds))
            lh = max(1, math.ceil((y1 - y0) / ds))
            if lw * lh > MAX_WHOLE_READ_PIXELS and out_h > 1:
                return self._read_rect_banded(rect, out_w, out_h, level, check)
            region, ox, oy = self.read_region(level, x0, y0, lw, lh, check), x0, y0
        return _resample(region, ds, ox, oy, rect, out_w, out_h)

    def _read_rect_banded(self, rect: Rect, out_w: int, out_h: int, level: int,
                          check: ReadCheck | None) -> np.ndarray:
        """``read_rect`` of a region too large to hold: bands of output rows, each read with
        a margin of source rows so the resampling at band edges sees the same neighbours as
        one whole read would (up to rounding of the filter weights)."""
        x, y, w, h = rect
        ds = self.levels[level].downsample
        x0 = math.floor(x)
        lw = max(1, math.ceil((math.ceil(x + w) - x0) / ds))
        top, bottom = math.floor(y), math.ceil(y + h)
        sy = h / out_h  # level-0 rows per output row
        margin = sy + 2 * ds  # the bilinear filter's reach, and rounding
        rows = max(1, int(MAX_WHOLE_READ_PIXELS / lw * ds / sy))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for r0 in range(0, out_h, rows):
            r1 = min(out_h, r0 + rows)
            by0, by1 = y + r0 * sy, y + r1 * sy
            # Bands start on the whole read's own level rows, so each holds the same pixels.
            k0 = max(0, math.floor((by0 - margin - top) / ds))
            ry0 = top + round(k0 * ds)
            lh = max(1, math.ceil((min(bottom, by1 + margin) - top) / ds) - k0)
            region = self.read_region(level, x0, ry0, lw, lh, check)
            out[r0:r1] = _resample(region, ds, x0, ry0, (x, by0, w, by1 - by0), out_w, r1 - r0)
        return out

    def _proxy_for(self, downsample: float, check: ReadCheck | None = None) -> np.ndarray | None:
        """The finest in-memory halving not finer than needed, for slides without coarse
        levels; built once (one read of level 0) and shared by every reader of this slide."""
        if self.width * self.height > MAX_PROXY_PIXELS:
            return None
        with self._proxy_lock:
            if self._proxy is None:
                base = Image.fromarray(self.read_region(0, 0, 0, self.width, self.height, check))
                pyramid = []
                while max(base.size) > 64:
                    if check is not None:
                        check()
                    base = base.resize((max(1, base.width // 2), max(1, base.height // 2)), Image.BOX)
                    pyramid.append(np.asarray(base))
                self._proxy = pyramid
        best = None
        for arr in self._proxy:
            if self.width / arr.shape[1] <= downsample * 1.0001:
                best = arr
        return best

    def thumbnail(self, max_side: int, check: ReadCheck | None = None) -> np.ndarray:
        """The whole slide fitted into ``max_side`` x ``max_side``, aspect kept."""
        scale = max_side / max(self.width, self.height)
        out_w = max(1, round(self.width * scale))
        out_h = max(1, round(self.height * scale))
        return self.read_rect((0, 0, self.width, self.height), out_w, out_h, check)

    def read_region_xrgb(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``read_region`` as HxW uint32 ``0xFFRRGGBB`` (the layout of Qt's RGB32 images), so a
        viewer can wrap it without another conversion. OpenSlide writes this layout natively;
        its RGBA round trip through Pillow is skipped, which is most of a tile's cost."""
        if not 0 <= level < len(self.levels):
            raise SlideError(f"{self.path.name}: level {level} does not exist")
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0)), pack_xrgb(np.array([[BACKGROUND]], np.uint8))[0, 0], np.uint32)
        direct = getattr(self._backend, "read_argb", None)
        if direct is None:
            return pack_xrgb(self.read_region(level, x, y, w, h))
        argb = _guarded(self.path, lambda: direct(level, int(x), int(y), int(w), int(h)))
        return _opaque_xrgb(argb)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.path.name!r}, {self.width}x{self.height}, {self.level_count} levels)"


def open_slide(path: str | os.PathLike) -> Slide:
    return Slide(path)


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------
class _OpenSlideBackend:
    def __init__(self, path: Path, osr) -> None:
        from openslide import lowlevel

        self._osr = osr
        # openslide_read_region itself (with its error check): it writes premultiplied ARGB,
        # the layout Qt paints, which the public read_region converts to RGBA first.
        self._c_read = getattr(lowlevel, "_read_region", None)
        self.levels = [
            Level(int(w), int(h), float(d))
            for (w, h), d in zip(osr.level_dimensions, osr.level_downsamples)
        ]
        self.properties = {str(k): str(v) for k, v in osr.properties.items()}
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.associated_names = list(osr.associated_images.keys())
        # After its first read error an OpenSlide handle fails every later call; the message
        # is kept so later reads fail here, without calling into the damaged file again.
        self._failure: str | None = None
        # DICOM reads of a damaged file from two tile threads at once crashed the process
        # (inside OpenSlide's DICOM reader), so DICOM reads go one at a time.
        self._lock = threading.Lock() if self.vendor == "dicom" else None

    def _call(self, fn):
        with self._lock or contextlib.nullcontext():
            if self._failure is not None:
                raise RuntimeError(self._failure)
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - kept, then raised as the caller's error
                self._failure = str(exc) or type(exc).__name__
                raise

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        rgba = self._call(lambda: self._osr.read_region((x, y), level, (w, h)))
        return _rgb(rgba)

    def read_argb(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Premultiplied ARGB as OpenSlide's C reader writes it (HxW uint32)."""
        handle = getattr(self._osr, "_osr", None)
        if self._c_read is None or handle is None:  # openslide-python without that entry point
            return pack_xrgb(self.read(level, x, y, w, h))
        buf = np.empty((h, w), np.uint32)
        # The address straight from the array interface: ``ndarray.ctypes`` imports a numpy
        # module on use, and an import from a reading thread goes through Qt's import hook
        # (PySide replaces ``builtins.__import__``) on every tile.
        ptr = ctypes.cast(buf.__array_interface__["data"][0], _U32_PTR)
        self._call(lambda: self._c_read(handle, ptr, x, y, level, w, h))
        return buf

    def associated(self, name: str) -> Image.Image:
        return self._osr.associated_images[name]

    def close(self) -> None:
        self._osr.close()


class _PlainImageBackend:
    """A Pillow-decoded image kept as a pyramid of halvings down to ~256 px."""

    vendor = "plain-image"
    decodes = False  # reads copy from memory: nothing to split into pieces
    associated_names: tuple[str, ...] = ()

    def __init__(self, path: Path, img: Image.Image) -> None:
        self.properties = {"maglens.format": img.format or "unknown"}
        mpp = _pil_mpp(img)
        if mpp is not None:
            self.properties["openslide.mpp-x"] = repr(mpp[0])
            self.properties["openslide.mpp-y"] = repr(mpp[1])
        base = _rgb(img)
        self._arrays = [base]
        self.levels = [Level(base.shape[1], base.shape[0], 1.0)]
        current = Image.fromarray(base)
        while max(current.size) > 256:
            w, h = max(1, current.width // 2), max(1, current.height // 2)
            current = current.resize((w, h), Image.BOX)
            arr = np.asarray(current)
            self._arrays.append(arr)
            self.levels.append(Level(w, h, base.shape[1] / w))

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        arr = self._arrays[level]
        ds = self.levels[level].downsample
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        sx0, sy0 = max(lx, 0), max(ly, 0)
        sx1, sy1 = min(lx + w, arr.shape[1]), min(ly + h, arr.shape[0])
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = arr[sy0:sy1, sx0:sx1]
        return out

    def associated(self, name: str) -> Image.Image:  # pragma: no cover - no names exist
        raise KeyError(name)

    def close(self) -> None:
        self._arrays = []


def _open_backend(path: Path):
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a folder, not a slide file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SlideError(f"{path}: cannot be read ({exc.strerror})") from None
    if size == 0:
        raise SlideError(f"{path.name}: the file is empty")
    if not os.access(path, os.R_OK):
        raise SlideError(f"{path.name}: permission denied")

    import openslide  # local: keeps `import engines.slide` light until a slide is opened

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - detection itself failing means "not recognised"
        fmt = None
    if fmt is not None:
        try:
            osr = openslide.OpenSlide(str(path))
            backend = _OpenSlideBackend(path, osr)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path.name}: not a readable {fmt} slide ({_clean(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad file for the user
            raise SlideError(f"{path.name}: cannot be opened as a {fmt} slide ({_clean(exc)})") from None
        # A truncated file can open here and fail later per tile: readers get SlideError.
        return backend
    return _open_plain(path)


def _open_plain(path: Path) -> _PlainImageBackend:
    if path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
        raise SlideError(
            f"{path.name}: not a slide MagLens can read (damaged, truncated, or not a format "
            "OpenSlide supports; plain PNG/JPEG/TIFF images open too)"
        )
    _quiet_pillow_libtiff()
    try:
        with Image.open(path) as img:  # reads the header only
            # A plain image is decoded whole: its size is checked before that, against the
            # plain-image cap and the read budget.
            if img.width * img.height > MAX_PLAIN_PIXELS:
                raise SlideError(
                    f"{path.name}: {img.width}x{img.height} is too large for a plain image; "
                    "convert it to a pyramidal TIFF"
                )
            _check_budget(path.name, img.width * img.height,
                          f"the whole {img.width}x{img.height} px image")
            img.load()
            return _PlainImageBackend(path, img)
    except SlideError:
        raise
    except Image.DecompressionBombError as exc:
        # Raised by Image.open from the header alone, before anything is decoded.
        size = "".join(ch for ch in str(exc).split("pixels")[0] if ch.isdigit())
        what = f"{int(size) / 1e6:,.0f}-megapixel image" if size else "image"
        raise SlideError(f"{path.name}: {what} is too large to decode as a plain image; "
                         "convert it to a pyramidal TIFF") from None
    except Image.UnidentifiedImageError:
        raise SlideError(f"{path.name}: not a readable image (damaged, truncated, or a variant "
                         "Pillow does not read)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        text = _clean(exc)
        if text.startswith("decoder error"):  # Pillow's code for a codec failure
            text = f"damaged pixel data, {text}"
        raise SlideError(f"{path.name}: cannot be read as an image ({text})") from None


def _check_declared_sizes(path: Path, backend) -> None:
    """Refuse, before any pixel is read, a file whose declared sizes cannot be read safely:
    tiles too large to allocate, or no overview within the read budget (a few-kB file may
    declare a million pixels a side)."""
    props = backend.properties
    for i in range(len(backend.levels)):
        tw = _float(props, f"openslide.level[{i}].tile-width") or 0
        th = _float(props, f"openslide.level[{i}].tile-height") or 0
        if tw * th > MAX_TILE_PIXELS:
            raise SlideError(
                f"{path.name}: declares {tw:.0f}x{th:.0f} px tiles at level {i}, too large to "
                "decode safely (damaged or hostile file?)")
    w, h = backend.levels[0].width, backend.levels[0].height
    coarsest = backend.levels[-1]
    cost = _overview_cost(backend.levels)
    budget = read_budget()
    if cost > budget:
        raise ReadBudgetError(
            f"{path.name}: declares {w}x{h} px and its coarsest level ({coarsest.width}x"
            f"{coarsest.height}) would decode {_gigapixels(cost)} for an overview, over the "
            f"{_gigapixels(budget)} limit (MAGLENS_MAX_READ_PIXELS raises it)")


def _overview_cost(levels: list[Level]) -> int:
    """Pixels the cheapest view of a whole slide decodes: its coarsest level, or level 0
    once when it is small enough for the in-memory pyramid (``Slide._proxy_for``)."""
    coarsest = levels[-1].width * levels[-1].height
    level0 = levels[0].width * levels[0].height
    return min(coarsest, level0) if level0 <= MAX_PROXY_PIXELS else coarsest


_libtiff_quiet = False


def _quiet_pillow_libtiff() -> None:
    """Pillow's own libtiff prints decoder complaints ("ZIPDecode: Decoding error ...")
    straight to file descriptor 2, past Python; Pillow reports the failure anyway and
    SlideError says it in one line. Its handlers are switched off once, process-wide
    (OpenSlide links its own libtiff, with its own handlers, and is not touched)."""
    global _libtiff_quiet
    if _libtiff_quiet:
        return
    _libtiff_quiet = True
    try:
        from PIL import _imaging  # noqa: F401 - maps Pillow's libtiff into the process

        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {ln.split(None, 5)[-1].strip() for ln in maps if "libtiff" in ln}
        pil_dir = str(Path(Image.__file__).resolve().parent.parent)
        for lib in sorted(paths):
            if not lib.startswith(pil_dir) and "pillow" not in lib.lower():
                continue  # another package's libtiff: its owner decides
            tiff = ctypes.CDLL(lib)
            for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
                fn = getattr(tiff, name)
                fn.restype = ctypes.c_void_p
                fn.argtypes = [ctypes.c_void_p]
                fn(None)
            log.debug("libtiff messages of %s switched off", lib)
    except Exception as exc:  # noqa: BLE001 - no /proc (not Linux) or a static libtiff
        log.debug("could not switch off libtiff messages: %s", exc)


def _resample(region: np.ndarray, ds: float, ox: float, oy: float, rect: Rect,
              out_w: int, out_h: int) -> np.ndarray:
    """The level-0 ``rect`` out of ``region`` (pixels of downsample ``ds`` whose top-left is
    level-0 ``ox, oy``), resized bilinearly to out_w x out_h."""
    x, y, w, h = rect
    lh, lw = region.shape[:2]
    # Crop the exact sub-pixel box while resizing (PIL's box is in source pixels).
    box = ((x - ox) / ds, (y - oy) / ds, min((x + w - ox) / ds, lw), min((y + h - oy) / ds, lh))
    img = Image.fromarray(region).resize((int(out_w), int(out_h)), Image.BILINEAR, box=box)
    return np.asarray(img)


def _guarded(path: Path, fn):
    try:
        return fn()
    except SlideError:
        raise
    except Exception as exc:  # noqa: BLE001 - OpenSlide/Pillow errors become SlideError
        raise SlideError(f"{path.name}: pixel data cannot be read ({_clean(exc)})") from None


def pack_xrgb(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 to HxW uint32 0xFFRRGGBB."""
    c = rgb.astype(np.uint32)
    return np.uint32(0xFF000000) | (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]


def _opaque_xrgb(argb: np.ndarray) -> np.ndarray:
    """Premultiplied ARGB composited onto the background (where it is not opaque)."""
    alpha = argb >> 24
    if alpha.min() == 255:  # most tiles: nothing to composite
        return argb
    rest = 255 - alpha
    out = np.full(argb.shape, 0xFF000000, np.uint32)
    for shift, bg in zip((16, 8, 0), BACKGROUND):
        # premultiplied: colour + (1 - alpha) * background, rounded
        c = (argb >> shift) & 0xFF
        out |= np.minimum(c + (rest * bg + 127) // 255, 255) << shift
    return out


def _rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image to HxWx3 uint8, compositing transparency onto the background."""
    if img.mode == "RGBA":
        if img.getchannel("A").getextrema() == (255, 255):
            return np.asarray(img.convert("RGB"))  # opaque (most tiles): no compositing needed
        bg = Image.new("RGB", img.size, BACKGROUND)
        bg.paste(img, mask=img.getchannel("A"))
        return np.asarray(bg)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _clean(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _float(props: dict[str, str], key: str) -> float | None:
    try:
        v = float(props[key])
    except (KeyError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _mpp_from_properties(props: dict[str, str]) -> tuple[float, float] | None:
    mx, my = _float(props, "openslide.mpp-x"), _float(props, "openslide.mpp-y")
    if mx is None or my is None:
        return None
    return mx, my


def _objective_from_properties(props: dict[str, str]) -> float | None:
    return _float(props, "openslide.objective-power")


def _pil_mpp(img: Image.Image) -> tuple[float, float] | None:
    """Microns per pixel from TIFF resolution tags, when they carry a real unit."""
    try:
        tags = getattr(img, "tag_v2", None)
        if not tags:
            return None
        unit = tags.get(296, 2)  # ResolutionUnit: 2 inch, 3 cm
        xr, yr = tags.get(282), tags.get(283)
        if not xr or not yr or unit not in (2, 3):
            return None
        per = 25400.0 if unit == 2 else 10000.0
        mx, my = per / float(xr), per / float(yr)
        # Screen-resolution defaults (72/96 dpi) are not microscope calibrations.
        if mx > 50 or my > 50:
            return None
        return mx, my
    except Exception:  # noqa: BLE001
        return None


def _crop_array(arr: np.ndarray, ds: float, x0: int, y0: int, x1: int, y1: int):
    """Pixels of an in-memory level (downsample ``ds``) covering level-0 [x0, x1) x [y0, y1),
    padded with background; returns (region, ds, level-0 x and y of its top-left)."""
    lx0, ly0 = int(math.floor(x0 / ds)), int(math.floor(y0 / ds))
    lx1, ly1 = int(math.ceil(x1 / ds)), int(math.ceil(y1 / ds))
    out = np.full((max(1, ly1 - ly0), max(1, lx1 - lx0), 3), BACKGROUND, np.uint8)
    sx0, sy0 = max(lx0, 0), max(ly0, 0)
    sx1, sy1 = min(lx1, arr.shape[1]), min(ly1, arr.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - ly0 : sy1 - ly0, sx0 - lx0 : sx1 - lx0] = arr[sy0:sy1, sx0:sx1]
    return out, ds, lx0 * ds, ly0 * ds


def iter_tiles(width: int, height: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """(x, y, w, h) tiles covering a width x height plane, edge tiles clipped."""
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            yield tx, ty, min(tile, width - tx), min(tile, height - ty)

