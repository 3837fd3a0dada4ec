"""How fast a cancel stops a model that is decoding a whole single-level slide (JSON).

For each side (16k, 32k and 60k px single-level tiled TIFFs, written in milliseconds: every
tile entry points at the same compressed tile), a model whose first step is a thumbnail of
the whole slide runs on a thread; the cancel is set once it has decoded a few pieces, and the
time until ``infer.run`` raises ``Cancelled`` is the latency. Also: pixels decoded, and how
long a hostile file declaring 1e6 x 1e6 px takes to be refused.

    PYTHONPATH=. python benchmarks/read_cancel_bench.py [--sides 16384,32768,60000]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import infer, registry  # noqa: E402
from engines.slide import Slide, SlideError  # noqa: E402
from tests.hostile_files import tiled_slide, write_tiff  # noqa: E402


def cancel_latency(path: Path, model_name: str, pieces_before_cancel: int = 3) -> dict:
    model = registry.create(model_name, "tiny")
    with Slide(path) as slide:
        pixels: list[int] = []
        started = threading.Event()
        inner = slide._backend.read

        def read(level, x, y, w, h):
            pixels.append(w * h)
            if len(pixels) >= pieces_before_cancel:
                started.set()
            return inner(level, x, y, w, h)

        slide._backend.read = read
        cancel = threading.Event()
        result: dict = {}

        def work() -> None:
            try:
                infer.run(model, slide, cancel=cancel)
                result["outcome"] = "finished"
            except infer.Cancelled:
                result["outcome"] = "cancelled"
            except Exception as exc:  # noqa: BLE001 - reported in the JSON
                result["outcome"] = f"{type(exc).__name__}: {exc}"
            result["t_end"] = time.perf_counter()

        t0 = time.perf_counter()
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        started.wait(600)
        t_cancel = time.perf_counter()
        cancel.set()
        worker.join(600)
        return {
            "model": model_name,
            "outcome": result.get("outcome", "still running"),
            "cancel_latency_s": round(result.get("t_end", float("nan")) - t_cancel, 3),
            "time_to_first_pieces_s": round(t_cancel - t0, 3),
            "pieces_decoded": len(pixels),
            "megapixels_decoded": round(sum(pixels) / 1e6, 1),
            "slide_megapixels": round(slide.width * slide.height / 1e6, 1),
        }


def hostile_refusal(folder: Path) -> dict:
    out = {}
    for name, kw in (("tiles-65536", {"tile": 65536}), ("tiles-4096", {"tile": 4096}),
                     ("one-strip", {})):
        path = write_tiff(folder / f"giant-{name}.tif", 1_000_000, 1_000_000, data=b"\0" * 64, **kw)
        t0 = time.perf_counter()
        try:
            Slide(path).close()
            outcome = "opened"
        except SlideError as exc:
            outcome = f"refused: {exc}"
        out[name] = {"bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 4),
                     "outcome": outcome}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sides", default="16384,32768,60000")
    parser.add_argument("--models", default="spatial_mag,grid_attention")
    args = parser.parse_args()
    report: dict = {"slides": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for side in (int(s) for s in args.sides.split(",")):
            t0 = time.perf_counter()
            path = tiled_slide(folder / f"single-{side}.tif", side)
            made = time.perf_counter() - t0
            runs = [cancel_latency(path, name) for name in args.models.split(",")]
            report["slides"][str(side)] = {"file_mb": round(path.stat().st_size / 1e6, 2),
                                          "made_in_s": round(made, 3), "runs": runs}
        report["hostile_1e6"] = hostile_refusal(folder)
    lat = [r["cancel_latency_s"] for s in report["slides"].values() for r in s["runs"]]
    report["max_cancel_latency_s"] = max(lat) if lat else None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
