"""Reading pixels for a model: regions of level-0 space at a chosen size, never the whole slide.

A ``SlideView`` is what a model sees: a slide (or a rectangle of it) with an optional flip and
90-degree rotation for training augmentation. Models ask for rectangles in *view* coordinates;
with the identity orientation (always the case for inference) view coordinates are level-0
slide pixels, so every geometry a model reports lines up on the canvas.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engines.slide import BACKGROUND, ReadCheck, Rect, Slide

GREY_TOLERANCE = 15  # MagNet: R, G, B within 15 of each other is background


@dataclass(frozen=True)
class Orientation:
    """Horizontal flip (applied first), then ``rot90`` quarter turns counter-clockwise,
    as ``np.rot90`` turns an image."""

    flip: bool = False
    rot90: int = 0

    @property
    def identity(self) -> bool:
        return not self.flip and self.rot90 % 4 == 0

    @staticmethod
    def random(rng: np.random.Generator) -> "Orientation":
        return Orientation(flip=bool(rng.integers(2)), rot90=int(rng.integers(4)))


class SlideView:
    """A slide region as a model sees it (see module docstring)."""

    def __init__(
        self,
        slide: Slide,
        roi: Rect | None = None,
        orientation: Orientation = Orientation(),
        grey_filter: bool = False,
        background: tuple[int, int, int] = BACKGROUND,
        threads: int = 2,
        check: ReadCheck | None = None,
    ) -> None:
        self.slide = slide
        self.roi: Rect = tuple(map(float, roi)) if roi is not None else (0.0, 0.0, float(slide.width), float(slide.height))
        if self.roi[2] <= 0 or self.roi[3] <= 0:
            raise ValueError("the region of interest must have a positive size")
        self.orientation = orientation
        self.grey_filter = grey_filter
        self.background = background
        self._threads = max(1, threads)
        self._thumbs: dict[int, np.ndarray] = {}
        # Called between the pieces of every read (and before each read); raising stops the
        # read. The runner sets one that raises Cancelled, so a cancel stops a model even
        # inside the decode of a whole single-level slide.
        self.check: ReadCheck | None = check

    def use_grey_filter(self, on: bool = True) -> None:
        """Turn the grey filter on or off for later reads (a model whose paper filters grey
        asks for it itself); cached overviews read the other way are dropped."""
        if bool(on) != self.grey_filter:
            self.grey_filter = bool(on)
            self._thumbs.clear()

    # -- geometry --------------------------------------------------------------------------
    @property
    def bounds(self) -> Rect:
        """The view's own rectangle: anchored at the ROI origin, sides swapped by odd turns."""
        x, y, w, h = self.roi
        if self.orientation.rot90 % 2:
            w, h = h, w
        return (x, y, w, h)

    @property
    def mpp(self) -> float | None:
        return self.slide.mpp

    @property
    def objective_power(self) -> float | None:
        return self.slide.objective_power

    def magnification_of(self, rect_w: float, out_w: int) -> float | None:
        """Objective power at which ``rect_w`` level-0 pixels read at ``out_w`` pixels are seen."""
        base = self.slide.objective_power
        if base is None and self.slide.mpp:
            base = 10.0 / self.slide.mpp  # 1 um/px ~ 10x, the usual convention
        return None if base is None else base * out_w / rect_w

    def read_cost(self, rect: Rect, out_w: int, out_h: int) -> int:
        """Slide pixels ``read(rect, out_w, out_h)`` decodes (see ``Slide.read_cost``); only
        the part inside the slide is read."""
        o = self.orientation
        sw, sh = (out_h, out_w) if o.rot90 % 2 else (out_w, out_h)
        x, y, w, h = self.to_slide_rect(rect)
        ix0, iy0 = max(x, 0.0), max(y, 0.0)
        ix1, iy1 = min(x + w, self.slide.width), min(y + h, self.slide.height)
        if ix1 <= ix0 or iy1 <= iy0 or w <= 0 or h <= 0:
            return 0
        inner_w = max(1, round((ix1 - ix0) * sw / w))
        inner_h = max(1, round((iy1 - iy0) * sh / h))
        return self.slide.read_cost((ix0, iy0, ix1 - ix0, iy1 - iy0), inner_w, inner_h)

    def check_budget(self, rect: Rect, out_w: int, out_h: int) -> None:
        """``ReadBudgetError`` when reading ``rect`` at out_w x out_h, even split into several
        reads, would decode more than the slide read budget (``engines.slide.MAX_READ_PIXELS``)."""
        self.slide.check_read_budget(self.read_cost(rect, out_w, out_h),
                                     f"{rect[2]:.0f}x{rect[3]:.0f} level-0 px at {out_w}x{out_h}")

    def to_slide_rect(self, rect: Rect) -> Rect:
        """A view rectangle as the level-0 slide rectangle it shows."""
        if self.orientation.identity:
            return tuple(map(float, rect))
        bx, by, _, _ = self.bounds
        x, y, w, h = rect
        pts = [self._view_to_local(px - bx, py - by) for px, py in ((x, y), (x + w, y + h))]
        u0, u1 = sorted(p[0] for p in pts)
        v0, v1 = sorted(p[1] for p in pts)
        return (self.roi[0] + u0, self.roi[1] + v0, u1 - u0, v1 - v0)

    def _view_to_local(self, u: float, v: float) -> tuple[float, float]:
        # Undo the rotations (last applied first), then the flip; sizes are the ROI's.
        W, H = self.roi[2], self.roi[3]
        k = self.orientation.rot90 % 4
        # Size of the image before each quarter turn, walking backwards.
        sizes = []
        w, h = W, H
        for _ in range(k):
            sizes.append((w, h))
            w, h = h, w
        for w_before, _ in reversed(sizes):
            # forward turn: (u, v) -> (v, w_before - u); inverse below.
            u, v = w_before - v, u
        if self.orientation.flip:
            u = W - u
        return u, v

    # -- pixels ----------------------------------------------------------------------------
    def read(self, rect: Rect, out_w: int, out_h: int) -> np.ndarray:
        """HxWx3 uint8 of a view rectangle; outside the slide is background."""
        o = self.orientation
        src = self.to_slide_rect(rect)
        sw, sh = (out_h, out_w) if o.rot90 % 2 else (out_w, out_h)
        img = self._read_slide(src, sw, sh)
        if o.flip:
            img = img[:, ::-1]
        if o.rot90 % 4:
            img = np.rot90(img, o.rot90 % 4)
        img = np.ascontiguousarray(img)
        if self.grey_filter:
            img = grey_to_background(img, self.background)
        return img

    def _read_slide(self, rect: Rect, out_w: int, out_h: int) -> np.ndarray:
        x, y, w, h = rect
        sw, sh = self.slide.width, self.slide.height
        ix0, iy0 = max(x, 0.0), max(y, 0.0)
        ix1, iy1 = min(x + w, sw), min(y + h, sh)
        if ix1 <= ix0 or iy1 <= iy0:
            return np.full((out_h, out_w, 3), self.background, np.uint8)
        if self.check is not None:
            self.check()
        if ix0 == x and iy0 == y and ix1 == x + w and iy1 == y + h:
            return self.slide.read_rect(rect, out_w, out_h, self.check)
        # Partly outside: read the inside part and paste it on background.
        out = np.full((out_h, out_w, 3), self.background, np.uint8)
        sx, sy = out_w / w, out_h / h
        px0, py0 = int(round((ix0 - x) * sx)), int(round((iy0 - y) * sy))
        px1, py1 = int(round((ix1 - x) * sx)), int(round((iy1 - y) * sy))
        if px1 > px0 and py1 > py0:
            out[py0:py1, px0:px1] = self.slide.read_rect(
                (ix0, iy0, ix1 - ix0, iy1 - iy0), px1 - px0, py1 - py0, self.check)
        return out

    def read_many(self, rects: Sequence[Rect], out_w: int, out_h: int) -> list[np.ndarray]:
        if len(rects) <= 1 or self._threads == 1:
            return [self.read(r, out_w, out_h) for r in rects]
        with ThreadPoolExecutor(self._threads) as pool:  # OpenSlide releases the GIL
            return list(pool.map(lambda r: self.read(r, out_w, out_h), rects))

    def read_tensor(self, rects: Sequence[Rect], out_w: int, out_h: int) -> torch.Tensor:
        """(B, 3, out_h, out_w) float32 in [0, 1]."""
        return images_to_tensor(self.read_many(rects, out_w, out_h))

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole view fitted into ``max_side`` pixels (aspect kept), cached."""
        if max_side not in self._thumbs:
            _, _, w, h = self.bounds
            scale = max_side / max(w, h)
            self._thumbs[max_side] = self.read(self.bounds, max(1, round(w * scale)), max(1, round(h * scale)))
        return self._thumbs[max_side]

    def fit(self, out_w: int, out_h: int) -> np.ndarray:
        """The whole view resized to exactly out_w x out_h (aspect not kept)."""
        return self.read(self.bounds, out_w, out_h)


# ---------------------------------------------------------------------------------------
# Pixel helpers
# ---------------------------------------------------------------------------------------
def grey_to_background(img: np.ndarray, background=BACKGROUND, tol: int = GREY_TOLERANCE) -> np.ndarray:
    """MagNet's filter: pixels whose R, G and B lie within ``tol`` of each other become
    background (glass, pen marks, scanner grey)."""
    spread = img.max(axis=2).astype(np.int16) - img.min(axis=2).astype(np.int16)
    out = img.copy()
    out[spread <= tol] = background
    return out


def tissue_mask(img: np.ndarray, min_saturation: int = 20, max_value: int = 235) -> np.ndarray:
    """Boolean HxW: stained tissue (coloured and not near white)."""
    spread = img.max(axis=2).astype(np.int16) - img.min(axis=2).astype(np.int16)
    return (spread >= min_saturation) & (img.min(axis=2) < max_value)


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    arr = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------
# Differentiable crops for spatial-transformer models
# ---------------------------------------------------------------------------------------
def zoom_theta(s: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) affine matrices [[s, 0, tx], [0, s, ty]]: isotropic zoom around (tx, ty),
    both in the [-1, 1] normalised coordinates of the field of view."""
    zero = torch.zeros_like(s)
    return torch.stack([torch.stack([s, zero, tx], -1), torch.stack([zero, s, ty], -1)], -2)


def crop(image: torch.Tensor, theta: torch.Tensor, out_h: int, out_w: int, method: str = "bilinear") -> torch.Tensor:
    """Sample the window ``theta`` of ``image`` (B, C, H, W) at out_h x out_w.

    Gradients reach ``theta`` (and ``image``). ``method`` is ``"bilinear"`` or ``"lms"``
    (linearised multi-sampling: same forward, a least-squares gradient for the grid that
    does not vanish when zooming in strongly)."""
    grid = F.affine_grid(theta, [image.shape[0], image.shape[1], out_h, out_w], align_corners=False)
    if method == "bilinear":
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if method == "lms":
        from engines.lms import lms_grid_sample

        return lms_grid_sample(image, grid)
    raise ValueError(f"unknown sampling method {method!r} (bilinear or lms)")


def theta_to_rect(s: float, tx: float, ty: float, field: Rect) -> Rect:
    """The level-0 rectangle that the zoom (s, tx, ty) selects inside ``field``."""
    fx, fy, fw, fh = field
    cx = fx + (1.0 + tx) / 2.0 * fw
    cy = fy + (1.0 + ty) / 2.0 * fh
    w, h = s * fw, s * fh
    return (cx - w / 2.0, cy - h / 2.0, w, h)


def grid_cells(rect: Rect, rows: int, cols: int) -> list[Rect]:
    """Row-major cells of a rectangle split into rows x cols."""
    x, y, w, h = rect
    cw, ch = w / cols, h / rows
    return [(x + c * cw, y + r * ch, cw, ch) for r in range(rows) for c in range(cols)]


def square_grid_shape(rect: Rect, cell: float) -> tuple[int, int]:
    """(rows, cols) of cells of side ``cell`` needed to cover ``rect``."""
    return max(1, math.ceil(rect[3] / cell)), max(1, math.ceil(rect[2] / cell))
