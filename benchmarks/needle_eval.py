"""Evaluate checkpoints on the held-out test split of a synthetic needle set, as JSON.

    PYTHONPATH=. python benchmarks/needle_eval.py --data DIR [--checkpoints resources/checkpoints]
        [--models magnet,...]

For each model with ``<checkpoints>/<model>.pt``: runs it (``engines.infer.run``) on every
``test`` slide of ``DIR/manifest.csv`` and prints ``{"models": {NAME: {"accuracy", "auroc",
"auroc_ci95", "ratio", "dice", "train_minutes", ...}}}``. ``auroc`` is scikit-learn's, with a
seeded bootstrap 95 % interval over slides. ``ratio`` and ``dice`` are the median, IQR and
seeded bootstrap 95 % interval of the median over positive slides of
``engines.evaluate.score_attention``: the attention-in-annotation ratio within the slide's
tissue (1 = chance for attention spread evenly over the tissue) against the slide's "Tumor"
annotations (``DIR/<stem>.geojson`` as ``maglens synth`` writes them; sets made before that
fall back to the rectangles of ``DIR/needles.json``). ``train_minutes`` comes from the
``<model>.json`` that ``benchmarks/train_demos.py`` writes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engines import infer, registry  # noqa: E402
from engines.checkpoint import model_from_checkpoint  # noqa: E402
from engines.data import read_manifest  # noqa: E402
from engines.annotations import annotations_for_slide  # noqa: E402
from engines.evaluate import auroc_ci, needle_annotations, score_attention, summarise  # noqa: E402
from engines.slide import Slide  # noqa: E402
from engines.tissue import tissue_of_slide  # noqa: E402


def slide_annotations(data_dir: Path, slide_path: str | Path, needles: dict) -> list:
    """The slide's annotations: its GeoJSON when the set has one, else its needle rectangles."""
    found = annotations_for_slide(data_dir, slide_path)
    if found is not None:
        return list(found)
    return needle_annotations(needles.get(Path(slide_path).name, []))


def evaluate(name: str, ckpt: Path, data_dir: Path, positive: str = "tumor",
             split: str = "test") -> dict:
    data = read_manifest(data_dir / "manifest.csv")
    needles_file = data_dir / "needles.json"
    needles = json.loads(needles_file.read_text()) if needles_file.exists() else {}
    model = model_from_checkpoint(ckpt, expect_model=name)
    classes = list(model.classes)
    if positive not in classes:
        raise SystemExit(f"{ckpt}: classes {classes} have no {positive!r}")
    pos = classes.index(positive)
    scores, labels, correct, ratios, dices, model_s = [], [], 0, [], [], []
    t0 = time.perf_counter()
    test = data.samples if split == "all" else data.split(split)
    for i, sample in enumerate(test):
        torch.manual_seed(i)  # the sampling models draw at random: the same draws every run
        slide = Slide(sample.path)
        try:
            trace = infer.run(model, slide)
            label = int(sample.label == positive)
            anns = slide_annotations(data_dir, sample.path, needles) if label else []
            tissue = tissue_of_slide(slide) if anns else None
        finally:
            slide.close()
        scores.append(trace.probs[pos])
        model_s.append(float(trace.timings.get("total_s", 0.0)))
        labels.append(label)
        correct += int((int(np.argmax(trace.probs)) == pos) == bool(label))
        if tissue is not None:
            score = score_attention(trace, anns, tissue, "Tumor")
            if score is not None:
                ratios.append(score.ratio)
                dices.append(score.dice)
    info_file = ckpt.with_suffix(".json")
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    auc, auc_ci = auroc_ci(scores, labels, seed=0)
    return {
        "accuracy": round(correct / max(1, len(test)), 3),
        "auroc": round(auc, 3) if auc is not None else None,
        "auroc_ci95": [round(auc_ci[0], 3), round(auc_ci[1], 3)] if auc_ci else None,
        "ratio": summarise(ratios, seed=0),
        "dice": summarise(dices, seed=0),
        "train_minutes": info.get("train_minutes"),
        "epochs": (sum(st.get("epochs_done", 0) for st in info["stages"]) if "stages" in info
                   else info.get("epochs_done")),
        "slides": len(test),
        "positives": int(sum(labels)),
        "eval_s": round(time.perf_counter() - t0, 1),
        "infer_s_per_slide": round(float(np.mean(model_s)), 2) if model_s else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder made by maglens synth")
    p.add_argument("--checkpoints", type=Path, default=ROOT / "resources" / "checkpoints")
    p.add_argument("--models", default=",".join(registry.list_models()))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--split", default="test", choices=("test", "val", "train", "all"),
                   help="rows to evaluate (default test; 'all' for a set no model trained on, "
                        "e.g. to choose between candidates on more slides than a val split)")
    a = p.parse_args(argv)
    if not (a.data / "manifest.csv").exists():
        p.error(f"{a.data} has no manifest.csv (make it with maglens synth)")
    torch.set_num_threads(a.threads)
    out: dict = {"data": str(a.data), "split": a.split, "models": {}}
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        ckpt = a.checkpoints / f"{name}.pt"
        if not ckpt.exists():
            out["models"][name] = {"error": f"no checkpoint {ckpt}"}
            continue
        out["models"][name] = evaluate(name, ckpt, a.data, split=a.split)
        print(f"{name}: {out['models'][name]}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
