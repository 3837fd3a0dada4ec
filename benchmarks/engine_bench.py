"""Engine benchmark: inference time and peak memory of every model and preset on synthetic
10000^2 and 100000^2 slides, grid-attention tile throughput, and the training memory of the
local-learning model end to end and for K = 1, 4 and 8 modules. Prints one JSON object. Not a test.

    PYTHONPATH=. python benchmarks/engine_bench.py [--models a,b] [--presets tiny]
        [--sizes 10k,100k] [--threads N] [--timeout S]

Each measurement runs in a fresh subprocess so its peak RSS (``ru_maxrss``) belongs to that
run alone; it includes importing torch and building the model, reported separately as
``rss_base_mb_*`` (RSS just before inference). The synthetic slides (JPEG
pyramidal tiled TIFFs: stain-coloured texture in blobs on glass, 0.25 um/px) are written once
into ``benchmarks/.cache/``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / "benchmarks" / ".cache"
SIZES = {"10k": 10_000, "100k": 100_000}
MPP = 0.25
LL_MODULES = ("e2e", "1", "4", "8")


# ---------------------------------------------------------------------------------------
# Synthetic slides
# ---------------------------------------------------------------------------------------
def synthetic_slide(side: int) -> Path:
    """``engine-<side>.tiff``, generated on first use (pyvips streams; nothing is held whole)."""
    path = CACHE_DIR / f"engine-{side}.tiff"
    if path.exists() and path.stat().st_size > 0:
        return path
    import pyvips

    tex = 1024
    # Stain density: smooth noise at two scales, plus dark nucleus-like specks.
    coarse = pyvips.Image.gaussnoise(tex, tex, sigma=40, mean=128).gaussblur(12)
    fine = pyvips.Image.gaussnoise(tex, tex, sigma=30, mean=0).gaussblur(1.5)
    density = ((coarse - 128) * 0.02 + fine * 0.01 + 0.5).linear(1, 0)
    nuclei = (pyvips.Image.gaussnoise(tex, tex, sigma=50, mean=0).gaussblur(2.5) > 9).ifthenelse(1.0, 0.0)
    t = (density * 0.6 + nuclei * 0.5).linear(1, 0)
    t = (t > 1).ifthenelse(1.0, (t < 0).ifthenelse(0.0, t))
    # Eosin pink for low density, haematoxylin purple for high.
    # Computed once: replicate() would otherwise re-run the whole pipeline for every tile.
    rgb = (t * [-95, -145, -55] + [235, 195, 225]).cast("uchar").copy_memory()
    reps = -(-side // tex)
    tissue = rgb.replicate(reps, reps).crop(0, 0, side, side)
    # Tissue blobs covering roughly half the slide; the rest is glass.
    cells, fine_side = 48, 2048
    blobs = pyvips.Image.gaussnoise(cells, cells, sigma=1, mean=0, seed=7).gaussblur(2.5)
    # Smooth outline at 2048 px, then pixel-replicated (cheap) up to the slide size.
    mask = (blobs.resize(fine_side / cells, kernel="linear") > 0).copy_memory()
    zoom = -(-side // fine_side)
    mask = mask.zoom(zoom, zoom).crop(0, 0, side, side) if side > fine_side else mask.resize(side / fine_side).crop(0, 0, side, side)
    glass = [243, 243, 241]
    image = mask.ifthenelse(tissue, glass).copy(xres=1000.0 / MPP, yres=1000.0 / MPP)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    image.tiffsave(str(tmp), tile=True, pyramid=True, compression="jpeg", Q=80,
                   tile_width=256, tile_height=256, bigtiff=True, resunit="cm")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------
# Child runs (one measurement per process)
# ---------------------------------------------------------------------------------------
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def child_infer(model_name: str, preset: str, slide_path: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from engines import infer, registry

    torch.manual_seed(0)
    model = registry.create(model_name, preset)
    before = _rss_mb()
    t0 = time.perf_counter()
    trace = infer.run(model, slide_path)
    seconds = time.perf_counter() - t0
    out = {"infer_s": seconds, "rss_mb": _peak_mb(), "rss_before_mb": before,
           "fields": len(trace.fields), "maps": len(trace.maps)}
    tiles = getattr(model, "tiles_processed", None)
    if tiles:
        out["tiles"] = int(tiles)
        out["tiles_per_s"] = tiles / trace.timings["explain_s"]
    return out


def child_train(preset: str, k: str, side: int, threads: int) -> dict:
    """One local-learning training step. ``k`` is a module count, or "e2e": end-to-end training
    as the paper measures it against, one module with every layer trained, the stem too (the
    reference's un-split forward), where K = 1 keeps the stem frozen as every split does."""
    import torch

    torch.set_num_threads(threads)
    from engines import registry
    from engines.hostmem import return_large_frees_to_os

    return_large_frees_to_os()  # as the trainer does on the CPU
    torch.manual_seed(0)
    if k == "e2e":
        model = registry.create("local_learning", preset, num_modules=1, freeze_stem=False)
    else:
        model = registry.create("local_learning", preset, num_modules=int(k))
    from engines.models.backbones import normalise

    side -= side % model.unit
    x = normalise(torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)))
    x = x.contiguous(memory_format=torch.channels_last)  # as the model's slide reader gives it
    model.train()
    before = _rss_mb()
    t0 = time.perf_counter()
    model.local_step(x, 1).loss.backward()  # the trainer's own step
    return {"train_s": time.perf_counter() - t0, "peak_mb": _peak_mb(), "rss_before_mb": before,
            "train_peak_mb": _peak_mb() - before}


def _spawn(args: list[str], timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------
def _available(name: str) -> str | None:
    """None when the model imports, else why not."""
    import importlib

    from engines import registry

    if name not in registry.MODULES:
        return f"unknown model {name!r}"
    try:
        importlib.import_module(registry.MODULES[name])
        return None
    except Exception as exc:  # noqa: BLE001 - a missing or broken model is recorded, not fatal
        return f"{type(exc).__name__}: {exc}"[:300]


def bench(models: list[str], presets: list[str], sizes: list[str], threads: int, timeout: float,
          ll_side: int, log, train: bool = True, ll_preset: str = "paper") -> dict:
    from engines import registry

    slides = {s: synthetic_slide(SIZES[s]) for s in sizes}
    result: dict = {"models": {}, "grid_attention_tiles_per_s": None,
                    "local_learning_train_peak_mb": {str(k): None for k in LL_MODULES}}
    notes: list[str] = []
    for name in models:
        why = _available(name)
        result["models"][name] = {}
        for preset in presets:
            row: dict = {}
            for size in SIZES:
                row[f"infer_s_{size}"] = None
                row[f"rss_mb_{size}"] = None
            if why is not None:
                row["error"] = why
            elif preset not in registry.presets(name):
                row["error"] = f"no preset {preset!r}"
            else:
                for size in sizes:
                    log(f"{name}/{preset} on {size} ...")
                    r = _spawn(["--child-infer", name, preset, str(slides[size]), "--threads",
                                str(threads)], timeout)
                    log(f"  {r}")
                    if "error" in r:
                        row.setdefault("error", f"{size}: {r['error']}")
                        continue
                    row[f"infer_s_{size}"] = round(r["infer_s"], 3)
                    row[f"rss_mb_{size}"] = round(r["rss_mb"], 1)
                    # RSS after importing torch and building the model, before inference.
                    row[f"rss_base_mb_{size}"] = round(r["rss_before_mb"], 1)
                    if name == "grid_attention" and "tiles_per_s" in r and result["grid_attention_tiles_per_s"] is None:
                        result["grid_attention_tiles_per_s"] = round(r["tiles_per_s"], 1)
                        notes.append(f"grid_attention_tiles_per_s: preset {preset}, {size} slide, "
                                     f"{r['tiles']} tissue tiles")
            result["models"][name][preset] = row

    why = _available("local_learning")
    if not train or "local_learning" not in models:
        notes.append("local_learning_train_peak_mb: not measured in this run")
    elif why is not None:
        notes.append(f"local_learning_train_peak_mb: model unavailable ({why})")
    else:
        peaks = result["local_learning_train_peak_mb"]
        result["local_learning_train_s"] = {k: None for k in LL_MODULES}
        for k in LL_MODULES:
            log(f"local_learning/{ll_preset} training K={k} ...")
            r = _spawn(["--child-train", ll_preset, k, str(ll_side), "--threads", str(threads)], timeout)
            log(f"  {r}")
            if "error" in r:
                notes.append(f"local_learning K={k}: {r['error']}")
            else:
                peaks[k] = round(r["train_peak_mb"], 1)
                result["local_learning_train_s"][k] = round(r["train_s"], 2)
        for base in ("e2e", "1"):
            result[f"local_learning_train_ratio_to_{base}"] = {
                k: round(peaks[k] / peaks[base], 3) if peaks[k] and peaks[base] else None for k in ("4", "8")}
        notes.append(f"local_learning_train_peak_mb: preset {ll_preset}, one training step on a "
                     f"{ll_side}x{ll_side} input; peak RSS minus the RSS before the step. e2e: one module "
                     f"with the stem trained too (the paper's end-to-end baseline); 1: one module, stem frozen")
    result["meta"] = {
        "threads": threads, "sizes": sizes, "machine": platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "rss": "peak RSS of a fresh process, torch included",
        "notes": notes,
    }
    return result


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=_csv, help="comma-separated (default: all)")
    p.add_argument("--presets", type=_csv, default=["tiny"], help="comma-separated (default: tiny)")
    p.add_argument("--sizes", type=_csv, default=list(SIZES), help="10k,100k")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    p.add_argument("--ll-side", type=int, default=3072, help="local-learning training input side")
    p.add_argument("--ll-preset", default="paper",
                   help="local-learning preset for the training memory (default paper: ResNet-34, "
                        "the network the paper's memory figures are for)")
    p.add_argument("--no-train", action="store_true", help="skip the local-learning training memory")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--child-infer", nargs=3, metavar=("MODEL", "PRESET", "SLIDE"), help=argparse.SUPPRESS)
    p.add_argument("--child-train", nargs=3, metavar=("PRESET", "K", "SIDE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if a.child_infer:
        print(json.dumps(child_infer(*a.child_infer, threads=a.threads)))
        return 0
    if a.child_train:
        preset, k, side = a.child_train
        print(json.dumps(child_train(preset, k, int(side), threads=a.threads)))
        return 0
    from engines import registry

    models = a.models or registry.list_models()
    bad = [s for s in a.sizes if s not in SIZES]
    if bad:
        p.error(f"unknown size(s) {', '.join(bad)}; choose from {', '.join(SIZES)}")

    def log(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    print(json.dumps(bench(models, a.presets, a.sizes, a.threads, a.timeout, a.ll_side, log,
                           train=not a.no_train, ll_preset=a.ll_preset), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
