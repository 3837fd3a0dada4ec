"""What a checkpoint file says about itself (model, preset, config overrides), read without
loading its weights and off the GUI thread, so the Models dock can show it as soon as a
checkpoint is chosen and refuse another model's checkpoint before a run starts."""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import queue
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

MAX_PICKLE_BYTES = 16 * 2**20  # the metadata record of a checkpoint is a few kB


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    model: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # config values unlike the preset's
    error: str | None = None  # why the file is not a usable checkpoint

    @property
    def name(self) -> str:
        return Path(self.path).name

    def mismatch(self, model: str) -> str | None:
        """One line refusing this checkpoint for ``model``, or None when it fits."""
        if self.model and self.model != model:
            return f"{self.name} is a {self.model} checkpoint, not {model}"
        return None

    def describe(self) -> str:
        """Preset and overrides in a few words, for the dock's tooltip and note."""
        if self.error:
            return self.error
        text = f"{self.model} checkpoint, preset {self.preset}"
        if self.overrides:
            text += " with " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(self.overrides.items()))
        return text


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, dict) else "(changed)"
    return text if len(text) <= 24 else text[:21] + "..."


class _Placeholder:
    """Stands in for tensors, storages and dtypes: the metadata reader never builds them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Placeholder":
        return _Placeholder()


class _MetadataUnpickler(pickle.Unpickler):
    """Only plain containers and inert placeholders can be built: no other global is
    reachable, so a hostile file runs nothing."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("torch", "torch._utils", "torch.storage") and name.replace("_", "").isalnum():
            return _Placeholder()
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        return None


def _quick_record(path: Path) -> dict[str, Any] | None:
    """The checkpoint's top-level dict from the zip archive ``torch.save`` writes, without
    its tensor data; None when the file is not such an archive (legacy formats)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1 or zf.getinfo(names[0]).file_size > MAX_PICKLE_BYTES:
                return None
            raw = zf.read(names[0])
    except (zipfile.BadZipFile, OSError, KeyError, ValueError):
        return None
    try:
        record = _MetadataUnpickler(io.BytesIO(raw)).load()
    except Exception:  # noqa: BLE001 - any oddity: the full loader decides
        return None
    return record if isinstance(record, dict) else None


def _overrides(model: str, preset: str, config: dict[str, Any]) -> dict[str, Any]:
    """Config values that differ from ``preset``'s (imports the model's module: call off the
    GUI thread)."""
    from engines import registry

    try:
        base = registry.config_for(model, preset if preset in registry.presets(model) else registry.presets(model)[0])
    except Exception:  # noqa: BLE001 - an unknown model or preset: nothing to compare with
        return {}
    defaults = dataclasses.asdict(base)
    out = {}
    for key, value in config.items():
        if isinstance(value, str) and (key == "weights" or key.endswith(("_weights", "weights_path"))):
            continue  # weight files are replaced by the checkpoint's own tensors
        default = defaults.get(key)
        if _plainish(value) != _plainish(default):
            out[key] = value
    return out


def _plainish(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plainish(v) for v in value]
    if isinstance(value, dict):
        return {k: _plainish(v) for k, v in value.items()}
    return value


def read_checkpoint_info(path: str | os.PathLike, full: bool = True) -> CheckpointInfo | None:
    """Model, preset and overrides of the checkpoint at ``path``. The archive's metadata is
    read without its weights; a file that is not such an archive is loaded whole when
    ``full`` (else None). Never raises: a bad file becomes ``CheckpointInfo.error``."""
    p = Path(path)
    text = str(path)
    if not p.is_file():
        return CheckpointInfo(text, error=f"{p.name}: no such checkpoint file")
    record = _quick_record(p)
    if record is None:
        if not full:
            return None
        try:
            from engines.checkpoint import CheckpointError, load_checkpoint
        except ImportError as exc:
            return CheckpointInfo(text, error=f"{p.name}: cannot be read ({exc})")
        try:
            record = load_checkpoint(p)
        except CheckpointError as exc:
            return CheckpointInfo(text, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - reported, never raised into the GUI
            return CheckpointInfo(text, error=f"{p.name}: cannot be read ({type(exc).__name__})")
    model, preset, config = record.get("model"), record.get("preset"), record.get("config")
    if not isinstance(model, str) or not isinstance(preset, str) or not isinstance(config, dict):
        return CheckpointInfo(text, error=f"{p.name}: not a MagLens checkpoint (no model, preset or config)")
    return CheckpointInfo(text, model, preset, _overrides(model, preset, config) if full else {})


class CheckpointInfoReader(QObject):
    """Reads checkpoint metadata on worker threads; ``ready`` brings each result to the GUI
    thread. Results are cached per file (and its size and time).

    The workers touch no Qt object: they hand results over a queue that a GUI-thread timer
    drains, so no signal is ever emitted from a thread Qt does not manage."""

    ready = Signal(object)  # CheckpointInfo
    _shared: "CheckpointInfoReader | None" = None
    POLL_MS = 30

    @classmethod
    def shared(cls) -> "CheckpointInfoReader":
        """The process's reader: it outlives every window, so a read finishing after its
        window closed reports to a live object (and windows share what was read)."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._cache: dict[str, tuple[tuple[int, int], CheckpointInfo]] = {}
        self._pending: set[str] = set()
        self._results: queue.SimpleQueue[CheckpointInfo] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._poll = QTimer(self)
        self._poll.setInterval(self.POLL_MS)
        self._poll.timeout.connect(self.deliver)

    @staticmethod
    def _stamp(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def cached(self, path: str) -> CheckpointInfo | None:
        entry = self._cache.get(path)
        if entry is None or entry[0] != self._stamp(path):
            return None
        return entry[1]

    def request(self, path: str) -> CheckpointInfo | None:
        """The cached info when it is current; otherwise start reading it (``ready`` follows)
        and return None."""
        info = self.cached(path)
        if info is not None:
            return info
        if path in self._pending:
            return None
        self._pending.add(path)
        t = threading.Thread(target=lambda: self._results.put(read_checkpoint_info(path)),
                             name="maglens-checkpoint-info", daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        self._poll.start()
        return None

    def deliver(self) -> None:
        """Cache and announce the results that have arrived (GUI thread)."""
        while True:
            try:
                info = self._results.get_nowait()
            except queue.Empty:
                break
            self._pending.discard(info.path)
            stamp = self._stamp(info.path)
            if stamp is not None:
                self._cache[info.path] = (stamp, info)
            self.ready.emit(info)
        if not self._pending:
            self._poll.stop()

    def wait(self, timeout_s: float = 10.0) -> None:
        """Join the readers and deliver their results (for tests and scripts)."""
        for t in list(self._threads):
            t.join(timeout_s)
        self.deliver()
