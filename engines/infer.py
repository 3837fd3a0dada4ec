"""Run one model on one slide and collect everything it shows into a ``Trace``.

The same function serves the viewer's engine thread, ``maglens infer`` and the benchmarks.
Events stream to ``on_event`` as the model produces them; a cancel request is honoured at the
next event, at the next forward call of any of the model's modules and between the pieces
of every slide read, so a model stops within a second even while it decodes a whole slide.
"""
from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, Union

import torch

from engines.models.base import SlideModel
from engines.sampling import SlideView
from engines.slide import Rect, Slide
from engines.trace import AttentionMap, Event, Field, Progress, SlideRef, Trace, TrailStep

CancelFlag = Union[threading.Event, Callable[[], bool], None]
OnEvent = Callable[[Event], None]


class Cancelled(Exception):
    """The run was cancelled by the caller; raised out of ``run``."""


def is_cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)  # threading or multiprocessing Event
    if is_set is not None:
        return bool(is_set())
    return bool(cancel())


def check_roi(roi: Sequence[float] | None, slide: Slide) -> Rect | None:
    """A validated level-0 rectangle (x, y, w, h) that overlaps the slide, or None."""
    if roi is None:
        return None
    try:
        vals = tuple(float(v) for v in roi)
    except (TypeError, ValueError):
        raise ValueError(f"region of interest must be four numbers x, y, w, h; got {roi!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"region of interest must be four finite numbers x, y, w, h; got {roi!r}")
    x, y, w, h = vals
    if w <= 0 or h <= 0:
        raise ValueError(f"region of interest must have a positive width and height; got {w:g}x{h:g}")
    if x >= slide.width or y >= slide.height or x + w <= 0 or y + h <= 0:
        raise ValueError(
            f"region of interest {x:g},{y:g},{w:g},{h:g} lies outside the "
            f"{slide.width}x{slide.height} slide"
        )
    return vals


def run(
    model: SlideModel,
    slide: Slide | str | os.PathLike,
    on_event: OnEvent | None = None,
    cancel: CancelFlag = None,
    roi: Sequence[float] | None = None,
    checkpoint_id: str | None = None,
    threads: int | None = None,
    device: str | torch.device | None = None,
) -> Trace:
    """Run ``model.explain`` on ``slide`` (or its ``roi``, level-0 x, y, w, h) in eval mode.

    Every Field, AttentionMap and TrailStep goes into the returned Trace and, like Progress,
    to ``on_event`` as soon as the model emits it. Raises ``Cancelled`` when ``cancel`` (an
    Event or a callable returning bool) becomes true, ``ValueError`` for a bad ROI or a model
    returning unusable probabilities, and ``SlideError`` when a path cannot be opened.

    ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``) moves
    the model there first (``engines.devices.resolve_device``; ``ValueError`` when it is not
    on this machine); None leaves the model where it is.
    """
    t0 = time.perf_counter()
    if device is not None:
        from engines.devices import resolve_device

        model.to(resolve_device(device))
    owned = not isinstance(slide, Slide)
    sl = Slide(slide) if owned else slide
    try:
        rect = check_roi(roi, sl)
        trace = Trace(
            model=str(getattr(model, "name", "") or type(model).__name__),
            preset=str(getattr(model, "preset", "custom")),
            checkpoint=checkpoint_id,
            slide=SlideRef(path=str(sl.path), width=sl.width, height=sl.height, mpp=sl.mpp),
            classes=list(model.classes),
            roi=rect,
        )
        view = SlideView(sl, rect, check=_read_check(cancel))
        last_total = [1]
        first_shown: list[float] = []

        def emit(event: Event) -> None:
            if is_cancelled(cancel):
                raise Cancelled("inference cancelled")
            if isinstance(event, Progress):
                last_total[0] = max(1, int(event.total))
            elif isinstance(event, (Field, AttentionMap, TrailStep)):
                trace.add(event)
                if not first_shown:
                    first_shown.append(time.perf_counter() - t0)
            if on_event is not None:
                on_event(event)

        if is_cancelled(cancel):
            raise Cancelled("inference cancelled")
        t_explain = time.perf_counter()
        with _eval_mode(model), _torch_threads(threads), _cancel_hooks(model, cancel), torch.no_grad():
            raw = model.explain(view, emit)
        explain_s = time.perf_counter() - t_explain
        trace.probs = _checked_probs(raw, len(trace.classes), trace.model)
        total = last_total[0]
        emit(Progress(total, total, "done"))
        trace.timings = {
            "explain_s": explain_s,
            "total_s": time.perf_counter() - t0,
        }
        if first_shown:
            trace.timings["first_event_s"] = first_shown[0]
        return trace
    finally:
        if owned:
            sl.close()


def _checked_probs(raw: object, n_classes: int, model_name: str) -> list[float]:
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().flatten().cpu().tolist()
    try:
        probs = [float(p) for p in raw]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{model_name} returned {type(raw).__name__}, not class probabilities") from None
    if len(probs) != n_classes:
        raise ValueError(f"{model_name} returned {len(probs)} probabilities for {n_classes} classes")
    if not all(math.isfinite(p) for p in probs):
        raise ValueError(f"{model_name} returned non-finite probabilities {probs}")
    return probs


def _read_check(cancel: CancelFlag) -> Callable[[], None] | None:
    """What slide reads call between pieces: raises Cancelled once ``cancel`` is set, so a
    model stops even inside one long read (a thumbnail of a single-level slide)."""
    if cancel is None:
        return None

    def check() -> None:
        if is_cancelled(cancel):
            raise Cancelled("inference cancelled")

    return check


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if not threads:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _cancel_hooks(model: torch.nn.Module, cancel: CancelFlag) -> Iterator[None]:
    """Check ``cancel`` before every submodule's forward, so a model that runs long between
    two events still stops soon. Hooks are per module (not global) because the viewer may
    run other networks in other threads."""
    if cancel is None:
        yield
        return

    def hook(_module, _inputs):
        if is_cancelled(cancel):
            raise Cancelled("inference cancelled")

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
