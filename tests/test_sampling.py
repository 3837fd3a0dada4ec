"""The model-side pixel reader: regions, orientation, grey filter, differentiable crops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.sampling import (
    Orientation, SlideView, crop, grey_to_background, theta_to_rect, zoom_theta,
)
from engines.slide import Slide
from tests.conftest import DATA, DEMO_SLIDE


@pytest.fixture(scope="module")
def demo():
    return Slide(DEMO_SLIDE)


def test_identity_view_reads_level0_rect(demo):
    view = SlideView(demo)
    assert view.bounds == (0, 0, demo.width, demo.height)
    np.testing.assert_array_equal(view.read((500, 600, 64, 32), 64, 32), demo.read_region(0, 500, 600, 64, 32))


def test_roi_and_padding_outside(demo):
    view = SlideView(demo, roi=(100, 200, 300, 400))
    assert view.bounds == (100, 200, 300, 400)
    out = view.read((demo.width - 20, 0, 40, 40), 40, 40)
    assert (out[:, 20:] == 255).all()
    np.testing.assert_array_equal(out[:, :20], demo.read_region(0, demo.width - 20, 0, 20, 40))


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_orientation_matches_numpy_on_whole_roi_and_subrects(flip, k):
    slide = Slide(DATA / "kidney-striped.tif")
    roi = (200, 100, 300, 200)
    base = SlideView(slide, roi=roi).read(roi, 300, 200)
    expect = base[:, ::-1] if flip else base
    expect = np.rot90(expect, k)
    view = SlideView(slide, roi=roi, orientation=Orientation(flip=flip, rot90=k))
    bx, by, bw, bh = view.bounds
    assert (bw, bh) == ((200, 300) if k % 2 else (300, 200))
    np.testing.assert_array_equal(view.read(view.bounds, int(bw), int(bh)), expect)
    # a sub-rectangle of the view equals the same slice of the transformed image
    sub = view.read((bx + 10, by + 20, 50, 40), 50, 40)
    np.testing.assert_array_equal(sub, expect[20:60, 10:60])


def test_grey_filter_whitens_grey_pixels():
    img = np.array([[[100, 105, 110], [200, 100, 150]]], np.uint8)
    out = grey_to_background(img)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 100, 150]


def test_read_tensor_shape_and_range(demo):
    t = SlideView(demo).read_tensor([(0, 0, 100, 100), (1000, 1000, 300, 300)], 32, 24)
    assert t.shape == (2, 3, 24, 32) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_crop_selects_theta_rect_and_passes_gradient():
    # An image whose pixel value encodes its x coordinate: the crop's mean x tells where it is.
    h, w = 64, 64
    xs = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(1, 1, h, w).contiguous()
    s = torch.tensor([0.25], requires_grad=True)
    tx = torch.tensor([0.5], requires_grad=True)
    ty = torch.tensor([0.0], requires_grad=True)
    out = crop(xs, zoom_theta(s, tx, ty), 16, 16)
    x, y, rw, rh = theta_to_rect(0.25, 0.5, 0.0, (0, 0, w, h))
    assert out.mean().item() == pytest.approx((x + rw / 2) / w, abs=0.02)
    out.mean().backward()
    assert tx.grad is not None and tx.grad.abs().item() > 0


def test_theta_to_rect_whole_field():
    assert theta_to_rect(1.0, 0.0, 0.0, (10, 20, 100, 50)) == (10, 20, 100, 50)
