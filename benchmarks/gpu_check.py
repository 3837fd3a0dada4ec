"""GPU check: the CUDA paths of training, inference and DDP, for a machine that has a GPU.
Not a test (the test suite runs on the CPU); meant to finish in well under 3 minutes.

    PYTHONPATH=. python benchmarks/gpu_check.py [--models a,b] [--slides 8] [--size 1024]
        [--keep DIR] [--no-ddp]

On a synthetic set made with ``engines.synth.generate`` (8 slides of 1024 px in a temporary
folder), for each of the five models (tiny preset) it

1. trains one epoch with ``TrainConfig(device="cuda")``,
2. loads ``last.pt`` on the CPU (every tensor in the file must be a CPU tensor) and checks the
   weights match what the run trained,
3. runs ``engines.infer.run(..., device="cuda")`` on one slide and checks the model really ran
   there and returned finite probabilities.

Then a stop-and-resume check on one model (does a run stopped mid-epoch and resumed on the GPU
end where an uninterrupted one does? GPU kernels need not be bitwise deterministic, so the
largest weight difference is reported next to the verdict), a one-process
``cpu:gloo,cuda:nccl`` group (CPU and CUDA all-reduce, ``all_gather_object``), and, with two or
more GPUs, ``torchrun --nproc_per_node=2 -m app train --device cuda`` (DDP over NCCL). NCCL
refuses two ranks on one GPU, so with a single GPU the two-process run is reported as skipped.

Prints one JSON object per line (``{"check": ..., "ok": ..., "seconds": ..., "error": ...}``)
and a summary line last; exits 1 if any check failed. Without CUDA it prints
``{"cuda": false}`` and exits 0. ``--cpu-dry-run`` runs the same model and resume checks on
the CPU (the process-group checks are skipped), to check this script where there is no GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("magnet", "spatial_mag", "zoom_in", "grid_attention", "local_learning")
RESUME_MODEL = "zoom_in"
DEVICE = "cuda"  # "cpu" for --cpu-dry-run


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}{where}"


def check_checkpoint_on_cpu(path: Path) -> dict:
    """Load with the project's loader (map_location cpu, weights_only) and also raw, without
    map_location: a CUDA tensor saved in the file would then come back on the GPU."""
    import torch

    from engines.checkpoint import iter_tensors, load_checkpoint, model_from_checkpoint

    raw = torch.load(path, weights_only=True)
    cuda = [p for p, t in iter_tensors(raw) if t.device.type != "cpu"]
    if cuda:
        raise AssertionError(f"{path.name} holds non-CPU tensors: {cuda[:5]}")
    model = model_from_checkpoint(load_checkpoint(path))
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise AssertionError("model_from_checkpoint did not build the model on the CPU")
    return {"tensors": sum(1 for _ in iter_tensors(raw)), "has_cuda_rng": "cuda_rng" in (raw.get("train") or {})}


def check_model(name: str, manifest: Path, slide: Path, work: Path) -> dict:
    import torch

    from engines import infer
    from engines.checkpoint import model_from_checkpoint
    from engines.train import TrainConfig, LogEvent, train

    rec: dict = {"check": "model", "model": name, "ok": False}
    t0 = time.perf_counter()
    try:
        logs: list[str] = []
        cfg = TrainConfig(manifest=str(manifest), model=name, preset="tiny", out=str(work / name),
                          epochs=1, device=DEVICE, seed=0)
        result = train(cfg, on_event=lambda e: logs.append(e.message) if isinstance(e, LogEvent) else None)
        rec["train_s"] = round(time.perf_counter() - t0, 2)
        rec["metrics"] = result.history[-1] if result.history else {}
        if not any(f"device {DEVICE}" in m for m in logs):
            raise AssertionError(f"the trainer did not report device {DEVICE}: {logs[:1]}")
        rec["checkpoint"] = check_checkpoint_on_cpu(work / name / "last.pt")
        model = model_from_checkpoint(work / name / "last.pt")
        t1 = time.perf_counter()
        trace = infer.run(model, slide, device=DEVICE)
        rec["explain_s"] = round(time.perf_counter() - t1, 2)
        if model.device.type != DEVICE:
            raise AssertionError(f"infer.run left the model on {model.device}")
        if not all(math.isfinite(p) for p in trace.probs) or abs(sum(trace.probs) - 1) > 1e-3:
            raise AssertionError(f"bad probabilities {trace.probs}")
        rec["probs"] = [round(p, 4) for p in trace.probs]
        rec["fields"], rec["maps"], rec["trail"] = len(trace.fields), len(trace.maps), len(trace.trail)
        if DEVICE == "cuda":
            rec["max_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        rec["ok"] = True
    except Exception as exc:  # noqa: BLE001 - report and go on with the next model
        rec["error"] = _error_text(exc)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return emit(rec)


def check_resume(manifest: Path, work: Path, name: str = RESUME_MODEL) -> dict:
    import torch

    from engines.train import StepEvent, TrainConfig, TrainControl, train

    rec: dict = {"check": "resume_on_gpu", "model": name, "ok": False}
    t0 = time.perf_counter()
    try:
        def cfg(out: str, **kw):
            return TrainConfig(manifest=str(manifest), model=name, out=str(work / out), epochs=2,
                               device=DEVICE, seed=2, accumulation=1, **kw)

        full = train(cfg("full"))
        control = TrainControl()
        seen = [0]

        def stop(ev):
            if isinstance(ev, StepEvent):
                seen[0] += 1
                if seen[0] == ev.steps + 1:  # epoch 2, after its first step
                    control.cancel()

        part = train(cfg("part"), on_event=stop, control=control)
        if not part.cancelled:
            raise AssertionError("the run did not stop")
        stopped = torch.load(work / "part" / "last.pt", weights_only=True)
        rec["saved_cuda_rng"] = "cuda_rng" in stopped["train"]
        if rec["saved_cuda_rng"] != (DEVICE == "cuda"):
            raise AssertionError(f"cuda_rng in the mid-epoch checkpoint: {rec['saved_cuda_rng']} on {DEVICE}")
        resumed = train(cfg("part", resume=True))
        a = torch.load(work / "full" / "last.pt", weights_only=True)["state_dict"]
        b = torch.load(work / "part" / "last.pt", weights_only=True)["state_dict"]
        diff = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
        rec["max_weight_diff"] = diff
        rec["train_loss"] = [[h["train_loss"] for h in full.history], [h["train_loss"] for h in resumed.history]]
        rec["exact"] = diff == 0.0
        rec["ok"] = diff <= 1e-4  # GPU kernels (atomics in conv backward) need not be bitwise repeatable
    except Exception as exc:  # noqa: BLE001
        rec["error"] = _error_text(exc)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return emit(rec)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_mixed_group() -> dict:
    """One process, backend "cpu:gloo,cuda:nccl": what init_distributed makes on a GPU."""
    import torch
    import torch.distributed as dist

    from engines.devices import dist_backend, resolve_device

    rec: dict = {"check": "nccl_group_one_process", "ok": False}
    t0 = time.perf_counter()
    try:
        dev = resolve_device("cuda")
        backend = dist_backend(dev)
        rec["backend"] = backend
        if backend != "cpu:gloo,cuda:nccl":
            raise AssertionError(f"dist_backend({dev}) is {backend!r}")
        torch.cuda.set_device(dev)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        try:
            cpu = torch.tensor([1.0])
            dist.all_reduce(cpu, op=dist.ReduceOp.MAX)  # the trainer's cancel flag (gloo)
            gpu = torch.ones(3, device=dev)
            dist.all_reduce(gpu)  # DDP's gradients (nccl)
            rows: list = [None]
            dist.all_gather_object(rows, [([0.1, 0.9], 1)])  # the validation rows
            if rows != [[([0.1, 0.9], 1)]] or float(gpu.sum()) != 3.0 or float(cpu) != 1.0:
                raise AssertionError(f"collectives returned {rows}, {gpu}, {cpu}")
        finally:
            dist.destroy_process_group()
        rec["ok"] = True
    except Exception as exc:  # noqa: BLE001
        rec["error"] = _error_text(exc)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return emit(rec)


def check_ddp(manifest: Path, work: Path, timeout: float) -> dict:
    import torch

    rec: dict = {"check": "ddp_torchrun_2_processes", "ok": False}
    gpus = torch.cuda.device_count()
    if gpus < 2:
        rec.update(ok=None, skipped=f"needs 2 GPUs (NCCL refuses two ranks on one GPU); torch sees {gpus}")
        return emit(rec)
    t0 = time.perf_counter()
    run = work / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MAGLENS_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "app", "train", str(manifest), "--model", RESUME_MODEL, "--epochs", "1",
           "--out", str(run), "--device", "cuda", "--seed", "3"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        rec["rc"] = proc.returncode
        log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
        rec["log_ok"] = "ranks 2" in log and "device cuda:0" in log
        if proc.returncode != 0 or not rec["log_ok"]:
            rec["error"] = (proc.stderr or proc.stdout)[-1500:]
        else:
            rec["checkpoint"] = check_checkpoint_on_cpu(run / "last.pt")
            rec["ok"] = True
    except subprocess.TimeoutExpired:
        rec["error"] = f"timed out after {timeout:.0f} s"
    except Exception as exc:  # noqa: BLE001
        rec["error"] = _error_text(exc)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return emit(rec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024, help="slide side in pixels")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    ap.add_argument("--no-ddp", action="store_true", help="skip the process-group checks")
    ap.add_argument("--no-resume", action="store_true", help="skip the stop-and-resume check")
    ap.add_argument("--ddp-timeout", type=float, default=90.0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="check this script on the CPU")
    args = ap.parse_args(argv)

    import torch

    global DEVICE
    DEVICE = "cpu" if args.cpu_dry_run else "cuda"
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(json.dumps({"cuda": False}), flush=True)
        return 0
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    emit({"check": "environment", "cuda": cuda, "device": DEVICE, "torch": torch.__version__,
          "cuda_version": torch.version.cuda,
          "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
          "nccl": torch.distributed.is_available() and torch.distributed.is_nccl_available()})

    from engines.synth import SynthConfig, generate

    with tempfile.TemporaryDirectory(prefix="maglens-gpu-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data"
        if not (data / "manifest.csv").exists():
            generate(data, slides=args.slides, seed=7, cfg=SynthConfig(size=args.size))
        manifest = data / "manifest.csv"
        slide = sorted(data.glob("synth_*.tiff"))[0]
        records = [check_model(m.strip(), manifest, slide, work / "runs")
                   for m in args.models.split(",") if m.strip()]
        if not args.no_resume:
            records.append(check_resume(manifest, work / "resume"))
        if not args.no_ddp and DEVICE == "cuda":
            records.append(check_mixed_group())
            records.append(check_ddp(manifest, work, args.ddp_timeout))
    failed = [r.get("model", r["check"]) for r in records if r.get("ok") is False]
    print(json.dumps({"check": "summary", "ok": not failed, "failed": failed,
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
