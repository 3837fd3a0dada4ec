"""Synthetic needle-in-a-haystack slides: large normal tissue with tiny tumour regions.

Tissue is quilted from real H&E textures (``resources/textures``): 150 px textures, randomly
flipped, turned and colour-jittered, are laid at a stride smaller than their size and blended
with a raised-cosine window, so no tile grid shows. Which tissue class appears where follows a
smooth random field, so regions of one tissue form as in a real section. The tissue outline is
an irregular blob on white glass. Positive slides carry 1 to 3 tumour-texture needles with
irregular outlines that together cover 0.1 % to 1 % of the tissue. Only slide-level labels are
meant for training; masks and needle rectangles are for evaluation. Each slide's needle
rectangles are also written as QuPath GeoJSON annotations of class "Tumor" (``<stem>.geojson``,
an empty collection for a normal slide), so the synthetic sets exercise the annotation path.

Writes pyramidal JPEG tiled TIFFs (OpenSlide "generic-tiff") with resolution tags, so mpp is
known; pyvips does the pyramid because it streams levels without holding them all.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from engines.annotations import rect_annotation, write_geojson
from engines.data import stratified_split
from engines.resources import resource_path

TEXTURE_ROOT = resource_path("textures")  # package data, found wherever MagLens is installed
TISSUE_CLASSES = ["02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE"]
NEEDLE_CLASS = "01_TUMOR"
TEXTURE_MPP = 0.495  # Kather 2016 tiles: 150 px = 74 um
LABELS = ("normal", "tumor")


@dataclass
class SynthConfig:
    size: int = 8192  # level-0 side in pixels
    mpp: float = TEXTURE_MPP
    positive_fraction: float = 0.5
    needle_area: tuple[float, float] = (0.001, 0.01)  # share of the tissue, all needles together
    needles: tuple[int, int] = (1, 3)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test
    jpeg_quality: int = 90


@dataclass
class SynthSlide:
    name: str
    label: str
    split: str
    needles: list[list[int]]


def load_textures(root: Path = TEXTURE_ROOT) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for cls in TISSUE_CLASSES + [NEEDLE_CLASS]:
        files = sorted((root / cls).glob("*.png"))
        if not files:
            raise FileNotFoundError(f"no textures in {root / cls}")
        out[cls] = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files]
    return out


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1] of shape (h, w): bicubic upsampling of a coarse grid."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC)
    arr = np.asarray(img)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / max(hi - lo, 1e-6)


def blob_mask(rng: np.random.Generator, h: int, w: int, fill: float = 0.75, roughness: int = 6) -> np.ndarray:
    """An irregular filled shape (bool h x w) of roughly ``fill`` of the box."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
    field = (1.0 - r) + 0.45 * (smooth_noise(rng, h, w, roughness) - 0.5)
    thresh = np.quantile(field, 1.0 - fill)
    return field > thresh


def _window(n: int) -> np.ndarray:
    t = (np.arange(n, dtype=np.float32) + 0.5) / n
    w1 = np.sin(np.pi * t) ** 2 + 1e-3
    return np.outer(w1, w1)[:, :, None]


def _jitter(rng: np.random.Generator, tex: np.ndarray) -> np.ndarray:
    tex = np.rot90(tex, int(rng.integers(4)))
    if rng.integers(2):
        tex = tex[:, ::-1]
    gain = 1.0 + rng.uniform(-0.04, 0.04, size=3).astype(np.float32)
    return tex * gain + rng.uniform(-3, 3)


def quilt(rng: np.random.Generator, h: int, w: int, pick: Callable[[int, int], list[np.ndarray]]) -> np.ndarray:
    """Blend jittered textures over an h x w canvas; ``pick(y, x)`` gives the candidates
    for a texture centred at (y, x). Centres sit on a jittered grid so no seam lines up."""
    size, stride, jitter = 150, 90, 20
    pad = size + stride + jitter  # the last centres reach a stride past the edge, plus jitter
    acc = np.zeros((h + 2 * pad, w + 2 * pad, 3), np.float32)
    wsum = np.full((h + 2 * pad, w + 2 * pad, 1), 1e-6, np.float32)
    win = _window(size)
    for cy in range(0, h + stride, stride):
        for cx in range(0, w + stride, stride):
            y = cy + int(rng.integers(-jitter, jitter + 1))
            x = cx + int(rng.integers(-jitter, jitter + 1))
            cands = pick(min(max(y, 0), h - 1), min(max(x, 0), w - 1))
            tex = _jitter(rng, cands[int(rng.integers(len(cands)))])
            oy, ox = y - size // 2 + pad, x - size // 2 + pad
            acc[oy : oy + size, ox : ox + size] += tex * win
            wsum[oy : oy + size, ox : ox + size] += win
    return acc[pad : pad + h, pad : pad + w] / wsum[pad : pad + h, pad : pad + w]


def make_slide_image(rng: np.random.Generator, cfg: SynthConfig, textures: dict[str, list[np.ndarray]],
                     positive: bool) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(image HxWx3 uint8, needle mask HxW bool, needle rects [x, y, w, h])."""
    n = cfg.size
    # Work at texture scale: textures are resampled when the slide's mpp differs.
    scale = TEXTURE_MPP / cfg.mpp
    work = max(64, int(round(n / scale)))
    cls_field = smooth_noise(rng, work, work, 5)
    order = rng.permutation(len(TISSUE_CLASSES))
    n_cls = len(TISSUE_CLASSES)

    def pick_tissue(y: int, x: int) -> list[np.ndarray]:
        # A little noise on the field makes class borders ragged rather than straight.
        v = cls_field[y, x] + rng.normal(0, 0.04)
        idx = min(max(int(v * n_cls), 0), n_cls - 1)
        return textures[TISSUE_CLASSES[order[idx]]]

    tissue = quilt(rng, work, work, pick_tissue)
    outline = blob_mask(rng, work, work, fill=rng.uniform(0.45, 0.7), roughness=7)
    needle_mask = np.zeros((work, work), bool)
    rects: list[list[int]] = []
    if positive:
        tumour = quilt(rng, work, work, lambda y, x: textures[NEEDLE_CLASS])
        count = int(rng.integers(cfg.needles[0], cfg.needles[1] + 1))
        total = rng.uniform(*cfg.needle_area) * outline.sum()
        for area in total * rng.dirichlet(np.ones(count)):
            side = max(8, int(math.sqrt(area / 0.6)))  # blobs fill ~60 % of their box
            side = min(side, work // 3)
            for _ in range(200):  # place the needle fully inside tissue
                y0 = int(rng.integers(0, work - side))
                x0 = int(rng.integers(0, work - side))
                if outline[y0 : y0 + side, x0 : x0 + side].all():
                    break
            blob = blob_mask(rng, side, side, fill=0.6, roughness=3)
            needle_mask[y0 : y0 + side, x0 : x0 + side] |= blob
        # soft edge so needles blend into the surrounding tissue
        alpha = np.asarray(Image.fromarray(needle_mask.astype(np.uint8) * 255).filter(
            ImageFilter.GaussianBlur(2)), np.float32)[:, :, None] / 255
        tissue = tissue * (1 - alpha) + tumour * alpha
    # glass: near-white with faint noise; soft tissue edge
    edge = np.asarray(Image.fromarray(outline.astype(np.uint8) * 255).filter(
        ImageFilter.GaussianBlur(3)), np.float32)[:, :, None] / 255
    glass = 242 + rng.normal(0, 2, size=(work, work, 1)).astype(np.float32)
    img = np.clip(tissue * edge + glass * (1 - edge), 0, 255).astype(np.uint8)
    if work != n:
        img = np.asarray(Image.fromarray(img).resize((n, n), Image.BILINEAR))
        needle_mask = np.asarray(Image.fromarray(needle_mask).resize((n, n), Image.NEAREST))
    rects = _rects_of(needle_mask)
    return img, needle_mask, rects


def _rects_of(mask: np.ndarray) -> list[list[int]]:
    """Bounding rectangles [x, y, w, h] of the connected needle regions: a flood fill on a
    coarse copy of the mask finds the regions, the full mask gives exact bounds."""
    if not mask.any():
        return []
    from collections import deque

    step = max(1, mask.shape[0] // 1024)
    small = mask[::step, ::step]
    seen = np.zeros_like(small, bool)
    rects = []
    h, w = small.shape
    for sy, sx in zip(*np.nonzero(small)):
        if seen[sy, sx]:
            continue
        q = deque([(sy, sx)])
        seen[sy, sx] = True
        y0 = y1 = sy
        x0 = x1 = sx
        while q:
            y, x = q.popleft()
            y0, y1, x0, x1 = min(y0, y), max(y1, y), min(x0, x), max(x1, x)
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and small[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        # refine on the full-resolution mask inside the coarse box
        fy0, fx0 = y0 * step, x0 * step
        fy1, fx1 = min((y1 + 1) * step, mask.shape[0]), min((x1 + 1) * step, mask.shape[1])
        sub = mask[fy0:fy1, fx0:fx1]
        ys, xs = np.nonzero(sub)
        rects.append([int(fx0 + xs.min()), int(fy0 + ys.min()), int(xs.max() - xs.min() + 1),
                      int(ys.max() - ys.min() + 1)])
    return rects


def write_pyramid_tiff(path: Path, img: np.ndarray, mpp: float, quality: int = 90) -> None:
    """Pyramidal, tiled, JPEG-compressed TIFF with resolution tags (OpenSlide reads mpp)."""
    import pyvips

    h, w, _ = img.shape
    vimg = pyvips.Image.new_from_memory(np.ascontiguousarray(img).data, w, h, 3, "uchar")
    px_per_mm = 1000.0 / mpp
    tmp = path.with_name(f".{path.name}.tmp")
    vimg.tiffsave(str(tmp), tile=True, tile_width=256, tile_height=256, pyramid=True,
                  compression="jpeg", Q=quality, xres=px_per_mm, yres=px_per_mm, resunit="cm")
    tmp.replace(path)


def generate(out: str | Path, slides: int = 20, seed: int = 0, cfg: SynthConfig | None = None,
             on_progress: Callable[[int, int, str], None] | None = None) -> list[SynthSlide]:
    """Write ``slides`` synthetic slides, masks, needle annotations (``<stem>.geojson``),
    ``manifest.csv`` and ``needles.json`` to ``out``."""
    cfg = cfg or SynthConfig()
    if slides < 2:
        raise ValueError("need at least 2 slides (one of each class)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    textures = load_textures()
    n_pos = max(1, min(slides - 1, int(round(slides * cfg.positive_fraction))))
    labels = ["tumor"] * n_pos + ["normal"] * (slides - n_pos)
    rng.shuffle(labels)
    splits = stratified_split(labels, cfg.split, rng)
    made: list[SynthSlide] = []
    for i, (label, split) in enumerate(zip(labels, splits)):
        name = f"synth_{i:03d}.tiff"
        if on_progress:
            on_progress(i, slides, name)
        srng = np.random.default_rng([seed, i])
        img, mask, rects = make_slide_image(srng, cfg, textures, positive=label == "tumor")
        write_pyramid_tiff(out / name, img, cfg.mpp, cfg.jpeg_quality)
        Image.fromarray(mask).save(out / f"synth_{i:03d}_mask.png", optimize=True)
        write_geojson(out / f"synth_{i:03d}.geojson",
                      [rect_annotation(r, "Tumor", f"needle {k}") for k, r in enumerate(rects)])
        made.append(SynthSlide(name, label, split, rects))
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "label", "split"])
        for s in made:
            w.writerow([s.name, s.label, s.split])
    (out / "needles.json").write_text(json.dumps({s.name: s.needles for s in made}, indent=1))
    if on_progress:
        on_progress(slides, slides, "done")
    return made
