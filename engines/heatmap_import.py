"""Other tools' heatmaps as MagLens traces, one AttentionMap each, so they are viewed, exported
and scored (``engines.evaluate``) like a model's.

Supported files (every coordinate ends up in level-0 px):

* CLAM ``.h5``: dataset ``coords`` (N x 2, the level-0 top-left of each patch) and
  ``attention_scores`` or ``A`` (N values, or N x 1). The patch size in level-0 px is
  ``coords.attrs["patch_size"]`` times the ``downsample`` attribute (``[dx, dy]``, from
  ``patch_level``) when present, else the size the caller gives (``patch_size``).
* Slideflow heatmap ``.npz`` (``Heatmap.save_npz``): ``predictions`` (or ``logits``), a grid
  rows x cols x classes (or rows x cols) of per-tile outputs, ``-1`` where no tile was read,
  and optionally ``uncertainty`` of the same layout. The file holds no geometry, so the caller
  gives the tile size (``tile_um`` with the slide's mpp, or ``patch_size`` in level-0 px) and
  ``stride_div`` (Slideflow's default 2): grid cell (r, c) is the tile read at
  ``(c, r) * stride``, with ``stride = tile / stride_div``; the map's cells are ``stride``
  wide, centred on their tiles. One channel is imported: ``channel`` (default the last class,
  the positive one of a binary model), or the uncertainty with ``uncertainty=True``. Optional
  scalar entries ``tile_px``/``tile_um``/``stride_div`` in the file are used when present.
* CSV with a header ``x,y,w,h,value`` (any order, other columns ignored), level-0 px.

Patches and boxes become a regular grid: its step is the smallest spacing between distinct
box positions (at most the box size), and each cell takes the mean of the boxes covering it,
so overlapping patches average as CLAM's own heatmaps do. Values below zero (raw attention
logits) are shifted so the lowest is 0, since attention mass is ``max(value, 0)``. Any failure
is one ``HeatmapImportError`` line naming the file.
"""
from __future__ import annotations

import csv
import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.trace import AttentionMap, SlideRef, Trace, TraceError
from engines.trace_check import MAX_CELLS

SUFFIXES = {".h5": "clam", ".hdf5": "clam", ".npz": "slideflow", ".csv": "csv"}
MAX_FILE_BYTES = 1 << 30
MAX_BOXES = 5_000_000
MAX_GRID_CELLS = min(MAX_CELLS, 1 << 22)  # 4M cells: far above any tool's grid
MAX_COVER = 64  # cells one box may span per side (overlap/step); beyond it the grid is wrong
GROUP = "imported"


class HeatmapImportError(ValueError):
    """A heatmap file cannot be imported; the message is one line meant for the user."""


@dataclass
class ImportOptions:
    patch_size: float | None = None  # level-0 px of a patch/tile when the file does not say
    tile_um: float | None = None  # Slideflow tile width in µm (needs the slide's mpp)
    stride_div: int | None = None  # Slideflow stride divisor (default 2)
    channel: int | None = None  # Slideflow class index (default the last)
    uncertainty: bool = False  # Slideflow: import the uncertainty instead of a class


def import_heatmap(path: str | os.PathLike, slide: SlideRef,
                   options: ImportOptions | None = None) -> Trace:
    """A Trace of ``slide`` holding the heatmap of ``path`` as its one map; its model is the
    file's name so each imported file is a trace of its own."""
    path = Path(path)
    opts = options or ImportOptions()
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise HeatmapImportError(f"{path.name}: not a heatmap file MagLens reads "
                                 "(CLAM .h5, Slideflow .npz or CSV x,y,w,h,value)")
    try:
        st = os.stat(path)
        if not path.is_file():
            raise HeatmapImportError("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise HeatmapImportError(f"{st.st_size >> 20} MB is larger than a heatmap may be")
        if kind == "clam":
            amap = _read_clam(path, opts, slide)
        elif kind == "slideflow":
            amap = _read_slideflow(path, opts, slide)
        else:
            amap = _read_csv(path, slide)
        trace = Trace(model=path.name, preset=kind, checkpoint=None, slide=slide)
        trace.add(amap)
    except HeatmapImportError as exc:
        raise HeatmapImportError(_one_line(f"{path.name}: {exc}")) from None
    except TraceError as exc:
        raise HeatmapImportError(_one_line(f"{path.name}: unusable values ({exc})")) from None
    except OSError as exc:
        raise HeatmapImportError(_one_line(f"{path.name}: cannot be read "
                                           f"({exc.strerror or exc})")) from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError,
            RuntimeError, zipfile.BadZipFile, UnicodeDecodeError, csv.Error) as exc:
        raise HeatmapImportError(_one_line(f"{path.name}: not a readable heatmap "
                                           f"({type(exc).__name__}: {exc})")) from None
    return trace


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


# -- boxes -> grid -----------------------------------------------------------------------------
def _step(starts: np.ndarray, size: float) -> float:
    u = np.unique(starts)
    if len(u) < 2:
        return size
    gaps = np.diff(u)
    gaps = gaps[gaps > 1e-6 * size]
    return float(min(size, gaps.min())) if len(gaps) else size


def grid_map(boxes: np.ndarray, values: np.ndarray, name: str, slide: SlideRef) -> AttentionMap:
    """Rows ``x, y, w, h`` with one value each, as a grid map (cells: the mean of the boxes
    covering them; 0 where none does)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(boxes) != len(values):
        raise HeatmapImportError(f"{len(boxes)} positions but {len(values)} values")
    if not len(boxes):
        raise HeatmapImportError("holds no patches")
    if len(boxes) > MAX_BOXES:
        raise HeatmapImportError(f"{len(boxes)} patches is more than MagLens reads ({MAX_BOXES})")
    if not (np.isfinite(boxes).all() and np.isfinite(values).all()):
        raise HeatmapImportError("holds NaN or infinity")
    if (boxes[:, 2:] <= 0).any():
        raise HeatmapImportError("holds a patch of zero or negative size")
    x, y, w, h = boxes.T
    if (x + w <= 0).any() or (y + h <= 0).any() or (x >= slide.width).any() or (y >= slide.height).any():
        raise HeatmapImportError(f"has patches outside this slide ({slide.width}x{slide.height}); "
                                 "was it made on another slide?")
    cw, ch = _step(x, float(w.min())), _step(y, float(h.min()))
    ox, oy = float(x.min()), float(y.min())
    fc, fr = (x - ox) / cw, (y - oy) / ch
    c0, r0 = np.rint(fc).astype(np.int64), np.rint(fr).astype(np.int64)
    if np.abs(fc - c0).max() > 0.05 or np.abs(fr - r0).max() > 0.05:
        raise HeatmapImportError(f"its patches do not lie on a grid (step {cw:g} x {ch:g} px)")
    kw = np.maximum(np.rint(w / cw).astype(np.int64), 1)
    kh = np.maximum(np.rint(h / ch).astype(np.int64), 1)
    if kw.max() > MAX_COVER or kh.max() > MAX_COVER:
        raise HeatmapImportError("its patch sizes are too uneven to lay on one grid")
    cols, rows = int((c0 + kw).max()), int((r0 + kh).max())
    if rows * cols > MAX_GRID_CELLS:
        raise HeatmapImportError(f"its grid of {rows}x{cols} cells is larger than MagLens shows")
    if values.min() < 0:
        values = values - values.min()
    total = np.zeros((rows, cols))
    count = np.zeros((rows, cols))
    for dy in range(int(kh.max())):
        for dx in range(int(kw.max())):
            sel = (dy < kh) & (dx < kw)
            np.add.at(total, (r0[sel] + dy, c0[sel] + dx), values[sel])
            np.add.at(count, (r0[sel] + dy, c0[sel] + dx), 1.0)
    grid = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return AttentionMap(name=name, group=GROUP, magnification=None, origin=(ox, oy),
                        cell=(cw, ch), values=grid.tolist())


# -- CLAM ---------------------------------------------------------------------------------------
def _read_clam(path: Path, opts: ImportOptions, slide: SlideRef) -> AttentionMap:
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError:
        raise HeatmapImportError("not an HDF5 file (CLAM .h5)") from None
    with fh:
        if "coords" not in fh or not isinstance(fh["coords"], h5py.Dataset):
            raise HeatmapImportError("has no 'coords' dataset (not a CLAM patch file)")
        key = next((k for k in ("attention_scores", "A", "scores") if k in fh
                    and isinstance(fh[k], h5py.Dataset)), None)
        if key is None:
            raise HeatmapImportError("has no 'attention_scores' or 'A' dataset")
        coords_ds, scores_ds = fh["coords"], fh[key]
        for ds, what in ((coords_ds, "coords"), (scores_ds, key)):
            if ds.size > 2 * MAX_BOXES:
                raise HeatmapImportError(f"its {what} dataset is too large ({ds.size} values)")
            if ds.dtype.kind not in "iuf":
                raise HeatmapImportError(f"its {what} dataset does not hold numbers")
        coords = np.asarray(coords_ds[()], dtype=np.float64)
        scores = np.asarray(scores_ds[()], dtype=np.float64)
        attrs = dict(coords_ds.attrs)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise HeatmapImportError(f"'coords' is {coords.shape}, not N x 2")
    if scores.ndim == 2 and 1 in scores.shape:
        scores = scores.reshape(-1)
    if scores.ndim != 1 or len(scores) != len(coords):
        raise HeatmapImportError(f"'{key}' holds {scores.shape} values for {len(coords)} patches")
    size = _clam_patch_size(attrs, opts)
    boxes = np.column_stack([coords, np.full(len(coords), size[0]), np.full(len(coords), size[1])])
    return grid_map(boxes, scores, "attention", slide)


def _clam_patch_size(attrs: dict, opts: ImportOptions) -> tuple[float, float]:
    if opts.patch_size is not None:
        return _positive(opts.patch_size, "patch size"), _positive(opts.patch_size, "patch size")
    if "patch_size" not in attrs:
        raise HeatmapImportError("does not record its patch size: give the patch size in "
                                 "level-0 pixels")
    size = _positive(np.asarray(attrs["patch_size"]).reshape(-1)[0], "patch_size")
    down = np.asarray(attrs.get("downsample", (1.0, 1.0)), dtype=np.float64).reshape(-1)
    if len(down) == 1:
        down = np.array([down[0], down[0]])
    dx, dy = _positive(down[0], "downsample"), _positive(down[1], "downsample")
    return size * dx, size * dy


def _positive(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise HeatmapImportError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(v) or v <= 0 or v > 1e6:
        raise HeatmapImportError(f"{what} {v:g} is not a usable size")
    return v


# -- Slideflow ----------------------------------------------------------------------------------
def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise HeatmapImportError("not an .npz file (Slideflow heatmap)") from None
    with zf:
        if sum(i.file_size for i in zf.infolist()) > MAX_FILE_BYTES:
            raise HeatmapImportError("unpacks to more than MagLens reads")
    with np.load(path, allow_pickle=False) as npz:
        out = {}
        for k in npz.files:
            try:
                out[k] = npz[k]
            except ValueError:  # an object array: refused, never unpickled
                raise HeatmapImportError(f"entry {k!r} holds Python objects, not numbers") from None
        return out


def _scalar(arrays: dict[str, np.ndarray], key: str) -> float | None:
    if key not in arrays:
        return None
    a = arrays[key]
    if a.size != 1 or a.dtype.kind not in "iuf":
        raise HeatmapImportError(f"entry {key!r} is not one number")
    return float(a.reshape(-1)[0])


def _read_slideflow(path: Path, opts: ImportOptions, slide: SlideRef) -> AttentionMap:
    arrays = _npz_arrays(path)
    key = "uncertainty" if opts.uncertainty else next(
        (k for k in ("predictions", "logits") if k in arrays), None)
    if key is None or key not in arrays:
        raise HeatmapImportError("has no 'predictions' grid" if not opts.uncertainty
                                 else "has no 'uncertainty' grid")
    grid = arrays[key]
    if grid.dtype.kind not in "iuf":
        raise HeatmapImportError(f"'{key}' does not hold numbers")
    if grid.ndim == 2:
        grid = grid[:, :, None]
    if grid.ndim != 3 or 0 in grid.shape:
        raise HeatmapImportError(f"'{key}' is {grid.shape}, not a rows x cols (x classes) grid")
    n = grid.shape[2]
    channel = (0 if opts.uncertainty else n - 1) if opts.channel is None else opts.channel
    if not -n <= channel < n:
        raise HeatmapImportError(f"has {n} classes; there is no class {channel}")
    values = grid[:, :, channel].astype(np.float64)
    if values.size > MAX_GRID_CELLS:
        raise HeatmapImportError(f"its grid of {values.shape[0]}x{values.shape[1]} is larger "
                                 "than MagLens shows")
    tile = _slideflow_tile(arrays, opts, slide)
    stride_div = opts.stride_div or _scalar(arrays, "stride_div") or 2
    if stride_div != int(stride_div) or not 1 <= stride_div <= 64:
        raise HeatmapImportError(f"stride_div {stride_div:g} is not a whole number from 1 to 64")
    stride = tile / stride_div
    if not np.isfinite(values).all():
        raise HeatmapImportError(f"'{key}' holds NaN or infinity")
    values = np.where(values == -1, 0.0, values)  # -1: no tile read here
    rows, cols = values.shape
    if stride * cols > slide.width * 1.05 + tile or stride * rows > slide.height * 1.05 + tile:
        raise HeatmapImportError(f"its {rows}x{cols} grid of {stride:g} px reaches beyond this "
                                 f"slide ({slide.width}x{slide.height}); check the tile size")
    if values.min() < 0:
        values = values - values.min()
    offset = (tile - stride) / 2  # cells centred on their tiles
    name = "uncertainty" if opts.uncertainty else f"class {channel % n}"
    return AttentionMap(name=name, group=GROUP, magnification=None, origin=(offset, offset),
                        cell=(stride, stride), values=values.tolist())


def _slideflow_tile(arrays: dict[str, np.ndarray], opts: ImportOptions, slide: SlideRef) -> float:
    if opts.patch_size is not None:
        return _positive(opts.patch_size, "tile size")
    tile_um = opts.tile_um if opts.tile_um is not None else _scalar(arrays, "tile_um")
    if tile_um is not None:
        if not slide.mpp:
            raise HeatmapImportError("the slide records no mpp, so a tile size in µm cannot be "
                                     "placed: give it in level-0 pixels")
        return _positive(tile_um, "tile_um") / slide.mpp
    tile_px = _scalar(arrays, "tile_px")
    if tile_px is not None:
        return _positive(tile_px, "tile_px")
    raise HeatmapImportError("a Slideflow heatmap does not record its tile size: give the "
                             "tile width in µm or in level-0 pixels")


# -- CSV ----------------------------------------------------------------------------------------
def _read_csv(path: Path, slide: SlideRef) -> AttentionMap:
    with open(path, "rb") as fh:
        raw = fh.read(MAX_FILE_BYTES + 1)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise HeatmapImportError("is not a CSV text file (not UTF-8)") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise HeatmapImportError("is empty")
    names = [h.strip().lower() for h in header]
    missing = [k for k in ("x", "y", "w", "h", "value") if k not in names]
    if missing:
        raise HeatmapImportError(f"needs a header with x,y,w,h,value (missing {', '.join(missing)})")
    idx = [names.index(k) for k in ("x", "y", "w", "h", "value")]
    rows: list[list[float]] = []
    for line, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(rows) >= MAX_BOXES:
            raise HeatmapImportError(f"has more than {MAX_BOXES} rows")
        try:
            rows.append([float(row[i]) for i in idx])
        except (ValueError, IndexError):
            raise HeatmapImportError(f"line {line} is not five numbers x,y,w,h,value") from None
    if not rows:
        raise HeatmapImportError("holds no rows")
    a = np.array(rows)
    return grid_map(a[:, :4], a[:, 4], "value", slide)
