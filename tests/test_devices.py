"""Devices: how a device spec resolves, which process-group backend goes with it, that every
model makes its tensors on its own device, and that training on the CPU writes CPU
checkpoints while a missing GPU is refused with one clear line. All of it runs on the CPU;
where a GPU must be seen, ``torch.cuda`` is patched and no tensor is moved there."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
import torch.distributed as dist

from app import cli
from engines import devices, registry
from engines.checkpoint import iter_tensors
from engines.devices import check_device_spec, dist_backend, resolve_device
from tests.test_train import manifest  # noqa: F401 - the module-scoped manifest fixture

NO_GPU = "CUDA was asked for but torch sees no GPU"


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setitem(registry.MODULES, "fake", "tests.fake_model")


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch reports two GPUs (nothing may actually be moved to them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)


# -- resolve_device ------------------------------------------------------------------------
def test_auto_and_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1", "CUDA", torch.device("cuda", 0)])
def test_cuda_without_a_gpu_is_a_readable_value_error(no_gpu, spec):
    with pytest.raises(ValueError) as err:
        resolve_device(spec)
    msg = str(err.value)
    assert NO_GPU in msg and "cpu" in msg and "\n" not in msg


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "cpu:0", "auto:1", "", "mps", "cuda:0:1",
                                  "cuda 0", "cuda:\u0661"])
def test_bad_device_strings_are_value_errors(spec):
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device(spec)
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        check_device_spec(spec)


def test_auto_with_gpus_takes_this_process_s_gpu(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)  # an index wins
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees only 2 GPU"):
        resolve_device("auto", local_rank=2)  # a third process on a two-GPU node


def test_gpu_index_out_of_range(two_gpus):
    with pytest.raises(ValueError) as err:
        resolve_device("cuda:2")
    assert "out of range" in str(err.value) and "cuda:0 to cuda:1" in str(err.value)
    with pytest.raises(ValueError, match="out of range"):
        resolve_device("cuda", local_rank=5)


def test_local_rank_comes_from_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.local_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert devices.local_rank() == 3


def test_cuda_device_choices(no_gpu):
    assert devices.cuda_device_choices() == []


def test_cuda_device_choices_with_gpus(two_gpus):
    assert devices.cuda_device_choices() == [("GPU 0 (cuda:0)", "cuda:0"), ("GPU 1 (cuda:1)", "cuda:1")]


# -- process-group backend -----------------------------------------------------------------
def test_backend_is_gloo_on_the_cpu(two_gpus):
    assert dist_backend(torch.device("cpu")) == "gloo"
    assert dist_backend("cpu") == "gloo"


def test_backend_is_nccl_beside_gloo_on_a_gpu(two_gpus):
    assert dist_backend(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"


def test_backend_falls_back_to_gloo_without_cuda_or_nccl(no_gpu, monkeypatch):
    assert dist_backend(torch.device("cuda", 0)) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)  # e.g. Windows builds
    assert dist_backend(torch.device("cuda", 0)) == "gloo"


def _fake_group(monkeypatch):
    from engines import train as train_mod

    calls: dict[str, list] = {"init": [], "set_device": []}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train_mod.dist, "init_process_group", lambda backend, **kw: calls["init"].append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    return train_mod, calls


def test_init_distributed_uses_gloo_for_cpu_training(two_gpus, monkeypatch):
    train_mod, calls = _fake_group(monkeypatch)
    train_mod.init_distributed("cpu")
    assert calls == {"init": ["gloo"], "set_device": []}


def test_init_distributed_sets_the_gpu_then_joins_with_nccl(two_gpus, monkeypatch):
    train_mod, calls = _fake_group(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "1")
    train_mod.init_distributed()  # auto
    assert calls == {"init": ["cpu:gloo,cuda:nccl"], "set_device": [torch.device("cuda", 1)]}


def test_init_distributed_without_a_gpu_stays_on_gloo(no_gpu, monkeypatch):
    train_mod, calls = _fake_group(monkeypatch)
    train_mod.init_distributed("auto")
    assert calls == {"init": ["gloo"], "set_device": []}
    with pytest.raises(ValueError, match=NO_GPU):
        train_mod.init_distributed("cuda")


# -- models make their tensors on their own device -----------------------------------------
@pytest.fixture(scope="module")
def synth_slide(tmp_path_factory):
    from engines.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, slides=2, seed=1, cfg=SynthConfig(size=1024))
    return sorted(out.glob("synth_*.tiff"))[0]


def test_slide_model_device_is_its_weights_device():
    m = registry.create("fake", "tiny")
    assert m.device == torch.device("cpu")
    m.to("meta")
    assert m.device == torch.device("meta")
    from engines.models.base import SlideModel

    assert SlideModel(None).device == torch.device("cpu")  # no weights at all


@pytest.mark.parametrize("name", ["magnet", "spatial_mag", "zoom_in", "grid_attention", "local_learning"])
def test_models_make_no_tensor_off_their_device(name, synth_slide):
    """Under ``torch.device("meta")`` every tensor made without an explicit device lands on
    the meta device, while the model, its pixels and what it makes on purpose stay on the CPU.
    A constant made without ``device=`` (which would sit on the CPU beside a model on a GPU)
    then meets the CPU tensors and fails, as it would on a GPU; a CPU draw turned into Python
    numbers must say ``device="cpu"``. A training step (with backward) and an explanation run."""
    from engines.sampling import Orientation, SlideView
    from engines.slide import Slide

    torch.manual_seed(0)
    model = registry.create(name, "tiny")
    with Slide(synth_slide) as slide, torch.device("meta"):
        model.train()
        out = model.training_step(SlideView(slide, orientation=Orientation(True, 1)), 1, epoch=100)
        out.loss.backward()
        model.eval()
        with torch.no_grad():
            probs = model.explain(SlideView(slide), lambda e: None)
    assert out.loss.device.type == "cpu" and out.logits.device.type == "cpu"
    assert len(probs) == 2 and all(math.isfinite(p) for p in probs)
    assert all(p.grad is None or p.grad.device.type == "cpu" for p in model.parameters())


def test_infer_run_moves_the_model_and_refuses_a_missing_gpu(synth_slide, no_gpu):
    from engines import infer

    model = registry.create("fake", "tiny")
    trace = infer.run(model, synth_slide, device="cpu")
    assert model.device == torch.device("cpu") and len(trace.probs) == 2
    with pytest.raises(ValueError, match=NO_GPU):
        infer.run(model, synth_slide, device="cuda")


# -- training on a device ------------------------------------------------------------------
def _quiet(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def test_cli_train_on_the_cpu_writes_cpu_checkpoints(manifest, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    rc, out, err = _quiet("train", manifest, "--model", "fake", "--epochs", 1, "--out", run,
                          "--threads", 1, "--device", "cpu")
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["device"] == "cpu"
    assert "device cpu" in (run / "train.log").read_text()
    for name in ("last.pt", "best.pt"):
        # No map_location: a tensor saved from a GPU would come back on it (or fail to load).
        ck = torch.load(run / name, weights_only=True)
        found = list(iter_tensors(ck))
        assert any(p.startswith("ckpt.state_dict.") for p, _ in found)
        assert any(p.startswith("ckpt.optimizer.state") for p, _ in found)
        off = [p for p, t in found if t.device.type != "cpu"]
        assert not off, off


def test_a_mid_epoch_stop_on_the_cpu_saves_no_cuda_rng(manifest, tmp_path):  # noqa: F811
    from engines.train import StepEvent, TrainConfig, TrainControl, train

    control = TrainControl()

    def stop(ev):
        if isinstance(ev, StepEvent) and ev.step == 2:
            control.cancel()

    cfg = TrainConfig(manifest=str(manifest), model="fake", out=str(tmp_path / "run"), epochs=2, device="cpu")
    assert train(cfg, on_event=stop, control=control).cancelled
    tr = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train"]
    assert tr["step"] == 2 and isinstance(tr["torch_rng"], torch.Tensor) and "cuda_rng" not in tr


def test_train_config_asking_for_a_missing_gpu_fails_before_any_file(manifest, tmp_path, no_gpu):  # noqa: F811
    from engines.train import TrainConfig, train

    with pytest.raises(ValueError, match=NO_GPU):
        train(TrainConfig(manifest=str(manifest), model="fake", out=str(tmp_path / "run"), device="cuda"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cmd", ["train", "infer"])
def test_cli_device_cuda_without_a_gpu_is_one_clean_line(cmd, manifest, tmp_path, no_gpu):  # noqa: F811
    run = tmp_path / "run"
    if cmd == "train":
        args = ["train", manifest, "--model", "fake", "--epochs", 1, "--out", run, "--device", "cuda"]
    else:
        args = ["infer", manifest.parent / "s0.png", "--model", "fake", "--device", "cuda:0"]
    rc, out, err = _quiet(*args)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"maglens {cmd}: error: ") and NO_GPU in lines[0]
    assert not run.exists()


def test_cli_bad_device_spelling_is_one_clean_line(manifest, tmp_path):  # noqa: F811
    rc, _, err = _quiet("train", manifest, "--model", "fake", "--out", tmp_path / "run", "--device", "gpu")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "unknown device 'gpu'" in err, err


def test_gpu_check_without_cuda_prints_cuda_false(no_gpu, capsys):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 0
    assert json.loads(capsys.readouterr().out) == {"cuda": False}


def test_cli_infer_on_the_cpu(manifest, tmp_path):  # noqa: F811
    out = tmp_path / "trace.json"
    rc, stdout, err = _quiet("infer", manifest.parent / "s1.png", "--model", "fake", "--device", "cpu", "--out", out)
    assert rc == 0, err
    assert "prediction:" in stdout and len(json.loads(out.read_text())["probs"]) == 2


def test_the_viewer_runs_models_on_auto_unless_told(monkeypatch):
    from app.run_controller import inference_device

    monkeypatch.delenv("MAGLENS_DEVICE", raising=False)
    assert inference_device() == "auto"
    monkeypatch.setenv("MAGLENS_DEVICE", "cpu")
    assert inference_device() == "cpu"
