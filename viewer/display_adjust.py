"""Brightness, contrast and gamma for the view, as one 256-entry lookup table.

Fluorescence slides (a DAPI channel, say) store most of their signal in the bottom tenth of
the range and look black as read. The table is applied to each tile's pixels in the tile
worker, before the tile becomes a QImage, so painting costs nothing extra and exports show
what the screen shows. Slide pixels given to models are never adjusted.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

BRIGHTNESS_RANGE = (-1.0, 1.0)
CONTRAST_RANGE = (0.1, 10.0)
GAMMA_RANGE = (0.1, 10.0)
# Byte holding alpha in a native-endian 0xAARRGGBB uint32.
_ALPHA_BYTE = 3 if sys.byteorder == "little" else 0


def _clamped(value: Any, lo: float, hi: float, default: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    if not math.isfinite(v):
        return default
    return min(max(v, lo), hi)


@dataclass(frozen=True)
class DisplayAdjust:
    """``out = clip(contrast * (in ** (1 / gamma) - 0.5) + 0.5 + brightness)`` on 0..1 values.

    brightness: -1..1, added after contrast (0 leaves the image alone);
    contrast: 0.1..10, a stretch about mid-grey (1 leaves it alone);
    gamma: 0.1..10; above 1 lifts dark and mid tones, below 1 deepens them.
    """

    brightness: float = 0.0
    contrast: float = 1.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "brightness", _clamped(self.brightness, *BRIGHTNESS_RANGE, 0.0))
        object.__setattr__(self, "contrast", _clamped(self.contrast, *CONTRAST_RANGE, 1.0))
        object.__setattr__(self, "gamma", _clamped(self.gamma, *GAMMA_RANGE, 1.0))

    @property
    def is_identity(self) -> bool:
        return self.brightness == 0.0 and self.contrast == 1.0 and self.gamma == 1.0

    def lut(self) -> np.ndarray:
        """The 256-entry uint8 table."""
        x = np.arange(256, dtype=np.float64) / 255.0
        y = np.power(x, 1.0 / self.gamma)
        y = self.contrast * (y - 0.5) + 0.5 + self.brightness
        return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)

    def apply_rgb(self, arr: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 through the table (a new array)."""
        return self.lut()[arr]

    def xrgb_filter(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """A function taking HxW uint32 0xFFRRGGBB tiles through the table, or None when the
        adjustment changes nothing (so the tile path stays a plain copy)."""
        if self.is_identity:
            return None
        table = self.lut()

        def apply(arr: np.ndarray) -> np.ndarray:
            arr = np.ascontiguousarray(arr, dtype=np.uint32)
            channels = arr.view(np.uint8).reshape(arr.shape + (4,))
            out = table[channels]  # one gather over every byte, then alpha is put back
            out[..., _ALPHA_BYTE] = 255
            return out.view(np.uint32).reshape(arr.shape)

        return apply

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "DisplayAdjust":
        """From stored settings; anything missing or malformed falls back to the default."""
        if not isinstance(data, dict):
            return cls()
        return cls(data.get("brightness", 0.0), data.get("contrast", 1.0), data.get("gamma", 1.0))
