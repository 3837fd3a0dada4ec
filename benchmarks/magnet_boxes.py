"""Where MagNet's zoom boxes land relative to the needles, depth by depth (JSON).

For each positive slide of a freshly made needle set, every zoom box of depth d is compared
with the needles: the share of boxes that touch a needle, and the same share for boxes of the
same sizes placed at random inside their parent box (what a MagNet that ignores the image
would score). A box that finds needles better than chance at depth 1 but not at the last
depth loses them on the way down; one at chance everywhere never saw them.

    PYTHONPATH=. python benchmarks/magnet_boxes.py [--slides 24] [--size 3072] [--seed 53]
        [--checkpoint resources/checkpoints/magnet.pt]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.trace import Trace  # noqa: E402

RANDOM_DRAWS = 200  # random placements per box for the chance rate


def touches(rect, needles) -> bool:
    x, y, w, h = rect
    return any(x < nx + nw and nx < x + w and y < ny + nh and ny < y + h for nx, ny, nw, nh in needles)


def depth_rates(trace: Trace, needles, rng: np.random.Generator) -> dict[int, tuple[int, int, float]]:
    """depth -> (boxes, boxes touching a needle, expected touching boxes at random)."""
    by_id = {f.id: f for f in trace.fields}
    out: dict[int, list[float]] = {}
    for f in trace.fields:
        if f.kind != "zoom" or f.parent not in by_id:
            continue
        px, py, pw, ph = by_id[f.parent].rect
        _, _, w, h = f.rect
        xs = px + rng.uniform(0, max(pw - w, 0), RANDOM_DRAWS)
        ys = py + rng.uniform(0, max(ph - h, 0), RANDOM_DRAWS)
        chance = float(np.mean([touches((x, y, w, h), needles) for x, y in zip(xs, ys)]))
        row = out.setdefault(f.depth, [0, 0, 0.0])
        row[0] += 1
        row[1] += int(touches(f.rect, needles))
        row[2] += chance
    return {d: (int(n), int(hit), float(c)) for d, (n, hit, c) in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=24)
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--seed", type=int, default=53)
    ap.add_argument("--checkpoint", default=str(ROOT / "resources" / "checkpoints" / "magnet.pt"))
    args = ap.parse_args()

    import torch

    from engines import infer
    from engines.checkpoint import model_from_checkpoint
    from engines.slide import Slide
    from engines.synth import SynthConfig, generate

    torch.set_num_threads(1)
    model = model_from_checkpoint(args.checkpoint, expect_model="magnet")
    rng = np.random.default_rng(0)
    totals: dict[int, list[float]] = {}
    probs = {"positive": [], "negative": []}
    with tempfile.TemporaryDirectory() as tmp:
        slides = generate(Path(tmp), slides=args.slides, seed=args.seed, cfg=SynthConfig(size=args.size))
        for s in slides:
            with Slide(Path(tmp) / s.name) as slide:
                torch.manual_seed(0)
                trace = infer.run(model, slide)
            probs["positive" if s.needles else "negative"].append(trace.probs[-1])
            if not s.needles:
                continue
            for d, (n, hit, chance) in depth_rates(trace, s.needles, rng).items():
                row = totals.setdefault(d, [0, 0, 0.0])
                row[0] += n
                row[1] += hit
                row[2] += chance
    print(json.dumps({
        "slides": args.slides, "size": args.size, "seed": args.seed,
        "checkpoint": Path(args.checkpoint).name,
        "mean_p_positive": {k: round(float(np.mean(v)), 4) if v else None for k, v in probs.items()},
        "by_depth": {str(d): {"boxes": n, "touch_needle": round(hit / n, 4), "at_random": round(c / n, 4)}
                     for d, (n, hit, c) in sorted(totals.items())},
    }, indent=2))


if __name__ == "__main__":
    main()
