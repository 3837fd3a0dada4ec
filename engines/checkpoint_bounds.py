"""Bounds on the model config a checkpoint carries, checked before a model is built.

A config value sizes layers, images or loops; a hostile or corrupt file could ask for a width
of 50,000 or a 1e6-pixel thumbnail, which would be allocated (or run for hours) before any
weight is compared. Every value is checked against the type of the preset's value for the
same key and against an upper bound: the bound of its key when listed below, else the bound
of a name pattern (``*_px``, ``*width*``, ...), else a generic one. The bounds are generous
for the paper presets and anything one machine could train, far below exhausting memory.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

# Sides of images fed whole to a network (pixels).
IMAGE_SIDE = 4096
# Widths of layers (channels, hidden units).
WIDTH = 8192
# Any other whole number (counts, strides, batch sizes ...).
GENERIC_INT = 1 << 20
# Any other number's magnitude (loss weights, rates ...).
GENERIC_FLOAT = 1e9
MAX_TEXT = 1000
MAX_ITEMS = 64

# (lowest, highest) per key of the models in engines/models/; a tuple's items each obey it.
KEY_BOUNDS: dict[str, tuple[float, float]] = {
    # magnet
    "layers": (1, 16),
    "patches": (1, 256),
    "input_px": (1, IMAGE_SIDE),
    "source_px": (1, 2 * IMAGE_SIDE),
    "final_px": (1, IMAGE_SIDE),
    "final_source_px": (1, 2 * IMAGE_SIDE),
    "kernel_sizes": (1, 63),
    "branch_width": (1, WIDTH),
    "min_scale": (0, 1),
    "box_sigmas": (0, 100),
    "frozen_layer": (0, 16),
    "aux_layers": (0, 16),
    "small_width": (1, 1024),  # the small CNNs grow it 8x
    "gru_hidden": (1, WIDTH),
    "fc_hidden": (1, WIDTH),
    "chunk": (1, 4096),
    "accumulation": (1, 1 << 16),
    # spatial_mag
    "thumb_size": (1, IMAGE_SIDE),
    "grids": (1, 512),
    "patch_size": (1, IMAGE_SIDE),
    "k": (1, 1024),
    "attention_dropout": (0, 1),
    "classifier_dropout": (0, 1),
    # zoom_in
    "s1": (0, 1),
    "s2": (0, 1),
    "tile_size": (1, 1 << 16),  # level-0 pixels (zoom_in) or pixels at a magnification
    "subtile_size": (1, 1 << 16),
    "subtile_pixels": (1, IMAGE_SIDE),
    "n_samples": (1, 10_000),
    "attention_channels": (1, WIDTH),
    "feature_channels": (1, WIDTH),
    "contrastive_warmup": (0, 1 << 20),  # epochs
    "stage1_band_pixels": (1, 1 << 26),
    "stage1_read_pixels": (1, 1 << 28),
    # grid_attention
    "tile_px": (1, IMAGE_SIDE),
    "batch_size": (1, 4096),
    "filters": (1, 4096),
    "kernel": (1, 63),
    "dropout": (0, 1),
    "min_tissue": (0, 1),
    "scale_jitter": (0, 1),
    "max_tiles": (1, 1 << 22),
    "max_tile_fields": (0, 1 << 20),
    # local_learning
    "widths": (1, WIDTH),
    "blocks": (1, 256),
    "stem_stride": (1, 64),
    "num_modules": (1, 64),
    "magnification": (0, 1000),
    "fallback_downsample": (0, 1 << 16),
    "max_side": (1, 1 << 15),  # the whole view is read at this side
    "head_dim": (1, WIDTH),
    "head_kernel": (1, 64),
    "attn_dim": (1, WIDTH),
    "gn_groups": (1, WIDTH),
    "rfr_crops": (0, 4096),
    "rfr_crop": (1, IMAGE_SIDE),
    "strip_rows": (1, 1 << 16),
}

# Name patterns for keys not listed above (a model added later, a test model).
PATTERN_BOUNDS: tuple[tuple[tuple[str, ...], tuple[float, float]], ...] = (
    (("_px", "_pixels", "_size", "_side"), (0, IMAGE_SIDE)),
    (("width", "widths", "hidden", "channels", "_dim"), (0, WIDTH)),
)


class ConfigBoundsError(ValueError):
    """A config value is of the wrong type or outside its bound; the message names it."""


def bounds_for(key: str) -> tuple[float, float] | None:
    if key in KEY_BOUNDS:
        return KEY_BOUNDS[key]
    for patterns, bound in PATTERN_BOUNDS:
        if any(key.endswith(p) or (not p.startswith("_") and p in key) for p in patterns):
            return bound
    return None


def check_config(base: Any, values: dict[str, Any]) -> None:
    """Raise ``ConfigBoundsError`` unless every value fits the type of ``base``'s (a config
    dataclass) value for the same key and that key's bound."""
    defaults = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    for key, value in values.items():
        _check(str(key), value, defaults.get(key), depth=0)


def _check(key: str, value: Any, default: Any, depth: int) -> None:
    if depth > 4:
        raise ConfigBoundsError(f"{key} is nested too deeply")
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                _check(f.name, getattr(value, f.name), getattr(default, f.name, None), depth + 1)
            return
        raise ConfigBoundsError(f"{key} must be a group of settings, not {type(value).__name__}")
    if value is None or isinstance(value, bool):
        if default is not None and value is not None and not isinstance(default, bool):
            raise ConfigBoundsError(f"{key} must be a number, not {value!r}")
        return
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise ConfigBoundsError(f"{key} is a text of {len(value)} characters")
        return
    if isinstance(value, (tuple, list)):
        if len(value) > MAX_ITEMS:
            raise ConfigBoundsError(f"{key} has {len(value)} items (at most {MAX_ITEMS})")
        item_default = default[0] if isinstance(default, (tuple, list)) and default else None
        for item in value:
            _check(key, item, item_default, depth + 1)
        return
    if isinstance(value, (int, float)):
        _check_number(key, value, default)
        return
    raise ConfigBoundsError(f"{key} holds a {type(value).__name__}, not a setting")


def _check_number(key: str, value: int | float, default: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigBoundsError(f"{key} is {value}, not a finite number")
    if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
        raise ConfigBoundsError(f"{key} must be a whole number, not {value!r}")
    if isinstance(default, str):
        raise ConfigBoundsError(f"{key} must be a name, not {value!r}")
    bound = bounds_for(key)
    if bound is None:
        bound = (-GENERIC_INT, GENERIC_INT) if isinstance(value, int) else (-GENERIC_FLOAT, GENERIC_FLOAT)
    lo, hi = bound
    if not lo <= value <= hi:
        raise ConfigBoundsError(f"{key} = {_show(value)} is outside {lo:g}..{hi:g}")


def _show(value: int | float) -> str:
    text = repr(value) if isinstance(value, float) else str(value) if abs(value) < 10**15 else "a huge number"
    return text[:40]
