"""Cohort inference figures, printed as JSON: the per-slide overhead of ``maglens infer`` over
the model's own time, and the speed-up of ``--workers 2`` over 1 on synthetic slides (64 of 4096 px:
the spawned worker's start-up is a fixed cost, so small cohorts show less).

    python benchmarks/cohort_bench.py [--slides 64] [--size 4096] [--model magnet] [--only project|infer]

``--only project`` prints the engine's project figures alone: opening a folder, a manifest and
a saved project file of 2,000 slides (``project_open_s``: the manifest's project file with a
run's 2,000 results), and saving it.
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


def _best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def project_figures(n: int = 2000) -> dict:
    """Seconds to open ``n`` slides as a project (no slide is read) and to save it."""
    from engines.cohort import SlideResult
    from engines.project import ProjectRun, open_project

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "slides"
        folder.mkdir()
        for i in range(n):
            (folder / f"slide_{i:05d}.svs").write_bytes(b"")
            if i % 2:
                (folder / f"slide_{i:05d}.geojson").write_bytes(b"{}")
        manifest = root / "cohort.csv"
        manifest.write_text("slide,label,split\n" + "".join(
            f"slides/slide_{i:05d}.svs,{'tumor' if i % 3 else 'normal'},test\n" for i in range(n)))
        folder_s = _best_of(lambda: open_project(folder))
        manifest_s = _best_of(lambda: open_project(manifest))
        project = open_project(manifest)
        classes = ["normal", "tumor"]
        project.add_run(ProjectRun("magnet tiny", "magnet", "tiny", None, root / "run", classes, {
            s.key: SlideResult(s.name, s.key, s.label, s.split, {"model": "magnet"}, None, classes,
                               [0.3, 0.7], "tumor", 1.0, 0.9, ratio=1.5, dice=0.2, scored={})
            for s in project.slides}))
        save_s = _best_of(project.save)
        open_s = _best_of(lambda: open_project(manifest))  # opens the saved project file
        assert len(open_project(manifest).run("magnet tiny").results) == n
        return {"slides": n, "project_open_s": round(open_s, 4),
                "project_file_bytes": project.path.stat().st_size,
                "folder_open_s": round(folder_s, 4), "manifest_open_s": round(manifest_s, 4),
                "project_save_s": round(save_s, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=64)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--model", default="magnet")
    ap.add_argument("--only", choices=("project", "infer"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.only == "project":
        print(json.dumps(project_figures(), indent=2))
        return
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
            **({"project": project_figures()} if args.only is None else {}),
        }, indent=2))


if __name__ == "__main__":
    main()
