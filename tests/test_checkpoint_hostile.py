"""Hostile checkpoints are refused before they can allocate, run code or poison a result:
each one is a ``CheckpointError`` naming the file, and ``maglens infer`` / ``snapshot`` exit 2
with exactly one line on stderr."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app import cli
from engines import registry
from engines.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from engines.checkpoint_bounds import KEY_BOUNDS, bounds_for

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT / "tests" / "data" / "small.svs"


class Marker:
    """A class reference in the pickle: loading it would mean code from the file ran."""


def _save(path: Path, data: dict) -> Path:
    torch.save(data, path)
    return path


def _claim_huge_members(data: bytes) -> bytes:
    """The archive with its two largest members declaring ~4 GiB each in the central
    directory (what zipfile and torch read sizes from), as a forged file would."""
    eocd = data.rfind(b"PK\x05\x06")
    count, _, start = struct.unpack_from("<HII", data, eocd + 10)
    out = bytearray(data)
    entries, pos = [], start
    for _ in range(count):
        size = struct.unpack_from("<I", out, pos + 24)[0]
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", out, pos + 28)
        entries.append((size, pos))
        pos += 46 + name_len + extra_len + comment_len
    for _, at in sorted(entries, reverse=True)[:2]:
        struct.pack_into("<I", out, at + 24, 0xFFFFFFF0)
    return bytes(out)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, tuple[Path, str, str]]:
    """name -> (file, model to ask for, words the message must hold)."""
    tmp = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    good = save_checkpoint(tmp / "zoom_in.pt", registry.create("zoom_in", "tiny", classes=["a", "b"]))
    d = load_checkpoint(good)
    sd = d["state_dict"]
    first = next(k for k, v in sd.items() if v.is_floating_point())
    cases: dict[str, tuple[Path, str, str]] = {}

    def case(name: str, path: Path, model: str, words: str) -> None:
        cases[name] = (path, model, words)

    case("wrong_model", good, "magnet", "'zoom_in', not of 'magnet'")
    mag = load_checkpoint(save_checkpoint(tmp / "m.pt", registry.create("magnet", "tiny", classes=["a", "b"])))
    case("width_50000", _save(tmp / "wide.pt", {**mag, "config": {**mag["config"], "gru_hidden": 50_000}}),
         "magnet", "gru_hidden = 50000 is outside")
    sm = load_checkpoint(save_checkpoint(tmp / "s.pt", registry.create("spatial_mag", "tiny", classes=["a", "b"])))
    case("thumbnail_1e6", _save(tmp / "thumb.pt", {**sm, "config": {**sm["config"],
                                                                 "thumb_size": (1_000_000, 1_000_000)}}),
         "spatial_mag", "thumb_size = 1000000 is outside")
    case("float_size", _save(tmp / "float.pt", {**d, "config": {**d["config"], "tile_size": 1e300}}),
         "zoom_in", "tile_size must be a whole number")
    for name, value in (("nan_weights", float("nan")), ("inf_weights", float("inf"))):
        bad = {k: v.clone() for k, v in sd.items()}
        bad[first].view(-1)[0] = value
        case(name, _save(tmp / f"{name}.pt", {**d, "state_dict": bad}), "zoom_in",
             f"non-finite weights (NaN or infinity) in state_dict.{first}")
    big = tmp / "claim.pt"
    big.write_bytes(_claim_huge_members(good.read_bytes()))
    case("oversized_claim", big, "zoom_in", "GiB in memory, more than a checkpoint may hold")
    case("unknown_key", _save(tmp / "payload.pt", {**d, "payload": torch.zeros(1000)}), "zoom_in",
         "unknown key(s) payload")
    trunc = tmp / "truncated.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    case("truncated_zip", trunc, "zoom_in", "damaged or not a PyTorch checkpoint")
    junk = tmp / "junk.pt"
    junk.write_bytes(b"GIF89a" + os.urandom(4000))
    case("not_a_zip", junk, "zoom_in", "not a PyTorch checkpoint")
    case("class_reference", _save(tmp / "class.pt", {**d, "train": {"hook": Marker()}}), "zoom_in",
         "refused: it holds Python objects")
    legacy = tmp / "legacy.pt"
    torch.save(d, legacy, _use_new_zipfile_serialization=False)
    case("legacy_pickle", legacy, "zoom_in", "legacy format")
    return cases


CASES = ["wrong_model", "width_50000", "thumbnail_1e6", "float_size", "nan_weights", "inf_weights",
         "oversized_claim", "unknown_key", "truncated_zip", "not_a_zip", "class_reference", "legacy_pickle"]


@pytest.mark.parametrize("name", CASES)
def test_each_hostile_checkpoint_is_one_error_naming_the_file(hostile, name):
    path, model, words = hostile[name]
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(path, expect_model=model)
    msg = str(info.value)
    assert words in msg and path.name in msg and "\n" not in msg


@pytest.mark.parametrize("command", ["infer", "snapshot"])
@pytest.mark.parametrize("name", CASES)
def test_cli_exits_2_with_one_line(hostile, capfd, tmp_path, name, command):
    path, model, words = hostile[name]
    argv = [command, str(SLIDE), "--model", model, "--checkpoint", str(path), "--device", "cpu"]
    argv += ["--out", str(tmp_path / ("t.json" if command == "infer" else "f.png"))]
    assert cli.main(argv) == 2
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and words in lines[0] and path.name in lines[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_real_process_prints_one_line_for_nan_weights(hostile):
    path, model, words = hostile["nan_weights"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QT_QPA_PLATFORM": "offscreen"}
    env.pop("MAGLENS_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "app", "infer", str(SLIDE), "--model", model,
                           "--checkpoint", str(path), "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and words in proc.stderr, proc.stderr


def test_a_config_that_does_not_fit_its_weights_is_refused_before_allocating(hostile, monkeypatch):
    # Within bounds, but not the size the weights have: found on the meta device, so the real
    # model (which would be allocated on the CPU) is never built.
    path, _, _ = hostile["wrong_model"]
    d = load_checkpoint(path)
    built: list[str] = []
    real_create = registry.create

    def create(*args, **kw):
        built.append(str(torch.empty(0).device))
        return real_create(*args, **kw)

    monkeypatch.setattr(registry, "create", create)
    wide = {**d, "config": {**d["config"], "feature_channels": (4000, 4000)}}
    with pytest.raises(CheckpointError, match="weights do not fit model 'zoom_in'"):
        model_from_checkpoint(wide)
    assert built == ["meta"]


def test_every_size_setting_of_every_model_has_a_bound():
    """Each int setting of each model's config is bounded by its key or by a name pattern,
    and every preset (paper included) sits inside its bounds."""
    import dataclasses

    from engines.checkpoint_bounds import check_config

    for name in registry.list_models():
        for preset in registry.presets(name):
            cfg = registry.config_for(name, preset)
            values = dataclasses.asdict(cfg)
            check_config(cfg, values)
            for f in dataclasses.fields(cfg):
                v = getattr(cfg, f.name)
                ints = isinstance(v, int) and not isinstance(v, bool)
                ints |= isinstance(v, tuple) and any(isinstance(i, (int, tuple)) for i in v)
                if ints:
                    assert bounds_for(f.name) is not None, f"{name}.{f.name} has no bound"
    assert KEY_BOUNDS["thumb_size"][1] < 1_000_000


def test_shipped_checkpoints_still_pass_every_check():
    for path in sorted((ROOT / "resources" / "checkpoints").glob("*.pt")):
        model = model_from_checkpoint(path, expect_model=path.stem)
        assert model.checkpoint_sha256
