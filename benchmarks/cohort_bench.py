"""Cohort inference figures, printed as JSON: the per-slide overhead of ``maglens infer`` over
the model's own time, and the speed-up of ``--workers 2`` over 1 on small synthetic slides.

    python benchmarks/cohort_bench.py [--slides 8] [--size 1024] [--model magnet]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(manifest: Path, out: Path, model: str, workers: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # the command splits the cores itself
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "app", "infer", str(manifest), "--model", model,
                    "--out", str(out), "--workers", str(workers)],
                   check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - t0


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "traces").glob("*.result.json"))]


def _predictions(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--model", default="magnet")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from engines.synth import SynthConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "slides", slides=args.slides, seed=0, cfg=SynthConfig(size=args.size))
        manifest = root / "slides" / "manifest.csv"
        wall1 = _run(manifest, root / "w1", args.model, 1)
        wall2 = _run(manifest, root / "w2", args.model, 2)
        recs = _records(root / "w1")
        model_s = sum(r["model_s"] for r in recs)
        slide_s = sum(r["seconds"] for r in recs)
        n = len(recs)
        print(json.dumps({
            "slides": n, "size": args.size, "model": args.model,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "wall_s_workers_1": round(wall1, 3), "wall_s_workers_2": round(wall2, 3),
            "speedup_workers_2": round(wall1 / wall2, 3),
            "model_s_per_slide": round(model_s / n, 4),
            # Inside the engine: open the slide, write trace and record (not the model).
            "overhead_ms_per_slide": round(1000 * (slide_s - model_s) / n, 1),
            # The whole command (process start, torch import, model build, outputs) per slide.
            "command_overhead_ms_per_slide": round(1000 * (wall1 - model_s) / n, 1),
            "workers_2_equal_workers_1": _predictions(root / "w1") == _predictions(root / "w2"),
        }, indent=2))


if __name__ == "__main__":
    main()
