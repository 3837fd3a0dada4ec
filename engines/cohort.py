"""Run one model over a cohort of slides: a manifest (``slide,label[,split]``) or a folder.

Every slide gets ``traces/<key>.trace.json`` and a small record ``traces/<key>.result.json``
(probabilities, prediction, timing, error), both written atomically. ``predictions.csv`` and
``summary.json`` are then rebuilt from the records alone, so a run that was killed, resumed,
split over worker processes or over torchrun ranks ends with the same files as one run in one
process. A record is reused (the slide is skipped) when it holds no error and names the same
slide file (size and mtime), model, preset and weights (checkpoint sha256, or the seeded
initial weights of an untrained model).

Results do not depend on which process ran a slide or in what order: before each slide the
torch seed is set from the slide's name, so models that sample patches sample the same ones.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from engines.data import ManifestError, parse_manifest_rows
from engines.trace import write_atomic

# What a folder of slides is scanned for: the viewer's Open dialog's formats.
SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
    ".qptiff", ".png", ".jpg", ".jpeg", ".bmp",
})
TRACES = "traces"
PREDICTIONS = "predictions.csv"
SUMMARY = "summary.json"
RECORD_FORMAT = 1
UNTRAINED_SEED = 0  # an untrained model's weights come from this seed, so every process agrees
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


class CohortError(ValueError):
    """The cohort cannot be run (e.g. a folder without slides); the message is one line."""


# ---------------------------------------------------------------------------------------
# The cohort
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CohortSlide:
    path: Path  # the file to open
    name: str  # as listed: the manifest's text, or the file's name in the folder
    label: str  # "" when not known (a folder)
    split: str  # "" when not given
    key: str  # file name stem of this slide's outputs, unique in the cohort


@dataclass
class Cohort:
    source: Path
    slides: list[CohortSlide]
    labelled: bool  # a manifest: every slide has a label

    @property
    def labels(self) -> list[str]:
        return sorted({s.label for s in self.slides if s.label})


def is_cohort(path: str | os.PathLike) -> bool:
    """A folder or a CSV manifest (a slide is never a CSV)."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() == ".csv"


def read_cohort(path: str | os.PathLike) -> Cohort:
    p = Path(path)
    return read_folder(p) if p.is_dir() else read_manifest_cohort(p)


def read_manifest_cohort(path: str | os.PathLike) -> Cohort:
    """The manifest's rows, checked as ``engines.data.read_manifest`` checks them (rows that
    cannot be read, empty labels, unknown splits, a slide listed twice, labels differing only
    by case), raising ``ManifestError`` with every problem. Unlike for training, one class or
    no train split is fine (a held-out test cohort), and a missing or unreadable slide file is
    not a manifest problem: that slide gets an error row and the others still run."""
    path = Path(path)
    rows, _warnings, problems = parse_manifest_rows(path)
    if not rows and not problems:
        problems.whole(f"{path.name}: no slides listed")
    if problems:
        raise ManifestError(problems.lines())
    keys = unique_keys([r.name for r in rows])
    slides = [CohortSlide(r.path, r.name, r.label, r.split, k) for r, k in zip(rows, keys)]
    return Cohort(path, slides, labelled=True)


def read_folder(path: str | os.PathLike) -> Cohort:
    """Every file directly in ``path`` whose extension is a slide format, by name."""
    path = Path(path)
    try:
        files = sorted(f for f in path.iterdir()
                       if f.suffix.lower() in SLIDE_SUFFIXES and not f.name.startswith(".") and f.is_file())
    except OSError as exc:
        raise CohortError(f"{path}: cannot be listed ({exc.strerror or exc})") from None
    if not files:
        raise CohortError(f"{path}: no slide files in this folder "
                          f"(looked for {', '.join(sorted(SLIDE_SUFFIXES))})")
    keys = unique_keys([f.name for f in files])
    return Cohort(path, [CohortSlide(f, f.name, "", "", k) for f, k in zip(files, keys)], labelled=False)


def unique_keys(names: list[str]) -> list[str]:
    """Each name's file stem; stems shared by several names (``a/x.svs``, ``b/x.svs``; compared
    without case, for case-blind file systems) get a short hash of the name, which stays the
    same when rows are added or reordered, so a resumed run finds its records."""
    stems = [Path(n).stem or "slide" for n in names]
    count: dict[str, int] = {}
    for s in stems:
        count[s.casefold()] = count.get(s.casefold(), 0) + 1
    return [s if count[s.casefold()] == 1 else f"{s}-{hashlib.sha1(n.encode()).hexdigest()[:8]}"
            for s, n in zip(stems, names)]


def shard(slides: list[CohortSlide], rank: int, world: int) -> list[CohortSlide]:
    """This rank's slides: every ``world``-th, starting at ``rank`` (no padding: ranks meet
    only once, at the end)."""
    return slides[rank::world]


# ---------------------------------------------------------------------------------------
# The model and one slide
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What every process needs to build the same model (it is sent to spawned workers)."""
    model: str | None
    preset: str | None
    checkpoint: str | None
    overrides: dict = field(default_factory=dict)
    device: str = "auto"
    threads: int = 1

    def load(self):
        """(model, checkpoint sha256 or None). A checkpoint's preset must match ``preset``
        when given (``ValueError``); an untrained model is built from ``UNTRAINED_SEED``."""
        import torch

        from engines import registry
        from engines.checkpoint import model_from_checkpoint

        if self.checkpoint is not None:
            model = model_from_checkpoint(self.checkpoint, expect_model=self.model)
            if self.preset is not None and self.preset != model.preset:
                raise ValueError(f"--preset {self.preset} conflicts with the checkpoint, "
                                 f"which holds preset {model.preset}")
            return model, model.checkpoint_sha256
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            model = registry.create(self.model, self.preset or "tiny", **self.overrides)
        return model, None


@dataclass
class SlideResult:
    """One slide's outcome; saved as ``traces/<key>.result.json``."""
    name: str
    key: str
    label: str
    split: str
    run: dict  # model, preset, checkpoint, overrides: what the record is valid for
    file: dict | None  # size and mtime_ns of the slide file when it was run
    classes: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    predicted: str = ""
    seconds: float = 0.0  # wall time for the slide: open, model, trace written
    model_s: float = 0.0  # the model's own time (infer.run's total_s)
    error: str = ""
    format: int = RECORD_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "SlideResult":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError("not a slide record of this version")
        res = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        if not res.error and (len(res.probs) != len(res.classes)
                              or not all(isinstance(p, float) and math.isfinite(p) for p in res.probs)):
            raise ValueError("probabilities do not match the classes")
        return res


def run_identity(spec: ModelSpec, model, sha: str | None) -> dict:
    return {"model": str(model.name), "preset": str(model.preset), "checkpoint": sha,
            "overrides": dict(sorted(spec.overrides.items())) if sha is None else {}}


def trace_path(out: Path, key: str) -> Path:
    return Path(out) / TRACES / f"{key}.trace.json"


def record_path(out: Path, key: str) -> Path:
    return Path(out) / TRACES / f"{key}.result.json"


def _file_stamp(path: Path) -> dict | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_record(out: Path, key: str) -> SlideResult | None:
    try:
        return SlideResult.from_json(record_path(out, key).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # none yet, or unreadable: the slide is simply run again


def reusable(out: Path, slide: CohortSlide, run: dict) -> SlideResult | None:
    """The slide's earlier result when it can stand for a new run (same slide file, model
    and weights, no error, trace still there)."""
    rec = read_record(out, slide.key)
    if (rec is None or rec.error or rec.run != run or rec.name != slide.name
            or rec.file != _file_stamp(slide.path) or not trace_path(out, slide.key).is_file()):
        return None
    # Label and split come from the manifest as it is now (a relabelled row needs no rerun).
    rec.label, rec.split = slide.label, slide.split
    return rec


def slide_seed(slide: CohortSlide) -> int:
    return int.from_bytes(hashlib.sha256(slide.name.encode()).digest()[:4], "big")


def run_slide(model, run: dict, slide: CohortSlide, out: Path, device=None) -> SlideResult:
    """Run ``model`` on one slide, write its trace and record; a slide or model failure
    becomes the record's ``error`` (a cancel or Ctrl+C propagates)."""
    import torch

    from engines import infer

    t0 = time.perf_counter()
    res = SlideResult(slide.name, slide.key, slide.label, slide.split, run, _file_stamp(slide.path),
                      classes=list(model.classes))
    try:
        torch.manual_seed(slide_seed(slide))
        trace = infer.run(model, slide.path, checkpoint_id=run["checkpoint"], device=device)
        trace.save(trace_path(out, slide.key))
        res.probs = [float(p) for p in trace.probs]
        res.predicted = res.classes[max(range(len(res.probs)), key=res.probs.__getitem__)]
        res.model_s = float(trace.timings.get("total_s", 0.0))
    except (infer.Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one slide is that slide's error row
        res.error = _error_text(exc)
        res.probs, res.predicted = [], ""
    res.seconds = time.perf_counter() - t0
    write_atomic(record_path(out, slide.key), res.to_json())
    return res


def _error_text(exc: BaseException) -> str:
    from engines.slide import SlideError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (SlideError, FileNotFoundError)):
        text = f"{type(exc).__name__}: {text}"
    return text[:500]


# Spawned workers keep their model here between slides.
_WORKER: dict = {}


def _worker_init(spec: ModelSpec) -> None:
    import torch

    from engines.devices import local_rank, resolve_device

    torch.set_num_threads(spec.threads)
    torch.backends.mkldnn.enabled = False  # see run_slides
    model, sha = spec.load()
    device = resolve_device(spec.device, local_rank())
    model.to(device)
    _WORKER.update(model=model, run=run_identity(spec, model, sha), device=device)


def _worker_run(slide: CohortSlide, out: str) -> SlideResult:
    return run_slide(_WORKER["model"], _WORKER["run"], slide, Path(out))


def run_slides(slides: list[CohortSlide], spec: ModelSpec, out: Path, workers: int,
               model=None, sha: str | None = None,
               on_result: Callable[[SlideResult, bool], None] | None = None) -> list[SlideResult]:
    """Run (or reuse) every slide of ``slides``; ``on_result(result, reused)`` as each one
    ends. One worker runs here with ``model`` (loaded from ``spec`` when None); more run in
    that many spawned processes, each building the model from ``spec``."""
    import torch

    from engines.devices import local_rank, resolve_device

    out = Path(out)
    if model is None:
        model, sha = spec.load()
    run = run_identity(spec, model, sha)
    results: dict[str, SlideResult] = {}
    todo: list[CohortSlide] = []
    for s in slides:
        rec = reusable(out, s, run)
        if rec is None:
            todo.append(s)
        else:
            results[s.key] = rec
            if on_result is not None:
                on_result(rec, True)
    (out / TRACES).mkdir(parents=True, exist_ok=True)
    if workers <= 1 or len(todo) <= 1:
        torch.set_num_threads(spec.threads)
        device = resolve_device(spec.device, local_rank())
        model.to(device)
        # oneDNN's CPU convolutions sum in an order that depends on the thread count; torch's
        # own do not, so without it 1 worker with 2 threads equals 2 workers with 1 each.
        was = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            for s in todo:
                res = run_slide(model, run, s, out)
                results[s.key] = res
                if on_result is not None:
                    on_result(res, False)
        finally:
            torch.backends.mkldnn.enabled = was
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                                 initargs=(spec,)) as pool:
            futures = [pool.submit(_worker_run, s, str(out)) for s in todo]
            try:
                for fut in as_completed(futures):
                    res = fut.result()
                    results[res.key] = res
                    if on_result is not None:
                        on_result(res, False)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return [results[s.key] for s in slides]


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------
def collect(cohort: Cohort, out: Path) -> list[SlideResult | None]:
    """Every slide's record, in cohort order (None where a slide has none)."""
    return [read_record(Path(out), s.key) for s in cohort.slides]


def predictions_csv(cohort: Cohort, records: list[SlideResult | None], classes: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide", "label", "split", *(f"p_{c}" for c in classes), "predicted", "seconds",
                "error", "checkpoint", "trace"])
    for s, r in zip(cohort.slides, records):
        if r is None:
            w.writerow([s.name, s.label, s.split, *([""] * len(classes)), "", "", "not run", "", ""])
            continue
        probs = [repr(p) for p in r.probs] if not r.error else [""] * len(classes)
        w.writerow([s.name, s.label, s.split, *probs, r.predicted, f"{r.seconds:.3f}", r.error,
                    r.run.get("checkpoint") or "",
                    "" if r.error else f"{TRACES}/{s.key}.trace.json"])
    return buf.getvalue()


def summarize(cohort: Cohort, records: list[SlideResult | None], classes: list[str],
              run: dict, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Counts, and for labelled slides that ran: accuracy, AUROC (binary: of the second class;
    more classes: macro one-vs-rest) with a seeded bootstrap 95 % CI, and the confusion matrix
    (rows: label, columns: prediction, in ``classes`` order), all from scikit-learn."""
    ok = [(s, r) for s, r in zip(cohort.slides, records) if r is not None and not r.error]
    scored = [(s, r) for s, r in ok if s.label in classes]
    summary: dict = {
        "source": str(cohort.source), "model": run.get("model"), "preset": run.get("preset"),
        "checkpoint": run.get("checkpoint"), "classes": list(classes),
        "n": len(cohort.slides), "n_predicted": len(ok),
        "n_failed": len(cohort.slides) - len(ok), "n_scored": len(scored),
        "accuracy": None, "auroc": None, "auroc_ci95": None, "confusion": None,
        "bootstrap": {"resamples": resamples, "seed": seed, "usable": 0},
    }
    if not scored:
        return summary
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix

    y = np.array([classes.index(s.label) for s, _ in scored])
    probs = np.array([r.probs for _, r in scored], dtype=float)
    pred = np.array([classes.index(r.predicted) for _, r in scored])
    summary["accuracy"] = float(accuracy_score(y, pred))
    summary["confusion"] = {"labels": list(classes),
                            "matrix": confusion_matrix(y, pred, labels=list(range(len(classes)))).tolist()}
    auroc = _auroc(y, probs, len(classes))
    if auroc is None:
        return summary
    summary["auroc"] = auroc
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        v = _auroc(y[idx], probs[idx], len(classes))
        if v is not None:
            values.append(v)
    summary["bootstrap"]["usable"] = len(values)
    if values:
        lo, hi = np.percentile(values, [2.5, 97.5])
        summary["auroc_ci95"] = [float(lo), float(hi)]
    return summary


def _auroc(y, probs, k: int) -> float | None:
    """scikit-learn's ROC AUC; None when a class has no slide (it is undefined then)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < k:
        return None
    if k == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    # One-vs-rest wants rows summing to 1; softmax outputs do up to float error.
    p = probs / probs.sum(axis=1, keepdims=True)
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(k))))


def write_outputs(cohort: Cohort, out: Path, classes: list[str], run: dict) -> dict:
    """Rebuild ``predictions.csv`` and ``summary.json`` from the records and remove temporary
    files a killed run left in ``out``; returns the summary."""
    out = Path(out)
    records = collect(cohort, out)
    write_atomic(out / PREDICTIONS, predictions_csv(cohort, records, classes))
    summary = summarize(cohort, records, classes, run)
    write_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    remove_stale_temporaries(out)
    return summary


def remove_stale_temporaries(out: Path) -> None:
    """``atomic_writer``'s ``.<name>.<random>.tmp`` files left by a killed process."""
    for folder in (Path(out), Path(out) / TRACES):
        for f in _glob(folder, ".*.tmp"):
            try:
                f.unlink()
            except OSError:
                pass


def _glob(folder: Path, pattern: str) -> Iterable[Path]:
    try:
        return list(folder.glob(pattern))
    except OSError:
        return []
