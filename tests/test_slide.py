"""Every real slide opens with the right pixels; every bad file is refused with SlideError."""
from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image

from engines.slide import Slide, SlideError
from tests.conftest import BAD_SLIDES, DATA, DEMO_SLIDE, GOOD_SLIDES


@pytest.mark.parametrize("path", GOOD_SLIDES, ids=lambda p: p.name)
def test_good_slide_opens_with_consistent_levels(path):
    with Slide(path) as s:
        assert s.width > 0 and s.height > 0
        assert s.levels[0].downsample == 1.0
        downsamples = [lv.downsample for lv in s.levels]
        assert downsamples == sorted(downsamples)
        thumb = s.thumbnail(64)
        assert thumb.dtype == np.uint8 and thumb.ndim == 3 and thumb.shape[2] == 3
        assert max(thumb.shape[:2]) == 64
        info = s.info()
        assert info["width"] == s.width and len(info["levels"]) == s.level_count


@pytest.mark.parametrize("path", [p for p in GOOD_SLIDES if openslide.OpenSlide.detect_format(str(p))],
                         ids=lambda p: p.name)
def test_pixels_match_openslide(path):
    """read_region returns what OpenSlide composites on white, at every level."""
    with Slide(path) as s:
        osr = openslide.OpenSlide(str(path))
        for level in range(s.level_count):
            lw, lh = s.levels[level].width, s.levels[level].height
            w, h = min(64, lw), min(48, lh)
            x0 = int((lw - w) // 2 * s.levels[level].downsample)
            y0 = int((lh - h) // 2 * s.levels[level].downsample)
            ours = s.read_region(level, x0, y0, w, h)
            ref = Image.new("RGB", (w, h), (255, 255, 255))
            rgba = osr.read_region((x0, y0), level, (w, h))
            ref.paste(rgba, mask=rgba.getchannel("A"))
            np.testing.assert_array_equal(ours, np.asarray(ref))
        osr.close()


def test_demo_slide_facts():
    with Slide(DEMO_SLIDE) as s:
        assert (s.width, s.height) == (2220, 2967)
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        assert s.objective_power == 20
        assert s.vendor == "aperio"
        assert {"label", "macro", "thumbnail"} <= set(s.associated_names)
        label = s.associated_image("label")
        assert label.ndim == 3 and label.shape[2] == 3 and label.size > 0
        with pytest.raises(SlideError):
            s.associated_image("nope")


def test_striped_tiff_opens_through_pillow_as_pyramid():
    path = DATA / "kidney-striped.tif"
    with Slide(path) as s:
        ref = np.asarray(Image.open(path).convert("RGB"))
        assert (s.height, s.width) == ref.shape[:2]
        assert s.level_count > 1 and s.vendor == "plain-image"
        np.testing.assert_array_equal(s.read_region(0, 100, 50, 40, 30), ref[50:80, 100:140])
        # coarser level is a faithful downsample of the image
        lv = s.levels[1]
        coarse = s.read_region(1, 0, 0, lv.width, lv.height).astype(float)
        small = np.asarray(Image.fromarray(ref).resize((lv.width, lv.height), Image.BOX)).astype(float)
        assert np.abs(coarse - small).mean() < 3


def test_png_and_jpeg_open(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    with Slide(tmp_path / "a.png") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 500, 300), img)
        assert s.mpp is None and s.objective_power is None
    Image.fromarray(img).save(tmp_path / "a.jpg")
    assert Slide(tmp_path / "a.jpg").dimensions == (500, 300)


def test_outside_the_slide_is_background():
    with Slide(DATA / "kidney-striped.tif") as s:
        out = s.read_region(0, s.width - 10, s.height - 10, 30, 30)
        assert (out[15:, 15:] == 255).all()
        assert not (out[:10, :10] == 255).all()


def test_read_rect_resamples_the_exact_rectangle():
    with Slide(DEMO_SLIDE) as s:
        full = s.read_region(0, 1000, 1200, 200, 100)
        half = s.read_rect((1000, 1200, 200, 100), 100, 50)
        assert half.shape == (50, 100, 3)
        ref = np.asarray(Image.fromarray(full).resize((100, 50), Image.BOX)).astype(float)
        assert np.abs(half.astype(float) - ref).mean() < 2
        shifted = np.asarray(Image.fromarray(s.read_region(0, 1001, 1200, 200, 100)).resize((100, 50), Image.BOX))
        assert np.abs(half.astype(float) - shifted).mean() > 5  # the comparison can tell a 1 px shift


def test_best_level_is_just_finer():
    with Slide(DATA / "test3-DAPI-2.ndpi") as s:
        ds = [lv.downsample for lv in s.levels]
        assert s.best_level_for_downsample(1.0) == 0
        assert s.best_level_for_downsample(ds[2] * 1.5) == 2
        assert s.best_level_for_downsample(1e9) == len(ds) - 1


def test_reads_for_a_stretched_grid_use_the_nearly_matching_level(monkeypatch):
    # A grid stretched to fit the slide asks for 0.5 % less than a level's downsample: the
    # read takes that level (not one 4x larger) and still returns the exact rectangle.
    with Slide(DATA / "test3-DAPI-2.ndpi") as s:
        ds2 = s.levels[2].downsample
        assert s.best_level_for_downsample(ds2 * 0.995) == 1
        assert s.read_level_for(ds2 * 0.995) == 2
        assert s.read_level_for(ds2 * 0.95) == 1
        used = []
        real = s.read_region
        monkeypatch.setattr(s, "read_region", lambda level, *a: used.append(level) or real(level, *a))
        w = round(400 / (ds2 * 0.995))
        out = s.read_rect((800, 800, 400, 400), w, w)
        assert used == [2] and out.shape == (w, w, 3)


@pytest.mark.parametrize("path", BAD_SLIDES, ids=lambda p: p.name)
def test_bad_files_raise_slide_error(path):
    with pytest.raises(SlideError) as err:
        Slide(path)
    assert path.name in str(err.value)


def _bad_inputs(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    return {
        "zero-byte": empty,
        "text named .svs": text,
        "missing": tmp_path / "missing.svs",
        "directory": tmp_path,
    }


@pytest.mark.parametrize("kind", ["zero-byte", "text named .svs", "missing", "directory"])
def test_bad_inputs_raise_slide_error(tmp_path, kind):
    with pytest.raises(SlideError) as err:
        Slide(_bad_inputs(tmp_path)[kind])
    message = str(err.value)
    assert message and "\n" not in message


def test_truncated_svs_is_refused(truncated_svs):
    with pytest.raises(SlideError, match="truncated"):
        Slide(truncated_svs)


def test_truncated_slide_opens_but_tiles_raise_slide_error(truncated_slide):
    s = Slide(truncated_slide)
    with pytest.raises(SlideError, match="pixel data"):
        s.read_region(0, 0, 0, 256, 256)


def test_one_level_slide_coarse_reads_use_a_shared_in_memory_pyramid():
    with Slide(DEMO_SLIDE) as s:
        assert s.level_count == 1
        rect = (300.5, 700.25, 1200.0, 900.0)
        coarse = s.read_rect(rect, 150, 112)  # 8x down: served from the halvings
        assert s._proxy is not None
        full = s.read_region(0, 300, 700, 1202, 902)
        ref = np.asarray(Image.fromarray(full).resize((150, 112), Image.BOX, box=(0.5, 0.25, 1200.5, 900.25)))
        assert np.abs(coarse.astype(float) - ref).mean() < 6
        # a read partly outside the slide pads with white
        edge = s.read_rect((s.width - 400, 0, 800, 400), 100, 50)
        assert (edge[:, 60:] == 255).all() and not (edge[:, :40] == 255).all()


@pytest.mark.parametrize("path", GOOD_SLIDES, ids=lambda p: p.name)
def test_xrgb_reads_match_rgb_reads_inside_and_outside(path):
    # The viewer's direct path (OpenSlide's ARGB, composited on the background) must give the
    # very pixels of read_region, also where the region hangs over the slide's edge.
    with Slide(path) as s:
        for level in {0, s.level_count - 1}:
            ds = s.levels[level].downsample
            lw, lh = s.levels[level].width, s.levels[level].height
            for x, y in [(0, 0), (int((lw - 40) * ds), int((lh - 30) * ds)), (int(-20 * ds), int(-10 * ds))]:
                rgb = s.read_region(level, x, y, 64, 48).astype(np.uint32)
                xrgb = s.read_region_xrgb(level, x, y, 64, 48)
                assert xrgb.shape == (48, 64) and xrgb.dtype == np.uint32
                assert np.all(xrgb >> 24 == 255)
                unpacked = np.stack([(xrgb >> 16) & 255, (xrgb >> 8) & 255, xrgb & 255], -1)
                assert np.abs(unpacked.astype(int) - rgb.astype(int)).max() <= 1
        edge = s.read_region_xrgb(0, -8, -8, 8, 8)
        assert np.all(edge == 0xFFFFFFFF)  # wholly outside: background white


def test_xrgb_of_a_broken_tile_is_a_slide_error(truncated_slide):
    with Slide(truncated_slide) as s:
        with pytest.raises(SlideError):
            for level in range(s.level_count):
                s.read_region_xrgb(level, 0, 0, s.levels[level].width, s.levels[level].height)


def test_a_failed_read_keeps_failing_without_touching_the_file_again(truncated_slide):
    with Slide(truncated_slide) as s:
        with pytest.raises(SlideError, match="pixel data") as first:
            s.read_region_xrgb(0, 0, 0, 256, 256)
        backend = s._backend
        calls = []
        real = backend._c_read
        backend._c_read = lambda *a: calls.append(a) or real(*a)
        for read in (s.read_region_xrgb, s.read_region):
            with pytest.raises(SlideError, match="pixel data") as later:
                read(0, 512, 512, 64, 64)
            assert str(later.value) == str(first.value)  # the first failure's message
        assert calls == []


HAMMER = """
import sys, threading
from engines.slide import Slide, SlideError
failed = []
for _ in range(100):
    slide = Slide(sys.argv[1])  # a fresh handle: its first reads are the ones that race
    start = threading.Barrier(4)
    def read(k):
        start.wait()
        for i in range(2):
            try:
                slide.read_region_xrgb(0, k * 256 % 768, i * 256, 256, 256)
            except SlideError:
                failed.append(k)
    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slide.close()
print(len(failed))
"""


def test_damaged_dicom_read_from_many_threads_fails_cleanly(truncated_slide):
    # The viewer's tile threads reading a damaged DICOM file at once crashed the process
    # (a segfault in OpenSlide's DICOM reader, about every run of this script); in a
    # subprocess, so a crash fails this test instead of ending the suite.
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", HAMMER, str(truncated_slide)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(100 * 4 * 2)]  # every read failed, and cleanly
