"""Checkpoints: one ``torch.save`` file of tensors and plain data, loaded with
``weights_only=True`` so a file from elsewhere can never run code.

Keys: ``format``, ``model``, ``preset``, ``config`` (the model config as a dict), ``classes``,
``state_dict``, ``train`` (epoch, metrics, seed, ...), and optionally ``optimizer``,
``scheduler`` and ``extra``. Written to a temporary file and renamed over the target.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from engines import registry
from engines.trace import write_atomic

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format", "model", "preset", "config", "classes", "state_dict")
# Everything else the contract allows at the top level; any other key is refused, so a file
# cannot carry bulk data MagLens never looks at.
OPTIONAL_KEYS = ("train", "optimizer", "scheduler", "extra")

# Caps checked before torch.load allocates anything. A paper-preset MagNet with its Adam state
# is about 0.6 GB; these leave room for several times that.
MAX_CHECKPOINT_BYTES = 4 << 30  # the file, and the sum of its zip members once unpacked
MAX_ZIP_MEMBERS = 200_000


class CheckpointError(Exception):
    """A checkpoint could not be read or does not fit; the message is meant for the user."""


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    train: Mapping[str, Any] | None = None,
    optimizer: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and training state) to ``path`` atomically; returns the path."""
    name = str(getattr(model, "name", "") or "")
    if not name:
        raise CheckpointError(f"{type(model).__name__} has no registry name; it cannot be checkpointed")
    data: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": name,
        "preset": str(getattr(model, "preset", "custom")),
        "config": _plain(_config_dict(getattr(model, "config", None)), "config"),
        "classes": [str(c) for c in getattr(model, "classes", [])],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train": _plain(dict(train), "train") if train is not None else {},
    }
    for key, value in (("optimizer", optimizer), ("scheduler", scheduler), ("extra", extra)):
        if value is not None:
            data[key] = _plain(dict(value), key)
    target = Path(path)
    _save_atomic(target, data)
    return target


_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _plain(value: Any, where: str) -> Any:
    """``value`` as data a ``weights_only`` load accepts: numpy becomes Python numbers or
    tensors, paths become strings; anything else is refused now rather than written into a
    file that could not be loaded back."""
    if isinstance(value, np.generic):  # first: np.float64 is also a float
        return value.item()
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise CheckpointError(f"cannot store {where} of type {type(value).__name__} in a checkpoint "
                          "(only tensors, numbers, strings, lists and dicts)")


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise CheckpointError(f"model config of type {type(config).__name__} is not a dataclass or dict")


def _save_atomic(target: Path, data: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(data, buf)  # a failure here leaves the old file untouched
    write_atomic(target, buf.getvalue())


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the file, as recorded in traces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        size = path.stat().st_size
        if size > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(f"{path.name}: refused: {_gib(size)} is more than a checkpoint "
                                  f"may hold ({_gib(MAX_CHECKPOINT_BYTES)})")
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise CheckpointError(f"{path.name}: the checkpoint file is empty")
    return data


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _check_archive(name: str, data: bytes) -> None:
    """Refuse an archive whose members would unpack to more than the cap, from the sizes its
    central directory declares (read without unpacking anything)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"{name}: damaged or not a PyTorch checkpoint ({_first_line(exc)})") from None
    if len(infos) > MAX_ZIP_MEMBERS:
        raise CheckpointError(f"{name}: refused: it holds {len(infos)} records, more than a checkpoint "
                              f"may ({MAX_ZIP_MEMBERS})")
    total = sum(max(0, i.file_size) for i in infos)
    if total > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{name}: refused: its tensors would take {_gib(total)} in memory, more "
                              f"than a checkpoint may hold ({_gib(MAX_CHECKPOINT_BYTES)})")


def _load_bytes(name: str, data: bytes) -> Any:
    # torch.save writes a zip archive. Its legacy format (a bare pickle, "\x80") is refused:
    # it declares tensor sizes inside the pickle, so nothing can be checked before torch
    # allocates them, and MagLens never wrote it.
    if data[:1] == b"\x80":
        raise CheckpointError(f"{name}: refused: written in PyTorch's legacy format, which MagLens "
                              "does not read (save it again with a current torch.save)")
    if not data.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{name}: not a PyTorch checkpoint (unknown file type)")
    _check_archive(name, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices are noise for the user
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"{name}: refused: it holds Python objects other than tensors and plain data "
                "(it may run code when unpickled), so it is not loaded"
            ) from None
        raise CheckpointError(f"{name}: not a PyTorch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            IndexError, TypeError, AttributeError, UnicodeDecodeError, MemoryError,
            OverflowError, RecursionError) as exc:
        # Truncated zips, foreign files and corrupt records surface as any of these.
        raise CheckpointError(f"{name}: damaged or not a PyTorch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text or isinstance(exc, KeyError):
        return type(exc).__name__
    # First sentence of the first line: torch appends long advice after it.
    return text.splitlines()[0].split(". ")[0][:160]


def _validate(name: str, ckpt: Any) -> dict[str, Any]:
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{name}: not a MagLens checkpoint (holds a {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise CheckpointError(
                f"{name}: holds bare weights, not a MagLens checkpoint (no model name or config)"
            )
        raise CheckpointError(f"{name}: not a MagLens checkpoint (missing {', '.join(missing)})")
    unknown = [str(k) for k in ckpt if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if unknown:
        raise CheckpointError(f"{name}: refused: not a MagLens checkpoint (unknown key(s) "
                              f"{', '.join(sorted(unknown))[:120]})")
    fmt = ckpt["format"]
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise CheckpointError(f"{name}: not a MagLens checkpoint (format {fmt!r})")
    if fmt > CHECKPOINT_FORMAT or fmt < 1:
        raise CheckpointError(
            f"{name}: checkpoint format {fmt} is not supported (this MagLens reads format "
            f"{CHECKPOINT_FORMAT}); update MagLens"
        )
    if not isinstance(ckpt["model"], str) or not isinstance(ckpt["preset"], str):
        raise CheckpointError(f"{name}: model and preset must be names")
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{name}: config is not a dict")
    classes = ckpt["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{name}: classes must be a non-empty list of names")
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{name}: state_dict is not a dict of tensors")
    _check_finite(name, ckpt)
    return ckpt


def _check_finite(name: str, ckpt: Mapping[str, Any]) -> None:
    # NaN or infinite weights make every prediction NaN; say so at load, naming the tensor.
    for where, t in iter_tensors({k: ckpt[k] for k in ("state_dict", "optimizer") if k in ckpt}):
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name}: holds non-finite weights (NaN or infinity) in "
                                  f"{where.removeprefix('ckpt.')[:120]}; it cannot be used")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dict; ``CheckpointError`` for anything that is not a valid one."""
    return _load(Path(path))[0]


def _load(path: Path) -> tuple[dict[str, Any], str]:
    data = _read_bytes(path)
    ckpt = _validate(path.name, _load_bytes(path.name, data))
    return ckpt, hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------
# Rebuilding a model
# ---------------------------------------------------------------------------------------
def _is_weights_file_setting(key: str, value: Any) -> bool:
    # Pretrained-weight files are replaced by the checkpoint's own tensors, so a rebuild
    # must not need them (they may not exist on this machine).
    return isinstance(value, str) and (key == "weights" or key.endswith(("_weights", "weights_path")))


def _rebuild_config_values(name: str, preset: str, config: dict[str, Any]) -> dict[str, Any]:
    base = registry.config_for(name, preset)
    defaults = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    out: dict[str, Any] = {}
    for key, value in config.items():
        if _is_weights_file_setting(key, value):
            value = None
        default = defaults.get(key)
        # asdict() flattened nested config dataclasses; restore them.
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = dataclasses.replace(default, **value)
        elif isinstance(value, list) and isinstance(default, tuple):
            value = tuple(value)
        out[key] = value
    return out


def model_from_checkpoint(path_or_dict: str | os.PathLike | Mapping[str, Any],
                          expect_model: str | None = None,
                          options: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Build the checkpoint's model with its preset and config, and load its weights strictly.

    ``expect_model`` refuses a checkpoint of another model. ``options`` change inference-time
    settings (``engines.registry.inference_options``), never the weights. A model built from a
    file gets ``checkpoint_sha256`` set (``None`` when built from a dict)."""
    if isinstance(path_or_dict, Mapping):
        label = "checkpoint"
        ckpt, sha = _validate(label, dict(path_or_dict)), None
    else:
        label = Path(path_or_dict).name
        ckpt, sha = _load(Path(path_or_dict))
    name, preset = ckpt["model"], ckpt["preset"]
    if expect_model is not None and name != expect_model:
        raise CheckpointError(
            f"{label} is a checkpoint of model {name!r}, not of {expect_model!r}"
        )
    if name not in registry.list_models():
        raise CheckpointError(
            f"{label} is for model {name!r}, which this MagLens does not have "
            f"(it has {', '.join(registry.list_models())})"
        )
    from engines.checkpoint_bounds import ConfigBoundsError, check_config

    classes = list(ckpt["classes"])
    try:
        known = registry.presets(name)
        base_preset = preset if preset in known else known[0]
        config = _rebuild_config_values(name, base_preset, ckpt["config"])
        check_config(registry.config_for(name, base_preset), config)
        if options:
            registry.check_options(name, dict(options))
            config.update(options)
        # Build once on the meta device (no memory) and fit the weights there, so a config
        # that does not match them is refused before anything real is allocated.
        shadow = _build_on_meta(name, base_preset, classes, config)
        if shadow is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "copying to a meta parameter is a no-op": the point
                _fit_weights(label, name, preset, shadow, ckpt)
        with _quiet_backbones():  # the checkpoint's weights replace any initial ones
            model = registry.create(name, base_preset, classes=classes, **config)
    except ConfigBoundsError as exc:
        raise CheckpointError(f"{label}: refused: its {name} config {exc}") from None
    except registry.UnknownModelError as exc:
        if options and "inference option" in str(exc):
            raise  # the options asked for, not the file, are wrong
        raise CheckpointError(f"{label}: does not fit this version of {name!r} ({exc})") from None
    except (TypeError, ValueError, OverflowError, NotImplementedError, MemoryError, RuntimeError) as exc:
        # RuntimeError: torch's own refusals (an allocation it cannot make, a bad layer size)
        raise CheckpointError(f"{label}: its {name} config cannot be used ({_first_line(exc)})") from None
    model.preset = preset
    _fit_weights(label, name, preset, model, ckpt)
    model.checkpoint_sha256 = sha
    return model


def _build_on_meta(name: str, preset: str, classes: list[str], config: dict[str, Any]):
    """The model built with no memory behind its tensors, or None when this model cannot be
    built that way (the real build then reports any fault in its config)."""
    try:
        with torch.device("meta"), _quiet_backbones(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return registry.create(name, preset, classes=classes, **config)
    except Exception:  # noqa: BLE001 - only a pre-check; the real build follows
        return None


def _fit_weights(label: str, name: str, preset: str, model: torch.nn.Module,
                 ckpt: Mapping[str, Any]) -> None:
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{label}: weights do not fit model {name!r} (preset {preset!r}): {_state_mismatch(exc)}"
        ) from None


@contextlib.contextmanager
def _quiet_backbones():
    # "starts from random weights" is untrue for a model whose weights come from a checkpoint.
    log = logging.getLogger("engines.models.backbones")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _state_mismatch(exc: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "mismatch")
    return detail[:200]


def iter_tensors(obj: Any, path: str = "ckpt"):
    """(path, tensor) for every tensor nested in dicts, lists and tuples of a loaded
    checkpoint, e.g. to check that a file holds CPU tensors only."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{path}[{i}]")
