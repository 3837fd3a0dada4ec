"""Faults a user meets with damaged files, killed processes and hostile inputs, tried one by
one; prints JSON with, for each category, the cases tried, the cases handled and a percentage.

A case is handled when its outcome is the clean one:
  damaged_slides    every file in tests/data/bad and ../shared/slides/bad (when present) and a
                    few generated ones, x ``maglens info``, ``infer --model spatial_mag`` and
                    ``snapshot``: exit 2 with exactly one line on stderr
  checkpoints       generated hostile checkpoints: ``model_from_checkpoint`` raises
                    CheckpointError, and ``maglens infer --checkpoint`` exits 2 with one line
  traces            generated hostile trace files: ``Trace.load`` raises TraceError
  manifests         generated hostile manifests: ``read_manifest`` raises ManifestError naming
                    the row (extra columns: a warning, no error); ``maglens train`` exits 2
  kill_points       a tiny training run killed with SIGKILL at the trainer's fault-injection
                    points (MAGLENS_TEST_KILL_AT), then ``--resume``: best.pt, last.pt and
                    metrics.jsonl byte-identical to an uninterrupted run, no stray files
  close_during_run  a viewer (offscreen) closed while a model runs or a slide opens: exit 0,
                    no "QThread: Destroyed", no abort

    python benchmarks/fault_bench.py [--quick] [--only traces,manifests]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORIES = ("damaged_slides", "checkpoints", "traces", "manifests", "kill_points", "close_during_run")
SLIDE = ROOT / "tests" / "data" / "small.svs"
BAD_DIRS = (ROOT / "tests" / "data" / "bad", ROOT.parent / "shared" / "slides" / "bad")
CLI_TIMEOUT_S = 180  # a refused input must not run this long; past it the case is not handled
KILL_MODEL = "zoom_in"  # the tiny preset trains a step on a 1024 px slide in well under a second
KILL_SETTINGS = ["--seed", "5", "--threads", "1", "--accumulation", "2"]
KILL_POINTS = ("step@1.1", "step@1.2", "after-best@1", "after-last@1", "step@2.1", "after-best@2",
               "after-last@2")
KILL_ENV = "MAGLENS_TEST_KILL_AT"
TIMED_KILLS = (0.4, 0.6, 0.8)  # kills at these fractions of the uninterrupted run's time


@dataclass
class Case:
    case: str
    handled: bool
    detail: str


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "QT_QPA_PLATFORM": "offscreen"}
    for key in ("MAGLENS_DEBUG", KILL_ENV):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(args: list[str], timeout: float = CLI_TIMEOUT_S, cwd: Path = ROOT,
         **env: str) -> subprocess.CompletedProcess | None:
    """A child process; None when it ran past ``timeout`` (it is killed)."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(**env),
                              cwd=cwd)
    except subprocess.TimeoutExpired:
        return None


def maglens(*args: object, timeout: float = CLI_TIMEOUT_S, **env: str) -> subprocess.CompletedProcess | None:
    return _run([sys.executable, "-m", "app", *map(str, args)], timeout=timeout, **env)


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def one_line_refusal(name: str, proc: subprocess.CompletedProcess | None) -> Case:
    """Bad input on the CLI: exit 2 and exactly one line on stderr, no traceback."""
    if proc is None:
        return Case(name, False, f"still running after {CLI_TIMEOUT_S} s")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ok = proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    if ok:
        return Case(name, True, _short(lines[0]))
    return Case(name, False, f"exit {proc.returncode}, {len(lines)} stderr line(s): "
                             f"{_short(' | '.join(lines[-4:]))}")


# ---------------------------------------------------------------------------------------
# damaged slides
# ---------------------------------------------------------------------------------------
def damaged_files(tmp: Path) -> list[tuple[str, Path]]:
    from tests.hostile_files import png_header, write_tiff

    files = []
    for folder in BAD_DIRS:
        if folder.is_dir():
            files += [(f"{folder.parent.name}/bad/{p.name}", p) for p in sorted(folder.iterdir()) if p.is_file()]
    made = tmp / "made"
    made.mkdir()
    (made / "empty.svs").write_bytes(b"")
    (made / "text.ndpi").write_text("this is not a slide\n")
    (made / "noise.tiff").write_bytes(random.Random(7).randbytes(20_000))
    png_header(made / "declares-1e6.png", 1_000_000, 1_000_000)
    write_tiff(made / "declares-1e6.tiff", 1_000_000, 1_000_000, tile=512)
    files += [(f"generated/{p.name}", p) for p in sorted(made.iterdir())]
    return files


def bench_damaged_slides(tmp: Path, quick: bool) -> list[Case]:
    files = damaged_files(tmp)
    commands: list[tuple[str, Callable[[Path, Path], list[object]]]] = [
        ("info", lambda f, out: ["info", f]),
        ("infer spatial_mag", lambda f, out: ["infer", f, "--model", "spatial_mag", "--out", out / "t.json"]),
        ("snapshot", lambda f, out: ["snapshot", f, "--model", "spatial_mag", "--out", out / "s.png"]),
    ]
    if quick:
        files = [f for f in files if f[0].startswith("generated/")][:2] + [f for f in files if "bad/" in f[0]][:1]
        commands = commands[:1]
    cases = []
    for label, path in files:
        for cmd, make in commands:
            out = Path(tempfile.mkdtemp(dir=tmp))
            cases.append(one_line_refusal(f"{label} x {cmd}", maglens(*make(path, out))))
    return cases


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------
def hostile_checkpoints(tmp: Path, quick: bool) -> list[tuple[str, Path, str]]:
    """(name, file, model it is offered as)."""
    import torch

    from engines import registry
    from engines.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    good = save_checkpoint(tmp / "zoom_in.pt", registry.create("zoom_in", "tiny", classes=["a", "b"]))
    d = load_checkpoint(good)
    out: list[tuple[str, Path, str]] = []

    def save(name: str, data: dict, model: str) -> None:
        path = tmp / f"{name.replace(' ', '-')}.pt"
        torch.save(data, path)
        out.append((name, path, model))

    out.append(("wrong model", good, "spatial_mag"))
    sd = {k: v.clone() for k, v in d["state_dict"].items()}
    first = next(k for k, v in sd.items() if v.is_floating_point())
    sd[first].view(-1)[0] = float("nan")
    save("NaN weights", {**d, "state_dict": sd}, "zoom_in")
    if not quick:
        mag = load_checkpoint(save_checkpoint(tmp / "magnet.pt", registry.create("magnet", "tiny", classes=["a", "b"])))
        save("huge config width", {**mag, "config": {**mag["config"], "gru_hidden": 50_000}}, "magnet")
        sm = load_checkpoint(save_checkpoint(tmp / "sm.pt", registry.create("spatial_mag", "tiny", classes=["a", "b"])))
        save("huge thumbnail", {**sm, "config": {**sm["config"], "thumb_size": (1_000_000, 1_000_000)}},
             "spatial_mag")
        raw = good.read_bytes()
        (tmp / "truncated.pt").write_bytes(raw[: len(raw) // 2])
        out.append(("truncated", tmp / "truncated.pt", "zoom_in"))
        save("unknown bulk key", {**d, "payload": torch.zeros(100_000)}, "zoom_in")
    (tmp / "junk.pt").write_bytes(b"GIF89a" + random.Random(3).randbytes(4000))
    out.append(("not a zip", tmp / "junk.pt", "zoom_in"))
    return out


def _child_checkpoints(spec: str) -> int:
    """In a child process (a hostile file must not take the bench down): one JSON line per
    case, handled when model_from_checkpoint raises CheckpointError."""
    from engines.checkpoint import CheckpointError, model_from_checkpoint

    for name, path, model in json.loads(Path(spec).read_text()):
        try:
            model_from_checkpoint(path, expect_model=model)
            case = Case(name, False, "loaded without an error")
        except CheckpointError as exc:
            case = Case(name, True, _short(str(exc)))
        except BaseException as exc:  # noqa: BLE001 - any other outcome is the finding
            case = Case(name, False, f"{type(exc).__name__}: {_short(str(exc))}")
        print(json.dumps(asdict(case)), flush=True)
    return 0


def _child_results(flag: str, cases: list, tmp: Path, names: list[str]) -> list[Case]:
    """Run a ``--child-*`` mode over ``cases``; a case without an answer (the child died or
    hung on it) is not handled."""
    spec = tmp / f"{flag}.json"
    spec.write_text(json.dumps(cases))
    proc = _run([sys.executable, str(Path(__file__).resolve()), flag, str(spec)], timeout=CLI_TIMEOUT_S * 2)
    got: dict[str, Case] = {}
    for line in (proc.stdout if proc else "").splitlines():
        try:
            c = Case(**json.loads(line))
            got[c.case] = c
        except (ValueError, TypeError):
            continue
    why = "timed out" if proc is None else f"child exited {proc.returncode}: {_short(proc.stderr[-300:])}"
    return [got.get(n, Case(n, False, f"no answer ({why})")) for n in names]


def bench_checkpoints(tmp: Path, quick: bool) -> list[Case]:
    cases = hostile_checkpoints(tmp, quick)
    lib = _child_results("--child-checkpoints", [(n, str(p), m) for n, p, m in cases], tmp,
                         [n for n, _, _ in cases])
    out = [Case(f"{c.case} x model_from_checkpoint", c.handled, c.detail) for c in lib]
    for name, path, model in cases:
        if quick and name != "not a zip":
            continue
        proc = maglens("infer", SLIDE, "--model", model, "--checkpoint", path, "--out", tmp / "t.json")
        out.append(one_line_refusal(f"{name} x maglens infer", proc))
    return out


# ---------------------------------------------------------------------------------------
# traces
# ---------------------------------------------------------------------------------------
def _good_trace() -> dict:
    from engines.trace import AttentionMap, Field, SlideRef, Trace, TrailStep

    t = Trace(model="magnet", preset="tiny", checkpoint=None, slide=SlideRef("/slides/a.svs", 4000, 3000, 0.5),
              classes=["normal", "tumor"], probs=[0.25, 0.75], roi=None)
    t.add(Field(0, None, 0, (0, 0, 4000, 3000), 1.0, "view"))
    t.add(Field(1, 0, 1, (400, 300, 800, 600), 0.5, "zoom", 5.0))
    t.add(AttentionMap("attention", "g", 2.5, (0.0, 0.0), (2000.0, 1500.0), [[0.125, 0.25], [0.375, 0.5]]))
    t.add(TrailStep(0, 1, [0.25, 0.75]))
    return json.loads(t.to_json())


def hostile_traces(quick: bool) -> dict[str, str | bytes]:
    good = _good_trace()

    def edited(change: Callable[[dict], None]) -> str:
        d = json.loads(json.dumps(good))
        change(d)
        return json.dumps(d)

    text = json.dumps(good)
    deep = "[" * 100_000 + "]" * 100_000
    cases: dict[str, str | bytes] = {
        "NaN": text.replace("0.125", "NaN", 1),
        "ragged map": edited(lambda d: d["maps"][0].update(values=[[0.1, 0.2], [0.3]])),
        "deep nesting": deep,
        "garbage": random.Random(11).randbytes(5000),
        "probs/classes mismatch": edited(lambda d: d.update(probs=[0.2, 0.3, 0.5])),
    }
    if not quick:
        cases.update({
            "Infinity": text.replace("0.75]", "Infinity]", 1),
            "deep nesting inside": text.replace('"kind": "zoom"', '"kind": ' + deep),
            "three-number rect": edited(lambda d: d["fields"][1].update(rect=[1, 2, 3])),
            "zero cell": edited(lambda d: d["maps"][0].update(cell=[0, 10])),
            "trail points at no field": edited(lambda d: d["trail"][0].update(field_id=77)),
            "huge number": text.replace("4000", "9" * 6000, 1),
            "top level list": "[1, 2, 3]",
            "empty file": "",
            "utf-16": text.encode("utf-16"),
            "too many maps": edited(lambda d: d.update(maps=d["maps"] * 25_000)),
        })
    return cases


def _child_traces(spec: str) -> int:
    from engines.trace import Trace, TraceError

    for name, path in json.loads(Path(spec).read_text()):
        try:
            Trace.load(path)
            case = Case(name, False, "loaded without an error")
        except TraceError as exc:
            case = Case(name, True, _short(str(exc)))
        except BaseException as exc:  # noqa: BLE001
            case = Case(name, False, f"{type(exc).__name__}: {_short(str(exc))}")
        print(json.dumps(asdict(case)), flush=True)
    return 0


def bench_traces(tmp: Path, quick: bool) -> list[Case]:
    from engines.trace import Trace

    good = tmp / "good.json"
    good.write_text(json.dumps(_good_trace()))
    Trace.load(good)  # the base every case edits must itself load, or the cases prove nothing
    files = []
    for i, (name, content) in enumerate(hostile_traces(quick).items()):
        p = tmp / f"trace{i}.json"
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        files.append((name, str(p)))
    return _child_results("--child-traces", files, tmp, [n for n, _ in files])


# ---------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------
def _manifest_slides(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in "abcdef":
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "sub").mkdir(exist_ok=True)


MANIFEST_BASE = "a.png,normal,train\nb.png,tumor,train\nc.png,normal,val\nd.png,tumor,val\n"
# name -> (manifest text, words the report must hold; None: a warning and no error)
MANIFEST_CASES: dict[str, tuple[str | bytes, str | None]] = {
    "slide in two splits": ("slide,label,split\n" + MANIFEST_BASE + "a.png,normal,val\n", "row 5: a.png: same slide"),
    "same file by another path": ("slide,label,split\n" + MANIFEST_BASE + "sub/../c.png,normal,test\n",
                                  "row 5: sub/../c.png: same slide as row 3"),
    "one slide, two labels": ("slide,label,split\n" + MANIFEST_BASE + "b.png,normal,train\n", "label 'normal' here"),
    "labels differ by case/space": ("slide,label,split\n" + MANIFEST_BASE + "e.png,Tumor ,train\n",
                                    "row 5: e.png: label 'Tumor' differs from 'tumor'"),
    "too few fields": ("slide,label,split\n" + MANIFEST_BASE + "e.png,tumor\n", "row 5: 2 field(s)"),
    "too many fields": ("slide,label,split\n" + MANIFEST_BASE + "e.png,tumor,train,x\n", "row 5: 4 field(s)"),
    "empty slide": ("slide,label,split\n" + MANIFEST_BASE + ",tumor,train\n", "row 5: empty slide path"),
    "bad split": ("slide,label,split\n" + MANIFEST_BASE + "e.png,tumor,holdout\n", "row 5: e.png: unknown split"),
    "missing file": ("slide,label,split\n" + MANIFEST_BASE + "zz.png,tumor,train\n", "row 5: zz.png: file not found"),
    "missing column": ("path,label\na.png,normal\n", "missing column(s) slide"),
    "not UTF-8": (b"slide,label\n\xff\xfe\x00a.png,normal\n", "cannot be read"),
    "one class only": ("slide,label\na.png,normal\nb.png,normal\n", "only one class"),
    "extra column (warning)": ("slide,label,split,notes\n" + MANIFEST_BASE.replace("\n", ",ok\n"), None),
}


def bench_manifests(tmp: Path, quick: bool) -> list[Case]:
    import logging

    from engines.data import ManifestError, read_manifest

    logging.getLogger("engines.data").addHandler(logging.NullHandler())  # the warning is checked below
    _manifest_slides(tmp)
    cases = []
    for i, (name, (content, words)) in enumerate(MANIFEST_CASES.items()):
        m = tmp / f"m{i}.csv"
        m.write_bytes(content if isinstance(content, bytes) else content.encode())
        try:
            ds = read_manifest(m)
            ok = words is None and bool(ds.warnings)
            cases.append(Case(name, ok, _short(ds.warnings[0]) if ds.warnings else "no error"))
        except ManifestError as exc:
            found = [p for p in exc.problems if words and words in p]
            cases.append(Case(name, bool(found), _short(found[0] if found else " | ".join(exc.problems))))
        except Exception as exc:  # noqa: BLE001
            cases.append(Case(name, False, f"{type(exc).__name__}: {_short(str(exc))}"))
    if not quick:
        bad = tmp / "m0.csv"
        proc = maglens("train", bad, "--model", KILL_MODEL, "--out", tmp / "run")
        ok = (proc is not None and proc.returncode == 2 and "Traceback" not in proc.stderr
              and "row 5: a.png: same slide" in proc.stderr and not (tmp / "run").exists())
        cases.append(Case("maglens train on a bad manifest", ok,
                          "exit 2 with the report" if ok else _short(proc.stderr if proc else "timed out")))
    return cases


# ---------------------------------------------------------------------------------------
# kill points
# ---------------------------------------------------------------------------------------
def _same_run(run: Path, ref: Path) -> str | None:
    """None when the run ended as the reference did; else what differs."""
    for name in ("best.pt", "last.pt", "metrics.jsonl"):
        if not (run / name).is_file():
            return f"{name} missing"
        if (run / name).read_bytes() != (ref / name).read_bytes():
            return f"{name} differs from the uninterrupted run"
    stray = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    return f"left behind: {', '.join(stray)}" if stray else None


def bench_kill_points(tmp: Path, quick: bool) -> list[Case]:
    from engines import train as train_mod
    from engines.synth import SynthConfig, generate

    if getattr(train_mod, "KILL_ENV", None) != KILL_ENV:
        return [Case("fault-injection hook", False, f"engines.train has no {KILL_ENV} hook")]
    data = tmp / "data"
    generate(data, slides=6, seed=1, cfg=SynthConfig(size=1024))
    base = ["train", data / "manifest.csv", "--model", KILL_MODEL, "--epochs", 2]
    ref = tmp / "ref"
    started = time.monotonic()
    proc = maglens(*base, "--out", ref, *KILL_SETTINGS, timeout=600)
    (tmp / "ref-seconds.json").write_text(json.dumps(time.monotonic() - started))
    if proc is None or proc.returncode != 0:
        return [Case("uninterrupted run", False, _short(proc.stderr[-400:] if proc else "timed out"))]
    cases = []
    for point in (("after-best@1",) if quick else KILL_POINTS):
        run = tmp / f"run-{point.replace('@', '-')}"
        killed = maglens(*base, "--out", run, *KILL_SETTINGS, timeout=600, **{KILL_ENV: point})
        if killed is None or killed.returncode != -signal.SIGKILL:
            got = "timed out" if killed is None else f"exit {killed.returncode}"
            cases.append(Case(point, False, f"not killed at the point ({got})"))
            continue
        resumed = maglens(*base, "--out", run, "--resume", timeout=600)
        if resumed is None or resumed.returncode != 0:
            cases.append(Case(point, False, "resume failed: " + _short(resumed.stderr[-300:] if resumed else "timed out")))
            continue
        diff = _same_run(run, ref)
        cases.append(Case(point, diff is None, diff or "identical to the uninterrupted run"))
    if not quick:  # and at moments no hook names: a fraction of the reference run's time
        ref_s = float(json.loads((tmp / "ref-seconds.json").read_text()))
        for fraction in TIMED_KILLS:
            cases.append(_timed_kill(base, tmp / f"run-timed-{int(fraction * 100)}", ref, fraction * ref_s))
    return cases


def _timed_kill(base: list, run: Path, ref: Path, after_s: float) -> Case:
    args = [sys.executable, "-m", "app", *map(str, base), "--out", str(run), *KILL_SETTINGS]
    for _ in range(4):  # a run faster than the reference ends before the kill: kill sooner
        name = f"SIGKILL after {after_s:.1f} s"
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
        try:
            proc.wait(after_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        shutil.rmtree(run, ignore_errors=True)
        after_s *= 0.7
    else:
        return Case(name, False, "every run ended before its kill")
    # Killed before its first checkpoint, the run is started again; else resumed.
    again = ["--resume"] if (run / "last.pt").is_file() else KILL_SETTINGS
    resumed = maglens(*base, "--out", run, *again, timeout=600)
    if resumed is None or resumed.returncode != 0:
        return Case(name, False, "resume failed: " + _short(resumed.stderr[-300:] if resumed else "timed out"))
    diff = _same_run(run, ref)
    how = "resumed" if again == ["--resume"] else "started again (no last.pt yet)"
    return Case(name, diff is None, diff or f"{how}; identical to the uninterrupted run")


# ---------------------------------------------------------------------------------------
# close during run
# ---------------------------------------------------------------------------------------
CLOSE_CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication
ini, slide, model, mode = sys.argv[2:6]
app = QApplication([])
from app.main_window import MainWindow
w = MainWindow(settings=QSettings(ini, QSettings.Format.IniFormat))
w.resize(900, 600)
w.show()
state = {"opened": False}
w.slide_opened.connect(lambda _p: state.update(opened=True))
w.open_failed.connect(lambda m: (print("open failed:", m, file=sys.stderr), app.exit(3)))
def close():
    print("closing; model busy:", w.inference.engine.busy, flush=True)
    w.close()
    QTimer.singleShot(0, app.quit)
def wait_busy():
    if not w.inference.engine.busy:
        QTimer.singleShot(10, wait_busy)
        return
    QTimer.singleShot(200, close)  # a moment into the run
def wait_open():
    if not state["opened"]:
        QTimer.singleShot(20, wait_open)
        return
    w.models_panel.model_combo.setCurrentText(model)
    w.models_panel.run_button.click()
    QTimer.singleShot(0, wait_busy)
w.open_slide(slide)
QTimer.singleShot(0, close if mode == "opening" else wait_open)
code = app.exec()
print("event loop ended", code, flush=True)
sys.exit(code)
"""


def bench_close_during_run(tmp: Path, quick: bool) -> list[Case]:
    shared = ROOT.parent / "shared" / "slides"
    plans = [("model run spatial_mag on small.svs", SLIDE, "spatial_mag", "run")]
    if not quick:
        plans += [("model run magnet on small.svs", SLIDE, "magnet", "run"),
                  ("model run zoom_in on small.svs", SLIDE, "zoom_in", "run"),
                  ("while the slide opens", SLIDE, "zoom_in", "opening")]
        big = shared / "CMU-1-Small-Region.svs"
        if big.is_file():
            plans.append(("model run spatial_mag on CMU-1-Small-Region.svs", big, "spatial_mag", "run"))
    cases = []
    for i, (name, slide, model, mode) in enumerate(plans):
        proc = _run([sys.executable, "-c", CLOSE_CHILD, str(ROOT), str(tmp / f"s{i}.ini"), str(slide), model, mode],
                    timeout=240, cwd=tmp)
        if proc is None:
            cases.append(Case(name, False, "did not exit within 240 s"))
            continue
        bad = [w for w in ("QThread: Destroyed", "Aborted", "Segmentation", "Traceback") if w in proc.stderr]
        ok = proc.returncode == 0 and not bad and "event loop ended 0" in proc.stdout
        busy = "model busy: True" in proc.stdout
        detail = (f"exit 0{' (closed mid-run)' if busy else ''}" if ok else
                  f"exit {proc.returncode} {', '.join(bad)} {_short(proc.stderr[-300:])}")
        cases.append(Case(name, ok, detail))
    return cases


# ---------------------------------------------------------------------------------------
BENCHES: dict[str, Callable[[Path, bool], list[Case]]] = {
    "damaged_slides": bench_damaged_slides, "checkpoints": bench_checkpoints, "traces": bench_traces,
    "manifests": bench_manifests, "kill_points": bench_kill_points, "close_during_run": bench_close_during_run,
}


def summarise(cases: list[Case], seconds: float) -> dict:
    tried, handled = len(cases), sum(c.handled for c in cases)
    return {"tried": tried, "handled": handled,
            "percent": round(100.0 * handled / tried, 1) if tried else None,
            "seconds": round(seconds, 1), "cases": [asdict(c) for c in cases]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small subset of every category")
    p.add_argument("--only", default=",".join(CATEGORIES), help="comma-separated categories")
    p.add_argument("--child-checkpoints", help=argparse.SUPPRESS)
    p.add_argument("--child-traces", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_checkpoints:
        return _child_checkpoints(a.child_checkpoints)
    if a.child_traces:
        return _child_traces(a.child_traces)
    only = [c.strip() for c in a.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in BENCHES]
    if unknown:
        p.error(f"unknown categories {', '.join(unknown)}; choose from {', '.join(CATEGORIES)}")
    report: dict = {"quick": a.quick, "categories": {}}
    tmp_root = Path(tempfile.mkdtemp(prefix="maglens-fault-"))
    try:
        for name in only:
            started = time.monotonic()
            folder = tmp_root / name
            folder.mkdir()
            try:
                cases = BENCHES[name](folder, a.quick)
            except Exception as exc:  # noqa: BLE001 - a category that breaks is reported, not fatal
                cases = [Case("category setup", False, f"{type(exc).__name__}: {_short(str(exc))}")]
            report["categories"][name] = summarise(cases, time.monotonic() - started)
            print(f"{name}: {report['categories'][name]['handled']}/{report['categories'][name]['tried']}",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    tried = sum(c["tried"] for c in report["categories"].values())
    handled = sum(c["handled"] for c in report["categories"].values())
    report["total"] = {"tried": tried, "handled": handled,
                       "percent": round(100.0 * handled / tried, 1) if tried else None}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
