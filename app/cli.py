"""The ``maglens`` command line (also ``python -m app``).

``maglens [view] [SLIDE]`` opens the viewer; ``info`` and ``infer`` work headless. Each
subcommand is one entry in ``COMMANDS`` (a name, a function that adds its arguments, and a
handler returning the exit code), so new ones plug in without touching the dispatch.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 anything else.
Heavy modules (torch, Qt) are imported inside the handlers that need them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
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


# ---------------------------------------------------------------------------------------
# view
# ---------------------------------------------------------------------------------------
def _configure_view(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", nargs="?", help="slide to open (the bundled demo slide when left out)")
    p.add_argument("--model", help="model to select in the Models dock")
    p.add_argument("--checkpoint", help="checkpoint file for that model")


@command("view", "open the viewer (the default command)", _configure_view)
def cmd_view(args: argparse.Namespace) -> int:
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
    p.add_argument("slide", help="slide file")
    p.add_argument("--model", help="model name (optional with --checkpoint, which names it)")
    p.add_argument("--preset", help="model preset (default tiny; a checkpoint fixes its own)")
    p.add_argument("--checkpoint", help="trained weights; without one the model is untrained")
    p.add_argument("--out", help="write the trace JSON here")
    p.add_argument("--geojson", help="write fields and attention cells as GeoJSON (QuPath)")
    p.add_argument("--roi", type=parse_rect, metavar="X,Y,W,H",
                   help="run on this level-0 rectangle only")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch threads")


class ProgressPrinter:
    """A redrawn bar on a terminal; elsewhere a plain line per stage, at most every few
    seconds, so logs stay short."""

    def __init__(self, stream: TextIO, tty: bool | None = None, every_s: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every_s = every_s
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
            self.stream.write(f"\r[{bar}] {100 * done // total:3d}% {stage[:40]:<40}")
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


@command("infer", "run a model on a slide and save its trace", _configure_infer)
def cmd_infer(args: argparse.Namespace) -> int:
    if args.model is None and args.checkpoint is None:
        raise UsageError("infer needs --model NAME (or --checkpoint FILE, which names its model)")
    _check_model_name(args.model)
    _writable_target(args.out, "--out")
    _writable_target(args.geojson, "--geojson")
    if args.checkpoint is not None:
        _existing_file(args.checkpoint, "checkpoint")

    from engines.slide import Slide

    slide = Slide(args.slide)  # SlideError before torch loads: bad slides fail fast
    try:
        return _infer(args, slide)
    finally:
        slide.close()


def _infer(args: argparse.Namespace, slide) -> int:
    import torch

    from engines import infer, registry
    from engines.checkpoint import model_from_checkpoint
    from engines.trace import Progress

    if args.roi is not None:
        try:
            infer.check_roi(args.roi, slide)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint is not None:
        model = model_from_checkpoint(args.checkpoint, expect_model=args.model)
        if args.preset is not None and args.preset != model.preset:
            raise UsageError(
                f"--preset {args.preset} conflicts with the checkpoint, which holds preset {model.preset}"
            )
        sha = model.checkpoint_sha256
    else:
        model = registry.create(args.model, args.preset or "tiny")
        sha = None
        print(
            f"{PROG} infer: warning: no --checkpoint: {args.model} runs with its initial "
            "(untrained) weights and the trace records checkpoint null",
            file=sys.stderr,
        )

    bar = ProgressPrinter(sys.stderr)

    def on_event(event) -> None:
        if isinstance(event, Progress):
            bar.update(event.done, event.total, event.stage)

    try:
        trace = infer.run(model, slide, on_event=on_event, roi=args.roi, checkpoint_id=sha)
    finally:
        bar.finish()
    if args.out:
        trace.save(args.out)
    if args.geojson:
        trace.save_geojson(args.geojson)

    probs = "  ".join(f"{c}={p:.3f}" for c, p in zip(trace.classes, trace.probs))
    print(f"prediction: {trace.prediction}  ({probs})")
    print(
        f"{trace.model}/{trace.preset}: {len(trace.fields)} fields, {len(trace.maps)} maps, "
        f"{len(trace.trail)} trail steps in {trace.timings.get('total_s', 0.0):.2f} s"
        + (f"; trace written to {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="MagLens: a whole-slide image viewer that shows how attention models look.",
        epilog=f"'{PROG} SLIDE' alone opens the viewer on SLIDE.",
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
    return tuple(types)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    where = PROG
    try:
        args = build_parser().parse_args(_with_default_command(argv))
        where = f"{PROG} {args.command}"
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
