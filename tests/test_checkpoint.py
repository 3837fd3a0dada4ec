"""Checkpoints: round trip, atomic writes, and refusal of every kind of bad file."""
from __future__ import annotations

import builtins
import dataclasses
import hashlib
import importlib
import pickle
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from engines import checkpoint as ck
from engines import registry
from engines.checkpoint import CheckpointError, checkpoint_sha256, load_checkpoint, model_from_checkpoint, save_checkpoint
from engines.models.base import SlideModel


@dataclass(frozen=True)
class Head:
    hidden: int = 4


@dataclass(frozen=True)
class CkConfig:
    width: int = 3
    scales: tuple[int, int] = (1, 2)
    head: Head = field(default_factory=Head)
    backbone_weights: str | None = None


class CkModel(SlideModel):
    name = "ckfake"

    def __init__(self, config: CkConfig, classes=None) -> None:
        super().__init__(config, classes)
        # Stands in for a backbone that needs its weights file when one is named.
        if config.backbone_weights is not None and not Path(config.backbone_weights).exists():
            raise ValueError(f"no weights file {config.backbone_weights}")
        assert isinstance(config.scales, tuple) and isinstance(config.head, Head)
        self.body = nn.Linear(config.width, config.head.hidden)
        self.out = nn.Linear(config.head.hidden, self.num_classes)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


class OtherModel(CkModel):
    name = "ckother"


@pytest.fixture(autouse=True)
def fake_models(monkeypatch):
    for name, cls in (("ckfake", CkModel), ("ckother", OtherModel)):
        mod = types.ModuleType(f"maglens_test_{name}")
        mod.PRESETS = {"tiny": CkConfig(), "paper": CkConfig(width=5, head=Head(8))}
        mod.MODEL = cls
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        monkeypatch.setitem(registry.MODULES, name, mod.__name__)


def _model(name="ckfake", preset="tiny", **kw):
    torch.manual_seed(1)
    return registry.create(name, preset, **kw)


def test_round_trip_keeps_everything(tmp_path):
    m = _model(preset="paper", classes=["a", "b", "c"], scales=(3, 4))
    m.steps += 7
    # Optimizer-shaped state (building a real optimizer costs seconds of imports).
    opt_state = {"state": {0: {"momentum_buffer": torch.randn(4, 5)}},
                 "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1, 2, 3]}]}
    sched_state = {"step_size": 2, "last_epoch": 3, "_last_lr": [0.05]}
    train = {"epoch": 2, "best": None, "history": [{"loss": 0.5}], "seed": 3,
             "torch_rng": torch.get_rng_state()}
    path = save_checkpoint(tmp_path / "sub" / "m.pt", m, train=train, optimizer=opt_state,
                           scheduler=sched_state, extra={"note": "x"})
    d = load_checkpoint(path)
    assert d["format"] == ck.CHECKPOINT_FORMAT and d["model"] == "ckfake" and d["preset"] == "paper"
    assert d["config"] == dataclasses.asdict(m.config) and d["classes"] == ["a", "b", "c"]
    assert d["train"]["epoch"] == 2 and torch.equal(d["train"]["torch_rng"], train["torch_rng"])
    assert d["extra"] == {"note": "x"}
    assert torch.equal(d["optimizer"]["state"][0]["momentum_buffer"], opt_state["state"][0]["momentum_buffer"])
    assert d["optimizer"]["param_groups"] == opt_state["param_groups"] and d["scheduler"] == sched_state

    m2 = model_from_checkpoint(path, expect_model="ckfake")
    assert type(m2) is CkModel and m2.preset == "paper" and m2.classes == ["a", "b", "c"]
    assert m2.config == m.config  # nested dataclass and tuple restored
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint_sha256(path) == sha == m2.checkpoint_sha256
    assert model_from_checkpoint(d).checkpoint_sha256 is None
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temp files left


def test_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "m.pt", _model())
    before = path.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"PK\x03\x04half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _model(preset="paper"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_a_model_without_a_name_is_refused(tmp_path):
    class Anonymous(SlideModel):
        pass

    with pytest.raises(CheckpointError, match="no registry name"):
        save_checkpoint(tmp_path / "x.pt", Anonymous(CkConfig()))
    assert not (tmp_path / "x.pt").exists()


class _Payload:
    """Unpickling this would create ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _bad_files(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    marker = tmp / "pwned"
    files: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, msg: str) -> None:
        p = tmp / name
        p.write_bytes(data)
        files[name] = (p, msg)

    put("empty.pt", b"", "empty")
    put("truncated.pt", good.read_bytes()[: good.stat().st_size // 2], "damaged")
    put("text.pt", b"hello, not weights\n", "not a PyTorch checkpoint")
    put("pickle.pt", pickle.dumps(_Payload(marker), protocol=2), "refused")
    evil = tmp / "evil.pt"
    torch.save({"format": 1, "model": "ckfake", "payload": _Payload(marker)}, evil)
    files["evil.pt"] = (evil, "refused")
    bare = tmp / "bare.pt"
    torch.save(_model().state_dict(), bare)
    files["bare.pt"] = (bare, "bare weights")
    listed = tmp / "list.pt"
    torch.save([torch.ones(2)], listed)
    files["list.pt"] = (listed, "not a MagLens checkpoint")
    d = load_checkpoint(good)
    for name, change, msg in (("future.pt", {"format": 99}, "format 99"),
                              ("noclasses.pt", {"classes": []}, "classes"),
                              ("nostate.pt", {"state_dict": None}, "state_dict")):
        p = tmp / name
        torch.save({**d, **change}, p)
        files[name] = (p, msg)
    files["missing.pt"] = (tmp / "missing.pt", "no such")
    files["folder"] = (tmp, "folder")
    return files


def test_every_bad_file_gives_one_clear_error_and_runs_no_code(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", _model())
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, (path, msg) in _bad_files(bad, good).items():
        for loader in (load_checkpoint, model_from_checkpoint):
            with pytest.raises(CheckpointError, match=msg) as info:
                loader(path)
            assert "\n" not in str(info.value), name
    assert not (bad / "pwned").exists()


def test_wrong_model_and_mismatched_weights_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", _model())
    with pytest.raises(CheckpointError, match="'ckfake', not of 'ckother'"):
        model_from_checkpoint(path, expect_model="ckother")
    d = load_checkpoint(path)
    shapes = {**d, "state_dict": {**d["state_dict"], "body.weight": torch.zeros(9, 9)}}
    with pytest.raises(CheckpointError, match="weights do not fit model 'ckfake'"):
        model_from_checkpoint(shapes)
    missing = {**d, "state_dict": {k: v for k, v in d["state_dict"].items() if k != "out.bias"}}
    with pytest.raises(CheckpointError, match="out.bias"):
        model_from_checkpoint(missing)
    with pytest.raises(CheckpointError, match="does not have"):
        model_from_checkpoint({**d, "model": "no_such_model"})
    with pytest.raises(CheckpointError, match="does not fit this version"):
        model_from_checkpoint({**d, "config": {**d["config"], "retired_setting": 1}})


def test_rebuild_needs_no_pretrained_weights_file_and_keeps_unknown_presets(tmp_path):
    m = _model(backbone_weights=None)
    m.preset = "custom"
    d = load_checkpoint(save_checkpoint(tmp_path / "m.pt", m))
    d["config"]["backbone_weights"] = str(tmp_path / "gone.pth")  # deleted since training
    m2 = model_from_checkpoint(d)
    assert m2.preset == "custom" and m2.config.backbone_weights is None
    assert torch.equal(m2.body.weight, m.body.weight)


def _real_model_names() -> list[str]:
    names = []
    for name in registry.list_models():
        try:
            importlib.import_module(registry.MODULES[name])
            names.append(name)
        except Exception:  # noqa: BLE001 - models still being written count as absent
            pass
    return names


@pytest.mark.parametrize("name", registry.list_models())
def test_real_tiny_models_round_trip(tmp_path, name):
    if name not in _real_model_names():
        pytest.skip(f"{name} is not available yet")
    torch.manual_seed(0)
    m = registry.create(name, "tiny", classes=["x", "y", "z"])
    path = save_checkpoint(tmp_path / f"{name}.pt", m)
    m2 = model_from_checkpoint(path, expect_model=name)
    assert type(m2) is type(m) and m2.config == m.config and m2.classes == ["x", "y", "z"]
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_numpy_and_paths_are_stored_as_plain_data_and_objects_refused(tmp_path):
    import numpy as np

    train = {"auroc": np.float64(0.75), "epoch": np.int64(3), "counts": np.arange(3),
             "out": tmp_path / "run", "pair": (np.float32(0.5), None)}
    d = load_checkpoint(save_checkpoint(tmp_path / "m.pt", _model(), train=train))
    t = d["train"]
    assert type(t["auroc"]) is float and t["auroc"] == 0.75 and type(t["epoch"]) is int
    assert torch.equal(t["counts"], torch.arange(3)) and t["out"] == str(tmp_path / "run")
    assert t["pair"] == (0.5, None)
    with pytest.raises(CheckpointError, match=r"train.history\[0\] of type object"):
        save_checkpoint(tmp_path / "bad.pt", _model(), train={"history": [object()]})
    assert not (tmp_path / "bad.pt").exists()
