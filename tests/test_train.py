"""The training engine: manifests checked row by row, epochs with metrics and atomic
checkpoints, exact resume after a stop, fine-tuning, cancel."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engines import registry
from engines.data import ManifestError, read_manifest
from engines.train import TrainConfig, TrainControl, StepEvent, EpochEvent, auroc, train


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    monkeypatch.setitem(registry.MODULES, "fake", "tests.fake_model")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Eight tiny slides: reddish 'tumor', bluish 'normal'."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        label = "tumor" if i % 2 else "normal"
        base = np.array([200, 80, 90] if label == "tumor" else [90, 90, 200], float)
        img = np.clip(base + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"s{i}.png")
        rows.append((f"s{i}.png", label, "val" if i >= 6 else "train"))
    with open(d / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "label", "split"])
        w.writerows(rows)
    return d / "manifest.csv"


def _cfg(manifest, out, **kw):
    base = dict(manifest=str(manifest), model="fake", out=str(out), epochs=3, lr=0.05, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_bad_manifests_are_reported_row_by_row(tmp_path, manifest):
    (tmp_path / "a.png").write_bytes((manifest.parent / "s0.png").read_bytes())
    (tmp_path / "junk.png").write_text("not an image")
    m = tmp_path / "m.csv"
    m.write_text("slide,label,split\na.png,normal,train\nmissing.png,tumor,train\n"
                 "junk.png,tumor,train\na.png,tumor,holdout\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(m)
    text = str(err.value)
    assert "row 2: missing.png: file not found" in text
    assert "row 3: junk.png" in text
    assert "row 4" in text and "unknown split 'holdout'" in text
    m.write_text("path,class\na.png,normal\n")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(m)
    m.write_text("slide,label\na.png,normal\na.png,normal\n")
    with pytest.raises(ManifestError, match="only one class"):
        read_manifest(m)


def test_manifest_without_split_gets_a_seeded_split(tmp_path, manifest):
    m = tmp_path / "m.csv"
    lines = ["slide,label"] + [f"{manifest.parent / f's{i}.png'},{'tumor' if i % 2 else 'normal'}" for i in range(8)]
    m.write_text("\n".join(lines))
    a, b = read_manifest(m, seed=4), read_manifest(m, seed=4)
    assert [s.split for s in a.samples] == [s.split for s in b.samples]
    assert {s.split for s in a.samples} >= {"train", "val"}


def test_training_learns_and_writes_run_folder(tmp_path, manifest, monkeypatch):
    import engines.train as train_module

    fixed = []  # a CPU run fixes glibc's mmap threshold (engines.hostmem)
    monkeypatch.setattr(train_module, "return_large_frees_to_os", lambda: fixed.append(1) or True)
    events = []
    res = train(_cfg(manifest, tmp_path / "run", epochs=4), on_event=events.append)
    assert fixed == [1]
    assert res.epochs_done == 4 and not res.cancelled
    for name in ("last.pt", "best.pt", "config.json", "metrics.jsonl", "train.log"):
        assert (tmp_path / "run" / name).exists(), name
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"train_loss", "val_loss", "val_accuracy", "val_auroc"} <= set(rows[0])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["val_auroc"] == 1.0 and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert any(isinstance(e, StepEvent) and e.eta_s is not None for e in events)
    assert sum(isinstance(e, EpochEvent) for e in events) == 4
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ck["model"] == "fake" and ck["classes"] == ["normal", "tumor"]


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, manifest):
    full = train(_cfg(manifest, tmp_path / "full"))
    # Stop in the middle of epoch 2, then resume.
    control = TrainControl()
    seen = {"n": 0}

    def stop_mid_run(ev):
        if isinstance(ev, StepEvent):
            seen["n"] += 1
            if seen["n"] == 8:  # 6 train slides per epoch: this is epoch 2, step 2
                control.cancel()

    part = train(_cfg(manifest, tmp_path / "part"), on_event=stop_mid_run, control=control)
    assert part.cancelled and part.epochs_done == 1
    resumed = train(_cfg(manifest, tmp_path / "part", resume=True))
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history], rel=1e-6)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_fine_tune_from_checkpoint_with_frozen_backbone(tmp_path, manifest):
    train(_cfg(manifest, tmp_path / "base", epochs=1))
    init = tmp_path / "base" / "best.pt"
    train(_cfg(manifest, tmp_path / "ft", epochs=1, init=str(init), freeze_backbone=True))
    a = torch.load(init, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(a["backbone.weight"], b["backbone.weight"])  # frozen
    assert not torch.equal(a["head.weight"], b["head.weight"])  # trained


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.random(30).round(1)  # ties on purpose
    y = rng.integers(0, 2, 30)
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert auroc(list(s), list(y)) == pytest.approx(np.mean(pairs))


def test_best_checkpoint_prefers_auroc_then_lower_validation_loss():
    from engines.train import _selection_key

    tied_low = _selection_key({"val_auroc": 1.0, "val_loss": 0.05, "train_loss": 1.0})
    tied_high = _selection_key({"val_auroc": 1.0, "val_loss": 0.6, "train_loss": 1.0})
    assert tied_low > tied_high  # a perfect split more than once: the more confident epoch
    worse_auc = _selection_key({"val_auroc": 35 / 36, "val_loss": 0.0, "train_loss": 1.0})
    assert tied_high > worse_auc  # the loss never outweighs one pair of 6 x 6 slides
    no_auc = _selection_key({"val_auroc": float("nan"), "val_loss": 0.3, "train_loss": 1.0})
    assert no_auc == -0.3
