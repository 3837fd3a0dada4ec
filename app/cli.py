"""The ``maglens`` command line (also ``python -m app``).

``maglens [view] [SLIDE]`` opens the viewer (``maglens X.maglens.json`` or ``maglens view
--project PATH`` with a project: a project file, a manifest or a folder); ``info``, ``infer``,
``train``, ``synth`` and ``snapshot`` work headless (``train`` also under ``torchrun``, one process per rank). Each
subcommand is one entry in ``COMMANDS`` (a name, a function that adds its arguments, and a
handler returning the exit code), so new ones plug in without touching the dispatch.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 anything else.
Heavy modules (torch, Qt) are imported inside the handlers that need them.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

PROG = "maglens"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input; the message is shown as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line through ``UsageError`` instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``handler`` as subcommand ``name``."""

    def wrap(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, configure, handler)
        return handler

    return wrap


# ---------------------------------------------------------------------------------------
# Argument helpers
# ---------------------------------------------------------------------------------------
def parse_rect(text: str) -> tuple[float, float, float, float]:
    """``x,y,w,h`` in level-0 pixels."""
    parts = [p.strip() for p in text.split(",")]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not x,y,w,h (four numbers)") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r} is not x,y,w,h (four finite numbers)")
    if vals[2] <= 0 or vals[3] <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return vals  # type: ignore[return-value]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are 0 or more")
    return value


def _writable_target(path: str | None, what: str) -> None:
    """Fail before a long run, not after it, when an output cannot be written."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {path}: folder {parent} is not writable")


def _existing_file(path: str, what: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path}: no such file")
    if p.is_dir():
        raise UsageError(f"{what} {path} is a folder, not a file")


def _check_model_name(name: str | None) -> None:
    if name is None:
        return
    from engines import registry  # no torch: the registry imports models lazily

    if name not in registry.list_models():
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(registry.list_models())}")


def device_arg(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N (checked for spelling only; whether the GPU
    exists is asked of torch when the command runs)."""
    from engines.devices import check_device_spec  # light: torch loads on first real use

    try:
        return check_device_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_device(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", type=device_arg, default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help=f"where {what} runs: auto (default) takes the GPU when torch sees one "
                        "(under torchrun each process its own), else the CPU")


def _resolve_device(args: argparse.Namespace):
    """The torch.device of ``--device``; a GPU asked for but missing is bad input (exit 2)."""
    from engines.devices import local_rank, resolve_device

    try:
        return resolve_device(args.device, local_rank())
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _add_backbone_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone-weights", metavar="FILE",
                   help="local ImageNet weights for the backbone of an untrained model "
                        "(nothing is downloaded; without it the backbone starts random)")


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="an inference option of the model, also for a checkpoint (zoom_in: "
                        "draws=random|reference, n_samples=N; spatial_mag: k=N); repeatable")


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        parsed = json.loads(value)  # numbers and true/false as such; anything else is text
    except ValueError:
        parsed = value
    return key.strip(), parsed


def model_options(args: argparse.Namespace) -> dict:
    return dict(getattr(args, "option", None) or [])


def backbone_overrides(model: str | None, preset: str | None, weights: str | None) -> dict[str, str]:
    """Config overrides that point the backbone of ``model`` at ``preset`` to a local weights file."""
    if weights is None:
        return {}
    _existing_file(weights, "--backbone-weights")
    from engines import registry

    cfg = registry.config_for(model, preset or "tiny")
    if not hasattr(cfg, "backbone_weights"):
        raise UsageError(f"--backbone-weights: {model} has no pretrained backbone to load")
    if getattr(cfg, "backbone", None) == "small":
        raise UsageError(f"--backbone-weights: preset {preset or 'tiny'} of {model} uses a small CNN "
                         "that has no ImageNet weights; use --preset paper")
    return {"backbone_weights": str(Path(weights).resolve())}


# ---------------------------------------------------------------------------------------
# view
# ---------------------------------------------------------------------------------------
def _configure_view(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", nargs="?", help="slide to open (the bundled demo slide when left out), "
                                            "or a project file (*.maglens.json)")
    p.add_argument("--project", metavar="PATH",
                   help="open a project: a project file, a manifest CSV or a folder of slides")
    p.add_argument("--model", help="model to select in the Models dock")
    p.add_argument("--checkpoint", help="checkpoint file for that model")


def _check_project(path: str) -> None:
    """Open the project once here, so a bad one is one line (exit 2) before any window."""
    from engines.cohort import CohortError
    from engines.data import ManifestError
    from engines.project import ProjectError, open_project

    if not Path(path).exists():
        raise UsageError(f"project {path}: no such file or folder")
    try:
        open_project(path)
    except (ProjectError, CohortError) as exc:  # the message starts with the path
        raise UsageError(f"project {_one_line(exc)}") from None
    except ManifestError as exc:
        more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
        raise UsageError(f"project {path}: manifest problem: {exc.problems[0]}{more}") from None


@command("view", "open the viewer (the default command)", _configure_view)
def cmd_view(args: argparse.Namespace) -> int:
    from engines.project import is_project_file

    if args.slide is not None and is_project_file(args.slide):
        if args.project is not None:
            raise UsageError("give one project: a project file or --project PATH")
        args.project, args.slide = args.slide, None
    if args.project is not None:
        _check_project(args.project)
    if args.slide is not None and not Path(args.slide).exists():
        hint = "" if os.sep in args.slide or "." in args.slide else (
            f" (and not a command: {', '.join(COMMANDS)})")
        raise UsageError(f"slide {args.slide}: no such file{hint}")
    if args.slide is not None:
        _existing_file(args.slide, "slide")
    if args.checkpoint is not None:
        _existing_file(args.checkpoint, "checkpoint")
        if args.model is None:
            raise UsageError("--checkpoint needs --model NAME")
    _check_model_name(args.model)
    from app.main_window import launch  # Qt loads only for the viewer

    if args.project is not None:
        return int(launch(args.slide, args.model, args.checkpoint, project=args.project) or 0)
    return int(launch(args.slide, args.model, args.checkpoint) or 0)


# ---------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------
def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", help="slide file")


@command("info", "print a slide's properties as JSON", _configure_info)
def cmd_info(args: argparse.Namespace) -> int:
    from engines.slide import Slide

    with Slide(args.slide) as slide:
        info = slide.info()
    json.dump(info, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# infer
# ---------------------------------------------------------------------------------------
def _configure_infer(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", metavar="SLIDE|MANIFEST|DIR",
                   help="a slide file; or a manifest CSV (slide,label[,split]) or a folder of "
                        "slides to run the model over the whole cohort")
    p.add_argument("--model", help="model name (optional with --checkpoint, which names it)")
    p.add_argument("--preset", help="model preset (default tiny; a checkpoint fixes its own)")
    p.add_argument("--checkpoint", help="trained weights; without one the model is untrained")
    p.add_argument("--out", help="one slide: write the trace JSON here; a cohort: the folder for "
                                 "traces/, predictions.csv and summary.json (required)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="cohort only: run N slides at once in N processes (default 1)")
    p.add_argument("--annotations", metavar="DIR",
                   help="cohort only: folder of annotation files named after the slides "
                        "(<stem>.geojson, .json or .xml); adds attention_ratio and dice")
    p.add_argument("--annotation-class", metavar="NAME", default=None,
                   help="class of the annotations to score against (default Tumor; '*' for all; "
                        "a slide without that class gets no score)")
    p.add_argument("--geojson", help="write the fields and the attention as iso-contours (top "
                                     "1, 5, 10 %% of the mass) as GeoJSON (QuPath)")
    p.add_argument("--geojson-cells", action="store_true",
                   help="with --geojson: one feature per attention cell instead of contours")
    p.add_argument("--contour-levels", type=_contour_levels, metavar="P,P,...",
                   help="with --geojson: the contour levels in percent of the mass (default 1,5,10)")
    p.add_argument("--roi", type=parse_rect, metavar="X,Y,W,H",
                   help="run on this level-0 rectangle only")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch threads")
    _add_device(p, "the model")
    _add_backbone_weights(p)
    _add_options(p)


def _contour_levels(text: str) -> tuple[float, ...]:
    from engines.map_export import MapExportError, parse_levels

    try:
        return parse_levels(text)
    except MapExportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class ProgressPrinter:
    """A redrawn bar on a terminal; elsewhere a plain line per stage, at most every few
    seconds, so logs stay short."""

    def __init__(self, stream: TextIO, tty: bool | None = None, every_s: float = 5.0,
                 label_width: int = 40) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.label_width = label_width
        self._last_line = 0.0
        self._last_stage: str | None = None
        self._drawn = False

    def update(self, done: int, total: int, stage: str) -> None:
        total = max(1, int(total))
        done = min(max(0, int(done)), total)
        if self.tty:
            width = 30
            fill = round(width * done / total)
            bar = "#" * fill + "-" * (width - fill)
            # A line wider than the terminal wraps, and "\r" then redraws only its tail.
            room = max(10, min(self.label_width, shutil.get_terminal_size((120, 24)).columns - 38))
            self.stream.write(f"\r[{bar}] {100 * done // total:3d}% {stage[:room]:<{room}}")
            self.stream.flush()
            self._drawn = True
            return
        now = time.monotonic()
        stage_key = re.sub(r"\d+", "#", stage)  # "tile 3 / 9" and "tile 4 / 9" are one stage
        if stage_key != self._last_stage or now - self._last_line >= self.every_s or done == total:
            self.stream.write(f"progress: {done}/{total} {stage}\n")
            self.stream.flush()
            self._last_line, self._last_stage = now, stage_key

    def finish(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


@command("infer", "run a model on a slide, or over a manifest or folder of slides",
         _configure_infer)
def cmd_infer(args: argparse.Namespace) -> int:
    if args.model is None and args.checkpoint is None:
        raise UsageError("infer needs --model NAME (or --checkpoint FILE, which names its model)")
    _check_model_name(args.model)
    from engines.cohort import is_cohort

    if is_cohort(args.slide):
        return _infer_cohort(args)
    if args.workers is not None:
        raise UsageError("--workers is for a manifest or a folder of slides, not one slide")
    if args.annotations is not None or args.annotation_class is not None:
        raise UsageError("--annotations is for a manifest or a folder of slides, not one slide")
    _writable_target(args.out, "--out")
    _writable_target(args.geojson, "--geojson")
    if args.geojson is None and (args.geojson_cells or args.contour_levels):
        raise UsageError("--geojson-cells and --contour-levels go with --geojson FILE")
    if args.checkpoint is not None:
        _existing_file(args.checkpoint, "checkpoint")

    from engines.slide import Slide

    slide = Slide(args.slide)  # SlideError before torch loads: bad slides fail fast
    try:
        return _infer(args, slide)
    finally:
        slide.close()


def _model_for(args: argparse.Namespace, cmd: str):
    """The model of ``--checkpoint`` (checked against ``--model``/``--preset``), or a fresh
    ``--model`` at ``--preset`` (default tiny) with a warning; returns (model, sha256 or None).
    Shared by ``infer`` and ``snapshot`` so both treat checkpoints alike."""
    import torch

    from engines import registry
    from engines.checkpoint import model_from_checkpoint

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.checkpoint is not None:
        if args.backbone_weights is not None:
            raise UsageError("--backbone-weights is for untrained models; the checkpoint holds its own weights")
        model = model_from_checkpoint(args.checkpoint, expect_model=args.model, options=model_options(args))
        if args.preset is not None and args.preset != model.preset:
            raise UsageError(
                f"--preset {args.preset} conflicts with the checkpoint, which holds preset {model.preset}"
            )
        return model, model.checkpoint_sha256
    registry.check_options(args.model, model_options(args))
    model = registry.create(args.model, args.preset or "tiny", **model_options(args),
                            **backbone_overrides(args.model, args.preset, args.backbone_weights))
    print(
        f"{PROG} {cmd}: warning: no --checkpoint: {args.model} runs with its initial "
        "(untrained) weights and the trace records checkpoint null",
        file=sys.stderr,
    )
    return model, None


def _run_model(model, slide, roi, sha: str | None, device=None):
    """``engines.infer.run`` (on ``device``, a torch.device or None for where the model is)
    with a progress bar on stderr; returns the Trace."""
    from engines import infer
    from engines.trace import Progress

    bar = ProgressPrinter(sys.stderr)

    def on_event(event) -> None:
        if isinstance(event, Progress):
            bar.update(event.done, event.total, event.stage)

    try:
        return infer.run(model, slide, on_event=on_event, roi=roi, checkpoint_id=sha, device=device)
    finally:
        bar.finish()


def _infer(args: argparse.Namespace, slide) -> int:
    from engines import infer

    if args.roi is not None:
        try:
            infer.check_roi(args.roi, slide)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    device = _resolve_device(args)
    model, sha = _model_for(args, "infer")
    trace = _run_model(model, slide, args.roi, sha, device)
    if args.out:
        trace.save(args.out)
    if args.geojson and args.geojson_cells:
        trace.save_geojson(args.geojson)
    elif args.geojson:
        from engines.map_export import DEFAULT_LEVELS, save_contours_geojson

        save_contours_geojson(trace, args.geojson, levels=args.contour_levels or DEFAULT_LEVELS)

    probs = "  ".join(f"{c}={p:.3f}" for c, p in zip(trace.classes, trace.probs))
    print(f"prediction: {trace.prediction}  ({probs})")
    print(
        f"{trace.model}/{trace.preset}: {len(trace.fields)} fields, {len(trace.maps)} maps, "
        f"{len(trace.trail)} trail steps in {trace.timings.get('total_s', 0.0):.2f} s"
        + (f"; trace written to {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return EXIT_OK


# -- infer over a cohort -----------------------------------------------------------------
# Exit codes of a cohort run: 0 every slide has a prediction; 1 some slide failed (its row in
# predictions.csv says why, the others ran and every output is written); 2 bad input.
def _check_cohort_args(args: argparse.Namespace) -> Path:
    for option, value in (("--geojson", args.geojson), ("--roi", args.roi)):
        if value is not None:
            raise UsageError(f"{option} is for one slide; a cohort run writes each slide's trace "
                             "into --out DIR/traces")
    if args.out is None:
        raise UsageError("a manifest or folder needs --out DIR (for traces/, predictions.csv "
                         "and summary.json)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder")
    if args.checkpoint is not None:
        _existing_file(args.checkpoint, "checkpoint")
        if args.backbone_weights is not None:
            raise UsageError("--backbone-weights is for untrained models; the checkpoint holds its own weights")
    if not Path(args.slide).exists():
        raise UsageError(f"manifest {args.slide}: no such file")
    if args.annotations is not None and not Path(args.annotations).is_dir():
        raise UsageError(f"--annotations {args.annotations}: "
                         f"{'not a folder' if Path(args.annotations).exists() else 'no such folder'}")
    if args.annotation_class is not None and args.annotations is None:
        raise UsageError("--annotation-class needs --annotations DIR")
    return out


def _annotation_class(args: argparse.Namespace) -> str | None:
    from engines.cohort import DEFAULT_ANNOTATION_CLASS

    name = args.annotation_class
    if name is None:
        return DEFAULT_ANNOTATION_CLASS
    return None if name.strip() == "*" else name.strip()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read_cohort(args: argparse.Namespace):
    from engines.cohort import CohortError, read_cohort
    from engines.data import ManifestError

    try:
        return read_cohort(args.slide)
    except CohortError as exc:
        raise UsageError(str(exc)) from None
    except ManifestError as exc:
        if len(exc.problems) == 1:
            raise UsageError(f"manifest {args.slide}: {exc.problems[0]}") from None
        if _env_rank() == 0:  # every rank read the same manifest: list its problems once
            print(f"{PROG} infer: error: manifest {args.slide} has {len(exc.problems)} problem(s):",
                  file=sys.stderr)
            for problem in exc.shown:
                print(f"  {problem}", file=sys.stderr)
        return None


def _infer_cohort(args: argparse.Namespace) -> int:
    out = _check_cohort_args(args)
    cohort = _read_cohort(args)
    if cohort is None:
        return EXIT_BAD_INPUT
    from engines.cohort import ModelSpec

    _resolve_device(args)  # a GPU asked for but missing is bad input, before any work
    workers = args.workers or 1
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = args.threads or max(1, _cores() // (workers * per_node))
    spec = ModelSpec(args.model, args.preset, args.checkpoint,
                     backbone_overrides(args.model, args.preset, args.backbone_weights)
                     if args.checkpoint is None else {}, args.device, threads, model_options(args))
    try:
        model, sha = spec.load()
    except ValueError as exc:  # a preset the model lacks or the checkpoint contradicts
        raise UsageError(str(exc)) from None
    unknown = [lab for lab in cohort.labels if lab not in model.classes]
    if unknown:
        raise UsageError(f"manifest {args.slide}: label(s) {', '.join(map(repr, unknown))} are not "
                         f"classes of the model ({', '.join(model.classes)})")
    if sha is None and _env_rank() == 0:
        print(f"{PROG} infer: warning: no --checkpoint: {model.name} runs with initial "
              f"(untrained, seed 0) weights and the traces record checkpoint null", file=sys.stderr)

    from engines.train import init_distributed

    rank, world = init_distributed(_resolve_device(args))
    finished = False
    try:
        code = _run_cohort(args, cohort, out, spec, model, sha, workers, rank, world)
        finished = True
        return code
    finally:
        if world > 1:
            _leave_process_group(finished)


def _run_cohort(args, cohort, out: Path, spec, model, sha, workers: int, rank: int, world: int) -> int:
    from engines.cohort import run_identity, run_slides, shard, write_outputs

    mine = shard(cohort.slides, rank, world)
    bar = ProgressPrinter(sys.stderr, label_width=60) if rank == 0 else None
    counts = {"ran": 0, "reused": 0}
    start = time.monotonic()

    def on_result(res, reused: bool) -> None:
        counts["reused" if reused else "ran"] += 1
        done = counts["ran"] + counts["reused"]
        if bar is None:
            return
        # ETA from the slides run so far (reused ones cost nothing).
        eta = ((time.monotonic() - start) / counts["ran"] * (len(mine) - done)) if counts["ran"] else None
        bar.update(done, len(mine), f"slide {done}/{len(mine)} ETA {_duration(eta)}"
                   + (f" {res.name}" if bar.tty else ""))

    out.mkdir(parents=True, exist_ok=True)
    try:
        run_slides(mine, spec, out, workers, model=model, sha=sha, on_result=on_result,
                   annotations=args.annotations, annotation_class=_annotation_class(args))
    finally:
        if bar is not None:
            bar.finish()
    if world > 1:
        import torch
        import torch.distributed as dist

        total = torch.tensor([counts["ran"], counts["reused"]], dtype=torch.long)
        dist.all_reduce(total)  # also the barrier: every rank's records are written
        counts["ran"], counts["reused"] = (int(v) for v in total)
    from engines.cohort import collect

    records = collect(cohort, out)
    failed = [(s, r) for s, r in zip(cohort.slides, records) if r is None or r.error]
    if rank != 0:
        return EXIT_FAILED if failed else EXIT_OK
    summary = write_outputs(cohort, out, list(model.classes), run_identity(spec, model, sha))
    _print_cohort_summary(summary, counts, failed, out)
    _print_annotation_problems(cohort, records)
    return EXIT_FAILED if failed else EXIT_OK


def _print_annotation_problems(cohort, records) -> None:
    """Annotation files that could not be read: warnings (the slide keeps its prediction)."""
    bad = [(s, r.scored["error"]) for s, r in zip(cohort.slides, records)
           if r is not None and r.scored and r.scored.get("error")]
    for s, problem in bad[:10]:
        print(f"{PROG} infer: warning: {s.name}: annotations not scored: {problem}", file=sys.stderr)
    if len(bad) > 10:
        print(f"{PROG} infer: warning: ... and {len(bad) - 10} more slide(s) whose annotations "
              "could not be read", file=sys.stderr)


def _print_cohort_summary(summary: dict, counts: dict, failed: list, out: Path) -> None:
    line = f"{summary['n']} slide(s): {summary['n_predicted']} predicted, {summary['n_failed']} failed"
    if summary["accuracy"] is not None:
        line += f"; accuracy {summary['accuracy']:.3f} on {summary['n_scored']}"
    if summary["auroc"] is not None:
        line += f", AUROC {summary['auroc']:.3f}"
        if summary["auroc_ci95"] is not None:
            lo, hi = summary["auroc_ci95"]
            line += f" (95% CI {lo:.3f}-{hi:.3f})"
    ratio = summary.get("attention_ratio")
    if ratio and ratio["median"] is not None:
        line += (f"; attention-in-annotation ratio median {ratio['median']:.3f} "
                 f"on {ratio['n']} annotated slide(s)")
    print(line)
    for s, r in failed[:10]:
        print(f"{PROG} infer: {s.name}: {r.error if r is not None else 'not run'}", file=sys.stderr)
    if len(failed) > 10:
        print(f"{PROG} infer: ... and {len(failed) - 10} more failed slide(s)", file=sys.stderr)
    print(f"{PROG} infer: ran {counts['ran']} slide(s), reused {counts['reused']} done earlier with "
          f"the same weights; {out / 'predictions.csv'}, {out / 'summary.json'}, traces in "
          f"{out / 'traces'}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------
def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def nonnegative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of 0 or more")
    return value



def _configure_train(p: argparse.ArgumentParser) -> None:
    # Settings that shape a run's numbers default to None: a resume then takes the run's own
    # (stored in last.pt) and refuses a conflicting one; a new run takes the default shown.
    p.add_argument("manifest", help="CSV with slide,label[,split] (paths relative to it)")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--preset", default=None, help="model preset (default tiny; a resume keeps the run's)")
    p.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                   help="epochs (default: the preset's recipe, 10 for tiny; a resume keeps the run's)")
    p.add_argument("--out", default="runs/train", metavar="DIR",
                   help="run folder for checkpoints and metrics (default runs/train); "
                        "one run at a time may use it")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt with the run's own settings")
    p.add_argument("--init", metavar="CHECKPOINT", help="fine-tune from these weights")
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="train only the layers after the backbone")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default: the preset's recipe, 0.001 for tiny)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=None, metavar="W",
                   help="weight decay (default: the preset's recipe)")
    from engines.recipes import SCHEDULERS  # no torch: the parser stays quick

    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="learning-rate schedule (default: the preset's recipe, cosine for tiny)")
    p.add_argument("--clip", type=nonnegative_float, default=None, metavar="NORM",
                   help="clip the gradient norm (default: the preset's recipe; 0: no clip)")
    p.add_argument("--accumulation", "--batch", type=positive_int, dest="accumulation", metavar="N",
                   help="slides per optimiser step (gradient accumulation; default: the preset's)")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="seed of the split, order and augmentation (default 0)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch threads per process")
    _add_device(p, "training")
    p.set_defaults(device=None)  # None: auto for a new run, the run's own for a resume
    _add_backbone_weights(p)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _check_train_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before torch loads and the processes meet."""
    _check_model_name(args.model)
    _existing_file(args.manifest, "manifest")
    if args.resume and args.init:
        raise UsageError("--resume continues a run and --init starts one: give one of them")
    if args.init:
        _existing_file(args.init, "--init checkpoint")
    if args.backbone_weights is not None and (args.init or args.resume):
        raise UsageError("--backbone-weights starts a new model; --init and --resume bring their own weights")
    backbone_overrides(args.model, args.preset, args.backbone_weights)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder")
    if _env_rank() == 0:  # under torchrun rank 0 holds the lock for all
        from engines.runlock import lock_holder

        holder = lock_holder(out)
        if holder is not None:
            raise UsageError(f"--out {args.out} is in use by another training run ({holder}); "
                             "wait for it to finish or choose another folder")
    if args.resume and not (out / "last.pt").is_file():
        raise UsageError(f"--resume: {out / 'last.pt'} does not exist (nothing to resume)")
    if not args.resume and (out / "last.pt").exists():
        # A new run would overwrite the checkpoints and mix its metrics into the old ones.
        raise UsageError(f"--out {args.out} already holds a run (last.pt); "
                         "add --resume to continue it or choose another folder")


class _CancelOnSignal:
    """While active, the first Ctrl+C (or SIGTERM, which torchrun forwards) asks the trainer
    to stop at the next step and keep a resumable last.pt; a second Ctrl+C quits at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, control, quiet: bool = False) -> None:
        self.control = control
        self.quiet = quiet  # under torchrun every rank gets the signal; rank 0 speaks
        self.previous: dict[int, object] = {}
        self.asked = False

    def __enter__(self) -> "_CancelOnSignal":
        import signal

        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the run is not cancellable
                break
        return self

    def _handle(self, signum, _frame) -> None:
        import signal

        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = True
        self.control.cancel()
        if self.quiet:
            return
        # os.write, not print: a signal can land in the middle of the bar's own write.
        try:
            os.write(sys.stderr.fileno(), b"\nstopping after this step (Ctrl+C again to quit now)\n")
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self.previous.items():
            # None: a handler set outside Python, which cannot be put back; the default is.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # type: ignore[arg-type]


def _env_rank() -> int:
    """This process's rank under torchrun (0 alone), known before the processes meet."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


@command("train", "train or fine-tune a model from a manifest (also under torchrun)", _configure_train)
def cmd_train(args: argparse.Namespace) -> int:
    _check_train_args(args)
    from contextlib import ExitStack

    from engines.runlock import RunLock, RunLockedError

    with ExitStack() as held:
        if _env_rank() == 0:  # rank 0 holds --out for every rank of a torchrun job
            try:
                # Makes --out when missing, and removes it again if the run wrote nothing.
                held.enter_context(RunLock(args.out))
            except RunLockedError as exc:
                raise UsageError(str(exc)) from None
            except OSError as exc:  # e.g. a folder without write permission
                raise UsageError(f"--out {args.out} cannot be written ({exc.strerror or exc})") from None
        return _train_locked(args)


def _train_config(args: argparse.Namespace):
    """The TrainConfig the arguments ask for; on --resume, completed from the run's own
    settings (a conflicting one is bad input)."""
    from engines.train import TrainConfig, resume_config

    cfg = TrainConfig(manifest=args.manifest, model=args.model, preset=args.preset, out=args.out,
                      epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                      scheduler=args.scheduler, clip=args.clip, accumulation=args.accumulation, seed=args.seed,
                      resume=args.resume, init=args.init, freeze_backbone=args.freeze_backbone,
                      threads=args.threads, device=args.device,
                      overrides=backbone_overrides(args.model, args.preset, args.backbone_weights))
    if args.resume:
        try:
            cfg = resume_config(cfg)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return cfg


def _train_locked(args: argparse.Namespace) -> int:
    from engines.train import init_distributed

    cfg = _train_config(args)
    args.device = cfg.device
    device = _resolve_device(args)  # before the processes meet: a missing GPU is bad input
    rank, world = init_distributed(device)  # a no-op unless torchrun started several processes
    finished = False
    try:
        code = _train(args, cfg, rank, world)
        finished = True
        return code
    finally:
        if world > 1:
            _leave_process_group(finished)


def _leave_process_group(finished: bool) -> None:
    """Tear the process group down before the interpreter does. A rank that tore it down while
    the other still used it, or left gloo's threads to interpreter exit, was now and then
    aborted ("terminate called without an active exception") after a finished run. So a
    finished rank first frees what still holds the group (DDP's reducer) and meets the
    others; a failed rank does not wait for ranks that may never come."""
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if finished:
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


def _train(args: argparse.Namespace, cfg, rank: int, world: int) -> int:
    from engines.data import ManifestError
    from engines.train import EpochEvent, LogEvent, StepEvent, TrainControl, best_epoch, train

    bar = ProgressPrinter(sys.stderr, label_width=72)  # only rank 0 gets events to draw

    started = [False]

    def on_event(event) -> None:
        if isinstance(event, StepEvent):
            started[0] = True
            losses = " ".join(f"{k} {v:.3f}" for k, v in event.losses.items())
            bar.update((event.epoch - 1) * event.steps + event.step, event.epochs * event.steps,
                       f"epoch {event.epoch}/{event.epochs} step {event.step}/{event.steps} "
                       f"ETA {_duration(event.eta_s)} {losses}")
        elif isinstance(event, EpochEvent):
            bar.finish()
            m = event.metrics
            shown = "  ".join(f"{k} {m[k]:.4g}" for k in
                              ("train_loss", "val_loss", "val_accuracy", "val_auroc", "lr") if k in m)
            print(f"epoch {int(m.get('epoch', event.epoch))}/{event.epochs}: {shown}"
                  + ("  (best)" if event.best else ""), flush=True)
        elif isinstance(event, LogEvent) and not event.message.startswith("epoch "):
            # Epoch summaries are logged too; the EpochEvent line above already shows them.
            bar.finish()
            print(f"{PROG} train: {event.message}", file=sys.stderr, flush=True)

    control = TrainControl()
    out = Path(args.out)
    try:
        try:
            with _CancelOnSignal(control, quiet=rank != 0):
                result = train(cfg, on_event=on_event, control=control)
        finally:
            bar.finish()
    except ManifestError as exc:
        if rank == 0:  # every process read the same manifest: list its problems once
            print(f"{PROG} train: error: manifest {args.manifest} has {len(exc.problems)} problem(s):",
                  file=sys.stderr)
            for problem in exc.shown:  # capped; the first line gives the full count
                print(f"  {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError) as exc:
        # Before the first step these come from the trainer's own checks of the manifest and
        # checkpoints (e.g. an --init checkpoint with other classes): bad input, not a failure.
        if started[0]:
            raise
        raise UsageError(str(exc)) from None
    if rank != 0:
        return EXIT_FAILED if result.cancelled else EXIT_OK
    if result.cancelled:
        print(f"{PROG} train: stopped; {out / 'last.pt'} keeps the run. Continue with: "
              f"{_resume_command(args, world)}", file=sys.stderr)
        return EXIT_FAILED
    if args.resume and not started[0]:
        print(f"{PROG} train: nothing left to train: the run in {out} already has "
              f"{len(result.history)} epoch(s); give a larger --epochs to go on", file=sys.stderr)
        return EXIT_OK
    best = f"best.pt from epoch {best_epoch(result.history)}" if result.history else "no epochs run"
    print(f"{PROG} train: {result.epochs_done} epoch(s) done ({best}); checkpoints {out / 'last.pt'}, "
          f"{out / 'best.pt'}; metrics {out / 'metrics.jsonl'}", file=sys.stderr)
    return EXIT_OK


def _resume_command(args: argparse.Namespace, world: int) -> str:
    """The command that continues this run. The run's seed, accumulation, threads, device,
    preset and split live in last.pt and are taken from there, so these arguments suffice."""
    import shlex

    launcher = f"torchrun --nproc_per_node={world} -m app" if world > 1 else PROG
    parts = [launcher, "train", shlex.quote(str(args.manifest)), "--model", shlex.quote(args.model),
             "--out", shlex.quote(str(args.out)), "--resume"]
    if args.epochs is not None:
        parts[-1:-1] = ["--epochs", str(args.epochs)]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------
def _configure_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", help="folder for the slides, masks, manifest.csv and needles.json")
    p.add_argument("--slides", type=positive_int, default=20, metavar="N", help="slides to make (default 20)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed (the same seed makes the same data)")
    p.add_argument("--size", type=positive_int, default=8192, metavar="PX",
                   help="level-0 side in pixels (default 8192)")
    p.add_argument("--needle-area", type=_percent_range, default=None, metavar="LO,HI",
                   help="all of a positive slide's needles together, in percent of its tissue "
                        "(default 0.1,1; 0.014,0.14 at 8192 px keeps the needles of 3072 px slides)")


def _percent_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI in percent") from None
    if not (0 < lo <= hi < 100):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < LO <= HI < 100 (percent)")
    return lo / 100, hi / 100


SYNTH_SIZES = (256, 32768)  # below: too small for needles; above: the image no longer fits memory


@command("synth", "write synthetic needle-in-a-haystack slides and a manifest", _configure_synth)
def cmd_synth(args: argparse.Namespace) -> int:
    if args.slides < 2:
        raise UsageError("--slides must be at least 2 (one of each class)")
    lo, hi = SYNTH_SIZES
    if not lo <= args.size <= hi:
        raise UsageError(f"--size must be {lo}..{hi} pixels, got {args.size}")
    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{args.outdir} is a file; give a folder")
    from engines.synth import SynthConfig, generate

    bar = ProgressPrinter(sys.stderr)

    def on_progress(done: int, total: int, name: str) -> None:
        bar.update(done, total, f"slide {min(done + 1, total)}/{total} {name}" if done < total else "done")

    try:
        cfg = SynthConfig(size=args.size)
        if args.needle_area is not None:
            cfg = dataclasses.replace(cfg, needle_area=args.needle_area)
        made = generate(out, slides=args.slides, seed=args.seed, cfg=cfg, on_progress=on_progress)
    finally:
        bar.finish()
    positives = sum(s.label == "tumor" for s in made)
    print(f"{len(made)} slides ({positives} tumor, {len(made) - positives} normal) in {out}")
    print(f"manifest: {out / 'manifest.csv'}")
    print(f"needles: {out / 'needles.json'}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# snapshot
# ---------------------------------------------------------------------------------------
def _size_arg(text: str) -> tuple[int, int]:
    from app.snapshot import parse_size  # no Qt at import time

    try:
        return parse_size(text)
    except ValueError as exc:  # argparse names the option itself
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--size ")) from None


def _layers_arg(text: str) -> set[str]:
    from app.snapshot import parse_layers

    try:
        return parse_layers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--layers ")) from None


def _configure_snapshot(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", help="slide file")
    p.add_argument("--model", help="model name (optional with --checkpoint, which names it)")
    p.add_argument("--checkpoint", help="trained weights; without one the model is untrained")
    p.add_argument("--preset", help="model preset (default tiny; a checkpoint fixes its own)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--view", type=parse_rect, metavar="X,Y,W,H",
                   help="level-0 rectangle to show (default: the whole slide)")
    p.add_argument("--size", type=_size_arg, default=(1600, 1000), metavar="WxH",
                   help="image size in pixels (default 1600x1000)")
    p.add_argument("--layers", type=_layers_arg, default=None, metavar="LIST",
                   help="overlays to draw: any of boxes,maps,trail, or none (default all)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch threads")
    _add_device(p, "the model")
    _add_backbone_weights(p)
    _add_options(p)


@command("snapshot", "run a model and save the view with its overlays as PNG", _configure_snapshot)
def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.model is None and args.checkpoint is None:
        raise UsageError("snapshot needs --model NAME (or --checkpoint FILE, which names its model)")
    _check_model_name(args.model)
    _writable_target(args.out, "--out")
    if args.checkpoint is not None:
        _existing_file(args.checkpoint, "checkpoint")

    from engines.slide import Slide

    slide = Slide(args.slide)
    try:
        if args.view is not None:
            x, y, w, h = args.view
            if x >= slide.width or y >= slide.height or x + w <= 0 or y + h <= 0:
                raise UsageError(f"--view {x:g},{y:g},{w:g},{h:g} lies outside the "
                                 f"{slide.width}x{slide.height} slide")
        device = _resolve_device(args)
        model, sha = _model_for(args, "snapshot")
        trace = _run_model(model, slide, None, sha, device)
        from app.snapshot import LAYER_NAMES, render_trace

        layers = set(LAYER_NAMES) if args.layers is None else args.layers
        path = render_trace(slide, trace, args.out, args.size, view=args.view, layers=layers)
    finally:
        slide.close()
    print(f"prediction: {trace.prediction}  "
          + "  ".join(f"{c}={p:.3f}" for c, p in zip(trace.classes, trace.probs)))
    print(f"{PROG} snapshot: {args.size[0]}x{args.size[1]} figure "
          f"({', '.join(sorted(layers)) or 'no overlays'}) written to {path}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="MagLens: a whole-slide image viewer that shows how attention models look.",
        epilog=f"'{PROG} SLIDE' alone opens the viewer on SLIDE; '{PROG} PROJECT.maglens.json' "
               "on a project (also 'view --project PATH' for a folder or manifest).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(handler=cmd.handler)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """``maglens`` and ``maglens SLIDE [...]`` mean ``maglens view ...``."""
    if not argv:
        return ["view"]
    if argv[0] in COMMANDS or argv[0] in ("-h", "--help"):
        return argv
    return ["view", *argv]


def _bad_input_types() -> tuple[type[BaseException], ...]:
    # Imported here: every one of these modules is light (no torch, no Qt).
    from engines.registry import UnknownModelError
    from engines.slide import SlideError
    from engines.trace import TraceError

    types: list[type[BaseException]] = [UsageError, SlideError, UnknownModelError, TraceError]
    ck = sys.modules.get("engines.checkpoint")  # only loaded (with torch) when used
    if ck is not None:
        types.append(ck.CheckpointError)
    bb = sys.modules.get("engines.models.backbones")
    if bb is not None:
        types.append(bb.BackboneWeightsError)
    return tuple(types)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    where = PROG
    try:
        args = build_parser().parse_args(_with_default_command(argv))
        where = f"{PROG} {args.command}" + _rank_tag()
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): nothing left to report to.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if isinstance(exc, _bad_input_types()):
            print(f"{where}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if os.environ.get("MAGLENS_DEBUG"):
            raise
        print(f"{where}: failed: {type(exc).__name__}: {_one_line(exc)} "
              "(set MAGLENS_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_FAILED


def _rank_tag() -> str:
    """Under torchrun every process reports its own errors; say which one speaks."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return f" [rank {os.environ.get('RANK', '?')}]"
    return ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
