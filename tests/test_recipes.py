"""Training recipes: a paper preset trains with its paper's optimiser settings and schedule,
values the user gives win, a resume keeps the run's, and the dialog shows what will train."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engines import recipes, registry
from engines.recipes import Recipe, recipe_for
from engines.train import TrainConfig, fill_recipe, make_scheduler, step_scheduler, train
from tests.test_train import manifest  # noqa: F401 - the module-scoped manifest fixture


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    monkeypatch.setitem(registry.MODULES, "fake", "tests.fake_model")


def _lrs(cfg: TrainConfig, epochs: int, metrics=None) -> list[float]:
    """The learning rate each epoch trains with under ``cfg``'s schedule."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg)
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        step_scheduler(sched, (metrics or (lambda _e: {}))(e))
    return out


def test_every_paper_preset_has_a_recipe_and_small_presets_keep_the_short_default():
    for name in ("magnet", "spatial_mag", "zoom_in", "grid_attention", "local_learning"):
        assert recipe_for(name, "paper") is recipes.PAPER[name]
        assert recipe_for(name, "tiny") is recipes.DEFAULT
        assert recipes.PAPER[name].source  # every figure says where it comes from


def test_grid_attention_decays_per_epoch_and_restarts_at_its_absolute_rate():
    cfg = TrainConfig(manifest="m.csv", model="grid_attention", preset="paper")
    cfg = fill_recipe(cfg, registry.create("fake", "paper"))
    lrs = _lrs(cfg, 102)
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[49] == pytest.approx(1e-3 * 0.95 ** 49)
    assert lrs[50] == pytest.approx(1e-4)  # reset to 1e-4, not back to 1e-3
    assert lrs[101] == pytest.approx(1e-4 * 0.95 ** 1)


def test_plateau_divides_after_patience_epochs_without_a_better_validation_accuracy():
    cfg = TrainConfig(manifest="m.csv", model="spatial_mag", preset="paper")
    cfg = fill_recipe(cfg, registry.create("fake", "paper"))
    assert (cfg.lr, cfg.scheduler, cfg.epochs) == (1e-4, "plateau", 100)
    lrs = _lrs(cfg, 40, metrics=lambda e: {"val_accuracy": 0.5 if e else 0.6})
    assert lrs[25] == pytest.approx(1e-4)
    assert lrs[27] == pytest.approx(1e-5)


def test_zoom_in_steps_and_clips_and_a_value_given_wins():
    cfg = fill_recipe(TrainConfig(manifest="m.csv", model="zoom_in", preset="paper"),
                      registry.create("fake", "paper"))
    assert cfg.clip == 5.0 and cfg.weight_decay == 1e-4
    lrs = _lrs(cfg, 61)
    assert lrs[29] == pytest.approx(1e-4) and lrs[30] == pytest.approx(8e-5) and lrs[60] == pytest.approx(6.4e-5)
    mine = fill_recipe(TrainConfig(manifest="m.csv", model="zoom_in", preset="paper", lr=0.01, clip=0.0),
                       registry.create("fake", "paper"))
    assert mine.lr == 0.01 and mine.clip is None and mine.scheduler == "step"


def test_the_trainer_uses_the_paper_recipe(tmp_path, manifest, monkeypatch):  # noqa: F811
    """A fake model's paper preset with a step schedule and a clip tiny enough to stop it
    learning: the run's metrics follow the schedule and the weights barely move."""
    monkeypatch.setitem(recipes.PAPER, "fake",
                        Recipe("adam", 0.05, 0.0, "step", 3, 1, clip=1e-9, step_epochs=1, step_gamma=0.5,
                               source="test"))
    res = train(TrainConfig(manifest=str(manifest), model="fake", preset="paper", out=str(tmp_path / "a"), seed=1))
    assert len(res.history) == 3  # the recipe's epochs
    assert [h["lr"] for h in res.history] == pytest.approx([0.025, 0.0125, 0.00625])
    run = json.loads((tmp_path / "a" / "config.json").read_text())
    assert run["scheduler"] == "step" and run["clip"] == 1e-9
    clipped = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    free = train(TrainConfig(manifest=str(manifest), model="fake", preset="paper", out=str(tmp_path / "b"),
                             seed=1, clip=0.0))
    unclipped = torch.load(free.out / "last.pt", weights_only=True)["state_dict"]
    start = registry.create("fake", "paper").state_dict()  # same shapes; compare movement
    moved = {k: float((clipped[k] - unclipped[k]).abs().max()) for k in clipped if k in start}
    assert max(moved.values()) > 1e-3  # without the clip the weights went elsewhere


def test_resume_keeps_the_runs_schedule_and_refuses_another(tmp_path, manifest):  # noqa: F811
    from engines.train import resume_config

    out = tmp_path / "run"
    train(TrainConfig(manifest=str(manifest), model="fake", out=str(out), epochs=1, lr=0.05, seed=1))
    again = resume_config(TrainConfig(manifest=str(manifest), model="fake", out=str(out), resume=True))
    assert again.lr == 0.05 and again.scheduler == "cosine" and again.epochs == 1
    more = resume_config(TrainConfig(manifest=str(manifest), model="fake", out=str(out), resume=True, epochs=3))
    assert more.epochs == 3
    with pytest.raises(ValueError, match="lr 0.1 differs from the run's 0.05"):
        resume_config(TrainConfig(manifest=str(manifest), model="fake", out=str(out), resume=True, lr=0.1))


def test_cli_takes_schedule_options_and_refuses_bad_ones(tmp_path, manifest):  # noqa: F811
    bad = subprocess.run([sys.executable, "-m", "app", "train", str(manifest), "--model", "magnet",
                          "--scheduler", "linear"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'linear'" in bad.stderr
    neg = subprocess.run([sys.executable, "-m", "app", "train", str(manifest), "--model", "magnet",
                          "--clip", "-1"], capture_output=True, text=True, timeout=120)
    assert neg.returncode == 2 and "must be a number of 0 or more" in neg.stderr
