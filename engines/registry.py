"""Model registry with presets: ``create(name, preset, **overrides)``.

Model classes know nothing of files or weights (checkpoints live in ``engines.checkpoint``).
Each model module defines a config dataclass, ``PRESETS = {"tiny": Config(...),
"paper": Config(...)}`` and ``MODEL`` (the class). Modules are imported on first use so
a broken or slow model never costs the others.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

MODULES = {
    "magnet": "engines.models.magnet",
    "spatial_mag": "engines.models.spatial_mag",
    "zoom_in": "engines.models.zoom_in",
    "grid_attention": "engines.models.grid_attention",
    "local_learning": "engines.models.local_learning",
}


class UnknownModelError(ValueError):
    pass


def list_models() -> list[str]:
    return list(MODULES)


def _module(name: str):
    if name not in MODULES:
        raise UnknownModelError(f"unknown model {name!r}; choose one of {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name])


def presets(name: str) -> list[str]:
    return list(_module(name).PRESETS)


def config_for(name: str, preset: str = "tiny", **overrides: Any):
    mod = _module(name)
    if preset not in mod.PRESETS:
        raise UnknownModelError(f"model {name!r} has no preset {preset!r}; choose one of {', '.join(mod.PRESETS)}")
    cfg = mod.PRESETS[preset]
    known = {f.name for f in dataclasses.fields(cfg)}
    bad = set(overrides) - known
    if bad:
        raise UnknownModelError(f"model {name!r} has no setting(s) {', '.join(sorted(bad))}")
    return dataclasses.replace(cfg, **overrides)


def inference_options(name: str) -> tuple[str, ...]:
    """Config settings of model ``name`` that change how it runs but not its weights (e.g.
    Zoom-In's ``draws``): the ones a trained checkpoint may be run with differently."""
    return tuple(getattr(_module(name), "INFERENCE_OPTIONS", ()))


def check_options(name: str, options: dict[str, Any]) -> None:
    """``UnknownModelError`` naming any key of ``options`` that is not an inference option."""
    allowed = inference_options(name)
    bad = sorted(set(options) - set(allowed))
    if bad:
        choose = f"choose from {', '.join(allowed)}" if allowed else "it has none"
        raise UnknownModelError(f"{', '.join(bad)}: not an inference option of {name!r} ({choose})")


def create(name: str, preset: str = "tiny", classes: list[str] | None = None, **overrides: Any):
    """Build model ``name`` with the sizes of ``preset`` and any config ``overrides``."""
    cfg = config_for(name, preset, **overrides)
    model = _module(name).MODEL(cfg, classes=classes)
    model.load_pretrained()  # the constructor only builds; weight files open here
    model.preset = preset
    return model
