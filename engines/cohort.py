"""Run one model over a cohort of slides: a manifest (``slide,label[,split]``) or a folder.

Every slide gets ``traces/<key>.trace.json`` and a small record ``traces/<key>.result.json``
(probabilities, prediction, timing, error), both written atomically. ``predictions.csv`` and
``summary.json`` are then rebuilt from the records alone, so a run that was killed, resumed,
split over worker processes or over torchrun ranks ends with the same files as one run in one
process. A record is reused (the slide is skipped) when it holds no error and names the same
slide file (size and mtime), model, preset and weights (checkpoint sha256, or the seeded
initial weights of an untrained model).

A slide with an annotation file (its own, ``CohortSlide.annotations``, or one named after it in
the ``annotations`` folder of ``run_slides``) also gets the attention-in-annotation ratio and
Dice of its trace (``engines.evaluate.score_attention``, annotations of one class, default
"Tumor"; a file without that class gives no score rather than scoring other classes). The record
notes the annotation file (path, size, mtime) and class it was scored against: a record whose
model result still holds but whose annotations changed (or were given for the first time, or
dropped) is rescored from its saved trace without running the model again.

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
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
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
DEFAULT_ANNOTATION_CLASS = "Tumor"


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
    annotations: Path | None = None  # this slide's annotation file, when it has its own


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
    options: dict = field(default_factory=dict)  # inference options (engines.registry.inference_options)

    def load(self):
        """(model, checkpoint sha256 or None). A checkpoint's preset must match ``preset``
        when given (``ValueError``); an untrained model is built from ``UNTRAINED_SEED``."""
        import torch

        from engines import registry
        from engines.checkpoint import model_from_checkpoint

        if self.checkpoint is not None:
            model = model_from_checkpoint(self.checkpoint, expect_model=self.model, options=self.options)
            if self.preset is not None and self.preset != model.preset:
                raise ValueError(f"--preset {self.preset} conflicts with the checkpoint, "
                                 f"which holds preset {model.preset}")
            return model, model.checkpoint_sha256
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            registry.check_options(self.model, self.options)
            model = registry.create(self.model, self.preset or "tiny", **self.overrides, **self.options)
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
    # Attention against the slide's annotations (None when not scored; records written before
    # scores existed load with None). ``scored`` says against what: see ``score_identity``.
    ratio: float | None = None
    dice: float | None = None
    scored: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "SlideResult":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: object) -> "SlideResult":
        """A record from its JSON object, every field checked (``ValueError`` otherwise)."""
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError("not a slide record of this version")
        missing = [k for k in ("name", "key", "label", "split", "run", "file") if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        res = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        for name in ("name", "key", "label", "split", "predicted", "error"):
            if not isinstance(getattr(res, name), str):
                raise ValueError(f"{name} must be text")
        if not isinstance(res.run, dict) or not (res.file is None or isinstance(res.file, dict)):
            raise ValueError("run and file must be objects")
        if not (isinstance(res.classes, list) and all(isinstance(c, str) for c in res.classes)):
            raise ValueError("classes must be a list of names")
        if not isinstance(res.probs, list):
            raise ValueError("probs must be a list")
        if not res.error and (len(res.probs) != len(res.classes)
                              or not all(isinstance(p, float) and math.isfinite(p) for p in res.probs)):
            raise ValueError("probabilities do not match the classes")
        for name in ("seconds", "model_s"):
            if not _finite_number(getattr(res, name)):
                raise ValueError(f"{name} must be a number")
        for name in ("ratio", "dice"):
            if getattr(res, name) is not None and not _finite_number(getattr(res, name)):
                raise ValueError(f"{name} must be a number or null")
        if not (res.scored is None or isinstance(res.scored, dict)):
            raise ValueError("scored must be an object or null")
        return res


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run_identity(spec: ModelSpec, model, sha: str | None) -> dict:
    run = {"model": str(model.name), "preset": str(model.preset), "checkpoint": sha,
           "overrides": dict(sorted(spec.overrides.items())) if sha is None else {}}
    if spec.options:  # only when given, so records made without options stay reusable
        run["options"] = dict(sorted(spec.options.items()))
    return run


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


def annotation_file(slide: CohortSlide, folder: str | os.PathLike | None) -> Path | None:
    """The slide's annotation file: its own, else the one named after it in ``folder``
    (``engines.annotations.annotation_file_for``); None when it has none."""
    if slide.annotations is not None:
        return Path(slide.annotations)
    if folder is None:
        return None
    from engines.annotations import annotation_file_for

    return annotation_file_for(folder, slide.path)


def score_identity(path: Path | None, classification: str | None) -> dict | None:
    """What a score is valid for: the annotation file as it is now and the class scored;
    None for a slide without annotations (it gets no score)."""
    if path is None:
        return None
    return {"path": os.path.abspath(path), "class": classification, "file": _file_stamp(Path(path))}


def score_slide(trace, slide, path: Path, classification: str | None, check=None) -> tuple:
    """(ratio, dice, problem) of ``trace`` against the annotations of ``classification`` in
    ``path`` within the tissue of ``slide`` (an open ``Slide``). No annotation of the class
    in the tissue, or no attention on it, is no score and no problem; a file that cannot be
    read, or any other failure of the measure, is no score and a one-line problem (the slide
    keeps its prediction). A cancel propagates."""
    from engines import infer
    from engines.annotations import AnnotationError, load_annotations
    from engines.evaluate import score_attention
    from engines.tissue import tissue_of_slide

    try:
        annotations = load_annotations(path)
    except (AnnotationError, OSError) as exc:
        return None, None, _error_text(exc)
    try:
        score = score_attention(trace, annotations, tissue_of_slide(slide, check=check), classification)
    except (infer.Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a score that cannot be made costs no prediction
        return None, None, _error_text(exc)
    if score is None:
        return None, None, ""
    # Float sums can leave -1e-12 where nothing is inside; a share is never negative.
    return max(0.0, float(score.ratio)), max(0.0, float(score.dice)), ""


def _apply_score(res: SlideResult, trace, slide, want: dict | None, check=None) -> None:
    res.ratio = res.dice = None
    res.scored = want
    if want is None:
        return
    ratio, dice, problem = score_slide(trace, slide, Path(want["path"]), want["class"], check)
    res.ratio, res.dice = ratio, dice
    if problem:
        res.scored = {**want, "error": problem}


def _checker(cancel):
    from engines import infer

    def check() -> None:
        if infer.is_cancelled(cancel):
            raise infer.Cancelled("cohort run cancelled")

    return check


def run_slide(model, run: dict, slide: CohortSlide, out: Path, device=None, cancel=None,
              annotations: str | os.PathLike | None = None,
              annotation_class: str | None = DEFAULT_ANNOTATION_CLASS) -> SlideResult:
    """Run ``model`` on one slide, write its trace and record; a slide or model failure
    becomes the record's ``error`` (a cancel or Ctrl+C propagates and writes no record).
    A slide with annotations (``annotation_file``) is scored against them."""
    import torch

    from engines import infer
    from engines.slide import Slide

    t0 = time.perf_counter()
    res = SlideResult(slide.name, slide.key, slide.label, slide.split, run, _file_stamp(slide.path),
                      classes=list(model.classes))
    want = score_identity(annotation_file(slide, annotations), annotation_class)
    try:
        torch.manual_seed(slide_seed(slide))
        with Slide(slide.path) as sl:
            trace = infer.run(model, sl, cancel=cancel, checkpoint_id=run["checkpoint"], device=device)
            trace.save(trace_path(out, slide.key))
            res.probs = [float(p) for p in trace.probs]
            res.predicted = res.classes[max(range(len(res.probs)), key=res.probs.__getitem__)]
            res.model_s = float(trace.timings.get("total_s", 0.0))
            _apply_score(res, trace, sl, want, _checker(cancel))
    except (infer.Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one slide is that slide's error row
        res.error = _error_text(exc)
        res.probs, res.predicted = [], ""
        res.ratio = res.dice = res.scored = None
    res.seconds = time.perf_counter() - t0
    write_atomic(record_path(out, slide.key), res.to_json())
    return res


def rescore(rec: SlideResult, slide: CohortSlide, out: Path, want: dict | None,
            cancel=None) -> SlideResult | None:
    """A reusable record scored afresh from its saved trace (the model does not run);
    None when the trace cannot be read (the slide then runs again)."""
    from engines.slide import Slide, SlideError
    from engines.trace import Trace, TraceError

    if want is None:
        rec.ratio = rec.dice = rec.scored = None
    else:
        try:
            trace = Trace.load(trace_path(out, slide.key))
            with Slide(slide.path) as sl:
                _apply_score(rec, trace, sl, want, _checker(cancel))
        except (TraceError, SlideError, OSError, ValueError):
            return None
    write_atomic(record_path(out, slide.key), rec.to_json())
    return rec


def _error_text(exc: BaseException) -> str:
    from engines.slide import SlideError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (SlideError, FileNotFoundError)):
        text = f"{type(exc).__name__}: {text}"
    return text[:500]


# Spawned workers keep their model here between slides.
_WORKER: dict = {}


def _worker_init(spec: ModelSpec, cancel=None) -> None:
    import torch

    from engines.devices import local_rank, resolve_device

    torch.set_num_threads(spec.threads)
    torch.backends.mkldnn.enabled = False  # see run_slides
    model, sha = spec.load()
    device = resolve_device(spec.device, local_rank())
    model.to(device)
    _WORKER.update(model=model, run=run_identity(spec, model, sha), device=device, cancel=cancel)


def _worker_run(slide: CohortSlide, out: str, annotations: str | None,
                annotation_class: str | None) -> SlideResult:
    cancel = _WORKER.get("cancel")
    _checker(cancel)()  # a slide queued before the cancel does not start
    return run_slide(_WORKER["model"], _WORKER["run"], slide, Path(out), cancel=cancel,
                     annotations=annotations, annotation_class=annotation_class)


def run_slides(slides: list[CohortSlide], spec: ModelSpec, out: Path, workers: int,
               model=None, sha: str | None = None,
               on_result: Callable[[SlideResult, bool], None] | None = None,
               cancel=None, annotations: str | os.PathLike | None = None,
               annotation_class: str | None = DEFAULT_ANNOTATION_CLASS) -> list[SlideResult]:
    """Run (or reuse) every slide of ``slides``; ``on_result(result, reused)`` as each one
    ends. One worker runs here with ``model`` (loaded from ``spec`` when None); more run in
    that many spawned processes, each building the model from ``spec``.

    ``cancel`` (a ``threading.Event`` or a callable returning bool) is checked between slides
    and inside each (``engines.infer.run``'s cancel): ``engines.infer.Cancelled`` is raised,
    the slide in progress writes no record and the records already written stand, so the
    same run resumes later. ``annotations`` (a folder of files named after the slides) and
    ``annotation_class`` (None: every class) score each annotated slide (see the module)."""
    import torch

    from engines.devices import local_rank, resolve_device
    from engines.infer import Cancelled, is_cancelled

    out = Path(out)
    if model is None:
        model, sha = spec.load()
    run = run_identity(spec, model, sha)
    results: dict[str, SlideResult] = {}
    todo: list[CohortSlide] = []
    (out / TRACES).mkdir(parents=True, exist_ok=True)
    for s in slides:
        rec = reusable(out, s, run)
        if rec is not None:
            want = score_identity(annotation_file(s, annotations), annotation_class)
            if rec.scored != want:
                if is_cancelled(cancel):
                    raise Cancelled("cohort run cancelled")
                rec = rescore(rec, s, out, want, cancel)
        if rec is None:
            todo.append(s)
        else:
            results[s.key] = rec
            if on_result is not None:
                on_result(rec, True)
    folder = None if annotations is None else str(annotations)
    torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device, local_rank())
    model.to(device)
    # oneDNN's CPU convolutions sum in an order that depends on the thread count; torch's
    # own do not, so without it 1 worker with 2 threads equals 2 workers with 1 each.
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        def here(s: CohortSlide, halt=None) -> SlideResult:
            # ``halt``: the shared run stops this process's slide too (Ctrl+C, a failed worker)
            stop = cancel if halt is None else (lambda: halt.is_set() or is_cancelled(cancel))
            return run_slide(model, run, s, out, cancel=stop, annotations=folder,
                             annotation_class=annotation_class)

        def done(res: SlideResult) -> None:
            results[res.key] = res
            if on_result is not None:
                on_result(res, False)

        if workers <= 1 or len(todo) <= 1:
            for s in todo:
                if is_cancelled(cancel):
                    raise Cancelled("cohort run cancelled")
                done(here(s))
        else:
            _run_shared(todo, here, done, spec, out, workers, cancel, folder, annotation_class)
    finally:
        torch.backends.mkldnn.enabled = was
    return [results[s.key] for s in slides]


def _run_shared(todo, here, done, spec, out, workers, cancel, folder, annotation_class) -> None:
    """``todo`` shared by this process (``here``, on a thread: it starts at once) and
    ``workers - 1`` spawned processes, each taking the next slide when it is free, so the
    seconds a spawned process spends importing torch are not lost. Results reach ``done``
    on the calling thread, in the order they finish. A cancel reaches the processes through
    a process Event, so the slides they are running stop too."""
    import multiprocessing
    import queue
    import threading

    from engines.infer import Cancelled, is_cancelled

    lock = threading.Lock()
    left = list(reversed(todo))  # pop() takes the next in cohort order

    def take() -> CohortSlide | None:
        with lock:
            return left.pop() if left else None

    finished: queue.Queue = queue.Queue()  # (result, None) or (None, exception) from the thread
    halt = threading.Event()

    def local() -> None:
        try:
            while not halt.is_set() and (s := take()) is not None:
                finished.put((here(s, halt), None))
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            finished.put((None, exc))
        finished.put((None, None))  # this thread is done

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    stop = ctx.Event()
    thread = threading.Thread(target=local, name="cohort-local", daemon=True)
    with ProcessPoolExecutor(workers - 1, mp_context=ctx, initializer=_worker_init,
                             initargs=(spec, stop)) as pool:
        pending: set = set()

        def refill() -> None:
            while len(pending) < workers - 1 and (s := take()) is not None:
                pending.add(pool.submit(_worker_run, s, str(out), folder, annotation_class))

        refill()
        thread.start()
        local_running = True
        try:
            while local_running or pending:
                while True:
                    try:
                        res, exc = finished.get_nowait()
                    except queue.Empty:
                        break
                    if exc is not None:
                        raise exc
                    if res is None:
                        local_running = False
                    else:
                        done(res)
                if pending:
                    ready, pending = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
                    for fut in ready:
                        done(fut.result())
                    refill()
                elif local_running:
                    thread.join(0.05)
                if is_cancelled(cancel):
                    raise Cancelled("cohort run cancelled")
        except BaseException:
            halt.set()
            stop.set()
            for f in pending:
                f.cancel()
            raise
        finally:
            halt.set()
            thread.join()


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
                "error", "checkpoint", "trace", "attention_ratio", "dice"])
    for s, r in zip(cohort.slides, records):
        if r is None:
            w.writerow([s.name, s.label, s.split, *([""] * len(classes)), "", "", "not run", "", "",
                        "", ""])
            continue
        probs = [repr(p) for p in r.probs] if not r.error else [""] * len(classes)
        w.writerow([s.name, s.label, s.split, *probs, r.predicted, f"{r.seconds:.3f}", r.error,
                    r.run.get("checkpoint") or "",
                    "" if r.error else f"{TRACES}/{s.key}.trace.json",
                    "" if r.ratio is None else repr(float(r.ratio)),
                    "" if r.dice is None else repr(float(r.dice))])
    return buf.getvalue()


def summarize(cohort: Cohort, records: list[SlideResult | None], classes: list[str],
              run: dict, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Counts, and for labelled slides that ran: accuracy, AUROC (binary: of the second class;
    more classes: macro one-vs-rest) with a seeded bootstrap 95 % CI, and the confusion matrix
    (rows: label, columns: prediction, in ``classes`` order), all from scikit-learn. Slides
    scored against annotations add ``attention_ratio`` and ``dice``: median, IQR and a seeded
    bootstrap 95 % CI of the median (``engines.evaluate.summarise``)."""
    ok = [(s, r) for s, r in zip(cohort.slides, records) if r is not None and not r.error]
    scored = [(s, r) for s, r in ok if s.label in classes]
    annotated = [r for _, r in ok if r.scored is not None]
    summary: dict = {
        "source": str(cohort.source), "model": run.get("model"), "preset": run.get("preset"),
        "checkpoint": run.get("checkpoint"), "classes": list(classes),
        "n": len(cohort.slides), "n_predicted": len(ok),
        "n_failed": len(cohort.slides) - len(ok), "n_scored": len(scored),
        "accuracy": None, "auroc": None, "auroc_ci95": None, "confusion": None,
        "bootstrap": {"resamples": resamples, "seed": seed, "usable": 0},
        "n_annotated": len(annotated),
        "annotation_class": next((r.scored.get("class") for r in annotated), None),
        "attention_ratio": None, "dice": None,
    }
    if annotated:
        from engines.evaluate import summarise

        summary["attention_ratio"] = summarise([r.ratio for r in annotated], seed=seed)
        summary["dice"] = summarise([r.dice for r in annotated], seed=seed)
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
