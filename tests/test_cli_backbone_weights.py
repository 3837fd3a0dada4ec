"""``--backbone-weights``: a local ImageNet weights file starts an untrained model's backbone;
models or presets without such a backbone, and unreadable files, are refused in one line."""
from __future__ import annotations

import pytest
import torch
import torchvision

from app import cli
from engines import registry
from tests.conftest import DATA, DEMO_SLIDE


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision-shaped resnet18 state dict with a recognisable first filter."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], 0.125)
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(state, path)
    return path


def call(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_weights_file_reaches_the_backbone(resnet18_file):
    overrides = cli.backbone_overrides("grid_attention", "paper", str(resnet18_file))
    model = registry.create("grid_attention", "paper", **overrides)
    conv1 = next(p for n, p in model.named_parameters() if n.endswith("0.weight") and p.shape[1] == 3)
    assert torch.all(conv1 == 0.125)
    fresh = registry.create("grid_attention", "paper")
    conv1_fresh = next(p for n, p in fresh.named_parameters() if n.endswith("0.weight") and p.shape[1] == 3)
    assert not torch.all(conv1_fresh == 0.125)


def test_infer_runs_with_local_backbone_weights(capsys, resnet18_file):
    rc, out, err = call(capsys, "infer", DATA / "small.svs", "--model", "grid_attention",
                        "--preset", "paper", "--backbone-weights", resnet18_file)
    assert rc == 0, err
    assert "prediction:" in out


@pytest.mark.parametrize("args, words", [
    (["--model", "zoom_in"], "no pretrained backbone"),
    (["--model", "grid_attention", "--preset", "tiny"], "small CNN"),
    (["--model", "grid_attention", "--preset", "paper", "--backbone-weights", "/nonexistent/w.pth"], "no such file"),
])
def test_models_without_a_backbone_and_missing_files_are_refused(capsys, resnet18_file, args, words):
    if "--backbone-weights" not in args:
        args = [*args, "--backbone-weights", str(resnet18_file)]
    rc, _out, err = call(capsys, "infer", DEMO_SLIDE, *args)
    assert rc == 2
    assert words in err and len(err.strip().splitlines()) == 1


def test_unreadable_weights_file_is_bad_input(capsys, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a weights file")
    rc, _out, err = call(capsys, "infer", DATA / "small.svs", "--model", "grid_attention",
                         "--preset", "paper", "--backbone-weights", junk)
    assert rc == 2
    assert "junk.pth" in err and len(err.strip().splitlines()) == 1


def test_weights_with_a_checkpoint_or_resume_are_refused(capsys, resnet18_file, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide,label\n")
    rc, _out, err = call(capsys, "train", manifest, "--model", "grid_attention", "--preset", "paper",
                         "--resume", "--out", tmp_path, "--backbone-weights", resnet18_file)
    assert rc == 2 and "starts a new model" in err


def test_a_weights_file_in_the_torch_hub_cache_is_never_picked_up(tmp_path, monkeypatch):
    """Only a file the user names loads: the same model everywhere, whatever a cache holds."""
    import torch
    import torchvision

    from engines import registry
    from engines.models import backbones

    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cache / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(0)
    net = registry.create("grid_attention", "paper").trunk.stem[0]  # resnet18's conv1
    torch.manual_seed(0)
    fresh = torchvision.models.resnet18(weights=None)
    assert torch.equal(net.weight, fresh.conv1.weight)  # random init, not the cached file
    named = backbones.load_weights(backbones.build("resnet18"), "resnet18", cache / "resnet18-f37072fd.pth")
    cached = torch.load(cache / "resnet18-f37072fd.pth", weights_only=True)
    assert torch.equal(named.conv1.weight, cached["conv1.weight"])


def test_constructors_open_no_files_and_the_registry_loads_what_the_config_names(tmp_path, monkeypatch):
    """As timm's builders do: the model class only builds; ``registry.create`` opens the
    weights file the config names, and every layer cut from that network gets its weights."""
    import torch
    import torchvision

    from engines import registry
    from engines.models.grid_attention import GridAttention
    from engines.registry import config_for

    torch.manual_seed(3)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    opened = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    GridAttention(config_for("grid_attention", "paper", backbone_weights=str(weights)))
    assert opened == []  # the constructor alone reads nothing
    model = registry.create("grid_attention", "paper", backbone_weights=str(weights))
    assert opened == [weights]
    state = real(weights, weights_only=True)
    assert torch.equal(model.trunk.stem[0].weight, state["conv1.weight"])
    assert torch.equal(model.trunk.tail[0].conv1.weight, state["layer4.0.conv1.weight"])
