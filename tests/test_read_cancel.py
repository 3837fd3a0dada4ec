"""Cancelling a run stops a model inside its slide reads: on a single-level slide a model's
first step (its thumbnail) decodes all of level 0, and that read stops between pieces."""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("torch")

from engines import infer, registry  # noqa: E402
from engines.sampling import SlideView  # noqa: E402
from engines.slide import Slide  # noqa: E402
from tests.hostile_files import tiled_slide  # noqa: E402


@pytest.fixture(scope="module")
def big_single_level(tmp_path_factory):
    return tiled_slide(tmp_path_factory.mktemp("big") / "single-16k.tif", 16384)


def counted(slide: Slide, after: int, started: threading.Event) -> list[int]:
    """Count pixels decoded per backend read; ``started`` is set after ``after`` reads."""
    pixels: list[int] = []
    inner = slide._backend.read

    def read(level, x, y, w, h):
        pixels.append(w * h)
        if len(pixels) >= after:
            started.set()
        return inner(level, x, y, w, h)

    slide._backend.read = read
    return pixels


@pytest.mark.parametrize("name", ["spatial_mag", "grid_attention", "zoom_in", "magnet", "local_learning"])
def test_cancel_stops_a_whole_slide_read(big_single_level, name):
    model = registry.create(name, "tiny")
    cancel, started = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []
    with Slide(big_single_level) as slide:
        assert slide.level_count == 1
        pixels = counted(slide, 2, started)

        def work():
            try:
                infer.run(model, slide, cancel=cancel)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        assert started.wait(120), "the model never started reading the slide"
        cancel.set()
        worker.join(120)
        assert not worker.is_alive()
    assert outcome and isinstance(outcome[0], infer.Cancelled), outcome
    # The thumbnail needed every pixel of level 0; the read stopped long before that.
    assert sum(pixels) < slide.width * slide.height // 4, (len(pixels), sum(pixels))


def test_a_view_read_checks_between_pieces(big_single_level):
    class Stop(Exception):
        pass

    with Slide(big_single_level) as slide:
        pixels = counted(slide, 10 ** 9, threading.Event())
        calls = []

        def check():
            calls.append(1)
            if len(calls) > 3:
                raise Stop

        view = SlideView(slide, check=check)
        with pytest.raises(Stop):
            view.thumbnail(256)
        assert 1 <= len(pixels) <= 3 and sum(pixels) <= 3 * 2048 * 2048
        view.check = None
        small = view.read((0, 0, 3000, 3000), 300, 300)  # without a check: reads as before
        assert small.shape == (300, 300, 3)
